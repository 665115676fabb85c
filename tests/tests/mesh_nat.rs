//! The mesh library across NATs, without containerd or an API server: mesh hosts run in this
//! process, each on a thread inside its own network namespace of the topology in
//! `tests::netns::TwoNats` (REFERENCE.md section 4): a relay on a "public" segment, two NAT
//! routers (MASQUERADE; B's `--random-fully` for a symmetric NAT), a node behind each. Needs
//! root; run by tests/run.sh.

use std::net::SocketAddr;
use std::time::Duration;

use edgemesh::PeerId;
use edgemesh::proxy::{self, ProxyConfig};
use edgemesh::services::{Backend, Balancing, NodePeers, Protocol, ServicePort};
use edgemesh::tunnel::{self, Kind};
use tests::netns::{MeshHost as Node, Net, TwoNats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Site {
    topology: TwoNats,
    relay: Node,
    a: Node,
    b: Node,
}

/// Endpoints a node serves: its own LAN address only.
fn own_lan(prefix: &'static str) -> impl Fn(&PeerId, Kind, SocketAddr) -> bool + Send + Sync {
    move |_peer: &PeerId, _kind: Kind, target: SocketAddr| {
        target.ip().to_string().starts_with(prefix)
    }
}

async fn two_nats(symmetric_b: bool) -> Site {
    two_nats_with(symmetric_b, |_| {}).await
}

/// [`two_nats`], with `prepare` run on the topology before the nodes start.
async fn two_nats_with(symmetric_b: bool, prepare: impl FnOnce(&TwoNats)) -> Site {
    let topology = TwoNats::new(symmetric_b);
    prepare(&topology);
    let start = |name: &'static str, ns: &str, relay: bool, lan: &'static str| {
        let ns = ns.to_string();
        async move {
            Node::start(name, &ns, 4001, relay, own_lan(lan), false)
                .await
                .unwrap()
        }
    };
    let relay = start("relay", &topology.relay, true, "172.30.0.").await;
    let a = start("node-a", &topology.node_a, false, "192.168.1.").await;
    let b = start("node-b", &topology.node_b, false, "192.168.2.").await;
    // The directory every node gets from the site's Node objects: each node's own (private)
    // address, the relay's public one.
    let directory = vec![
        relay.info("172.30.0.10", true),
        a.info("192.168.1.2", false),
        b.info("192.168.2.2", false),
    ];
    for node in [&relay, &a, &b] {
        node.mesh.set_peers(directory.clone()).await.unwrap();
    }
    Site {
        topology,
        relay,
        a,
        b,
    }
}

/// A TCP server on `node` that answers each connection with the number of bytes it read and
/// the bytes' sum (mod 2^32), after the client closes its side.
fn counting_server(node: &Node, addr: &'static str) {
    let ready = node.runtime.spawn(async move {
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let (mut total, mut sum) = (0u64, 0u32);
                    loop {
                        let n = conn.read(&mut buf).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                        sum = buf[..n].iter().fold(sum, |s, b| s.wrapping_add(*b as u32));
                    }
                    let answer = format!("{total} {sum}");
                    conn.write_all(answer.as_bytes()).await.unwrap();
                    conn.shutdown().await.unwrap();
                });
            }
        });
    });
    drop(ready);
}

