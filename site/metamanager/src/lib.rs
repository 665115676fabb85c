//! metamanager: the node's own copy of what it needs to run its pods (KubeEdge's MetaManager).
//!
//! Every object the node agent reads from the API goes through [`MetaManager`]: its pods (written
//! through as the pod watch delivers them), the Node itself, and the ConfigMaps, Secrets,
//! ServiceAccount tokens and Services its pods reference (written through on each read). When
//! the API server cannot be reached (killed, or the network is gone) reads are answered from the
//! SQLite file (`store.rs`), so a restarted agent, or a machine rebooted while offline, starts its
//! pods again from the cache.
//!
//! Writes that must reach the API (pod statuses) are queued here: newest status per pod wins,
//! one entry per pod, flushed in the background as soon as the API answers again.
//!
//! Reachability is tracked from every API call: an answer (even an error Status) means online;
//! a transport failure or timeout means offline. While offline, reads go straight to the cache
//! (no waiting on timeouts) and a probe asks the API server every [`PROBE_EVERY`] whether it is
//! back.

pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Resource;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use store::{Store, StoreError};

/// How long one API call may take before the API counts as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an offline node asks whether the API server is back.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// An object kind the cache can hold.
pub trait Cached:
    Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
}
impl<K> Cached for K where
    K: Resource<DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The API answered with an error Status.
    #[error("{0}")]
    Api(kube::Error),
    /// The API could not be reached and the cache has no copy.
    #[error("the API server is unreachable and the node has no cached copy ({0})")]
    Unreachable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether an API error means the server answered (as opposed to a transport failure).
pub fn answered(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(_))
}

struct PendingStatus {
    namespace: String,
    name: String,
    status: Value,
}

pub struct MetaManager {
    store: Store,
    client: kube::Client,
    online: watch::Sender<bool>,
    /// Pod statuses not yet accepted by the API, by pod uid.
    statuses: Mutex<BTreeMap<String, PendingStatus>>,
    flush: Notify,
}

fn kind_of<K: Cached>() -> String {
    K::kind(&()).into_owned()
}

