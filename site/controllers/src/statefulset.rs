//! The StatefulSet controller: pods with stable names (`<set>-<ordinal>`) and hostnames under
//! the governing Service, PersistentVolumeClaims from `volumeClaimTemplates` created before
//! their pod (and kept, or owned by the set with `whenDeleted: Delete`), OrderedReady creation
//! (one at a time, each waiting for its predecessors to be Running and Ready) and deletion
//! (highest ordinal first) or Parallel, and RollingUpdate from the highest ordinal down to the
//! `partition`, one pod at a time. Revisions are ControllerRevisions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::history::{self, HASH_LABEL};
use crate::informer::{Change, Informers};
use crate::pods;
use crate::runner::{self, Loop};

pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("claim pods: {0}")]
    Claim(#[source] kube::Error),
    #[error("revision: {0}")]
    Revision(#[source] kube::Error),
    #[error("create {what}: {source}")]
    Create {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("delete pod: {0}")]
    Delete(#[source] kube::Error),
    #[error("give claim {claim} to its pod: {source}")]
    ClaimOwner {
        claim: String,
        #[source]
        source: kube::Error,
    },
    #[error("update status: {0}")]
    Status(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    revisions: Store<ControllerRevision>,
    recorder: Recorder,
}

/// The ordinal of a pod of set `name`, from its name.
pub fn ordinal(set: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn revision_of(p: &Pod) -> Option<&String> {
    p.metadata.labels.as_ref()?.get(HASH_LABEL)
}

fn running_and_ready(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && pods::is_ready(p)
        && p.metadata.deletion_timestamp.is_none()
}

/// The pod for `ordinal` from `template`, with its identity and claims.
pub fn new_pod(set: &StatefulSet, template: &PodTemplateSpec, hash: &str, ordinal: i32) -> Pod {
    let name = set.metadata.name.clone().unwrap_or_default();
    let namespace = set.metadata.namespace.clone().unwrap_or_default();
    let pod_name = format!("{name}-{ordinal}");
    let mut pod = pods::from_template(template, pods::controller_reference(set), &namespace, "");
    pod.metadata.generate_name = None;
    pod.metadata.name = Some(pod_name.clone());
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(POD_NAME_LABEL.into(), pod_name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
    labels.insert(HASH_LABEL.into(), hash.into());
    let spec = set.spec.clone().unwrap_or_default();
    if let Some(pod_spec) = pod.spec.as_mut() {
        pod_spec.hostname = Some(pod_name.clone());
        if let Some(service) = spec.service_name.as_ref().filter(|s| !s.is_empty()) {
            pod_spec.subdomain = Some(service.clone());
        }
        for claim in spec.volume_claim_templates.iter().flatten() {
            let claim_name = claim.metadata.name.clone().unwrap_or_default();
            let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
            volumes.retain(|v| v.name != claim_name);
            volumes.push(Volume {
                name: claim_name.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: format!("{claim_name}-{pod_name}"),
                    read_only: None,
                }),
                ..Default::default()
            });
        }
    }
    pod
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let sets = informers.stateful_sets();
    let pod_informer = informers.pods();
    let revisions = informers.controller_revisions();
    let context = Arc::new(Context {
        client: informers.client_for("statefulset-controller"),
        pods: pod_informer.store(),
        revisions: revisions.store(),
        recorder,
    });
    let store = sets.store();
    let own = runner::own_changes(sets.subscribe(64));
    let pod_triggers = runner::triggers(pod_informer.subscribe(1024), |c: &Change<Pod>| {
        runner::controller_of::<StatefulSet, Pod>(&**c.object())
            .into_iter()
            .collect()
    });
    let ready = futures::future::join3(sets.synced(), pod_informer.synced(), revisions.synced());
    runner::run(
        Loop {
            name: "statefulset",
            concurrency: 4,
        },
        store,
        ready,
        vec![own, pod_triggers],
        reconcile,
        context,
        shutdown,
    )
}

/// The template a revision recorded (`data.spec.template`).
fn revision_template(ctx: &Context, set: &StatefulSet, hash: &str) -> Option<PodTemplateSpec> {
    let name = format!("{}-{hash}", set.metadata.name.as_deref().unwrap_or(""));
    let r = ctx
        .revisions
        .get(&ObjectRef::new(&name).within(set.metadata.namespace.as_deref().unwrap_or("")))?;
    let mut t = r.data.as_ref()?.0.pointer("/spec/template")?.clone();
    if let Some(o) = t.as_object_mut() {
        o.remove("$patch");
    }
    serde_json::from_value(t).ok()
}

async fn reconcile(set: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = set.metadata.namespace.clone().unwrap_or_default();
    let name = set.metadata.name.clone().unwrap_or_default();
    let spec = set.spec.clone().unwrap_or_default();
    let Ok(selector) = Selector::try_from(spec.selector.clone()) else {
        return Ok(Action::await_change());
    };
    let candidates = ctx
        .pods
        .state_filter(|p| p.metadata.namespace.as_deref() == Some(&namespace));
    let owned = crate::ownership::claim(&ctx.client, &*set, &selector, candidates)
        .await
        .map_err(Error::Claim)?;
    let in_use: Vec<String> = owned
        .iter()
        .filter_map(|p| revision_of(p).cloned())
        .collect();
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let (update_hash, _) = history::ensure(
        &ctx.client,
        &ctx.revisions,
        &*set,
        &spec.template,
        limit,
        &in_use,
    )
    .await
    .map_err(Error::Revision)?;
    let current_hash = set
        .status
        .as_ref()
        .and_then(|s| s.current_revision.clone())
        .map(|r| r.trim_start_matches(&format!("{name}-")).to_string())
        .unwrap_or_else(|| update_hash.clone());
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let start = spec
        .ordinals
        .as_ref()
        .and_then(|o| o.start)
        .unwrap_or(0)
        .max(0);
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let rolling = strategy.type_.as_deref().unwrap_or("RollingUpdate") == "RollingUpdate";
    let partition = strategy
        .rolling_update
        .as_ref()
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let mut by_ordinal: HashMap<i32, Arc<Pod>> = HashMap::new();
    for p in &owned {
        if let Some(i) = ordinal(&name, p.metadata.name.as_deref().unwrap_or("")) {
            by_ordinal.insert(i, p.clone());
        }
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let deleting_set = set.metadata.deletion_timestamp.is_some();
    let mut blocked = false;
    // Create (or recreate failed) pods in order.
    for i in start..start + replicas {
        if deleting_set {
            break;
        }
        match by_ordinal.get(&i) {
            Some(p) if pods::is_terminal(p) && p.metadata.deletion_timestamp.is_none() => {
                // A failed pod is deleted and recreated with the same identity.
                delete_pod(&ctx, &set, &api, p).await?;
                blocked = true;
            }
            Some(p) => {
                if !parallel && !running_and_ready(p) {
                    blocked = true;
                }
            }
            None => {
                if blocked && !parallel {
                    break;
                }
                let hash = if rolling && i < partition {
                    current_hash.clone()
                } else {
                    update_hash.clone()
                };
                let template = if hash == update_hash {
                    Some(spec.template.clone())
                } else {
                    revision_template(&ctx, &set, &hash)
                }
                .unwrap_or_else(|| spec.template.clone());
                create_claims(&ctx, &set, &pvc_api, i).await?;
                let pod = new_pod(&set, &template, &hash, i);
                match api.create(&PostParams::default(), &pod).await {
                    Ok(_) => ctx.recorder.normal(
                        &*set,
                        "SuccessfulCreate",
                        format!("create Pod {name}-{i} in StatefulSet {name} successful"),
                    ),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(source) => {
                        ctx.recorder.warning(
                            &*set,
                            "FailedCreate",
                            format!(
                                "create Pod {name}-{i} in StatefulSet {name} failed error: {source}"
                            ),
                        );
                        return Err(Error::Create {
                            what: format!("pod {name}-{i}"),
                            source,
                        });
                    }
                }
                blocked = true;
                if !parallel {
                    break;
                }
            }
        }
    }
    // Scale down: highest ordinal first, one at a time unless Parallel.
    let mut condemned: Vec<(i32, Arc<Pod>)> = by_ordinal
        .iter()
        .filter(|(i, _)| **i < start || **i >= start + replicas)
        .map(|(i, p)| (*i, p.clone()))
        .collect();
    condemned.sort_by_key(|(i, _)| -*i);
    let all_healthy = by_ordinal
        .iter()
        .filter(|(i, _)| **i >= start && **i < start + replicas)
        .all(|(_, p)| running_and_ready(p));
    for (i, p) in &condemned {
        if p.metadata.deletion_timestamp.is_some() {
            if !parallel {
                break;
            }
            continue;
        }
        if !parallel && !all_healthy {
            break;
        }
        if deletes_claims_when_scaled(&set) && !deleting_set {
            // `whenScaled: Delete`: the claims go with the pod (the garbage collector deletes
            // them once their owner, the pod, is gone; protection waits for it too).
            give_claims_to_pod(&set, &pvc_api, *i, p).await?;
        }
        delete_pod(&ctx, &set, &api, p).await?;
        if !parallel {
            break;
        }
    }
    // Rolling update: the highest outdated ordinal at or above the partition, once all are ready.
    if rolling
        && !deleting_set
        && condemned.is_empty()
        && all_healthy
        && by_ordinal.len() as i32 >= replicas
    {
        let mut ordinals: Vec<i32> = by_ordinal
            .keys()
            .copied()
            .filter(|i| *i >= partition.max(start) && *i < start + replicas)
            .collect();
        ordinals.sort_by_key(|i| -*i);
        if let Some(i) = ordinals
            .into_iter()
            .find(|i| revision_of(&by_ordinal[i]) != Some(&update_hash))
        {
            delete_pod(&ctx, &set, &api, &by_ordinal[&i]).await?;
        }
    }
    // Status.
    let now = Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let live: Vec<&Arc<Pod>> = by_ordinal
        .values()
        .filter(|p| !pods::is_terminal(p))
        .collect();
    let updated = live
        .iter()
        .filter(|p| revision_of(p) == Some(&update_hash))
        .count() as i32;
    let ready = live.iter().filter(|p| pods::is_ready(p)).count() as i32;
    let mut current_revision = format!("{name}-{current_hash}");
    let mut current = live
        .iter()
        .filter(|p| revision_of(p) == Some(&current_hash))
        .count() as i32;
    if updated == replicas && ready == replicas && live.len() as i32 == replicas {
        current_revision = format!("{name}-{update_hash}");
        current = updated;
    }
    let status = StatefulSetStatus {
        replicas: live.len() as i32,
        ready_replicas: Some(ready),
        available_replicas: Some(
            live.iter()
                .filter(|p| pods::is_available(p, min_ready, now))
                .count() as i32,
        ),
        current_replicas: Some(current),
        updated_replicas: Some(updated),
        current_revision: Some(current_revision),
        update_revision: Some(format!("{name}-{update_hash}")),
        observed_generation: set.metadata.generation,
        collision_count: set
            .status
            .as_ref()
            .and_then(|s| s.collision_count)
            .or(Some(0)),
        conditions: None,
    };
    if set.status.as_ref() != Some(&status) {
        let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"status": status});
        match sets
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Status(e)),
        }
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn delete_pod(
    ctx: &Context,
    set: &StatefulSet,
    api: &Api<Pod>,
    p: &Pod,
) -> Result<(), Error> {
    let pod_name = p.metadata.name.clone().unwrap_or_default();
    let set_name = set.metadata.name.clone().unwrap_or_default();
    match api.delete(&pod_name, &DeleteParams::default()).await {
        Ok(_) => {
            ctx.recorder.normal(
                set,
                "SuccessfulDelete",
                format!("delete Pod {pod_name} in StatefulSet {set_name} successful"),
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::Delete(e)),
    }
}

/// The claims of `ordinal`, created if missing. With `whenDeleted: Delete` they are owned by
/// the set (and go with it); otherwise they outlive it, as upstream's default `Retain`.
/// Whether the set's `persistentVolumeClaimRetentionPolicy.whenScaled` is `Delete`.
fn deletes_claims_when_scaled(set: &StatefulSet) -> bool {
    set.spec
        .as_ref()
        .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref())
        .and_then(|p| p.when_scaled.as_deref())
        == Some("Delete")
}

/// Adds the condemned pod `pod` (ordinal `ordinal`) as an owner of its claims.
async fn give_claims_to_pod(
    set: &StatefulSet,
    api: &Api<PersistentVolumeClaim>,
    ordinal: i32,
    pod: &Pod,
) -> Result<(), Error> {
    let name = set.metadata.name.clone().unwrap_or_default();
    let spec = set.spec.clone().unwrap_or_default();
    let Some(uid) = pod.metadata.uid.clone() else {
        return Ok(());
    };
    for template in spec.volume_claim_templates.iter().flatten() {
        let claim_name = format!(
            "{}-{name}-{ordinal}",
            template.metadata.name.as_deref().unwrap_or("")
        );
        let Ok(Some(claim)) = api.get_opt(&claim_name).await else {
            continue;
        };
        let mut owners = claim.metadata.owner_references.clone().unwrap_or_default();
        if owners.iter().any(|o| o.uid == uid) {
            continue;
        }
        owners.push(OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: uid.clone(),
            controller: None,
            block_owner_deletion: None,
        });
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": claim.metadata.resource_version,
            "ownerReferences": owners,
        }});
        if let Err(source) = api
            .patch(&claim_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            return Err(Error::ClaimOwner {
                claim: claim_name,
                source,
            });
        }
    }
    Ok(())
}

