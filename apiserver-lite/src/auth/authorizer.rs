//! The authorizer chain and the caches it decides from.
//!
//! Order, as upstream's `--authorization-mode=Node,RBAC` behind the privileged group:
//! `system:masters` is always allowed; a node agent is asked of the Node authorizer; then RBAC.
//! Decisions read a [`Policy`] and a node [`Graph`] kept by one task from the storage's watch
//! hub (no list per request). The cache lags the store by at most one broadcast hop, so before
//! a denial is answered [`Authorizer::authorize_fresh`] waits for the cache to reach the
//! revision the store had when the request arrived: a binding created just before is honoured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::node::Graph;
use super::rbac::{Binding, Policy, rules_of};
use super::{Attributes, Decision, Identity, MASTERS};
use crate::storage::{EventType, Storage, StorageError};

/// Events taken from the store's window at once.
const BATCH: usize = 1024;

/// How long a denial waits for the cache to catch up with the store.
const FRESHNESS_WAIT: Duration = Duration::from_secs(2);

/// Key prefixes the cache follows.
const CLUSTER_ROLES: &str = "/rbac.authorization.k8s.io/clusterroles/";
const ROLES: &str = "/rbac.authorization.k8s.io/roles/";
const CLUSTER_ROLE_BINDINGS: &str = "/rbac.authorization.k8s.io/clusterrolebindings/";
const ROLE_BINDINGS: &str = "/rbac.authorization.k8s.io/rolebindings/";
const PODS: &str = "/core/pods/";
const CLAIMS: &str = "/core/persistentvolumeclaims/";
const VOLUMES: &str = "/core/persistentvolumes/";
const DEVICES: &str = "/devices.kubeedge.io/devices/";
const SERVICE_ACCOUNTS: &str = "/core/serviceaccounts/";
const INGRESSES: &str = "/networking.k8s.io/ingresses/";
const GATEWAYS: &str = "/gateway.networking.k8s.io/gateways/";
/// Where the node passwords (and the serial of each node's certificate) are kept.
const NODE_PASSWORDS: &str = "/core/secrets/kube-system/";
const NODE_PASSWORD_SUFFIX: &str = ".node-password.edgesite";
/// A cloud hub keeps its sites' passwords (and certificate serials) beside the nodes'.
const SITE_PASSWORD_SUFFIX: &str = ".site-password.edgesite";
const FOLLOWED: [&str; 12] = [
    CLUSTER_ROLES,
    ROLES,
    CLUSTER_ROLE_BINDINGS,
    ROLE_BINDINGS,
    PODS,
    CLAIMS,
    VOLUMES,
    DEVICES,
    SERVICE_ACCOUNTS,
    NODE_PASSWORDS,
    INGRESSES,
    GATEWAYS,
];

#[derive(Default)]
pub struct Authorizer {
    policy: RwLock<Arc<Policy>>,
    graph: RwLock<Graph>,
    /// ServiceAccounts by `namespace/name`: what ServiceAccount admission needs of them.
    accounts: std::sync::Mutex<HashMap<String, Value>>,
    /// Nodes that joined with a token: the serial of the one certificate that is theirs
    /// (empty once the node was removed).
    node_certificates: std::sync::Mutex<HashMap<String, String>>,
    /// The store revision the caches reflect.
    seen: AtomicU64,
    caught_up: tokio::sync::Notify,
}

/// The RBAC objects as stored, to rebuild the policy from.
#[derive(Default)]
struct RbacObjects {
    objects: HashMap<String, Value>,
}

impl RbacObjects {
    fn policy(&self) -> Policy {
        let mut p = Policy::default();
        for (key, object) in &self.objects {
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let namespace = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if key.starts_with(CLUSTER_ROLES) {
                p.cluster_roles.insert(name, Arc::new(rules_of(object)));
            } else if key.starts_with(ROLES) {
                p.roles
                    .insert((namespace, name), Arc::new(rules_of(object)));
            } else if key.starts_with(CLUSTER_ROLE_BINDINGS) {
                let mut b = Binding::from_object(object);
                b.namespace.clear();
                p.cluster_bindings.push(b);
            } else if key.starts_with(ROLE_BINDINGS) {
                p.bindings
                    .entry(namespace)
                    .or_default()
                    .push(Binding::from_object(object));
            }
        }
        p
    }
}

