//! Node IPAM: gives every node a pod CIDR (`spec.podCIDR` / `podCIDRs`), a /24 of the
//! cluster CIDR (`--cluster-cidr`, 10.42.0.0/16 by default like K3s), as upstream's range
//! allocator does. The nodes' own fields are the allocation table: a CIDR is free when no node
//! holds it, so nothing else has to be kept consistent.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::Informers;

/// An IPv4 cluster CIDR cut into per-node subnets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCidr {
    base: u32,
    prefix: u8,
    node_prefix: u8,
}

impl ClusterCidr {
    /// `10.42.0.0/16` with /24 per node.
    pub fn parse(text: &str, node_prefix: u8) -> Result<Self, String> {
        let (ip, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR such as 10.42.0.0/16"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 CIDR such as 10.42.0.0/16"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| *p <= 30)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0..30"))?;
        if prefix > node_prefix {
            return Err(format!(
                "{text:?} is smaller than one node's /{node_prefix}; use a prefix of /{node_prefix} or shorter"
            ));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(ClusterCidr {
            base: u32::from(ip) & mask,
            prefix,
            node_prefix,
        })
    }

    pub fn subnets(&self) -> u32 {
        1u32 << (self.node_prefix - self.prefix)
    }

    pub fn subnet(&self, i: u32) -> String {
        let ip = Ipv4Addr::from(self.base + (i << (32 - self.node_prefix)));
        format!("{ip}/{}", self.node_prefix)
    }

    /// The first subnet no node holds.
    pub fn first_free(&self, used: &BTreeSet<String>) -> Option<String> {
        (0..self.subnets())
            .map(|i| self.subnet(i))
            .find(|s| !used.contains(s))
    }
}

/// Assigns pod CIDRs to nodes that have none.
pub fn controller(
    informers: &Informers,
    cidr: ClusterCidr,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let nodes = informers.nodes();
    let mut changes = nodes.subscribe(256);
    let store = nodes.store();
    let ready = nodes.synced();
    let client = informers.client_for("node-ipam-controller");
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        let api: Api<Node> = Api::all(client);
        loop {
            let mut used: BTreeSet<String> = BTreeSet::new();
            let mut waiting = Vec::new();
            for n in store.state() {
                match n.spec.as_ref().and_then(|s| s.pod_cidr.clone()) {
                    Some(c) => {
                        used.insert(c);
                    }
                    None => waiting.push(n.metadata.name.clone().unwrap_or_default()),
                }
            }
            for name in waiting {
                let Some(subnet) = cidr.first_free(&used) else {
                    tracing::warn!(node = %name, "the cluster CIDR has no free pod CIDR left");
                    break;
                };
                let patch = json!({"spec": {"podCIDR": subnet, "podCIDRs": [subnet]}});
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(node = %name, pod_cidr = %subnet, "assigned a pod CIDR");
                        used.insert(subnet);
                    }
                    Err(e) => tracing::warn!(node = %name, "assigning a pod CIDR failed: {e}"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = changes.recv() => if change.is_none() { return },
            }
            // Take the burst.
            while changes.try_recv().is_ok() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_handed_out_in_order_skipping_used_ones() {
        let c = ClusterCidr::parse("10.42.0.0/16", 24).unwrap();
        assert_eq!(c.subnets(), 256);
        let mut used = BTreeSet::new();
        assert_eq!(c.first_free(&used).unwrap(), "10.42.0.0/24");
        used.insert("10.42.0.0/24".to_string());
        assert_eq!(c.first_free(&used).unwrap(), "10.42.1.0/24");
        assert!(ClusterCidr::parse("10.42.0.0/25", 24).is_err());
        assert!(ClusterCidr::parse("nope", 24).is_err());
    }
}
