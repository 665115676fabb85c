//! The HTTPS listener: TLS with client-certificate identities, and the limits that keep a
//! stranger from holding the server's connections or descriptors.
//!
//! - at most [`MAX_CONNECTIONS`] connections, and [`MAX_PER_ADDRESS`] from one client address,
//!   fewer when the open-files limit is low (half of it, and a quarter of it from one address),
//!   so one client cannot take the descriptors the server needs;
//! - a TLS handshake must finish within [`HANDSHAKE_TIMEOUT`], and the first request start
//!   within [`FIRST_REQUEST_TIMEOUT`] after it;
//! - a connection with no request in flight for [`IDLE_TIMEOUT`] is closed (HTTP/1.1 and
//!   HTTP/2 alike; a watch or a log stream is a request in flight);
//! - HTTP/1.1 headers must arrive within 30 s, HTTP/2 takes at most 1,000 concurrent streams
//!   and 64 KiB of headers (URIs are limited to 64 KiB by the `http` crate: a longer one gets
//!   414 with a Status over HTTP/1.1, see [`super::bare_errors`], and a bare 431 over HTTP/2,
//!   whose SETTINGS tell clients the limit before they send; Go's servers take 1 MiB);
//! - accept errors (descriptor exhaustion) back off instead of spinning, and are logged once
//!   per burst.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pipeline::TransportIdentity;
use crate::auth::{certificate_serial, identity_from_certificate};

/// The client's address, on every request that came through the listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub SocketAddr);

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections open at once from one client address.
pub const MAX_PER_ADDRESS: usize = 1024;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Connections per client address; an entry goes when its last connection does.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

/// The open-files limit now (it can be changed while the process runs).
fn descriptor_limit() -> usize {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
        .unwrap_or(1024)
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = table.entry(ip).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = table.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// Requests in flight on one connection and when the last one started or ended.
struct Activity {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
    served: AtomicUsize,
}

struct InFlight(Arc<Activity>);

impl Activity {
    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::Relaxed);
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        InFlight(self.clone())
    }

    /// When the connection may be closed for idleness, if nothing is in flight.
    fn idle_deadline(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.since.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = if self.served.load(Ordering::Relaxed) == 0 {
            FIRST_REQUEST_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        Some(since + timeout)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Logs the first of a burst of equal events, then a count once the burst is over a while.
struct Burst {
    what: &'static str,
    count: u64,
    since: Option<Instant>,
}

impl Burst {
    fn new(what: &'static str) -> Self {
        Burst {
            what,
            count: 0,
            since: None,
        }
    }

    fn hit(&mut self, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        match self.since {
            Some(since) if now - since < Duration::from_secs(10) => self.count += 1,
            _ => {
                if self.count > 0 {
                    tracing::warn!("{}: {} more in the last 10 s", self.what, self.count);
                }
                tracing::warn!("{}: {detail}", self.what);
                self.since = Some(now);
                self.count = 0;
            }
        }
    }
}

/// Serves `app` on `listener` behind TLS until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::default());
    let mut accept_failures = Burst::new("accept failed");
    let mut refused =
        Burst::new("connection refused: too many from one address, or too few descriptors left");
    let mut pause = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
        };
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (or memory): wait for some to be released instead of
                    // spinning on the same error.
                    accept_failures.hit(&e);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        pause = Duration::from_millis(5);
        let descriptors = descriptor_limit();
        let total = MAX_CONNECTIONS - slots.available_permits();
        let Some(address_slot) = (total <= descriptors / 2)
            .then(|| per_address.take(peer.ip(), MAX_PER_ADDRESS.min(descriptors / 4)))
            .flatten()
        else {
            refused.hit(&peer.ip());
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _address_slot = address_slot;
            let tls_stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            serve_connection(tls_stream, peer, app, shutdown).await;
        });
    }
}

async fn serve_connection(
    tls_stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) {
    let identity = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| {
            Some(TransportIdentity {
                identity: identity_from_certificate(cert.as_ref())?,
                serial: certificate_serial(cert.as_ref()),
            })
        });
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        since: Mutex::new(Instant::now()),
        served: AtomicUsize::new(0),
    });
    let requests = activity.clone();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if let Some(identity) = &identity {
                req.extensions_mut().insert(identity.clone());
            }
            req.extensions_mut().insert(PeerAddress(peer));
            let mut app = app.clone();
            // In flight until the response body is finished or dropped.
            let in_flight = requests.start();
            async move {
                use tower::Service;
                let response = app.call(req.map(Body::new)).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &in_flight;
                        frame
                    }))
                }))
            }
        });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(1000)
        // Long label selectors and URLs work over HTTP/2 up to the 64 KiB the `http` crate's
        // URIs allow (hyper's 16 KiB default answered GOAWAY); a larger header block gets 431.
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Duration::from_secs(30));
    let connection = builder.serve_connection_with_upgrades(
        TokioIo::new(super::bare_errors::StatusBodies::new(tls_stream)),
        service,
    );
    tokio::pin!(connection);
    loop {
        // Asleep until the connection could be idle long enough; woken early when it ends.
        let deadline = activity
            .idle_deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {
                if activity.idle_deadline().is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!(%peer, "closing an idle connection");
                    break;
                }
            }
        }
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
}
