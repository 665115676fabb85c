//! `apiVersion` + `kind` -> the API resource and its scope, by discovery, remembered: what the
//! hub's placement and the site's applier both ask for every object they handle.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::api::ApiResource;

/// A resource found by discovery, and whether it is namespaced.
pub type Resolved = (ApiResource, bool);

pub struct Resolver {
    client: kube::Client,
    found: Mutex<HashMap<(String, String), Resolved>>,
}

/// `group/version` (or `version` for the core group) split.
pub fn group_version(api_version: &str) -> (&str, &str) {
    api_version.split_once('/').unwrap_or(("", api_version))
}

impl Resolver {
    pub fn new(client: kube::Client) -> Resolver {
        Resolver {
            client,
            found: Mutex::default(),
        }
    }

    /// The resource serving `kind` in `api_version`, and whether it is namespaced (an unknown
    /// kind is asked again next time: its CRD may arrive).
    pub async fn resolve(&self, api_version: &str, kind: &str) -> Result<Resolved, kube::Error> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(found) = self
            .found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(found.clone());
        }
        let (group, version) = group_version(api_version);
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk).await?;
        let found = (resource, caps.scope == kube::discovery::Scope::Namespaced);
        self.found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, found.clone());
        Ok(found)
    }
}
