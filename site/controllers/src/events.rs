//! Events (`core/v1`, the API `kubectl describe` and `kubectl get events` read) for what the
//! loops do, with upstream's aggregation of repeats: the same reason and message about the
//! same object within the cache's memory bumps `count` and `lastTimestamp` instead of creating
//! a new Event.
//!
//! Recording never blocks a loop: events go through a bounded channel to one writer task and
//! are dropped (with a debug log) when it is full, as upstream's broadcaster does. While the API
//! cannot be reached (a node agent offline) the writer keeps a bounded backlog, folds repeats
//! into one event with a count, and writes it when the API answers again, with the times the
//! events happened.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const QUEUE: usize = 4096;
const CACHE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    Normal,
    Warning,
}

impl Type {
    fn as_str(self) -> &'static str {
        match self {
            Type::Normal => "Normal",
            Type::Warning => "Warning",
        }
    }
}

struct Record {
    regarding: ObjectReference,
    kind: Type,
    reason: String,
    message: String,
}

/// Hands events to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Record>,
}

impl Recorder {
    /// Starts the writer task for `component` (shown as the event's source).
    pub fn start(client: kube::Client, component: &str, shutdown: CancellationToken) -> Recorder {
        Self::start_on_host(client, component, None, shutdown)
    }

    /// Like [`Recorder::start`] for a component that runs on a node (`source.host`, as the
    /// kubelet's events carry).
    pub fn start_on_host(
        client: kube::Client,
        component: &str,
        host: Option<String>,
        shutdown: CancellationToken,
    ) -> Recorder {
        Self::start_spooled(client, component, host, None, shutdown)
    }

    /// Like [`Recorder::start_on_host`]; events waiting for an unreachable API are also kept in
    /// the file `spool`, so a restart (or a reboot) while offline does not lose them.
    pub fn start_spooled(
        client: kube::Client,
        component: &str,
        host: Option<String>,
        spool: Option<std::path::PathBuf>,
        shutdown: CancellationToken,
    ) -> Recorder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(
            client,
            component.to_string(),
            host,
            rx,
            spool,
            shutdown,
        ));
        Recorder { tx }
    }

    pub fn publish<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        kind: Type,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.publish_ref(object.object_ref(&()), kind, reason, message);
    }

    pub fn publish_ref(
        &self,
        regarding: ObjectReference,
        kind: Type,
        reason: &str,
        message: impl Into<String>,
    ) {
        let record = Record {
            regarding,
            kind,
            reason: reason.to_string(),
            message: message.into(),
        };
        if self.tx.try_send(record).is_err() {
            tracing::debug!(reason, "event queue full; event dropped");
        }
    }

    pub fn normal<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.publish(object, Type::Normal, reason, message);
    }

    pub fn warning<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.publish(object, Type::Warning, reason, message);
    }
}

type Key = (String, String, String, String, Type, String, String);

fn now() -> Timestamp {
    Timestamp::now()
}

/// An event waiting to be written, with the repeats that arrived while it waited.
struct Pending {
    record: Record,
    key: Key,
    namespace: String,
    first: Timestamp,
    last: Timestamp,
    count: i32,
}

impl Pending {
    fn new(record: Record) -> Pending {
        let r = &record.regarding;
        let namespace = r
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let key: Key = (
            r.uid.clone().unwrap_or_default(),
            r.kind.clone().unwrap_or_default(),
            namespace.clone(),
            r.name.clone().unwrap_or_default(),
            record.kind,
            record.reason.clone(),
            record.message.clone(),
        );
        let t = now();
        Pending {
            record,
            key,
            namespace,
            first: t,
            last: t,
            count: 1,
        }
    }
}

impl Pending {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "regarding": self.record.regarding,
            "type": self.record.kind.as_str(),
            "reason": self.record.reason,
            "message": self.record.message,
            "first": self.first.as_nanosecond().to_string(),
            "last": self.last.as_nanosecond().to_string(),
            "count": self.count,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<Pending> {
        let regarding: ObjectReference = serde_json::from_value(v["regarding"].clone()).ok()?;
        let kind = match v["type"].as_str()? {
            "Warning" => Type::Warning,
            _ => Type::Normal,
        };
        let time = |k: &str| Timestamp::from_nanosecond(v[k].as_str()?.parse().ok()?).ok();
        let mut p = Pending::new(Record {
            regarding,
            kind,
            reason: v["reason"].as_str()?.to_string(),
            message: v["message"].as_str()?.to_string(),
        });
        p.first = time("first")?;
        p.last = time("last")?;
        p.count = v["count"].as_i64()? as i32;
        Some(p)
    }
}

