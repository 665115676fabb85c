//! Simulated nodes (KWOK-style) for tests and benchmarks, until and beside the real node agent.
//!
//! [`SimNodes`] registers N `Node` objects with capacity and a Ready condition, renews their
//! `Lease`s in `kube-node-lease` like a kubelet, and plays the kubelet's part for pods bound to
//! them: they become Running and Ready with a pod IP; pods owned by a Job (or annotated
//! `sim.edgesite.io/complete-after`) succeed after a while, `sim.edgesite.io/fail-after` makes them
//! fail; pods being deleted are confirmed at once. A node can be told to stop heartbeating.
//!
//! This lives in the test crate only: the product binary can never start it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub const COMPLETE_AFTER: &str = "sim.edgesite.io/complete-after";
pub const FAIL_AFTER: &str = "sim.edgesite.io/fail-after";

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub count: usize,
    /// Node names are `<prefix><index>`.
    pub prefix: String,
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    pub labels: BTreeMap<String, String>,
    /// How often leases are renewed (a kubelet's default is 10 s).
    pub heartbeat: Duration,
    /// How long a Job's pod runs before it succeeds.
    pub job_pod_runtime: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            count: 3,
            prefix: "sim-".into(),
            cpu: "4".into(),
            memory: "8Gi".into(),
            pods: "110".into(),
            labels: BTreeMap::new(),
            heartbeat: Duration::from_secs(10),
            job_pod_runtime: Duration::from_secs(1),
        }
    }
}

struct Shared {
    config: SimConfig,
    names: HashSet<String>,
    silenced: Mutex<HashSet<String>>,
    /// Pods already reported Running (uid), so each is started once.
    started: Mutex<HashSet<String>>,
    next_ip: Mutex<HashMap<String, u32>>,
}

/// Running simulated nodes. Dropping it stops them (the Node objects stay).
pub struct SimNodes {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn node_index(shared: &Shared, name: &str) -> usize {
    name.strip_prefix(&shared.config.prefix)
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

fn node_object(config: &SimConfig, name: &str, index: usize) -> Result<Node> {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ("type".to_string(), "simulated".to_string()),
    ]);
    labels.extend(config.labels.clone());
    let resources = json!({"cpu": config.cpu, "memory": config.memory, "pods": config.pods, "ephemeral-storage": "100Gi"});
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {"node.alpha.kubernetes.io/ttl": "0", controllers::persistent_volume::STORAGE_PATH: "/var/lib/edgesite/storage"}},
        "spec": {"podCIDR": format!("10.{}.{}.0/24", 64 + index / 250, index % 250)},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": format!("172.{}.{}.{}", 16 + index / 62500, (index / 250) % 250, index % 250 + 1)}, {"type": "Hostname", "address": name}],
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.33.0-sim", "kubeProxyVersion": "", "containerRuntimeVersion": "sim://1.0", "kernelVersion": "", "osImage": "simulated", "machineID": "", "systemUUID": "", "bootID": ""},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        }
    }))?)
}

fn conditions(ready: bool) -> serde_json::Value {
    let t = Time(now());
    let pressure = |type_: &str, reason: &str| json!({"type": type_, "status": "False", "reason": reason, "message": "simulated", "lastHeartbeatTime": t, "lastTransitionTime": t});
    json!([
        pressure("MemoryPressure", "KubeletHasSufficientMemory"),
        pressure("DiskPressure", "KubeletHasNoDiskPressure"),
        pressure("PIDPressure", "KubeletHasSufficientPID"),
        {"type": "Ready", "status": if ready {"True"} else {"False"}, "reason": "KubeletReady", "message": "kubelet is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t},
    ])
}

impl SimNodes {
    /// Registers the nodes and starts simulating them on a thread of its own.
    pub fn start(kube_config: kube::Config, config: SimConfig) -> Result<SimNodes> {
        let names: HashSet<String> = (0..config.count)
            .map(|i| format!("{}{i}", config.prefix))
            .collect();
        let shared = Arc::new(Shared {
            config,
            names,
            silenced: Mutex::new(HashSet::new()),
            started: Mutex::new(HashSet::new()),
            next_ip: Mutex::new(HashMap::new()),
        });
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let thread = {
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("simnodes".into())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let client = match kube::Client::try_from(kube_config) {
                            Ok(c) => c,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.into()));
                                return;
                            }
                        };
                        let registered = register(&client, &shared).await;
                        let ok = registered.is_ok();
                        let _ = ready_tx.send(registered);
                        if ok {
                            tokio::join!(
                                heartbeats(client.clone(), shared.clone(), shutdown.clone()),
                                kubelet(client.clone(), shared.clone(), shutdown.clone())
                            );
                        }
                    });
                })?
        };
        ready_rx.recv().context("simulated nodes thread ended")??;
        Ok(SimNodes {
            shared,
            shutdown,
            thread: Some(thread),
        })
    }

    /// Starts `count` default nodes against a site.
    pub fn for_site(site: &crate::Site, count: usize) -> Result<SimNodes> {
        SimNodes::start(
            site.kube_config()?,
            SimConfig {
                count,
                ..SimConfig::default()
            },
        )
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.names.iter().cloned().collect();
        v.sort();
        v
    }

    /// The node stops renewing its lease and posting status, as if it lost power.
    pub fn silence(&self, node: &str) {
        self.shared
            .silenced
            .lock()
            .expect("lock")
            .insert(node.to_string());
    }

    pub fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SimNodes {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn register(client: &kube::Client, shared: &Arc<Shared>) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let limit = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for name in shared.names.clone() {
        let (nodes, leases, shared, limit) =
            (nodes.clone(), leases.clone(), shared.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await?;
            let node = node_object(&shared.config, &name, node_index(&shared, &name))?;
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("register node {name}"))),
            }
            let status = json!({"status": {"conditions": conditions(true), "capacity": node.status.as_ref().and_then(|s| s.capacity.clone()), "allocatable": node.status.as_ref().and_then(|s| s.allocatable.clone())}});
            nodes.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&status)).await.with_context(|| format!("post status of node {name}"))?;
            renew(&leases, &name, shared.config.heartbeat).await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn renew(leases: &Api<Lease>, name: &str, heartbeat: Duration) -> Result<()> {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": (heartbeat.as_secs() * 4).max(40), "renewTime": MicroTime(now())}
    });
    leases
        .patch(
            name,
            &PatchParams::apply("simnodes").force(),
            &Patch::Apply(&lease),
        )
        .await
        .with_context(|| format!("renew lease of node {name}"))?;
    Ok(())
}

