//! Server-side printing: `meta.k8s.io/v1` Tables with upstream's columns for every built-in kind.
//!
//! `kubectl get` asks for a Table and prints exactly the columns and cells the server sends, so
//! these functions decide what users see. Each kind has a column list and a row function over the
//! JSON object; ages are rendered with upstream's `HumanDuration` rules.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::registry::ResourceInfo;

/// A column: name as upstream spells it (kubectl upper-cases it), type, and priority (1 = wide).
pub struct Column {
    pub name: Cow<'static, str>,
    pub kind: Cow<'static, str>,
    pub priority: i64,
    pub description: Cow<'static, str>,
    pub format: Cow<'static, str>,
}

const fn col(
    name: &'static str,
    kind: &'static str,
    priority: i64,
    description: &'static str,
) -> Column {
    Column {
        name: Cow::Borrowed(name),
        kind: Cow::Borrowed(kind),
        priority,
        description: Cow::Borrowed(description),
        format: Cow::Borrowed(""),
    }
}

/// Evaluates the simple JSONPath of printer columns: `.a.b`, `.a[0]`, `.a[*].b` (first match),
/// `.a[?(@.type=="Ready")].status`, `.a['dotted.key']`.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    let mut node = object;
    let chars: Vec<char> = path.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                let start = i + 1;
                i = start;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                let key: String = chars[start..i].iter().collect();
                if !key.is_empty() {
                    node = node.get(&key)?;
                }
            }
            '[' => {
                let end = chars[i..].iter().position(|c| *c == ']')? + i;
                let inner: String = chars[i + 1..end].iter().collect();
                i = end + 1;
                let inner = inner.trim();
                if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                    let (key, want) = filter.split_once("==")?;
                    let want = want.trim().trim_matches(|c| c == '"' || c == '\'');
                    node = node.as_array()?.iter().find(|item| {
                        item.get(key.trim()).is_some_and(|v| match v {
                            Value::String(s) => s == want,
                            other => {
                                let text = other.to_string();
                                text == want
                            }
                        })
                    })?;
                } else if inner == "*" {
                    node = node.as_array()?.first()?;
                } else if let Ok(n) = inner.parse::<usize>() {
                    node = node.as_array()?.get(n)?;
                } else {
                    let key = inner.trim_matches(|c| c == '"' || c == '\'');
                    node = node.get(key)?;
                }
            }
            _ => return None,
        }
    }
    Some(node)
}

fn custom_cell(kind: &str, value: Option<&Value>, now: DateTime<Utc>) -> Value {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Value::Null;
    };
    match kind {
        "string" => match value {
            Value::String(s) => json!(s),
            other => json!(other.to_string()),
        },
        "integer" => value
            .as_i64()
            .or_else(|| value.as_f64().map(|f| f as i64))
            .map(Value::from)
            .unwrap_or(Value::Null),
        "number" => value.as_f64().map(Value::from).unwrap_or(Value::Null),
        "boolean" => value.as_bool().map(Value::from).unwrap_or(Value::Null),
        "date" => match value.as_str().map(DateTime::parse_from_rfc3339) {
            Some(Ok(t)) => json!(human_duration((now - t.with_timezone(&Utc)).num_seconds())),
            Some(Err(_)) => json!("<invalid>"),
            None => Value::Null,
        },
        _ => Value::Null,
    }
}

const NAME: Column = col(
    "Name",
    "string",
    0,
    "Name must be unique within a namespace.",
);
const AGE: Column = col(
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);
const CREATED_AT: Column = col(
    "Created At",
    "date",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);
const CONTAINERS: Column = col(
    "Containers",
    "string",
    1,
    "Names of each container in the template.",
);
const IMAGES: Column = col(
    "Images",
    "string",
    1,
    "Images referenced by each container in the template.",
);
const SELECTOR: Column = col("Selector", "string", 1, "Label selector.");

/// upstream's `duration.HumanDuration`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{days}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn since(object: &Value, pointer: &str, now: DateTime<Utc>) -> String {
    match object
        .pointer(pointer)
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => human_duration((now - t.with_timezone(&Utc)).num_seconds()),
        None => "<unknown>".into(),
    }
}

fn s<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn n(object: &Value, pointer: &str) -> i64 {
    object.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(text: String) -> String {
    if text.is_empty() {
        "<none>".into()
    } else {
        text
    }
}

fn arr<'a>(object: &'a Value, pointer: &str) -> &'a [Value] {
    object
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn containers_and_images(object: &Value, pointer: &str) -> (String, String) {
    let cs = arr(object, pointer);
    let names: Vec<&str> = cs.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(c, "/image")).collect();
    (names.join(","), images.join(","))
}

