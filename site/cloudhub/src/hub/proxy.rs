//! The cluster proxy's hub side: one stream on the site's link carries one HTTP/1.1 connection
//! to the site's API ([`link::pipe`]); the caller's request goes over it with the caller's
//! identity as impersonation headers, and its answer (a stream, a watch, or an upgrade to a
//! SPDY or WebSocket session for exec, attach and port-forward) comes back the same way. A hub
//! server asked for a site whose link another server holds sends the request there
//! ([`to_server`]), as the caller, and that server forwards it over the link.

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
    apiserver_lite::http::proxy::send_over(io, request, &path, "site", impersonation(identity)?)
        .await
        .map_err(|e| unavailable(site, e))
}

/// Marks a cluster proxy request one hub server sent to another: it is not sent on again.
pub const FORWARDED_HEADER: &str = "edgesite-hub-forwarded";

/// Sends a cluster proxy request for `site` to `server`, the hub server that holds the site's
/// link, as `identity` (impersonated with this server's certificate).
pub async fn to_server(
    server: std::net::SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    site: &str,
    identity: &Identity,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, ApiError> {
    let uri = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let (stream, host) = link::dial::tls_connect(&format!("https://{server}"), tls, None)
        .await
        .map_err(|e| {
            unavailable(
                site,
                format!("the hub server {server} that holds its link: {e}"),
            )
        })?;
    let mut headers = impersonation(identity)?;
    headers.push(header(FORWARDED_HEADER, "1")?);
    apiserver_lite::http::proxy::send_over(stream, request, &uri, &host, headers)
        .await
        .map_err(|e| {
            unavailable(
                site,
                format!("the hub server {server} that holds its link: {e}"),
            )
        })
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ApiError> {
    Ok((
        HeaderName::try_from(name).map_err(|e| ApiError::bad_request(e.to_string()))?,
        HeaderValue::try_from(value).map_err(|e| ApiError::bad_request(e.to_string()))?,
    ))
}

/// `identity` as impersonation headers.
fn impersonation(identity: &Identity) -> Result<Vec<(HeaderName, HeaderValue)>, ApiError> {
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
    Ok(impersonation)
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
