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

/// The IngressClass every node's built-in ingress serves.
pub const SITE_INGRESS_CLASS: &str = "edgesite";

/// The path node agents dial to serve their HTTP API to the API server.
pub const NODE_TUNNEL: &str = "/edgesite/v1/node-tunnel";
/// The site's local-path provisioner (`controllers::persistent_volume::PROVISIONER`; this
/// crate sits below the controllers).
const LOCAL_PATH_PROVISIONER: &str = "rancher.io/local-path";

/// Which node uses which object.
#[derive(Debug, Default, Clone)]
pub struct Graph {
    /// Pod `namespace/name` -> (node, what it references).
    pods: HashMap<String, (String, Vec<Ref>)>,
    /// Object -> nodes using it (with a count of pods).
    users: HashMap<Ref, HashMap<String, u32>>,
    /// PVC `namespace/name` -> the PV it is bound to.
    claims: HashMap<String, String>,
    /// Local-path PV name -> the node its directory is on.
    local_volumes: HashMap<String, String>,
    /// Device `namespace/name` -> node.
    devices: HashMap<String, String>,
    /// Ingress `namespace/name` (Gateway `gateway:namespace/name`) -> the TLS Secrets it
    /// names, when it is the site's ingress's (class `edgesite`, or none for an Ingress): every
    /// node serves it, so every node may read them.
    ingress_secrets: HashMap<String, Vec<(String, String)>>,
}

/// The parts of a pod the graph needs, parsed straight from the stored text (the follower sees
/// every pod write: no `Value` tree per event).
mod view {
    use serde::Deserialize;

