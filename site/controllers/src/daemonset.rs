//! The DaemonSet controller: one pod on every eligible node (node selector, required node
//! affinity, tolerated taints — DaemonSet pods tolerate node-condition taints), each pinned to
//! its node with node affinity and placed by the scheduler like upstream; RollingUpdate
//! replaces outdated pods within `maxUnavailable`, OnDelete waits for the user; revisions are
//! ControllerRevisions, so `kubectl rollout status|history|undo daemonset` work.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::expectations::Expectations;
use crate::history::{self, HASH_LABEL};
use crate::informer::{Change, Informers};
use crate::node_match::{spec_matches_node, tolerates};
use crate::pods;
use crate::runner::{self, Loop};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("claim pods: {0}")]
    Claim(#[source] kube::Error),
    #[error("revision: {0}")]
    Revision(#[source] kube::Error),
    #[error("update status: {0}")]
    Status(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    revisions: Store<ControllerRevision>,
    expectations: Arc<Expectations>,
    recorder: Recorder,
}

/// The tolerations upstream adds to every DaemonSet pod.
pub fn daemon_tolerations(spec: &mut PodSpec) {
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    let mut add = |key: &str, effect: &str| {
        if !tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some(key) && t.effect.as_deref() == Some(effect))
        {
            tolerations.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some(effect.into()),
                ..Default::default()
            });
        }
    };
    add("node.kubernetes.io/not-ready", "NoExecute");
    add("node.kubernetes.io/unreachable", "NoExecute");
    add("node.kubernetes.io/disk-pressure", "NoSchedule");
    add("node.kubernetes.io/memory-pressure", "NoSchedule");
    add("node.kubernetes.io/pid-pressure", "NoSchedule");
    add("node.kubernetes.io/unschedulable", "NoSchedule");
    if spec.host_network == Some(true) {
        add("node.kubernetes.io/network-unavailable", "NoSchedule");
    }
}

/// Whether a pod with `spec` (already carrying the daemon tolerations) should run on `node`.
pub fn should_run(spec: &PodSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.metadata.name.clone().unwrap_or_default();
    if !spec_matches_node(spec, &labels, &name) {
        return false;
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or(&[]);
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerations.iter().any(|tol| tolerates(tol, t)))
}

