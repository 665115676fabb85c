//! One connection's side of the mesh stream protocol: opens the outbound streams the behaviour
//! asks for, hands inbound ones up, and keeps the connection alive while it is wanted.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::channel::oneshot;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionHandler, ConnectionHandlerEvent, Stream, StreamProtocol, StreamUpgradeError,
    SubstreamProtocol,
};

/// The protocol every mesh stream speaks (tunnel.rs is what runs inside it).
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/edgesite/mesh/1.0.0");

/// Outbound stream requests waiting on one connection; more fail at once rather than queue.
const MAX_PENDING_OPENS: usize = 64;

pub type OpenReply = oneshot::Sender<Result<(Stream, Arc<AtomicUsize>), io::Error>>;

#[derive(Debug)]
pub enum Command {
    Open(OpenReply),
    /// A direct connection to the same peer exists: this (relayed) one lives only while it
    /// still carries streams.
    Superseded,
}

#[derive(Debug)]
pub enum Event {
    Inbound(Stream, Arc<AtomicUsize>),
}

pub struct Handler {
    /// Streams of this connection that are still open (the counter is shared with each
    /// stream's guard).
    active: Arc<AtomicUsize>,
    superseded: bool,
    queued: VecDeque<OpenReply>,
    negotiating: VecDeque<OpenReply>,
    inbound: VecDeque<Stream>,
}

impl Handler {
    pub fn new() -> Self {
        Self {
            active: Arc::new(AtomicUsize::new(0)),
            superseded: false,
            queued: VecDeque::new(),
            negotiating: VecDeque::new(),
            inbound: VecDeque::new(),
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Command;
    type ToBehaviour = Event;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ())
    }

    fn connection_keep_alive(&self) -> bool {
        !self.superseded
            || self.active.load(Ordering::Relaxed) > 0
            || !self.queued.is_empty()
            || !self.negotiating.is_empty()
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        if let Some(stream) = self.inbound.pop_front() {
            self.active.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(Event::Inbound(
                stream,
                self.active.clone(),
            )));
        }
        if let Some(reply) = self.queued.pop_front() {
            self.negotiating.push_back(reply);
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ()),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, command: Command) {
        match command {
            Command::Open(reply) => {
                if self.queued.len() + self.negotiating.len() >= MAX_PENDING_OPENS {
                    let _ = reply.send(Err(io::Error::other(
                        "too many mesh streams being opened on this connection",
                    )));
                } else {
                    self.queued.push_back(reply);
                }
            }
            Command::Superseded => self.superseded = true,
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => self.inbound.push_back(stream),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => {
                // Substreams are negotiated in the order they were requested.
                if let Some(reply) = self.negotiating.pop_front() {
                    self.active.fetch_add(1, Ordering::Relaxed);
                    if let Err(Ok((_, active))) = reply.send(Ok((stream, self.active.clone()))) {
                        // Nobody waits any more: the stream is dropped here.
                        active.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                if let Some(reply) = self.negotiating.pop_front() {
                    let error = match error {
                        StreamUpgradeError::Timeout => io::Error::new(
                            io::ErrorKind::TimedOut,
                            "opening a mesh stream timed out",
                        ),
                        StreamUpgradeError::NegotiationFailed => io::Error::other(
                            "the peer does not speak the mesh protocol (not an EdgeSite node?)",
                        ),
                        StreamUpgradeError::Io(error) => error,
                        StreamUpgradeError::Apply(never) => match never {},
                    };
                    let _ = reply.send(Err(error));
                }
            }
            _ => {}
        }
    }
}

impl Default for Handler {
    fn default() -> Self {
        Self::new()
    }
}
