//! Mesh streams: which connection carries a new stream (a direct one whenever it exists), which
//! peers may connect at all (the site's nodes), and the stream type the rest of the crate uses.

mod handler;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm,
    NetworkBehaviour, NotifyHandler, Stream, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

pub use handler::{OpenReply, PROTOCOL};

/// Requests waiting for a connection to one peer; more fail at once.
const MAX_PENDING_PER_PEER: usize = 256;

/// Who may connect: the site's nodes, or anyone (a standalone relay serves any peer, bounded by
/// its limits, and carries no mesh streams of its own).
#[derive(Debug, Clone)]
pub enum Allowed {
    Any,
    Only(HashSet<PeerId>),
}

impl Allowed {
    pub fn contains(&self, peer: &PeerId) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::Only(peers) => peers.contains(peer),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not a node of this site")]
pub struct NotASiteNode(pub PeerId);

/// Bytes a peer's streams carried, both ways.
#[derive(Debug, Default)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

#[derive(Debug)]
pub enum Event {
    Inbound {
        peer: PeerId,
        stream: Box<MeshStream>,
    },
    /// Streams wait for a connection to this peer, which has none: dial it.
    NeedDial(PeerId),
}

#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: PeerId,
    pub relayed: bool,
    pub remote: Multiaddr,
}

pub struct Behaviour {
    allowed: Arc<RwLock<Allowed>>,
    connections: HashMap<ConnectionId, ConnectionInfo>,
    pending: HashMap<PeerId, Vec<OpenReply>>,
    traffic: HashMap<PeerId, Arc<Traffic>>,
    events: VecDeque<ToSwarm<Event, handler::Command>>,
}

