//! The HTTP face of the API server: routing, the request pipeline, content negotiation, TLS
//! serving.
//!
//! [`router`]: the joining endpoints (`/cacerts`, `/edgesite/v1/node-join`, outside the
//! Kubernetes API as K3s's supervisor has them), then every other request through the layers of
//! [`pipeline`] (request info, metrics, authentication, impersonation, authorization) into
//! [`dispatch`], which hands resource requests to [`resources`] (reads and writes), [`watch`]
//! (streams) or [`discovery`]. Errors become a `v1 Status` in one place, [`error_response`].
//! [`serve`] runs the router behind rustls with client-certificate identities; [`in_process`]
//! is the same router as a tower service with an identity of its own.

pub mod admission;
mod bare_errors;
pub mod decode;
pub mod discovery;
pub mod join;
pub mod list_options;
pub mod listener;
pub mod pipeline;
pub mod proxy;
pub mod request;
pub mod resources;
pub mod reviews;
pub mod watch;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::auth::authorizer::Authorizer;
use crate::auth::{Identity, TokenAuthenticator};
use crate::error::ApiError;
use crate::openapi::OpenApi;
use crate::registry::Registry;
use crate::storage::Storage;
use pipeline::{RequestContext, TransportIdentity};
use request::{Output, Route};

pub use listener::serve;

/// Request bodies above this are refused with 413, as upstream does.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// The Kubernetes version this server speaks.
pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "33";
pub const KUBE_GIT_VERSION: &str = "v1.33.0+edgesite";

/// Shared state of one API server.
pub struct ApiServer {
    pub registry: Registry,
    pub storage: Arc<dyn Storage>,
    pub tokens: TokenAuthenticator,
    /// Decides every request (RBAC, the Node authorizer) from caches the store's watch keeps.
    pub authorizer: Arc<Authorizer>,
    pub openapi: OpenApi,
    /// The OpenAPI v2 document, built from `openapi`'s when first asked after a change.
    pub openapi_v2: crate::openapi_v2::Cache,
    /// Service cluster IPs and node ports.
    pub services: crate::services::Allocator,
    /// Signs and verifies ServiceAccount tokens, once a key is configured.
    pub service_account_tokens: std::sync::OnceLock<crate::service_accounts::TokenIssuer>,
    pub shutdown: CancellationToken,
    /// Set once start-up work (default namespaces) is done; `/readyz` answers 200 after it.
    pub ready: std::sync::atomic::AtomicBool,
    /// Connected node agents (logs, exec, port-forward go through them).
    pub nodes: Arc<crate::node_streams::NodeStreams>,
    /// The cluster CA (PEM), served at `/cacerts` for agents to pin against their join token.
    pub ca_pem: std::sync::OnceLock<String>,
    /// Signs node certificates for agents that join with a token.
    pub node_join: std::sync::OnceLock<Arc<dyn crate::node_streams::NodeJoin>>,
    /// Signs site certificates for sites that attach with a token (a cloud hub).
    pub site_join: std::sync::OnceLock<Arc<dyn crate::node_streams::NodeJoin>>,
    /// Set on a server whose state is in an embedded etcd: other servers may join it.
    pub server_join: std::sync::OnceLock<Arc<dyn crate::node_streams::ServerJoin>>,
    /// Failed join attempts per client address.
    pub join_failures: join::Failures,
    /// Request counters and latencies (`/metrics`).
    pub request_metrics: crate::metrics::Shared,
    /// The cloud hub's side of sites' links and the cluster proxy (`edgesite cloudhub` only).
    pub hub: std::sync::OnceLock<Arc<dyn crate::cloud_link::Hub>>,
    /// Work that ends after `shutdown` (withdrawing from the `kubernetes` Service's endpoints):
    /// the binary awaits it with [`ApiServer::finished`] before it exits.
    pub finishing: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The live API servers sharing this datastore (this one too), as the `kubernetes`
    /// endpoints last said ([`crate::api_endpoints`]).
    pub api_servers: std::sync::RwLock<Vec<std::net::SocketAddr>>,
}

impl ApiServer {
    pub fn new(
        storage: Arc<dyn Storage>,
        tokens: TokenAuthenticator,
        services: crate::services::ServiceNetwork,
        shutdown: CancellationToken,
    ) -> Self {
        let registry = Registry::new();
        let openapi = OpenApi::new(&registry);
        ApiServer {
            registry,
            storage,
            tokens,
            authorizer: Authorizer::new(),
            openapi,
            openapi_v2: Default::default(),
            services: crate::services::Allocator::new(services),
            service_account_tokens: std::sync::OnceLock::new(),
            shutdown,
            ready: std::sync::atomic::AtomicBool::new(false),
            nodes: Arc::default(),
            ca_pem: std::sync::OnceLock::new(),
            node_join: std::sync::OnceLock::new(),
            site_join: std::sync::OnceLock::new(),
            server_join: std::sync::OnceLock::new(),
            join_failures: join::Failures::default(),
            request_metrics: Arc::default(),
            hub: std::sync::OnceLock::new(),
            finishing: std::sync::Mutex::default(),
            api_servers: std::sync::RwLock::default(),
        }
    }

