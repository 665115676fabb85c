//! The garbage collector: objects whose owners are gone are deleted; an owner deleted in the
//! foreground waits for its blocking dependents; one deleted with `orphan` lets go of them.
//!
//! Like upstream's, it watches the metadata of every resource that can be listed, watched and
//! deleted (re-discovered every 30 s, so custom resources are covered), keeps a graph of owner
//! references by uid, and works through a queue. An owner missing from the graph is looked up
//! with a live GET (by name, compared by uid) before anything is deleted because of it.
//!
//! One task owns the graph; it applies watch events and then does queued work, one item at a
//! time, so the graph never needs a lock.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions, PropagationPolicy,
};
use kube::core::PartialObjectMeta;
use kube::discovery::{ApiResource, Discovery, Scope, verbs};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";
const REDISCOVER: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Identity {
    /// `group/version` or `version`.
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: String,
}

struct Node {
    identity: Identity,
    owners: Vec<OwnerReference>,
    dependents: HashSet<String>,
    /// Only known as someone's owner: its existence is not confirmed yet.
    is_virtual: bool,
    deleting: bool,
    finalizers: Vec<String>,
    resource_version: String,
}

impl Node {
    fn deleting_dependents(&self) -> bool {
        self.deleting && self.finalizers.iter().any(|f| f == FOREGROUND)
    }

    fn orphaning(&self) -> bool {
        self.deleting && self.finalizers.iter().any(|f| f == ORPHAN)
    }
}

enum WatchEvent {
    Applied(Arc<ApiResource>, PartialObjectMeta<DynamicObject>),
    Deleted(PartialObjectMeta<DynamicObject>),
    Synced(Arc<ApiResource>),
}

struct Collector {
    client: kube::Client,
    graph: HashMap<String, Node>,
    queue: VecDeque<String>,
    queued: HashSet<String>,
    /// (group, kind) -> (resource, namespaced), for live lookups and API calls.
    kinds: HashMap<(String, String), (Arc<ApiResource>, bool)>,
    watching: HashMap<(String, String, String), CancellationToken>,
    unsynced: HashSet<String>,
}

fn group_of(api_version: &str) -> String {
    api_version
        .split_once('/')
        .map(|(g, _)| g.to_string())
        .unwrap_or_default()
}

fn resource_key(ar: &ApiResource) -> (String, String, String) {
    (ar.group.clone(), ar.version.clone(), ar.plural.clone())
}

/// Runs until `shutdown`.
pub async fn run(client: kube::Client, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::channel::<WatchEvent>(4096);
    let mut gc = Collector {
        client,
        graph: HashMap::new(),
        queue: VecDeque::new(),
        queued: HashSet::new(),
        kinds: HashMap::new(),
        watching: HashMap::new(),
        unsynced: HashSet::new(),
    };
    let mut rediscover = tokio::time::interval(REDISCOVER);
    let mut announced = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rediscover.tick() => gc.discover(&tx, &shutdown).await,
            event = rx.recv() => match event {
                Some(e) => gc.apply(e),
                None => break,
            },
        }
        // Drain what is waiting, then do at most a little work while nothing arrives.
        while let Ok(e) = rx.try_recv() {
            gc.apply(e);
        }
        if !gc.unsynced.is_empty() {
            continue;
        }
        if !announced {
            tracing::info!(objects = gc.graph.len(), "garbage collector synced");
            announced = true;
        }
        while let Some(uid) = gc.queue.pop_front() {
            gc.queued.remove(&uid);
            if let Err(e) = gc.process(&uid).await {
                tracing::debug!(uid, error = %e, "garbage collection failed; retrying");
                gc.enqueue(&uid);
                break;
            }
            if !rx.is_empty() || shutdown.is_cancelled() {
                break;
            }
        }
    }
    for token in gc.watching.values() {
        token.cancel();
    }
}

impl Collector {
    fn enqueue(&mut self, uid: &str) {
        if self.queued.insert(uid.to_string()) {
            self.queue.push_back(uid.to_string());
        }
    }

