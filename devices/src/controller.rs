//! The site-side device controller. Nodes receive their devices by watching them (as kubelets
//! receive pods), so what is left for the site is to check each Device against its DeviceModel
//! and its node and say what is wrong where `kubectl describe device` shows it: a Warning Event
//! when a problem appears (model missing, property not in the model, desired value of the wrong
//! type or out of range, desired value on a read-only property, node unknown), a Normal one when
//! the device is bound cleanly and when it moves to another node.
//!
//! [`problems`] is the pure part; [`run`] watches and publishes.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Resource;
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::devicetwin::{device_resource, model_resource};

/// One thing wrong with a device: `(reason, message)`.
pub type Problem = (&'static str, String);

fn check_value(kind: &str, value: &str) -> Result<Option<f64>, String> {
    match kind {
        "INT" => value
            .trim()
            .parse::<i64>()
            .map(|v| Some(v as f64))
            .map_err(|_| format!("{value:?} is not an INT")),
        "FLOAT" | "DOUBLE" => value
            .trim()
            .parse::<f64>()
            .map(Some)
            .map_err(|_| format!("{value:?} is not a {kind}")),
        "BOOLEAN" => match value {
            "true" | "false" => Ok(None),
            _ => Err(format!("{value:?} is not a BOOLEAN (true or false)")),
        },
        _ => Ok(None),
    }
}

/// What is wrong with `device`, given its model (`None`: not found) and whether its node exists.
pub fn problems(device: &Value, model: Option<&Value>, node_exists: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = device.get("spec").unwrap_or(&Value::Null);
    let model_name = spec
        .pointer("/deviceModelRef/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let node = spec.get("nodeName").and_then(Value::as_str).unwrap_or("");
    if node.is_empty() {
        out.push((
            "NodeNotSet",
            "spec.nodeName is empty: no node's mapper serves this device; set it to the node the device is attached to".to_string(),
        ));
    } else if !node_exists {
        out.push((
            "NodeNotFound",
            format!("node {node} does not exist (kubectl get nodes lists the nodes)"),
        ));
    }
    if model_name.is_empty() {
        out.push((
            "DeviceModelNotSet",
            "spec.deviceModelRef.name is empty".to_string(),
        ));
        return out;
    }
    let Some(model) = model else {
        out.push((
            "DeviceModelNotFound",
            format!("device model {model_name} does not exist in this namespace"),
        ));
        return out;
    };
    let model_props: BTreeMap<&str, &Value> = model
        .pointer("/spec/properties")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get("name")?.as_str()?, p)))
        .collect();
    let mut seen = BTreeSet::new();
    for p in spec
        .get("properties")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        if !seen.insert(name) {
            out.push((
                "DuplicateProperty",
                format!("property {name} is listed more than once"),
            ));
            continue;
        }
        let Some(mp) = model_props.get(name) else {
            out.push((
                "UnknownProperty",
                format!("property {name} is not a property of device model {model_name}"),
            ));
            continue;
        };
        let Some(desired) = p.pointer("/desired/value").and_then(Value::as_str) else {
            continue;
        };
        if mp.get("accessMode").and_then(Value::as_str) == Some("ReadOnly") {
            out.push((
                "ReadOnlyProperty",
                format!("property {name} is ReadOnly in model {model_name}: its desired value {desired:?} cannot be written"),
            ));
            continue;
        }
        let kind = mp.get("type").and_then(Value::as_str).unwrap_or("");
        match check_value(kind, desired) {
            Err(e) => out.push((
                "InvalidDesiredValue",
                format!("desired value of {name}: {e}"),
            )),
            Ok(Some(v)) => {
                for (bound, below) in [("minimum", true), ("maximum", false)] {
                    let Some(limit) = mp.get(bound).and_then(|b| match b {
                        Value::String(s) => s.trim().parse::<f64>().ok(),
                        other => other.as_f64(),
                    }) else {
                        continue;
                    };
                    if (below && v < limit) || (!below && v > limit) {
                        out.push((
                            "InvalidDesiredValue",
                            format!("desired value of {name} is {desired}, outside the model's {bound} {limit}"),
                        ));
                    }
                }
            }
            Ok(None) => {}
        }
    }
    out
}

