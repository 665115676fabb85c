//! InterPodAffinity: required pod affinity and anti-affinity of the incoming pod, the required
//! anti-affinity of pods already running (symmetry), and preferred terms as scores.
//!
//! Counts are kept per topology pair (`topologyKey`, the node's value for it), as upstream does,
//! so a zone-wide term is one lookup per node.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Affinity, PodAffinityTerm};
use kube::core::{Selector, SelectorExt};

use super::{FilterPlugin, Reasons, ScorePlugin, normalize_min_max};
use crate::framework::{CycleState, NodeInfo, PodInfo, Snapshot};

type Pair = (String, String);

/// A pod affinity term with its selectors parsed.
pub struct Term {
    selector: Option<Selector>,
    namespaces: HashSet<String>,
    namespace_selector: Option<Selector>,
    pub topology_key: String,
    pub weight: i64,
}

impl Term {
    fn new(term: &PodAffinityTerm, owner_namespace: &str, weight: i64) -> Self {
        let mut namespaces: HashSet<String> = term.namespaces.iter().flatten().cloned().collect();
        let namespace_selector = term
            .namespace_selector
            .clone()
            .and_then(|s| Selector::try_from(s).ok());
        if namespaces.is_empty() && namespace_selector.is_none() {
            namespaces.insert(owner_namespace.to_string());
        }
        Term {
            // A missing selector matches no pod; an invalid one matches none either.
            selector: term
                .label_selector
                .clone()
                .and_then(|s| Selector::try_from(s).ok()),
            namespaces,
            namespace_selector,
            topology_key: term.topology_key.clone(),
            weight,
        }
    }

    pub fn matches(
        &self,
        pod: &PodInfo,
        namespace_labels: &HashMap<String, BTreeMap<String, String>>,
    ) -> bool {
        let in_namespace = self.namespaces.contains(&pod.namespace)
            || self.namespace_selector.as_ref().is_some_and(|s| {
                namespace_labels
                    .get(&pod.namespace)
                    .is_some_and(|labels| s.matches(labels))
            });
        in_namespace
            && self
                .selector
                .as_ref()
                .is_some_and(|s| s.matches(&pod.labels))
    }
}

/// The terms of an affinity: (required affinity, required anti, preferred affinity, preferred anti).
pub struct Terms {
    pub required: Vec<Term>,
    pub required_anti: Vec<Term>,
    pub preferred: Vec<Term>,
    pub preferred_anti: Vec<Term>,
}

