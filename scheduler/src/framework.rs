//! What the plugins look at: a pod's scheduling-relevant facts ([`PodInfo`]), a node with the pods
//! assigned to it ([`NodeInfo`]) and the per-cycle state prefilters compute once per pod
//! ([`CycleState`]). Pure: no I/O, no async.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Container, Node, PersistentVolume, PersistentVolumeClaim, Pod, Taint,
};
use k8s_openapi::api::storage::v1::StorageClass;

use sitekit::quantity;

pub const CPU: &str = "cpu";
pub const MEMORY: &str = "memory";
pub const EPHEMERAL_STORAGE: &str = "ephemeral-storage";
pub const PODS: &str = "pods";

/// What a container that requests nothing is assumed to use when spreading load (upstream's
/// `DefaultMilliCPURequest` and `DefaultMemoryRequest`).
pub const DEFAULT_MILLI_CPU: i64 = 100;
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// Amounts of resources: CPU in millicores, the rest in units.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral_storage: i64,
    /// How many pods (only meaningful for a node's allocatable).
    pub pods: i64,
    /// Extended resources (`nvidia.com/gpu`, `hugepages-2Mi`, ...).
    pub scalar: BTreeMap<String, i64>,
}

impl Resources {
    pub fn from_list(
        list: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
    ) -> Self {
        let mut r = Resources::default();
        for (name, q) in list.into_iter().flatten() {
            match name.as_str() {
                CPU => r.milli_cpu = quantity::milli(q).unwrap_or(0),
                MEMORY => r.memory = quantity::units(q).unwrap_or(0),
                EPHEMERAL_STORAGE => r.ephemeral_storage = quantity::units(q).unwrap_or(0),
                PODS => r.pods = quantity::units(q).unwrap_or(0),
                other if is_scalar(other) => {
                    r.scalar
                        .insert(other.to_string(), quantity::units(q).unwrap_or(0));
                }
                _ => {}
            }
        }
        r
    }

    pub fn add(&mut self, o: &Resources) {
        self.milli_cpu += o.milli_cpu;
        self.memory += o.memory;
        self.ephemeral_storage += o.ephemeral_storage;
        self.pods += o.pods;
        for (k, v) in &o.scalar {
            *self.scalar.entry(k.clone()).or_default() += v;
        }
    }

    pub fn sub(&mut self, o: &Resources) {
        self.milli_cpu -= o.milli_cpu;
        self.memory -= o.memory;
        self.ephemeral_storage -= o.ephemeral_storage;
        self.pods -= o.pods;
        for (k, v) in &o.scalar {
            *self.scalar.entry(k.clone()).or_default() -= v;
        }
    }

    /// Each resource the larger of the two.
    pub fn max(&mut self, o: &Resources) {
        self.milli_cpu = self.milli_cpu.max(o.milli_cpu);
        self.memory = self.memory.max(o.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(o.ephemeral_storage);
        for (k, v) in &o.scalar {
            let e = self.scalar.entry(k.clone()).or_default();
            *e = (*e).max(*v);
        }
    }
}

/// Extended resources are fully qualified names outside `kubernetes.io/` plus hugepages.
fn is_scalar(name: &str) -> bool {
    name.starts_with("hugepages-")
        || name.starts_with("attachable-volumes-")
        || (name.contains('/') && !name.starts_with("kubernetes.io/"))
        || name.starts_with("requests.")
}

fn container_requests(c: &Container) -> Resources {
    Resources::from_list(c.resources.as_ref().and_then(|r| r.requests.as_ref()))
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// A pod's effective request, as upstream computes it: the sum of its containers (and sidecar
/// init containers), or, if larger, what any init container needs while it runs (itself plus
/// the sidecars started before it), plus the pod overhead.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources::default();
    };
    let mut sum = Resources::default();
    for c in &spec.containers {
        sum.add(&container_requests(c));
    }
    let mut sidecars = Resources::default();
    let mut init_peak = Resources::default();
    for c in spec.init_containers.iter().flatten() {
        let req = container_requests(c);
        if is_sidecar(c) {
            sidecars.add(&req);
            sum.add(&req);
            init_peak.max(&sidecars);
        } else {
            let mut during = sidecars.clone();
            during.add(&req);
            init_peak.max(&during);
        }
    }
    sum.max(&init_peak);
    if let Some(overhead) = spec.overhead.as_ref() {
        sum.add(&Resources::from_list(Some(overhead)));
    }
    sum
}

