//! The mesh on a node of a site, on the node's API client: publishes this node's peer id and
//! addresses on its Node object, takes the site's nodes (their annotations) as the only peers
//! allowed in, follows Services and EndpointSlices for the proxy and the DNS server, and serves
//! its status and metrics on loopback. The last directory and service table are kept in the
//! mesh's folder, so a node restarted while the API is unreachable still proxies.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dns::{self, DnsConfig};
use crate::host::{self, HostConfig, MeshHandle, RelayLimits};
use crate::netpol::{self, Net, NodePolicy, Policy};
use crate::peers::{self, PeerInfo};
use crate::proxy::{self, ProxyConfig};
use crate::services::{NodePeers, ServicePort, ServiceTable};
use crate::tunnel::{self, Kind, TunnelConfig};

pub const PEER_ID_ANNOTATION: &str = "mesh.edgesite.io/peer-id";
pub const ADDRS_ANNOTATION: &str = "mesh.edgesite.io/addrs";
pub const RELAY_ANNOTATION: &str = "mesh.edgesite.io/relay";

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    /// The mesh's folder: its key and its cache.
    pub dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    /// Addresses to publish besides the listener's own (a public or port-forwarded address).
    pub advertise: Vec<Multiaddr>,
    /// Serve as a relay for the site's nodes.
    pub relay: Option<RelayLimits>,
    /// Relays that are not nodes of the site (`edgesite relay` on a public machine), as
    /// `/ip4/.../tcp/.../p2p/<id>`.
    pub extra_relays: Vec<Multiaddr>,
    pub mdns: bool,
    pub proxy: bool,
    /// The DNS server's address, and a dummy interface to put it on (the default link-local
    /// address is on no interface otherwise).
    pub dns: Option<SocketAddr>,
    pub dns_interface: Option<String>,
    pub domain: String,
    /// `edgesite mesh status` and Prometheus metrics (`/status`, `/metrics`).
    pub status_listen: Option<SocketAddr>,
}

/// Local endpoints other nodes may tunnel to: ready endpoints of services on this node, and the
/// node's pod network.
#[derive(Default)]
struct LocalTargets {
    endpoints: std::collections::HashSet<IpAddr>,
    pod_cidr: Option<(std::net::Ipv4Addr, u8)>,
}

impl LocalTargets {
    fn allows(&self, ip: IpAddr) -> bool {
        if self.endpoints.contains(&ip) {
            return true;
        }
        match (ip, self.pod_cidr) {
            (IpAddr::V4(ip), Some(cidr)) => in_cidr(ip, cidr),
            _ => false,
        }
    }
}

/// What other nodes may ask of this one through a tunnel: its own endpoints, and only for
/// clients its pods' NetworkPolicy lets in.
struct TunnelGate {
    targets: Arc<RwLock<LocalTargets>>,
    netpol: watch::Receiver<Arc<Policy>>,
}

impl tunnel::EndpointPolicy for TunnelGate {
    fn allows(&self, _peer: &PeerId, _kind: Kind, target: SocketAddr) -> bool {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .allows(target.ip())
    }

    fn admits(&self, kind: Kind, target: SocketAddr, source: Option<IpAddr>) -> bool {
        self.netpol
            .borrow()
            .ingress_allows(target.ip(), source, kind.into(), target.port())
    }
}

fn in_cidr(ip: std::net::Ipv4Addr, (net, bits): (std::net::Ipv4Addr, u8)) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn parse_cidr(text: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (ip, bits) = text.split_once('/')?;
    Some((ip.parse().ok()?, bits.parse().ok().filter(|b| *b <= 32)?))
}

/// What survives a restart without the API.
#[derive(Default, Serialize, Deserialize)]
struct Cache {
    /// node -> (peer id, addrs, relay)
    peers: BTreeMap<String, (String, Vec<String>, bool)>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    /// The NetworkPolicy rules of this node's pods, as the server last resolved them.
    #[serde(default)]
    netpol: NodePolicy,
    /// This node's pod network (tunnels to it are allowed; the policy accepts its traffic).
    #[serde(default)]
    pod_cidr: Option<Net>,
}

