//! DeviceTwin, the node side of device management: keeps the twins of the devices bound to this
//! node (`spec.nodeName`), answers mappers and apps on the KubeEdge MQTT topics, pushes desired
//! values to mappers as deltas, and writes what mappers report back to `Device.status`.
//!
//! Start reading at [`run`]. Three loops share one [`Inner`] behind a lock:
//! - the MQTT loop (`handle_message`): requests from mappers, answered on the result topics;
//! - the API sync: watches of this node's Devices and of DeviceModels, applied as cloud updates;
//! - the status writer: the outbox of devices whose status changed, written oldest first. The
//!   outbox is in the node's device file, so reports made while the API is unreachable (or
//!   before a restart) are delivered when it answers again.
//!
//! MQTT uses two connections: requests arrive on one, answers leave on the other, so a flood of
//! requests can never stop the answers from being sent (and the other way round).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::eventbus::Endpoint;
use crate::store::{DeviceRecord, Store, StoreError};
use crate::twin::{self, BaseMessage, Desired, MsgTwin, Refusal, TwinDelta, TwinDocument};

pub const DEVICE_PREFIX: &str = "$hw/events/device/";
pub const NODE_PREFIX: &str = "$hw/events/node/";

#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("MQTT: {0}")]
    Mqtt(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// The node's device file.
    pub database: PathBuf,
    /// The broker the twin talks to (the embedded one, or an external one).
    pub broker: Endpoint,
}

pub fn device_resource() -> ApiResource {
    ApiResource {
        group: crate::crd::GROUP.into(),
        version: crate::crd::VERSION.into(),
        api_version: format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
        kind: "Device".into(),
        plural: "devices".into(),
    }
}

