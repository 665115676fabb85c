//! Real containers: each test starts its own containerd (runc, CNI plugins from the OS), a site
//! whose node agent runs on it, and drives it with kubectl. Needs root; run by tests/run.sh.

use std::io::{BufRead, Read, Write};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::node::{BUSYBOX, Registry, Runtime};
use tests::{Site, eventually, free_port};

fn pod(site: &Site, name: &str) -> Value {
    site.json(&["get", "pod", name, "-o", "json"])
}

fn wait_for(site: &Site, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    assert!(
        eventually(timeout, &mut f),
        "timed out waiting for {what}\n{}",
        site.ok(&["get", "pods", "-o", "wide"])
    );
}

fn http_get(addr: &str) -> Option<String> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn apply(site: &Site, yaml: &str) {
    site.ok_stdin(&["apply", "-f", "-"], Some(yaml));
}

fn container_status(site: &Site, name: &str) -> Value {
    pod(site, name)
        .pointer("/status/containerStatuses/0")
        .cloned()
        .unwrap_or(Value::Null)
}

/// Nothing of the node's pods is left: network namespaces, pod IP leases, veths on the node's
/// bridge, hostPort DNAT rules, containerd tasks.
fn assert_no_pod_leftovers(site: &Site, rt: &Runtime) {
    let agent = site.data_dir().join("agent");
    assert!(
        eventually(Duration::from_secs(15), || {
            std::fs::read_dir(agent.join("netns"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
        }),
        "network namespaces left behind"
    );
    let leases: Vec<String> = std::fs::read_dir(agent.join("cni/networks/edgesite"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("10."))
                .collect()
        })
        .unwrap_or_default();
    assert!(leases.is_empty(), "pod IPs still leased: {leases:?}");
    let bridge = rt.bridge(0);
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", &bridge])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(links.trim().is_empty(), "veths still on {bridge}: {links}");
    let nat = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .unwrap();
    let cidr = site.ok(&["get", "node", "node-a", "-o", "jsonpath={.spec.podCIDR}"]);
    let prefix = cidr.rsplit_once('.').unwrap().0.to_string() + ".";
    let leftover: Vec<String> = String::from_utf8_lossy(&nat.stdout)
        .lines()
        .filter(|l| l.contains(&prefix) && l.contains("-j DNAT"))
        .map(String::from)
        .collect();
    assert!(leftover.is_empty(), "hostPort rules left: {leftover:?}");
    let tasks = rt.ctr("node-a", &["tasks", "ls", "-q"]).unwrap();
    assert!(tasks.trim().is_empty(), "tasks left: {tasks}");
}

#[test]
fn a_deployment_runs_real_containers_that_answer_http_on_pod_ips_and_host_ports() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    // The node registers with the host's figures and a lease.
    wait_for(
        &site,
        "the node to be Ready",
        Duration::from_secs(30),
        || {
            // The node is NotFound until the agent registers it.
            site.kubectl(&["get", "node", "node-a"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" Ready "))
        },
    );
    let node = site.json(&["get", "node", "node-a", "-o", "json"]);
    assert!(
        node.pointer("/status/nodeInfo/containerRuntimeVersion")
            .and_then(Value::as_str)
            .unwrap()
            .starts_with("containerd://")
    );
    assert!(node.pointer("/status/capacity/cpu").is_some());
    assert!(node.pointer("/status/capacity/memory").is_some());
    assert!(node.pointer("/status/capacity/ephemeral-storage").is_some());
    assert_eq!(
        node.pointer("/metadata/labels/kubernetes.io~1os")
            .and_then(Value::as_str),
        Some("linux")
    );
    assert!(
        node.pointer("/metadata/labels/node-role.kubernetes.io~1control-plane")
            .is_some()
    );
    let cidr = node
        .pointer("/spec/podCIDR")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    site.ok(&["get", "lease", "-n", "kube-node-lease", "node-a"]);

    apply(
        &site,
        &format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      # busybox httpd as PID 1 ignores SIGTERM: it is killed when the grace period ends.
      terminationGracePeriodSeconds: 2
      containers:
      - name: httpd
        image: {BUSYBOX}
        command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
"#
        ),
    );
    let status = site.ok(&["rollout", "status", "deploy/web", "--timeout=90s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    let pods = site.json(&["get", "pods", "-l", "app=web", "-o", "json"]);
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let prefix = cidr.rsplit_once('.').unwrap().0.to_string();
    for p in items {
        let ip = p.pointer("/status/podIP").and_then(Value::as_str).unwrap();
        assert!(
            ip.starts_with(&prefix),
            "pod IP {ip} outside the node's {cidr}"
        );
        let reply = http_get(&format!("{ip}:8080")).unwrap_or_default();
        assert!(reply.contains("hello from edgesite"), "{reply}");
        let c = &p.pointer("/status/containerStatuses/0").unwrap();
        assert_eq!(c["ready"], true);
        assert!(
            c["containerID"]
                .as_str()
                .unwrap()
                .starts_with("containerd://")
        );
        assert!(c["imageID"].as_str().unwrap().contains("@sha256:"));
        let conditions: Vec<String> = p
            .pointer("/status/conditions")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "True")
            .map(|c| c["type"].as_str().unwrap().to_string())
            .collect();
        for c in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert!(conditions.contains(&c.to_string()), "{conditions:?}");
        }
    }

    // hostPort on the node.
    let host_port = free_port();
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: published}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: httpd
    image: {BUSYBOX}
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    ports: [{{containerPort: 80, hostPort: {host_port}}}]
"#
        ),
    );
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/published",
        "--timeout=60s",
    ]);
    let mut reply = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            reply = http_get(&format!("127.0.0.1:{host_port}")).unwrap_or_default();
            reply.contains("hello from edgesite")
        }),
        "hostPort {host_port}: {reply}"
    );

    // Deleting everything leaves no network namespaces or addresses behind.
    site.ok(&["delete", "deploy/web", "pod/published", "--wait=true"]);
    wait_for(&site, "the pods to go", Duration::from_secs(60), || {
        site.ok(&["get", "pods", "-o", "name"]).trim().is_empty()
    });
    assert_no_pod_leftovers(&site, &rt);
}