struct State {
    config: AgentConfig,
    mesh: MeshHandle,
    /// The site's nodes that run the mesh.
    nodes: BTreeMap<String, PeerInfo>,
    extra_relays: Vec<PeerInfo>,
    services: BTreeMap<(String, String), Service>,
    slices: BTreeMap<(String, String), EndpointSlice>,
    targets: Arc<RwLock<LocalTargets>>,
    ports: watch::Sender<Arc<Vec<ServicePort>>>,
    table: watch::Sender<Arc<ServiceTable>>,
    node_peers: watch::Sender<Arc<NodePeers>>,
    netpol_rules: NodePolicy,
    pod_cidr: Option<Net>,
    netpol: watch::Sender<Arc<Policy>>,
    dirty: bool,
}

impl State {
    async fn peers_changed(&mut self) {
        let mut directory: Vec<PeerInfo> = self.nodes.values().cloned().collect();
        directory.extend(self.extra_relays.iter().cloned());
        if let Err(error) = self.mesh.set_peers(directory).await {
            tracing::warn!(%error, "mesh directory not updated");
        }
        let node_peers: NodePeers = self
            .nodes
            .iter()
            .map(|(name, info)| (name.clone(), info.peer_id))
            .collect();
        self.node_peers.send_replace(Arc::new(node_peers));
        self.dirty = true;
    }

    fn services_changed(&mut self) {
        let mut table = ServiceTable::default();
        table.reset(
            self.services.values().cloned().collect(),
            self.slices.values().cloned().collect(),
        );
        let ports = table.ports();
        {
            let mut targets = self.targets.write().unwrap_or_else(|e| e.into_inner());
            targets.endpoints = ports
                .iter()
                .flat_map(|p| p.backends.iter())
                .filter(|b| b.node.as_deref() == Some(self.config.node.as_str()))
                .map(|b| b.ip)
                .collect();
        }
        self.ports.send_replace(Arc::new(ports));
        self.table.send_replace(Arc::new(table));
        self.dirty = true;
    }

    fn policy_changed(&mut self) {
        self.netpol.send_replace(Arc::new(Policy::new(
            self.netpol_rules.clone(),
            self.pod_cidr,
        )));
        self.dirty = true;
    }

    /// The ConfigMap holding this node's rules was written (`Some`) or deleted (`None`).
    fn apply_netpol(&mut self, config_map: Option<&ConfigMap>) {
        let rules = match config_map.and_then(|c| c.data.as_ref()?.get(netpol::KEY)) {
            None => NodePolicy::default(),
            Some(text) => match serde_json::from_str(text) {
                Ok(rules) => rules,
                Err(error) => {
                    tracing::warn!(%error, "network policy rules unreadable; keeping the last ones");
                    return;
                }
            },
        };
        if rules != self.netpol_rules {
            tracing::info!(pods = rules.pods.len(), "network policy rules updated");
            self.netpol_rules = rules;
            self.policy_changed();
        }
    }

    fn apply_node(&mut self, node: &Node) -> bool {
        let Some(name) = node.metadata.name.clone() else {
            return false;
        };
        if name == self.config.node {
            let cidr = node
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .and_then(parse_cidr);
            self.targets
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .pod_cidr = cidr;
            let net = cidr.map(|(addr, bits)| Net {
                addr: addr.into(),
                bits,
            });
            if net != self.pod_cidr {
                self.pod_cidr = net;
                self.policy_changed();
            }
        }
        let info = peer_info(node);
        let changed = self.nodes.get(&name) != info.as_ref();
        match info {
            Some(info) => {
                self.nodes.insert(name, info);
            }
            None => {
                self.nodes.remove(&name);
            }
        }
        changed
    }

    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let cache = Cache {
            peers: self
                .nodes
                .iter()
                .map(|(name, info)| {
                    let addrs = info.addrs.iter().map(|a| a.to_string()).collect();
                    (name.clone(), (info.peer_id.to_string(), addrs, info.relay))
                })
                .collect(),
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
            netpol: self.netpol_rules.clone(),
            pod_cidr: self.pod_cidr,
        };
        let path = self.config.dir.join("cache.json");
        let partial = self.config.dir.join("cache.json.partial");
        let written = serde_json::to_vec(&cache)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&partial, bytes))
            .and_then(|_| std::fs::rename(&partial, &path));
        if let Err(error) = written {
            tracing::warn!(%error, path = %path.display(), "mesh cache not written");
        }
    }
}

