//! The review APIs, answered from the authorizer and authenticators and never stored:
//! `SelfSubjectAccessReview`, `SubjectAccessReview`, `LocalSubjectAccessReview` (what
//! `kubectl auth can-i [--as]` asks), `SelfSubjectRulesReview` (`kubectl auth can-i --list`),
//! `SelfSubjectReview` (`kubectl auth whoami`) and `TokenReview`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::ApiServer;
use super::pipeline::RequestContext;
use crate::auth::rbac::PolicyRule;
use crate::auth::{Attributes, Identity, MASTERS};
use crate::error::{ApiError, Cause};
use crate::registry::ResourceInfo;

/// Review resources are answered, never stored.
pub fn is_review(info: &ResourceInfo) -> bool {
    matches!(
        (info.group.as_str(), info.resource.as_str()),
        (
            "authorization.k8s.io",
            "selfsubjectaccessreviews"
                | "selfsubjectrulesreviews"
                | "subjectaccessreviews"
                | "localsubjectaccessreviews"
        ) | (
            "authentication.k8s.io",
            "selfsubjectreviews" | "tokenreviews"
        )
    )
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The attributes a review's spec asks about.
fn spec_attributes(spec: &Value, kind: &str) -> Result<Attributes, ApiError> {
    if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
        let mut a = Attributes::resource(
            str_at(r, "/verb"),
            str_at(r, "/group"),
            str_at(r, "/resource"),
            str_at(r, "/namespace"),
        )
        .named(str_at(r, "/name"));
        a.subresource = str_at(r, "/subresource").to_string();
        a.api_version = str_at(r, "/version").to_string();
        if let Some(f) = r
            .pointer("/fieldSelector/rawSelector")
            .and_then(Value::as_str)
        {
            a.fields = f
                .split(',')
                .filter_map(|x| {
                    let (k, v) = x.split_once("==").or_else(|| x.split_once('='))?;
                    Some((k.trim().to_string(), v.trim().to_string()))
                })
                .collect();
        }
        return Ok(a);
    }
    if let Some(n) = spec.get("nonResourceAttributes").filter(|r| r.is_object()) {
        return Ok(Attributes::non_resource(
            str_at(n, "/verb"),
            str_at(n, "/path"),
        ));
    }
    Err(ApiError::invalid(
        kind,
        "authorization.k8s.io",
        "",
        vec![Cause::new(
            "FieldValueRequired",
            "spec.resourceAttributes",
            "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified"
                .into(),
        )],
    ))
}

fn access_status(server: &ApiServer, user: &Identity, a: &Attributes) -> Value {
    let decision = server.authorizer.authorize(user, a);
    let mut status = json!({"allowed": decision.allowed()});
    if !decision.reason().is_empty() {
        status["reason"] = json!(decision.reason());
    }
    status
}

fn subject_of(spec: &Value) -> Identity {
    let list = |k: &str| -> Vec<String> {
        spec.get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(String::from))
            .collect()
    };
    let extra: BTreeMap<String, Vec<String>> = spec
        .get("extra")
        .and_then(|e| serde_json::from_value(e.clone()).ok())
        .unwrap_or_default();
    Identity {
        user: str_at(spec, "/user").to_string(),
        uid: str_at(spec, "/uid").to_string(),
        groups: list("groups"),
        extra,
    }
}

fn rule_json(rule: &PolicyRule) -> Value {
    if rule.non_resource_urls.is_empty() {
        let mut r =
            json!({"verbs": rule.verbs, "apiGroups": rule.api_groups, "resources": rule.resources});
        if !rule.resource_names.is_empty() {
            r["resourceNames"] = json!(rule.resource_names);
        }
        r
    } else {
        json!({"verbs": rule.verbs, "nonResourceURLs": rule.non_resource_urls})
    }
}

