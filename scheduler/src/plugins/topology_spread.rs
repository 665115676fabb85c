//! PodTopologySpread: `topologySpreadConstraints` with `DoNotSchedule` filter nodes whose domain
//! would exceed `maxSkew`; those with `ScheduleAnyway` prefer the emptier domains.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::TopologySpreadConstraint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::core::{Selector, SelectorExt};

use super::node_affinity::pod_matches_node;
use super::taint_toleration::first_untolerated;
use super::{FilterPlugin, MAX_SCORE, Reasons, ScorePlugin, normalize_min_max};
use crate::framework::{CycleState, NodeInfo, PodInfo, Snapshot};

struct Constraint {
    key: String,
    max_skew: i64,
    min_domains: usize,
    selector: Option<Selector>,
    /// For the system defaults: pods with this controller uid match (instead of a selector).
    same_controller: Option<String>,
    honor_affinity: bool,
    honor_taints: bool,
}

impl Constraint {
    fn new(c: &TopologySpreadConstraint, pod: &PodInfo) -> Self {
        let mut selector: LabelSelector = c.label_selector.clone().unwrap_or_default();
        for key in c.match_label_keys.iter().flatten() {
            if let Some(v) = pod.labels.get(key) {
                selector
                    .match_expressions
                    .get_or_insert_with(Vec::new)
                    .push(LabelSelectorRequirement {
                        key: key.clone(),
                        operator: "In".into(),
                        values: Some(vec![v.clone()]),
                    });
            }
        }
        Constraint {
            key: c.topology_key.clone(),
            max_skew: i64::from(c.max_skew.max(1)),
            min_domains: c.min_domains.unwrap_or(1).max(1) as usize,
            selector: c
                .label_selector
                .as_ref()
                .and(Selector::try_from(selector).ok()),
            same_controller: None,
            honor_affinity: c.node_affinity_policy.as_deref() != Some("Ignore"),
            honor_taints: c.node_taints_policy.as_deref() == Some("Honor"),
        }
    }

    fn matches(&self, pod: &PodInfo) -> bool {
        if let Some(uid) = &self.same_controller {
            return controller_uid(pod) == Some(uid.as_str());
        }
        self.selector
            .as_ref()
            .is_some_and(|s| s.matches(&pod.labels))
    }

    fn node_counts(&self, pod: &PodInfo, node: &NodeInfo) -> bool {
        if self.honor_affinity && !pod_matches_node(pod, &node.labels, &node.name) {
            return false;
        }
        if self.honor_taints {
            let tolerations = pod
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.as_deref())
                .unwrap_or(&[]);
            if first_untolerated(&node.taints, tolerations, &["NoSchedule", "NoExecute"]).is_some()
            {
                return false;
            }
        }
        true
    }
}

fn controller_uid(pod: &PodInfo) -> Option<&str> {
    pod.pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Upstream's system default constraints for pods that set none but belong to a controller:
/// spread over hostnames (maxSkew 3) and zones (maxSkew 5), as a preference only. Pods of the
/// same controller count (upstream also counts pods selected by the same Services).
fn default_constraints(pod: &PodInfo) -> Vec<Constraint> {
    let has_own = pod
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.as_ref())
        .is_some_and(|c| !c.is_empty());
    let Some(uid) = controller_uid(pod).filter(|_| !has_own) else {
        return Vec::new();
    };
    [
        ("kubernetes.io/hostname", 3),
        ("topology.kubernetes.io/zone", 5),
    ]
    .into_iter()
    .map(|(key, skew)| Constraint {
        key: key.into(),
        max_skew: skew,
        min_domains: 1,
        selector: None,
        same_controller: Some(uid.to_string()),
        honor_affinity: true,
        honor_taints: false,
    })
    .collect()
}

fn constraints(pod: &PodInfo, when: &str) -> Vec<Constraint> {
    pod.pod
        .spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.when_unsatisfiable == when)
        .map(|c| Constraint::new(c, pod))
        .collect()
}

