//! The bootstrap policy (`bootstrap-policy.yaml`): upstream's default ClusterRoles and
//! ClusterRoleBindings plus EdgeSite's, as objects, and how a start reconciles them with what is
//! stored (upstream's `reconcile` of `rbac/bootstrappolicy`). Pure: the server's start-up writes
//! what [`reconcile`] answers.

use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Value, json};

use super::rbac::{GROUP, PolicyRule};

/// Objects that carry this annotation set to `"false"` are left as they are.
pub const AUTOUPDATE: &str = "rbac.authorization.kubernetes.io/autoupdate";

const SOURCE: &str = include_str!("bootstrap-policy.yaml");

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    cluster_roles: Vec<RoleSpec>,
    cluster_role_bindings: Vec<BindingSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoleSpec {
    name: String,
    #[serde(default)]
    labels: serde_json::Map<String, Value>,
    #[serde(default)]
    rules: Vec<PolicyRule>,
    #[serde(default)]
    aggregation_rule: Option<Value>,
}

#[derive(Deserialize)]
struct BindingSpec {
    name: String,
    role: String,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    /// `namespace/name`
    #[serde(default, rename = "serviceAccounts")]
    service_accounts: Vec<String>,
}

/// The bootstrap objects: ClusterRoles, then ClusterRoleBindings.
pub struct Bootstrap {
    pub cluster_roles: Vec<Value>,
    pub cluster_role_bindings: Vec<Value>,
    /// The rules of `system:node`: what the Node authorizer allows a node at most.
    pub node_rules: Vec<PolicyRule>,
}

fn metadata(name: &str, labels: serde_json::Map<String, Value>) -> Value {
    let mut labels = labels;
    labels.insert("kubernetes.io/bootstrapping".into(), json!("rbac-defaults"));
    json!({"name": name, "labels": labels, "annotations": {AUTOUPDATE: "true"}})
}

/// The compiled-in policy (parsed once; a parse error is a build defect caught by the tests).
pub fn bootstrap() -> &'static Bootstrap {
    static POLICY: OnceLock<Bootstrap> = OnceLock::new();
    POLICY.get_or_init(|| {
        let file: File = serde_yaml::from_str(SOURCE)
            .unwrap_or_else(|e| panic!("bootstrap-policy.yaml does not parse: {e}"));
        let node_rules = file
            .cluster_roles
            .iter()
            .find(|r| r.name == "system:node")
            .map(|r| r.rules.clone())
            .unwrap_or_default();
        let cluster_roles = file
            .cluster_roles
            .into_iter()
            .map(|r| {
                let mut role = json!({
                    "apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRole",
                    "metadata": metadata(&r.name, r.labels),
                });
                if let Some(aggregation) = r.aggregation_rule {
                    role["aggregationRule"] = aggregation;
                    role["rules"] = json!([]);
                } else {
                    role["rules"] = json!(r.rules);
                }
                role
            })
            .collect();
        let cluster_role_bindings = file
            .cluster_role_bindings
            .into_iter()
            .map(|b| {
                let subjects: Vec<Value> = b
                    .users
                    .iter()
                    .map(|u| json!({"kind": "User", "apiGroup": GROUP, "name": u}))
                    .chain(
                        b.groups
                            .iter()
                            .map(|g| json!({"kind": "Group", "apiGroup": GROUP, "name": g})),
                    )
                    .chain(b.service_accounts.iter().map(|sa| {
                        let (namespace, name) = sa.split_once('/').unwrap_or(("kube-system", sa));
                        json!({"kind": "ServiceAccount", "namespace": namespace, "name": name})
                    }))
                    .collect();
                json!({
                    "apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRoleBinding",
                    "metadata": metadata(&b.name, Default::default()),
                    "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": b.role},
                    "subjects": subjects,
                })
            })
            .collect();
        Bootstrap {
            cluster_roles,
            cluster_role_bindings,
            node_rules,
        }
    })
}

/// What a start does with one bootstrap object.
#[derive(Debug, PartialEq)]
pub enum Reconcile {
    Create(Value),
    Update(Value),
    /// A binding whose roleRef changed (roleRef is immutable): delete and create.
    Recreate(Value),
    Keep,
}