impl MetaManager {
    /// Opens (or creates) the cache file.
    pub fn open(path: &Path, client: kube::Client) -> Result<MetaManager, StoreError> {
        Ok(MetaManager {
            store: Store::open(path)?,
            client,
            online: watch::Sender::new(true),
            statuses: Mutex::new(BTreeMap::new()),
            flush: Notify::new(),
        })
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    pub fn online(&self) -> bool {
        *self.online.borrow()
    }

    /// Follows reachability changes (true: the API answers).
    pub fn watch_online(&self) -> watch::Receiver<bool> {
        self.online.subscribe()
    }

    /// Records what a call to the API showed about reachability.
    pub fn observe<T>(&self, result: &Result<T, kube::Error>) {
        match result {
            Ok(_) => self.set_online(true),
            Err(e) if answered(e) => self.set_online(true),
            Err(_) => self.set_online(false),
        }
    }

    pub fn set_online(&self, online: bool) {
        let changed = self.online.send_if_modified(|o| {
            let changed = *o != online;
            *o = online;
            changed
        });
        if changed {
            if online {
                tracing::info!("the API server answers again; flushing queued updates");
                self.flush.notify_one();
            } else {
                tracing::warn!(
                    "the API server is unreachable; the node runs from its local cache and queues its updates"
                );
            }
        }
    }

    /// Runs an API call with [`CALL_TIMEOUT`], recording reachability.
    pub async fn call<T, F>(&self, what: &str, f: F) -> Result<T, kube::Error>
    where
        F: Future<Output = Result<T, kube::Error>>,
    {
        let result = match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(
                format!("{what}: no answer within {CALL_TIMEOUT:?}").into(),
            )),
        };
        self.observe(&result);
        result
    }

    // ---- typed cache access ----

    /// Writes an object the agent received from the API into the cache.
    pub fn put<K: Cached>(&self, object: &K) {
        let meta = object.meta();
        let (Some(name), Ok(body)) = (meta.name.as_deref(), serde_json::to_value(object)) else {
            return;
        };
        let namespace = meta.namespace.as_deref().unwrap_or("");
        if let Err(e) = self.store.put(&kind_of::<K>(), namespace, name, &body) {
            tracing::warn!("{e}");
        }
    }

    pub fn remove<K: Cached>(&self, namespace: &str, name: &str) {
        if let Err(e) = self.store.delete(&kind_of::<K>(), namespace, name) {
            tracing::warn!("{e}");
        }
    }

    /// The cached copy, if any.
    pub fn cached<K: Cached>(&self, namespace: &str, name: &str) -> Option<K> {
        let kind = kind_of::<K>();
        let body = match self.store.get(&kind, namespace, name) {
            Ok(b) => b?,
            Err(e) => {
                tracing::warn!("{e}");
                return None;
            }
        };
        match serde_json::from_value(body) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(kind, namespace, name, "unreadable cached object: {e}");
                None
            }
        }
    }

    /// Every cached object of a kind (in `namespace` when given).
    pub fn cached_all<K: Cached>(&self, namespace: Option<&str>) -> Vec<K> {
        let kind = kind_of::<K>();
        match self.store.list(&kind, namespace) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|(_, _, body)| serde_json::from_value(body).ok())
                .collect(),
            Err(e) => {
                tracing::warn!("{e}");
                Vec::new()
            }
        }
    }

    /// A namespaced object: from the API when it answers (and then cached, or dropped from the
    /// cache when the API says it is gone), else the cached copy.
    pub async fn get<K>(&self, namespace: &str, name: &str) -> Result<Option<K>, MetaError>
    where
        K: Cached + Resource<Scope = NamespaceResourceScope>,
    {
        if self.online() {
            let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
            match self.call("get", api.get_opt(name)).await {
                Ok(Some(object)) => {
                    self.put(&object);
                    return Ok(Some(object));
                }
                Ok(None) => {
                    self.remove::<K>(namespace, name);
                    return Ok(None);
                }
                Err(e) if answered(&e) => return Err(MetaError::Api(e)),
                Err(e) => return self.cached_or(namespace, name, e.to_string()),
            }
        }
        self.cached_or(namespace, name, "offline".into())
    }

    /// A cluster-scoped object (a PersistentVolume): as [`MetaManager::get`].
    pub async fn get_cluster<K>(&self, name: &str) -> Result<Option<K>, MetaError>
    where
        K: Cached + Resource<Scope = k8s_openapi::ClusterResourceScope>,
    {
        if self.online() {
            let api: Api<K> = Api::all(self.client.clone());
            match self.call("get", api.get_opt(name)).await {
                Ok(Some(object)) => {
                    self.put(&object);
                    return Ok(Some(object));
                }
                Ok(None) => {
                    self.remove::<K>("", name);
                    return Ok(None);
                }
                Err(e) if answered(&e) => return Err(MetaError::Api(e)),
                Err(e) => return self.cached_or("", name, e.to_string()),
            }
        }
        self.cached_or("", name, "offline".into())
    }

    fn cached_or<K: Cached>(
        &self,
        namespace: &str,
        name: &str,
        why: String,
    ) -> Result<Option<K>, MetaError> {
        match self.cached::<K>(namespace, name) {
            Some(k) => {
                tracing::debug!(kind = %kind_of::<K>(), namespace, name, "served from the node cache: {why}");
                Ok(Some(k))
            }
            None => Err(MetaError::Unreachable(why)),
        }
    }

    /// Every object of a kind in a namespace: from the API when it answers (the cached set is
    /// replaced), else the cached set.
    pub async fn list<K>(&self, namespace: &str) -> Result<Vec<K>, MetaError>
    where
        K: Cached + Resource<Scope = NamespaceResourceScope>,
    {
        if self.online() {
            let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
            match self.call("list", api.list(&ListParams::default())).await {
                Ok(list) => {
                    let items: Vec<(String, Value)> = list
                        .items
                        .iter()
                        .filter_map(|o| {
                            Some((o.meta().name.clone()?, serde_json::to_value(o).ok()?))
                        })
                        .collect();
                    if let Err(e) = self.store.replace(&kind_of::<K>(), namespace, &items) {
                        tracing::warn!("{e}");
                    }
                    return Ok(list.items);
                }
                Err(e) if answered(&e) => return Err(MetaError::Api(e)),
                Err(_) => {}
            }
        }
        Ok(self.cached_all(Some(namespace)))
    }

    /// A value the agent derived itself (a token, a lease) under `kind`/`key`.
    pub fn put_value(&self, kind: &str, namespace: &str, key: &str, value: &Value) {
        if let Err(e) = self.store.put(kind, namespace, key, value) {
            tracing::warn!("{e}");
        }
    }

    pub fn value(&self, kind: &str, namespace: &str, key: &str) -> Option<Value> {
        self.store.get(kind, namespace, key).ok().flatten()
    }

    // ---- pods ----

    /// The pods cached for this node (what it runs when it starts without the API).
    pub fn pods(&self, node: &str) -> Vec<Pod> {
        self.cached_all::<Pod>(None)
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .collect()
    }

    pub fn node(&self, name: &str) -> Option<Node> {
        self.cached::<Node>("", name)
    }

    /// Queues the pod's newest status for the API (replacing an unsent older one) and keeps it
    /// in the cached pod, so a restart offline knows the pod's IP and start time.
    pub fn pod_status(&self, pod: &Pod, status: Value) {
        let (Some(uid), Some(namespace), Some(name)) = (
            pod.metadata.uid.clone(),
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
        ) else {
            return;
        };
        if let Some(mut cached) = self.cached::<Pod>(&namespace, &name)
            && cached.metadata.uid.as_deref() == Some(uid.as_str())
        {
            let mut merged = serde_json::to_value(cached.status.take()).unwrap_or(json!({}));
            merge(&mut merged, &status);
            if let Ok(s) = serde_json::from_value(merged) {
                cached.status = Some(s);
                self.put(&cached);
            }
        }
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                uid,
                PendingStatus {
                    namespace,
                    name,
                    status,
                },
            );
        self.flush.notify_one();
    }

    /// How many pod statuses wait for the API.
    pub fn queued_statuses(&self) -> usize {
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Forgets a pod: its cached copy and any status not yet sent.
    pub fn forget_pod(&self, namespace: &str, name: &str, uid: &str) {
        if self
            .cached::<Pod>(namespace, name)
            .is_some_and(|p| p.metadata.uid.as_deref() == Some(uid))
        {
            self.remove::<Pod>(namespace, name);
        }
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// Sends queued statuses until the queue is empty or the API stops answering.
    async fn flush_statuses(&self) {
        loop {
            let next = {
                let q = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
                q.iter().next().map(|(uid, p)| {
                    (
                        uid.clone(),
                        p.namespace.clone(),
                        p.name.clone(),
                        p.status.clone(),
                    )
                })
            };
            let Some((uid, namespace, name, status)) = next else {
                return;
            };
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            // The uid makes the patch a precondition: a newer pod of the same name is left alone.
            let patch = json!({"metadata": {"uid": uid}, "status": status});
            let result = self
                .call(
                    "pod status",
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await;
            match result {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => {
                    tracing::debug!(pod = %name, code = s.code, "status of a pod that is gone dropped");
                }
                Err(e) if answered(&e) => {
                    tracing::warn!(pod = %name, "pod status update refused: {e}");
                }
                Err(e) => {
                    tracing::debug!(pod = %name, "pod status update waits for the API: {e}");
                    return;
                }
            }
            let mut q = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
            // Drop it unless a newer status replaced it meanwhile.
            if q.get(&uid).is_some_and(|p| p.status == status) {
                q.remove(&uid);
            }
        }
    }

    /// Flushes queued statuses and, while offline, probes the API server. Runs until shutdown.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            if self.online() {
                self.flush_statuses().await;
            } else {
                let probe = self.client.apiserver_version();
                let _ = self.call("probe", probe).await;
                if self.online() {
                    continue;
                }
            }
            let pending = self.queued_statuses() > 0;
            let wait = if self.online() && !pending {
                Duration::from_secs(3600)
            } else {
                PROBE_EVERY
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.flush.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Drops cached ConfigMaps, Secrets, ServiceAccounts and derived values that no cached pod
    /// references any more.
    pub fn collect_garbage(&self, node: &str) {
        let pods = self.pods(node);
        let mut keep: BTreeSet<(String, String, String)> = BTreeSet::new();
        let mut namespaces: BTreeSet<String> = BTreeSet::new();
        for pod in &pods {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            namespaces.insert(ns.clone());
            for (kind, name) in references(pod) {
                keep.insert((kind, ns.clone(), name));
            }
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            keep.insert(("ServiceAccountToken".into(), ns.clone(), uid));
        }
        let Ok(keys) = self.store.keys() else {
            return;
        };
        for (kind, ns, name) in keys {
            let drop = match kind.as_str() {
                "ConfigMap" | "Secret" | "ServiceAccount" => {
                    !keep.contains(&(kind.clone(), ns.clone(), name.clone()))
                }
                "ServiceAccountToken" => !keep.iter().any(|(k, n, uid)| {
                    k == "ServiceAccountToken" && *n == ns && name.starts_with(uid.as_str())
                }),
                "Service" => {
                    let api_server = ns == "default" && name == "kubernetes";
                    !api_server && !namespaces.contains(&ns)
                }
                _ => false,
            };
            if drop {
                let _ = self.store.delete(&kind, &ns, &name);
            }
        }
    }
}

/// (kind, name) of every ConfigMap, Secret and ServiceAccount a pod uses.
pub fn references(pod: &Pod) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(spec) = &pod.spec else {
        return out;
    };
    out.push((
        "ServiceAccount".into(),
        spec.service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
    ));
    for s in spec.image_pull_secrets.iter().flatten() {
        out.push(("Secret".into(), s.name.clone()));
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            out.push(("ConfigMap".into(), cm.name.clone()));
        }
        if let Some(s) = &v.secret
            && let Some(n) = &s.secret_name
        {
            out.push(("Secret".into(), n.clone()));
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &source.config_map {
                out.push(("ConfigMap".into(), cm.name.clone()));
            }
            if let Some(s) = &source.secret {
                out.push(("Secret".into(), s.name.clone()));
            }
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            let from = e.value_from.as_ref();
            if let Some(r) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                out.push(("ConfigMap".into(), r.name.clone()));
            }
            if let Some(r) = from.and_then(|f| f.secret_key_ref.as_ref()) {
                out.push(("Secret".into(), r.name.clone()));
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                out.push(("ConfigMap".into(), r.name.clone()));
            }
            if let Some(r) = &e.secret_ref {
                out.push(("Secret".into(), r.name.clone()));
            }
        }
    }
    out
}