    /// Waits for the work that ends after `shutdown`.
    pub async fn finished(&self) {
        let tasks = std::mem::take(&mut *self.finishing.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// The router: the joining endpoints, then the pipeline's layers around one fallback handler
/// that does its own path parsing, like upstream's mux.
pub fn router(server: Arc<ApiServer>) -> Router {
    let api = Router::new()
        .fallback(dispatch)
        .layer(pipeline::PipelineLayer::new(server.clone()));
    Router::new()
        .route("/cacerts", axum::routing::any(cacerts))
        .route(
            "/edgesite/v1/node-join",
            axum::routing::any(join::node_join),
        )
        .route(
            "/edgesite/v1/site-join",
            axum::routing::any(join::site_join),
        )
        .route(
            "/edgesite/v1/server-join",
            axum::routing::any(join::server_join),
        )
        .fallback_service(api.with_state(server.clone()))
        .with_state(server)
}

/// The cluster CA, for joining agents to pin against their token's hash (no identity yet).
async fn cacerts(State(server): State<Arc<ApiServer>>) -> Response {
    match server.ca_pem.get() {
        Some(pem) => (StatusCode::OK, pem.clone()).into_response(),
        None => error_response(&ApiError::no_route()),
    }
}

pub fn json_response(code: StatusCode, value: &Value) -> Response {
    let body = crate::go_json::to_vec(value);
    (
        code,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A response with `body` (streamed or whole) of `content_type`.
pub fn body_response(code: StatusCode, content_type: &'static str, body: Body) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

pub fn error_response(e: &ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(code, &e.status());
    if e.code == 429
        && let Some(after) = e.details.as_ref().and_then(|d| d.retry_after_seconds)
        && let Ok(v) = HeaderValue::from_str(&after.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Encodes a response object in the negotiated form (JSON or YAML; tables are built by callers).
pub fn encode(code: StatusCode, value: &Value, output: Output) -> Response {
    match output {
        Output::Yaml => match serde_yaml::to_string(value) {
            Ok(text) => (
                code,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/yaml"),
                )],
                text,
            )
                .into_response(),
            Err(e) => error_response(&ApiError::internal(e.to_string())),
        },
        Output::Protobuf => match crate::protobuf::encode(value) {
            Ok(body) => (
                code,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(crate::protobuf::CONTENT_TYPE),
                )],
                body,
            )
                .into_response(),
            // Custom resources have no protobuf form (as upstream: 406).
            Err(_) => error_response(&ApiError::not_acceptable(crate::protobuf::CONTENT_TYPE)),
        },
        _ => json_response(code, value),
    }
}

fn health(server: &ApiServer, route: &Route) -> Response {
    let ready = server.ready.load(std::sync::atomic::Ordering::Acquire);
    // Liveness holds from the first moment; readiness and health wait for start-up to finish.
    let live = matches!(route, Route::Health(endpoint) if endpoint == "livez");
    if !ready && !live {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "[-]startup not finished\nhealthz check failed\n",
        )
            .into_response();
    }
    if !live
        && let Some(why) = server
            .storage
            .damaged()
            .or_else(|| server.storage.unavailable())
    {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("[-]datastore failed: {why}\nhealthz check failed\n"),
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        "ok",
    )
        .into_response()
}

fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": KUBE_GIT_VERSION,
        "gitCommit": env!("EDGESITE_GIT_COMMIT"),
        "gitTreeState": "clean",
        "buildDate": env!("EDGESITE_BUILD_DATE"),
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, go_arch()),
    })
}

/// Go's name for this machine's architecture, as Kubernetes reports it.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

/// A ServiceAccount token: signed by us, unexpired, and its account (and bound object) still
/// there with the same uid.
pub(crate) async fn service_account_identity(
    server: &ApiServer,
    authorization: &str,
) -> Option<Identity> {
    let issuer = server.service_account_tokens.get()?.issuer().to_string();
    service_account_identity_for(server, authorization, &issuer).await
}