impl Terms {
    pub fn of(affinity: Option<&Affinity>, namespace: &str) -> Self {
        let aff = affinity.and_then(|a| a.pod_affinity.as_ref());
        let anti = affinity.and_then(|a| a.pod_anti_affinity.as_ref());
        let required = |terms: Option<&Vec<PodAffinityTerm>>| {
            terms
                .into_iter()
                .flatten()
                .map(|t| Term::new(t, namespace, 1))
                .collect::<Vec<_>>()
        };
        Terms {
            required: required(aff.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            required_anti: required(anti.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            preferred: aff
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .into_iter()
                .flatten()
                .map(|w| Term::new(&w.pod_affinity_term, namespace, i64::from(w.weight)))
                .collect(),
            preferred_anti: anti
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .into_iter()
                .flatten()
                .map(|w| Term::new(&w.pod_affinity_term, namespace, i64::from(w.weight)))
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.required.is_empty()
            && self.required_anti.is_empty()
            && self.preferred.is_empty()
            && self.preferred_anti.is_empty()
    }
}

#[derive(Default)]
pub struct PreFilterState {
    /// Pairs where a running pod's required anti-affinity term matches the incoming pod.
    existing_anti: HashMap<Pair, i64>,
    /// Pairs holding pods that match all of the incoming pod's required affinity terms.
    affinity: HashMap<Pair, i64>,
    /// Pairs holding pods that match one of the incoming pod's required anti-affinity terms.
    anti: HashMap<Pair, i64>,
    terms: Option<Terms>,
    /// The incoming pod matches its own affinity terms (the first pod of a group may go anywhere).
    matches_itself: bool,
}

#[derive(Default)]
pub struct PreScoreState {
    scores: HashMap<Pair, i64>,
    keys: HashSet<String>,
}

pub struct InterPodAffinity;

impl FilterPlugin for InterPodAffinity {
    fn name(&self) -> &'static str {
        "InterPodAffinity"
    }

    fn pre_filter(
        &self,
        pod: &PodInfo,
        snapshot: &Snapshot,
        state: &mut CycleState,
    ) -> Result<(), String> {
        let mut s = PreFilterState::default();
        let ns_labels = &snapshot.namespace_labels;
        for node in snapshot
            .nodes
            .iter()
            .filter(|n| n.pods_with_required_anti_affinity > 0)
        {
            for existing in node
                .pods
                .values()
                .filter(|p| p.has_required_anti_affinity())
            {
                let terms = Terms::of(existing.affinity(), &existing.namespace);
                for t in terms
                    .required_anti
                    .iter()
                    .filter(|t| t.matches(pod, ns_labels))
                {
                    if let Some(v) = node.labels.get(&t.topology_key) {
                        *s.existing_anti
                            .entry((t.topology_key.clone(), v.clone()))
                            .or_default() += 1;
                    }
                }
            }
        }
        let terms = Terms::of(pod.affinity(), &pod.namespace);
        if !terms.required.is_empty() || !terms.required_anti.is_empty() {
            s.matches_itself = terms.required.iter().all(|t| t.matches(pod, ns_labels));
            for node in &snapshot.nodes {
                for existing in node.pods.values() {
                    if !terms.required.is_empty()
                        && terms
                            .required
                            .iter()
                            .all(|t| t.matches(existing, ns_labels))
                    {
                        for t in &terms.required {
                            if let Some(v) = node.labels.get(&t.topology_key) {
                                *s.affinity
                                    .entry((t.topology_key.clone(), v.clone()))
                                    .or_default() += 1;
                            }
                        }
                    }
                    for t in terms
                        .required_anti
                        .iter()
                        .filter(|t| t.matches(existing, ns_labels))
                    {
                        if let Some(v) = node.labels.get(&t.topology_key) {
                            *s.anti
                                .entry((t.topology_key.clone(), v.clone()))
                                .or_default() += 1;
                        }
                    }
                }
            }
        }
        s.terms = Some(terms);
        state.affinity = Some(s);
        Ok(())
    }

    fn filter(&self, _pod: &PodInfo, node: &NodeInfo, state: &CycleState) -> Result<(), Reasons> {
        let Some(s) = state.affinity.as_ref() else {
            return Ok(());
        };
        let count = |map: &HashMap<Pair, i64>, key: &str| {
            node.labels
                .get(key)
                .and_then(|v| map.get(&(key.to_string(), v.clone())))
                .copied()
                .unwrap_or(0)
        };
        if let Some(terms) = s.terms.as_ref() {
            let all_present = terms
                .required
                .iter()
                .all(|t| node.labels.contains_key(&t.topology_key));
            let satisfied = terms
                .required
                .iter()
                .all(|t| count(&s.affinity, &t.topology_key) > 0);
            let first_of_group = s.affinity.is_empty() && s.matches_itself;
            if !terms.required.is_empty() && !(all_present && (satisfied || first_of_group)) {
                return Err(vec!["node(s) didn't match pod affinity rules".into()]);
            }
            if terms
                .required_anti
                .iter()
                .any(|t| count(&s.anti, &t.topology_key) > 0)
            {
                return Err(vec!["node(s) didn't match pod anti-affinity rules".into()]);
            }
        }
        if !s.existing_anti.is_empty()
            && node.labels.iter().any(|(k, v)| {
                s.existing_anti
                    .get(&(k.clone(), v.clone()))
                    .is_some_and(|c| *c > 0)
            })
        {
            return Err(vec![
                "node(s) didn't satisfy existing pods anti-affinity rules".into(),
            ]);
        }
        Ok(())
    }
}

impl ScorePlugin for InterPodAffinity {
    fn name(&self) -> &'static str {
        "InterPodAffinity"
    }

    fn weight(&self) -> i64 {
        2
    }

    fn pre_score(
        &self,
        pod: &PodInfo,
        _: &[&NodeInfo],
        snapshot: &Snapshot,
        state: &mut CycleState,
    ) {
        let terms = Terms::of(pod.affinity(), &pod.namespace);
        let anyone_has_affinity = snapshot.nodes.iter().any(|n| n.pods_with_affinity > 0);
        if terms.preferred.is_empty() && terms.preferred_anti.is_empty() && !anyone_has_affinity {
            return;
        }
        let ns_labels = &snapshot.namespace_labels;
        let mut s = PreScoreState::default();
        let mut add = |node: &NodeInfo, key: &str, weight: i64| {
            if let Some(v) = node.labels.get(key) {
                *s.scores.entry((key.to_string(), v.clone())).or_default() += weight;
                s.keys.insert(key.to_string());
            }
        };
        for node in &snapshot.nodes {
            let scan_existing = node.pods_with_affinity > 0;
            if terms.preferred.is_empty() && terms.preferred_anti.is_empty() && !scan_existing {
                continue;
            }
            for existing in node.pods.values() {
                for t in terms
                    .preferred
                    .iter()
                    .filter(|t| t.matches(existing, ns_labels))
                {
                    add(node, &t.topology_key, t.weight);
                }
                for t in terms
                    .preferred_anti
                    .iter()
                    .filter(|t| t.matches(existing, ns_labels))
                {
                    add(node, &t.topology_key, -t.weight);
                }
                if scan_existing && existing.affinity().is_some() {
                    let theirs = Terms::of(existing.affinity(), &existing.namespace);
                    if theirs.is_empty() {
                        continue;
                    }
                    // Upstream's hardPodAffinityWeight: their required terms count once.
                    for t in theirs.required.iter().filter(|t| t.matches(pod, ns_labels)) {
                        add(node, &t.topology_key, 1);
                    }
                    for t in theirs
                        .preferred
                        .iter()
                        .filter(|t| t.matches(pod, ns_labels))
                    {
                        add(node, &t.topology_key, t.weight);
                    }
                    for t in theirs
                        .preferred_anti
                        .iter()
                        .filter(|t| t.matches(pod, ns_labels))
                    {
                        add(node, &t.topology_key, -t.weight);
                    }
                }
            }
        }
        state.affinity_score = Some(s);
    }

    fn score(&self, _: &PodInfo, node: &NodeInfo, state: &CycleState) -> i64 {
        let Some(s) = state.affinity_score.as_ref() else {
            return 0;
        };
        s.keys
            .iter()
            .filter_map(|k| {
                node.labels
                    .get(k)
                    .and_then(|v| s.scores.get(&(k.clone(), v.clone())))
            })
            .sum()
    }

    fn normalize(&self, scores: &mut [i64]) {
        normalize_min_max(scores, false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::framework::testing::*;

    fn zoned(name: &str, zone: &str) -> NodeInfo {
        let mut n = node(name, "4", "4Gi", "10");
        n.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("topology.kubernetes.io/zone".into(), zone.into());
        NodeInfo::new(Arc::new(n))
    }

    fn labelled_pod(name: &str, app: &str, affinity: serde_json::Value) -> PodInfo {
        let mut p = pod(name, "0", "0");
        p.metadata.labels = Some(from_json(json!({"app": app})));
        p.spec.as_mut().unwrap().affinity = from_json(affinity);
        PodInfo::new(Arc::new(p))
    }

    fn run(pod: &PodInfo, snapshot: &Snapshot) -> Vec<Result<(), Reasons>> {
        let mut state = CycleState::default();
        InterPodAffinity
            .pre_filter(pod, snapshot, &mut state)
            .unwrap();
        snapshot
            .nodes
            .iter()
            .map(|n| InterPodAffinity.filter(pod, n, &state))
            .collect()
    }

    #[test]
    fn required_anti_affinity_keeps_replicas_apart() {
        let anti = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}
        ]}});
        let mut a = zoned("a", "z1");
        a.add_pod(labelled_pod("web-1", "web", anti.clone()));
        let snapshot = Snapshot {
            nodes: vec![a, zoned("b", "z1")],
            ..Default::default()
        };
        let results = run(&labelled_pod("web-2", "web", anti), &snapshot);
        assert_eq!(
            results[0],
            Err(vec![
                "node(s) didn't match pod anti-affinity rules".to_string()
            ])
        );
        assert_eq!(results[1], Ok(()));
        // Symmetry: a pod without terms is still kept off by the running pod's anti-affinity.
        let results = run(&labelled_pod("web-3", "web", json!(null)), &snapshot);
        assert_eq!(
            results[0],
            Err(vec![
                "node(s) didn't satisfy existing pods anti-affinity rules".to_string()
            ])
        );
    }

    #[test]
    fn required_affinity_follows_matching_pods_and_lets_the_first_one_in() {
        let aff = json!({"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "topology.kubernetes.io/zone"}
        ]}});
        let mut a = zoned("a", "z1");
        a.add_pod(labelled_pod("cache-1", "cache", json!(null)));
        let snapshot = Snapshot {
            nodes: vec![zoned("b", "z1"), zoned("c", "z2"), a],
            ..Default::default()
        };
        let results = run(&labelled_pod("web", "web", aff.clone()), &snapshot);
        assert_eq!(results[0], Ok(()), "same zone as the cache pod");
        assert_eq!(
            results[1],
            Err(vec!["node(s) didn't match pod affinity rules".to_string()])
        );
        let empty = Snapshot {
            nodes: vec![zoned("b", "z1")],
            ..Default::default()
        };
        assert_eq!(
            run(&labelled_pod("cache-2", "cache", aff.clone()), &empty)[0],
            Ok(()),
            "first of its group"
        );
        assert!(run(&labelled_pod("web", "web", aff), &empty)[0].is_err());
    }

    #[test]
    fn preferred_terms_score_by_topology() {
        let pref = json!({"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "topology.kubernetes.io/zone"}}
        ]}});
        let mut a = zoned("a", "z1");
        a.add_pod(labelled_pod("db", "db", json!(null)));
        let snapshot = Snapshot {
            nodes: vec![a, zoned("b", "z1"), zoned("c", "z2")],
            ..Default::default()
        };
        let p = labelled_pod("app", "app", pref);
        let mut state = CycleState::default();
        InterPodAffinity.pre_score(&p, &[], &snapshot, &mut state);
        let mut scores: Vec<i64> = snapshot
            .nodes
            .iter()
            .map(|n| InterPodAffinity.score(&p, n, &state))
            .collect();
        assert_eq!(scores, vec![50, 50, 0]);
        InterPodAffinity.normalize(&mut scores);
        assert_eq!(scores, vec![100, 100, 0]);
    }
}
