//! The service load balancer, K3s's ServiceLB in kind: a `type: LoadBalancer` Service gets the
//! addresses of the nodes chosen for it as `status.loadBalancer.ingress`, and every node's
//! proxy then answers the Service's ports on those addresses (the kernel rules of the mesh
//! proxy; no per-service pods).
//!
//! - Nodes: every Ready node, or, once any node carries `svccontroller.k3s.cattle.io/enablelb=true`,
//!   only those (K3s's label, so its docs apply); `node.kubernetes.io/exclude-from-external-load-balancers`
//!   excludes a node as upstream does. `externalTrafficPolicy: Local` keeps to nodes with a ready
//!   endpoint of the Service.
//! - A node's port belongs to the oldest Service asking for it (creation time, then namespace and
//!   name): a younger Service skips that node, and with no node left stays pending with a
//!   Warning Event saying which Service holds the port.
//! - `loadBalancerClass` naming another implementation: left to it.
//!
//! Like the IPAM loop, the state is the objects themselves: every change recomputes the whole
//! assignment from the Services, Nodes and EndpointSlices, and writes only what differs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::informer::Informers;

/// K3s's node label that limits the load balancer to the nodes carrying it.
pub const ENABLE_LABEL: &str = "svccontroller.k3s.cattle.io/enablelb";
/// Upstream's label that keeps a node out of every load balancer.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The `loadBalancerClass` this controller answers besides none.
pub const CLASS: &str = "edgesite.io/service-lb";

type Key = (String, String);

/// What the controller decided for one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Serving on these nodes' addresses (sorted, deduplicated).
    Serving {
        addresses: Vec<String>,
        /// Nodes skipped because an older Service holds one of the ports there.
        conflicts: Vec<String>,
    },
    /// No node can take it; why.
    Pending(String),
    /// Not a LoadBalancer any more: a status left from before is cleared.
    Clear,
}

pub(crate) fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The address a node is reached at: its ExternalIP, else its InternalIP.
pub(crate) fn address_of(node: &Node) -> Option<String> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    ["ExternalIP", "InternalIP"].iter().find_map(|kind| {
        addresses
            .iter()
            .find(|a| a.type_ == *kind)
            .map(|a| a.address.clone())
    })
}

fn label<'a>(object: &'a kube::api::ObjectMeta, key: &str) -> Option<&'a str> {
    object.labels.as_ref()?.get(key).map(String::as_str)
}

fn key_of(service: &Service) -> Key {
    (
        service.metadata.namespace.clone().unwrap_or_default(),
        service.metadata.name.clone().unwrap_or_default(),
    )
}

/// Whether this controller serves `service`.
fn is_ours(service: &Service) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec
            .load_balancer_class
            .as_deref()
            .is_none_or(|class| class == CLASS)
}

/// The whole assignment.
pub fn plan(
    services: &[Arc<Service>],
    nodes: &[Arc<Node>],
    slices: &[Arc<EndpointSlice>],
) -> BTreeMap<Key, Outcome> {
    let labelled = nodes
        .iter()
        .any(|n| label(&n.metadata, ENABLE_LABEL).is_some());
    let eligible: Vec<(String, String)> = nodes
        .iter()
        .filter(|n| !labelled || label(&n.metadata, ENABLE_LABEL) == Some("true"))
        .filter(|n| label(&n.metadata, EXCLUDE_LABEL).is_none())
        .filter(|n| is_ready(n))
        .filter_map(|n| Some((n.metadata.name.clone()?, address_of(n)?)))
        .collect();
    // Nodes with a ready endpoint, by service.
    let mut endpoint_nodes: HashMap<Key, BTreeSet<String>> = HashMap::new();
    for slice in slices {
        let Some(service) = label(&slice.metadata, "kubernetes.io/service-name") else {
            continue;
        };
        let key = (
            slice.metadata.namespace.clone().unwrap_or_default(),
            service.to_string(),
        );
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if let (true, Some(node)) = (ready, &endpoint.node_name) {
                endpoint_nodes
                    .entry(key.clone())
                    .or_default()
                    .insert(node.clone());
            }
        }
    }

    let mut ours: Vec<&Arc<Service>> = services.iter().filter(|s| is_ours(s)).collect();
    ours.sort_by_key(|s| {
        (
            s.metadata.creation_timestamp.clone().map(|t| t.0),
            key_of(s),
        )
    });
    // (node, port, protocol) -> the service holding it.
    let mut taken: HashMap<(String, i32, String), Key> = HashMap::new();
    let mut out = BTreeMap::new();
    for service in ours {
        let key = key_of(service);
        let spec = service.spec.as_ref().expect("is_ours checked the spec");
        let ports: Vec<(i32, String)> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.port, p.protocol.clone().unwrap_or_else(|| "TCP".into())))
            .collect();
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let mut addresses = BTreeSet::new();
        let mut conflicts = Vec::new();
        let mut holders = BTreeSet::new();
        let mut candidates = 0;
        for (node, address) in &eligible {
            if local
                && !endpoint_nodes
                    .get(&key)
                    .is_some_and(|nodes| nodes.contains(node))
            {
                continue;
            }
            candidates += 1;
            let clash = ports.iter().find_map(|(port, protocol)| {
                let holder = taken.get(&(node.clone(), *port, protocol.clone()))?;
                Some(format!(
                    "{port}/{protocol} is held by {}/{}",
                    holder.0, holder.1
                ))
            });
            if let Some(clash) = clash {
                conflicts.push(node.clone());
                holders.insert(clash);
                continue;
            }
            for (port, protocol) in &ports {
                taken.insert((node.clone(), *port, protocol.clone()), key.clone());
            }
            addresses.insert(address.clone());
        }
        let outcome = if !addresses.is_empty() {
            Outcome::Serving {
                addresses: addresses.into_iter().collect(),
                conflicts,
            }
        } else if !conflicts.is_empty() {
            Outcome::Pending(format!(
                "no node has the ports free: {} (on {})",
                holders.into_iter().collect::<Vec<_>>().join(", "),
                conflicts.join(", ")
            ))
        } else if candidates == 0 && local && !eligible.is_empty() {
            Outcome::Pending(
                "externalTrafficPolicy is Local and no eligible node has a ready endpoint".into(),
            )
        } else if labelled {
            Outcome::Pending(format!("no Ready node labelled {ENABLE_LABEL}=true"))
        } else {
            Outcome::Pending("no Ready node with an address".into())
        };
        out.insert(key, outcome);
    }
    // A Service that stopped being a LoadBalancer keeps no ingress.
    for service in services {
        let is_lb = service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
        if !is_lb && !current_ingress(service).is_empty() {
            out.insert(key_of(service), Outcome::Clear);
        }
    }
    out
}

