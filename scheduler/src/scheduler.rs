//! The scheduler's event loop: one task owns the cache (nodes with their pods) and the queue,
//! applies pod/node/namespace changes from the shared informers, runs one scheduling cycle at a
//! time and hands bindings to a bounded set of concurrent binder tasks.
//!
//! A chosen node is *assumed* at once (the pod counts against it) so the next cycle sees it,
//! without waiting for the binding to come back through the watch; a failed binding forgets it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use controllers::events::Recorder;
use controllers::informer::{Change, Informers};
use k8s_openapi::api::core::v1::{
    Binding, Namespace, Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::algorithm::Algorithm;
use crate::framework::{NodeInfo, PodInfo, Snapshot, Volumes};
use crate::plugins::volume_binding;
use crate::queue::{Outcome, SchedulingQueue};

pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

#[derive(Clone, Debug)]
pub struct Config {
    /// Pods whose `spec.schedulerName` is this are ours.
    pub name: String,
    /// Bindings in flight at once.
    pub bind_concurrency: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: DEFAULT_SCHEDULER.into(),
            bind_concurrency: 64,
        }
    }
}

/// A wired scheduler, subscribed to the informers; [`Scheduler::run`] it after
/// [`Informers::start`].
pub struct Scheduler {
    config: Config,
    client: kube::Client,
    recorder: Recorder,
    pods: mpsc::Receiver<Change<Pod>>,
    nodes: mpsc::Receiver<Change<Node>>,
    namespaces: mpsc::Receiver<Change<Namespace>>,
    /// Any change to a claim, a volume or a storage class (the contents are read from the
    /// stores when a pod needs them).
    volume_changes: mpsc::Receiver<()>,
    pod_store: Store<Pod>,
    node_store: Store<Node>,
    namespace_store: Store<Namespace>,
    volume_stores: VolumeStores,
    synced: Option<[controllers::informer::SyncSignal; 6]>,
}

#[derive(Clone)]
struct VolumeStores {
    claims: Store<PersistentVolumeClaim>,
    volumes: Store<PersistentVolume>,
    classes: Store<StorageClass>,
}

impl VolumeStores {
    fn snapshot(&self) -> Arc<Volumes> {
        Arc::new(Volumes::new(
            self.claims.state(),
            self.volumes.state(),
            self.classes.state(),
        ))
    }
}

/// How long binding waits for a pod's claims to be bound (a provisioned volume made, or a
/// free one taken) before it gives up and the pod is tried again (upstream waits 600 s).
const VOLUME_BIND_TIMEOUT: Duration = Duration::from_secs(120);

struct BindResult {
    key: String,
    node: String,
    result: Result<(), kube::Error>,
}

/// What the loop owns.
struct State {
    config: Config,
    snapshot: Snapshot,
    node_index: HashMap<String, usize>,
    /// Assigned or assumed pods: key -> node name.
    locations: HashMap<String, String>,
    /// Pods on nodes the scheduler has not seen (yet): node -> pods.
    waiting_for_node: HashMap<String, HashMap<String, PodInfo>>,
    /// Pods bound by us whose binding has not come back through the watch yet.
    assumed: HashSet<String>,
    queue: SchedulingQueue,
    algorithm: Algorithm,
    /// The claims, volumes or classes changed since `snapshot.volumes` was built.
    volumes_stale: bool,
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

impl State {
    fn remove_pod_from_node(&mut self, key: &str) -> bool {
        let Some(node) = self.locations.remove(key) else {
            return false;
        };
        if let Some(&i) = self.node_index.get(&node) {
            self.snapshot.nodes[i].remove_pod(key);
        } else if let Some(pods) = self.waiting_for_node.get_mut(&node) {
            pods.remove(key);
            if pods.is_empty() {
                self.waiting_for_node.remove(&node);
            }
        }
        true
    }

