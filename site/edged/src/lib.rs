//! edged: EdgeSite's node agent (KubeEdge's Edged, a kubelet-lite).
//!
//! [`run`] registers the node (`node.rs`: labels, capacity, conditions, the Lease), watches the
//! pods bound to it (`pods.rs`) and gives each pod a worker (`pod_worker.rs`, the pod life
//! cycle) that pulls images (`images/`), makes the pod's network namespace and CNI attachment
//! (`network/`), builds OCI specs (`spec.rs`), runs containers through containerd
//! (`runtime/containerd.rs`, the only code that speaks to containerd) and reports status.
//! Container output goes to CRI-format log files (`logs.rs`).

pub mod hooks;
pub mod images;
pub mod local_volumes;
pub mod logs;
pub mod network;
pub mod node;
pub mod pid_namespace;
pub mod pod_plan;
pub mod pod_worker;
pub mod pods;
pub mod probes;
pub mod runtime;
pub mod spec;
pub mod stats;
pub mod streaming;
pub mod volumes;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Typed settings of the node agent (the binary fills them from flags).
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// The port of the node's kubelet API, as the Node reports it (`daemonEndpoints`).
    pub kubelet_port: u16,
    /// `<data-dir>/agent`: pods, logs, CNI leases, image drop folder.
    pub root: PathBuf,
    pub containerd_socket: PathBuf,
    /// containerd namespace of this agent's containers and images.
    pub containerd_namespace: String,
    pub node_ip: Option<IpAddr>,
    pub labels: Vec<(String, String)>,
    /// Annotations the node registers with (and keeps).
    pub annotations: Vec<(String, String)>,
    /// `key=value:Effect` or `key:Effect`.
    pub taints: Vec<String>,
    /// Whether this node runs the control plane (adds the control-plane role labels).
    pub control_plane: bool,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_bridge: String,
    /// cgroup parent of every pod (cgroupfs layout).
    pub cgroup_root: String,
    /// `registries.yaml` (mirrors, credentials, TLS).
    pub registries: PathBuf,
    /// Nameserver for ClusterFirst pods when the mesh provides cluster DNS.
    pub cluster_dns: Option<IpAddr>,
    pub cluster_domain: String,
    pub max_pods: u32,
    pub log_rotation: logs::Rotation,
    /// The kubelet version string on the Node (the API server's version).
    pub version: String,
    pub status_update_frequency: Duration,
    pub lease_duration: Duration,
    /// Image garbage collection starts above this disk usage (percent) and frees down to the
    /// low mark.
    pub image_gc_high_percent: u8,
    pub image_gc_low_percent: u8,
    /// Where the site's `local-path` volumes are made on this node (`<data-dir>/storage`,
    /// `--default-local-storage-path`); `None` offers no local storage.
    pub local_storage: Option<PathBuf>,
}