async fn create_claims(
    ctx: &Context,
    set: &StatefulSet,
    api: &Api<PersistentVolumeClaim>,
    ordinal: i32,
) -> Result<(), Error> {
    let spec = set.spec.clone().unwrap_or_default();
    let name = set.metadata.name.clone().unwrap_or_default();
    let delete_with_set = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_deleted.as_deref())
        == Some("Delete");
    for template in spec.volume_claim_templates.iter().flatten() {
        let claim_name = format!(
            "{}-{name}-{ordinal}",
            template.metadata.name.as_deref().unwrap_or("")
        );
        let mut claim = template.clone();
        claim.metadata.name = Some(claim_name.clone());
        claim.metadata.namespace = set.metadata.namespace.clone();
        claim.status = None;
        let labels = claim.metadata.labels.get_or_insert_with(BTreeMap::new);
        for (k, v) in spec.selector.match_labels.iter().flatten() {
            labels.insert(k.clone(), v.clone());
        }
        if delete_with_set {
            let mut owner: OwnerReference = pods::controller_reference(set);
            owner.controller = None;
            claim.metadata.owner_references = Some(vec![owner]);
        }
        match api.create(&PostParams::default(), &claim).await {
            Ok(_) => ctx.recorder.normal(
                set,
                "SuccessfulCreate",
                format!(
                    "create Claim {claim_name} Pod {name}-{ordinal} in StatefulSet {name} success"
                ),
            ),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => {
                return Err(Error::Create {
                    what: format!("claim {claim_name}"),
                    source,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_stable_identities_and_their_claims() {
        let set: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "prod", "uid": "u1"},
            "spec": {"serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c"}], "volumes": [{"name": "data", "emptyDir": {}}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"]}}]}
        }))
        .unwrap();
        let pod = new_pod(&set, &set.spec.as_ref().unwrap().template, "abc", 2);
        assert_eq!(pod.metadata.name.as_deref(), Some("db-2"));
        let spec = pod.spec.unwrap();
        assert_eq!(
            (spec.hostname.as_deref(), spec.subdomain.as_deref()),
            (Some("db-2"), Some("db"))
        );
        let volumes = spec.volumes.unwrap();
        assert_eq!(volumes.len(), 1, "the claim replaces the template volume");
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "data-db-2"
        );
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels[POD_NAME_LABEL], "db-2");
        assert_eq!(labels[HASH_LABEL], "abc");
        assert_eq!(ordinal("db", "db-12"), Some(12));
        assert_eq!(ordinal("db", "dbx-1"), None);
    }
}
