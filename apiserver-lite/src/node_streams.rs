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

/// The registry of connected node agents.
#[derive(Default)]
pub struct NodeStreams {
    nodes: RwLock<HashMap<String, (u64, Arc<dyn NodeConnection>)>>,
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