/// Events waiting to be written, oldest first, indexed by key so that a repeat folds into its
/// waiting event at once (a scan of up to [`QUEUE`] waiting events per new event cost the
/// scheduler 5 % of the server's CPU while it bound pods faster than their events were written).
#[derive(Default)]
struct Backlog {
    items: std::collections::VecDeque<Pending>,
    /// The sequence number of `items[0]`.
    first: u64,
    /// key -> the sequence number of the waiting event with that key.
    index: HashMap<Key, u64>,
}

impl Backlog {
    /// Adds an event, folding it into a waiting one with the same key. Bounded: when full, the
    /// oldest waiting event is dropped.
    fn push(&mut self, p: Pending) {
        if let Some(&seq) = self.index.get(&p.key) {
            let waiting = &mut self.items[(seq - self.first) as usize];
            waiting.count += p.count;
            waiting.last = p.last;
            return;
        }
        if self.items.len() >= QUEUE {
            self.pop_front();
            tracing::debug!("event backlog full; the oldest event dropped");
        }
        self.index
            .insert(p.key.clone(), self.first + self.items.len() as u64);
        self.items.push_back(p);
    }

    fn pop_front(&mut self) -> Option<Pending> {
        let p = self.items.pop_front()?;
        if self.index.get(&p.key) == Some(&self.first) {
            self.index.remove(&p.key);
        }
        self.first += 1;
        Some(p)
    }

    fn front(&self) -> Option<&Pending> {
        self.items.front()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl FromIterator<Pending> for Backlog {
    fn from_iter<I: IntoIterator<Item = Pending>>(items: I) -> Backlog {
        let mut backlog = Backlog::default();
        for p in items {
            backlog.push(p);
        }
        backlog
    }
}

/// Saves the backlog to the spool file (replacing it atomically), or removes the file when the
/// backlog is empty.
fn save_spool(spool: &std::path::Path, backlog: &Backlog) {
    if backlog.is_empty() {
        let _ = std::fs::remove_file(spool);
        return;
    }
    let items: Vec<serde_json::Value> = backlog.items.iter().map(Pending::to_json).collect();
    let tmp = spool.with_extension("tmp");
    let written = std::fs::write(&tmp, serde_json::Value::Array(items).to_string())
        .and_then(|()| std::fs::rename(&tmp, spool));
    if let Err(e) = written {
        tracing::debug!(spool = %spool.display(), "cannot keep the event backlog: {e}");
    }
}

fn load_spool(spool: &std::path::Path) -> Backlog {
    let Ok(text) = std::fs::read_to_string(spool) else {
        return Default::default();
    };
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    items.iter().filter_map(Pending::from_json).collect()
}

/// Adds a new event to the backlog (see [`Backlog::push`]).
fn enqueue(backlog: &mut Backlog, record: Record) {
    backlog.push(Pending::new(record));
}

enum Written {
    Done,
    /// The API could not be reached: keep the event and try again later.
    Unreachable,
}

async fn write_events(
    client: kube::Client,
    component: String,
    host: Option<String>,
    mut rx: mpsc::Receiver<Record>,
    spool: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) {
    // (uid, kind, namespace, name, type, reason, message) -> (event namespace, event name, count)
    let mut seen: HashMap<Key, (String, String, i32)> = HashMap::new();
    let mut backlog = spool.as_deref().map(load_spool).unwrap_or_default();
    let mut spooled = !backlog.is_empty();
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(10),
    );
    loop {
        if backlog.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.recv() => match r {
                    Some(r) => enqueue(&mut backlog, r),
                    None => return,
                },
            }
        }
        while let Ok(r) = rx.try_recv() {
            enqueue(&mut backlog, r);
        }
        let Some(p) = backlog.front() else { continue };
        match write_one(&client, &component, &host, &mut seen, p).await {
            Written::Done => {
                backlog.pop_front();
                backoff.reset();
                if spooled && let Some(spool) = &spool {
                    save_spool(spool, &backlog);
                    spooled = !backlog.is_empty();
                }
            }
            Written::Unreachable => {
                // Keep collecting (and folding repeats) while waiting for the API.
                if let Some(spool) = &spool {
                    save_spool(spool, &backlog);
                    spooled = true;
                }
                let until = tokio::time::Instant::now() + backoff.next_wait();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(until) => break,
                        r = rx.recv() => match r {
                            Some(r) => {
                                enqueue(&mut backlog, r);
                                if let Some(spool) = &spool {
                                    save_spool(spool, &backlog);
                                }
                            }
                            None => return,
                        },
                    }
                }
            }
        }
    }
}

