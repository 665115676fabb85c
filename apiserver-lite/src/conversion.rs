//! Conversions between the versions of one stored object (see
//! [`crate::registry::StoredAs`]): a resource served in a second form converts on the way out
//! of storage ([`to_view`]) and back in ([`to_storage`]). As upstream, what the other form cannot
//! say travels in annotations, so a write through the older form loses nothing.

use serde_json::{Map, Value, json};

/// `object` (stored as `stored`, `group/resource`) as `view` (an apiVersion) serves it.
pub fn to_view(group: &str, resource: &str, view: &str, object: &mut Value) {
    match (group, resource, view) {
        ("", "events", "events.k8s.io/v1") => core_event_to_events(object),
        ("autoscaling", "horizontalpodautoscalers", "autoscaling/v1") => hpa_v2_to_v1(object),
        _ => {}
    }
}

/// `object` of `view` as it is stored.
pub fn to_storage(group: &str, resource: &str, view: &str, object: &mut Value) {
    match (group, resource, view) {
        ("", "events", "events.k8s.io/v1") => events_to_core_event(object),
        ("autoscaling", "horizontalpodautoscalers", "autoscaling/v1") => hpa_v1_to_v2(object),
        _ => {}
    }
}

/// The fields of a core/v1 Event and their events.k8s.io/v1 names; the others (`eventTime`,
/// `series`, `action`, `reason`, `related`, `reportingInstance`, `type`) are the same in both.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename_fields(object: &mut Value, renames: impl Iterator<Item = (&'static str, &'static str)>) {
    let Some(o) = object.as_object_mut() else {
        return;
    };
    for (from, to) in renames {
        match o.remove(from) {
            Some(v) => {
                o.insert(to.into(), v);
            }
            None => {
                o.remove(to);
            }
        }
    }
}

/// A stored core/v1 Event as events.k8s.io/v1 serves it (upstream's conversion).
fn core_event_to_events(object: &mut Value) {
    rename_fields(object, EVENT_RENAMES.iter().copied());
}

/// An events.k8s.io/v1 Event as core/v1 stores it.
fn events_to_core_event(object: &mut Value) {
    rename_fields(
        object,
        EVENT_RENAMES.iter().map(|(core, new)| (*new, *core)),
    );
}

// autoscaling/v1 HorizontalPodAutoscalers are stored as autoscaling/v2 ones. v1 says only a
// CPU utilization target; upstream carries the rest in these annotations, in v1's shapes.
const METRICS: &str = "autoscaling.alpha.kubernetes.io/metrics";
const CURRENT_METRICS: &str = "autoscaling.alpha.kubernetes.io/current-metrics";
const CONDITIONS: &str = "autoscaling.alpha.kubernetes.io/conditions";
const BEHAVIOR: &str = "autoscaling.alpha.kubernetes.io/behavior";

fn is_cpu_utilization(metric: &Value, target: &str) -> bool {
    metric["type"] == "Resource"
        && metric["resource"]["name"] == "cpu"
        && (target == "current" || metric["resource"][target]["type"] == "Utilization")
        && metric["resource"][target]["averageUtilization"].is_i64()
}

fn set(map: &mut Map<String, Value>, key: &str, value: &Value) {
    if !value.is_null() {
        map.insert(key.into(), value.clone());
    }
}

/// A v2 metric (spec `target` or status `current`) in v1's annotation shape.
fn metric_to_v1(m: &Value, field: &str) -> Value {
    let (util, avg, val) = if field == "target" {
        (
            "targetAverageUtilization",
            "targetAverageValue",
            "targetValue",
        )
    } else {
        (
            "currentAverageUtilization",
            "currentAverageValue",
            "currentValue",
        )
    };
    let kind = m["type"].as_str().unwrap_or_default();
    let mut out = Map::new();
    match kind {
        "Resource" | "ContainerResource" => {
            let key = if kind == "Resource" {
                "resource"
            } else {
                "containerResource"
            };
            let src = &m[key];
            set(&mut out, "name", &src["name"]);
            set(&mut out, "container", &src["container"]);
            set(&mut out, util, &src[field]["averageUtilization"]);
            set(&mut out, avg, &src[field]["averageValue"]);
            return json!({"type": kind, key: out});
        }
        "Pods" => {
            set(&mut out, "metricName", &m["pods"]["metric"]["name"]);
            set(&mut out, "selector", &m["pods"]["metric"]["selector"]);
            set(&mut out, avg, &m["pods"][field]["averageValue"]);
            return json!({"type": kind, "pods": out});
        }
        "Object" => {
            let o = &m["object"];
            set(&mut out, "target", &o["describedObject"]);
            set(&mut out, "metricName", &o["metric"]["name"]);
            set(&mut out, "selector", &o["metric"]["selector"]);
            set(&mut out, val, &o[field]["value"]);
            set(&mut out, "averageValue", &o[field]["averageValue"]);
            return json!({"type": kind, "object": out});
        }
        "External" => {
            let e = &m["external"];
            set(&mut out, "metricName", &e["metric"]["name"]);
            set(&mut out, "metricSelector", &e["metric"]["selector"]);
            set(&mut out, val, &e[field]["value"]);
            set(&mut out, avg, &e[field]["averageValue"]);
            return json!({"type": kind, "external": out});
        }
        _ => {}
    }
    m.clone()
}

