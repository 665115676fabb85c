//! Node lifecycle: a node that stops renewing its Lease (and posting status) for longer than
//! the grace period is marked `Ready=Unknown` and tainted `node.kubernetes.io/unreachable`; a
//! node reporting `Ready=False` is tainted `not-ready`; cordoned nodes get the `unschedulable`
//! taint. Pods on a node with `NoExecute` taints are evicted unless they tolerate them, after
//! their `tolerationSeconds` if they tolerate them for a while (upstream's taint manager).
//!
//! It runs on a timer over the shared caches, like upstream's `monitorNodeHealth`.
//!
//! **Disconnected nodes keep their pods** unless asked otherwise. An edge node that only lost its
//! link keeps running its pods from its own cache (metamanager), so evicting them (and having
//! their controllers recreate them elsewhere, then finding two copies on reconnect) is what
//! KubeEdge users complain about. The policy for the `unreachable` taint is
//! [`DisconnectedPods`]: the site's setting (`edgesite server --disconnected-node-pods`), which
//! a node overrides with the annotation [`POLICY_ANNOTATION`] (`edgesite agent
//! --disconnected-pods`, or `kubectl annotate node`). With `keep` the node is still marked
//! `Ready=Unknown`, tainted and its pods marked not ready (Services stop sending them traffic),
//! but nothing is deleted. A node that reports `Ready=False` itself is not disconnected: its
//! `not-ready` taint evicts as upstream.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::informer::Informers;
use crate::node_match::tolerates;
use crate::pods;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
/// Node annotation overriding the site's [`DisconnectedPods`] policy (`keep` or `evict`).
pub const POLICY_ANNOTATION: &str = "edgesite.io/disconnected-pods";

/// What happens to the pods of a node that stopped answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DisconnectedPods {
    /// They stay bound to the node and keep running there (EdgeSite's default).
    #[default]
    Keep,
    /// Upstream Kubernetes: evicted after their `tolerationSeconds` (300 s by default).
    Evict,
}

impl std::str::FromStr for DisconnectedPods {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(DisconnectedPods::Keep),
            "evict" => Ok(DisconnectedPods::Evict),
            other => Err(format!("{other:?} is not a policy: use keep or evict")),
        }
    }
}

impl DisconnectedPods {
    /// The policy for one node: its annotation, else the site's.
    pub fn for_node(self, node: &Node) -> DisconnectedPods {
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(POLICY_ANNOTATION))
            .and_then(|v| v.parse().ok())
            .unwrap_or(self)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// How long a node may be silent before it is `Unknown` (`--node-monitor-grace-period`).
    pub grace_period: Duration,
    /// How often nodes are checked.
    pub period: Duration,
    /// The site's policy for pods of unreachable nodes.
    pub disconnected_pods: DisconnectedPods,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grace_period: Duration::from_secs(40),
            period: Duration::from_secs(5),
            disconnected_pods: DisconnectedPods::Keep,
        }
    }
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// When the node was last heard from: its Lease renewal, Ready heartbeat or creation.
pub fn last_heard(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let renew = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let heartbeat = ready_condition(node)
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    [renew, heartbeat, created].into_iter().flatten().max()
}

/// The taints the node's state calls for (upstream's TaintNodesByCondition and NoExecute
/// taints), keyed by (key, effect).
pub fn wanted_taints(node: &Node) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    match ready_condition(node).map(|c| c.status.as_str()) {
        Some("True") => {}
        Some("False") => out.extend([(NOT_READY, "NoSchedule"), (NOT_READY, "NoExecute")]),
        // Unknown, or no status posted yet.
        _ => out.extend([(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")]),
    }
    if node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        out.push((UNSCHEDULABLE, "NoSchedule"));
    }
    out
}

fn managed(key: &str) -> bool {
    key == UNREACHABLE || key == NOT_READY || key == UNSCHEDULABLE
}

/// The node's taints with the managed ones replaced by `wanted` (keeping `timeAdded` of those
/// already there).
pub fn reconcile_taints(
    node: &Node,
    wanted: &[(&str, &str)],
    now: Timestamp,
) -> Option<Vec<Taint>> {
    let current = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let mut next: Vec<Taint> = current
        .iter()
        .filter(|t| !managed(&t.key))
        .cloned()
        .collect();
    for (key, effect) in wanted {
        let existing = current
            .iter()
            .find(|t| t.key == *key && t.effect == *effect);
        next.push(existing.cloned().unwrap_or_else(|| Taint {
            key: key.to_string(),
            effect: effect.to_string(),
            value: None,
            time_added: (*effect == "NoExecute").then_some(Time(now)),
        }));
    }
    let same = next.len() == current.len()
        && next.iter().all(|t| {
            current
                .iter()
                .any(|c| c.key == t.key && c.effect == t.effect)
        });
    (!same).then_some(next)
}

/// When a pod must leave a node with these NoExecute taints: `Some(None)` now, `Some(Some(t))`
/// at `t`, `None` never.
pub fn eviction_time(pod: &Pod, taints: &[Taint]) -> Option<Option<Timestamp>> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    let mut due: Option<Timestamp> = None;
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        let tolerating: Vec<_> = tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        if tolerating.is_empty() {
            return Some(None);
        }
        // Tolerated forever if any matching toleration has no limit.
        if tolerating.iter().any(|t| t.toleration_seconds.is_none()) {
            continue;
        }
        let seconds = tolerating
            .iter()
            .filter_map(|t| t.toleration_seconds)
            .min()
            .unwrap_or(0)
            .max(0);
        let added = taint
            .time_added
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(Timestamp::now);
        let at = Timestamp::from_second(added.as_second() + seconds).unwrap_or(added);
        due = Some(due.map_or(at, |d| d.min(at)));
    }
    due.map(Some)
}

