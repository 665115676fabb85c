//! The site's built-in ingress, run by every node's agent (K3s ships Traefik for this):
//! `networking.k8s.io/v1` Ingresses of the IngressClass `edgesite` (the default class) are
//! served on the node's ports 80 and 443, HTTP/1.1 and HTTP/2, TLS by SNI from the Secrets they
//! name, to the ready endpoints of their Services on this node or, through the mesh, on others.
//!
//! - [`routes`] (pure): Ingresses -> hosts, paths and weighted backends; what is wrong with one.
//! - [`tls`]: certificates by SNI, and a default one for any other name.
//! - [`proxy`]: the request path (endpoint choice, kept connections, upgrades, forwarded
//!   headers, error pages).
//! - [`run`]: listeners, and the table kept from the API (Ingresses, IngressClasses, Secrets).
//!
//! The server's `ingress-controller` loop (`controllers::ingress`) writes the Ingresses'
//! `status.loadBalancer` from the nodes that announce [`NODE_ANNOTATION`] and reports their
//! problems as Events.

pub mod crds;
pub mod gateway;
pub mod proxy;
pub mod routes;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::Shared;
use crate::routes::Table;
use crate::tls::SniResolver;

/// Announces on a Node that its agent serves Ingresses, and on which ports (`http=80,https=443`).
pub const NODE_ANNOTATION: &str = "ingress.edgesite.io/ports";
/// The annotation that makes an IngressClass the default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";

#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub node: String,
    pub http: SocketAddr,
    pub https: SocketAddr,
    /// The largest request body a route takes unless its Ingress says otherwise (0: no limit).
    pub max_body: u64,
}

/// Whether the IngressClass `edgesite` is marked default.
pub fn ours_is_default(classes: &[Arc<IngressClass>]) -> bool {
    classes.iter().any(|c| {
        c.metadata.name.as_deref() == Some(routes::CLASS)
            && c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                .is_some_and(|v| v == "true")
    })
}

/// Runs the node's ingress until `shutdown`. Fails at once if a port cannot be had.
pub async fn run(
    config: IngressConfig,
    client: kube::Client,
    mesh: edgemesh::agent::Published,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let http = TcpListener::bind(config.http)
        .await
        .with_context(|| format!("ingress: cannot listen on {} (free it, or move it with --ingress-http-port, or --disable-ingress)", config.http))?;
    let https = TcpListener::bind(config.https)
        .await
        .with_context(|| format!("ingress: cannot listen on {} (free it, or move it with --ingress-https-port, or --disable-ingress)", config.https))?;
    let resolver = Arc::new(SniResolver::new()?);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(resolver.clone())?));
    let mut shared = Shared::new(mesh.ports, mesh.dialer);
    shared.max_body = config.max_body;
    let shared = Arc::new(shared);
    tracing::info!(http = %config.http, https = %config.https, "ingress listening");
    tokio::spawn(accept(
        http,
        None,
        shared.clone(),
        config.http.port(),
        shutdown.clone(),
    ));
    tokio::spawn(accept(
        https,
        Some(acceptor),
        shared.clone(),
        config.https.port(),
        shutdown.clone(),
    ));
    tokio::spawn(announce(client.clone(), config.clone(), shutdown.clone()));
    let ports = gateway::Ports {
        http: config.http.port(),
        https: config.https.port(),
    };
    follow(client, shared, resolver, ports, shutdown).await;
    Ok(())
}

/// Accepts connections (TLS first when `tls`) and serves HTTP/1.1 and HTTP/2 on them with
/// `shared`'s table (the benchmark serves a fixed one).
pub async fn accept(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    port: u16,
    shutdown: CancellationToken,
) {
    let scheme = if tls.is_some() { "https" } else { "http" };
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "ingress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                proxy::handle(shared.clone(), request, client, scheme, port)
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            let served = match tls {
                None => {
                    let connection = builder.serve_connection_with_upgrades(
                        hyper_util::rt::TokioIo::new(stream),
                        service,
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        served = connection => served,
                    }
                }
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, %client, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let connection = builder.serve_connection_with_upgrades(
                        hyper_util::rt::TokioIo::new(stream),
                        service,
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        served = connection => served,
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, %client, "ingress connection ended");
            }
        });
    }
}