/// `metav1.FormatLabelSelector`.
pub fn format_selector(selector: Option<&Value>) -> String {
    let Some(selector) = selector else {
        return "<none>".into();
    };
    let mut parts = Vec::new();
    if let Some(m) = selector.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    for e in arr(selector, "/matchExpressions") {
        let key = s(e, "/key");
        let values: Vec<&str> = arr(e, "/values").iter().filter_map(Value::as_str).collect();
        match s(e, "/operator") {
            "In" => parts.push(format!("{key} in ({})", values.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", values.join(","))),
            "Exists" => parts.push(key.to_string()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    if parts.is_empty() {
        return "<none>".into();
    }
    parts.join(",")
}

fn format_map(map: Option<&Value>) -> String {
    let parts: Vec<String> = map
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    or_none(parts.join(","))
}

fn pod_row(pod: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let statuses = arr(pod, "/status/containerStatuses");
    let total = arr(pod, "/spec/containers").len();
    let ready = statuses.iter().filter(|c| c["ready"] == true).count();
    let mut restarts = 0;
    let mut last_restart: Option<DateTime<Utc>> = None;
    let mut reason = s(pod, "/status/phase").to_string();
    if !s(pod, "/status/reason").is_empty() {
        reason = s(pod, "/status/reason").to_string();
    }
    let mut initializing = false;
    let init_total = arr(pod, "/spec/initContainers").len();
    for (i, c) in arr(pod, "/status/initContainerStatuses").iter().enumerate() {
        restarts += n(c, "/restartCount");
        let terminated = c.pointer("/state/terminated");
        if terminated.is_some_and(|t| n(t, "/exitCode") == 0) {
            continue;
        }
        initializing = true;
        reason = if let Some(t) = terminated {
            if !s(t, "/reason").is_empty() {
                format!("Init:{}", s(t, "/reason"))
            } else if n(t, "/signal") != 0 {
                format!("Init:Signal:{}", n(t, "/signal"))
            } else {
                format!("Init:ExitCode:{}", n(t, "/exitCode"))
            }
        } else if !s(c, "/state/waiting/reason").is_empty()
            && s(c, "/state/waiting/reason") != "PodInitializing"
        {
            format!("Init:{}", s(c, "/state/waiting/reason"))
        } else {
            format!("Init:{i}/{init_total}")
        };
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in statuses.iter().rev() {
            restarts += n(c, "/restartCount");
            if let Some(t) = c
                .pointer("/lastState/terminated/finishedAt")
                .and_then(Value::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            {
                let t = t.with_timezone(&Utc);
                if last_restart.is_none_or(|l| t > l) {
                    last_restart = Some(t);
                }
            }
            if !s(c, "/state/waiting/reason").is_empty() {
                reason = s(c, "/state/waiting/reason").to_string();
            } else if let Some(t) = c.pointer("/state/terminated") {
                reason = if !s(t, "/reason").is_empty() {
                    s(t, "/reason").to_string()
                } else if n(t, "/signal") != 0 {
                    format!("Signal:{}", n(t, "/signal"))
                } else {
                    format!("ExitCode:{}", n(t, "/exitCode"))
                };
            } else if c["ready"] == true && c.pointer("/state/running").is_some() {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if s(pod, "/status/reason") == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    let restarts_cell = match last_restart {
        Some(t) if restarts > 0 => format!(
            "{restarts} ({} ago)",
            human_duration((now - t).num_seconds())
        ),
        _ => restarts.to_string(),
    };
    let gates = arr(pod, "/spec/readinessGates");
    let gates_cell = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let conditions = arr(pod, "/status/conditions");
        let true_count = gates
            .iter()
            .filter(|g| {
                conditions
                    .iter()
                    .any(|c| c["type"] == g["conditionType"] && c["status"] == "True")
            })
            .count();
        format!("{true_count}/{}", gates.len())
    };
    vec![
        json!(s(pod, "/metadata/name")),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts_cell),
        json!(since(pod, "/metadata/creationTimestamp", now)),
        json!(or_none(s(pod, "/status/podIP").to_string())),
        json!(or_none(s(pod, "/spec/nodeName").to_string())),
        json!(or_none(s(pod, "/status/nominatedNodeName").to_string())),
        json!(gates_cell),
    ]
}

fn node_row(node: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let mut status = match arr(node, "/status/conditions")
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| s(c, "/status"))
    {
        // Upstream prints NotReady for both False and Unknown; Unknown only without a condition.
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if node.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = Vec::new();
    if let Some(labels) = node.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                if !role.is_empty() {
                    roles.push(role.to_string());
                }
            } else if k == "kubernetes.io/role" {
                roles.push(v.as_str().unwrap_or_default().to_string());
            }
        }
    }
    roles.sort();
    roles.dedup();
    let address = |kind: &str| {
        or_none(
            arr(node, "/status/addresses")
                .iter()
                .find(|a| a["type"] == kind)
                .map(|a| s(a, "/address").to_string())
                .unwrap_or_default(),
        )
    };
    vec![
        json!(s(node, "/metadata/name")),
        json!(status),
        json!(or_none(roles.join(","))),
        json!(since(node, "/metadata/creationTimestamp", now)),
        json!(s(node, "/status/nodeInfo/kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(or_none(s(node, "/status/nodeInfo/osImage").to_string())),
        json!(or_none(
            s(node, "/status/nodeInfo/kernelVersion").to_string()
        )),
        json!(or_none(
            s(node, "/status/nodeInfo/containerRuntimeVersion").to_string()
        )),
    ]
}

fn service_row(svc: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let kind = s(svc, "/spec/type");
    let kind = if kind.is_empty() { "ClusterIP" } else { kind };
    let cluster_ip = arr(svc, "/spec/clusterIPs")
        .first()
        .and_then(Value::as_str)
        .or(svc.pointer("/spec/clusterIP").and_then(Value::as_str))
        .unwrap_or("")
        .to_string();
    let ingress: Vec<String> = arr(svc, "/status/loadBalancer/ingress")
        .iter()
        .map(|i| {
            let ip = s(i, "/ip");
            if ip.is_empty() {
                s(i, "/hostname").to_string()
            } else {
                ip.to_string()
            }
        })
        .collect();
    let external_ips: Vec<&str> = arr(svc, "/spec/externalIPs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let external = match kind {
        "ClusterIP" | "NodePort" => or_none(external_ips.join(",")),
        "LoadBalancer" => {
            let mut all: Vec<String> = ingress;
            all.extend(external_ips.iter().map(|s| s.to_string()));
            if all.is_empty() {
                "<pending>".into()
            } else {
                all.join(",")
            }
        }
        "ExternalName" => s(svc, "/spec/externalName").to_string(),
        _ => "<unknown>".into(),
    };
    let ports: Vec<String> = arr(svc, "/spec/ports")
        .iter()
        .map(|p| {
            let proto = s(p, "/protocol");
            let proto = if proto.is_empty() { "TCP" } else { proto };
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) if np != 0 => format!("{}:{np}/{proto}", n(p, "/port")),
                _ => format!("{}/{proto}", n(p, "/port")),
            }
        })
        .collect();
    vec![
        json!(s(svc, "/metadata/name")),
        json!(kind),
        json!(or_none(cluster_ip)),
        json!(external),
        json!(or_none(ports.join(","))),
        json!(since(svc, "/metadata/creationTimestamp", now)),
        json!(format_map(svc.pointer("/spec/selector"))),
    ]
}

fn job_status(job: &Value) -> &'static str {
    let conditions = arr(job, "/status/conditions");
    let has = |t: &str| {
        conditions
            .iter()
            .any(|c| c["type"] == t && c["status"] == "True")
    };
    if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if job.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else if has("FailureTarget") {
        "FailureTarget"
    } else if has("SuccessCriteriaMet") {
        "SuccessCriteriaMet"
    } else if has("Suspended") {
        "Suspended"
    } else {
        "Running"
    }
}

fn event_object(e: &Value, prefix: &str) -> String {
    format!(
        "{}/{}",
        s(e, &format!("{prefix}/kind")).to_lowercase(),
        s(e, &format!("{prefix}/name"))
    )
}

fn access_modes(modes: &[Value]) -> String {
    let short: Vec<&str> = modes
        .iter()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect();
    short.join(",")
}

/// The name cell of a row.
fn name_cell(o: &Value) -> Value {
    json!(s(o, "/metadata/name"))
}

/// The age cell of a row.
fn age_cell(o: &Value, now: DateTime<Utc>) -> Value {
    json!(since(o, "/metadata/creationTimestamp", now))
}

/// The two cells most rows start or end with.
fn name_and_age(o: &Value, now: DateTime<Utc>) -> (Value, Value) {
    (name_cell(o), age_cell(o, now))
}

fn created_at(object: &Value) -> Value {
    json!(s(object, "/metadata/creationTimestamp"))
}

/// How a kind prints as a Table (`kubectl get`'s columns), as upstream's table convertors: one
/// value per resource, in [`ResourceInfo::printer`].
pub trait Printer: Send + Sync {
    fn columns(&self) -> Vec<Column>;
    /// The cells of one row, in the order of [`Printer::columns`].
    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value>;
}

/// A resource stored as another one ([`crate::registry::StoredAs`]) prints as that one: its
/// objects in the stored form, with the stored resource's printer (upstream prints every
/// version of a kind with one printer of the internal type).
pub struct ViewPrinter {
    pub inner: Arc<dyn Printer>,
    /// The stored group and resource, and the view's apiVersion.
    pub stored: (String, String),
    pub view: String,
}

impl Printer for ViewPrinter {
    fn columns(&self) -> Vec<Column> {
        self.inner.columns()
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let mut stored = o.clone();
        crate::conversion::to_storage(&self.stored.0, &self.stored.1, &self.view, &mut stored);
        self.inner.row(&stored, now)
    }
}

/// Custom resources: the name, then their version's `additionalPrinterColumns`.
pub struct CustomColumns {
    pub columns: Vec<crate::registry::PrinterColumn>,
}

impl Printer for CustomColumns {
    fn columns(&self) -> Vec<Column> {
        let mut cols = vec![NAME];
        for c in &self.columns {
            cols.push(Column {
                name: Cow::Owned(c.name.clone()),
                kind: Cow::Owned(c.kind.clone()),
                priority: c.priority,
                description: Cow::Owned(if c.description.is_empty() {
                    format!(
                        "Custom resource definition column (in JSONPath format): {}",
                        c.json_path
                    )
                } else {
                    c.description.clone()
                }),
                format: Cow::Owned(c.format.clone()),
            });
        }
        cols
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let mut cells = vec![name_cell(o)];
        for c in &self.columns {
            cells.push(custom_cell(&c.kind, json_path(o, &c.json_path), now));
        }
        cells
    }
}

/// Columns of a kind.
pub fn columns(info: &ResourceInfo) -> Vec<Column> {
    info.printer.columns()
}

/// The cells of one row, in the order of [`columns`].
pub fn row(info: &ResourceInfo, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
    info.printer.row(o, now)
}

/// The table of pods.
pub struct PodsTable;

impl Printer for PodsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            col(
                "IP",
                "string",
                1,
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            col(
                "Node",
                "string",
                1,
                "NodeName is a request to schedule this pod onto a specific node.",
            ),
            col(
                "Nominated Node",
                "string",
                1,
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
            ),
            col(
                "Readiness Gates",
                "string",
                1,
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        pod_row(o, now)
    }
}

/// The table of nodes.
pub struct NodesTable;

impl Printer for NodesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            AGE,
            col(
                "Version",
                "string",
                0,
                "Kubelet Version reported by the node.",
            ),
            col(
                "Internal-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "External-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "OS-Image",
                "string",
                1,
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            col(
                "Kernel-Version",
                "string",
                1,
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            col(
                "Container-Runtime",
                "string",
                1,
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        node_row(o, now)
    }
}

/// The table of namespaces.
pub struct NamespacesTable;

impl Printer for NamespacesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Status", "string", 0, "The status of the namespace"),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        vec![name, json!(s(o, "/status/phase")), age]
    }
}

/// The table of services.
pub struct ServicesTable;

impl Printer for ServicesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Type",
                "string",
                0,
                "type determines how the Service is exposed.",
            ),
            col(
                "Cluster-IP",
                "string",
                0,
                "clusterIP is the IP address of the service and is usually assigned randomly.",
            ),
            col(
                "External-IP",
                "string",
                0,
                "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            col(
                "Port(s)",
                "string",
                0,
                "The list of ports that are exposed by this service.",
            ),
            AGE,
            SELECTOR,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        service_row(o, now)
    }
}

