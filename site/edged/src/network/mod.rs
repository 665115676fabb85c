//! Pod networking: one network namespace per pod (`netns.rs`), plugged by the standard CNI
//! plugins (`cni.rs`: loopback, bridge + host-local IPAM, portmap for hostPorts).

pub mod cni;
pub mod netns;
