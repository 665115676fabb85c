//! From a pod's container to an OCI runtime spec (the `config.json` runc runs).
//!
//! Pure: every input (the pod, the container, the image config, resolved environment, mounts
//! prepared by the volume code, the pod's network namespace) arrives as data, so the mapping
//! of command/args, env, user, capabilities, resources and mounts is unit-tested here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, Pod, SecurityContext};
use serde_json::{Value, json};

use crate::images::RuntimeConfig;
use sitekit::quantity;

/// containerd's default capability set for unprivileged containers.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability, for privileged containers.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A bind mount into the container.
#[derive(Clone, Debug, PartialEq)]
pub struct BindMount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// Everything outside the pod object that the spec needs.
pub struct SpecInput<'a> {
    pub pod: &'a Pod,
    pub container: &'a Container,
    pub image: &'a RuntimeConfig,
    /// Resolved environment (the pod's `env`/`envFrom` after `valueFrom`), in order.
    pub env: Vec<(String, String)>,
    pub mounts: Vec<BindMount>,
    /// `None` for hostNetwork pods.
    pub netns: Option<PathBuf>,
    /// A PID namespace to join instead of a new one: an ephemeral container's target's
    /// (`/proc/<pid>/ns/pid`).
    pub pid_namespace: Option<PathBuf>,
    pub hostname: String,
    /// cgroup path of the container (cgroupfs layout).
    pub cgroup: String,
    /// Numeric user and group, resolved from securityContext or the image's `User`.
    pub uid: u32,
    pub gid: u32,
    pub extra_gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("container {0} has no command: neither the pod nor the image gives one")]
    NoCommand(String),
    #[error("{0}")]
    Invalid(String),
}

/// The process arguments: Kubernetes' command/args over the image's Entrypoint/Cmd.
pub fn process_args(c: &Container, image: &RuntimeConfig) -> Vec<String> {
    let image_entry = image.entrypoint.clone().unwrap_or_default();
    let image_cmd = image.cmd.clone().unwrap_or_default();
    match (&c.command, &c.args) {
        (Some(cmd), Some(args)) if !cmd.is_empty() => cmd.iter().chain(args).cloned().collect(),
        (Some(cmd), None) if !cmd.is_empty() => cmd.clone(),
        (_, Some(args)) => image_entry.iter().chain(args).cloned().collect(),
        _ => image_entry.iter().chain(&image_cmd).cloned().collect(),
    }
}

/// `$(VAR)` expansion as upstream does it for command, args and env values: known variables
/// are replaced, `$$` escapes, unknown references stay as written.
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                b'(' => {
                    if let Some(end) = text[i + 2..].find(')') {
                        let name = &text[i + 2..i + 2 + end];
                        if let Some(v) = vars.get(name) {
                            out.push_str(v);
                        } else {
                            out.push_str(&text[i..i + 3 + end]);
                        }
                        i += 3 + end;
                        continue;
                    }
                }
                _ => {}
            }
        }
        let ch = text[i..].chars().next().unwrap_or('\0');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn caps(sc: Option<&SecurityContext>, privileged: bool) -> Vec<String> {
    if privileged {
        return ALL_CAPS.iter().map(|s| s.to_string()).collect();
    }
    let mut set: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    let norm = |c: &String| {
        let up = c.to_uppercase();
        if up.starts_with("CAP_") {
            up
        } else {
            format!("CAP_{up}")
        }
    };
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        for d in c.drop.iter().flatten() {
            if d.eq_ignore_ascii_case("ALL") {
                set.clear();
            } else {
                let d = norm(d);
                set.retain(|x| *x != d);
            }
        }
        for a in c.add.iter().flatten() {
            if a.eq_ignore_ascii_case("ALL") {
                return ALL_CAPS.iter().map(|s| s.to_string()).collect();
            }
            let a = norm(a);
            if !set.contains(&a) {
                set.push(a);
            }
        }
    }
    set
}

/// CPU shares from a request in millicores (upstream's MilliCPUToShares).
pub fn cpu_shares(milli: i64) -> u64 {
    if milli <= 0 {
        return 2;
    }
    ((milli * 1024) / 1000).max(2) as u64
}

/// OOM score adjustment by QoS class, as the kubelet computes it.
pub fn oom_score_adj(pod: &Pod, c: &Container, memory_capacity: i64) -> i32 {
    match qos_class(pod).as_str() {
        "Guaranteed" => -997,
        "BestEffort" => 1000,
        _ => {
            let request = c
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("memory"))
                .and_then(quantity::units)
                .unwrap_or(0);
            if memory_capacity <= 0 {
                return 999;
            }
            let adj = 1000 - (1000 * request) / memory_capacity;
            adj.clamp(3, 999) as i32
        }
    }
}

