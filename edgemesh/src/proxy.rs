//! The node's service proxy. Traffic to a Service (cluster IP, node port, external IP) is
//! handled in the kernel by the rules of [`crate::netfilter`]: an endpoint on this node is
//! DNATed to directly; the endpoints on other nodes are reached through a listener of this
//! proxy, which the rules redirect to and which carries the connection through a mesh tunnel
//! (direct after hole punching, relayed otherwise). Round robin or random,
//! `sessionAffinity: ClientIP`, and a failed connection is retried on another endpoint. A
//! client pod's NetworkPolicy egress rules keep it to the endpoints they allow; the tunnel
//! names the client, so the endpoint's node applies its pod's ingress rules.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::dial::Dialer;
use crate::host::MeshHandle;
use crate::netfilter::{Entry, Netfilter};
use crate::netpol::{Policy, Proto};
use crate::services::{Backend, Balancing, NodePeers, Protocol, ServicePort};
use crate::tunnel::{self, COPY_BUFFER, Kind};

/// Endpoints tried for one connection before giving up.
const ATTEMPTS: usize = 3;
/// UDP flows (client address -> endpoint) one service port keeps at once.
const MAX_UDP_FLOWS: usize = 4096;
/// Client IPs remembered per service port for session affinity.
const MAX_AFFINITY: usize = 65_536;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// This node's name: endpoints with this `nodeName` are local.
    pub node: String,
    /// The prefix of the iptables chains the proxy owns.
    pub chain: String,
    pub connect_timeout: Duration,
    pub udp_idle_timeout: Duration,
}

impl ProxyConfig {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            chain: "EDGEMESH".to_string(),
            connect_timeout: Duration::from_secs(5),
            udp_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What a listener needs to pick an endpoint; replaced as the service changes.
struct PortState {
    port: ServicePort,
    next: usize,
    affinity: HashMap<IpAddr, (Backend, Instant)>,
}

impl PortState {
    /// Endpoints to try, in order: the client's affine one first, then by the balancing rule.
    fn candidates(&mut self, client: IpAddr) -> Vec<Backend> {
        let backends = &self.port.backends;
        if backends.is_empty() {
            return Vec::new();
        }
        let mut order = Vec::with_capacity(ATTEMPTS);
        let affine = self.port.affinity.and_then(|timeout| {
            self.affinity
                .get(&client)
                .filter(|(backend, at)| at.elapsed() < timeout && backends.contains(backend))
                .map(|(backend, _)| backend.clone())
        });
        order.extend(affine);
        let start = match self.port.balancing {
            Balancing::RoundRobin => {
                self.next = self.next.wrapping_add(1);
                self.next
            }
            Balancing::Random => rand::rng().random_range(0..backends.len()),
        };
        for i in 0..backends.len() {
            let backend = &backends[(start + i) % backends.len()];
            if !order.contains(backend) {
                order.push(backend.clone());
            }
            if order.len() >= ATTEMPTS {
                break;
            }
        }
        order
    }

