//! Forwarding one HTTP request over a byte stream, as the proxy subresources do
//! (`pods/NAME[:PORT]/proxy`, `services/NAME[:PORT]/proxy`) and as a cloud hub's cluster proxy
//! does over a site's link: the request goes out as HTTP/1.1 without its hop-by-hop headers and
//! the caller's credentials, the answer comes back streamed, and an upgrade (WebSocket, SPDY) is
//! bridged byte for byte once both sides switched.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderName, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::ApiServer;
use crate::error::ApiError;
use crate::storage::object_key;

/// The longest a proxied connection may take to open.
const CONNECT: Duration = Duration::from_secs(10);

/// Headers that describe one hop, not the request (RFC 9110 7.6.1), and the caller's own
/// credentials and impersonation, which the proxying server has already resolved.
pub fn dropped(name: &HeaderName) -> bool {
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

/// Sends `request` over `io` to `uri` (a path and query) with `host` as its Host and `extra`
/// headers added; returns the answer. The error says what failed, for the caller's message.
pub async fn send_over<IO>(
    io: IO,
    mut request: http::Request<Body>,
    uri: &str,
    host: &str,
    extra: Vec<(HeaderName, HeaderValue)>,
) -> Result<http::Response<Body>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let upgrading = request.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection.with_upgrades());

    let (parts, body) = request.into_parts();
    let mut inner = http::Request::builder()
        .method(parts.method)
        .uri(uri)
        .version(http::Version::HTTP_11);
    for (name, value) in &parts.headers {
        // An upgrade keeps its Connection header; otherwise it names this hop only.
        if !dropped(name) && (upgrading || name != header::CONNECTION) {
            inner = inner.header(name, value);
        }
    }
    inner = inner.header(
        header::HOST,
        HeaderValue::from_str(host).map_err(|e| e.to_string())?,
    );
    for (name, value) in extra {
        inner = inner.header(name, value);
    }
    let inner = inner.body(body).map_err(|e| e.to_string())?;
    let mut response = sender
        .send_request(inner)
        .await
        .map_err(|e| e.to_string())?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err("the far end switched protocols unasked".into());
        };
        let far_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (client, far) = match tokio::try_join!(client_upgrade, far_upgrade) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%error, "proxied upgrade failed");
                    return;
                }
            };
            let _ =
                tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(far))
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

/// `[scheme:]name[:port]`, the name part of a proxy path (upstream's SplitSchemeNamePort).
#[derive(Debug, PartialEq)]
pub struct Target<'a> {
    pub scheme: &'a str,
    pub name: &'a str,
    pub port: &'a str,
}

pub fn split_target(spec: &str) -> Option<Target<'_>> {
    let parts: Vec<&str> = spec.split(':').collect();
    let target = match parts.as_slice() {
        [name] => Target {
            scheme: "",
            name,
            port: "",
        },
        [name, port] => Target {
            scheme: "",
            name,
            port,
        },
        [scheme, name, port] => Target { scheme, name, port },
        _ => return None,
    };
    (!target.name.is_empty() && matches!(target.scheme, "" | "http" | "https")).then_some(target)
}

async fn load(
    server: &ApiServer,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Result<Arc<Value>, ApiError> {
    let stored = server
        .storage
        .get(&object_key("", resource, namespace, name))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    stored
        .map(|s| s.object)
        .ok_or_else(|| ApiError::not_found(resource, "", name))
}

/// The target a proxy path names (`what`: "pod" or "service"), plain HTTP only.
fn target_of<'a>(spec: &'a str, what: &str) -> Result<Target<'a>, ApiError> {
    let target = split_target(spec)
        .ok_or_else(|| ApiError::bad_request(format!("invalid {what} proxy target {spec:?}")))?;
    if target.scheme == "https" {
        return Err(ApiError::bad_request(
            "proxying to https: endpoints is not supported by this EdgeSite release; \
             use http: (or no scheme)",
        ));
    }
    Ok(target)
}

/// The path and query the far end is asked for.
fn far_uri(tail: &str, query: Option<&str>) -> String {
    match query {
        Some(q) if !q.is_empty() => format!("/{tail}?{q}"),
        _ => format!("/{tail}"),
    }
}

/// A pod's port as a byte stream, through the pod's node agent.
async fn connect_pod(
    server: &ApiServer,
    namespace: &str,
    pod: &Value,
    name: &str,
    port: u16,
) -> Result<link::pipe::BodyIo<Body>, ApiError> {
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::service_unavailable(format!("pod {name} does not have a host assigned"))
        })?;
    let connection = server.nodes.get(node).ok_or_else(|| {
        ApiError::service_unavailable(format!(
            "the node agent of {node} is not connected to this server"
        ))
    })?;
    let uid = pod
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let io = tokio::time::timeout(
        CONNECT,
        crate::streams::connect_pod(connection, namespace, name, uid, port),
    )
    .await
    .map_err(|_| {
        ApiError::service_unavailable(format!("pod {name}: port {port} did not answer"))
    })?;
    io.map_err(|e| ApiError::service_unavailable(format!("pod {name}: {e}")))
}

fn proxy_failed(what: &str, error: String) -> ApiError {
    ApiError::new(
        502,
        "BadGateway",
        format!("error trying to reach {what}: {error}"),
    )
}

