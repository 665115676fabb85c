//! The network-policy loop: turns the site's NetworkPolicies into what each node enforces
//! (ConfigMap `kube-system/netpol.<node>`, [`edgemesh::netpol::NodePolicy`]): for every pod of
//! the node a policy selects, whether it is isolated for ingress and egress and the peers and
//! ports its rules allow, with selectors turned into the pods' addresses and named ports into
//! numbers. Nodes cannot list other nodes' pods, so the server resolves; a node reads its own
//! ConfigMap only. Rewritten within a moment of a change to a policy, a pod or a namespace.
//!
//! Semantics as `networking.k8s.io/v1` says: a pod is isolated in a direction once a policy
//! selecting it has that policy type (`Ingress` always unless `policyTypes` says otherwise,
//! `Egress` when the policy has egress rules or says so); then only the union of the rules
//! allows. A rule with no peers allows every address, with no ports every port; `ipBlock`
//! with `except`; `podSelector` and `namespaceSelector` alone or together; `port` by number,
//! range (`endPort`) or name (resolved on the pod that has it: the policy's own pod for
//! ingress, each destination pod for egress).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use edgemesh::netpol::{self, Allow, Block, Net, NodePolicy, PodRules, Ports, Proto};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::Informers;

/// A pod as the policy sees it: where it runs, its labels, address and named ports.
struct PodView<'a> {
    namespace: &'a str,
    name: &'a str,
    node: Option<&'a str>,
    labels: BTreeMap<String, String>,
    ip: IpAddr,
    /// (name, protocol) -> number
    ports: BTreeMap<(String, Proto), u16>,
}

fn view(pod: &Pod) -> Option<PodView<'_>> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let ports = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone()?;
            let number = u16::try_from(p.container_port).ok()?;
            Some(((name, proto(p.protocol.as_deref())?), number))
        })
        .collect();
    Some(PodView {
        namespace: pod.metadata.namespace.as_deref()?,
        name: pod.metadata.name.as_deref()?,
        node: spec.node_name.as_deref(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip,
        ports,
    })
}

fn proto(text: Option<&str>) -> Option<Proto> {
    match text.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        _ => None,
    }
}

/// A label selector; `None` (unset) selects everything, as an empty one does.
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone())
            .map(|s| s.matches(labels))
            .unwrap_or(false),
    }
}

/// A namespace's labels, with the `kubernetes.io/metadata.name` label the API server sets.
fn namespace_labels(namespaces: &[Arc<Namespace>]) -> BTreeMap<String, BTreeMap<String, String>> {
    namespaces
        .iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            Some((name, labels))
        })
        .collect()
}

/// The addresses one rule's peers stand for: every address (`None`), or blocks and the pods
/// among them (for named ports on egress).
struct Peers<'p> {
    any: bool,
    blocks: Vec<Block>,
    pods: Vec<&'p PodView<'p>>,
}

fn peers<'p>(
    list: Option<&Vec<NetworkPolicyPeer>>,
    namespace: &str,
    pods: &'p [PodView<'p>],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> Peers<'p> {
    let Some(list) = list.filter(|l| !l.is_empty()) else {
        return Peers {
            any: true,
            blocks: Vec::new(),
            pods: pods.iter().collect(),
        };
    };
    let mut blocks = BTreeSet::new();
    let mut chosen: Vec<&PodView> = Vec::new();
    for peer in list {
        if let Some(ip_block) = &peer.ip_block {
            let Ok(cidr) = ip_block.cidr.parse::<Net>() else {
                continue; // validation refuses these; an old object must not break the rest
            };
            let except: Vec<Net> = ip_block
                .except
                .iter()
                .flatten()
                .filter_map(|e| e.parse().ok())
                .collect();
            for pod in pods {
                let block = Block {
                    cidr,
                    except: except.clone(),
                };
                if block.contains(pod.ip) {
                    chosen.push(pod);
                }
            }
            blocks.insert(Block { cidr, except });
            continue;
        }
        if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
            continue;
        }
        for pod in pods {
            let in_namespace = match &peer.namespace_selector {
                None => pod.namespace == namespace,
                Some(selector) => namespaces
                    .get(pod.namespace)
                    .is_some_and(|labels| selects(Some(selector), labels)),
            };
            if in_namespace && selects(peer.pod_selector.as_ref(), &pod.labels) {
                blocks.insert(Block {
                    cidr: Net::host(pod.ip),
                    except: Vec::new(),
                });
                chosen.push(pod);
            }
        }
    }
    Peers {
        any: false,
        blocks: blocks.into_iter().collect(),
        pods: chosen,
    }
}