/// Matching pods per domain, for each constraint, over the nodes that count.
fn count(
    pod: &PodInfo,
    constraints: &[Constraint],
    nodes: &[&NodeInfo],
) -> Vec<HashMap<String, i64>> {
    let keys_present = |n: &NodeInfo| constraints.iter().all(|c| n.labels.contains_key(&c.key));
    let mut counts = vec![HashMap::new(); constraints.len()];
    for node in nodes.iter().filter(|n| keys_present(n)) {
        for (c, counts) in constraints.iter().zip(counts.iter_mut()) {
            if !c.node_counts(pod, node) {
                continue;
            }
            let value = node.labels[&c.key].clone();
            let matching = node
                .pods
                .values()
                .filter(|p| {
                    p.namespace == pod.namespace
                        && p.pod.metadata.deletion_timestamp.is_none()
                        && c.matches(p)
                })
                .count() as i64;
            *counts.entry(value).or_insert(0) += matching;
        }
    }
    counts
}

pub struct PreFilterState {
    constraints: Vec<Constraint>,
    counts: Vec<HashMap<String, i64>>,
    minimums: Vec<i64>,
}

pub struct PreScoreState {
    constraints: Vec<Constraint>,
    counts: Vec<HashMap<String, i64>>,
}

pub struct PodTopologySpread;

impl FilterPlugin for PodTopologySpread {
    fn name(&self) -> &'static str {
        "PodTopologySpread"
    }

    fn pre_filter(
        &self,
        pod: &PodInfo,
        snapshot: &Snapshot,
        state: &mut CycleState,
    ) -> Result<(), String> {
        let constraints = constraints(pod, "DoNotSchedule");
        if constraints.is_empty() {
            return Ok(());
        }
        let nodes: Vec<&NodeInfo> = snapshot.nodes.iter().collect();
        let counts = count(pod, &constraints, &nodes);
        let minimums = constraints
            .iter()
            .zip(&counts)
            .map(|(c, counts)| {
                if counts.len() < c.min_domains {
                    0
                } else {
                    counts.values().copied().min().unwrap_or(0)
                }
            })
            .collect();
        state.spread = Some(PreFilterState {
            constraints,
            counts,
            minimums,
        });
        Ok(())
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, state: &CycleState) -> Result<(), Reasons> {
        let Some(s) = state.spread.as_ref() else {
            return Ok(());
        };
        for (i, c) in s.constraints.iter().enumerate() {
            let Some(value) = node.labels.get(&c.key) else {
                return Err(vec![
                    "node(s) didn't match pod topology spread constraints (missing required label)"
                        .into(),
                ]);
            };
            let own = i64::from(c.matches(pod));
            let here = s.counts[i].get(value).copied().unwrap_or(0);
            if here + own - s.minimums[i] > c.max_skew {
                return Err(vec![
                    "node(s) didn't match pod topology spread constraints".into(),
                ]);
            }
        }
        Ok(())
    }
}