/// `pods/[scheme:]NAME[:PORT]/proxy/TAIL`: the request, sent to the pod's port (the first
/// declared container port when none is named, else 80), through the pod's node agent.
pub async fn pod(
    server: &ApiServer,
    namespace: &str,
    spec: &str,
    tail: &str,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, ApiError> {
    let target = target_of(spec, "pod")?;
    let pod = load(server, "pods", namespace, target.name).await?;
    let port = if target.port.is_empty() {
        pod.pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|c| c.pointer("/ports/0/containerPort").and_then(Value::as_u64))
            .unwrap_or(80)
    } else {
        target.port.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "pod proxy port {:?} is not a number (name a port of a Service through \
                 services/NAME:PORT/proxy)",
                target.port
            ))
        })?
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad_request(format!("invalid port {port}")))?;
    let io = connect_pod(server, namespace, &pod, target.name, port).await?;
    let host = match pod.pointer("/status/podIP").and_then(Value::as_str) {
        Some(ip) if !ip.is_empty() => format!("{ip}:{port}"),
        _ => format!("{}:{port}", target.name),
    };
    let uri = far_uri(tail, request.uri().query());
    send_over(io, request, &uri, &host, Vec::new())
        .await
        .map_err(|e| proxy_failed(&format!("pod {}:{port}", target.name), e))
}

/// `services/[scheme:]NAME[:PORT]/proxy/TAIL`: the request, sent to one ready endpoint of the
/// Service's port (by name or number; the only port when none is named), through the
/// endpoint pod's node agent (or straight to an address that is not a pod).
pub async fn service(
    server: &ApiServer,
    namespace: &str,
    spec: &str,
    tail: &str,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, ApiError> {
    let target = target_of(spec, "service")?;
    let service = load(server, "services", namespace, target.name).await?;
    if service.pointer("/spec/type").and_then(Value::as_str) == Some("ExternalName") {
        return Err(ApiError::bad_request(format!(
            "service {} is of type ExternalName: it has no endpoints to proxy to",
            target.name
        )));
    }
    let ports: Vec<&Value> = service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let port_name = if target.port.is_empty() {
        match ports.as_slice() {
            [only] => only["name"].as_str().unwrap_or_default().to_string(),
            _ => String::new(),
        }
    } else {
        ports
            .iter()
            .find(|p| {
                p["name"].as_str() == Some(target.port)
                    || p["port"].as_u64().map(|n| n.to_string()).as_deref() == Some(target.port)
            })
            .map(|p| p["name"].as_str().unwrap_or_default().to_string())
            .ok_or_else(|| {
                ApiError::service_unavailable(format!(
                    "no endpoints available for service \"{}\": it has no port {:?}",
                    target.name, target.port
                ))
            })?
    };
    let no_endpoints = || {
        ApiError::service_unavailable(format!(
            "no endpoints available for service \"{}\"",
            target.name
        ))
    };
    let endpoints = load(server, "endpoints", namespace, target.name)
        .await
        .map_err(|_| no_endpoints())?;
    // Every ready address serving the port, with the port number there.
    let mut candidates: Vec<(&Value, u16)> = Vec::new();
    for subset in endpoints["subsets"].as_array().into_iter().flatten() {
        let Some(number) = subset["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str().unwrap_or_default() == port_name)
            .and_then(|p| p["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for address in subset["addresses"].as_array().into_iter().flatten() {
            candidates.push((address, number));
        }
    }
    if candidates.is_empty() {
        return Err(no_endpoints());
    }
    let pick = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(0)
        % candidates.len();
    let (address, port) = candidates[pick];
    let ip = address["ip"].as_str().unwrap_or_default();
    let host = format!("{ip}:{port}");
    let uri = far_uri(tail, request.uri().query());
    let what = format!("service {}:{port}", target.name);
    let pod_ref = address["targetRef"]
        .as_object()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("Pod"));
    if let Some(pod_ref) = pod_ref {
        let name = pod_ref
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let pod_namespace = pod_ref
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or(namespace);
        let pod = load(server, "pods", pod_namespace, name).await?;
        let io = connect_pod(server, pod_namespace, &pod, name, port).await?;
        return send_over(io, request, &uri, &host, Vec::new())
            .await
            .map_err(|e| proxy_failed(&what, e));
    }
    // An address the Service's users wrote themselves: dialled from this server.
    let stream = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(&host))
        .await
        .map_err(|_| proxy_failed(&what, format!("{host} did not answer")))?
        .map_err(|e| proxy_failed(&what, e.to_string()))?;
    send_over(stream, request, &uri, &host, Vec::new())
        .await
        .map_err(|e| proxy_failed(&what, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_names_split_like_upstream() {
        let t = |scheme, name, port| Some(Target { scheme, name, port });
        assert_eq!(split_target("web"), t("", "web", ""));
        assert_eq!(split_target("web:80"), t("", "web", "80"));
        assert_eq!(split_target("web:http"), t("", "web", "http"));
        assert_eq!(split_target("https:web:443"), t("https", "web", "443"));
        assert_eq!(split_target("http:web:"), t("http", "web", ""));
        assert_eq!(split_target("ftp:web:21"), None);
        assert_eq!(split_target(":80"), None);
        assert_eq!(split_target("a:b:c:d"), None);
    }
}
