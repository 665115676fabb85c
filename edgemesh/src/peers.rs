//! The site's nodes as the mesh sees them: who may connect, where to reach them, which relay.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// A node of the site (or a standalone relay the site uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The node's name (for status and logs).
    pub name: String,
    pub peer_id: PeerId,
    /// Addresses the node listens on or is known at; relayed addresses are not needed here.
    pub addrs: Vec<Multiaddr>,
    /// The node runs a relay the others reserve a slot on.
    pub relay: bool,
}

/// `addr` without a trailing `/p2p/<id>`.
pub fn strip_peer(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// The address at which `relay` carries circuits for others (`.../p2p/R/p2p-circuit`).
pub fn circuit_listen_addr(relay_addr: &Multiaddr, relay: PeerId) -> Multiaddr {
    strip_peer(relay_addr)
        .with(Protocol::P2p(relay))
        .with(Protocol::P2pCircuit)
}

/// The address at which `target` is reached through `relay`.
pub fn circuit_dial_addr(relay_addr: &Multiaddr, relay: PeerId, target: PeerId) -> Multiaddr {
    circuit_listen_addr(relay_addr, relay).with(Protocol::P2p(target))
}

pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Addresses worth publishing or dialling: not relayed, not unspecified.
pub fn is_dialable(addr: &Multiaddr) -> bool {
    !is_relayed(addr)
        && addr.iter().all(|p| match p {
            Protocol::Ip4(ip) => !ip.is_unspecified(),
            Protocol::Ip6(ip) => !ip.is_unspecified(),
            _ => true,
        })
}

/// Parses a node annotation's comma-separated multiaddrs, skipping what does not parse.
pub fn parse_addrs(text: &str) -> Vec<Multiaddr> {
    text.split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses() {
        let relay = PeerId::random();
        let target = PeerId::random();
        let addr: Multiaddr = format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}")
            .parse()
            .unwrap();
        let listen = circuit_listen_addr(&addr, relay);
        assert_eq!(
            listen.to_string(),
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit")
        );
        let dial = circuit_dial_addr(&"/ip4/10.0.0.1/tcp/4001".parse().unwrap(), relay, target);
        assert_eq!(
            dial.to_string(),
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{target}")
        );
        assert!(is_relayed(&dial));
        assert!(!is_dialable(&dial));
        assert!(!is_dialable(&"/ip4/0.0.0.0/tcp/1".parse().unwrap()));
        assert!(is_dialable(&"/ip4/192.168.1.2/tcp/1".parse().unwrap()));
        assert_eq!(
            parse_addrs("/ip4/1.2.3.4/tcp/5, nonsense,/ip6/::1/tcp/7").len(),
            2
        );
    }
}