/// The ingress IPs a Service's status shows now.
fn current_ingress(service: &Service) -> Vec<String> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .collect()
}

/// Keeps LoadBalancer Services' ingress addresses true.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let services = informers.services();
    let nodes = informers.nodes();
    let slices = informers.endpoint_slices();
    let (mut service_changes, mut node_changes, mut slice_changes) = (
        services.subscribe(256),
        nodes.subscribe(256),
        slices.subscribe(256),
    );
    let (service_store, node_store, slice_store) =
        (services.store(), nodes.store(), slices.store());
    let ready = futures::future::join3(services.synced(), nodes.synced(), slices.synced());
    let client = informers.client_for("service-lb-controller");
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        // What was last said about each Service, so a decision is announced once.
        let mut said: HashMap<Key, Outcome> = HashMap::new();
        loop {
            let all = service_store.state();
            let plan = plan(&all, &node_store.state(), &slice_store.state());
            for service in &all {
                let key = key_of(service);
                let Some(outcome) = plan.get(&key) else {
                    said.remove(&key);
                    continue;
                };
                apply(&client, &recorder, service, outcome, said.get(&key)).await;
                said.insert(key, outcome.clone());
            }
            said.retain(|key, _| plan.contains_key(key));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = service_changes.recv() => if change.is_none() { return },
                change = node_changes.recv() => if change.is_none() { return },
                change = slice_changes.recv() => if change.is_none() { return },
            }
            // Take the burst.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while service_changes.try_recv().is_ok() {}
            while node_changes.try_recv().is_ok() {}
            while slice_changes.try_recv().is_ok() {}
        }
    }
}

