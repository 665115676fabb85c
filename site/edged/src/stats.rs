//! Resource usage of the node and its containers, for `kubectl top` (through the API server's
//! `metrics.k8s.io`) and for Prometheus.
//!
//! A sampler reads the figures every [`PERIOD`]: the node's CPU time from `/proc/stat` and
//! memory from `/proc/meminfo` (working set = total - available), each container's CPU time and
//! memory working set (usage - inactive file pages) from its cgroup (v1 `cpuacct`/`memory`
//! controllers or the v2 unified hierarchy). CPU usage rates come from the last two samples.
//!
//! Served on the agent's HTTP API as `GET /stats/summary` (the kubelet's Summary API shape, the
//! parts metrics pipelines read) and `GET /metrics/resource` and `GET /metrics` (Prometheus text,
//! the kubelet's resource metric names plus the agent's own).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Agent;
use crate::pod_worker::{
    LABEL_CONTAINER, LABEL_NODE, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
};

pub const PERIOD: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// Cumulative CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// CPU use over the last period, nanocores (None until two samples exist).
    pub nano_cores: Option<u64>,
    pub working_set: u64,
}

#[derive(Clone, Debug)]
pub struct ContainerStats {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub name: String,
    pub usage: Usage,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub time: Option<chrono::DateTime<chrono::Utc>>,
    pub node: Usage,
    pub containers: Vec<ContainerStats>,
}

/// The latest sample, shared with the HTTP handlers.
#[derive(Default)]
pub struct Stats {
    latest: Mutex<Snapshot>,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next()? == key).then(|| parts.next()?.parse().ok())?
    })
}

/// The node's busy CPU time in nanoseconds (`/proc/stat`, USER_HZ = 100).
fn node_cpu_ns() -> u64 {
    let Some(text) = read("/proc/stat") else {
        return 0;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| v.get(*i))
        .sum();
    busy * 10_000_000
}

fn node_working_set() -> u64 {
    let Some(text) = read("/proc/meminfo") else {
        return 0;
    };
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    kb("MemTotal:").saturating_sub(kb("MemAvailable:")) * 1024
}

/// CPU time and working set of one cgroup (relative path), v1 or v2.
fn cgroup_usage(rel: &str) -> Option<(u64, u64)> {
    if let Some(cpu) = read(&format!("/sys/fs/cgroup/cpuacct/{rel}/cpuacct.usage"))
        .and_then(|t| t.trim().parse::<u64>().ok())
    {
        let usage = read(&format!(
            "/sys/fs/cgroup/memory/{rel}/memory.usage_in_bytes"
        ))
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
        let inactive = read(&format!("/sys/fs/cgroup/memory/{rel}/memory.stat"))
            .and_then(|t| stat_value(&t, "total_inactive_file"))
            .unwrap_or(0);
        return Some((cpu, usage.saturating_sub(inactive)));
    }
    let cpu = read(&format!("/sys/fs/cgroup/{rel}/cpu.stat"))
        .and_then(|t| stat_value(&t, "usage_usec"))?
        * 1000;
    let usage = read(&format!("/sys/fs/cgroup/{rel}/memory.current"))
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let inactive = read(&format!("/sys/fs/cgroup/{rel}/memory.stat"))
        .and_then(|t| stat_value(&t, "inactive_file"))
        .unwrap_or(0);
    Some((cpu, usage.saturating_sub(inactive)))
}

fn rate(prev: Option<&(u64, Instant)>, now_ns: u64, at: Instant) -> Option<u64> {
    let (was, then) = prev?;
    let dt = at.duration_since(*then).as_nanos() as u64;
    (dt > 0).then(|| now_ns.saturating_sub(*was).saturating_mul(1_000_000_000) / dt)
}

