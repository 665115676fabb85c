//! HorizontalPodAutoscalers (`autoscaling/v2`; v1 is stored as v2), as upstream's
//! `pkg/controller/podautoscaler`: every [`SYNC_PERIOD`] each autoscaler reads its target's
//! `scale` subresource (any kind that has one: Deployments, StatefulSets, ReplicaSets, custom
//! resources), the usage of the target's pods from `metrics.k8s.io` (the site serves it from the
//! agents' 10 s samples) and their requests, and sets the replicas.
//!
//! - Metrics: `Resource` and `ContainerResource` (cpu, memory; `Utilization` of the request or
//!   `AverageValue`). `Pods`, `Object` and `External` need a custom metrics API the site does
//!   not serve: `ScalingActive` False says so.
//! - Upstream's replica calculation ([`replicas_for`]): 10 % tolerance, pods without metrics
//!   counted at the target when scaling down and at zero when scaling up, pods not ready
//!   counted at zero when scaling up.
//! - `behavior` ([`Behavior`]): stabilization windows (scale-down 300 s by default), rate
//!   policies per period, `selectPolicy`; min and max replicas. Conditions `AbleToScale`,
//!   `ScalingActive`, `ScalingLimited` and Events as upstream.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::{
    HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior, MetricSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{DynamicObject, GroupVersionKind};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::informer::Informers;
use sitekit::quantity;

/// How often every autoscaler is evaluated (upstream's `--horizontal-pod-autoscaler-sync-period`).
pub const SYNC_PERIOD: Duration = Duration::from_secs(15);
/// Ratios closer to 1 than this do not scale (upstream's default tolerance).
pub const TOLERANCE: f64 = 0.1;

/// One pod of the target, as the calculation sees it.
#[derive(Debug, Clone, Default)]
pub struct PodSample {
    pub name: String,
    /// Running and Ready.
    pub ready: bool,
    /// Requests by container: cpu in millicores, memory in bytes.
    pub requests: BTreeMap<String, (i64, i64)>,
    /// Usage by container, when the metrics have the pod.
    pub usage: Option<BTreeMap<String, (i64, i64)>>,
}

/// A resource metric the autoscaler follows.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceMetric {
    /// `cpu` or `memory`.
    pub resource: String,
    /// For a `ContainerResource` metric: the container.
    pub container: Option<String>,
    pub target: Target,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Percent of the request.
    Utilization(i32),
    /// Per pod, in millicores (cpu) or bytes (memory).
    AverageValue(i64),
}

/// What one metric asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub replicas: i32,
    /// Percent of the request (for Utilization targets).
    pub utilization: Option<i32>,
    /// Per pod, millicores or bytes.
    pub average: i64,
}

fn pick(values: (i64, i64), resource: &str) -> i64 {
    if resource == "cpu" {
        values.0
    } else {
        values.1
    }
}

fn sum_for(per_container: &BTreeMap<String, (i64, i64)>, metric: &ResourceMetric) -> i64 {
    per_container
        .iter()
        .filter(|(c, _)| metric.container.as_ref().is_none_or(|want| want == *c))
        .map(|(_, v)| pick(*v, &metric.resource))
        .sum()
}

