//! What runs inside a mesh stream: the opener names an endpoint on the remote node (TCP or UDP,
//! address and port), the remote node checks that it is one of its own endpoints, connects, and
//! answers; then bytes (TCP) or length-prefixed datagrams (UDP) flow both ways.
//!
//! Wire format (all integers big-endian):
//! - request: `version u8` (2; 1 from older nodes), `kind u8` (1 TCP, 2 UDP), `family u8` (4,
//!   6), address (4 or 16 bytes), `port u16`; version 2 then names the connection's original
//!   client: `family u8` (0 none: the opening node itself, 4, 6) and its address, so the
//!   remote node applies its pod's NetworkPolicy to the real peer;
//! - answer: `code u8` (0 connected, 1 not an endpoint of this node, 2 connecting failed, 3
//!   refused by a NetworkPolicy), `length u16`, a UTF-8 message of that length;
//! - UDP after the answer: each datagram is `length u16` + payload, in both directions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::host::{Incoming, MeshHandle};
use crate::streams::MeshStream;

const VERSION: u8 = 2;
/// Buffer of each direction of a proxied TCP connection: tokio's default 8 KiB turns into
/// many small mesh frames.
pub const COPY_BUFFER: usize = 64 * 1024;
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
}

/// Which endpoints the remote side of a tunnel may ask this node to connect to: its own
/// Service endpoints and pods, never arbitrary addresses.
pub trait EndpointPolicy: Send + Sync + 'static {
    fn allows(&self, peer: &PeerId, kind: Kind, target: SocketAddr) -> bool;

    /// Whether the endpoint's NetworkPolicy lets `source` (the original client; `None`: the
    /// opening node itself) in.
    fn admits(&self, _kind: Kind, _target: SocketAddr, _source: Option<IpAddr>) -> bool {
        true
    }
}

impl<F> EndpointPolicy for F
where
    F: Fn(&PeerId, Kind, SocketAddr) -> bool + Send + Sync + 'static,
{
    fn allows(&self, peer: &PeerId, kind: Kind, target: SocketAddr) -> bool {
        self(peer, kind, target)
    }
}

#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Connecting to a local endpoint may take this long.
    pub connect_timeout: Duration,
    /// A UDP flow with no datagram either way for this long is closed.
    pub udp_idle_timeout: Duration,
    /// Tunnels served at once; more are refused.
    pub max_tunnels: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            udp_idle_timeout: Duration::from_secs(60),
            max_tunnels: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    Connected = 0,
    NotAnEndpoint = 1,
    ConnectFailed = 2,
    Refused = 3,
}

fn push_address(request: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => request.push(0),
        Some(IpAddr::V4(ip)) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
        Some(IpAddr::V6(ip)) => {
            request.push(6);
            request.extend_from_slice(&ip.octets());
        }
    }
}

async fn read_address(
    stream: &mut (impl AsyncRead + Unpin),
    family: u8,
) -> std::io::Result<Option<IpAddr>> {
    Ok(match family {
        0 => None,
        4 => {
            let mut octets = [0u8; 4];
            stream.read_exact(&mut octets).await?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        6 => {
            let mut octets = [0u8; 16];
            stream.read_exact(&mut octets).await?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unknown address family",
            ));
        }
    })
}