/// The inverse of [`metric_to_v1`].
fn metric_to_v2(m: &Value, field: &str) -> Value {
    let spec = field == "target";
    let (util, avg, val) = if spec {
        (
            "targetAverageUtilization",
            "targetAverageValue",
            "targetValue",
        )
    } else {
        (
            "currentAverageUtilization",
            "currentAverageValue",
            "currentValue",
        )
    };
    let kind = m["type"].as_str().unwrap_or_default();
    let mut target = Map::new();
    let typed = |target: &mut Map<String, Value>, t: &str| {
        if spec {
            target.insert("type".into(), json!(t));
        }
    };
    match kind {
        "Resource" | "ContainerResource" => {
            let key = if kind == "Resource" {
                "resource"
            } else {
                "containerResource"
            };
            let src = &m[key];
            if src[util].is_i64() {
                typed(&mut target, "Utilization");
            } else {
                typed(&mut target, "AverageValue");
            }
            set(&mut target, "averageUtilization", &src[util]);
            set(&mut target, "averageValue", &src[avg]);
            let mut out = Map::new();
            set(&mut out, "name", &src["name"]);
            set(&mut out, "container", &src["container"]);
            out.insert(field.into(), Value::Object(target));
            json!({"type": kind, key: out})
        }
        "Pods" => {
            let p = &m["pods"];
            typed(&mut target, "AverageValue");
            set(&mut target, "averageValue", &p[avg]);
            let mut metric = Map::new();
            set(&mut metric, "name", &p["metricName"]);
            set(&mut metric, "selector", &p["selector"]);
            json!({"type": kind, "pods": {"metric": metric, field: target}})
        }
        "Object" => {
            let o = &m["object"];
            typed(
                &mut target,
                if o[val].is_null() {
                    "AverageValue"
                } else {
                    "Value"
                },
            );
            set(&mut target, "value", &o[val]);
            set(&mut target, "averageValue", &o["averageValue"]);
            let mut metric = Map::new();
            set(&mut metric, "name", &o["metricName"]);
            set(&mut metric, "selector", &o["selector"]);
            json!({"type": kind, "object": {"describedObject": o["target"], "metric": metric, field: target}})
        }
        "External" => {
            let e = &m["external"];
            typed(
                &mut target,
                if e[val].is_null() {
                    "AverageValue"
                } else {
                    "Value"
                },
            );
            set(&mut target, "value", &e[val]);
            set(&mut target, "averageValue", &e[avg]);
            let mut metric = Map::new();
            set(&mut metric, "name", &e["metricName"]);
            set(&mut metric, "selector", &e["metricSelector"]);
            json!({"type": kind, "external": {"metric": metric, field: target}})
        }
        _ => m.clone(),
    }
}

fn annotations(object: &mut Value) -> &mut Map<String, Value> {
    let meta = object
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
    let meta = match meta {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata is an object"),
    };
    match meta.entry("annotations").or_insert_with(|| json!({})) {
        Value::Object(a) => a,
        other => {
            *other = json!({});
            other.as_object_mut().expect("just set")
        }
    }
}

fn drop_empty_annotations(object: &mut Value) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut)
        && meta
            .get("annotations")
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
    {
        meta.remove("annotations");
    }
}

