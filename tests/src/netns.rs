//! Network topologies for end-to-end mesh tests: namespaces, veth pairs, a switch (bridge) for
//! the "public" segment and NAT routers, all made by the test and deleted when dropped. The
//! site's processes run inside them with `ip netns exec`.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawning a command");
    assert!(
        output.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Namespaces made by a test; deleted when dropped.
pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

impl Net {
    /// Fails (never skips) when the machine cannot build topologies.
    pub fn new() -> Self {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        assert!(
            root,
            "network topology tests need root (network namespaces, veth, iptables)"
        );
        for tool in [["ip", "-V"], ["iptables", "--version"]] {
            assert!(
                Command::new(tool[0])
                    .arg(tool[1])
                    .output()
                    .is_ok_and(|o| o.status.success()),
                "network topology tests need `{}` (apt-get install iproute2 iptables)",
                tool[0]
            );
        }
        let prefix = format!(
            "es{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            prefix,
            namespaces: Vec::new(),
        }
    }

    /// Makes namespace `name` (loopback up, forwarding on) and returns its full name.
    pub fn ns(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &full]).output();
        run(&["ip", "netns", "add", &full]);
        self.namespaces.push(full.clone());
        run(&["ip", "-n", &full, "link", "set", "lo", "up"]);
        self.exec(&full, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        full
    }

    pub fn exec(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        run(&all);
    }

    /// A veth pair between two namespaces, with an address (CIDR) on each end.
    pub fn link(&self, ns_a: &str, if_a: &str, addr_a: &str, ns_b: &str, if_b: &str, addr_b: &str) {
        run(&[
            "ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns",
            ns_b,
        ]);
        for (ns, iface, addr) in [(ns_a, if_a, addr_a), (ns_b, if_b, addr_b)] {
            if !addr.is_empty() {
                run(&["ip", "-n", ns, "addr", "add", addr, "dev", iface]);
            }
            run(&["ip", "-n", ns, "link", "set", iface, "up"]);
        }
    }

    /// A switch: bridge `br0` in `ns`.
    pub fn switch(&self, ns: &str) {
        run(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", ns, "link", "set", "br0", "up"]);
    }

    /// Plugs `host` into the switch in `switch` (its interface is `wan`).
    pub fn plug(&self, switch: &str, port: &str, host: &str, addr: &str) {
        self.link(switch, port, "", host, "wan", addr);
        run(&["ip", "-n", switch, "link", "set", port, "master", "br0"]);
    }

    pub fn default_route(&self, ns: &str, via: &str) {
        run(&["ip", "-n", ns, "route", "add", "default", "via", via]);
    }

    /// Makes `router` a NAT for `lan` out of its `wan`: endpoint-independent (MASQUERADE keeps
    /// ports) or symmetric (`--random-fully`); unsolicited inbound connections are dropped.
    pub fn nat(&self, router: &str, lan: &str, symmetric: bool) {
        let mut args = vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            lan,
            "-o",
            "wan",
            "-j",
            "MASQUERADE",
        ];
        if symmetric {
            args.push("--random-fully");
        }
        self.exec(router, &args);
        self.exec(
            router,
            &[
                "iptables",
                "-A",
                "INPUT",
                "-i",
                "wan",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW,INVALID",
                "-j",
                "DROP",
            ],
        );
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A tokio runtime whose threads are all inside a namespace: every socket its tasks open
/// belongs to the namespace (for in-process hosts of a topology).
pub struct NsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    pub fn start(ns: &str) -> Self {
        let path = format!("/run/netns/{ns}");
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let enter = move || {
                let file = std::fs::File::open(&path).expect("opening the namespace");
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the namespace");
            };
            enter();
            // Two workers, like a node's agent: every thread the runtime starts enters the
            // namespace first.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .on_thread_start(enter)
                .enable_all()
                .build()
                .expect("runtime");
            handle_tx
                .send(runtime.handle().clone())
                .expect("handing out the runtime");
            runtime.block_on(async {
                let _ = stop_rx.await;
            });
            runtime.shutdown_background();
        });
        let handle = handle_rx.recv().expect("the namespace thread started");
        Self {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Runs `future` in the namespace and waits for it.
    pub async fn run<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(future)
            .await
            .expect("task in the namespace")
    }

    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The public segment's addresses in [`TwoNats`].
pub const RELAY_IP: &str = "172.30.0.10";
pub const NAT_A_IP: &str = "172.30.0.1";
pub const NAT_B_IP: &str = "172.30.0.2";
pub const NODE_A_IP: &str = "192.168.1.2";
pub const NODE_B_IP: &str = "192.168.2.2";

/// The topology of the mesh tests and benchmark (REFERENCE.md section 4): a relay (or the
/// site's server) on a "public" segment, two NAT routers on it, a node behind each.
///
/// ```text
///             relay 172.30.0.10
///                     |
///     [public switch 172.30.0.0/24]
///          |                      |
///     natA 172.30.0.1        natB 172.30.0.2     (MASQUERADE; B optionally --random-fully)
///          |                      |
///     nodeA 192.168.1.2      nodeB 192.168.2.2
/// ```
pub struct TwoNats {
    pub net: Net,
    pub public: String,
    pub relay: String,
    pub nat_a: String,
    pub nat_b: String,
    pub node_a: String,
    pub node_b: String,
}

impl TwoNats {
    pub fn new(symmetric_b: bool) -> Self {
        let mut net = Net::new();
        let public = net.ns("pub");
        let relay = net.ns("relay");
        let nat_a = net.ns("natA");
        let nat_b = net.ns("natB");
        let node_a = net.ns("nodeA");
        let node_b = net.ns("nodeB");
        net.switch(&public);
        net.plug(&public, "p-relay", &relay, &format!("{RELAY_IP}/24"));
        net.plug(&public, "p-natA", &nat_a, &format!("{NAT_A_IP}/24"));
        net.plug(&public, "p-natB", &nat_b, &format!("{NAT_B_IP}/24"));
        net.link(
            &nat_a,
            "lan",
            "192.168.1.1/24",
            &node_a,
            "eth0",
            &format!("{NODE_A_IP}/24"),
        );
        net.link(
            &nat_b,
            "lan",
            "192.168.2.1/24",
            &node_b,
            "eth0",
            &format!("{NODE_B_IP}/24"),
        );
        net.default_route(&node_a, "192.168.1.1");
        net.default_route(&node_b, "192.168.2.1");
        net.nat(&nat_a, "192.168.1.0/24", false);
        net.nat(&nat_b, "192.168.2.0/24", symmetric_b);
        Self {
            net,
            public,
            relay,
            nat_a,
            nat_b,
            node_a,
            node_b,
        }
    }
}

/// A mesh host (the node's libp2p host and its tunnel server) running in a namespace, in this
/// process: the library under test, without an API server.
pub struct MeshHost {
    pub name: String,
    pub port: u16,
    pub runtime: NsRuntime,
    pub mesh: edgemesh::MeshHandle,
    pub stop: tokio_util::sync::CancellationToken,
}

impl MeshHost {
    /// Starts `name` in `ns` on TCP `port` (0: any), a relay if `relay`, serving tunnels to
    /// the endpoints `policy` allows.
    pub async fn start(
        name: &str,
        ns: &str,
        port: u16,
        relay: bool,
        policy: impl edgemesh::tunnel::EndpointPolicy,
        open_to_any_peer: bool,
    ) -> anyhow::Result<Self> {
        let runtime = NsRuntime::start(ns);
        let mut config = edgemesh::HostConfig::new(
            edgemesh::identity::load_or_create(&tempfile::tempdir()?.path().join("key"))?,
            vec![format!("/ip4/0.0.0.0/tcp/{port}").parse()?],
        );
        if relay {
            config.relay = Some(edgemesh::RelayLimits::default());
        }
        config.open_to_any_peer = open_to_any_peer;
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let (mesh, incoming) = runtime
            .run(async move { edgemesh::host::start(config, token).await })
            .await?;
        runtime.spawn(edgemesh::tunnel::serve(
            incoming,
            std::sync::Arc::new(policy),
            edgemesh::tunnel::TunnelConfig::default(),
            stop.clone(),
        ));
        Ok(Self {
            name: name.to_string(),
            port,
            runtime,
            mesh,
            stop,
        })
    }

    pub fn peer_id(&self) -> edgemesh::PeerId {
        self.mesh.peer_id()
    }

    /// This host as a directory entry, at `ip` (its address as its Node would publish it).
    pub fn info(&self, ip: &str, relay: bool) -> edgemesh::PeerInfo {
        let addr = format!("/ip4/{ip}/tcp/{}", self.port)
            .parse()
            .expect("a multiaddr");
        edgemesh::PeerInfo {
            name: self.name.clone(),
            peer_id: self.peer_id(),
            addrs: vec![addr],
            relay,
        }
    }

    /// Waits until this host's connection to `peer` is `kind` (`direct`, `relayed`).
    pub async fn wait_connection(
        &self,
        peer: edgemesh::PeerId,
        kind: &str,
        within: std::time::Duration,
    ) -> edgemesh::PeerStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let status = self.mesh.status().await.expect("mesh status");
            if let Some(found) = status
                .peers
                .iter()
                .find(|p| p.peer_id == peer.to_string() && p.connection == kind)
            {
                return found.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: no {kind} connection to {peer} within {within:?}; status: {status:#?}",
                self.name
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

impl Drop for MeshHost {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
