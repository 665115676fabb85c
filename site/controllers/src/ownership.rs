//! Adopting and releasing dependents by label selector (upstream's `ControllerRefManager`):
//! a ReplicaSet adopts matching orphan pods, a Deployment matching orphan ReplicaSets, and both
//! let go of dependents whose labels stop matching.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::pods::{controller_reference, controller_uid};

/// Adopts the orphans `selector` matches and releases owned objects it no longer matches;
/// returns the objects `owner` controls afterwards.
pub async fn claim<K, C>(
    client: &kube::Client,
    owner: &K,
    selector: &Selector,
    candidates: Vec<Arc<C>>,
) -> Result<Vec<Arc<C>>, kube::Error>
where
    K: Resource<DynamicType = ()>,
    C: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let owner_uid = owner.meta().uid.clone().unwrap_or_default();
    let owner_deleting = owner.meta().deletion_timestamp.is_some();
    let namespace = owner.meta().namespace.clone().unwrap_or_default();
    let api: Api<C> = Api::namespaced(client.clone(), &namespace);
    let mut owned = Vec::new();
    for child in candidates {
        let labels: &BTreeMap<String, String> = child
            .meta()
            .labels
            .as_ref()
            .unwrap_or(const { &BTreeMap::new() });
        let matches = selector.matches(labels);
        let name = child.meta().name.clone().unwrap_or_default();
        let child_uid = child.meta().uid.clone().unwrap_or_default();
        match controller_uid(child.meta()) {
            Some(uid) if uid == owner_uid => {
                if matches || owner_deleting {
                    owned.push(child);
                    continue;
                }
                let patch = json!({"metadata": {"ownerReferences": [{"$patch": "delete", "uid": owner_uid}], "uid": child_uid}});
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 422 || s.code == 409 => {
                    }
                    Err(e) => return Err(e),
                }
            }
            Some(_) => {}
            None => {
                if !matches || owner_deleting || child.meta().deletion_timestamp.is_some() {
                    continue;
                }
                let reference = controller_reference(owner);
                let patch = json!({"metadata": {"ownerReferences": [reference], "uid": child_uid}});
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                    .await
                {
                    Ok(adopted) => owned.push(Arc::new(adopted)),
                    // Gone, or changed under us (the uid precondition): the next pass sees it.
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 422 || s.code == 409 => {
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(owned)
}
