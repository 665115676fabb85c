//! The Node authorizer (upstream's `plugin/pkg/auth/authorizer/node`): a node agent
//! (`system:node:<name>` in `system:nodes`) may use what the pods and devices bound to it use,
//! and nothing of other nodes. A stolen node certificate then exposes one node, not the site.
//!
//! [`Graph`] is kept from the watch of pods, PVCs and Devices ([`super::authorizer`] feeds it);
//! [`authorize`] is pure. What the graph does not decide is checked against the `system:node`
//! rules of the bootstrap policy. Writes to Node objects and pods are narrowed further by
//! NodeRestriction admission (`http::admission`).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::rbac::{PolicyRule, rule_allows};
use super::{Attributes, Decision};

/// Kinds of objects a node may reach only through its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefKind {
    Secret,
    ConfigMap,
    Claim,
    ServiceAccount,
    Volume,
}

type Ref = (RefKind, String, String);

/// The path node agents dial to serve their HTTP API to the API server.
pub const NODE_TUNNEL: &str = "/edgesite/v1/node-tunnel";

/// Which node uses which object.
#[derive(Debug, Default, Clone)]
pub struct Graph {
    /// Pod `namespace/name` -> (node, what it references).
    pods: HashMap<String, (String, Vec<Ref>)>,
    /// Object -> nodes using it (with a count of pods).
    users: HashMap<Ref, HashMap<String, u32>>,
    /// PVC `namespace/name` -> the PV it is bound to.
    claims: HashMap<String, String>,
    /// Device `namespace/name` -> node.
    devices: HashMap<String, String>,
}

fn strings(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// What a pod references: Secrets and ConfigMaps of volumes (also projected), env and envFrom,
/// image pull secrets; PVCs; its ServiceAccount.
pub fn pod_refs(pod: &Value) -> Vec<Ref> {
    let ns = str_at(pod, "/metadata/namespace").to_string();
    let mut refs: HashSet<Ref> = HashSet::new();
    let mut add = |kind: RefKind, name: &str| {
        if !name.is_empty() {
            refs.insert((kind, ns.clone(), name.to_string()));
        }
    };
    let spec = pod.get("spec").unwrap_or(&Value::Null);
    add(
        RefKind::ServiceAccount,
        match str_at(spec, "/serviceAccountName") {
            "" => "default",
            sa => sa,
        },
    );
    for s in strings(spec.get("imagePullSecrets")) {
        add(RefKind::Secret, str_at(s, "/name"));
    }
    for v in strings(spec.get("volumes")) {
        add(RefKind::Secret, str_at(v, "/secret/secretName"));
        add(RefKind::ConfigMap, str_at(v, "/configMap/name"));
        add(
            RefKind::Claim,
            str_at(v, "/persistentVolumeClaim/claimName"),
        );
        for source in strings(v.pointer("/projected/sources")) {
            add(RefKind::Secret, str_at(source, "/secret/name"));
            add(RefKind::ConfigMap, str_at(source, "/configMap/name"));
        }
        for key in [
            "cephfs",
            "rbd",
            "iscsi",
            "flexVolume",
            "scaleIO",
            "storageos",
        ] {
            add(
                RefKind::Secret,
                str_at(v, &format!("/{key}/secretRef/name")),
            );
        }
    }
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| strings(spec.get(*k)).collect::<Vec<_>>());
    for c in containers {
        for e in strings(c.get("env")) {
            add(RefKind::Secret, str_at(e, "/valueFrom/secretKeyRef/name"));
            add(
                RefKind::ConfigMap,
                str_at(e, "/valueFrom/configMapKeyRef/name"),
            );
        }
        for e in strings(c.get("envFrom")) {
            add(RefKind::Secret, str_at(e, "/secretRef/name"));
            add(RefKind::ConfigMap, str_at(e, "/configMapRef/name"));
        }
    }
    refs.into_iter().collect()
}

