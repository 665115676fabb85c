//! `metrics.k8s.io/v1beta1` (what metrics-server serves upstream): NodeMetrics and PodMetrics
//! built on request from the node agents' usage samples (`GET /stats/summary` on each connected
//! agent), so `kubectl top nodes` and `kubectl top pods` work without installing anything.
//! Nodes or pods without two samples yet (a rate needs two) are left out, as metrics-server
//! does.
//!
//! Also the API server's own request metrics (`/metrics`, Prometheus text):
//! `apiserver_request_total` and `apiserver_request_duration_seconds`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::node_streams::NodeStreams;

pub const GROUP: &str = "metrics.k8s.io";

/// The usage window reported with every figure (the agents' sampling period).
const WINDOW: &str = "10s";

/// Resource usage of a node (`kubectl top node`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeMetrics {
    pub metadata: ObjectMeta,
    pub timestamp: Option<Time>,
    pub window: String,
    pub usage: BTreeMap<String, Quantity>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerMetrics {
    pub name: String,
    pub usage: BTreeMap<String, Quantity>,
}

/// Resource usage of a pod's containers (`kubectl top pod`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetrics {
    pub metadata: ObjectMeta,
    pub timestamp: Option<Time>,
    pub window: String,
    pub containers: Vec<ContainerMetrics>,
}

fn usage(cpu: &Value, memory: &Value) -> Option<Value> {
    let cores = cpu["usageNanoCores"].as_u64()?;
    let bytes = memory["workingSetBytes"].as_u64()?;
    Some(json!({"cpu": format!("{cores}n"), "memory": format!("{}Ki", bytes / 1024)}))
}

