//! The `devices.kubeedge.io/v1beta1` CustomResourceDefinitions, as `edgesite server` installs them
//! at start (the YAML beside this file is what `kubectl get crd -o yaml` shows).

use serde_json::Value;

pub const GROUP: &str = "devices.kubeedge.io";
pub const VERSION: &str = "v1beta1";

const DEVICES: &str = include_str!("crds/devices.yaml");
const DEVICE_MODELS: &str = include_str!("crds/devicemodels.yaml");

/// Device and DeviceModel, as CustomResourceDefinition objects.
pub fn definitions() -> Vec<Value> {
    controllers::crds::parse(&[DEVICE_MODELS, DEVICES])
}

/// Creates the CRDs, or brings them up to date (an upgrade that changed their schema).
pub async fn install(client: &kube::Client) -> Result<(), kube::Error> {
    controllers::crds::install(client, definitions()).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn definitions_parse() {
        let d = super::definitions();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1]["metadata"]["name"], "devices.devices.kubeedge.io");
        assert_eq!(
            d[1]["spec"]["versions"][0]["selectableFields"][0]["jsonPath"],
            ".spec.nodeName"
        );
    }
}