#[test]
fn environment_and_volumes_reach_the_container_and_config_updates_propagate() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{mode: fast, app.conf: "version=1"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: env, labels: {{tier: backend}}}}
spec:
  securityContext: {{fsGroup: 2000}}
  initContainers:
  - name: prepare
    image: {BUSYBOX}
    command: ["sh", "-c", "echo prepared > /work/init.txt"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: app
    image: {BUSYBOX}
    command: ["sh", "-c", "echo MODE=$MODE PASSWORD=$PASSWORD POD=$POD_NAME IP=$POD_IP MEM=$MEM_LIMIT COMBINED=$COMBINED PREFIXED=$CFG_mode; cat /work/init.txt; cat /info/labels; echo; id -G; while true; do echo CONF=$(cat /config/app.conf) SECRET=$(cat /secret/password); sleep 1; done"]
    env:
    - {{name: MODE, valueFrom: {{configMapKeyRef: {{name: settings, key: mode}}}}}}
    - {{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}}}
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: MEM_LIMIT, valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}}}
    - {{name: COMBINED, value: "$(MODE)-$(POD_NAME)"}}
    envFrom: [{{configMapRef: {{name: settings}}, prefix: CFG_}}]
    resources: {{limits: {{memory: 64Mi}}}}
    volumeMounts:
    - {{name: work, mountPath: /work}}
    - {{name: config, mountPath: /config}}
    - {{name: secret, mountPath: /secret}}
    - {{name: info, mountPath: /info}}
  volumes:
  - {{name: work, emptyDir: {{}}}}
  - {{name: config, configMap: {{name: settings}}}}
  - {{name: secret, secret: {{secretName: creds}}}}
  - name: info
    downwardAPI: {{items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]}}