/// The table of configmaps.
pub struct ConfigMapsTable;

impl Printer for ConfigMapsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Data",
                "integer",
                0,
                "Data contains the configuration data.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let count = ["data", "binaryData"]
            .iter()
            .filter_map(|k| o.get(*k).and_then(Value::as_object))
            .map(|m| m.len())
            .sum::<usize>();
        vec![name, json!(count), age]
    }
}

/// The table of secrets.
pub struct SecretsTable;

impl Printer for SecretsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Type", "string", 0, "The type of the secret"),
            col(
                "Data",
                "integer",
                0,
                "The number of entries in the data map",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let count = o
            .get("data")
            .and_then(Value::as_object)
            .map(|m| m.len())
            .unwrap_or(0);
        vec![name, json!(s(o, "/type")), json!(count), age]
    }
}

/// The table of serviceaccounts.
pub struct ServiceAccountsTable;

impl Printer for ServiceAccountsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Secrets",
                "string",
                0,
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        vec![name, json!(arr(o, "/secrets").len().to_string()), age]
    }
}

/// The table of endpoints.
pub struct EndpointsTable;

impl Printer for EndpointsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Endpoints",
                "string",
                0,
                "Endpoints is the list of endpoints.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let mut list = Vec::new();
        for subset in arr(o, "/subsets") {
            for a in arr(subset, "/addresses") {
                let ports = arr(subset, "/ports");
                if ports.is_empty() {
                    list.push(s(a, "/ip").to_string());
                }
                for p in ports {
                    list.push(format!("{}:{}", s(a, "/ip"), n(p, "/port")));
                }
            }
        }
        let text = if list.len() > 3 {
            format!("{} + {} more...", list[..3].join(","), list.len() - 3)
        } else {
            list.join(",")
        };
        vec![name, json!(or_none(text)), age]
    }
}

/// The table of events.
pub struct CoreEventsTable;

