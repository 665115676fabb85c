//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does:
//! whoever holds an unexpired lease leads and renews it; others wait and take it over once it
//! has not been renewed for `lease_duration`. Updates carry the lease's resourceVersion, so two
//! candidates can never both win. A leader that cannot renew within `renew_deadline` steps
//! down, so two servers on a shared datastore never run the same loops at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity (host name and a random suffix).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Config {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Config {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether `lease` is free for `identity` at `now`: unheld, expired, or already ours.
pub fn available(lease: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = lease.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = i64::from(lease.lease_duration_seconds.unwrap_or(15));
    let renewed = lease
        .renew_time
        .as_ref()
        .or(lease.acquire_time.as_ref())
        .map(|t| t.0.as_millisecond())
        .unwrap_or(0);
    renewed + duration * 1000 <= now.as_millisecond()
}

/// Tries once to take or renew the lease; true when we hold it now.
pub async fn try_acquire(api: &Api<Lease>, config: &Config) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let seconds = config.lease_duration.as_secs().max(1) as i32;
    match api.get_opt(&config.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if !available(spec, &config.identity, now) {
                return Ok(false);
            }
            if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
                spec.holder_identity = Some(config.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(seconds);
            // The resourceVersion from the read makes this a compare-and-swap.
            match api
                .replace(&config.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this candidate leads (or `shutdown`); returns a token cancelled when it stops
/// leading (renewal failed past the deadline, or `shutdown`). Renewal runs in the background.
/// Runs `work` whenever this candidate leads, until `shutdown`: `work` gets a token that is
/// cancelled when leadership is lost (it must return then); the lease is released when the
/// process stops.
pub async fn while_leading<F, Fut>(
    client: kube::Client,
    config: Config,
    shutdown: CancellationToken,
    mut work: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let Some(leading) = lead(client.clone(), config.clone(), shutdown.clone()).await else {
            return;
        };
        work(leading.clone()).await;
        leading.cancel();
        if shutdown.is_cancelled() {
            release(client.clone(), &config).await;
            return;
        }
        tracing::info!(lease = %config.name, "no longer leading; waiting to lead again");
    }
}

pub async fn lead(
    client: kube::Client,
    config: Config,
    shutdown: CancellationToken,
) -> Option<CancellationToken> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    loop {
        match try_acquire(&api, &config).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(lease = %config.name, error = %e, "leader election attempt failed")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(jitter(config.retry_period)) => {}
        }
    }
    tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, "became leader");
    let leading = shutdown.child_token();
    let token = leading.clone();
    tokio::spawn(async move {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(config.retry_period) => {}
            }
            match try_acquire(&api, &config).await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!(lease = %config.name, "leadership lost to another server; stopping the control loops");
                    token.cancel();
                    return;
                }
                Err(e) => tracing::debug!(lease = %config.name, error = %e, "lease renewal failed"),
            }
            if last_renewal.elapsed() > config.renew_deadline {
                tracing::warn!(lease = %config.name, "could not renew the lease in time; stopping the control loops");
                token.cancel();
                return;
            }
        }
    });
    Some(leading)
}

/// Gives the lease up (on a clean shutdown), so another server need not wait for it to expire.
pub async fn release(client: kube::Client, config: &Config) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&config.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if let Err(e) = api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        tracing::debug!(lease = %config.name, error = %e, "could not release the lease");
    }
}

/// Up to 20 % more, so candidates do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_free_when_unheld_ours_or_expired() {
        let now = Timestamp::from_second(1_000).unwrap();
        let held = |by: &str, renewed: i64| LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        };
        assert!(available(&LeaseSpec::default(), "a", now));
        assert!(available(&held("a", 999), "a", now));
        assert!(!available(&held("b", 990), "a", now));
        assert!(
            available(&held("b", 985), "a", now),
            "expired exactly at 15 s"
        );
    }
}
