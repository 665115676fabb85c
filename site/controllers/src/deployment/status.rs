//! Deployment status as upstream computes it: counts summed over the ReplicaSets, the
//! `Available` condition from `maxUnavailable`, and the `Progressing` condition with its
//! deadline. Pure: the time is passed in.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::rolling::{self, desired};

fn condition<'a>(status: &'a DeploymentStatus, type_: &str) -> Option<&'a DeploymentCondition> {
    status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// Sets a condition, keeping `lastTransitionTime` when the status does not change and leaving
/// it untouched when neither status nor reason changes (upstream's `SetDeploymentCondition`).
fn set(status: &mut DeploymentStatus, new: DeploymentCondition, refresh_update_time: bool) {
    let list = status.conditions.get_or_insert_with(Vec::new);
    if let Some(old) = list.iter_mut().find(|c| c.type_ == new.type_) {
        if old.status == new.status && old.reason == new.reason && !refresh_update_time {
            return;
        }
        let mut new = new;
        if old.status == new.status {
            new.last_transition_time = old.last_transition_time.clone();
        }
        *old = new;
        return;
    }
    list.push(new);
}

fn cond(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    now: Timestamp,
) -> DeploymentCondition {
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// Upstream's `DeploymentComplete`: every replica updated and available, no old ones left.
pub fn complete(d: &Deployment, status: Option<&DeploymentStatus>) -> bool {
    let Some(s) = status else {
        return false;
    };
    let want = desired(d);
    s.updated_replicas.unwrap_or(0) == want
        && s.replicas.unwrap_or(0) == want
        && s.available_replicas.unwrap_or(0) == want
        && s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
}

/// Progress since the last status (upstream's `DeploymentProgressing`).
fn progressing(old: &DeploymentStatus, new: &DeploymentStatus) -> bool {
    let old_old = old.replicas.unwrap_or(0) - old.updated_replicas.unwrap_or(0);
    let new_old = new.replicas.unwrap_or(0) - new.updated_replicas.unwrap_or(0);
    new.updated_replicas.unwrap_or(0) > old.updated_replicas.unwrap_or(0)
        || new_old < old_old
        || new.ready_replicas.unwrap_or(0) > old.ready_replicas.unwrap_or(0)
        || new.available_replicas.unwrap_or(0) > old.available_replicas.unwrap_or(0)
}

/// The new status, and when to look again for the progress deadline.
pub fn compute(
    d: &Deployment,
    all: &[&ReplicaSet],
    new_rs: Option<&ReplicaSet>,
    rollout: bool,
    now: Timestamp,
) -> (DeploymentStatus, Option<std::time::Duration>) {
    let old = d.status.clone().unwrap_or_default();
    let sum = |f: fn(&ReplicaSet) -> i32| all.iter().map(|rs| f(rs)).sum::<i32>();
    let actual = sum(|rs| rs.status.as_ref().map_or(0, |s| s.replicas));
    let spec_total = sum(rolling::spec_replicas);
    let available = sum(rolling::available);
    let ready = sum(|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let mut status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(actual),
        updated_replicas: Some(
            new_rs
                .and_then(|r| r.status.as_ref())
                .map_or(0, |s| s.replicas),
        ),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((spec_total - available).max(0)),
        collision_count: old.collision_count,
        conditions: old.conditions.clone(),
        terminating_replicas: old.terminating_replicas,
    };
    let want = desired(d);
    if available >= want - rolling::max_unavailable(d) {
        set(
            &mut status,
            cond(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
                now,
            ),
            false,
        );
    } else {
        set(
            &mut status,
            cond(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
                now,
            ),
            false,
        );
    }
    let paused = d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false);
    let current = condition(&status, "Progressing").cloned();
    if paused {
        if current.as_ref().and_then(|c| c.reason.as_deref()) != Some("DeploymentPaused") {
            set(
                &mut status,
                cond(
                    "Progressing",
                    "Unknown",
                    "DeploymentPaused",
                    "Deployment is paused".into(),
                    now,
                ),
                false,
            );
        }
        return (status, None);
    }
    if current.as_ref().and_then(|c| c.reason.as_deref()) == Some("DeploymentPaused") {
        set(
            &mut status,
            cond(
                "Progressing",
                "Unknown",
                "DeploymentResumed",
                "Deployment is resumed".into(),
                now,
            ),
            false,
        );
    }
    if !rollout {
        return (status, None);
    }
    let rs_name = new_rs
        .and_then(|r| r.metadata.name.clone())
        .unwrap_or_default();
    let deadline = d
        .spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(600);
    let current = condition(&status, "Progressing").cloned();
    if complete(d, Some(&status)) {
        if current.as_ref().and_then(|c| c.reason.as_deref()) != Some("NewReplicaSetAvailable") {
            set(
                &mut status,
                cond(
                    "Progressing",
                    "True",
                    "NewReplicaSetAvailable",
                    format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
                    now,
                ),
                true,
            );
        }
        return (status, None);
    }
    if new_rs.is_some() && current.is_none() {
        set(
            &mut status,
            cond(
                "Progressing",
                "True",
                "NewReplicaSetCreated",
                format!("Created new replica set \"{rs_name}\""),
                now,
            ),
            true,
        );
        return (
            status,
            Some(std::time::Duration::from_secs(deadline.max(1) as u64)),
        );
    }
    if progressing(&old, &status)
        || current
            .as_ref()
            .is_some_and(|c| c.reason.as_deref() == Some("DeploymentResumed"))
    {
        set(
            &mut status,
            cond(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{rs_name}\" is progressing."),
                now,
            ),
            true,
        );
        return (
            status,
            Some(std::time::Duration::from_secs(deadline.max(1) as u64)),
        );
    }
    if let Some(c) = current.as_ref()
        && c.status == "True"
        && let Some(updated) = c.last_update_time.as_ref()
    {
        let due = updated.0.as_second() + i64::from(deadline);
        if due <= now.as_second() {
            set(
                &mut status,
                cond(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                    now,
                ),
                false,
            );
            return (status, None);
        }
        return (
            status,
            Some(std::time::Duration::from_secs(
                (due - now.as_second()) as u64 + 1,
            )),
        );
    }
    (status, None)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": 2},
            "spec": {"replicas": 2, "selector": {}, "template": {}, "progressDeadlineSeconds": 60,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}},
            "status": status
        }))
        .unwrap()
    }

    fn rs(name: &str, replicas: i32, available: i32) -> ReplicaSet {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"replicas": replicas, "selector": {}},
            "status": {"replicas": replicas, "readyReplicas": available, "availableReplicas": available}}))
        .unwrap()
    }

    #[test]
    fn a_finished_rollout_is_available_and_progressed() {
        let d = deployment(json!({}));
        let new = rs("web-abc", 2, 2);
        let (s, requeue) = compute(&d, &[&new], Some(&new), true, Timestamp::now());
        assert_eq!(
            (
                s.replicas,
                s.updated_replicas,
                s.available_replicas,
                s.unavailable_replicas
            ),
            (Some(2), Some(2), Some(2), Some(0))
        );
        let progressing = condition(&s, "Progressing").unwrap();
        assert_eq!(
            progressing.reason.as_deref(),
            Some("NewReplicaSetAvailable")
        );
        assert_eq!(
            progressing.message.as_deref(),
            Some("ReplicaSet \"web-abc\" has successfully progressed.")
        );
        assert_eq!(condition(&s, "Available").unwrap().status, "True");
        assert!(requeue.is_none());
    }

    #[test]
    fn a_stuck_rollout_exceeds_its_deadline() {
        let start = Timestamp::now();
        let d = deployment(
            json!({"replicas": 3, "updatedReplicas": 1, "readyReplicas": 2, "availableReplicas": 2, "observedGeneration": 2,
            "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "lastUpdateTime": Time(start), "lastTransitionTime": Time(start)}]}),
        );
        let old = rs("web-old", 2, 2);
        let new = rs("web-new", 1, 0);
        let (_, requeue) = compute(&d, &[&old, &new], Some(&new), true, start);
        assert!(requeue.is_some());
        let later = Timestamp::from_second(start.as_second() + 61).unwrap();
        let (s, _) = compute(&d, &[&old, &new], Some(&new), true, later);
        let c = condition(&s, "Progressing").unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some("ProgressDeadlineExceeded"))
        );
        assert_eq!(
            c.message.as_deref(),
            Some("ReplicaSet \"web-new\" has timed out progressing.")
        );
    }
}