impl ScorePlugin for PodTopologySpread {
    fn name(&self) -> &'static str {
        "PodTopologySpread"
    }

    fn weight(&self) -> i64 {
        2
    }

    fn pre_score(
        &self,
        pod: &PodInfo,
        feasible: &[&NodeInfo],
        _: &Snapshot,
        state: &mut CycleState,
    ) {
        let mut constraints = constraints(pod, "ScheduleAnyway");
        if constraints.is_empty() {
            // Defaults apply only where some feasible node has the key (zones are optional).
            constraints = default_constraints(pod)
                .into_iter()
                .filter(|c| feasible.iter().any(|n| n.labels.contains_key(&c.key)))
                .collect();
        }
        if constraints.is_empty() {
            return;
        }
        let counts = count(pod, &constraints, feasible);
        state.spread_score = Some(PreScoreState {
            constraints,
            counts,
        });
    }

    fn score(&self, _: &PodInfo, node: &NodeInfo, state: &CycleState) -> i64 {
        let Some(s) = state.spread_score.as_ref() else {
            return 0;
        };
        let mut total = 0.0;
        for (c, counts) in s.constraints.iter().zip(&s.counts) {
            let Some(value) = node.labels.get(&c.key) else {
                // Nodes lacking the key are the least preferred.
                return i64::MAX / 4;
            };
            // Upstream weighs each constraint by log(domains + 2).
            let weight = ((counts.len() + 2) as f64).ln();
            total +=
                (counts.get(value).copied().unwrap_or(0) as f64) * weight + (c.max_skew - 1) as f64;
        }
        (total * MAX_SCORE as f64) as i64
    }

    fn normalize(&self, scores: &mut [i64]) {
        normalize_min_max(scores, true);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::framework::testing::*;

    fn zoned(name: &str, zone: Option<&str>) -> NodeInfo {
        let mut n = node(name, "4", "4Gi", "10");
        if let Some(z) = zone {
            n.metadata
                .labels
                .as_mut()
                .unwrap()
                .insert("zone".into(), z.into());
        }
        NodeInfo::new(Arc::new(n))
    }

    fn spread_pod(name: &str, when: &str) -> PodInfo {
        let mut p = pod(name, "0", "0");
        p.metadata.labels = Some(from_json(json!({"app": "web"})));
        p.spec.as_mut().unwrap().topology_spread_constraints = Some(vec![from_json(json!({
            "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": when,
            "labelSelector": {"matchLabels": {"app": "web"}}
        }))]);
        PodInfo::new(Arc::new(p))
    }

    #[test]
    fn do_not_schedule_keeps_skew_within_bounds() {
        let mut a = zoned("a", Some("z1"));
        a.add_pod(spread_pod("web-1", "DoNotSchedule"));
        let snapshot = Snapshot {
            nodes: vec![a, zoned("b", Some("z2")), zoned("c", None)],
            ..Default::default()
        };
        let p = spread_pod("web-2", "DoNotSchedule");
        let mut state = CycleState::default();
        PodTopologySpread
            .pre_filter(&p, &snapshot, &mut state)
            .unwrap();
        let results: Vec<_> = snapshot
            .nodes
            .iter()
            .map(|n| PodTopologySpread.filter(&p, n, &state))
            .collect();
        assert_eq!(
            results[0],
            Err(vec![
                "node(s) didn't match pod topology spread constraints".to_string()
            ])
        );
        assert_eq!(results[1], Ok(()));
        assert_eq!(
            results[2],
            Err(vec![
                "node(s) didn't match pod topology spread constraints (missing required label)"
                    .to_string()
            ])
        );
    }

    #[test]
    fn pods_of_one_controller_spread_over_hosts_by_default() {
        let owned = |name: &str| {
            let mut p = pod(name, "0", "0");
            p.metadata.owner_references = Some(vec![from_json(json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs-1", "controller": true
            }))]);
            PodInfo::new(Arc::new(p))
        };
        let mut a = zoned("a", None);
        a.add_pod(owned("web-1"));
        let snapshot = Snapshot {
            nodes: vec![a, zoned("b", None)],
            ..Default::default()
        };
        let p = owned("web-2");
        let mut state = CycleState::default();
        let feasible: Vec<&NodeInfo> = snapshot.nodes.iter().collect();
        PodTopologySpread.pre_score(&p, &feasible, &snapshot, &mut state);
        let mut scores: Vec<i64> = snapshot
            .nodes
            .iter()
            .map(|n| PodTopologySpread.score(&p, n, &state))
            .collect();
        PodTopologySpread.normalize(&mut scores);
        assert_eq!(
            scores,
            vec![0, 100],
            "the node without a sibling is preferred"
        );
        // A pod without a controller gets no default constraints.
        let mut state = CycleState::default();
        PodTopologySpread.pre_score(
            &PodInfo::new(Arc::new(pod("lone", "0", "0"))),
            &feasible,
            &snapshot,
            &mut state,
        );
        assert!(state.spread_score.is_none());
    }

    #[test]
    fn schedule_anyway_prefers_emptier_domains() {
        let mut a = zoned("a", Some("z1"));
        a.add_pod(spread_pod("web-1", "ScheduleAnyway"));
        let b = zoned("b", Some("z2"));
        let snapshot = Snapshot {
            nodes: vec![a, b],
            ..Default::default()
        };
        let p = spread_pod("web-2", "ScheduleAnyway");
        let mut state = CycleState::default();
        let feasible: Vec<&NodeInfo> = snapshot.nodes.iter().collect();
        PodTopologySpread.pre_score(&p, &feasible, &snapshot, &mut state);
        let mut scores: Vec<i64> = snapshot
            .nodes
            .iter()
            .map(|n| PodTopologySpread.score(&p, n, &state))
            .collect();
        PodTopologySpread.normalize(&mut scores);
        assert_eq!(scores, vec![0, 100]);
    }
}