async fn heartbeats(client: kube::Client, shared: Arc<Shared>, shutdown: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let silenced = shared.silenced.lock().expect("lock").clone();
        let names: Vec<String> = shared
            .names
            .iter()
            .filter(|n| !silenced.contains(*n))
            .cloned()
            .collect();
        let renewals = futures::stream::iter(names)
            .map(|name| {
                let leases = leases.clone();
                let heartbeat = shared.config.heartbeat;
                async move { renew(&leases, &name, heartbeat).await }
            })
            .buffer_unordered(16);
        tokio::pin!(renewals);
        while let Some(r) = renewals.next().await {
            if let Err(e) = r {
                eprintln!("simnodes: {e:#}");
            }
        }
    }
}

fn duration_annotation(pod: &Pod, key: &str) -> Option<Duration> {
    let text = pod.metadata.annotations.as_ref()?.get(key)?;
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => Duration::from_secs(n),
    })
}

fn owned_by_job(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job")
}

async fn kubelet(client: kube::Client, shared: Arc<Shared>, shutdown: CancellationToken) {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let limit = Arc::new(Semaphore::new(32));
    loop {
        let pod = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = events.next() => match p {
                None => return,
                Some(Ok(p)) => p,
                Some(Err(_)) => continue,
            },
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if !shared.names.contains(&node) || shared.silenced.lock().expect("lock").contains(&node) {
            continue;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        if pod.metadata.deletion_timestamp.is_some() {
            // The containers are "stopped": confirm the deletion like a kubelet does.
            let limit = limit.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
            });
            continue;
        }
        if phase == "Succeeded"
            || phase == "Failed"
            || !shared.started.lock().expect("lock").insert(uid.clone())
        {
            continue;
        }
        let ip = {
            let mut ips = shared.next_ip.lock().expect("lock");
            let n = ips.entry(node.clone()).or_insert(1);
            *n += 1;
            let index = node_index(&shared, &node);
            format!("10.{}.{}.{}", 64 + index / 250, index % 250, *n % 250 + 2)
        };
        let finish = duration_annotation(&pod, FAIL_AFTER)
            .map(|d| (d, false))
            .or_else(|| duration_annotation(&pod, COMPLETE_AFTER).map(|d| (d, true)))
            .or_else(|| owned_by_job(&pod).then_some((shared.config.job_pod_runtime, true)));
        let limit = limit.clone();
        let host_ip = node_ip(&shared, &node);
        tokio::spawn(async move {
            let running = {
                let _permit = limit.acquire().await;
                let status = pod_status(&pod, &ip, &host_ip, None);
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
            };
            if let Err(e) = running {
                eprintln!("simnodes: start pod {namespace}/{name}: {e}");
                return;
            }
            if let Some((after, success)) = finish {
                tokio::time::sleep(after).await;
                let _permit = limit.acquire().await;
                let status = pod_status(&pod, &ip, &host_ip, Some(success));
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await;
            }
        });
    }
}

fn node_ip(shared: &Shared, node: &str) -> String {
    let index = node_index(shared, node);
    format!(
        "172.{}.{}.{}",
        16 + index / 62500,
        (index / 250) % 250,
        index % 250 + 1
    )
}

/// The status a kubelet would post: running and ready, or finished.
fn pod_status(pod: &Pod, ip: &str, host_ip: &str, finished: Option<bool>) -> serde_json::Value {
    let t = Time(now());
    let containers: Vec<serde_json::Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let state = match finished {
                None => json!({"running": {"startedAt": t}}),
                Some(ok) => json!({"terminated": {"exitCode": if ok {0} else {1}, "reason": if ok {"Completed"} else {"Error"}, "startedAt": t, "finishedAt": t}}),
            };
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": format!("sim://{}", c.image.clone().unwrap_or_default()),
                "containerID": format!("sim://{}", c.name), "ready": finished.is_none(), "started": finished.is_none(),
                "restartCount": 0, "state": state,
            })
        })
        .collect();
    let ready = if finished.is_none() { "True" } else { "False" };
    let phase = match finished {
        None => "Running",
        Some(true) => "Succeeded",
        Some(false) => "Failed",
    };
    json!({"status": {
        "phase": phase,
        "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).unwrap_or(t.clone()),
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": t},
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
            {"type": "Ready", "status": ready, "lastTransitionTime": t},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
        ],
        "containerStatuses": containers,
    }})
}
