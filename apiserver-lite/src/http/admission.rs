//! Admission decisions that depend on who writes, run on every create and update after
//! validation and before storage:
//!
//! - RBAC escalation prevention (upstream's registry rules for roles and bindings): a Role or
//!   ClusterRole may only grant what its writer holds, unless they may `escalate`; a binding may
//!   only grant a role whose rules its writer holds, unless they may `bind` it; an
//!   `aggregationRule` needs full authority.
//! - NodeRestriction: a node agent writes only its own Node (without
//!   `node-restriction.kubernetes.io/` labels or new taints), creates no pods, and asks tokens
//!   only for pods bound to it.

use serde_json::{Value, json};

use super::ApiServer;
use crate::auth::rbac::{self, PolicyRule, RoleRef};
use crate::auth::{Attributes, Identity, MASTERS};
use crate::error::{ApiError, qualified};
use crate::registry::ResourceInfo;

/// The label prefix only administrators may set on Nodes.
pub const RESTRICTED_LABELS: &str = "node-restriction.kubernetes.io/";

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn forbidden(info: &ResourceInfo, name: &str, why: impl std::fmt::Display) -> ApiError {
    crate::auth::forbidden_error(
        &qualified(&info.resource, &info.group),
        name,
        &info.group,
        &info.resource,
        why,
    )
}

/// Checks a write of `object` (replacing `old`, for updates) by `user`.
pub fn admit(
    server: &ApiServer,
    user: &Identity,
    info: &ResourceInfo,
    object: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    if info.group == crate::certificates::GROUP && old.is_none() {
        // Applies to everyone, system:masters included, as upstream's plugin does.
        crate::certificates::subject_restriction(object)
            .map_err(|why| forbidden(info, str_at(object, "/metadata/name"), why))?;
    }
    if user.in_group(MASTERS) {
        return Ok(());
    }
    if info.group == rbac::GROUP {
        return admit_rbac(server, user, info, object, old);
    }
    if let Some(node) = user.node_name() {
        return admit_node_write(node, info, object, old);
    }
    Ok(())
}

fn admit_rbac(
    server: &ApiServer,
    user: &Identity,
    info: &ResourceInfo,
    object: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let name = str_at(object, "/metadata/name");
    let namespace = str_at(object, "/metadata/namespace");
    let policy = server.authorizer.policy();
    let holds = |wanted: &[PolicyRule]| {
        let (owned, errors) = policy.rules_for(user, namespace);
        let (ok, missing) = rbac::covers(&owned, wanted);
        (ok, missing, errors)
    };
    match info.resource.as_str() {
        "roles" | "clusterroles" => {
            // Only the fields the garbage collector clears changed: no grant is made.
            if let Some(old) = old
                && old.get("rules") == object.get("rules")
                && old.get("aggregationRule") == object.get("aggregationRule")
            {
                return Ok(());
            }
            let escalate = Attributes::resource("escalate", rbac::GROUP, &info.resource, namespace)
                .named(name);
            if server.authorizer.authorize(user, &escalate).allowed() {
                return Ok(());
            }
            let (ok, missing, errors) = holds(&rbac::rules_of(object));
            if !ok {
                return Err(forbidden(
                    info,
                    name,
                    rbac::escalation_message(user, &missing, &errors),
                ));
            }
            if object.get("aggregationRule").is_some_and(|a| !a.is_null())
                && !holds(&rbac::full_authority()).0
            {
                return Err(forbidden(
                    info,
                    name,
                    "must have cluster-admin privileges to use the aggregationRule",
                ));
            }
            Ok(())
        }
        "rolebindings" | "clusterrolebindings" => {
            if let Some(old) = old
                && old.get("roleRef") == object.get("roleRef")
                && old.get("subjects") == object.get("subjects")
            {
                return Ok(());
            }
            let role_ref: RoleRef = object
                .get("roleRef")
                .and_then(|r| serde_json::from_value(r.clone()).ok())
                .unwrap_or_default();
            let role_resource = if role_ref.kind == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            let bind = Attributes::resource("bind", rbac::GROUP, role_resource, namespace)
                .named(&role_ref.name);
            if server.authorizer.authorize(user, &bind).allowed() {
                return Ok(());
            }
            let wanted = policy
                .role_ref_rules(&role_ref, namespace)
                .map_err(|e| forbidden(info, name, e))?;
            let (ok, missing, errors) = holds(&wanted);
            if ok {
                Ok(())
            } else {
                Err(forbidden(
                    info,
                    name,
                    rbac::escalation_message(user, &missing, &errors),
                ))
            }
        }
        _ => Ok(()),
    }
}

