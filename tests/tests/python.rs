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

/// The same checks through a cloud hub's cluster proxy: the site's API reached with
/// `edgesite cloudhub kubeconfig --site` (watches, patches and CRDs included).
#[test]
fn python_client_works_through_the_hub() {
    let python = python();
    let hub = Site::start_hub(&[]).unwrap();
    let (_site, kubeconfig) = hub.attach_site("py-site").unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/client_smoke.py");
    let out = Command::new(&python)
        .arg(script)
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        hub.log()
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

/// lightkube (PyPI): typed CRUD, merge and JSON patches, server-side apply with its field
/// manager, the scale subresource, watch, label and field selectors, a custom resource.
#[test]
fn lightkube_works_unchanged() {
    let site = Site::start().unwrap();
    site.python_ok(
        r#"
import sys
import lightkube
from lightkube import Client, codecs
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap
from lightkube.types import PatchType
c = Client(field_manager="lightkube-check")
c.create(ConfigMap(metadata=ObjectMeta(name="lk-cm", namespace="default"), data={"a": "1"}))
c.patch(ConfigMap, "lk-cm", {"data": {"b": "2"}}, namespace="default")
c.patch(ConfigMap, "lk-cm", [{"op": "add", "path": "/data/c", "value": "3"}], namespace="default", patch_type=PatchType.JSON)
assert c.get(ConfigMap, "lk-cm", namespace="default").data == {"a": "1", "b": "2", "c": "3"}
applied = c.apply(ConfigMap(metadata=ObjectMeta(name="lk-applied", namespace="default"), data={"x": "1"}))
assert applied.metadata.managedFields[0].manager == "lightkube-check", applied.metadata.managedFields
dep = codecs.load_all_yaml("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: lk-dep, namespace: default}
spec:
  selector: {matchLabels: {app: lk}}
  template:
    metadata: {labels: {app: lk}}
    spec: {containers: [{name: c, image: busybox}]}
""")[0]
created = c.create(dep)
assert created.status is not None
assert c.get(Deployment.Scale, "lk-dep", namespace="default").spec.replicas == 1
c.replace(Deployment.Scale(metadata=ObjectMeta(name="lk-dep", namespace="default"), spec={"replicas": 3}))
assert c.get(Deployment, "lk-dep", namespace="default").spec.replicas == 3
seen = []
for op, obj in c.watch(ConfigMap, namespace="default"):
    seen.append(obj.metadata.name)
    if len(seen) == 3:
        break
assert sorted(seen) == ["kube-root-ca.crt", "lk-applied", "lk-cm"], seen
absent = [x.metadata.name for x in c.list(ConfigMap, namespace="default", labels={"missing": lightkube.operators.not_exists()})]
assert len(absent) == 3, absent
assert [x.metadata.name for x in c.list(ConfigMap, namespace="default", fields={"metadata.name": "lk-cm"})] == ["lk-cm"]
Device = create_namespaced_resource("devices.kubeedge.io", "v1beta1", "Device", "devices")
assert list(c.list(Device, namespace="default")) == []
c.delete(ConfigMap, "lk-cm", namespace="default")
print("lightkube ok")
"#,
    );
}

/// kubernetes-asyncio (PyPI): create and read back with status, watch, patch, paging, events.
#[test]
fn kubernetes_asyncio_works_unchanged() {
    let site = Site::start().unwrap();
    site.python_ok(
        r#"
import asyncio
from kubernetes_asyncio import client, config, watch
async def main():
    await config.load_kube_config()
    async with client.ApiClient() as api:
        v1 = client.CoreV1Api(api)
        apps = client.AppsV1Api(api)
        assert (await client.VersionApi(api).get_code()).git_version.startswith("v1.")
        await v1.create_namespaced_config_map("default", {"metadata": {"name": "ka-cm"}, "data": {"a": "1"}})
        d = await apps.create_namespaced_deployment("default", {"metadata": {"name": "ka-dep"}, "spec": {"selector": {"matchLabels": {"app": "ka"}}, "template": {"metadata": {"labels": {"app": "ka"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})
        assert d.status is not None
        s = await v1.create_namespaced_service("default", {"metadata": {"name": "ka-svc"}, "spec": {"ports": [{"port": 80}]}})
        assert s.status.load_balancer is not None
        names = []
        async for ev in watch.Watch().stream(v1.list_namespaced_config_map, "default", timeout_seconds=2):
            names.append(ev["object"].metadata.name)
        assert sorted(names) == ["ka-cm", "kube-root-ca.crt"], names
        patched = await v1.patch_namespaced_config_map("ka-cm", "default", {"data": {"b": "2"}})
        assert patched.data == {"a": "1", "b": "2"}
        page = await v1.list_namespaced_config_map("default", limit=1)
        assert len(page.items) == 1 and page.metadata._continue
        rest = await v1.list_namespaced_config_map("default", limit=1, _continue=page.metadata._continue)
        assert len(rest.items) == 1 and rest.items[0].metadata.name != page.items[0].metadata.name
        await v1.create_namespaced_event("default", {"metadata": {"name": "ka-ev"}, "involvedObject": {"kind": "ConfigMap", "name": "ka-cm", "namespace": "default"}, "reason": "Checked", "message": "seen by asyncio"})
        raw = await client.EventsV1Api(api).list_namespaced_event("default", _preload_content=False)
        notes = [e.get("note") for e in (await raw.json())["items"]]
        assert "seen by asyncio" in notes, notes
        print("kubernetes-asyncio ok")
asyncio.run(main())
"#,
    );
}

/// kr8s (PyPI): objects, scale, labels, selectors, api-resources, an async watch.
#[test]
fn kr8s_works_unchanged() {
    let site = Site::start().unwrap();
    site.python_ok(
        r#"
import asyncio
import kr8s
from kr8s.objects import ConfigMap, Deployment, Service
assert kr8s.api().version()["gitVersion"].startswith("v1.")
cm = ConfigMap({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kr8s-cm", "namespace": "default"}, "data": {"a": "1"}})
cm.create()
cm.patch({"data": {"b": "2"}})
cm.refresh()
assert cm.raw["data"] == {"a": "1", "b": "2"}
d = Deployment({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kd", "namespace": "default"},
  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "kd"}}, "template": {"metadata": {"labels": {"app": "kd"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})
d.create()
assert d.raw.get("status") is not None
assert d.ready() is False
d.scale(2)
d.refresh()
assert d.raw["spec"]["replicas"] == 2
svc = Service({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ks", "namespace": "default"}, "spec": {"selector": {"app": "kd"}, "ports": [{"port": 80}]}})
svc.create()
assert svc.raw["spec"]["clusterIP"] and svc.raw["status"] == {"loadBalancer": {}}
assert any(r["name"] == "deployments" for r in kr8s.api().api_resources())
cm.label({"x": "y"})
assert [c.name for c in kr8s.get("configmaps", namespace="default", label_selector={"x": "y"})] == ["kr8s-cm"]
assert [c.name for c in kr8s.get("configmaps", namespace="default", field_selector="metadata.name=kr8s-cm")] == ["kr8s-cm"]
async def watched():
    api = await kr8s.asyncio.api()
    seen = []
    async for event, obj in api.watch("configmaps", namespace="default"):
        seen.append((event, obj.name))
        if len(seen) == 2:
            return sorted(seen)
assert asyncio.run(watched()) == [("ADDED", "kr8s-cm"), ("ADDED", "kube-root-ca.crt")]
d.delete()
print("kr8s ok")
"#,
    );
}

/// kopf (PyPI), a real operator: it watches a custom resource, patches its status from
/// handlers, posts Events, holds a finalizer and lets go of it on delete.
#[test]
fn a_kopf_operator_runs_against_the_site() {
    let site = Site::start().unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
",
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let operator = dir.path().join("operator.py");
    std::fs::write(
        &operator,
        r#"
import kopf

@kopf.on.create("example.com", "v1", "widgets")
def created(spec, name, namespace, patch, **_):
    patch.status["observedSize"] = spec.get("size")
    kopf.info({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name, "namespace": namespace}}, reason="Seen", message="a widget")
    return {"handled": True}

@kopf.on.update("example.com", "v1", "widgets", field="spec.size")
def resized(new, patch, **_):
    patch.status["observedSize"] = new

@kopf.on.delete("example.com", "v1", "widgets")
def deleted(name, logger, **_):
    logger.info(f"widget {name} let go")
"#,
    )
    .unwrap();
    let kopf = python().with_file_name("kopf");
    let log = dir.path().join("kopf.log");
    let mut child = Command::new(&kopf)
        .args(["run", "--standalone", "-A"])
        .arg(&operator)
        .env("KUBECONFIG", site.kubeconfig())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::from(
            std::fs::File::options().append(true).open(&log).unwrap(),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("run {} (tests/run.sh installs kopf): {e}", kopf.display()));
    let kopf_log = || std::fs::read_to_string(&log).unwrap_or_default();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1, namespace: default}\nspec: {size: 3}\n"),
    );
    let status = |want: &str| {
        tests::eventually(std::time::Duration::from_secs(30), || {
            site.ok(&[
                "get",
                "widget",
                "w1",
                "-o",
                "jsonpath={.status.observedSize}",
            ])
            .trim()
                == want
        })
    };
    assert!(status("3"), "{}", kopf_log());
    let widget = site.json(&["get", "widget", "w1", "-o", "json"]);
    assert_eq!(widget["status"]["created"]["handled"], true, "{widget}");
    assert!(
        widget["metadata"]["finalizers"]
            .to_string()
            .contains("kopf.zalando.org"),
        "{widget}"
    );
    site.ok(&[
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":5}}"#,
    ]);
    assert!(status("5"), "{}", kopf_log());
    site.ok(&["delete", "widget", "w1", "--timeout=30s"]);
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=w1",
    ]);
    assert!(
        events.contains("Seen") && events.contains("a widget"),
        "{events}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let text = kopf_log();
    assert!(text.contains("widget w1 let go"), "{text}");
    assert!(!text.contains("Traceback"), "{text}");
}

/// pykube-ng (PyPI): objects, `Deployment.ready` and scale, update, set-based selectors, watch.
#[test]
fn pykube_works_unchanged() {
    let site = Site::start().unwrap();
    site.python_ok(
        r#"
import time
import pykube
api = pykube.HTTPClient(pykube.KubeConfig.from_file())
assert "kube-system" in [n.name for n in pykube.Namespace.objects(api)]
d = pykube.Deployment(api, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "pk", "namespace": "default"},
  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "pk"}}, "template": {"metadata": {"labels": {"app": "pk"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})
d.create()
assert "status" in d.obj, d.obj
# `ready` compares the controller's observed generation: once it has seen the Deployment.
for _ in range(50):
    d.reload()
    if d.obj["status"].get("observedGeneration"):
        break
    time.sleep(0.2)
assert d.ready, d.obj["status"]
d.scale(2)
d.reload()
assert d.replicas == 2
cm = pykube.ConfigMap(api, {"metadata": {"name": "pk-cm", "namespace": "default"}, "data": {"a": "1"}})
cm.create()
cm.obj["data"]["b"] = "2"
cm.update()
cm.reload()
assert cm.obj["data"] == {"a": "1", "b": "2"}
names = sorted(c.name for c in pykube.ConfigMap.objects(api).filter(namespace="default", selector={"missing__notin": ["x"]}))
assert names == ["kube-root-ca.crt", "pk-cm"], names
seen = []
for event in pykube.ConfigMap.objects(api).filter(namespace="default").watch():
    seen.append((event.type, event.object.name))
    if len(seen) == 2:
        break
assert sorted(seen) == [("ADDED", "kube-root-ca.crt"), ("ADDED", "pk-cm")], seen
d.delete()
print("pykube ok")
"#,
    );
}

/// The official client against the storage, autoscaling and debugging APIs (not only kubectl):
/// the default StorageClass, a claim waiting for its first consumer, an autoscaler's status
/// written by the site's controller, and `pods/ephemeralcontainers` (read, patched, refused).
#[test]
fn python_client_reads_claims_autoscalers_and_ephemeral_containers() {
    let site = Site::start().unwrap();
    let out = site.python_ok(
        r#"
import time
from kubernetes import client, config
config.load_kube_config()
core, storage, scaling = client.CoreV1Api(), client.StorageV1Api(), client.AutoscalingV2Api()
apps = client.AppsV1Api()

classes = {c.metadata.name: c for c in storage.list_storage_class().items}
lp = classes["local-path"]
assert lp.metadata.annotations["storageclass.kubernetes.io/is-default-class"] == "true", lp
assert lp.volume_binding_mode == "WaitForFirstConsumer" and lp.provisioner == "rancher.io/local-path", lp

claim = client.V1PersistentVolumeClaim(
    metadata=client.V1ObjectMeta(name="data"),
    spec=client.V1PersistentVolumeClaimSpec(access_modes=["ReadWriteOnce"],
        resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"})))
made = core.create_namespaced_persistent_volume_claim("default", claim)
assert made.spec.storage_class_name == "local-path", made.spec
assert "kubernetes.io/pvc-protection" in made.metadata.finalizers, made.metadata
for _ in range(100):
    events = core.list_namespaced_event("default", field_selector="involvedObject.name=data").items
    if any(e.reason == "WaitForFirstConsumer" for e in events):
        break
    time.sleep(0.2)
else:
    raise SystemExit("no WaitForFirstConsumer event")
assert core.read_namespaced_persistent_volume_claim("data", "default").status.phase == "Pending"

apps.create_namespaced_deployment("default", client.V1Deployment(
    metadata=client.V1ObjectMeta(name="web"),
    spec=client.V1DeploymentSpec(replicas=1,
        selector=client.V1LabelSelector(match_labels={"app": "web"}),
        template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels={"app": "web"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")])))))
scaling.create_namespaced_horizontal_pod_autoscaler("default", client.V2HorizontalPodAutoscaler(
    metadata=client.V1ObjectMeta(name="web"),
    spec=client.V2HorizontalPodAutoscalerSpec(min_replicas=1, max_replicas=3,
        scale_target_ref=client.V2CrossVersionObjectReference(api_version="apps/v1", kind="Deployment", name="web"),
        metrics=[client.V2MetricSpec(type="Resource", resource=client.V2ResourceMetricSource(name="cpu",
            target=client.V2MetricTarget(type="Utilization", average_utilization=50)))])))
for _ in range(150):
    status = scaling.read_namespaced_horizontal_pod_autoscaler_status("web", "default").status
    kinds = {c.type: c for c in (status.conditions or [])}
    if "AbleToScale" in kinds and "ScalingActive" in kinds:
        break
    time.sleep(0.2)
else:
    raise SystemExit("the autoscaler's status has no conditions: %s" % status)
assert kinds["AbleToScale"].status == "True", kinds

pod = client.V1Pod(metadata=client.V1ObjectMeta(name="app"),
    spec=client.V1PodSpec(containers=[client.V1Container(name="app", image="busybox")]))
core.create_namespaced_pod("default", pod)
got = core.read_namespaced_pod_ephemeralcontainers("app", "default")
assert not got.spec.ephemeral_containers, got.spec
patched = core.patch_namespaced_pod_ephemeralcontainers("app", "default",
    {"spec": {"ephemeralContainers": [{"name": "dbg", "image": "busybox", "targetContainerName": "app"}]}})
assert [e.name for e in patched.spec.ephemeral_containers] == ["dbg"], patched.spec
assert patched.spec.ephemeral_containers[0].termination_message_policy == "File"
try:
    core.patch_namespaced_pod_ephemeralcontainers("app", "default",
        {"spec": {"ephemeralContainers": [{"name": "dbg", "image": "alpine"}]}})
    raise SystemExit("changing an ephemeral container was accepted")
except client.exceptions.ApiException as e:
    assert e.status == 422 and "may not be changed" in e.body, e.body
print("storage, autoscaling and ephemeral containers ok")
"#,
    );
    assert!(
        out.contains("storage, autoscaling and ephemeral containers ok"),
        "{out}"
    );
}
