//! The request pipeline, as tower layers in upstream's order:
//!
//! 1. [`request_info`]: the route and the authorization [`Attributes`] of the request, and the
//!    store's revision on arrival (denials wait for the caches to reach it);
//! 2. [`measure`]: request counters and latencies of resource requests (`/metrics`);
//! 3. [`authenticate`]: a verified client certificate or the in-process client's identity
//!    ([`TransportIdentity`]), else a bearer token (static file, then ServiceAccount JWT); no
//!    credentials make the anonymous user, bad ones a 401;
//! 4. [`impersonate`]: `Impersonate-User/-Group/-Uid/-Extra-*`, each authorized with the
//!    `impersonate` verb;
//! 5. [`authorize`]: the authorizer chain (`auth::authorizer`); 403 with upstream's message.
//!
//! What passes carries a [`RequestContext`] into the handler; later layers (admission
//! webhooks, the cloud link's identities) insert themselves here, not into handlers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderMap, header};

use super::request::{self, Route};
use super::{ApiServer, error_response};
use crate::auth::impersonation::{impersonated, impersonation_request};
use crate::auth::{self, Attributes, Identity};
use crate::error::ApiError;

/// The identity the connection vouches for: a client certificate verified by TLS, or the
/// identity the in-process client was built with. Remote clients cannot set it.
#[derive(Debug, Clone)]
pub struct TransportIdentity(pub Identity);

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

/// The pipeline's state between layers, before the context is complete.
#[derive(Debug, Clone)]
struct Arrived {
    route: Route,
    attributes: Arc<Attributes>,
    revision: u64,
}

#[derive(Debug, Clone)]
struct Authenticated(Identity);

/// The layers around `handler`, outermost first.
pub fn layered(
    server: Arc<ApiServer>,
    handler: axum::Router<Arc<ApiServer>>,
) -> axum::Router<Arc<ApiServer>> {
    use axum::middleware::from_fn_with_state;
    handler
        .layer(from_fn_with_state(server.clone(), authorize))
        .layer(from_fn_with_state(server.clone(), impersonate))
        .layer(from_fn_with_state(server.clone(), authenticate))
        .layer(from_fn_with_state(server.clone(), measure))
        .layer(from_fn_with_state(server, request_info))
}

async fn request_info(
    State(server): State<Arc<ApiServer>>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = request::parse_route(request.uri().path());
    let attributes = request::attributes(
        request.method(),
        &route,
        request.uri().path(),
        request.uri().query(),
    );
    request.extensions_mut().insert(Arrived {
        route,
        attributes: Arc::new(attributes),
        revision: server.storage.revision(),
    });
    next.run(request).await
}

async fn measure(State(server): State<Arc<ApiServer>>, request: Request, next: Next) -> Response {
    let measured = match request.extensions().get::<Arrived>().map(|a| &a.route) {
        Some(Route::Resource(p)) => Some((
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
    };
    let started = std::time::Instant::now();
    let response = next.run(request).await;
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

async fn authenticate(
    State(server): State<Arc<ApiServer>>,
    mut request: Request,
    next: Next,
) -> Response {
    let identity = if let Some(TransportIdentity(identity)) =
        request.extensions().get::<TransportIdentity>()
    {
        identity.clone()
    } else {
        match request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|h| h.to_str().unwrap_or_default().to_string())
        {
            None => Identity::anonymous(),
            Some(authorization) => match server.tokens.authenticate(&authorization) {
                Some(identity) => identity,
                None => match super::service_account_identity(&server, &authorization).await {
                    Some(identity) => identity,
                    None => return error_response(&ApiError::unauthorized()),
                },
            },
        }
    };
    request.extensions_mut().insert(Authenticated(identity));
    next.run(request).await
}

async fn impersonate(
    State(server): State<Arc<ApiServer>>,
    mut request: Request,
    next: Next,
) -> Response {
    let (Some(arrived), Some(Authenticated(authenticated))) = (
        request.extensions_mut().remove::<Arrived>(),
        request.extensions_mut().remove::<Authenticated>(),
    ) else {
        return error_response(&ApiError::internal("the request pipeline is incomplete"));
    };
    let mut context = RequestContext {
        route: arrived.route,
        attributes: arrived.attributes,
        user: authenticated.clone(),
        impersonator: None,
        revision: arrived.revision,
    };
    if let Some(wanted) = impersonation_request(request.headers()) {
        let (user, checks) = match impersonated(&wanted) {
            Ok(x) => x,
            Err(e) => return error_response(&e),
        };
        for check in checks {
            let decision = server
                .authorizer
                .authorize_fresh(context.revision, &authenticated, &check)
                .await;
            if !decision.allowed() {
                return error_response(&auth::forbidden(
                    &authenticated.user,
                    &check,
                    decision.reason(),
                ));
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
    }
    request.extensions_mut().insert(context);
    next.run(request).await
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn authorize(State(server): State<Arc<ApiServer>>, request: Request, next: Next) -> Response {
    let Some(context) = request.extensions().get::<RequestContext>() else {
        return error_response(&ApiError::internal("the request pipeline is incomplete"));
    };
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
            return error_response(&auth::forbidden(
                &context.user.user,
                check,
                decision.reason(),
            ));
        }
    }
    next.run(request).await
}
