//! The site's side of the cloud link: dial the hub, and serve over the link what the hub asks
//! for: the site's cursor and sync ([`CURSOR_PATH`], [`SYNC_PATH`]), its status stream
//! ([`STATUS_PATH`]) and its API for the cluster proxy ([`API_PATH`]). The site keeps running the
//! same whether the link is up or not.
//!
//! The protocol side is the same for every site; what holds the site's state is a [`Backend`]:
//! [`ApiBackend`], the site's own API server, in the product; simulated sites in the benchmarks
//! bring their own.

pub mod apply;
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

use crate::protocol::{
    API_PATH, CURSOR_PATH, Cursor, HEARTBEAT, HOLDINGS_PATH, Holdings, LABELS_HEADER, ObjectStatus,
    SERVERS_PATH, STATUS_PATH, SYNC_PATH, Servers, StatusMessage, SyncBatch, SyncReply,
};

/// The identity the link acts as at the site: it may impersonate (the proxy's callers) and
/// read what the status reports.
pub const LINK_USER: &str = "system:edgesite:cloud-link";

/// How often the site's list of APIs is looked at again.
const API_CHECK: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the objects the hub placed are looked at for status changes when the backend
/// cannot say when something changed.
const WORK_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// The least time between two looks, so a busy site reports at most once a second.
const LOOK_GAP: std::time::Duration = std::time::Duration::from_secs(1);
/// The largest sync batch a site takes.
const MAX_BATCH: usize = 64 * 1024 * 1024;

/// What a site holds and reports: the protocol calls these.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The hub revision everything up to which is applied here (0: send everything).
    async fn cursor(&self) -> Result<u64, String>;
    /// Applies a batch, answering the cursor recorded once it is committed.
    async fn apply(&self, batch: SyncBatch) -> Result<u64, String>;
    /// Each Work held and the version applied.
    async fn holdings(&self) -> Result<BTreeMap<String, String>, String>;
    /// The site's state in Karmada's Cluster status fields (without conditions).
    async fn cluster_status(&self) -> Result<Value, String>;
    /// The Works the site holds.
    async fn works(&self) -> BTreeMap<String, apply::WorkRecord>;
    /// What the site holds of one Work (checking, and putting back, what drifted).
    async fn report(&self, work: &str, record: &apply::WorkRecord) -> Vec<ObjectStatus>;
    /// Serves one HTTP/1.1 connection to the site's API for the cluster proxy; false when the
    /// site has none.
    fn serve_api(&self, io: link::pipe::BodyIo<Body>) -> bool;
    /// Returns once something at the site may have changed what the status stream reports, or
    /// after `at_most`; by default after a fixed interval.
    async fn changed(&self, at_most: std::time::Duration) {
        tokio::time::sleep(WORK_CHECK.saturating_sub(LOOK_GAP).min(at_most)).await;
    }
}

/// A site's own API server as its [`Backend`].
pub struct ApiBackend {
    api: Arc<ApiServer>,
    client: kube::Client,
    applier: apply::Applier,
    /// apiEnablements and when they were listed.
    apis: tokio::sync::Mutex<(Value, Option<std::time::Instant>)>,
    /// Fires on committed changes at the site (its datastore's change feed, followed from the
    /// first [`Backend::changed`] on).
    changes: Arc<tokio::sync::Notify>,
    following: std::sync::OnceLock<()>,
}

impl ApiBackend {
    pub fn new(api: Arc<ApiServer>) -> ApiBackend {
        let client = kube::Client::new(
            apiserver_lite::http::in_process(api.clone(), identity()),
            "default",
        );
        ApiBackend {
            applier: apply::Applier::new(client.clone()),
            client,
            api,
            apis: tokio::sync::Mutex::new((Value::Null, None)),
            changes: Arc::default(),
            following: std::sync::OnceLock::new(),
        }
    }
}

#[async_trait::async_trait]
impl Backend for ApiBackend {
    async fn cursor(&self) -> Result<u64, String> {
        self.applier.cursor().await.map_err(|e| e.to_string())
    }

    async fn apply(&self, batch: SyncBatch) -> Result<u64, String> {
        self.applier.apply(batch).await.map_err(|e| e.to_string())
    }

    async fn holdings(&self) -> Result<BTreeMap<String, String>, String> {
        self.applier.holdings().await.map_err(|e| e.to_string())
    }

    async fn cluster_status(&self) -> Result<Value, String> {
        let apis = {
            let mut apis = self.apis.lock().await;
            if apis.1.is_none_or(|t| t.elapsed() >= API_CHECK) {
                match status::api_enablements(&self.client).await {
                    Ok(found) => *apis = (found, Some(std::time::Instant::now())),
                    Err(error) => tracing::warn!(%error, "cloud link: list the site's APIs"),
                }
            }
            apis.0.clone()
        };
        cluster_status(&self.client, &apis)
            .await
            .map_err(|e| e.to_string())
    }