/// The identity of a ServiceAccount token meant for `audience` (a TokenReview may ask for
/// others than the API server's own).
pub(crate) async fn service_account_identity_for(
    server: &ApiServer,
    authorization: &str,
    audience: &str,
) -> Option<Identity> {
    let token = authorization.strip_prefix("Bearer ")?.trim();
    let issuer = server.service_account_tokens.get()?;
    if !crate::service_accounts::looks_like_jwt(token) {
        return None;
    }
    let claims = issuer.verify(token, audience, chrono::Utc::now().timestamp())?;
    let exists = |resource: &'static str, name: String, uid: String| {
        let key = crate::storage::object_key("", resource, &claims.namespace, &name);
        async move {
            match server.storage.get(&key).await {
                Ok(Some(stored)) => {
                    stored
                        .object
                        .pointer("/metadata/uid")
                        .and_then(serde_json::Value::as_str)
                        == Some(uid.as_str())
                }
                _ => false,
            }
        }
    };
    if !exists("serviceaccounts", claims.name.clone(), claims.uid.clone()).await {
        return None;
    }
    if let Some((kind, name, uid)) = claims.bound.clone() {
        let resource = match kind.as_str() {
            "Pod" => "pods",
            "Secret" => "secrets",
            _ => return Some(claims.identity()),
        };
        if !exists(resource, name, uid).await {
            return None;
        }
    }
    Some(claims.identity())
}

async fn dispatch(State(server): State<Arc<ApiServer>>, mut request: Request) -> Response {
    let Some(context) = request.extensions_mut().remove::<RequestContext>() else {
        return error_response(&ApiError::internal("the request pipeline is incomplete"));
    };
    let route = context.route.clone();
    if matches!(route, Route::Health(_)) {
        return health(&server, &route);
    }
    if route == Route::Version {
        return json_response(StatusCode::OK, &version());
    }
    if request.uri().path() == "/edgesite/v1/node-tunnel" {
        return node_tunnel(&server, &context.user, request);
    }
    if request.uri().path() == crate::cloud_link::SITE_LINK_PATH {
        return site_link(&server, &context.user, request);
    }
    if request.uri().path() == crate::cloud_link::SITE_RENEW_PATH {
        return join::site_renew(&server, &context.user, request).await;
    }
    if request.uri().path() == "/metrics" {
        return crate::metrics::prometheus_response(server.request_metrics.render());
    }
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .map(str::to_string);
    // OpenAPI documents are JSON whatever the Accept header asks (kubectl asks protobuf for v2).
    let openapi = matches!(
        route,
        Route::OpenApiV2 | Route::OpenApiV3Index | Route::OpenApiV3(..)
    );
    let output = match request::negotiate(accept.as_deref()) {
        Some(output) => output,
        None if openapi => Output::Json,
        None => return error_response(&ApiError::not_acceptable(accept.as_deref().unwrap_or(""))),
    };
    let result = match route {
        Route::CoreGroup => Ok(discovery::core_group(&server, output)),
        Route::Groups => Ok(discovery::groups(&server, output)),
        Route::Group(group) => discovery::group(&server, &group),
        Route::ResourceList(group, version) => discovery::resource_list(&server, &group, &version),
        Route::OpenApiV2 => {
            // client-go asks for the protobuf form only; browsers and curl get JSON.
            let protobuf = accept
                .as_deref()
                .is_some_and(|a| a.contains("com.github.proto-openapi.spec.v2"));
            // Built on a blocking thread: the first build after a change takes a while.
            let server = server.clone();
            let doc =
                tokio::task::spawn_blocking(move || server.openapi_v2.document(&server.openapi))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()));
            doc.map(|doc| {
                let (content_type, body) = if protobuf {
                    (crate::openapi_v2::PROTOBUF, doc.protobuf)
                } else {
                    ("application/json", doc.json)
                };
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
                    body,
                )
                    .into_response()
            })
        }
        Route::OpenApiV3Index => Ok(json_response(StatusCode::OK, &server.openapi.index())),
        Route::OpenApiV3(group, version) => match server.openapi.document(&group, &version) {
            Some(doc) => Ok((
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                doc,
            )
                .into_response()),
            None => Err(ApiError::no_route()),
        },
        Route::Resource(path) => {
            resources::handle(server.clone(), context, path, output, request).await
        }
        Route::Unknown | Route::Version | Route::Health(_) => Err(ApiError::no_route()),
    };
    match result {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

/// The upgrade protocol of the node tunnel.
pub const NODE_TUNNEL_PROTOCOL: &str = "edgesite-tunnel";

/// `GET /edgesite/v1/node-tunnel` (Upgrade: edgesite-tunnel) from a node agent: the connection
/// becomes the server's way to the agent's HTTP API.
fn node_tunnel(server: &Arc<ApiServer>, identity: &Identity, mut request: Request) -> Response {
    let Some(node) = identity
        .user
        .strip_prefix("system:node:")
        .map(str::to_string)
    else {
        return error_response(&ApiError::forbidden(format!(
            "user \"{}\" is not a node: the tunnel is for node agents (system:node:<name>)",
            identity.user
        )));
    };
    if !link::accept::wants(request.headers(), NODE_TUNNEL_PROTOCOL) {
        return error_response(&ApiError::bad_request(
            "the node tunnel needs an HTTP/1.1 `Upgrade: edgesite-tunnel` request",
        ));
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let streams = server.nodes.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => crate::node_streams::serve_tunnel(streams, node, upgraded).await,
            Err(e) => tracing::warn!(node = %node, "node tunnel upgrade failed: {e}"),
        }
    });
    link::accept::switching(NODE_TUNNEL_PROTOCOL)
}