struct Context {
    client: kube::Client,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    recorder: Recorder,
    config: Config,
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    config: Config,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let (nodes, leases, pod_informer) = (informers.nodes(), informers.leases(), informers.pods());
    let ctx = Context {
        client: informers.client_for("node-controller"),
        nodes: nodes.store(),
        leases: leases.store(),
        pods: pod_informer.store(),
        recorder,
        config,
    };
    let ready = futures::future::join3(nodes.synced(), leases.synced(), pod_informer.synced());
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        tracing::info!(grace_period = ?ctx.config.grace_period, "node lifecycle controller started");
        let mut tick = tokio::time::interval(ctx.config.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for node in ctx.nodes.state() {
                if let Err(e) = ctx.check(&node).await {
                    tracing::debug!(node = node.metadata.name.as_deref().unwrap_or(""), error = %e, "node check failed");
                }
            }
        }
    }
}

impl Context {
    async fn check(&self, node: &Arc<Node>) -> Result<(), kube::Error> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let nodes: Api<Node> = Api::all(self.client.clone());
        let now = Timestamp::now();
        let lease = self
            .leases
            .get(&ObjectRef::new(&name).within("kube-node-lease"));
        let silent_for = last_heard(node, lease.as_deref())
            .map(|t| now.as_second() - t.as_second())
            .unwrap_or(i64::MAX);
        let mut node = node.clone();
        let ready_status = ready_condition(&node).map(|c| c.status.clone());
        if silent_for > self.config.grace_period.as_secs() as i64
            && ready_status.as_deref() != Some("Unknown")
        {
            // The node went silent: every condition it reports is now unknown.
            let t = Time(now);
            let mut conditions: Vec<serde_json::Value> = Vec::new();
            for c in node
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default()
            {
                conditions.push(json!({"type": c.type_, "status": "Unknown", "reason": "NodeStatusUnknown", "message": "Kubelet stopped posting node status.", "lastHeartbeatTime": c.last_heartbeat_time, "lastTransitionTime": t}));
            }
            if !conditions.iter().any(|c| c["type"] == "Ready") {
                conditions.push(json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusNeverUpdated", "message": "Kubelet never posted node status.", "lastTransitionTime": t}));
            }
            let patch = json!({"status": {"conditions": conditions}});
            node = Arc::new(
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                    .await?,
            );
            tracing::info!(node = %name, "node stopped posting status: Ready=Unknown");
            self.recorder.normal(
                &*node,
                "NodeNotReady",
                format!("Node {name} status is now: NodeNotReady"),
            );
            self.mark_pods_not_ready(&name).await;
        }
        let wanted = wanted_taints(&node);
        if let Some(taints) = reconcile_taints(&node, &wanted, now) {
            let patch = json!({"spec": {"taints": taints}});
            node = Arc::new(
                nodes
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?,
            );
        }
        self.evict(&node, now).await;
        Ok(())
    }

