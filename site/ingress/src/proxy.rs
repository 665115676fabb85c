//! The request path: a request's host and path pick a route ([`crate::routes`]), the route a
//! Service port (by weight), the Service's ready endpoints one endpoint (round robin; one that
//! cannot be reached is skipped), and the request goes there over HTTP/1.1: directly to an
//! endpoint on this node, through the mesh to one on another node. Connections to endpoints
//! are kept for reuse. Upgrades (WebSocket) are passed through on a connection of their own.
//! `X-Forwarded-For/-Proto/-Host/-Port` and `X-Real-IP` tell the backend about the client.
//! What cannot be served gets a plain-text page saying what is missing (404, 502, 503, 504).
//! A request body larger than the route's limit (the node's `--ingress-max-body-size`, or the
//! Ingress's `nginx.ingress.kubernetes.io/proxy-body-size`) gets 413, declared or streamed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use edgemesh::dial::Dialer;
use edgemesh::services::{Backend, ServicePort};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::routes::{
    BackendRef, Filter, HeaderEdit, PathMatch, PathRewrite, PortRef, RequestView, Route, Table,
};

pub type Body = BoxBody<Bytes, hyper::Error>;
/// A request body on its way to a backend (limited or not).
type Upstream = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Endpoints tried for one request before answering 502.
const ATTEMPTS: usize = 3;
/// Idle connections kept per endpoint.
const POOL_PER_ENDPOINT: usize = 32;
/// How long a backend may take to answer a request's headers.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request body a route takes unless told otherwise (Cloudflare's plan default;
/// ingress-nginx's 1 MiB turns away ordinary uploads).
pub const DEFAULT_MAX_BODY: u64 = 100 << 20;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// What every request handler shares.
pub struct Shared {
    pub table: RwLock<Arc<Table>>,
    pub ports: watch::Receiver<Arc<Vec<ServicePort>>>,
    pub dialer: Dialer,
    /// The largest request body (0: no limit) where a route says nothing.
    pub max_body: u64,
    turns: Mutex<HashMap<String, usize>>,
    pool: Mutex<HashMap<Backend, Vec<SendRequest<Upstream>>>>,
}

impl Shared {
    pub fn new(ports: watch::Receiver<Arc<Vec<ServicePort>>>, dialer: Dialer) -> Self {
        Self {
            table: RwLock::new(Arc::new(Table::default())),
            ports,
            dialer,
            max_body: DEFAULT_MAX_BODY,
            turns: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
        }
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The ready endpoints of a Service port, or what is missing.
    fn endpoints(&self, backend: &BackendRef) -> Result<Vec<Backend>, String> {
        let ports = self.ports.borrow().clone();
        let mut service_seen = false;
        for port in ports
            .iter()
            .filter(|p| p.cluster_ip.is_ipv4() || ports.len() == 1)
        {
            if port.namespace != backend.namespace || port.service != backend.service {
                continue;
            }
            service_seen = true;
            let matches = match &backend.port {
                PortRef::Number(n) => port.port == *n,
                PortRef::Name(name) => &port.port_name == name,
            };
            if matches {
                return if port.backends.is_empty() {
                    Err(format!("Service {backend} has no ready endpoints"))
                } else {
                    Ok(port.backends.clone())
                };
            }
        }
        Err(if service_seen {
            format!(
                "Service {}/{} has no port {}",
                backend.namespace, backend.service, backend.port
            )
        } else {
            format!(
                "Service {}/{} does not exist (or has no cluster IP)",
                backend.namespace, backend.service
            )
        })
    }

    /// Endpoints to try, in round-robin order.
    fn order(&self, backend: &BackendRef, endpoints: Vec<Backend>) -> Vec<Backend> {
        let start = {
            let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            let turn = turns.entry(backend.to_string()).or_default();
            *turn = turn.wrapping_add(1);
            *turn
        };
        let n = endpoints.len();
        (0..n.min(ATTEMPTS))
            .map(|i| endpoints[(start + i) % n].clone())
            .collect()
    }

    /// A connection ready for a request to `endpoint`: a kept one, or a new one.
    async fn sender(&self, endpoint: &Backend) -> std::io::Result<SendRequest<Upstream>> {
        {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(kept) = pool.get_mut(endpoint) {
                kept.retain(|s| !s.is_closed());
                if let Some(i) = kept.iter().position(|s| s.is_ready()) {
                    return Ok(kept.swap_remove(i));
                }
            }
        }
        let stream = self.dialer.connect(endpoint).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "backend connection ended");
            }
        });
        Ok(sender)
    }

    fn keep(&self, endpoint: Backend, sender: SendRequest<Upstream>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let kept = pool.entry(endpoint).or_default();
        if kept.len() < POOL_PER_ENDPOINT {
            kept.push(sender);
        }
    }
}