/// Answers a review: the request body with its `status` filled in.
pub async fn answer(
    server: &ApiServer,
    context: &RequestContext,
    info: &ResourceInfo,
    namespace: &str,
    mut value: Value,
) -> Result<Value, ApiError> {
    if let Some(typed) = &info.typed {
        value = (typed.normalize)(&value)
            .map_err(|e| ApiError::bad_request(format!("{} cannot be decoded: {e}", info.kind)))?;
    }
    value["apiVersion"] = json!(info.api_version());
    value["kind"] = json!(info.kind);
    let spec = value.get("spec").cloned().unwrap_or(Value::Null);
    let user = &context.user;
    value["status"] = match info.resource.as_str() {
        "selfsubjectreviews" => json!({"userInfo": user.user_info()}),
        "selfsubjectaccessreviews" => {
            access_status(server, user, &spec_attributes(&spec, &info.kind)?)
        }
        "subjectaccessreviews" | "localsubjectaccessreviews" => {
            let subject = subject_of(&spec);
            if subject.user.is_empty() && subject.groups.is_empty() {
                return Err(ApiError::invalid(
                    &info.kind,
                    &info.group,
                    "",
                    vec![Cause::new(
                        "FieldValueRequired",
                        "spec.user",
                        "Required value: at least one of user or group must be specified".into(),
                    )],
                ));
            }
            let mut a = spec_attributes(&spec, &info.kind)?;
            if info.resource == "localsubjectaccessreviews" {
                if !a.resource_request {
                    return Err(ApiError::bad_request(
                        "disallowed on this kind of request: nonResourceAttributes",
                    ));
                }
                if a.namespace.is_empty() {
                    a.namespace = namespace.to_string();
                    value["spec"]["resourceAttributes"]["namespace"] = json!(namespace);
                } else if a.namespace != namespace {
                    return Err(ApiError::bad_request(format!(
                        "spec.resourceAttributes.namespace must match namespace: {namespace}"
                    )));
                }
            }
            access_status(server, &subject, &a)
        }
        "selfsubjectrulesreviews" => {
            let ns = str_at(&spec, "/namespace");
            if ns.is_empty() {
                return Err(ApiError::bad_request("no namespace on request"));
            }
            let (rules, errors) = if user.in_group(MASTERS) {
                // The privileged group holds everything, whatever the policy objects say.
                (crate::auth::rbac::full_authority(), vec![])
            } else {
                server.authorizer.policy().rules_for(user, ns)
            };
            let (resource, non_resource): (Vec<_>, Vec<_>) =
                rules.iter().partition(|r| r.non_resource_urls.is_empty());
            // The Node authorizer decides per object and cannot list what it would allow.
            let incomplete = !errors.is_empty() || user.node_name().is_some();
            let mut status = json!({
                "resourceRules": resource.into_iter().map(rule_json).collect::<Vec<_>>(),
                "nonResourceRules": non_resource.into_iter().map(rule_json).collect::<Vec<_>>(),
                "incomplete": incomplete,
            });
            if !errors.is_empty() {
                status["evaluationError"] = json!(errors.join(", "));
            }
            status
        }
        "tokenreviews" => {
            let token = str_at(&spec, "/token");
            let bearer = format!("Bearer {token}");
            // The audiences asked for, or the API server's own; the answer names those the
            // token is valid for (upstream: their intersection).
            let own = server
                .service_account_tokens
                .get()
                .map(|i| i.issuer().to_string())
                .unwrap_or_else(|| crate::service_accounts::DEFAULT_ISSUER.to_string());
            let asked: Vec<String> = spec
                .get("audiences")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .filter(|a: &Vec<String>| !a.is_empty())
                .unwrap_or_else(|| vec![own.clone()]);
            let mut found = None;
            let mut audiences = Vec::new();
            if let Some(identity) = server.tokens.authenticate(&bearer) {
                // Static tokens are for the API server itself.
                if asked.contains(&own) {
                    found = Some(identity);
                    audiences.push(own.clone());
                }
            } else if !token.is_empty() {
                for audience in &asked {
                    if let Some(identity) =
                        super::service_account_identity_for(server, &bearer, audience).await
                    {
                        found = Some(identity);
                        audiences.push(audience.clone());
                    }
                }
            }
            match found {
                Some(identity) => json!({
                    "authenticated": true,
                    "user": identity.user_info(),
                    "audiences": audiences,
                }),
                None => {
                    json!({"authenticated": false, "error": "invalid bearer token, or not for the audiences asked for"})
                }
            }
        }
        other => return Err(ApiError::internal(format!("no review named {other}"))),
    };
    Ok(value)
}
