//! The request pipeline, one tower layer ([`PipelineLayer`]) whose stages run in upstream's order:
//!
//! 1. [`request_info`]: the route and the authorization [`Attributes`] of the request, and the
//!    store's revision on arrival (denials wait for the caches to reach it);
//! 2. [`measured`]: request counters and latencies of resource requests (`/metrics`);
//! 3. [`authenticate`]: a verified client certificate or the in-process client's identity
//!    ([`TransportIdentity`]), else a bearer token (static file, then ServiceAccount JWT); no
//!    credentials make the anonymous user, bad ones a 401;
//! 4. [`impersonate`]: `Impersonate-User/-Group/-Uid/-Extra-*`, each authorized with the
//!    `impersonate` verb;
//! 5. [`authorize`]: the authorizer chain (`auth::authorizer`); 403 with upstream's message.
//!
//! What passes carries a [`RequestContext`] into the handler; later stages (admission
//! webhooks, the cloud link's identities) insert themselves here, not into handlers.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use futures::future::BoxFuture;
use http::{HeaderMap, header};
use tower::ServiceExt;

use super::request::{self, Route};
use super::{ApiServer, error_response};
use crate::auth::impersonation::{impersonated, impersonation_request};
use crate::auth::{self, Attributes, Identity};
use crate::error::ApiError;

/// The identity the connection vouches for: a client certificate verified by TLS, or the
/// identity the in-process client was built with. Remote clients cannot set it.
#[derive(Debug, Clone)]
pub struct TransportIdentity {
    pub identity: Identity,
    /// The client certificate's serial number (none for in-process callers).
    pub serial: Option<String>,
}

/// What the layers learnt about a request; the handler's input besides the request itself.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub route: Route,
    pub attributes: Arc<Attributes>,
    /// The user the request acts as (after impersonation).
    pub user: Identity,
    /// Who authenticated, when that differs from `user` (impersonation).
    pub impersonator: Option<Identity>,
    /// The store's revision when the request arrived.
    pub revision: u64,
}

/// The request pipeline as one tower layer around the handler. Its stages are plain functions
/// run in order on one future: per-stage `axum::middleware::from_fn` layers cloned and boxed the
/// whole inner stack for each stage of every request, a measurable share of a busy server's CPU.
#[derive(Clone)]
pub struct PipelineLayer {
    server: Arc<ApiServer>,
}

impl PipelineLayer {
    pub fn new(server: Arc<ApiServer>) -> Self {
        PipelineLayer { server }
    }
}

impl<S> tower::Layer<S> for PipelineLayer {
    type Service = Pipeline<S>;

    fn layer(&self, inner: S) -> Pipeline<S> {
        Pipeline {
            server: self.server.clone(),
            inner,
        }
    }
}

/// The service [`PipelineLayer`] makes: the stages, then `inner` with a [`RequestContext`].
#[derive(Clone)]
pub struct Pipeline<S> {
    server: Arc<ApiServer>,
    inner: S,
}

impl<S> tower::Service<Request> for Pipeline<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The instance polled ready serves this request; a fresh clone waits for the next.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        let server = self.server.clone();
        Box::pin(async move { Ok(run(server, ready, request).await) })
    }
}

/// The stages in upstream's order around the handler.
async fn run<S>(server: Arc<ApiServer>, inner: S, mut request: Request) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let arrived = request_info(&server, &request);
    let measured = measured(&arrived.route, &request);
    let started = std::time::Instant::now();
    let response = match admit(&server, arrived, &mut request).await {
        Ok(()) => match inner.oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        Err(refused) => refused,
    };
    if let Some((verb, resource)) = measured {
        server.request_metrics.record(
            verb,
            &resource,
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
    }
    response
}

/// Authentication, impersonation and authorization; on success the request carries its
/// [`RequestContext`], else the answer is the refusal.
async fn admit(
    server: &ApiServer,
    arrived: Arrived,
    request: &mut Request,
) -> Result<(), Response> {
    let authenticated = authenticate(server, request).await?;
    let context = impersonate(server, arrived, authenticated, request).await?;
    authorize(server, &context, request).await?;
    request.extensions_mut().insert(context);
    Ok(())
}

/// What the first stage learns: the route, the authorization attributes, the arrival revision.
struct Arrived {
    route: Route,
    attributes: Arc<Attributes>,
    revision: u64,
}

