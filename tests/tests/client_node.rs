//! `@kubernetes/client-node` (npm, the JavaScript client) against a real server: typed CRUD,
//! merge patches, watch, an informer, server-side apply through its generic object API.
//! `tests/run.sh` installs it into `target/node-client`; without it this test fails naming it.
//! (Its exec and port-forward run against real containers in `interactive.rs`.)

use tests::Site;

#[test]
fn client_node_works_unchanged() {
    let site = Site::start().unwrap();
    site.node_ok(CHECKS);
}

/// The same checks through a cloud hub's cluster proxy (`edgesite cloudhub kubeconfig --site`).
#[test]
fn client_node_works_through_the_hub() {
    let hub = Site::start_hub(&[]).unwrap();
    let (_site, kubeconfig) = hub.attach_site("js-site").unwrap();
    hub.node_ok_with(&kubeconfig, CHECKS);
}

const CHECKS: &str = r#"
import * as k8s from '@kubernetes/client-node';
import assert from 'node:assert/strict';
const kc = new k8s.KubeConfig();
kc.loadFromDefault();
const core = kc.makeApiClient(k8s.CoreV1Api);
const apps = kc.makeApiClient(k8s.AppsV1Api);
const ns = await core.listNamespace();
assert.ok(ns.items.some((n) => n.metadata.name === 'kube-system'));
await core.createNamespacedConfigMap({ namespace: 'default', body: { metadata: { name: 'cn-cm' }, data: { a: '1' } } });
const patched = await core.patchNamespacedConfigMap(
  { name: 'cn-cm', namespace: 'default', body: { data: { b: '2' } } },
  k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.MergePatch));
assert.deepEqual(patched.data, { a: '1', b: '2' });
const d = await apps.createNamespacedDeployment({ namespace: 'default', body: { metadata: { name: 'cn-dep' },
  spec: { selector: { matchLabels: { app: 'cn' } }, template: { metadata: { labels: { app: 'cn' } },
  spec: { containers: [{ name: 'c', image: 'busybox' }] } } } } });
assert.ok(d.status !== undefined, 'a created Deployment has a status');
const seen = [];
const req = await new k8s.Watch(kc).watch('/api/v1/namespaces/default/configmaps', {},
  (type, obj) => seen.push(`${type} ${obj.metadata.name}`), () => {});
await new Promise((r) => setTimeout(r, 1000));
await core.createNamespacedConfigMap({ namespace: 'default', body: { metadata: { name: 'cn-cm2' } } });
await new Promise((r) => setTimeout(r, 1000));
req.abort();
assert.deepEqual(seen.sort(), ['ADDED cn-cm', 'ADDED cn-cm2', 'ADDED kube-root-ca.crt']);
const informer = k8s.makeInformer(kc, '/api/v1/namespaces/default/configmaps',
  () => core.listNamespacedConfigMap({ namespace: 'default' }));
const added = [];
informer.on('add', (o) => added.push(o.metadata.name));
await informer.start();
await new Promise((r) => setTimeout(r, 1000));
await core.deleteNamespacedConfigMap({ name: 'cn-cm2', namespace: 'default' });
await new Promise((r) => setTimeout(r, 1000));
await informer.stop();
assert.deepEqual(added.sort(), ['cn-cm', 'cn-cm2', 'kube-root-ca.crt']);
const objects = k8s.KubernetesObjectApi.makeApiClient(kc);
const applied = await objects.patch(
  { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'cn-applied', namespace: 'default' }, data: { x: '1' } },
  undefined, undefined, 'client-node-check', true, k8s.PatchStrategy.ServerSideApply);
assert.equal(applied.metadata.managedFields[0].manager, 'client-node-check');
const list = await objects.list('v1', 'ConfigMap', 'default');
assert.equal(list.items.length, 3);
console.log('client-node ok');
"#;