/// A plain-text answer.
pub fn page(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut text = text.into();
    text.push('\n');
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The request's host, lowercase and without a port.
fn host_of(request: &Request<Incoming>) -> String {
    let raw = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default().to_string()
    } else {
        raw.rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(raw.as_str(), |(h, _)| h)
            .to_string()
    };
    host.to_ascii_lowercase()
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Drops hop-by-hop headers (and those `Connection` names); keeps the upgrade pair when asked.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Picks a backend of `route` by weight.
fn weighted(route: &Route, shared: &Shared) -> Option<BackendRef> {
    let total: u32 = route.backends.iter().map(|b| b.weight).sum();
    if total == 0 {
        return None;
    }
    if route.backends.len() == 1 {
        return route.backends.first().cloned();
    }
    let mut turns = shared.turns.lock().unwrap_or_else(|e| e.into_inner());
    // Smooth deterministic spreading: a counter per route walks the weights.
    let turn = turns
        .entry(format!("route {} {:?}", route.source, route.path))
        .or_default();
    *turn = turn.wrapping_add(1);
    let mut point = (*turn as u32) % total;
    for backend in &route.backends {
        if point < backend.weight {
            return Some(backend.clone());
        }
        point -= backend.weight;
    }
    route.backends.last().cloned()
}

/// Serves one request from `client` that arrived over `scheme` on `port`.
pub async fn handle(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
    client: SocketAddr,
    scheme: &'static str,
    port: u16,
) -> Result<Response<Body>, std::convert::Infallible> {
    let host = host_of(&request);
    let path = request.uri().path().to_string();
    let table = shared.table();
    let view = RequestView {
        scheme,
        host: &host,
        path: &path,
        method: request.method().as_str(),
        headers: request.headers(),
        query: request.uri().query(),
    };
    let Some(route) = table.route(&view) else {
        return Ok(page(
            StatusCode::NOT_FOUND,
            format!(
                "404 Not Found: no Ingress or HTTPRoute rule for host {host:?} and path {path:?}, and no default backend"
            ),
        ));
    };
    for filter in &route.filters {
        match filter {
            Filter::Redirect {
                scheme: to_scheme,
                hostname,
                port: to_port,
                status,
                path: rewrite,
            } => {
                let scheme = to_scheme.as_deref().unwrap_or(scheme);
                let hostname = hostname.as_deref().unwrap_or(&host);
                // The port stays when neither it nor the scheme is changed.
                let port = to_port.or_else(|| {
                    (to_scheme.is_none() && ![80, 443].contains(&port)).then_some(port)
                });
                let path = rewritten(&path, &route.path, rewrite.as_ref());
                let mut location = match port {
                    Some(p) => format!("{scheme}://{hostname}:{p}{path}"),
                    None => format!("{scheme}://{hostname}{path}"),
                };
                if let Some(query) = request.uri().query() {
                    location.push('?');
                    location.push_str(query);
                }
                let mut response = page(
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND),
                    format!("Redirecting to {location}"),
                );
                if let Ok(value) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, value);
                }
                return Ok(response);
            }
            Filter::RequestHeaders(edit) => edit_headers(request.headers_mut(), edit),
            Filter::Rewrite {
                hostname,
                path: rewrite,
            } => {
                if let Some(hostname) = hostname
                    && let Ok(value) = HeaderValue::from_str(hostname)
                {
                    request.headers_mut().insert(header::HOST, value);
                }
                if rewrite.is_some() {
                    let path = rewritten(&path, &route.path, rewrite.as_ref());
                    let uri = match request.uri().query() {
                        Some(q) => format!("{path}?{q}"),
                        None => path,
                    };
                    if let Ok(uri) = uri.parse() {
                        *request.uri_mut() = uri;
                    }
                }
            }
            Filter::ResponseHeaders(_) => {}
        }
    }
    let response_edits: Vec<HeaderEdit> = route
        .filters
        .iter()
        .filter_map(|f| match f {
            Filter::ResponseHeaders(edit) => Some(edit.clone()),
            _ => None,
        })
        .collect();
    let Some(backend) = weighted(route, &shared) else {
        return Ok(page(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "500 Internal Server Error: {} sends this request to no backend (none given, or all of weight 0)",
                route.source
            ),
        ));
    };
    let endpoints = match shared.endpoints(&backend) {
        Ok(endpoints) => endpoints,
        Err(why) => {
            return Ok(page(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("503 Service Unavailable: {why} ({})", route.source),
            ));
        }
    };

    let limit = route.max_body.unwrap_or(shared.max_body);
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if limit > 0
        && let Some(length) = declared.filter(|l| *l > limit)
    {
        return Ok(too_large(length.to_string(), limit, &route.source));
    }

    let upgrade = is_upgrade(request.headers());
    let original_host = request.headers().get(header::HOST).cloned().or_else(|| {
        request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(host) = &original_host {
        parts.headers.insert(header::HOST, host.clone());
        parts.headers.insert("x-forwarded-host", host.clone());
    }
    let client_ip = HeaderValue::from_str(&client.ip().to_string()).expect("an IP is a header");
    parts.headers.insert("x-forwarded-for", client_ip.clone());
    parts.headers.insert("x-real-ip", client_ip);
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static(scheme));
    parts
        .headers
        .insert("x-forwarded-port", HeaderValue::from(port));
    parts.version = http::Version::HTTP_11;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    parts.uri = path_and_query
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));

    // The first endpoint that takes a connection gets the request.
    let mut last_error = String::new();
    let mut connected = None;
    for endpoint in shared.order(&backend, endpoints) {
        let attempt = if upgrade {
            fresh_upgrade_sender(&shared, &endpoint).await
        } else {
            shared.sender(&endpoint).await
        };
        match attempt {
            Ok(sender) => {
                connected = Some((endpoint, sender));
                break;
            }
            Err(error) => {
                tracing::info!(%backend, endpoint = %SocketAddr::new(endpoint.ip, endpoint.port), %error, "endpoint unreachable; trying another");
                last_error = format!("{}:{}: {error}", endpoint.ip, endpoint.port);
            }
        }
    }
    let Some((endpoint, mut sender)) = connected else {
        return Ok(page(
            StatusCode::BAD_GATEWAY,
            format!(
                "502 Bad Gateway: no endpoint of Service {backend} could be reached ({last_error})"
            ),
        ));
    };
    let body: Upstream = match usize::try_from(limit) {
        Ok(limit) if limit > 0 => Limited::new(body, limit).boxed(),
        _ => body.map_err(Into::into).boxed(),
    };
    let upstream = Request::from_parts(parts, body);
    let response = match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(upstream)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(error)) if over_limit(&error) => {
            return Ok(too_large(
                format!("more than {limit}"),
                limit,
                &route.source,
            ));
        }
        Ok(Err(error)) => {
            return Ok(page(
                StatusCode::BAD_GATEWAY,
                format!(
                    "502 Bad Gateway: Service {backend} endpoint {}:{} failed: {error}",
                    endpoint.ip, endpoint.port
                ),
            ));
        }
        Err(_) => {
            return Ok(page(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "504 Gateway Timeout: Service {backend} did not answer within {} s",
                    RESPONSE_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    if !upgrade {
        shared.keep(endpoint, sender);
    }
    let mut response = response;
    if upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let backend_upgrade = hyper::upgrade::on(&mut response);
        if let Some(client_upgrade) = client_upgrade {
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, backend_upgrade) {
                    Ok((client, backend)) => {
                        let mut client = TokioIo::new(client);
                        let mut backend = TokioIo::new(backend);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                    }
                    Err(error) => tracing::debug!(%error, "upgrade failed"),
                }
            });
        }
        let (parts, body) = response.into_parts();
        return Ok(Response::from_parts(parts, body.boxed()));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    for edit in &response_edits {
        edit_headers(&mut parts.headers, edit);
    }
    Ok(Response::from_parts(parts, body.boxed()))
}

