//! NodeResourcesFit (the pod's requests must fit into what the node has left),
//! NodeResourcesLeastAllocated and NodeResourcesBalancedAllocation (spread load, keep CPU and
//! memory use in step).

use super::{FilterPlugin, MAX_SCORE, Reasons, ScorePlugin};
use crate::framework::{CycleState, NodeInfo, PodInfo};

pub struct Fit;

impl FilterPlugin for Fit {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> Result<(), Reasons> {
        let mut reasons = Vec::new();
        let alloc = &node.allocatable;
        let used = &node.requested;
        let want = &pod.requests;
        if node.pods.len() as i64 + 1 > alloc.pods {
            reasons.push("Too many pods".to_string());
        }
        if want.milli_cpu > 0 && want.milli_cpu > alloc.milli_cpu - used.milli_cpu {
            reasons.push("Insufficient cpu".into());
        }
        if want.memory > 0 && want.memory > alloc.memory - used.memory {
            reasons.push("Insufficient memory".into());
        }
        if want.ephemeral_storage > 0
            && want.ephemeral_storage > alloc.ephemeral_storage - used.ephemeral_storage
        {
            reasons.push("Insufficient ephemeral-storage".into());
        }
        for (name, amount) in &want.scalar {
            let have = alloc.scalar.get(name).copied().unwrap_or(0)
                - used.scalar.get(name).copied().unwrap_or(0);
            if *amount > 0 && *amount > have {
                reasons.push(format!("Insufficient {name}"));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

/// (cpu, memory) fractions the node would have in use with the pod on it.
fn fractions(pod: &PodInfo, node: &NodeInfo) -> [(i64, i64); 2] {
    [
        (
            node.non_zero_cpu + pod.non_zero_cpu,
            node.allocatable.milli_cpu,
        ),
        (
            node.non_zero_memory + pod.non_zero_memory,
            node.allocatable.memory,
        ),
    ]
}

pub struct LeastAllocated;

impl ScorePlugin for LeastAllocated {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }

    fn weight(&self) -> i64 {
        1
    }

    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> i64 {
        let parts = fractions(pod, node);
        let sum: i64 = parts
            .iter()
            .map(|&(requested, capacity)| {
                if capacity == 0 || requested > capacity {
                    0
                } else {
                    (capacity - requested) * MAX_SCORE / capacity
                }
            })
            .sum();
        sum / parts.len() as i64
    }
}

pub struct BalancedAllocation;

impl ScorePlugin for BalancedAllocation {
    fn name(&self) -> &'static str {
        "NodeResourcesBalancedAllocation"
    }

    fn weight(&self) -> i64 {
        1
    }

    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> i64 {
        let f: Vec<f64> = fractions(pod, node)
            .iter()
            .map(|&(requested, capacity)| {
                if capacity == 0 {
                    1.0
                } else {
                    (requested as f64 / capacity as f64).min(1.0)
                }
            })
            .collect();
        let std = (f[0] - f[1]).abs() / 2.0;
        ((1.0 - std) * MAX_SCORE as f64) as i64
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::framework::testing::*;

    #[test]
    fn fit_reports_each_missing_resource() {
        let mut n = NodeInfo::new(Arc::new(node("n1", "1", "1Gi", "2")));
        n.add_pod(PodInfo::new(Arc::new(pod("a", "800m", "512Mi"))));
        let s = CycleState::default();
        assert!(
            Fit.filter(&PodInfo::new(Arc::new(pod("b", "200m", "512Mi"))), &n, &s)
                .is_ok()
        );
        assert_eq!(
            Fit.filter(&PodInfo::new(Arc::new(pod("c", "300m", "1Gi"))), &n, &s),
            Err(vec![
                "Insufficient cpu".to_string(),
                "Insufficient memory".to_string()
            ])
        );
        n.add_pod(PodInfo::new(Arc::new(pod("d", "0", "0"))));
        assert_eq!(
            Fit.filter(&PodInfo::new(Arc::new(pod("e", "0", "0"))), &n, &s),
            Err(vec!["Too many pods".to_string()])
        );
    }

    #[test]
    fn extended_resources_must_fit() {
        let mut raw = node("n1", "1", "1Gi", "10");
        raw.status
            .as_mut()
            .unwrap()
            .allocatable
            .as_mut()
            .unwrap()
            .insert(
                "example.com/dongle".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into()),
            );
        let n = NodeInfo::new(Arc::new(raw));
        let mut p = pod("a", "0", "0");
        p.spec.as_mut().unwrap().containers[0]
            .resources
            .as_mut()
            .unwrap()
            .requests
            .as_mut()
            .unwrap()
            .insert(
                "example.com/dongle".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("2".into()),
            );
        assert_eq!(
            Fit.filter(&PodInfo::new(Arc::new(p)), &n, &CycleState::default()),
            Err(vec!["Insufficient example.com/dongle".to_string()])
        );
    }

    #[test]
    fn least_allocated_prefers_emptier_nodes_and_balanced_prefers_even_use() {
        let s = CycleState::default();
        let empty = NodeInfo::new(Arc::new(node("n1", "4", "4Gi", "10")));
        let mut busy = NodeInfo::new(Arc::new(node("n2", "4", "4Gi", "10")));
        busy.add_pod(PodInfo::new(Arc::new(pod("a", "2", "2Gi"))));
        let p = PodInfo::new(Arc::new(pod("p", "1", "1Gi")));
        assert_eq!(LeastAllocated.score(&p, &empty, &s), 75);
        assert_eq!(LeastAllocated.score(&p, &busy, &s), 25);
        let mut lopsided = NodeInfo::new(Arc::new(node("n3", "4", "4Gi", "10")));
        lopsided.add_pod(PodInfo::new(Arc::new(pod("b", "3", "100Mi"))));
        assert_eq!(BalancedAllocation.score(&p, &empty, &s), 100);
        assert!(BalancedAllocation.score(&p, &lopsided, &s) < 100);
    }
}
