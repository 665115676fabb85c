//! The cluster proxy's hub side: one stream on the site's link carries one HTTP/1.1 connection
//! to the site's API ([`link::pipe`]); the caller's request goes over it with the caller's
//! identity as impersonation headers, and its answer (a stream, a watch, or an upgrade to a
//! SPDY or WebSocket session for exec, attach and port-forward) comes back the same way.

use axum::body::Body;
use http::{HeaderName, HeaderValue, StatusCode};

use apiserver_lite::auth::Identity;
use apiserver_lite::error::ApiError;

use crate::protocol::API_PATH;

fn unavailable(site: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::service_unavailable(format!("site {site:?}: {what}"))
}

/// Sends `request` to `site` as `identity`.
pub async fn forward(
    peer: &link::accept::Peer<Body>,
    site: &str,
    identity: &Identity,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, ApiError> {
    let path = apiserver_lite::cloud_link::proxied_path(request.uri())
        .ok_or_else(|| ApiError::bad_request("not a cluster proxy path"))?;
    // The stream to the site's API.
    let (writer, to_site) = link::pipe::channel();
    let opened = peer
        .call(
            http::Request::post(API_PATH)
                .body(Body::new(to_site))
                .map_err(|e| ApiError::internal(e.to_string()))?,
        )
        .await
        .map_err(|e| unavailable(site, e))?;
    if opened.status() != StatusCode::OK {
        return Err(unavailable(
            site,
            format!("the site refused the proxy stream ({})", opened.status()),
        ));
    }
    let io = link::pipe::BodyIo::new(opened.into_body(), writer);

    // The caller's request, as the caller.
    let header = |name: &str, value: &str| -> Result<(HeaderName, HeaderValue), ApiError> {
        Ok((
            HeaderName::try_from(name).map_err(|e| ApiError::bad_request(e.to_string()))?,
            HeaderValue::try_from(value).map_err(|e| ApiError::bad_request(e.to_string()))?,
        ))
    };
    let mut impersonation = vec![header("impersonate-user", &identity.user)?];
    if !identity.uid.is_empty() {
        impersonation.push(header("impersonate-uid", &identity.uid)?);
    }
    for group in &identity.groups {
        impersonation.push(header("impersonate-group", group)?);
    }
    for (key, values) in &identity.extra {
        let name = format!("impersonate-extra-{}", percent_encode(key));
        for value in values {
            impersonation.push(header(&name, value)?);
        }
    }
    apiserver_lite::http::proxy::send_over(io, request, &path, "site", impersonation)
        .await
        .map_err(|e| unavailable(site, e))
}

/// Impersonate-Extra keys are percent-encoded (upstream's rule: what is not a legal header
/// name character).
fn percent_encode(key: &str) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~!#$&'*+^`|".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
