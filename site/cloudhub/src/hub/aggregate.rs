//! Site -> hub: what each site reports about the objects its Works placed goes into the
//! binding's `status.aggregatedStatus` (one entry per site), and the template's own status
//! becomes the sum over the sites, as Karmada's status aggregation does: `kubectl get deploy
//! web` at the hub shows 30/30 when ten sites each run 3 ready replicas.

//!
//! Reports are coalesced: each site's latest report per binding waits in memory, and one writer
//! ([`Aggregator::run`]) writes each binding that changed once with all the sites' reports that
//! arrived meanwhile, so a hundred sites reporting at once cost a few writes and none is lost to a
//! conflict.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::protocol::ObjectStatus;

/// Binding id (`<Kind>/<namespace>/<name>`) -> site -> its entry.
type Pending = HashMap<String, HashMap<String, Value>>;

pub struct Aggregator {
    client: kube::Client,
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
}

impl Aggregator {
    pub fn new(client: kube::Client) -> Arc<Aggregator> {
        Arc::new(Aggregator {
            client,
            pending: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Takes `site`'s report for the binding `binding`; written soon.
    pub fn report(&self, site: &str, binding: &str, objects: &[ObjectStatus]) {
        // The template itself is the Work's first manifest; dependencies report too but only
        // the template's status is aggregated.
        let Some(object) = objects.first() else {
            return;
        };
        let entry = json!({
            "clusterName": site,
            "applied": object.applied,
            "appliedMessage": object.message,
            "health": object.health,
            "status": if object.status.is_null() { json!({}) } else { object.status.clone() },
        });
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(binding.to_string())
            .or_default()
            .insert(site.to_string(), entry);
        self.wake.notify_one();
    }

    /// Writes what the sites reported until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            // Let the reports of a burst gather.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let batch =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            for (binding, entries) in batch {
                if let Err(error) = record(&self.client, &binding, &entries).await {
                    tracing::warn!(%binding, %error, "sites' reports not written yet; retrying");
                    // Back in line, unless a newer report of the site is already waiting.
                    {
                        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                        let waiting = pending.entry(binding).or_default();
                        for (site, entry) in entries {
                            waiting.entry(site).or_insert(entry);
                        }
                    }
                    self.wake.notify_one();
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Writes `entries` (site -> entry) into the binding `binding` (`<Kind>/<namespace>/<name>`),
/// then the template's status.
async fn record(
    client: &kube::Client,
    binding: &str,
    reports: &HashMap<String, Value>,
) -> Result<(), kube::Error> {
    let mut parts = binding.splitn(3, '/');
    let (kind, namespace, name) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let api: Api<DynamicObject> = match kind {
        "ResourceBinding" => {
            Api::namespaced_with(client.clone(), namespace, &crate::crds::resource_binding())
        }
        "ClusterResourceBinding" => {
            Api::all_with(client.clone(), &crate::crds::cluster_resource_binding())
        }
        _ => return Ok(()),
    };
    loop {
        let Some(mut current) = api.get_opt(name).await? else {
            return Ok(());
        };
        // A site's report counts only for a binding that places something on it.
        let named: Vec<String> = current.data["spec"]["clusters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut entries: Vec<Value> = current.data["status"]["aggregatedStatus"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let before = entries.clone();
        for (site, entry) in reports {
            if !named.contains(site) {
                tracing::debug!(%site, %binding, "report for a binding not placed on the site ignored");
                continue;
            }
            match entries
                .iter_mut()
                .find(|e| e["clusterName"] == site.as_str())
            {
                Some(e) => *e = entry.clone(),
                None => entries.push(entry.clone()),
            }
        }
        entries.retain(|e| {
            e["clusterName"]
                .as_str()
                .is_some_and(|n| named.iter().any(|m| m == n))
        });
        entries.sort_by(|a, b| a["clusterName"].as_str().cmp(&b["clusterName"].as_str()));
        if entries == before {
            return Ok(());
        }
        current.data["status"]["aggregatedStatus"] = json!(entries);
        let resource = current.data["spec"]["resource"].clone();
        match api
            .replace_status(name, &PostParams::default(), &current)
            .await
        {
            Ok(_) => return template_status(client, &resource, &entries).await,
            // The binding changed meanwhile (placement): read it again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
}

fn sum(entries: &[Value], field: &str) -> i64 {
    entries
        .iter()
        .filter_map(|e| e["status"][field].as_i64())
        .sum()
}

/// The template's status from its sites' (Karmada's default interpreter for the built-in
/// workloads; other kinds keep their own status).
pub fn aggregate(kind: &str, entries: &[Value], generation: Option<i64>) -> Option<Value> {
    let fields: &[&str] = match kind {
        "Deployment" => &[
            "replicas",
            "readyReplicas",
            "updatedReplicas",
            "availableReplicas",
            "unavailableReplicas",
        ],
        "StatefulSet" => &[
            "replicas",
            "readyReplicas",
            "currentReplicas",
            "updatedReplicas",
            "availableReplicas",
        ],
        "ReplicaSet" => &[
            "replicas",
            "readyReplicas",
            "availableReplicas",
            "fullyLabeledReplicas",
        ],
        "DaemonSet" => &[
            "currentNumberScheduled",
            "desiredNumberScheduled",
            "numberAvailable",
            "numberMisscheduled",
            "numberReady",
            "updatedNumberScheduled",
            "numberUnavailable",
        ],
        "Job" => &["active", "succeeded", "failed"],
        // A Service's load-balancer addresses: every site's, once each (Karmada's interpreter).
        "Service" => {
            let mut ingress: Vec<Value> = Vec::new();
            for entry in entries {
                for address in entry["status"]["loadBalancer"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if !ingress.contains(address) {
                        ingress.push(address.clone());
                    }
                }
            }
            return Some(if ingress.is_empty() {
                json!({"loadBalancer": {}})
            } else {
                json!({"loadBalancer": {"ingress": ingress}})
            });
        }
        // A device is at one site: its status is that site's (the twin's reported values).
        "Device" => {
            return match entries {
                [one] => Some(one["status"].clone()),
                [] => Some(json!({})),
                _ => None,
            };
        }
        _ => return None,
    };
    let mut status = serde_json::Map::new();
    for f in fields {
        status.insert(f.to_string(), json!(sum(entries, f)));
    }
    if let Some(g) = generation {
        status.insert("observedGeneration".into(), json!(g));
    }
    if kind == "Job" {
        let completions = entries
            .iter()
            .filter(|e| e["status"]["completionTime"].is_string())
            .count();
        if completions == entries.len() && !entries.is_empty() {
            let latest = entries
                .iter()
                .filter_map(|e| e["status"]["completionTime"].as_str())
                .max()
                .unwrap_or_default();
            status.insert("completionTime".into(), json!(latest));
        }
    }
    Some(Value::Object(status))
}

async fn template_status(
    client: &kube::Client,
    resource: &Value,
    entries: &[Value],
) -> Result<(), kube::Error> {
    let api_version = resource["apiVersion"].as_str().unwrap_or_default();
    let kind = resource["kind"].as_str().unwrap_or_default();
    let (group, version) = crate::resources::group_version(api_version);
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    if aggregate(kind, &[], None).is_none() && kind != "Device" {
        return Ok(());
    }
    let Ok((ar, _)) = kube::discovery::pinned_kind(client, &gvk).await else {
        return Ok(());
    };
    let api: Api<DynamicObject> = match resource["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let name = resource["name"].as_str().unwrap_or_default();
    let Some(template) = api.get_opt(name).await? else {
        return Ok(());
    };
    let Some(status) = aggregate(kind, entries, template.metadata.generation) else {
        return Ok(());
    };
    if template.data["status"] == status {
        return Ok(());
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": status})),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_sum_their_sites() {
        let entries: Vec<Value> = (0..10)
            .map(|i| {
                json!({"clusterName": format!("s{i}"), "status": {
                    "replicas": 3, "readyReplicas": 3, "updatedReplicas": 3, "availableReplicas": 3}})
            })
            .collect();
        let s = aggregate("Deployment", &entries, Some(2)).unwrap();
        assert_eq!(s["readyReplicas"], 30);
        assert_eq!(s["replicas"], 30);
        assert_eq!(s["observedGeneration"], 2);
        assert!(aggregate("ConfigMap", &entries, None).is_none());
        let one = [json!({"clusterName": "a", "status": {"twins": [{"propertyName": "speed"}]}})];
        assert_eq!(
            aggregate("Device", &one, None).unwrap()["twins"][0]["propertyName"],
            "speed"
        );
    }

    #[test]
    fn a_services_addresses_are_every_sites_once_each() {
        let entries = vec![
            json!({"clusterName": "a", "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}),
            json!({"clusterName": "b", "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.2"}, {"ip": "192.0.2.1"}]}}}),
            json!({"clusterName": "c", "status": {"loadBalancer": {}}}),
        ];
        assert_eq!(
            aggregate("Service", &entries, None),
            Some(json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}]}}))
        );
        assert_eq!(
            aggregate("Service", &entries[2..], None),
            Some(json!({"loadBalancer": {}}))
        );
    }
}
