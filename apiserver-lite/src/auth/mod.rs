//! Who is asking, and what they may do.
//!
//! Every request passes, in order: request info ([`crate::http::request::RequestInfo`]),
//! authentication ([`authn`]: client certificates, static tokens, ServiceAccount tokens, else
//! anonymous), impersonation ([`impersonation`]), authorization ([`authorizer`]: privileged
//! groups, then the Node authorizer ([`node`]), then RBAC ([`rbac`] on the cache of the RBAC
//! objects)). The HTTP side of the pipeline is `http::pipeline`; this module holds the decisions,
//! most of them pure.
//!
//! Start at [`authorizer::Authorizer::authorize`].

pub mod authn;
pub mod authorizer;
pub mod impersonation;
pub mod node;
pub mod policy;
pub mod rbac;

use std::collections::BTreeMap;

pub use authn::{
    AuthError, TokenAuthenticator, certificate_serial, certificate_serial_pem,
    identity_from_certificate,
};

/// Every authenticated user is in this group.
pub const AUTHENTICATED: &str = "system:authenticated";
/// Requests without credentials are made by this user, in [`UNAUTHENTICATED`].
pub const ANONYMOUS: &str = "system:anonymous";
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
/// Members may do everything; no policy object can take that away (upstream's privileged group).
pub const MASTERS: &str = "system:masters";
pub const NODES: &str = "system:nodes";
pub const NODE_PREFIX: &str = "system:node:";
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
pub const SERVICE_ACCOUNTS: &str = "system:serviceaccounts";

/// A user as the authenticators, impersonation and the reviews see it (upstream's `user.Info`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Identity {
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Identity {
    pub fn new(user: impl Into<String>, groups: &[&str]) -> Self {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Identity::default()
        }
    }

    /// The server's own identity: what start-up work and the server's own writes run as.
    pub fn loopback() -> Self {
        Identity::new("system:apiserver", &[MASTERS, AUTHENTICATED])
    }

    /// The user of a request without credentials.
    pub fn anonymous() -> Self {
        Identity::new(ANONYMOUS, &[UNAUTHENTICATED])
    }

    /// A node agent: `system:node:<name>` in `system:nodes`.
    pub fn node(name: &str) -> Self {
        Identity::new(format!("{NODE_PREFIX}{name}"), &[NODES, AUTHENTICATED])
    }

    /// A ServiceAccount, with the groups its tokens carry.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Identity::new(
            format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}"),
            &[
                SERVICE_ACCOUNTS,
                &format!("{SERVICE_ACCOUNTS}:{namespace}"),
                AUTHENTICATED,
            ],
        )
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The node name of a node agent's identity.
    pub fn node_name(&self) -> Option<&str> {
        self.user
            .strip_prefix(NODE_PREFIX)
            .filter(|_| self.in_group(NODES))
    }

    /// `(namespace, name)` of a ServiceAccount user name.
    pub fn service_account_of(user: &str) -> Option<(&str, &str)> {
        let rest = user.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
        let (namespace, name) = rest.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains(':'))
            .then_some((namespace, name))
    }

    /// The JSON `userInfo` of reviews (`username`, `uid`, `groups`, `extra`).
    pub fn user_info(&self) -> serde_json::Value {
        let mut info = serde_json::json!({"username": self.user, "groups": self.groups});
        if !self.uid.is_empty() {
            info["uid"] = self.uid.clone().into();
        }
        if !self.extra.is_empty() {
            info["extra"] = serde_json::json!(self.extra);
        }
        info
    }
}

/// What is being asked, as an authorizer sees it (upstream's `authorizer.Attributes`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Attributes {
    pub verb: String,
    /// Resource requests name a group, resource, ...; the others a path.
    pub resource_request: bool,
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub path: String,
    /// The `field=value` requirements of a list or watch's field selector (the Node authorizer
    /// lets a node list only its own pods and devices).
    pub fields: Vec<(String, String)>,
}

impl Attributes {
    pub fn resource(verb: &str, api_group: &str, resource: &str, namespace: &str) -> Self {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Attributes {
            verb: verb.into(),
            resource_request: true,
            api_group: api_group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            ..Attributes::default()
        }
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    pub fn non_resource(verb: &str, path: &str) -> Self {
        Attributes {
            verb: verb.into(),
            path: path.into(),
            ..Attributes::default()
        }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.as_str())
    }

