//! The site's side of the cloud link: dial the hub, and serve over the link what the hub asks
//! for: the site's status stream ([`STATUS_PATH`]) and its API for the cluster proxy
//! ([`API_PATH`]). The site keeps running the same whether the link is up or not.

pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use http::{HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use apiserver_lite::auth::{AUTHENTICATED, Identity, MASTERS};
use apiserver_lite::http::ApiServer;

use crate::protocol::{API_PATH, HEARTBEAT, LABELS_HEADER, STATUS_PATH, StatusMessage};

/// The identity the link acts as at the site: it may impersonate (the proxy's callers) and
/// read what the status reports.
pub const LINK_USER: &str = "system:edgesite:cloud-link";

/// How often the site's list of APIs is looked at again.
const API_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Where the hub is and who this site is.
#[derive(Clone)]
pub struct SiteConfig {
    /// `https://host:port` of the hub.
    pub hub: String,
    /// The site's name (its certificate says the same).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Clone)]
struct Site {
    api: Arc<ApiServer>,
    client: kube::Client,
    shutdown: CancellationToken,
}

fn identity() -> Identity {
    Identity::new(LINK_USER, &[MASTERS, AUTHENTICATED])
}

/// Keeps the link to the hub up until `shutdown`.
pub async fn run(
    config: SiteConfig,
    api: Arc<ApiServer>,
    shutdown: CancellationToken,
) -> Result<(), link::LinkError> {
    let tls = link::dial::client_tls(&config.ca_pem, &config.cert_pem, &config.key_pem)?;
    let (host, _) = link::dial::host_port(&config.hub)?;
    let labels: Vec<String> = config
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut headers = Vec::new();
    if !labels.is_empty() {
        let value = HeaderValue::from_str(&labels.join(","))
            .map_err(|e| link::LinkError::Http(format!("site labels: {e}")))?;
        headers.push((http::HeaderName::from_static(LABELS_HEADER), value));
    }
    let dial = link::dial::DialConfig {
        server: config.hub.clone(),
        path: apiserver_lite::cloud_link::SITE_LINK_PATH.into(),
        protocol: apiserver_lite::cloud_link::SITE_LINK_PROTOCOL.into(),
        headers,
        tls,
        proxy: link::dial::proxy_from_env(&host),
    };
    let site = Site {
        client: kube::Client::new(
            apiserver_lite::http::in_process(api.clone(), identity()),
            "default",
        ),
        api,
        shutdown: shutdown.clone(),
    };
    let router = axum::Router::new()
        .route(STATUS_PATH, axum::routing::get(status_stream))
        .route(API_PATH, axum::routing::post(api_stream))
        .with_state(site);
    link::dial::run(
        "link to the cloud hub",
        dial,
        move || hyper_util::service::TowerToHyperService::new(router.clone()),
        link::backoff::Backoff::default(),
        shutdown,
    )
    .await;
    Ok(())
}

/// The site's status, as one JSON object (Karmada's Cluster status fields).
async fn cluster_status(client: &kube::Client, apis: &Value) -> Result<Value, kube::Error> {
    let version = client.apiserver_version().await?;
    let (nodes, resources) = status::summaries(client).await?;
    Ok(json!({
        "kubernetesVersion": version.git_version,
        "apiEnablements": apis,
        "nodeSummary": nodes,
        "resourceSummary": resources,
    }))
}

/// `GET /edgesite/v1/link/status`: one line per change, a heartbeat line otherwise.
async fn status_stream(State(site): State<Site>) -> Response {
    let (mut tx, rx) = futures::channel::mpsc::channel::<bytes::Bytes>(4);
    tokio::spawn(async move {
        let mut last: Option<Value> = None;
        let mut apis = Value::Null;
        let mut apis_checked: Option<std::time::Instant> = None;
        loop {
            if apis_checked.is_none_or(|t| t.elapsed() >= API_CHECK) {
                match status::api_enablements(&site.client).await {
                    Ok(found) => {
                        apis = found;
                        apis_checked = Some(std::time::Instant::now());
                    }
                    Err(error) => tracing::warn!(%error, "cloud link: list the site's APIs"),
                }
            }
            let message = match cluster_status(&site.client, &apis).await {
                Ok(status) if last.as_ref() != Some(&status) => {
                    last = Some(status.clone());
                    StatusMessage::Cluster { status }
                }
                Ok(_) => StatusMessage::Heartbeat,
                Err(error) => {
                    tracing::warn!(%error, "cloud link: the site's status");
                    StatusMessage::Heartbeat
                }
            };
            let mut line = serde_json::to_vec(&message).unwrap_or_default();
            line.push(b'\n');
            if tx.send(line.into()).await.is_err() {
                return;
            }
            tokio::select! {
                _ = site.shutdown.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    });
    let body = Body::from_stream(futures::StreamExt::map(
        rx,
        Ok::<_, std::convert::Infallible>,
    ));
    ([(http::header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// `POST /edgesite/v1/link/api`: one HTTP/1.1 connection to the site's API inside the stream.
/// Every request on it must impersonate the hub's caller; the site's RBAC decides for that
/// user.
async fn api_stream(State(site): State<Site>, request: Request) -> Response {
    let (writer, out) = link::pipe::channel();
    let io = link::pipe::BodyIo::new(request.into_body(), writer);
    let api = apiserver_lite::http::in_process(site.api.clone(), identity());
    let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let api = api.clone();
        async move {
            use tower::ServiceExt;
            if !request.headers().contains_key("impersonate-user") {
                return Ok::<_, std::convert::Infallible>(apiserver_lite::http::error_response(
                    &apiserver_lite::error::ApiError::forbidden(
                        "requests through the cloud link must name the hub's caller (Impersonate-User)",
                    ),
                ));
            }
            api.oneshot(request).await
        }
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(
                TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .with_upgrades(),
    );
    (StatusCode::OK, Body::new(out)).into_response()
}