impl Authorizer {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The current RBAC policy (for reviews and escalation checks).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn accounts_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, Value>> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What ServiceAccount admission needs of an account (`automountServiceAccountToken`,
    /// `imagePullSecrets`), from the cache; `None` when the cache has not seen it.
    pub fn service_account(&self, namespace: &str, name: &str) -> Option<Value> {
        self.accounts_mut()
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Whether a node's client certificate with `serial` still authenticates: nodes that joined
    /// with a token have one certificate on record (none after `edgesite node remove`); nodes
    /// without a record (the server's own) are not restricted.
    pub fn node_certificate_valid(&self, node: &str, serial: &str) -> bool {
        self.node_certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_none_or(|kept| kept == serial)
    }

    /// Whether a site's client certificate with `serial` still authenticates (a cloud hub): a
    /// site has one certificate on record, replaced when the name is claimed again.
    pub fn site_certificate_valid(&self, site: &str, serial: &str) -> bool {
        self.node_certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format!("{}{site}", crate::cloud_link::SITE_PREFIX))
            .is_none_or(|kept| kept == serial)
    }

    /// The node a pod is bound to, as the Node authorizer's graph has it.
    pub fn pod_node(&self, namespace: &str, name: &str) -> Option<String> {
        self.graph
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .pod_node(namespace, name)
            .map(String::from)
    }

    /// The decision from the caches as they are.
    pub fn authorize(&self, user: &Identity, a: &Attributes) -> Decision {
        if user.in_group(MASTERS) {
            return Decision::Allow(String::new());
        }
        // A site's certificate (a cloud hub's) opens its link and renews itself; anything else is
        // RBAC's to decide.
        if crate::cloud_link::site_of(user).is_some()
            && ((a.verb == "get" && a.path == crate::cloud_link::SITE_LINK_PATH)
                || (a.verb == "post" && a.path == crate::cloud_link::SITE_RENEW_PATH))
        {
            return Decision::Allow(String::new());
        }
        let mut reasons = Vec::new();
        if let Some(node) = user.node_name() {
            let decision = {
                let graph = self.graph.read().unwrap_or_else(|e| e.into_inner());
                super::node::authorize(&graph, node, a, &super::policy::bootstrap().node_rules)
            };
            match decision {
                Decision::NoOpinion(r) if !r.is_empty() => reasons.push(r),
                Decision::NoOpinion(_) => {}
                decided => return decided,
            }
        }
        match self.policy().authorize(user, a) {
            Decision::NoOpinion(r) => {
                if !r.is_empty() {
                    reasons.push(r);
                }
                Decision::NoOpinion(reasons.join(", "))
            }
            decided => decided,
        }
    }

    /// [`Self::authorize`], but a denial is answered only once the caches reflect every write
    /// committed before `revision` (the store's revision when the request arrived).
    pub async fn authorize_fresh(
        &self,
        revision: u64,
        user: &Identity,
        a: &Attributes,
    ) -> Decision {
        let decision = self.authorize(user, a);
        if decision.allowed() || self.seen.load(Ordering::Acquire) >= revision {
            return decision;
        }
        let deadline = tokio::time::Instant::now() + FRESHNESS_WAIT;
        loop {
            let notified = self.caught_up.notified();
            if self.seen.load(Ordering::Acquire) >= revision {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    revision,
                    "the authorization cache is behind the store; answering from it"
                );
                break;
            }
        }
        self.authorize(user, a)
    }

    /// Keeps the caches from the store until `shutdown`: a list, then the hub's events; a
    /// watcher that fell behind lists again.
    pub async fn run(self: Arc<Self>, storage: Arc<dyn Storage>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.follow(&*storage, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!("authorization cache: {e}; listing again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One load of the caches and following them; returns `Ok` on shutdown.
    pub async fn load(
        &self,
        storage: &dyn Storage,
    ) -> Result<(RbacObjectsHandle, u64), StorageError> {
        let mut rbac = RbacObjects::default();
        let mut graph = Graph::default();
        let accounts = std::sync::Mutex::new(HashMap::new());
        let node_certificates = std::sync::Mutex::new(HashMap::new());
        let caches = Caches {
            accounts: &accounts,
            node_certificates: &node_certificates,
        };
        let mut revision = u64::MAX;
        for prefix in FOLLOWED {
            let listing = storage.list(prefix, None, None).await?;
            revision = revision.min(listing.revision);
            for item in listing.items {
                apply(&mut rbac, &mut graph, &caches, &item.key, Some(&item.raw));
            }
        }
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rbac.policy());
        *self.graph.write().unwrap_or_else(|e| e.into_inner()) = graph;
        *self.accounts_mut() = accounts.into_inner().unwrap_or_else(|e| e.into_inner());
        *self
            .node_certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = node_certificates
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        Ok((RbacObjectsHandle(rbac), revision))
    }

    async fn follow(
        &self,
        storage: &dyn Storage,
        shutdown: &CancellationToken,
    ) -> Result<(), StorageError> {
        // Subscribe before listing: events already in the lists are applied again, harmlessly.
        let after = storage.revision();
        let mut cursor = storage.hub().cursor(Some(after))?;
        let (RbacObjectsHandle(mut rbac), listed) = self.load(storage).await?;
        self.mark(listed);
        let mut pending = cursor.ready(storage.hub(), BATCH)?;
        loop {
            let mut rbac_changed = false;
            let mut last = None;
            for event in pending.drain(..) {
                last = Some(event.revision);
                if !FOLLOWED.iter().any(|p| event.key.starts_with(p)) {
                    continue;
                }
                let text = match event.event_type {
                    EventType::Deleted => None,
                    _ => Some(&*event.object),
                };
                let is_rbac = !event.key.starts_with(PODS)
                    && !event.key.starts_with(CLAIMS)
                    && !event.key.starts_with(VOLUMES)
                    && !event.key.starts_with(DEVICES)
                    && !event.key.starts_with(INGRESSES)
                    && !event.key.starts_with(GATEWAYS)
                    && !event.key.starts_with(SERVICE_ACCOUNTS)
                    && !event.key.starts_with(NODE_PASSWORDS);
                rbac_changed |= is_rbac;
                let mut graph = self.graph.write().unwrap_or_else(|e| e.into_inner());
                let caches = Caches {
                    accounts: &self.accounts,
                    node_certificates: &self.node_certificates,
                };
                apply(&mut rbac, &mut graph, &caches, &event.key, text);
            }
            if rbac_changed {
                *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rbac.policy());
            }
            if let Some(revision) = last {
                self.mark(revision);
            }
            // A burst arrives as one batch: one policy rebuild per burst.
            pending = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                taken = cursor.next(storage.hub(), BATCH) => match taken {
                    Err(StorageError::Closed) => return Ok(()),
                    other => other?,
                },
            };
        }
    }

