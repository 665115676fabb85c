//! The cluster proxy's hub side: one stream on the site's link carries one HTTP/1.1 connection
//! to the site's API ([`link::pipe`]); the caller's request goes over it with the caller's
//! identity as impersonation headers, and its answer (a stream, a watch, or an upgrade to a
//! SPDY or WebSocket session for exec, attach and port-forward) comes back the same way.

use axum::body::Body;
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;

use apiserver_lite::auth::Identity;
use apiserver_lite::error::ApiError;

use crate::protocol::API_PATH;

/// Headers that describe one hop, not the request (RFC 9110 7.6.1), and the caller's own
/// credentials and impersonation, which the hub has already resolved.
fn dropped(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "authorization"
            | "proxy-authorization"
    ) || name.as_str().starts_with("impersonate-")
}

fn unavailable(site: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::service_unavailable(format!("site {site:?}: {what}"))
}

/// Sends `request` to `site` as `identity`.
pub async fn forward(
    peer: &link::accept::Peer<Body>,
    site: &str,
    identity: &Identity,
    mut request: http::Request<Body>,
) -> Result<http::Response<Body>, ApiError> {
    let path = apiserver_lite::cloud_link::proxied_path(request.uri())
        .ok_or_else(|| ApiError::bad_request("not a cluster proxy path"))?;
    let upgrading = request.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));

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
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|e| unavailable(site, e))?;
    tokio::spawn(connection.with_upgrades());

    // The caller's request, as the caller.
    let (parts, body) = request.into_parts();
    let mut inner = http::Request::builder()
        .method(parts.method)
        .uri(path)
        .version(http::Version::HTTP_11);
    for (name, value) in &parts.headers {
        if !dropped(name) {
            inner = inner.header(name, value);
        }
    }
    inner = inner
        .header(header::HOST, HeaderValue::from_static("site"))
        .header("impersonate-user", &identity.user);
    if !identity.uid.is_empty() {
        inner = inner.header("impersonate-uid", &identity.uid);
    }
    for group in &identity.groups {
        inner = inner.header("impersonate-group", group);
    }
    for (key, values) in &identity.extra {
        let name = format!("impersonate-extra-{}", percent_encode(key));
        for value in values {
            inner = inner.header(name.as_str(), value);
        }
    }
    let inner = inner
        .body(body)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut response = sender
        .send_request(inner)
        .await
        .map_err(|e| unavailable(site, e))?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(unavailable(site, "the site switched protocols unasked"));
        };
        let site_upgrade = hyper::upgrade::on(&mut response);
        let site_name = site.to_string();
        tokio::spawn(async move {
            let (client, site) = match tokio::try_join!(client_upgrade, site_upgrade) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(site = %site_name, %error, "proxied upgrade failed");
                    return;
                }
            };
            let _ =
                tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(site))
                    .await;
        });
        let (parts, _) = response.into_parts();
        return Ok(http::Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = response.into_parts();
    for name in ["connection", "keep-alive", "transfer-encoding"] {
        parts.headers.remove(name);
    }
    Ok(http::Response::from_parts(parts, Body::new(body)))
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