"#
        ),
    );
    site.ok(&["wait", "--for=condition=Ready", "pod/env", "--timeout=60s"]);
    let ip = pod(&site, "env")
        .pointer("/status/podIP")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let mut logs = String::new();
    wait_for(
        &site,
        "the app's first lines",
        Duration::from_secs(20),
        || {
            logs = site.ok(&["logs", "env", "-c", "app"]);
            logs.contains("CONF=")
        },
    );
    assert!(
        logs.contains(&format!(
            "MODE=fast PASSWORD=s3cret POD=env IP={ip} MEM=64 COMBINED=fast-env PREFIXED=fast"
        )),
        "{logs}"
    );
    assert!(
        logs.contains("prepared"),
        "init container output missing: {logs}"
    );
    assert!(logs.contains("tier=\"backend\""), "{logs}");
    assert!(
        logs.contains("2000"),
        "fsGroup not among the groups: {logs}"
    );
    assert!(logs.contains("CONF=version=1 SECRET=s3cret"), "{logs}");
    let init = pod(&site, "env")
        .pointer("/status/initContainerStatuses/0/state/terminated/reason")
        .cloned();
    assert_eq!(init, Some(Value::from("Completed")));

    // An update of the ConfigMap reaches the mounted file of the running container.
    site.ok(&[
        "patch",
        "configmap",
        "settings",
        "-p",
        r#"{"data":{"app.conf":"version=2"}}"#,
    ]);
    wait_for(
        &site,
        "the new config in the container",
        Duration::from_secs(60),
        || {
            site.ok(&["logs", "env", "-c", "app", "--tail=1"])
                .contains("CONF=version=2")
        },
    );
    assert_eq!(container_status(&site, "env")["restartCount"], 0);

    // A missing ConfigMap key is a clear CreateContainerConfigError.
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: broken}}
spec:
  containers:
  - name: app
    image: {BUSYBOX}
    command: ["sleep", "3600"]
    env: [{{name: X, valueFrom: {{configMapKeyRef: {{name: settings, key: nope}}}}}}]
"#
        ),
    );
    wait_for(
        &site,
        "CreateContainerConfigError",
        Duration::from_secs(30),
        || {
            container_status(&site, "broken")
                .pointer("/state/waiting/reason")
                .and_then(Value::as_str)
                == Some("CreateContainerConfigError")
        },
    );
    let message = container_status(&site, "broken")
        .pointer("/state/waiting/message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("couldn't find key nope"), "{message}");
}

#[test]
fn crashing_containers_back_off_and_memory_hogs_are_oom_killed() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: crash}}
spec:
  containers:
  - name: app
    image: {BUSYBOX}
    command: ["sh", "-c", "echo about to fail; exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {{name: hog}}
spec:
  restartPolicy: Never
  containers:
  - name: app
    image: {BUSYBOX}
    command: ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"]
    resources: {{limits: {{memory: 24Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: done}}
spec:
  restartPolicy: OnFailure
  containers:
  - name: app
    image: {BUSYBOX}
    command: ["sh", "-c", "echo finished"]
"#
        ),
    );
    // Restarts come at growing intervals: immediately, then 10 s, 20 s, ...
    let start = Instant::now();
    let mut seen: Vec<(u64, Duration)> = Vec::new();
    wait_for(
        &site,
        "two restarts in CrashLoopBackOff",
        Duration::from_secs(60),
        || {
            let c = container_status(&site, "crash");
            let restarts = c["restartCount"].as_u64().unwrap_or(0);
            if seen.last().is_none_or(|(r, _)| *r != restarts) {
                seen.push((restarts, start.elapsed()));
            }
            restarts >= 2
                && c.pointer("/state/waiting/reason").and_then(Value::as_str)
                    == Some("CrashLoopBackOff")
        },
    );
    let c = container_status(&site, "crash");
    assert_eq!(
        c.pointer("/lastState/terminated/exitCode")
            .and_then(Value::as_i64),
        Some(3),
        "{c}"
    );
    assert_eq!(
        c.pointer("/lastState/terminated/reason")
            .and_then(Value::as_str),
        Some("Error")
    );
    let message = c
        .pointer("/state/waiting/message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // After the second restart the next wait is 20 s (10 s before it), as upstream's.
    assert!(
        message.starts_with("back-off 20s restarting failed container=app pod=crash_default("),
        "{message}"
    );
    // The gap before the second restart is at least the 10 s back-off.
    let t1 = seen.iter().find(|(r, _)| *r == 1).map(|(_, t)| *t).unwrap();
    let t2 = seen.iter().find(|(r, _)| *r == 2).map(|(_, t)| *t).unwrap();
    assert!(t2 - t1 >= Duration::from_secs(9), "restarts at {seen:?}");
    assert!(
        site.ok(&["logs", "crash", "--previous"])
            .contains("about to fail")
    );
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=crash",
        "-o",
        "custom-columns=R:.reason",
    ]);
    assert!(events.contains("BackOff"), "{events}");
    assert!(
        site.ok(&["get", "pod", "crash"])
            .contains("CrashLoopBackOff")
    );

    wait_for(&site, "the OOM kill", Duration::from_secs(60), || {
        container_status(&site, "hog")
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str)
            == Some("OOMKilled")
    });
    assert_eq!(
        container_status(&site, "hog")
            .pointer("/state/terminated/exitCode")
            .and_then(Value::as_i64),
        Some(137)
    );
    assert_eq!(
        pod(&site, "hog")
            .pointer("/status/phase")
            .and_then(Value::as_str),
        Some("Failed")
    );
    wait_for(
        &site,
        "the OnFailure pod to succeed",
        Duration::from_secs(30),
        || {
            pod(&site, "done")
                .pointer("/status/phase")
                .and_then(Value::as_str)
                == Some("Succeeded")
        },
    );
    assert_eq!(container_status(&site, "done")["restartCount"], 0);
    assert_eq!(
        container_status(&site, "done")
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str),
        Some("Completed")
    );
}

