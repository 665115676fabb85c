//! The Node object: registration (labels, taints), status (capacity and allocatable from the
//! host, conditions, nodeInfo, addresses, images) every `status_update_frequency` or when it
//! changes, and the heartbeat Lease in `kube-node-lease` every 10 s. Also follows the node's
//! `spec.podCIDR`, which the control plane assigns and the CNI configuration needs.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Agent, AgentError};

const LEASE_RENEW: Duration = Duration::from_secs(10);
const MEMORY_EVICTION: i64 = 100 << 20;

pub fn host_memory_bytes() -> Option<u64> {
    meminfo("MemTotal:")
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// The address other machines reach this node on: the flag, else the source address of the
/// default route (found without sending anything), else loopback.
pub fn detect_node_ip(configured: Option<IpAddr>) -> IpAddr {
    if let Some(ip) = configured {
        return ip;
    }
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr());
    match probe {
        Ok(addr) if !addr.ip().is_unspecified() => addr.ip(),
        _ => IpAddr::from([127, 0, 0, 1]),
    }
}

fn arch() -> &'static str {
    crate::images::Platform::host().architecture.leak()
}

/// The labels the node registers with.
pub fn labels(agent: &Agent) -> BTreeMap<String, String> {
    let c = &agent.config;
    let mut labels = BTreeMap::new();
    labels.insert("kubernetes.io/hostname".into(), c.node_name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), arch().into());
    labels.insert("beta.kubernetes.io/os".into(), "linux".into());
    labels.insert("beta.kubernetes.io/arch".into(), arch().into());
    labels.insert("node.kubernetes.io/instance-type".into(), "edgesite".into());
    if c.control_plane {
        labels.insert(
            "node-role.kubernetes.io/control-plane".into(),
            "true".into(),
        );
        labels.insert("node-role.kubernetes.io/master".into(), "true".into());
    }
    for (k, v) in &c.labels {
        labels.insert(k.clone(), v.clone());
    }
    labels
}

/// `key=value:Effect` / `key:Effect` -> a Taint.
pub fn parse_taint(text: &str) -> Result<Value, String> {
    let (kv, effect) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("taint {text:?} must be key[=value]:Effect"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!(
            "taint {text:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (kv, None),
    };
    if key.is_empty() {
        return Err(format!("taint {text:?} has no key"));
    }
    let mut t = json!({"key": key, "effect": effect});
    if let Some(v) = value {
        t["value"] = json!(v);
    }
    Ok(t)
}

struct HostFigures {
    cpus: usize,
    memory: u64,
    storage: u64,
}

fn host_figures(agent: &Agent) -> HostFigures {
    let storage = nix::sys::statvfs::statvfs(&agent.config.root)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0);
    HostFigures {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory: host_memory_bytes().unwrap_or(0),
        storage,
    }
}

fn condition(kind: &str, bad: bool, reason_ok: &str, reason_bad: &str, message: String) -> Value {
    json!({
        "type": kind,
        "status": if bad { "True" } else { "False" },
        "reason": if bad { reason_bad } else { reason_ok },
        "message": message,
    })
}

