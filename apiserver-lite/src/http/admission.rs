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
            if object.get("aggregationRule").is_some_and(|a| !a.is_null()) {
                let everything = [
                    PolicyRule {
                        verbs: vec!["*".into()],
                        api_groups: vec!["*".into()],
                        resources: vec!["*".into()],
                        ..PolicyRule::default()
                    },
                    PolicyRule {
                        verbs: vec!["*".into()],
                        non_resource_urls: vec!["*".into()],
                        ..PolicyRule::default()
                    },
                ];
                if !holds(&everything).0 {
                    return Err(forbidden(
                        info,
                        name,
                        "must have cluster-admin privileges to use the aggregationRule",
                    ));
                }
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