#[test]
fn logs_stream_and_deletion_runs_pre_stop_then_sigterm_within_the_grace_period() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    let marker_dir = site.dir.path().join("hooks");
    std::fs::create_dir_all(&marker_dir).unwrap();
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: talker}}
spec:
  terminationGracePeriodSeconds: 20
  containers:
  - name: app
    image: {BUSYBOX}
    command: ["sh", "-c", "trap 'echo got SIGTERM; sleep 2; echo bye; exit 0' TERM; i=0; while true; do echo line $i; i=$((i+1)); sleep 0.3; done"]
    lifecycle:
      postStart: {{exec: {{command: ["sh", "-c", "echo started > /hooks/post-start"]}}}}
      preStop: {{exec: {{command: ["sh", "-c", "echo stopping > /hooks/pre-stop"]}}}}
    volumeMounts: [{{name: hooks, mountPath: /hooks}}]
  volumes:
  - {{name: hooks, hostPath: {{path: {}, type: Directory}}}}
"#,
            marker_dir.display()
        ),
    );
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/talker",
        "--timeout=60s",
    ]);
    assert!(
        eventually(Duration::from_secs(10), || marker_dir
            .join("post-start")
            .exists()),
        "postStart did not run"
    );

    // kubectl logs -f streams new lines as they are written.
    let mut follow = std::process::Command::new(tests::kubectl_bin())
        .arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(["logs", "-f", "talker", "--tail=1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(1024);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut numbers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while numbers.len() < 5 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(2))
            && let Some(n) = line
                .strip_prefix("line ")
                .and_then(|n| n.parse::<u64>().ok())
        {
            numbers.push(n);
        }
    }
    assert!(numbers.len() >= 5, "follow gave {numbers:?}");
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");

    // Delete: preStop runs, SIGTERM is delivered, the container's 2 s of clean-up is
    // respected, and the follow stream sees its last words, then ends.
    let started = Instant::now();
    site.ok(&["delete", "pod", "talker", "--wait=true", "--timeout=60s"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "deleted after {took:?}: the container's clean-up was cut short"
    );
    assert!(took < Duration::from_secs(20), "deletion took {took:?}");
    assert_eq!(
        std::fs::read_to_string(marker_dir.join("pre-stop"))
            .unwrap_or_default()
            .trim(),
        "stopping"
    );
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l == "got SIGTERM"), "{rest:?}");
    assert!(rest.iter().any(|l| l == "bye"), "{rest:?}");
    let _ = follow.kill();
    let _ = follow.wait();
}

