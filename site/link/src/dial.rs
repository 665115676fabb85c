//! The dialing side: connect, upgrade, then serve HTTP/2 over the connection until it ends;
//! [`run`] keeps doing that until shut down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::LinkError;
use crate::backoff::Backoff;

/// How long a TCP connect (to the server or the proxy) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A header of the upgrade's answer: the accepting side's other servers
/// (`https://host:port,...`), which [`run`] tries when the one it was given does not answer.
pub const SERVERS_HEADER: &str = "edgesite-servers";

/// Where to dial and what to ask for.
#[derive(Clone)]
pub struct DialConfig {
    /// `https://host:port` of the accepting side.
    pub server: String,
    /// The upgrade request's path, e.g. `/edgesite/v1/node-tunnel`.
    pub path: String,
    /// The `Upgrade:` protocol, e.g. `edgesite-tunnel`.
    pub protocol: String,
    /// Extra headers of the upgrade request (what the peer says about itself).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub tls: Arc<rustls::ClientConfig>,
    /// `http://[user:password@]host:port` of an HTTPS proxy to tunnel through (CONNECT).
    pub proxy: Option<String>,
    /// Where [`run`] keeps the servers the accepting side named ([`SERVERS_HEADER`]), so a
    /// restart while the given server is down still finds the others.
    pub remember: Option<std::path::PathBuf>,
}

/// A TLS client configuration that trusts `ca_pem` and presents `cert_pem`/`key_pem`.
pub fn client_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    let bad = |e: &dyn std::fmt::Display| LinkError::Credentials(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(LinkError::Credentials("no CA certificate".into()));
    }
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| bad(&e))?
        .ok_or_else(|| LinkError::Credentials("no private key".into()))?;
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| bad(&e))?;
    // The upgrade is an HTTP/1.1 mechanism.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// `https://host:port/...` -> (host, port).
pub fn host_port(server: &str) -> Result<(String, u16), LinkError> {
    authority_host_port(server, "https://", 443)
}

fn authority_host_port(
    url: &str,
    scheme: &str,
    default_port: u16,
) -> Result<(String, u16), LinkError> {
    let bad = || LinkError::BadUrl(url.to_string());
    let rest = url.strip_prefix(scheme).ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.is_empty() {
        return Err(bad());
    }
    if let Some(v6) = authority.strip_prefix('[') {
        return match v6.split_once("]:") {
            Some((host, port)) => Ok((host.to_string(), port.parse().map_err(|_| bad())?)),
            None => Ok((v6.trim_end_matches(']').to_string(), default_port)),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse().map_err(|_| bad())?)),
        None => Ok((authority.to_string(), default_port)),
    }
}

/// The HTTPS proxy the environment names for `host` (`HTTPS_PROXY`/`https_proxy`, unless
/// `NO_PROXY`/`no_proxy` lists the host, a domain suffix of it, or `*`).
pub fn proxy_from_env(host: &str) -> Option<String> {
    let var = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
    };
    let proxy = var(&["HTTPS_PROXY", "https_proxy"])?;
    let no_proxy = var(&["NO_PROXY", "no_proxy"]).unwrap_or_default();
    let excluded = no_proxy.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        !entry.is_empty() && (entry == "*" || host == entry || host.ends_with(&format!(".{entry}")))
    });
    (!excluded).then_some(proxy)
}

async fn tcp(host: &str, port: u16) -> Result<tokio::net::TcpStream, LinkError> {
    let address = format!("{host}:{port}");
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| LinkError::Connect {
        address: address.clone(),
        reason: "timed out".into(),
    })?
    .map_err(|e| LinkError::Connect {
        address,
        reason: e.to_string(),
    })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A TCP connection to `host:port` through the proxy's CONNECT.