    async fn works(&self) -> BTreeMap<String, apply::WorkRecord> {
        self.applier.works().await
    }

    async fn report(&self, work: &str, record: &apply::WorkRecord) -> Vec<ObjectStatus> {
        self.applier.report(work, record).await
    }

    async fn changed(&self, at_most: std::time::Duration) {
        self.following.get_or_init(|| {
            tokio::spawn(crate::changes::wake_on(
                self.api.storage.clone(),
                |key| !crate::changes::bookkeeping(key),
                self.changes.clone(),
                self.api.shutdown.clone(),
            ));
        });
        let _ = tokio::time::timeout(at_most, self.changes.notified()).await;
    }

    fn serve_api(&self, io: link::pipe::BodyIo<Body>) -> bool {
        let api = apiserver_lite::http::in_process(self.api.clone(), identity());
        let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let api = api.clone();
            async move {
                use tower::ServiceExt;
                if !request.headers().contains_key("impersonate-user") {
                    return Ok::<_, std::convert::Infallible>(
                        apiserver_lite::http::error_response(
                            &apiserver_lite::error::ApiError::forbidden(
                                "requests through the cloud link must name the hub's caller (Impersonate-User)",
                            ),
                        ),
                    );
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
        true
    }
}

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
    /// Where the link keeps the hub's servers it learned (a restart while the hub server it
    /// was given is down reaches another).
    pub servers_file: Option<std::path::PathBuf>,
}

#[derive(Clone)]
struct Site {
    backend: Arc<dyn Backend>,
    shutdown: CancellationToken,
    /// Where the hub's servers are kept ([`SiteConfig::servers_file`]).
    servers_file: Option<std::path::PathBuf>,
}

fn identity() -> Identity {
    Identity::new(LINK_USER, &[MASTERS, AUTHENTICATED])
}

/// Asks the hub for a new certificate for `csr_pem`'s key, over a connection of its own made
/// with the current one (which stops working once the new one is signed): the new
/// certificate (PEM) and the hub server that signed it. The hub server the site was given is
/// asked first, then, while they cannot be reached, the others the link learned.
pub async fn renew(
    config: &SiteConfig,
    csr_pem: &str,
    password: &str,
) -> Result<(String, String), link::LinkError> {
    let tls = link::dial::client_tls(&config.ca_pem, &config.cert_pem, &config.key_pem)?;
    let mut candidates = vec![config.hub.clone()];
    if let Some(file) = &config.servers_file {
        candidates.extend(
            link::dial::remembered(file)
                .into_iter()
                .filter(|s| *s != config.hub),
        );
    }
    let body = serde_json::json!({"csr": csr_pem, "password": password}).to_string();
    let mut unreachable = None;
    for server in candidates {
        let (host, _) = link::dial::host_port(&server)?;
        let dial = link::dial::DialConfig {
            server: server.clone(),
            path: apiserver_lite::cloud_link::SITE_RENEW_PATH.into(),
            protocol: String::new(),
            headers: Vec::new(),
            tls: tls.clone(),
            proxy: link::dial::proxy_from_env(&host),
            remember: None,
        };
        let reply = match link::dial::post_json(
            &dial,
            apiserver_lite::cloud_link::SITE_RENEW_PATH,
            body.clone().into_bytes(),
        )
        .await
        {
            Ok(reply) => reply,
            // Never reached: nothing was signed, the next server may answer.
            Err(error @ link::LinkError::Connect { .. }) => {
                tracing::warn!(%server, %error, "certificate renewal: trying another hub server");
                unreachable = Some(error);
                continue;
            }
            Err(error) => return Err(error),
        };
        let reply: serde_json::Value = serde_json::from_slice(&reply)
            .map_err(|e| link::LinkError::Http(format!("the hub's answer: {e}")))?;
        let certificate = reply["certificate"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| link::LinkError::Http("the hub's answer has no certificate".into()))?;
        return Ok((certificate, server));
    }
    Err(unreachable.unwrap_or(link::LinkError::Closed))
}

/// Keeps the link to the hub up until `shutdown`.
pub async fn run(
    config: SiteConfig,
    backend: Arc<dyn Backend>,
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
        remember: config.servers_file.clone(),
    };
    let site = Site {
        backend,
        shutdown: shutdown.clone(),
        servers_file: config.servers_file.clone(),
    };
    let router = axum::Router::new()
        .route(STATUS_PATH, axum::routing::get(status_stream))
        .route(API_PATH, axum::routing::post(api_stream))
        .route(CURSOR_PATH, axum::routing::get(cursor))
        .route(SYNC_PATH, axum::routing::post(sync))
        .route(HOLDINGS_PATH, axum::routing::get(holdings))
        .route(SERVERS_PATH, axum::routing::put(servers))
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

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{what}: {error}")).into_response()
}