    fn mark(&self, revision: u64) {
        self.seen.fetch_max(revision, Ordering::AcqRel);
        self.caught_up.notify_waiters();
    }
}

/// The caches [`apply`] fills besides the RBAC objects and the graph.
struct Caches<'a> {
    accounts: &'a std::sync::Mutex<HashMap<String, Value>>,
    node_certificates: &'a std::sync::Mutex<HashMap<String, String>>,
}

/// The RBAC objects of one load, handed from [`Authorizer::load`] to the follower.
pub struct RbacObjectsHandle(RbacObjects);

fn apply(
    rbac: &mut RbacObjects,
    graph: &mut Graph,
    caches: &Caches<'_>,
    key: &str,
    text: Option<&str>,
) {
    let short = |prefix: &str| &key[prefix.len()..];
    if key.starts_with(NODE_PASSWORDS) {
        let name = short(NODE_PASSWORDS);
        // Nodes by name, sites as their user (`system:site:<name>`).
        let node = if let Some(node) = name.strip_suffix(NODE_PASSWORD_SUFFIX) {
            node.to_string()
        } else if let Some(site) = name.strip_suffix(SITE_PASSWORD_SUFFIX) {
            format!("{}{site}", crate::cloud_link::SITE_PREFIX)
        } else {
            return;
        };
        let node = node.as_str();
        let mut certificates = caches
            .node_certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match text.and_then(|t| serde_json::from_str::<Value>(t).ok()) {
            Some(secret) => {
                use base64::Engine;
                let serial = secret
                    .pointer("/data/serial")
                    .and_then(Value::as_str)
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .and_then(|s| String::from_utf8(s).ok())
                    .unwrap_or_default();
                certificates.insert(node.to_string(), serial);
            }
            None => {
                certificates.remove(node);
            }
        }
    } else if key.starts_with(PODS) {
        graph.pod_text(short(PODS), text);
    } else if key.starts_with(CLAIMS) {
        graph.claim_text(short(CLAIMS), text);
    } else if key.starts_with(VOLUMES) {
        graph.volume_text(short(VOLUMES), text);
    } else if key.starts_with(DEVICES) {
        graph.device_text(short(DEVICES), text);
    } else if key.starts_with(INGRESSES) {
        graph.ingress_text(short(INGRESSES), text);
    } else if key.starts_with(GATEWAYS) {
        graph.gateway_text(short(GATEWAYS), text);
    } else if key.starts_with(SERVICE_ACCOUNTS) {
        // What ServiceAccount admission reads: the automount setting and pull secrets.
        match text.and_then(|t| serde_json::from_str::<AccountView>(t).ok()) {
            Some(a) => {
                let mut v = serde_json::json!({});
                if let Some(m) = a.automount {
                    v["automountServiceAccountToken"] = m.into();
                }
                if !a.image_pull_secrets.is_empty() {
                    v["imagePullSecrets"] = a.image_pull_secrets.into();
                }
                caches
                    .accounts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(short(SERVICE_ACCOUNTS).to_string(), v);
            }
            None => {
                caches
                    .accounts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(short(SERVICE_ACCOUNTS));
            }
        }
    } else {
        match text.and_then(|t| serde_json::from_str::<Value>(t).ok()) {
            Some(v) => {
                rbac.objects.insert(key.to_string(), v);
            }
            None => {
                rbac.objects.remove(key);
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct AccountView {
    #[serde(rename = "automountServiceAccountToken")]
    automount: Option<bool>,
    #[serde(default, rename = "imagePullSecrets")]
    image_pull_secrets: Vec<Value>,
}
