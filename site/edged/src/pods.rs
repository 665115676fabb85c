//! The pods bound to this node: one watch (`spec.nodeName=<node>`), one worker per pod, and
//! containerd's task events routed to the worker that owns the container.
//!
//! On start the agent first runs the pods of its local cache (metamanager), so it needs no list
//! from the API: workers adopt what containerd already runs (they find their containers by the
//! pod-uid label) and start again what stopped (a reboot). The watch then writes every pod it
//! delivers through to the cache. Once the API has listed the node's pods, containers whose pod
//! is no longer bound here are removed; nothing is removed while the API is unreachable.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::pod_worker::{self, Desired, LABEL_NODE, LABEL_POD_UID, PodMessage};
use crate::runtime::containerd::RuntimeEvent;
use crate::{Agent, AgentError};

/// Which pod a containerd container belongs to (filled by the workers).
pub type Owners = Arc<Mutex<HashMap<String, String>>>;

struct Handle {
    tx: mpsc::Sender<PodMessage>,
    /// The pod's newest version and removal (the worker takes the latest; nothing queues up).
    desired: watch::Sender<Desired>,
    done: tokio::task::JoinHandle<()>,
}

pub async fn run(agent: Arc<Agent>, shutdown: CancellationToken) -> Result<(), AgentError> {
    let owners: Owners = Arc::default();
    let (event_tx, mut event_rx) = mpsc::channel::<RuntimeEvent>(256);
    let rt = agent.runtime.clone();
    let events_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut backoff =
            controllers::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let started = tokio::time::Instant::now();
            if let Err(e) = rt.subscribe(event_tx.clone()).await {
                tracing::warn!("containerd event stream: {e}");
            }
            // A stream that ran a while was a success: the next break waits from the start.
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            tokio::select! {
                _ = events_shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_wait()) => {}
            }
        }
    });

    let pods: Api<Pod> = Api::all(agent.client.clone());
    let cfg =
        watcher::Config::default().fields(&format!("spec.nodeName={}", agent.config.node_name));
    let mut stream = watcher::watcher(pods, cfg).boxed();
    let mut workers: HashMap<String, Handle> = HashMap::new();
    let mut initial: Option<HashSet<String>> = None;
    let (done_tx, mut done_rx) = mpsc::channel::<String>(64);
    // The cached pods run before the API is asked anything.
    let cached = agent.meta.pods(&agent.config.node_name);
    if !cached.is_empty() {
        tracing::info!(pods = cached.len(), "starting the pods of the node cache");
    }
    for pod in cached {
        dispatch(&agent, &owners, &mut workers, &done_tx, pod, &shutdown);
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(uid) = done_rx.recv() => {
                if let Some(h) = workers.get(&uid)
                    && h.done.is_finished()
                {
                    workers.remove(&uid);
                }
            }
            Some(event) = event_rx.recv() => {
                let (cid, message) = match event {
                    RuntimeEvent::Exit { container_id, exec_id, exit_code } if exec_id.is_empty() => {
                        (container_id.clone(), PodMessage::Exited { container_id, exit_code })
                    }
                    RuntimeEvent::Oom { container_id } => {
                        (container_id.clone(), PodMessage::Oom { container_id })
                    }
                    _ => continue,
                };
                let uid = owners.lock().unwrap_or_else(|e| e.into_inner()).get(&cid).cloned();
                if let Some(h) = uid.and_then(|u| workers.get(&u))
                    && let Err(mpsc::error::TrySendError::Full(_)) = h.tx.try_send(message)
                {
                    // The loop must not wait on one pod; its worker's periodic sync finds the
                    // exit in containerd (and an OOM kill in the container's cgroup).
                    tracing::debug!(container = %cid, "a pod worker's queue is full; its next sync picks the event up");
                }
            }
            event = stream.next() => {
                let Some(event) = event else { break };
                match event {
                    // (Emitted before the list is asked for: says nothing about reachability.)
                    Ok(watcher::Event::Init) => initial = Some(HashSet::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(uid), Some(seen)) = (pod.metadata.uid.clone(), initial.as_mut()) {
                            seen.insert(uid);
                        }
                        agent.meta.put(&pod);
                        dispatch(&agent, &owners, &mut workers, &done_tx, pod, &shutdown);
                    }
                    Ok(watcher::Event::InitDone) => {
                        agent.meta.set_online(true);
                        let seen = initial.take().unwrap_or_default();
                        // Pods deleted while we were not watching (or offline).
                        for (uid, h) in &workers {
                            if !seen.contains(uid) {
                                h.desired.send_modify(|d| d.removed = true);
                            }
                        }
                        for pod in agent.meta.pods(&agent.config.node_name) {
                            let uid = pod.metadata.uid.clone().unwrap_or_default();
                            if !seen.contains(&uid) {
                                agent.meta.forget_pod(
                                    pod.metadata.namespace.as_deref().unwrap_or(""),
                                    pod.metadata.name.as_deref().unwrap_or(""),
                                    &uid,
                                );
                            }
                        }
                        agent.meta.collect_garbage(&agent.config.node_name);
                        let agent = agent.clone();
                        let keep: HashSet<String> = seen;
                        tokio::spawn(async move {
                            if let Err(e) = remove_orphans(&agent, &keep).await {
                                tracing::warn!("removing containers of unknown pods: {e}");
                            }
                        });
                    }
                    Ok(watcher::Event::Apply(pod)) => {
                        agent.meta.set_online(true);
                        agent.meta.put(&pod);
                        dispatch(&agent, &owners, &mut workers, &done_tx, pod, &shutdown);
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        agent.meta.forget_pod(
                            pod.metadata.namespace.as_deref().unwrap_or(""),
                            pod.metadata.name.as_deref().unwrap_or(""),
                            pod.metadata.uid.as_deref().unwrap_or(""),
                        );
                        if let Some(h) = pod.metadata.uid.as_ref().and_then(|u| workers.get(u)) {
                            // The last version carries the grace period a force delete set.
                            h.desired.send_replace(Desired {
                                pod: pod.clone(),
                                removed: true,
                            });
                        }
                    }
                    Err(e) => {
                        tracing::debug!("pod watch: {e}");
                        if let watcher::Error::InitialListFailed(k)
                        | watcher::Error::WatchStartFailed(k)
                        | watcher::Error::WatchFailed(k) = &e
                            && !metamanager::answered(k)
                        {
                            agent.meta.set_online(false);
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
    // Containers keep running; workers end without touching them.
    for (_, h) in workers {
        h.done.abort();
    }
    Ok(())
}

fn dispatch(
    agent: &Arc<Agent>,
    owners: &Owners,
    workers: &mut HashMap<String, Handle>,
    done_tx: &mpsc::Sender<String>,
    pod: Pod,
    shutdown: &CancellationToken,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if let Some(h) = workers.get(&uid)
        && !h.done.is_finished()
    {
        // The worker only needs the newest version.
        h.desired.send_modify(|d| d.pod = pod);
        return;
    }
    let (tx, rx) = mpsc::channel(32);
    let (desired, updates) = watch::channel(Desired {
        pod: pod.clone(),
        removed: false,
    });
    let worker =
        pod_worker::Worker::new(agent.clone(), pod, tx.clone(), rx, updates, owners.clone());
    let done_tx = done_tx.clone();
    let shutdown = shutdown.clone();
    let key = uid.clone();
    let done = tokio::spawn(async move {
        worker.run(shutdown).await;
        let _ = done_tx.send(uid).await;
    });
    workers.insert(key, Handle { tx, desired, done });
}

/// Removes containers (and their snapshots) of pods that are no longer bound to this node.
async fn remove_orphans(agent: &Agent, keep: &HashSet<String>) -> Result<(), AgentError> {
    let rt = &agent.runtime;
    let node = agent.config.node_name.as_str();
    for c in rt.list_containers(&[(LABEL_NODE, node)]).await? {
        let uid = c.labels.get(LABEL_POD_UID).cloned().unwrap_or_default();
        if keep.contains(&uid) {
            continue;
        }
        tracing::info!(container = %c.id, pod_uid = %uid, "removing a container whose pod is gone");
        pod_worker::remove_container(agent, &c.id).await;
    }
    pod_worker::remove_orphan_sandboxes(agent, keep).await;
    Ok(())
}
