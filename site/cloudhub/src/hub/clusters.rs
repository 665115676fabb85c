//! One Karmada `Cluster` per site, and its status: what the site reports on its status stream,
//! plus a `Ready` condition the hub decides (True while the site is heard from; Unknown once it
//! has been silent for [`READY_GRACE`]). The Cluster is written only when something in it
//! changes, not per heartbeat, so a thousand idle sites cost the datastore nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::protocol::{READY_GRACE, STATUS_PATH, StatusMessage};

/// The longest status line a site may send.
const MAX_LINE: usize = 1024 * 1024;

/// What the hub remembers of each site between writes.
#[derive(Default)]
struct Known {
    heard: Option<Instant>,
    /// The Ready condition's status last written.
    ready: Option<String>,
    /// A hash of the status last written, without conditions (the status itself, with its
    /// `apiEnablements`, is kilobytes per site; the hub keeps it only in the datastore).
    status: Option<u64>,
}

pub struct Clusters {
    aggregator: Arc<super::aggregate::Aggregator>,
    api: Api<DynamicObject>,
    known: Mutex<HashMap<String, Known>>,
}

fn condition(status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}

impl Clusters {
    pub fn new(client: kube::Client, aggregator: Arc<super::aggregate::Aggregator>) -> Clusters {
        Clusters {
            api: Api::all_with(client.clone(), &crate::crds::cluster_resource()),
            aggregator,
            known: Mutex::default(),
        }
    }

    /// Creates `site`'s Cluster on its first link (Pull mode, the site's labels); an existing
    /// one keeps the labels the hub's users gave it.
    pub async fn ensure(
        &self,
        site: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), kube::Error> {
        if self.api.get_opt(site).await?.is_some() {
            return Ok(());
        }
        let cluster: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cluster.karmada.io/v1alpha1",
            "kind": "Cluster",
            "metadata": {"name": site, "labels": labels},
            "spec": {"syncMode": "Pull"},
        }))
        .map_err(kube::Error::SerdeError)?;
        match self.api.create(&PostParams::default(), &cluster).await {
            Ok(_) => {
                // A new Cluster has no status yet, whatever was written to an earlier one of
                // this name.
                self.known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(site);
                tracing::info!(%site, "Cluster created for a new site");
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads `site`'s status stream until it ends, keeping its Cluster's status current.
    pub async fn follow_status(self: Arc<Self>, site: String, peer: link::accept::Peer<Body>) {
        let request = http::Request::get(STATUS_PATH)
            .body(Body::empty())
            .unwrap_or_default();
        let response = match peer.call(request).await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                tracing::warn!(%site, status = %r.status(), "site refused its status stream");
                return;
            }
            Err(error) => {
                tracing::warn!(%site, %error, "site status stream");
                return;
            }
        };
        let mut body = Body::new(response.into_body()).into_data_stream();
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                match serde_json::from_slice::<StatusMessage>(&line) {
                    Ok(message) => self.heard(&site, message).await,
                    Err(error) => {
                        tracing::warn!(%site, %error, "site sent a bad status line; closing");
                        return;
                    }
                }
            }
            if buffer.len() > MAX_LINE {
                tracing::warn!(%site, "site sent a status line over 1 MiB; closing");
                return;
            }
        }
    }

    async fn heard(&self, site: &str, message: StatusMessage) {
        if let StatusMessage::Work {
            binding, objects, ..
        } = &message
        {
            self.aggregator.report(site, binding, objects);
        }
        let (status, ready) = {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            let entry = known.entry(site.to_string()).or_default();
            entry.heard = Some(Instant::now());
            let status = match message {
                StatusMessage::Cluster { status } => {
                    let hash = crate::changes::hash_of(&status);
                    (entry.status != Some(hash)).then_some((status, hash))
                }
                _ => None,
            };
            let ready = entry.ready.as_deref() != Some("True");
            (status, ready)
        };
        if status.is_none() && !ready {
            return;
        }
        let mut patch = json!({"status": {}});
        if let Some((status, _)) = &status {
            patch["status"] = status.clone();
        }
        if ready {
            patch["status"]["conditions"] = json!([condition(
                "True",
                "ClusterReady",
                "cluster is healthy and ready to accept workloads"
            )]);
        }
        match self
            .api
            .patch_status(site, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                let entry = known.entry(site.to_string()).or_default();
                if let Some((_, hash)) = status {
                    entry.status = Some(hash);
                }
                if ready {
                    entry.ready = Some("True".into());
                    tracing::info!(%site, "site is Ready");
                }
            }
            Err(error) => tracing::warn!(%site, %error, "Cluster status not written"),
        }
    }

    /// Marks sites silent for [`READY_GRACE`] as Ready Unknown, until `shutdown`. Sites Ready
    /// when the hub starts get the grace from the start.
    pub async fn watch_readiness(self: Arc<Self>, shutdown: CancellationToken) {
        let started = Instant::now();
        match self.api.list(&Default::default()).await {
            Ok(list) => {
                let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                for cluster in list {
                    let Some(name) = cluster.metadata.name.clone() else {
                        continue;
                    };
                    let ready = cluster.data["status"]["conditions"]
                        .as_array()
                        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                        .and_then(|c| c["status"].as_str())
                        .map(str::to_string);
                    let entry = known.entry(name).or_default();
                    entry.ready = ready;
                    // The status a site sends again after the hub restarts is written once.
                }
            }
            Err(error) => tracing::warn!(%error, "list Clusters at start"),
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let silent: Vec<String> = {
                let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                known
                    .iter()
                    .filter(|(_, k)| k.ready.as_deref() == Some("True"))
                    .filter(|(_, k)| k.heard.unwrap_or(started).elapsed() >= READY_GRACE)
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            for site in silent {
                let patch = json!({"status": {"conditions": [condition(
                    "Unknown",
                    "ClusterStatusUnknown",
                    &format!(
                        "the site has not been heard from for {} s: its link is down",
                        READY_GRACE.as_secs()
                    ),
                )]}});
                match self
                    .api
                    .patch_status(&site, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::warn!(%site, "site not heard from: Ready Unknown");
                        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(entry) = known.get_mut(&site) {
                            entry.ready = Some("Unknown".into());
                        }
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        self.known
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&site);
                    }
                    Err(error) => tracing::warn!(%site, %error, "Cluster status not written"),
                }
            }
        }
    }
}