/// Upstream's replica calculation for one resource metric.
pub fn replicas_for(
    metric: &ResourceMetric,
    pods: &[PodSample],
    current: i32,
) -> Result<Recommendation, String> {
    if pods.is_empty() {
        return Err("no pods of the target were found".into());
    }
    let with_metrics: Vec<&PodSample> = pods
        .iter()
        .filter(|p| p.ready && p.usage.is_some())
        .collect();
    let missing = pods.iter().filter(|p| p.ready && p.usage.is_none()).count();
    let unready = pods.iter().filter(|p| !p.ready).count();
    if with_metrics.is_empty() {
        return Err(format!(
            "did not receive metrics for targeted pods (pods might be unready): unable to get metrics for resource {}",
            metric.resource
        ));
    }
    let usage: i64 = with_metrics
        .iter()
        .map(|p| sum_for(p.usage.as_ref().expect("filtered"), metric))
        .sum();
    let requests: i64 = with_metrics
        .iter()
        .map(|p| sum_for(&p.requests, metric))
        .sum();
    let average = usage / with_metrics.len() as i64;
    // The ratio of usage to the target, and what one pod at the target counts as.
    let (ratio, per_pod_target, utilization) = match metric.target {
        Target::Utilization(percent) => {
            if requests <= 0 {
                return Err(format!(
                    "failed to get {} utilization: missing request for {}",
                    metric.resource, metric.resource
                ));
            }
            let utilization = (usage as f64 * 100.0 / requests as f64).round();
            let request_per_pod = requests as f64 / with_metrics.len() as f64;
            (
                utilization / percent.max(1) as f64,
                request_per_pod * percent as f64 / 100.0,
                Some(utilization as i32),
            )
        }
        Target::AverageValue(value) => (average as f64 / value.max(1) as f64, value as f64, None),
    };
    let recommendation = |replicas: i32| Recommendation {
        replicas,
        utilization,
        average,
    };
    if missing == 0 && unready == 0 {
        if (ratio - 1.0).abs() <= TOLERANCE {
            return Ok(recommendation(current));
        }
        return Ok(recommendation(
            (ratio * with_metrics.len() as f64).ceil() as i32
        ));
    }
    // Pods without metrics count at the target when scaling down, at zero when scaling up;
    // pods not ready count at zero when scaling up (they are left out when scaling down).
    let scale_up = ratio > 1.0;
    let mut total = usage as f64;
    let mut count = with_metrics.len();
    if scale_up {
        count += missing + unready;
    } else {
        total += missing as f64 * per_pod_target;
        count += missing;
    }
    let new_ratio = total / (per_pod_target * count as f64).max(f64::MIN_POSITIVE);
    if (new_ratio - 1.0).abs() <= TOLERANCE || (new_ratio > 1.0) != scale_up {
        return Ok(recommendation(current));
    }
    let replicas = (new_ratio * count as f64).ceil() as i32;
    // Never a change the other way than the metrics say.
    if (scale_up && replicas < current) || (!scale_up && replicas > current) {
        return Ok(recommendation(current));
    }
    Ok(recommendation(replicas))
}

/// Scaling behaviour with upstream's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    pub up: Rules,
    pub down: Rules,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub window: Duration,
    /// (`Pods` or `Percent`, value, period).
    pub policies: Vec<(String, i32, Duration)>,
    /// `Max`, `Min` or `Disabled`.
    pub select: String,
}

