//! The hub's side of the cloud link: sites' links arrive here ([`Hub::accept`]), each site has
//! a Karmada `Cluster` whose status the site's status stream keeps current
//! ([`clusters`]), and `kubectl` reaches any connected site through the cluster proxy
//! ([`proxy`]).
//!
//! Several hub servers may share one datastore: each serves the links that reached it and
//! records them ([`links`]); placement and readiness run on the leading server only
//! ([`Hub::run_leading`]); the cluster proxy of a site linked to another server goes there.

pub mod aggregate;
pub mod clusters;
pub mod links;
pub mod overrides;
pub mod placement;
pub mod proxy;
pub mod sites;
pub mod sync;

use std::sync::Arc;

use axum::body::Body;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use apiserver_lite::auth::Identity;
use apiserver_lite::error::ApiError;
use link::accept::Peer;
use link::registry::Registry;

/// The identity the hub's own writes (Clusters and their status) are made as.
pub const HUB_USER: &str = "system:edgesite:cloudhub";

/// How this hub server reaches the others sharing its datastore.
pub struct Peers {
    /// The address this server advertises (the `kubernetes` endpoints').
    pub me: Option<std::net::SocketAddr>,
    /// TLS to the other servers, with a client certificate that may impersonate (the cluster
    /// proxy of a site linked elsewhere goes there as its caller).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The hub: the connected sites and what it keeps about them.
pub struct Hub {
    sites: Arc<Registry<Peer<Body>>>,
    clusters: Arc<clusters::Clusters>,
    aggregator: Arc<aggregate::Aggregator>,
    links: links::Links,
    forward_tls: Option<Arc<rustls::ClientConfig>>,
    client: kube::Client,
    api: Arc<apiserver_lite::http::ApiServer>,
    shutdown: CancellationToken,
}

impl Hub {
    /// `client` writes Clusters and their status (as [`HUB_USER`]); `api` is this server.
    pub fn new(
        client: kube::Client,
        api: Arc<apiserver_lite::http::ApiServer>,
        peers: Peers,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        let aggregator = aggregate::Aggregator::new(client.clone());
        Arc::new(Hub {
            sites: Arc::default(),
            clusters: Arc::new(clusters::Clusters::new(client.clone(), aggregator.clone())),
            aggregator,
            links: links::Links::new(api.clone(), peers.me),
            forward_tls: peers.tls,
            client,
            api,
            shutdown,
        })
    }

    /// What every hub server runs until shut down: the sites' reports of their Works are
    /// written by the server that holds their links.
    pub async fn run_everywhere(self: Arc<Self>) {
        if let Err(error) = self.links.forget_mine().await {
            tracing::warn!(%error, "site link records of an earlier run not removed");
        }
        self.aggregator.clone().run(self.shutdown.clone()).await;
    }

    /// What the leading hub server runs until `leading` ends: placement (templates to
    /// bindings to Works, woken by the datastore's committed changes) and readiness (sites
    /// whose links no live server holds turn not Ready).
    pub async fn run_leading(self: Arc<Self>, leading: CancellationToken) {
        let sites = Arc::new(sites::Sites::default());
        let placement = placement::Placement::new(self.client.clone(), sites.clone());
        // A site that appears, goes or changes its labels is placed on at once, and so is a
        // change to a policy, a template or a Work.
        let wake = sites.changed.clone();
        tokio::join!(
            sites.clone().follow(self.client.clone(), leading.clone()),
            crate::changes::wake_on(
                self.api.storage.clone(),
                placement::concerns_placement,
                wake.clone(),
                leading.clone(),
            ),
            placement.run(wake, leading.clone()),
            self.clusters
                .clone()
                .watch_readiness(self.links.clone(), sites, leading.clone()),
        );
    }

    /// The sites whose links are up now.
    pub fn connected(&self) -> Vec<String> {
        self.sites.names()
    }