pub fn model_resource() -> ApiResource {
    ApiResource {
        group: crate::crd::GROUP.into(),
        version: crate::crd::VERSION.into(),
        api_version: format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
        kind: "DeviceModel".into(),
        plural: "devicemodels".into(),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn event_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// What a request was, from its topic.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    TwinUpdate(&'a str),
    TwinGet(&'a str),
    StateUpdate(&'a str),
    StateGet(&'a str),
    MembershipGet(&'a str),
}

fn parse_topic(topic: &str) -> Option<Request<'_>> {
    if let Some(rest) = topic.strip_prefix(DEVICE_PREFIX) {
        if let Some(id) = rest.strip_suffix("/twin/update") {
            return Some(Request::TwinUpdate(id));
        }
        if let Some(id) = rest.strip_suffix("/twin/get") {
            return Some(Request::TwinGet(id));
        }
        if let Some(id) = rest.strip_suffix("/state/update") {
            return Some(Request::StateUpdate(id));
        }
        if let Some(id) = rest.strip_suffix("/state/get") {
            return Some(Request::StateGet(id));
        }
        return None;
    }
    let rest = topic.strip_prefix(NODE_PREFIX)?;
    rest.strip_suffix("/membership/get")
        .map(Request::MembershipGet)
}

/// The `event_id` of a payload that may not parse as the message it should be.
fn loose_event_id(payload: &[u8]) -> String {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("event_id").and_then(Value::as_str).map(String::from))
        .unwrap_or_default()
}

struct Inner {
    node: String,
    store: Store,
    devices: BTreeMap<String, DeviceRecord>,
    /// DeviceModel specs by `<namespace>/<name>`.
    models: BTreeMap<String, Value>,
    seq: u64,
    out: AsyncClient,
    wake_writer: Arc<Notify>,
}

type Outgoing = Vec<(String, Vec<u8>)>;

impl Inner {
    /// The full id of a device named in a topic: `<namespace>/<name>`, or a bare name (mappers
    /// before KubeEdge 1.17), looked up in `default` first, then in any namespace when only one
    /// device on this node has that name.
    fn resolve(&self, id: &str) -> Option<String> {
        if id.contains('/') {
            return self.devices.contains_key(id).then(|| id.to_string());
        }
        let default = format!("default/{id}");
        if self.devices.contains_key(&default) {
            return Some(default);
        }
        let mut found = self.devices.values().filter(|d| d.name == id);
        match (found.next(), found.next()) {
            (Some(d), None) => Some(d.id()),
            _ => None,
        }
    }

    fn queue_status(&mut self, id: &str) -> Result<(), StoreError> {
        self.seq += 1;
        self.store.queue_status(id, self.seq)?;
        self.wake_writer.notify_one();
        Ok(())
    }

    fn model_of(&self, record: &DeviceRecord) -> Option<&Value> {
        self.models
            .get(&format!("{}/{}", record.namespace, record.model_name()))
    }

    fn membership_entry(&self, d: &DeviceRecord) -> Value {
        json!({
            "id": d.id(),
            "name": d.name,
            "namespace": d.namespace,
            "description": d.description,
            "state": d.state,
            "last_online": d.last_online,
            "twin": d.twins,
            "spec": d.spec,
            "model": {"name": d.model_name(), "spec": self.model_of(d).cloned().unwrap_or(Value::Null)},
        })
    }

    fn membership_updated(&self, added: &[&DeviceRecord], removed: &[&DeviceRecord]) -> Outgoing {
        let payload = json!({
            "event_id": event_id(),
            "timestamp": now_ms(),
            "added_devices": added.iter().map(|d| self.membership_entry(d)).collect::<Vec<_>>(),
            "removed_devices": removed.iter().map(|d| json!({"id": d.id(), "name": d.name, "namespace": d.namespace})).collect::<Vec<_>>(),
        });
        vec![(
            format!("{NODE_PREFIX}{}/membership/updated", self.node),
            payload.to_string().into_bytes(),
        )]
    }

    fn twin_messages(topic_id: &str, d: &DeviceRecord, changes: &twin::Changes) -> Outgoing {
        let mut out = Vec::new();
        let ts = now_ms();
        if !changes.document.is_empty() {
            let doc = TwinDocument {
                base: BaseMessage {
                    event_id: event_id(),
                    timestamp: ts,
                },
                twin: changes.document.clone(),
            };
            out.push((
                format!("{DEVICE_PREFIX}{topic_id}/twin/update/document"),
                serde_json::to_vec(&doc).unwrap_or_default(),
            ));
        }
        let delta = twin::deltas(&d.twins);
        if changes.desired && !delta.is_empty() {
            let msg = TwinDelta {
                base: BaseMessage {
                    event_id: event_id(),
                    timestamp: ts,
                },
                twin: d.twins.clone(),
                delta,
            };
            out.push((
                format!("{DEVICE_PREFIX}{topic_id}/twin/update/delta"),
                serde_json::to_vec(&msg).unwrap_or_default(),
            ));
        }
        out
    }

    /// Answers one MQTT request.
    fn handle_message(&mut self, topic: &str, payload: &[u8]) -> Outgoing {
        let Some(request) = parse_topic(topic) else {
            return Vec::new();
        };
        let now = now_ms();
        let (topic_id, result_topic) = match &request {
            Request::TwinUpdate(id) => (*id, format!("{DEVICE_PREFIX}{id}/twin/update/result")),
            Request::TwinGet(id) => (*id, format!("{DEVICE_PREFIX}{id}/twin/get/result")),
            Request::StateUpdate(id) => (*id, format!("{DEVICE_PREFIX}{id}/state/update/result")),
            Request::StateGet(id) => (*id, format!("{DEVICE_PREFIX}{id}/state/get/result")),
            Request::MembershipGet(node) => {
                if *node != self.node {
                    // Another node's twin answers it (nodes may share an external broker).
                    return Vec::new();
                }
                let devices: Vec<Value> = self
                    .devices
                    .values()
                    .map(|d| self.membership_entry(d))
                    .collect();
                let payload = json!({"event_id": loose_event_id(payload), "timestamp": now, "devices": devices});
                return vec![(
                    format!("{NODE_PREFIX}{node}/membership/get/result"),
                    payload.to_string().into_bytes(),
                )];
            }
        };
        match self.answer(&request, topic_id, payload, now) {
            Ok(out) => out,
            Err(refusal) => {
                if refusal.code >= 500 {
                    tracing::warn!(device = topic_id, "{}", refusal.reason);
                } else {
                    tracing::debug!(device = topic_id, code = refusal.code, "{}", refusal.reason);
                }
                let result = refusal.result(&loose_event_id(payload), now);
                vec![(
                    result_topic,
                    serde_json::to_vec(&result).unwrap_or_default(),
                )]
            }
        }
    }

    fn answer(
        &mut self,
        request: &Request<'_>,
        topic_id: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<Outgoing, Refusal> {
        let id = self.resolve(topic_id).ok_or_else(|| {
            Refusal::not_found(format!(
                "device {topic_id} is not bound to node {}",
                self.node
            ))
        })?;
        let internal = |e: StoreError| Refusal::internal(format!("store the twin: {e}"));
        match request {
            Request::TwinUpdate(_) => {
                let update: twin::TwinUpdate = serde_json::from_slice(payload)
                    .map_err(|e| Refusal::bad_request(format!("malformed twin update: {e}")))?;
                let Some(twins) = update.twin else {
                    return Err(Refusal::bad_request(
                        "malformed twin update: no \"twin\" object",
                    ));
                };
                let record = self.devices.get_mut(&id).expect("resolved");
                let mut next = record.twins.clone();
                let changes = twin::apply_edge_update(&mut next, &twins, now)?;
                let mut updated = record.clone();
                updated.twins = next;
                self.store.put_device(&updated).map_err(internal)?;
                *record = updated.clone();
                if changes.reported || changes.desired {
                    self.queue_status(&id).map_err(internal)?;
                }
                let result = twin::TwinResult {
                    base: BaseMessage {
                        event_id: update.base.event_id.clone(),
                        timestamp: now,
                    },
                    twin: changes.updated.clone(),
                };
                let mut out = vec![(
                    format!("{DEVICE_PREFIX}{topic_id}/twin/update/result"),
                    serde_json::to_vec(&result).unwrap_or_default(),
                )];
                out.extend(Self::twin_messages(topic_id, &updated, &changes));
                Ok(out)
            }
            Request::TwinGet(_) => {
                let record = &self.devices[&id];
                let body = json!({"event_id": loose_event_id(payload), "timestamp": now, "twin": record.twins});
                Ok(vec![(
                    format!("{DEVICE_PREFIX}{topic_id}/twin/get/result"),
                    body.to_string().into_bytes(),
                )])
            }
            Request::StateUpdate(_) => {
                let update: twin::StateUpdate = serde_json::from_slice(payload)
                    .map_err(|e| Refusal::bad_request(format!("malformed state update: {e}")))?;
                let state = update.state.unwrap_or_default();
                if state.is_empty() || state.len() > 64 {
                    return Err(Refusal::bad_request(
                        "state update needs a \"state\" of 1 to 64 bytes, e.g. \"online\"",
                    ));
                }
                let record = self.devices.get_mut(&id).expect("resolved");
                let mut updated = record.clone();
                updated.state = state;
                if updated.state == "online" {
                    updated.last_online =
                        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                }
                // A mapper says "online" every few seconds: the device (and its status) changes
                // when the state does, and otherwise once a minute for lastOnlineTime.
                let stale = |old: &str, new: &str| match (
                    chrono::DateTime::parse_from_rfc3339(old),
                    chrono::DateTime::parse_from_rfc3339(new),
                ) {
                    (Ok(o), Ok(n)) => n.signed_duration_since(o) >= chrono::Duration::seconds(60),
                    _ => old != new,
                };
                let changed = updated.state != record.state
                    || stale(&record.last_online, &updated.last_online);
                if changed {
                    self.store.put_device(&updated).map_err(internal)?;
                    *record = updated.clone();
                    self.queue_status(&id).map_err(internal)?;
                }
                let body = json!({"event_id": update.base.event_id, "timestamp": now,
                    "device": {"name": updated.name, "state": updated.state, "last_online": updated.last_online}});
                Ok(vec![(
                    format!("{DEVICE_PREFIX}{topic_id}/state/update/result"),
                    body.to_string().into_bytes(),
                )])
            }
            Request::StateGet(_) => {
                let d = &self.devices[&id];
                let body = json!({"event_id": loose_event_id(payload), "timestamp": now,
                    "device": {"name": d.name, "state": d.state, "last_online": d.last_online}});
                Ok(vec![(
                    format!("{DEVICE_PREFIX}{topic_id}/state/get/result"),
                    body.to_string().into_bytes(),
                )])
            }
            Request::MembershipGet(_) => Ok(Vec::new()),
        }
    }

    /// The desired values of a Device's spec, typed by its model.
    fn desired(&self, namespace: &str, spec: &Value) -> BTreeMap<String, Option<Desired>> {
        let model = spec
            .pointer("/deviceModelRef/name")
            .and_then(Value::as_str)
            .and_then(|m| self.models.get(&format!("{namespace}/{m}")));
        let kind_of = |name: &str| property_type(model, name).unwrap_or_default();
        let mut out = BTreeMap::new();
        for p in spec
            .get("properties")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(name) = p.get("name").and_then(Value::as_str) else {
                continue;
            };
            let want = p
                .pointer("/desired/value")
                .and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => None,
                    other => Some(other.to_string()),
                })
                .map(|value| Desired {
                    value,
                    kind: kind_of(name),
                });
            out.insert(name.to_string(), want);
        }
        out
    }

    /// A Device as the API serves it (added or changed).
    fn apply_device(&mut self, obj: &DynamicObject) -> Result<Outgoing, StoreError> {
        let namespace = obj.metadata.namespace.clone().unwrap_or_default();
        let name = obj.metadata.name.clone().unwrap_or_default();
        let id = format!("{namespace}/{name}");
        let uid = obj.metadata.uid.clone().unwrap_or_default();
        let generation = obj.metadata.generation.unwrap_or(1);
        let spec = obj.data.get("spec").cloned().unwrap_or(json!({}));
        let mut out = Vec::new();
        // Same name, new object: the old device is gone.
        if let Some(old) = self.devices.get(&id)
            && !old.uid.is_empty()
            && old.uid != uid
        {
            out.extend(self.remove_device(&id)?);
        }
        let existing = self.devices.get(&id).cloned();
        let is_new = existing.is_none();
        let mut record = existing.unwrap_or_else(|| DeviceRecord {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
            ..Default::default()
        });
        if is_new {
            // A device that moved here keeps what its last node reported.
            seed_from_status(&mut record, obj.data.get("status"));
        }
        record.description = obj
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("description").cloned())
            .unwrap_or_default();
        // A spec older than the one applied (a lagging replica's answer) changes nothing.
        if !is_new && generation < record.generation {
            tracing::warn!(
                device = %id,
                "ignoring generation {generation} of the spec: generation {} is applied",
                record.generation
            );
            return Ok(out);
        }
        let spec_changed = record.spec != spec;
        record.spec = spec.clone();
        let desired = self.desired(&namespace, &spec);
        let mut changes = twin::Changes::default();
        match twin::apply_cloud_update(
            &mut record.twins,
            &desired,
            &record.properties,
            generation,
            now_ms(),
        ) {
            Ok(c) => {
                changes = c;
                record.generation = record.generation.max(generation);
                record.properties = desired.keys().cloned().collect();
            }
            Err(refusal) => {
                tracing::warn!(device = %id, "{}", refusal.reason);
            }
        }
        self.store.put_device(&record)?;
        self.devices.insert(id.clone(), record.clone());
        if is_new || spec_changed {
            out.extend(self.membership_updated(&[&record], &[]));
        }
        out.extend(Self::twin_messages(&id, &record, &changes));
        // Write the status when the API's copy differs from the twin's (a value reported while
        // the API was away, a device that just arrived, a status someone else rewrote).
        if status_of(&record, self.model_of(&record)) != served_status(obj) {
            self.queue_status(&id)?;
        }
        Ok(out)
    }

    fn remove_device(&mut self, id: &str) -> Result<Outgoing, StoreError> {
        let Some(record) = self.devices.remove(id) else {
            return Ok(Vec::new());
        };
        self.store.remove_device(id)?;
        tracing::info!(device = %id, "device no longer bound to this node");
        Ok(self.membership_updated(&[], &[&record]))
    }

    /// After a (re-)list: devices the API no longer binds to this node are dropped.
    fn resync_devices(&mut self, present: &BTreeSet<String>) -> Result<Outgoing, StoreError> {
        let gone: Vec<String> = self
            .devices
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for id in gone {
            out.extend(self.remove_device(&id)?);
        }
        Ok(out)
    }

    fn apply_model(&mut self, id: &str, spec: Option<Value>) -> Result<Outgoing, StoreError> {
        let before = self.models.get(id).cloned();
        match &spec {
            Some(s) => {
                self.store.put_model(id, s)?;
                self.models.insert(id.to_string(), s.clone());
            }
            None => {
                self.store.remove_model(id)?;
                self.models.remove(id);
            }
        }
        if before == spec {
            return Ok(Vec::new());
        }
        let users: Vec<DeviceRecord> = self
            .devices
            .values()
            .filter(|d| format!("{}/{}", d.namespace, d.model_name()) == id)
            .cloned()
            .collect();
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<&DeviceRecord> = users.iter().collect();
        Ok(self.membership_updated(&refs, &[]))
    }

    fn resync_models(&mut self, present: &BTreeMap<String, Value>) -> Result<Outgoing, StoreError> {
        let mut out = Vec::new();
        let gone: Vec<String> = self
            .models
            .keys()
            .filter(|k| !present.contains_key(*k))
            .cloned()
            .collect();
        for id in gone {
            out.extend(self.apply_model(&id, None)?);
        }
        for (id, spec) in present {
            out.extend(self.apply_model(id, Some(spec.clone()))?);
        }
        Ok(out)
    }

    async fn send(&self, out: Outgoing) {
        for (topic, payload) in out {
            if let Err(e) = self
                .out
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                tracing::warn!("publish to the MQTT broker: {e}");
            }
        }
    }
}