/// A stored autoscaling/v2 HorizontalPodAutoscaler as autoscaling/v1 serves it.
fn hpa_v2_to_v1(object: &mut Value) {
    let spec = object.get("spec").cloned().unwrap_or(json!({}));
    let status = object.get("status").cloned();
    let metrics = spec["metrics"].as_array().cloned().unwrap_or_default();
    let cpu = metrics.iter().find(|m| is_cpu_utilization(m, "target"));
    let others: Vec<Value> = metrics
        .iter()
        .filter(|m| !is_cpu_utilization(m, "target"))
        .map(|m| metric_to_v1(m, "target"))
        .collect();
    let mut v1 = Map::new();
    for key in ["scaleTargetRef", "minReplicas", "maxReplicas"] {
        set(&mut v1, key, &spec[key]);
    }
    if let Some(cpu) = cpu {
        v1.insert(
            "targetCPUUtilizationPercentage".into(),
            cpu["resource"]["target"]["averageUtilization"].clone(),
        );
    }
    {
        let a = annotations(object);
        if !others.is_empty() {
            a.insert(METRICS.into(), json!(Value::Array(others).to_string()));
        }
        if !spec["behavior"].is_null() {
            a.insert(BEHAVIOR.into(), json!(spec["behavior"].to_string()));
        }
    }
    if let Some(status) = status {
        let mut s = Map::new();
        for key in [
            "observedGeneration",
            "lastScaleTime",
            "currentReplicas",
            "desiredReplicas",
        ] {
            set(&mut s, key, &status[key]);
        }
        let current = status["currentMetrics"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(cpu) = current.iter().find(|m| is_cpu_utilization(m, "current")) {
            s.insert(
                "currentCPUUtilizationPercentage".into(),
                cpu["resource"]["current"]["averageUtilization"].clone(),
            );
        }
        let others: Vec<Value> = current
            .iter()
            .filter(|m| !is_cpu_utilization(m, "current"))
            .map(|m| metric_to_v1(m, "current"))
            .collect();
        let a = annotations(object);
        if !others.is_empty() {
            a.insert(
                CURRENT_METRICS.into(),
                json!(Value::Array(others).to_string()),
            );
        }
        if let Some(c) = status["conditions"].as_array().filter(|c| !c.is_empty()) {
            a.insert(
                CONDITIONS.into(),
                json!(Value::Array(c.clone()).to_string()),
            );
        }
        object["status"] = Value::Object(s);
    }
    drop_empty_annotations(object);
    object["spec"] = Value::Object(v1);
}

fn taken_json(object: &mut Value, key: &str) -> Option<Value> {
    let text = annotations(object).remove(key)?;
    serde_json::from_str(text.as_str()?).ok()
}

/// An autoscaling/v1 HorizontalPodAutoscaler as autoscaling/v2 stores it.
fn hpa_v1_to_v2(object: &mut Value) {
    let spec = object.get("spec").cloned().unwrap_or(json!({}));
    let mut metrics = Vec::new();
    if let Some(p) = spec["targetCPUUtilizationPercentage"].as_i64() {
        metrics.push(json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": p}}}));
    }
    if let Some(Value::Array(more)) = taken_json(object, METRICS) {
        metrics.extend(more.iter().map(|m| metric_to_v2(m, "target")));
    }
    let behavior = taken_json(object, BEHAVIOR);
    let mut v2 = Map::new();
    for key in ["scaleTargetRef", "minReplicas", "maxReplicas"] {
        set(&mut v2, key, &spec[key]);
    }
    if !metrics.is_empty() {
        v2.insert("metrics".into(), Value::Array(metrics));
    }
    if let Some(b) = behavior {
        v2.insert("behavior".into(), b);
    }
    let current_more = taken_json(object, CURRENT_METRICS);
    let conditions = taken_json(object, CONDITIONS);
    if let Some(status) = object.get("status").cloned() {
        let mut s = Map::new();
        for key in [
            "observedGeneration",
            "lastScaleTime",
            "currentReplicas",
            "desiredReplicas",
        ] {
            set(&mut s, key, &status[key]);
        }
        let mut current = Vec::new();
        if let Some(p) = status["currentCPUUtilizationPercentage"].as_i64() {
            current.push(json!({"type": "Resource", "resource": {"name": "cpu",
                "current": {"averageUtilization": p}}}));
        }
        if let Some(Value::Array(more)) = current_more {
            current.extend(more.iter().map(|m| metric_to_v2(m, "current")));
        }
        if !current.is_empty() {
            s.insert("currentMetrics".into(), Value::Array(current));
        }
        if let Some(c) = conditions {
            s.insert("conditions".into(), c);
        }
        object["status"] = Value::Object(s);
    }
    drop_empty_annotations(object);
    object["spec"] = Value::Object(v2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_autoscaler_round_trips_through_v1_without_loss() {
        let v2 = json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 1, "maxReplicas": 4,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}},
                    {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "100Mi"}}},
                    {"type": "Pods", "pods": {"metric": {"name": "qps"}, "target": {"type": "AverageValue", "averageValue": "10"}}},
                    {"type": "External", "external": {"metric": {"name": "queue"}, "target": {"type": "Value", "value": "30"}}},
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}},
            },
            "status": {
                "currentReplicas": 2, "desiredReplicas": 2,
                "currentMetrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 12}}},
                ],
                "conditions": [{"type": "AbleToScale", "status": "True"}],
            },
        });
        let mut v1 = v2.clone();
        hpa_v2_to_v1(&mut v1);
        assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
        assert_eq!(v1["status"]["currentCPUUtilizationPercentage"], 12);
        assert!(v1["spec"].get("metrics").is_none());
        let annotated: Value =
            serde_json::from_str(v1["metadata"]["annotations"][METRICS].as_str().unwrap()).unwrap();
        assert_eq!(annotated[0]["resource"]["targetAverageValue"], "100Mi");
        assert_eq!(annotated[1]["pods"]["metricName"], "qps");
        assert_eq!(annotated[2]["external"]["targetValue"], "30");
        let mut back = v1.clone();
        hpa_v1_to_v2(&mut back);
        // apiVersion/kind are set by the registry, not here.
        assert_eq!(back["spec"], v2["spec"]);
        assert_eq!(back["status"], v2["status"]);
        assert!(back["metadata"].get("annotations").is_none(), "{back}");
    }

    #[test]
    fn a_v1_autoscaler_without_a_target_has_no_metrics() {
        let mut v1 = json!({"metadata": {"name": "a"}, "spec": {"maxReplicas": 3,
            "scaleTargetRef": {"kind": "Deployment", "name": "a"}}});
        hpa_v1_to_v2(&mut v1);
        assert!(v1["spec"].get("metrics").is_none());
        assert_eq!(v1["spec"]["maxReplicas"], 3);
    }
}