impl Printer for CoreEventsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            col("Last Seen", "string", 0, "Time when last event occurred."),
            col(
                "Type",
                "string",
                0,
                "Type of this event (Normal, Warning), new types could be added in the future.",
            ),
            col(
                "Reason",
                "string",
                0,
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col(
                "Object",
                "string",
                0,
                "The object that this event is about.",
            ),
            col(
                "Subobject",
                "string",
                1,
                "The subobject that this event is about.",
            ),
            col("Source", "string", 1, "The component reporting this event."),
            col(
                "Message",
                "string",
                0,
                "A human-readable description of the status of this operation.",
            ),
            col(
                "First Seen",
                "string",
                1,
                "The time at which the event was first recorded.",
            ),
            col(
                "Count",
                "string",
                1,
                "The number of times this event has occurred.",
            ),
            col(
                "Name",
                "string",
                1,
                "Name must be unique within a namespace.",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let name = name_cell(o);

        let last = if !s(o, "/lastTimestamp").is_empty() {
            since(o, "/lastTimestamp", now)
        } else if !s(o, "/eventTime").is_empty() {
            since(o, "/eventTime", now)
        } else {
            since(o, "/metadata/creationTimestamp", now)
        };
        let first = if !s(o, "/firstTimestamp").is_empty() {
            since(o, "/firstTimestamp", now)
        } else {
            last.clone()
        };
        let source = {
            let c = s(o, "/source/component");
            let c = if c.is_empty() {
                s(o, "/reportingComponent")
            } else {
                c
            };
            let host = s(o, "/source/host");
            if host.is_empty() {
                c.to_string()
            } else {
                format!("{c}, {host}")
            }
        };
        vec![
            json!(last),
            json!(s(o, "/type")),
            json!(s(o, "/reason")),
            json!(event_object(o, "/involvedObject")),
            json!(s(o, "/involvedObject/fieldPath")),
            json!(source),
            json!(s(o, "/message").trim()),
            json!(first),
            json!(o.get("count").and_then(Value::as_i64).unwrap_or(1)),
            name,
        ]
    }
}

/// The table of persistentvolumeclaims.
pub struct PersistentVolumeClaimsTable;

impl Printer for PersistentVolumeClaimsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Status", "string", 0, "Status of the claim."),
            col(
                "Volume",
                "string",
                0,
                "VolumeName is the binding reference to the PersistentVolume backing this claim.",
            ),
            col("Capacity", "string", 0, "Capacity of the volume."),
            col(
                "Access Modes",
                "string",
                0,
                "AccessModes contains the desired access modes the volume should have.",
            ),
            col(
                "StorageClass",
                "string",
                0,
                "StorageClassName of the claim.",
            ),
            col(
                "VolumeAttributesClass",
                "string",
                0,
                "VolumeAttributesClassName of the claim.",
            ),
            AGE,
            col(
                "VolumeMode",
                "string",
                1,
                "VolumeMode defines what type of volume is required by the claim.",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let capacity = s(o, "/status/capacity/storage").to_string();
        vec![
            name,
            json!(s(o, "/status/phase")),
            json!(s(o, "/spec/volumeName")),
            json!(capacity),
            json!(access_modes(arr(o, "/status/accessModes"))),
            json!(s(o, "/spec/storageClassName")),
            json!(or_none(s(o, "/spec/volumeAttributesClassName").to_string())),
            age,
            json!(s(o, "/spec/volumeMode")),
        ]
    }
}

/// The table of persistentvolumes.
pub struct PersistentVolumesTable;

impl Printer for PersistentVolumesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Capacity", "string", 0, "Capacity of the volume."),
            col(
                "Access Modes",
                "string",
                0,
                "AccessModes contains all ways the volume can be mounted.",
            ),
            col(
                "Reclaim Policy",
                "string",
                0,
                "What happens to a persistent volume when released from its claim.",
            ),
            col(
                "Status",
                "string",
                0,
                "Phase indicates if a volume is available, bound to a claim, or released by a claim.",
            ),
            col(
                "Claim",
                "string",
                0,
                "ClaimRef is part of a bi-directional binding between PersistentVolume and PersistentVolumeClaim.",
            ),
            col(
                "StorageClass",
                "string",
                0,
                "StorageClassName of the volume.",
            ),
            col(
                "VolumeAttributesClass",
                "string",
                0,
                "VolumeAttributesClassName of the volume.",
            ),
            col(
                "Reason",
                "string",
                0,
                "Reason is a brief CamelCase string that describes any failure.",
            ),
            AGE,
            col(
                "VolumeMode",
                "string",
                1,
                "VolumeMode defines what type of volume is required.",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let claim = if s(o, "/spec/claimRef/name").is_empty() {
            String::new()
        } else {
            format!(
                "{}/{}",
                s(o, "/spec/claimRef/namespace"),
                s(o, "/spec/claimRef/name")
            )
        };
        vec![
            name,
            json!(s(o, "/spec/capacity/storage")),
            json!(access_modes(arr(o, "/spec/accessModes"))),
            json!(s(o, "/spec/persistentVolumeReclaimPolicy")),
            json!(s(o, "/status/phase")),
            json!(claim),
            json!(s(o, "/spec/storageClassName")),
            json!(or_none(s(o, "/spec/volumeAttributesClassName").to_string())),
            json!(s(o, "/status/reason")),
            age,
            json!(s(o, "/spec/volumeMode")),
        ]
    }
}

/// The table of limitranges, customresourcedefinitions, roles and clusterroles: name and
/// creation time.
pub struct NameAndCreationTable;

impl Printer for NameAndCreationTable {
    fn columns(&self) -> Vec<Column> {
        vec![NAME, CREATED_AT]
    }

    fn row(&self, o: &Value, _now: DateTime<Utc>) -> Vec<Value> {
        let name = name_cell(o);
        vec![name, created_at(o)]
    }
}

/// The table of resourcequotas.
pub struct ResourceQuotasTable;

impl Printer for ResourceQuotasTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            AGE,
            col(
                "Request",
                "string",
                0,
                "Request represents a minimum amount of cpu/memory that a container may consume.",
            ),
            col(
                "Limit",
                "string",
                0,
                "Limits control the maximum amount of cpu/memory that a container may use independent of contention on the node.",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let mut requests = Vec::new();
        let mut limits = Vec::new();
        if let Some(hard) = o.pointer("/status/hard").and_then(Value::as_object) {
            for (k, v) in hard {
                let used = o
                    .pointer(&format!("/status/used/{}", k.replace('/', "~1")))
                    .and_then(Value::as_str)
                    .unwrap_or("0");
                let text = format!("{k}: {used}/{}", v.as_str().unwrap_or_default());
                if k.starts_with("limits.") {
                    limits.push(text);
                } else {
                    requests.push(text);
                }
            }
        }
        vec![
            name,
            age,
            json!(requests.join(", ")),
            json!(limits.join(", ")),
        ]
    }
}

/// The table of apps/deployments.
pub struct DeploymentsTable;

impl Printer for DeploymentsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Ready", "string", 0, "Number of the pod with ready state"),
            col(
                "Up-to-date",
                "integer",
                0,
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
            ),
            col(
                "Available",
                "integer",
                0,
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        let template_ci = |pointer: &str| containers_and_images(o, pointer);

        let (c, i) = template_ci("/spec/template/spec/containers");
        vec![
            name,
            json!(format!(
                "{}/{}",
                n(o, "/status/readyReplicas"),
                n(o, "/spec/replicas")
            )),
            json!(n(o, "/status/updatedReplicas")),
            json!(n(o, "/status/availableReplicas")),
            age,
            json!(c),
            json!(i),
            json!(format_selector(o.pointer("/spec/selector"))),
        ]
    }
}

