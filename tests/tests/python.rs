//! The official Python `kubernetes` client against a real server (tests/python/client_smoke.py).
//! `tests/run.sh` installs it into `target/python-venv`; without it this test fails naming it.

use std::path::PathBuf;
use std::process::Command;

use tests::{Site, python};

#[test]
fn python_client_works_unchanged() {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import kubernetes"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the Python `kubernetes` client is missing at {} (tests/run.sh installs it: python3 -m venv target/python-venv && target/python-venv/bin/pip install kubernetes)",
        python.display()
    );
    let site = Site::start().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/client_smoke.py");
    let out = Command::new(&python)
        .arg(script)
        .env("KUBECONFIG", site.kubeconfig())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Code that reads `status` right after a create (kr8s `wait()`, pykube `Deployment.ready`)
/// needs one: upstream answers a create with the kind's zero status. The official client also
/// checks that a status's required fields are there.
#[test]
fn created_objects_come_back_with_their_zero_status() {
    let site = Site::start().unwrap();
    let script = r#"
import sys
from kubernetes import client, config
config.load_kube_config()
apps, core = client.AppsV1Api(), client.CoreV1Api()
sel = {"matchLabels": {"app": "a"}}
tmpl = {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
made = {
    "deployment": apps.create_namespaced_deployment("default", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"}, "spec": {"selector": sel, "template": tmpl}}),
    "statefulset": apps.create_namespaced_stateful_set("default", {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "a"}, "spec": {"serviceName": "a", "selector": sel, "template": tmpl}}),
    "replicaset": apps.create_namespaced_replica_set("default", {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "a"}, "spec": {"selector": sel, "template": tmpl}}),
    "daemonset": apps.create_namespaced_daemon_set("default", {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "a"}, "spec": {"selector": sel, "template": tmpl}}),
    "service": core.create_namespaced_service("default", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
    "pdb": client.PolicyV1Api().create_namespaced_pod_disruption_budget("default", {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "a"}, "spec": {"minAvailable": 1, "selector": sel}}),
    "hpa": client.AutoscalingV2Api().create_namespaced_horizontal_pod_autoscaler("default", {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "a"}, "spec": {"maxReplicas": 3, "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "a"}}}),
}
bad = [k for k, o in made.items() if o.status is None]
print("without status:", bad)
print("service:", made["service"].status)
if bad or made["service"].status.load_balancer is None:
    sys.exit(1)
# A status the creator sends is not the creator's to set.
d = apps.create_namespaced_deployment("default", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "b"}, "spec": {"selector": sel, "template": tmpl}, "status": {"replicas": 7}})
print("sent status kept:", d.status.replicas)
sys.exit(0 if d.status.replicas in (None, 0) else 1)
"#;
    site.python_ok(script);
}