    fn remember(&mut self, client: IpAddr, backend: &Backend) {
        if self.port.affinity.is_none() {
            return;
        }
        if self.affinity.len() >= MAX_AFFINITY {
            let timeout = self.port.affinity.unwrap_or_default();
            self.affinity.retain(|_, (_, at)| at.elapsed() < timeout);
            if self.affinity.len() >= MAX_AFFINITY {
                self.affinity.clear();
            }
        }
        self.affinity
            .insert(client, (backend.clone(), Instant::now()));
    }
}

struct Shared {
    config: ProxyConfig,
    dialer: Dialer,
    netpol: watch::Receiver<Arc<Policy>>,
}

impl Shared {
    /// The endpoints `client`'s egress rules let it reach (every one for a client that is
    /// not a pod of this node with such rules).
    fn permitted(&self, client: IpAddr, protocol: Proto, candidates: Vec<Backend>) -> Vec<Backend> {
        let policy = self.netpol.borrow();
        candidates
            .into_iter()
            .filter(|b| policy.egress_allows(client, b.ip, protocol, b.port))
            .collect()
    }
}

/// The client a tunnel names: `None` for this node itself (a process of the node, or the
/// node's own address a masquerade left), else the address the connection came from.
fn source_of(client: IpAddr) -> Option<IpAddr> {
    let local = std::net::UdpSocket::bind(SocketAddr::new(client, 0)).is_ok();
    (!local).then_some(client)
}

/// Runs the proxy until `shutdown`: listeners and iptables rules follow `ports`.
pub async fn run(
    config: ProxyConfig,
    mesh: MeshHandle,
    mut ports: watch::Receiver<Arc<Vec<ServicePort>>>,
    peers: watch::Receiver<Arc<NodePeers>>,
    netpol: watch::Receiver<Arc<Policy>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut rules = Netfilter::new(&config.chain);
    rules.install(&config.node).await?;
    let dialer = Dialer::new(config.node.clone(), mesh, peers, config.connect_timeout);
    let shared = Arc::new(Shared {
        config,
        dialer,
        netpol,
    });
    let mut listeners: HashMap<(IpAddr, u16, Protocol), Listener> = HashMap::new();
    let mut health = crate::health::HealthChecks::default();
    loop {
        let wanted: Vec<ServicePort> = ports
            .borrow_and_update()
            .iter()
            .filter(|p| p.cluster_ip.is_ipv4()) // IPv6 cluster IPs: not intercepted yet
            .cloned()
            .collect();
        let mut keys = HashSet::new();
        for port in &wanted {
            let key = port.key();
            keys.insert(key);
            // The listener carries what the kernel cannot: endpoints on other nodes.
            let mut remote = port.clone();
            remote.backends.retain(|b| !b.is_local(&shared.config.node));
            match listeners.get(&key) {
                Some(listener) => {
                    let mut state = listener.state.lock().unwrap_or_else(|e| e.into_inner());
                    if state.port != remote {
                        state.port = remote;
                    }
                }
                None => match Listener::start(shared.clone(), remote, shutdown.child_token()).await
                {
                    Ok(listener) => {
                        listeners.insert(key, listener);
                    }
                    Err(error) => tracing::warn!(%error, "cannot listen for a service port"),
                },
            }
        }
        listeners.retain(|key, listener| {
            let keep = keys.contains(key);
            if !keep {
                listener.stop.cancel();
            }
            keep
        });
        let entries: Vec<Entry<'_>> = wanted
            .iter()
            .filter_map(|port| {
                let listener = listeners.get(&port.key())?;
                Some(Entry {
                    port,
                    listener: listener.local_port,
                })
            })
            .collect();
        if let Err(error) = rules.sync(&shared.config.node, &entries).await {
            tracing::warn!(%error, "cannot write the proxy's iptables rules");
        }
        health
            .set(
                crate::health::reports(&shared.config.node, &wanted),
                &shutdown,
            )
            .await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = ports.changed() => if changed.is_err() { break },
        }
    }
    for listener in listeners.values() {
        listener.stop.cancel();
    }
    rules.remove(&shared.config.node).await;
    Ok(())
}

struct Listener {
    state: Arc<Mutex<PortState>>,
    local_port: u16,
    stop: CancellationToken,
}

impl Listener {
    async fn start(
        shared: Arc<Shared>,
        port: ServicePort,
        stop: CancellationToken,
    ) -> io::Result<Self> {
        let name = format!("{}/{}:{}", port.namespace, port.service, port.port_name);
        let protocol = port.protocol;
        let state = Arc::new(Mutex::new(PortState {
            port,
            next: 0,
            affinity: HashMap::new(),
        }));
        let bind: SocketAddr = (Ipv4Addr::UNSPECIFIED, 0).into();
        let local_port = match protocol {
            Protocol::Tcp => {
                let listener = TcpListener::bind(bind).await?;
                let local_port = listener.local_addr()?.port();
                tokio::spawn(serve_tcp(listener, shared, state.clone(), stop.clone()));
                local_port
            }
            Protocol::Udp => {
                let socket = tunnel::udp_socket(bind)?;
                pktinfo::enable(&socket)?;
                let local_port = socket.local_addr()?.port();
                tokio::spawn(serve_udp(
                    Arc::new(socket),
                    shared,
                    state.clone(),
                    stop.clone(),
                ));
                local_port
            }
        };
        tracing::debug!(service = %name, local_port, "proxying");
        Ok(Self {
            state,
            local_port,
            stop,
        })
    }
}

