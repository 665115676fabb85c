//! The Job controller: runs pods until `completions` succeed (or, without completions, until
//! one succeeds and none is left running), at most `parallelism` at once; counts failures
//! against `backoffLimit` (container restarts too, for `restartPolicy: OnFailure`) with
//! upstream's exponential delay before replacing a failed pod; honours `podFailurePolicy`
//! (exit codes and pod conditions: FailJob / Ignore / Count), `activeDeadlineSeconds`,
//! `suspend`, `Indexed` completion mode and `ttlSecondsAfterFinished`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus, PodFailurePolicyRule};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::expectations::Expectations;
use crate::informer::Informers;
use crate::pods;
use crate::runner::{self, Loop};

pub const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";
const INITIAL_BACKOFF: i64 = 10;
const MAX_BACKOFF: i64 = 360;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("claim pods: {0}")]
    Claim(#[source] kube::Error),
    #[error("update status: {0}")]
    Status(#[source] kube::Error),
    #[error("delete: {0}")]
    Delete(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    expectations: Arc<Expectations>,
    recorder: Recorder,
}

fn key(job: &Job) -> String {
    format!(
        "{}/{}",
        job.metadata.namespace.as_deref().unwrap_or(""),
        job.metadata.name.as_deref().unwrap_or("")
    )
}

fn condition_true(status: Option<&JobStatus>, type_: &str) -> bool {
    status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

pub fn finished(job: &Job) -> bool {
    condition_true(job.status.as_ref(), "Complete") || condition_true(job.status.as_ref(), "Failed")
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn index_of(p: &Pod) -> Option<i32> {
    p.metadata
        .annotations
        .as_ref()?
        .get(INDEX_ANNOTATION)?
        .parse()
        .ok()
}

/// `0-2,4` for {0, 1, 2, 4}, as upstream writes `completedIndexes`.
pub fn format_indexes(set: &BTreeSet<i32>) -> String {
    let mut parts = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

pub fn parse_indexes(text: &str) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<i32>(), b.parse::<i32>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(i) = part.parse() {
                    out.insert(i);
                }
            }
        }
    }
    out
}

/// What a failed pod means under the Job's `podFailurePolicy`.
#[derive(Debug, PartialEq, Eq)]
pub enum FailureAction {
    FailJob(String),
    Ignore,
    Count,
}

pub fn failure_action(rules: &[PodFailurePolicyRule], pod: &Pod) -> FailureAction {
    let exit_codes: Vec<(String, i32)> = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c.name.clone(),
                c.state.as_ref()?.terminated.as_ref()?.exit_code,
            ))
        })
        .collect();
    let conditions: Vec<(String, String)> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    for (i, rule) in rules.iter().enumerate() {
        let matched = if let Some(req) = rule.on_exit_codes.as_ref() {
            exit_codes.iter().find(|(name, code)| {
                *code != 0
                    && req.container_name.as_ref().is_none_or(|n| n == name)
                    && match req.operator.as_str() {
                        "In" => req.values.contains(code),
                        "NotIn" => !req.values.contains(code),
                        _ => false,
                    }
            })
            .map(|(name, code)| format!("Container {name} for pod {}/{} failed with exit code {code} matching {} rule at index {i}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or(""), rule.action))
        } else {
            rule.on_pod_conditions
                .iter()
                .flatten()
                .find(|p| {
                    conditions.iter().any(|(t, s)| {
                        *t == p.type_ && (*s == p.status || p.status.is_empty() && s == "True")
                    })
                })
                .map(|p| {
                    format!(
                        "Pod {}/{} has condition {} matching {} rule at index {i}",
                        pod.metadata.namespace.as_deref().unwrap_or(""),
                        pod.metadata.name.as_deref().unwrap_or(""),
                        p.type_,
                        rule.action
                    )
                })
        };
        if let Some(message) = matched {
            return match rule.action.as_str() {
                "FailJob" => FailureAction::FailJob(message),
                "Ignore" => FailureAction::Ignore,
                _ => FailureAction::Count,
            };
        }
    }
    FailureAction::Count
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let jobs = informers.jobs();
    let pod_informer = informers.pods();
    let context = Arc::new(Context {
        client: informers.client_for("job-controller"),
        pods: pod_informer.store(),
        expectations: Arc::default(),
        recorder,
    });
    let store = jobs.store();
    let own = runner::own_changes(jobs.subscribe(256));
    let pod_triggers = runner::owned_pod_triggers::<Job>(
        pod_informer.subscribe(1024),
        context.expectations.clone(),
    );
    let ready = futures::future::join(jobs.synced(), pod_informer.synced());
    runner::run(
        Loop {
            name: "job",
            concurrency: 8,
        },
        store,
        ready,
        vec![own, pod_triggers],
        reconcile,
        context,
        shutdown,
    )
}

fn set_condition(
    status: &mut JobStatus,
    type_: &str,
    value: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let list = status.conditions.get_or_insert_with(Vec::new);
    if let Some(c) = list.iter_mut().find(|c| c.type_ == type_) {
        if c.status != value {
            c.last_transition_time = Some(Time(now));
        }
        c.status = value.into();
        c.reason = Some(reason.into());
        c.message = Some(message.into());
        c.last_probe_time = Some(Time(now));
        return;
    }
    list.push(JobCondition {
        type_: type_.into(),
        status: value.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    });
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = Timestamp::now();
    let namespace = job.metadata.namespace.clone().unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    if finished(&job) {
        return ttl(&jobs, &job, &name, now).await;
    }
    let key = key(&job);
    let in_cache = |n: &str| {
        ctx.pods
            .get(&ObjectRef::new(n).within(&namespace))
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
    };
    if !ctx.expectations.satisfied(&key, in_cache) {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let spec = job.spec.clone().unwrap_or_default();
    let Some(selector) = spec
        .selector
        .clone()
        .and_then(|s| Selector::try_from(s).ok())
    else {
        return Ok(Action::await_change());
    };
    let candidates = ctx
        .pods
        .state_filter(|p| p.metadata.namespace.as_deref() == Some(&namespace));
    let owned = crate::ownership::claim(&ctx.client, &*job, &selector, candidates)
        .await
        .map_err(Error::Claim)?;
    let old = job.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| pods::is_active(p)).collect();
    let rules = spec
        .pod_failure_policy
        .as_ref()
        .map(|p| p.rules.clone())
        .unwrap_or_default();
    let mut fail_job: Option<(String, String)> = None;
    let mut counted_failures = 0;
    let mut last_failure: Option<Timestamp> = None;
    for p in owned.iter().filter(|p| phase(p) == "Failed") {
        match failure_action(&rules, p) {
            FailureAction::FailJob(message) => {
                fail_job = Some(("PodFailurePolicy".into(), message))
            }
            FailureAction::Ignore => {}
            FailureAction::Count => {
                counted_failures += 1;
                let finished_at = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|c| {
                        c.state
                            .as_ref()?
                            .terminated
                            .as_ref()?
                            .finished_at
                            .as_ref()
                            .map(|t| t.0)
                    })
                    .max();
                last_failure = last_failure.max(finished_at.or(Some(now)));
            }
        }
    }
    let succeeded_pods: Vec<&Arc<Pod>> = owned.iter().filter(|p| phase(p) == "Succeeded").collect();
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let mut completed = parse_indexes(old.completed_indexes.as_deref().unwrap_or(""));
    if indexed {
        completed.extend(succeeded_pods.iter().filter_map(|p| index_of(p)));
        status.completed_indexes = Some(format_indexes(&completed));
        status.succeeded = Some(completed.len() as i32);
    } else {
        status.succeeded = Some(old.succeeded.unwrap_or(0).max(succeeded_pods.len() as i32));
    }
    // Restarts count as failures when the kubelet restarts containers in place.
    let restarts: i32 = if spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        == Some("OnFailure")
    {
        active
            .iter()
            .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
            .flatten()
            .map(|c| c.restart_count)
            .sum()
    } else {
        0
    };
    status.failed = Some(old.failed.unwrap_or(0).max(counted_failures));
    status.ready = Some(active.iter().filter(|p| pods::is_ready(p)).count() as i32);
    status.terminating = Some(
        owned
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some() && !pods::is_terminal(p))
            .count() as i32,
    );
    let suspended = spec.suspend.unwrap_or(false);
    if !suspended && status.start_time.is_none() {
        status.start_time = Some(Time(now));
    }
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let succeeded = status.succeeded.unwrap_or(0);
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    if fail_job.is_none() && status.failed.unwrap_or(0) + restarts > backoff_limit {
        fail_job = Some((
            "BackoffLimitExceeded".into(),
            "Job has reached the specified backoff limit".into(),
        ));
    }
    if fail_job.is_none()
        && let (Some(deadline), Some(start)) =
            (spec.active_deadline_seconds, status.start_time.as_ref())
        && !suspended
        && start.0.as_second() + deadline <= now.as_second()
    {
        fail_job = Some((
            "DeadlineExceeded".into(),
            "Job was active longer than specified deadline".into(),
        ));
    }
    let complete = match completions {
        Some(c) => succeeded >= c,
        None => succeeded > 0 && active.is_empty(),
    };
    let mut requeue: Option<Duration> = None;
    if let Some((reason, message)) = fail_job {
        delete_pods(&ctx, &job, &active).await?;
        set_condition(&mut status, "FailureTarget", "True", &reason, &message, now);
        set_condition(&mut status, "Failed", "True", &reason, &message, now);
        ctx.recorder.warning(&*job, &reason, message);
        status.active = Some(0);
    } else if complete {
        delete_pods(&ctx, &job, &active).await?;
        set_condition(
            &mut status,
            "SuccessCriteriaMet",
            "True",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
            now,
        );
        set_condition(
            &mut status,
            "Complete",
            "True",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
            now,
        );
        status.completion_time = Some(Time(now));
        status.active = Some(0);
        ctx.recorder.normal(&*job, "Completed", "Job completed");
    } else if suspended {
        delete_pods(&ctx, &job, &active).await?;
        set_condition(
            &mut status,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            now,
        );
        status.active = Some(0);
    } else {
        if condition_true(Some(&old), "Suspended") {
            set_condition(
                &mut status,
                "Suspended",
                "False",
                "JobResumed",
                "Job resumed",
                now,
            );
        }
        let want = match completions {
            Some(c) => parallelism.min(c - succeeded).max(0),
            None if succeeded > 0 => 0,
            None => parallelism,
        } as usize;
        // Upstream waits 10 s, doubling per failure up to 6 min, before replacing failed pods.
        let wait = if counted_failures > 0 {
            let delay = (INITIAL_BACKOFF << (counted_failures - 1).min(6)).min(MAX_BACKOFF);
            last_failure
                .map(|t| t.as_second() + delay - now.as_second())
                .filter(|w| *w > 0)
        } else {
            None
        };
        if active.len() < want {
            match wait {
                Some(w) => requeue = Some(Duration::from_secs(w as u64)),
                None => {
                    let running: BTreeSet<i32> =
                        active.iter().filter_map(|p| index_of(p)).collect();
                    create_pods(
                        &ctx,
                        &job,
                        want - active.len(),
                        indexed.then(|| {
                            (0..completions.unwrap_or(0))
                                .filter(|i| !completed.contains(i) && !running.contains(i))
                                .collect()
                        }),
                    )
                    .await;
                }
            }
        } else if active.len() > want {
            let mut extra: Vec<&Arc<Pod>> = active.clone();
            extra.sort_by(|a, b| pods::deletion_order(a, b));
            extra.truncate(active.len() - want);
            delete_pods(&ctx, &job, &extra).await?;
        }
        status.active = Some(active.len() as i32);
        if let (Some(deadline), Some(start)) =
            (spec.active_deadline_seconds, status.start_time.as_ref())
        {
            let left = start.0.as_second() + deadline - now.as_second();
            requeue = Some(
                requeue.map_or(Duration::from_secs(left.max(1) as u64), |r| {
                    r.min(Duration::from_secs(left.max(1) as u64))
                }),
            );
        }
    }
    if status != old {
        let patch = serde_json::json!({"status": status});
        match jobs
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Status(e)),
        }
    }
    Ok(Action::requeue(requeue.unwrap_or(Duration::from_secs(300))))
}

