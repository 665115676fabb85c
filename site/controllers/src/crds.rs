//! The server's own CustomResourceDefinitions (KubeEdge's devices on every site, Karmada's
//! resources on a cloud hub), installed at start.

use serde_json::Value;

/// CustomResourceDefinition objects from YAML embedded in the binary.
pub fn parse(documents: &[&str]) -> Vec<Value> {
    documents
        .iter()
        .map(|y| serde_yaml::from_str(y).expect("the embedded CRDs are valid YAML"))
        .collect()
}

/// Creates `definitions` (CustomResourceDefinition objects), or brings them up to date (an
/// upgrade that changed their spec).
pub async fn install(client: &kube::Client, definitions: Vec<Value>) -> Result<(), kube::Error> {
    use kube::api::{Api, ApiResource, DynamicObject, PostParams};
    let resource = ApiResource {
        group: "apiextensions.k8s.io".into(),
        version: "v1".into(),
        api_version: "apiextensions.k8s.io/v1".into(),
        kind: "CustomResourceDefinition".into(),
        plural: "customresourcedefinitions".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    for definition in definitions {
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
