//! One Karmada `Cluster` per site, and its status: what the site reports on its status stream,
//! plus a `Ready` condition the hub decides (True once the site speaks on a link; Unknown once
//! no live hub server has held its link for [`READY_GRACE`]). The Cluster is written only when something in it
//! changes, not per heartbeat, so a thousand idle sites cost the datastore nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
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

    /// Forgets what this server last wrote of `site`'s Ready condition: the next status the
    /// site sends marks it Ready.
    pub fn forget_ready(&self, site: &str) {
        if let Some(entry) = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(site)
        {
            entry.ready = None;
        }
    }

    /// Marks Ready Unknown the sites whose links no live hub server has held for
    /// [`READY_GRACE`], until `shutdown` (the leading server runs this). Sites unlinked when
    /// this server starts leading get the grace from then.
    pub async fn watch_readiness(
        self: Arc<Self>,
        links: super::links::Links,
        sites: Arc<super::sites::Sites>,
        shutdown: CancellationToken,
    ) {
        let mut unlinked: HashMap<String, Instant> = HashMap::new();
        let mut handled: HashSet<String> = HashSet::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(all) = sites.snapshot() else {
                continue;
            };
            let linked = match links.linked().await {
                Ok(linked) => linked,
                Err(error) => {
                    tracing::warn!(%error, "read the site link records");
                    continue;
                }
            };
            let names: HashSet<String> = all.into_iter().map(|s| s.name).collect();
            unlinked.retain(|site, _| names.contains(site));
            handled.retain(|site| names.contains(site));
            let now = Instant::now();
            for site in names {
                if linked.contains_key(&site) {
                    unlinked.remove(&site);
                    handled.remove(&site);
                    continue;
                }
                let since = *unlinked.entry(site.clone()).or_insert(now);
                if now.duration_since(since) < READY_GRACE || handled.contains(&site) {
                    continue;
                }
                if self.mark_unknown(&site).await {
                    handled.insert(site);
                }
            }
        }
    }

    /// Sets `site`'s Ready condition to Unknown unless it is not True already; true when done.
    async fn mark_unknown(&self, site: &str) -> bool {
        let ready = match self.api.get_opt(site).await {
            Ok(Some(cluster)) => cluster.data["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c["status"].as_str())
                .map(str::to_string),
            Ok(None) => return true,
            Err(error) => {
                tracing::warn!(%site, %error, "read the Cluster");
                return false;
            }
        };
        if ready.as_deref() != Some("True") {
            return true;
        }
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
            .patch_status(site, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::warn!(%site, "site not heard from: Ready Unknown");
                if let Some(entry) = self
                    .known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(site)
                {
                    entry.ready = Some("Unknown".into());
                }
                true
            }
            Err(kube::Error::Api(e)) if e.code == 404 => true,
            Err(error) => {
                tracing::warn!(%site, %error, "Cluster status not written");
                false
            }
        }
    }
}