/// A node's entry in the directory, from its annotations.
pub fn peer_info(node: &Node) -> Option<PeerInfo> {
    let annotations = node.metadata.annotations.as_ref()?;
    let peer_id: PeerId = annotations.get(PEER_ID_ANNOTATION)?.parse().ok()?;
    let addrs = annotations
        .get(ADDRS_ANNOTATION)
        .map(|a| peers::parse_addrs(a))
        .unwrap_or_default();
    Some(PeerInfo {
        name: node.metadata.name.clone()?,
        peer_id,
        addrs,
        relay: annotations.get(RELAY_ANNOTATION).map(String::as_str) == Some("true"),
    })
}

fn key(namespace: &Option<String>, name: &Option<String>) -> (String, String) {
    (
        namespace.clone().unwrap_or_default(),
        name.clone().unwrap_or_default(),
    )
}

/// What the mesh shares with the node's other parts (the ingress): the service table as the
/// proxy sees it, and the way to this node's and other nodes' endpoints.
#[derive(Clone)]
pub struct Published {
    pub ports: watch::Receiver<Arc<Vec<ServicePort>>>,
    pub dialer: crate::dial::Dialer,
}

/// Runs the node's mesh until `shutdown`; `share` gets its [`Published`] handles once it runs.
pub async fn run(
    config: AgentConfig,
    client: kube::Client,
    shutdown: CancellationToken,
    share: Option<tokio::sync::oneshot::Sender<Published>>,
) -> Result<()> {
    std::fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating {}", config.dir.display()))?;
    let keypair = crate::identity::load_or_create(&config.dir.join("key"))?;
    let mut host_config = HostConfig::new(keypair, config.listen.clone());
    host_config.advertise = config.advertise.clone();
    host_config.relay = config.relay.clone();
    host_config.mdns = config.mdns;
    let (mesh, incoming) = host::start(host_config, shutdown.clone()).await?;
    tracing::info!(peer_id = %mesh.peer_id(), node = %config.node, "mesh started");

    let extra_relays = config
        .extra_relays
        .iter()
        .map(|addr| {
            let peer_id = addr
                .iter()
                .find_map(|p| match p {
                    libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                    _ => None,
                })
                .with_context(|| format!("relay address {addr} must end in /p2p/<peer id>"))?;
            Ok(PeerInfo {
                name: format!("relay {peer_id}"),
                peer_id,
                addrs: vec![addr.clone()],
                relay: true,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let targets = Arc::new(RwLock::new(LocalTargets::default()));
    let (netpol_tx, netpol_rx) = watch::channel(Arc::new(Policy::default()));
    let gate = TunnelGate {
        targets: targets.clone(),
        netpol: netpol_rx.clone(),
    };
    tokio::spawn(tunnel::serve(
        incoming,
        Arc::new(gate),
        TunnelConfig::default(),
        shutdown.clone(),
    ));

    let (ports_tx, ports_rx) = watch::channel(Arc::new(Vec::new()));
    let (table_tx, table_rx) = watch::channel(Arc::new(ServiceTable::default()));
    let (peers_tx, peers_rx) = watch::channel(Arc::new(NodePeers::new()));
    let mut state = State {
        config: config.clone(),
        mesh: mesh.clone(),
        nodes: BTreeMap::new(),
        extra_relays,
        services: BTreeMap::new(),
        slices: BTreeMap::new(),
        targets,
        ports: ports_tx,
        table: table_tx,
        node_peers: peers_tx,
        netpol_rules: NodePolicy::default(),
        pod_cidr: None,
        netpol: netpol_tx,
        dirty: false,
    };
    // The last known state first: the node may be offline.
    if let Ok(bytes) = std::fs::read(config.dir.join("cache.json")) {
        match serde_json::from_slice::<Cache>(&bytes) {
            Ok(cache) => {
                for (name, (peer_id, addrs, relay)) in cache.peers {
                    if let Ok(peer_id) = peer_id.parse() {
                        let addrs = addrs.iter().filter_map(|a| a.parse().ok()).collect();
                        state.nodes.insert(
                            name.clone(),
                            PeerInfo {
                                name,
                                peer_id,
                                addrs,
                                relay,
                            },
                        );
                    }
                }
                for service in cache.services {
                    state.services.insert(
                        key(&service.metadata.namespace, &service.metadata.name),
                        service,
                    );
                }
                state.netpol_rules = cache.netpol;
                if let Some(Net {
                    addr: IpAddr::V4(addr),
                    bits,
                }) = cache.pod_cidr
                {
                    state.pod_cidr = cache.pod_cidr;
                    state
                        .targets
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .pod_cidr = Some((addr, bits));
                }
                for slice in cache.slices {
                    state
                        .slices
                        .insert(key(&slice.metadata.namespace, &slice.metadata.name), slice);
                }
                tracing::info!(
                    nodes = state.nodes.len(),
                    services = state.services.len(),
                    "mesh state loaded from cache"
                );
            }
            Err(error) => tracing::warn!(%error, "mesh cache unreadable; starting empty"),
        }
    }
    state.peers_changed().await;
    state.services_changed();
    state.policy_changed();
    state.dirty = false;

    if let Some(share) = share {
        let _ = share.send(Published {
            ports: ports_rx.clone(),
            dialer: crate::dial::Dialer::new(
                config.node.clone(),
                mesh.clone(),
                peers_rx.clone(),
                Duration::from_secs(5),
            ),
        });
    }
    // Kept to be awaited at shutdown: the proxy removes its iptables rules then, and the
    // process must not exit half way (the OUTPUT jump and the chains stayed behind).
    let proxy_task = config.proxy.then(|| {
        let proxy_config = ProxyConfig::new(config.node.clone());
        let stop = shutdown.clone();
        let mesh = mesh.clone();
        let netpol = netpol_rx.clone();
        tokio::spawn(async move {
            if let Err(error) =
                proxy::run(proxy_config, mesh, ports_rx, peers_rx, netpol, stop).await
            {
                tracing::error!("mesh proxy stopped: {error:#}");
            }
        })
    });
    // NetworkPolicy in the kernel goes with the proxy: both write iptables as root.
    let netpol_task = config.proxy.then(|| {
        tokio::spawn(netpol::enforce(
            ProxyConfig::new(config.node.clone()).chain,
            netpol_rx.clone(),
            shutdown.clone(),
        ))
    });
    // Without its DNS server or status endpoint the node still links and proxies: say so
    // loudly and go on.
    if let Some(address) = config.dns
        && let Err(error) = start_dns(address, &config, table_rx, shutdown.clone()).await
    {
        tracing::error!(
            "mesh DNS is not running ({error:#}); pods cannot resolve service names on this node \
             (free the address or pick another with --mesh-dns)"
        );
    }
    if let Some(address) = config.status_listen
        && let Err(error) = crate::status::serve(address, mesh.clone(), shutdown.clone()).await
    {
        tracing::warn!("mesh status endpoint not served ({error:#}); see --mesh-status");
    }
    tokio::spawn(publish(
        client.clone(),
        config.node.clone(),
        mesh.clone(),
        config.relay.is_some(),
        config.advertise.clone(),
        shutdown.clone(),
    ));

    let mut nodes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let mut slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let mut netpol_rules = watcher(
        Api::<ConfigMap>::namespaced(client, netpol::NAMESPACE),
        watcher::Config::default().fields(&format!(
            "metadata.name={}",
            netpol::configmap_name(&config.node)
        )),
    )
    .default_backoff()
    .boxed();
    let mut netpol_listing: Option<Option<ConfigMap>> = None;
    let mut node_listing: Option<BTreeMap<String, PeerInfo>> = None;
    let mut service_listing: Option<BTreeMap<(String, String), Service>> = None;
    let mut slice_listing: Option<BTreeMap<(String, String), EndpointSlice>> = None;
    let mut save = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = save.tick() => state.save(),
            Some(event) = nodes.next() => match event {
                Ok(watcher::Event::Init) => node_listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(node)) => {
                    if let (Some(listing), Some(info)) = (node_listing.as_mut(), peer_info(&node)) {
                        listing.insert(info.name.clone(), info);
                    }
                    state.apply_node(&node);
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listing) = node_listing.take() {
                        state.nodes = listing;
                    }
                    state.peers_changed().await;
                }
                Ok(watcher::Event::Apply(node)) => {
                    if state.apply_node(&node) {
                        state.peers_changed().await;
                    }
                }
                Ok(watcher::Event::Delete(node)) => {
                    let removed = node.metadata.name.as_ref().and_then(|n| state.nodes.remove(n));
                    if removed.is_some() {
                        state.peers_changed().await;
                    }
                }
                Err(error) => tracing::debug!(%error, "node watch"),
            },
            Some(event) = services.next() => match event {
                Ok(watcher::Event::Init) => service_listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(service)) => {
                    if let Some(listing) = service_listing.as_mut() {
                        listing.insert(key(&service.metadata.namespace, &service.metadata.name), service);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listing) = service_listing.take() {
                        state.services = listing;
                        state.services_changed();
                    }
                }
                Ok(watcher::Event::Apply(service)) => {
                    state.services.insert(key(&service.metadata.namespace, &service.metadata.name), service);
                    state.services_changed();
                }
                Ok(watcher::Event::Delete(service)) => {
                    state.services.remove(&key(&service.metadata.namespace, &service.metadata.name));
                    state.services_changed();
                }
                Err(error) => tracing::debug!(%error, "service watch"),
            },
            Some(event) = slices.next() => match event {
                Ok(watcher::Event::Init) => slice_listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(slice)) => {
                    if let Some(listing) = slice_listing.as_mut() {
                        listing.insert(key(&slice.metadata.namespace, &slice.metadata.name), slice);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listing) = slice_listing.take() {
                        state.slices = listing;
                        state.services_changed();
                    }
                }
                Ok(watcher::Event::Apply(slice)) => {
                    state.slices.insert(key(&slice.metadata.namespace, &slice.metadata.name), slice);
                    state.services_changed();
                }
                Ok(watcher::Event::Delete(slice)) => {
                    state.slices.remove(&key(&slice.metadata.namespace, &slice.metadata.name));
                    state.services_changed();
                }
                Err(error) => tracing::debug!(%error, "endpointslice watch"),
            },
            Some(event) = netpol_rules.next() => match event {
                Ok(watcher::Event::Init) => netpol_listing = Some(None),
                Ok(watcher::Event::InitApply(config_map)) => {
                    if let Some(listing) = netpol_listing.as_mut() {
                        *listing = Some(config_map);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listing) = netpol_listing.take() {
                        state.apply_netpol(listing.as_ref());
                    }
                }
                Ok(watcher::Event::Apply(config_map)) => state.apply_netpol(Some(&config_map)),
                Ok(watcher::Event::Delete(_)) => state.apply_netpol(None),
                Err(error) => tracing::debug!(%error, "network policy watch"),
            },
        }
    }
    state.save();
    if let Some(proxy) = proxy_task {
        let _ = proxy.await;
    }
    if let Some(netpol) = netpol_task {
        let _ = netpol.await;
    }
    Ok(())
}

