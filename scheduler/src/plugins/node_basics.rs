//! NodeUnschedulable (cordoned nodes), NodeName (`spec.nodeName` set before scheduling) and
//! NodePorts (host port conflicts).

use super::{FilterPlugin, Reasons};
use crate::framework::{CycleState, NodeInfo, PodInfo, ports_conflict};
use crate::plugins::taint_toleration::tolerates;

pub struct NodeUnschedulable;

impl FilterPlugin for NodeUnschedulable {
    fn name(&self) -> &'static str {
        "NodeUnschedulable"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> Result<(), Reasons> {
        if !node.unschedulable {
            return Ok(());
        }
        // A pod tolerating the unschedulable taint (DaemonSet pods do) may still go there.
        let taint = k8s_openapi::api::core::v1::Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let tolerations = pod
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_deref())
            .unwrap_or(&[]);
        if tolerations.iter().any(|t| tolerates(t, &taint)) {
            return Ok(());
        }
        Err(vec!["node(s) were unschedulable".into()])
    }
}

pub struct NodeName;

impl FilterPlugin for NodeName {
    fn name(&self) -> &'static str {
        "NodeName"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> Result<(), Reasons> {
        match pod.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            Some(name) if !name.is_empty() && name != node.name => {
                Err(vec!["node(s) didn't match the requested node name".into()])
            }
            _ => Ok(()),
        }
    }
}

pub struct NodePorts;

impl FilterPlugin for NodePorts {
    fn name(&self) -> &'static str {
        "NodePorts"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &CycleState) -> Result<(), Reasons> {
        let conflict = pod.host_ports.iter().any(|want| {
            node.used_ports
                .iter()
                .any(|used| ports_conflict(want, used))
        });
        if conflict {
            Err(vec![
                "node(s) didn't have free ports for the requested pod ports".into(),
            ])
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::framework::testing::*;

    #[test]
    fn cordoned_nodes_take_only_tolerating_pods() {
        let mut n = node("n1", "1", "1Gi", "10");
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let n = NodeInfo::new(Arc::new(n));
        let plain = PodInfo::new(Arc::new(pod("a", "0", "0")));
        assert_eq!(
            NodeUnschedulable.filter(&plain, &n, &CycleState::default()),
            Err(vec!["node(s) were unschedulable".to_string()])
        );
        let mut tolerating = pod("b", "0", "0");
        tolerating.spec.as_mut().unwrap().tolerations = Some(vec![from_json(
            json!({"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}),
        )]);
        assert!(
            NodeUnschedulable
                .filter(
                    &PodInfo::new(Arc::new(tolerating)),
                    &n,
                    &CycleState::default()
                )
                .is_ok()
        );
    }

    #[test]
    fn node_name_must_match() {
        let n = NodeInfo::new(Arc::new(node("n1", "1", "1Gi", "10")));
        let mut p = pod("a", "0", "0");
        p.spec.as_mut().unwrap().node_name = Some("n2".into());
        let err = NodeName
            .filter(&PodInfo::new(Arc::new(p)), &n, &CycleState::default())
            .unwrap_err();
        assert_eq!(err, vec!["node(s) didn't match the requested node name"]);
    }

    #[test]
    fn host_ports_conflict_on_same_protocol_and_port() {
        let with_port = |name: &str, port: i32, ip: Option<&str>| {
            let mut p = pod(name, "0", "0");
            p.spec.as_mut().unwrap().containers[0].ports = Some(vec![from_json(
                json!({"containerPort": 80, "hostPort": port, "hostIP": ip}),
            )]);
            PodInfo::new(Arc::new(p))
        };
        let mut n = NodeInfo::new(Arc::new(node("n1", "1", "1Gi", "10")));
        n.add_pod(with_port("a", 8080, Some("10.0.0.1")));
        let s = CycleState::default();
        assert!(
            NodePorts
                .filter(&with_port("b", 8081, None), &n, &s)
                .is_ok()
        );
        assert!(
            NodePorts
                .filter(&with_port("c", 8080, Some("10.0.0.2")), &n, &s)
                .is_ok()
        );
        assert_eq!(
            NodePorts.filter(&with_port("d", 8080, None), &n, &s),
            Err(vec![
                "node(s) didn't have free ports for the requested pod ports".to_string()
            ])
        );
    }
}
