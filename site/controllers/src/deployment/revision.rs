//! Revisions of a Deployment: the `pod-template-hash` that names each ReplicaSet, finding the
//! ReplicaSet of the current template, revision numbers and the annotations kubectl reads
//! (`rollout history`, `rollout undo`). Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;

pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// Deployment annotations that are not copied to its ReplicaSets (upstream's list).
fn skip_copy(key: &str) -> bool {
    matches!(
        key,
        "kubectl.kubernetes.io/last-applied-configuration"
            | REVISION
            | REVISION_HISTORY
            | DESIRED_REPLICAS
            | MAX_REPLICAS
            | "deprecated.deployment.rollback.to"
    )
}

pub(crate) fn fnv32a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Upstream's `rand.SafeEncodeString`: digits become consonants and digits without vowels, so
/// a hash never spells a word.
pub(crate) fn safe_encode(s: &str) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    s.bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// The `pod-template-hash` of a template: stable for equal templates, changed by `collisions`.
pub fn template_hash(template: &PodTemplateSpec, collisions: Option<i32>) -> String {
    let mut t = template.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    let mut bytes = serde_json::to_vec(&t).unwrap_or_default();
    if let Some(c) = collisions {
        bytes.extend_from_slice(&c.to_le_bytes());
    }
    safe_encode(&fnv32a(&bytes).to_string())
}

/// Whether two templates are equal apart from the hash label.
pub fn equal_ignoring_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    let strip = |t: &PodTemplateSpec| {
        let mut t = t.clone();
        if let Some(m) = t.metadata.as_mut()
            && let Some(labels) = m.labels.as_mut()
        {
            labels.remove(HASH_LABEL);
            if labels.is_empty() {
                m.labels = None;
            }
        }
        t
    };
    strip(a) == strip(b)
}

pub fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

pub fn max_revision<'a>(sets: impl IntoIterator<Item = &'a ReplicaSet>) -> i64 {
    sets.into_iter().map(revision).max().unwrap_or(0)
}

/// The annotations a ReplicaSet of `d` should carry: the Deployment's own (minus upstream's
/// skip list), plus revision bookkeeping and the replica counts used for proportional scaling.
pub fn replica_set_annotations(
    d: &Deployment,
    current: Option<&BTreeMap<String, String>>,
    new_revision: i64,
    max_surge: i32,
) -> BTreeMap<String, String> {
    let mut out = current.cloned().unwrap_or_default();
    for (k, v) in d.metadata.annotations.iter().flatten() {
        if !skip_copy(k) {
            out.insert(k.clone(), v.clone());
        }
    }
    let old: i64 = out.get(REVISION).and_then(|r| r.parse().ok()).unwrap_or(0);
    if old < new_revision {
        if old > 0 {
            // A rollback re-uses an old ReplicaSet: remember the revisions it had.
            let mut history: Vec<String> = out
                .get(REVISION_HISTORY)
                .map(|h| {
                    h.split(',')
                        .map(str::to_string)
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            history.push(old.to_string());
            out.insert(REVISION_HISTORY.into(), history.join(","));
        }
        out.insert(REVISION.into(), new_revision.to_string());
    }
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    out.insert(DESIRED_REPLICAS.into(), replicas.to_string());
    out.insert(MAX_REPLICAS.into(), (replicas + max_surge).to_string());
    out
}

/// The ReplicaSet running `d`'s current template (the oldest, if several do).
pub fn find_new<'a>(
    d: &Deployment,
    sets: &'a [std::sync::Arc<ReplicaSet>],
) -> Option<&'a std::sync::Arc<ReplicaSet>> {
    let template = &d.spec.as_ref()?.template;
    let mut matching: Vec<&std::sync::Arc<ReplicaSet>> = sets
        .iter()
        .filter(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| equal_ignoring_hash(t, template))
        })
        .collect();
    matching.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    matching.first().copied()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template(image: &str, hash: Option<&str>) -> PodTemplateSpec {
        let mut labels = json!({"app": "web"});
        if let Some(h) = hash {
            labels[HASH_LABEL] = json!(h);
        }
        serde_json::from_value(json!({"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": image}]}})).unwrap()
    }

    #[test]
    fn hashes_are_stable_safe_and_ignore_the_hash_label() {
        let a = template("nginx:1", None);
        let h = template_hash(&a, None);
        assert_eq!(h, template_hash(&template("nginx:1", Some("xyz")), None));
        assert_ne!(h, template_hash(&template("nginx:2", None), None));
        assert_ne!(
            h,
            template_hash(&a, Some(1)),
            "a collision changes the hash"
        );
        assert!(
            h.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)),
            "{h}"
        );
        assert!(equal_ignoring_hash(&a, &template("nginx:1", Some(&h))));
        assert!(!equal_ignoring_hash(&a, &template("nginx:2", Some(&h))));
    }

    #[test]
    fn rollback_keeps_revision_history() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web", "annotations": {"kubernetes.io/change-cause": "v1", "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"replicas": 3, "selector": {}, "template": {}}
        }))
        .unwrap();
        let first = replica_set_annotations(&d, None, 1, 1);
        assert_eq!(first[REVISION], "1");
        assert_eq!(first["kubernetes.io/change-cause"], "v1");
        assert_eq!(first[MAX_REPLICAS], "4");
        assert!(!first.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        let again = replica_set_annotations(&d, Some(&first), 3, 1);
        assert_eq!(again[REVISION], "3");
        assert_eq!(again[REVISION_HISTORY], "1");
    }
}