async fn start_dns(
    address: SocketAddr,
    config: &AgentConfig,
    table: watch::Receiver<Arc<ServiceTable>>,
    shutdown: CancellationToken,
) -> Result<()> {
    if let Some(interface) = &config.dns_interface
        && let Err(error) = ensure_dummy_interface(interface, address.ip()).await
    {
        // Kernels without dummy interfaces: the loopback interface holds it as well (an
        // address on `lo` outside 127/8 is reachable from pods like any local address).
        tracing::info!("no dummy interface ({error:#}); the DNS address goes on lo");
        add_address("lo", address.ip()).await?;
    }
    let udp = UdpSocket::bind(address)
        .await
        .with_context(|| format!("mesh DNS: binding udp {address}"))?;
    let tcp = TcpListener::bind(address)
        .await
        .with_context(|| format!("mesh DNS: binding tcp {address}"))?;
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let dns_config = DnsConfig {
        domain: config.domain.clone(),
        upstreams: DnsConfig::upstreams_from_resolv_conf(&resolv, address.ip()),
    };
    tracing::info!(%address, upstreams = ?dns_config.upstreams, "mesh DNS serving {}", config.domain);
    tokio::spawn(dns::serve(udp, tcp, dns_config, table, shutdown));
    Ok(())
}

/// A dummy interface holding the DNS server's address (idempotent).
async fn ensure_dummy_interface(name: &str, ip: IpAddr) -> Result<()> {
    let exists = ip_command(&["link", "show", name]).await?.status.success();
    if !exists {
        let out = ip_command(&["link", "add", name, "type", "dummy"]).await?;
        anyhow::ensure!(
            out.status.success(),
            "creating interface {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    add_address(name, ip).await?;
    let out = ip_command(&["link", "set", name, "up"]).await?;
    anyhow::ensure!(
        out.status.success(),
        "bringing {name} up: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

async fn ip_command(args: &[&str]) -> Result<std::process::Output> {
    tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .context("running ip (install the iproute2 package)")
}

/// Adds `ip` as a host address (/32 or /128) of interface `name` (idempotent).
async fn add_address(name: &str, ip: IpAddr) -> Result<()> {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let out = ip_command(&["addr", "replace", &format!("{ip}/{prefix}"), "dev", name]).await?;
    anyhow::ensure!(
        out.status.success(),
        "adding {ip} to {name}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Keeps this node's annotations (peer id, addresses, relay) on its Node object; the Node is
/// registered by edged, so this waits for it.
async fn publish(
    client: kube::Client,
    node: String,
    mesh: MeshHandle,
    relay: bool,
    advertise: Vec<Multiaddr>,
    shutdown: CancellationToken,
) {
    let api: Api<Node> = Api::all(client);
    let mut listen = mesh.listen_addrs();
    let mut published: Option<HashMap<String, String>> = None;
    let mut delay = Duration::from_secs(1);
    loop {
        let object = api.get_opt(&node).await.ok().flatten();
        // Not worth publishing: loopback, link-local (the DNS address is on every node) and
        // the node's own pod network (its bridge).
        let pod_cidr = object
            .as_ref()
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(parse_cidr);
        let local_only = |addr: &Multiaddr| {
            addr.iter().any(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => {
                    ip.is_loopback()
                        || ip.is_link_local()
                        || pod_cidr.is_some_and(|cidr| in_cidr(ip, cidr))
                }
                libp2p::multiaddr::Protocol::Ip6(ip) => {
                    ip.is_loopback() || ip.is_unicast_link_local()
                }
                _ => false,
            })
        };
        let mut addrs: Vec<String> = advertise.iter().map(|a| a.to_string()).collect();
        addrs.extend(
            listen
                .borrow_and_update()
                .iter()
                .filter(|a| peers::is_dialable(a) && !local_only(a))
                .map(|a| a.to_string()),
        );
        addrs.dedup();
        let wanted: HashMap<String, String> = [
            (PEER_ID_ANNOTATION.to_string(), mesh.peer_id().to_string()),
            (ADDRS_ANNOTATION.to_string(), addrs.join(",")),
            (RELAY_ANNOTATION.to_string(), relay.to_string()),
        ]
        .into();
        let current = object.map(|o| o.metadata.annotations.unwrap_or_default());
        let up_to_date = current
            .as_ref()
            .is_some_and(|c| wanted.iter().all(|(k, v)| c.get(k) == Some(v)));
        if current.is_some() && !up_to_date {
            let patch = serde_json::json!({"metadata": {"annotations": wanted}});
            match api
                .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(addrs = %wanted[ADDRS_ANNOTATION], "mesh address published on the node");
                    published = Some(wanted.clone());
                    delay = Duration::from_secs(1);
                }
                Err(error) => tracing::debug!(%error, "publishing the mesh address"),
            }
        } else if up_to_date {
            published = Some(wanted.clone());
        }
        let wait = if published.as_ref() == Some(&wanted) {
            Duration::from_secs(30)
        } else {
            delay
        };
        delay = (delay * 2).min(Duration::from_secs(30));
        let wait = wait.mul_f64(1.0 + rand::random::<f64>() * 0.2);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = listen.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_targets() {
        let mut targets = LocalTargets::default();
        assert!(!targets.allows("10.42.1.5".parse().unwrap()));
        targets.pod_cidr = parse_cidr("10.42.1.0/24");
        assert!(targets.allows("10.42.1.5".parse().unwrap()));
        assert!(!targets.allows("10.42.2.5".parse().unwrap()));
        targets.endpoints.insert("192.168.7.7".parse().unwrap());
        assert!(targets.allows("192.168.7.7".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_none());
    }
}