/// The type a DeviceModel spec gives a property, lower case (`int`, `float`, ...).
fn property_type(model: Option<&Value>, name: &str) -> Option<String> {
    model?
        .get("properties")?
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?
        .get("type")?
        .as_str()
        .map(str::to_lowercase)
}

/// What the status of a device should say.
pub fn status_of(record: &DeviceRecord, model: Option<&Value>) -> Value {
    let kind_of = |name: &str, twin: &MsgTwin| -> String {
        property_type(model, name)
            .or_else(|| twin.metadata.as_ref().map(|m| m.kind.clone()))
            .unwrap_or_default()
    };
    let twins: Vec<Value> = record
        .twins
        .iter()
        .map(|(name, t)| {
            let mut entry = json!({"propertyName": name});
            if let Some(actual) = &t.actual
                && let Some(v) = actual.value()
            {
                let mut meta = json!({"timestamp": actual.timestamp().to_string()});
                let kind = kind_of(name, t);
                if !kind.is_empty() {
                    meta["type"] = json!(kind);
                }
                entry["reported"] = json!({"value": v, "metadata": meta});
            }
            if let Some(expected) = &t.expected
                && let Some(v) = expected.value()
            {
                entry["observedDesired"] = json!({"value": v,
                    "metadata": {"timestamp": expected.timestamp().to_string()}});
            }
            entry
        })
        .collect();
    let mut status = json!({"twins": twins});
    if !record.state.is_empty() {
        status["state"] = json!(record.state);
    }
    if !record.last_online.is_empty() {
        status["lastOnlineTime"] = json!(record.last_online);
    }
    status
}

