//! One scheduling cycle for one pod: prefilter, filter enough feasible nodes (upstream's
//! adaptive `percentageOfNodesToScore`, starting where the last cycle stopped), score, pick the
//! best (ties broken at random). Pure apart from the random tie-break.

use std::collections::BTreeMap;

use crate::framework::{CycleState, NodeInfo, PodInfo, Snapshot};
use crate::plugins::{self, FilterPlugin, ScorePlugin};

/// Why a pod fits nowhere, counted per reason like upstream's `FitError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitError {
    pub nodes: usize,
    pub reasons: BTreeMap<String, usize>,
}

impl FitError {
    /// Upstream's `FailedScheduling` message: "0/3 nodes are available: 1 Insufficient cpu,
    /// 2 node(s) had untolerated taint {node.kubernetes.io/unreachable: }."
    pub fn message(&self) -> String {
        if self.nodes == 0 {
            return "no nodes available to schedule pods".into();
        }
        let mut parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        parts.sort();
        format!(
            "0/{} nodes are available: {}.",
            self.nodes,
            parts.join(", ")
        )
    }
}

pub struct Algorithm {
    filters: Vec<Box<dyn FilterPlugin>>,
    scores: Vec<Box<dyn ScorePlugin>>,
    next_start: usize,
}

impl Default for Algorithm {
    fn default() -> Self {
        Algorithm {
            filters: plugins::default_filters(),
            scores: plugins::default_scores(),
            next_start: 0,
        }
    }
}

/// How many feasible nodes are enough (upstream's adaptive percentage, at least 100).
pub fn feasible_nodes_to_find(nodes: usize) -> usize {
    const MIN_FEASIBLE: usize = 100;
    if nodes < MIN_FEASIBLE {
        return nodes;
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(MIN_FEASIBLE)
}

impl Algorithm {
    /// Picks a node for `pod`: its index in `snapshot.nodes`.
    pub fn schedule(&mut self, pod: &PodInfo, snapshot: &Snapshot) -> Result<usize, FitError> {
        let total = snapshot.nodes.len();
        let mut fit_error = FitError {
            nodes: total,
            reasons: BTreeMap::new(),
        };
        if total == 0 {
            return Err(fit_error);
        }
        let mut state = CycleState::default();
        for f in &self.filters {
            if let Err(reason) = f.pre_filter(pod, snapshot, &mut state) {
                fit_error.reasons.insert(reason, total);
                return Err(fit_error);
            }
        }
        let want = feasible_nodes_to_find(total);
        let mut feasible: Vec<usize> = Vec::with_capacity(want.min(total));
        let start = self.next_start % total;
        let mut examined = 0;
        for offset in 0..total {
            let i = (start + offset) % total;
            examined += 1;
            let node = &snapshot.nodes[i];
            match self
                .filters
                .iter()
                .try_for_each(|f| f.filter(pod, node, &state))
            {
                Ok(()) => {
                    feasible.push(i);
                    if feasible.len() >= want {
                        break;
                    }
                }
                Err(reasons) => {
                    for r in reasons {
                        *fit_error.reasons.entry(r).or_default() += 1;
                    }
                }
            }
        }
        self.next_start = (start + examined) % total;
        match feasible.len() {
            0 => Err(fit_error),
            1 => Ok(feasible[0]),
            _ => Ok(self.pick(pod, snapshot, &feasible, &mut state)),
        }
    }

    fn pick(
        &self,
        pod: &PodInfo,
        snapshot: &Snapshot,
        feasible: &[usize],
        state: &mut CycleState,
    ) -> usize {
        let nodes: Vec<&NodeInfo> = feasible.iter().map(|&i| &snapshot.nodes[i]).collect();
        let mut totals = vec![0i64; nodes.len()];
        let mut scores = vec![0i64; nodes.len()];
        for plugin in &self.scores {
            plugin.pre_score(pod, &nodes, snapshot, state);
            for (s, node) in scores.iter_mut().zip(&nodes) {
                *s = plugin.score(pod, node, state);
            }
            plugin.normalize(&mut scores);
            for (t, s) in totals.iter_mut().zip(&scores) {
                *t += s * plugin.weight();
            }
        }
        // Highest total wins; among equals, each is equally likely (reservoir sampling).
        let mut best = 0;
        let mut ties = 0u32;
        for i in 0..totals.len() {
            if totals[i] > totals[best] {
                best = i;
                ties = 1;
            } else if totals[i] == totals[best] {
                ties += 1;
                if rand::random_range(0..ties) == 0 {
                    best = i;
                }
            }
        }
        feasible[best]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    use super::*;
    use crate::framework::testing::*;

    fn tainted(name: &str) -> NodeInfo {
        let mut n = node(name, "4", "8Gi", "110");
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "node.kubernetes.io/unreachable".into(),
                effect: "NoExecute".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        NodeInfo::new(Arc::new(n))
    }

    #[test]
    fn failed_scheduling_message_reads_like_upstream() {
        let mut small = NodeInfo::new(Arc::new(node("small", "1", "8Gi", "110")));
        small.add_pod(PodInfo::new(Arc::new(pod("busy", "900m", "0"))));
        let snapshot = Snapshot {
            nodes: vec![small, tainted("t1"), tainted("t2")],
            ..Default::default()
        };
        let err = Algorithm::default()
            .schedule(&PodInfo::new(Arc::new(pod("p", "500m", "0"))), &snapshot)
            .unwrap_err();
        assert_eq!(
            err.message(),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {node.kubernetes.io/unreachable: }."
        );
        let none = Snapshot::default();
        let err = Algorithm::default()
            .schedule(&PodInfo::new(Arc::new(pod("p", "0", "0"))), &none)
            .unwrap_err();
        assert_eq!(err.message(), "no nodes available to schedule pods");
    }

    #[test]
    fn picks_the_least_loaded_feasible_node() {
        let mut busy = NodeInfo::new(Arc::new(node("busy", "4", "8Gi", "110")));
        busy.add_pod(PodInfo::new(Arc::new(pod("x", "3", "6Gi"))));
        let idle = NodeInfo::new(Arc::new(node("idle", "4", "8Gi", "110")));
        let snapshot = Snapshot {
            nodes: vec![busy, idle, tainted("t")],
            ..Default::default()
        };
        let mut algo = Algorithm::default();
        for _ in 0..10 {
            let i = algo
                .schedule(
                    &PodInfo::new(Arc::new(pod("p", "100m", "100Mi"))),
                    &snapshot,
                )
                .unwrap();
            assert_eq!(snapshot.nodes[i].name, "idle");
        }
    }

    #[test]
    fn adaptive_node_sampling_matches_upstream() {
        assert_eq!(feasible_nodes_to_find(50), 50);
        assert_eq!(feasible_nodes_to_find(100), 100);
        assert_eq!(feasible_nodes_to_find(1000), 420);
        assert_eq!(feasible_nodes_to_find(5000), 500);
        assert_eq!(feasible_nodes_to_find(1000), 1000 * 42 / 100);
    }
}