async fn write_one(
    client: &kube::Client,
    component: &str,
    host: &Option<String>,
    seen: &mut HashMap<Key, (String, String, i32)>,
    p: &Pending,
) -> Written {
    let record = &p.record;
    let r = &record.regarding;
    let unreachable = |e: &kube::Error| !matches!(e, kube::Error::Api(_));
    if let Some((ns, name, count)) = seen.get_mut(&p.key) {
        let patch = serde_json::json!({"count": *count + p.count, "lastTimestamp": Time(p.last)});
        let api: Api<Event> = Api::namespaced(client.clone(), ns);
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                *count += p.count;
                return Written::Done;
            }
            Err(e) if unreachable(&e) => return Written::Unreachable,
            Err(e) => tracing::debug!(error = %e, "aggregate event; creating a new one"),
        }
    }
    let name = format!(
        "{}.{:x}",
        r.name.as_deref().unwrap_or("object"),
        p.first.as_nanosecond()
    );
    let event = Event {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(p.namespace.clone()),
            ..Default::default()
        },
        involved_object: record.regarding.clone(),
        reason: Some(record.reason.clone()),
        message: Some(record.message.clone()),
        type_: Some(record.kind.as_str().to_string()),
        count: Some(p.count),
        first_timestamp: Some(Time(p.first)),
        last_timestamp: Some(Time(p.last)),
        event_time: None::<MicroTime>,
        source: Some(EventSource {
            component: Some(component.to_string()),
            host: host.clone(),
        }),
        reporting_component: Some(component.to_string()),
        reporting_instance: Some(component.to_string()),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &p.namespace);
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => {
            if seen.len() >= CACHE {
                seen.clear();
            }
            seen.insert(p.key.clone(), (p.namespace.clone(), name, p.count));
            Written::Done
        }
        // An event the API already has (a retry after a lost answer) is written.
        Err(kube::Error::Api(s)) if s.code == 409 => Written::Done,
        Err(e) if unreachable(&e) => Written::Unreachable,
        // The namespace may be going away; events are best effort.
        Err(e) => {
            tracing::debug!(error = %e, reason = %record.reason, "cannot record event");
            Written::Done
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reason: &str) -> Record {
        Record {
            regarding: ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some("ns".into()),
                name: Some("p".into()),
                uid: Some("u".into()),
                ..Default::default()
            },
            kind: Type::Warning,
            reason: reason.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn the_backlog_folds_repeats_is_bounded_and_survives_a_restart() {
        let mut backlog = Backlog::default();
        enqueue(&mut backlog, record("BackOff"));
        enqueue(&mut backlog, record("Started"));
        enqueue(&mut backlog, record("BackOff"));
        assert_eq!(backlog.items.len(), 2);
        assert_eq!(backlog.items[0].count, 2);
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("events.json");
        save_spool(&spool, &backlog);
        let loaded = load_spool(&spool).items;
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].key, backlog.items[0].key);
        assert_eq!(loaded[0].count, 2);
        assert_eq!(loaded[0].first, backlog.items[0].first);
        assert_eq!(loaded[1].record.reason, "Started");
        save_spool(&spool, &Default::default());
        assert!(!spool.exists());
        for i in 0..QUEUE + 10 {
            enqueue(&mut backlog, record(&format!("R{i}")));
        }
        assert_eq!(backlog.items.len(), QUEUE);
        assert_eq!(
            backlog.items.back().unwrap().record.reason,
            format!("R{}", QUEUE + 9)
        );
        // Folding still finds waiting events after the oldest were dropped or written.
        enqueue(&mut backlog, record(&format!("R{}", QUEUE + 9)));
        assert_eq!(backlog.items.back().unwrap().count, 2);
        let written = backlog.pop_front().unwrap();
        enqueue(&mut backlog, written.record);
        assert_eq!(backlog.items.len(), QUEUE);
        assert_eq!(backlog.items.back().unwrap().count, 1);
    }
}