impl Graph {
    fn unlink(&mut self, key: &str) {
        if let Some((node, refs)) = self.pods.remove(key) {
            for r in refs {
                if let Some(nodes) = self.users.get_mut(&r) {
                    if let Some(count) = nodes.get_mut(&node) {
                        *count -= 1;
                        if *count == 0 {
                            nodes.remove(&node);
                        }
                    }
                    if nodes.is_empty() {
                        self.users.remove(&r);
                    }
                }
            }
        }
    }

    /// A pod was written (`Some`) or deleted (`None`). Only bound pods count.
    pub fn pod(&mut self, key: &str, pod: Option<&Value>) {
        self.unlink(key);
        let Some(pod) = pod else { return };
        let node = str_at(pod, "/spec/nodeName");
        if node.is_empty() {
            return;
        }
        let refs = pod_refs(pod);
        for r in &refs {
            *self
                .users
                .entry(r.clone())
                .or_default()
                .entry(node.to_string())
                .or_default() += 1;
        }
        self.pods.insert(key.to_string(), (node.to_string(), refs));
    }

    pub fn claim(&mut self, key: &str, claim: Option<&Value>) {
        match claim.map(|c| str_at(c, "/spec/volumeName")) {
            Some(volume) if !volume.is_empty() => {
                self.claims.insert(key.to_string(), volume.to_string());
            }
            _ => {
                self.claims.remove(key);
            }
        }
    }

    pub fn device(&mut self, key: &str, device: Option<&Value>) {
        match device.map(|d| str_at(d, "/spec/nodeName")) {
            Some(node) if !node.is_empty() => {
                self.devices.insert(key.to_string(), node.to_string());
            }
            _ => {
                self.devices.remove(key);
            }
        }
    }

    fn uses(&self, node: &str, kind: RefKind, namespace: &str, name: &str) -> bool {
        if kind == RefKind::Volume {
            // A PV is the node's when a claim bound to it is used by one of its pods.
            return self.claims.iter().any(|(claim, volume)| {
                volume == name
                    && claim
                        .split_once('/')
                        .is_some_and(|(ns, c)| self.uses(node, RefKind::Claim, ns, c))
            });
        }
        self.users
            .get(&(kind, namespace.to_string(), name.to_string()))
            .is_some_and(|nodes| nodes.contains_key(node))
    }

    /// The node a pod is bound to, as last seen.
    pub fn pod_node(&self, namespace: &str, name: &str) -> Option<&str> {
        self.pods
            .get(&format!("{namespace}/{name}"))
            .map(|(node, _)| node.as_str())
    }

    pub fn device_node(&self, namespace: &str, name: &str) -> Option<&str> {
        self.devices
            .get(&format!("{namespace}/{name}"))
            .map(String::as_str)
    }
}

fn no_relationship(node: &str) -> Decision {
    Decision::NoOpinion(format!(
        "no relationship found between node '{node}' and this object"
    ))
}

