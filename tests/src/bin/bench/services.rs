//! Service rows of `edgesite-bench` (in the mesh section): a node namespace with a "pod"
//! namespace on a veth, the node's real proxy (`edgemesh::proxy::run`, its iptables rules and
//! listeners) and servers in the pod; from the node, throughput and connection setup rate
//! straight to the pod IP, through a cluster IP whose endpoint is on this node (DNAT in the
//! kernel), and through the userspace listener the proxy keeps for other nodes' endpoints (the
//! path every service connection took before local endpoints went to the kernel).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edgemesh::proxy::{self, ProxyConfig};
use edgemesh::services::{Backend, Balancing, NodePeers, Protocol, ServicePort};
use tests::netns::{MeshHost, Net};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Row;

const POD_IP: &str = "10.99.0.2";
const BULK: usize = 1 << 30;
/// Each path is measured this many times; the best counts (a 2-CPU machine is noisy).
const ROUNDS: usize = 3;
const CONNECTIONS: usize = 2_000;
/// The pod's servers: a sink that answers the byte count at EOF, and one that writes a byte and
/// closes (connection setup).
const SINK: u16 = 9000;
const HELLO: u16 = 9002;

fn service(cluster_ip: &str, port: u16, node: &str) -> ServicePort {
    ServicePort {
        namespace: "bench".into(),
        service: format!("svc-{cluster_ip}"),
        port_name: format!("p{port}"),
        protocol: Protocol::Tcp,
        cluster_ip: cluster_ip.parse().expect("an IP"),
        port,
        backends: vec![Backend {
            ip: POD_IP.parse().expect("an IP"),
            port,
            node: Some(node.into()),
        }],
        balancing: Balancing::RoundRobin,
        affinity: None,
        node_port: None,
        external_ips: Vec::new(),
        external_local: false,
        internal_local: false,
        health_check_port: None,
    }
}

async fn upload(ip: &str) -> Result<f64> {
    let stream = TcpStream::connect((ip, SINK)).await?;
    stream.set_nodelay(true)?;
    super::mesh::upload(stream, BULK).await
}

/// Connections per second: connect, read the server's byte, close; one after another.
async fn setup_rate(ip: &str) -> Result<f64> {
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect((ip, HELLO)).await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
    }
    Ok(CONNECTIONS as f64 / started.elapsed().as_secs_f64())
}

struct Measured {
    throughput: f64,
    rate: f64,
}

pub async fn rows(rows: &mut Vec<Row>) -> Result<()> {
    let mut net = Net::new();
    let node_ns = net.ns("svcnode");
    let pod_ns = net.ns("svcpod");
    net.link(
        &node_ns,
        "pod0",
        "10.99.0.1/24",
        &pod_ns,
        "eth0",
        &format!("{POD_IP}/24"),
    );
    // A node has a default route: without one a cluster IP is unreachable before any rule.
    net.exec(&node_ns, &["ip", "route", "add", "default", "dev", "pod0"]);
    let pod = tests::netns::NsRuntime::start(&pod_ns);
    pod.run(async {
        let sink = TcpListener::bind((POD_IP, SINK)).await?;
        let hello = TcpListener::bind((POD_IP, HELLO)).await?;
        tokio::spawn(super::mesh::serve_sink(sink));
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = hello.accept().await {
                let _ = conn.write_all(b"k").await;
            }
        });
        Ok::<_, std::io::Error>(())
    })
    .await?;

    let allow = |_: &edgemesh::PeerId, _: edgemesh::tunnel::Kind, _: std::net::SocketAddr| true;
    let node = MeshHost::start("bench-node", &node_ns, 0, false, allow, false).await?;
    // 10.43.99.1: the endpoint is on this node (kernel). 10.43.99.2: the same pod named as on
    // another node with no mesh peer, so the listener connects to it itself (userspace copy).
    let ports = vec![
        service("10.43.99.1", SINK, "bench-node"),
        service("10.43.99.1", HELLO, "bench-node"),
        service("10.43.99.2", SINK, "elsewhere"),
        service("10.43.99.2", HELLO, "elsewhere"),
    ];
    let (_ports_tx, ports_rx) = tokio::sync::watch::channel(Arc::new(ports));
    let (_peers_tx, peers_rx) = tokio::sync::watch::channel(Arc::new(NodePeers::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let proxy = node.runtime.spawn(proxy::run(
        ProxyConfig::new("bench-node"),
        node.mesh.clone(),
        ports_rx,
        peers_rx,
        tokio::sync::watch::channel(Default::default()).1,
        stop.clone(),
    ));
    let measured = node
        .runtime
        .run(async {
            // The rules are in once the cluster IP answers.
            let deadline = Instant::now() + Duration::from_secs(10);
            while setup_once("10.43.99.2").await.is_err() || setup_once("10.43.99.1").await.is_err()
            {
                if Instant::now() > deadline {
                    bail!("the proxy's rules did not answer within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let paths = [POD_IP, "10.43.99.1", "10.43.99.2"];
            let mut out: Vec<Measured> = paths
                .iter()
                .map(|_| Measured {
                    throughput: 0.0,
                    rate: 0.0,
                })
                .collect();
            // Rounds interleave the paths, so a slow moment of the machine hits all of them.
            for _ in 0..ROUNDS {
                for (i, ip) in paths.iter().enumerate() {
                    out[i].throughput = out[i].throughput.max(upload(ip).await?);
                    out[i].rate = out[i].rate.max(setup_rate(ip).await?);
                }
            }
            Ok(out)
        })
        .await?;
    stop.cancel();
    let _ = proxy.await;
    let [direct, kernel, userspace] = &measured[..] else {
        bail!("three paths measured");
    };
    let ratio = kernel.throughput / direct.throughput;
    rows.push(Row {
        metric: "service TCP throughput, cluster IP to a local endpoint (kernel DNAT) vs the pod IP",
        measured: format!(
            "{} vs {} ({:.0} %); through the userspace listener {} ({:.0} %)",
            super::mesh::mb(kernel.throughput),
            super::mesh::mb(direct.throughput),
            ratio * 100.0,
            super::mesh::mb(userspace.throughput),
            userspace.throughput / direct.throughput * 100.0
        ),
        target: ">= 90 % of the pod IP",
        met: Some(ratio >= 0.9),
    });
    rows.push(Row {
        metric: "connection setup rate, cluster IP to a local endpoint vs the pod IP",
        measured: format!(
            "{:.0}/s vs {:.0}/s ({:.0} %); through the userspace listener {:.0}/s",
            kernel.rate,
            direct.rate,
            kernel.rate / direct.rate * 100.0,
            userspace.rate
        ),
        target: "",
        met: None,
    });
    drop(node);
    drop(pod);
    drop(net);
    Ok(())
}

async fn setup_once(ip: &str) -> Result<()> {
    let connect = TcpStream::connect((ip, HELLO));
    let mut stream = tokio::time::timeout(Duration::from_secs(1), connect).await??;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}
