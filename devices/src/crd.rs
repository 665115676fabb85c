//! The `devices.kubeedge.io/v1beta1` CustomResourceDefinitions, as `edgesite server` installs them
//! at start (the YAML beside this file is what `kubectl get crd -o yaml` shows).

use serde_json::Value;

pub const GROUP: &str = "devices.kubeedge.io";
pub const VERSION: &str = "v1beta1";

const DEVICES: &str = include_str!("crds/devices.yaml");
const DEVICE_MODELS: &str = include_str!("crds/devicemodels.yaml");

/// Device and DeviceModel, as CustomResourceDefinition objects.
pub fn definitions() -> Vec<Value> {
    [DEVICE_MODELS, DEVICES]
        .iter()
        .map(|y| serde_yaml::from_str(y).expect("the embedded CRDs are valid YAML"))
        .collect()
}

/// Creates the CRDs, or brings them up to date (an upgrade that changed their schema).
pub async fn install(client: &kube::Client) -> Result<(), kube::Error> {
    use kube::api::{Api, ApiResource, DynamicObject, PostParams};
    let resource = ApiResource {
        group: "apiextensions.k8s.io".into(),
        version: "v1".into(),
        api_version: "apiextensions.k8s.io/v1".into(),
        kind: "CustomResourceDefinition".into(),
        plural: "customresourcedefinitions".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    for definition in definitions() {
        let name = definition["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let wanted: DynamicObject =
            serde_json::from_value(definition).map_err(kube::Error::SerdeError)?;
        match api.get_opt(&name).await? {
            None => {
                api.create(&PostParams::default(), &wanted).await?;
                tracing::info!(crd = %name, "installed");
            }
            Some(current) if current.data.get("spec") != wanted.data.get("spec") => {
                let mut next = wanted.clone();
                next.metadata.resource_version = current.metadata.resource_version.clone();
                api.replace(&name, &PostParams::default(), &next).await?;
                tracing::info!(crd = %name, "updated");
            }
            Some(_) => {}
        }
    }
    Ok(())
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
