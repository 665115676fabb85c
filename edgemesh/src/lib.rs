//! EdgeMesh: services reachable across nodes and NATs.
//!
//! - [`host`]: the node's libp2p host (relay client everywhere, relay server on relay nodes,
//!   DCUtR hole punching, AutoNAT, mDNS) and the [`host::MeshHandle`] the rest uses.
//! - [`streams`]: which connection carries a stream (direct first) and who may connect (the
//!   site's nodes only).
//! - [`tunnel`]: what runs inside a stream: TCP connections and UDP datagrams to an endpoint on
//!   the remote node.
//! - [`identity`], [`peers`]: a node's key, and the directory of the site's nodes.

pub mod agent;
pub mod dial;
pub mod dns;
pub mod health;
pub mod host;
pub mod identity;
pub mod netfilter;
pub mod netpol;
pub mod peers;
pub mod proxy;
pub mod services;
pub mod status;
pub mod streams;
pub mod tunnel;

pub use host::{HostConfig, MeshHandle, MeshStatus, PeerStatus, RelayLimits};
pub use libp2p::{Multiaddr, PeerId, multiaddr};
pub use peers::PeerInfo;
pub use streams::MeshStream;
