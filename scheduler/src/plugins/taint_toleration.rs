//! TaintToleration: a node's `NoSchedule`/`NoExecute` taints must be tolerated; among feasible
//! nodes, fewer untolerated `PreferNoSchedule` taints score higher.

use k8s_openapi::api::core::v1::{Taint, Toleration};

use super::{FilterPlugin, Reasons, ScorePlugin, normalize_by_max};
use crate::framework::{CycleState, NodeInfo, PodInfo};

pub use controllers::node_match::tolerates;

fn tolerations(pod: &PodInfo) -> &[Toleration] {
    pod.pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[])
}

/// The first taint with one of `effects` that no toleration tolerates.
pub fn first_untolerated<'a>(
    taints: &'a [Taint],
    tolerations: &[Toleration],
    effects: &[&str],
) -> Option<&'a Taint> {
    taints
        .iter()
        .filter(|t| effects.contains(&t.effect.as_str()))
        .find(|t| !tolerations.iter().any(|tol| tolerates(tol, t)))
}

pub struct TaintToleration;

impl FilterPlugin for TaintToleration {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> Result<(), Reasons> {
        match first_untolerated(&node.taints, tolerations(pod), &["NoSchedule", "NoExecute"]) {
            None => Ok(()),
            Some(t) => Err(vec![format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t.key,
                t.value.as_deref().unwrap_or("")
            )]),
        }
    }
}

impl ScorePlugin for TaintToleration {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }

    fn weight(&self) -> i64 {
        3
    }

    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> i64 {
        let tolerations: Vec<&Toleration> = tolerations(pod)
            .iter()
            .filter(|t| {
                t.effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == "PreferNoSchedule")
            })
            .collect();
        node.taints
            .iter()
            .filter(|t| t.effect == "PreferNoSchedule")
            .filter(|t| !tolerations.iter().any(|tol| tolerates(tol, t)))
            .count() as i64
    }

    fn normalize(&self, scores: &mut [i64]) {
        normalize_by_max(scores, true);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::framework::testing::*;

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn tol(v: serde_json::Value) -> Toleration {
        from_json(v)
    }

    #[test]
    fn toleration_rules_match_upstream() {
        let t = taint("dedicated", "gpu", "NoSchedule");
        assert!(tolerates(
            &tol(json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"})),
            &t
        ));
        assert!(tolerates(
            &tol(json!({"key": "dedicated", "operator": "Exists"})),
            &t
        ));
        assert!(
            tolerates(&tol(json!({"operator": "Exists"})), &t),
            "empty key + Exists tolerates all"
        );
        assert!(!tolerates(
            &tol(json!({"key": "dedicated", "value": "cpu"})),
            &t
        ));
        assert!(!tolerates(
            &tol(json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"})),
            &t
        ));
        assert!(!tolerates(&tol(json!({"value": "gpu"})), &t));
    }

    #[test]
    fn untolerated_taints_reject_with_upstream_message() {
        let mut n = node("n1", "1", "1Gi", "10");
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![
                taint("soft", "", "PreferNoSchedule"),
                taint("node.kubernetes.io/unreachable", "", "NoExecute"),
            ]),
            ..Default::default()
        });
        let n = NodeInfo::new(Arc::new(n));
        let p = PodInfo::new(Arc::new(pod("a", "0", "0")));
        assert_eq!(
            TaintToleration.filter(&p, &n, &CycleState::default()),
            Err(vec![
                "node(s) had untolerated taint {node.kubernetes.io/unreachable: }".to_string()
            ])
        );
        assert_eq!(TaintToleration.score(&p, &n, &CycleState::default()), 1);
        let mut scores = vec![1, 0];
        TaintToleration.normalize(&mut scores);
        assert_eq!(
            scores,
            vec![0, 100],
            "fewer PreferNoSchedule taints is better"
        );
    }
}