/// The table of apps/replicasets.
pub struct ReplicaSetsTable;

impl Printer for ReplicaSetsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Desired",
                "integer",
                0,
                "Replicas is the number of desired replicas.",
            ),
            col(
                "Current",
                "integer",
                0,
                "Replicas is the most recently observed number of replicas.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "The number of ready replicas for this replica set.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        let template_ci = |pointer: &str| containers_and_images(o, pointer);

        let (c, i) = template_ci("/spec/template/spec/containers");
        vec![
            name,
            json!(n(o, "/spec/replicas")),
            json!(n(o, "/status/replicas")),
            json!(n(o, "/status/readyReplicas")),
            age,
            json!(c),
            json!(i),
            json!(format_selector(o.pointer("/spec/selector"))),
        ]
    }
}

/// The table of apps/daemonsets.
pub struct DaemonSetsTable;

impl Printer for DaemonSetsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Desired",
                "integer",
                0,
                "The total number of nodes that should be running the daemon pod.",
            ),
            col(
                "Current",
                "integer",
                0,
                "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready.",
            ),
            col(
                "Up-to-date",
                "integer",
                0,
                "The total number of nodes that are running updated daemon pod",
            ),
            col(
                "Available",
                "integer",
                0,
                "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available.",
            ),
            col(
                "Node Selector",
                "string",
                0,
                "NodeSelector is a selector which must be true for the pod to fit on a node.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        let template_ci = |pointer: &str| containers_and_images(o, pointer);

        let (c, i) = template_ci("/spec/template/spec/containers");
        vec![
            name,
            json!(n(o, "/status/desiredNumberScheduled")),
            json!(n(o, "/status/currentNumberScheduled")),
            json!(n(o, "/status/numberReady")),
            json!(n(o, "/status/updatedNumberScheduled")),
            json!(n(o, "/status/numberAvailable")),
            json!(format_map(o.pointer("/spec/template/spec/nodeSelector"))),
            age,
            json!(c),
            json!(i),
            json!(format_selector(o.pointer("/spec/selector"))),
        ]
    }
}

/// The table of apps/statefulsets.
pub struct StatefulSetsTable;

impl Printer for StatefulSetsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Ready", "string", 0, "Number of the pod with ready state"),
            AGE,
            CONTAINERS,
            IMAGES,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        let template_ci = |pointer: &str| containers_and_images(o, pointer);

        let (c, i) = template_ci("/spec/template/spec/containers");
        vec![
            name,
            json!(format!(
                "{}/{}",
                n(o, "/status/readyReplicas"),
                n(o, "/spec/replicas")
            )),
            age,
            json!(c),
            json!(i),
        ]
    }
}

/// The table of apps/controllerrevisions.
pub struct ControllerRevisionsTable;

impl Printer for ControllerRevisionsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Controller", "string", 0, "Controller of the object"),
            col(
                "Revision",
                "integer",
                0,
                "Revision indicates the revision of the state represented by Data.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let owner = arr(o, "/metadata/ownerReferences")
            .iter()
            .find(|r| r["controller"] == true)
            .map(|r| format!("{}/{}", s(r, "/kind").to_lowercase(), s(r, "/name")))
            .unwrap_or_else(|| "<none>".into());
        vec![name, json!(owner), json!(n(o, "/revision")), age]
    }
}

/// The table of batch/jobs.
pub struct JobsTable;

impl Printer for JobsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Status", "string", 0, "Status of the job."),
            col(
                "Completions",
                "string",
                0,
                "The completion status of the job.",
            ),
            col(
                "Duration",
                "string",
                0,
                "Time required to complete the job.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        let template_ci = |pointer: &str| containers_and_images(o, pointer);

        let (c, i) = template_ci("/spec/template/spec/containers");
        let completions = match o.pointer("/spec/completions").and_then(Value::as_i64) {
            Some(total) => format!("{}/{total}", n(o, "/status/succeeded")),
            None => {
                let parallelism = n(o, "/spec/parallelism").max(1);
                if parallelism > 1 {
                    format!("{}/1 of {parallelism}", n(o, "/status/succeeded"))
                } else {
                    format!("{}/1", n(o, "/status/succeeded"))
                }
            }
        };
        let start = o
            .pointer("/status/startTime")
            .and_then(Value::as_str)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
        let end = o
            .pointer("/status/completionTime")
            .and_then(Value::as_str)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(now);
        let duration = start
            .map(|s| human_duration((end - s.with_timezone(&Utc)).num_seconds()))
            .unwrap_or_default();
        vec![
            name,
            json!(job_status(o)),
            json!(completions),
            json!(duration),
            age,
            json!(c),
            json!(i),
            json!(format_selector(o.pointer("/spec/selector"))),
        ]
    }
}

/// The table of batch/cronjobs.
pub struct CronJobsTable;

impl Printer for CronJobsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Schedule", "string", 0, "The schedule in Cron format."),
            col(
                "Timezone",
                "string",
                0,
                "The time zone for the given schedule.",
            ),
            col(
                "Suspend",
                "boolean",
                0,
                "This flag tells the controller to suspend subsequent executions.",
            ),
            col(
                "Active",
                "integer",
                0,
                "A list of pointers to currently running jobs.",
            ),
            col(
                "Last Schedule",
                "string",
                0,
                "Information when was the last time the job was successfully scheduled.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        let template_ci = |pointer: &str| containers_and_images(o, pointer);

        let (c, i) = template_ci("/spec/jobTemplate/spec/template/spec/containers");
        let last = if s(o, "/status/lastScheduleTime").is_empty() {
            "<none>".to_string()
        } else {
            since(o, "/status/lastScheduleTime", now)
        };
        vec![
            name,
            json!(s(o, "/spec/schedule")),
            json!(or_none(s(o, "/spec/timeZone").to_string())),
            json!(
                o.pointer("/spec/suspend")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            ),
            json!(arr(o, "/status/active").len()),
            json!(last),
            age,
            json!(c),
            json!(i),
            json!(format_selector(
                o.pointer("/spec/jobTemplate/spec/selector")
            )),
        ]
    }
}

/// The table of coordination.k8s.io/leases.
pub struct LeasesTable;

impl Printer for LeasesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Holder",
                "string",
                0,
                "holderIdentity contains the identity of the holder of a current lease.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        vec![name, json!(s(o, "/spec/holderIdentity")), age]
    }
}

/// The table of discovery.k8s.io/endpointslices.
pub struct EndpointSlicesTable;