impl Behavior {
    pub fn from_spec(spec: Option<&HorizontalPodAutoscalerBehavior>) -> Behavior {
        let rules = |given: Option<&HPAScalingRules>,
                     window: i32,
                     policies: Vec<(String, i32, Duration)>| {
            let given_policies: Vec<(String, i32, Duration)> = given
                .and_then(|r| r.policies.as_ref())
                .map(|p| {
                    p.iter()
                        .map(|p| {
                            (
                                p.type_.clone(),
                                p.value,
                                Duration::from_secs(p.period_seconds.max(1) as u64),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            Rules {
                window: Duration::from_secs(
                    given
                        .and_then(|r| r.stabilization_window_seconds)
                        .unwrap_or(window)
                        .max(0) as u64,
                ),
                policies: if given_policies.is_empty() {
                    policies
                } else {
                    given_policies
                },
                select: given
                    .and_then(|r| r.select_policy.clone())
                    .unwrap_or_else(|| "Max".into()),
            }
        };
        let fifteen = Duration::from_secs(15);
        Behavior {
            up: rules(
                spec.and_then(|b| b.scale_up.as_ref()),
                0,
                vec![
                    ("Pods".into(), 4, fifteen),
                    ("Percent".into(), 100, fifteen),
                ],
            ),
            down: rules(
                spec.and_then(|b| b.scale_down.as_ref()),
                300,
                vec![("Percent".into(), 100, fifteen)],
            ),
        }
    }
}

/// What the controller remembers of one autoscaler: its recent recommendations and scalings.
#[derive(Debug, Default, Clone)]
pub struct History {
    pub recommendations: Vec<(Instant, i32)>,
    /// (when, replicas added (positive) or removed (negative)).
    pub scalings: Vec<(Instant, i32)>,
}

/// Upstream's `normalizeDesiredReplicasWithBehaviors`: the stabilized recommendation, limited
/// by the rate policies; then min and max. Returns the replicas and the `ScalingLimited`
/// reason and message.
pub fn normalize(
    desired: i32,
    current: i32,
    min: i32,
    max: i32,
    behavior: &Behavior,
    history: &mut History,
    now: Instant,
) -> (i32, &'static str, String) {
    // Stabilization.
    let mut up = desired;
    let mut down = desired;
    for (at, replicas) in &history.recommendations {
        if now.duration_since(*at) <= behavior.up.window {
            up = up.min(*replicas);
        }
        if now.duration_since(*at) <= behavior.down.window {
            down = down.max(*replicas);
        }
    }
    let mut recommendation = current;
    if recommendation < up {
        recommendation = up;
    }
    if recommendation > down {
        recommendation = down;
    }
    history.recommendations.push((now, desired));
    let longest = behavior.up.window.max(behavior.down.window);
    history
        .recommendations
        .retain(|(at, _)| now.duration_since(*at) <= longest);

    // Rate limits.
    let changed_within = |period: Duration, up: bool| -> i32 {
        history
            .scalings
            .iter()
            .filter(|(at, change)| now.duration_since(*at) <= period && (*change > 0) == up)
            .map(|(_, change)| change.abs())
            .sum()
    };
    let (mut replicas, mut reason, mut message) = (
        recommendation,
        "DesiredWithinRange",
        "the desired count is within the acceptable range".to_string(),
    );
    if recommendation > current {
        let limits: Vec<i32> = behavior
            .up
            .policies
            .iter()
            .map(|(kind, value, period)| {
                let start = current - changed_within(*period, true);
                if kind == "Pods" {
                    start + value
                } else {
                    (start as f64 * (1.0 + *value as f64 / 100.0)).ceil() as i32
                }
            })
            .collect();
        let limit = match behavior.up.select.as_str() {
            "Disabled" => current,
            "Min" => limits.iter().copied().min().unwrap_or(current),
            _ => limits.iter().copied().max().unwrap_or(current),
        };
        if recommendation > limit {
            replicas = limit;
            reason = "ScaleUpLimit";
            message =
                "the desired replica count is increasing faster than the maximum scale rate".into();
        }
    } else if recommendation < current {
        let limits: Vec<i32> = behavior
            .down
            .policies
            .iter()
            .map(|(kind, value, period)| {
                let start = current + changed_within(*period, false);
                if kind == "Pods" {
                    start - value
                } else {
                    (start as f64 * (1.0 - *value as f64 / 100.0)) as i32
                }
            })
            .collect();
        let limit = match behavior.down.select.as_str() {
            "Disabled" => current,
            "Min" => limits.iter().copied().max().unwrap_or(current),
            _ => limits.iter().copied().min().unwrap_or(current),
        };
        if recommendation < limit {
            replicas = limit;
            reason = "ScaleDownLimit";
            message =
                "the desired replica count is decreasing faster than the maximum scale rate".into();
        }
    }
    if replicas > max {
        (
            max,
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count".into(),
        )
    } else if replicas < min {
        (
            min,
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count".into(),
        )
    } else {
        (replicas, reason, message)
    }
}

/// The resource metrics of a spec, or why one cannot be followed here.
pub fn resource_metrics(
    metrics: &[MetricSpec],
) -> Result<Vec<ResourceMetric>, (&'static str, String)> {
    let mut out = Vec::new();
    for m in metrics {
        let (name, container, target) = match m.type_.as_str() {
            "Resource" => match &m.resource {
                Some(r) => (r.name.clone(), None, &r.target),
                None => {
                    return Err((
                        "InvalidMetricSourceType",
                        "a Resource metric without its resource".into(),
                    ));
                }
            },
            "ContainerResource" => match &m.container_resource {
                Some(r) => (r.name.clone(), Some(r.container.clone()), &r.target),
                None => {
                    return Err((
                        "InvalidMetricSourceType",
                        "a ContainerResource metric without its source".into(),
                    ));
                }
            },
            other => {
                return Err((
                    "FailedGetExternalMetric",
                    format!(
                        "{other} metrics need a custom or external metrics API, which this site does not serve; use Resource or ContainerResource metrics (cpu, memory)"
                    ),
                ));
            }
        };
        if name != "cpu" && name != "memory" {
            return Err((
                "FailedGetResourceMetric",
                format!("resource {name} has no metrics here (cpu and memory do)"),
            ));
        }
        let target = match (
            target.type_.as_str(),
            target.average_utilization,
            &target.average_value,
        ) {
            ("Utilization", Some(p), _) => Target::Utilization(p),
            ("AverageValue", _, Some(v)) => Target::AverageValue(if name == "cpu" {
                quantity::milli(v).unwrap_or(0)
            } else {
                quantity::units(v).unwrap_or(0)
            }),
            (kind, _, _) => {
                return Err((
                    "InvalidMetricSourceType",
                    format!("target type {kind} without its value for resource {name}"),
                ));
            }
        };
        out.push(ResourceMetric {
            resource: name,
            container,
            target,
        });
    }
    Ok(out)
}

fn requests_of(pod: &Pod) -> BTreeMap<String, (i64, i64)> {
    pod.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .map(|c| {
                    let r = c.resources.as_ref().and_then(|r| r.requests.as_ref());
                    let cpu = r
                        .and_then(|r| r.get("cpu"))
                        .and_then(quantity::milli)
                        .unwrap_or(0);
                    let memory = r
                        .and_then(|r| r.get("memory"))
                        .and_then(quantity::units)
                        .unwrap_or(0);
                    (c.name.clone(), (cpu, memory))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Pods of the target (not being deleted, not failed) with their usage from PodMetrics items.
pub fn samples(pods: &[Pod], metrics: &[Value]) -> Vec<PodSample> {
    let usage: HashMap<&str, BTreeMap<String, (i64, i64)>> = metrics
        .iter()
        .filter_map(|m| {
            let name = m.pointer("/metadata/name")?.as_str()?;
            let containers = m.get("containers")?.as_array()?;
            let per = containers
                .iter()
                .filter_map(|c| {
                    let q = |k: &str| {
                        c.pointer(&format!("/usage/{k}"))
                            .and_then(Value::as_str)
                            .map(|s| {
                                k8s_openapi::apimachinery::pkg::api::resource::Quantity(s.into())
                            })
                    };
                    Some((
                        c.get("name")?.as_str()?.to_string(),
                        (
                            q("cpu").as_ref().and_then(quantity::milli).unwrap_or(0),
                            q("memory").as_ref().and_then(quantity::units).unwrap_or(0),
                        ),
                    ))
                })
                .collect();
            Some((name, per))
        })
        .collect();
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Failed" | "Succeeded")
            )
        })
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            PodSample {
                ready: is_ready(p),
                requests: requests_of(p),
                usage: usage.get(name.as_str()).cloned(),
                name,
            }
        })
        .collect()
}

/// How a recommendation reads in an Event ("cpu resource utilization (percentage of request)").
fn describe(metric: &ResourceMetric) -> String {
    let what = match metric.target {
        Target::Utilization(_) => "resource utilization (percentage of request)",
        Target::AverageValue(_) => "resource",
    };
    match &metric.container {
        Some(c) => format!("{} container {c} {what}", metric.resource),
        None => format!("{} {what}", metric.resource),
    }
}

fn current_metric(metric: &ResourceMetric, rec: &Recommendation) -> Value {
    let value = if metric.resource == "cpu" {
        format!("{}m", rec.average)
    } else {
        rec.average.to_string()
    };
    let mut current = json!({"averageValue": value});
    if let Some(u) = rec.utilization {
        current["averageUtilization"] = json!(u);
    }
    match &metric.container {
        Some(c) => {
            json!({"type": "ContainerResource", "containerResource": {"name": metric.resource, "container": c, "current": current}})
        }
        None => {
            json!({"type": "Resource", "resource": {"name": metric.resource, "current": current}})
        }
    }
}

type Key = (String, String);

/// How long a target kind's resource, once found through discovery, is used without asking
/// again (a failed read of the scale forgets it at once).
const KIND_TTL: Duration = Duration::from_secs(600);

/// Target kinds -> their resources, as upstream's controller keeps a REST mapper: discovery is
/// asked once per kind, not on every sync of every autoscaler.
#[derive(Default)]
struct TargetKinds {
    known: HashMap<GroupVersionKind, (kube::core::ApiResource, Instant)>,
}

impl TargetKinds {
    async fn resource(
        &mut self,
        client: &kube::Client,
        gvk: &GroupVersionKind,
    ) -> Result<kube::core::ApiResource, kube::Error> {
        if let Some((resource, at)) = self.known.get(gvk)
            && at.elapsed() < KIND_TTL
        {
            return Ok(resource.clone());
        }
        let (resource, _) = kube::discovery::pinned_kind(client, gvk).await?;
        self.known
            .insert(gvk.clone(), (resource.clone(), Instant::now()));
        Ok(resource)
    }

    fn forget(&mut self, gvk: &GroupVersionKind) {
        self.known.remove(gvk);
    }
}

pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let autoscalers = informers.horizontal_pod_autoscalers();
    let store = autoscalers.store();
    let mut changes = autoscalers.subscribe(64);
    let ready = autoscalers.synced();
    let client = informers.client_for("horizontal-pod-autoscaler");
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        let mut histories: HashMap<Key, History> = HashMap::new();
        let mut next: HashMap<Key, Instant> = HashMap::new();
        let mut kinds = TargetKinds::default();
        loop {
            let now = Instant::now();
            let all = store.state();
            for hpa in &all {
                let key = (
                    hpa.metadata.namespace.clone().unwrap_or_default(),
                    hpa.metadata.name.clone().unwrap_or_default(),
                );
                if next.get(&key).is_some_and(|at| *at > now) {
                    continue;
                }
                next.insert(key.clone(), now + SYNC_PERIOD);
                let history = histories.entry(key).or_default();
                reconcile(&client, &recorder, &mut kinds, hpa, history).await;
            }
            histories.retain(|k, _| {
                all.iter().any(|h| {
                    h.metadata.namespace.as_deref() == Some(&k.0)
                        && h.metadata.name.as_deref() == Some(&k.1)
                })
            });
            next.retain(|k, _| histories.contains_key(k));
            let wake = next.values().min().copied().unwrap_or(now + SYNC_PERIOD);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = changes.recv() => {
                    match change {
                        None => return,
                        // A new or edited autoscaler is looked at now, as upstream queues it.
                        Some(crate::informer::Change::Applied(h)) => {
                            let key = (h.metadata.namespace.clone().unwrap_or_default(), h.metadata.name.clone().unwrap_or_default());
                            if !histories.contains_key(&key) || h.metadata.generation != h.status.as_ref().and_then(|s| s.observed_generation) {
                                next.remove(&key);
                            }
                        }
                        Some(_) => {}
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            }
        }
    }
}

fn condition(kind: &str, status: bool, reason: &str, message: &str) -> Value {
    json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    })
}