    fn add_pod_to_node(&mut self, node: &str, info: PodInfo) {
        let key = info.key.clone();
        if self.locations.get(&key).is_some_and(|n| n != node) {
            self.remove_pod_from_node(&key);
        }
        self.locations.insert(key, node.to_string());
        match self.node_index.get(node) {
            Some(&i) => self.snapshot.nodes[i].add_pod(info),
            None => {
                self.waiting_for_node
                    .entry(node.to_string())
                    .or_default()
                    .insert(info.key.clone(), info);
            }
        }
    }

    fn apply_pod(&mut self, change: Change<Pod>) {
        let now = Instant::now().into_std();
        match change {
            Change::Applied(pod) => {
                let info = PodInfo::new(pod.clone());
                let key = info.key.clone();
                if let Some(node) = node_name(&pod) {
                    self.queue.delete(&key);
                    self.assumed.remove(&key);
                    if is_terminal(&pod) {
                        // Finished pods no longer use their node.
                        if self.remove_pod_from_node(&key) {
                            self.queue.move_all_unschedulable(now);
                        }
                    } else {
                        self.add_pod_to_node(node, info);
                    }
                } else if self.assumed.contains(&key) {
                    // Our binding is on its way; the watch has not caught up.
                } else if pod.metadata.deletion_timestamp.is_none()
                    && !is_terminal(&pod)
                    && pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.scheduler_name.as_deref())
                        .unwrap_or(DEFAULT_SCHEDULER)
                        == self.config.name
                {
                    self.queue.add_or_update(info, now);
                } else {
                    self.queue.delete(&key);
                }
            }
            Change::Deleted(pod) => {
                let key = PodInfo::new(pod).key;
                self.queue.delete(&key);
                self.assumed.remove(&key);
                if self.remove_pod_from_node(&key) {
                    self.queue.move_all_unschedulable(now);
                }
            }
        }
    }

    fn apply_node(&mut self, change: Change<Node>) {
        let now = Instant::now().into_std();
        match change {
            Change::Applied(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                match self.node_index.get(&name) {
                    Some(&i) => {
                        let info = &mut self.snapshot.nodes[i];
                        let before = (
                            info.allocatable.clone(),
                            info.labels.clone(),
                            info.taints.clone(),
                            info.unschedulable,
                        );
                        info.set_node(node);
                        let after = (
                            info.allocatable.clone(),
                            info.labels.clone(),
                            info.taints.clone(),
                            info.unschedulable,
                        );
                        if before != after {
                            self.queue.move_all_unschedulable(now);
                        }
                    }
                    None => {
                        let mut info = NodeInfo::new(node);
                        for (_, pod) in self.waiting_for_node.remove(&name).unwrap_or_default() {
                            info.add_pod(pod);
                        }
                        self.node_index.insert(name, self.snapshot.nodes.len());
                        self.snapshot.nodes.push(info);
                        self.queue.move_all_unschedulable(now);
                    }
                }
            }
            Change::Deleted(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                if let Some(i) = self.node_index.remove(&name) {
                    let info = self.snapshot.nodes.swap_remove(i);
                    if i < self.snapshot.nodes.len() {
                        let moved = self.snapshot.nodes[i].name.clone();
                        self.node_index.insert(moved, i);
                    }
                    if !info.pods.is_empty() {
                        self.waiting_for_node.insert(name, info.pods);
                    }
                }
            }
        }
    }

    /// A claim, volume or class changed: pods waiting for one may fit now.
    fn volumes_changed(&mut self) {
        self.volumes_stale = true;
        self.queue.move_all_unschedulable(Instant::now().into_std());
    }

    fn apply_namespace(&mut self, change: Change<Namespace>) {
        match change {
            Change::Applied(ns) => {
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                self.snapshot
                    .namespace_labels
                    .insert(ns.metadata.name.clone().unwrap_or_default(), labels);
            }
            Change::Deleted(ns) => {
                self.snapshot
                    .namespace_labels
                    .remove(ns.metadata.name.as_deref().unwrap_or(""));
            }
        }
    }
}