/// The part of a served status that [`status_of`] writes.
fn served_status(obj: &DynamicObject) -> Value {
    let s = obj.data.get("status").cloned().unwrap_or(json!({}));
    let mut out = json!({"twins": s.get("twins").cloned().unwrap_or(json!([]))});
    for key in ["state", "lastOnlineTime"] {
        if let Some(v) = s.get(key)
            && !v.is_null()
        {
            out[key] = v.clone();
        }
    }
    out
}

fn seed_from_status(record: &mut DeviceRecord, status: Option<&Value>) {
    let Some(status) = status else { return };
    for t in status
        .get("twins")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(name), Some(value)) = (
            t.get("propertyName").and_then(Value::as_str),
            t.pointer("/reported/value").and_then(Value::as_str),
        ) else {
            continue;
        };
        let ts = t
            .pointer("/reported/metadata/timestamp")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let twin = record.twins.entry(name.to_string()).or_default();
        if twin.actual.is_none() {
            twin.actual = Some(twin::TwinValue::new(value, ts));
        }
    }
    if let Some(s) = status.get("state").and_then(Value::as_str) {
        record.state = s.to_string();
    }
    if let Some(s) = status.get("lastOnlineTime").and_then(Value::as_str) {
        record.last_online = s.to_string();
    }
}

