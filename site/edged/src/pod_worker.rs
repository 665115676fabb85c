//! One pod's life on this node: sandbox (network namespace + CNI), volumes, init containers in
//! order, app containers with their restart policy and CrashLoopBackOff, graceful termination,
//! clean-up, and the status the API shows.
//!
//! A [`Worker`] owns its pod: it is a loop that reacts to messages (a new pod version, a
//! container exit, an OOM kill, the pod's removal) and to its own timers (back-off expiry), and
//! after each of them runs [`Worker::sync`], which compares what the pod wants with what runs
//! and takes the next steps. The status is patched only when it changed.
//!
//! Each container's state is a small state machine ([`State`]): Waiting (ContainerCreating,
//! ErrImagePull/ImagePullBackOff, CrashLoopBackOff, CreateContainerConfigError, ...) ->
//! Running -> Terminated (Completed, Error, OOMKilled), then Waiting again when the restart
//! policy restarts it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::images::{PullPolicy, registry::Credential};
use crate::logs::{self, Copier};
use crate::network::{cni, netns};
use crate::pod_plan::{self, Observed, Phase, Role};
use crate::pods::Owners;
use crate::spec::{self, BindMount, SpecInput};
use crate::volumes;
use crate::{Agent, AgentError};

pub const LABEL_POD_UID: &str = "io.edgesite.pod.uid";
pub const LABEL_POD_NAME: &str = "io.edgesite.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.edgesite.pod.namespace";
pub const LABEL_CONTAINER: &str = "io.edgesite.container.name";
pub const LABEL_ATTEMPT: &str = "io.edgesite.container.attempt";
pub const LABEL_NODE: &str = "io.edgesite.node";
const LABEL_STARTED: &str = "io.edgesite.started-at";
const LABEL_EPHEMERAL: &str = "io.edgesite.container.ephemeral";

/// An ephemeral container as the container it runs (the same fields but its target), with
/// its target's name.
fn ephemeral_as_container(
    e: &k8s_openapi::api::core::v1::EphemeralContainer,
) -> (Container, Option<String>) {
    let mut value = serde_json::to_value(e).unwrap_or_default();
    if let Some(m) = value.as_object_mut() {
        m.remove("targetContainerName");
    }
    let container = serde_json::from_value(value).unwrap_or_else(|_| Container {
        name: e.name.clone(),
        image: e.image.clone(),
        ..Default::default()
    });
    (
        container,
        e.target_container_name.clone().filter(|t| !t.is_empty()),
    )
}

const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long without failing starts its back-off over.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// Periodic resync, as the kubelet's (status refresh, missed events).
const RESYNC: Duration = Duration::from_secs(10);

/// What the API says of the pod, newest only: its latest version, and whether it is gone
/// (force-deleted, or deleted while the agent was away). A worker reads it through a `watch`
/// channel, so updates never queue up and a removal is never lost.
#[derive(Clone)]
pub struct Desired {
    pub pod: Pod,
    pub removed: bool,
}

/// What else a worker is told.
pub enum PodMessage {
    Exited {
        container_id: String,
        exit_code: u32,
    },
    Oom {
        container_id: String,
    },
    /// A probe result (see `probes.rs`).
    Probe(crate::probes::Outcome),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: String,
    pub finished_at: String,
    pub container_id: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated(Terminated),
}

/// One container of the pod, across its restarts.
struct Record {
    /// The current (or last) containerd container.
    id: Option<String>,
    /// The containerd container before it (kept for `lastState` and `logs --previous`).
    previous_id: Option<String>,
    /// How many times it was started; restartCount is this minus one.
    starts: u32,
    state: State,
    last: Option<Terminated>,
    image_id: String,
    backoff: Duration,
    /// The back-off being waited now (for the CrashLoopBackOff message).
    wait: Duration,
    /// Not before this instant may it start again.
    not_before: Option<Instant>,
    running_since: Option<Instant>,
    /// Whether the current state came from a pull failure (ErrImagePull -> ImagePullBackOff).
    pull_failed: bool,
    /// Readiness (true when the container has no readiness probe).
    ready: bool,
    /// Startup probe passed (true when it has none).
    started: bool,
    probers: Vec<tokio::task::JoinHandle<()>>,
}

impl Record {
    fn new() -> Self {
        Record {
            id: None,
            previous_id: None,
            starts: 0,
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            image_id: String::new(),
            backoff: Duration::ZERO,
            wait: Duration::ZERO,
            not_before: None,
            running_since: None,
            pull_failed: false,
            ready: false,
            started: false,
            probers: Vec::new(),
        }
    }
    fn restart_count(&self) -> u32 {
        self.starts.saturating_sub(1)
    }
}

struct Sandbox {
    netns: Option<PathBuf>,
    ip: Option<IpAddr>,
    ports: Vec<cni::PortMapping>,
    subnet: String,
}

