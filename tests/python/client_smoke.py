"""The official Python client against an EdgeSite server: CRUD, selectors, patches, watch,
DeleteOptions as query parameters, custom objects. Run by tests/tests/python.rs with
KUBECONFIG pointing at the site; prints one line per check and exits non-zero on failure."""

import json
import os
import sys

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config(config_file=os.environ["KUBECONFIG"])
core = client.CoreV1Api()
apps = client.AppsV1Api()
ext = client.ApiextensionsV1Api()
custom = client.CustomObjectsApi()


def check(name, condition):
    print(("ok   " if condition else "FAIL ") + name)
    if not condition:
        sys.exit(1)


ns = "py"
core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
for i in range(5):
    core.create_namespaced_config_map(
        ns,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"cm{i}", labels={"parity": "even" if i % 2 == 0 else "odd"}),
            data={"i": str(i)},
        ),
    )
even = core.list_namespaced_config_map(ns, label_selector="parity=even")
check("label selector", sorted(c.metadata.name for c in even.items) == ["cm0", "cm2", "cm4"])
# (every namespace also holds kube-root-ca.crt: select the test's own objects)
page = core.list_namespaced_config_map(ns, limit=2, label_selector="parity")
rest = core.list_namespaced_config_map(ns, limit=10, label_selector="parity", _continue=page.metadata._continue)
check("limit and continue", len(page.items) == 2 and len(rest.items) == 3)
by_name = core.list_namespaced_config_map(ns, field_selector="metadata.name=cm3")
check("field selector", [c.metadata.name for c in by_name.items] == ["cm3"])

patched = core.patch_namespaced_config_map("cm1", ns, {"data": {"extra": "yes"}})
check("strategic merge patch (the client's default for dicts)", patched.data == {"i": "1", "extra": "yes"})

try:
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm1")))
    check("duplicate create is a conflict", False)
except ApiException as e:
    check("duplicate create is 409 AlreadyExists", e.status == 409 and '"reason":"AlreadyExists"' in e.body)

rv = core.list_namespaced_config_map(ns).metadata.resource_version
core.delete_namespaced_config_map("cm0", ns, propagation_policy="Background", grace_period_seconds=0)
seen = []
for event in watch.Watch().stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=2):
    seen.append((event["type"], event["object"].metadata.name))
check("watch from a resourceVersion", seen == [("DELETED", "cm0")])

deployment = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="web"),
    spec=client.V1DeploymentSpec(
        replicas=2,
        selector=client.V1LabelSelector(match_labels={"app": "web"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "web"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx:1.25")]),
        ),
    ),
)
apps.create_namespaced_deployment(ns, deployment)
scale = apps.read_namespaced_deployment_scale("web", ns)
check("scale subresource", scale.spec.replicas == 2)
apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 5}})
check("scale patch", apps.read_namespaced_deployment("web", ns).spec.replicas == 5)
# The DELETE's own answer: a later read may find the deployment already gone (nothing depended
# on it yet, so the garbage collector finished the foreground deletion at once).
answer = apps.delete_namespaced_deployment("web", ns, propagation_policy="Foreground", _preload_content=False)
left = json.loads(answer.data)
check("foreground deletion via query parameter", "foregroundDeletion" in (left.get("metadata", {}).get("finalizers") or []))

crd = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "properties": {"size": {"type": "integer", "default": 3}}}}}},
        }],
    },
}
ext.create_custom_resource_definition(crd)
custom.create_namespaced_custom_object("example.com", "v1", ns, "widgets",
                                       {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {}})
w1 = custom.get_namespaced_custom_object("example.com", "v1", ns, "widgets", "w1")
check("custom object with schema default", w1["spec"]["size"] == 3)
try:
    custom.create_namespaced_custom_object("example.com", "v1", ns, "widgets",
                                           {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w2"}, "spec": {"size": "big"}})
    check("schema validation", False)
except ApiException as e:
    check("schema validation is 422", e.status == 422 and "spec.size" in e.body)
print("all checks passed")
