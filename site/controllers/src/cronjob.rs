//! The CronJob controller: creates a Job at each scheduled time (5-field cron syntax and the
//! `@hourly`-style macros, in UTC or `spec.timeZone` = UTC), honouring `suspend`,
//! `startingDeadlineSeconds` and `concurrencyPolicy` (Allow, Forbid, Replace), keeps
//! `status.active` / `lastScheduleTime` / `lastSuccessfulTime`, and deletes finished Jobs beyond
//! the history limits.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use k8s_openapi::api::batch::v1::{CronJob, CronJobStatus, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::informer::{Change, Informers};
use crate::job::finished;
use crate::pods;
use crate::runner::{self, Loop};

pub const SCHEDULED_ANNOTATION: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// Upstream gives up (and says so) past this many missed start times.
const MAX_MISSED: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create job: {0}")]
    Create(#[source] kube::Error),
    #[error("update status: {0}")]
    Status(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    jobs: Store<Job>,
    recorder: Recorder,
}

/// Parses a CronJob schedule (five fields or a macro).
pub fn parse_schedule(schedule: &str) -> Result<Cron, String> {
    let text = schedule.trim();
    let text = text
        .strip_prefix("TZ=UTC ")
        .or_else(|| text.strip_prefix("CRON_TZ=UTC "))
        .unwrap_or(text);
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| format!("unparseable schedule {schedule:?}: {e}"))
}

fn to_chrono(t: Timestamp) -> DateTime<Utc> {
    Utc.timestamp_opt(t.as_second(), 0)
        .single()
        .unwrap_or_default()
}

