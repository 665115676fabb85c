//! Pod networking: one network namespace per pod (`netns.rs`), plugged by the standard CNI
//! plugins (`cni.rs`: loopback, bridge + host-local IPAM, portmap for hostPorts), and one
//! masquerade rule for the node's pod CIDR (`masquerade.rs`).

pub mod cni;
pub mod masquerade;
pub mod netns;