async fn serve_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    state: Arc<Mutex<PortState>>,
    stop: CancellationToken,
) {
    loop {
        let (client, from) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = forward_tcp(client, from, &shared, &state) => {}
            }
        });
    }
}

async fn forward_tcp(
    mut client: TcpStream,
    from: SocketAddr,
    shared: &Shared,
    state: &Mutex<PortState>,
) {
    let _ = client.set_nodelay(true);
    let (candidates, name) = {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let name = format!("{}/{}", state.port.namespace, state.port.service);
        (state.candidates(from.ip()), name)
    };
    if candidates.is_empty() {
        tracing::debug!(service = %name, "no ready endpoint; connection refused");
        return; // dropping the client closes it, like a refused connection
    }
    let candidates = shared.permitted(from.ip(), Proto::Tcp, candidates);
    if candidates.is_empty() {
        tracing::debug!(service = %name, client = %from, "refused by the client's NetworkPolicy egress rules");
        return;
    }
    let source = source_of(from.ip());
    for backend in candidates {
        match shared.dialer.connect_for(&backend, source).await {
            Ok(mut upstream) => {
                state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remember(from.ip(), &backend);
                let result = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut upstream,
                    COPY_BUFFER,
                    COPY_BUFFER,
                )
                .await;
                if let Err(error) = result {
                    tracing::debug!(service = %name, %error, "proxied connection ended");
                }
                let _ = client.shutdown().await;
                return;
            }
            Err(error) => {
                tracing::info!(service = %name, endpoint = %SocketAddr::new(backend.ip, backend.port), node = ?backend.node, %error, "endpoint unreachable; trying another");
            }
        }
    }
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    state: Arc<Mutex<PortState>>,
    stop: CancellationToken,
) {
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::channel::<SocketAddr>(64);
    let mut buf = vec![0u8; tunnel::MAX_DATAGRAM];
    loop {
        let (length, from, local) = tokio::select! {
            _ = stop.cancelled() => return,
            Some(client) = ended_rx.recv() => {
                flows.remove(&client);
                continue;
            }
            received = pktinfo::recv(&socket, &mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "udp receive failed");
                    continue;
                }
            },
        };
        let datagram = buf[..length].to_vec();
        if let Some(flow) = flows.get(&from) {
            // A full flow queue drops the datagram, as a full socket buffer would.
            if flow.try_send(datagram).is_ok() || !flow.is_closed() {
                continue;
            }
            flows.remove(&from);
            continue;
        }
        if flows.len() >= MAX_UDP_FLOWS {
            continue;
        }
        let candidates = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .candidates(from.ip());
        let candidates = shared.permitted(from.ip(), Proto::Udp, candidates);
        let Some(backend) = candidates.into_iter().next() else {
            continue;
        };
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remember(from.ip(), &backend);
        let (tx, rx) = mpsc::channel(1024);
        let _ = tx.try_send(datagram);
        flows.insert(from, tx);
        let flow = UdpFlow {
            client: from,
            local,
            backend,
            socket: socket.clone(),
            shared: shared.clone(),
            idle: shared.config.udp_idle_timeout,
        };
        let ended = ended_tx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                result = flow.run(rx) => if let Err(error) = result {
                    tracing::debug!(%error, "udp flow ended");
                },
            }
            let _ = ended.send(from).await;
        });
    }
}

struct UdpFlow {
    client: SocketAddr,
    /// Where the client's datagrams were redirected to: replies leave from there.
    local: Option<Ipv4Addr>,
    backend: Backend,
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    idle: Duration,
}