/// A handle on a running twin (tests and benchmarks look inside).
#[derive(Clone)]
pub struct DeviceTwin {
    inner: Arc<Mutex<Inner>>,
}

impl DeviceTwin {
    /// The ids of the devices bound to this node.
    pub async fn devices(&self) -> Vec<String> {
        self.inner.lock().await.devices.keys().cloned().collect()
    }

    /// Statuses still to be written to the API.
    pub async fn pending_statuses(&self) -> usize {
        let inner = self.inner.lock().await;
        inner.store.outbox().map(|o| o.len()).unwrap_or(0)
    }
}

fn mqtt_client(broker: &Endpoint, id: &str, capacity: usize) -> (AsyncClient, rumqttc::EventLoop) {
    let mut options = broker.options(id);
    options.set_clean_session(true);
    options.set_inflight(100);
    AsyncClient::new(options, capacity)
}

/// Runs the twin until `shutdown`. Without an API client (`None`) it serves only the devices
/// its file holds: how the crate's own tests run it, and what a node does while offline.
/// `started` is sent once the broker has acknowledged the twin's subscriptions, so a request
/// published after it is answered.
pub async fn run(
    config: Config,
    api: Option<kube::Client>,
    shutdown: CancellationToken,
    started: Option<tokio::sync::oneshot::Sender<DeviceTwin>>,
) -> Result<(), TwinError> {
    let store = Store::open(&config.database)?;
    let devices = store
        .devices()?
        .into_iter()
        .map(|d| (d.id(), d))
        .collect::<BTreeMap<_, _>>();
    let models = store.models()?.into_iter().collect::<BTreeMap<_, _>>();
    let seq = store.outbox()?.last().map(|(_, s)| *s).unwrap_or(0);
    tracing::info!(node = %config.node_name, devices = devices.len(), "device twin starting");

    let node = config.node_name.clone();
    let (out, mut out_loop) = mqtt_client(
        &config.broker,
        &format!("edgesite-devicetwin-{node}-out"),
        1024,
    );
    let (input, mut in_loop) = mqtt_client(
        &config.broker,
        &format!("edgesite-devicetwin-{node}-in"),
        64,
    );
    let wake_writer = Arc::new(Notify::new());
    let inner = Arc::new(Mutex::new(Inner {
        node: node.clone(),
        store,
        devices,
        models,
        seq,
        out,
        wake_writer: wake_writer.clone(),
    }));
    let mut tasks = tokio::task::JoinSet::new();

    // Answers leave on their own connection.
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = out_loop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !failing {
                            tracing::warn!("device twin: MQTT connection (answers): {e}; retrying");
                            failing = true;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
        }
    });

    // Requests.
    let stop = shutdown.clone();
    let handler = inner.clone();
    let node_topic = format!("{NODE_PREFIX}{node}/membership/get");
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel::<()>();
    tasks.spawn(async move {
        let mut failing = false;
        let mut subscribed_tx = Some(subscribed_tx);
        let mut unacked = 0;
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = in_loop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if failing {
                        tracing::info!("device twin: MQTT connection back");
                    }
                    failing = false;
                    // Clean session: subscribe again on every connection.
                    unacked = 0;
                    for filter in [format!("{DEVICE_PREFIX}#"), node_topic.clone()] {
                        match input.try_subscribe(filter, QoS::AtLeastOnce) {
                            Ok(()) => unacked += 1,
                            Err(e) => tracing::warn!("device twin: subscribe: {e}"),
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    unacked -= 1;
                    if unacked == 0
                        && let Some(tx) = subscribed_tx.take()
                    {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let mut inner = handler.lock().await;
                    let out = inner.handle_message(&p.topic, &p.payload);
                    inner.send(out).await;
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!("device twin: MQTT connection (requests): {e}; retrying");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });

    if let Some(api) = api {
        tasks.spawn(watch_devices(inner.clone(), api.clone(), shutdown.clone()));
        tasks.spawn(watch_models(inner.clone(), api.clone(), shutdown.clone()));
        tasks.spawn(write_statuses(
            inner.clone(),
            api,
            wake_writer,
            shutdown.clone(),
        ));
    }
    if let Some(started) = started {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = subscribed => {}
        }
        let _ = started.send(DeviceTwin {
            inner: inner.clone(),
        });
    }
    shutdown.cancelled().await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn watch_devices(inner: Arc<Mutex<Inner>>, api: kube::Client, shutdown: CancellationToken) {
    use kube::runtime::WatchStreamExt;
    let node = inner.lock().await.node.clone();
    let devices: Api<DynamicObject> = Api::all_with(api, &device_resource());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(devices, config).default_backoff().boxed();
    let mut listing = BTreeSet::new();
    let mut failing = false;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = stream.next() => match ev { Some(ev) => ev, None => return },
        };
        let ev = match ev {
            Ok(ev) => {
                failing = false;
                ev
            }
            Err(e) => {
                if !failing {
                    tracing::info!(
                        "device twin: watching Devices: {e}; the twins keep working from the node's file"
                    );
                    failing = true;
                }
                continue;
            }
        };
        let mut inner = inner.lock().await;
        let out = match ev {
            watcher::Event::Init => {
                listing.clear();
                Ok(Vec::new())
            }
            watcher::Event::InitApply(obj) => {
                if let Some(id) = object_id(&obj) {
                    listing.insert(id);
                }
                inner.apply_device(&obj)
            }
            watcher::Event::InitDone => inner.resync_devices(&listing),
            watcher::Event::Apply(obj) => inner.apply_device(&obj),
            watcher::Event::Delete(obj) => match object_id(&obj) {
                Some(id) => inner.remove_device(&id),
                None => Ok(Vec::new()),
            },
        };
        match out {
            Ok(out) => inner.send(out).await,
            Err(e) => tracing::error!("device twin: {e}"),
        }
    }
}