/// The status the node reports now (timestamps are filled in by the caller).
async fn status(agent: &Agent, node_ip: IpAddr, runtime_version: &str) -> Value {
    let h = host_figures(agent);
    let c = &agent.config;
    let available = meminfo("MemAvailable:").unwrap_or(h.memory) as i64;
    let disk_used = crate::images::gc::disk_usage_percent(&c.root).unwrap_or(0);
    let pid_max: u64 = read_trimmed("/proc/sys/kernel/pid_max")
        .parse()
        .unwrap_or(32768);
    let pids = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u64
        })
        .unwrap_or(0);
    let runtime_ok = agent.runtime.version().await.is_ok();
    let cidr_ok = agent.pod_cidr.borrow().is_some();
    let ready = runtime_ok && cidr_ok;
    let ready_message = if !runtime_ok {
        format!(
            "container runtime is down: containerd at {} does not answer",
            c.containerd_socket.display()
        )
    } else if !cidr_ok {
        "container runtime network not ready: waiting for the control plane to assign a pod CIDR"
            .to_string()
    } else {
        "edgesite agent is posting ready status".to_string()
    };
    let mut images: Vec<(String, i64)> = Vec::new();
    if let Ok(list) = agent.runtime.list_images().await {
        for i in list {
            let digest = i
                .target
                .as_ref()
                .map(|t| t.digest.clone())
                .unwrap_or_default();
            let cached = agent
                .image_sizes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&digest)
                .copied();
            let size = match cached {
                Some(s) => s,
                None => {
                    let s = match agent.images.local(&i.name).await {
                        Ok(Some(image)) => image.size,
                        _ => 0,
                    };
                    agent
                        .image_sizes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(digest, s);
                    s
                }
            };
            images.push((i.name, size));
        }
    }
    // Largest first, at most 50, as the kubelet reports them.
    images.sort_by_key(|i| std::cmp::Reverse(i.1));
    let images: Vec<Value> = images
        .into_iter()
        .take(50)
        .map(|(name, size)| json!({"names": [name], "sizeBytes": size}))
        .collect();
    let memory_allocatable = (h.memory as i64 - MEMORY_EVICTION).max(0);
    json!({
        "capacity": {
            "cpu": h.cpus.to_string(),
            "memory": format!("{}Ki", h.memory / 1024),
            "ephemeral-storage": format!("{}Ki", h.storage / 1024),
            "pods": c.max_pods.to_string(),
        },
        "allocatable": {
            "cpu": h.cpus.to_string(),
            "memory": format!("{}Ki", memory_allocatable / 1024),
            "ephemeral-storage": (h.storage / 10 * 9).to_string(),
            "pods": c.max_pods.to_string(),
        },
        "conditions": [
            condition("MemoryPressure", available < MEMORY_EVICTION, "KubeletHasSufficientMemory", "KubeletHasInsufficientMemory",
                if available < MEMORY_EVICTION { "available memory is below 100Mi".into() } else { "kubelet has sufficient memory available".into() }),
            condition("DiskPressure", disk_used >= 90, "KubeletHasNoDiskPressure", "KubeletHasDiskPressure",
                if disk_used >= 90 { format!("the data disk is {disk_used}% full") } else { "kubelet has no disk pressure".into() }),
            condition("PIDPressure", pids * 100 > pid_max * 90, "KubeletHasSufficientPID", "KubeletHasInsufficientPID",
                "kubelet has sufficient PID available".into()),
            json!({
                "type": "Ready",
                "status": if ready { "True" } else { "False" },
                "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
                "message": ready_message,
            }),
        ],
        "addresses": [
            {"type": "InternalIP", "address": node_ip.to_string()},
            {"type": "Hostname", "address": c.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": c.kubelet_port}},
        "nodeInfo": {
            "machineID": read_trimmed("/etc/machine-id"),
            "systemUUID": read_trimmed("/sys/class/dmi/id/product_uuid"),
            "bootID": read_trimmed("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
            "osImage": os_image(),
            "containerRuntimeVersion": format!("containerd://{runtime_version}"),
            "kubeletVersion": c.version,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch(),
        },
        "images": images,
    })
}

/// Creates the Node if it does not exist; otherwise brings the registration labels up to date.
async fn register(agent: &Agent) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let labels = labels(agent);
    let mut annotations: BTreeMap<String, String> =
        agent.config.annotations.iter().cloned().collect();
    // Where local-path volumes go on this node: the server's provisioner reads it.
    if let Some(storage) = &agent.config.local_storage {
        annotations.insert(
            controllers::persistent_volume::STORAGE_PATH.into(),
            storage.display().to_string(),
        );
    }
    if nodes.get_opt(&agent.config.node_name).await?.is_some() {
        nodes
            .patch(
                &agent.config.node_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels, "annotations": annotations}})),
            )
            .await?;
        return Ok(());
    }
    let mut taints = Vec::new();
    for t in &agent.config.taints {
        taints.push(parse_taint(t).map_err(AgentError::Io)?);
    }
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": agent.config.node_name, "labels": labels, "annotations": annotations},
        "spec": if taints.is_empty() { json!({}) } else { json!({"taints": taints}) },
    }))
    .map_err(|e| AgentError::Io(e.to_string()))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {
            tracing::info!(node = %agent.config.node_name, "registered the node");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn renew_lease(agent: &Agent) -> Result<(), AgentError> {
    let leases: Api<Lease> = Api::namespaced(agent.client.clone(), "kube-node-lease");
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": agent.config.node_name},
        "spec": {
            "holderIdentity": agent.config.node_name,
            "leaseDurationSeconds": agent.config.lease_duration.as_secs(),
            "renewTime": now,
        },
    });
    match leases
        .patch(
            &agent.config.node_name,
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let lease: Lease =
                serde_json::from_value(body).map_err(|e| AgentError::Io(e.to_string()))?;
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn post_status(
    agent: &Agent,
    node_ip: IpAddr,
    runtime_version: &str,
    last: &mut Option<Value>,
    last_heartbeat: &mut Instant,
) -> Result<(), AgentError> {
    let mut now_status = status(agent, node_ip, runtime_version).await;
    let changed = last.as_ref() != Some(&now_status);
    if !changed && last_heartbeat.elapsed() < agent.config.status_update_frequency {
        return Ok(());
    }
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let current = nodes.get_opt(&agent.config.node_name).await?;
    let Some(current) = current else {
        // Deleted under us: register again.
        register(agent).await?;
        *last = None;
        return Ok(());
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // Keep a condition's transition time while its status stays the same.
    let previous: BTreeMap<String, (String, String)> = current
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c.type_.clone(),
                        (
                            c.status.clone(),
                            c.last_transition_time
                                .as_ref()
                                .map(|t| t.0.to_string())
                                .unwrap_or_default(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let snapshot = now_status.clone();
    if let Some(conditions) = now_status["conditions"].as_array_mut() {
        for c in conditions {
            let kind = c["type"].as_str().unwrap_or_default().to_string();
            let status = c["status"].as_str().unwrap_or_default().to_string();
            let transition = match previous.get(&kind) {
                Some((s, t)) if *s == status && !t.is_empty() => t.clone(),
                _ => now.clone(),
            };
            c["lastHeartbeatTime"] = json!(now);
            c["lastTransitionTime"] = json!(transition);
        }
    }
    nodes
        .patch_status(
            &agent.config.node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": now_status})),
        )
        .await?;
    *last = Some(snapshot);
    *last_heartbeat = Instant::now();
    Ok(())
}

/// Logs a failed API call; a transport failure marks the API unreachable (quietly: the cache
/// takes over, and metamanager says so once).
fn note(agent: &Agent, result: &Result<(), AgentError>, what: &str) {
    match result {
        Ok(()) => agent.meta.set_online(true),
        Err(AgentError::Api(e)) if !metamanager::answered(e) => {
            agent.meta.set_online(false);
            tracing::debug!("{what}: {e}");
        }
        Err(e) => tracing::warn!("{what}: {e}"),
    }
}

/// Registers the node, then keeps its Lease and status fresh and follows its pod CIDR.
pub async fn run(
    agent: Arc<Agent>,
    cidr_tx: watch::Sender<Option<String>>,
    ip_tx: watch::Sender<Option<IpAddr>>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let node_ip = detect_node_ip(agent.config.node_ip);
    ip_tx.send_replace(Some(node_ip));
    // Jittered: the nodes of a site that come back together do not register in lockstep.
    let mut backoff =
        controllers::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let registered = register(&agent).await;
        note(&agent, &registered, "registering the node failed, retrying");
        match registered {
            Ok(()) => break,
            Err(_) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff.next_wait()) => {}
                }
            }
        }
    }
    // Follow spec.podCIDR.
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let cfg =
        watcher::Config::default().fields(&format!("metadata.name={}", agent.config.node_name));
    let cidr_shutdown = shutdown.clone();
    let cidr_meta = agent.meta.clone();
    let cidr_task = tokio::spawn(async move {
        let mut stream = watcher::watcher(nodes, cfg).boxed();
        loop {
            let event = tokio::select! {
                _ = cidr_shutdown.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                Some(Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n))) => {
                    cidr_meta.put(&n);
                    let cidr = n.spec.and_then(|s| s.pod_cidr);
                    if *cidr_tx.borrow() != cidr {
                        cidr_tx.send_replace(cidr);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!("node watch: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None => return,
            }
        }
    });
    let runtime_version = agent.runtime.version().await.unwrap_or_default();
    let mut last = None;
    let mut last_heartbeat = Instant::now() - agent.config.status_update_frequency;
    let mut pod_cidr = agent.pod_cidr.clone();
    let mut online = agent.meta.watch_online();
    loop {
        // Heartbeats missed while offline are not replayed: the first one after reconnecting
        // (sent at once, see below) carries the current figures.
        let renewed = renew_lease(&agent).await;
        note(&agent, &renewed, "renewing the node lease failed");
        if renewed.is_ok() {
            let posted = post_status(
                &agent,
                node_ip,
                &runtime_version,
                &mut last,
                &mut last_heartbeat,
            )
            .await;
            note(&agent, &posted, "updating the node status failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(LEASE_RENEW) => {}
            _ = pod_cidr.changed() => {}
            _ = online.changed() => {}
        }
    }
    cidr_task.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_parse_like_k3s_flags() {
        assert_eq!(
            parse_taint("dedicated=edge:NoSchedule").unwrap(),
            json!({"key": "dedicated", "value": "edge", "effect": "NoSchedule"})
        );
        assert_eq!(
            parse_taint("gpu:NoExecute").unwrap(),
            json!({"key": "gpu", "effect": "NoExecute"})
        );
        assert!(parse_taint("x=y").is_err());
        assert!(parse_taint("x=y:Sometimes").is_err());
    }
}