impl UdpFlow {
    async fn run(self, mut datagrams: mpsc::Receiver<Vec<u8>>) -> io::Result<()> {
        let target = SocketAddr::new(self.backend.ip, self.backend.port);
        let activity = tunnel::Activity::new();
        match self.shared.dialer.peer_of(&self.backend) {
            None => {
                let upstream = tunnel::udp_socket((Ipv4Addr::UNSPECIFIED, 0).into())?;
                upstream.connect(target).await?;
                let outbound = async {
                    while let Some(datagram) = datagrams.recv().await {
                        activity.touch();
                        let _ = upstream.send(&datagram).await;
                    }
                    Ok::<_, io::Error>(())
                };
                let inbound = async {
                    let mut buf = vec![0u8; tunnel::MAX_DATAGRAM];
                    loop {
                        let length = upstream.recv(&mut buf).await?;
                        activity.touch();
                        let _ =
                            pktinfo::send(&self.socket, &buf[..length], self.local, self.client)
                                .await;
                    }
                };
                tokio::select! {
                    result = outbound => result,
                    result = inbound => result,
                    _ = activity.idle_for(self.idle) => Ok(()),
                }
            }
            Some(peer) => {
                let source = source_of(self.client.ip());
                let stream =
                    tunnel::open_for(self.shared.dialer.mesh(), peer, Kind::Udp, target, source)
                        .await?;
                let (mut reader, mut writer) = tokio::io::split(stream);
                let outbound = async {
                    while let Some(datagram) = datagrams.recv().await {
                        activity.touch();
                        tunnel::send_datagram(&mut writer, &datagram).await?;
                        writer.flush().await?;
                    }
                    Ok::<_, io::Error>(())
                };
                let inbound = async {
                    let mut buf = vec![0u8; tunnel::MAX_DATAGRAM];
                    while let Some(length) = tunnel::recv_datagram(&mut reader, &mut buf).await? {
                        activity.touch();
                        let _ =
                            pktinfo::send(&self.socket, &buf[..length], self.local, self.client)
                                .await;
                    }
                    Ok(())
                };
                tokio::select! {
                    result = outbound => result,
                    result = inbound => result,
                    _ = activity.idle_for(self.idle) => Ok(()),
                }
            }
        }
    }
}

/// UDP replies must leave from the address the client's datagram was redirected to, or
/// conntrack cannot map them back to the cluster IP: the listener learns that address from
/// `IP_PKTINFO` and sets it on each reply.
mod pktinfo {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg, setsockopt,
        sockopt,
    };
    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    pub fn enable(socket: &UdpSocket) -> io::Result<()> {
        setsockopt(socket, sockopt::Ipv4PacketInfo, &true).map_err(io::Error::from)
    }

    /// One datagram: its length, sender, and the (post-NAT) address it was sent to.
    pub async fn recv(
        socket: &UdpSocket,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<Ipv4Addr>)> {
        socket
            .async_io(Interest::READABLE, || {
                let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
                let mut iov = [IoSliceMut::new(&mut *buf)];
                let message = recvmsg::<SockaddrIn>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                )
                .map_err(io::Error::from)?;
                let mut local = None;
                for control in message.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::Ipv4PacketInfo(info) = control {
                        local = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
                    }
                }
                let from = message
                    .address
                    .map(|a| SocketAddr::V4(SocketAddrV4::from(a)))
                    .ok_or_else(|| io::Error::other("a datagram without a sender"))?;
                Ok((message.bytes, from, local))
            })
            .await
    }

    /// Sends `buf` to `to` from the local address `from`.
    pub async fn send(
        socket: &UdpSocket,
        buf: &[u8],
        from: Option<Ipv4Addr>,
        to: SocketAddr,
    ) -> io::Result<usize> {
        let SocketAddr::V4(to) = to else {
            return socket.send_to(buf, to).await;
        };
        let Some(from) = from else {
            return socket.send_to(buf, to).await;
        };
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(from).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        let destination = SockaddrIn::from(to);
        socket
            .async_io(Interest::WRITABLE, || {
                let cmsgs = [ControlMessage::Ipv4PacketInfo(&info)];
                sendmsg(
                    socket.as_raw_fd(),
                    &[IoSlice::new(buf)],
                    &cmsgs,
                    MsgFlags::empty(),
                    Some(&destination),
                )
                .map_err(io::Error::from)
            })
            .await
    }
}
