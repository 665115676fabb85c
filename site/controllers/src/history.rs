//! ControllerRevisions for DaemonSets and StatefulSets: one per distinct pod template, named
//! `<owner>-<hash>`, numbered in order of use (what `kubectl rollout history` and `rollout
//! undo` read for these kinds).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use serde_json::json;

use crate::deployment::revision::{fnv32a, safe_encode};
use crate::pods;

pub const HASH_LABEL: &str = "controller-revision-hash";

/// The hash naming a template's revision.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let mut t = template.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    safe_encode(&fnv32a(&serde_json::to_vec(&t).unwrap_or_default()).to_string())
}

/// The revisions `owner` controls, oldest first.
pub fn owned<K: Resource<DynamicType = ()>>(
    store: &Store<ControllerRevision>,
    owner: &K,
) -> Vec<Arc<ControllerRevision>> {
    let uid = owner.meta().uid.clone().unwrap_or_default();
    let ns = owner.meta().namespace.clone();
    let mut out = store.state_filter(|r| {
        r.metadata.namespace == ns && pods::controller_uid(&r.metadata) == Some(uid.as_str())
    });
    out.sort_by_key(|r| r.revision);
    out
}

/// Makes sure the current template has a revision numbered above every other one; returns
/// (hash, revision number). Keeps at most `limit` old revisions.
pub async fn ensure<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
    store: &Store<ControllerRevision>,
    owner: &K,
    template: &PodTemplateSpec,
    limit: usize,
    in_use: &[String],
) -> Result<(String, i64), kube::Error> {
    let hash = template_hash(template);
    let namespace = owner.meta().namespace.clone().unwrap_or_default();
    let owner_name = owner.meta().name.clone().unwrap_or_default();
    let name = format!("{owner_name}-{hash}");
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &namespace);
    let revisions = owned(store, owner);
    let max = revisions.iter().map(|r| r.revision).max().unwrap_or(0);
    let revision = match revisions
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(&name))
    {
        Some(r) if r.revision == max => r.revision,
        Some(_) => {
            // An old template came back (rollout undo): it becomes the newest revision.
            let patch = json!({"revision": max + 1});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            max + 1
        }
        None => {
            let mut labels = template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            labels.insert(HASH_LABEL.into(), hash.clone());
            let mut data_template = serde_json::to_value(template).unwrap_or_default();
            data_template["$patch"] = json!("replace");
            let cr = ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some(labels),
                    owner_references: Some(vec![pods::controller_reference(owner)]),
                    ..Default::default()
                },
                data: Some(RawExtension(json!({"spec": {"template": data_template}}))),
                revision: max + 1,
            };
            match api.create(&PostParams::default(), &cr).await {
                Ok(_) => max + 1,
                Err(kube::Error::Api(s)) if s.code == 409 => max + 1,
                Err(e) => return Err(e),
            }
        }
    };
    // History limit: drop the oldest revisions no pod uses.
    let old: Vec<&Arc<ControllerRevision>> = revisions
        .iter()
        .filter(|r| r.metadata.name.as_deref() != Some(&name))
        .filter(|r| {
            !in_use
                .iter()
                .any(|h| r.metadata.name.as_deref() == Some(&format!("{owner_name}-{h}")))
        })
        .collect();
    for r in old.iter().take(old.len().saturating_sub(limit)) {
        let _ = api
            .delete(
                r.metadata.name.as_deref().unwrap_or(""),
                &DeleteParams::default(),
            )
            .await;
    }
    Ok((hash, revision))
}
