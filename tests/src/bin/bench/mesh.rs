//! Mesh rows of `edgesite-bench`: on a namespace topology (a relay on a "public" segment, two
//! nodes behind two NAT routers), TCP throughput and request latency through the mesh, direct
//! (hole-punched) and relayed (one NAT symmetric), beside plain TCP over the same namespaces and
//! routers (a port forward on B's router); the time from first contact to a direct connection;
//! and the memory a peer costs a relay (`edgesite relay`, the release binary).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgemesh::tunnel::{self, Kind};
use edgemesh::{PeerId, PeerInfo};
use tests::netns::{MeshHost, NODE_A_IP, NODE_B_IP, Net, RELAY_IP, TwoNats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Row, ms, percentile, rss_kib};

const BULK: usize = 256 << 20;
const ROUND_TRIPS: usize = 2_000;
const PEERS: usize = 50;

async fn host(name: &str, ns: &str, port: u16, relay: bool) -> Result<MeshHost> {
    let allow = |_: &PeerId, _: Kind, _: SocketAddr| true;
    MeshHost::start(name, ns, port, relay, allow, false).await
}

struct Topology {
    _net: TwoNats,
    /// Kept running for the nodes' reservations.
    _relay: MeshHost,
    a: MeshHost,
    b: MeshHost,
    /// From the directory being handed out to the direct connection (or the relayed one).
    connected_in: Duration,
    punch: Option<Duration>,
}

/// Relay, two NATs, two nodes; servers on B: a sink (9000: answers the byte count at EOF) and
/// an echo (9001), reachable by plain TCP through a port forward on B's router.
async fn topology(symmetric_b: bool, link_rate: Option<&str>) -> Result<Topology> {
    let net = TwoNats::new(symmetric_b);
    if let Some(rate) = link_rate {
        // Each router's uplink shaped to `rate` (token bucket; netem is missing here).
        for router in [&net.nat_a, &net.nat_b] {
            net.net.exec(
                router,
                &[
                    "tc", "qdisc", "add", "dev", "wan", "root", "tbf", "rate", rate, "burst",
                    "256kb", "latency", "50ms",
                ],
            );
        }
    }
    for port in ["9000", "9001"] {
        let to = format!("{NODE_B_IP}:{port}");
        net.net.exec(
            &net.nat_b,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "wan",
                "-p",
                "tcp",
                "--dport",
                port,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ],
        );
    }
    let relay = host("relay", &net.relay, 4001, true).await?;
    let a = host("node-a", &net.node_a, 4001, false).await?;
    let b = host("node-b", &net.node_b, 4001, false).await?;
    b.runtime
        .run(async {
            let sink = TcpListener::bind("192.168.2.2:9000").await?;
            let echo = TcpListener::bind("192.168.2.2:9001").await?;
            tokio::spawn(serve_sink(sink));
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = echo.accept().await {
                    tokio::spawn(async move {
                        let _ = conn.set_nodelay(true);
                        let mut buf = [0u8; 64];
                        while conn.read_exact(&mut buf).await.is_ok() {
                            if conn.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            Ok::<_, std::io::Error>(())
        })
        .await?;
    let directory = vec![
        relay.info(RELAY_IP, true),
        a.info(NODE_A_IP, false),
        b.info(NODE_B_IP, false),
    ];
    let started = Instant::now();
    for h in [&relay, &a, &b] {
        h.mesh.set_peers(directory.clone()).await?;
    }
    let wanted = if symmetric_b { "relayed" } else { "direct" };
    let b_id = b.mesh.peer_id().to_string();
    let (connected_in, punch) = loop {
        let status = a.mesh.status().await?;
        if let Some(peer) = status
            .peers
            .iter()
            .find(|p| p.peer_id == b_id && p.connection == wanted)
        {
            break (started.elapsed(), peer.punch_ms.map(Duration::from_millis));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("no {wanted} connection between the nodes within 60 s: {status:#?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok(Topology {
        _net: net,
        _relay: relay,
        a,
        b,
        connected_in,
        punch,
    })
}

/// A cipher's own ceiling on one core (ring): sealing, and sealing then opening, noise-sized
/// messages; bytes per second of plaintext. ChaCha20-Poly1305 is what the mesh's noise uses;
/// AES-128-GCM is what libp2p-tls would negotiate instead.
fn cipher_rates(algorithm: &'static ring::aead::Algorithm) -> Result<(f64, f64)> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
    const MESSAGE: usize = 65_535 - 16;
    const TOTAL: usize = 512 << 20;
    let key = LessSafeKey::new(
        UnboundKey::new(algorithm, &vec![7u8; algorithm.key_len()])
            .map_err(|_| anyhow::anyhow!("key"))?,
    );
    let nonce = |i: u64| {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&i.to_le_bytes());
        Nonce::assume_unique_for_key(bytes)
    };
    let plain = vec![0x5au8; MESSAGE];
    let mut message = Vec::with_capacity(MESSAGE + 16);
    let rounds = (TOTAL / MESSAGE) as u64;
    let started = Instant::now();
    for i in 0..rounds {
        message.clear();
        message.extend_from_slice(&plain);
        key.seal_in_place_append_tag(nonce(i), Aad::empty(), &mut message)
            .map_err(|_| anyhow::anyhow!("seal"))?;
    }
    let seal = (rounds as usize * MESSAGE) as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..rounds {
        message.clear();
        message.extend_from_slice(&plain);
        key.seal_in_place_append_tag(nonce(i), Aad::empty(), &mut message)
            .map_err(|_| anyhow::anyhow!("seal"))?;
        key.open_in_place(nonce(i), Aad::empty(), &mut message)
            .map_err(|_| anyhow::anyhow!("open"))?;
    }
    let both = (rounds as usize * MESSAGE) as f64 / started.elapsed().as_secs_f64();
    Ok((seal, both))
}

/// A sink: reads each connection to its end, then answers the number of bytes it read.
pub(super) async fn serve_sink(listener: TcpListener) {
    while let Ok((mut conn, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = conn.write_all(total.to_string().as_bytes()).await;
        });
    }
}

/// Bytes per second of a `bulk`-byte upload to the sink over `stream`.
pub(super) async fn upload<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    bulk: usize,
) -> Result<f64> {
    let chunk = vec![0x5au8; 64 * 1024];
    let started = Instant::now();
    let mut left = bulk;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).await?;
        left -= n;
    }
    stream.shutdown().await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let took = started.elapsed();
    if answer.trim() != bulk.to_string() {
        bail!("the sink counted {answer} bytes, not {bulk}");
    }
    Ok(bulk as f64 / took.as_secs_f64())
}

