//! The Deployment controller: each template revision gets a ReplicaSet (named by its
//! `pod-template-hash`); a RollingUpdate grows the new one and shrinks the old ones within
//! `maxSurge` / `maxUnavailable`, Recreate stops the old pods first; scaling mid-rollout is
//! proportional; `spec.paused` stops rollouts; old ReplicaSets beyond `revisionHistoryLimit`
//! are deleted; status and the Available / Progressing conditions are what `kubectl rollout
//! status` reads, including `ProgressDeadlineExceeded`.
//!
//! `kubectl rollout undo` copies an old ReplicaSet's template into the Deployment (client
//! side); this loop then finds that ReplicaSet and gives it the next revision.

pub(crate) mod revision;
mod rolling;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use revision::{HASH_LABEL, REVISION};
use rolling::{available, desired, spec_replicas};

use crate::events::Recorder;
use crate::informer::{Change, Informers};
use crate::pods;
use crate::runner::{self, Loop};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("claim replica sets: {0}")]
    Claim(#[source] kube::Error),
    #[error("create replica set {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("update replica set {name}: {source}")]
    Update {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("update deployment: {0}")]
    Deployment(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    replica_sets: Store<ReplicaSet>,
    pods: Store<Pod>,
    recorder: Recorder,
    /// ReplicaSet key -> resourceVersion of our last write: a pass waits until the cache has
    /// caught up, so it never acts on a ReplicaSet older than what it wrote.
    written: Mutex<HashMap<String, u64>>,
}

fn rs_key(rs: &ReplicaSet) -> String {
    format!(
        "{}/{}",
        rs.metadata.namespace.as_deref().unwrap_or(""),
        rs.metadata.name.as_deref().unwrap_or("")
    )
}

fn resource_version(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn selector(d: &Deployment) -> Option<Selector> {
    Selector::try_from(d.spec.as_ref()?.selector.clone()).ok()
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let deployments = informers.deployments();
    let replica_sets = informers.replica_sets();
    let pod_informer = informers.pods();
    let context = Arc::new(Context {
        client: informers.client_for("deployment-controller"),
        replica_sets: replica_sets.store(),
        pods: pod_informer.store(),
        recorder,
        written: Mutex::new(HashMap::new()),
    });
    let d_store = deployments.store();
    let own = runner::own_changes(deployments.subscribe(256));
    let rs_triggers = {
        let d_store = d_store.clone();
        runner::triggers(
            replica_sets.subscribe(1024),
            move |c: &Change<ReplicaSet>| {
                let rs = c.object();
                if let Some(owner) = runner::controller_of::<Deployment, ReplicaSet>(rs) {
                    return vec![owner];
                }
                if matches!(c, Change::Deleted(_)) || pods::controller_uid(&rs.metadata).is_some() {
                    return vec![];
                }
                let labels = rs.metadata.labels.clone().unwrap_or_default();
                d_store
                    .state_filter(|d| {
                        d.metadata.namespace == rs.metadata.namespace
                            && selector(d).is_some_and(|s| !s.selects_all() && s.matches(&labels))
                    })
                    .iter()
                    .map(|d| ObjectRef::from_obj(&**d))
                    .collect()
            },
        )
    };
    // Recreate waits for the old pods to be gone: their deletion wakes the Deployment.
    let pod_triggers = {
        let rs_store = context.replica_sets.clone();
        runner::triggers(pod_informer.subscribe(1024), move |c: &Change<Pod>| {
            let pod = c.object();
            if !matches!(c, Change::Deleted(_)) && !pods::is_terminal(pod) {
                return vec![];
            }
            runner::controller_of::<ReplicaSet, Pod>(pod)
                .and_then(|rs| rs_store.get(&rs))
                .and_then(|rs| runner::controller_of::<Deployment, ReplicaSet>(&*rs))
                .into_iter()
                .collect()
        })
    };
    let ready = futures::future::join3(
        deployments.synced(),
        replica_sets.synced(),
        pod_informer.synced(),
    );
    runner::run(
        Loop {
            name: "deployment",
            concurrency: 8,
        },
        d_store,
        ready,
        vec![own, rs_triggers, pod_triggers],
        reconcile,
        context,
        shutdown,
    )
}

/// One pass over a Deployment: the ReplicaSets it owns, split into the new one and the old ones.
struct Pass<'a> {
    ctx: &'a Context,
    d: Arc<Deployment>,
    namespace: String,
    name: String,
    sets: Vec<Arc<ReplicaSet>>,
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let Some(selector) = selector(&d) else {
        ctx.recorder.warning(
            &*d,
            "SelectingAll",
            "This deployment has an invalid selector; it will not create pods",
        );
        return Ok(Action::await_change());
    };
    if selector.selects_all() {
        ctx.recorder.warning(
            &*d,
            "SelectingAll",
            "This deployment is selecting all pods. A non-empty selector is required.",
        );
        return Ok(Action::await_change());
    }
    let candidates = ctx
        .replica_sets
        .state_filter(|rs| rs.metadata.namespace.as_deref() == Some(&namespace));
    {
        let written = ctx.written.lock().expect("written lock");
        let stale = candidates.iter().any(|rs| {
            written
                .get(&rs_key(rs))
                .is_some_and(|rv| resource_version(&rs.metadata) < *rv)
        });
        if stale {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    let sets = crate::ownership::claim(&ctx.client, &*d, &selector, candidates)
        .await
        .map_err(Error::Claim)?;
    let mut pass = Pass {
        ctx: &ctx,
        d: d.clone(),
        namespace,
        name,
        sets,
    };
    if d.metadata.deletion_timestamp.is_some() {
        return pass.finish(false).await;
    }
    let paused = d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false);
    if paused || pass.is_scaling_event() {
        pass.scale().await?;
        if paused && pass.complete() {
            pass.cleanup().await;
        }
        return pass.finish(false).await;
    }
    if rolling::is_rolling(&d) {
        pass.rolling().await
    } else {
        pass.recreate().await
    }
}

impl Pass<'_> {
    fn new_rs(&self) -> Option<Arc<ReplicaSet>> {
        revision::find_new(&self.d, &self.sets).cloned()
    }

    fn old_sets(&self) -> Vec<Arc<ReplicaSet>> {
        let new = self.new_rs().and_then(|n| n.metadata.uid.clone());
        self.sets
            .iter()
            .filter(|rs| rs.metadata.uid != new || new.is_none())
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<&ReplicaSet> {
        self.sets.iter().map(|rs| &**rs).collect()
    }

    fn complete(&self) -> bool {
        status::complete(&self.d, self.d.status.as_ref())
    }

    /// Some active ReplicaSet was sized for another replica count: the user scaled.
    fn is_scaling_event(&self) -> bool {
        let want = desired(&self.d).to_string();
        self.sets
            .iter()
            .filter(|rs| spec_replicas(rs) > 0)
            .any(|rs| {
                rs.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(revision::DESIRED_REPLICAS))
                    .is_some_and(|v| *v != want)
            })
    }

    /// Writes the replica count (and the replica annotations) of a ReplicaSet.
    async fn scale_rs(&mut self, rs: &Arc<ReplicaSet>, replicas: i32) -> Result<bool, Error> {
        let (surge, _) = rolling::fenceposts(&self.d);
        let want = desired(&self.d);
        let annotations = rs.metadata.annotations.clone().unwrap_or_default();
        let annotated = annotations.get(revision::DESIRED_REPLICAS) == Some(&want.to_string())
            && annotations.get(revision::MAX_REPLICAS) == Some(&(want + surge).to_string());
        let current = spec_replicas(rs);
        if current == replicas && annotated {
            return Ok(false);
        }
        let rs_name = rs.metadata.name.clone().unwrap_or_default();
        let patch = json!({
            "metadata": {"annotations": {revision::DESIRED_REPLICAS: want.to_string(), revision::MAX_REPLICAS: (want + surge).to_string()}},
            "spec": {"replicas": replicas},
        });
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let updated = api
            .patch(&rs_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::Update {
                name: rs_name.clone(),
                source,
            })?;
        self.note_written(&updated);
        if current != replicas {
            let direction = if replicas > current { "up" } else { "down" };
            self.ctx.recorder.normal(
                &*self.d,
                "ScalingReplicaSet",
                format!("Scaled {direction} replica set {rs_name} from {current} to {replicas}"),
            );
        }
        let updated = Arc::new(updated);
        for s in self.sets.iter_mut() {
            if s.metadata.uid == updated.metadata.uid {
                *s = updated.clone();
            }
        }
        Ok(current != replicas)
    }

    fn note_written(&self, rs: &ReplicaSet) {
        self.ctx
            .written
            .lock()
            .expect("written lock")
            .insert(rs_key(rs), resource_version(&rs.metadata));
    }

    /// Finds or (if `create`) creates the ReplicaSet of the current template, and keeps its
    /// revision annotations and the Deployment's revision in step.
    async fn ensure_new_rs(&mut self, create: bool) -> Result<Option<Arc<ReplicaSet>>, Error> {
        let old = self.old_sets();
        let new_revision = revision::max_revision(old.iter().map(|rs| &**rs)) + 1;
        let (surge, _) = rolling::fenceposts(&self.d);
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        if let Some(existing) = self.new_rs() {
            let annotations = revision::replica_set_annotations(
                &self.d,
                existing.metadata.annotations.as_ref(),
                new_revision,
                surge,
            );
            let min_ready = self.d.spec.as_ref().and_then(|s| s.min_ready_seconds);
            let rs_min_ready = existing.spec.as_ref().and_then(|s| s.min_ready_seconds);
            if existing.metadata.annotations.as_ref() != Some(&annotations)
                || min_ready.unwrap_or(0) != rs_min_ready.unwrap_or(0)
            {
                let rs_name = existing.metadata.name.clone().unwrap_or_default();
                let patch = json!({"metadata": {"annotations": annotations}, "spec": {"minReadySeconds": min_ready.unwrap_or(0)}});
                let updated = api
                    .patch(&rs_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|source| Error::Update {
                        name: rs_name,
                        source,
                    })?;
                self.note_written(&updated);
                let updated = Arc::new(updated);
                for s in self.sets.iter_mut() {
                    if s.metadata.uid == updated.metadata.uid {
                        *s = updated.clone();
                    }
                }
                self.sync_deployment_revision(&updated).await?;
                return Ok(Some(updated));
            }
            self.sync_deployment_revision(&existing).await?;
            return Ok(Some(existing));
        }
        if !create {
            return Ok(None);
        }
        let spec = self.d.spec.clone().unwrap_or_default();
        let collisions = self.d.status.as_ref().and_then(|s| s.collision_count);
        let hash = revision::template_hash(&spec.template, collisions);
        let mut template = spec.template.clone();
        let meta = template.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector: LabelSelector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut labels = meta.labels.clone().unwrap_or_default();
        labels.insert(HASH_LABEL.into(), hash.clone());
        let rs_name = format!("{}-{hash}", self.name);
        let all = self.all();
        let replicas = rolling::new_rs_replicas(&self.d, &all, 0);
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(rs_name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                annotations: Some(revision::replica_set_annotations(
                    &self.d,
                    None,
                    new_revision,
                    surge,
                )),
                owner_references: Some(vec![pods::controller_reference(&*self.d)]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(template),
            }),
            status: None,
        };
        let created = match api.create(&PostParams::default(), &rs).await {
            Ok(created) => created,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Ours from an earlier pass (the cache had not caught up), or a hash collision.
                let existing = api.get(&rs_name).await.map_err(|source| Error::Create {
                    name: rs_name.clone(),
                    source,
                })?;
                let ours =
                    pods::controller_uid(&existing.metadata) == self.d.metadata.uid.as_deref();
                let same = existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| revision::equal_ignoring_hash(t, &spec.template));
                if ours && same {
                    return Ok(Some(Arc::new(existing)));
                }
                let count = collisions.unwrap_or(0) + 1;
                let dapi: Api<Deployment> =
                    Api::namespaced(self.ctx.client.clone(), &self.namespace);
                let patch = json!({"status": {"collisionCount": count}});
                dapi.patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::Deployment)?;
                return Ok(None);
            }
            Err(source) => {
                self.ctx.recorder.warning(
                    &*self.d,
                    "FailedCreate",
                    format!("Failed to create new replica set \"{rs_name}\": {source}"),
                );
                return Err(Error::Create {
                    name: rs_name,
                    source,
                });
            }
        };
        self.note_written(&created);
        if replicas > 0 {
            self.ctx.recorder.normal(
                &*self.d,
                "ScalingReplicaSet",
                format!("Scaled up replica set {rs_name} from 0 to {replicas}"),
            );
        }
        let created = Arc::new(created);
        self.sets.push(created.clone());
        self.sync_deployment_revision(&created).await?;
        Ok(Some(created))
    }

    /// The Deployment carries the revision of its newest ReplicaSet (`kubectl rollout history`).
    async fn sync_deployment_revision(&mut self, new_rs: &ReplicaSet) -> Result<(), Error> {
        let rev = revision::revision(new_rs).to_string();
        let current = self
            .d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION));
        if current == Some(&rev) {
            return Ok(());
        }
        let api: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = json!({"metadata": {"annotations": {REVISION: rev}}});
        let updated = api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(Error::Deployment)?;
        // Keep our copy's status: the patch response has the same.
        self.d = Arc::new(updated);
        Ok(())
    }

    async fn rolling(&mut self) -> Result<Action, Error> {
        let Some(new_rs) = self.ensure_new_rs(true).await? else {
            return Ok(Action::requeue(Duration::from_secs(1)));
        };
        // Grow the new ReplicaSet as far as maxSurge allows.
        let all = self.all();
        let target = rolling::new_rs_replicas(&self.d, &all, spec_replicas(&new_rs));
        if self.scale_rs(&new_rs, target).await? {
            return self.finish(true).await;
        }
        // Shrink the old ones as far as maxUnavailable allows.
        if self.shrink_old(&new_rs).await? {
            return self.finish(true).await;
        }
        if self.complete() {
            self.cleanup().await;
        }
        self.finish(true).await
    }

    async fn shrink_old(&mut self, new_rs: &Arc<ReplicaSet>) -> Result<bool, Error> {
        let mut old: Vec<Arc<ReplicaSet>> = self
            .old_sets()
            .into_iter()
            .filter(|rs| spec_replicas(rs) > 0)
            .collect();
        if old.is_empty() {
            return Ok(false);
        }
        old.sort_by_key(|rs| rs.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let all = self.all();
        let mut budget = rolling::max_scaled_down(&self.d, &all, Some(new_rs));
        if budget <= 0 {
            return Ok(false);
        }
        let mut changed = false;
        // First the replicas that are not available anyway.
        for rs in &old {
            if budget <= 0 {
                break;
            }
            let unhealthy = spec_replicas(rs) - available(rs);
            if unhealthy <= 0 {
                continue;
            }
            let down = unhealthy.min(budget);
            changed |= self.scale_rs(rs, spec_replicas(rs) - down).await?;
            budget -= down;
        }
        // Then healthy ones, as long as enough stay available.
        let all = self.all();
        let mut budget = rolling::available_above_minimum(&self.d, &all);
        let old: Vec<Arc<ReplicaSet>> = self
            .old_sets()
            .into_iter()
            .filter(|rs| spec_replicas(rs) > 0)
            .collect();
        for rs in &old {
            if budget <= 0 {
                break;
            }
            let down = spec_replicas(rs).min(budget);
            changed |= self.scale_rs(rs, spec_replicas(rs) - down).await?;
            budget -= down;
        }
        Ok(changed)
    }

    async fn recreate(&mut self) -> Result<Action, Error> {
        let mut changed = false;
        for rs in self.old_sets() {
            if spec_replicas(&rs) > 0 {
                changed |= self.scale_rs(&rs, 0).await?;
            }
        }
        if changed {
            return self.finish(true).await;
        }
        // Wait until every old pod is gone before starting the new ones.
        let old_uids: Vec<String> = self
            .old_sets()
            .iter()
            .filter_map(|rs| rs.metadata.uid.clone())
            .collect();
        let old_pods_running = self.ctx.pods.state().iter().any(|p| {
            !pods::is_terminal(p)
                && pods::controller_uid(&p.metadata)
                    .is_some_and(|u| old_uids.iter().any(|o| o == u))
        });
        if old_pods_running {
            return self.finish(true).await;
        }
        let Some(new_rs) = self.ensure_new_rs(true).await? else {
            return Ok(Action::requeue(Duration::from_secs(1)));
        };
        if self.scale_rs(&new_rs, desired(&self.d)).await? {
            return self.finish(true).await;
        }
        if self.complete() {
            self.cleanup().await;
        }
        self.finish(true).await
    }

    /// Scaling without a rollout: the one active ReplicaSet takes the new size, or, mid-rollout,
    /// every ReplicaSet grows or shrinks in proportion.
    async fn scale(&mut self) -> Result<(), Error> {
        let new_rs = self.ensure_new_rs(false).await?;
        let want = desired(&self.d);
        let mut active: Vec<Arc<ReplicaSet>> = self
            .sets
            .iter()
            .filter(|rs| spec_replicas(rs) > 0)
            .cloned()
            .collect();
        if active.len() <= 1 {
            let target = active.pop().or(new_rs.clone()).or_else(|| {
                let mut all = self.sets.clone();
                all.sort_by_key(|rs| rs.metadata.creation_timestamp.as_ref().map(|t| t.0));
                all.pop()
            });
            if let Some(rs) = target {
                self.scale_rs(&rs, want).await?;
            }
            return Ok(());
        }
        if let Some(new_rs) = new_rs.as_ref()
            && spec_replicas(new_rs) == want
            && available(new_rs) == want
        {
            for rs in self.old_sets() {
                if spec_replicas(&rs) > 0 {
                    self.scale_rs(&rs, 0).await?;
                }
            }
            return Ok(());
        }
        if !rolling::is_rolling(&self.d) {
            return Ok(());
        }
        let (surge, _) = rolling::fenceposts(&self.d);
        let current: i32 = active.iter().map(|rs| spec_replicas(rs)).sum();
        let to_add = want + surge - current;
        if to_add == 0 {
            return Ok(());
        }
        // Largest first when growing, smallest first when shrinking.
        active.sort_by_key(|rs| {
            if to_add > 0 {
                -spec_replicas(rs)
            } else {
                spec_replicas(rs)
            }
        });
        let mut left = to_add;
        let mut targets: Vec<i32> = Vec::new();
        for rs in &active {
            let share = (i64::from(spec_replicas(rs)) * i64::from(to_add)
                / i64::from(current.max(1))) as i32;
            let share = if to_add > 0 {
                share.min(left)
            } else {
                share.max(left)
            };
            targets.push(spec_replicas(rs) + share);
            left -= share;
        }
        if let Some(first) = targets.first_mut() {
            *first = (*first + left).max(0);
        }
        for (rs, target) in active.iter().zip(targets) {
            self.scale_rs(rs, target.max(0)).await?;
        }
        Ok(())
    }

    /// Deletes old, empty ReplicaSets beyond `revisionHistoryLimit` (oldest revisions first).
    async fn cleanup(&mut self) {
        let limit = self
            .d
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10)
            .max(0) as usize;
        let mut idle: Vec<Arc<ReplicaSet>> = self
            .old_sets()
            .into_iter()
            .filter(|rs| {
                spec_replicas(rs) == 0
                    && rs.status.as_ref().map_or(0, |s| s.replicas) == 0
                    && rs.metadata.deletion_timestamp.is_none()
            })
            .collect();
        if idle.len() <= limit {
            return;
        }
        idle.sort_by_key(|rs| revision::revision(rs));
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        for rs in &idle[..idle.len() - limit] {
            let name = rs.metadata.name.clone().unwrap_or_default();
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {
                    tracing::debug!(deployment = %self.name, replicaset = %name, "old replica set deleted")
                }
                Err(e) => {
                    tracing::debug!(deployment = %self.name, replicaset = %name, error = %e, "cannot delete old replica set")
                }
            }
        }
    }

    /// Writes status (and the progress conditions when `rollout` is true); says when to look again.
    async fn finish(&mut self, rollout: bool) -> Result<Action, Error> {
        let new_rs = self.new_rs();
        let (status, requeue) = status::compute(
            &self.d,
            &self.all(),
            new_rs.as_deref(),
            rollout,
            pods::now(),
        );
        if self.d.status.as_ref() != Some(&status) {
            let api: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
            let patch = json!({"status": status});
            match api
                .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::Deployment(e)),
            }
            let timed_out = |s: Option<&k8s_openapi::api::apps::v1::DeploymentStatus>| {
                s.and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                    c.iter().any(|c| {
                        c.type_ == "Progressing"
                            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                    })
                })
            };
            if timed_out(Some(&status)) && !timed_out(self.d.status.as_ref()) {
                let rs_name = new_rs
                    .and_then(|r| r.metadata.name.clone())
                    .unwrap_or_default();
                self.ctx.recorder.warning(
                    &*self.d,
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                );
            }
        }
        Ok(Action::requeue(requeue.unwrap_or(Duration::from_secs(300))))
    }
}