/// A finished Job with `ttlSecondsAfterFinished` is deleted (with its pods) once it expires.
async fn ttl(jobs: &Api<Job>, job: &Job, name: &str, now: Timestamp) -> Result<Action, Error> {
    let Some(ttl) = job.spec.as_ref().and_then(|s| s.ttl_seconds_after_finished) else {
        return Ok(Action::await_change());
    };
    let finished_at = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .max()
        .unwrap_or(now);
    let left = finished_at.as_second() + i64::from(ttl) - now.as_second();
    if left > 0 {
        return Ok(Action::requeue(Duration::from_secs(left as u64)));
    }
    if job.metadata.deletion_timestamp.is_none() {
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..DeleteParams::default()
        };
        match jobs.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(job = %name, "finished job deleted after ttlSecondsAfterFinished")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Delete(e)),
        }
    }
    Ok(Action::await_change())
}

async fn create_pods(ctx: &Context, job: &Arc<Job>, count: usize, indexes: Option<Vec<i32>>) {
    let namespace = job.metadata.namespace.clone().unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(template) = job.spec.as_ref().map(|s| s.template.clone()) else {
        return;
    };
    let owner = pods::controller_reference(&**job);
    let key = key(job);
    let plan: Vec<Option<i32>> = match indexes {
        Some(idx) => idx.into_iter().take(count).map(Some).collect(),
        None => vec![None; count],
    };
    let results = join_all(plan.into_iter().map(|index| {
        let mut pod =
            pods::from_template(&template, owner.clone(), &namespace, &format!("{name}-"));
        if let Some(i) = index {
            pod.metadata.generate_name = Some(format!("{name}-{i}-"));
            pod.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(INDEX_ANNOTATION.into(), i.to_string());
            pod.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(INDEX_ANNOTATION.into(), i.to_string());
            if let Some(spec) = pod.spec.as_mut() {
                spec.hostname.get_or_insert_with(|| format!("{name}-{i}"));
                for c in spec
                    .containers
                    .iter_mut()
                    .chain(spec.init_containers.iter_mut().flatten())
                {
                    c.env
                        .get_or_insert_with(Vec::new)
                        .push(k8s_openapi::api::core::v1::EnvVar {
                            name: "JOB_COMPLETION_INDEX".into(),
                            value: Some(i.to_string()),
                            value_from: None,
                        });
                }
            }
        }
        let api = api.clone();
        async move { api.create(&PostParams::default(), &pod).await }
    }))
    .await;
    for r in results {
        match r {
            Ok(p) => {
                let pod_name = p.metadata.name.unwrap_or_default();
                ctx.expectations.created(&key, &pod_name);
                ctx.recorder.normal(
                    &**job,
                    "SuccessfulCreate",
                    format!("Created pod: {pod_name}"),
                );
            }
            Err(e) => ctx
                .recorder
                .warning(&**job, "FailedCreate", format!("Error creating: {e}")),
        }
    }
}