fn node_of(p: &Pod) -> Option<String> {
    // Our pods carry their node in the affinity until scheduled.
    if let Some(n) = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
    {
        return Some(n);
    }
    p.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let sets = informers.daemon_sets();
    let pod_informer = informers.pods();
    let nodes = informers.nodes();
    let revisions = informers.controller_revisions();
    let context = Arc::new(Context {
        client: informers.client_for("daemon-set-controller"),
        pods: pod_informer.store(),
        nodes: nodes.store(),
        revisions: revisions.store(),
        expectations: Arc::default(),
        recorder,
    });
    let store = sets.store();
    let own = runner::own_changes(sets.subscribe(64));
    let pod_triggers = runner::owned_pod_triggers::<DaemonSet>(
        pod_informer.subscribe(1024),
        context.expectations.clone(),
    );
    // Any node change may add or remove a daemon pod: every DaemonSet looks again.
    let node_triggers = {
        let store = store.clone();
        runner::triggers(nodes.subscribe(256), move |_: &Change<Node>| {
            store
                .state()
                .iter()
                .map(|d| ObjectRef::from_obj(&**d))
                .collect()
        })
    };
    let ready = futures::future::join4(
        sets.synced(),
        pod_informer.synced(),
        nodes.synced(),
        revisions.synced(),
    );
    runner::run(
        Loop {
            name: "daemonset",
            concurrency: 4,
        },
        store,
        ready,
        vec![own, pod_triggers, node_triggers],
        reconcile,
        context,
        shutdown,
    )
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = ds.metadata.namespace.clone().unwrap_or_default();
    let name = ds.metadata.name.clone().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let in_cache = |n: &str| {
        ctx.pods
            .get(&ObjectRef::new(n).within(&namespace))
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
    };
    if !ctx.expectations.satisfied(&key, in_cache) {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let spec = ds.spec.clone().unwrap_or_default();
    let Ok(selector) = Selector::try_from(spec.selector.clone()) else {
        return Ok(Action::await_change());
    };
    let candidates = ctx.pods.state_filter(|p| {
        p.metadata.namespace.as_deref() == Some(&namespace) && pods::is_active(p)
    });
    let owned = crate::ownership::claim(&ctx.client, &*ds, &selector, candidates)
        .await
        .map_err(Error::Claim)?;
    let in_use: Vec<String> = owned
        .iter()
        .filter_map(|p| p.metadata.labels.as_ref()?.get(HASH_LABEL).cloned())
        .collect();
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let (hash, _) = history::ensure(
        &ctx.client,
        &ctx.revisions,
        &*ds,
        &spec.template,
        limit,
        &in_use,
    )
    .await
    .map_err(Error::Revision)?;
    let mut template_spec = spec.template.spec.clone().unwrap_or_default();
    daemon_tolerations(&mut template_spec);
    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in &owned {
        if let Some(n) = node_of(p) {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let nodes = ctx.nodes.state();
    let mut create_on = Vec::new();
    let mut delete = Vec::new();
    let mut desired = 0;
    let mut misscheduled = 0;
    let mut current = 0;
    for node in &nodes {
        let node_name = node.metadata.name.clone().unwrap_or_default();
        let here = by_node.remove(&node_name).unwrap_or_default();
        if should_run(&template_spec, node) {
            desired += 1;
            if here.is_empty() {
                create_on.push(node_name);
            } else {
                current += 1;
                let mut extra = here.clone();
                extra.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
                delete.extend(extra.into_iter().skip(1));
            }
        } else if !here.is_empty() {
            misscheduled += 1;
            delete.extend(here);
        }
    }
    // Pods for nodes that no longer exist.
    delete.extend(by_node.into_values().flatten());
    // Rolling update: outdated pods go, within maxUnavailable, oldest first.
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let now = Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    if strategy.type_.as_deref().unwrap_or("RollingUpdate") == "RollingUpdate" {
        let max_unavailable = match strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone())
        {
            Some(IntOrString::Int(i)) => i,
            Some(IntOrString::String(s)) => {
                (s.trim_end_matches('%').parse::<i64>().unwrap_or(0) * desired as i64 / 100) as i32
            }
            None => 1,
        }
        .max(1);
        let available = owned
            .iter()
            .filter(|p| pods::is_available(p, min_ready, now))
            .count() as i32;
        let unavailable = desired - available;
        let mut budget = max_unavailable - unavailable.max(0);
        let mut outdated: Vec<&Arc<Pod>> = owned
            .iter()
            .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) != Some(&hash))
            .filter(|p| !delete.iter().any(|d| d.metadata.uid == p.metadata.uid))
            .collect();
        // Unavailable outdated pods can go at once; available ones within the budget.
        outdated.sort_by_key(|p| pods::is_available(p, min_ready, now));
        for p in outdated {
            if !pods::is_available(p, min_ready, now) {
                delete.push(p.clone());
            } else if budget > 0 {
                delete.push(p.clone());
                budget -= 1;
            }
        }
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for p in &delete {
        let pod_name = p.metadata.name.clone().unwrap_or_default();
        ctx.expectations.deleted(&key, &pod_name);
        match api.delete(&pod_name, &DeleteParams::default()).await {
            Ok(_) => {
                ctx.recorder
                    .normal(&*ds, "SuccessfulDelete", format!("Deleted pod: {pod_name}"))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::debug!(daemonset = %key, error = %e, "delete pod"),
        }
    }
    for node_name in &create_on {
        let mut template = spec.template.clone();
        let meta = template.metadata.get_or_insert_with(Default::default);
        let labels = meta.labels.get_or_insert_with(BTreeMap::new);
        labels.insert(HASH_LABEL.into(), hash.clone());
        labels.insert(
            "pod-template-generation".into(),
            ds.metadata.generation.unwrap_or(1).to_string(),
        );
        let mut pod_spec = template_spec.clone();
        // Pinned with node affinity (not nodeName), so the scheduler still checks resources.
        let affinity = pod_spec.affinity.get_or_insert_with(Default::default);
        let node_affinity = affinity.node_affinity.get_or_insert_with(Default::default);
        node_affinity.required_during_scheduling_ignored_during_execution = Some(serde_json::from_value(json!({
            "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}]
        })).unwrap_or_default());
        template.spec = Some(pod_spec);
        let pod = pods::from_template(
            &template,
            pods::controller_reference(&*ds),
            &namespace,
            &format!("{name}-"),
        );
        match api.create(&PostParams::default(), &pod).await {
            Ok(created) => {
                let pod_name = created.metadata.name.unwrap_or_default();
                ctx.expectations.created(&key, &pod_name);
                ctx.recorder
                    .normal(&*ds, "SuccessfulCreate", format!("Created pod: {pod_name}"));
            }
            Err(e) => ctx
                .recorder
                .warning(&*ds, "FailedCreate", format!("Error creating: {e}")),
        }
    }
    // Status.
    let live: Vec<&Arc<Pod>> = owned
        .iter()
        .filter(|p| !delete.iter().any(|d| d.metadata.uid == p.metadata.uid))
        .collect();
    let ready = live.iter().filter(|p| pods::is_ready(p)).count() as i32;
    let available = live
        .iter()
        .filter(|p| pods::is_available(p, min_ready, now))
        .count() as i32;
    let updated = live
        .iter()
        .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash))
        .count() as i32;
    let status = DaemonSetStatus {
        current_number_scheduled: current,
        desired_number_scheduled: desired,
        number_misscheduled: misscheduled,
        number_ready: ready,
        number_available: Some(available),
        number_unavailable: Some((desired - available).max(0)),
        updated_number_scheduled: Some(updated),
        observed_generation: ds.metadata.generation,
        collision_count: ds.status.as_ref().and_then(|s| s.collision_count),
        conditions: None,
    };
    if ds.status.as_ref() != Some(&status) {
        let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"status": status});
        match ds_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Status(e)),
        }
    }
    let pending_ready = live
        .iter()
        .filter_map(|p| pods::seconds_until_available(p, min_ready, now))
        .min();
    Ok(Action::requeue(
        pending_ready.map_or(Duration::from_secs(300), |s| {
            Duration::from_secs(s as u64 + 1)
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn daemon_pods_tolerate_node_conditions_but_respect_selectors_and_other_taints() {
        let mut spec: PodSpec =
            serde_json::from_value(json!({"containers": [], "nodeSelector": {"role": "edge"}}))
                .unwrap();
        daemon_tolerations(&mut spec);
        let unreachable_edge = node(
            json!({"metadata": {"name": "a", "labels": {"role": "edge"}},
            "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
        );
        assert!(should_run(&spec, &unreachable_edge));
        let core = node(json!({"metadata": {"name": "b", "labels": {"role": "core"}}}));
        assert!(!should_run(&spec, &core));
        let dedicated = node(
            json!({"metadata": {"name": "c", "labels": {"role": "edge"}}, "spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
        );
        assert!(!should_run(&spec, &dedicated));
    }
}
