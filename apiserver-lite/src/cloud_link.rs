//! What `edgesite cloudhub` adds to the API server: the endpoint where sites' links arrive and
//! the cluster proxy. The hub's logic lives in the `cloudhub` crate behind [`Hub`]; this module
//! only checks who is asking and hands the request over.
//!
//! - `GET /edgesite/v1/site-link` with `Upgrade: edgesite-link`, from a client certificate of
//!   `system:site:<name>` in group `edgesite:sites`: the connection becomes the hub's link to
//!   that site ([`link::accept`]).
//! - `/apis/cluster.karmada.io/v1alpha1/clusters/<site>/proxy/<path>`, as Karmada serves it: any
//!   request, watch or upgrade, forwarded to the site. The pipeline has already decided that
//!   the caller may use `clusters/proxy` of that site (the hub's RBAC); the site decides what the
//!   caller may do there.

use axum::body::Body;
use futures::future::BoxFuture;

use crate::auth::Identity;
use crate::error::ApiError;

/// Karmada's group of `Cluster`s, whose `proxy` subresource is the cluster proxy.
pub const CLUSTER_GROUP: &str = "cluster.karmada.io";
pub const SITE_LINK_PATH: &str = "/edgesite/v1/site-link";
/// Where a site renews its certificate (POST, with the certificate it has and its password).
pub const SITE_RENEW_PATH: &str = "/edgesite/v1/site-renew";
pub const SITE_LINK_PROTOCOL: &str = "edgesite-link";
/// Sites' certificates carry this organization; their user is `system:site:<name>`.
pub const SITES_GROUP: &str = "edgesite:sites";
pub const SITE_PREFIX: &str = "system:site:";

/// The hub behind the two endpoints.
pub trait Hub: Send + Sync {
    /// Takes over `site`'s upgraded link; `headers` are the upgrade request's.
    fn accept(
        &self,
        site: String,
        headers: http::HeaderMap,
        upgraded: hyper::upgrade::Upgraded,
    ) -> BoxFuture<'static, ()>;

    /// Forwards `request` (whose URI is the hub's, `.../clusters/<site>/proxy/<path>`) to `site`
    /// as `identity`.
    fn proxy(
        &self,
        site: String,
        identity: Identity,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, ApiError>>;
}

/// The site a link request comes from, if `identity` is a site's.
pub fn site_of(identity: &Identity) -> Option<&str> {
    let site = identity.user.strip_prefix(SITE_PREFIX)?;
    identity
        .groups
        .iter()
        .any(|g| g == SITES_GROUP)
        .then_some(site)
        .filter(|s| !s.is_empty())
}

/// The part of a cluster proxy URI after `/proxy` (with its query), `/` at least.
pub fn proxied_path(uri: &http::Uri) -> Option<String> {
    let path = uri.path();
    let marker = "/proxy";
    let start = path.find("/clusters/")?;
    let after = &path[start + "/clusters/".len()..];
    let at = after.find(marker)?;
    let rest = &after[at + marker.len()..];
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let mut out = if rest.is_empty() {
        "/".to_string()
    } else {
        rest.to_string()
    };
    if let Some(q) = uri.query() {
        out.push('?');
        out.push_str(q);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxied_path_keeps_its_encoding_and_query() {
        let uri: http::Uri = "/apis/cluster.karmada.io/v1alpha1/clusters/shop-1/proxy/api/v1/namespaces/a%2Fb/pods?watch=1"
            .parse()
            .unwrap();
        assert_eq!(
            proxied_path(&uri).unwrap(),
            "/api/v1/namespaces/a%2Fb/pods?watch=1"
        );
        let uri: http::Uri = "/apis/cluster.karmada.io/v1alpha1/clusters/s/proxy"
            .parse()
            .unwrap();
        assert_eq!(proxied_path(&uri).unwrap(), "/");
    }

    #[test]
    fn only_site_certificates_are_sites() {
        assert_eq!(
            site_of(&Identity::new("system:site:a", &[SITES_GROUP])),
            Some("a")
        );
        assert_eq!(site_of(&Identity::new("system:site:a", &[])), None);
        assert_eq!(site_of(&Identity::new("admin", &[SITES_GROUP])), None);
    }
}