fn labels(object: Option<&Value>) -> serde_json::Map<String, Value> {
    object
        .and_then(|o| o.pointer("/metadata/labels"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn admit_node_write(
    node: &str,
    info: &ResourceInfo,
    object: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let name = str_at(object, "/metadata/name");
    match (info.group.as_str(), info.resource.as_str()) {
        ("", "nodes") => {
            if name != node {
                return Err(forbidden(
                    info,
                    name,
                    format!("node {node:?} is not allowed to modify node {name:?}"),
                ));
            }
            let (before, after) = (labels(old), labels(Some(object)));
            let mut changed: Vec<&String> = after
                .iter()
                .filter(|(k, v)| before.get(*k) != Some(*v))
                .map(|(k, _)| k)
                .chain(before.keys().filter(|k| !after.contains_key(*k)))
                .filter(|k| {
                    k.starts_with(RESTRICTED_LABELS)
                        || k.split('/').next() == Some(RESTRICTED_LABELS.trim_end_matches('/'))
                })
                .collect();
            changed.sort();
            changed.dedup();
            if !changed.is_empty() {
                let list: Vec<&str> = changed.iter().map(|k| k.as_str()).collect();
                return Err(forbidden(
                    info,
                    name,
                    format!("is not allowed to modify labels: {}", list.join(", ")),
                ));
            }
            if let Some(old) = old
                && old.pointer("/spec/taints").unwrap_or(&json!(null))
                    != object.pointer("/spec/taints").unwrap_or(&json!(null))
            {
                return Err(forbidden(
                    info,
                    name,
                    format!("node {node:?} is not allowed to modify taints"),
                ));
            }
            Ok(())
        }
        ("coordination.k8s.io", "leases") if name != node => Err(forbidden(
            info,
            name,
            "can only access node lease with the same name as the requesting node",
        )),
        ("", "pods") if old.is_none() => Err(forbidden(
            info,
            name,
            "pod does not have \"kubernetes.io/config.mirror\" annotation, node can only create mirror pods",
        )),
        _ => Ok(()),
    }
}

/// NodeRestriction for the TokenRequest API: a node asks tokens only for pods bound to it.
pub fn admit_token_request(
    server: &ApiServer,
    user: &Identity,
    namespace: &str,
    request: &Value,
) -> Result<(), ApiError> {
    let Some(node) = user.node_name() else {
        return Ok(());
    };
    let (kind, pod, uid) = (
        str_at(request, "/spec/boundObjectRef/kind"),
        str_at(request, "/spec/boundObjectRef/name"),
        str_at(request, "/spec/boundObjectRef/uid"),
    );
    let refuse = |why: &str| {
        Err(crate::auth::forbidden_error(
            "serviceaccounts/token",
            "",
            "",
            "serviceaccounts",
            format!("node {node:?} {why}"),
        ))
    };
    if kind != "Pod" {
        return refuse("requested token not bound to a pod");
    }
    if uid.is_empty() {
        return refuse("requested token with a pod binding without a uid");
    }
    match server.authorizer.pod_node(namespace, pod) {
        Some(n) if n == node => Ok(()),
        _ => refuse("requested token bound to a pod scheduled on a different node"),
    }
}

/// Where every container finds its ServiceAccount's credentials.
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// ServiceAccount admission for a pod being created (upstream's plugin): the account defaults to
/// `default`; unless the pod or its account opts out (`automountServiceAccountToken: false`),
/// a `kube-api-access-<5>` projected volume (a bound token for an hour, the cluster CA from
/// `kube-root-ca.crt`, the namespace) is mounted read-only at [`SERVICE_ACCOUNT_MOUNT`] in every
/// container and init container that does not mount that path itself; the account's
/// `imagePullSecrets` go to a pod that names none. `account` is the stored ServiceAccount, if
/// it exists yet (the `default` one may still be on its way in a new namespace).
pub fn mount_service_account(pod: &mut Value, account: Option<&Value>, suffix: &str) {
    if !pod["spec"].is_object() {
        return;
    }
    let spec = &mut pod["spec"];
    let name = match spec.get("serviceAccountName").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => spec
            .get("serviceAccount")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_string(),
    };
    spec["serviceAccountName"] = json!(name);
    spec["serviceAccount"] = json!(name);
    if let Some(account) = account
        && spec
            .get("imagePullSecrets")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        && let Some(secrets) = account
            .get("imagePullSecrets")
            .and_then(Value::as_array)
            .filter(|s| !s.is_empty())
    {
        spec["imagePullSecrets"] = json!(secrets);
    }
    let automount = spec
        .get("automountServiceAccountToken")
        .and_then(Value::as_bool)
        .or_else(|| {
            account
                .and_then(|a| a.get("automountServiceAccountToken"))
                .and_then(Value::as_bool)
        })
        .unwrap_or(true);
    if !automount {
        return;
    }
    let volume_name = format!("kube-api-access-{suffix}");
    let mut mounted = false;
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers {
            let mounts_it = c
                .get("volumeMounts")
                .and_then(Value::as_array)
                .is_some_and(|m| {
                    m.iter().any(|m| {
                        m.get("mountPath")
                            .and_then(Value::as_str)
                            .is_some_and(|p| p.trim_end_matches('/') == SERVICE_ACCOUNT_MOUNT)
                    })
                });
            if mounts_it {
                continue;
            }
            if !c["volumeMounts"].is_array() {
                c["volumeMounts"] = json!([]);
            }
            if let Some(m) = c["volumeMounts"].as_array_mut() {
                m.push(json!({"name": volume_name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT}));
                mounted = true;
            }
        }
    }
    if !mounted {
        return;
    }
    if !spec["volumes"].is_array() {
        spec["volumes"] = json!([]);
    }
    if let Some(v) = spec["volumes"].as_array_mut() {
        v.push(json!({"name": volume_name, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}}));
    }
}

