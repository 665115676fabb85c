//! The node's libp2p host: TCP + noise + yamux, identify, ping, a relay client everywhere, a relay
//! server on relay nodes, DCUtR hole punching, AutoNAT and mDNS. One task owns the swarm; the rest
//! of the node talks to it through a [`MeshHandle`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use futures::channel::oneshot as fut_oneshot;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, identify, mdns, noise, ping, relay, tcp, yamux,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::peers::{self, PeerInfo};
use crate::streams::{self, Allowed, MeshStream, Traffic};

/// How long opening a stream may wait for a connection and the stream's negotiation.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// How many connections an open tries when each closes while the stream opens.
pub const OPEN_ATTEMPTS: u32 = 3;
const IDENTIFY_PROTOCOL: &str = "/edgesite/mesh/id/1.0.0";
/// Unconnected peers and missing reservations are looked at this often.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A failed hole punch is tried again while the link stays relayed: after this, doubling up to
/// the cap (with jitter).
const PUNCH_RETRY_START: Duration = Duration::from_secs(5);
const PUNCH_RETRY_CAP: Duration = Duration::from_secs(300);
/// Inbound mesh streams not yet taken by the tunnel server; more are refused (reset).
const INBOUND_QUEUE: usize = 256;
/// Dials wait this long at most for the listener's addresses.
const LISTEN_GRACE: Duration = Duration::from_secs(3);

/// What a relay allows. libp2p's defaults (2 minutes and 128 KiB per circuit) end any real
/// service connection, so a site relay allows long, unmetered circuits by default.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    pub circuit_duration: Duration,
    /// Bytes a circuit may carry (both ways together); 0 = unlimited.
    pub circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 1024,
            max_reservations_per_peer: 4,
            max_circuits: 1024,
            max_circuits_per_peer: 64,
            circuit_duration: Duration::from_secs(24 * 3600),
            circuit_bytes: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub keypair: Keypair,
    /// e.g. `/ip4/0.0.0.0/tcp/4001` (port 0: any free port).
    pub listen: Vec<Multiaddr>,
    /// Addresses this node is known to be reachable at (a relay's public address).
    pub advertise: Vec<Multiaddr>,
    /// Run a relay server with these limits.
    pub relay: Option<RelayLimits>,
    pub mdns: bool,
    /// Accept connections from any peer (a standalone relay); otherwise only peers in the
    /// directory given to [`MeshHandle::set_peers`].
    pub open_to_any_peer: bool,
    /// Keep a connection to every peer of the directory (otherwise peers are dialled when a
    /// stream needs them).
    pub connect_all: bool,
    /// The agent version identify reports.
    pub agent_version: String,
}