/// Samples every [`PERIOD`] until shutdown.
pub async fn run(agent: Arc<Agent>, shutdown: CancellationToken) {
    let mut previous: HashMap<String, (u64, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let at = Instant::now();
        let node_cpu = node_cpu_ns();
        let node = Usage {
            cpu_ns: node_cpu,
            nano_cores: rate(previous.get(""), node_cpu, at),
            working_set: node_working_set(),
        };
        let mut seen: HashMap<String, (u64, Instant)> = HashMap::new();
        seen.insert(String::new(), (node_cpu, at));
        let mut containers = Vec::new();
        let node_name = agent.config.node_name.clone();
        let listed = agent
            .runtime
            .list_containers(&[(LABEL_NODE, &node_name)])
            .await
            .unwrap_or_default();
        for c in listed {
            let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
            let uid = label(LABEL_POD_UID);
            let rel = format!(
                "{}/pod{uid}/{}",
                agent.config.cgroup_root.trim_matches('/'),
                c.id
            );
            // Only containers that run now have a cgroup.
            let Some((cpu, working_set)) = cgroup_usage(&rel) else {
                continue;
            };
            containers.push(ContainerStats {
                namespace: label(LABEL_POD_NAMESPACE),
                pod: label(LABEL_POD_NAME),
                uid,
                name: label(LABEL_CONTAINER),
                usage: Usage {
                    cpu_ns: cpu,
                    nano_cores: rate(previous.get(&c.id), cpu, at),
                    working_set,
                },
            });
            seen.insert(c.id.clone(), (cpu, at));
        }
        previous = seen;
        *agent.stats.latest.lock().unwrap_or_else(|e| e.into_inner()) = Snapshot {
            time: Some(chrono::Utc::now()),
            node,
            containers,
        };
    }
}

fn usage_json(u: &Usage, time: &str) -> (Value, Value) {
    let mut cpu = json!({"time": time, "usageCoreNanoSeconds": u.cpu_ns});
    if let Some(n) = u.nano_cores {
        cpu["usageNanoCores"] = json!(n);
    }
    (cpu, json!({"time": time, "workingSetBytes": u.working_set}))
}

/// The kubelet Summary API's shape (`/stats/summary`), the fields metrics pipelines read.
pub fn summary(node: &str, s: &Snapshot) -> Value {
    let time = s
        .time
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    let (cpu, memory) = usage_json(&s.node, &time);
    let mut pods: Vec<(String, String, String, Vec<&ContainerStats>)> = Vec::new();
    for c in &s.containers {
        match pods.iter_mut().find(|p| p.2 == c.uid) {
            Some(p) => p.3.push(c),
            None => pods.push((c.namespace.clone(), c.pod.clone(), c.uid.clone(), vec![c])),
        }
    }
    let pods: Vec<Value> = pods
        .into_iter()
        .map(|(ns, name, uid, cs)| {
            let total = Usage {
                cpu_ns: cs.iter().map(|c| c.usage.cpu_ns).sum(),
                nano_cores: cs.iter().map(|c| c.usage.nano_cores).sum::<Option<u64>>(),
                working_set: cs.iter().map(|c| c.usage.working_set).sum(),
            };
            let (pcpu, pmem) = usage_json(&total, &time);
            let containers: Vec<Value> = cs
                .iter()
                .map(|c| {
                    let (cpu, memory) = usage_json(&c.usage, &time);
                    json!({"name": c.name, "cpu": cpu, "memory": memory})
                })
                .collect();
            json!({
                "podRef": {"name": name, "namespace": ns, "uid": uid},
                "containers": containers,
                "cpu": pcpu,
                "memory": pmem,
            })
        })
        .collect();
    json!({
        "node": {"nodeName": node, "cpu": cpu, "memory": memory},
        "pods": pods,
    })
}