    /// `pods` or `pods/log`.
    pub fn resource_and_subresource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// An authorizer's answer. `NoOpinion` lets the next authorizer decide; the last one's
/// `NoOpinion` is a denial.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow(String),
    Deny(String),
    NoOpinion(String),
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    pub fn reason(&self) -> &str {
        match self {
            Decision::Allow(r) | Decision::Deny(r) | Decision::NoOpinion(r) => r,
        }
    }
}

/// Upstream's Forbidden message for a denied request: `pods is forbidden: User "u" cannot list
/// resource "pods" in API group "" in the namespace "prod"` (plus `: <reason>` when the
/// authorizer gave one).
pub fn forbidden_message(user: &str, attributes: &Attributes, reason: &str) -> String {
    let what = if !attributes.resource_request {
        format!(
            "forbidden: User {user:?} cannot {} path {:?}",
            attributes.verb, attributes.path
        )
    } else {
        let resource = attributes.resource_and_subresource();
        let scope = if attributes.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace {:?}", attributes.namespace)
        };
        let target = crate::error::qualified(&attributes.resource, &attributes.api_group);
        let subject = if attributes.name.is_empty() {
            target
        } else {
            format!("{target} {:?}", attributes.name)
        };
        format!(
            "{subject} is forbidden: User {user:?} cannot {} resource {resource:?} in API group {:?} {scope}",
            attributes.verb, attributes.api_group
        )
    };
    if reason.is_empty() {
        what
    } else {
        format!("{what}: {reason}")
    }
}

/// The 403 of a denied request, with upstream's details.
pub fn forbidden(user: &str, attributes: &Attributes, reason: &str) -> crate::error::ApiError {
    let mut e = crate::error::ApiError::forbidden(forbidden_message(user, attributes, reason));
    if attributes.resource_request {
        e = e.with_details(crate::error::Details {
            name: attributes.name.clone(),
            group: attributes.api_group.clone(),
            kind: attributes.resource.clone(),
            ..Default::default()
        });
    }
    e
}

/// A 403 about one object, as upstream's `NewForbidden`: `roles.rbac.authorization.k8s.io "x" is
/// forbidden: <why>`.
pub fn forbidden_error(
    qualified: &str,
    name: &str,
    group: &str,
    resource: &str,
    why: impl std::fmt::Display,
) -> crate::error::ApiError {
    let message = if name.is_empty() {
        format!("{qualified} is forbidden: {why}")
    } else {
        format!("{qualified} {name:?} is forbidden: {why}")
    };
    crate::error::ApiError::forbidden(message).with_details(crate::error::Details {
        name: name.to_string(),
        group: group.to_string(),
        kind: resource.to_string(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_messages_read_as_upstream() {
        let a = Attributes::resource("list", "", "pods", "prod");
        assert_eq!(
            forbidden_message("system:serviceaccount:dev:ci", &a, ""),
            "pods is forbidden: User \"system:serviceaccount:dev:ci\" cannot list resource \"pods\" in API group \"\" in the namespace \"prod\""
        );
        let a = Attributes::resource("get", "apps", "deployments/scale", "").named("web");
        assert_eq!(
            forbidden_message("bob", &a, "no"),
            "deployments.apps \"web\" is forbidden: User \"bob\" cannot get resource \"deployments/scale\" in API group \"apps\" at the cluster scope: no"
        );
        let a = Attributes::non_resource("get", "/metrics");
        assert_eq!(
            forbidden_message("system:anonymous", &a, ""),
            "forbidden: User \"system:anonymous\" cannot get path \"/metrics\""
        );
    }

    #[test]
    fn service_account_names() {
        assert_eq!(
            Identity::service_account_of("system:serviceaccount:dev:ci"),
            Some(("dev", "ci"))
        );
        assert_eq!(
            Identity::service_account_of("system:serviceaccount:dev"),
            None
        );
        assert_eq!(Identity::node("n1").node_name(), Some("n1"));
        assert_eq!(Identity::new("system:node:n1", &[]).node_name(), None);
    }
}
