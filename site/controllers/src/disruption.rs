//! PodDisruptionBudget status (upstream's disruption controller): how many selected pods are
//! expected and healthy, how many must stay healthy, and so how many may be disrupted now —
//! the number the eviction API (`kubectl drain`) checks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use crate::informer::{Change, Informers};
use crate::pods;
use crate::runner::{self, Loop};

/// How long an eviction counts against the budget if the pod is not gone yet (upstream).
const DELETION_TIMEOUT: i64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("update status: {0}")]
    Status(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    replica_sets: Store<ReplicaSet>,
    stateful_sets: Store<StatefulSet>,
}

fn scaled(value: &IntOrString, total: i32) -> i32 {
    match value {
        IntOrString::Int(i) => *i,
        IntOrString::String(s) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            ((pct * i64::from(total) + 99) / 100) as i32
        }
    }
}

/// The replicas the pods' controllers want (upstream's "scale" of each controller).
fn expected_scale(ctx: &Context, selected: &[Arc<Pod>]) -> i32 {
    let mut controllers: BTreeMap<String, i32> = BTreeMap::new();
    let mut unowned = 0;
    for pod in selected {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        let scale = owner.and_then(|o| match o.kind.as_str() {
            "ReplicaSet" => ctx
                .replica_sets
                .get(&ObjectRef::new(&o.name).within(&ns))
                .and_then(|r| r.spec.as_ref()?.replicas),
            "StatefulSet" => ctx
                .stateful_sets
                .get(&ObjectRef::new(&o.name).within(&ns))
                .and_then(|s| s.spec.as_ref()?.replicas),
            _ => None,
        });
        match (owner, scale) {
            (Some(o), Some(s)) => {
                controllers.insert(o.uid.clone(), s);
            }
            _ => unowned += 1,
        }
    }
    controllers.values().sum::<i32>() + unowned
}

/// The new status from the selected pods. Pure.
pub fn compute(
    pdb: &PodDisruptionBudget,
    selected: &[Arc<Pod>],
    scale: i32,
    now: Timestamp,
) -> PodDisruptionBudgetStatus {
    let spec = pdb.spec.clone().unwrap_or_default();
    let old = pdb.status.clone().unwrap_or_default();
    // Evictions not yet visible as deletions still count as disruptions for a while.
    let disrupted: BTreeMap<String, Time> = old
        .disrupted_pods
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, t)| {
            let live = selected.iter().any(|p| {
                p.metadata.name.as_deref() == Some(name) && p.metadata.deletion_timestamp.is_none()
            });
            live && t.0.as_second() + DELETION_TIMEOUT > now.as_second()
        })
        .collect();
    let healthy = selected
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && pods::is_ready(p))
        .filter(|p| !disrupted.contains_key(p.metadata.name.as_deref().unwrap_or("")))
        .count() as i32;
    let (expected, desired) = match (&spec.min_available, &spec.max_unavailable) {
        (Some(IntOrString::Int(min)), _) => (selected.len() as i32, *min),
        (Some(min), _) => (scale, scaled(min, scale)),
        (None, Some(max)) => (scale, (scale - scaled(max, scale)).max(0)),
        (None, None) => (selected.len() as i32, 1),
    };
    let allowed = (healthy - desired).max(0);
    let previous = old
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionAllowed")
        .cloned();
    let (status, reason) = if allowed > 0 {
        ("True", "SufficientPods")
    } else {
        ("False", "InsufficientPods")
    };
    let condition = Condition {
        type_: "DisruptionAllowed".into(),
        status: status.into(),
        reason: reason.into(),
        message: String::new(),
        observed_generation: pdb.metadata.generation,
        last_transition_time: previous
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time)
            .unwrap_or(Time(now)),
    };
    PodDisruptionBudgetStatus {
        current_healthy: healthy,
        desired_healthy: desired,
        expected_pods: expected,
        disruptions_allowed: allowed,
        disrupted_pods: (!disrupted.is_empty()).then_some(disrupted),
        observed_generation: pdb.metadata.generation,
        conditions: Some(vec![condition]),
    }
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let pdbs = informers.pod_disruption_budgets();
    let pod_informer = informers.pods();
    let (rs, sts) = (informers.replica_sets(), informers.stateful_sets());
    let context = Arc::new(Context {
        client: informers.client_for("disruption-controller"),
        pods: pod_informer.store(),
        replica_sets: rs.store(),
        stateful_sets: sts.store(),
    });
    let store = pdbs.store();
    let own = runner::own_changes(pdbs.subscribe(64));
    let pod_triggers = {
        let store = store.clone();
        runner::triggers(pod_informer.subscribe(1024), move |c: &Change<Pod>| {
            let ns = c.object().metadata.namespace.clone();
            store
                .state_filter(|p| p.metadata.namespace == ns)
                .iter()
                .map(|p| ObjectRef::from_obj(&**p))
                .collect()
        })
    };
    let ready = futures::future::join4(
        pdbs.synced(),
        pod_informer.synced(),
        rs.synced(),
        sts.synced(),
    );
    runner::run(
        Loop {
            name: "disruption",
            concurrency: 2,
        },
        store,
        ready,
        vec![own, pod_triggers],
        reconcile,
        context,
        shutdown,
    )
}

async fn reconcile(pdb: Arc<PodDisruptionBudget>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = pdb.metadata.namespace.clone().unwrap_or_default();
    let selector = pdb
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .and_then(|s| Selector::try_from(s).ok());
    let selected: Vec<Arc<Pod>> = match &selector {
        Some(sel) => ctx.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(&namespace)
                && !pods::is_terminal(p)
                && sel.matches(p.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
        }),
        None => Vec::new(),
    };
    let scale = expected_scale(&ctx, &selected);
    let status = compute(&pdb, &selected, scale, Timestamp::now());
    let mut old = pdb.status.clone().unwrap_or_default();
    let mut new = status.clone();
    // Timestamps alone are no reason to write.
    for s in [&mut old, &mut new] {
        for c in s.conditions.iter_mut().flatten() {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
    }
    if old != new {
        let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({"status": status});
        match api
            .patch_status(
                pdb.metadata.name.as_deref().unwrap_or(""),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(Error::Status(e)),
        }
    }
    // Recorded evictions expire: look again then.
    let next = status
        .disrupted_pods
        .as_ref()
        .map(|_| Duration::from_secs(DELETION_TIMEOUT as u64));
    Ok(Action::requeue(next.unwrap_or(Duration::from_secs(300))))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, ready: bool) -> Arc<Pod> {
        Arc::new(serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": []},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})).unwrap())
    }

    fn pdb(spec: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(json!({"metadata": {"name": "b", "generation": 1}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn budgets_allow_what_exceeds_the_minimum() {
        let pods = vec![pod("a", true), pod("b", true), pod("c", false)];
        let s = compute(&pdb(json!({"minAvailable": 1})), &pods, 3, Timestamp::now());
        assert_eq!(
            (
                s.expected_pods,
                s.current_healthy,
                s.desired_healthy,
                s.disruptions_allowed
            ),
            (3, 2, 1, 1)
        );
        let s = compute(
            &pdb(json!({"maxUnavailable": "50%"})),
            &pods,
            4,
            Timestamp::now(),
        );
        assert_eq!(
            (s.expected_pods, s.desired_healthy, s.disruptions_allowed),
            (4, 2, 0)
        );
        let s = compute(&pdb(json!({"minAvailable": 2})), &pods, 3, Timestamp::now());
        assert_eq!(s.disruptions_allowed, 0);
        assert_eq!(s.conditions.unwrap()[0].reason, "InsufficientPods");
    }
}
