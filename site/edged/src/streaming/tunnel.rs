//! The agent's dial-out tunnel: the agent opens a TLS connection to the API server (with its
//! node certificate), asks `GET /edgesite/v1/node-tunnel` with `Upgrade: edgesite-tunnel`, and
//! then *serves* its HTTP API (HTTP/2) over that connection ([`link::dial`]). The server sends
//! logs, exec, attach, port-forward and node proxy requests through it, so an agent behind NAT
//! needs no inbound port. Reconnects with capped back-off and full jitter.

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

/// Keeps the tunnel up until `shutdown`.
pub async fn run(config: TunnelConfig, router: axum::Router, shutdown: CancellationToken) {
    let tls = match link::dial::client_tls(&config.ca_pem, &config.cert_pem, &config.key_pem) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("node tunnel: {e}");
            return;
        }
    };
    let dial = link::dial::DialConfig {
        server: config.server,
        path: "/edgesite/v1/node-tunnel".into(),
        protocol: "edgesite-tunnel".into(),
        headers: Vec::new(),
        tls,
        proxy: None,
        remember: None,
    };
    link::dial::run(
        "tunnel to the API server",
        dial,
        move || hyper_util::service::TowerToHyperService::new(router.clone()),
        link::backoff::Backoff::default(),
        shutdown,
    )
    .await;
}