fn to_jiff(t: DateTime<Utc>) -> Timestamp {
    Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The most recent schedule time in `(since, now]`, how many were missed, and the next one.
pub fn schedule_times(
    cron: &Cron,
    since: Timestamp,
    now: Timestamp,
) -> (Option<Timestamp>, usize, Option<Timestamp>) {
    let mut latest = None;
    let mut count = 0;
    let mut t = to_chrono(since);
    let now_c = to_chrono(now);
    while let Ok(next) = cron.find_next_occurrence(&t, false) {
        if next > now_c {
            return (latest, count, Some(to_jiff(next)));
        }
        latest = Some(to_jiff(next));
        count += 1;
        t = next;
        if count > MAX_MISSED * 10 {
            // A very old CronJob: jump close to now.
            t = now_c - chrono::Duration::minutes(1);
        }
    }
    (latest, count, None)
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let cron_jobs = informers.cron_jobs();
    let jobs = informers.jobs();
    let context = Arc::new(Context {
        client: informers.client_for("cronjob-controller"),
        jobs: jobs.store(),
        recorder,
    });
    let store = cron_jobs.store();
    let own = runner::own_changes(cron_jobs.subscribe(64));
    let job_triggers = runner::triggers(jobs.subscribe(256), |c: &Change<Job>| {
        runner::controller_of::<CronJob, Job>(&**c.object())
            .into_iter()
            .collect()
    });
    let ready = futures::future::join(cron_jobs.synced(), jobs.synced());
    runner::run(
        Loop {
            name: "cronjob",
            concurrency: 4,
        },
        store,
        ready,
        vec![own, job_triggers],
        reconcile,
        context,
        shutdown,
    )
}

fn job_reference(job: &Job) -> ObjectReference {
    let mut r = job.object_ref(&());
    r.resource_version = None;
    r
}

async fn reconcile(cj: Arc<CronJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = Timestamp::now();
    let namespace = cj.metadata.namespace.clone().unwrap_or_default();
    let name = cj.metadata.name.clone().unwrap_or_default();
    let spec = cj.spec.clone().unwrap_or_default();
    let uid = cj.metadata.uid.clone().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut owned: Vec<Arc<Job>> = ctx.jobs.state_filter(|j| {
        j.metadata.namespace.as_deref() == Some(&namespace)
            && pods::controller_uid(&j.metadata) == Some(uid.as_str())
    });
    owned.sort_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let old = cj.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let active: Vec<&Arc<Job>> = owned
        .iter()
        .filter(|j| !finished(j) && j.metadata.deletion_timestamp.is_none())
        .collect();
    status.active = (!active.is_empty()).then(|| active.iter().map(|j| job_reference(j)).collect());
    for j in owned.iter().filter(|j| finished(j)) {
        let complete = j
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            });
        if complete {
            let t = j.status.as_ref().and_then(|s| s.completion_time.clone());
            if t.as_ref().map(|t| t.0) > status.last_successful_time.as_ref().map(|t| t.0) {
                status.last_successful_time = t;
            }
        }
    }
    cleanup_history(&ctx, &jobs_api, &spec, &owned).await;
    if cj.metadata.deletion_timestamp.is_some() {
        return write_status(&ctx, &namespace, &name, &old, &status, None).await;
    }
    let cron = match parse_schedule(&spec.schedule) {
        Ok(c) => c,
        Err(message) => {
            ctx.recorder.warning(&*cj, "UnparseableSchedule", message);
            return Ok(Action::await_change());
        }
    };
    if let Some(tz) = spec
        .time_zone
        .as_deref()
        .filter(|tz| !matches!(*tz, "UTC" | "Etc/UTC" | ""))
    {
        ctx.recorder.warning(
            &*cj,
            "UnknownTimeZone",
            format!("invalid timeZone: {tz:?}: only UTC is supported by this site"),
        );
        return Ok(Action::await_change());
    }
    let since = status
        .last_schedule_time
        .as_ref()
        .or(cj.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
        .unwrap_or(now);
    let (due, missed, next) = schedule_times(&cron, since, now);
    let wake = next.map(|n| Duration::from_secs((n.as_second() - now.as_second()).max(1) as u64));
    let Some(scheduled) = due else {
        return write_status(&ctx, &namespace, &name, &old, &status, wake).await;
    };
    if spec.suspend.unwrap_or(false) {
        return write_status(&ctx, &namespace, &name, &old, &status, wake).await;
    }
    if missed > MAX_MISSED {
        ctx.recorder.warning(&*cj, "TooManyMissedTimes", format!("too many missed start times: {missed}. Set or decrease .spec.startingDeadlineSeconds or check clock skew"));
    }
    if let Some(deadline) = spec.starting_deadline_seconds
        && scheduled.as_second() + deadline < now.as_second()
    {
        ctx.recorder.warning(
            &*cj,
            "MissSchedule",
            format!("Missed scheduled time to start a job: {scheduled}"),
        );
        status.last_schedule_time = Some(Time(scheduled));
        return write_status(&ctx, &namespace, &name, &old, &status, wake).await;
    }
    match spec.concurrency_policy.as_deref().unwrap_or("Allow") {
        "Forbid" if !active.is_empty() => {
            ctx.recorder.normal(&*cj, "JobAlreadyActive", "Not starting job because prior execution is running and concurrency policy is Forbid");
            // Try again soon: the schedule time stays due until the prior Job ends.
            return write_status(
                &ctx,
                &namespace,
                &name,
                &old,
                &status,
                Some(Duration::from_secs(5)),
            )
            .await;
        }
        "Replace" => {
            for j in &active {
                let job_name = j.metadata.name.clone().unwrap_or_default();
                let params = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..DeleteParams::default()
                };
                if jobs_api.delete(&job_name, &params).await.is_ok() {
                    ctx.recorder.normal(
                        &*cj,
                        "SuccessfulDelete",
                        format!("Deleted job {job_name}"),
                    );
                }
            }
            status.active = None;
        }
        _ => {}
    }
    let job_name = format!("{name}-{}", scheduled.as_second() / 60);
    let template = spec.job_template.clone();
    let mut meta = template.metadata.clone().unwrap_or_default();
    let mut annotations = meta.annotations.take().unwrap_or_default();
    annotations.insert(SCHEDULED_ANNOTATION.into(), scheduled.to_string());
    let job = Job {
        metadata: ObjectMeta {
            name: Some(job_name.clone()),
            namespace: Some(namespace.clone()),
            labels: meta.labels.take(),
            annotations: Some(annotations),
            owner_references: Some(vec![pods::controller_reference(&*cj)]),
            ..Default::default()
        },
        spec: Some(template.spec.unwrap_or_default()),
        status: None,
    };
    match jobs_api.create(&PostParams::default(), &job).await {
        Ok(created) => {
            ctx.recorder
                .normal(&*cj, "SuccessfulCreate", format!("Created job {job_name}"));
            let mut refs = status.active.take().unwrap_or_default();
            refs.push(job_reference(&created));
            status.active = Some(refs);
        }
        // Created on an earlier pass whose status write did not land.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => {
            ctx.recorder
                .warning(&*cj, "FailedCreate", format!("Error creating job: {e}"));
            return Err(Error::Create(e));
        }
    }
    status.last_schedule_time = Some(Time(scheduled));
    write_status(&ctx, &namespace, &name, &old, &status, wake).await
}