async fn delete_pods(ctx: &Context, job: &Arc<Job>, victims: &[&Arc<Pod>]) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(
        ctx.client.clone(),
        job.metadata.namespace.as_deref().unwrap_or(""),
    );
    let key = key(job);
    for p in victims {
        let name = p.metadata.name.clone().unwrap_or_default();
        ctx.expectations.deleted(&key, &name);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                ctx.recorder
                    .normal(&**job, "SuccessfulDelete", format!("Deleted pod: {name}"))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Delete(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn completed_indexes_round_trip() {
        let set: BTreeSet<i32> = [0, 1, 2, 4, 6, 7].into_iter().collect();
        assert_eq!(format_indexes(&set), "0-2,4,6-7");
        assert_eq!(parse_indexes("0-2,4,6-7"), set);
        assert_eq!(format_indexes(&BTreeSet::new()), "");
    }

    #[test]
    fn pod_failure_policy_matches_exit_codes_and_conditions() {
        let rules: Vec<PodFailurePolicyRule> = serde_json::from_value(json!([
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}
        ]))
        .unwrap();
        let pod = |code: i32, disrupted: bool| -> Pod {
            let mut conditions = vec![];
            if disrupted {
                conditions.push(json!({"type": "DisruptionTarget", "status": "True"}));
            }
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": []}, "status": {
                "phase": "Failed", "conditions": conditions,
                "containerStatuses": [{"name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": code}}}]
            }}))
            .unwrap()
        };
        assert!(
            matches!(failure_action(&rules, &pod(42, false)), FailureAction::FailJob(m) if m.contains("exit code 42"))
        );
        assert_eq!(failure_action(&rules, &pod(1, false)), FailureAction::Count);
        assert_eq!(
            failure_action(&rules, &pod(42, true)),
            FailureAction::Ignore
        );
    }
}