/// Writes the status an outcome asks for (when it differs) and announces a new decision.
async fn apply(
    client: &kube::Client,
    recorder: &Recorder,
    service: &Service,
    outcome: &Outcome,
    before: Option<&Outcome>,
) {
    let (namespace, name) = key_of(service);
    let wanted: Vec<String> = match outcome {
        Outcome::Serving { addresses, .. } => addresses.clone(),
        Outcome::Pending(_) | Outcome::Clear => Vec::new(),
    };
    let changed = current_ingress(service) != wanted;
    if before.is_none()
        && !changed
        && matches!(outcome, Outcome::Serving { conflicts, .. } if conflicts.is_empty())
    {
        return; // as it was before this process started: nothing new to announce
    }
    if changed {
        let ingress: Vec<serde_json::Value> = wanted
            .iter()
            .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
            .collect();
        let patch = json!({"status": {"loadBalancer": {"ingress": if ingress.is_empty() { serde_json::Value::Null } else { ingress.into() }}}});
        let api: Api<Service> = Api::namespaced(client.clone(), &namespace);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(service = %format!("{namespace}/{name}"), addresses = ?wanted, "load balancer addresses")
            }
            Err(error) => {
                tracing::warn!(service = %format!("{namespace}/{name}"), %error, "cannot write the load balancer status");
                return;
            }
        }
    }
    if before == Some(outcome) {
        return;
    }
    match outcome {
        Outcome::Serving {
            addresses,
            conflicts,
        } => {
            recorder.normal(
                service,
                "EnsuredLoadBalancer",
                format!("Serving on {}", addresses.join(", ")),
            );
            if !conflicts.is_empty() {
                recorder.warning(
                    service,
                    "PortConflict",
                    format!(
                        "Not serving on {}: an older Service holds one of the ports there",
                        conflicts.join(", ")
                    ),
                );
            }
        }
        Outcome::Pending(why) => {
            recorder.warning(
                service,
                "UnAvailableLoadBalancer",
                format!("There are no available nodes for LoadBalancer: {why}"),
            );
        }
        Outcome::Clear => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str, labels: serde_json::Value, ready: bool) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
                }
            }))
            .unwrap(),
        )
    }

    fn lb(name: &str, created: &str, port: i32, extra: serde_json::Value) -> Arc<Service> {
        let mut spec =
            json!({"type": "LoadBalancer", "ports": [{"port": port, "protocol": "TCP"}]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
                "spec": spec
            }))
            .unwrap(),
        )
    }

    fn serving(plan: &BTreeMap<Key, Outcome>, name: &str) -> Vec<String> {
        match &plan[&("shop".to_string(), name.to_string())] {
            Outcome::Serving { addresses, .. } => addresses.clone(),
            other => panic!("{name}: {other:?}"),
        }
    }

    fn pending(plan: &BTreeMap<Key, Outcome>, name: &str) -> String {
        match &plan[&("shop".to_string(), name.to_string())] {
            Outcome::Pending(why) => why.clone(),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn every_ready_node_serves_and_the_older_service_keeps_the_port() {
        let nodes = [
            node("a", "192.168.1.2", json!({}), true),
            node("b", "192.168.1.3", json!({}), true),
            node("c", "192.168.1.4", json!({}), false),
        ];
        let services = [
            lb("second", "2026-01-02T00:00:00Z", 80, json!({})),
            lb("first", "2026-01-01T00:00:00Z", 80, json!({})),
            lb("other-port", "2026-01-03T00:00:00Z", 8080, json!({})),
            lb(
                "foreign",
                "2026-01-01T00:00:00Z",
                80,
                json!({"loadBalancerClass": "metallb.io/x"}),
            ),
        ];
        let plan = plan(&services, &nodes, &[]);
        assert_eq!(serving(&plan, "first"), ["192.168.1.2", "192.168.1.3"]);
        assert_eq!(serving(&plan, "other-port"), ["192.168.1.2", "192.168.1.3"]);
        let why = pending(&plan, "second");
        assert!(why.contains("80/TCP is held by shop/first"), "{why}");
        assert!(!plan.contains_key(&("shop".into(), "foreign".into())));
    }

    #[test]
    fn the_k3s_label_limits_the_nodes_once_any_node_has_it() {
        let nodes = [
            node("a", "192.168.1.2", json!({ENABLE_LABEL: "true"}), true),
            node("b", "192.168.1.3", json!({}), true),
            node("c", "192.168.1.4", json!({ENABLE_LABEL: "false"}), true),
        ];
        let plan = plan(
            &[lb("web", "2026-01-01T00:00:00Z", 80, json!({}))],
            &nodes,
            &[],
        );
        assert_eq!(serving(&plan, "web"), ["192.168.1.2"]);
        let only_false = [node(
            "c",
            "192.168.1.4",
            json!({ENABLE_LABEL: "false"}),
            true,
        )];
        let plan = super::plan(
            &[lb("web", "2026-01-01T00:00:00Z", 80, json!({}))],
            &only_false,
            &[],
        );
        assert!(pending(&plan, "web").contains(ENABLE_LABEL));
    }

    #[test]
    fn local_traffic_policy_keeps_to_nodes_with_ready_endpoints() {
        let nodes = [
            node("a", "192.168.1.2", json!({}), true),
            node("b", "192.168.1.3", json!({}), true),
        ];
        let slice: Arc<EndpointSlice> = Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": ["10.42.1.5"], "nodeName": "b"},
                    {"addresses": ["10.42.0.5"], "nodeName": "a", "conditions": {"ready": false}}
                ]
            }))
            .unwrap(),
        );
        let services = [lb(
            "web",
            "2026-01-01T00:00:00Z",
            80,
            json!({"externalTrafficPolicy": "Local"}),
        )];
        assert_eq!(
            serving(&plan(&services, &nodes, &[slice]), "web"),
            ["192.168.1.3"]
        );
        assert!(pending(&plan(&services, &nodes, &[]), "web").contains("ready endpoint"));
    }

    #[test]
    fn a_service_no_longer_a_load_balancer_is_cleared() {
        let service: Arc<Service> = Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"type": "ClusterIP", "ports": [{"port": 80}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.168.1.2"}]}}
            }))
            .unwrap(),
        );
        let plan = plan(&[service], &[], &[]);
        assert_eq!(plan[&("shop".into(), "web".into())], Outcome::Clear);
    }
}