#[test]
fn images_pull_from_registries_and_mirrors_and_missing_images_back_off_with_the_reason() {
    let registry = Registry::start().unwrap();
    let image = registry.push_busybox("team/web:v1").unwrap();
    let rt = Runtime::start().unwrap();
    // A mirror for a registry name that does not resolve: pulls go to the local registry.
    rt.set_registries(&format!(
        "mirrors:\n  registry.invalid:\n    endpoint: [\"http://127.0.0.1:{}\"]\n",
        registry.port
    ))
    .unwrap();
    let site = rt.start_site(&[]).unwrap();
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: pulled}}
spec:
  containers:
  - {{name: app, image: "{image}", imagePullPolicy: Always, command: ["sleep", "3600"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: mirrored}}
spec:
  containers:
  - {{name: app, image: "registry.invalid/team/web:v1", command: ["sleep", "3600"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: missing}}
spec:
  containers:
  - {{name: app, image: "127.0.0.1:{port}/team/nope:v1", command: ["sleep", "3600"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: never}}
spec:
  containers:
  - {{name: app, image: "127.0.0.1:{port}/team/other:v1", imagePullPolicy: Never, command: ["sleep", "3600"]}}
"#,
            port = registry.port
        ),
    );
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/pulled",
        "pod/mirrored",
        "--timeout=90s",
    ]);
    let id = container_status(&site, "pulled")["imageID"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        id.starts_with(&format!("127.0.0.1:{}/team/web@sha256:", registry.port)),
        "{id}"
    );
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=pulled",
        "-o",
        "custom-columns=R:.reason,M:.message",
    ]);
    assert!(
        events.contains("Pulling") && events.contains("Successfully pulled image"),
        "{events}"
    );

    wait_for(&site, "ImagePullBackOff", Duration::from_secs(60), || {
        container_status(&site, "missing")
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
            == Some("ImagePullBackOff")
    });
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=missing",
        "-o",
        "custom-columns=M:.message",
    ]);
    assert!(
        events.contains("Failed to pull image")
            && (events.contains("not found") || events.contains("unknown")),
        "the registry's reason is missing: {events}"
    );
    wait_for(&site, "ErrImageNeverPull", Duration::from_secs(30), || {
        container_status(&site, "never")
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
            == Some("ErrImageNeverPull")
    });
    // The node lists its images for the scheduler's ImageLocality.
    wait_for(
        &site,
        "the node's image list",
        Duration::from_secs(90),
        || {
            site.ok(&[
                "get",
                "node",
                "node-a",
                "-o",
                "jsonpath={.status.images[*].names}",
            ])
            .contains("team/web")
        },
    );
}

#[test]
fn probes_restart_unhealthy_containers_and_readiness_gates_endpoints() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: sick}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {BUSYBOX}
    command: ["sh", "-c", "touch /tmp/healthy; sleep 4; rm /tmp/healthy; sleep 3600"]
    livenessProbe:
      exec: {{command: ["cat", "/tmp/healthy"]}}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {{name: gated, labels: {{app: gated}}}}
spec:
  containers:
  - name: web
    image: {BUSYBOX}
    command: ["sh", "-c", "sleep 3; httpd -f -p 8080 -h /www"]
    ports: [{{name: http, containerPort: 8080}}]
    startupProbe:
      tcpSocket: {{port: http}}
      periodSeconds: 1
      failureThreshold: 30
    readinessProbe:
      httpGet: {{path: /index.html, port: 8080}}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: gated}}
spec:
  selector: {{app: gated}}
  ports: [{{port: 80, targetPort: 8080}}]
"#
        ),
    );
    // Not ready while the server has not started; ready (and an endpoint) once it answers.
    wait_for(
        &site,
        "the gated pod to run",
        Duration::from_secs(30),
        || {
            pod(&site, "gated")
                .pointer("/status/phase")
                .and_then(Value::as_str)
                == Some("Running")
        },
    );
    let early = container_status(&site, "gated");
    assert_eq!(early["ready"], false, "{early}");
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/gated",
        "--timeout=60s",
    ]);
    assert_eq!(container_status(&site, "gated")["started"], true);
    let ip = pod(&site, "gated")
        .pointer("/status/podIP")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    wait_for(
        &site,
        "the service endpoint",
        Duration::from_secs(20),
        || {
            site.ok(&[
                "get",
                "endpoints",
                "gated",
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ])
            .contains(&ip)
        },
    );

    // The liveness probe fails after 4 s: the container is killed and restarted.
    wait_for(&site, "a liveness restart", Duration::from_secs(60), || {
        container_status(&site, "sick")["restartCount"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=sick",
        "-o",
        "custom-columns=R:.reason,M:.message",
    ]);
    assert!(events.contains("Liveness probe failed"), "{events}");
    assert!(
        events.contains("failed liveness probe, will be restarted"),
        "{events}"
    );
}