async fn write_request(
    stream: &mut (impl AsyncWrite + Unpin),
    kind: Kind,
    target: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<()> {
    let mut request = vec![VERSION, if kind == Kind::Tcp { 1 } else { 2 }];
    push_address(&mut request, Some(target.ip()));
    request.extend_from_slice(&target.port().to_be_bytes());
    push_address(&mut request, source);
    stream.write_all(&request).await?;
    stream.flush().await
}

/// A request: what to connect to and for whom (version 1 names no client).
async fn read_request(
    stream: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<(Kind, SocketAddr, Option<IpAddr>)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut head = [0u8; 3];
    stream.read_exact(&mut head).await?;
    if head[0] != 1 && head[0] != VERSION {
        return Err(bad("unsupported mesh tunnel version"));
    }
    let kind = match head[1] {
        1 => Kind::Tcp,
        2 => Kind::Udp,
        _ => return Err(bad("unknown tunnel kind")),
    };
    if head[2] == 0 {
        return Err(bad("a tunnel needs a target address"));
    }
    let ip = read_address(stream, head[2])
        .await?
        .expect("family is not 0");
    let port = stream.read_u16().await?;
    let source = if head[0] >= 2 {
        let family = stream.read_u8().await?;
        read_address(stream, family).await?
    } else {
        None
    };
    Ok((kind, SocketAddr::new(ip, port), source))
}

async fn write_answer(
    stream: &mut (impl AsyncWrite + Unpin),
    code: Code,
    message: &str,
) -> std::io::Result<()> {
    let message = &message.as_bytes()[..message.len().min(1024)];
    let mut answer = vec![code as u8];
    answer.extend_from_slice(&(message.len() as u16).to_be_bytes());
    answer.extend_from_slice(message);
    stream.write_all(&answer).await?;
    stream.flush().await
}

async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<()> {
    let code = stream.read_u8().await?;
    let length = stream.read_u16().await? as usize;
    let mut message = vec![0u8; length];
    stream.read_exact(&mut message).await?;
    let message = String::from_utf8_lossy(&message).into_owned();
    match code {
        0 => Ok(()),
        1 => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            message,
        )),
        2 => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            message,
        )),
        3 => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            message,
        )),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unknown tunnel answer",
        )),
    }
}

/// Opens a tunnel to `target` (an endpoint on `peer`'s node). For TCP the returned stream is
/// the connection; for UDP, use [`send_datagram`] and [`recv_datagram`] on it.
pub async fn open(
    mesh: &MeshHandle,
    peer: PeerId,
    kind: Kind,
    target: SocketAddr,
) -> std::io::Result<MeshStream> {
    open_for(mesh, peer, kind, target, None).await
}

/// [`open`] on behalf of `source`, the connection's original client (`None`: this node), whom
/// the remote node's NetworkPolicy judges.
pub async fn open_for(
    mesh: &MeshHandle,
    peer: PeerId,
    kind: Kind,
    target: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<MeshStream> {
    let mut stream = mesh.open(peer).await?;
    write_request(&mut stream, kind, target, source).await?;
    read_answer(&mut stream).await?;
    Ok(stream)
}

pub async fn send_datagram(
    stream: &mut (impl AsyncWrite + Unpin),
    payload: &[u8],
) -> std::io::Result<()> {
    if payload.len() > MAX_DATAGRAM {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "datagram too large",
        ));
    }
    let mut frame = Vec::with_capacity(payload.len() + 2);
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame).await
}

/// Reads one datagram into `buf` (at least [`MAX_DATAGRAM`] long); `Ok(None)` at the end.
pub async fn recv_datagram(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    let length = match stream.read_u16().await {
        Ok(length) => length as usize,
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    };
    if length > buf.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "datagram too large",
        ));
    }
    stream.read_exact(&mut buf[..length]).await?;
    Ok(Some(length))
}

/// Serves the tunnels other nodes open to this one until `shutdown`.
pub async fn serve(
    mut incoming: Incoming,
    policy: Arc<dyn EndpointPolicy>,
    config: TunnelConfig,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_tunnels));
    loop {
        let (peer, stream) = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = incoming.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many mesh tunnels; refusing one");
            continue;
        };
        let policy = policy.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = serve_one(peer, stream, policy.as_ref(), &config) => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "tunnel ended");
                    }
                }
            }
        });
    }
}