impl HostConfig {
    pub fn new(keypair: Keypair, listen: Vec<Multiaddr>) -> Self {
        Self {
            keypair,
            listen,
            advertise: Vec::new(),
            relay: None,
            mdns: true,
            open_to_any_peer: false,
            connect_all: true,
            agent_version: format!("edgesite/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    // First: it refuses connections from peers that are not nodes of the site, for every
    // protocol.
    streams: streams::Behaviour,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    autonat: autonat::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// One peer in [`MeshStatus`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub node: String,
    pub peer_id: String,
    pub relay: bool,
    /// `direct`, `relayed` or `none`.
    pub connection: String,
    /// The remote address of the connection streams use.
    pub address: Option<String>,
    pub rtt_ms: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// From the first relayed connection to the direct one, when hole punching succeeded.
    pub punch_ms: Option<u64>,
    pub punch_failures: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MeshStatus {
    pub peer_id: String,
    pub listen: Vec<String>,
    pub external: Vec<String>,
    /// AutoNAT's verdict: `public`, `private` or `unknown`.
    pub nat: String,
    /// Relays this node holds a reservation on (node names).
    pub reservations: Vec<String>,
    pub peers: Vec<PeerStatus>,
}

enum Command {
    /// The new directory, and who waits until it is in effect.
    SetPeers(Vec<PeerInfo>, oneshot::Sender<()>),
    Open {
        peer: PeerId,
        stream: streams::OpenReply,
        traffic: oneshot::Sender<Arc<Traffic>>,
    },
    Status(oneshot::Sender<MeshStatus>),
}

/// The node's way into the mesh. Cheap to clone.
#[derive(Clone)]
pub struct MeshHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    listen: watch::Receiver<Vec<Multiaddr>>,
}

impl MeshHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses the host listens on (interfaces expanded), as they change.
    pub fn listen_addrs(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.listen.clone()
    }

    /// Replaces the directory of site nodes: only they may connect; peers that left are
    /// disconnected. Returns once the new directory is in effect (a peer that just joined is
    /// let in from then on).
    pub async fn set_peers(&self, peers: Vec<PeerInfo>) -> Result<()> {
        let (done_tx, done_rx) = oneshot::channel();
        self.commands
            .send(Command::SetPeers(peers, done_tx))
            .await
            .context("the mesh host has stopped")?;
        done_rx.await.context("the mesh host has stopped")
    }

    /// Opens a mesh stream to `peer`, on a direct connection when there is one. A connection
    /// that closes while the stream opens (the peer refused or dropped it, e.g. one its
    /// previous directory refused while it let this node in) is replaced by a new one: up to
    /// [`OPEN_ATTEMPTS`] attempts, a short pause between them so the closing one is gone.
    pub async fn open(&self, peer: PeerId) -> io::Result<MeshStream> {
        let mut attempt = 1;
        loop {
            match self.open_once(peer).await {
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionAborted && attempt < OPEN_ATTEMPTS =>
                {
                    tracing::debug!(%peer, attempt, "{e}; opening on a new connection");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn open_once(&self, peer: PeerId) -> io::Result<MeshStream> {
        let (stream_tx, stream_rx) = fut_oneshot::channel();
        let (traffic_tx, traffic_rx) = oneshot::channel();
        let stopped = || io::Error::other("the mesh host has stopped");
        self.commands
            .send(Command::Open {
                peer,
                stream: stream_tx,
                traffic: traffic_tx,
            })
            .await
            .map_err(|_| stopped())?;
        let traffic = traffic_rx.await.map_err(|_| stopped())?;
        match tokio::time::timeout(OPEN_TIMEOUT, stream_rx).await {
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no mesh stream to {peer} within {OPEN_TIMEOUT:?}"),
            )),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the connection to {peer} closed while opening a stream"),
            )),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Ok(Ok((stream, active)))) => Ok(MeshStream::new(peer, stream, active, traffic)),
        }
    }

    pub async fn status(&self) -> Result<MeshStatus> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Status(tx))
            .await
            .context("the mesh host has stopped")?;
        rx.await.context("the mesh host has stopped")
    }
}

/// Streams other nodes opened to this one.
pub type Incoming = mpsc::Receiver<(PeerId, MeshStream)>;

/// Starts the host on the current tokio runtime. It runs until `shutdown`.
pub async fn start(
    config: HostConfig,
    shutdown: CancellationToken,
) -> Result<(MeshHandle, Incoming)> {
    let allowed = Arc::new(RwLock::new(if config.open_to_any_peer {
        Allowed::Any
    } else {
        Allowed::Only(HashSet::new())
    }));
    let peer_id = config.keypair.public().to_peer_id();
    let mut swarm = build_swarm(&config, allowed.clone())?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("listening on {addr}"))?;
    }
    for addr in &config.advertise {
        swarm.add_external_address(addr.clone());
    }
    let (commands_tx, commands_rx) = mpsc::channel(256);
    let (incoming_tx, incoming_rx) = mpsc::channel(INBOUND_QUEUE);
    let (listen_tx, listen_rx) = watch::channel(Vec::new());
    let host = Host {
        swarm,
        config,
        allowed,
        directory: HashMap::new(),
        reservations: HashMap::new(),
        reserved: HashSet::new(),
        backoff: HashMap::new(),
        rtt: HashMap::new(),
        lan: HashMap::new(),
        punch: HashMap::new(),
        nat: "unknown",
        started: Instant::now(),
        listening: false,
        incoming: incoming_tx,
        listen: listen_tx,
    };
    tokio::spawn(host.run(commands_rx, shutdown));
    Ok((
        MeshHandle {
            peer_id,
            commands: commands_tx,
            listen: listen_rx,
        },
        incoming_rx,
    ))
}

