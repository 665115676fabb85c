//! RBAC (`rbac.authorization.k8s.io/v1`) with upstream's semantics, as pure functions over a
//! [`Policy`]: the Roles, ClusterRoles and bindings of the cluster, indexed for decisions.
//!
//! - [`Policy::authorize`]: a request is allowed when some binding that applies to the user
//!   (ClusterRoleBindings anywhere, RoleBindings in the request's namespace) refers to a role
//!   with a rule that allows it. There are no deny rules.
//! - [`Policy::rules_for`]: every rule a user holds in a namespace (SelfSubjectRulesReview and
//!   escalation checks).
//! - [`covers`]: whether a set of rules grants everything another set grants (escalation
//!   prevention: nobody grants what they do not hold).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attributes, Decision, Identity};

pub const GROUP: &str = "rbac.authorization.k8s.io";

/// One rule of a Role or ClusterRole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    #[serde(
        default,
        rename = "nonResourceURLs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub non_resource_urls: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_group: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleRef {
    #[serde(default)]
    pub api_group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

/// A RoleBinding (with its namespace) or a ClusterRoleBinding (namespace empty).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Binding {
    pub name: String,
    pub namespace: String,
    pub role_ref: RoleRef,
    pub subjects: Vec<Subject>,
}

impl Binding {
    pub fn from_object(object: &Value) -> Self {
        let meta = |k: &str| {
            object
                .pointer(&format!("/metadata/{k}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Binding {
            name: meta("name"),
            namespace: meta("namespace"),
            role_ref: object
                .get("roleRef")
                .and_then(|r| serde_json::from_value(r.clone()).ok())
                .unwrap_or_default(),
            subjects: object
                .get("subjects")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or_default(),
        }
    }

    fn kind(&self) -> &'static str {
        if self.namespace.is_empty() {
            "ClusterRoleBinding"
        } else {
            "RoleBinding"
        }
    }

    /// Whether a subject of this binding is the user (upstream's `appliesTo`).
    pub fn applies_to(&self, user: &Identity) -> Option<&Subject> {
        self.subjects
            .iter()
            .find(|s| subject_matches(s, user, &self.namespace))
    }
}

fn subject_matches(subject: &Subject, user: &Identity, binding_namespace: &str) -> bool {
    match subject.kind.as_str() {
        "User" => subject.name == user.user,
        "Group" => user.in_group(&subject.name),
        "ServiceAccount" => {
            let namespace = if subject.namespace.is_empty() {
                binding_namespace
            } else {
                &subject.namespace
            };
            Identity::service_account_of(&user.user) == Some((namespace, subject.name.as_str()))
        }
        _ => false,
    }
}

/// The rules of a Role or ClusterRole object.
pub fn rules_of(object: &Value) -> Vec<PolicyRule> {
    object
        .get("rules")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .unwrap_or_default()
}

fn has(list: &[String], wanted: &str) -> bool {
    list.iter().any(|v| v == "*" || v == wanted)
}

fn resource_matches(rule: &PolicyRule, resource: &str, subresource: &str) -> bool {
    rule.resources.iter().any(|r| {
        if r == "*" {
            return true;
        }
        if subresource.is_empty() {
            return r == resource;
        }
        r.strip_prefix("*/") == Some(subresource)
            || (r.len() == resource.len() + 1 + subresource.len()
                && r.starts_with(resource)
                && r[resource.len()..].starts_with('/')
                && r.ends_with(subresource))
    })
}

fn url_matches(rule: &PolicyRule, path: &str) -> bool {
    rule.non_resource_urls.iter().any(|u| {
        u == "*"
            || u == path
            || u.strip_suffix('*')
                .is_some_and(|prefix| path.starts_with(prefix))
    })
}

/// Whether one rule allows the request (upstream's `RuleAllows`).
pub fn rule_allows(rule: &PolicyRule, a: &Attributes) -> bool {
    if !has(&rule.verbs, &a.verb) {
        return false;
    }
    if !a.resource_request {
        return url_matches(rule, &a.path);
    }
    has(&rule.api_groups, &a.api_group)
        && resource_matches(rule, &a.resource, &a.subresource)
        && (rule.resource_names.is_empty() || rule.resource_names.contains(&a.name))
}

/// The cluster's RBAC objects, as decisions need them.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    pub cluster_roles: HashMap<String, Arc<Vec<PolicyRule>>>,
    /// Keyed by (namespace, name).
    pub roles: HashMap<(String, String), Arc<Vec<PolicyRule>>>,
    pub cluster_bindings: Vec<Binding>,
    /// RoleBindings by namespace.
    pub bindings: HashMap<String, Vec<Binding>>,
}

