//! The ReplicaSet controller: keeps `spec.replicas` active pods that match the selector,
//! adopting orphans and releasing pods that stop matching, creating in slow-start batches
//! (1, 2, 4, ...) and deleting the least useful pods first; reports replicas, ready, available
//! and fully-labelled counts in status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetCondition, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::expectations::Expectations;
use crate::informer::{Change, Informers};
use crate::pods;
use crate::runner::{self, Loop};

/// At most this many pods are created or deleted per pass (upstream's `burstReplicas`).
const BURST: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("claim pods: {0}")]
    Claim(#[source] kube::Error),
    #[error("create pods: {0}")]
    Create(#[source] kube::Error),
    #[error("delete pods: {0}")]
    Delete(#[source] kube::Error),
    #[error("update status: {0}")]
    Status(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    expectations: Expectations,
    recorder: Recorder,
}

fn key(rs: &ReplicaSet) -> String {
    format!(
        "{}/{}",
        rs.metadata.namespace.as_deref().unwrap_or(""),
        rs.metadata.name.as_deref().unwrap_or("")
    )
}

/// The pods of `namespace` that are not finished (candidates for any controller).
pub fn namespace_pods(store: &Store<Pod>, namespace: &str) -> Vec<Arc<Pod>> {
    store.state_filter(|p| p.metadata.namespace.as_deref() == Some(namespace) && pods::is_active(p))
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let rs_informer = informers.replica_sets();
    let pod_informer = informers.pods();
    let context = Arc::new(Context {
        client: informers.client_for("replicaset-controller"),
        pods: pod_informer.store(),
        expectations: Expectations::default(),
        recorder,
    });
    let rs_store = rs_informer.store();
    let own = runner::own_changes(rs_informer.subscribe(256));
    let pod_triggers = {
        let ctx = context.clone();
        let rs_store = rs_store.clone();
        runner::triggers(pod_informer.subscribe(1024), move |c: &Change<Pod>| {
            let pod = c.object();
            let gone = matches!(c, Change::Deleted(_)) || pod.metadata.deletion_timestamp.is_some();
            if let Some(owner) = runner::controller_of::<ReplicaSet, Pod>(pod) {
                let owner_key = format!(
                    "{}/{}",
                    owner.namespace.as_deref().unwrap_or(""),
                    owner.name
                );
                ctx.expectations.observe(
                    &owner_key,
                    pod.metadata.name.as_deref().unwrap_or(""),
                    gone,
                );
                return vec![owner];
            }
            if gone || pods::controller_uid(&pod.metadata).is_some() {
                return vec![];
            }
            // An orphan: every ReplicaSet that would adopt it.
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            rs_store
                .state_filter(|rs| {
                    rs.metadata.namespace == pod.metadata.namespace
                        && selector(rs).is_some_and(|s| !s.selects_all() && s.matches(&labels))
                })
                .iter()
                .map(|rs| ObjectRef::from_obj(&**rs))
                .collect()
        })
    };
    let ready = futures::future::join(rs_informer.synced(), pod_informer.synced());
    runner::run(
        Loop {
            name: "replicaset",
            concurrency: 8,
        },
        rs_store,
        ready,
        vec![own, pod_triggers],
        reconcile,
        context,
        shutdown,
    )
}

fn selector(rs: &ReplicaSet) -> Option<Selector> {
    Selector::try_from(rs.spec.as_ref()?.selector.clone()).ok()
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key(&rs);
    let namespace = rs.metadata.namespace.clone().unwrap_or_default();
    let Some(spec) = rs.spec.as_ref() else {
        return Ok(Action::await_change());
    };
    let Some(selector) = selector(&rs) else {
        ctx.recorder.warning(
            &*rs,
            "InvalidSelector",
            "the label selector of this ReplicaSet is invalid",
        );
        return Ok(Action::await_change());
    };
    let in_cache = |name: &str| {
        ctx.pods
            .get(&ObjectRef::new(name).within(&namespace))
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
    };
    let synced = ctx.expectations.satisfied(&key, in_cache);
    let candidates = namespace_pods(&ctx.pods, &namespace);
    let owned = crate::ownership::claim(&ctx.client, &*rs, &selector, candidates)
        .await
        .map_err(Error::Claim)?;
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    let mut failure = None;
    if synced && rs.metadata.deletion_timestamp.is_none() {
        if owned.len() < want {
            if let Err(e) = create_pods(&ctx, &rs, want - owned.len()).await {
                failure = Some(e.to_string());
                ctx.recorder
                    .warning(&*rs, "FailedCreate", format!("Error creating: {e}"));
            }
        } else if owned.len() > want {
            delete_pods(&ctx, &rs, &owned, owned.len() - want).await?;
        }
    }
    let requeue = update_status(&ctx, &rs, &owned, failure).await?;
    Ok(requeue
        .map(Action::requeue)
        .unwrap_or_else(|| Action::requeue(Duration::from_secs(300))))
}

async fn create_pods(ctx: &Context, rs: &Arc<ReplicaSet>, count: usize) -> Result<(), kube::Error> {
    let key = key(rs);
    let namespace = rs.metadata.namespace.clone().unwrap_or_default();
    let name = rs.metadata.name.clone().unwrap_or_default();
    let Some(template) = rs.spec.as_ref().and_then(|s| s.template.as_ref()) else {
        return Ok(());
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pod = pods::from_template(
        template,
        pods::controller_reference(&**rs),
        &namespace,
        &format!("{name}-"),
    );
    let mut remaining = count.min(BURST);
    let mut batch = 1;
    while remaining > 0 {
        let n = batch.min(remaining);
        let params = PostParams::default();
        let results = join_all((0..n).map(|_| api.create(&params, &pod))).await;
        let mut first_error = None;
        for r in results {
            match r {
                Ok(created) => {
                    let pod_name = created.metadata.name.clone().unwrap_or_default();
                    ctx.expectations.created(&key, &pod_name);
                    ctx.recorder.normal(
                        &**rs,
                        "SuccessfulCreate",
                        format!("Created pod: {pod_name}"),
                    );
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        remaining -= n;
        batch *= 2;
    }
    Ok(())
}

async fn delete_pods(
    ctx: &Context,
    rs: &Arc<ReplicaSet>,
    owned: &[Arc<Pod>],
    count: usize,
) -> Result<(), Error> {
    let key = key(rs);
    let namespace = rs.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut victims: Vec<&Arc<Pod>> = owned.iter().collect();
    victims.sort_by(|a, b| pods::deletion_order(a, b));
    victims.truncate(count.min(BURST));
    let results = join_all(victims.iter().map(|p| {
        let name = p.metadata.name.clone().unwrap_or_default();
        ctx.expectations.deleted(&key, &name);
        let api = api.clone();
        async move {
            (
                name.clone(),
                api.delete(&name, &DeleteParams::default()).await,
            )
        }
    }))
    .await;
    for (name, r) in results {
        match r {
            Ok(_) => ctx
                .recorder
                .normal(&**rs, "SuccessfulDelete", format!("Deleted pod: {name}")),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                ctx.recorder
                    .warning(&**rs, "FailedDelete", format!("Error deleting: {e}"));
                return Err(Error::Delete(e));
            }
        }
    }
    Ok(())
}

/// Writes status if it changed; returns when to look again for pods becoming available.
async fn update_status(
    ctx: &Context,
    rs: &Arc<ReplicaSet>,
    owned: &[Arc<Pod>],
    failure: Option<String>,
) -> Result<Option<Duration>, Error> {
    let spec = rs.spec.as_ref();
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let template_labels: BTreeMap<String, String> = spec
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let now = pods::now();
    let ready = owned.iter().filter(|p| pods::is_ready(p)).count() as i32;
    let available = owned
        .iter()
        .filter(|p| pods::is_available(p, min_ready, now))
        .count() as i32;
    let fully_labeled = owned
        .iter()
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            template_labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .count() as i32;
    let next = owned
        .iter()
        .filter_map(|p| pods::seconds_until_available(p, min_ready, now))
        .min();
    let old = rs.status.clone().unwrap_or_default();
    let mut conditions: Vec<ReplicaSetCondition> = old
        .conditions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != "ReplicaFailure")
        .collect();
    if let Some(message) = failure {
        let previous = old
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "ReplicaFailure");
        conditions.push(ReplicaSetCondition {
            type_: "ReplicaFailure".into(),
            status: "True".into(),
            reason: Some("FailedCreate".into()),
            message: Some(message),
            last_transition_time: previous
                .and_then(|c| c.last_transition_time.clone())
                .or(Some(Time(now))),
        });
    }
    let status = ReplicaSetStatus {
        replicas: owned.len() as i32,
        fully_labeled_replicas: Some(fully_labeled),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        observed_generation: rs.metadata.generation,
        conditions: (!conditions.is_empty()).then_some(conditions),
        terminating_replicas: old.terminating_replicas,
    };
    let normalize = |s: &ReplicaSetStatus| {
        let mut s = s.clone();
        s.fully_labeled_replicas.get_or_insert(0);
        s.ready_replicas.get_or_insert(0);
        s.available_replicas.get_or_insert(0);
        s.conditions.get_or_insert_with(Vec::new);
        s
    };
    if normalize(&status) != normalize(&old) {
        let api: Api<ReplicaSet> = Api::namespaced(
            ctx.client.clone(),
            rs.metadata.namespace.as_deref().unwrap_or(""),
        );
        let patch = serde_json::json!({"status": status});
        match api
            .patch_status(
                rs.metadata.name.as_deref().unwrap_or(""),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Status(e)),
        }
    }
    Ok(next.map(|s| Duration::from_secs(s as u64 + 1)))
}