/// Asks every connected node agent for its summary (in parallel, briefly).
pub async fn summaries(nodes: &NodeStreams) -> Vec<(String, Value)> {
    let calls = nodes.names().into_iter().filter_map(|name| {
        let connection = nodes.get(&name)?;
        Some(async move {
            let request = Request::builder()
                .method(Method::GET)
                .uri("/stats/summary")
                .body(Body::empty())
                .ok()?;
            let response = tokio::time::timeout(Duration::from_secs(5), connection.call(request))
                .await
                .ok()?
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            let bytes = axum::body::to_bytes(response.into_body(), 16 << 20)
                .await
                .ok()?;
            Some((name, serde_json::from_slice(&bytes).ok()?))
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// NodeMetrics objects from the summaries.
pub fn node_metrics(summaries: &[(String, Value)]) -> Vec<Value> {
    summaries
        .iter()
        .filter_map(|(name, s)| {
            let node = &s["node"];
            let usage = usage(&node["cpu"], &node["memory"])?;
            Some(json!({
                "kind": "NodeMetrics",
                "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": {"name": name, "creationTimestamp": now()},
                "timestamp": node["cpu"]["time"],
                "window": WINDOW,
                "usage": usage,
            }))
        })
        .collect()
}

/// PodMetrics objects from the summaries, with the pods' labels (for selectors) from `labels`.
pub fn pod_metrics(
    summaries: &[(String, Value)],
    labels: &HashMap<(String, String), Value>,
) -> Vec<Value> {
    let mut out = Vec::new();
    for (_, s) in summaries {
        for pod in s["pods"].as_array().into_iter().flatten() {
            let ns = pod["podRef"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = pod["podRef"]["name"].as_str().unwrap_or("").to_string();
            let containers: Option<Vec<Value>> = pod["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| Some(json!({"name": c["name"], "usage": usage(&c["cpu"], &c["memory"])?})))
                .collect();
            let Some(containers) = containers.filter(|c| !c.is_empty()) else {
                continue;
            };
            let mut metadata = json!({"name": name, "namespace": ns, "creationTimestamp": now()});
            if let Some(l) = labels.get(&(ns.clone(), name.clone())) {
                metadata["labels"] = l.clone();
            }
            out.push(json!({
                "kind": "PodMetrics",
                "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": metadata,
                "timestamp": pod["cpu"]["time"],
                "window": WINDOW,
                "containers": containers,
            }));
        }
    }
    out.sort_by(|a, b| {
        let key = |v: &Value| {
            (
                v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                v["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
    out
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

// ---- the API server's request metrics ----

/// Upper bounds (seconds) of the request duration histogram.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct PerResource {
    /// Requests by response code.
    codes: BTreeMap<u16, u64>,
    latency: Histogram,
}

/// Request counters by (verb, resource, code) and durations by (verb, resource). One lock;
/// allocation only the first time a (verb, resource) pair is seen.
#[derive(Default)]
pub struct RequestMetrics {
    by: Mutex<BTreeMap<&'static str, HashMap<String, PerResource>>>,
}

impl RequestMetrics {
    pub fn record(&self, verb: &'static str, resource: &str, code: u16, seconds: f64) {
        let mut by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        let resources = by.entry(verb).or_default();
        if !resources.contains_key(resource) {
            resources.insert(resource.to_string(), PerResource::default());
        }
        let Some(entry) = resources.get_mut(resource) else {
            return;
        };
        *entry.codes.entry(code).or_default() += 1;
        // Long-running requests (watches, streams) would only blur the latency figures.
        if matches!(verb, "WATCH" | "CONNECT") {
            return;
        }
        let h = &mut entry.latency;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(&str, &str, &PerResource)> = by
            .iter()
            .flat_map(|(verb, rs)| rs.iter().map(move |(r, e)| (*verb, r.as_str(), e)))
            .collect();
        rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut out = String::from(
            "# HELP apiserver_request_total Counter of apiserver requests broken out by verb, resource and HTTP response code.\n# TYPE apiserver_request_total counter\n",
        );
        for (verb, resource, e) in &rows {
            for (code, n) in &e.codes {
                out.push_str(&format!(
                    "apiserver_request_total{{code=\"{code}\",resource=\"{resource}\",verb=\"{verb}\"}} {n}\n"
                ));
            }
        }
        out.push_str("# HELP apiserver_request_duration_seconds Response latency distribution in seconds for each verb and resource.\n# TYPE apiserver_request_duration_seconds histogram\n");
        for (verb, resource, e) in rows
            .iter()
            .filter(|(verb, _, _)| !matches!(*verb, "WATCH" | "CONNECT"))
        {
            let h = &e.latency;
            let labels = format!("resource=\"{resource}\",verb=\"{verb}\"");
            for (i, bound) in BUCKETS.iter().enumerate() {
                out.push_str(&format!(
                    "apiserver_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}\n",
                    h.counts[i]
                ));
            }
            out.push_str(&format!(
                "apiserver_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n",
                h.count
            ));
            out.push_str(&format!(
                "apiserver_request_duration_seconds_sum{{{labels}}} {}\n",
                h.sum
            ));
            out.push_str(&format!(
                "apiserver_request_duration_seconds_count{{{labels}}} {}\n",
                h.count
            ));
        }
        out
    }
}

/// The verb upstream's metrics use for a request.
pub fn verb_of(
    method: &Method,
    query: Option<&str>,
    named: bool,
    subresource: Option<&str>,
) -> &'static str {
    let watch = query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes())
            .any(|(k, v)| k == "watch" && matches!(v.as_ref(), "true" | "1" | "True"))
    });
    if matches!(
        subresource,
        Some("exec" | "attach" | "portforward" | "proxy" | "log")
    ) {
        return "CONNECT";
    }
    match *method {
        Method::GET if watch => "WATCH",
        Method::GET if named => "GET",
        Method::GET => "LIST",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE if named => "DELETE",
        Method::DELETE => "DELETECOLLECTION",
        _ => "OTHER",
    }
}

pub fn prometheus_response(text: String) -> axum::response::Response {
    axum::response::Response::builder()
        .status(StatusCode::OK)
        .header(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .body(Body::from(text))
        .unwrap_or_default()
}

/// Shared handle.
pub type Shared = Arc<RequestMetrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_become_metrics_objects() {
        let s = json!({
            "node": {"nodeName": "n", "cpu": {"time": "2026-11-22T10:00:00Z", "usageNanoCores": 250_000_000u64}, "memory": {"workingSetBytes": 2_097_152u64}},
            "pods": [
                {"podRef": {"name": "a", "namespace": "ns"}, "cpu": {"time": "2026-11-22T10:00:00Z"},
                 "containers": [{"name": "c", "cpu": {"usageNanoCores": 5}, "memory": {"workingSetBytes": 4096}}]},
                {"podRef": {"name": "young", "namespace": "ns"},
                 "containers": [{"name": "c", "cpu": {}, "memory": {"workingSetBytes": 4096}}]}
            ]
        });
        let summaries = vec![("n".to_string(), s)];
        let nodes = node_metrics(&summaries);
        assert_eq!(
            nodes[0]["usage"],
            json!({"cpu": "250000000n", "memory": "2048Ki"})
        );
        let mut labels = HashMap::new();
        labels.insert(("ns".to_string(), "a".to_string()), json!({"app": "x"}));
        let pods = pod_metrics(&summaries, &labels);
        assert_eq!(pods.len(), 1, "a pod without a rate yet is left out");
        assert_eq!(pods[0]["metadata"]["labels"]["app"], "x");
        assert_eq!(pods[0]["containers"][0]["usage"]["memory"], "4Ki");
        let typed: PodMetrics = serde_json::from_value(pods[0].clone()).unwrap();
        assert_eq!(typed.containers[0].name, "c");
    }

    #[test]
    fn request_metrics_count_and_time() {
        let m = RequestMetrics::default();
        m.record("GET", "pods", 200, 0.003);
        m.record("GET", "pods", 200, 0.3);
        m.record("WATCH", "pods", 200, 30.0);
        let text = m.render();
        assert!(
            text.contains("apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"GET\"} 2")
        );
        assert!(text.contains("apiserver_request_duration_seconds_bucket{resource=\"pods\",verb=\"GET\",le=\"0.005\"} 1"));
        assert!(text.contains(
            "apiserver_request_duration_seconds_count{resource=\"pods\",verb=\"GET\"} 2"
        ));
        assert!(!text.contains("verb=\"WATCH\",le"));
        assert_eq!(verb_of(&Method::GET, Some("watch=1"), false, None), "WATCH");
        assert_eq!(
            verb_of(&Method::DELETE, None, false, None),
            "DELETECOLLECTION"
        );
    }
}
