//! NodeAffinity: `spec.nodeSelector` and required node affinity must match the node's labels;
//! preferred node affinity terms add their weights to the score.

use std::collections::BTreeMap;

use super::{FilterPlugin, Reasons, ScorePlugin, normalize_by_max};
use crate::framework::{CycleState, NodeInfo, PodInfo};

pub use controllers::node_match::term_matches;

/// `spec.nodeSelector` plus required node affinity (terms are ORed).
pub fn pod_matches_node(pod: &PodInfo, labels: &BTreeMap<String, String>, node_name: &str) -> bool {
    pod.pod
        .spec
        .as_ref()
        .is_none_or(|spec| controllers::node_match::spec_matches_node(spec, labels, node_name))
}

pub struct NodeAffinity;

impl FilterPlugin for NodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> Result<(), Reasons> {
        if pod_matches_node(pod, &node.labels, &node.name) {
            Ok(())
        } else {
            Err(vec![
                "node(s) didn't match Pod's node affinity/selector".into(),
            ])
        }
    }
}

impl ScorePlugin for NodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }

    fn weight(&self) -> i64 {
        2
    }

    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> i64 {
        pod.affinity()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .into_iter()
            .flatten()
            .filter(|p| p.weight != 0 && term_matches(&p.preference, &node.labels, &node.name))
            .map(|p| i64::from(p.weight))
            .sum()
    }

    fn normalize(&self, scores: &mut [i64]) {
        normalize_by_max(scores, false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::framework::testing::*;

    fn labelled(name: &str, labels: serde_json::Value) -> NodeInfo {
        let mut n = node(name, "1", "1Gi", "10");
        n.metadata.labels = Some(from_json(labels));
        NodeInfo::new(Arc::new(n))
    }

    fn with_affinity(affinity: serde_json::Value, selector: serde_json::Value) -> PodInfo {
        let mut p = pod("a", "0", "0");
        let spec = p.spec.as_mut().unwrap();
        spec.affinity = Some(from_json(affinity));
        spec.node_selector = from_json(selector);
        PodInfo::new(Arc::new(p))
    }

    #[test]
    fn selector_and_required_terms() {
        let edge = labelled("n1", json!({"site": "edge", "cores": "8"}));
        let core = labelled("n2", json!({"site": "core", "cores": "2"}));
        let s = CycleState::default();
        let p = with_affinity(json!({}), json!({"site": "edge"}));
        assert!(NodeAffinity.filter(&p, &edge, &s).is_ok());
        assert_eq!(
            NodeAffinity.filter(&p, &core, &s),
            Err(vec![
                "node(s) didn't match Pod's node affinity/selector".to_string()
            ])
        );
        let p = with_affinity(
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n9"]}]}
            ]}}}),
            json!(null),
        );
        assert!(NodeAffinity.filter(&p, &edge, &s).is_ok());
        assert!(NodeAffinity.filter(&p, &core, &s).is_err());
        let p = with_affinity(
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "site", "operator": "NotIn", "values": ["edge"]}, {"key": "gpu", "operator": "DoesNotExist"}]}
            ]}}}),
            json!(null),
        );
        assert!(NodeAffinity.filter(&p, &edge, &s).is_err());
        assert!(NodeAffinity.filter(&p, &core, &s).is_ok());
    }

    #[test]
    fn preferred_terms_add_weights() {
        let edge = labelled("n1", json!({"site": "edge"}));
        let core = labelled("n2", json!({"site": "core"}));
        let p = with_affinity(
            json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 30, "preference": {"matchExpressions": [{"key": "site", "operator": "In", "values": ["edge"]}]}},
                {"weight": 10, "preference": {"matchExpressions": [{"key": "site", "operator": "Exists"}]}}
            ]}}),
            json!(null),
        );
        let s = CycleState::default();
        let mut scores = vec![
            NodeAffinity.score(&p, &edge, &s),
            NodeAffinity.score(&p, &core, &s),
        ];
        assert_eq!(scores, vec![40, 10]);
        NodeAffinity.normalize(&mut scores);
        assert_eq!(scores, vec![100, 25]);
    }
}