async fn send_and_count(a: &Node, peer: PeerId, target: SocketAddr, bytes: usize) -> String {
    let mut stream = tunnel::open(&a.mesh, peer, Kind::Tcp, target)
        .await
        .expect("tunnel");
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

fn expected_answer(bytes: usize) -> String {
    let sum = (0..bytes).fold(0u32, |s, i| {
        s.wrapping_add(((i % (64 * 1024)) % 251) as u32)
    });
    format!("{bytes} {sum}")
}

/// B's router first answers A's direct packets with resets (OpenWrt's default WAN `reject`):
/// the hole punch fails and the link is relayed. Once the router lets them through, a later
/// punch (retried with backoff while relayed) makes the link direct without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hole_punch_is_retried_while_relayed() {
    const HOSTILE: [&[&str]; 2] = [
        &[
            "INPUT",
            "-i",
            "wan",
            "-s",
            "172.30.0.1",
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
        &[
            "FORWARD",
            "-i",
            "wan",
            "-s",
            "172.30.0.1",
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    ];
    let rules = |topology: &TwoNats, action: &str| {
        for rule in HOSTILE {
            let mut args = vec!["iptables", action];
            args.extend_from_slice(rule);
            topology.net.exec(&topology.nat_b, &args);
        }
    };
    let site = two_nats_with(false, |t| rules(t, "-I")).await;
    let (a, b) = (&site.a, &site.b);
    a.wait_connection(b.peer_id(), "relayed", Duration::from_secs(60))
        .await;
    // Wait for a failed punch on either side.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let failures: u32 = [
            a.mesh.status().await.unwrap(),
            b.mesh.status().await.unwrap(),
        ]
        .iter()
        .flat_map(|s| s.peers.iter())
        .filter(|p| p.peer_id == a.peer_id().to_string() || p.peer_id == b.peer_id().to_string())
        .map(|p| p.punch_failures)
        .sum();
        if failures > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed hole punch behind the rejecting router"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = a.mesh.status().await.unwrap();
    let peer = status
        .peers
        .iter()
        .find(|p| p.peer_id == b.peer_id().to_string())
        .unwrap();
    assert_eq!(peer.connection, "relayed", "{peer:?}");
    assert!(
        peer.address
            .as_deref()
            .is_some_and(|a| a.contains("/p2p-circuit/")),
        "a relayed peer shows its circuit: {peer:?}"
    );
    // The router relents; no restart.
    rules(&site.topology, "-D");
    let direct = a
        .wait_connection(b.peer_id(), "direct", Duration::from_secs(60))
        .await;
    assert!(!direct.address.unwrap_or_default().contains("p2p-circuit"));
    // New streams take the direct connection.
    counting_server(b, "192.168.2.2:8080");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let target: SocketAddr = "192.168.2.2:8080".parse().unwrap();
    assert_eq!(
        send_and_count(a, b.peer_id(), target, 100_000).await,
        expected_answer(100_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_independent_nats_are_punched_through() {
    let site = two_nats(false).await;
    let (a, b) = (&site.a, &site.b);
    // Both nodes reserve on the relay, A reaches B through it, DCUtR replaces the relayed
    // connection with a direct one.
    let status = a
        .wait_connection(b.peer_id(), "direct", Duration::from_secs(60))
        .await;
    let address = status.address.clone().unwrap();
    assert!(!address.contains("p2p-circuit"), "{status:?}");
    assert!(
        address.contains("/ip4/172.30.0.2/"),
        "B is reached at its NAT's address: {status:?}"
    );
    let punch = status.punch_ms.or(b
        .wait_connection(a.peer_id(), "direct", Duration::from_secs(5))
        .await
        .punch_ms);
    eprintln!("hole punched in {punch:?} ms");

    counting_server(b, "192.168.2.2:8080");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let target: SocketAddr = "192.168.2.2:8080".parse().unwrap();
    let answer = send_and_count(a, b.peer_id(), target, 1_000_000).await;
    assert_eq!(answer, expected_answer(1_000_000));

    // The stream went over the direct connection: the relay carried nothing of it.
    let relay_status = site.relay.mesh.status().await.unwrap();
    let after = a
        .wait_connection(b.peer_id(), "direct", Duration::from_secs(1))
        .await;
    assert!(after.bytes_sent >= 1_000_000, "{after:?}");
    eprintln!("relay's view: {relay_status:#?}");

    // B serves only its own endpoints.
    let elsewhere: SocketAddr = "172.30.0.10:4001".parse().unwrap();
    let refused = tunnel::open(&a.mesh, b.peer_id(), Kind::Tcp, elsewhere)
        .await
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{refused}"
    );
    assert!(refused.to_string().contains("not an endpoint"), "{refused}");
    // A closed port on B's LAN is a clear error, not a hang.
    let closed: SocketAddr = "192.168.2.2:9".parse().unwrap();
    let error = tunnel::open(&a.mesh, b.peer_id(), Kind::Tcp, closed)
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_nat_stays_relayed_and_carries_10_mb() {
    let site = two_nats(true).await;
    let (a, b) = (&site.a, &site.b);
    a.wait_connection(b.peer_id(), "relayed", Duration::from_secs(60))
        .await;

    counting_server(b, "192.168.2.2:8080");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let target: SocketAddr = "192.168.2.2:8080".parse().unwrap();
    // 10 MB: far beyond libp2p's default circuit limit of 128 KiB.
    let bytes = 10 * 1024 * 1024;
    let answer = send_and_count(a, b.peer_id(), target, bytes).await;
    assert_eq!(answer, expected_answer(bytes));

    // Punching was tried and failed; the connection is still relayed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mine = a.mesh.status().await.unwrap();
        let theirs = b.mesh.status().await.unwrap();
        let failures: u32 = mine
            .peers
            .iter()
            .chain(theirs.peers.iter())
            .filter(|p| p.node == "node-a" || p.node == "node-b")
            .map(|p| p.punch_failures)
            .sum();
        if failures > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no hole punching attempt seen: {mine:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = a
        .wait_connection(b.peer_id(), "relayed", Duration::from_secs(1))
        .await;
    assert!(after.bytes_sent >= bytes as u64, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_not_a_node_of_the_site_is_refused() {
    let mut site = two_nats(false).await;
    a_is_connected_to_b(&site).await;
    // A stranger on the public segment that knows the relay's and A's ids and addresses.
    let stranger_ns = site.topology.net.ns("stranger");
    site.topology.net.plug(
        &site.topology.public,
        "p-stranger",
        &stranger_ns,
        "172.30.0.66/24",
    );
    let stranger = Node::start(
        "stranger",
        &stranger_ns,
        4001,
        false,
        own_lan("none"),
        false,
    )
    .await
    .unwrap();
    let mut directory = vec![
        site.relay.info("172.30.0.10", true),
        site.a.info("192.168.1.2", false),
    ];
    directory.push(stranger.info("172.30.0.66", false));
    stranger.mesh.set_peers(directory.clone()).await.unwrap();

    // The relay (a node of the site) refuses its connection, so it can neither open a stream
    // on the relay nor reach A through it.
    let error = stranger.mesh.open(site.relay.peer_id()).await.unwrap_err();
    eprintln!("stranger -> relay: {error}");
    let error = stranger.mesh.open(site.a.peer_id()).await.unwrap_err();
    eprintln!("stranger -> node A: {error}");
    let relay_view = site.relay.mesh.status().await.unwrap();
    assert!(
        relay_view.peers.iter().all(|p| p.node != "stranger"),
        "{relay_view:#?}"
    );

    // Once the relay's directory lists it (it joined the site), the same peer gets in.
    let mut joined = vec![
        site.relay.info("172.30.0.10", true),
        site.a.info("192.168.1.2", false),
        site.b.info("192.168.2.2", false),
    ];
    joined.push(stranger.info("172.30.0.66", false));
    site.relay.mesh.set_peers(joined.clone()).await.unwrap();
    let stream = stranger
        .mesh
        .open(site.relay.peer_id())
        .await
        .expect("a member is let in");

    // And when it leaves again, its connection is closed and it is refused.
    site.relay
        .mesh
        .set_peers(joined[..3].to_vec())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let relay_view = site.relay.mesh.status().await.unwrap();
    assert!(
        relay_view.peers.iter().all(|p| p.node != "stranger"),
        "{relay_view:#?}"
    );
    drop(stream);
    let error = stranger.mesh.open(site.relay.peer_id()).await.unwrap_err();
    eprintln!("stranger after leaving -> relay: {error}");
}

async fn a_is_connected_to_b(site: &Site) {
    site.a
        .wait_connection(site.b.peer_id(), "direct", Duration::from_secs(60))
        .await;
}

/// Two nodes on one link (no NAT, no delay): 10,000 datagrams to a UDP echo server on B, with
/// up to 256 in flight, all come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_udp_datagrams_without_loss() {
    let mut net = Net::new();
    let x = net.ns("x");
    let y = net.ns("y");
    net.link(&x, "eth0", "10.0.0.1/24", &y, "eth0", "10.0.0.2/24");
    let a = Node::start("node-a", &x, 4001, false, own_lan("10.0.0.1"), false)
        .await
        .unwrap();
    let b = Node::start("node-b", &y, 4001, false, own_lan("10.0.0.2"), false)
        .await
        .unwrap();
    let directory = vec![a.info("10.0.0.1", false), b.info("10.0.0.2", false)];
    a.mesh.set_peers(directory.clone()).await.unwrap();
    b.mesh.set_peers(directory).await.unwrap();
    b.runtime
        .run(async {
            // An application that expects bursts sizes its buffer for them.
            let socket = tunnel::udp_socket("10.0.0.2:5300".parse().unwrap()).unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                loop {
                    let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                    socket.send_to(&buf[..n], from).await.unwrap();
                }
            });
        })
        .await;

    let target: SocketAddr = "10.0.0.2:5300".parse().unwrap();
    let stream = tunnel::open(&a.mesh, b.peer_id(), Kind::Udp, target)
        .await
        .expect("udp tunnel");
    let (mut reader, mut writer) = tokio::io::split(stream);
    const COUNT: u32 = 10_000;
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let sender = {
        let window = window.clone();
        tokio::spawn(async move {
            for seq in 0..COUNT {
                window.acquire().await.unwrap().forget();
                let mut datagram = seq.to_be_bytes().to_vec();
                datagram.resize(200, 0xab);
                tunnel::send_datagram(&mut writer, &datagram).await.unwrap();
                writer.flush().await.unwrap();
            }
            writer
        })
    };
    let mut seen = vec![false; COUNT as usize];
    let mut buf = vec![0u8; tunnel::MAX_DATAGRAM];
    let received = std::sync::atomic::AtomicU32::new(0);
    let receive = async {
        for _ in 0..COUNT {
            received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let n = tunnel::recv_datagram(&mut reader, &mut buf)
                .await
                .unwrap()
                .expect("a datagram");
            assert_eq!(n, 200);
            let seq = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            assert!(!seen[seq], "datagram {seq} twice");
            seen[seq] = true;
            window.add_permits(1);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), receive)
        .await
        .unwrap_or_else(|_| panic!("stalled after {} datagrams", received.into_inner()));
    assert!(seen.iter().all(|s| *s));
    let _writer = sender.await.unwrap();
}

/// A TCP server that writes `name` to every connection and closes it.
fn naming_server(node: &Node, addr: &'static str, name: &'static str) {
    drop(node.runtime.spawn(async move {
        let listener = TcpListener::bind(addr).await.unwrap();
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let _ = conn.write_all(name.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    }));
}

fn service_port(
    ip: &str,
    port: u16,
    protocol: Protocol,
    backends: &[(&str, u16, &str)],
) -> ServicePort {
    ServicePort {
        namespace: "shop".into(),
        service: format!("svc-{port}"),
        port_name: "p".into(),
        protocol,
        cluster_ip: ip.parse().unwrap(),
        port,
        backends: backends
            .iter()
            .map(|(ip, port, node)| Backend {
                ip: ip.parse().unwrap(),
                port: *port,
                node: Some(node.to_string()),
            })
            .collect(),
        balancing: Balancing::RoundRobin,
        affinity: None,
        node_port: None,
        external_ips: Vec::new(),
        external_local: false,
        internal_local: false,
        health_check_port: None,
    }
}

/// Connects to `addr` from inside `node`'s namespace and returns what the server wrote.
async fn fetch(node: &Node, addr: &'static str) -> std::io::Result<String> {
    node.runtime
        .run(async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await?;
            let mut answer = String::new();
            conn.read_to_string(&mut answer).await?;
            Ok(answer)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_sends_cluster_ip_traffic_to_local_and_remote_endpoints() {
    let site = two_nats(false).await;
    let (a, b) = (&site.a, &site.b);
    a.wait_connection(b.peer_id(), "direct", Duration::from_secs(60))
        .await;
    naming_server(b, "192.168.2.2:8080", "b");
    naming_server(a, "192.168.1.2:8081", "a");
    drop(b.runtime.spawn(async {
        let socket = tunnel::udp_socket("192.168.2.2:5300".parse().unwrap()).unwrap();
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            socket.send_to(&buf[..n], from).await.unwrap();
        }
    }));

    let ports = vec![
        // Only on node B, behind the other NAT.
        service_port(
            "10.43.0.50",
            80,
            Protocol::Tcp,
            &[("192.168.2.2", 8080, "node-b")],
        ),
        // One endpoint here, one there: round robin alternates.
        service_port(
            "10.43.0.51",
            80,
            Protocol::Tcp,
            &[
                ("192.168.1.2", 8081, "node-a"),
                ("192.168.2.2", 8080, "node-b"),
            ],
        ),
        // A dead endpoint (nothing listens on port 9) and a live one: every connection succeeds.
        service_port(
            "10.43.0.52",
            80,
            Protocol::Tcp,
            &[
                ("192.168.2.2", 9, "node-b"),
                ("192.168.2.2", 8080, "node-b"),
            ],
        ),
        service_port(
            "10.43.0.53",
            53,
            Protocol::Udp,
            &[("192.168.2.2", 5300, "node-b")],
        ),
    ];
    let (ports_tx, ports_rx) = tokio::sync::watch::channel(std::sync::Arc::new(ports));
    let peers: NodePeers = [
        ("node-b".to_string(), b.peer_id()),
        ("node-a".to_string(), a.peer_id()),
    ]
    .into();
    let (_peers_tx, peers_rx) = tokio::sync::watch::channel(std::sync::Arc::new(peers));
    let stop = tokio_util::sync::CancellationToken::new();
    let proxy = a.runtime.spawn(proxy::run(
        ProxyConfig::new("node-a"),
        a.mesh.clone(),
        ports_rx,
        peers_rx,
        tokio::sync::watch::channel(Default::default()).1,
        stop.clone(),
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match fetch(a, "10.43.0.50:80").await {
            Ok(answer) if answer == "b" => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "service 10.43.0.50 never answered: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(fetch(a, "10.43.0.51:80").await.unwrap());
    }
    seen.sort();
    assert_eq!(
        seen,
        ["a", "a", "b", "b"],
        "round robin over a local and a remote endpoint"
    );
    for _ in 0..4 {
        assert_eq!(
            fetch(a, "10.43.0.52:80").await.unwrap(),
            "b",
            "a dead endpoint is skipped"
        );
    }
    let echoed = a
        .runtime
        .run(async {
            let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
            socket.connect("10.43.0.53:53").await.unwrap();
            let mut answers = 0;
            let mut buf = [0u8; 64];
            for i in 0..100u8 {
                socket.send(&[i; 32]).await.unwrap();
                let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&buf[..n], &[i; 32]);
                answers += 1;
            }
            answers
        })
        .await;
    assert_eq!(echoed, 100, "UDP answers come back from the cluster IP");

    // The proxy's listener itself (on every address of the node) takes only redirected
    // traffic: a connection straight to its port is dropped.
    let rules = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &site.topology.node_a,
            "iptables-save",
            "-t",
            "nat",
        ])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    // The cluster IP jumps to the service's chain, which (its only endpoint being remote)
    // jumps to the bucket that redirects to the listener.
    let jump = |matching: &str| -> Option<String> {
        let line = rules.lines().find(|l| l.contains(matching))?;
        Some(
            line.split("-j ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    };
    let local_port: u16 = jump("10.43.0.50/32")
        .and_then(|svc| jump(&format!("-A {svc} ")))
        .and_then(|rmt| {
            let head = format!("-A {rmt} ");
            rules
                .lines()
                .filter(|l| l.starts_with(&head))
                .find_map(|l| l.split("--to-ports ").nth(1))
                .and_then(|p| p.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no REDIRECT rule for 10.43.0.50: {rules}"));
    let straight = a
        .runtime
        .run(async move {
            let connect = tokio::net::TcpStream::connect(("192.168.1.2", local_port));
            tokio::time::timeout(Duration::from_secs(2), connect).await
        })
        .await;
    assert!(
        !matches!(straight, Ok(Ok(_))),
        "the listener on {local_port} answered directly"
    );

    // Removing the services removes the rules: the cluster IP no longer answers.
    ports_tx.send(std::sync::Arc::new(Vec::new())).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fetch(a, "10.43.0.50:80").await.is_err());
    stop.cancel();
    proxy.await.unwrap().unwrap();
}