/// What one rule allows for `target` (ingress: the pod the policy protects, whose named ports
/// count; egress: `None`, each destination's named ports count).
fn allows(
    peers: &Peers<'_>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    target: Option<&PodView<'_>>,
) -> Vec<Allow> {
    let addresses = (!peers.any).then(|| peers.blocks.clone());
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![Allow {
            peers: addresses,
            ports: None,
        }];
    };
    let mut numbered = Vec::new();
    let mut named: Vec<(String, Proto)> = Vec::new();
    for port in ports {
        let Some(protocol) = proto(port.protocol.as_deref()) else {
            continue;
        };
        match &port.port {
            None => numbered.push(Ports {
                protocol,
                port: None,
                end_port: None,
            }),
            Some(IntOrString::Int(n)) => {
                if let Ok(n) = u16::try_from(*n) {
                    numbered.push(Ports {
                        protocol,
                        port: Some(n),
                        end_port: port.end_port.and_then(|e| u16::try_from(e).ok()),
                    });
                }
            }
            Some(IntOrString::String(name)) => match name.parse::<u16>() {
                Ok(n) => numbered.push(Ports {
                    protocol,
                    port: Some(n),
                    end_port: None,
                }),
                Err(_) => named.push((name.clone(), protocol)),
            },
        }
    }
    let mut out = Vec::new();
    match target {
        Some(pod) => {
            for (name, protocol) in &named {
                if let Some(n) = pod.ports.get(&(name.clone(), *protocol)) {
                    numbered.push(Ports {
                        protocol: *protocol,
                        port: Some(*n),
                        end_port: None,
                    });
                }
            }
        }
        None => {
            // Per destination: the pods among the peers that have the port, by its number there.
            let mut by_port: BTreeMap<(Proto, u16), BTreeSet<Net>> = BTreeMap::new();
            for (name, protocol) in &named {
                for pod in &peers.pods {
                    if let Some(n) = pod.ports.get(&(name.clone(), *protocol)) {
                        by_port
                            .entry((*protocol, *n))
                            .or_default()
                            .insert(Net::host(pod.ip));
                    }
                }
            }
            for ((protocol, n), hosts) in by_port {
                out.push(Allow {
                    peers: Some(
                        hosts
                            .into_iter()
                            .map(|cidr| Block {
                                cidr,
                                except: Vec::new(),
                            })
                            .collect(),
                    ),
                    ports: Some(vec![Ports {
                        protocol,
                        port: Some(n),
                        end_port: None,
                    }]),
                });
            }
        }
    }
    if !numbered.is_empty() {
        out.insert(
            0,
            Allow {
                peers: addresses,
                ports: Some(numbered),
            },
        );
    }
    out
}

/// A pod's rules so far: ingress, egress (`None`: not isolated that way).
type Directions = (Option<Vec<Allow>>, Option<Vec<Allow>>);

