//! What a site reports about itself, in Karmada's Cluster status fields: its Kubernetes
//! version, the APIs it serves, how many nodes it has and how many are Ready, and its resources
//! (allocatable on its nodes, allocated to scheduled pods, requested by pods still waiting).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use scheduler::framework::{Resources, pod_requests};

/// `apiEnablements`: every served group version and its resources (no subresources).
pub async fn api_enablements(client: &kube::Client) -> Result<Value, kube::Error> {
    let discovery = kube::Discovery::new(client.clone()).run().await?;
    let mut out: Vec<Value> = Vec::new();
    for group in discovery.groups() {
        for version in group.versions() {
            let mut resources: Vec<Value> = group
                .versioned_resources(version)
                .into_iter()
                .map(|(r, _)| json!({"name": r.plural, "kind": r.kind}))
                .collect();
            resources.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            let group_version = if group.name().is_empty() {
                version.to_string()
            } else {
                format!("{}/{version}", group.name())
            };
            out.push(json!({"groupVersion": group_version, "resources": resources}));
        }
    }
    out.sort_by(|a, b| a["groupVersion"].as_str().cmp(&b["groupVersion"].as_str()));
    Ok(Value::Array(out))
}

fn quantities(r: &Resources) -> Value {
    let mut out = BTreeMap::new();
    out.insert("cpu".to_string(), json!(cpu(r.milli_cpu)));
    out.insert("memory".to_string(), json!(r.memory.to_string()));
    out.insert("pods".to_string(), json!(r.pods.to_string()));
    if r.ephemeral_storage > 0 {
        out.insert(
            "ephemeral-storage".to_string(),
            json!(r.ephemeral_storage.to_string()),
        );
    }
    for (name, amount) in &r.scalar {
        out.insert(name.clone(), json!(amount.to_string()));
    }
    json!(out)
}

fn cpu(milli: i64) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `nodeSummary` and `resourceSummary` from the site's nodes and pods.
pub async fn summaries(client: &kube::Client) -> Result<(Value, Value), kube::Error> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut allocatable = Resources::default();
    let mut ready_nodes = 0;
    for node in &nodes {
        if ready(node) {
            ready_nodes += 1;
        }
        allocatable.add(&Resources::from_list(
            node.status.as_ref().and_then(|s| s.allocatable.as_ref()),
        ));
    }
    let mut allocated = Resources::default();
    let mut allocating = Resources::default();
    for pod in &pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let mut requests = pod_requests(pod);
        requests.pods = 1;
        let scheduled = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| !n.is_empty());
        if scheduled {
            allocated.add(&requests);
        } else {
            allocating.add(&requests);
        }
    }
    Ok((
        json!({"totalNum": nodes.items.len(), "readyNum": ready_nodes}),
        json!({
            "allocatable": quantities(&allocatable),
            "allocating": quantities(&allocating),
            "allocated": quantities(&allocated),
        }),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_prints_whole_cores_without_a_suffix() {
        assert_eq!(super::cpu(2000), "2");
        assert_eq!(super::cpu(1500), "1500m");
    }
}