/// The decision for a node. `node_rules` are the `system:node` rules: the most a node may do.
pub fn authorize(graph: &Graph, node: &str, a: &Attributes, node_rules: &[PolicyRule]) -> Decision {
    if !a.resource_request {
        // The dial-out tunnel the API server reaches the node's agent through.
        return if a.verb == "get" && a.path == NODE_TUNNEL {
            Decision::Allow(String::new())
        } else {
            Decision::NoOpinion(String::new())
        };
    }
    let within_rules = || node_rules.iter().any(|r| rule_allows(r, a));
    let referenced = |kind: RefKind| {
        // Only single objects: a node may not list what it cannot name.
        if a.name.is_empty() {
            return Decision::NoOpinion(format!(
                "can only {} {} by name",
                a.verb,
                a.resource_and_subresource()
            ));
        }
        if !within_rules() {
            return Decision::NoOpinion(String::new());
        }
        if graph.uses(node, kind, &a.namespace, &a.name) {
            Decision::Allow(String::new())
        } else {
            no_relationship(node)
        }
    };
    match (
        a.api_group.as_str(),
        a.resource.as_str(),
        a.subresource.as_str(),
    ) {
        ("", "secrets", "") => referenced(RefKind::Secret),
        ("", "configmaps", "") => referenced(RefKind::ConfigMap),
        ("", "persistentvolumeclaims", "" | "status") => referenced(RefKind::Claim),
        ("", "persistentvolumes", "") => referenced(RefKind::Volume),
        ("", "serviceaccounts", "" | "token") => referenced(RefKind::ServiceAccount),
        ("", "pods", _) => {
            if a.name.is_empty() {
                // Lists and watches only of its own pods.
                return match (a.verb.as_str(), a.field("spec.nodeName")) {
                    ("list" | "watch", Some(n)) if n == node && within_rules() => {
                        Decision::Allow(String::new())
                    }
                    ("list" | "watch", _) => Decision::NoOpinion(format!(
                        "can only list/watch pods with spec.nodeName field selector = {node}"
                    )),
                    // NodeRestriction admission decides what a node may create.
                    ("create", _) if within_rules() => Decision::Allow(String::new()),
                    _ => Decision::NoOpinion(String::new()),
                };
            }
            if !within_rules() {
                return Decision::NoOpinion(String::new());
            }
            match graph.pod_node(&a.namespace, &a.name) {
                Some(n) if n == node => Decision::Allow(String::new()),
                _ => no_relationship(node),
            }
        }
        ("devices.kubeedge.io", "devices", _) => {
            if a.name.is_empty() {
                return match (a.verb.as_str(), a.field("spec.nodeName")) {
                    ("list" | "watch", Some(n)) if n == node && within_rules() => {
                        Decision::Allow(String::new())
                    }
                    _ => Decision::NoOpinion(format!(
                        "can only list/watch devices with spec.nodeName field selector = {node}"
                    )),
                };
            }
            if !within_rules() {
                return Decision::NoOpinion(String::new());
            }
            match graph.device_node(&a.namespace, &a.name) {
                Some(n) if n == node => Decision::Allow(String::new()),
                _ => no_relationship(node),
            }
        }
        ("", "nodes", sub) => {
            // Every node reads every Node (the mesh's peer directory); it writes only its own.
            let read = matches!(a.verb.as_str(), "get" | "list" | "watch") && sub.is_empty();
            if !within_rules() {
                Decision::NoOpinion(String::new())
            } else if read || a.name == node || (a.verb == "create" && sub.is_empty()) {
                // A create names its object in the body: NodeRestriction admission checks it.
                Decision::Allow(String::new())
            } else {
                Decision::NoOpinion(format!("node '{node}' cannot modify node '{}'", a.name))
            }
        }
        ("coordination.k8s.io", "leases", "") => {
            let own = a.name == node || (a.verb == "create" && a.name.is_empty());
            if within_rules() && a.namespace == "kube-node-lease" && own {
                Decision::Allow(String::new())
            } else {
                Decision::NoOpinion(
                    "can only access node lease with the same name as the requesting node".into(),
                )
            }
        }
        _ if within_rules() => Decision::Allow(String::new()),
        _ => Decision::NoOpinion(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Vec<PolicyRule> {
        super::super::policy::bootstrap().node_rules.clone()
    }

    fn graph() -> Graph {
        let mut g = Graph::default();
        let pod = json!({"metadata": {"namespace": "shop", "name": "a"}, "spec": {
            "nodeName": "n1", "serviceAccountName": "till",
            "volumes": [{"name": "s", "secret": {"secretName": "db"}},
                        {"name": "p", "projected": {"sources": [{"configMap": {"name": "cfg"}}]}},
                        {"name": "c", "persistentVolumeClaim": {"claimName": "data"}}],
            "containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "env"}}]}]}});
        g.pod("shop/a", Some(&pod));
        g.claim("shop/data", Some(&json!({"spec": {"volumeName": "pv1"}})));
        g.device("shop/thermo", Some(&json!({"spec": {"nodeName": "n1"}})));
        g
    }

    fn get(resource: &str, ns: &str, name: &str) -> Attributes {
        Attributes::resource("get", "", resource, ns).named(name)
    }

    #[test]
    fn a_node_reaches_only_what_its_pods_use() {
        let g = graph();
        let r = rules();
        for (resource, name) in [
            ("secrets", "db"),
            ("secrets", "env"),
            ("configmaps", "cfg"),
            ("persistentvolumeclaims", "data"),
            ("serviceaccounts", "till"),
        ] {
            assert!(
                authorize(&g, "n1", &get(resource, "shop", name), &r).allowed(),
                "{resource}/{name}"
            );
            let other = authorize(&g, "n2", &get(resource, "shop", name), &r);
            assert_eq!(
                other.reason(),
                "no relationship found between node 'n2' and this object"
            );
        }
        assert!(authorize(&g, "n1", &get("persistentvolumes", "", "pv1"), &r).allowed());
        assert!(!authorize(&g, "n2", &get("persistentvolumes", "", "pv1"), &r).allowed());
        assert!(!authorize(&g, "n1", &get("secrets", "shop", "other"), &r).allowed());
        assert!(
            !authorize(
                &g,
                "n1",
                &Attributes::resource("list", "", "secrets", "shop"),
                &r
            )
            .allowed()
        );
        // Nobody may write a referenced Secret through the node's identity.
        assert!(
            !authorize(
                &g,
                "n1",
                &Attributes::resource("update", "", "secrets", "shop").named("db"),
                &r
            )
            .allowed()
        );
        // The pod leaves: so does the access.
        let mut g = g;
        g.pod("shop/a", None);
        assert!(!authorize(&g, "n1", &get("secrets", "shop", "db"), &r).allowed());
    }

    #[test]
    fn pods_nodes_leases_and_devices() {
        let g = graph();
        let r = rules();
        let mut watch = Attributes::resource("watch", "", "pods", "");
        assert!(!authorize(&g, "n1", &watch, &r).allowed());
        watch.fields = vec![("spec.nodeName".into(), "n1".into())];
        assert!(authorize(&g, "n1", &watch, &r).allowed());
        assert!(!authorize(&g, "n2", &watch, &r).allowed());
        let status = Attributes::resource("patch", "", "pods/status", "shop").named("a");
        assert!(authorize(&g, "n1", &status, &r).allowed());
        assert!(!authorize(&g, "n2", &status, &r).allowed());
        let node = |verb: &str, name: &str| Attributes::resource(verb, "", "nodes", "").named(name);
        assert!(authorize(&g, "n1", &node("get", "n2"), &r).allowed());
        assert!(authorize(&g, "n1", &node("patch", "n1"), &r).allowed());
        assert!(!authorize(&g, "n1", &node("patch", "n2"), &r).allowed());
        assert!(!authorize(&g, "n1", &node("delete", "n2"), &r).allowed());
        let lease = |name: &str| {
            Attributes::resource("update", "coordination.k8s.io", "leases", "kube-node-lease")
                .named(name)
        };
        assert!(authorize(&g, "n1", &lease("n1"), &r).allowed());
        assert!(!authorize(&g, "n1", &lease("n2"), &r).allowed());
        let device = Attributes::resource("patch", "devices.kubeedge.io", "devices/status", "shop")
            .named("thermo");
        assert!(authorize(&g, "n1", &device, &r).allowed());
        assert!(!authorize(&g, "n2", &device, &r).allowed());
        // Things outside the node rules are not the node authorizer's to grant.
        assert!(
            !authorize(
                &g,
                "n1",
                &Attributes::resource("create", "apps", "deployments", "shop"),
                &r
            )
            .allowed()
        );
        assert!(
            authorize(
                &g,
                "n1",
                &Attributes::resource("watch", "discovery.k8s.io", "endpointslices", ""),
                &r
            )
            .allowed()
        );
    }
}