impl Printer for EndpointSlicesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("AddressType", "string", 0, "The IP protocol for this slice"),
            col("Ports", "string", 0, "The ports for this slice"),
            col("Endpoints", "string", 0, "The endpoints for this slice"),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let ports: Vec<String> = arr(o, "/ports")
            .iter()
            .map(|p| n(p, "/port").to_string())
            .collect();
        let addresses: Vec<String> = arr(o, "/endpoints")
            .iter()
            .flat_map(|e| {
                arr(e, "/addresses")
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
            })
            .collect();
        let eps = if addresses.len() > 3 {
            format!(
                "{} + {} more...",
                addresses[..3].join(","),
                addresses.len() - 3
            )
        } else {
            addresses.join(",")
        };
        vec![
            name,
            json!(s(o, "/addressType")),
            json!(if ports.is_empty() {
                "<unset>".to_string()
            } else {
                ports.join(",")
            }),
            json!(if eps.is_empty() {
                "<unset>".to_string()
            } else {
                eps
            }),
            age,
        ]
    }
}

/// The table of policy/poddisruptionbudgets.
pub struct PodDisruptionBudgetsTable;

impl Printer for PodDisruptionBudgetsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Min Available",
                "string",
                0,
                "The minimum number of pods that must be available.",
            ),
            col(
                "Max Unavailable",
                "string",
                0,
                "The maximum number of pods that may be unavailable.",
            ),
            col(
                "Allowed Disruptions",
                "integer",
                0,
                "Calculated number of pods that may be disrupted at this time.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let show = |p: &str| match o.pointer(p) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => "N/A".into(),
        };
        vec![
            name,
            json!(show("/spec/minAvailable")),
            json!(show("/spec/maxUnavailable")),
            json!(n(o, "/status/disruptionsAllowed")),
            age,
        ]
    }
}

/// The table of rbac.authorization.k8s.io/rolebindings, rbac.authorization.k8s.io/clusterrolebindings.
pub struct RoleBindingsTable;

impl Printer for RoleBindingsTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Role", "string", 0, "RoleRef references the role."),
            AGE,
            col("Users", "string", 1, "Users in the binding."),
            col("Groups", "string", 1, "Groups in the binding."),
            col(
                "ServiceAccounts",
                "string",
                1,
                "ServiceAccounts in the binding.",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let subjects = arr(o, "/subjects");
        let of = |kind: &str| {
            subjects
                .iter()
                .filter(|x| x["kind"] == kind)
                .map(|x| {
                    if kind == "ServiceAccount" {
                        format!("{}/{}", s(x, "/namespace"), s(x, "/name"))
                    } else {
                        s(x, "/name").to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        vec![
            name,
            json!(format!(
                "{}/{}",
                s(o, "/roleRef/kind"),
                s(o, "/roleRef/name")
            )),
            age,
            json!(of("User")),
            json!(of("Group")),
            json!(of("ServiceAccount")),
        ]
    }
}

/// The table of storage.k8s.io/storageclasses.
pub struct StorageClassesTable;

impl Printer for StorageClassesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Provisioner",
                "string",
                0,
                "Indicates the type of the provisioner.",
            ),
            col(
                "ReclaimPolicy",
                "string",
                0,
                "Indicates the type of the reclaim policy.",
            ),
            col(
                "VolumeBindingMode",
                "string",
                0,
                "Indicates the type of the volume binding mode.",
            ),
            col(
                "AllowVolumeExpansion",
                "string",
                0,
                "Indicates whether the storage class allow volume expand.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let age = age_cell(o, now);

        let default = o
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .is_some_and(|a| {
                a.get("storageclass.kubernetes.io/is-default-class") == Some(&json!("true"))
                    || a.get("storageclass.beta.kubernetes.io/is-default-class")
                        == Some(&json!("true"))
            });
        let shown = if default {
            format!("{} (default)", s(o, "/metadata/name"))
        } else {
            s(o, "/metadata/name").to_string()
        };
        let reclaim = s(o, "/reclaimPolicy");
        let binding = s(o, "/volumeBindingMode");
        vec![
            json!(shown),
            json!(s(o, "/provisioner")),
            json!(if reclaim.is_empty() {
                "Delete"
            } else {
                reclaim
            }),
            json!(if binding.is_empty() {
                "Immediate"
            } else {
                binding
            }),
            json!(
                o.get("allowVolumeExpansion")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            ),
            age,
        ]
    }
}

/// The table of networking.k8s.io/ingresses.
pub struct IngressesTable;

impl Printer for IngressesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Class",
                "string",
                0,
                "The name of the IngressClass resource that should be used.",
            ),
            col(
                "Hosts",
                "string",
                0,
                "Hosts that incoming requests are matched against before the ingress rule",
            ),
            col(
                "Address",
                "string",
                0,
                "Address is a list containing ingress points for the load-balancer",
            ),
            col(
                "Ports",
                "string",
                0,
                "Ports of TLS configurations that open",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let hosts: Vec<&str> = arr(o, "/spec/rules")
            .iter()
            .map(|r| s(r, "/host"))
            .filter(|h| !h.is_empty())
            .collect();
        let hosts = if hosts.is_empty() {
            "*".to_string()
        } else if hosts.len() > 4 {
            format!("{} + {} more...", hosts[..4].join(","), hosts.len() - 4)
        } else {
            hosts.join(",")
        };
        let addresses: Vec<&str> = arr(o, "/status/loadBalancer/ingress")
            .iter()
            .map(|i| {
                if s(i, "/ip").is_empty() {
                    s(i, "/hostname")
                } else {
                    s(i, "/ip")
                }
            })
            .collect();
        let ports = if arr(o, "/spec/tls").is_empty() {
            "80"
        } else {
            "80, 443"
        };
        let class = s(o, "/spec/ingressClassName");
        vec![
            name,
            json!(if class.is_empty() { "<none>" } else { class }),
            json!(hosts),
            json!(addresses.join(",")),
            json!(ports),
            age,
        ]
    }
}

/// The table of networking.k8s.io/ingressclasses.
pub struct IngressClassesTable;

impl Printer for IngressClassesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Controller",
                "string",
                0,
                "Controller that is responsible for handling this class",
            ),
            col(
                "Parameters",
                "string",
                0,
                "A reference to a resource with additional parameters",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let params = match o.pointer("/spec/parameters") {
            Some(p) => format!("{}/{}", s(p, "/kind"), s(p, "/name")),
            None => "<none>".into(),
        };
        vec![name, json!(s(o, "/spec/controller")), json!(params), age]
    }
}

/// The table of networking.k8s.io/networkpolicies.
pub struct NetworkPoliciesTable;

impl Printer for NetworkPoliciesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Pod-Selector",
                "string",
                0,
                "Selects the pods to which this NetworkPolicy object applies.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let selector = format_selector(o.pointer("/spec/podSelector"));
        vec![name, json!(selector), age]
    }
}

/// The table of node.k8s.io/runtimeclasses.
pub struct RuntimeClassesTable;