fn json_answer(value: &impl serde::Serialize) -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).unwrap_or_default(),
    )
        .into_response()
}

/// `GET /edgesite/v1/link/cursor`.
/// The hub's servers now: kept for the link's next connection (and the next renewal).
async fn servers(State(site): State<Site>, request: Request) -> Response {
    let body = match axum::body::to_bytes(request.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(error) => return bad_request(format!("the servers: {error}")),
    };
    let named: Servers = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(error) => return bad_request(format!("the servers: {error}")),
    };
    if let Some(bad) = named
        .servers
        .iter()
        .find(|s| link::dial::host_port(s).is_err())
    {
        return bad_request(format!("the servers: {bad:?} is not https://HOST:PORT"));
    }
    if let Some(file) = &site.servers_file
        && !named.servers.is_empty()
        && link::dial::remembered(file) != named.servers
    {
        if let Err(error) = link::dial::remember(file, &named.servers) {
            return unavailable("keeping the hub's servers", error);
        }
        tracing::info!(servers = ?named.servers, "cloud link: the hub's servers changed");
    }
    json_answer(&named)
}

async fn cursor(State(site): State<Site>) -> Response {
    match site.backend.cursor().await {
        Ok(revision) => json_answer(&Cursor { revision }),
        Err(error) => unavailable("the site's cursor", error),
    }
}

/// `GET /edgesite/v1/link/holdings`.
async fn holdings(State(site): State<Site>) -> Response {
    match site.backend.holdings().await {
        Ok(works) => json_answer(&Holdings { works }),
        Err(error) => unavailable("what the site holds", error),
    }
}

/// `POST /edgesite/v1/link/sync`: applies a batch, answers after the site's API committed it.
async fn sync(State(site): State<Site>, request: Request) -> Response {
    let body = match axum::body::to_bytes(request.into_body(), MAX_BATCH).await {
        Ok(b) => b,
        Err(error) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, error.to_string()).into_response();
        }
    };
    let batch: SyncBatch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not a sync batch: {error}"),
            )
                .into_response();
        }
    };
    match site.backend.apply(batch).await {
        Ok(revision) => json_answer(&SyncReply { revision }),
        Err(error) => unavailable("applying the batch", error),
    }
}

/// `GET /edgesite/v1/link/status`: one line per change (the site's cluster status, the status
/// of what each Work placed), a heartbeat line when nothing changed for [`HEARTBEAT`].
async fn status_stream(State(site): State<Site>) -> Response {
    let (mut tx, rx) = futures::channel::mpsc::channel::<bytes::Bytes>(4);
    tokio::spawn(async move {
        let mut last: Option<Value> = None;
        let mut cluster_checked: Option<std::time::Instant> = None;
        let mut spoke = std::time::Instant::now();
        let mut works_sent: std::collections::HashMap<String, Value> = Default::default();
        loop {
            let mut messages = Vec::new();
            if cluster_checked.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
                cluster_checked = Some(std::time::Instant::now());
                match site.backend.cluster_status().await {
                    Ok(status) if last.as_ref() != Some(&status) => {
                        last = Some(status.clone());
                        messages.push(StatusMessage::Cluster { status });
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "cloud link: the site's status"),
                }
            }
            let works = site.backend.works().await;
            works_sent.retain(|name, _| works.contains_key(name));
            for (name, record) in &works {
                let objects = site.backend.report(name, record).await;
                let value = serde_json::to_value(&objects).unwrap_or_default();
                if works_sent.get(name) != Some(&value) {
                    works_sent.insert(name.clone(), value);
                    messages.push(StatusMessage::Work {
                        name: name.clone(),
                        binding: record.binding.clone(),
                        objects,
                    });
                }
            }
            if messages.is_empty() && spoke.elapsed() >= HEARTBEAT {
                messages.push(StatusMessage::Heartbeat);
            }
            for message in messages {
                let mut line = serde_json::to_vec(&message).unwrap_or_default();
                line.push(b'\n');
                if tx.send(line.into()).await.is_err() {
                    return;
                }
                spoke = std::time::Instant::now();
            }
            // Look again when something changed at the site (drift is put back then too), at
            // most once a second, and at least every heartbeat.
            tokio::select! {
                _ = site.shutdown.cancelled() => return,
                _ = async {
                    tokio::time::sleep(LOOK_GAP).await;
                    site.backend.changed(HEARTBEAT).await;
                } => {}
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
    if !site.backend.serve_api(io) {
        return (StatusCode::NOT_FOUND, "this site has no API to proxy to").into_response();
    }
    (StatusCode::OK, Body::new(out)).into_response()
}