fn union_into(current: &mut Value, wanted: &Value, field: &str) -> bool {
    let Some(wanted) = wanted.get(field).and_then(Value::as_array) else {
        return false;
    };
    if !current.get(field).is_some_and(Value::is_array) {
        current[field] = json!([]);
    }
    let list = current[field].as_array_mut().expect("made an array above");
    let mut changed = false;
    for item in wanted {
        if !list.contains(item) {
            list.push(item.clone());
            changed = true;
        }
    }
    changed
}

fn union_map(current: &mut Value, wanted: &Value, pointer: &str, key: &str) -> bool {
    let Some(wanted) = wanted.pointer(pointer).and_then(Value::as_object) else {
        return false;
    };
    let meta = &mut current["metadata"];
    if !meta.get(key).is_some_and(Value::is_object) {
        meta[key] = json!({});
    }
    let map = meta[key].as_object_mut().expect("made an object above");
    let mut changed = false;
    for (k, v) in wanted {
        if !map.contains_key(k) {
            map.insert(k.clone(), v.clone());
            changed = true;
        }
    }
    changed
}

/// Upstream's reconciliation: missing objects are created; existing ones annotated
/// `autoupdate: "false"` are kept; others get the missing rules (or aggregation selectors),
/// subjects, labels and annotations added. Nothing is taken away.
pub fn reconcile(existing: Option<&Value>, wanted: &Value) -> Reconcile {
    let Some(existing) = existing else {
        return Reconcile::Create(wanted.clone());
    };
    if existing
        .pointer(&format!(
            "/metadata/annotations/{}",
            AUTOUPDATE.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        == Some("false")
    {
        return Reconcile::Keep;
    }
    if wanted.get("roleRef").is_some() && existing.get("roleRef") != wanted.get("roleRef") {
        return Reconcile::Recreate(wanted.clone());
    }
    let mut current = existing.clone();
    let mut changed = false;
    changed |= union_map(&mut current, wanted, "/metadata/labels", "labels");
    changed |= union_map(&mut current, wanted, "/metadata/annotations", "annotations");
    if wanted.get("aggregationRule").is_some() {
        if !current.get("aggregationRule").is_some_and(Value::is_object) {
            current["aggregationRule"] = json!({});
        }
        changed |= union_into(
            &mut current["aggregationRule"],
            &wanted["aggregationRule"],
            "clusterRoleSelectors",
        );
    } else if wanted.get("rules").is_some() {
        changed |= union_into(&mut current, wanted, "rules");
    }
    if wanted.get("subjects").is_some() {
        changed |= union_into(&mut current, wanted, "subjects");
    }
    if changed {
        Reconcile::Update(current)
    } else {
        Reconcile::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_parses_and_names_upstreams_roles() {
        let p = bootstrap();
        let names: Vec<&str> = p
            .cluster_roles
            .iter()
            .filter_map(|r| r.pointer("/metadata/name").and_then(Value::as_str))
            .collect();
        for wanted in [
            "cluster-admin",
            "admin",
            "edit",
            "view",
            "system:basic-user",
            "system:discovery",
            "system:public-info-viewer",
            "system:node",
            "system:kube-scheduler",
        ] {
            assert!(names.contains(&wanted), "{wanted} missing");
        }
        assert!(!p.node_rules.is_empty());
        // Every binding refers to a role of the policy.
        for b in &p.cluster_role_bindings {
            let role = b.pointer("/roleRef/name").and_then(Value::as_str).unwrap();
            assert!(names.contains(&role), "{role}");
        }
    }

    #[test]
    fn reconcile_adds_and_never_removes() {
        let wanted = bootstrap()
            .cluster_roles
            .iter()
            .find(|r| r["metadata"]["name"] == "system:basic-user")
            .unwrap()
            .clone();
        assert!(matches!(reconcile(None, &wanted), Reconcile::Create(_)));
        assert_eq!(reconcile(Some(&wanted), &wanted), Reconcile::Keep);
        let mut edited = wanted.clone();
        edited["rules"] = json!([{"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}]);
        let Reconcile::Update(updated) = reconcile(Some(&edited), &wanted) else {
            panic!()
        };
        assert_eq!(updated["rules"].as_array().unwrap().len(), 3);
        edited["metadata"]["annotations"][AUTOUPDATE] = json!("false");
        assert_eq!(reconcile(Some(&edited), &wanted), Reconcile::Keep);
        let binding = &bootstrap().cluster_role_bindings[0];
        let mut moved = binding.clone();
        moved["roleRef"]["name"] = json!("view");
        assert!(matches!(
            reconcile(Some(&moved), binding),
            Reconcile::Recreate(_)
        ));
    }
}