/// Keeps a condition's `lastTransitionTime` when its status did not change.
fn keep_transitions(hpa: &HorizontalPodAutoscaler, conditions: &mut [Value]) {
    let old = hpa.status.as_ref().and_then(|s| s.conditions.as_ref());
    for c in conditions.iter_mut() {
        if let Some(before) = old.and_then(|o| {
            o.iter()
                .find(|o| Some(o.type_.as_str()) == c["type"].as_str())
        }) && Some(before.status.as_str()) == c["status"].as_str()
            && let Some(t) = &before.last_transition_time
        {
            c["lastTransitionTime"] = json!(t);
        }
    }
}

async fn write_status(client: &kube::Client, hpa: &HorizontalPodAutoscaler, mut status: Value) {
    if let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        keep_transitions(hpa, conditions);
    }
    status["observedGeneration"] = json!(hpa.metadata.generation);
    let namespace = hpa.metadata.namespace.as_deref().unwrap_or("default");
    let name = hpa.metadata.name.as_deref().unwrap_or("");
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), namespace);
    if let Err(error) = api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
    {
        tracing::debug!(autoscaler = %format!("{namespace}/{name}"), %error, "cannot write the autoscaler's status");
    }
}

async fn reconcile(
    client: &kube::Client,
    recorder: &Recorder,
    kinds: &mut TargetKinds,
    hpa: &HorizontalPodAutoscaler,
    history: &mut History,
) {
    let namespace = hpa.metadata.namespace.clone().unwrap_or_default();
    let Some(spec) = hpa.spec.as_ref() else {
        return;
    };
    let target = &spec.scale_target_ref;
    let current_status = hpa.status.clone().unwrap_or_default();
    let fail = |reason: &'static str, message: String, able: bool| {
        let mut conditions = vec![condition(
            "AbleToScale",
            able,
            if able { "SucceededGetScale" } else { reason },
            if able {
                "the HPA controller was able to get the target's current scale"
            } else {
                &message
            },
        )];
        if able {
            conditions.push(condition("ScalingActive", false, reason, &message));
        }
        (reason, message, conditions)
    };
    // The target's scale.
    let (group, version) = match target
        .api_version
        .as_deref()
        .unwrap_or("apps/v1")
        .split_once('/')
    {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            target.api_version.clone().unwrap_or_else(|| "v1".into()),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, &target.kind);
    let scale = match kinds.resource(client, &gvk).await {
        Ok(resource) => {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &namespace, &resource);
            api.get_scale(&target.name).await.map(|s| (api, s))
        }
        Err(e) => Err(e),
    };
    let (api, scale) = match scale {
        Ok(found) => found,
        Err(error) => {
            kinds.forget(&gvk);
            let (reason, message, conditions) = fail(
                "FailedGetScale",
                format!("the HPA controller was unable to get the target's current scale: {error}"),
                false,
            );
            recorder.warning(hpa, reason, message);
            write_status(client, hpa, json!({"conditions": conditions, "currentReplicas": current_status.current_replicas.unwrap_or(0), "desiredReplicas": current_status.desired_replicas})).await;
            return;
        }
    };
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let selector = scale
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    if current == 0 && spec.min_replicas.unwrap_or(1) != 0 {
        let conditions = vec![
            condition(
                "AbleToScale",
                true,
                "SucceededGetScale",
                "the HPA controller was able to get the target's current scale",
            ),
            condition(
                "ScalingActive",
                false,
                "ScalingDisabled",
                "scaling is disabled since the replica count of the target is zero",
            ),
        ];
        write_status(client, hpa, json!({"conditions": conditions, "currentReplicas": 0, "desiredReplicas": 0, "currentMetrics": null})).await;
        return;
    }
    let metrics = match resource_metrics(spec.metrics.as_deref().unwrap_or(&[])) {
        Ok(m) if m.is_empty() => vec![ResourceMetric {
            resource: "cpu".into(),
            container: None,
            target: Target::Utilization(80),
        }],
        Ok(m) => m,
        Err((reason, message)) => {
            let (reason, message, conditions) = fail(reason, message, true);
            recorder.warning(hpa, reason, message);
            write_status(client, hpa, json!({"conditions": conditions, "currentReplicas": current, "desiredReplicas": current})).await;
            return;
        }
    };
    // The pods and their usage.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let listed = pods.list(&ListParams::default().labels(&selector)).await;
    let usage = metrics_items(client, &namespace, &selector).await;
    let (listed, usage) = match (listed, usage) {
        (Ok(l), Ok(u)) => (l.items, u),
        (Err(e), _) | (_, Err(e)) => {
            let (reason, message, conditions) = fail(
                "FailedGetResourceMetric",
                format!("unable to get metrics for the target's pods: {e}"),
                true,
            );
            recorder.warning(hpa, reason, message);
            write_status(client, hpa, json!({"conditions": conditions, "currentReplicas": current, "desiredReplicas": current})).await;
            return;
        }
    };
    let samples = samples(&listed, &usage);
    let mut desired = 0;
    let mut chosen = String::new();
    let mut currents = Vec::new();
    for metric in &metrics {
        match replicas_for(metric, &samples, current) {
            Ok(rec) => {
                if rec.replicas > desired {
                    desired = rec.replicas;
                    chosen = describe(metric);
                }
                currents.push(current_metric(metric, &rec));
            }
            Err(message) => {
                let (reason, message, conditions) = fail(
                    "FailedGetResourceMetric",
                    format!("the HPA was unable to compute the replica count: {message}"),
                    true,
                );
                recorder.warning(hpa, reason, message);
                write_status(client, hpa, json!({"conditions": conditions, "currentReplicas": current, "desiredReplicas": current})).await;
                return;
            }
        }
    }
    let behavior = Behavior::from_spec(spec.behavior.as_ref());
    let min = spec.min_replicas.unwrap_or(1);
    let (replicas, limited_reason, limited_message) = normalize(
        desired,
        current,
        min,
        spec.max_replicas,
        &behavior,
        history,
        Instant::now(),
    );
    let mut able = condition(
        "AbleToScale",
        true,
        "ReadyForNewScale",
        "recommended size matches current size",
    );
    let mut last_scale = current_status.last_scale_time.clone().map(|t| json!(t));
    if replicas != current {
        let direction = if replicas > current { "above" } else { "below" };
        match api
            .patch_scale(
                &target.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
            )
            .await
        {
            Ok(_) => {
                history.scalings.push((Instant::now(), replicas - current));
                history
                    .scalings
                    .retain(|(at, _)| at.elapsed() < Duration::from_secs(1800));
                recorder.normal(
                    hpa,
                    "SuccessfulRescale",
                    format!("New size: {replicas}; reason: {chosen} {direction} target"),
                );
                able = condition(
                    "AbleToScale",
                    true,
                    "SucceededRescale",
                    &format!(
                        "the HPA controller was able to update the target scale to {replicas}"
                    ),
                );
                last_scale = Some(json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now()
                )));
            }
            Err(error) => {
                let message = format!(
                    "New size: {replicas}; reason: {chosen} {direction} target; error: {error}"
                );
                recorder.warning(hpa, "FailedRescale", message.clone());
                able = condition(
                    "AbleToScale",
                    false,
                    "FailedUpdateScale",
                    &format!("the HPA controller was unable to update the target scale: {error}"),
                );
            }
        }
    }
    let limited = limited_reason != "DesiredWithinRange";
    let conditions = vec![
        able,
        condition(
            "ScalingActive",
            true,
            "ValidMetricFound",
            &format!(
                "the HPA was able to successfully calculate a replica count from {}",
                metrics.first().map(describe).unwrap_or_default()
            ),
        ),
        condition("ScalingLimited", limited, limited_reason, &limited_message),
    ];
    write_status(
        client,
        hpa,
        json!({
            "currentReplicas": current,
            "desiredReplicas": replicas,
            "currentMetrics": currents,
            "conditions": conditions,
            "lastScaleTime": last_scale,
        }),
    )
    .await;
}

