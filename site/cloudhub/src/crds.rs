//! Karmada's resources as the hub serves them, installed at the hub's start (the YAML beside
//! this file is what `kubectl get crd -o yaml` shows).

use serde_json::Value;

pub const CLUSTER_GROUP: &str = "cluster.karmada.io";
pub const CLUSTER_VERSION: &str = "v1alpha1";

const CLUSTERS: &str = include_str!("crds/clusters.yaml");
const PROPAGATION_POLICIES: &str = include_str!("crds/propagationpolicies.yaml");
const CLUSTER_PROPAGATION_POLICIES: &str = include_str!("crds/clusterpropagationpolicies.yaml");
const RESOURCE_BINDINGS: &str = include_str!("crds/resourcebindings.yaml");
const CLUSTER_RESOURCE_BINDINGS: &str = include_str!("crds/clusterresourcebindings.yaml");
const WORKS: &str = include_str!("crds/works.yaml");
const OVERRIDE_POLICIES: &str = include_str!("crds/overridepolicies.yaml");
const CLUSTER_OVERRIDE_POLICIES: &str = include_str!("crds/clusteroverridepolicies.yaml");

/// The hub's CustomResourceDefinition objects.
pub fn definitions() -> Vec<Value> {
    controllers::crds::parse(&[
        CLUSTERS,
        PROPAGATION_POLICIES,
        CLUSTER_PROPAGATION_POLICIES,
        RESOURCE_BINDINGS,
        CLUSTER_RESOURCE_BINDINGS,
        WORKS,
        OVERRIDE_POLICIES,
        CLUSTER_OVERRIDE_POLICIES,
    ])
}

/// `cluster.karmada.io/v1alpha1` Cluster for dynamic clients.
pub fn cluster_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: CLUSTER_GROUP.into(),
        version: CLUSTER_VERSION.into(),
        api_version: format!("{CLUSTER_GROUP}/{CLUSTER_VERSION}"),
        kind: "Cluster".into(),
        plural: "clusters".into(),
    }
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn propagation_policy() -> kube::api::ApiResource {
    resource(
        "policy.karmada.io",
        "v1alpha1",
        "PropagationPolicy",
        "propagationpolicies",
    )
}

pub fn cluster_propagation_policy() -> kube::api::ApiResource {
    resource(
        "policy.karmada.io",
        "v1alpha1",
        "ClusterPropagationPolicy",
        "clusterpropagationpolicies",
    )
}

pub fn override_policy() -> kube::api::ApiResource {
    resource(
        "policy.karmada.io",
        "v1alpha1",
        "OverridePolicy",
        "overridepolicies",
    )
}

pub fn cluster_override_policy() -> kube::api::ApiResource {
    resource(
        "policy.karmada.io",
        "v1alpha1",
        "ClusterOverridePolicy",
        "clusteroverridepolicies",
    )
}

pub fn resource_binding() -> kube::api::ApiResource {
    resource(
        "work.karmada.io",
        "v1alpha2",
        "ResourceBinding",
        "resourcebindings",
    )
}

pub fn cluster_resource_binding() -> kube::api::ApiResource {
    resource(
        "work.karmada.io",
        "v1alpha2",
        "ClusterResourceBinding",
        "clusterresourcebindings",
    )
}

pub fn work() -> kube::api::ApiResource {
    resource("work.karmada.io", "v1alpha1", "Work", "works")
}

/// Creates the hub's CRDs, or brings them up to date.
pub async fn install(client: &kube::Client) -> Result<(), kube::Error> {
    controllers::crds::install(client, definitions()).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn definitions_parse() {
        let d = super::definitions();
        assert_eq!(d[0]["spec"]["names"]["kind"], "Cluster");
        assert_eq!(d[0]["spec"]["scope"], "Cluster");
    }
}
