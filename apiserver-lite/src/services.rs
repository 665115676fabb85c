//! Service cluster IPs and node ports, allocated by the API server on create and update, as
//! upstream does (the service REST storage, not a controller).
//!
//! The stored Services are the allocation table: a free address is one no stored Service uses
//! and no write in flight has reserved. Deleting a Service frees its address with no further
//! bookkeeping, and a restart cannot lose or duplicate allocations. [`Allocator::repair`] runs
//! at start-up and reports addresses that ended up on two Services (say, after an older
//! version or a restored backup).
//!
//! Several servers sharing one datastore (etcd) could pick the same free address for two
//! Services written at once. Before an address is used, the allocating server therefore
//! creates a claim for it in the datastore (`/edgesite.io/serviceallocations/ip/<ip>`,
//! `.../nodeport/<port>`): a create, which only one server can win. A claim only arbitrates
//! writes in flight: an address no stored Service uses is free again once its claim is older
//! than [`CLAIM_FRESH`] (the Service's write has long succeeded or failed by then), and is then
//! claimed anew with a compare-and-swap.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::error::Cause;
use crate::storage::{Storage, StorageError, Stored, list_prefix};

/// The service network (`--service-cidr`) and node port range (`--service-node-port-range`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceNetwork {
    base: u32,
    prefix: u8,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for ServiceNetwork {
    /// K3s' defaults: 10.43.0.0/16 and 30000-32767.
    fn default() -> Self {
        ServiceNetwork {
            base: u32::from(Ipv4Addr::new(10, 43, 0, 0)),
            prefix: 16,
            node_ports: 30000..=32767,
        }
    }
}

