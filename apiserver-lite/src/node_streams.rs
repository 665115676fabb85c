//! How the API server reaches node agents for `pods/log` (and later exec, attach,
//! port-forward): each agent registers a [`NodeConnection`] under its node name. A co-located
//! agent registers its HTTP handler directly; a remote agent dials out to the server and the
//! server speaks HTTP over that connection, so agents behind NAT are reachable too. The API
//! server never dials a node.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use futures::future::BoxFuture;

/// A request channel to one node agent's HTTP API (kubelet-style paths such as
/// `/containerLogs/{namespace}/{pod}/{container}`).
pub trait NodeConnection: Send + Sync {
    fn call(
        &self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, String>>;
}

/// A node's connection and the id of the registration that made it.
type Registered = (u64, Arc<dyn NodeConnection>);

/// The registry of connected node agents.
#[derive(Default)]
pub struct NodeStreams {
    nodes: RwLock<HashMap<String, Registered>>,
    next: std::sync::atomic::AtomicU64,
}

/// Removes its registration when dropped (unless a newer one replaced it).
pub struct Registration {
    streams: Arc<NodeStreams>,
    node: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut nodes = self
            .streams
            .nodes
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if nodes.get(&self.node).is_some_and(|(id, _)| *id == self.id) {
            nodes.remove(&self.node);
        }
    }
}

impl NodeStreams {
    /// Registers `node`'s connection, replacing an older one.
    pub fn register(
        self: &Arc<Self>,
        node: &str,
        connection: Arc<dyn NodeConnection>,
    ) -> Registration {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), (id, connection));
        Registration {
            streams: self.clone(),
            node: node.to_string(),
            id,
        }
    }

    /// The nodes whose agents are connected now.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub fn get(&self, node: &str) -> Option<Arc<dyn NodeConnection>> {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .map(|(_, c)| c.clone())
    }
}

/// A node agent served in the same process: its router called directly.
pub struct InProcess<S>(pub S);

impl<S> NodeConnection for InProcess<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    fn call(
        &self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, String>> {
        use tower::ServiceExt;
        let service = self.0.clone();
        Box::pin(async move { service.oneshot(request).await.map_err(|e| e.to_string()) })
    }
}

/// Signs node client certificates for agents that present a join token (the binary owns the
/// CA and the tokens; the API server only carries the request).
pub trait NodeJoin: Send + Sync {
    /// Whether `token` (a join token, or its credential part) lets a machine join.
    fn authorize(&self, token: &str) -> Result<(), JoinError>;
    /// Signs `csr` (a PEM certificate request) as `system:node:<node>`; returns the
    /// certificate (PEM).
    fn sign(&self, node: &str, csr: &str) -> Result<String, JoinError>;
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "the join token is not valid (expired, revoked or mistyped): create one with `edgesite token create` on the server"
    )]
    BadToken,
    #[error("{0}")]
    Invalid(String),
}

/// The remote end of an agent's dial-out tunnel: HTTP/2 requests sent over the connection the
/// agent opened.
pub struct Tunnel {
    sender: hyper::client::conn::http2::SendRequest<Body>,
}

impl NodeConnection for Tunnel {
    fn call(
        &self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, String>> {
        let mut sender = self.sender.clone();
        Box::pin(async move {
            sender.ready().await.map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            Ok(response.map(Body::new))
        })
    }
}

/// Takes over an upgraded agent connection: speaks HTTP/2 (as the client) over it and registers
/// it for `node` until it closes.
pub async fn serve_tunnel(
    streams: Arc<NodeStreams>,
    node: String,
    upgraded: hyper::upgrade::Upgraded,
) {
    // `Upgraded` already speaks hyper's IO traits.
    let io = upgraded;
    let (sender, connection) =
        match hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(20)))
            .keep_alive_timeout(std::time::Duration::from_secs(20))
            .handshake::<_, Body>(io)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(node = %node, "node tunnel handshake failed: {e}");
                return;
            }
        };
    let registration = streams.register(&node, Arc::new(Tunnel { sender }));
    tracing::info!(node = %node, "node agent connected its tunnel");
    if let Err(e) = connection.await {
        tracing::info!(node = %node, "node tunnel closed: {e}");
    }
    drop(registration);
}