/// Announces the node's ingress ports on its Node object (for the Ingresses' status).
async fn announce(client: kube::Client, config: IngressConfig, shutdown: CancellationToken) {
    let api: Api<Node> = Api::all(client);
    let value = format!("http={},https={}", config.http.port(), config.https.port());
    let patch = serde_json::json!({"metadata": {"annotations": {NODE_ANNOTATION: value}}});
    let mut delay = Duration::from_secs(1);
    loop {
        match api
            .patch(&config.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return,
            Err(error) => tracing::debug!(%error, "cannot announce the ingress on the node yet"),
        }
        // Full jitter: after an outage the site's nodes do not all come back at once.
        let wait = delay.mul_f64(rand::random_range(0.1..=1.0));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The objects routes are made of, kept from watches: Ingresses, IngressClasses, Gateways and
/// HTTPRoutes. The nodes' ingress and the server's status loop both read them.
pub struct Sources {
    ingresses: reflector::Store<Ingress>,
    classes: reflector::Store<IngressClass>,
    gateways: reflector::Store<DynamicObject>,
    routes: reflector::Store<DynamicObject>,
}

/// What [`Sources::build`] makes.
pub struct Built {
    pub table: Table,
    /// The Ingresses served, and what is wrong with them.
    pub ingresses: Vec<Arc<Ingress>>,
    pub problems: Vec<routes::Problem>,
    pub statuses: gateway::Statuses,
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: gateway::GROUP.into(),
        version: "v1".into(),
        api_version: format!("{}/v1", gateway::GROUP),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn gateway_resource() -> ApiResource {
    resource("Gateway", "gateways")
}

pub fn http_route_resource() -> ApiResource {
    resource("HTTPRoute", "httproutes")
}

pub fn gateway_class_resource() -> ApiResource {
    resource("GatewayClass", "gatewayclasses")
}

impl Sources {
    /// Starts the watches; the stream yields once per change (it ends with the client).
    pub fn start(client: &kube::Client) -> (Sources, futures::stream::BoxStream<'static, ()>) {
        let (ingresses, ingress_events) = follow_kind(
            reflector::store::Writer::<Ingress>::default(),
            Api::all(client.clone()),
        );
        let (classes, class_events) = follow_kind(
            reflector::store::Writer::<IngressClass>::default(),
            Api::all(client.clone()),
        );
        let (gateways, gateway_events) = follow_kind(
            reflector::store::Writer::<DynamicObject>::new(gateway_resource()),
            Api::all_with(client.clone(), &gateway_resource()),
        );
        let (routes, route_events) = follow_kind(
            reflector::store::Writer::<DynamicObject>::new(http_route_resource()),
            Api::all_with(client.clone(), &http_route_resource()),
        );
        let events = futures::stream::select_all([
            ingress_events,
            class_events,
            gateway_events,
            route_events,
        ])
        .boxed();
        (
            Sources {
                ingresses,
                classes,
                gateways,
                routes,
            },
            events,
        )
    }

    /// The routing table of what is there now, with the Ingresses' problems and the Gateway
    /// API's statuses (`service_exists` decides `ResolvedRefs`).
    pub fn build(
        &self,
        ports: gateway::Ports,
        service_exists: &dyn Fn(&str, &str) -> bool,
    ) -> Built {
        let default = ours_is_default(&self.classes.state());
        let ingresses: Vec<Arc<Ingress>> = self
            .ingresses
            .state()
            .into_iter()
            .filter(|i| routes::is_ours(i, default))
            .collect();
        let refs: Vec<&Ingress> = ingresses.iter().map(|i| i.as_ref()).collect();
        let (mut table, problems) = Table::build(&refs);
        let parse = |objects: Vec<Arc<DynamicObject>>| -> Vec<serde_json::Value> {
            objects
                .iter()
                .filter_map(|o| serde_json::to_value(o.as_ref()).ok())
                .collect()
        };
        let gateways: Vec<gateway::Gateway> = parse(self.gateways.state())
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let routes: Vec<gateway::HttpRoute> = parse(self.routes.state())
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let statuses = gateway::compile(&mut table, &gateways, &routes, ports, service_exists);
        Built {
            table,
            ingresses,
            problems,
            statuses,
        }
    }

    pub fn gateways(&self) -> Vec<Arc<DynamicObject>> {
        self.gateways.state()
    }

    pub fn http_routes(&self) -> Vec<Arc<DynamicObject>> {
        self.routes.state()
    }
}

/// A store kept from a watch of `api`, and the watch's changes (one item each).
fn follow_kind<K>(
    writer: reflector::store::Writer<K>,
    api: Api<K>,
) -> (reflector::Store<K>, futures::stream::BoxStream<'static, ()>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let store = writer.as_reader();
    let events = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .map(|_| ())
        .boxed();
    (store, events)
}

/// Keeps the routing table and the certificates true to the API.
async fn follow(
    client: kube::Client,
    shared: Arc<Shared>,
    resolver: Arc<SniResolver>,
    ports: gateway::Ports,
    shutdown: CancellationToken,
) {
    let (sources, mut events) = Sources::start(&client);
    // Certificates are read again now and then: a renewed Secret is picked up.
    let mut refresh = tokio::time::interval(Duration::from_secs(30));
    let mut certificates: BTreeMap<
        (String, String),
        Result<Arc<rustls::sign::CertifiedKey>, String>,
    > = BTreeMap::new();
    let mut dirty = true;
    loop {
        let reread = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => {
                if event.is_none() { return }
                dirty = true;
                false
            }
            _ = refresh.tick() => true,
        };
        // Take the burst.
        while let Some(Some(())) = events.next().now_or_never() {}
        if !dirty && !reread {
            continue;
        }
        dirty = false;
        // Whether a Service exists matters to statuses only, which the server writes.
        let table = sources.build(ports, &|_, _| true).table;
        // Certificates: those named now, read when new (or on the refresh tick).
        let wanted = table.tls_secrets();
        certificates.retain(|key, _| wanted.contains(key));
        for (namespace, name) in &wanted {
            let key = (namespace.clone(), name.clone());
            if certificates.contains_key(&key) && !reread {
                continue;
            }
            let read = read_certificate(&client, namespace, name).await;
            if let Err(error) = &read {
                tracing::warn!(secret = %format!("{namespace}/{name}"), %error, "TLS Secret unusable; its hosts get the default certificate");
            }
            certificates.insert(key, read.map(Arc::new));
        }
        let by_host: BTreeMap<String, Arc<rustls::sign::CertifiedKey>> = table
            .tls_hosts()
            .filter_map(|(host, key)| {
                Some((host.clone(), certificates.get(key)?.as_ref().ok()?.clone()))
            })
            .collect();
        resolver.set(by_host);
        *shared.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

async fn read_certificate(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<rustls::sign::CertifiedKey, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get(name).await.map_err(|e| e.to_string())?;
    let data = secret.data.unwrap_or_default();
    let (Some(cert), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
        return Err("it has no tls.crt and tls.key".into());
    };
    tls::certified_key(&cert.0, &key.0).map_err(|e| e.to_string())
}