/// `GET /edgesite/v1/site-link` (Upgrade: edgesite-link) from a site attached to this hub.
fn site_link(server: &Arc<ApiServer>, identity: &Identity, mut request: Request) -> Response {
    use crate::cloud_link::{SITE_LINK_PROTOCOL, site_of};
    let Some(hub) = server.hub.get().cloned() else {
        return error_response(&ApiError::no_route());
    };
    let Some(site) = site_of(identity).map(str::to_string) else {
        return error_response(&ApiError::forbidden(format!(
            "user \"{}\" is not a site: the site link is for sites' certificates (system:site:<name> in group edgesite:sites), which `edgesite server --cloudhub ... --cloudhub-token ...` gets when it joins",
            identity.user
        )));
    };
    if !link::accept::wants(request.headers(), SITE_LINK_PROTOCOL) {
        return error_response(&ApiError::bad_request(
            "the site link needs an HTTP/1.1 `Upgrade: edgesite-link` request",
        ));
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    // Copies, not clones: a header value is a slice of the connection's whole read buffer,
    // which a link that keeps its headers would otherwise hold for its lifetime.
    let headers: http::HeaderMap = request
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            Some((
                name.clone(),
                HeaderValue::from_bytes(value.as_bytes()).ok()?,
            ))
        })
        .collect();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => hub.accept(site, headers, upgraded).await,
            Err(e) => tracing::warn!(site = %site, "site link upgrade failed: {e}"),
        }
    });
    let mut response: Response = link::accept::switching(SITE_LINK_PROTOCOL);
    // The hub's servers, so a site whose server dies attaches to another.
    let urls = crate::api_endpoints::server_urls(server);
    if !urls.is_empty()
        && let Ok(value) = HeaderValue::from_str(&urls.join(","))
    {
        response
            .headers_mut()
            .insert(link::dial::SERVERS_HEADER, value);
    }
    response
}

/// The router as an in-process service: no socket, no TLS, the same request path as a remote
/// client's. Requests carry `identity`, as a client certificate would: each co-located component
/// builds its `kube::Client` on this with its own (ARCHITECTURE.md, principle 1).
pub fn in_process<B>(
    server: Arc<ApiServer>,
    identity: Identity,
) -> impl tower::Service<
    http::Request<B>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let agent = HeaderValue::from_static(component_agent(&identity));
    tower::ServiceBuilder::new()
        .map_request(move |request: http::Request<B>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(TransportIdentity {
                identity: identity.clone(),
                serial: None,
            });
            // Writes without a fieldManager are recorded under the User-Agent's product, as
            // upstream's components are (not as `unknown`).
            request
                .headers_mut()
                .entry(header::USER_AGENT)
                .or_insert_with(|| agent.clone());
            request
        })
        .service(router(server))
}

/// The User-Agent of an in-process client: the upstream component its identity stands for.
fn component_agent(identity: &crate::auth::Identity) -> &'static str {
    match identity.user.as_str() {
        _ if identity.node_name().is_some() => "kubelet/v1.33.0+edgesite",
        "system:kube-scheduler" => "kube-scheduler/v1.33.0+edgesite",
        "system:apiserver" => "kube-apiserver/v1.33.0+edgesite",
        user if user.starts_with("system:serviceaccount:kube-system:") => {
            "kube-controller-manager/v1.33.0+edgesite"
        }
        _ => "edgesite/v1.33.0",
    }
}

/// Adds `Warning` headers (`299 - "text"`) to a response.
pub fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    let headers: &mut HeaderMap = response.headers_mut();
    for w in warnings {
        let text = format!("299 - {:?}", w);
        if let Ok(v) = HeaderValue::from_str(&text) {
            headers.append(header::WARNING, v);
        }
    }
    response
}
