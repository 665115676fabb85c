//! Connections to a Service's endpoints from this node: an endpoint here (or one naming no
//! node, or one on a node with no mesh peer) directly, one on another node through a mesh
//! tunnel to that node. The proxy's listeners and the ingress both dial through this.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::host::MeshHandle;
use crate::services::{Backend, NodePeers};
use crate::tunnel::{self, Kind};

#[derive(Clone)]
pub struct Dialer {
    /// This node's name: endpoints with this `nodeName` are local.
    node: String,
    mesh: MeshHandle,
    peers: watch::Receiver<Arc<NodePeers>>,
    connect_timeout: Duration,
}

/// A connection to an endpoint, either way.
pub enum Connection {
    Local(TcpStream),
    Mesh(Box<crate::MeshStream>),
}

impl Dialer {
    pub fn new(
        node: impl Into<String>,
        mesh: MeshHandle,
        peers: watch::Receiver<Arc<NodePeers>>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            node: node.into(),
            mesh,
            peers,
            connect_timeout,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub async fn connect(&self, backend: &Backend) -> io::Result<Connection> {
        self.connect_for(backend, None).await
    }

    /// [`Dialer::connect`] on behalf of `source`, the connection's original client (`None`:
    /// this node), whom the endpoint's node applies its NetworkPolicy to.
    pub async fn connect_for(
        &self,
        backend: &Backend,
        source: Option<std::net::IpAddr>,
    ) -> io::Result<Connection> {
        let target = SocketAddr::new(backend.ip, backend.port);
        match self.peer_of(backend) {
            None => {
                let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                let _ = stream.set_nodelay(true);
                Ok(Connection::Local(stream))
            }
            Some(peer) => {
                // No timeout of its own: opening may first dial the peer (or its relay).
                let stream = tunnel::open_for(&self.mesh, peer, Kind::Tcp, target, source).await?;
                Ok(Connection::Mesh(Box::new(stream)))
            }
        }
    }

    pub(crate) fn mesh(&self) -> &MeshHandle {
        &self.mesh
    }

    /// The mesh peer that carries traffic to `backend`, or `None` to connect directly.
    pub(crate) fn peer_of(&self, backend: &Backend) -> Option<libp2p::PeerId> {
        if backend.is_local(&self.node) {
            return None;
        }
        let node = backend.node.as_deref()?;
        self.peers.borrow().get(node).copied()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Local(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Mesh(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Local(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Mesh(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Local(s) => Pin::new(s).poll_flush(cx),
            Connection::Mesh(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Local(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Mesh(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