    async fn discover(&mut self, tx: &mpsc::Sender<WatchEvent>, shutdown: &CancellationToken) {
        let discovery = match Discovery::new(self.client.clone()).run().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "garbage collector discovery failed");
                return;
            }
        };
        let mut seen = HashSet::new();
        for group in discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                let usable = [verbs::LIST, verbs::WATCH, verbs::DELETE, verbs::PATCH]
                    .iter()
                    .all(|v| caps.supports_operation(v));
                if !usable || ar.plural.contains('/') {
                    continue;
                }
                let ar = Arc::new(ar);
                let namespaced = caps.scope == Scope::Namespaced;
                self.kinds.insert(
                    (ar.group.clone(), ar.kind.clone()),
                    (ar.clone(), namespaced),
                );
                let key = resource_key(&ar);
                seen.insert(key.clone());
                if self.watching.contains_key(&key) {
                    continue;
                }
                let token = shutdown.child_token();
                self.unsynced.insert(ar.plural.clone() + "." + &ar.group);
                tokio::spawn(watch_resource(
                    self.client.clone(),
                    ar.clone(),
                    tx.clone(),
                    token.clone(),
                ));
                self.watching.insert(key, token);
            }
        }
        tracing::debug!(
            resources = self.watching.len(),
            unsynced = self.unsynced.len(),
            "garbage collector discovery"
        );
        // Resources that went away (a deleted CRD): stop watching them.
        self.watching.retain(|key, token| {
            let keep = seen.contains(key);
            if !keep {
                token.cancel();
            }
            keep
        });
    }

    fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Synced(ar) => {
                self.unsynced.remove(&(ar.plural.clone() + "." + &ar.group));
            }
            WatchEvent::Applied(ar, obj) => self.upsert(&ar, obj),
            WatchEvent::Deleted(obj) => {
                let Some(uid) = obj.metadata.uid.clone() else {
                    return;
                };
                self.remove(&uid);
            }
        }
    }

    fn upsert(&mut self, ar: &ApiResource, obj: PartialObjectMeta<DynamicObject>) {
        let meta = obj.metadata;
        let Some(uid) = meta.uid.clone() else { return };
        let owners = meta.owner_references.clone().unwrap_or_default();
        let identity = Identity {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
        };
        let previous_owners: Vec<String> = self
            .graph
            .get(&uid)
            .map(|n| n.owners.iter().map(|o| o.uid.clone()).collect())
            .unwrap_or_default();
        let was_virtual = self.graph.get(&uid).is_some_and(|n| n.is_virtual);
        let node = self.graph.entry(uid.clone()).or_insert_with(|| Node {
            identity: identity.clone(),
            owners: Vec::new(),
            dependents: HashSet::new(),
            is_virtual: false,
            deleting: false,
            finalizers: Vec::new(),
            resource_version: String::new(),
        });
        node.identity = identity;
        node.is_virtual = false;
        node.owners = owners.clone();
        node.deleting = meta.deletion_timestamp.is_some();
        node.finalizers = meta.finalizers.clone().unwrap_or_default();
        node.resource_version = meta.resource_version.clone().unwrap_or_default();
        let needs_work = node.deleting_dependents() || node.orphaning();
        let current: HashSet<String> = owners.iter().map(|o| o.uid.clone()).collect();
        for old in previous_owners.iter().filter(|o| !current.contains(*o)) {
            if let Some(owner) = self.graph.get_mut(old) {
                owner.dependents.remove(&uid);
                if owner.deleting_dependents() {
                    let old = old.clone();
                    self.enqueue(&old);
                }
            }
        }
        for owner in &owners {
            let known = self.graph.contains_key(&owner.uid);
            if !known {
                let namespace = if self.is_namespaced(&owner.api_version, &owner.kind) {
                    meta.namespace.clone()
                } else {
                    None
                };
                self.graph.insert(
                    owner.uid.clone(),
                    Node {
                        identity: Identity {
                            api_version: owner.api_version.clone(),
                            kind: owner.kind.clone(),
                            namespace,
                            name: owner.name.clone(),
                        },
                        owners: Vec::new(),
                        dependents: HashSet::new(),
                        is_virtual: true,
                        deleting: false,
                        finalizers: Vec::new(),
                        resource_version: String::new(),
                    },
                );
                // Does this owner exist? Find out before acting on its dependents.
                self.enqueue(&owner.uid.clone());
            }
            if let Some(o) = self.graph.get_mut(&owner.uid) {
                o.dependents.insert(uid.clone());
                if o.is_virtual && !known {
                    // queued above
                } else if o.deleting_dependents() {
                    let owner_uid = owner.uid.clone();
                    self.enqueue(&owner_uid);
                }
            }
        }
        if needs_work || was_virtual && !current.is_empty() {
            self.enqueue(&uid);
        }
        // An owner reference that was removed or an owner that is going away may leave this
        // object without owners: check it.
        if !owners.is_empty()
            && owners.iter().any(|o| {
                self.graph
                    .get(&o.uid)
                    .is_some_and(|n| n.deleting_dependents() || n.is_virtual)
            })
        {
            self.enqueue(&uid);
        }
    }

    fn remove(&mut self, uid: &str) {
        let Some(node) = self.graph.remove(uid) else {
            return;
        };
        for dependent in &node.dependents {
            self.enqueue(&dependent.clone());
        }
        for owner in &node.owners {
            if let Some(o) = self.graph.get_mut(&owner.uid) {
                o.dependents.remove(uid);
                if o.deleting_dependents() {
                    let owner_uid = owner.uid.clone();
                    self.enqueue(&owner_uid);
                }
            }
        }
    }

    fn is_namespaced(&self, api_version: &str, kind: &str) -> bool {
        // Unknown kinds are assumed namespaced, like most kinds.
        self.kinds
            .get(&(group_of(api_version), kind.to_string()))
            .is_none_or(|(_, namespaced)| *namespaced)
    }

    fn api(&self, identity: &Identity) -> Option<Api<DynamicObject>> {
        let (ar, namespaced) = self
            .kinds
            .get(&(group_of(&identity.api_version), identity.kind.clone()))?;
        Some(match (&identity.namespace, namespaced) {
            (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &**ar),
            _ => Api::all_with(self.client.clone(), &**ar),
        })
    }

    /// Whether the object `identity` with `uid` exists (a live lookup, not the cache).
    async fn exists(&self, identity: &Identity, uid: &str) -> Result<bool, kube::Error> {
        let Some(api) = self.api(identity) else {
            // A kind the server does not serve: the owner cannot exist.
            return Ok(false);
        };
        match api.get_metadata_opt(&identity.name).await? {
            Some(obj) => Ok(obj.metadata.uid.as_deref() == Some(uid)),
            None => Ok(false),
        }
    }

    async fn process(&mut self, uid: &str) -> Result<(), kube::Error> {
        let Some(node) = self.graph.get(uid) else {
            return Ok(());
        };
        if node.is_virtual {
            let identity = node.identity.clone();
            if self.exists(&identity, uid).await? {
                // The watch will report it; nothing to do.
                return Ok(());
            }
            // The owner is gone: its dependents are now candidates for deletion.
            if let Some(node) = self.graph.remove(uid) {
                for d in node.dependents {
                    self.enqueue(&d);
                }
            }
            return Ok(());
        }
        if node.orphaning() {
            return self.orphan_dependents(uid).await;
        }
        if node.deleting_dependents() {
            return self.delete_dependents_first(uid).await;
        }
        if node.deleting || node.owners.is_empty() {
            return Ok(());
        }
        self.check_owners(uid).await
    }

    /// Deletes an object whose owners are all gone; drops references to owners that are gone
    /// if others remain.
    async fn check_owners(&mut self, uid: &str) -> Result<(), kube::Error> {
        let Some(node) = self.graph.get(uid) else {
            return Ok(());
        };
        let owners = node.owners.clone();
        let identity = node.identity.clone();
        let has_dependents = !node.dependents.is_empty();
        let mut solid = Vec::new();
        let mut dangling = Vec::new();
        let mut waiting = Vec::new();
        for owner in &owners {
            let owner_identity = Identity {
                api_version: owner.api_version.clone(),
                kind: owner.kind.clone(),
                namespace: if self.is_namespaced(&owner.api_version, &owner.kind) {
                    identity.namespace.clone()
                } else {
                    None
                },
                name: owner.name.clone(),
            };
            match self.graph.get(&owner.uid) {
                Some(o) if !o.is_virtual && o.deleting_dependents() => waiting.push(owner.clone()),
                Some(o) if !o.is_virtual => solid.push(owner.clone()),
                _ => {
                    if self.exists(&owner_identity, &owner.uid).await? {
                        solid.push(owner.clone());
                    } else {
                        dangling.push(owner.clone());
                    }
                }
            }
        }
        let Some(api) = self.api(&identity) else {
            return Ok(());
        };
        if !solid.is_empty() {
            if dangling.is_empty() && waiting.is_empty() {
                return Ok(());
            }
            // Keep the live owners; forget the dead ones; stop blocking owners in foreground
            // deletion (they must not wait for an object that stays).
            let gone: BTreeSet<&str> = dangling.iter().map(|o| o.uid.as_str()).collect();
            let kept: Vec<OwnerReference> = owners
                .iter()
                .filter(|o| !gone.contains(o.uid.as_str()))
                .map(|o| {
                    let mut o = o.clone();
                    if waiting.iter().any(|w| w.uid == o.uid) {
                        o.block_owner_deletion = Some(false);
                    }
                    o
                })
                .collect();
            return self.rewrite_owners(&api, &identity.name, uid, kept).await;
        }
        let policy = if !waiting.is_empty() && has_dependents {
            // The owner waits for us: our own dependents must go first.
            PropagationPolicy::Foreground
        } else if let Some(n) = self.graph.get(uid) {
            if n.finalizers.iter().any(|f| f == ORPHAN) {
                PropagationPolicy::Orphan
            } else if n.finalizers.iter().any(|f| f == FOREGROUND) {
                PropagationPolicy::Foreground
            } else {
                PropagationPolicy::Background
            }
        } else {
            PropagationPolicy::Background
        };
        let params = DeleteParams {
            propagation_policy: Some(policy),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        tracing::debug!(object = ?identity, "owners gone; deleting");
        match api.delete(&identity.name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Foreground deletion: delete the dependents; once none blocks, drop the finalizer.
    async fn delete_dependents_first(&mut self, uid: &str) -> Result<(), kube::Error> {
        let Some(node) = self.graph.get(uid) else {
            return Ok(());
        };
        let identity = node.identity.clone();
        let dependents: Vec<String> = node.dependents.iter().cloned().collect();
        let mut blocking = 0;
        for d in &dependents {
            let Some(dep) = self.graph.get(d) else {
                continue;
            };
            let blocks = dep
                .owners
                .iter()
                .any(|o| o.uid == uid && o.block_owner_deletion == Some(true));
            if blocks {
                blocking += 1;
            }
            if !dep.deleting {
                self.enqueue(&d.clone());
            }
        }
        if blocking > 0 {
            return Ok(());
        }
        let Some(api) = self.api(&identity) else {
            return Ok(());
        };
        self.remove_finalizer(&api, &identity.name, FOREGROUND)
            .await
    }

    /// Orphan deletion: every dependent forgets the owner, then the finalizer goes.
    async fn orphan_dependents(&mut self, uid: &str) -> Result<(), kube::Error> {
        let Some(node) = self.graph.get(uid) else {
            return Ok(());
        };
        let identity = node.identity.clone();
        let dependents: Vec<String> = node.dependents.iter().cloned().collect();
        for d in dependents {
            let Some(dep) = self.graph.get(&d) else {
                continue;
            };
            let Some(api) = self.api(&dep.identity) else {
                continue;
            };
            let name = dep.identity.name.clone();
            let kept: Vec<OwnerReference> = dep
                .owners
                .iter()
                .filter(|o| o.uid != uid)
                .cloned()
                .collect();
            self.rewrite_owners(&api, &name, &d, kept).await?;
        }
        let Some(api) = self.api(&identity) else {
            return Ok(());
        };
        self.remove_finalizer(&api, &identity.name, ORPHAN).await
    }

    /// Replaces `ownerReferences`, guarded by the object's current resourceVersion (a JSON
    /// patch `test`), retrying on a race. Works for custom resources too.
    async fn rewrite_owners(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        uid: &str,
        kept: Vec<OwnerReference>,
    ) -> Result<(), kube::Error> {
        let kept_uids: HashSet<String> = kept.iter().map(|o| o.uid.clone()).collect();
        // The owners we decided about (the graph's view); owners added since stay.
        let decided: HashSet<String> = self
            .graph
            .get(uid)
            .map(|n| n.owners.iter().map(|o| o.uid.clone()).collect())
            .unwrap_or_default();
        for _ in 0..5 {
            let Some(current) = api.get_metadata_opt(name).await? else {
                return Ok(());
            };
            if current.metadata.uid.as_deref() != Some(uid) {
                return Ok(());
            }
            let live = current
                .metadata
                .owner_references
                .clone()
                .unwrap_or_default();
            // Keep owners added meanwhile; drop only the ones we decided to drop.
            let mut next: Vec<OwnerReference> = live
                .iter()
                .filter(|o| kept_uids.contains(&o.uid) || !decided.contains(&o.uid))
                .cloned()
                .collect();
            for o in next.iter_mut() {
                if let Some(k) = kept.iter().find(|k| k.uid == o.uid) {
                    o.block_owner_deletion = k.block_owner_deletion;
                }
            }
            if next == live {
                return Ok(());
            }
            let rv = current
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            let change = if next.is_empty() {
                json!({"op": "remove", "path": "/metadata/ownerReferences"})
            } else {
                json!({"op": "replace", "path": "/metadata/ownerReferences", "value": next})
            };
            if guarded_patch(api, name, &rv, change).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn remove_finalizer(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        finalizer: &str,
    ) -> Result<(), kube::Error> {
        for _ in 0..5 {
            let Some(current) = api.get_metadata_opt(name).await? else {
                return Ok(());
            };
            let finalizers = current.metadata.finalizers.clone().unwrap_or_default();
            if !finalizers.iter().any(|f| f == finalizer) {
                return Ok(());
            }
            let rest: Vec<&String> = finalizers.iter().filter(|f| *f != finalizer).collect();
            let rv = current
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            let change = json!({"op": "replace", "path": "/metadata/finalizers", "value": rest});
            if guarded_patch(api, name, &rv, change).await? {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Applies one JSON-patch operation if the object is still at `resource_version` (a `test`
/// operation guards it). Ok(true): done (or the object is gone); Ok(false): it changed
/// meanwhile, read it again.
async fn guarded_patch(
    api: &Api<DynamicObject>,
    name: &str,
    resource_version: &str,
    change: serde_json::Value,
) -> Result<bool, kube::Error> {
    let ops = json!([{"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}, change]);
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    match api
        .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn watch_resource(
    client: kube::Client,
    ar: Arc<ApiResource>,
    tx: mpsc::Sender<WatchEvent>,
    stop: CancellationToken,
) {
    let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(client, &*ar);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => e,
        };
        let sent = match event {
            None => return,
            Some(Err(e)) => {
                tracing::debug!(resource = %ar.plural, error = %e, "garbage collector watch failed; retrying");
                continue;
            }
            Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => {
                tx.send(WatchEvent::Applied(ar.clone(), o)).await
            }
            Some(Ok(watcher::Event::Delete(o))) => tx.send(WatchEvent::Deleted(o)).await,
            Some(Ok(watcher::Event::InitDone)) => tx.send(WatchEvent::Synced(ar.clone())).await,
            Some(Ok(watcher::Event::Init)) => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}