#[test]
fn a_second_machine_joins_with_a_token_and_runs_pods_whose_logs_come_through_its_tunnel() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    let agent = rt.start_agent(&site, "node-b").unwrap();
    wait_for(&site, "node-b to be Ready", Duration::from_secs(40), || {
        site.kubectl(&["get", "node", "node-b"])
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(" Ready "))
            .unwrap_or(false)
    });
    let node = site.json(&["get", "node", "node-b", "-o", "json"]);
    assert!(
        node.pointer("/metadata/labels/node-role.kubernetes.io~1control-plane")
            .is_none()
    );
    site.ok(&["get", "lease", "-n", "kube-node-lease", "node-b"]);
    apply(
        &site,
        &format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: remote}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: remote}}}}
  template:
    metadata: {{labels: {{app: remote}}}}
    spec:
      terminationGracePeriodSeconds: 2
      nodeSelector: {{kubernetes.io/hostname: node-b}}
      containers:
      - name: web
        image: {BUSYBOX}
        command: ["sh", "-c", "echo serving on node-b; exec httpd -f -p 8080 -h /www"]
"#
        ),
    );
    let status = site.ok(&["rollout", "status", "deploy/remote", "--timeout=90s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    let pods = site.json(&["get", "pods", "-l", "app=remote", "-o", "json"]);
    let p = &pods["items"][0];
    assert_eq!(
        p.pointer("/spec/nodeName").and_then(Value::as_str),
        Some("node-b")
    );
    let name = p
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let ip = p
        .pointer("/status/podIP")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let reply = http_get(&format!("{ip}:8080")).unwrap_or_default();
    assert!(reply.contains("hello from edgesite"), "{reply}");
    // The server reaches node-b's logs only through the tunnel node-b dialled.
    let mut logs = String::new();
    wait_for(&site, "logs from node-b", Duration::from_secs(20), || {
        logs = site
            .kubectl(&["logs", &name])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        logs.contains("serving on node-b")
    });
    // The containers run in node-b's own containerd namespace.
    assert!(
        !rt.ctr("node-b", &["tasks", "ls", "-q"])
            .unwrap()
            .trim()
            .is_empty()
    );
    // node-b's own certificate (the one its agent joined with) reaches node-b's objects only: a
    // Secret used by a pod on node-a is not its to read, node-a's Node not its to change.
    site.ok(&[
        "create",
        "secret",
        "generic",
        "only-a",
        "--from-literal=k=v",
    ]);
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: on-a}}
spec:
  nodeName: node-a
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {BUSYBOX}
    command: ["sleep", "3600"]
    envFrom: [{{secretRef: {{name: only-a}}}}]
"#
        ),
    );
    let pki = agent.dir.path().join("data").join("agent").join("pki");
    let node_b = [
        format!("--client-certificate={}", pki.join("node.crt").display()),
        format!("--client-key={}", pki.join("node.key").display()),
    ];
    let as_node_b = |args: &[&str]| site.kubectl_as(&node_b, args);
    let secret = as_node_b(&["get", "secret", "only-a"]);
    let err = String::from_utf8_lossy(&secret.stderr);
    assert!(
        err.contains("User \"system:node:node-b\" cannot get resource \"secrets\"")
            && err.contains("no relationship found between node 'node-b' and this object"),
        "{err}"
    );
    let label = as_node_b(&["label", "node", "node-a", "stolen=yes"]);
    assert!(!label.status.success());
    assert!(
        String::from_utf8_lossy(&label.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&label.stderr)
    );
    site.ok(&["delete", "pod", "on-a", "--wait=false"]);
    // A wrong token is refused with a message that says what to do.
    let out = std::process::Command::new(tests::edgesite_bin())
        .args(["agent", &format!("--server=https://127.0.0.1:{}", site.port), "--token=K10aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa::bad.token"])
        .arg(format!("--data-dir={}", agent.dir.path().join("other").display()))
        .args(rt.node_flags("node-c"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match the join token"), "{stderr}");
    drop(agent);
}

#[test]
fn docker_archives_import_with_the_cli_and_pods_churn_without_leaking_network_state() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    // `edgesite images import` of a `docker save` archive, then a pod that may not pull.
    let archive = site.dir.path().join("legacy.tar");
    tests::node::busybox_docker_archive(&archive, "edgesite.test/legacy:2.0").unwrap();
    let out = std::process::Command::new(tests::edgesite_bin())
        .args(["images", "import"])
        .arg(&archive)
        .arg(format!(
            "--container-runtime-endpoint={}",
            rt.socket.display()
        ))
        .arg("--containerd-namespace=node-a")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported edgesite.test/legacy:2.0"));
    apply(
        &site,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: legacy}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: "edgesite.test/legacy:2.0", imagePullPolicy: Never, command: ["sh", "-c", "echo K8S=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT; sleep 3600"]}