impl Printer for RuntimeClassesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Handler",
                "string",
                0,
                "Handler specifies the underlying runtime and configuration that the CRI implementation will use to handle pods of this class.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        vec![name, json!(s(o, "/handler")), age]
    }
}

/// The table of scheduling.k8s.io/priorityclasses.
pub struct PriorityClassesTable;

impl Printer for PriorityClassesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col("Value", "integer", 0, "The value of this priority class."),
            col(
                "Global-Default",
                "boolean",
                0,
                "globalDefault specifies whether this PriorityClass should be considered as the default priority.",
            ),
            AGE,
            col(
                "PreemptionPolicy",
                "string",
                0,
                "PreemptionPolicy is the Policy for preempting pods with lower priority.",
            ),
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let policy = s(o, "/preemptionPolicy");
        vec![
            name,
            json!(n(o, "/value")),
            json!(
                o.get("globalDefault")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            ),
            age,
            json!(if policy.is_empty() {
                "PreemptLowerPriority"
            } else {
                policy
            }),
        ]
    }
}

/// The table of apiregistration.k8s.io/apiservices, as upstream prints it.
pub struct ApiServicesTable;

impl Printer for ApiServicesTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Service",
                "string",
                0,
                "The reference to the service that hosts this API endpoint.",
            ),
            col(
                "Available",
                "string",
                0,
                "Whether this service is available.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);
        let service = match o.pointer("/spec/service") {
            Some(svc) if svc.is_object() => {
                format!("{}/{}", s(svc, "/namespace"), s(svc, "/name"))
            }
            _ => "Local".to_string(),
        };
        let available = arr(o, "/status/conditions")
            .iter()
            .find(|c| c["type"] == "Available")
            .map(|c| {
                let status = s(c, "/status");
                if status == "True" {
                    status.to_string()
                } else {
                    format!("{status} ({})", s(c, "/reason"))
                }
            })
            .unwrap_or_else(|| "Unknown".into());
        vec![name, json!(service), json!(available), age]
    }
}

/// The table of autoscaling/horizontalpodautoscalers.
pub struct HorizontalPodAutoscalersTable;

impl Printer for HorizontalPodAutoscalersTable {
    fn columns(&self) -> Vec<Column> {
        vec![
            NAME,
            col(
                "Reference",
                "string",
                0,
                "Reference to the scaled resource.",
            ),
            col("Targets", "string", 0, "Current and target metric values."),
            col(
                "MinPods",
                "string",
                0,
                "Lower limit for the number of pods that can be set by the autoscaler, default 1.",
            ),
            col(
                "MaxPods",
                "integer",
                0,
                "Upper limit for the number of pods that can be set by the autoscaler.",
            ),
            col(
                "Replicas",
                "integer",
                0,
                "Current number of replicas of pods managed by this autoscaler.",
            ),
            AGE,
        ]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let (name, age) = name_and_age(o, now);

        let target = o
            .pointer("/spec/scaleTargetRef")
            .cloned()
            .unwrap_or(Value::Null);
        let min = o
            .pointer("/spec/minReplicas")
            .and_then(Value::as_i64)
            .map(|m| m.to_string())
            .unwrap_or_else(|| "<unset>".into());
        vec![
            name,
            json!(format!("{}/{}", s(&target, "/kind"), s(&target, "/name"))),
            json!(hpa_metrics(o)),
            json!(min),
            json!(n(o, "/spec/maxReplicas")),
            json!(n(o, "/status/currentReplicas")),
            age,
        ]
    }
}

/// The TARGETS cell of an autoscaler, as upstream prints it: per metric `current/target`
/// (`<unknown>` until the controller has measured it; resources named: `cpu: 12%/50%`), the first
/// two, then `+ N more...`.
fn hpa_metrics(o: &Value) -> String {
    let specs = arr(o, "/spec/metrics");
    if specs.is_empty() {
        return "<none>".into();
    }
    let statuses = arr(o, "/status/currentMetrics");
    let text = |v: Option<&Value>| match v {
        Some(Value::String(q)) => Some(q.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let percent = |v: Option<&Value>| v.and_then(Value::as_i64).map(|p| format!("{p}%"));
    let unknown = || "<unknown>".to_string();
    let cells: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let kind = spec.get("type").and_then(Value::as_str).unwrap_or("");
            // The status entry of the same metric, if the controller wrote one.
            let field = match kind {
                "External" => "external",
                "Pods" => "pods",
                "Object" => "object",
                "Resource" => "resource",
                "ContainerResource" => "containerResource",
                _ => return "<unknown type>".to_string(),
            };
            let source = spec.get(field).unwrap_or(&Value::Null);
            let target = source.get("target").unwrap_or(&Value::Null);
            let current = statuses
                .get(i)
                .and_then(|st| st.get(field))
                .and_then(|st| st.get("current"));
            let current_of =
                |key: &str| text(current.and_then(|c| c.get(key))).unwrap_or_else(unknown);
            match kind {
                "External" | "Object" => match text(target.get("averageValue")) {
                    Some(avg) => format!("{}/{avg} (avg)", current_of("averageValue")),
                    None => format!(
                        "{}/{}",
                        current_of("value"),
                        text(target.get("value")).unwrap_or_default()
                    ),
                },
                "Pods" => format!(
                    "{}/{}",
                    current_of("averageValue"),
                    text(target.get("averageValue")).unwrap_or_default()
                ),
                _ => {
                    let resource = s(source, "/name");
                    match text(target.get("averageValue")) {
                        Some(avg) => format!("{resource}: {}/{avg}", current_of("averageValue")),
                        None => format!(
                            "{resource}: {}/{}",
                            percent(current.and_then(|c| c.get("averageUtilization")))
                                .unwrap_or_else(unknown),
                            percent(target.get("averageUtilization"))
                                .unwrap_or_else(|| "<auto>".into())
                        ),
                    }
                }
            }
        })
        .collect();
    let shown = cells.len().min(2);
    let list = cells[..shown].join(", ");
    if cells.len() > shown {
        format!("{list} + {} more...", cells.len() - shown)
    } else {
        list
    }
}

/// Kinds without columns of their own: name and age.
pub struct NameAndAge;

impl Printer for NameAndAge {
    fn columns(&self) -> Vec<Column> {
        vec![NAME, AGE]
    }

    fn row(&self, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
        vec![
            json!(s(o, "/metadata/name")),
            json!(since(o, "/metadata/creationTimestamp", now)),
        ]
    }
}

