//! Events (`core/v1`, the API `kubectl describe` and `kubectl get events` read) for what the
//! loops do, with upstream's aggregation of repeats: the same reason and message about the
//! same object within the cache's memory bumps `count` and `lastTimestamp` instead of creating
//! a new Event.
//!
//! Recording never blocks a loop: events go through a bounded channel to one writer task and
//! are dropped (with a debug log) when it is full, as upstream's broadcaster does.

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
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(
            client,
            component.to_string(),
            host,
            rx,
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

async fn write_events(
    client: kube::Client,
    component: String,
    host: Option<String>,
    mut rx: mpsc::Receiver<Record>,
    shutdown: CancellationToken,
) {
    // (uid, kind, namespace, name, type, reason, message) -> (event namespace, event name, count)
    let mut seen: HashMap<Key, (String, String, i32)> = HashMap::new();
    loop {
        let record = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = rx.recv() => match r { Some(r) => r, None => return },
        };
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
        let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
        let t = now();
        if let Some((ns, name, count)) = seen.get_mut(&key) {
            *count += 1;
            let patch = serde_json::json!({"count": *count, "lastTimestamp": Time(t)});
            let api: Api<Event> = Api::namespaced(client.clone(), ns);
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => continue,
                Err(e) => tracing::debug!(error = %e, "aggregate event; creating a new one"),
            }
        }
        let name = format!(
            "{}.{:x}",
            r.name.as_deref().unwrap_or("object"),
            t.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: record.regarding.clone(),
            reason: Some(record.reason.clone()),
            message: Some(record.message.clone()),
            type_: Some(record.kind.as_str().to_string()),
            count: Some(1),
            first_timestamp: Some(Time(t)),
            last_timestamp: Some(Time(t)),
            event_time: None::<MicroTime>,
            source: Some(EventSource {
                component: Some(component.clone()),
                host: host.clone(),
            }),
            reporting_component: Some(component.clone()),
            reporting_instance: Some(component.clone()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {
                if seen.len() >= CACHE {
                    seen.clear();
                }
                seen.insert(key, (namespace, name, 1));
            }
            // The namespace may be going away; events are best effort.
            Err(e) => tracing::debug!(error = %e, reason = %record.reason, "cannot record event"),
        }
    }
}