struct State {
    devices: BTreeMap<String, DynamicObject>,
    models: BTreeMap<String, Value>,
    nodes: BTreeSet<String>,
    /// What was last said about each device (by uid): its problems and node.
    said: BTreeMap<String, (Vec<Problem>, String)>,
    /// The devices to judge again at the next reconcile.
    pending: Pending,
}

/// What changed since the last reconcile. A device's own change (its twin's status writes
/// among them, hundreds a second on a busy node) is judged alone; a list, a model or the set of
/// nodes changing judges every device.
enum Pending {
    Devices(BTreeSet<String>),
    All,
}

impl Pending {
    fn device(&mut self, key: String) {
        if let Pending::Devices(keys) = self {
            keys.insert(key);
        }
    }
}

fn key(obj: &DynamicObject) -> String {
    format!(
        "{}/{}",
        obj.metadata.namespace.as_deref().unwrap_or(""),
        obj.metadata.name.as_deref().unwrap_or("")
    )
}

impl State {
    fn reconcile(&mut self, events: &controllers::events::Recorder) {
        match std::mem::replace(&mut self.pending, Pending::Devices(BTreeSet::new())) {
            Pending::Devices(keys) => {
                for key in keys {
                    self.judge(&key, events);
                }
            }
            Pending::All => {
                let keys: Vec<String> = self.devices.keys().cloned().collect();
                for key in &keys {
                    self.judge(key, events);
                }
                let live: BTreeSet<&str> = self
                    .devices
                    .values()
                    .filter_map(|d| d.metadata.uid.as_deref())
                    .collect();
                self.said.retain(|uid, _| live.contains(uid.as_str()));
            }
        }
    }