/// JSON merge patch (RFC 7386) of `patch` into `target`.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_cover_volumes_env_and_pull_secrets() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "serviceAccountName": "robot",
                "imagePullSecrets": [{"name": "pull"}],
                "volumes": [
                    {"name": "a", "configMap": {"name": "cm-vol"}},
                    {"name": "b", "secret": {"secretName": "s-vol"}},
                    {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "s-proj"}}]}}
                ],
                "containers": [{
                    "name": "c",
                    "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}}],
                    "envFrom": [{"configMapRef": {"name": "cm-env"}}]
                }]
            }
        }))
        .unwrap();
        let mut refs = references(&pod);
        refs.sort();
        let names: Vec<String> = refs.iter().map(|(k, n)| format!("{k}/{n}")).collect();
        assert_eq!(
            names,
            [
                "ConfigMap/cm-env",
                "ConfigMap/cm-proj",
                "ConfigMap/cm-vol",
                "Secret/pull",
                "Secret/s-env",
                "Secret/s-proj",
                "Secret/s-vol",
                "ServiceAccount/robot"
            ]
        );
    }

    #[test]
    fn merge_follows_rfc_7386() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut v, &json!({"b": {"c": null, "e": 4}, "f": [1]}));
        assert_eq!(v, json!({"a": 1, "b": {"d": 3, "e": 4}, "f": [1]}));
    }
}