async fn through_proxy(
    proxy: &str,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, LinkError> {
    let fail = |reason: String| LinkError::Proxy {
        proxy: proxy.to_string(),
        reason,
    };
    let (proxy_host, proxy_port) = authority_host_port(proxy, "http://", 80)
        .map_err(|_| fail("the proxy URL must be http://HOST:PORT".into()))?;
    let mut stream = tcp(&proxy_host, proxy_port).await?;
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    let userinfo = proxy
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once('@'))
        .map(|(userinfo, _)| userinfo);
    if let Some(userinfo) = userinfo {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(userinfo);
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| fail(e.to_string()))?;
    // Read the answer's head byte by byte: nothing after it may be consumed (TLS follows).
    let mut head = Vec::new();
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                return Err(fail("the answer to CONNECT has an over-long head".into()));
            }
            let byte = stream.read_u8().await.map_err(|e| fail(e.to_string()))?;
            head.push(byte);
        }
        Ok(())
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read)
        .await
        .map_err(|_| fail("no answer to CONNECT".into()))??;
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(fail(format!("CONNECT {target} answered {status_line:?}")));
    }
    Ok(stream)
}

/// A TCP connection to `host:port`, through `proxy`'s CONNECT when given.
pub async fn tcp_to(
    host: &str,
    port: u16,
    proxy: Option<&str>,
) -> Result<tokio::net::TcpStream, LinkError> {
    match proxy {
        Some(proxy) => through_proxy(proxy, host, port).await,
        None => tcp(host, port).await,
    }
}

/// A TLS connection to the server (through the proxy if any): the stream and `host:port`.
async fn tls_to(
    config: &DialConfig,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        String,
    ),
    LinkError,
> {
    tls_connect(&config.server, config.tls.clone(), config.proxy.as_deref()).await
}

/// A TLS connection to `server` (`https://host:port`, through `proxy` if given) that verifies
/// the server by `tls`: the stream and `host:port`.
pub async fn tls_connect(
    server: &str,
    tls: Arc<rustls::ClientConfig>,
    proxy: Option<&str>,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        String,
    ),
    LinkError,
> {
    let (host, port) = host_port(server)?;
    let address = format!("{host}:{port}");
    let tcp = tcp_to(&host, port, proxy).await?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| LinkError::BadUrl(format!("{server}: {e}")))?;
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| LinkError::Tls {
        address: address.clone(),
        reason: "the handshake timed out".into(),
    })?
    .map_err(|e| LinkError::Tls {
        address: address.clone(),
        reason: e.to_string(),
    })?;
    Ok((stream, address))
}

/// The message of a refusal: a Kubernetes Status says it best in its message.
fn refusal(status: http::StatusCode, body: &[u8]) -> LinkError {
    let text = String::from_utf8_lossy(body).into_owned();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    LinkError::Refused { status, message }
}

/// One JSON request to the server outside the link, on a connection of its own with the
/// link's credentials (a site renewing its certificate): the answer's body, or the refusal.
pub async fn post_json(
    config: &DialConfig,
    path: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, LinkError> {
    use http_body_util::Full;
    let (stream, address) = tls_to(config).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let request = http::Request::post(path)
        .header(http::header::HOST, address)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| LinkError::Http(e.to_string()))?;
    let response = tokio::time::timeout(CONNECT_TIMEOUT * 3, sender.send_request(request))
        .await
        .map_err(|_| LinkError::Http("no answer".into()))??;
    let status = response.status();
    let body = read_bounded(response.into_body(), 1024 * 1024).await;
    connection.abort();
    if !status.is_success() {
        return Err(refusal(status, &body));
    }
    Ok(body)
}

/// Connects and upgrades: the returned connection is ready for [`serve`].
pub async fn connect(config: &DialConfig) -> Result<hyper::upgrade::Upgraded, LinkError> {
    Ok(connect_learning(config).await?.0)
}

/// [`connect`], with the servers the answer named ([`SERVERS_HEADER`]).
pub async fn connect_learning(
    config: &DialConfig,
) -> Result<(hyper::upgrade::Upgraded, Vec<String>), LinkError> {
    let (stream, address) = tls_to(config).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection.with_upgrades());
    let mut request = http::Request::builder()
        .method("GET")
        .uri(config.path.as_str())
        .header(http::header::HOST, address)
        .header(http::header::UPGRADE, config.protocol.as_str())
        .header(http::header::CONNECTION, "Upgrade");
    for (name, value) in &config.headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| LinkError::Http(e.to_string()))?;
    let response = sender.send_request(request).await?;
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = read_bounded(response.into_body(), 16 * 1024).await;
        connection.abort();
        return Err(refusal(status, &body));
    }
    let servers: Vec<String> = response
        .headers()
        .get(SERVERS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| s.starts_with("https://"))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let upgraded = hyper::upgrade::on(response).await?;
    drop(connection);
    Ok((upgraded, servers))
}

