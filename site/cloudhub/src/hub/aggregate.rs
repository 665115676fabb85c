//! Site -> hub: what each site reports about the objects its Works placed goes into the
//! binding's `status.aggregatedStatus` (one entry per site), and the template's own status
//! becomes the sum over the sites, as Karmada's status aggregation does: `kubectl get deploy
//! web` at the hub shows 30/30 when ten sites each run 3 ready replicas.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::protocol::ObjectStatus;

/// Records `site`'s report for the binding `binding` (`<Kind>/<namespace>/<name>`).
pub async fn record(
    client: &kube::Client,
    site: &str,
    binding: &str,
    objects: &[ObjectStatus],
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
    // The template itself is the Work's first manifest; dependencies report too but only the
    // template's status is aggregated.
    let Some(object) = objects.first() else {
        return Ok(());
    };
    let entry = json!({
        "clusterName": site,
        "applied": object.applied,
        "appliedMessage": object.message,
        "health": object.health,
        "status": if object.status.is_null() { json!({}) } else { object.status.clone() },
    });
    // Read, replace this site's entry, write with the resourceVersion read (retry on conflict).
    for _ in 0..5 {
        let Some(mut current) = api.get_opt(name).await? else {
            return Ok(());
        };
        // A site's report counts only for a binding that places something on it.
        let placed_here = current.data["spec"]["clusters"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["name"] == site));
        if !placed_here {
            tracing::debug!(%site, %binding, "report for a binding not placed on the site ignored");
            return Ok(());
        }
        let mut entries: Vec<Value> = current.data["status"]["aggregatedStatus"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(e) = entries.iter_mut().find(|e| e["clusterName"] == site) {
            if *e == entry {
                return Ok(());
            }
            *e = entry.clone();
        } else {
            entries.push(entry.clone());
        }
        // Only the sites the binding still names.
        let named: Vec<&str> = current.data["spec"]["clusters"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default();
        entries.retain(|e| {
            e["clusterName"]
                .as_str()
                .is_some_and(|n| named.contains(&n))
        });
        entries.sort_by(|a, b| a["clusterName"].as_str().cmp(&b["clusterName"].as_str()));
        current.data["status"]["aggregatedStatus"] = json!(entries);
        let resource = current.data["spec"]["resource"].clone();
        match api
            .replace_status(name, &PostParams::default(), &current)
            .await
        {
            Ok(_) => {
                return template_status(client, &resource, &entries).await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
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
}