    async fn serve_link(
        self: Arc<Self>,
        site: String,
        headers: http::HeaderMap,
        upgraded: hyper::upgrade::Upgraded,
    ) {
        let (peer, connection) = match link::accept::handshake::<Body>(upgraded).await {
            Ok(x) => x,
            Err(error) => {
                tracing::warn!(%site, %error, "site link handshake failed");
                return;
            }
        };
        let labels = headers
            .get(crate::protocol::LABELS_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::protocol::parse_labels(&[v.to_string()]))
            .transpose();
        let labels = match labels {
            Ok(labels) => labels.unwrap_or_default(),
            Err(error) => {
                tracing::warn!(%site, %error, "site link refused: bad labels");
                return;
            }
        };
        let connection = tokio::spawn(connection);
        if let Err(error) = self.clusters.ensure(&site, &labels).await {
            tracing::warn!(%site, %error, "site link: the Cluster could not be written; closing");
            connection.abort();
            return;
        }
        if let Err(error) = self.links.attached(&site).await {
            tracing::warn!(%site, %error, "site link: not recorded; closing");
            connection.abort();
            return;
        }
        // The site is Ready again once it speaks on this link, whatever this server last
        // wrote (the leader may have marked it Unknown meanwhile).
        self.clusters.forget_ready(&site);
        let registered = Arc::new(peer.clone());
        let registration = self.sites.register(&site, registered.clone());
        // Another link under this name (the name attached again from another machine, or this
        // site reconnecting) replaces this one: it closes.
        let replaced = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                if !self
                    .sites
                    .get(&site)
                    .is_some_and(|p| Arc::ptr_eq(&p, &registered))
                {
                    return;
                }
            }
        };
        tracing::info!(%site, "site attached its link");
        let status = self
            .clusters
            .clone()
            .follow_status(site.clone(), peer.clone());
        let sync = sync::run(site.clone(), peer.clone(), self.client.clone());
        let servers = tell_servers(&site, &peer, &self.api);
        tokio::select! {
            result = connection => match result {
                Ok(Ok(())) => tracing::info!(%site, "site link closed"),
                Ok(Err(error)) => tracing::info!(%site, %error, "site link closed"),
                Err(_) => {}
            },
            () = status => tracing::info!(%site, "site link: the status stream ended"),
            () = sync => tracing::info!(%site, "site link: sync ended"),
            () = servers => {}
            () = replaced => tracing::info!(%site, "site link replaced by a newer one"),
            () = self.shutdown.cancelled() => {}
        }
        if self
            .sites
            .get(&site)
            .is_some_and(|p| Arc::ptr_eq(&p, &registered))
        {
            self.links.detached(&site).await;
        }
        drop(registration);
    }
}

/// Tells a site the hub's servers when its link opens and whenever they change, so it reaches
/// servers added after it attached (the answer to its upgrade named only those of that time).
async fn tell_servers(site: &str, peer: &Peer<Body>, api: &apiserver_lite::http::ApiServer) {
    let mut told: Vec<String> = Vec::new();
    loop {
        let servers = apiserver_lite::api_endpoints::server_urls(api);
        if !servers.is_empty() && servers != told {
            let body = crate::protocol::Servers {
                servers: servers.clone(),
            };
            let request = http::Request::put(crate::protocol::SERVERS_PATH)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
            let answer = match request {
                Ok(request) => {
                    tokio::time::timeout(crate::protocol::HEARTBEAT, peer.call(request)).await
                }
                Err(_) => return,
            };
            match answer {
                Ok(Ok(response)) if response.status().is_success() => told = servers,
                Ok(Ok(response)) => {
                    tracing::debug!(%site, status = %response.status(), "site link: the site did not take the hub's servers")
                }
                Ok(Err(error)) => tracing::debug!(%site, %error, "site link: the hub's servers"),
                Err(_) => tracing::debug!(%site, "site link: the hub's servers: no answer"),
            }
        }
        tokio::time::sleep(crate::protocol::HEARTBEAT).await;
    }
}

/// [`Hub`] as the API server's hook.
pub struct Hooks(pub Arc<Hub>);

impl apiserver_lite::cloud_link::Hub for Hooks {
    fn accept(
        &self,
        site: String,
        headers: http::HeaderMap,
        upgraded: hyper::upgrade::Upgraded,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.0.clone().serve_link(site, headers, upgraded))
    }

    fn proxy(
        &self,
        site: String,
        identity: Identity,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, ApiError>> {
        let peer = self.0.sites.get(&site);
        let hub = self.0.clone();
        Box::pin(async move {
            if let Some(peer) = peer {
                return proxy::forward(&peer, &site, &identity, request).await;
            }
            // Linked to another server of this hub: the request goes there, once.
            let forwarded = request.headers().contains_key(proxy::FORWARDED_HEADER);
            if !forwarded
                && let Some(tls) = hub.forward_tls.clone()
                && let Some(server) = hub.links.elsewhere(&site).await
            {
                return proxy::to_server(server, tls, &site, &identity, request).await;
            }
            Err(ApiError::service_unavailable(format!(
                "site {site:?} is not connected to the hub: its link is down \
                 (`kubectl get cluster {site}` shows since when it is not Ready)"
            )))
        })
    }
}