async fn read_bounded(body: hyper::body::Incoming, limit: usize) -> Vec<u8> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    }
}

/// Serves `service` as HTTP/2 over an upgraded connection until it closes (or a ping goes
/// unanswered for [`crate::KEEPALIVE`]).
pub async fn serve<S, B>(upgraded: hyper::upgrade::Upgraded, service: S) -> Result<(), LinkError>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(crate::KEEPALIVE))
        .keep_alive_timeout(crate::KEEPALIVE)
        .serve_connection(upgraded, service)
        .await
        .map_err(LinkError::from)
}

/// The servers saved in `file` by [`remember`] that are `https://host:port` URLs.
pub fn remembered(file: &std::path::Path) -> Vec<String> {
    crate::saved::load(file)
        .into_iter()
        .filter(|s| host_port(s).is_ok())
        .collect()
}

/// Saves the servers the other side named (`https://host:port` each) into `file`.
pub fn remember(file: &std::path::Path, servers: &[String]) -> std::io::Result<()> {
    crate::saved::save(file, servers)
}

/// Keeps the link up until `shutdown`: connect, serve a fresh service from `make` until the
/// connection ends, wait per `backoff`, again. `what` names the link in the log. When the
/// accepting side names its other servers ([`SERVERS_HEADER`]), a server that does not answer
/// is followed by the next of them (the one given first, then the others in turn).
pub async fn run<F, S, B>(
    what: &str,
    config: DialConfig,
    make: F,
    mut backoff: Backoff,
    shutdown: CancellationToken,
) where
    F: Fn() -> S,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut learned: Vec<String> = Vec::new();
    let mut next = 0usize;
    loop {
        let started = Instant::now();
        // Read each time: the other side may have named new servers over the link since.
        if let Some(file) = &config.remember {
            let saved = remembered(file);
            if !saved.is_empty() {
                learned = saved;
            }
        }
        let mut candidates = vec![config.server.clone()];
        candidates.extend(learned.iter().filter(|s| **s != config.server).cloned());
        let target = DialConfig {
            server: candidates[next % candidates.len()].clone(),
            ..config.clone()
        };
        let mut connected = false;
        let session = async {
            let (upgraded, servers) = connect_learning(&target).await?;
            connected = true;
            if !servers.is_empty() && servers != learned {
                if let Some(file) = &config.remember
                    && let Err(error) = remember(file, &servers)
                {
                    tracing::warn!(file = %file.display(), %error, "{what}: servers not saved");
                }
                learned = servers;
            }
            tracing::info!(server = %target.server, "{what} is up");
            serve(upgraded, make()).await
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session => match result {
                Ok(()) => tracing::info!(server = %target.server, "{what} closed; reconnecting"),
                Err(error) => tracing::warn!(server = %target.server, %error, "{what}: retrying"),
            },
        }
        if !connected {
            // Not answering: the next server, if the other side named any.
            next = next.wrapping_add(1);
        }
        let wait = backoff.next(started);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_split_into_host_and_port() {
        assert_eq!(
            host_port("https://10.0.0.1:6443").unwrap(),
            ("10.0.0.1".into(), 6443)
        );
        assert_eq!(
            host_port("https://site.example").unwrap(),
            ("site.example".into(), 443)
        );
        assert_eq!(
            host_port("https://[::1]:6443").unwrap(),
            ("::1".into(), 6443)
        );
        assert!(host_port("http://x:1").is_err());
        assert!(host_port("https://").is_err());
        assert_eq!(
            authority_host_port("http://u:p@proxy:3128", "http://", 80).unwrap(),
            ("proxy".into(), 3128)
        );
    }
}