impl Behaviour {
    pub fn new(allowed: Arc<RwLock<Allowed>>) -> Self {
        Self {
            allowed,
            connections: HashMap::new(),
            pending: HashMap::new(),
            traffic: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Opens a stream to `peer` on its best connection (direct before relayed); without one the
    /// request waits for the connection the host dials on [`Event::NeedDial`].
    /// Returns the peer's traffic counters, which the stream the caller receives must count in.
    pub fn open(&mut self, peer: PeerId, reply: OpenReply) -> Arc<Traffic> {
        let traffic = self.traffic_of(peer);
        if !self.is_allowed(&peer) {
            let _ = reply.send(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                NotASiteNode(peer),
            )));
            return traffic;
        }
        if let Some(connection) = self.best_connection(&peer) {
            self.events.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(connection),
                event: handler::Command::Open(reply),
            });
            return traffic;
        }
        let waiting = self.pending.entry(peer).or_default();
        if waiting.len() >= MAX_PENDING_PER_PEER {
            let _ = reply.send(Err(io::Error::other(format!(
                "{MAX_PENDING_PER_PEER} mesh streams already wait for a connection to {peer}"
            ))));
            return traffic;
        }
        waiting.push(reply);
        if waiting.len() == 1 {
            self.events
                .push_back(ToSwarm::GenerateEvent(Event::NeedDial(peer)));
        }
        traffic
    }

    /// Fails the streams waiting for `peer` (its dial failed and no connection exists).
    pub fn fail_pending(&mut self, peer: &PeerId, reason: &str) {
        if self.best_connection(peer).is_some() {
            return;
        }
        for reply in self.pending.remove(peer).unwrap_or_default() {
            let _ = reply.send(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("no connection to {peer}: {reason}"),
            )));
        }
    }

    /// Peers that streams wait for.
    pub fn waiting_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.pending
            .iter()
            .filter(|(_, w)| !w.is_empty())
            .map(|(p, _)| *p)
    }

    pub fn connections(&self) -> impl Iterator<Item = (ConnectionId, &ConnectionInfo)> + '_ {
        self.connections.iter().map(|(id, info)| (*id, info))
    }

    pub fn traffic(&self, peer: &PeerId) -> Option<&Arc<Traffic>> {
        self.traffic.get(peer)
    }

    fn is_allowed(&self, peer: &PeerId) -> bool {
        self.allowed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(peer)
    }

    /// Whether `peer` has a direct (not relayed) connection.
    pub fn has_direct(&self, peer: &PeerId) -> bool {
        self.connections
            .values()
            .any(|c| c.peer == *peer && !c.relayed)
    }

    fn best_connection(&self, peer: &PeerId) -> Option<ConnectionId> {
        self.connections
            .iter()
            .filter(|(_, info)| info.peer == *peer)
            .min_by_key(|(id, info)| (info.relayed, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    fn check(&self, peer: PeerId) -> Result<handler::Handler, ConnectionDenied> {
        if self.is_allowed(&peer) {
            Ok(handler::Handler::new())
        } else {
            Err(ConnectionDenied::new(NotASiteNode(peer)))
        }
    }

    fn traffic_of(&mut self, peer: PeerId) -> Arc<Traffic> {
        self.traffic.entry(peer).or_default().clone()
    }

    fn on_established(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let relayed = endpoint.is_relayed();
        let direct_exists = self
            .connections
            .values()
            .any(|c| c.peer == peer && !c.relayed);
        if relayed && direct_exists {
            self.supersede(peer, id);
        }
        if relayed && !direct_exists {
            // A newer relayed connection (a hole punch being retried) takes the new streams;
            // the older ones close once their streams end.
            let older: Vec<ConnectionId> = self
                .connections
                .iter()
                .filter(|(_, c)| c.peer == peer && c.relayed)
                .map(|(id, _)| *id)
                .collect();
            for old in older {
                self.supersede(peer, old);
            }
        }
        if !relayed {
            let relayed_ones: Vec<ConnectionId> = self
                .connections
                .iter()
                .filter(|(_, c)| c.peer == peer && c.relayed)
                .map(|(id, _)| *id)
                .collect();
            for old in relayed_ones {
                self.supersede(peer, old);
            }
        }
        // An inbound relayed connection knows its peer only as `/p2p/<id>`: its own
        // reservation's address says which relay carries it.
        let remote = match endpoint {
            ConnectedPoint::Listener { local_addr, .. }
                if relayed && crate::peers::is_relayed(local_addr) =>
            {
                local_addr
                    .clone()
                    .with(libp2p::multiaddr::Protocol::P2p(peer))
            }
            _ => endpoint.get_remote_address().clone(),
        };
        self.connections.insert(
            id,
            ConnectionInfo {
                peer,
                relayed,
                remote,
            },
        );
        for reply in self.pending.remove(&peer).unwrap_or_default() {
            self.events.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(id),
                event: handler::Command::Open(reply),
            });
        }
    }

    fn supersede(&mut self, peer: PeerId, id: ConnectionId) {
        tracing::debug!(%peer, ?id, "a relayed connection is superseded");
        self.events.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(id),
            event: handler::Command::Superseded,
        });
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = handler::Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _id: ConnectionId,
        peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(established) => self.on_established(
                established.peer_id,
                established.connection_id,
                established.endpoint,
            ),
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.connections.remove(&connection_id);
            }
            FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error,
                ..
            }) if !matches!(error, DialError::DialPeerConditionFalse(_)) => {
                let reason = error.to_string();
                self.fail_pending(&peer, &reason);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        _id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            handler::Event::Inbound(stream, active) => {
                if !self.is_allowed(&peer) {
                    // The peer left the site after connecting; its connections are being closed.
                    active.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                let traffic = self.traffic_of(peer);
                let stream = MeshStream::new(peer, stream, active, traffic);
                self.events
                    .push_back(ToSwarm::GenerateEvent(Event::Inbound {
                        peer,
                        stream: Box::new(stream),
                    }));
            }
        }
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

/// A stream to another node: tokio I/O, counted in its peer's traffic, and keeping its
/// connection alive until dropped.
pub struct MeshStream {
    peer: PeerId,
    inner: Compat<Stream>,
    active: Arc<AtomicUsize>,
    traffic: Arc<Traffic>,
}

impl std::fmt::Debug for MeshStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl MeshStream {
    pub(crate) fn new(
        peer: PeerId,
        stream: Stream,
        active: Arc<AtomicUsize>,
        traffic: Arc<Traffic>,
    ) -> Self {
        Self {
            peer,
            inner: stream.compat(),
            active,
            traffic,
        }
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }
}

impl Drop for MeshStream {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.traffic
            .received
            .fetch_add(read as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = result {
            self.traffic
                .sent
                .fetch_add(written as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
