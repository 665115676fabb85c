//! The node's mesh as the binary starts it (flags, defaults), the standalone relay
//! (`edgesite relay`) and `edgesite mesh status`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgemesh::Multiaddr;
use edgemesh::agent::AgentConfig;
use tokio_util::sync::CancellationToken;

/// Flags of the node's mesh (service proxy, cluster DNS, links to other nodes and sites).
#[derive(clap::Args, Clone, Debug)]
pub struct MeshArgs {
    /// Where the mesh listens for other nodes (libp2p multiaddr; repeat for several).
    #[arg(
        long = "mesh-listen",
        value_name = "MULTIADDR",
        default_value = "/ip4/0.0.0.0/tcp/4001"
    )]
    pub mesh_listen: Vec<Multiaddr>,
    /// An address other nodes can reach this one at besides its own interfaces' (a public
    /// address, a port forward); repeat for several.
    #[arg(long = "mesh-advertise", value_name = "MULTIADDR")]
    pub mesh_advertise: Vec<Multiaddr>,
    /// Serve as a relay for nodes that cannot reach each other directly (the server does by
    /// default; see --disable-mesh-relay).
    #[arg(long)]
    pub mesh_relay: bool,
    /// A standalone relay (`edgesite relay` prints its address): /ip4/HOST/tcp/4001/p2p/ID.
    #[arg(long = "mesh-relay-addr", value_name = "MULTIADDR")]
    pub mesh_relay_addr: Vec<Multiaddr>,
    /// Relay limits per circuit: bytes (0 = unlimited) and duration.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub mesh_relay_circuit_bytes: u64,
    #[arg(long, default_value = "24h", value_parser = crate::parse_duration, value_name = "DURATION")]
    pub mesh_relay_circuit_duration: Duration,
    /// The cluster DNS server's address on every node (pods' nameserver with dnsPolicy
    /// ClusterFirst unless --cluster-dns says otherwise).
    #[arg(
        long = "mesh-dns",
        value_name = "IP:PORT",
        default_value = "169.254.96.16:53"
    )]
    pub mesh_dns: SocketAddr,
    /// Where `edgesite mesh status` and Prometheus read the mesh's state (/status, /metrics).
    #[arg(
        long = "mesh-status",
        value_name = "IP:PORT",
        default_value = "127.0.0.1:10351"
    )]
    pub mesh_status: SocketAddr,
    #[arg(long)]
    pub disable_mesh_dns: bool,
    #[arg(long)]
    pub disable_mesh_proxy: bool,
    /// No mDNS discovery of other nodes on the LAN.
    #[arg(long)]
    pub disable_mesh_mdns: bool,
    /// No mesh at all on this node: no service proxy, no cluster DNS, no links to other nodes.
    #[arg(long)]
    pub disable_mesh: bool,
}

impl MeshArgs {
    /// The mesh's config for node `node`, or `None` with --disable-mesh. `relay_by_default`:
    /// this is the site's server.
    pub fn to_config(
        &self,
        data_dir: &Path,
        node: &str,
        domain: &str,
        relay: bool,
    ) -> Result<Option<AgentConfig>> {
        if self.disable_mesh {
            return Ok(None);
        }
        for addr in &self.mesh_relay_addr {
            if !addr
                .iter()
                .any(|p| matches!(p, edgemesh::multiaddr::Protocol::P2p(_)))
            {
                bail!(
                    "--mesh-relay-addr {addr} must end in /p2p/<peer id> (edgesite relay prints it)"
                );
            }
        }
        let relay = (relay || self.mesh_relay).then(|| edgemesh::RelayLimits {
            circuit_bytes: self.mesh_relay_circuit_bytes,
            circuit_duration: self.mesh_relay_circuit_duration,
            ..edgemesh::RelayLimits::default()
        });
        let dns = (!self.disable_mesh_dns).then_some(self.mesh_dns);
        // The default address is link-local and on no interface: it gets a dummy one.
        let dns_interface = dns
            .filter(|a| matches!(a.ip(), IpAddr::V4(v4) if v4.is_link_local()))
            .map(|_| "edgemesh0".to_string());
        Ok(Some(AgentConfig {
            node: node.to_string(),
            dir: data_dir.join("agent").join("mesh"),
            listen: self.mesh_listen.clone(),
            advertise: self.mesh_advertise.clone(),
            relay,
            extra_relays: self.mesh_relay_addr.clone(),
            mdns: !self.disable_mesh_mdns,
            proxy: !self.disable_mesh_proxy,
            dns,
            dns_interface,
            domain: domain.to_string(),
            status_listen: Some(self.mesh_status),
        }))
    }