async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    old: &CronJobStatus,
    status: &CronJobStatus,
    wake: Option<Duration>,
) -> Result<Action, Error> {
    if status != old {
        let api: Api<CronJob> = Api::namespaced(ctx.client.clone(), namespace);
        // A merge patch cannot remove list entries: send `active` whole (null when empty).
        let patch = serde_json::json!({"status": {
            "active": status.active, "lastScheduleTime": status.last_schedule_time, "lastSuccessfulTime": status.last_successful_time
        }});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Status(e)),
        }
    }
    Ok(Action::requeue(
        wake.unwrap_or(Duration::from_secs(300))
            .min(Duration::from_secs(300)),
    ))
}

/// Deletes the oldest finished Jobs beyond `successfulJobsHistoryLimit` / `failedJobsHistoryLimit`.
async fn cleanup_history(
    ctx: &Context,
    api: &Api<Job>,
    spec: &k8s_openapi::api::batch::v1::CronJobSpec,
    owned: &[Arc<Job>],
) {
    let _ = ctx;
    let complete = |j: &Job| {
        j.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            })
    };
    for (limit, want_complete) in [
        (spec.successful_jobs_history_limit.unwrap_or(3), true),
        (spec.failed_jobs_history_limit.unwrap_or(1), false),
    ] {
        let done: Vec<&Arc<Job>> = owned
            .iter()
            .filter(|j| {
                finished(j)
                    && complete(j) == want_complete
                    && j.metadata.deletion_timestamp.is_none()
            })
            .collect();
        let excess = done.len().saturating_sub(limit.max(0) as usize);
        for j in done.iter().take(excess) {
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            let _ = api
                .delete(j.metadata.name.as_deref().unwrap_or(""), &params)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_like_kubernetes() {
        assert!(parse_schedule("*/5 * * * *").is_ok());
        assert!(parse_schedule("@hourly").is_ok());
        assert!(parse_schedule("0 0 * * 1-5").is_ok());
        assert!(parse_schedule("* * * * * *").is_err(), "no seconds field");
        assert!(
            parse_schedule("not a schedule")
                .unwrap_err()
                .contains("unparseable schedule")
        );
    }

    #[test]
    fn finds_the_latest_due_time_and_the_next_one() {
        let cron = parse_schedule("*/10 * * * *").unwrap();
        let since = Timestamp::from_second(1_700_000_400).unwrap(); // :40:00
        let now = Timestamp::from_second(1_700_001_650).unwrap(); // 20 min 50 s later
        let (due, missed, next) = schedule_times(&cron, since, now);
        assert_eq!(due, Some(Timestamp::from_second(1_700_001_600).unwrap()));
        assert_eq!(missed, 2);
        assert_eq!(next, Some(Timestamp::from_second(1_700_002_200).unwrap()));
        let (due, missed, _) = schedule_times(&cron, now, now);
        assert_eq!((due, missed), (None, 0));
    }
}