/// The largest yamux data frame the mesh sends: the payload that, with yamux's 12-byte header,
/// fills one noise message (65535 bytes less its 16-byte tag). yamux's default, 16 KiB, costs a
/// seal, a flush and a write syscall per 16 KiB on the sender and a frame per 16 KiB on the
/// receiver; this is a quarter as many (the CPU per GiB row of docs/benchmarks.md's mesh rows).
const MAX_FRAME_DATA: usize = 65535 - 16 - 12;

/// Stream multiplexing on every mesh connection, direct or relayed.
fn muxer() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_split_send_size(MAX_FRAME_DATA);
    config
}

fn build_swarm(config: &HostConfig, allowed: Arc<RwLock<Allowed>>) -> Result<Swarm<Behaviour>> {
    let tcp = tcp::Config::default().nodelay(true);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(tcp, noise::Config::new, muxer)?
        .with_relay_client(noise::Config::new, muxer)?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let relay = config.relay.as_ref().map(|limits| {
                relay::Behaviour::new(
                    peer_id,
                    relay::Config {
                        max_reservations: limits.max_reservations,
                        max_reservations_per_peer: limits.max_reservations_per_peer,
                        max_circuits: limits.max_circuits,
                        max_circuits_per_peer: limits.max_circuits_per_peer,
                        max_circuit_duration: limits.circuit_duration,
                        max_circuit_bytes: limits.circuit_bytes,
                        ..relay::Config::default()
                    },
                )
            });
            let mdns = if config.mdns {
                match mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id) {
                    Ok(mdns) => Some(mdns),
                    Err(error) => {
                        tracing::warn!(%error, "mDNS is unavailable; LAN peers are found through the site's directory only");
                        None
                    }
                }
            } else {
                None
            };
            Behaviour {
                streams: streams::Behaviour::new(allowed),
                relay_client,
                relay: relay.into(),
                dcutr: dcutr::Behaviour::new(peer_id),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                        .with_agent_version(config.agent_version.clone()),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(10))),
                autonat: autonat::Behaviour::new(
                    peer_id,
                    autonat::Config {
                        // Sites live on private addresses; "public" means reachable by the
                        // site's other nodes.
                        only_global_ips: false,
                        boot_delay: Duration::from_secs(3),
                        ..autonat::Config::default()
                    },
                ),
                mdns: mdns.into(),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(10)))
        .build();
    Ok(swarm)
}

struct Backoff {
    next: Instant,
    delay: Duration,
}