/// The pod's QoS class (upstream's rules, over cpu and memory).
pub fn qos_class(pod: &Pod) -> String {
    let Some(spec) = &pod.spec else {
        return "BestEffort".into();
    };
    let mut any = false;
    let mut guaranteed = true;
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let res = c.resources.as_ref();
        let requests = res.and_then(|r| r.requests.clone()).unwrap_or_default();
        let limits = res.and_then(|r| r.limits.clone()).unwrap_or_default();
        for name in ["cpu", "memory"] {
            let req = requests.get(name).or_else(|| limits.get(name));
            let lim = limits.get(name);
            if req.is_some() || lim.is_some() {
                any = true;
            }
            match (req, lim) {
                (Some(r), Some(l)) if quantity::milli(r) == quantity::milli(l) => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort".into()
    } else if guaranteed {
        "Guaranteed".into()
    } else {
        "Burstable".into()
    }
}

/// The OCI runtime spec (JSON) for one container of a pod.
pub fn build(input: &SpecInput<'_>, memory_capacity: i64) -> Result<Value, SpecError> {
    let c = input.container;
    let sc = c.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    let vars: BTreeMap<String, String> = input.env.iter().cloned().collect();
    let args: Vec<String> = process_args(c, input.image)
        .iter()
        .map(|a| expand(a, &vars))
        .collect();
    if args.is_empty() {
        return Err(SpecError::NoCommand(c.name.clone()));
    }
    // The image's environment first, then the pod's (which wins).
    let mut env: Vec<(String, String)> = Vec::new();
    for e in input.image.env.iter().flatten() {
        if let Some((k, v)) = e.split_once('=') {
            env.push((k.to_string(), v.to_string()));
        }
    }
    env.push(("HOSTNAME".into(), input.hostname.clone()));
    for (k, v) in &input.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    let cwd = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| input.image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(SpecError::Invalid(format!(
            "workingDir {cwd:?} of container {} is not an absolute path",
            c.name
        )));
    }
    let capabilities = caps(sc, privileged);
    let no_new_privs = !privileged && sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    let read_only_root = sc
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", if privileged { "rw" } else { "ro" }]}),
    ];
    for m in &input.mounts {
        mounts.push(json!({
            "destination": m.container_path,
            "type": "bind",
            "source": m.host_path,
            "options": ["rbind", "rprivate", if m.read_only { "ro" } else { "rw" }],
        }));
    }

    // hostPID and hostIPC pods keep the host's; an ephemeral container joins its target's PID
    // namespace.
    let pod_spec = input.pod.spec.as_ref();
    let host_pid = pod_spec.and_then(|s| s.host_pid).unwrap_or(false);
    let host_ipc = pod_spec.and_then(|s| s.host_ipc).unwrap_or(false);
    let mut namespaces = vec![json!({"type": "uts"}), json!({"type": "mount"})];
    match &input.pid_namespace {
        Some(path) => namespaces.push(json!({"type": "pid", "path": path})),
        None if !host_pid => namespaces.push(json!({"type": "pid"})),
        None => {}
    }
    if !host_ipc {
        namespaces.push(json!({"type": "ipc"}));
    }
    if let Some(ns) = &input.netns {
        namespaces.push(json!({"type": "network", "path": ns}));
    }

    let resources = c.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.clone()).unwrap_or_default();
    let requests = resources
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    let cpu_request = requests
        .get("cpu")
        .or_else(|| limits.get("cpu"))
        .and_then(quantity::milli)
        .unwrap_or(0);
    let mut cpu = json!({"shares": cpu_shares(cpu_request)});
    if let Some(limit) = limits.get("cpu").and_then(quantity::milli)
        && limit > 0
    {
        let period = 100_000i64;
        cpu["quota"] = json!(((limit * period) / 1000).max(1000));
        cpu["period"] = json!(period);
    }
    let mut linux_resources = json!({
        "devices": [{"allow": privileged, "access": "rwm"}],
        "cpu": cpu,
    });
    if let Some(mem) = limits.get("memory").and_then(quantity::units)
        && mem > 0
    {
        linux_resources["memory"] = json!({"limit": mem, "swap": mem});
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": input.cgroup,
        "resources": linux_resources,
    });
    if !privileged {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }
    if let Some(sysctls) = input
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.sysctls.as_ref())
    {
        let map: serde_json::Map<String, Value> = sysctls
            .iter()
            .map(|s| (s.name.clone(), json!(s.value)))
            .collect();
        linux["sysctl"] = Value::Object(map);
    }

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": input.container.tty.unwrap_or(false),
            "user": {"uid": input.uid, "gid": input.gid, "additionalGids": input.extra_gids},
            "args": args,
            "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": cwd,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "noNewPrivileges": no_new_privs,
            "oomScoreAdj": oom_score_adj(input.pod, c, memory_capacity),
        },
        "root": {"path": "rootfs", "readonly": read_only_root},
        "hostname": input.hostname,
        "mounts": mounts,
        "linux": linux,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(json: Value) -> Container {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn command_and_args_follow_upstream_rules() {
        let image = RuntimeConfig {
            entrypoint: Some(vec!["/entry".into()]),
            cmd: Some(vec!["default".into()]),
            ..Default::default()
        };
        let c = container(json!({"name": "a"}));
        assert_eq!(process_args(&c, &image), ["/entry", "default"]);
        let c = container(json!({"name": "a", "args": ["x"]}));
        assert_eq!(process_args(&c, &image), ["/entry", "x"]);
        let c = container(json!({"name": "a", "command": ["sh"]}));
        assert_eq!(process_args(&c, &image), ["sh"]);
        let c = container(json!({"name": "a", "command": ["sh"], "args": ["-c", "x"]}));
        assert_eq!(process_args(&c, &image), ["sh", "-c", "x"]);
    }

    #[test]
    fn variable_references_expand_like_upstream() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "1-$(B)-$(A)-$");
    }

    #[test]
    fn capabilities_add_and_drop() {
        let sc: SecurityContext = serde_json::from_value(
            json!({"capabilities": {"add": ["NET_ADMIN"], "drop": ["NET_RAW"]}}),
        )
        .unwrap();
        let set = caps(Some(&sc), false);
        assert!(set.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!set.contains(&"CAP_NET_RAW".to_string()));
        let sc: SecurityContext =
            serde_json::from_value(json!({"capabilities": {"drop": ["ALL"]}})).unwrap();
        assert!(caps(Some(&sc), false).is_empty());
    }

    /// The runtime spec of the pod's first container, from an image that runs `sh`.
    fn spec_for(pod: &Pod, netns: Option<PathBuf>, pid_namespace: Option<PathBuf>) -> Value {
        let c = pod.spec.as_ref().unwrap().containers[0].clone();
        let image = RuntimeConfig {
            cmd: Some(vec!["sh".into()]),
            ..Default::default()
        };
        build(
            &SpecInput {
                pod,
                container: &c,
                image: &image,
                env: vec![],
                mounts: vec![],
                netns,
                pid_namespace,
                hostname: "p".into(),
                cgroup: "/edgesite/podx/c".into(),
                uid: 0,
                gid: 0,
                extra_gids: vec![],
            },
            1 << 30,
        )
        .unwrap()
    }

    #[test]
    fn namespaces_follow_host_settings_and_a_target() {
        let spec_of = |pod: Value, pid_namespace: Option<PathBuf>| {
            let pod: Pod = serde_json::from_value(pod).unwrap();
            let spec = spec_for(&pod, None, pid_namespace);
            let mut kinds: Vec<String> = spec["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| match n.get("path") {
                    Some(p) => format!("{}={}", n["type"].as_str().unwrap(), p.as_str().unwrap()),
                    None => n["type"].as_str().unwrap().to_string(),
                })
                .collect();
            kinds.sort();
            kinds
        };
        let plain = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(spec_of(plain.clone(), None), ["ipc", "mount", "pid", "uts"]);
        assert_eq!(
            spec_of(plain, Some("/proc/42/ns/pid".into())),
            ["ipc", "mount", "pid=/proc/42/ns/pid", "uts"]
        );
        let host =
            json!({"spec": {"hostPID": true, "hostIPC": true, "containers": [{"name": "a"}]}});
        assert_eq!(spec_of(host, None), ["mount", "uts"]);
    }

    #[test]
    fn limits_become_cgroup_settings() {
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "a", "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}}}
            ]}}))
            .unwrap();
        let spec = spec_for(&pod, Some("/run/ns".into()), None);
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(spec["linux"]["resources"]["cpu"]["shares"], 512);
        assert_eq!(spec["process"]["oomScoreAdj"], -997);
        assert_eq!(qos_class(&pod), "Guaranteed");
    }
}