pub struct Worker {
    agent: Arc<Agent>,
    pod: Pod,
    uid: String,
    namespace: String,
    name: String,
    rx: mpsc::Receiver<PodMessage>,
    /// The pod's newest version from the API (coalesced: a burst of updates is one).
    updates: watch::Receiver<Desired>,
    /// For the probers this worker starts.
    tx: mpsc::Sender<PodMessage>,
    owners: Owners,
    records: HashMap<String, Record>,
    sandbox: Option<Sandbox>,
    sandbox_error: Option<String>,
    sandbox_backoff: Duration,
    sandbox_not_before: Option<Instant>,
    copiers: HashMap<String, Copier>,
    ooms: HashSet<String>,
    start_time: Option<String>,
    transitions: HashMap<String, (String, String)>,
    last_status: Option<Value>,
    removed: bool,
    adopted: bool,
    volumes_refreshed: Option<Instant>,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn short(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m0s", s / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl Worker {
    pub fn new(
        agent: Arc<Agent>,
        pod: Pod,
        tx: mpsc::Sender<PodMessage>,
        rx: mpsc::Receiver<PodMessage>,
        updates: watch::Receiver<Desired>,
        owners: Owners,
    ) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string());
        Worker {
            agent,
            pod,
            uid,
            namespace,
            name,
            rx,
            updates,
            tx,
            owners,
            records: HashMap::new(),
            sandbox: None,
            sandbox_error: None,
            sandbox_backoff: Duration::ZERO,
            sandbox_not_before: None,
            copiers: HashMap::new(),
            ooms: HashSet::new(),
            start_time,
            transitions: HashMap::new(),
            last_status: None,
            removed: false,
            adopted: false,
            volumes_refreshed: None,
        }
    }

    fn spec(&self) -> k8s_openapi::api::core::v1::PodSpec {
        self.pod.spec.clone().unwrap_or_default()
    }

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    fn pod_dir(&self) -> PathBuf {
        self.agent.config.pods_dir().join(&self.uid)
    }

    fn log_dir(&self) -> PathBuf {
        logs::pod_dir(
            &self.agent.config.logs_dir(),
            &self.namespace,
            &self.name,
            &self.uid,
        )
    }

    fn netns_path(&self) -> PathBuf {
        self.agent.config.netns_dir().join(&self.uid)
    }

    /// Who the pod's CNI attachment is for.
    fn attachment<'a>(
        &'a self,
        netns: &'a std::path::Path,
        ports: &'a [cni::PortMapping],
    ) -> cni::Attachment<'a> {
        cni::Attachment {
            id: &self.uid,
            namespace: &self.namespace,
            name: &self.name,
            netns,
            ports,
        }
    }

    fn terminating(&self) -> bool {
        self.removed || self.pod.metadata.deletion_timestamp.is_some()
    }

    /// Runs until the pod is gone (or the agent stops, which leaves containers running).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut wake: Option<Instant> = None;
        loop {
            if !self.adopted {
                self.adopt().await;
                self.adopted = true;
            }
            if self.terminating() {
                self.terminate(&shutdown).await;
                return;
            }
            let next = self.sync().await;
            self.report().await;
            wake = match (next, wake) {
                (Some(n), _) => Some(n),
                _ => None,
            };
            let deadline = wake
                .map(|w| w.min(Instant::now() + RESYNC))
                .unwrap_or_else(|| Instant::now() + RESYNC);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    for (_, c) in self.copiers.drain() {
                        c.finish().await;
                    }
                    return;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
                message = self.rx.recv() => match message {
                    None => return,
                    Some(m) => self.handle(m).await,
                },
                changed = self.updates.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.apply_update();
                }
            }
            // Take everything already queued before syncing again.
            self.take_update();
            while let Ok(m) = self.rx.try_recv() {
                self.handle(m).await;
            }
        }
    }

    /// Applies the pod's newest version and its removal, if they changed.
    fn take_update(&mut self) {
        if self.updates.has_changed().unwrap_or(false) {
            self.apply_update();
        }
    }

    /// Applies the pod's newest version and its removal (`changed()` already marked them seen).
    fn apply_update(&mut self) {
        let Desired { pod, removed } = self.updates.borrow_and_update().clone();
        self.removed |= removed;
        if pod.metadata.uid.as_deref() == Some(self.uid.as_str()) {
            // Someone else changed what we reported (the node controller marks pods of a
            // silent node not ready): report again.
            if let (Some(ours), Some(theirs)) = (&self.last_status, &pod.status)
                && drifted(ours, &serde_json::to_value(theirs).unwrap_or_default())
            {
                self.last_status = None;
            }
            self.pod = pod;
        }
    }

    async fn handle(&mut self, message: PodMessage) {
        match message {
            PodMessage::Oom { container_id } => {
                self.ooms.insert(container_id);
            }
            PodMessage::Exited { container_id, .. } => {
                if let Some(name) = self.container_of(&container_id) {
                    self.collect_exit(&name).await;
                }
            }
            PodMessage::Probe(outcome) => self.probe_outcome(outcome),
        }
    }

    fn container_spec(&self, name: &str) -> Option<Container> {
        let spec = self.pod.spec.as_ref()?;
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .cloned()
            .or_else(|| {
                self.ephemeral_containers()
                    .into_iter()
                    .find(|(c, _)| c.name == name)
                    .map(|(c, _)| c)
            })
    }

    /// The pod's ephemeral containers (`kubectl debug`), with their targets.
    fn ephemeral_containers(&self) -> Vec<(Container, Option<String>)> {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.as_ref())
            .into_iter()
            .flatten()
            .map(ephemeral_as_container)
            .collect()
    }

    /// Starts the probers of a running container and sets its initial readiness.
    fn start_probes(&mut self, name: &str, id: &str) {
        let Some(c) = self.container_spec(name) else {
            return;
        };
        let ip = self.sandbox.as_ref().and_then(|s| s.ip);
        let handles = crate::probes::start(&self.agent, id, &c, ip, &self.tx);
        if let Some(r) = self.records.get_mut(name) {
            r.ready = c.readiness_probe.is_none();
            r.started = c.startup_probe.is_none();
            for h in r.probers.drain(..) {
                h.abort();
            }
            r.probers = handles;
        }
    }

    /// Acts on a probe: readiness sets `ready`; a failed liveness or startup probe restarts
    /// the container (its exit then goes through the restart policy and back-off).
    fn probe_outcome(&mut self, o: crate::probes::Outcome) {
        use crate::probes::Kind;
        let Some(name) = self.container_of(&o.container_id) else {
            return;
        };
        let running = matches!(
            self.records.get(&name).map(|r| &r.state),
            Some(State::Running { .. })
        );
        if !running {
            return;
        }
        if let Some(m) = &o.message {
            self.agent.recorder.warning(
                &self.pod,
                "Unhealthy",
                format!("{} probe failed: {m}", o.kind.name()),
            );
        }
        let record = self.records.get_mut(&name).expect("found above");
        match (o.kind, o.success) {
            (Kind::Readiness, ready) => record.ready = ready,
            (Kind::Startup, true) => record.started = true,
            (Kind::Liveness, true) => {}
            (kind @ (Kind::Liveness | Kind::Startup), false) => {
                if record.probers.is_empty() {
                    // Already being restarted.
                    return;
                }
                let what = if kind == Kind::Liveness {
                    "liveness"
                } else {
                    "startup"
                };
                for h in record.probers.drain(..) {
                    h.abort();
                }
                record.ready = false;
                self.agent.recorder.normal(
                    &self.pod,
                    "Killing",
                    format!("Container {name} failed {what} probe, will be restarted"),
                );
                let grace = self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .max(0) as u64;
                let agent = self.agent.clone();
                let id = o.container_id.clone();
                let container = self.container_spec(&name);
                let ip = self.sandbox.as_ref().and_then(|s| s.ip);
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(grace);
                    stop_container(&agent, &id, container.as_ref(), ip, deadline).await;
                });
            }
        }
    }

    fn container_of(&self, id: &str) -> Option<String> {
        self.records
            .iter()
            .find(|(_, r)| r.id.as_deref() == Some(id))
            .map(|(n, _)| n.clone())
    }

    /// Picks up the containers of this pod that containerd already runs (after an agent
    /// restart): running ones are kept, not restarted.
    async fn adopt(&mut self) {
        let rt = &self.agent.runtime;
        let Ok(mut found) = rt.list_containers(&[(LABEL_POD_UID, &self.uid)]).await else {
            return;
        };
        let mut adopted_running: Vec<(String, String)> = Vec::new();
        found.sort_by_key(|c| {
            c.labels
                .get(LABEL_ATTEMPT)
                .and_then(|a| a.parse::<u32>().ok())
                .unwrap_or(0)
        });
        for c in found {
            let Some(name) = c.labels.get(LABEL_CONTAINER).cloned() else {
                continue;
            };
            let attempt: u32 = c
                .labels
                .get(LABEL_ATTEMPT)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            self.owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(c.id.clone(), self.uid.clone());
            let started_at = c.labels.get(LABEL_STARTED).cloned().unwrap_or_default();
            let record = self.records.entry(name.clone()).or_insert_with(Record::new);
            if let Some(old) = record.id.replace(c.id.clone()) {
                record.previous_id = Some(old);
            }
            record.starts = attempt + 1;
            record.image_id = c.image.clone();
            match rt.task_state(&c.id).await {
                Ok(Some(crate::runtime::containerd::TaskState::Running { .. })) => {
                    record.state = State::Running { started_at };
                    record.running_since = Some(Instant::now());
                    adopted_running.push((name.clone(), c.id.clone()));
                    let (out, err) = match logs::make_fifos(&self.pod_dir().join("fifo"), &c.id) {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    let file = logs::container_file(&self.log_dir(), &name, attempt);
                    let spec = self.container_spec(&name);
                    let fifo_dir = self.pod_dir().join("fifo");
                    let stdin = crate::streaming::attach::stdin_fifo(&fifo_dir, &c.id);
                    let tap = crate::streaming::attach::register(
                        &self.agent,
                        &c.id,
                        stdin.exists().then_some(stdin.as_path()),
                        spec.as_ref().and_then(|s| s.stdin_once).unwrap_or(false),
                        spec.as_ref().and_then(|s| s.tty).unwrap_or(false),
                    );
                    if let Ok(copier) =
                        Copier::start(&out, &err, file, self.agent.config.log_rotation, Some(tap))
                    {
                        self.copiers.insert(c.id.clone(), copier);
                    }
                }
                _ => {
                    record.state = State::Terminated(Terminated {
                        exit_code: c
                            .labels
                            .get("io.edgesite.exit-code")
                            .and_then(|e| e.parse().ok())
                            .unwrap_or(255),
                        reason: c
                            .labels
                            .get("io.edgesite.reason")
                            .cloned()
                            .unwrap_or_else(|| "Error".into()),
                        message: None,
                        started_at,
                        finished_at: c
                            .labels
                            .get("io.edgesite.finished-at")
                            .cloned()
                            .unwrap_or_default(),
                        container_id: c.id.clone(),
                    });
                }
            }
        }
        // A sandbox that exists already is reused.
        if !self.records.is_empty() {
            let netns = (!self.host_network()).then(|| self.netns_path());
            if netns.as_ref().is_none_or(|p| netns::is_namespace(p)) {
                let ip = self
                    .pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse().ok());
                let subnet = self.agent.pod_cidr.borrow().clone().unwrap_or_default();
                self.sandbox = Some(Sandbox {
                    netns,
                    ip,
                    ports: self.port_mappings(),
                    subnet,
                });
            }
        }
        for (name, id) in adopted_running {
            self.start_probes(&name, &id);
        }
    }

    fn port_mappings(&self) -> Vec<cni::PortMapping> {
        let spec = self.spec();
        spec.containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let host_port = p.host_port.filter(|h| *h > 0)?;
                Some(cni::PortMapping {
                    host_port: host_port as u16,
                    container_port: p.container_port as u16,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    host_ip: p.host_ip.clone().filter(|h| !h.is_empty()),
                })
            })
            .collect()
    }

    /// One reconciliation step; returns when it wants to run again (a back-off ending).
    async fn sync(&mut self) -> Option<Instant> {
        if self.start_time.is_none() {
            self.start_time = Some(now_rfc3339());
        }
        // Exits we may have missed (events are best effort).
        let running: Vec<String> = self
            .records
            .iter()
            .filter(|(_, r)| matches!(r.state, State::Running { .. }))
            .map(|(n, _)| n.clone())
            .collect();
        for name in running {
            let id = self.records[&name].id.clone().unwrap_or_default();
            if let Ok(Some(crate::runtime::containerd::TaskState::Stopped { .. }) | None) =
                self.agent.runtime.task_state(&id).await
            {
                self.collect_exit(&name).await;
            }
        }
        if self.pod_finished() {
            return None;
        }
        if self.sandbox.is_none() {
            if let Some(t) = self.sandbox_not_before
                && Instant::now() < t
            {
                return Some(t);
            }
            let started = Instant::now();
            match self.create_sandbox().await {
                Ok(s) => {
                    tracing::debug!(pod = %self.name, elapsed = ?started.elapsed(), "sandbox ready");
                    self.sandbox = Some(s);
                    self.sandbox_error = None;
                    self.sandbox_backoff = Duration::ZERO;
                }
                Err(e) => {
                    let message = format!("Failed to create pod sandbox: {e}");
                    if self.sandbox_error.as_deref() != Some(message.as_str()) {
                        self.agent.recorder.warning(
                            &self.pod,
                            "FailedCreatePodSandBox",
                            message.clone(),
                        );
                    }
                    self.sandbox_error = Some(message);
                    self.sandbox_backoff = (self.sandbox_backoff * 2)
                        .clamp(Duration::from_secs(1), Duration::from_secs(30));
                    let t = Instant::now() + self.sandbox_backoff;
                    self.sandbox_not_before = Some(t);
                    return Some(t);
                }
            }
        }
        // Content volumes are re-read on the periodic resync, not on every message (each
        // status patch comes back as an update).
        if self.volumes_refreshed.is_none_or(|t| t.elapsed() >= RESYNC) {
            if let Err(e) = volumes::refresh(&self.agent, &self.pod, &self.pod_dir()).await {
                tracing::debug!(pod = %self.name, "volume refresh: {e}");
            }
            self.volumes_refreshed = Some(Instant::now());
        }
        // What to start is decided by the planner (pod_plan.rs); each start waits out its
        // container's back-off.
        let spec = self.spec();
        let ephemeral: Vec<String> = self
            .ephemeral_containers()
            .into_iter()
            .map(|(c, _)| c.name)
            .collect();
        let plan = pod_plan::starts(&spec, &ephemeral, |name| self.observed(name));
        let mut next: Option<Instant> = None;
        for (name, role) in plan {
            let Some(c) = self.container_spec(&name) else {
                continue;
            };
            if let Some(t) = self.start_if_due(&c, role).await {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// What the planner needs to know of a container.
    fn observed(&self, name: &str) -> Observed {
        match self.records.get(name) {
            None => Observed::Absent,
            Some(r) => match &r.state {
                State::Waiting { .. } => Observed::Waiting {
                    ran: r.last.is_some(),
                    starts: r.starts,
                },
                State::Running { .. } => Observed::Running,
                State::Terminated(t) => Observed::Exited { code: t.exit_code },
            },
        }
    }

    /// Whether a pod that never restarts has finished (Succeeded or Failed).
    fn pod_finished(&self) -> bool {
        self.phase().finished()
    }

    /// Starts the container now, or says when its back-off ends.
    async fn start_if_due(&mut self, c: &Container, role: Role) -> Option<Instant> {
        let record = self
            .records
            .entry(c.name.clone())
            .or_insert_with(Record::new);
        if let Some(t) = record.not_before
            && Instant::now() < t
        {
            // Show why it waits.
            if let State::Terminated(last) = record.state.clone() {
                record.last = Some(last);
                record.state = State::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!(
                        "back-off {} restarting failed container={} pod={}_{}({})",
                        short(record.wait),
                        c.name,
                        self.name,
                        self.namespace,
                        self.uid
                    )),
                };
                self.agent.recorder.warning(
                    &self.pod,
                    "BackOff",
                    "Back-off restarting failed container",
                );
            } else if record.pull_failed
                && let State::Waiting { reason, .. } = &record.state
                && reason == "ErrImagePull"
            {
                record.state = State::Waiting {
                    reason: "ImagePullBackOff".into(),
                    message: Some(format!(
                        "Back-off pulling image \"{}\"",
                        c.image.clone().unwrap_or_default()
                    )),
                };
                self.agent.recorder.normal(
                    &self.pod,
                    "BackOff",
                    format!(
                        "Back-off pulling image \"{}\"",
                        c.image.clone().unwrap_or_default()
                    ),
                );
            }
            return Some(t);
        }
        if let State::Terminated(t) = record.state.clone() {
            record.last = Some(t);
            record.state = State::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            };
        }
        let started = Instant::now();
        let result = self.start_container(c, role).await;
        tracing::debug!(pod = %self.name, container = %c.name, elapsed = ?started.elapsed(), ok = result.is_ok(), "container start");
        match result {
            Ok(()) => None,
            Err(()) => self.records.get(&c.name).and_then(|r| r.not_before),
        }
    }

    /// Waits the current back-off before the next start, then doubles it (10 s .. 5 min).
    fn bump_backoff(record: &mut Record) {
        if record.backoff.is_zero() {
            record.backoff = BACKOFF_START;
        }
        record.wait = record.backoff;
        record.not_before = Some(Instant::now() + record.backoff);
        record.backoff = (record.backoff * 2).min(BACKOFF_MAX);
    }

    fn fail(&mut self, c: &Container, reason: &str, message: String) {
        let record = self
            .records
            .entry(c.name.clone())
            .or_insert_with(Record::new);
        record.state = State::Waiting {
            reason: reason.into(),
            message: Some(message.clone()),
        };
        Self::bump_backoff(record);
        tracing::info!(pod = %self.name, container = %c.name, reason, "{message}");
        self.agent.recorder.warning(&self.pod, "Failed", message);
    }

    async fn create_sandbox(&mut self) -> Result<Sandbox, AgentError> {
        let dir = self.pod_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Io(format!("create {}: {e}", dir.display())))?;
        let ports = self.port_mappings();
        if self.host_network() {
            let ip = *self.agent.host_ip.borrow();
            volumes::write_etc_files(&self.agent, &self.pod, &dir, ip)?;
            return Ok(Sandbox {
                netns: None,
                ip,
                ports,
                subnet: String::new(),
            });
        }
        let subnet = self.agent.pod_cidr.borrow().clone().ok_or_else(|| {
            AgentError::Io("the node has no pod CIDR yet (the control plane assigns one)".into())
        })?;
        let path = self.netns_path();
        if !self.records.is_empty() {
            // The pod ran here before and its namespace is gone (the machine rebooted): release
            // the old attachment (its address lease) first.
            let _ = netns::remove(&path);
            let _ = self
                .agent
                .cni
                .del(&self.attachment(&path, &ports), &subnet)
                .await;
        }
        netns::create(&path).map_err(|e| AgentError::Io(e.to_string()))?;
        let attachment = self.attachment(&path, &ports);
        let ip = match self.agent.cni.add(&attachment, &subnet).await {
            Ok(ip) => ip,
            Err(e) => {
                let _ = self.agent.cni.del(&attachment, &subnet).await;
                let _ = netns::remove(&path);
                return Err(e.into());
            }
        };
        volumes::write_etc_files(&self.agent, &self.pod, &dir, Some(ip))?;
        Ok(Sandbox {
            netns: Some(path),
            ip: Some(ip),
            ports,
            subnet,
        })
    }

    async fn pull_credentials(&self) -> Vec<Credential> {
        let mut out = Vec::new();
        for r in self.spec().image_pull_secrets.iter().flatten() {
            let Ok(Some(s)) = self
                .agent
                .meta
                .get::<k8s_openapi::api::core::v1::Secret>(&self.namespace, &r.name)
                .await
            else {
                continue;
            };
            let data = s.data.unwrap_or_default();
            if let Some(b) = data.get(".dockerconfigjson") {
                out.extend(crate::images::registry::credentials_from_docker_config(
                    &b.0, false,
                ));
            } else if let Some(b) = data.get(".dockercfg") {
                out.extend(crate::images::registry::credentials_from_docker_config(
                    &b.0, true,
                ));
            }
        }
        out
    }

    async fn pull(&mut self, c: &Container) -> Result<crate::images::Image, ()> {
        let image = c.image.clone().unwrap_or_default();
        let policy = PullPolicy::of(c.image_pull_policy.as_deref(), &image);
        if policy != PullPolicy::Always
            && let Ok(name) = crate::images::normalize(&image)
            && let Ok(Some(found)) = self.agent.images.local(&name).await
        {
            self.agent.recorder.normal(
                &self.pod,
                "Pulled",
                format!("Container image \"{image}\" already present on machine"),
            );
            return Ok(found);
        }
        if policy == PullPolicy::Never {
            let message =
                format!("Container image \"{image}\" is not present with pull policy of Never");
            let record = self
                .records
                .entry(c.name.clone())
                .or_insert_with(Record::new);
            record.state = State::Waiting {
                reason: "ErrImageNeverPull".into(),
                message: Some(message.clone()),
            };
            Self::bump_backoff(record);
            self.agent
                .recorder
                .warning(&self.pod, "ErrImageNeverPull", message);
            return Err(());
        }
        // One pull per image name at a time.
        let lock = {
            let mut pulls = self.agent.pulls.lock().await;
            pulls.entry(image.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        self.agent
            .recorder
            .normal(&self.pod, "Pulling", format!("Pulling image \"{image}\""));
        let started = Instant::now();
        let credentials = self.pull_credentials().await;
        match self
            .agent
            .images
            .ensure(&image, PullPolicy::Always, &credentials)
            .await
        {
            Ok((found, _)) => {
                self.agent.recorder.normal(
                    &self.pod,
                    "Pulled",
                    format!(
                        "Successfully pulled image \"{image}\" in {:.3}s. Image size: {} bytes.",
                        started.elapsed().as_secs_f64(),
                        found.size
                    ),
                );
                if let Some(r) = self.records.get_mut(&c.name) {
                    r.pull_failed = false;
                }
                Ok(found)
            }
            Err(e) => {
                let message = e.to_string();
                self.agent.recorder.warning(
                    &self.pod,
                    "Failed",
                    format!("Failed to pull image \"{image}\": {message}"),
                );
                self.agent
                    .recorder
                    .warning(&self.pod, "Failed", "Error: ErrImagePull");
                let record = self
                    .records
                    .entry(c.name.clone())
                    .or_insert_with(Record::new);
                record.state = State::Waiting {
                    reason: "ErrImagePull".into(),
                    message: Some(message),
                };
                record.pull_failed = true;
                Self::bump_backoff(record);
                Err(())
            }
        }
    }

    async fn start_container(&mut self, c: &Container, role: Role) -> Result<(), ()> {
        // An ephemeral container with a target joins the PID namespace of the target's
        // running process; the containers of a pod that shares its processes join the pod's.
        let pid_namespace = match self.pid_namespace_for(c, role).await {
            Ok(ns) => ns,
            Err(message) => {
                self.fail(c, "CreateContainerError", format!("Error: {message}"));
                return Err(());
            }
        };
        let image = self.pull(c).await?;
        let sandbox_netns = self.sandbox.as_ref().and_then(|s| s.netns.clone());
        let pod_ip = self.sandbox.as_ref().and_then(|s| s.ip);
        let env = match volumes::resolve_env(&self.agent, &self.pod, c, pod_ip).await {
            Ok(env) => env,
            Err(message) => {
                self.fail(c, "CreateContainerConfigError", format!("Error: {message}"));
                return Err(());
            }
        };
        let mut mounts: Vec<BindMount> =
            match volumes::mounts(&self.agent, &self.pod, c, &self.pod_dir()).await {
                Ok(m) => m,
                Err(message) => {
                    self.agent
                        .recorder
                        .warning(&self.pod, "FailedMount", message.clone());
                    self.fail(c, "CreateContainerConfigError", message);
                    return Err(());
                }
            };
        let record = self
            .records
            .entry(c.name.clone())
            .or_insert_with(Record::new);
        let attempt = record.starts;
        let id = uuid::Uuid::new_v4().simple().to_string();
        // Termination message file.
        let term_dir = self.pod_dir().join("containers").join(&c.name);
        let term_file = term_dir.join(&id);
        if std::fs::create_dir_all(&term_dir).is_ok() && std::fs::write(&term_file, b"").is_ok() {
            mounts.push(BindMount {
                host_path: term_file.clone(),
                container_path: c
                    .termination_message_path
                    .clone()
                    .unwrap_or_else(|| "/dev/termination-log".into()),
                read_only: false,
            });
        }
        let (uid, gid, extra_gids) = match volumes::user_of(&self.agent, &self.pod, c, &image).await
        {
            Ok(u) => u,
            Err(message) => {
                self.fail(c, "CreateContainerConfigError", format!("Error: {message}"));
                return Err(());
            }
        };
        let hostname = volumes::hostname(&self.pod, self.host_network());
        let cgroup = format!(
            "{}/pod{}/{}",
            self.agent.config.cgroup_root.trim_end_matches('/'),
            self.uid,
            id
        );
        let spec_json = match spec::build(
            &SpecInput {
                pod: &self.pod,
                container: c,
                image: &image.config,
                env,
                mounts,
                netns: sandbox_netns,
                pid_namespace,
                hostname,
                cgroup,
                uid,
                gid,
                extra_gids,
            },
            self.agent.memory_capacity,
        ) {
            Ok(s) => s,
            Err(e) => {
                self.fail(c, "CreateContainerError", format!("Error: {e}"));
                return Err(());
            }
        };
        let rt = self.agent.runtime.clone();
        let mut labels = HashMap::new();
        labels.insert(LABEL_POD_UID.to_string(), self.uid.clone());
        labels.insert(LABEL_POD_NAME.to_string(), self.name.clone());
        labels.insert(LABEL_POD_NAMESPACE.to_string(), self.namespace.clone());
        labels.insert(LABEL_CONTAINER.to_string(), c.name.clone());
        labels.insert(LABEL_ATTEMPT.to_string(), attempt.to_string());
        labels.insert(LABEL_NODE.to_string(), self.agent.config.node_name.clone());
        match role {
            Role::Init => {
                labels.insert("io.edgesite.container.init".into(), "true".into());
            }
            Role::Ephemeral => {
                labels.insert(LABEL_EPHEMERAL.into(), "true".into());
            }
            Role::Main => {}
        }
        // The snapshot is prepared under a lease until the container that references it exists:
        // containerd's garbage collector (run after any other deletion, frequent when a rebooted
        // node replaces all its containers at once) removes unreferenced snapshots otherwise.
        let created = async {
            let lease = rt.create_lease(Duration::from_secs(300)).await?;
            let result = async {
                let rootfs = rt
                    .prepare_snapshot(&id, &image.chain_id, Some(&lease))
                    .await?;
                rt.create_container(
                    &id,
                    &image.name,
                    &id,
                    serde_json::to_vec(&spec_json).unwrap_or_default(),
                    labels,
                )
                .await?;
                Ok::<_, crate::runtime::containerd::RuntimeError>(rootfs)
            }
            .await;
            let _ = rt.delete_lease(&lease).await;
            result
        }
        .await;
        let rootfs = match created {
            Ok(r) => r,
            Err(e) => {
                let _ = rt.remove_snapshot(&id).await;
                self.fail(c, "CreateContainerError", format!("Error: {e}"));
                return Err(());
            }
        };
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), self.uid.clone());
        let fifo_dir = self.pod_dir().join("fifo");
        let log_file = logs::container_file(&self.log_dir(), &c.name, attempt);
        let started = async {
            let (out, err) =
                logs::make_fifos(&fifo_dir, &id).map_err(|e| AgentError::Io(e.to_string()))?;
            let tty = c.tty.unwrap_or(false);
            let stdin = c
                .stdin
                .unwrap_or(false)
                .then(|| crate::streaming::attach::stdin_fifo(&fifo_dir, &id));
            let tap = crate::streaming::attach::register(
                &self.agent,
                &id,
                stdin.as_deref(),
                c.stdin_once.unwrap_or(false),
                tty,
            );
            let copier = Copier::start(
                &out,
                &err,
                log_file,
                self.agent.config.log_rotation,
                Some(tap),
            )
            .map_err(|e| AgentError::Io(format!("open log FIFOs: {e}")))?;
            self.copiers.insert(id.clone(), copier);
            let io = crate::runtime::containerd::ExecIo {
                stdin: stdin.as_deref(),
                stdout: Some(&out),
                stderr: (!tty).then_some(err.as_path()),
                terminal: tty,
            };
            rt.create_task(&id, rootfs, io).await?;
            rt.start_task(&id).await?;
            Ok::<_, AgentError>(())
        }
        .await;
        let record = self
            .records
            .entry(c.name.clone())
            .or_insert_with(Record::new);
        if let Some(old) = record.previous_id.take() {
            // Only the newest dead container is kept.
            self.owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&old);
            let agent = self.agent.clone();
            tokio::spawn(async move { remove_container(&agent, &old).await });
        }
        record.previous_id = record.id.replace(id.clone());
        record.starts += 1;
        record.image_id = image.image_id.clone();
        self.agent.recorder.normal(
            &self.pod,
            "Created",
            format!("Created container {}", c.name),
        );
        match started {
            Ok(()) => {
                let started_at = now_rfc3339();
                let mut l = HashMap::new();
                l.insert(LABEL_STARTED.to_string(), started_at.clone());
                let _ = rt.label_container(&id, l).await;
                record.state = State::Running { started_at };
                record.running_since = Some(Instant::now());
                record.not_before = None;
                self.agent.recorder.normal(
                    &self.pod,
                    "Started",
                    format!("Started container {}", c.name),
                );
                self.start_probes(&c.name, &id);
                self.post_start(c, &id).await;
                Ok(())
            }
            Err(e) => {
                let message = format!("failed to start container \"{}\": {e}", c.name);
                let now = now_rfc3339();
                record.state = State::Terminated(Terminated {
                    exit_code: 128,
                    reason: "StartError".into(),
                    message: Some(message.clone()),
                    started_at: now.clone(),
                    finished_at: now,
                    container_id: id.clone(),
                });
                Self::bump_backoff(record);
                let _ = rt.delete_task(&id).await;
                let mut l = HashMap::new();
                l.insert("io.edgesite.exit-code".to_string(), "128".to_string());
                l.insert("io.edgesite.reason".to_string(), "StartError".to_string());
                l.insert("io.edgesite.finished-at".to_string(), now_rfc3339());
                let _ = rt.label_container(&id, l).await;
                if let Some(copier) = self.copiers.remove(&id) {
                    copier.finish().await;
                }
                crate::streaming::attach::unregister(&self.agent, &id);
                self.agent.recorder.warning(&self.pod, "Failed", message);
                Err(())
            }
        }
    }

    /// The PID namespace a container joins (`None`: a new one): an ephemeral container's
    /// target's, which must be running; the pod's own with `shareProcessNamespace`, held by a
    /// holder process started when first needed (`pid_namespace.rs`).
    async fn pid_namespace_for(
        &self,
        c: &Container,
        role: Role,
    ) -> Result<Option<PathBuf>, String> {
        let target = match role {
            Role::Ephemeral => self
                .ephemeral_containers()
                .into_iter()
                .find(|(e, _)| e.name == c.name)
                .and_then(|(_, t)| t),
            _ => None,
        };
        let shared = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.share_process_namespace)
            .unwrap_or(false);
        if shared && target.is_none() {
            let dir = self.pod_dir();
            return match crate::pid_namespace::running(&self.uid, &dir) {
                Some(path) => Ok(Some(path)),
                None => crate::pid_namespace::start(&self.uid, &dir).await.map(Some),
            };
        }
        let Some(target) = target else {
            return Ok(None);
        };
        let not_running = || format!("the target container {target:?} is not running");
        let id = self
            .records
            .get(&target)
            .filter(|r| matches!(r.state, State::Running { .. }))
            .and_then(|r| r.id.clone())
            .ok_or_else(not_running)?;
        match self.agent.runtime.task_state(&id).await {
            Ok(Some(crate::runtime::containerd::TaskState::Running { pid })) if pid > 0 => {
                Ok(Some(PathBuf::from(format!("/proc/{pid}/ns/pid"))))
            }
            _ => Err(not_running()),
        }
    }

    /// Runs the postStart hook; a failing hook kills the container, as upstream.
    async fn post_start(&mut self, c: &Container, id: &str) {
        let Some(handler) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) else {
            return;
        };
        let ip = self.sandbox.as_ref().and_then(|s| s.ip);
        if let Err(message) =
            crate::hooks::run(&self.agent, id, &handler, ip, Duration::from_secs(30)).await
        {
            self.agent.recorder.warning(
                &self.pod,
                "FailedPostStartHook",
                format!("PostStartHook failed: {message}"),
            );
            let _ = self.agent.runtime.kill_task(id, libc::SIGKILL, true).await;
        }
    }

    /// Records the exit of a container's task and removes the task.
    async fn collect_exit(&mut self, name: &str) {
        let Some(record) = self.records.get_mut(name) else {
            return;
        };
        let Some(id) = record.id.clone() else { return };
        if !matches!(record.state, State::Running { .. }) {
            return;
        }
        let rt = self.agent.runtime.clone();
        let (exit_code, exited) = match rt.task_state(&id).await {
            Ok(Some(crate::runtime::containerd::TaskState::Stopped {
                exit_code,
                exited_at,
            })) => (exit_code as i32, exited_at),
            Ok(Some(_)) => return,
            _ => (255, None),
        };
        // The OOM event can arrive after the exit, and the process the kernel killed may be a
        // child of the main one (which then fails with its own code): a failed container whose
        // cgroup recorded an OOM kill was OOM-killed, as the kubelet reports it. The cgroup goes
        // with the task, so it is read before the task is deleted.
        let oom = self.ooms.remove(&id)
            || (exit_code != 0 && cgroup_oom_killed(&self.agent, &self.uid, &id));
        let _ = rt.delete_task(&id).await;
        if let Some(copier) = self.copiers.remove(&id) {
            copier.finish().await;
        }
        crate::streaming::attach::unregister(&self.agent, &id);
        let reason = if oom {
            "OOMKilled"
        } else if exit_code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let finished_at = exited
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(now_rfc3339);
        let term_file = self.pod_dir().join("containers").join(name).join(&id);
        let message = std::fs::read(&term_file)
            .ok()
            .filter(|m| !m.is_empty())
            .map(|m| String::from_utf8_lossy(&m[..m.len().min(4096)]).into_owned());
        let record = self.records.get_mut(name).expect("checked above");
        let started_at = match &record.state {
            State::Running { started_at } => started_at.clone(),
            _ => String::new(),
        };
        if record
            .running_since
            .is_some_and(|s| s.elapsed() >= BACKOFF_RESET)
        {
            record.backoff = Duration::ZERO;
        }
        record.running_since = None;
        record.ready = false;
        record.started = false;
        for h in record.probers.drain(..) {
            h.abort();
        }
        record.state = State::Terminated(Terminated {
            exit_code,
            reason: reason.into(),
            message,
            started_at,
            finished_at: finished_at.clone(),
            container_id: id.clone(),
        });
        // The first restart is immediate; then 10 s, 20 s, ... up to 5 min (upstream's).
        if record.backoff.is_zero() {
            record.not_before = None;
            record.wait = Duration::ZERO;
            record.backoff = BACKOFF_START;
        } else {
            Self::bump_backoff(record);
        }
        let mut l = HashMap::new();
        l.insert("io.edgesite.exit-code".to_string(), exit_code.to_string());
        l.insert("io.edgesite.reason".to_string(), reason.to_string());
        l.insert("io.edgesite.finished-at".to_string(), finished_at);
        let _ = rt.label_container(&id, l).await;
    }

    /// Stops every container gracefully (preStop, SIGTERM, grace period, SIGKILL), tears the
    /// sandbox down, reports the final status and removes the pod from the API.
    async fn terminate(&mut self, shutdown: &CancellationToken) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        let deadline = Instant::now() + Duration::from_secs(grace);
        let ip = self.sandbox.as_ref().and_then(|s| s.ip);
        let running: Vec<(String, String)> = self
            .records
            .iter()
            .filter(|(_, r)| matches!(r.state, State::Running { .. }))
            .filter_map(|(n, r)| Some((n.clone(), r.id.clone()?)))
            .collect();
        let mut stops = Vec::new();
        for (name, id) in &running {
            self.agent
                .recorder
                .normal(&self.pod, "Killing", format!("Stopping container {name}"));
            let container = self.container_spec(name);
            let agent = self.agent.clone();
            let id = id.clone();
            stops.push(tokio::spawn(async move {
                stop_container(&agent, &id, container.as_ref(), ip, deadline).await;
            }));
        }
        for s in stops {
            let _ = s.await;
        }
        for (name, _) in &running {
            self.collect_exit(name).await;
        }
        for (_, c) in self.copiers.drain() {
            c.finish().await;
        }
        // Status with the final container states, then clean up and remove the pod.
        if !self.removed {
            self.report().await;
        }
        let ids: Vec<String> = self
            .records
            .values()
            .flat_map(|r| [r.id.clone(), r.previous_id.clone()])
            .flatten()
            .collect();
        for id in ids {
            remove_container(&self.agent, &id).await;
            self.owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
        crate::pid_namespace::stop(&self.uid, &self.pod_dir());
        self.teardown_sandbox().await;
        volumes::cleanup(&self.pod_dir());
        let _ = std::fs::remove_dir_all(self.pod_dir());
        let _ = std::fs::remove_dir_all(self.log_dir());
        if self.removed || shutdown.is_cancelled() {
            return;
        }
        // Let the final status go first, then remove the pod; offline, wait for the API.
        let pods: Api<Pod> = Api::namespaced(self.agent.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let mut online = self.agent.meta.watch_online();
        loop {
            let deleted = self
                .agent
                .meta
                .call("delete pod", pods.delete(&self.name, &params))
                .await;
            match deleted {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => break,
                Err(e) if metamanager::answered(&e) => {
                    tracing::warn!(pod = %self.name, "removing the pod from the API failed: {e}");
                    break;
                }
                Err(e) => {
                    tracing::debug!(pod = %self.name, "removing the pod waits for the API: {e}")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = online.changed() => {}
                _ = tokio::time::sleep(metamanager::PROBE_EVERY) => {}
            }
        }
        self.agent
            .meta
            .forget_pod(&self.namespace, &self.name, &self.uid);
    }

    async fn teardown_sandbox(&mut self) {
        let path = self.netns_path();
        let subnet = self
            .sandbox
            .as_ref()
            .map(|s| s.subnet.clone())
            .filter(|s| !s.is_empty())
            .or_else(|| self.agent.pod_cidr.borrow().clone());
        let ports = self
            .sandbox
            .as_ref()
            .map(|s| s.ports.clone())
            .unwrap_or_else(|| self.port_mappings());
        if !self.host_network()
            && let Some(subnet) = subnet
        {
            let attachment = self.attachment(&path, &ports);
            if let Err(e) = self.agent.cni.del(&attachment, &subnet).await {
                tracing::warn!(pod = %self.name, "CNI teardown: {e}");
            }
        }
        if let Err(e) = netns::remove(&path) {
            tracing::warn!(pod = %self.name, "{e}");
        }
        self.sandbox = None;
    }

    // ---- status -------------------------------------------------------------------------

    fn phase(&self) -> Phase {
        pod_plan::phase(&self.spec(), |name| self.observed(name))
    }

    fn container_status(&self, c: &Container, init: bool) -> Value {
        let image = c.image.clone().unwrap_or_default();
        let Some(r) = self.records.get(&c.name) else {
            let reason = if init {
                "PodInitializing"
            } else {
                "ContainerCreating"
            };
            return json!({
                "name": c.name, "image": image, "imageID": "", "ready": false,
                "restartCount": 0, "started": false,
                "state": {"waiting": {"reason": reason}},
            });
        };
        let term_json = |t: &Terminated| {
            let mut v = json!({
                "exitCode": t.exit_code, "reason": t.reason,
                "containerID": format!("containerd://{}", t.container_id),
            });
            // Unknown times are left out (an empty string is not a valid time).
            if !t.started_at.is_empty() {
                v["startedAt"] = json!(t.started_at);
            }
            if !t.finished_at.is_empty() {
                v["finishedAt"] = json!(t.finished_at);
            }
            if let Some(m) = &t.message {
                v["message"] = json!(m);
            }
            v
        };
        let state = match &r.state {
            State::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({"waiting": w})
            }
            State::Running { started_at } if started_at.is_empty() => json!({"running": {}}),
            State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            State::Terminated(t) => json!({"terminated": term_json(t)}),
        };
        let last = match (&r.state, &r.last) {
            (State::Terminated(_), _) => r.last.as_ref().map(term_json),
            (_, Some(l)) => Some(term_json(l)),
            _ => None,
        };
        let running = matches!(r.state, State::Running { .. });
        let mut status = json!({
            "name": c.name,
            "image": image,
            "imageID": r.image_id,
            "ready": running && !init && r.started && r.ready,
            "restartCount": r.restart_count(),
            "started": running && r.started,
            "state": state,
            "lastState": last.map(|l| json!({"terminated": l})).unwrap_or(json!({})),
        });
        if let Some(id) = &r.id {
            status["containerID"] = json!(format!("containerd://{id}"));
        }
        if init {
            status["ready"] = json!(matches!(&r.state, State::Terminated(t) if t.exit_code == 0));
        }
        status
    }

    fn condition(
        &mut self,
        kind: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> Value {
        let status = if ok { "True" } else { "False" };
        let time = match self.transitions.get(kind) {
            Some((s, t)) if s == status => t.clone(),
            _ => {
                let t = now_rfc3339();
                self.transitions
                    .insert(kind.into(), (status.into(), t.clone()));
                t
            }
        };
        let mut c = json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": time});
        if let Some(r) = reason.filter(|_| !ok) {
            c["reason"] = json!(r);
        }
        if let Some(m) = message.filter(|_| !ok) {
            c["message"] = json!(m);
        }
        c
    }

    fn status(&mut self) -> Value {
        let spec = self.spec();
        let init_statuses: Vec<Value> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| self.container_status(c, true))
            .collect();
        let statuses: Vec<Value> = spec
            .containers
            .iter()
            .map(|c| self.container_status(c, false))
            .collect();
        let ephemeral_statuses: Vec<Value> = self
            .ephemeral_containers()
            .iter()
            .map(|(c, _)| {
                let mut s = self.container_status(c, false);
                // Ephemeral containers are never ready (upstream reports them so).
                s["ready"] = json!(false);
                s
            })
            .collect();
        let initialized = spec.init_containers.iter().flatten().all(|c| {
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            match self.records.get(&c.name).map(|r| &r.state) {
                Some(State::Terminated(t)) => t.exit_code == 0 && !sidecar,
                Some(State::Running { .. }) => sidecar,
                _ => false,
            }
        });
        let not_ready: Vec<String> = statuses
            .iter()
            .filter(|s| s["ready"] != json!(true))
            .filter_map(|s| s["name"].as_str().map(String::from))
            .collect();
        let phase = self.phase();
        let containers_ready = not_ready.is_empty();
        let finished = phase.finished();
        let not_ready_message =
            format!("containers with unready status: [{}]", not_ready.join(" "));
        let pending_init: Vec<String> = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| {
                !matches!(self.records.get(&c.name).map(|r| &r.state), Some(State::Terminated(t)) if t.exit_code == 0)
            })
            .map(|c| c.name.clone())
            .collect();
        let sandbox_ok = self.sandbox.is_some();
        let mut conditions = vec![
            self.condition(
                "PodReadyToStartContainers",
                sandbox_ok && !finished,
                None,
                None,
            ),
            self.condition(
                "Initialized",
                initialized,
                Some("ContainersNotInitialized"),
                Some(format!(
                    "containers with incomplete status: [{}]",
                    pending_init.join(" ")
                )),
            ),
            self.condition(
                "Ready",
                containers_ready && !finished,
                Some(if finished {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }),
                Some(not_ready_message.clone()),
            ),
            self.condition(
                "ContainersReady",
                containers_ready && !finished,
                Some(if finished {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }),
                Some(not_ready_message),
            ),
        ];
        // Conditions others own (PodScheduled, DisruptionTarget, readiness gates) are kept.
        let ours = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
        ];
        if let Some(existing) = self.pod.status.as_ref().and_then(|s| s.conditions.as_ref()) {
            for c in existing {
                if !ours.contains(&c.type_.as_str()) {
                    conditions.push(serde_json::to_value(c).unwrap_or(Value::Null));
                }
            }
        }
        let mut status = json!({
            "phase": phase.as_str(),
            "conditions": conditions,
            "containerStatuses": statuses,
            "qosClass": spec::qos_class(&self.pod),
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        if !ephemeral_statuses.is_empty() {
            status["ephemeralContainerStatuses"] = json!(ephemeral_statuses);
        }
        if let Some(ip) = *self.agent.host_ip.borrow() {
            status["hostIP"] = json!(ip.to_string());
            status["hostIPs"] = json!([{"ip": ip.to_string()}]);
        }
        if let Some(ip) = self.sandbox.as_ref().and_then(|s| s.ip) {
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        if let Some(t) = &self.start_time {
            status["startTime"] = json!(t);
        }
        if let Some(e) = &self.sandbox_error
            && self.sandbox.is_none()
        {
            status["message"] = json!(e);
        }
        status
    }

    /// Patches `pods/status` when what we would report changed.
    async fn report(&mut self) {
        let status = self.status();
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        // metamanager delivers it (at once, or when the API answers again; newest wins).
        self.agent.meta.pod_status(&self.pod, status.clone());
        if let Ok(s) = serde_json::from_value(status.clone()) {
            self.pod.status = Some(s);
        }
        self.last_status = Some(status);
    }
}

/// Whether the API's copy of the status differs from the one we reported in what matters to
/// others (phase, IP, readiness).
fn drifted(ours: &Value, theirs: &Value) -> bool {
    let ready = |s: &Value| {
        s["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["status"].clone())
    };
    ours["phase"] != theirs["phase"]
        || ours["podIP"] != theirs["podIP"]
        || ready(ours) != ready(theirs)
}

/// Whether the container's cgroup recorded an OOM kill (cgroup v1 `memory.oom_control`, v2
/// `memory.events`); a fallback for a missed OOM event.
fn cgroup_oom_killed(agent: &Agent, pod_uid: &str, id: &str) -> bool {
    let rel = format!(
        "{}/pod{pod_uid}/{id}",
        agent.config.cgroup_root.trim_matches('/')
    );
    for (path, key) in [
        (
            format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
            "oom_kill ",
        ),
        (format!("/sys/fs/cgroup/{rel}/memory.events"), "oom_kill "),
    ] {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Some(n) = text
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return n > 0;
        }
    }
    false
}

/// preStop, then SIGTERM, then SIGKILL at the deadline.
async fn stop_container(
    agent: &Agent,
    id: &str,
    container: Option<&Container>,
    ip: Option<IpAddr>,
    deadline: Instant,
) {
    let rt = &agent.runtime;
    if let Some(handler) = container
        .and_then(|c| c.lifecycle.as_ref())
        .and_then(|l| l.pre_stop.clone())
    {
        let budget = deadline.saturating_duration_since(Instant::now());
        if let Err(m) = crate::hooks::run(agent, id, &handler, ip, budget).await {
            tracing::info!(container = id, "preStop hook failed: {m}");
        }
    }
    let _ = rt.kill_task(id, libc::SIGTERM, false).await;
    loop {
        match rt.task_state(id).await {
            Ok(Some(crate::runtime::containerd::TaskState::Running { .. }))
            | Ok(Some(crate::runtime::containerd::TaskState::Created))
            | Ok(Some(crate::runtime::containerd::TaskState::Paused)) => {}
            _ => return,
        }
        if Instant::now() >= deadline {
            let _ = rt.kill_task(id, libc::SIGKILL, true).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if Instant::now() >= deadline + Duration::from_secs(10) {
                return;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Kills and deletes a container, its task and its snapshot.
pub async fn remove_container(agent: &Agent, id: &str) {
    crate::streaming::attach::unregister(agent, id);
    let rt = &agent.runtime;
    if let Ok(Some(state)) = rt.task_state(id).await {
        if !matches!(state, crate::runtime::containerd::TaskState::Stopped { .. }) {
            let _ = rt.kill_task(id, libc::SIGKILL, true).await;
            for _ in 0..50 {
                if matches!(
                    rt.task_state(id).await,
                    Ok(Some(crate::runtime::containerd::TaskState::Stopped { .. })) | Ok(None)
                ) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let _ = rt.delete_task(id).await;
    }
    if let Err(e) = rt.delete_container(id).await {
        tracing::warn!(container = id, "delete container: {e}");
    }
    let _ = rt.remove_snapshot(id).await;
}

/// Network namespaces and pod directories of pods that are no longer bound here.
pub async fn remove_orphan_sandboxes(agent: &Agent, keep: &HashSet<String>) {
    let entries: Vec<PathBuf> = std::fs::read_dir(agent.config.netns_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    let subnet = agent.pod_cidr.borrow().clone();
    for path in entries {
        let uid = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if keep.contains(&uid) {
            continue;
        }
        if let Some(subnet) = &subnet {
            let attachment = cni::Attachment {
                id: &uid,
                namespace: "",
                name: "",
                netns: &path,
                ports: &[],
            };
            let _ = agent.cni.del(&attachment, subnet).await;
        }
        let _ = netns::remove(&path);
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(agent.config.pods_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    for dir in dirs {
        let uid = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !keep.contains(&uid) {
            volumes::cleanup(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