"#,
    );
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/legacy",
        "--timeout=60s",
    ]);
    let api_ip = site.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let mut logs = String::new();
    wait_for(
        &site,
        "the service variables",
        Duration::from_secs(20),
        || {
            logs = site.ok(&["logs", "legacy"]);
            logs.contains("K8S=")
        },
    );
    assert!(logs.contains(&format!("K8S={api_ip}:443")), "{logs}");
    site.ok(&["delete", "pod", "legacy", "--wait=true"]);

    // Pods come and go in batches; nothing of theirs stays behind. Every pod gets a host port
    // of its own: two free_port() calls may name the same port (nothing holds it between them),
    // and a second pod asking for a port its node already gives out stays Pending, as upstream.
    let mut ports = std::collections::BTreeSet::new();
    let mut distinct_port = || loop {
        let p = free_port();
        if ports.insert(p) {
            return p;
        }
    };
    for round in 0..4 {
        let mut list = String::new();
        for i in 0..10 {
            list.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: churn-{round}-{i}, labels: {{churn: \"yes\"}}}}\nspec:\n  terminationGracePeriodSeconds: 0\n  containers: [{{name: c, image: \"{BUSYBOX}\", command: [\"sleep\", \"3600\"], ports: [{{containerPort: 80, hostPort: {}}}]}}]\n",
                distinct_port()
            ));
        }
        apply(&site, &list);
        site.ok(&[
            "wait",
            "--for=condition=Ready",
            "pod",
            "-l",
            "churn=yes",
            "--timeout=90s",
        ]);
        site.ok(&[
            "delete",
            "pod",
            "-l",
            "churn=yes",
            "--wait=true",
            "--timeout=90s",
        ]);
    }
    assert_no_pod_leftovers(&site, &rt);
}

#[test]
fn a_server_without_containerd_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("none.yaml"), "").unwrap();
    let out = std::process::Command::new(tests::edgesite_bin())
        .arg("server")
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!(
            "--config={}",
            dir.path().join("none.yaml").display()
        ))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--https-listen-port={}", free_port()))
        .arg(format!(
            "--write-kubeconfig={}",
            dir.path().join("k.yaml").display()
        ))
        .arg(format!(
            "--container-runtime-endpoint={}",
            dir.path().join("no-containerd.sock").display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach containerd"), "{stderr}");
    assert!(stderr.contains("apt-get install containerd"), "{stderr}");
    assert!(stderr.contains("--disable-agent"), "{stderr}");
}

#[test]
fn private_registries_need_the_pods_image_pull_secret() {
    let registry = Registry::start_with_auth(Some(("alice", "s3cret"))).unwrap();
    let image = registry
        .push_busybox_as(
            "private/app:v1",
            oci_client::secrets::RegistryAuth::Basic("alice".into(), "s3cret".into()),
        )
        .unwrap();
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    site.ok(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server=127.0.0.1:{}", registry.port),
        "--docker-username=alice",
        "--docker-password=s3cret",
    ]);
    apply(
        &site,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: with-secret}}
spec:
  imagePullSecrets: [{{name: regcred}}]
  containers:
  - {{name: app, image: "{image}", command: ["sleep", "3600"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: without-secret}}
spec:
  containers:
  - {{name: app, image: "{image}", imagePullPolicy: Always, command: ["sleep", "3600"]}}
"#
        ),
    );
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/with-secret",
        "--timeout=60s",
    ]);
    wait_for(
        &site,
        "the unauthorized pull to back off",
        Duration::from_secs(60),
        || {
            matches!(
                container_status(&site, "without-secret")
                    .pointer("/state/waiting/reason")
                    .and_then(Value::as_str),
                Some("ErrImagePull" | "ImagePullBackOff")
            )
        },
    );
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=without-secret",
        "-o",
        "custom-columns=M:.message",
    ]);
    assert!(
        events.to_lowercase().contains("unauthorized") || events.contains("401"),
        "{events}"
    );
}