    /// Pods on an unreachable node are not ready (the endpoints controller drops them).
    async fn mark_pods_not_ready(&self, node: &str) {
        for pod in self.pods.state_filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node) && pods::is_ready(p)
        }) {
            let api: Api<Pod> = Api::namespaced(
                self.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or(""),
            );
            let patch = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": Time(Timestamp::now())}]}});
            let _ = api
                .patch_status(
                    pod.metadata.name.as_deref().unwrap_or(""),
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await;
        }
    }

    async fn evict(&self, node: &Node, now: Timestamp) {
        let taints: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.effect == "NoExecute")
            .filter(|t| {
                t.key != UNREACHABLE
                    || self.config.disconnected_pods.for_node(node) == DisconnectedPods::Evict
            })
            .collect();
        if taints.is_empty() {
            return;
        }
        let name = node.metadata.name.as_deref().unwrap_or("");
        let on_node = self.pods.state_filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name)
                && p.metadata.deletion_timestamp.is_none()
                && !pods::is_terminal(p)
        });
        for pod in on_node {
            let due = match eviction_time(&pod, &taints) {
                None => continue,
                Some(None) => true,
                Some(Some(at)) => at <= now,
            };
            if !due {
                continue;
            }
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            let condition = json!({"status": {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager", "message": "Taint manager: deleting due to NoExecute taint", "lastTransitionTime": Time(now)}]}});
            let _ = api
                .patch_status(
                    &pod_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&condition),
                )
                .await;
            match api.delete(&pod_name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(pod = %format!("{namespace}/{pod_name}"), node = %name, "evicted by NoExecute taint");
                    self.recorder.normal(
                        &*pod,
                        "TaintManagerEviction",
                        format!("Marking for deletion Pod {namespace}/{pod_name}"),
                    );
                }
                Err(e) => tracing::debug!(pod = %pod_name, error = %e, "eviction failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ready: Option<&str>, unschedulable: bool) -> Node {
        let mut v = serde_json::json!({"metadata": {"name": "n"}, "spec": {"unschedulable": unschedulable}, "status": {}});
        if let Some(r) = ready {
            v["status"]["conditions"] = serde_json::json!([{"type": "Ready", "status": r}]);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_disconnected_pods_policy_is_the_sites_unless_the_node_says_otherwise() {
        let mut n = node(Some("Unknown"), false);
        assert_eq!(DisconnectedPods::Keep.for_node(&n), DisconnectedPods::Keep);
        n.metadata.annotations =
            Some([(POLICY_ANNOTATION.to_string(), "evict".to_string())].into());
        assert_eq!(DisconnectedPods::Keep.for_node(&n), DisconnectedPods::Evict);
        n.metadata.annotations = Some([(POLICY_ANNOTATION.to_string(), "keep".to_string())].into());
        assert_eq!(DisconnectedPods::Evict.for_node(&n), DisconnectedPods::Keep);
        // A typo falls back to the site's policy.
        n.metadata.annotations = Some([(POLICY_ANNOTATION.to_string(), "kept".to_string())].into());
        assert_eq!(
            DisconnectedPods::Evict.for_node(&n),
            DisconnectedPods::Evict
        );
        assert!("sometimes".parse::<DisconnectedPods>().is_err());
    }

    #[test]
    fn taints_follow_readiness_and_cordoning() {
        assert!(wanted_taints(&node(Some("True"), false)).is_empty());
        assert_eq!(
            wanted_taints(&node(Some("False"), false)),
            vec![(NOT_READY, "NoSchedule"), (NOT_READY, "NoExecute")]
        );
        assert_eq!(
            wanted_taints(&node(Some("Unknown"), true)),
            vec![
                (UNREACHABLE, "NoSchedule"),
                (UNREACHABLE, "NoExecute"),
                (UNSCHEDULABLE, "NoSchedule")
            ]
        );
        let now = Timestamp::now();
        let tainted = reconcile_taints(
            &node(Some("Unknown"), false),
            &wanted_taints(&node(Some("Unknown"), false)),
            now,
        )
        .unwrap();
        assert!(
            tainted
                .iter()
                .any(|t| t.key == UNREACHABLE && t.effect == "NoExecute" && t.time_added.is_some())
        );
    }

    #[test]
    fn eviction_honours_toleration_seconds() {
        let added = Timestamp::from_second(1_000).unwrap();
        let taint = Taint {
            key: UNREACHABLE.into(),
            effect: "NoExecute".into(),
            value: None,
            time_added: Some(Time(added)),
        };
        let pod = |tolerations: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [], "tolerations": tolerations}})).unwrap()
        };
        assert_eq!(
            eviction_time(&pod(serde_json::json!([])), std::slice::from_ref(&taint)),
            Some(None)
        );
        let limited = pod(
            serde_json::json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]),
        );
        assert_eq!(
            eviction_time(&limited, std::slice::from_ref(&taint)),
            Some(Some(Timestamp::from_second(1_030).unwrap()))
        );
        let forever = pod(serde_json::json!([{"operator": "Exists"}]));
        assert_eq!(eviction_time(&forever, &[taint]), None);
    }
}