/// Five characters as upstream's name generator picks them.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Adds `finalizer` to a new object's `metadata.finalizers` unless it is there (the
/// StorageObjectInUseProtection plugin's part: claims and volumes are created protected).
pub fn add_finalizer(object: &mut Value, finalizer: &str) {
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list = meta
        .entry("finalizers")
        .or_insert_with(|| Value::Array(Vec::new()));
    if list.is_null() {
        *list = Value::Array(Vec::new());
    }
    if let Some(list) = list.as_array_mut()
        && !list.iter().any(|f| f.as_str() == Some(finalizer))
    {
        list.push(Value::String(finalizer.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {
            "initContainers": [{"name": "i", "image": "x"}],
            "containers": [{"name": "a", "image": "x"},
                           {"name": "b", "image": "x", "volumeMounts": [{"name": "own", "mountPath": SERVICE_ACCOUNT_MOUNT}]}]}})
    }

    #[test]
    fn pods_get_a_projected_token_volume_unless_they_opt_out() {
        let mut p = pod();
        let account = json!({"imagePullSecrets": [{"name": "regcred"}]});
        mount_service_account(&mut p, Some(&account), "abcde");
        let spec = &p["spec"];
        assert_eq!(spec["serviceAccountName"], "default");
        assert_eq!(spec["imagePullSecrets"], json!([{"name": "regcred"}]));
        assert_eq!(spec["volumes"][0]["name"], "kube-api-access-abcde");
        assert_eq!(
            spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["path"],
            "token"
        );
        assert_eq!(
            spec["initContainers"][0]["volumeMounts"][0]["mountPath"],
            SERVICE_ACCOUNT_MOUNT
        );
        assert_eq!(spec["containers"][0]["volumeMounts"][0]["readOnly"], true);
        // A container that mounts the path itself keeps its own.
        assert_eq!(
            spec["containers"][1]["volumeMounts"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        let mut off = pod();
        off["spec"]["automountServiceAccountToken"] = json!(false);
        mount_service_account(&mut off, None, "abcde");
        assert!(off["spec"].get("volumes").is_none());
        let mut by_account = pod();
        mount_service_account(
            &mut by_account,
            Some(&json!({"automountServiceAccountToken": false})),
            "abcde",
        );
        assert!(by_account["spec"].get("volumes").is_none());
        // The pod's own setting wins over its account's.
        let mut pod_wins = pod();
        pod_wins["spec"]["automountServiceAccountToken"] = json!(true);
        mount_service_account(
            &mut pod_wins,
            Some(&json!({"automountServiceAccountToken": false})),
            "abcde",
        );
        assert!(pod_wins["spec"]["volumes"].is_array());
        assert!(random_suffix().len() == 5);
    }
}
