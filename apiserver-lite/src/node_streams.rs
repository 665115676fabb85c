//! How the API server reaches node agents for `pods/log` (and later exec, attach,
//! port-forward): each agent registers a [`NodeConnection`] under its node name. A co-located
//! agent registers its HTTP handler directly; a remote agent dials out to the server and the
//! server speaks HTTP over that connection, so agents behind NAT are reachable too. The API
//! server never dials a node.

use std::sync::Arc;

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

/// The registry of connected node agents.
pub type NodeStreams = link::registry::Registry<dyn NodeConnection>;

/// Removes a node's connection when dropped (unless a newer one replaced it).
pub type Registration = link::registry::Registration<dyn NodeConnection>;

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
    /// What a refused token is told (which command makes a good one).
    fn bad_token_message(&self) -> String {
        JoinError::BadToken.to_string()
    }
}

/// What a server does for another server joining the site (`edgesite server --server URL
/// --token TOKEN`): `authorize` accepts only the cluster's own token; `join_server` answers the
/// request (`{"name", "peerURL"}`) with what the new server needs to run (the site's keys,
/// encrypted with the token, and the etcd members to start with).
#[async_trait::async_trait]
pub trait ServerJoin: NodeJoin {
    async fn join_server(&self, request: serde_json::Value)
    -> Result<serde_json::Value, JoinError>;
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
pub struct Tunnel(link::accept::Peer<Body>);

impl NodeConnection for Tunnel {
    fn call(
        &self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, String>> {
        let peer = self.0.clone();
        Box::pin(async move {
            let response = peer.call(request).await.map_err(|e| e.to_string())?;
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
    let (peer, connection) = match link::accept::handshake::<Body>(upgraded).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(node = %node, "node tunnel handshake failed: {e}");
            return;
        }
    };
    let registration = streams.register(&node, Arc::new(Tunnel(peer)));
    tracing::info!(node = %node, "node agent connected its tunnel");
    if let Err(e) = connection.await {
        tracing::info!(node = %node, "node tunnel closed: {e}");
    }
    drop(registration);
}