    /// Checks the device at `k` (if it is still there) and says what changed about it.
    fn judge(&mut self, k: &str, events: &controllers::events::Recorder) {
        use controllers::events::Type;
        let Some(device) = self.devices.get(k) else {
            return;
        };
        let uid = device.metadata.uid.clone().unwrap_or_default();
        let data = &device.data;
        let namespace = k.split('/').next().unwrap_or("");
        let model_name = data
            .pointer("/spec/deviceModelRef/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let model = self.models.get(&format!("{namespace}/{model_name}"));
        let node = data
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let found = problems(data, model, self.nodes.contains(&node));
        let previous = self.said.get(&uid);
        if previous.is_some_and(|(p, n)| *p == found && *n == node) {
            return;
        }
        let reference = device.object_ref(&device_resource());
        let old_problems: &[Problem] = previous.map(|(p, _)| p.as_slice()).unwrap_or(&[]);
        for (reason, message) in &found {
            if !old_problems
                .iter()
                .any(|(r, m)| r == reason && m == message)
            {
                events.publish_ref(reference.clone(), Type::Warning, reason, message.clone());
            }
        }
        if found.is_empty() {
            match previous {
                Some((_, old_node)) if !old_node.is_empty() && *old_node != node => {
                    events.publish_ref(
                        reference.clone(),
                        Type::Normal,
                        "Moved",
                        format!("device moved from node {old_node} to node {node}"),
                    );
                }
                Some((p, _)) if p.is_empty() => {}
                _ => events.publish_ref(
                    reference.clone(),
                    Type::Normal,
                    "Bound",
                    format!("device bound to node {node} with model {model_name}"),
                ),
            }
        }
        self.said.insert(uid, (found, node));
    }
}

enum Change {
    Device(watcher::Event<DynamicObject>),
    Model(watcher::Event<DynamicObject>),
    Node(Box<watcher::Event<Node>>),
}

/// Runs the controller until `shutdown`.
pub async fn run(
    client: kube::Client,
    events: controllers::events::Recorder,
    shutdown: CancellationToken,
) {
    let devices = watcher(
        Api::<DynamicObject>::all_with(client.clone(), &device_resource()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(Change::Device));
    let models = watcher(
        Api::<DynamicObject>::all_with(client.clone(), &model_resource()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(Change::Model));
    let nodes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(|n| Change::Node(Box::new(n))));
    let mut stream = futures::stream::select_all([devices.boxed(), models.boxed(), nodes.boxed()]);
    let mut state = State {
        devices: BTreeMap::new(),
        models: BTreeMap::new(),
        nodes: BTreeSet::new(),
        said: BTreeMap::new(),
        pending: Pending::All,
    };
    // Lists in progress: applied at their InitDone, so a re-list drops what is gone.
    let mut device_list = BTreeMap::new();
    let mut model_list = BTreeMap::new();
    let mut node_list = BTreeSet::new();
    let mut ready = [false; 3];
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = stream.next() => match c { Some(Ok(c)) => c, Some(Err(_)) => continue, None => return },
        };
        match change {
            Change::Device(e) => match e {
                watcher::Event::Init => device_list.clear(),
                watcher::Event::InitApply(o) => {
                    device_list.insert(key(&o), o);
                }
                watcher::Event::InitDone => {
                    state.devices = std::mem::take(&mut device_list);
                    state.pending = Pending::All;
                    ready[0] = true;
                }
                watcher::Event::Apply(o) => {
                    let k = key(&o);
                    state.devices.insert(k.clone(), o);
                    state.pending.device(k);
                }
                watcher::Event::Delete(o) => {
                    state.devices.remove(&key(&o));
                    if let Some(uid) = &o.metadata.uid {
                        state.said.remove(uid);
                    }
                }
            },
            Change::Model(e) => match e {
                watcher::Event::Init => model_list.clear(),
                watcher::Event::InitApply(o) => {
                    model_list.insert(key(&o), o.data);
                }
                watcher::Event::InitDone => {
                    state.models = std::mem::take(&mut model_list);
                    state.pending = Pending::All;
                    ready[1] = true;
                }
                watcher::Event::Apply(o) => {
                    state.models.insert(key(&o), o.data);
                    state.pending = Pending::All;
                }
                watcher::Event::Delete(o) => {
                    state.models.remove(&key(&o));
                    state.pending = Pending::All;
                }
            },
            Change::Node(e) => {
                let name = |n: &Node| n.metadata.name.clone().unwrap_or_default();
                match *e {
                    watcher::Event::Init => node_list.clear(),
                    watcher::Event::InitApply(n) => {
                        node_list.insert(name(&n));
                    }
                    watcher::Event::InitDone => {
                        state.nodes = std::mem::take(&mut node_list);
                        state.pending = Pending::All;
                        ready[2] = true;
                    }
                    // A node's status updates change nothing here: only a node appearing or
                    // going does.
                    watcher::Event::Apply(n) => {
                        if state.nodes.insert(name(&n)) {
                            state.pending = Pending::All;
                        }
                    }
                    watcher::Event::Delete(n) => {
                        if state.nodes.remove(&name(&n)) {
                            state.pending = Pending::All;
                        }
                    }
                }
            }
        }
        // Judge only once all three lists are in: a device is not "without model" just because
        // the models have not been listed yet.
        if ready.iter().all(|r| *r) {
            state.reconcile(&events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> Value {
        json!({"spec": {"protocol": "modbus", "properties": [
            {"name": "temp", "type": "INT", "accessMode": "ReadWrite", "minimum": "1", "maximum": "100"},
            {"name": "label", "type": "STRING", "accessMode": "ReadOnly"}]}})
    }

    fn device(props: Value) -> Value {
        json!({"spec": {"deviceModelRef": {"name": "m"}, "nodeName": "n1", "properties": props}})
    }

    #[test]
    fn a_clean_device_has_no_problems() {
        let d = device(json!([{"name": "temp", "desired": {"value": "30"}}]));
        assert!(problems(&d, Some(&model()), true).is_empty());
    }

    #[test]
    fn problems_are_named() {
        let reasons = |d: &Value, m: Option<&Value>, node: bool| -> Vec<&'static str> {
            problems(d, m, node).into_iter().map(|(r, _)| r).collect()
        };
        let d = device(json!([{"name": "temp", "desired": {"value": "300"}}]));
        assert_eq!(reasons(&d, Some(&model()), true), ["InvalidDesiredValue"]);
        let d = device(json!([{"name": "temp", "desired": {"value": "warm"}}]));
        assert_eq!(reasons(&d, Some(&model()), true), ["InvalidDesiredValue"]);
        let d = device(json!([{"name": "label", "desired": {"value": "x"}}]));
        assert_eq!(reasons(&d, Some(&model()), true), ["ReadOnlyProperty"]);
        let d = device(json!([{"name": "nope"}]));
        assert_eq!(
            reasons(&d, Some(&model()), false),
            ["NodeNotFound", "UnknownProperty"]
        );
        assert_eq!(reasons(&d, None, true), ["DeviceModelNotFound"]);
    }
}
