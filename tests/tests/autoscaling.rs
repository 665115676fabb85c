//! HorizontalPodAutoscalers with real containers: a Deployment that burns CPU is scaled up from
//! the agents' usage samples (`metrics.k8s.io`), and back down when it stops; an autoscaler
//! whose target is missing says so in its conditions. Needs root; run by tests/run.sh.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::node::{BUSYBOX, Runtime};
use tests::{Site, eventually};

fn wait_for(site: &Site, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    assert!(
        eventually(timeout, &mut f),
        "timed out waiting for {what}\n{}\n{}\n{}",
        site.ok(&["get", "hpa,deploy,pods", "-o", "wide"]),
        site.ok(&["describe", "hpa"]),
        site.log()
    );
}

fn replicas(site: &Site) -> String {
    site.kubectl(&["get", "deploy", "burn", "-o", "jsonpath={.spec.replicas}"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn an_autoscaler_follows_cpu_up_and_back_down() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    wait_for(&site, "node-a Ready", Duration::from_secs(40), || {
        site.kubectl(&["get", "node", "node-a"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" Ready "))
    });
    // The pods burn CPU (at most their 200m limit) until the file `stop` appears.
    let switch = tempfile::tempdir().unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: burn}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: burn}}}}
  template:
    metadata: {{labels: {{app: burn}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: burn
        image: {BUSYBOX}
        imagePullPolicy: Never
        command: ["sh", "-c", "while [ ! -f /switch/stop ]; do :; done; exec sleep 3600"]
        resources: {{requests: {{cpu: 100m}}, limits: {{cpu: 200m}}}}
        volumeMounts: [{{name: switch, mountPath: /switch}}]
      volumes: [{{name: switch, hostPath: {{path: {}}}}}]
"#,
            switch.path().display()
        )),
    );
    site.ok(&[
        "autoscale",
        "deployment",
        "burn",
        "--cpu-percent=50",
        "--min=1",
        "--max=3",
    ]);
    // Scaling down waits 300 s by default; this test's autoscaler does not wait.
    site.ok(&[
        "patch",
        "hpa",
        "burn",
        "--type=merge",
        "-p",
        r#"{"spec":{"behavior":{"scaleDown":{"stabilizationWindowSeconds":0}}}}"#,
    ]);
    let started = Instant::now();
    wait_for(&site, "the scale-up to 3", Duration::from_secs(120), || {
        replicas(&site) == "3"
    });
    let up = started.elapsed();
    let table = site.ok(&["get", "hpa", "burn"]);
    assert!(
        table.contains("cpu: ") && table.contains("%/50%"),
        "{table}"
    );
    let hpa: Value = site.json(&["get", "hpa", "burn", "-o", "json"]);
    let conditions = hpa["status"]["conditions"].as_array().unwrap();
    let status = |kind: &str| {
        conditions.iter().find(|c| c["type"] == kind).map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
    };
    assert_eq!(
        status("ScalingActive"),
        Some(("True".into(), "ValidMetricFound".into())),
        "{hpa:#}"
    );
    assert!(
        status("AbleToScale").is_some_and(|(s, _)| s == "True"),
        "{hpa:#}"
    );
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=SuccessfulRescale",
    ]);
    assert!(
        events.contains("New size: ")
            && events.contains("cpu resource utilization (percentage of request) above target"),
        "{events}"
    );

    // The load stops: back to one.
    std::fs::write(switch.path().join("stop"), "").unwrap();
    let stopped = Instant::now();
    wait_for(
        &site,
        "the scale-down to 1",
        Duration::from_secs(120),
        || replicas(&site) == "1",
    );
    let down = stopped.elapsed();
    eprintln!("HPA reaction: up to 3 in {up:?}, down to 1 in {down:?}");

    // An autoscaler whose target does not exist: its conditions say why.
    site.ok(&[
        "autoscale",
        "deployment/burn",
        "--name=lost",
        "--cpu-percent=50",
        "--max=2",
    ]);
    site.ok(&[
        "patch",
        "hpa",
        "lost",
        "--type=merge",
        "-p",
        r#"{"spec":{"scaleTargetRef":{"name":"nowhere"}}}"#,
    ]);
    wait_for(&site, "FailedGetScale", Duration::from_secs(40), || {
        site.ok(&["describe", "hpa", "lost"])
            .contains("FailedGetScale")
    });
}