/// 413 for a body of `size` bytes where `limit` is the most `source`'s route takes.
fn too_large(size: String, limit: u64, source: &str) -> Response<Body> {
    let mut response = page(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "413 Content Too Large: the request body is {size} bytes and {source} takes at most {limit} (the annotation {} on the Ingress, or the node's --ingress-max-body-size, raise it; 0 is no limit)",
            crate::routes::BODY_SIZE_ANNOTATION
        ),
    );
    // The rest of the body is not read: the client must not send the next request here.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Whether a backend request failed because its body went over the limit.
fn over_limit(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = cause {
        if e.is::<LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Gateway API header edits: set replaces, add appends, remove drops.
fn edit_headers(headers: &mut HeaderMap, edit: &HeaderEdit) {
    for (name, value) in &edit.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &edit.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    for name in &edit.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a redirect's or rewrite's path change.
fn rewritten(path: &str, matched: &PathMatch, rewrite: Option<&PathRewrite>) -> String {
    match (rewrite, matched) {
        (None, _) => path.to_string(),
        (Some(PathRewrite::Full(full)), _) => full.clone(),
        (Some(PathRewrite::Prefix(with)), PathMatch::Prefix(prefix)) => {
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix.as_str()).unwrap_or(path)
            };
            let joined = format!(
                "{}/{}",
                with.trim_end_matches('/'),
                rest.trim_start_matches('/')
            );
            if joined.len() > 1 && !rest.is_empty() {
                joined
            } else {
                let trimmed = joined.trim_end_matches('/');
                if trimmed.is_empty() {
                    "/".to_string()
                } else {
                    trimmed.to_string()
                }
            }
        }
        (Some(PathRewrite::Prefix(with)), PathMatch::Exact(_)) => with.clone(),
    }
}

/// A connection of its own for a request that upgrades (it leaves HTTP afterwards).
async fn fresh_upgrade_sender(
    shared: &Shared,
    endpoint: &Backend,
) -> std::io::Result<SendRequest<Upstream>> {
    let stream = shared.dialer.connect(endpoint).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upgraded backend connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_keep_the_rest_of_the_path() {
        let prefix = PathMatch::prefix("/old");
        let to = |with: &str| PathRewrite::Prefix(with.to_string());
        assert_eq!(
            rewritten("/old/a/b", &prefix, Some(&to("/new"))),
            "/new/a/b"
        );
        assert_eq!(rewritten("/old", &prefix, Some(&to("/new"))), "/new");
        assert_eq!(rewritten("/old/", &prefix, Some(&to("/"))), "/");
        assert_eq!(rewritten("/old/x", &prefix, Some(&to("/"))), "/x");
        let full = PathRewrite::Full("/fixed".into());
        assert_eq!(rewritten("/old/x", &prefix, Some(&full)), "/fixed");
        assert_eq!(rewritten("/old/x", &prefix, None), "/old/x");
    }

    #[test]
    fn hop_by_hop_headers_go_and_upgrades_stay_when_asked() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let mut plain = headers.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(plain.contains_key("x-kept"));
        headers.insert("connection", HeaderValue::from_static("Upgrade"));
        assert!(is_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
    }
}