async fn serve_one(
    peer: PeerId,
    mut stream: MeshStream,
    policy: &dyn EndpointPolicy,
    config: &TunnelConfig,
) -> std::io::Result<()> {
    let (kind, target, source) =
        tokio::time::timeout(config.connect_timeout, read_request(&mut stream))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no tunnel request")
            })??;
    if !policy.allows(&peer, kind, target) {
        tracing::info!(%peer, %target, ?kind, "tunnel to an address that is not an endpoint of this node refused");
        let message = format!("{target} is not an endpoint on this node");
        return write_answer(&mut stream, Code::NotAnEndpoint, &message).await;
    }
    if !policy.admits(kind, target, source) {
        let from = source.map_or_else(|| "the node".to_string(), |s| s.to_string());
        tracing::debug!(%peer, %target, %from, ?kind, "tunnel refused by network policy");
        let message = format!("a NetworkPolicy of {target} does not let {from} in");
        return write_answer(&mut stream, Code::Refused, &message).await;
    }
    match kind {
        Kind::Tcp => {
            let connected =
                tokio::time::timeout(config.connect_timeout, TcpStream::connect(target)).await;
            let mut local = match connected {
                Ok(Ok(local)) => local,
                Ok(Err(error)) => {
                    let message = format!("connecting to {target}: {error}");
                    return write_answer(&mut stream, Code::ConnectFailed, &message).await;
                }
                Err(_) => {
                    let message = format!("connecting to {target}: timed out");
                    return write_answer(&mut stream, Code::ConnectFailed, &message).await;
                }
            };
            let _ = local.set_nodelay(true);
            write_answer(&mut stream, Code::Connected, "").await?;
            tokio::io::copy_bidirectional_with_sizes(
                &mut stream,
                &mut local,
                COPY_BUFFER,
                COPY_BUFFER,
            )
            .await?;
            Ok(())
        }
        Kind::Udp => {
            let bind: SocketAddr = if target.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = udp_socket(bind)?;
            if let Err(error) = socket.connect(target).await {
                let message = format!("connecting to {target}: {error}");
                return write_answer(&mut stream, Code::ConnectFailed, &message).await;
            }
            write_answer(&mut stream, Code::Connected, "").await?;
            relay_udp(stream, socket, config.udp_idle_timeout).await
        }
    }
}

/// Socket buffers of a UDP flow: room for bursts of a few thousand small datagrams (the
/// default of about 200 KiB holds only a few hundred, and what overflows is lost).
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `bind` with [`UDP_BUFFER`]-sized buffers (the kernel may cap them at
/// `net.core.rmem_max`/`wmem_max`).
pub fn udp_socket(bind: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if bind.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into())?;
    UdpSocket::from_std(socket.into())
}

/// Datagrams between a tunnel and a connected UDP socket until either side ends or the flow is
/// idle (no datagram either way) for `idle`.
pub async fn relay_udp(
    stream: MeshStream,
    socket: UdpSocket,
    idle: Duration,
) -> std::io::Result<()> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let socket = Arc::new(socket);
    let activity = Activity::new();
    let to_socket = {
        let socket = socket.clone();
        let activity = activity.clone();
        async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Some(length) = recv_datagram(&mut reader, &mut buf).await? {
                activity.touch();
                // A full socket buffer drops the datagram, as UDP would.
                let _ = socket.send(&buf[..length]).await;
            }
            Ok::<_, std::io::Error>(())
        }
    };
    let to_stream = {
        let activity = activity.clone();
        async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let length = socket.recv(&mut buf).await?;
                activity.touch();
                send_datagram(&mut writer, &buf[..length]).await?;
                writer.flush().await?;
            }
        }
    };
    tokio::select! {
        result = to_socket => result,
        result = to_stream => result,
        _ = activity.idle_for(idle) => Ok(()),
    }
}

/// When a flow last carried a datagram.
#[derive(Clone)]
pub struct Activity {
    start: tokio::time::Instant,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    pub fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Completes once nothing happened for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
            let deadline = self.start + Duration::from_millis(last) + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_name_the_client_and_older_ones_are_still_read() {
        let target: SocketAddr = "10.42.1.5:8080".parse().unwrap();
        for source in [
            None,
            Some("10.42.0.7".parse().unwrap()),
            Some("fd00::7".parse().unwrap()),
        ] {
            let mut wire = Vec::new();
            write_request(&mut wire, Kind::Udp, target, source)
                .await
                .unwrap();
            let read = read_request(&mut wire.as_slice()).await.unwrap();
            assert_eq!(read, (Kind::Udp, target, source));
        }
        // Version 1 (a node not yet upgraded): no client, read as the node itself.
        let v1 = [1u8, 1, 4, 10, 42, 1, 5, 0x1f, 0x90];
        let read = read_request(&mut v1.as_slice()).await.unwrap();
        assert_eq!(read, (Kind::Tcp, target, None));
        let bad = [9u8, 1, 4, 10, 42, 1, 5, 0x1f, 0x90];
        assert!(read_request(&mut bad.as_slice()).await.is_err());
        let no_target = [2u8, 1, 0, 0];
        assert!(read_request(&mut no_target.as_slice()).await.is_err());
        // A refusal by policy reads as permission denied, with its message.
        let mut answer = Vec::new();
        write_answer(&mut answer, Code::Refused, "no")
            .await
            .unwrap();
        let error = read_answer(&mut answer.as_slice()).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(error.to_string(), "no");
    }
}
