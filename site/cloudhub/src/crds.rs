//! Karmada's resources as the hub serves them, installed at the hub's start (the YAML beside
//! this file is what `kubectl get crd -o yaml` shows).

use serde_json::Value;

pub const CLUSTER_GROUP: &str = "cluster.karmada.io";
pub const CLUSTER_VERSION: &str = "v1alpha1";

const CLUSTERS: &str = include_str!("crds/clusters.yaml");

/// The hub's CustomResourceDefinition objects.
pub fn definitions() -> Vec<Value> {
    [CLUSTERS]
        .iter()
        .map(|y| serde_yaml::from_str(y).expect("the embedded CRDs are valid YAML"))
        .collect()
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