    #[derive(Deserialize, Default)]
    pub struct Name {
        #[serde(default)]
        pub name: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct SecretVolume {
        #[serde(default)]
        pub secret_name: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Claim {
        #[serde(default)]
        pub claim_name: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct WithSecretRef {
        pub secret_ref: Option<Name>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Source {
        pub secret: Option<Name>,
        pub config_map: Option<Name>,
    }
    #[derive(Deserialize, Default)]
    pub struct Projected {
        #[serde(default)]
        pub sources: Vec<Source>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Volume {
        pub secret: Option<SecretVolume>,
        pub config_map: Option<Name>,
        pub persistent_volume_claim: Option<Claim>,
        /// A generic ephemeral volume (its claim is `<pod>-<volume>`).
        pub ephemeral: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        pub name: String,
        pub projected: Option<Projected>,
        pub cephfs: Option<WithSecretRef>,
        pub rbd: Option<WithSecretRef>,
        pub iscsi: Option<WithSecretRef>,
        pub flex_volume: Option<WithSecretRef>,
        #[serde(rename = "scaleIO")]
        pub scale_io: Option<WithSecretRef>,
        pub storageos: Option<WithSecretRef>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct KeyRefs {
        pub secret_key_ref: Option<Name>,
        pub config_map_key_ref: Option<Name>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Env {
        pub value_from: Option<KeyRefs>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct EnvFrom {
        pub secret_ref: Option<Name>,
        pub config_map_ref: Option<Name>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Container {
        #[serde(default)]
        pub env: Vec<Env>,
        #[serde(default)]
        pub env_from: Vec<EnvFrom>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Spec {
        #[serde(default)]
        pub node_name: String,
        #[serde(default)]
        pub service_account_name: String,
        #[serde(default)]
        pub image_pull_secrets: Vec<Name>,
        #[serde(default)]
        pub volumes: Vec<Volume>,
        #[serde(default)]
        pub init_containers: Vec<Container>,
        #[serde(default)]
        pub containers: Vec<Container>,
        #[serde(default)]
        pub ephemeral_containers: Vec<Container>,
    }
    #[derive(Deserialize, Default)]
    pub struct Meta {
        #[serde(default)]
        pub namespace: String,
        #[serde(default)]
        pub name: String,
    }
    #[derive(Deserialize, Default)]
    pub struct Pod {
        #[serde(default)]
        pub metadata: Meta,
        #[serde(default)]
        pub spec: Spec,
    }
    /// `spec.nodeName` of a Device, `spec.volumeName` of a PVC.
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Bound {
        #[serde(default)]
        pub node_name: String,
        #[serde(default)]
        pub volume_name: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct IngressTls {
        #[serde(default)]
        pub secret_name: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct IngressSpec {
        #[serde(default)]
        pub ingress_class_name: Option<String>,
        #[serde(default)]
        pub tls: Vec<IngressTls>,
    }
    #[derive(Deserialize, Default)]
    pub struct IngressMeta {
        #[serde(default)]
        pub namespace: String,
        #[serde(default)]
        pub annotations: std::collections::HashMap<String, String>,
    }
    #[derive(Deserialize, Default)]
    pub struct Ingress {
        #[serde(default)]
        pub metadata: IngressMeta,
        #[serde(default)]
        pub spec: IngressSpec,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct CertificateRef {
        #[serde(default)]
        pub kind: Option<String>,
        #[serde(default)]
        pub namespace: Option<String>,
        #[serde(default)]
        pub name: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct ListenerTls {
        #[serde(default)]
        pub certificate_refs: Vec<CertificateRef>,
    }
    #[derive(Deserialize, Default)]
    pub struct Listener {
        #[serde(default)]
        pub tls: Option<ListenerTls>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct GatewaySpec {
        #[serde(default)]
        pub gateway_class_name: String,
        #[serde(default)]
        pub listeners: Vec<Listener>,
    }
    #[derive(Deserialize, Default)]
    pub struct Gateway {
        #[serde(default)]
        pub metadata: IngressMeta,
        #[serde(default)]
        pub spec: GatewaySpec,
    }
    #[derive(Deserialize, Default)]
    pub struct WithBound {
        #[serde(default)]
        pub spec: Bound,
    }
}

/// The node and references of a pod's stored text.
fn parse_pod(text: &str) -> Option<(String, Vec<Ref>)> {
    let pod: view::Pod = serde_json::from_str(text).ok()?;
    let ns = pod.metadata.namespace;
    let mut refs: HashSet<Ref> = HashSet::new();
    let mut add = |kind: RefKind, name: &str| {
        if !name.is_empty() {
            refs.insert((kind, ns.clone(), name.to_string()));
        }
    };
    let spec = pod.spec;
    add(
        RefKind::ServiceAccount,
        if spec.service_account_name.is_empty() {
            "default"
        } else {
            &spec.service_account_name
        },
    );
    for s in &spec.image_pull_secrets {
        add(RefKind::Secret, &s.name);
    }
    for v in &spec.volumes {
        if let Some(s) = &v.secret {
            add(RefKind::Secret, &s.secret_name);
        }
        if let Some(c) = &v.config_map {
            add(RefKind::ConfigMap, &c.name);
        }
        if let Some(c) = &v.persistent_volume_claim {
            add(RefKind::Claim, &c.claim_name);
        }
        if v.ephemeral.is_some() {
            add(
                RefKind::Claim,
                &sitekit::claims::ephemeral_claim(&pod.metadata.name, &v.name),
            );
        }
        for source in v.projected.iter().flat_map(|p| &p.sources) {
            if let Some(s) = &source.secret {
                add(RefKind::Secret, &s.name);
            }
            if let Some(c) = &source.config_map {
                add(RefKind::ConfigMap, &c.name);
            }
        }
        for holder in [
            &v.cephfs,
            &v.rbd,
            &v.iscsi,
            &v.flex_volume,
            &v.scale_io,
            &v.storageos,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(r) = &holder.secret_ref {
                add(RefKind::Secret, &r.name);
            }
        }
    }
    for c in spec
        .init_containers
        .iter()
        .chain(&spec.containers)
        .chain(&spec.ephemeral_containers)
    {
        for e in c.env.iter().filter_map(|e| e.value_from.as_ref()) {
            if let Some(r) = &e.secret_key_ref {
                add(RefKind::Secret, &r.name);
            }
            if let Some(r) = &e.config_map_key_ref {
                add(RefKind::ConfigMap, &r.name);
            }
        }
        for e in &c.env_from {
            if let Some(r) = &e.secret_ref {
                add(RefKind::Secret, &r.name);
            }
            if let Some(r) = &e.config_map_ref {
                add(RefKind::ConfigMap, &r.name);
            }
        }
    }
    Some((spec.node_name, refs.into_iter().collect()))
}

impl Graph {
    /// A pod was written (its stored text) or deleted (`None`).
    pub fn pod_text(&mut self, key: &str, text: Option<&str>) {
        self.unlink(key);
        let Some((node, refs)) = text.and_then(parse_pod) else {
            return;
        };
        self.link(key, node, refs);
    }

    /// A PVC (stored text) was written or deleted.
    pub fn claim_text(&mut self, key: &str, text: Option<&str>) {
        let bound = text.and_then(|t| serde_json::from_str::<view::WithBound>(t).ok());
        match bound.map(|b| b.spec.volume_name).filter(|v| !v.is_empty()) {
            Some(volume) => {
                self.claims.insert(key.to_string(), volume);
            }
            None => {
                self.claims.remove(key);
            }
        }
    }

    /// A PV (stored text) was written or deleted: the site's local-path provisioner's volumes
    /// belong to the node that holds their directory (it removes the directory and the volume
    /// once the volume is released).
    pub fn volume_text(&mut self, name: &str, text: Option<&str>) {
        let node = text
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .filter(|v| {
                v.pointer("/metadata/annotations/pv.kubernetes.io~1provisioned-by")
                    .and_then(Value::as_str)
                    == Some(LOCAL_PATH_PROVISIONER)
            })
            .and_then(|v| {
                v.pointer("/metadata/annotations/local.path.provisioner~1selected-node")
                    .and_then(Value::as_str)
                    .map(String::from)
            });
        match node {
            Some(node) => {
                self.local_volumes.insert(name.to_string(), node);
            }
            None => {
                self.local_volumes.remove(name);
            }
        }
    }

    /// The node whose directory holds a local-path volume.
    pub fn local_volume_node(&self, name: &str) -> Option<&str> {
        self.local_volumes.get(name).map(String::as_str)
    }

    /// A Device (stored text) was written or deleted.
    pub fn device_text(&mut self, key: &str, text: Option<&str>) {
        let bound = text.and_then(|t| serde_json::from_str::<view::WithBound>(t).ok());
        match bound.map(|b| b.spec.node_name).filter(|n| !n.is_empty()) {
            Some(node) => {
                self.devices.insert(key.to_string(), node);
            }
            None => {
                self.devices.remove(key);
            }
        }
    }

    /// An Ingress (stored text) was written or deleted.
    pub fn ingress_text(&mut self, key: &str, text: Option<&str>) {
        self.ingress_secrets.remove(key);
        let Some(ingress) = text.and_then(|t| serde_json::from_str::<view::Ingress>(t).ok()) else {
            return;
        };
        let class = ingress.spec.ingress_class_name.or_else(|| {
            ingress
                .metadata
                .annotations
                .get("kubernetes.io/ingress.class")
                .cloned()
        });
        if class.as_deref().is_some_and(|c| c != SITE_INGRESS_CLASS) {
            return;
        }
        let namespace = ingress.metadata.namespace;
        let secrets: Vec<(String, String)> = ingress
            .spec
            .tls
            .into_iter()
            .filter(|t| !t.secret_name.is_empty())
            .map(|t| (namespace.clone(), t.secret_name))
            .collect();
        if !secrets.is_empty() {
            self.ingress_secrets.insert(key.to_string(), secrets);
        }
    }

    /// A Gateway (stored text) was written or deleted: the certificates of the site's class's
    /// Gateways (in their own namespace) are every node's to read, as the Ingresses' are.
    pub fn gateway_text(&mut self, key: &str, text: Option<&str>) {
        let key = format!("gateway:{key}");
        self.ingress_secrets.remove(&key);
        let Some(gateway) = text.and_then(|t| serde_json::from_str::<view::Gateway>(t).ok()) else {
            return;
        };
        if gateway.spec.gateway_class_name != SITE_INGRESS_CLASS {
            return;
        }
        let namespace = gateway.metadata.namespace;
        let secrets: Vec<(String, String)> = gateway
            .spec
            .listeners
            .into_iter()
            .filter_map(|l| l.tls)
            .flat_map(|t| t.certificate_refs)
            .filter(|c| c.kind.as_deref().unwrap_or("Secret") == "Secret")
            .filter(|c| c.namespace.as_deref().is_none_or(|n| n == namespace))
            .map(|c| (namespace.clone(), c.name))
            .collect();
        if !secrets.is_empty() {
            self.ingress_secrets.insert(key, secrets);
        }
    }

    fn link(&mut self, key: &str, node: String, refs: Vec<Ref>) {
        if node.is_empty() {
            return;
        }
        for r in &refs {
            *self
                .users
                .entry(r.clone())
                .or_default()
                .entry(node.clone())
                .or_default() += 1;
        }
        self.pods.insert(key.to_string(), (node, refs));
    }

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
        self.pod_text(key, pod.map(Value::to_string).as_deref());
    }

    pub fn claim(&mut self, key: &str, claim: Option<&Value>) {
        self.claim_text(key, claim.map(Value::to_string).as_deref());
    }

    pub fn device(&mut self, key: &str, device: Option<&Value>) {
        self.device_text(key, device.map(Value::to_string).as_deref());
    }

    fn uses(&self, node: &str, kind: RefKind, namespace: &str, name: &str) -> bool {
        if kind == RefKind::Volume {
            if self.local_volume_node(name) == Some(node) {
                return true;
            }
            // A PV is the node's when a claim bound to it is used by one of its pods.
            return self.claims.iter().any(|(claim, volume)| {
                volume == name
                    && claim
                        .split_once('/')
                        .is_some_and(|(ns, c)| self.uses(node, RefKind::Claim, ns, c))
            });
        }
        // The rules the server resolved for the node's pods (`edgemesh::netpol::configmap_name`).
        if kind == RefKind::ConfigMap
            && namespace == "kube-system"
            && name.strip_prefix("netpol.") == Some(node)
        {
            return true;
        }
        if kind == RefKind::Secret
            && self
                .ingress_secrets
                .values()
                .flatten()
                .any(|(ns, secret)| ns == namespace && secret == name)
        {
            return true;
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
        // Deleting: only the local-path volumes whose directory the node holds.
        ("", "persistentvolumes", "") if a.verb == "delete" => {
            if !within_rules() {
                Decision::NoOpinion(String::new())
            } else if graph.local_volume_node(&a.name) == Some(node) {
                Decision::Allow(String::new())
            } else {
                no_relationship(node)
            }
        }
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
                        {"name": "c", "persistentVolumeClaim": {"claimName": "data"}},
                        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}],
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
        let mut g = graph();
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
        // A generic ephemeral volume's claim: `<pod>-<volume>`.
        assert!(
            authorize(
                &g,
                "n1",
                &get("persistentvolumeclaims", "shop", "a-scratch"),
                &r
            )
            .allowed()
        );
        assert!(
            !authorize(
                &g,
                "n2",
                &get("persistentvolumeclaims", "shop", "a-scratch"),
                &r
            )
            .allowed()
        );
        assert!(!authorize(&g, "n2", &get("persistentvolumes", "", "pv1"), &r).allowed());
        // The local-path volumes whose directory it holds: read and delete; others not deleted.
        g.volume_text(
            "pvc-1",
            Some(
                &json!({"metadata": {"annotations": {
                "pv.kubernetes.io/provisioned-by": "rancher.io/local-path",
                "local.path.provisioner/selected-node": "n2"}}})
                .to_string(),
            ),
        );
        let delete =
            |name: &str| Attributes::resource("delete", "", "persistentvolumes", "").named(name);
        assert!(authorize(&g, "n2", &get("persistentvolumes", "", "pvc-1"), &r).allowed());
        assert!(authorize(&g, "n2", &delete("pvc-1"), &r).allowed());
        assert!(!authorize(&g, "n1", &delete("pvc-1"), &r).allowed());
        assert!(
            !authorize(&g, "n1", &delete("pv1"), &r).allowed(),
            "used, not held"
        );
        g.volume_text("pvc-1", None);
        assert!(!authorize(&g, "n2", &delete("pvc-1"), &r).allowed());
        assert!(!authorize(&g, "n1", &get("secrets", "shop", "other"), &r).allowed());
        // Its network policy rules, and only its own.
        assert!(authorize(&g, "n1", &get("configmaps", "kube-system", "netpol.n1"), &r).allowed());
        let watch =
            Attributes::resource("watch", "", "configmaps", "kube-system").named("netpol.n1");
        assert!(authorize(&g, "n1", &watch, &r).allowed());
        assert!(!authorize(&g, "n2", &get("configmaps", "kube-system", "netpol.n1"), &r).allowed());
        assert!(!authorize(&g, "n1", &get("configmaps", "shop", "netpol.n1"), &r).allowed());
        let write =
            Attributes::resource("update", "", "configmaps", "kube-system").named("netpol.n1");
        assert!(!authorize(&g, "n1", &write, &r).allowed());
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
        g.pod("shop/a", None);
        assert!(!authorize(&g, "n1", &get("secrets", "shop", "db"), &r).allowed());
    }

    #[test]
    fn every_node_reads_the_tls_secrets_of_the_site_ingress_only() {
        let mut g = graph();
        let r = rules();
        let ingress = |class: serde_json::Value| {
            serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"ingressClassName": class, "tls": [{"hosts": ["a.example"], "secretName": "web-tls"}]}
            })
            .to_string()
        };
        g.ingress_text("shop/web", Some(&ingress(serde_json::json!("edgesite"))));
        for node in ["n1", "n2"] {
            assert!(authorize(&g, node, &get("secrets", "shop", "web-tls"), &r).allowed());
        }
        assert!(!authorize(&g, "n1", &get("secrets", "other", "web-tls"), &r).allowed());
        // Another controller's Ingress: its Secrets stay out of reach.
        g.ingress_text("shop/web", Some(&ingress(serde_json::json!("nginx"))));
        assert!(!authorize(&g, "n1", &get("secrets", "shop", "web-tls"), &r).allowed());
        g.ingress_text("shop/web", Some(&ingress(serde_json::Value::Null)));
        assert!(authorize(&g, "n1", &get("secrets", "shop", "web-tls"), &r).allowed());
        g.ingress_text("shop/web", None);
        assert!(!authorize(&g, "n1", &get("secrets", "shop", "web-tls"), &r).allowed());
        // A Gateway of the site's class: its listeners' certificates, in its namespace only.
        let gateway = serde_json::json!({
            "metadata": {"name": "gw", "namespace": "shop"},
            "spec": {"gatewayClassName": "edgesite", "listeners": [{"name": "https", "tls": {"certificateRefs": [
                {"name": "gw-tls"}, {"name": "elsewhere", "namespace": "other"}
            ]}}]}
        });
        g.gateway_text("shop/gw", Some(&gateway.to_string()));
        assert!(authorize(&g, "n2", &get("secrets", "shop", "gw-tls"), &r).allowed());
        assert!(!authorize(&g, "n2", &get("secrets", "other", "elsewhere"), &r).allowed());
        g.gateway_text("shop/gw", None);
        assert!(!authorize(&g, "n2", &get("secrets", "shop", "gw-tls"), &r).allowed());
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
