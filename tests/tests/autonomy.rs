//! Node autonomy with real containers: an `edgesite agent` keeps its pods running and returning
//! by themselves while the API server is down, the network is cut, the agent restarts, or the
//! whole machine reboots offline; on reconnect it catches up. Needs root; run by tests/run.sh.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::Value;
use tests::link::Link;
use tests::node::{AgentProcess, BUSYBOX, Runtime};
use tests::{Site, eventually};

fn wait_for(
    site: &Site,
    agent: &AgentProcess,
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> bool,
) {
    if !eventually(timeout, f) {
        let pods = site
            .kubectl(&["get", "pods", "-o", "wide"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!(
            "timed out waiting for {what}\n{pods}\n---- agent log ----\n{}",
            agent.log()
        );
    }
}

/// kubectl that may fail (the API server may be down): stdout on success.
fn try_get(site: &Site, args: &[&str]) -> Option<String> {
    let out = site.kubectl(args).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn try_json(site: &Site, args: &[&str]) -> Option<Value> {
    serde_json::from_str(&try_get(site, args)?).ok()
}

fn node_ready(site: &Site, node: &str) -> bool {
    try_get(site, &["get", "node", node]).is_some_and(|o| o.contains(" Ready "))
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

/// (pod name, pod IP, first container's ID, restart count, ready) of the pods matching `selector`.
fn pods(site: &Site, selector: &str) -> Vec<(String, String, String, i64, bool)> {
    let Some(list) = try_json(site, &["get", "pods", "-l", selector, "-o", "json"]) else {
        return Vec::new();
    };
    let mut out: Vec<_> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .map(|p| {
            let s = |ptr: &str| {
                p.pointer(ptr)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            (
                s("/metadata/name"),
                s("/status/podIP"),
                s("/status/containerStatuses/0/containerID"),
                p.pointer("/status/containerStatuses/0/restartCount")
                    .and_then(Value::as_i64)
                    .unwrap_or(-1),
                p.pointer("/status/containerStatuses/0/ready")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )
        })
        .collect();
    out.sort();
    out
}

/// The running task IDs in the node's containerd namespace.
fn tasks(rt: &Runtime, node: &str) -> Vec<String> {
    let mut t: Vec<String> = rt
        .ctr(node, &["tasks", "ls"])
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| l.contains("RUNNING"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    t.sort();
    t
}

/// The IPv4 address of eth0 inside a pod's network namespace (read on the node itself, for
/// when the API cannot tell).
fn netns_ip(agent: &AgentProcess, uid: &str) -> Option<String> {
    let netns = agent.dir.path().join("data/agent/netns").join(uid);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-4", "-o", "addr", "show", "eth0"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?;
    Some(cidr.split('/').next()?.to_string())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

const CONFIG: &str = r#"apiVersion: v1
kind: ConfigMap
metadata: {name: greeting}
data: {greeting: hello-from-the-cache, index.html: served-from-the-cache}
---
apiVersion: v1
kind: Secret
metadata: {name: token}
stringData: {token: s3cret}
"#;

fn web(image: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: {image}
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /www && cp /cfg/index.html /www/ && cp /sec/token /www/token && exec httpd -f -p 8080 -h /www"]
        readinessProbe: {{httpGet: {{path: /index.html, port: 8080}}, periodSeconds: 1}}
        volumeMounts:
        - {{name: cfg, mountPath: /cfg}}
        - {{name: sec, mountPath: /sec}}
      volumes:
      - {{name: cfg, configMap: {{name: greeting}}}}
      - {{name: sec, secret: {{secretName: token}}}}
{extra_spec}"#
    )
}

fn serves(ip: &str) -> bool {
    http_get(&format!("{ip}:8080")).is_some_and(|b| b.contains("served-from-the-cache"))
}

#[test]
fn pods_run_on_while_the_api_server_is_down_and_the_agent_restarts_without_it() {
    let rt = Runtime::start().unwrap();
    let mut site = Site::start_with(&[&format!("--cluster-cidr={}", rt.cluster_cidr())]).unwrap();
    let mut agent = rt.start_agent(&site, "edge-1").unwrap();
    wait_for(
        &site,
        &agent,
        "edge-1 Ready",
        Duration::from_secs(40),
        || node_ready(&site, "edge-1"),
    );
    let host = tempfile::tempdir().unwrap();
    let starts = host.path().join("starts");
    site.ok_stdin(&["apply", "-f", "-"], Some(CONFIG));
    site.ok_stdin(&["apply", "-f", "-"], Some(&web(BUSYBOX, "")));
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: crasher}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: crash
    image: {BUSYBOX}
    imagePullPolicy: Never
    command: ["sh", "-c", "echo \"$(cat /cfg/greeting) $TOKEN\" >> /host/starts; sleep 1; exit 1"]
    env: [{{name: TOKEN, valueFrom: {{secretKeyRef: {{name: token, key: token}}}}}}]
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
    - {{name: host, mountPath: /host}}
  volumes:
  - {{name: cfg, configMap: {{name: greeting}}}}
  - {{name: host, hostPath: {{path: {}}}}}
"#,
            host.path().display()
        )),
    );
    let lines = || {
        std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    wait_for(
        &site,
        &agent,
        "two ready web pods",
        Duration::from_secs(60),
        || {
            let p = pods(&site, "app=web");
            p.len() == 2 && p.iter().all(|(_, ip, _, _, ready)| *ready && serves(ip))
        },
    );
    let before = pods(&site, "app=web");
    let web_tasks = tasks(&rt, "edge-1");
    wait_for(
        &site,
        &agent,
        "the crasher to restart once",
        Duration::from_secs(30),
        || lines().len() >= 2,
    );

    // 1. The agent alone restarts: its containers are adopted, not restarted.
    agent.kill();
    agent.launch().unwrap();
    wait_for(
        &site,
        &agent,
        "the restarted agent to report",
        Duration::from_secs(30),
        || {
            agent.log().contains("starting the pods of the node cache")
                && node_ready(&site, "edge-1")
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let after = pods(&site, "app=web");
    assert_eq!(
        before, after,
        "the web pods changed across an agent restart"
    );
    let still: Vec<String> = tasks(&rt, "edge-1");
    for t in &web_tasks {
        if before
            .iter()
            .any(|(_, _, id, _, _)| id.ends_with(t.as_str()))
        {
            assert!(still.contains(t), "web container {t} was restarted");
        }
    }

    // 2. The API server dies: pods keep serving, the crashing container keeps restarting.
    site.kill();
    let down_since = now();
    for (_, ip, _, _, _) in &before {
        assert!(serves(ip), "{ip} stopped serving with the API server down");
    }
    let n = lines().len();
    wait_for(
        &site,
        &agent,
        "a restart with the API server down",
        Duration::from_secs(60),
        || lines().len() > n,
    );

    // 3. The agent restarts while the API server is still down: everything comes from the
    //    node cache (the configmap and secret the crasher needs included), nothing restarts.
    agent.kill();
    agent.launch().unwrap();
    let m = lines().len();
    wait_for(
        &site,
        &agent,
        "a restart from the cache alone",
        Duration::from_secs(90),
        || lines().len() > m,
    );
    let all = lines();
    assert!(
        all.iter().all(|l| l == "hello-from-the-cache s3cret"),
        "the crasher did not get its configmap and secret: {all:?}"
    );
    for (_, ip, _, _, _) in &before {
        assert!(
            serves(ip),
            "{ip} stopped serving after an agent restart offline"
        );
    }
    assert!(
        agent.log().contains("API server is unreachable"),
        "{}",
        agent.log()
    );

    // 4. The API server comes back: what happened meanwhile arrives, nothing restarts.
    let up_at = now();
    let offline_starts = lines().len();
    site.launch().unwrap();
    wait_for(
        &site,
        &agent,
        "the statuses written offline",
        Duration::from_secs(60),
        || {
            let p = try_json(&site, &["get", "pod", "crasher", "-o", "json"]);
            let restarts = p
                .as_ref()
                .and_then(|p| p.pointer("/status/containerStatuses/0/restartCount"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            restarts as usize + 1 >= offline_starts && node_ready(&site, "edge-1")
        },
    );
    wait_for(
        &site,
        &agent,
        "the web pods to be ready again",
        Duration::from_secs(60),
        || pods(&site, "app=web") == before,
    );
    // Events of the offline period were queued and written with the time they happened.
    wait_for(
        &site,
        &agent,
        "events from the offline period",
        Duration::from_secs(30),
        || {
            let Some(events) = try_json(
                &site,
                &[
                    "get",
                    "events",
                    "--field-selector",
                    "involvedObject.name=crasher",
                    "-o",
                    "json",
                ],
            ) else {
                return false;
            };
            events["items"].as_array().into_iter().flatten().any(|e| {
                let first = e["firstTimestamp"].as_str().unwrap_or("");
                first >= down_since.as_str() && first < up_at.as_str()
            })
        },
    );
}

#[test]
fn a_machine_rebooted_while_offline_starts_its_pods_from_the_cache() {
    let mut rt = Runtime::start().unwrap();
    let site = Site::start_with(&[&format!("--cluster-cidr={}", rt.cluster_cidr())]).unwrap();
    let link = Link::start(site.port).unwrap();
    let mut agent = rt
        .start_agent_via(&site, "edge-1", &link.url(), &[])
        .unwrap();
    wait_for(
        &site,
        &agent,
        "edge-1 Ready",
        Duration::from_secs(40),
        || node_ready(&site, "edge-1"),
    );
    site.ok_stdin(&["apply", "-f", "-"], Some(CONFIG));
    site.ok_stdin(&["apply", "-f", "-"], Some(&web(BUSYBOX, "")));
    wait_for(
        &site,
        &agent,
        "two ready web pods",
        Duration::from_secs(60),
        || {
            let p = pods(&site, "app=web");
            p.len() == 2 && p.iter().all(|(_, ip, _, _, ready)| *ready && serves(ip))
        },
    );
    let uids: Vec<String> = site
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.uid}",
        ])
        .split_whitespace()
        .map(String::from)
        .collect();

    // The cable is pulled, then the power: the machine comes back with the site unreachable.
    link.cut();
    agent.kill();
    rt.reboot(&agent).unwrap();
    assert!(tasks(&rt, "edge-1").is_empty(), "tasks survived the reboot");
    agent.launch().unwrap();
    wait_for(
        &site,
        &agent,
        "the pods to serve again from the cache",
        Duration::from_secs(90),
        || {
            uids.iter()
                .all(|uid| netns_ip(&agent, uid).is_some_and(|ip| serves(&ip)))
        },
    );
    assert_eq!(tasks(&rt, "edge-1").len(), 2, "{}", agent.log());
    // The secret volume is on a tmpfs again, not on disk.
    let volume = agent
        .dir
        .path()
        .join("data/agent/pods")
        .join(&uids[0])
        .join("volumes/sec");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts.contains(&volume.display().to_string()),
        "secret volume {} is not mounted",
        volume.display()
    );
    let offline_tasks = tasks(&rt, "edge-1");

    // The link comes back: the API learns the new state; nothing restarts.
    link.restore();
    wait_for(
        &site,
        &agent,
        "the new pod IPs in the API",
        Duration::from_secs(60),
        || {
            let p = pods(&site, "app=web");
            p.len() == 2
                && p.iter().all(|(_, ip, _, _, ready)| *ready && serves(ip))
                && uids.iter().all(|uid| {
                    p.iter().any(|(_, ip, _, _, _)| {
                        netns_ip(&agent, uid).as_deref() == Some(ip.as_str())
                    })
                })
        },
    );
    assert_eq!(
        tasks(&rt, "edge-1"),
        offline_tasks,
        "containers restarted on reconnect"
    );
}

#[test]
fn changes_made_while_a_node_was_disconnected_apply_when_it_reconnects() {
    let rt = Runtime::start().unwrap();
    let site = Site::start_with(&[
        &format!("--cluster-cidr={}", rt.cluster_cidr()),
        "--node-monitor-grace-period=4s",
    ])
    .unwrap();
    let link = Link::start(site.port).unwrap();
    let agent = rt
        .start_agent_via(&site, "edge-1", &link.url(), &[])
        .unwrap();
    wait_for(
        &site,
        &agent,
        "edge-1 Ready",
        Duration::from_secs(40),
        || node_ready(&site, "edge-1"),
    );
    // A second name for the test image, as if a new version had been imported.
    wait_for(
        &site,
        &agent,
        "the test image",
        Duration::from_secs(30),
        || {
            rt.ctr("edge-1", &["images", "ls", "-q"])
                .is_ok_and(|o| o.contains(BUSYBOX))
        },
    );
    rt.ctr(
        "edge-1",
        &["images", "tag", BUSYBOX, "edgesite.test/busybox:2.0"],
    )
    .unwrap();
    site.ok_stdin(&["apply", "-f", "-"], Some(CONFIG));
    // Pods that tolerate an unreachable node for only a second: upstream would evict them.
    let tolerations = "      tolerations:\n      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 1}\n";
    site.ok_stdin(&["apply", "-f", "-"], Some(&web(BUSYBOX, tolerations)));
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: doomed}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: c, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sleep", "3600"]}}]
"#
        )),
    );
    wait_for(
        &site,
        &agent,
        "pods running",
        Duration::from_secs(60),
        || {
            let p = pods(&site, "app=web");
            p.len() == 2
                && p.iter().all(|x| x.4)
                && try_get(&site, &["get", "pod", "doomed"]).is_some_and(|o| o.contains("Running"))
        },
    );
    let before = pods(&site, "app=web");
    let doomed_id = site.ok(&[
        "get",
        "pod",
        "doomed",
        "-o",
        "jsonpath={.status.containerStatuses[0].containerID}",
    ]);
    let doomed_id = doomed_id.rsplit('/').next().unwrap().to_string();

    link.cut();
    wait_for(
        &site,
        &agent,
        "edge-1 to be unreachable",
        Duration::from_secs(60),
        || try_get(&site, &["get", "node", "edge-1"]).is_some_and(|o| o.contains("NotReady")),
    );
    // The site keeps a disconnected node's pods (the default policy), tolerationSeconds or not.
    std::thread::sleep(Duration::from_secs(5));
    let kept: Vec<String> = pods(&site, "app=web").into_iter().map(|p| p.0).collect();
    let names: Vec<String> = before.iter().map(|p| p.0.clone()).collect();
    assert_eq!(kept, names, "pods of a disconnected node were evicted");
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=TaintManagerEviction",
    ]);
    assert!(!events.contains("Marking for deletion"), "{events}");

    // Meanwhile the user deletes a pod and rolls out a new image.
    site.ok(&["delete", "pod", "doomed", "--wait=false"]);
    site.ok(&[
        "set",
        "image",
        "deployment/web",
        "web=edgesite.test/busybox:2.0",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        tasks(&rt, "edge-1").contains(&doomed_id),
        "the node cannot know yet"
    );

    link.restore();
    wait_for(
        &site,
        &agent,
        "the deleted pod to stop",
        Duration::from_secs(60),
        || {
            !tasks(&rt, "edge-1").contains(&doomed_id)
                && try_get(&site, &["get", "pods", "-o", "name"])
                    .is_some_and(|o| !o.contains("doomed"))
        },
    );
    wait_for(
        &site,
        &agent,
        "the new image to roll out",
        Duration::from_secs(90),
        || {
            let Some(d) = try_json(&site, &["get", "pods", "-l", "app=web", "-o", "json"]) else {
                return false;
            };
            let items = d["items"].as_array().cloned().unwrap_or_default();
            items.len() == 2
                && items.iter().all(|p| {
                    p.pointer("/spec/containers/0/image")
                        .and_then(Value::as_str)
                        == Some("edgesite.test/busybox:2.0")
                        && p.pointer("/status/containerStatuses/0/ready")
                            == Some(&Value::Bool(true))
                        && p.pointer("/metadata/deletionTimestamp").is_none()
                })
        },
    );
}