/// CPU and memory used for scoring: containers requesting nothing count as the defaults.
pub fn pod_non_zero_requests(pod: &Pod) -> (i64, i64) {
    let Some(spec) = pod.spec.as_ref() else {
        return (0, 0);
    };
    let non_zero = |c: &Container| {
        let r = container_requests(c);
        let cpu = if r.milli_cpu == 0 {
            DEFAULT_MILLI_CPU
        } else {
            r.milli_cpu
        };
        let mem = if r.memory == 0 {
            DEFAULT_MEMORY
        } else {
            r.memory
        };
        (cpu, mem)
    };
    let (mut cpu, mut mem) = (0, 0);
    for c in &spec.containers {
        let (c, m) = non_zero(c);
        cpu += c;
        mem += m;
    }
    for init in spec.init_containers.iter().flatten() {
        let (c, m) = non_zero(init);
        if is_sidecar(init) {
            cpu += c;
            mem += m;
        } else {
            cpu = cpu.max(c);
            mem = mem.max(m);
        }
    }
    (cpu, mem)
}

/// A host port a pod asks for: (protocol, host IP, port).
pub type HostPort = (String, String, i32);

pub fn host_ports(pod: &Pod) -> Vec<HostPort> {
    let mut out = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        for p in c.ports.iter().flatten() {
            if let Some(hp) = p.host_port.filter(|p| *p > 0) {
                let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                let ip = p
                    .host_ip
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "0.0.0.0".into());
                out.push((proto, ip, hp));
            }
        }
    }
    out
}

/// Two host ports conflict when protocol and port match and either binds all addresses.
pub fn ports_conflict(a: &HostPort, b: &HostPort) -> bool {
    a.0 == b.0 && a.2 == b.2 && (a.1 == b.1 || a.1 == "0.0.0.0" || b.1 == "0.0.0.0")
}

/// The facts about a pod that scheduling uses, computed once.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub pod: Arc<Pod>,
    pub key: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub requests: Resources,
    pub non_zero_cpu: i64,
    pub non_zero_memory: i64,
    pub host_ports: Vec<HostPort>,
    pub priority: i32,
}

impl PodInfo {
    pub fn new(pod: Arc<Pod>) -> Self {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let key = format!("{namespace}/{}", pod.metadata.name.as_deref().unwrap_or(""));
        let mut requests = pod_requests(&pod);
        requests.pods = 1;
        let (non_zero_cpu, non_zero_memory) = pod_non_zero_requests(&pod);
        PodInfo {
            key,
            namespace,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            requests,
            non_zero_cpu,
            non_zero_memory,
            host_ports: host_ports(&pod),
            priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
            pod,
        }
    }

    pub fn affinity(&self) -> Option<&k8s_openapi::api::core::v1::Affinity> {
        self.pod.spec.as_ref().and_then(|s| s.affinity.as_ref())
    }

    pub fn has_pod_affinity(&self) -> bool {
        self.affinity()
            .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some())
    }

    /// Whether this pod has required anti-affinity terms (existing pods' terms are checked for
    /// every incoming pod, so nodes keep a count of them).
    pub fn has_required_anti_affinity(&self) -> bool {
        self.affinity()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .is_some_and(|t| !t.is_empty())
    }
}

/// A node and what is assigned to it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub node: Arc<Node>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub allocatable: Resources,
    /// Sum of the requests of the pods on the node.
    pub requested: Resources,
    pub non_zero_cpu: i64,
    pub non_zero_memory: i64,
    pub pods: HashMap<String, PodInfo>,
    pub used_ports: Vec<HostPort>,
    /// How many pods on this node have required anti-affinity terms.
    pub pods_with_required_anti_affinity: usize,
    /// How many pods on this node have any pod affinity or anti-affinity.
    pub pods_with_affinity: usize,
    /// Image name (every name the node reports for an image) -> size in bytes.
    pub images: HashMap<String, i64>,
}