async fn watch_models(inner: Arc<Mutex<Inner>>, api: kube::Client, shutdown: CancellationToken) {
    use kube::runtime::WatchStreamExt;
    let models: Api<DynamicObject> = Api::all_with(api, &model_resource());
    let mut stream = watcher(models, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing = BTreeMap::new();
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = stream.next() => match ev { Some(ev) => ev, None => return },
        };
        let Ok(ev) = ev else { continue };
        let mut inner = inner.lock().await;
        let spec = |obj: &DynamicObject| obj.data.get("spec").cloned().unwrap_or(json!({}));
        let out = match ev {
            watcher::Event::Init => {
                listing.clear();
                Ok(Vec::new())
            }
            watcher::Event::InitApply(obj) => {
                if let Some(id) = object_id(&obj) {
                    listing.insert(id, spec(&obj));
                }
                Ok(Vec::new())
            }
            watcher::Event::InitDone => {
                let present = std::mem::take(&mut listing);
                inner.resync_models(&present)
            }
            watcher::Event::Apply(obj) => match object_id(&obj) {
                Some(id) => inner.apply_model(&id, Some(spec(&obj))),
                None => Ok(Vec::new()),
            },
            watcher::Event::Delete(obj) => match object_id(&obj) {
                Some(id) => inner.apply_model(&id, None),
                None => Ok(Vec::new()),
            },
        };
        match out {
            Ok(out) => inner.send(out).await,
            Err(e) => tracing::error!("device twin: {e}"),
        }
    }
}