impl Scheduler {
    pub fn new(informers: &Informers, recorder: Recorder, config: Config) -> Self {
        let (pods, nodes, namespaces) =
            (informers.pods(), informers.nodes(), informers.namespaces());
        let (claims, volumes, classes) = (
            informers.persistent_volume_claims(),
            informers.persistent_volumes(),
            informers.storage_classes(),
        );
        let synced = [
            pods.sync_signal(),
            nodes.sync_signal(),
            namespaces.sync_signal(),
            claims.sync_signal(),
            volumes.sync_signal(),
            classes.sync_signal(),
        ];
        // One signal for the three kinds: any change may make a waiting pod schedulable.
        let (volume_tx, volume_changes) = mpsc::channel(1);
        forward_changes(claims.subscribe(256), volume_tx.clone());
        forward_changes(volumes.subscribe(256), volume_tx.clone());
        forward_changes(classes.subscribe(16), volume_tx);
        Scheduler {
            config,
            client: informers.client_as("system:kube-scheduler"),
            recorder,
            pods: pods.subscribe(1024),
            nodes: nodes.subscribe(256),
            namespaces: namespaces.subscribe(64),
            volume_changes,
            pod_store: pods.store(),
            node_store: nodes.store(),
            namespace_store: namespaces.store(),
            volume_stores: VolumeStores {
                claims: claims.store(),
                volumes: volumes.store(),
                classes: classes.store(),
            },
            synced: Some(synced),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = futures::future::join_all(self.synced.take().into_iter().flatten().map(|s| s.wait())) => {}
        }
        let mut state = State {
            config: self.config.clone(),
            snapshot: Snapshot::default(),
            node_index: HashMap::new(),
            locations: HashMap::new(),
            waiting_for_node: HashMap::new(),
            assumed: HashSet::new(),
            queue: SchedulingQueue::default(),
            algorithm: Algorithm::default(),
            volumes_stale: true,
        };
        // Everything the caches hold now; the subscriptions replay it too, which is harmless.
        for ns in self.namespace_store.state() {
            state.apply_namespace(Change::Applied(ns));
        }
        for node in self.node_store.state() {
            state.apply_node(Change::Applied(node));
        }
        for pod in self.pod_store.state() {
            state.apply_pod(Change::Applied(pod));
        }
        let (bind_tx, mut bind_rx) =
            mpsc::channel::<BindResult>(self.config.bind_concurrency.max(1) * 2);
        let binders = Arc::new(Semaphore::new(self.config.bind_concurrency.max(1)));
        let mut leftovers = tokio::time::interval(Duration::from_secs(30));
        tracing::info!(scheduler = %self.config.name, nodes = state.snapshot.nodes.len(), pending = state.queue.len(), "scheduler started");
        loop {
            // Apply every change already waiting (bounded, so scheduling is never starved).
            for _ in 0..4096 {
                let mut progressed = false;
                if let Ok(c) = self.namespaces.try_recv() {
                    state.apply_namespace(c);
                    progressed = true;
                }
                if let Ok(c) = self.nodes.try_recv() {
                    state.apply_node(c);
                    progressed = true;
                }
                if let Ok(c) = self.pods.try_recv() {
                    state.apply_pod(c);
                    progressed = true;
                }
                if let Ok(r) = bind_rx.try_recv() {
                    self.bound(&mut state, r);
                    progressed = true;
                }
                if self.volume_changes.try_recv().is_ok() {
                    state.volumes_changed();
                    progressed = true;
                }
                if !progressed {
                    break;
                }
            }
            let now = Instant::now().into_std();
            if let Some(pod) = state.queue.pop(now) {
                self.schedule_one(&mut state, pod, &binders, &bind_tx).await;
                continue;
            }
            let wake = state
                .queue
                .next_ready()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(c) = self.pods.recv() => state.apply_pod(c),
                Some(c) = self.nodes.recv() => state.apply_node(c),
                Some(c) = self.namespaces.recv() => state.apply_namespace(c),
                Some(r) = bind_rx.recv() => self.bound(&mut state, r),
                Some(()) = self.volume_changes.recv() => state.volumes_changed(),
                _ = tokio::time::sleep_until(wake) => {}
                _ = leftovers.tick() => state.queue.flush_unschedulable_leftovers(Instant::now().into_std()),
            }
        }
    }

    async fn schedule_one(
        &self,
        state: &mut State,
        info: PodInfo,
        binders: &Arc<Semaphore>,
        bind_tx: &mpsc::Sender<BindResult>,
    ) {
        let now = Instant::now().into_std();
        let key = info.key.clone();
        if state.volumes_stale && !volume_binding::pod_claims_empty(&info) {
            state.snapshot.volumes = self.volume_stores.snapshot();
            state.volumes_stale = false;
        }
        match state.algorithm.schedule(&info, &state.snapshot) {
            Ok(i) => {
                let node = state.snapshot.nodes[i].name.clone();
                // The pod's unbound claims, bound (or sent to the provisioner) on this node
                // before the pod is.
                let volume_bindings =
                    volume_binding::bindings_for(&info, &state.snapshot, &state.snapshot.nodes[i]);
                state.assumed.insert(key.clone());
                state.add_pod_to_node(&node, info.clone());
                // Bounded: wait for a binder slot (the loop pauses, the queue does not grow).
                let Ok(permit) = binders.clone().acquire_owned().await else {
                    return;
                };
                let client = self.client.clone();
                let tx = bind_tx.clone();
                let claims = self.volume_stores.claims.clone();
                let binders = binders.clone();
                tokio::spawn(async move {
                    let result = async {
                        write_volume_bindings(&client, &volume_bindings, &node).await?;
                        // The slot is for writes: waiting for the provisioner does not hold
                        // one (many pods may wait for their claims at once).
                        if !volume_bindings.is_empty() {
                            drop(permit);
                            wait_for_claims(&volume_bindings, &claims).await?;
                            let _permit = binders.acquire_owned().await;
                            return bind(&client, &info.pod, &node).await;
                        }
                        let result = bind(&client, &info.pod, &node).await;
                        drop(permit);
                        result
                    }
                    .await;
                    let _ = tx.send(BindResult { key, node, result }).await;
                });
                let _ = now;
            }
            Err(fit) => {
                let message = fit.message();
                tracing::debug!(pod = %key, %message, "pod unschedulable");
                state.queue.done(&key, Outcome::Unschedulable, now);
                self.recorder
                    .warning(&*info.pod, "FailedScheduling", message.clone());
                let client = self.client.clone();
                let pod = info.pod.clone();
                tokio::spawn(async move {
                    if let Err(e) = mark_unschedulable(&client, &pod, &message).await {
                        tracing::debug!(error = %e, "cannot set PodScheduled=False");
                    }
                });
            }
        }
    }

    fn bound(&self, state: &mut State, r: BindResult) {
        let now = Instant::now().into_std();
        match r.result {
            Ok(()) => {
                state.queue.done(&r.key, Outcome::Done, now);
                let (namespace, name) = r.key.split_once('/').unwrap_or(("", &r.key));
                let reference = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    namespace: Some(namespace.into()),
                    name: Some(name.into()),
                    uid: state
                        .snapshot
                        .nodes
                        .get(state.node_index.get(&r.node).copied().unwrap_or(usize::MAX))
                        .and_then(|n| n.pods.get(&r.key))
                        .and_then(|p| p.pod.metadata.uid.clone()),
                    ..Default::default()
                };
                self.recorder.publish_ref(
                    reference,
                    controllers::events::Type::Normal,
                    "Scheduled",
                    format!("Successfully assigned {} to {}", r.key, r.node),
                );
            }
            Err(e) => {
                tracing::debug!(pod = %r.key, node = %r.node, error = %e, "binding failed");
                if state.assumed.remove(&r.key) {
                    state.remove_pod_from_node(&r.key);
                }
                let gone = matches!(&e, kube::Error::Api(s) if s.code == 404);
                state.queue.done(
                    &r.key,
                    if gone { Outcome::Done } else { Outcome::Error },
                    now,
                );
            }
        }
    }
}

