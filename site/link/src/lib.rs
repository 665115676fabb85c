//! The dial-out transport shared by the node tunnel (agent -> API server) and the cloud link
//! (site -> cloud hub). A peer that may sit behind NAT or an egress-only firewall *dials*: it
//! opens one TLS connection with its client certificate, asks for an HTTP/1.1 upgrade to a named
//! protocol, and then *serves* HTTP/2 over that connection. The side that *accepts* speaks
//! HTTP/2 as the client over it, so every request it makes of the peer (logs, exec, a cluster
//! proxy, a sync batch) is one multiplexed stream on the connection the peer opened. Nothing
//! listens on the dialing side.
//!
//! - [`dial`]: connect (directly or through an HTTPS proxy), upgrade, serve; [`dial::run`] keeps
//!   the link up with [`backoff::Backoff`] (exponential, full jitter, reset only after the link
//!   stayed up a while).
//! - [`accept`]: answer the upgrade and take the connection over as a [`accept::Peer`].
//! - [`registry::Registry`]: the connected peers by name.
//! - [`balancer::Balancer`]: an agent's client-side load balancer in front of the site's servers.
//! - [`pipe`]: a byte pipe through one stream (a whole HTTP/1.1 connection inside the link).
//! - [`frames`]: the framing of exec, attach and port-forward data inside a stream, bounded by
//!   [`frames::MAX_FRAME`].
//!
//! Both ends send HTTP/2 pings every [`KEEPALIVE`] and drop a connection whose ping is not
//! answered within [`KEEPALIVE`]: a half-open link is noticed within twice that on either end.

pub mod accept;
pub mod backoff;
pub mod balancer;
pub mod dial;
pub mod frames;
pub mod pipe;
pub mod registry;
pub mod saved;

use std::time::Duration;

/// How often each end pings, and how long it waits for the answer.
pub const KEEPALIVE: Duration = Duration::from_secs(20);

/// What went wrong on a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the URL {0:?} is not https://HOST[:PORT]")]
    BadUrl(String),
    #[error("bad credentials: {0}")]
    Credentials(String),
    #[error("connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("the HTTPS proxy {proxy}: {reason}")]
    Proxy { proxy: String, reason: String },
    #[error("TLS with {address}: {reason}")]
    Tls { address: String, reason: String },
    #[error("the server refused the upgrade: {status}: {message}")]
    Refused {
        status: http::StatusCode,
        message: String,
    },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the link is closed")]
    Closed,
}

impl From<hyper::Error> for LinkError {
    fn from(e: hyper::Error) -> Self {
        LinkError::Http(e.to_string())
    }
}