impl Config {
    pub fn pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn netns_dir(&self) -> PathBuf {
        self.root.join("netns")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    /// The node-local cache (metamanager's SQLite file).
    pub fn cache_path(&self) -> PathBuf {
        self.root.join("cache").join("meta.db")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Runtime(#[from] runtime::containerd::RuntimeError),
    #[error(transparent)]
    Cni(#[from] network::cni::CniError),
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Cache(#[from] metamanager::StoreError),
}

/// What every part of the agent shares.
pub struct Agent {
    pub config: Config,
    pub client: kube::Client,
    /// The node-local cache every API read goes through (offline autonomy).
    pub meta: Arc<metamanager::MetaManager>,
    pub runtime: runtime::containerd::Containerd,
    pub images: images::ImageService,
    pub cni: network::cni::Cni,
    pub recorder: controllers::events::Recorder,
    /// The node's pod CIDR once the control plane assigned it.
    pub pod_cidr: tokio::sync::watch::Receiver<Option<String>>,
    pub host_ip: tokio::sync::watch::Receiver<Option<IpAddr>>,
    pub memory_capacity: i64,
    /// Image sizes by manifest digest, for the node status.
    pub image_sizes: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// Running containers `kubectl attach` can join, by containerd id.
    pub attachable:
        std::sync::Mutex<std::collections::HashMap<String, streaming::attach::Attachable>>,
    /// The latest resource usage sample (`stats.rs`).
    pub stats: stats::Stats,
    /// Serializes image pulls of the same name.
    pub pulls: tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Connects to containerd and checks the CNI plugins: fails with the fix when either is missing.
pub async fn check(config: &Config) -> Result<runtime::containerd::Containerd, AgentError> {
    let rt = runtime::containerd::Containerd::connect(
        &config.containerd_socket,
        &config.containerd_namespace,
    )
    .await?;
    network::cni::Cni::new(cni_config(config)).check()?;
    Ok(rt)
}

fn cni_config(config: &Config) -> network::cni::CniConfig {
    network::cni::CniConfig {
        bin_dirs: config.cni_bin_dirs.clone(),
        network: "edgesite".into(),
        bridge: config.cni_bridge.clone(),
        ipam_dir: config.root.join("cni").join("networks"),
        mtu: None,
    }
}

/// Runs the node agent until `shutdown`. Containers keep running when the agent stops.
///
/// `publish` receives the agent's HTTP API (logs, later exec and port-forward) and makes it
/// reachable from the API server; what it returns is kept alive while the agent runs.
pub async fn run<F, R>(
    config: Config,
    client: kube::Client,
    publish: F,
    shutdown: CancellationToken,
) -> Result<(), AgentError>
where
    F: FnOnce(axum::Router) -> R,
    R: Send + 'static,
{
    for dir in [
        config.pods_dir(),
        config.logs_dir(),
        config.netns_dir(),
        config.images_dir(),
    ] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Io(format!("create {}: {e}", dir.display())))?;
    }
    let rt = check(&config).await?;
    let registries = images::registry::Registries::load(&config.registries)?;
    let images = images::ImageService::new(rt.clone(), registries);
    let cni = network::cni::Cni::new(cni_config(&config));
    let recorder = controllers::events::Recorder::start_spooled(
        client.clone(),
        "kubelet",
        Some(config.node_name.clone()),
        Some(config.root.join("cache").join("events.json")),
        shutdown.clone(),
    );
    let meta = Arc::new(metamanager::MetaManager::open(
        &config.cache_path(),
        client.clone(),
    )?);
    // Until the API answers, the node's pod CIDR is the one it had.
    let cached_cidr = meta
        .node(&config.node_name)
        .and_then(|n| n.spec.and_then(|s| s.pod_cidr));
    let (cidr_tx, cidr_rx) = tokio::sync::watch::channel(cached_cidr);
    let (ip_tx, ip_rx) = tokio::sync::watch::channel(None);
    let agent = Arc::new(Agent {
        memory_capacity: node::host_memory_bytes().unwrap_or(0) as i64,
        config,
        client,
        meta: meta.clone(),
        runtime: rt,
        images,
        cni,
        recorder,
        pod_cidr: cidr_rx,
        host_ip: ip_rx,
        pulls: Default::default(),
        stats: Default::default(),
        attachable: Default::default(),
        image_sizes: Default::default(),
    });
    let _published = publish(streaming::router(agent.clone()));
    let meta_shutdown = shutdown.clone();
    tokio::spawn(async move { meta.run(meta_shutdown).await });
    images::import_dropped(&agent).await;
    let node = tokio::spawn(node::run(agent.clone(), cidr_tx, ip_tx, shutdown.clone()));
    let pods = tokio::spawn(pods::run(agent.clone(), shutdown.clone()));
    let gc = tokio::spawn(images::gc::run(agent.clone(), shutdown.clone()));
    tokio::spawn(stats::run(agent.clone(), shutdown.clone()));
    tokio::spawn(local_volumes::run(agent.clone(), shutdown.clone()));
    tokio::spawn(network::masquerade::run(
        agent.pod_cidr.clone(),
        agent.config.node_name.clone(),
        shutdown.clone(),
    ));
    let (node, pods, _) = tokio::join!(node, pods, gc);
    node.map_err(|e| AgentError::Io(format!("node task: {e}")))??;
    pods.map_err(|e| AgentError::Io(format!("pod task: {e}")))??;
    Ok(())
}