impl NodeInfo {
    pub fn new(node: Arc<Node>) -> Self {
        let mut info = NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            unschedulable: false,
            allocatable: Resources::default(),
            requested: Resources::default(),
            non_zero_cpu: 0,
            non_zero_memory: 0,
            pods: HashMap::new(),
            used_ports: Vec::new(),
            pods_with_required_anti_affinity: 0,
            pods_with_affinity: 0,
            images: HashMap::new(),
            node: node.clone(),
        };
        info.set_node(node);
        info
    }

    /// Replaces the node object, keeping the pods.
    pub fn set_node(&mut self, node: Arc<Node>) {
        self.labels = node.metadata.labels.clone().unwrap_or_default();
        let spec = node.spec.as_ref();
        self.taints = spec.and_then(|s| s.taints.clone()).unwrap_or_default();
        self.unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        let status = node.status.as_ref();
        self.allocatable = Resources::from_list(
            status.and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref())),
        );
        self.images.clear();
        for image in status.and_then(|s| s.images.as_ref()).into_iter().flatten() {
            for name in image.names.iter().flatten() {
                self.images
                    .insert(normalize_image(name), image.size_bytes.unwrap_or(0));
            }
        }
        self.node = node;
    }

    pub fn add_pod(&mut self, pod: PodInfo) {
        if let Some(old) = self.pods.remove(&pod.key) {
            self.account(&old, -1);
        }
        self.account(&pod, 1);
        self.pods.insert(pod.key.clone(), pod);
    }

    pub fn remove_pod(&mut self, key: &str) -> Option<PodInfo> {
        let old = self.pods.remove(key)?;
        self.account(&old, -1);
        Some(old)
    }

    fn account(&mut self, pod: &PodInfo, sign: i64) {
        if sign > 0 {
            self.requested.add(&pod.requests);
            self.used_ports.extend(pod.host_ports.iter().cloned());
        } else {
            self.requested.sub(&pod.requests);
            for p in &pod.host_ports {
                if let Some(i) = self.used_ports.iter().position(|u| u == p) {
                    self.used_ports.swap_remove(i);
                }
            }
        }
        self.non_zero_cpu += sign * pod.non_zero_cpu;
        self.non_zero_memory += sign * pod.non_zero_memory;
        if pod.has_pod_affinity() {
            if sign > 0 {
                self.pods_with_affinity += 1;
            } else {
                self.pods_with_affinity -= 1;
            }
        }
        if pod.has_required_anti_affinity() {
            if sign > 0 {
                self.pods_with_required_anti_affinity += 1;
            } else {
                self.pods_with_required_anti_affinity -= 1;
            }
        }
    }
}

/// `nginx` and `docker.io/library/nginx:latest` are the same image.
pub fn normalize_image(name: &str) -> String {
    let name = name.split('@').next().unwrap_or(name);
    let (repo, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "latest"),
    };
    let repo = match repo.split_once('/') {
        None => format!("docker.io/library/{repo}"),
        Some((host, _)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            repo.to_string()
        }
        Some(_) => format!("docker.io/{repo}"),
    };
    format!("{repo}:{tag}")
}

/// Every node (with its pods), the namespaces' labels and the volumes: what one scheduling
/// cycle sees.
#[derive(Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeInfo>,
    pub namespace_labels: HashMap<String, BTreeMap<String, String>>,
    pub volumes: Arc<Volumes>,
}

/// The claims, volumes and storage classes, indexed for the VolumeBinding plugin.
#[derive(Default)]
pub struct Volumes {
    /// By (namespace, name).
    pub claims: HashMap<(String, String), Arc<PersistentVolumeClaim>>,
    pub volumes: Vec<Arc<PersistentVolume>>,
    pub by_name: HashMap<String, Arc<PersistentVolume>>,
    pub classes: HashMap<String, Arc<StorageClass>>,
}