fn request_info(server: &ApiServer, request: &Request) -> Arrived {
    let route = request::parse_route(request.uri().path());
    let attributes = request::attributes(
        request.method(),
        &route,
        request.uri().path(),
        request.uri().query(),
    );
    Arrived {
        route,
        attributes: Arc::new(attributes),
        revision: server.storage.revision(),
    }
}

/// The metric labels of a resource request (verb, resource[/subresource]); none otherwise.
fn measured(route: &Route, request: &Request) -> Option<(&'static str, String)> {
    match route {
        Route::Resource(p) => Some((
            crate::metrics::verb_of(
                request.method(),
                request.uri().query(),
                p.name.is_some(),
                p.subresource.as_deref(),
            ),
            match &p.subresource {
                Some(s) => format!("{}/{s}", p.resource),
                None => p.resource.clone(),
            },
        )),
        _ => None,
    }
}

/// (`&mut`: a shared borrow of a request, whose body is not `Sync`, cannot cross an await.)
async fn authenticate(server: &ApiServer, request: &mut Request) -> Result<Identity, Response> {
    if let Some(transport) = request.extensions().get::<TransportIdentity>() {
        // A removed node's certificate (`edgesite node remove`) no longer authenticates.
        if let (Some(node), Some(serial)) = (transport.identity.node_name(), &transport.serial)
            && !server.authorizer.node_certificate_valid(node, serial)
        {
            let mut e = ApiError::unauthorized();
            e.message = format!(
                "the certificate of node {node:?} was revoked when the node was removed from the site; join the machine again with a new token"
            );
            return Err(error_response(&e));
        }
        // So does a site's once its name was claimed again (a cloud hub).
        if let (Some(site), Some(serial)) = (
            crate::cloud_link::site_of(&transport.identity),
            &transport.serial,
        ) && !server.authorizer.site_certificate_valid(site, serial)
        {
            let mut e = ApiError::unauthorized();
            e.message = format!(
                "the certificate of site {site:?} is no longer valid: the site renewed it, or another machine attached under this name (then attach this one under another --site-name with a new token)"
            );
            return Err(error_response(&e));
        }
        return Ok(transport.identity.clone());
    }
    let Some(authorization) = request.headers().get(header::AUTHORIZATION) else {
        return Ok(Identity::anonymous());
    };
    let authorization = authorization.to_str().unwrap_or_default();
    if let Some(identity) = server.tokens.authenticate(authorization) {
        return Ok(identity);
    }
    super::service_account_identity(server, authorization)
        .await
        .ok_or_else(|| error_response(&ApiError::unauthorized()))
}

async fn impersonate(
    server: &ApiServer,
    arrived: Arrived,
    authenticated: Identity,
    request: &mut Request,
) -> Result<RequestContext, Response> {
    let mut context = RequestContext {
        route: arrived.route,
        attributes: arrived.attributes,
        user: authenticated,
        impersonator: None,
        revision: arrived.revision,
    };
    let Some(wanted) = impersonation_request(request.headers()) else {
        return Ok(context);
    };
    let (user, checks) = impersonated(&wanted).map_err(|e| error_response(&e))?;
    let authenticated = context.user;
    for check in checks {
        let decision = server
            .authorizer
            .authorize_fresh(context.revision, &authenticated, &check)
            .await;
        if !decision.allowed() {
            return Err(error_response(&auth::forbidden(
                &authenticated.user,
                &check,
                decision.reason(),
            )));
        }
    }
    let headers = request.headers_mut();
    let names: Vec<_> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
    context.user = user;
    context.impersonator = Some(authenticated);
    Ok(context)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn authorize(
    server: &ApiServer,
    context: &RequestContext,
    request: &mut Request,
) -> Result<(), Response> {
    // Streaming into a pod over a WebSocket GET also needs `create`, as upstream (1.31+) asks.
    let a = &*context.attributes;
    let create = (a.verb == "get"
        && a.api_group.is_empty()
        && a.resource == "pods"
        && matches!(a.subresource.as_str(), "exec" | "attach" | "portforward")
        && is_upgrade(request.headers()))
    .then(|| Attributes {
        verb: "create".into(),
        ..a.clone()
    });
    for check in std::iter::once(a).chain(create.as_ref()) {
        let decision = server
            .authorizer
            .authorize_fresh(context.revision, &context.user, check)
            .await;
        if !decision.allowed() {
            tracing::debug!(user = %context.user.user, verb = %check.verb, resource = %check.resource_and_subresource(), path = %check.path, reason = %decision.reason(), "forbidden");
            return Err(error_response(&auth::forbidden(
                &context.user.user,
                check,
                decision.reason(),
            )));
        }
    }
    Ok(())
}