/// The printer of a built-in resource.
pub fn printer(group: &str, resource: &str) -> Arc<dyn Printer> {
    match (group, resource) {
        ("", "pods") => Arc::new(PodsTable),
        ("", "nodes") => Arc::new(NodesTable),
        ("", "namespaces") => Arc::new(NamespacesTable),
        ("", "services") => Arc::new(ServicesTable),
        ("", "configmaps") => Arc::new(ConfigMapsTable),
        ("", "secrets") => Arc::new(SecretsTable),
        ("", "serviceaccounts") => Arc::new(ServiceAccountsTable),
        ("", "endpoints") => Arc::new(EndpointsTable),
        ("", "events") => Arc::new(CoreEventsTable),
        ("", "persistentvolumeclaims") => Arc::new(PersistentVolumeClaimsTable),
        ("", "persistentvolumes") => Arc::new(PersistentVolumesTable),
        ("", "limitranges")
        | ("apiextensions.k8s.io", "customresourcedefinitions")
        | ("rbac.authorization.k8s.io", "roles" | "clusterroles") => Arc::new(NameAndCreationTable),
        ("", "resourcequotas") => Arc::new(ResourceQuotasTable),
        ("apps", "deployments") => Arc::new(DeploymentsTable),
        ("apps", "replicasets") => Arc::new(ReplicaSetsTable),
        ("apps", "daemonsets") => Arc::new(DaemonSetsTable),
        ("apps", "statefulsets") => Arc::new(StatefulSetsTable),
        ("apps", "controllerrevisions") => Arc::new(ControllerRevisionsTable),
        ("batch", "jobs") => Arc::new(JobsTable),
        ("batch", "cronjobs") => Arc::new(CronJobsTable),
        ("coordination.k8s.io", "leases") => Arc::new(LeasesTable),
        ("discovery.k8s.io", "endpointslices") => Arc::new(EndpointSlicesTable),
        ("policy", "poddisruptionbudgets") => Arc::new(PodDisruptionBudgetsTable),
        ("rbac.authorization.k8s.io", "rolebindings")
        | ("rbac.authorization.k8s.io", "clusterrolebindings") => Arc::new(RoleBindingsTable),
        ("storage.k8s.io", "storageclasses") => Arc::new(StorageClassesTable),
        ("networking.k8s.io", "ingresses") => Arc::new(IngressesTable),
        ("networking.k8s.io", "ingressclasses") => Arc::new(IngressClassesTable),
        ("networking.k8s.io", "networkpolicies") => Arc::new(NetworkPoliciesTable),
        ("node.k8s.io", "runtimeclasses") => Arc::new(RuntimeClassesTable),
        ("scheduling.k8s.io", "priorityclasses") => Arc::new(PriorityClassesTable),
        ("apiregistration.k8s.io", "apiservices") => Arc::new(ApiServicesTable),
        ("autoscaling", "horizontalpodautoscalers") => Arc::new(HorizontalPodAutoscalersTable),
        _ => Arc::new(NameAndAge),
    }
}

/// `PartialObjectMetadata` of an object, the default `object` of a Table row.
pub fn partial_metadata(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// Which object a row carries: `includeObject=None|Metadata|Object`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// The one-row Table of a single object (get, and each event of a Table watch).
pub fn object_table(info: &ResourceInfo, object: &Value, now: DateTime<Utc>) -> Value {
    let rv = s(object, "/metadata/resourceVersion");
    table(info, &[object], IncludeObject::Metadata, rv, None, now)
}

/// A full Table for a list of objects.
pub fn table(
    info: &ResourceInfo,
    objects: &[&Value],
    include: IncludeObject,
    resource_version: &str,
    continue_token: Option<&str>,
    now: DateTime<Utc>,
) -> Value {
    let column_definitions: Vec<Value> = columns(info)
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.kind,
                "format": if c.name == "Name" && c.priority == 0 && c.format.is_empty() { "name" } else { c.format.as_ref() },
                "description": c.description,
                "priority": c.priority,
            })
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut r = json!({"cells": row(info, o, now)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => r["object"] = partial_metadata(o),
                IncludeObject::Object => r["object"] = (*o).clone(),
            }
            r
        })
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": column_definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn durations_like_upstream() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(400 * 86400), "400d");
        assert_eq!(human_duration(3 * 365 * 86400 + 86400), "3y1d");
    }

    #[test]
    fn every_row_matches_its_columns() {
        let registry = Registry::new();
        let sample = json!({"metadata": {"name": "x", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c", "image": "i"}], "ports": [{"port": 80, "protocol": "TCP"}]}});
        for info in registry.all() {
            assert_eq!(
                columns(&info).len(),
                row(&info, &sample, Utc::now()).len(),
                "{}",
                info.resource
            );
        }
    }

    #[test]
    fn json_paths() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]},
            "metadata": {"labels": {"app.kubernetes.io/name": "x"}}, "spec": {"list": [3, 4]}});
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(json_path(&o, ".spec.list[1]"), Some(&json!(4)));
        assert_eq!(
            json_path(&o, ".metadata.labels['app.kubernetes.io/name']"),
            Some(&json!("x"))
        );
        assert_eq!(json_path(&o, ".spec.missing"), None);
        assert_eq!(json_path(&o, ".spec.list[9]"), None);
    }

    #[test]
    fn pod_status_column() {
        let registry = Registry::new();
        let pods = registry.get("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "a", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}});
        let cells = row(&pods, &pod, Utc::now());
        assert_eq!(cells[1], "0/1");
        assert_eq!(cells[2], "ImagePullBackOff");
        assert_eq!(cells[5], "<none>");
    }

    #[test]
    fn autoscaler_targets_print_as_upstream_prints_them() {
        let hpa = |metrics: Value, current: Value| json!({"spec": {"metrics": metrics}, "status": {"currentMetrics": current}});
        let cpu = json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": 50}}});
        assert_eq!(
            hpa_metrics(&hpa(json!([cpu]), Value::Null)),
            "cpu: <unknown>/50%"
        );
        let measured = json!([{"type": "Resource", "resource": {"name": "cpu",
            "current": {"averageUtilization": 12, "averageValue": "6m"}}}]);
        assert_eq!(hpa_metrics(&hpa(json!([cpu]), measured)), "cpu: 12%/50%");
        let memory = json!({"type": "Resource", "resource": {"name": "memory",
            "target": {"type": "AverageValue", "averageValue": "100Mi"}}});
        let pods = json!({"type": "Pods", "pods": {"metric": {"name": "qps"},
            "target": {"type": "AverageValue", "averageValue": "1k"}}});
        assert_eq!(
            hpa_metrics(&hpa(json!([memory, pods, cpu]), Value::Null)),
            "memory: <unknown>/100Mi, <unknown>/1k + 1 more..."
        );
        let external = json!({"type": "External", "external": {"metric": {"name": "queue"},
            "target": {"type": "Value", "value": "30"}}});
        assert_eq!(
            hpa_metrics(&hpa(json!([external]), Value::Null)),
            "<unknown>/30"
        );
        assert_eq!(hpa_metrics(&json!({"spec": {}})), "<none>");
    }
}