fn object_id(obj: &DynamicObject) -> Option<String> {
    Some(format!(
        "{}/{}",
        obj.metadata.namespace.as_deref()?,
        obj.metadata.name.as_deref()?
    ))
}

/// Writes the outbox to the API, oldest first; on a transport failure waits and tries again
/// from the oldest.
async fn write_statuses(
    inner: Arc<Mutex<Inner>>,
    api: kube::Client,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    // Jittered: after an outage the nodes of a site do not all retry at once.
    let mut backoff =
        controllers::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut failing = false;
    loop {
        let outbox = {
            let inner = inner.lock().await;
            inner.store.outbox().unwrap_or_else(|e| {
                tracing::error!("device twin: {e}");
                Vec::new()
            })
        };
        if outbox.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => continue,
            }
        }
        let mut retry = false;
        for (id, seq) in outbox {
            let patch = {
                let inner = inner.lock().await;
                inner.devices.get(&id).map(|d| {
                    (
                        d.namespace.clone(),
                        d.name.clone(),
                        status_of(d, inner.model_of(d)),
                    )
                })
            };
            let Some((namespace, name, status)) = patch else {
                let _ = inner.lock().await.store.status_written(&id, seq);
                continue;
            };
            let devices: Api<DynamicObject> =
                Api::namespaced_with(api.clone(), &namespace, &device_resource());
            let params = PatchParams::default();
            let patch = Patch::Merge(json!({ "status": status }));
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = devices.patch_status(&name, &params, &patch) => r,
            };
            match result {
                Ok(_) => {
                    if failing {
                        tracing::info!(
                            "device twin: API reachable again; delivering queued device statuses"
                        );
                        failing = false;
                    }
                    backoff.reset();
                    let _ = inner.lock().await.store.status_written(&id, seq);
                }
                Err(kube::Error::Api(status)) if status.code < 500 && status.code != 429 => {
                    // The device is gone, or the API refuses this status: retrying cannot help.
                    if status.code != 404 {
                        tracing::warn!(device = %id, "device status refused: {}", status.message);
                    }
                    let _ = inner.lock().await.store.status_written(&id, seq);
                }
                Err(e) => {
                    if !failing {
                        tracing::info!(
                            "device twin: cannot write device status ({e}); queued until the API answers"
                        );
                        failing = true;
                    }
                    retry = true;
                    break;
                }
            }
        }
        if retry {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_wait()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("$hw/events/device/default/fan/twin/update"),
            Some(Request::TwinUpdate("default/fan"))
        );
        assert_eq!(
            parse_topic("$hw/events/device/fan/twin/get"),
            Some(Request::TwinGet("fan"))
        );
        assert_eq!(
            parse_topic("$hw/events/device/fan/twin/update/result"),
            None
        );
        assert_eq!(parse_topic("$hw/events/device/fan/twin/update/delta"), None);
        assert_eq!(
            parse_topic("$hw/events/node/n1/membership/get"),
            Some(Request::MembershipGet("n1"))
        );
        assert_eq!(
            parse_topic("$hw/events/node/n1/membership/get/result"),
            None
        );
    }

    #[test]
    fn status_carries_reported_and_observed_desired() {
        let mut r = DeviceRecord {
            namespace: "default".into(),
            name: "d".into(),
            state: "online".into(),
            ..Default::default()
        };
        r.twins.insert(
            "temp".into(),
            MsgTwin {
                actual: Some(twin::TwinValue::new("23", 5)),
                expected: Some(twin::TwinValue::new("25", 4)),
                ..Default::default()
            },
        );
        let model = json!({"properties": [{"name": "temp", "type": "INT"}]});
        let s = status_of(&r, Some(&model));
        assert_eq!(s["twins"][0]["reported"]["value"], "23");
        assert_eq!(s["twins"][0]["reported"]["metadata"]["type"], "int");
        assert_eq!(s["twins"][0]["observedDesired"]["value"], "25");
        assert_eq!(s["state"], "online");
    }
}
