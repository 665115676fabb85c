//! The agent's dial-out tunnel: the agent opens a TLS connection to the API server (with its
//! node certificate), asks `GET /edgesite/v1/node-tunnel` with `Upgrade: edgesite-tunnel`, and
//! then *serves* its HTTP API (HTTP/2) over that connection. The server sends `kubectl logs`
//! (and later exec and port-forward) requests through it, so an agent behind NAT needs no
//! inbound port. Reconnects with capped, jittered back-off.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Where the server is and how to authenticate.
#[derive(Clone)]
pub struct TunnelConfig {
    /// `https://host:port`
    pub server: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn tls(config: &TunnelConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut config.ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let certs: Vec<_> = rustls_pemfile::certs(&mut config.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = rustls_pemfile::private_key(&mut config.key_pem.as_bytes())
        .map_err(|e| e.to_string())?
        .ok_or("no private key in the node key file")?;
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())?;
    // The upgrade is an HTTP/1.1 mechanism.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// `https://host:port/...` -> (host, port); also used by `edgesite agent`'s join calls.
pub fn host_port(server: &str) -> Result<(String, u16), String> {
    let rest = server
        .strip_prefix("https://")
        .ok_or_else(|| format!("the server URL {server:?} must start with https://"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6
            .split_once("]:")
            .unwrap_or((v6.trim_end_matches(']'), "443"));
        return Ok((host.to_string(), port.parse().map_err(|_| "bad port")?));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse().map_err(|_| format!("bad port in {server:?}"))?,
        )),
        None => Ok((authority.to_string(), 443)),
    }
}

/// One tunnel session: connect, upgrade, serve until the connection ends.
async fn session(
    config: &TunnelConfig,
    tls: Arc<rustls::ClientConfig>,
    router: axum::Router,
) -> Result<(), String> {
    let (host, port) = host_port(&config.server)?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("connect to {host}:{port}: timed out"))?
    .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("server name {host:?}: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, axum::body::Body>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection.with_upgrades());
    let request = http::Request::builder()
        .method("GET")
        .uri("/edgesite/v1/node-tunnel")
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::UPGRADE, "edgesite-tunnel")
        .header(http::header::CONNECTION, "Upgrade")
        .body(axum::body::Body::empty())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 16 * 1024)
            .await
            .unwrap_or_default();
        return Err(format!(
            "the server refused the tunnel: {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    drop(connection);
    tracing::info!(server = %config.server, "tunnel to the API server is up");
    let service = hyper_util::service::TowerToHyperService::new(router);
    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .serve_connection(upgraded, service)
        .await
        .map_err(|e| format!("tunnel: {e}"))
}

/// Keeps the tunnel up until `shutdown`.
pub async fn run(config: TunnelConfig, router: axum::Router, shutdown: CancellationToken) {
    let tls = match tls(&config) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("node tunnel: bad credentials: {e}");
            return;
        }
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = std::time::Instant::now();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session(&config, tls.clone(), router.clone()) => match result {
                Ok(()) => tracing::info!("tunnel to the API server closed; reconnecting"),
                Err(e) => tracing::warn!("tunnel to the API server: {e}; retrying"),
            },
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 250);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_urls_split_into_host_and_port() {
        assert_eq!(
            super::host_port("https://10.0.0.1:6443").unwrap(),
            ("10.0.0.1".into(), 6443)
        );
        assert_eq!(
            super::host_port("https://site.example").unwrap(),
            ("site.example".into(), 443)
        );
        assert_eq!(
            super::host_port("https://[::1]:6443").unwrap(),
            ("::1".into(), 6443)
        );
        assert!(super::host_port("http://x:1").is_err());
    }
}