    /// The nameserver pods get when --cluster-dns is not given.
    pub fn cluster_dns(&self) -> Option<IpAddr> {
        (!self.disable_mesh && !self.disable_mesh_dns).then_some(self.mesh_dns.ip())
    }
}

/// Starts the node's mesh; its failure to start (a taken port, no iptables) is an error here.
/// `share` gets the mesh's service table and dialer once it runs (for the ingress).
pub async fn start(
    config: AgentConfig,
    client: kube::Client,
    shutdown: CancellationToken,
    share: Option<tokio::sync::oneshot::Sender<edgemesh::agent::Published>>,
) -> Result<tokio::task::JoinHandle<()>> {
    Ok(tokio::spawn(async move {
        if let Err(error) = edgemesh::agent::run(config, client, shutdown, share).await {
            tracing::error!("mesh stopped: {error:#}");
        }
    }))
}

/// `edgesite relay`: a relay on a machine every site can reach. It serves any peer (within its
/// limits) and carries no services of its own.
#[derive(clap::Args, Clone, Debug)]
pub struct RelayArgs {
    #[arg(
        long = "listen",
        value_name = "MULTIADDR",
        default_value = "/ip4/0.0.0.0/tcp/4001"
    )]
    pub listen: Vec<Multiaddr>,
    /// The address nodes reach this machine at (its public address), e.g. /ip4/203.0.113.7/tcp/4001.
    #[arg(long = "advertise", value_name = "MULTIADDR")]
    pub advertise: Vec<Multiaddr>,
    /// Folder for the relay's key (its identity stays the same across restarts).
    #[arg(long, short = 'd', default_value = "/var/lib/edgesite-relay")]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub circuit_bytes: u64,
    #[arg(long, default_value = "24h", value_parser = crate::parse_duration, value_name = "DURATION")]
    pub circuit_duration: Duration,
    #[arg(long, default_value_t = 1024)]
    pub max_reservations: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_circuits: usize,
    #[arg(
        long = "status",
        value_name = "IP:PORT",
        default_value = "127.0.0.1:10351"
    )]
    pub status: SocketAddr,
}

pub fn run_relay(args: RelayArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgesite-relay")
        .build()?;
    runtime.block_on(async move {
        let keypair = edgemesh::identity::load_or_create(&args.data_dir.join("key"))?;
        let mut config = edgemesh::HostConfig::new(keypair, args.listen.clone());
        config.advertise = args.advertise.clone();
        config.open_to_any_peer = true;
        config.connect_all = false;
        config.mdns = false;
        config.relay = Some(edgemesh::RelayLimits {
            max_reservations: args.max_reservations,
            max_circuits: args.max_circuits,
            circuit_bytes: args.circuit_bytes,
            circuit_duration: args.circuit_duration,
            ..edgemesh::RelayLimits::default()
        });
        let shutdown = CancellationToken::new();
        let (mesh, _incoming) = edgemesh::host::start(config, shutdown.clone()).await?;
        edgemesh::status::serve(args.status, mesh.clone(), shutdown.clone()).await?;
        let mut listen = mesh.listen_addrs();
        let _ = tokio::time::timeout(Duration::from_secs(2), listen.changed()).await;
        let mut addrs: Vec<String> = args.advertise.iter().map(|a| a.to_string()).collect();
        addrs.extend(listen.borrow().iter().map(|a| a.to_string()));
        println!(
            "edgesite relay {} is up. Nodes use it with:",
            mesh.peer_id()
        );
        for addr in addrs {
            println!("  --mesh-relay-addr {addr}/p2p/{}", mesh.peer_id());
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        shutdown.cancel();
        Ok(())
    })
}

/// `edgesite mesh status`: the node's peers as a table (or JSON).
pub fn print_status(address: SocketAddr, json: bool) -> Result<()> {
    let body = http_get(address, "/status").with_context(|| {
        format!("asking the mesh at {address} (is `edgesite server` or `edgesite agent` running here, with the mesh enabled?)")
    })?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: edgemesh::MeshStatus = serde_json::from_str(&body)
        .context("the mesh status is not what this edgesite understands")?;
    print!("{}", edgemesh::status::table(&status));
    Ok(())
}

fn http_get(address: SocketAddr, path: &str) -> Result<String> {
    let mut conn = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}: {body}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}
