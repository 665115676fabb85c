//! Impersonation (`kubectl --as`, `--as-group`, `--as-uid`): the `Impersonate-*` headers, the
//! user they make and the `impersonate` checks each needs, with upstream's rules (a
//! ServiceAccount user gets its groups; everyone but `system:anonymous` is in
//! `system:authenticated`). Pure; `http::pipeline::impersonate` asks the authorizer.

use http::HeaderMap;

use super::{ANONYMOUS, AUTHENTICATED, Attributes, Identity, UNAUTHENTICATED};
use crate::error::ApiError;

/// The `Impersonate-*` headers of a request, if any.
#[derive(Debug, Default, PartialEq)]
pub struct ImpersonationRequest {
    pub user: Option<String>,
    pub groups: Vec<String>,
    pub uid: Option<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

pub fn impersonation_request(headers: &HeaderMap) -> Option<ImpersonationRequest> {
    let mut r = ImpersonationRequest::default();
    let mut any = false;
    for (name, value) in headers {
        let name = name.as_str();
        let Some(which) = name.strip_prefix("impersonate-") else {
            continue;
        };
        any = true;
        let value = value.to_str().unwrap_or_default().to_string();
        match which {
            "user" => r.user = Some(value),
            "group" => r.groups.push(value),
            "uid" => r.uid = Some(value),
            _ => {
                if let Some(key) = which.strip_prefix("extra-") {
                    // Extra keys are percent-encoded in header names (upstream's convention).
                    let key = form_urlencoded::parse(format!("k={key}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_else(|| key.to_string());
                    r.extra.entry(key).or_default().push(value);
                }
            }
        }
    }
    any.then_some(r)
}

/// The user a request impersonates and the checks it needs (`impersonate` on each).
pub fn impersonated(r: &ImpersonationRequest) -> Result<(Identity, Vec<Attributes>), ApiError> {
    let Some(user) = r.user.clone().filter(|u| !u.is_empty()) else {
        return Err(ApiError::bad_request(
            "requested impersonation of groups, a uid or extra values without impersonating a user",
        ));
    };
    let mut checks = Vec::new();
    let mut groups = r.groups.clone();
    match Identity::service_account_of(&user) {
        Some((namespace, name)) => {
            checks.push(
                Attributes::resource("impersonate", "", "serviceaccounts", namespace).named(name),
            );
            if r.groups.is_empty() {
                groups = Identity::service_account(namespace, name).groups;
                groups.retain(|g| g != AUTHENTICATED);
            }
        }
        None => checks.push(Attributes::resource("impersonate", "", "users", "").named(&user)),
    }
    for g in &r.groups {
        checks.push(Attributes::resource("impersonate", "", "groups", "").named(g));
    }
    if let Some(uid) = &r.uid {
        checks.push(
            Attributes::resource("impersonate", "authentication.k8s.io", "uids", "").named(uid),
        );
    }
    for (key, values) in &r.extra {
        for v in values {
            checks.push(
                Attributes::resource(
                    "impersonate",
                    "authentication.k8s.io",
                    &format!("userextras/{key}"),
                    "",
                )
                .named(v),
            );
        }
    }
    let everyone = if user == ANONYMOUS {
        UNAUTHENTICATED
    } else {
        AUTHENTICATED
    };
    if !groups.iter().any(|g| g == everyone) {
        groups.push(everyone.to_string());
    }
    Ok((
        Identity {
            user,
            uid: r.uid.clone().unwrap_or_default(),
            groups,
            extra: r.extra.clone(),
        },
        checks,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impersonation_headers() {
        let mut h = HeaderMap::new();
        assert!(impersonation_request(&h).is_none());
        h.insert(
            "Impersonate-User",
            "system:serviceaccount:dev:ci".parse().unwrap(),
        );
        let r = impersonation_request(&h).unwrap();
        let (user, checks) = impersonated(&r).unwrap();
        assert_eq!(
            user.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:dev",
                "system:authenticated"
            ]
        );
        assert_eq!(checks[0].resource, "serviceaccounts");
        assert_eq!(
            (checks[0].namespace.as_str(), checks[0].name.as_str()),
            ("dev", "ci")
        );
        h.insert("Impersonate-User", "bob".parse().unwrap());
        h.append("Impersonate-Group", "dev".parse().unwrap());
        h.append("Impersonate-Group", "ops".parse().unwrap());
        h.insert("Impersonate-Extra-Scopes%2Fa", "x".parse().unwrap());
        let (user, checks) = impersonated(&impersonation_request(&h).unwrap()).unwrap();
        assert_eq!(user.groups, vec!["dev", "ops", "system:authenticated"]);
        assert_eq!(user.extra.get("scopes/a").unwrap(), &vec!["x".to_string()]);
        let resources: Vec<String> = checks
            .iter()
            .map(|c| c.resource_and_subresource())
            .collect();
        assert_eq!(
            resources,
            vec!["users", "groups", "groups", "userextras/scopes/a"]
        );
        let mut only_group = HeaderMap::new();
        only_group.insert("Impersonate-Group", "dev".parse().unwrap());
        assert_eq!(
            impersonated(&impersonation_request(&only_group).unwrap())
                .unwrap_err()
                .code,
            400
        );
    }
}