impl Policy {
    /// The rules a binding's role holds, or why they cannot be found.
    fn role_rules(&self, binding: &Binding) -> Result<&Arc<Vec<PolicyRule>>, String> {
        let r = &binding.role_ref;
        match r.kind.as_str() {
            "ClusterRole" => self.cluster_roles.get(&r.name).ok_or_else(|| {
                format!(
                    "clusterrole.rbac.authorization.k8s.io {:?} not found",
                    r.name
                )
            }),
            "Role" if !binding.namespace.is_empty() => self
                .roles
                .get(&(binding.namespace.clone(), r.name.clone()))
                .ok_or_else(|| format!("role.rbac.authorization.k8s.io {:?} not found", r.name)),
            other => Err(format!("unsupported role reference kind: {other:?}")),
        }
    }

    /// Calls `visit` with each (binding, rule) that applies to the user in `namespace` (cluster
    /// bindings first) until it returns `false`; collects the bindings whose role is missing.
    fn visit(
        &self,
        user: &Identity,
        namespace: &str,
        errors: &mut Vec<String>,
        mut visit: impl FnMut(&Binding, &Subject, &PolicyRule) -> bool,
    ) {
        let namespaced = if namespace.is_empty() {
            None
        } else {
            self.bindings.get(namespace)
        };
        for binding in self
            .cluster_bindings
            .iter()
            .chain(namespaced.into_iter().flatten())
        {
            let Some(subject) = binding.applies_to(user) else {
                continue;
            };
            match self.role_rules(binding) {
                Ok(rules) => {
                    for rule in rules.iter() {
                        if !visit(binding, subject, rule) {
                            return;
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
    }

    /// Allow when a rule allows; otherwise no opinion (RBAC has no deny rules). Missing roles
    /// are named in the reason, as upstream does.
    pub fn authorize(&self, user: &Identity, a: &Attributes) -> Decision {
        let mut errors = Vec::new();
        let mut allowed_by = None;
        self.visit(user, &a.namespace, &mut errors, |binding, subject, rule| {
            if rule_allows(rule, a) {
                allowed_by = Some(format!(
                    "RBAC: allowed by {} {:?} of {} {:?} to {} {:?}",
                    binding.kind(),
                    binding.name,
                    binding.role_ref.kind,
                    binding.role_ref.name,
                    subject.kind,
                    subject.name
                ));
                return false;
            }
            true
        });
        match allowed_by {
            Some(reason) => Decision::Allow(reason),
            None if errors.is_empty() => Decision::NoOpinion(String::new()),
            None => Decision::NoOpinion(format!("RBAC: {}", errors.join(", "))),
        }
    }

    /// Every rule the user holds in `namespace` (cluster-wide rules included), and the role
    /// references that could not be resolved.
    pub fn rules_for(&self, user: &Identity, namespace: &str) -> (Vec<PolicyRule>, Vec<String>) {
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        self.visit(user, namespace, &mut errors, |_, _, rule| {
            rules.push(rule.clone());
            true
        });
        (rules, errors)
    }

    /// The rules a role reference names (for bindings: what binding it grants).
    pub fn role_ref_rules(
        &self,
        role_ref: &RoleRef,
        namespace: &str,
    ) -> Result<Vec<PolicyRule>, String> {
        let probe = Binding {
            namespace: namespace.to_string(),
            role_ref: role_ref.clone(),
            ..Binding::default()
        };
        self.role_rules(&probe).map(|r| r.to_vec())
    }
}

/// Everything: what `cluster-admin` holds and `system:masters` is taken to hold.
pub fn full_authority() -> Vec<PolicyRule> {
    vec![
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
    ]
}

/// One thing a rule grants: a verb on a group/resource(/name), or a verb on a URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Atom {
    Resource {
        verb: String,
        group: String,
        resource: String,
        name: Option<String>,
    },
    Url {
        verb: String,
        url: String,
    },
}

fn atoms(rule: &PolicyRule) -> Vec<Atom> {
    let mut out = Vec::new();
    for verb in &rule.verbs {
        for url in &rule.non_resource_urls {
            out.push(Atom::Url {
                verb: verb.clone(),
                url: url.clone(),
            });
        }
        for group in &rule.api_groups {
            for resource in &rule.resources {
                if rule.resource_names.is_empty() {
                    out.push(Atom::Resource {
                        verb: verb.clone(),
                        group: group.clone(),
                        resource: resource.clone(),
                        name: None,
                    });
                }
                for name in &rule.resource_names {
                    out.push(Atom::Resource {
                        verb: verb.clone(),
                        group: group.clone(),
                        resource: resource.clone(),
                        name: Some(name.clone()),
                    });
                }
            }
        }
    }
    out
}

/// Whether one owned rule grants an atom (upstream's `ruleCovers` for one broken-down rule).
fn atom_covered(owner: &PolicyRule, atom: &Atom) -> bool {
    match atom {
        Atom::Url { verb, url } => {
            has(&owner.verbs, verb)
                && owner.non_resource_urls.iter().any(|o| {
                    o == "*"
                        || o == url
                        || o.strip_suffix('*').is_some_and(|prefix| {
                            url.starts_with(prefix)
                                && (!url.ends_with('*') || url.len() > prefix.len())
                        })
                })
        }
        Atom::Resource {
            verb,
            group,
            resource,
            name,
        } => {
            let resource_ok = owner.resources.iter().any(|o| {
                o == "*"
                    || o == resource
                    || (o.starts_with("*/")
                        && resource
                            .split_once('/')
                            .is_some_and(|(_, sub)| Some(sub) == o.strip_prefix("*/")))
            });
            has(&owner.verbs, verb)
                && has(&owner.api_groups, group)
                && resource_ok
                && (owner.resource_names.is_empty()
                    || name
                        .as_ref()
                        .is_some_and(|n| owner.resource_names.contains(n)))
        }
    }
}

/// Whether `owner` grants everything `requested` does; the requested rules (broken down) that
/// it does not.
pub fn covers(owner: &[PolicyRule], requested: &[PolicyRule]) -> (bool, Vec<PolicyRule>) {
    let mut missing = Vec::new();
    for rule in requested {
        for atom in atoms(rule) {
            if !owner.iter().any(|o| atom_covered(o, &atom)) {
                missing.push(match atom {
                    Atom::Url { verb, url } => PolicyRule {
                        verbs: vec![verb],
                        non_resource_urls: vec![url],
                        ..PolicyRule::default()
                    },
                    Atom::Resource {
                        verb,
                        group,
                        resource,
                        name,
                    } => PolicyRule {
                        verbs: vec![verb],
                        api_groups: vec![group],
                        resources: vec![resource],
                        resource_names: name.into_iter().collect(),
                        ..PolicyRule::default()
                    },
                });
            }
        }
    }
    (missing.is_empty(), missing)
}

/// Upstream's compact form of a rule in escalation messages:
/// `{APIGroups:[""], Resources:["secrets"], Verbs:["get"]}`.
pub fn compact(rule: &PolicyRule) -> String {
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut parts = Vec::new();
    if !rule.api_groups.is_empty() {
        parts.push(format!("APIGroups:[{}]", list(&rule.api_groups)));
    }
    if !rule.resources.is_empty() {
        parts.push(format!("Resources:[{}]", list(&rule.resources)));
    }
    if !rule.resource_names.is_empty() {
        parts.push(format!("ResourceNames:[{}]", list(&rule.resource_names)));
    }
    if !rule.non_resource_urls.is_empty() {
        parts.push(format!(
            "NonResourceURLs:[{}]",
            list(&rule.non_resource_urls)
        ));
    }
    parts.push(format!("Verbs:[{}]", list(&rule.verbs)));
    format!("{{{}}}", parts.join(", "))
}

/// The escalation error's text: `user "bob" (groups=["dev" "system:authenticated"]) is
/// attempting to grant RBAC permissions not currently held:` and the missing rules.
pub fn escalation_message(user: &Identity, missing: &[PolicyRule], errors: &[String]) -> String {
    let groups = user
        .groups
        .iter()
        .map(|g| format!("{g:?}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut text = format!(
        "user {:?} (groups=[{groups}]) is attempting to grant RBAC permissions not currently held:",
        user.user
    );
    for rule in missing {
        text.push('\n');
        text.push_str(&compact(rule));
    }
    if !errors.is_empty() {
        text.push_str(&format!("; resolution errors: [{}]", errors.join(" ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(verbs: &[&str], groups: &[&str], resources: &[&str]) -> PolicyRule {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        PolicyRule {
            verbs: v(verbs),
            api_groups: v(groups),
            resources: v(resources),
            ..PolicyRule::default()
        }
    }

    fn binding(ns: &str, role_kind: &str, role: &str, subjects: Vec<Subject>) -> Binding {
        Binding {
            name: format!("{role}-binding"),
            namespace: ns.into(),
            role_ref: RoleRef {
                api_group: GROUP.into(),
                kind: role_kind.into(),
                name: role.into(),
            },
            subjects,
        }
    }

    fn subject(kind: &str, name: &str, ns: &str) -> Subject {
        Subject {
            kind: kind.into(),
            name: name.into(),
            namespace: ns.into(),
            api_group: String::new(),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let r = rule(&["get", "list"], &[""], &["pods", "pods/log"]);
        let a = Attributes::resource("get", "", "pods/log", "ns").named("p");
        assert!(rule_allows(&r, &a));
        assert!(!rule_allows(
            &r,
            &Attributes::resource("get", "", "pods/exec", "ns")
        ));
        assert!(!rule_allows(
            &r,
            &Attributes::resource("delete", "", "pods", "ns")
        ));
        assert!(!rule_allows(
            &r,
            &Attributes::resource("get", "apps", "pods", "ns")
        ));
        let any_status = rule(&["*"], &["*"], &["*/status"]);
        assert!(rule_allows(
            &any_status,
            &Attributes::resource("update", "apps", "deployments/status", "")
        ));
        assert!(!rule_allows(
            &any_status,
            &Attributes::resource("update", "apps", "deployments", "")
        ));
        let mut named = rule(&["get"], &[""], &["configmaps"]);
        named.resource_names = vec!["a".into()];
        assert!(rule_allows(
            &named,
            &Attributes::resource("get", "", "configmaps", "x").named("a")
        ));
        assert!(!rule_allows(
            &named,
            &Attributes::resource("get", "", "configmaps", "x").named("b")
        ));
        assert!(!rule_allows(
            &named,
            &Attributes::resource("get", "", "configmaps", "x")
        ));
        let urls = PolicyRule {
            verbs: vec!["get".into()],
            non_resource_urls: vec!["/healthz".into(), "/apis/*".into()],
            ..PolicyRule::default()
        };
        assert!(rule_allows(
            &urls,
            &Attributes::non_resource("get", "/healthz")
        ));
        assert!(rule_allows(
            &urls,
            &Attributes::non_resource("get", "/apis/apps/v1")
        ));
        assert!(!rule_allows(
            &urls,
            &Attributes::non_resource("get", "/metrics")
        ));
        assert!(!rule_allows(
            &urls,
            &Attributes::non_resource("post", "/healthz")
        ));
    }

    #[test]
    fn bindings_apply_by_user_group_and_service_account() {
        let mut p = Policy::default();
        p.cluster_roles.insert(
            "view".into(),
            Arc::new(vec![rule(&["get", "list"], &[""], &["pods"])]),
        );
        p.roles.insert(
            ("dev".into(), "cm".into()),
            Arc::new(vec![rule(&["*"], &[""], &["configmaps"])]),
        );
        p.cluster_bindings.push(binding(
            "",
            "ClusterRole",
            "view",
            vec![subject("Group", "viewers", "")],
        ));
        p.bindings.insert(
            "dev".into(),
            vec![
                binding(
                    "dev",
                    "ClusterRole",
                    "view",
                    vec![subject("User", "alice", "")],
                ),
                binding(
                    "dev",
                    "Role",
                    "cm",
                    vec![subject("ServiceAccount", "ci", "")],
                ),
                binding("dev", "Role", "gone", vec![subject("User", "alice", "")]),
            ],
        );
        let alice = Identity::new("alice", &["system:authenticated"]);
        let list_dev = Attributes::resource("list", "", "pods", "dev");
        let list_prod = Attributes::resource("list", "", "pods", "prod");
        assert!(p.authorize(&alice, &list_dev).allowed());
        let denied = p.authorize(&alice, &list_prod);
        assert_eq!(denied, Decision::NoOpinion(String::new()));
        // A binding whose role is missing is named in the reason of a denial.
        let d = p.authorize(&alice, &Attributes::resource("delete", "", "pods", "dev"));
        assert!(
            d.reason()
                .contains("role.rbac.authorization.k8s.io \"gone\" not found"),
            "{d:?}"
        );
        let viewer = Identity::new("bob", &["viewers"]);
        assert!(p.authorize(&viewer, &list_prod).allowed());
        let ci = Identity::service_account("dev", "ci");
        assert!(
            p.authorize(
                &ci,
                &Attributes::resource("create", "", "configmaps", "dev")
            )
            .allowed()
        );
        assert!(
            !p.authorize(
                &ci,
                &Attributes::resource("create", "", "configmaps", "prod")
            )
            .allowed()
        );
        let other = Identity::service_account("prod", "ci");
        assert!(
            !p.authorize(
                &other,
                &Attributes::resource("create", "", "configmaps", "dev")
            )
            .allowed()
        );
        let (rules, errors) = p.rules_for(&alice, "dev");
        assert_eq!(rules.len(), 1);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn coverage_for_escalation_checks() {
        let owner = vec![
            rule(&["get", "list"], &[""], &["pods", "configmaps"]),
            rule(&["*"], &["apps"], &["*"]),
        ];
        assert!(covers(&owner, &[rule(&["get"], &[""], &["pods"])]).0);
        assert!(
            covers(
                &owner,
                &[rule(&["delete"], &["apps"], &["deployments/scale"])]
            )
            .0
        );
        let (ok, missing) = covers(
            &owner,
            &[rule(&["get", "delete"], &[""], &["pods", "secrets"])],
        );
        assert!(!ok);
        assert_eq!(missing.len(), 3);
        assert_eq!(
            compact(&missing[0]),
            "{APIGroups:[\"\"], Resources:[\"secrets\"], Verbs:[\"get\"]}"
        );
        // A wildcard asked for needs a wildcard held.
        assert!(!covers(&owner, &[rule(&["get"], &["*"], &["pods"])]).0);
        let mut named = rule(&["get"], &[""], &["secrets"]);
        named.resource_names = vec!["s".into()];
        assert!(covers(&[named.clone()], &[named.clone()]).0);
        assert!(!covers(&[named], &[rule(&["get"], &[""], &["secrets"])]).0);
        let all = vec![
            rule(&["*"], &["*"], &["*"]),
            PolicyRule {
                verbs: vec!["*".into()],
                non_resource_urls: vec!["*".into()],
                ..PolicyRule::default()
            },
        ];
        assert!(covers(&all, &owner).0);
    }
}