pub async fn summary_handler(State(agent): State<Arc<Agent>>) -> Response {
    let body = summary(&agent.config.node_name, &agent.stats.snapshot());
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text: the kubelet's resource metrics (`/metrics/resource`).
pub fn resource_metrics(s: &Snapshot) -> String {
    let ms = s.time.map(|t| t.timestamp_millis()).unwrap_or(0);
    let mut out = String::new();
    out.push_str("# HELP node_cpu_usage_seconds_total Cumulative cpu time consumed by the node in core-seconds\n# TYPE node_cpu_usage_seconds_total counter\n");
    out.push_str(&format!(
        "node_cpu_usage_seconds_total {} {ms}\n",
        s.node.cpu_ns as f64 / 1e9
    ));
    out.push_str("# HELP node_memory_working_set_bytes Current working set of the node in bytes\n# TYPE node_memory_working_set_bytes gauge\n");
    out.push_str(&format!(
        "node_memory_working_set_bytes {} {ms}\n",
        s.node.working_set
    ));
    out.push_str("# HELP container_cpu_usage_seconds_total Cumulative cpu time consumed by the container in core-seconds\n# TYPE container_cpu_usage_seconds_total counter\n");
    for c in &s.containers {
        out.push_str(&format!(
            "container_cpu_usage_seconds_total{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {} {ms}\n",
            escape(&c.name),
            escape(&c.namespace),
            escape(&c.pod),
            c.usage.cpu_ns as f64 / 1e9
        ));
    }
    out.push_str("# HELP container_memory_working_set_bytes Current working set of the container in bytes\n# TYPE container_memory_working_set_bytes gauge\n");
    for c in &s.containers {
        out.push_str(&format!(
            "container_memory_working_set_bytes{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {} {ms}\n",
            escape(&c.name),
            escape(&c.namespace),
            escape(&c.pod),
            c.usage.working_set
        ));
    }
    let mut pods: Vec<(&str, &str, u64, u64)> = Vec::new();
    for c in &s.containers {
        match pods.iter_mut().find(|p| p.0 == c.namespace && p.1 == c.pod) {
            Some(p) => {
                p.2 += c.usage.cpu_ns;
                p.3 += c.usage.working_set;
            }
            None => pods.push((&c.namespace, &c.pod, c.usage.cpu_ns, c.usage.working_set)),
        }
    }
    out.push_str("# HELP pod_cpu_usage_seconds_total Cumulative cpu time consumed by the pod in core-seconds\n# TYPE pod_cpu_usage_seconds_total counter\n");
    for (ns, pod, cpu, _) in &pods {
        out.push_str(&format!(
            "pod_cpu_usage_seconds_total{{namespace=\"{}\",pod=\"{}\"}} {} {ms}\n",
            escape(ns),
            escape(pod),
            *cpu as f64 / 1e9
        ));
    }
    out.push_str("# HELP pod_memory_working_set_bytes Current working set of the pod in bytes\n# TYPE pod_memory_working_set_bytes gauge\n");
    for (ns, pod, _, mem) in &pods {
        out.push_str(&format!(
            "pod_memory_working_set_bytes{{namespace=\"{}\",pod=\"{}\"}} {mem} {ms}\n",
            escape(ns),
            escape(pod)
        ));
    }
    out
}

/// Prometheus text in cAdvisor's form (`/metrics/cadvisor`): per container (and per pod, with
/// an empty `container`, and the node as `id="/"`) the CPU and memory series Prometheus and
/// dashboards read.
pub fn cadvisor_metrics(s: &Snapshot) -> String {
    let ms = s.time.map(|t| t.timestamp_millis()).unwrap_or(0);
    let mut out = String::new();
    let labels = |c: &ContainerStats| {
        format!(
            "container=\"{}\",id=\"/kubepods/pod{}/{}\",image=\"\",name=\"{}\",namespace=\"{}\",pod=\"{}\"",
            escape(&c.name),
            escape(&c.uid),
            escape(&c.name),
            escape(&c.name),
            escape(&c.namespace),
            escape(&c.pod)
        )
    };
    let node = "container=\"\",id=\"/\",image=\"\",name=\"\",namespace=\"\",pod=\"\"";
    out.push_str("# HELP container_cpu_usage_seconds_total Cumulative cpu time consumed in seconds.\n# TYPE container_cpu_usage_seconds_total counter\n");
    out.push_str(&format!(
        "container_cpu_usage_seconds_total{{cpu=\"total\",{node}}} {} {ms}\n",
        s.node.cpu_ns as f64 / 1e9
    ));
    for c in &s.containers {
        out.push_str(&format!(
            "container_cpu_usage_seconds_total{{cpu=\"total\",{}}} {} {ms}\n",
            labels(c),
            c.usage.cpu_ns as f64 / 1e9
        ));
    }
    out.push_str("# HELP container_memory_working_set_bytes Current working set in bytes.\n# TYPE container_memory_working_set_bytes gauge\n");
    out.push_str(&format!(
        "container_memory_working_set_bytes{{{node}}} {} {ms}\n",
        s.node.working_set
    ));
    for c in &s.containers {
        out.push_str(&format!(
            "container_memory_working_set_bytes{{{}}} {} {ms}\n",
            labels(c),
            c.usage.working_set
        ));
    }
    out
}

const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn cadvisor_handler(State(agent): State<Arc<Agent>>) -> Response {
    (
        [(header::CONTENT_TYPE, PROMETHEUS)],
        cadvisor_metrics(&agent.stats.snapshot()),
    )
        .into_response()
}

/// `/pods`: the pods bound to this node as the agent knows them (its cache: it answers offline
/// too), a v1 PodList as the kubelet's.
pub async fn pods_handler(State(agent): State<Arc<Agent>>) -> Response {
    let pods = agent.meta.pods(&agent.config.node_name);
    let list = serde_json::json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": pods,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        list.to_string(),
    )
        .into_response()
}