impl ServiceNetwork {
    pub fn new(cidr: &str, node_ports: &str) -> Result<Self, String> {
        let (addr, prefix) = cidr.split_once('/').ok_or_else(|| {
            format!("service CIDR {cidr:?} is not an IPv4 CIDR such as 10.43.0.0/16")
        })?;
        let addr = Ipv4Addr::from_str(addr).map_err(|_| {
            format!("service CIDR {cidr:?} is not an IPv4 CIDR such as 10.43.0.0/16")
        })?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("service CIDR {cidr:?} has no valid prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!(
                "service CIDR {cidr:?}: the prefix length must be between 8 and 30"
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        let (low, high) = node_ports.split_once('-').ok_or_else(|| {
            format!("node port range {node_ports:?} is not a range such as 30000-32767")
        })?;
        let low: u16 = low.trim().parse().map_err(|_| {
            format!("node port range {node_ports:?} is not a range such as 30000-32767")
        })?;
        let high: u16 = high.trim().parse().map_err(|_| {
            format!("node port range {node_ports:?} is not a range such as 30000-32767")
        })?;
        if low == 0 || low > high {
            return Err(format!("node port range {node_ports:?} is empty"));
        }
        Ok(ServiceNetwork {
            base: u32::from(addr) & mask,
            prefix,
            node_ports: low..=high,
        })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    fn contains(&self, ip: u32) -> bool {
        ip & (u32::MAX << (32 - self.prefix)) == self.base
    }

    /// The first usable address: the `kubernetes` Service's.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    fn port_range(&self) -> String {
        format!("{}-{}", self.node_ports.start(), self.node_ports.end())
    }
}

/// Where claims live in the datastore (not served by the API).
pub const CLAIMS: &str = "/edgesite.io/serviceallocations/";
/// How long a claim holds an address that no stored Service uses.
pub const CLAIM_FRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Claims `what` (`ip/10.43.0.7`, `nodeport/30080`) for Service `owner` (`namespace/name`):
/// `false` when another write holds it. A dry run only looks: it claims nothing.
async fn claim(
    storage: &dyn Storage,
    what: &str,
    owner: &str,
    dry_run: bool,
) -> Result<bool, StorageError> {
    let key = format!("{CLAIMS}{what}");
    let now = chrono::Utc::now();
    let fresh_elsewhere = |held: &Stored| {
        held.object.get("owner").and_then(Value::as_str) != Some(owner)
            && held
                .object
                .get("claimed")
                .and_then(Value::as_str)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                // A claim made after `now` (by another server, a moment later) is fresh too.
                .is_some_and(|t| {
                    chrono::Duration::from_std(CLAIM_FRESH)
                        .is_ok_and(|fresh| now.signed_duration_since(t) <= fresh)
                })
    };
    if dry_run {
        return Ok(!storage
            .get(&key)
            .await?
            .is_some_and(|h| fresh_elsewhere(&h)));
    }
    let claim = json!({"owner": owner, "claimed": now.to_rfc3339()});
    match storage.create(&key, claim.clone()).await {
        Ok(_) => return Ok(true),
        Err(StorageError::AlreadyExists(_)) => {}
        Err(e) => return Err(e),
    }
    let Some(held) = storage.get(&key).await? else {
        // Removed meanwhile: try once more.
        return Ok(storage.create(&key, claim).await.is_ok());
    };
    if fresh_elsewhere(&held) {
        return Ok(false);
    }
    match storage.update(&key, claim, Some(held.revision)).await {
        Ok(_) => Ok(true),
        Err(StorageError::Conflict { .. } | StorageError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

#[derive(Default)]
struct InFlight {
    ips: HashSet<u32>,
    ports: HashSet<u16>,
}

pub struct Allocator {
    network: ServiceNetwork,
    in_flight: Arc<Mutex<InFlight>>,
    /// Serializes allocations: look at the table, pick, reserve.
    turn: tokio::sync::Mutex<()>,
}

/// Addresses reserved for one write; released when dropped (by then the write has either
/// stored them or failed).
pub struct Reservation {
    ips: Vec<u32>,
    ports: Vec<u16>,
    in_flight: Arc<Mutex<InFlight>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for ip in &self.ips {
            f.ips.remove(ip);
        }
        for p in &self.ports {
            f.ports.remove(p);
        }
    }
}

fn cluster_ip(service: &Value) -> Option<&str> {
    service
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn service_type(service: &Value) -> &str {
    service
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
}

fn needs_node_ports(service: &Value) -> bool {
    match service_type(service) {
        "NodePort" => true,
        "LoadBalancer" => service
            .pointer("/spec/allocateLoadBalancerNodePorts")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        _ => false,
    }
}

/// The node ports a Service holds: its ports' and its `healthCheckNodePort`.
fn node_ports(service: &Value) -> Vec<u16> {
    service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
        .chain(
            service
                .pointer("/spec/healthCheckNodePort")
                .and_then(Value::as_u64),
        )
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

/// Upstream gives a LoadBalancer with `externalTrafficPolicy: Local` a `healthCheckNodePort`,
/// where each node's proxy says whether it has a local endpoint.
fn needs_health_check_port(service: &Value) -> bool {
    service_type(service) == "LoadBalancer"
        && service
            .pointer("/spec/externalTrafficPolicy")
            .and_then(Value::as_str)
            == Some("Local")
}

fn identity(service: &Value) -> String {
    format!(
        "{}/{}",
        service
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        service
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    )
}

impl Allocator {
    pub fn new(network: ServiceNetwork) -> Self {
        Allocator {
            network,
            in_flight: Arc::default(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    pub fn network(&self) -> &ServiceNetwork {
        &self.network
    }

    /// What stored Services use, except `skip` (the Service being updated).
    async fn used(
        &self,
        storage: &dyn Storage,
        skip: &str,
    ) -> Result<(HashSet<u32>, HashSet<u16>), StorageError> {
        let listing = storage
            .list(&list_prefix("", "services", ""), None, None)
            .await?;
        let mut ips = HashSet::new();
        let mut ports = HashSet::new();
        for item in listing.items {
            let Ok(service) = item.value() else { continue };
            if identity(&service) == skip {
                continue;
            }
            if let Some(ip) = cluster_ip(&service).and_then(|s| Ipv4Addr::from_str(s).ok()) {
                ips.insert(u32::from(ip));
            }
            ports.extend(node_ports(&service));
        }
        Ok((ips, ports))
    }

    /// Fills in (on create) or carries over (on update) the cluster IP and node ports of
    /// `service`, allocating what is missing and checking what the user asked for.
    pub async fn assign(
        &self,
        storage: &dyn Storage,
        service: &mut Value,
        old: Option<&Value>,
        dry_run: bool,
    ) -> Result<Reservation, AssignError> {
        let _turn = self.turn.lock().await;
        let me = identity(service);
        let (mut used_ips, mut used_ports) = self
            .used(storage, &me)
            .await
            .map_err(AssignError::Storage)?;
        {
            let f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            used_ips.extend(f.ips.iter().copied());
            used_ports.extend(f.ports.iter().copied());
        }
        let mut reservation = Reservation {
            ips: Vec::new(),
            ports: Vec::new(),
            in_flight: self.in_flight.clone(),
        };
        let mut causes = Vec::new();
        let spec = service
            .get_mut("spec")
            .and_then(Value::as_object_mut)
            .ok_or(AssignError::Invalid(vec![]))?;
        let external_name = spec.get("type").and_then(Value::as_str) == Some("ExternalName");
        if let Some(old) = old {
            // An update that omits allocated values keeps them (upstream's patchAllocatedValues).
            let old_ip = cluster_ip(old);
            let new_empty = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty);
            if new_empty
                && !external_name
                && let Some(ip) = old_ip
            {
                spec.insert("clusterIP".into(), json!(ip));
                if let Some(ips) = old.pointer("/spec/clusterIPs") {
                    spec.insert("clusterIPs".into(), ips.clone());
                }
            }
        }
        if external_name {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        } else {
            match spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                Some("None") => {
                    spec.insert("clusterIPs".into(), json!(["None"]));
                }
                Some(requested) => {
                    let unchanged = old.and_then(cluster_ip) == Some(requested);
                    match Ipv4Addr::from_str(requested) {
                        Err(_) => causes.push(Cause::invalid(
                            "spec.clusterIPs[0]",
                            &json!(requested),
                            "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                        )),
                        Ok(ip) if !unchanged => {
                            let ip = u32::from(ip);
                            if !self.network.contains(ip) {
                                causes.push(Cause::invalid(
                                    "spec.clusterIPs",
                                    &json!([requested]),
                                    &format!("failed to allocate IP {requested}: the provided IP ({requested}) is not in the valid range. The range of valid IPs is {}", self.network.cidr()),
                                ));
                            } else if used_ips.contains(&ip)
                                || !claim(storage, &format!("ip/{requested}"), &me, dry_run)
                                    .await
                                    .map_err(AssignError::Storage)?
                            {
                                causes.push(Cause::invalid("spec.clusterIPs", &json!([requested]), &format!("failed to allocate IP {requested}: provided IP is already allocated")));
                            } else {
                                reserve_ip(&mut reservation, ip);
                            }
                        }
                        Ok(_) => {}
                    }
                    spec.insert("clusterIPs".into(), json!([requested]));
                }
                None => loop {
                    let Some(ip) = self.free_ip(&used_ips) else {
                        return Err(AssignError::Full(format!(
                            "failed to allocate a serviceIP: range is full ({})",
                            self.network.cidr()
                        )));
                    };
                    let text = Ipv4Addr::from(ip).to_string();
                    if !claim(storage, &format!("ip/{text}"), &me, dry_run)
                        .await
                        .map_err(AssignError::Storage)?
                    {
                        // Another server's write in flight has it.
                        used_ips.insert(ip);
                        continue;
                    }
                    reserve_ip(&mut reservation, ip);
                    spec.insert("clusterIP".into(), json!(text));
                    spec.insert("clusterIPs".into(), json!([text]));
                    break;
                },
            }
            spec.entry("ipFamilies").or_insert_with(|| json!(["IPv4"]));
            spec.entry("ipFamilyPolicy")
                .or_insert_with(|| json!("SingleStack"));
        }
        let wants_ports = needs_node_ports(service);
        let old_ports: HashMap<(String, i64), u64> = old
            .and_then(|o| o.pointer("/spec/ports").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let key = (
                    p.get("protocol")
                        .and_then(Value::as_str)
                        .unwrap_or("TCP")
                        .to_string(),
                    p.get("port").and_then(Value::as_i64)?,
                );
                Some((key, p.get("nodePort").and_then(Value::as_u64)?))
            })
            .collect();
        if let Some(spec) = service.get_mut("spec").and_then(Value::as_object_mut) {
            if wants_ports && spec.get("type").and_then(Value::as_str) != Some("ClusterIP") {
                spec.entry("externalTrafficPolicy")
                    .or_insert_with(|| json!("Cluster"));
            }
            let ports = spec.get_mut("ports").and_then(Value::as_array_mut);
            for (i, port) in ports.into_iter().flatten().enumerate() {
                let Some(port) = port.as_object_mut() else {
                    continue;
                };
                if !wants_ports {
                    port.remove("nodePort");
                    continue;
                }
                let key = (
                    port.get("protocol")
                        .and_then(Value::as_str)
                        .unwrap_or("TCP")
                        .to_string(),
                    port.get("port").and_then(Value::as_i64).unwrap_or(0),
                );
                if port.get("nodePort").is_none()
                    && let Some(p) = old_ports.get(&key)
                {
                    port.insert("nodePort".into(), json!(p));
                }
                let requested = port.get("nodePort").and_then(Value::as_u64);
                if requested.is_some() && old_ports.get(&key) == requested.as_ref() {
                    continue;
                }
                let field = format!("spec.ports[{i}].nodePort");
                let claimed = self
                    .claim_node_port(
                        storage,
                        requested,
                        &field,
                        &me,
                        dry_run,
                        &mut used_ports,
                        &mut reservation,
                        &mut causes,
                    )
                    .await?;
                if let (None, Some(p)) = (requested, claimed) {
                    port.insert("nodePort".into(), json!(p));
                }
            }
        }
        // The health check port: kept across updates, allocated when first needed, dropped
        // when the Service no longer needs it.
        let wants_health = needs_health_check_port(service);
        let old_health = old
            .and_then(|o| o.pointer("/spec/healthCheckNodePort"))
            .and_then(Value::as_u64)
            .filter(|_| old.is_some_and(needs_health_check_port));
        if let Some(spec) = service.get_mut("spec").and_then(Value::as_object_mut) {
            if !wants_health {
                spec.remove("healthCheckNodePort");
            } else {
                if spec.get("healthCheckNodePort").is_none()
                    && let Some(p) = old_health
                {
                    spec.insert("healthCheckNodePort".into(), json!(p));
                }
                let requested = spec.get("healthCheckNodePort").and_then(Value::as_u64);
                if requested.is_none() || requested != old_health {
                    let claimed = self
                        .claim_node_port(
                            storage,
                            requested,
                            "spec.healthCheckNodePort",
                            &me,
                            dry_run,
                            &mut used_ports,
                            &mut reservation,
                            &mut causes,
                        )
                        .await?;
                    if let (None, Some(p)) = (requested, claimed) {
                        spec.insert("healthCheckNodePort".into(), json!(p));
                    }
                }
            }
        }
        if !causes.is_empty() {
            return Err(AssignError::Invalid(causes));
        }
        {
            let mut f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            f.ips.extend(reservation.ips.iter().copied());
            f.ports.extend(reservation.ports.iter().copied());
        }
        Ok(reservation)
    }

    /// Claims node port `requested` for Service `me` (in the range, not used, not claimed by
    /// another write), or a free one when `None`; the port, or `None` with a cause pushed for
    /// field `field`.
    #[allow(clippy::too_many_arguments)]
    async fn claim_node_port(
        &self,
        storage: &dyn Storage,
        requested: Option<u64>,
        field: &str,
        me: &str,
        dry_run: bool,
        used_ports: &mut HashSet<u16>,
        reservation: &mut Reservation,
        causes: &mut Vec<Cause>,
    ) -> Result<Option<u16>, AssignError> {
        let Some(requested) = requested else {
            loop {
                let Some(p) = self.free_port(used_ports, &reservation.ports) else {
                    return Err(AssignError::Full(format!(
                        "failed to allocate a {}: range is full ({})",
                        field.rsplit('.').next().unwrap_or(field),
                        self.network.port_range()
                    )));
                };
                if !claim(storage, &format!("nodeport/{p}"), me, dry_run)
                    .await
                    .map_err(AssignError::Storage)?
                {
                    used_ports.insert(p);
                    continue;
                }
                reserve_port(reservation, p);
                return Ok(Some(p));
            }
        };
        let taken = |causes: &mut Vec<Cause>| {
            causes.push(Cause::invalid(
                field,
                &json!(requested),
                "provided port is already allocated",
            ))
        };
        match u16::try_from(requested)
            .ok()
            .filter(|p| self.network.node_ports.contains(p))
        {
            None => causes.push(Cause::invalid(
                field,
                &json!(requested),
                &format!(
                    "provided port is not in the valid range. The range of valid ports is {}",
                    self.network.port_range()
                ),
            )),
            Some(p) if used_ports.contains(&p) || reservation.ports.contains(&p) => taken(causes),
            Some(p) => {
                if claim(storage, &format!("nodeport/{p}"), me, dry_run)
                    .await
                    .map_err(AssignError::Storage)?
                {
                    reserve_port(reservation, p);
                    return Ok(Some(p));
                }
                taken(causes);
            }
        }
        Ok(None)
    }

    /// A free address, starting at a random offset like upstream (so addresses are not reused
    /// right away), skipping the network address, the broadcast address and the first address
    /// (the `kubernetes` Service's) unless it is what is asked for.
    fn free_ip(&self, used: &HashSet<u32>) -> Option<u32> {
        let size = self.network.size();
        let usable = size - 3;
        let start = rand::random_range(0..usable);
        (0..usable)
            .map(|i| self.network.base + 2 + (start + i) % usable)
            .find(|ip| !used.contains(ip))
    }

    fn free_port(&self, used: &HashSet<u16>, reserved: &[u16]) -> Option<u16> {
        let (low, high) = (
            *self.network.node_ports.start(),
            *self.network.node_ports.end(),
        );
        let count = u32::from(high - low) + 1;
        let start = rand::random_range(0..count);
        (0..count)
            .map(|i| low + ((start + i) % count) as u16)
            .find(|p| !used.contains(p) && !reserved.contains(p))
    }

    /// Start-up check: every address on at most one Service. Returns the problems found.
    pub async fn repair(&self, storage: &dyn Storage) -> Result<Vec<String>, StorageError> {
        let listing = storage
            .list(&list_prefix("", "services", ""), None, None)
            .await?;
        let mut ips: HashMap<String, Vec<String>> = HashMap::new();
        let mut ports: HashMap<u64, Vec<String>> = HashMap::new();
        for item in listing.items {
            let Ok(service) = item.value() else { continue };
            if let Some(ip) = cluster_ip(&service).filter(|ip| *ip != "None") {
                ips.entry(ip.to_string())
                    .or_default()
                    .push(identity(&service));
            }
            for p in node_ports(&service) {
                ports
                    .entry(u64::from(p))
                    .or_default()
                    .push(identity(&service));
            }
        }
        let mut problems = Vec::new();
        for (ip, owners) in ips.into_iter().filter(|(_, o)| o.len() > 1) {
            problems.push(format!("the cluster IP {ip} was assigned to multiple services ({}); please recreate all but one", owners.join(", ")));
        }
        for (port, owners) in ports.into_iter().filter(|(_, o)| o.len() > 1) {
            problems.push(format!("the node port {port} was assigned to multiple services ({}); please recreate all but one", owners.join(", ")));
        }
        problems.sort();
        Ok(problems)
    }
}

fn reserve_ip(r: &mut Reservation, ip: u32) {
    r.ips.push(ip);
}

fn reserve_port(r: &mut Reservation, port: u16) {
    r.ports.push(port);
}

#[derive(Debug)]
pub enum AssignError {
    Invalid(Vec<Cause>),
    /// The range is used up (upstream answers 500 with this message).
    Full(String),
    Storage(StorageError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs_and_ranges() {
        let n = ServiceNetwork::new("10.43.7.9/16", "30000-32767").unwrap();
        assert_eq!(n.cidr(), "10.43.0.0/16");
        assert_eq!(n.first(), Ipv4Addr::new(10, 43, 0, 1));
        assert!(n.contains(u32::from(Ipv4Addr::new(10, 43, 255, 1))));
        assert!(!n.contains(u32::from(Ipv4Addr::new(10, 44, 0, 1))));
        assert!(
            ServiceNetwork::new("10.43.0.0", "30000-32767")
                .unwrap_err()
                .contains("10.43.0.0/16")
        );
        assert!(ServiceNetwork::new("10.43.0.0/16", "32767-30000").is_err());
        assert_eq!(
            ServiceNetwork::default(),
            ServiceNetwork::new("10.43.0.0/16", "30000-32767").unwrap()
        );
    }

    #[test]
    fn free_addresses_skip_used_reserved_and_special_ones() {
        let a = Allocator::new(ServiceNetwork::new("10.0.0.0/29", "30000-30001").unwrap());
        // /29: .0 network, .1 kubernetes, .7 broadcast -> .2 to .6 usable.
        let mut used = HashSet::new();
        for _ in 0..5 {
            let ip = a.free_ip(&used).unwrap();
            assert!((2..=6).contains(&(ip & 7)), "{}", Ipv4Addr::from(ip));
            assert!(used.insert(ip));
        }
        assert_eq!(a.free_ip(&used), None);
        let used_ports = HashSet::from([30000]);
        assert_eq!(a.free_port(&used_ports, &[]), Some(30001));
        assert_eq!(a.free_port(&used_ports, &[30001]), None);
    }

    fn service(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}})
    }

    /// Two servers on one etcd allocate for Services written at the same time: no address and
    /// no node port is given twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_servers_never_hand_out_the_same_address() {
        let etcd = crate::storage::etcd::tests::TestEtcd::start().await;
        // 13 usable addresses and 13 ports for 12 Services: collisions are likely without claims.
        let network = ServiceNetwork::new("10.0.0.0/28", "30000-30012").unwrap();
        let mut servers = Vec::new();
        for _ in 0..2 {
            let store: Arc<dyn Storage> = Arc::new(etcd.open("/registry").await);
            servers.push((store, Arc::new(Allocator::new(network.clone()))));
        }
        let mut tasks = Vec::new();
        for i in 0..12 {
            let (store, allocator) = servers[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("s{i}");
                let mut object = service(&name);
                let reservation = allocator
                    .assign(&*store, &mut object, None, false)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                store
                    .create(
                        &crate::storage::object_key("", "services", "default", &name),
                        object,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                drop(reservation);
                Ok::<_, String>(())
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let listing = servers[0]
            .0
            .list(&list_prefix("", "services", ""), None, None)
            .await
            .unwrap();
        assert_eq!(listing.items.len(), 12);
        let mut ips = HashSet::new();
        let mut ports = HashSet::new();
        for item in listing.items {
            let object = item.value().unwrap();
            assert!(
                ips.insert(cluster_ip(&object).unwrap().to_string()),
                "an IP given twice"
            );
            for p in node_ports(&object) {
                assert!(ports.insert(p), "node port {p} given twice");
            }
        }
        assert_eq!(ports.len(), 12);
        // An address requested by name that another Service's write holds is refused.
        let (store, allocator) = servers[1].clone();
        let taken = ips.iter().next().unwrap().clone();
        let mut object = service("late");
        object["spec"]["clusterIP"] = json!(taken);
        assert!(matches!(
            allocator.assign(&*store, &mut object, None, false).await,
            Err(AssignError::Invalid(_))
        ));
        // A dry run picks addresses but claims none.
        let before = store.list(CLAIMS, None, None).await.unwrap().items.len();
        let mut object = service("dry");
        object["spec"]["type"] = json!("ClusterIP");
        allocator
            .assign(&*store, &mut object, None, true)
            .await
            .unwrap();
        assert!(cluster_ip(&object).is_some());
        let after = store.list(CLAIMS, None, None).await.unwrap().items.len();
        assert_eq!(before, after, "a dry run claimed an address");
    }
}