/// The PodMetrics items of the pods `selector` selects.
async fn metrics_items(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
) -> Result<Vec<Value>, kube::Error> {
    let resource = kube::core::ApiResource {
        group: "metrics.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "metrics.k8s.io/v1beta1".into(),
        kind: "PodMetrics".into(),
        plural: "pods".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let list = api.list(&ListParams::default().labels(selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|item| serde_json::to_value(item).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, request_m: i64, usage_m: Option<i64>) -> PodSample {
        PodSample {
            name: name.into(),
            ready,
            requests: [("c".to_string(), (request_m, 0))].into(),
            usage: usage_m.map(|u| [("c".to_string(), (u, 0))].into()),
        }
    }

    fn cpu(percent: i32) -> ResourceMetric {
        ResourceMetric {
            resource: "cpu".into(),
            container: None,
            target: Target::Utilization(percent),
        }
    }

    #[test]
    fn utilization_scales_by_the_ratio_outside_the_tolerance() {
        // 2 pods at 90 % of 100m against a 50 % target: ceil(1.8 * 2) = 4.
        let pods = [pod("a", true, 100, Some(90)), pod("b", true, 100, Some(90))];
        let r = replicas_for(&cpu(50), &pods, 2).unwrap();
        assert_eq!((r.replicas, r.utilization, r.average), (4, Some(90), 90));
        // 53 % against 50 %: within 10 %, unchanged.
        let pods = [pod("a", true, 100, Some(53)), pod("b", true, 100, Some(53))];
        assert_eq!(replicas_for(&cpu(50), &pods, 2).unwrap().replicas, 2);
        // Idle: down to ceil(0.1 * 2) = 1.
        let pods = [pod("a", true, 100, Some(5)), pod("b", true, 100, Some(5))];
        assert_eq!(replicas_for(&cpu(50), &pods, 2).unwrap().replicas, 1);
        // AverageValue: 300m per pod over 3 pods against 200m: ceil(1.5 * 3) = 5.
        let avg = ResourceMetric {
            target: Target::AverageValue(200),
            ..cpu(0)
        };
        let pods = [
            pod("a", true, 0, Some(300)),
            pod("b", true, 0, Some(300)),
            pod("c", true, 0, Some(300)),
        ];
        assert_eq!(replicas_for(&avg, &pods, 3).unwrap().replicas, 5);
    }

    #[test]
    fn missing_and_unready_pods_are_counted_as_upstream_counts_them() {
        // Scaling up: the new pod without metrics and the unready one count as idle.
        let pods = [
            pod("a", true, 100, Some(100)),
            pod("b", true, 100, None),
            pod("c", false, 100, None),
        ];
        // 100 % of one pod against 50 %: raw ratio 2; with the two others at 0: 100/(50*3) < 1,
        // the direction flips, so nothing changes.
        assert_eq!(replicas_for(&cpu(50), &pods, 3).unwrap().replicas, 3);
        // Scaling down: the pod without metrics counts at the target, so it stops short.
        let pods = [pod("a", true, 100, Some(10)), pod("b", true, 100, None)];
        // (10 + 50) / (50 * 2) = 0.6 -> ceil(0.6 * 2) = 2: unchanged.
        assert_eq!(replicas_for(&cpu(50), &pods, 2).unwrap().replicas, 2);
        // No request: upstream's error.
        let err = replicas_for(&cpu(50), &[pod("a", true, 0, Some(10))], 1).unwrap_err();
        assert!(err.contains("missing request for cpu"), "{err}");
    }

    #[test]
    fn behaviour_stabilizes_down_limits_the_rate_and_clamps() {
        let behavior = Behavior::from_spec(None);
        let mut history = History::default();
        let start = Instant::now();
        // Up: at most the larger of +4 pods and +100 % in 15 s: 2 -> 6 when 10 are asked.
        let (r, reason, _) = normalize(10, 2, 1, 20, &behavior, &mut history, start);
        assert_eq!((r, reason), (6, "ScaleUpLimit"));
        // Down: the highest recommendation of the last 300 s holds.
        let (r, _, _) = normalize(
            1,
            4,
            1,
            20,
            &behavior,
            &mut history,
            start + Duration::from_secs(60),
        );
        assert_eq!(r, 4);
        let (r, _, _) = normalize(
            1,
            4,
            1,
            20,
            &behavior,
            &mut history,
            start + Duration::from_secs(400),
        );
        assert_eq!(r, 1);
        // Clamped to max, and said so.
        let mut history = History::default();
        let (r, reason, _) = normalize(3, 2, 1, 2, &behavior, &mut history, start);
        assert_eq!((r, reason), (2, "TooManyReplicas"));
        // A zero window and no policy limit: straight down.
        let quick: HorizontalPodAutoscalerBehavior = serde_json::from_value(json!({
            "scaleDown": {"stabilizationWindowSeconds": 0}
        }))
        .unwrap();
        let (r, _, _) = normalize(
            1,
            5,
            1,
            10,
            &Behavior::from_spec(Some(&quick)),
            &mut History::default(),
            start,
        );
        assert_eq!(r, 1);
    }
}