/// Sorted round-trip times of `ROUND_TRIPS` 64-byte requests over `stream`.
async fn round_trips<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    let request = [7u8; 64];
    let mut answer = [0u8; 64];
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut answer).await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times)
}

struct Path4 {
    throughput: f64,
    /// The benchmark process's CPU time (user, system) per GiB of the upload: both nodes, the
    /// sink and the kernel's forwarding between them all run in this process.
    cpu: Cpu,
    latency: Vec<Duration>,
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn now() -> Cpu {
        use nix::sys::resource::{UsageWho, getrusage};
        let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        getrusage(UsageWho::RUSAGE_SELF).map_or(Cpu::default(), |u| Cpu {
            user: seconds(u.user_time()),
            system: seconds(u.system_time()),
        })
    }

    /// CPU seconds per GiB between `self` (taken before) and now, for `bytes` moved.
    fn per_gib_since(self, bytes: usize) -> Cpu {
        let now = Cpu::now();
        let gib = bytes as f64 / (1u64 << 30) as f64;
        Cpu {
            user: (now.user - self.user) / gib,
            system: (now.system - self.system) / gib,
        }
    }

    fn show(self) -> String {
        format!(
            "{:.2} s (user {:.2} + system {:.2})",
            self.user + self.system,
            self.user,
            self.system
        )
    }
}

async fn measure_plain(t: &Topology) -> Result<Path4> {
    t.a.runtime
        .run(async {
            let connect = |port: u16| async move {
                let s = TcpStream::connect(("172.30.0.2", port)).await?;
                s.set_nodelay(true)?;
                Ok::<_, anyhow::Error>(s)
            };
            let before = Cpu::now();
            let throughput = upload(connect(9000).await?, BULK).await?;
            let cpu = before.per_gib_since(BULK);
            let latency = round_trips(connect(9001).await?).await?;
            Ok(Path4 {
                throughput,
                cpu,
                latency,
            })
        })
        .await
}