/// Passes every change of an informer on as one signal (dropped when one is already waiting).
fn forward_changes<K: Send + Sync + 'static>(
    mut changes: mpsc::Receiver<Change<K>>,
    signal: mpsc::Sender<()>,
) {
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            if let Err(mpsc::error::TrySendError::Closed(())) = signal.try_send(()) {
                return;
            }
        }
    });
}

/// Upstream's VolumeBinding PreBind, its writes: binds each free volume chosen for a claim
/// (its `claimRef`, written only if the volume is unchanged since it was seen) and asks the
/// provisioner for the others (`volume.kubernetes.io/selected-node`).
async fn write_volume_bindings(
    client: &kube::Client,
    bindings: &[volume_binding::Binding],
    node: &str,
) -> Result<(), kube::Error> {
    use controllers::persistent_volume as pv;
    for binding in bindings {
        let claim = binding.claim();
        let namespace = claim.metadata.namespace.as_deref().unwrap_or("default");
        let name = claim.metadata.name.as_deref().unwrap_or("");
        match binding {
            volume_binding::Binding::Volume { volume, .. } => {
                let api: Api<PersistentVolume> = Api::all(client.clone());
                let patch = serde_json::json!({
                    "metadata": {
                        "resourceVersion": volume.metadata.resource_version,
                        "annotations": {pv::BOUND_BY_CONTROLLER: "yes"},
                    },
                    "spec": {"claimRef": {
                        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "namespace": namespace, "name": name, "uid": claim.metadata.uid,
                    }},
                });
                api.patch(
                    volume.metadata.name.as_deref().unwrap_or(""),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            }
            volume_binding::Binding::Provision { .. } => {
                let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
                let patch =
                    serde_json::json!({"metadata": {"annotations": {pv::SELECTED_NODE: node}}});
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
        }
    }
    Ok(())
}

/// PreBind's wait: until every claim is bound (the claim cache shows its volume), at most
/// [`VOLUME_BIND_TIMEOUT`].
async fn wait_for_claims(
    bindings: &[volume_binding::Binding],
    claims: &Store<PersistentVolumeClaim>,
) -> Result<(), kube::Error> {
    use controllers::persistent_volume as pv;
    let started = Instant::now();
    loop {
        let all_bound = bindings.iter().all(|b| {
            let claim = b.claim();
            claims
                .get(&kube::runtime::reflector::ObjectRef::from_obj(claim))
                .is_some_and(|c| pv::volume_name(&c).is_some())
        });
        if all_bound {
            return Ok(());
        }
        if started.elapsed() > VOLUME_BIND_TIMEOUT {
            return Err(kube::Error::Api(
                kube::core::Status::failure(
                    "binding volumes: timed out waiting for the condition",
                    "Timeout",
                )
                .with_code(504)
                .boxed(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bind(client: &kube::Client, pod: &Pod, node: &str) -> Result<(), kube::Error> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.create_subresource::<_, serde_json::Value>(
        "binding",
        name,
        &PostParams::default(),
        &binding,
    )
    .await?;
    Ok(())
}

/// Upstream sets `PodScheduled=False` (reason `Unschedulable`) with the FitError message, which
/// `kubectl describe pod` shows under Conditions.
async fn mark_unschedulable(
    client: &kube::Client,
    pod: &Pod,
    message: &str,
) -> Result<(), kube::Error> {
    let existing = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
    if existing.is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message)) {
        return Ok(());
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
        "lastProbeTime": null,
        "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    }]}});
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}
