//! Network namespace topologies for the mesh tests: namespaces, veth pairs, a bridge for the
//! "public" segment, NAT routers with iptables, and a tokio runtime per host whose thread lives
//! in the host's namespace (every socket its tasks open belongs to that namespace).

#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use edgemesh::host::{self, HostConfig, Incoming, MeshHandle};
use edgemesh::tunnel::{self, EndpointPolicy, TunnelConfig};
use edgemesh::{PeerInfo, RelayLimits};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio_util::sync::CancellationToken;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Fails (never skips) when the machine cannot build topologies.
pub fn require_prerequisites() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the mesh NAT tests need root (network namespaces, veth, iptables)"
    );
    for tool in ["ip", "iptables"] {
        let found = Command::new(tool).arg("-V").output().is_ok()
            || Command::new(tool).arg("--version").output().is_ok();
        assert!(
            found,
            "the mesh NAT tests need `{tool}` (apt-get install iproute2 iptables)"
        );
    }
}

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

/// A set of namespaces, deleted when dropped.
pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

impl Net {
    pub fn new() -> Self {
        require_prerequisites();
        let prefix = format!(
            "em{}x{}",
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
        run(&[
            "ip",
            "netns",
            "exec",
            &full,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        full
    }

    pub fn exec(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        run(&all);
    }

    /// A veth pair: `if_a` in `ns_a` with `addr_a` (CIDR), `if_b` in `ns_b` with `addr_b`.
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

    /// A bridge `br0` in `ns` (the public segment's switch).
    pub fn bridge(&self, ns: &str) {
        run(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", ns, "link", "set", "br0", "up"]);
    }

    /// Plugs `host` into the bridge in `switch` through interface `wan` with `addr`.
    pub fn plug(&self, switch: &str, port: &str, host: &str, addr: &str) {
        self.link(switch, port, "", host, "wan", addr);
        run(&["ip", "-n", switch, "link", "set", port, "master", "br0"]);
    }

    pub fn default_route(&self, ns: &str, via: &str) {
        run(&["ip", "-n", ns, "route", "add", "default", "via", via]);
    }

    /// Source NAT for `lan` leaving through `wan`: endpoint-independent (Linux keeps ports), or
    /// symmetric with `--random-fully`.
    pub fn masquerade(&self, router: &str, lan: &str, symmetric: bool) {
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
        // Like any home or site router: unsolicited connections from outside are dropped, not
        // answered with a reset.
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

    /// Adds `ms` of delay on `iface` of `ns` with netem, when the kernel has it. Returns whether
    /// the delay is in place.
    pub fn delay(&self, ns: &str, iface: &str, ms: u32) -> bool {
        let delay = format!("{ms}ms");
        let output = Command::new("ip")
            .args([
                "netns", "exec", ns, "tc", "qdisc", "add", "dev", iface, "root", "netem", "delay",
                &delay,
            ])
            .output()
            .expect("spawning tc");
        if !output.status.success() {
            eprintln!(
                "netem is not available here ({}); the topology runs without added delay",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        output.status.success()
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

/// A tokio runtime on a thread inside a namespace.
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
            let file = File::open(&path).expect("opening the namespace");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the namespace");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(runtime.handle().clone()).unwrap();
            runtime.block_on(async {
                let _ = stop_rx.await;
            });
        });
        let handle = handle_rx.recv().expect("the namespace thread started");
        Self {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Runs `future` on this namespace's runtime and waits for it.
    pub async fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(future)
            .await
            .expect("task in the namespace")
    }

    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
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

/// A mesh host running in a namespace, serving tunnels to the endpoints `policy` allows.
pub struct Node {
    pub name: String,
    pub runtime: NsRuntime,
    pub mesh: MeshHandle,
    pub shutdown: CancellationToken,
}

pub const MESH_PORT: u16 = 4001;

impl Node {
    pub async fn start(
        name: &str,
        ns: &str,
        relay: bool,
        policy: impl EndpointPolicy,
        open_to_any_peer: bool,
    ) -> Self {
        let runtime = NsRuntime::start(ns);
        let mut config = HostConfig::new(
            Keypair::generate_ed25519(),
            vec![format!("/ip4/0.0.0.0/tcp/{MESH_PORT}").parse().unwrap()],
        );
        if relay {
            config.relay = Some(RelayLimits::default());
        }
        config.open_to_any_peer = open_to_any_peer;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (mesh, incoming): (MeshHandle, Incoming) = runtime
            .run(async move { host::start(config, token).await })
            .await
            .expect("starting the mesh host");
        runtime.spawn(tunnel::serve(
            incoming,
            std::sync::Arc::new(policy),
            TunnelConfig::default(),
            shutdown.clone(),
        ));
        Self {
            name: name.to_string(),
            runtime,
            mesh,
            shutdown,
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.mesh.peer_id()
    }

    /// This node as a directory entry, at `addr` (its address as others would publish it).
    pub fn info(&self, addr: &str, relay: bool) -> PeerInfo {
        let addr: Multiaddr = format!("/ip4/{addr}/tcp/{MESH_PORT}").parse().unwrap();
        PeerInfo {
            name: self.name.clone(),
            peer_id: self.peer_id(),
            addrs: vec![addr],
            relay,
        }
    }

    /// Waits until this node's connection to `peer` is `kind` (`direct`, `relayed`).
    pub async fn wait_connection(
        &self,
        peer: PeerId,
        kind: &str,
        within: Duration,
    ) -> edgemesh::PeerStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let status = self.mesh.status().await.expect("status");
            let found = status
                .peers
                .iter()
                .find(|p| p.peer_id == peer.to_string())
                .cloned();
            if let Some(found) = found.as_ref().filter(|f| f.connection == kind) {
                return found.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: no {kind} connection to {peer} within {within:?}; status: {status:#?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