async fn measure_mesh(t: &Topology) -> Result<Path4> {
    let mesh = t.a.mesh.clone();
    let b = t.b.mesh.peer_id();
    t.a.runtime
        .run(async move {
            let sink: SocketAddr = "192.168.2.2:9000".parse()?;
            let echo: SocketAddr = "192.168.2.2:9001".parse()?;
            let stream = tunnel::open(&mesh, b, Kind::Tcp, sink).await?;
            let before = Cpu::now();
            let throughput = upload(stream, BULK).await?;
            let cpu = before.per_gib_since(BULK);
            let latency = round_trips(tunnel::open(&mesh, b, Kind::Tcp, echo).await?).await?;
            Ok(Path4 {
                throughput,
                cpu,
                latency,
            })
        })
        .await
}

pub(super) fn mb(rate: f64) -> String {
    format!("{:.0} MB/s", rate / 1e6)
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The RSS a peer costs `edgesite relay`: its growth with `PEERS` peers holding a reservation
/// (one connection each), divided by `PEERS`.
async fn relay_memory_per_peer(bin: &Path) -> Result<(f64, u64)> {
    let mut net = Net::new();
    let public = net.ns("pub");
    let relay_ns = net.ns("relay");
    let peers_ns = net.ns("peers");
    net.switch(&public);
    net.plug(&public, "p-relay", &relay_ns, "172.30.0.10/24");
    net.plug(&public, "p-peers", &peers_ns, "172.30.0.20/24");
    let dir = tempfile::tempdir()?;
    let child = Command::new("ip")
        .args(["netns", "exec", &relay_ns])
        .arg(bin)
        .args([
            "relay",
            "--listen",
            "/ip4/172.30.0.10/tcp/4001",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting edgesite relay")?;
    let mut relay = Proc(child);
    // Its logs share stdout with the line that names it.
    let mut announced = String::new();
    {
        use std::io::BufRead;
        let stdout = relay.0.stdout.take().context("relay stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        while let Some(line) = lines.next().transpose()? {
            if line.starts_with("edgesite relay ") {
                announced = line;
                break;
            }
        }
        // Keep draining so that the relay never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
    }
    let relay_id: PeerId = announced
        .split_whitespace()
        .nth(2)
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("edgesite relay printed {announced:?}"))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, _) = rss_kib(relay.0.id());
    let relay_info = PeerInfo {
        name: "relay".into(),
        peer_id: relay_id,
        addrs: vec!["/ip4/172.30.0.10/tcp/4001".parse()?],
        relay: true,
    };
    let mut hosts = Vec::new();
    for _ in 0..PEERS {
        let h = host("peer", &peers_ns, 0, false).await?;
        h.mesh.set_peers(vec![relay_info.clone()]).await?;
        hosts.push(h);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut reserved = 0;
        for h in &hosts {
            if !h.mesh.status().await?.reservations.is_empty() {
                reserved += 1;
            }
        }
        if reserved == PEERS {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {reserved} of {PEERS} peers got a reservation on the relay");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = rss_kib(relay.0.id());
    drop(hosts);
    Ok(((after.saturating_sub(before)) as f64 / PEERS as f64, before))
}

pub async fn rows(bin: &Path, rows: &mut Vec<Row>) -> Result<()> {
    super::services::rows(rows).await.context("service rows")?;
    super::ingress::rows(rows).await.context("ingress rows")?;
    direct_rows(rows).await?;

    // The same on links of a real site's speed: 1 Gbit/s uplinks.
    let shaped = topology(false, Some("1gbit"))
        .await
        .context("shaped topology")?;
    let plain = measure_plain(&shaped).await?;
    let mesh = measure_mesh(&shaped).await?;
    let ratio = mesh.throughput / plain.throughput;
    rows.push(Row {
        metric: "mesh TCP throughput, direct, 1 Gbit/s uplinks (tbf) vs plain TCP",
        measured: format!(
            "{} vs {} ({:.0} %)",
            mb(mesh.throughput),
            mb(plain.throughput),
            ratio * 100.0
        ),
        target: ">= 70 % of plain TCP",
        met: Some(ratio >= 0.7),
    });
    drop(shaped);

    let relayed = topology(true, None).await.context("relayed topology")?;
    let plain = measure_plain(&relayed).await?;
    let mesh = measure_mesh(&relayed).await?;
    rows.push(Row {
        metric: "mesh TCP throughput, relayed (symmetric NAT) vs plain TCP",
        measured: format!(
            "{} vs {} ({:.0} %)",
            mb(mesh.throughput),
            mb(plain.throughput),
            mesh.throughput / plain.throughput * 100.0
        ),
        target: "",
        met: None,
    });
    rows.push(Row {
        metric: "mesh request latency p50 / p99, relayed (plain TCP)",
        measured: format!(
            "{} / {} ({} / {})",
            ms(percentile(&mesh.latency, 0.5)),
            ms(percentile(&mesh.latency, 0.99)),
            ms(percentile(&plain.latency, 0.5)),
            ms(percentile(&plain.latency, 0.99))
        ),
        target: "",
        met: None,
    });
    drop(relayed);

    let (per_peer, base) = relay_memory_per_peer(bin).await.context("relay memory")?;
    rows.push(Row {
        metric: "memory per peer (edgesite relay, a connection + reservation each)",
        measured: format!(
            "{per_peer:.0} KiB ({PEERS} peers; relay idle {:.1} MB)",
            base as f64 / 1024.0
        ),
        target: "",
        met: None,
    });
    Ok(())
}

/// The rows of the direct (hole-punched) path on unshaped links: throughput, where it goes,
/// latency and the hole punch; `edgesite-bench mesh-direct` runs only these.
pub async fn direct_rows(rows: &mut Vec<Row>) -> Result<()> {
    let direct = topology(false, None).await.context("direct topology")?;

    let plain = measure_plain(&direct).await?;
    let mesh = measure_mesh(&direct).await?;
    let ratio = mesh.throughput / plain.throughput;
    rows.push(Row {
        metric: "mesh TCP throughput, direct (hole-punched) vs plain TCP",
        measured: format!(
            "{} vs {} ({:.0} %)",
            mb(mesh.throughput),
            mb(plain.throughput),
            ratio * 100.0
        ),
        target: ">= 70 % of plain TCP",
        met: Some(ratio >= 0.7),
    });
    rows.push(Row {
        metric: "CPU per GiB uploaded, direct: mesh vs plain TCP (both nodes, the sink and the kernel's forwarding)",
        measured: format!("{} vs {}", mesh.cpu.show(), plain.cpu.show()),
        target: "",
        met: None,
    });
    let added = percentile(&mesh.latency, 0.5).saturating_sub(percentile(&plain.latency, 0.5));
    let (seal, both) =
        tokio::task::spawn_blocking(|| cipher_rates(&ring::aead::CHACHA20_POLY1305)).await??;
    let (aes_seal, aes_both) =
        tokio::task::spawn_blocking(|| cipher_rates(&ring::aead::AES_128_GCM)).await??;
    let per_gib = |rate: f64| (1u64 << 30) as f64 / rate;
    rows.push(Row {
        metric: "where the direct throughput goes: the cipher alone, one core, ChaCha20-Poly1305 (noise) / AES-128-GCM (libp2p-tls)",
        measured: format!(
            "seal {} / {}; seal + open {} / {}, i.e. {:.2} / {:.2} s of CPU per GiB (every mesh byte is sealed by one node and opened by the other; compare the mesh's user CPU above, the rest of which is yamux, the copies and the tasks)",
            mb(seal),
            mb(aes_seal),
            mb(both),
            mb(aes_both),
            per_gib(both),
            per_gib(aes_both)
        ),
        target: "",
        met: None,
    });
    rows.push(Row {
        metric: "mesh request latency p50 / p99, direct (plain TCP)",
        measured: format!(
            "{} / {} ({} / {}); added p50 {}",
            ms(percentile(&mesh.latency, 0.5)),
            ms(percentile(&mesh.latency, 0.99)),
            ms(percentile(&plain.latency, 0.5)),
            ms(percentile(&plain.latency, 0.99)),
            ms(added)
        ),
        target: "added p50 < 1 ms",
        met: Some(added < Duration::from_millis(1)),
    });
    rows.push(Row {
        metric: "first contact to a direct connection (hole punch)",
        measured: format!(
            "{} (DCUtR itself: {}; no netem delay: the kernel lacks it)",
            ms(direct.connected_in),
            direct.punch.map_or("-".into(), ms)
        ),
        target: "< 3 s with 50 ms netem delays",
        met: None,
    });
    drop(direct);
    Ok(())
}

/// The mesh section of docs/benchmarks.md.
pub fn section(rows: &[Row]) -> String {
    let table = super::markdown_table(rows);
    format!(
        "\n## Mesh\n\nProduced by `cargo run --release -p tests --bin edgesite-bench mesh` (or the full run). \
         The topology is made of network namespaces on this machine: a relay on a \"public\" segment \
         (a bridge), two NAT routers (iptables MASQUERADE; the relayed rows make B's `--random-fully`, \
         a symmetric NAT) and a node behind each. The mesh hosts run in the benchmark process, each \
         on a thread inside its node's namespace, with the same code as a node's mesh. Plain TCP goes \
         from node A to a port forward on B's router, so it crosses the same namespaces, veths and \
         NATs as the direct mesh connection. Throughput is a {} MiB upload to a sink on node B (one \
         stream); latency is {ROUND_TRIPS} sequential 64-byte request/response round trips on one \
         connection to an echo server on node B. Mesh streams are noise-encrypted (ChaCha20-Poly1305) \
         and yamux-multiplexed; plain TCP is neither. This kernel has no netem, so no delay is added \
         and the hole punch row is not comparable with the target's 50 ms links. The shaped row puts a \
         token bucket filter (tc tbf, 1 Gbit/s) on both routers' uplinks, as a site's link would be; \
         the unshaped rows run at the speed of memory copies between namespaces on this 2-CPU machine, \
         where the mesh's extra work per byte (encryption, multiplexing, the proxy hop) is what is measured. \
         Where it goes: the CPU row is the benchmark process's user and system time (getrusage) during \
         the upload, per GiB; both nodes, the sink and the kernel's forwarding between the namespaces run \
         in this process. Plain TCP's is nearly all system time (one connection, forwarded twice). The \
         mesh's user time is the cipher (its seal + open row, measured alone on one core), yamux, the \
         copies and task wake-ups; its extra system time is node B's second connection (the hop from \
         the mesh to the destination, as a pod's service traffic takes) and the wake-ups. The mesh sends \
         yamux frames that fill a noise message (64 KiB, not yamux's 16 KiB default). Memory per peer is \
         the growth of a real `edgesite relay` process (release binary) with {PEERS} peers each holding \
         a connection and a reservation, divided by {PEERS}. The service rows use a node namespace with \
         a pod namespace on a veth and the node's real proxy (its iptables rules and listeners): from the \
         node, a 1 GiB upload and 2,000 sequential connect/read-a-byte/close go straight to the pod IP, \
         to a cluster IP whose endpoint is on this node (DNAT in the kernel), and to a cluster IP whose \
         endpoint the proxy takes as another node's (its userspace listener, the path every service \
         connection took before); best of 3 interleaved rounds. The ingress rows use the same kind of namespaces: an HTTP/1.1 server in \
         the pod, the site's ingress (its listener and request path, an Ingress routing a host to the \
         pod's Service) and Debian's nginx 1.22 (2 workers, keep-alive upstream connections) for the \
         same route in the node; a load generator in the node keeps 16 keep-alive connections busy for \
         5 s against the pod, the ingress and nginx in turn, all on this machine's 2 CPUs.\n\n{table}",
        BULK >> 20
    )
}

/// Replaces (or adds) the mesh section of an existing docs/benchmarks.md.
pub fn splice(doc: &str, section: &str) -> String {
    let head = match doc.find("\n## Mesh\n") {
        Some(i) => &doc[..i],
        None => doc.trim_end(),
    };
    format!("{}\n{}", head.trim_end(), section)
}