/// Every node's rules: the nodes in `nodes` (those with nothing selected get an empty set).
pub fn resolve(
    policies: &[Arc<NetworkPolicy>],
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    nodes: &[String],
) -> BTreeMap<String, NodePolicy> {
    let views: Vec<PodView> = pods.iter().filter_map(|p| view(p)).collect();
    let namespaces = namespace_labels(namespaces);
    let mut policies: Vec<&NetworkPolicy> = policies.iter().map(|p| p.as_ref()).collect();
    policies.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    // pod index -> (ingress, egress)
    let mut rules: BTreeMap<usize, Directions> = BTreeMap::new();
    for policy in policies {
        let (Some(namespace), Some(spec)) =
            (policy.metadata.namespace.as_deref(), policy.spec.as_ref())
        else {
            continue;
        };
        let types: Vec<&str> = match &spec.policy_types {
            Some(types) if !types.is_empty() => types.iter().map(String::as_str).collect(),
            _ if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) => vec!["Ingress", "Egress"],
            _ => vec!["Ingress"],
        };
        let egress_rules: Vec<Allow> = if types.contains(&"Egress") {
            spec.egress
                .iter()
                .flatten()
                .flat_map(|rule| {
                    let to = peers(rule.to.as_ref(), namespace, &views, &namespaces);
                    allows(&to, rule.ports.as_ref(), None)
                })
                .collect()
        } else {
            Vec::new()
        };
        let ingress_peers: Vec<Peers> = spec
            .ingress
            .iter()
            .flatten()
            .map(|rule| peers(rule.from.as_ref(), namespace, &views, &namespaces))
            .collect();
        for (i, pod) in views.iter().enumerate() {
            if pod.namespace != namespace || !selects(spec.pod_selector.as_ref(), &pod.labels) {
                continue;
            }
            let entry = rules.entry(i).or_default();
            if types.contains(&"Ingress") {
                let list = entry.0.get_or_insert_with(Vec::new);
                for (rule, from) in spec.ingress.iter().flatten().zip(&ingress_peers) {
                    list.extend(allows(from, rule.ports.as_ref(), Some(pod)));
                }
            }
            if types.contains(&"Egress") {
                entry
                    .1
                    .get_or_insert_with(Vec::new)
                    .extend(egress_rules.iter().cloned());
            }
        }
    }
    let mut out: BTreeMap<String, NodePolicy> = nodes
        .iter()
        .map(|n| (n.clone(), NodePolicy::default()))
        .collect();
    for (i, (ingress, egress)) in rules {
        let pod = &views[i];
        let Some(node) = pod.node.and_then(|n| out.get_mut(n)) else {
            continue;
        };
        node.pods.push(PodRules {
            ip: pod.ip,
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            ingress,
            egress,
        });
    }
    for node in out.values_mut() {
        node.pods.sort_by_key(|p| p.ip);
    }
    out
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let (policies, pods, namespaces, nodes, config_maps) = (
        informers.network_policies(),
        informers.pods(),
        informers.namespaces(),
        informers.nodes(),
        informers.netpol_config_maps(),
    );
    let (mut policy_changes, mut pod_changes, mut namespace_changes, mut node_changes) = (
        policies.subscribe(256),
        pods.subscribe(256),
        namespaces.subscribe(256),
        nodes.subscribe(256),
    );
    // A ConfigMap someone deleted or edited is written again.
    let mut config_map_changes = config_maps.subscribe(256);
    let stores = (
        policies.store(),
        pods.store(),
        namespaces.store(),
        nodes.store(),
        config_maps.store(),
    );
    let ready = futures::future::join5(
        policies.synced(),
        pods.synced(),
        namespaces.synced(),
        nodes.synced(),
        config_maps.synced(),
    );
    let client = informers.client_for("network-policy-controller");
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        let api: Api<ConfigMap> = Api::namespaced(client, netpol::NAMESPACE);
        loop {
            // A write that failed is tried again after a while even if nothing changes.
            let mut failed = false;
            let node_names: Vec<String> = stores
                .3
                .state()
                .iter()
                .filter_map(|n: &Arc<Node>| n.metadata.name.clone())
                .filter(|n| netpol::configmap_name(n).len() <= 253)
                .collect();
            let wanted = resolve(
                &stores.0.state(),
                &stores.1.state(),
                &stores.2.state(),
                &node_names,
            );
            let existing: BTreeMap<String, Arc<ConfigMap>> = stores
                .4
                .state()
                .into_iter()
                .filter(|c| c.metadata.namespace.as_deref() == Some(netpol::NAMESPACE))
                .filter_map(|c| {
                    let node = c.metadata.labels.as_ref()?.get(netpol::NODE_LABEL)?.clone();
                    Some((node, c))
                })
                .collect();
            for (node, policy) in &wanted {
                let text = serde_json::to_string(policy).unwrap_or_default();
                let current = existing
                    .get(node)
                    .and_then(|c| c.data.as_ref()?.get(netpol::KEY).cloned());
                if current.as_ref() == Some(&text) {
                    continue;
                }
                let name = netpol::configmap_name(node);
                let body = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": netpol::NAMESPACE,
                                 "labels": {netpol::NODE_LABEL: node}},
                    "data": {netpol::KEY: text},
                });
                let params = PatchParams::apply("network-policy-controller").force();
                match api.patch(&name, &params, &Patch::Apply(&body)).await {
                    Ok(_) => {
                        tracing::info!(%node, pods = policy.pods.len(), "network policy written for node");
                    }
                    Err(error) => {
                        tracing::warn!(%node, %error, "cannot write the node's network policy");
                        failed = true;
                    }
                }
            }
            for (node, config_map) in &existing {
                if !wanted.contains_key(node)
                    && let Some(name) = config_map.metadata.name.as_deref()
                {
                    let _ = api.delete(name, &DeleteParams::default()).await;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = policy_changes.recv() => if change.is_none() { return },
                change = pod_changes.recv() => if change.is_none() { return },
                change = namespace_changes.recv() => if change.is_none() { return },
                change = node_changes.recv() => if change.is_none() { return },
                change = config_map_changes.recv() => if change.is_none() { return },
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)), if failed => {}
            }
            // Take the burst.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while policy_changes.try_recv().is_ok() {}
            while pod_changes.try_recv().is_ok() {}
            while namespace_changes.try_recv().is_ok() {}
            while node_changes.try_recv().is_ok() {}
            while config_map_changes.try_recv().is_ok() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: serde_json::Value) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i",
                    "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip}
            }))
            .unwrap(),
        )
    }

    fn namespace(name: &str, labels: serde_json::Value) -> Arc<Namespace> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap(),
        )
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Arc<NetworkPolicy> {
        Arc::new(
            serde_json::from_value(
                json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}),
            )
            .unwrap(),
        )
    }

    fn site() -> (Vec<Arc<Pod>>, Vec<Arc<Namespace>>, Vec<String>) {
        (
            vec![
                pod("shop", "web", "a", "10.42.0.5", json!({"app": "web"})),
                pod(
                    "shop",
                    "client",
                    "b",
                    "10.42.1.7",
                    json!({"role": "client"}),
                ),
                pod("shop", "other", "b", "10.42.1.8", json!({})),
                pod("ops", "probe", "b", "10.42.1.9", json!({"role": "client"})),
            ],
            vec![
                namespace("shop", json!({})),
                namespace("ops", json!({"team": "ops"})),
            ],
            vec!["a".into(), "b".into(), "c".into()],
        )
    }

    #[test]
    fn default_deny_then_an_allow_for_labelled_clients() {
        let (pods, namespaces, nodes) = site();
        let deny = policy("shop", "deny", json!({"podSelector": {}}));
        let out = resolve(std::slice::from_ref(&deny), &pods, &namespaces, &nodes);
        assert_eq!(out.len(), 3, "every node gets its set");
        assert!(out["c"].pods.is_empty());
        let web = &out["a"].pods[0];
        assert_eq!(
            (web.name.as_str(), web.ingress.as_deref()),
            ("web", Some(&[][..]))
        );
        assert_eq!(web.egress, None);
        assert_eq!(out["b"].pods.len(), 2, "client and other; not ops/probe");

        let allow = policy(
            "shop",
            "allow",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                "ports": [{"port": "http"}]}]}),
        );
        let out = resolve(&[deny, allow], &pods, &namespaces, &nodes);
        let policy = netpol::Policy::new(out["a"].clone(), None);
        let web: IpAddr = "10.42.0.5".parse().unwrap();
        let from = |ip: &str| Some(ip.parse().unwrap());
        assert!(policy.ingress_allows(web, from("10.42.1.7"), Proto::Tcp, 8080));
        assert!(
            !policy.ingress_allows(web, from("10.42.1.7"), Proto::Tcp, 80),
            "named port is 8080"
        );
        assert!(
            !policy.ingress_allows(web, from("10.42.1.8"), Proto::Tcp, 8080),
            "unlabelled"
        );
        assert!(
            !policy.ingress_allows(web, from("10.42.1.9"), Proto::Tcp, 8080),
            "other namespace"
        );
    }

    #[test]
    fn namespace_selectors_ip_blocks_and_egress_named_ports() {
        let (pods, namespaces, nodes) = site();
        let p = policy(
            "shop",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "policyTypes": ["Ingress", "Egress"],
                   "ingress": [
                     {"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]},
                     {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                                "podSelector": {"matchLabels": {"role": "client"}}}]},
                     {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.9.0/24"]}}],
                      "ports": [{"protocol": "TCP", "port": 30000, "endPort": 30010}]}],
                   "egress": [{"ports": [{"port": "http"}]},
                              {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "UDP", "port": 53}]}]}),
        );
        let out = resolve(&[p], &pods, &namespaces, &nodes);
        let policy = netpol::Policy::new(out["a"].clone(), None);
        let web: IpAddr = "10.42.0.5".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(
            policy.ingress_allows(web, Some(ip("10.42.1.9")), Proto::Tcp, 1),
            "ops namespace"
        );
        assert!(
            policy.ingress_allows(web, Some(ip("10.42.1.7")), Proto::Udp, 9),
            "shop client"
        );
        assert!(!policy.ingress_allows(web, Some(ip("10.42.1.8")), Proto::Tcp, 1));
        assert!(policy.ingress_allows(web, Some(ip("192.168.1.1")), Proto::Tcp, 30005));
        assert!(
            !policy.ingress_allows(web, Some(ip("192.168.9.1")), Proto::Tcp, 30005),
            "except"
        );
        assert!(!policy.ingress_allows(web, Some(ip("192.168.1.1")), Proto::Tcp, 30011));
        // Egress: "http" is 8080 on every pod that names it, nothing elsewhere; DNS anywhere.
        assert!(policy.egress_allows(web, ip("10.42.1.8"), Proto::Tcp, 8080));
        assert!(!policy.egress_allows(web, ip("10.42.1.8"), Proto::Tcp, 80));
        assert!(
            !policy.egress_allows(web, ip("1.1.1.1"), Proto::Tcp, 8080),
            "not a pod"
        );
        assert!(policy.egress_allows(web, ip("1.1.1.1"), Proto::Udp, 53));
        assert!(!policy.egress_allows(web, ip("1.1.1.1"), Proto::Tcp, 53));
    }

    #[test]
    fn egress_only_policies_leave_ingress_open_and_bad_blocks_are_skipped() {
        let (pods, namespaces, nodes) = site();
        let p = policy(
            "shop",
            "out",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "not-a-cidr"}}, {"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
        );
        let out = resolve(&[p], &pods, &namespaces, &nodes);
        let client = out["b"].pods.iter().find(|p| p.name == "client").unwrap();
        assert_eq!(client.ingress, None);
        let policy = netpol::Policy::new(out["b"].clone(), None);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(policy.egress_allows(ip("10.42.1.7"), ip("10.42.0.5"), Proto::Tcp, 1));
        assert!(!policy.egress_allows(ip("10.42.1.7"), ip("10.42.1.9"), Proto::Tcp, 1));
    }
}