pub async fn resource_handler(State(agent): State<Arc<Agent>>) -> Response {
    (
        [(header::CONTENT_TYPE, PROMETHEUS)],
        resource_metrics(&agent.stats.snapshot()),
    )
        .into_response()
}

/// `/metrics`: the resource metrics plus the agent's own state.
pub async fn metrics_handler(State(agent): State<Arc<Agent>>) -> Response {
    let mut out = resource_metrics(&agent.stats.snapshot());
    out.push_str("# HELP edgesite_agent_api_reachable Whether the node agent reaches the API server (0 while it runs from its cache)\n# TYPE edgesite_agent_api_reachable gauge\n");
    out.push_str(&format!(
        "edgesite_agent_api_reachable {}\n",
        u8::from(agent.meta.online())
    ));
    out.push_str("# HELP edgesite_agent_queued_pod_statuses Pod statuses waiting for the API server\n# TYPE edgesite_agent_queued_pod_statuses gauge\n");
    out.push_str(&format!(
        "edgesite_agent_queued_pod_statuses {}\n",
        agent.meta.queued_statuses()
    ));
    out.push_str("# HELP edgesite_agent_cached_pods Pods in the node cache\n# TYPE edgesite_agent_cached_pods gauge\n");
    out.push_str(&format!(
        "edgesite_agent_cached_pods {}\n",
        agent.meta.pods(&agent.config.node_name).len()
    ));
    ([(header::CONTENT_TYPE, PROMETHEUS)], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_group_containers_by_pod_and_rates_need_two_samples() {
        let t0 = Instant::now();
        assert_eq!(rate(None, 5, t0), None);
        let later = t0 + Duration::from_secs(2);
        // 1 s of CPU over 2 s: half a core.
        assert_eq!(
            rate(Some(&(0, t0)), 1_000_000_000, later),
            Some(500_000_000)
        );
        let c = |name: &str, uid: &str, cores: Option<u64>| ContainerStats {
            namespace: "ns".into(),
            pod: format!("pod-{uid}"),
            uid: uid.into(),
            name: name.into(),
            usage: Usage {
                cpu_ns: 10,
                nano_cores: cores,
                working_set: 100,
            },
        };
        let s = Snapshot {
            time: Some(chrono::Utc::now()),
            node: Usage {
                cpu_ns: 1,
                nano_cores: Some(7),
                working_set: 2,
            },
            containers: vec![
                c("a", "1", Some(3)),
                c("b", "1", Some(4)),
                c("a", "2", None),
            ],
        };
        let v = summary("n", &s);
        assert_eq!(v["node"]["cpu"]["usageNanoCores"], 7);
        assert_eq!(v["pods"][0]["cpu"]["usageNanoCores"], 7);
        assert_eq!(v["pods"][0]["memory"]["workingSetBytes"], 200);
        assert_eq!(v["pods"][0]["containers"].as_array().unwrap().len(), 2);
        assert!(v["pods"][1]["cpu"].get("usageNanoCores").is_none());
        let text = resource_metrics(&s);
        assert!(text.contains(
            "container_memory_working_set_bytes{container=\"a\",namespace=\"ns\",pod=\"pod-1\"} 100"
        ));
        assert!(text.contains("pod_memory_working_set_bytes{namespace=\"ns\",pod=\"pod-1\"} 200"));
    }
}