#[derive(Default)]
struct Punch {
    relayed_at: Option<Instant>,
    took: Option<Duration>,
    failures: u32,
    /// When to try again (a new relayed connection, on which DCUtR runs again).
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl Punch {
    /// Schedules the next attempt, each one later than the last.
    fn schedule_retry(&mut self, now: Instant) {
        self.retry_delay = (self.retry_delay * 2).clamp(PUNCH_RETRY_START, PUNCH_RETRY_CAP);
        let jitter = rand::rng().random_range(0.0..0.25);
        self.retry_at = Some(now + self.retry_delay.mul_f64(1.0 + jitter));
    }
}

struct Host {
    swarm: Swarm<Behaviour>,
    config: HostConfig,
    allowed: Arc<RwLock<Allowed>>,
    directory: HashMap<PeerId, PeerInfo>,
    /// Reservation listeners by relay.
    reservations: HashMap<PeerId, ListenerId>,
    /// Relays that accepted a reservation.
    reserved: HashSet<PeerId>,
    backoff: HashMap<PeerId, Backoff>,
    rtt: HashMap<ConnectionId, Duration>,
    /// Addresses mDNS found on the LAN, by peer (bounded: peers of the directory only).
    lan: HashMap<PeerId, Vec<Multiaddr>>,
    punch: HashMap<PeerId, Punch>,
    nat: &'static str,
    started: Instant,
    /// The TCP listener has its addresses: dials from now on reuse its port, which is what
    /// makes the address a NAT maps them to the one hole punching needs.
    listening: bool,
    incoming: mpsc::Sender<(PeerId, MeshStream)>,
    listen: watch::Sender<Vec<Multiaddr>>,
}

impl Host {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(MAINTAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_event(event),
                _ = tick.tick() => self.maintain(),
            }
        }
        tracing::debug!("mesh host stopped");
    }

    fn me(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::SetPeers(peers, done) => {
                self.set_peers(peers);
                let _ = done.send(());
            }
            Command::Open {
                peer,
                stream,
                traffic,
            } => {
                let counters = self.swarm.behaviour_mut().streams.open(peer, stream);
                let _ = traffic.send(counters);
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn set_peers(&mut self, peers: Vec<PeerInfo>) {
        let me = self.me();
        let new: HashMap<PeerId, PeerInfo> = peers
            .into_iter()
            .filter(|p| p.peer_id != me)
            .map(|p| (p.peer_id, p))
            .collect();
        let gone: Vec<PeerId> = self
            .directory
            .keys()
            .filter(|p| !new.contains_key(p))
            .copied()
            .collect();
        if !self.config.open_to_any_peer {
            *self.allowed.write().unwrap_or_else(|e| e.into_inner()) =
                Allowed::Only(new.keys().copied().collect());
        }
        self.directory = new;
        for peer in gone {
            tracing::info!(%peer, "peer left the site; disconnecting");
            if !self.config.open_to_any_peer {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            if let Some(listener) = self.reservations.remove(&peer) {
                self.swarm.remove_listener(listener);
            }
            self.reserved.remove(&peer);
            self.backoff.remove(&peer);
            self.lan.remove(&peer);
            self.punch.remove(&peer);
        }
        self.maintain();
    }

    /// Keeps reservations on every relay and, with `connect_all`, a connection to every peer.
    fn maintain(&mut self) {
        let now = Instant::now();
        if !self.ready(now) {
            return;
        }
        let relays: Vec<PeerInfo> = self
            .directory
            .values()
            .filter(|p| p.relay)
            .cloned()
            .collect();
        for relay in relays {
            if self.reservations.contains_key(&relay.peer_id)
                || self.backing_off(&relay.peer_id, now)
            {
                continue;
            }
            let Some(addr) = relay.addrs.iter().find(|a| peers::is_dialable(a)) else {
                continue;
            };
            let circuit = peers::circuit_listen_addr(addr, relay.peer_id);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::debug!(relay = %relay.name, %circuit, "asking for a relay reservation");
                    self.reservations.insert(relay.peer_id, listener);
                }
                Err(error) => {
                    tracing::warn!(relay = %relay.name, %error, "cannot reserve on relay");
                    self.back_off(relay.peer_id, now);
                }
            }
        }
        if self.config.connect_all {
            let unconnected: Vec<PeerId> = self
                .directory
                .keys()
                .filter(|p| !self.swarm.is_connected(p))
                .copied()
                .collect();
            for peer in unconnected {
                if !self.backing_off(&peer, now) {
                    self.dial(peer);
                }
            }
        }
        // Links still relayed after a failed hole punch: try again.
        let due: Vec<PeerId> = self
            .punch
            .iter()
            .filter(|(_, p)| p.retry_at.is_some_and(|at| at <= now))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            self.retry_punch(peer, now);
        }
        let waiting: Vec<PeerId> = self.swarm.behaviour().streams.waiting_peers().collect();
        for peer in waiting {
            if !self.swarm.is_connected(&peer) && !self.backing_off(&peer, now) {
                self.dial(peer);
            }
        }
    }

    /// Opens a new relayed connection to `peer` (DCUtR runs on each one) while its link is
    /// relayed only; the older relayed connections close once their streams end.
    fn retry_punch(&mut self, peer: PeerId, now: Instant) {
        let relayed_only =
            self.swarm.is_connected(&peer) && !self.swarm.behaviour().streams.has_direct(&peer);
        let Some(punch) = self.punch.get_mut(&peer) else {
            return;
        };
        if !relayed_only {
            punch.retry_at = None;
            punch.retry_delay = Duration::ZERO;
            return;
        }
        punch.schedule_retry(now);
        let circuits: Vec<Multiaddr> = self
            .directory
            .values()
            .filter(|r| r.relay && r.peer_id != peer)
            .filter_map(|relay| {
                let addr = relay.addrs.iter().find(|a| peers::is_dialable(a))?;
                Some(peers::circuit_dial_addr(addr, relay.peer_id, peer))
            })
            .collect();
        if circuits.is_empty() {
            return;
        }
        tracing::info!(%peer, "trying the hole punch again");
        let opts = DialOpts::peer_id(peer)
            .addresses(circuits)
            .condition(PeerCondition::Always)
            .build();
        if let Err(error) = self.swarm.dial(opts) {
            tracing::debug!(%peer, %error, "punch retry not started");
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.listening || now.duration_since(self.started) > LISTEN_GRACE
    }

    fn backing_off(&self, peer: &PeerId, now: Instant) -> bool {
        self.backoff.get(peer).is_some_and(|b| b.next > now)
    }

    fn back_off(&mut self, peer: PeerId, now: Instant) {
        let entry = self.backoff.entry(peer).or_insert(Backoff {
            next: now,
            delay: Duration::ZERO,
        });
        entry.delay = (entry.delay * 2).clamp(BACKOFF_START, BACKOFF_CAP);
        let jitter = rand::rng().random_range(0.0..0.25);
        entry.next = now + entry.delay.mul_f64(1.0 + jitter);
    }

    /// Dials `peer` at every address it may be reached at: its own, those mDNS saw, and through
    /// every relay. The first to connect wins; DCUtR later replaces a relayed connection with a
    /// direct one.
    fn dial(&mut self, peer: PeerId) {
        if !self.ready(Instant::now()) {
            // maintain() dials it (streams wait for it) once the listener is up.
            return;
        }
        let Some(info) = self.directory.get(&peer) else {
            self.swarm
                .behaviour_mut()
                .streams
                .fail_pending(&peer, "the peer is not a node of this site");
            return;
        };
        let mut addrs: Vec<Multiaddr> = info
            .addrs
            .iter()
            .filter(|a| peers::is_dialable(a))
            .map(peers::strip_peer)
            .collect();
        addrs.extend(self.lan.get(&peer).into_iter().flatten().cloned());
        if !info.relay {
            for relay in self
                .directory
                .values()
                .filter(|r| r.relay && r.peer_id != peer)
            {
                if let Some(addr) = relay.addrs.iter().find(|a| peers::is_dialable(a)) {
                    addrs.push(peers::circuit_dial_addr(addr, relay.peer_id, peer));
                }
            }
        }
        addrs.dedup();
        if addrs.is_empty() {
            self.swarm
                .behaviour_mut()
                .streams
                .fail_pending(&peer, "no known address");
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(error) = self.swarm.dial(opts) {
            tracing::debug!(%peer, %error, "dial not started");
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                if !peers::is_relayed(&address) && !is_loopback(&address) && !self.listening {
                    self.listening = true;
                    self.maintain();
                }
                if !peers::is_relayed(&address) {
                    if self.config.relay.is_some()
                        && self.config.advertise.is_empty()
                        && !is_loopback(&address)
                    {
                        // A relay must know an address it is reachable at; without one given,
                        // its own addresses are the best guess.
                        self.swarm.add_external_address(address.clone());
                    }
                    self.listen.send_modify(|addrs| {
                        if !addrs.contains(&address) {
                            addrs.push(address.clone());
                        }
                    });
                }
                tracing::info!(%address, "mesh listening");
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen
                    .send_modify(|addrs| addrs.retain(|a| *a != address));
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let relay = self
                    .reservations
                    .iter()
                    .find(|(_, l)| **l == listener_id)
                    .map(|(p, _)| *p);
                if let Some(relay) = relay {
                    tracing::info!(%relay, ?reason, "relay reservation ended");
                    self.reservations.remove(&relay);
                    self.reserved.remove(&relay);
                    self.back_off(relay, now);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.backoff.remove(&peer_id);
                let relayed = endpoint.is_relayed();
                let punch = self.punch.entry(peer_id).or_default();
                if relayed {
                    // Hole punching runs on each new relayed connection: its time counts
                    // from the latest one.
                    punch.relayed_at = Some(now);
                }
                tracing::debug!(peer = %peer_id, relayed, addr = %remote_addr(&endpoint), "connected");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                self.rtt.remove(&connection_id);
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if !self.swarm.is_connected(&peer) => {
                tracing::debug!(%peer, %error, "dial failed");
                self.back_off(peer, now);
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour(event, now),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent, now: Instant) {
        match event {
            BehaviourEvent::Streams(streams::Event::Inbound { peer, stream }) => {
                if let Err(error) = self.incoming.try_send((peer, *stream)) {
                    tracing::warn!(%peer, %error, "inbound mesh stream refused");
                }
            }
            BehaviourEvent::Streams(streams::Event::NeedDial(peer)) => self.dial(peer),
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                self.reserved.insert(relay_peer_id);
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => {
                let punch = self.punch.entry(remote_peer_id).or_default();
                match result {
                    Ok(_) => {
                        let took = punch.relayed_at.map(|t| now.duration_since(t));
                        punch.took = took;
                        punch.retry_at = None;
                        punch.retry_delay = Duration::ZERO;
                        tracing::info!(peer = %remote_peer_id, ?took, "hole punched: direct connection");
                    }
                    Err(error) => {
                        punch.failures += 1;
                        if punch.retry_at.is_none() {
                            punch.schedule_retry(now);
                        }
                        tracing::info!(peer = %remote_peer_id, %error, retry_in = ?punch.retry_at.map(|t| t.saturating_duration_since(now)), "hole punching failed; staying relayed, will try again");
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                connection,
                result: Ok(rtt),
                ..
            }) => {
                self.rtt.insert(connection, rtt);
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.nat = match new {
                    autonat::NatStatus::Public(_) => "public",
                    autonat::NatStatus::Private => "private",
                    autonat::NatStatus::Unknown => "unknown",
                };
                tracing::info!(nat = self.nat, "NAT status");
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if !self.directory.contains_key(&peer) {
                        continue;
                    }
                    let known = self.lan.entry(peer).or_default();
                    if !known.contains(&addr) && known.len() < 8 {
                        known.push(addr);
                    }
                    if self.config.connect_all && !self.swarm.is_connected(&peer) {
                        self.dial(peer);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, addr) in gone {
                    if let Some(known) = self.lan.get_mut(&peer) {
                        known.retain(|a| *a != addr);
                    }
                }
            }
            _ => {}
        }
    }

    fn status(&self) -> MeshStatus {
        let streams = &self.swarm.behaviour().streams;
        let mut best: HashMap<PeerId, (ConnectionId, bool)> = HashMap::new();
        for (id, info) in streams.connections() {
            let entry = best.entry(info.peer).or_insert((id, info.relayed));
            if (info.relayed, std::cmp::Reverse(id)) < (entry.1, std::cmp::Reverse(entry.0)) {
                *entry = (id, info.relayed);
            }
        }
        let addresses: HashMap<ConnectionId, &Multiaddr> = streams
            .connections()
            .map(|(id, info)| (id, &info.remote))
            .collect();
        let mut peers: Vec<PeerStatus> = self
            .directory
            .values()
            .map(|info| {
                let connection = best.get(&info.peer_id);
                let traffic = streams.traffic(&info.peer_id);
                let punch = self.punch.get(&info.peer_id);
                PeerStatus {
                    node: info.name.clone(),
                    peer_id: info.peer_id.to_string(),
                    relay: info.relay,
                    connection: match connection {
                        None => "none",
                        Some((_, true)) => "relayed",
                        Some((_, false)) => "direct",
                    }
                    .to_string(),
                    address: connection
                        .and_then(|(id, _)| addresses.get(id))
                        .map(|a| a.to_string()),
                    rtt_ms: connection
                        .and_then(|(id, _)| self.rtt.get(id))
                        .map(|d| d.as_secs_f64() * 1000.0),
                    bytes_sent: traffic
                        .map_or(0, |t| t.sent.load(std::sync::atomic::Ordering::Relaxed)),
                    bytes_received: traffic
                        .map_or(0, |t| t.received.load(std::sync::atomic::Ordering::Relaxed)),
                    punch_ms: punch.and_then(|p| p.took).map(|d| d.as_millis() as u64),
                    punch_failures: punch.map_or(0, |p| p.failures),
                }
            })
            .collect();
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        let mut reservations: Vec<String> = self
            .reserved
            .iter()
            .map(|p| {
                self.directory
                    .get(p)
                    .map_or_else(|| p.to_string(), |i| i.name.clone())
            })
            .collect();
        reservations.sort();
        MeshStatus {
            peer_id: self.me().to_string(),
            listen: self.swarm.listeners().map(|a| a.to_string()).collect(),
            external: self
                .swarm
                .external_addresses()
                .map(|a| a.to_string())
                .collect(),
            nat: self.nat.to_string(),
            reservations,
            peers,
        }
    }
}

fn remote_addr(endpoint: &ConnectedPoint) -> &Multiaddr {
    endpoint.get_remote_address()
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
        libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}