impl Volumes {
    pub fn new(
        claims: Vec<Arc<PersistentVolumeClaim>>,
        volumes: Vec<Arc<PersistentVolume>>,
        classes: Vec<Arc<StorageClass>>,
    ) -> Self {
        Volumes {
            claims: claims
                .into_iter()
                .map(|c| {
                    (
                        (
                            c.metadata.namespace.clone().unwrap_or_default(),
                            c.metadata.name.clone().unwrap_or_default(),
                        ),
                        c,
                    )
                })
                .collect(),
            by_name: volumes
                .iter()
                .map(|v| (v.metadata.name.clone().unwrap_or_default(), v.clone()))
                .collect(),
            volumes,
            classes: classes
                .into_iter()
                .map(|c| (c.metadata.name.clone().unwrap_or_default(), c))
                .collect(),
        }
    }
}

/// Per-pod, per-cycle data computed by prefilters and read by filters and scores.
#[derive(Default)]
pub struct CycleState {
    pub affinity: Option<crate::plugins::inter_pod_affinity::PreFilterState>,
    pub spread: Option<crate::plugins::topology_spread::PreFilterState>,
    pub spread_score: Option<crate::plugins::topology_spread::PreScoreState>,
    pub affinity_score: Option<crate::plugins::inter_pod_affinity::PreScoreState>,
    pub images: Option<crate::plugins::image_locality::ImageSpread>,
    pub volumes: Option<crate::plugins::volume_binding::PreFilterState>,
}

#[cfg(test)]
pub mod testing {
    //! Builders for plugin tests.
    use super::*;
    use serde_json::json;

    pub fn node(name: &str, cpu: &str, memory: &str, pods: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "10Gi"}}
        }))
        .expect("node")
    }

    pub fn pod(name: &str, cpu: &str, memory: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": cpu, "memory": memory}}}]}
        }))
        .expect("pod")
    }

    pub fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("valid object")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use serde_json::json;

    #[test]
    fn init_containers_and_sidecars_count_like_upstream() {
        let pod: Pod = from_json(json!({
            "metadata": {"name": "p"},
            "spec": {
                "initContainers": [
                    {"name": "init", "image": "x", "resources": {"requests": {"cpu": "2"}}},
                    {"name": "side", "image": "x", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m"}}}
                ],
                "containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}],
                "overhead": {"cpu": "100m"}
            }
        }));
        let r = pod_requests(&pod);
        // max(1 + 0.5 sidecar, 2 init) + 0.1 overhead
        assert_eq!(r.milli_cpu, 2100);
        assert_eq!(r.memory, 1 << 30);
    }

    #[test]
    fn zero_requests_score_as_defaults() {
        let pod: Pod =
            from_json(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}));
        assert_eq!(
            pod_non_zero_requests(&pod),
            (DEFAULT_MILLI_CPU, DEFAULT_MEMORY)
        );
        assert_eq!(pod_requests(&pod), Resources::default());
    }

    #[test]
    fn node_info_accounts_pods() {
        let mut n = NodeInfo::new(Arc::new(node("n1", "2", "4Gi", "110")));
        n.add_pod(PodInfo::new(Arc::new(pod("a", "500m", "1Gi"))));
        n.add_pod(PodInfo::new(Arc::new(pod("a", "500m", "1Gi"))));
        assert_eq!(
            n.requested.milli_cpu, 500,
            "re-adding the same pod replaces it"
        );
        assert_eq!(n.requested.pods, 1);
        n.remove_pod("default/a");
        assert_eq!(n.requested, Resources::default());
    }

    #[test]
    fn image_names_normalize() {
        assert_eq!(normalize_image("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(
            normalize_image("nginx:1.25"),
            "docker.io/library/nginx:1.25"
        );
        assert_eq!(normalize_image("me/app:v1"), "docker.io/me/app:v1");
        assert_eq!(
            normalize_image("localhost:5000/app"),
            "localhost:5000/app:latest"
        );
        assert_eq!(
            normalize_image("registry.k8s.io/pause:3.9"),
            "registry.k8s.io/pause:3.9"
        );
    }
}
