//! Ingress rows of `edgesite-bench` (in the mesh section): a node namespace with a "pod"
//! namespace on a veth; in the pod an HTTP/1.1 server; in the node the site's ingress (the
//! `ingress` crate's listener and request path, with an Ingress routing a host to the pod's
//! Service) and Debian's nginx configured for the same route (keep-alive to the pod, as an
//! ingress controller configures it). A load generator in the node keeps 16 keep-alive
//! connections busy for a few seconds against each: requests/s and latency p50/p99.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgemesh::services::{Backend, Balancing, Protocol, ServicePort};
use tests::netns::{MeshHost, Net, NsRuntime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Row, ms, percentile};

const NODE_IP: &str = "10.98.0.1";
const POD_IP: &str = "10.98.0.2";
const POD_PORT: u16 = 9000;
const INGRESS_PORT: u16 = 8080;
const NGINX_PORT: u16 = 8081;
const CONNECTIONS: usize = 16;
const RUN: Duration = Duration::from_secs(5);
const HOST: &str = "bench.example";

/// The pod: answers every request on a keep-alive connection with a 2-byte body.
async fn pod_server() -> std::io::Result<()> {
    let listener = TcpListener::bind((POD_IP, POD_PORT)).await?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut have = 0;
                loop {
                    let Ok(n) = conn.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    // Answer each complete request head (no bodies in this benchmark).
                    while let Some(end) = find_head_end(&buf[..have]) {
                        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";
                        if conn.write_all(response).await.is_err() {
                            return;
                        }
                        buf.copy_within(end..have, 0);
                        have -= end;
                    }
                    if have == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// One keep-alive connection sending requests one after another until `until`; the latency
/// of each.
async fn client(addr: SocketAddr, until: Instant) -> Result<Vec<Duration>> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let mut buf = vec![0u8; 16 * 1024];
    let mut times = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        conn.write_all(request.as_bytes()).await?;
        let mut have = 0;
        let body_start = loop {
            let n = conn.read(&mut buf[have..]).await?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            have += n;
            if let Some(end) = find_head_end(&buf[..have]) {
                break end;
            }
        };
        let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("answer: {head}");
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no content-length")?;
        while have < body_start + length {
            let n = conn.read(&mut buf[have..]).await?;
            if n == 0 {
                bail!("the server closed the connection mid-body");
            }
            have += n;
        }
        times.push(started.elapsed());
    }
    Ok(times)
}

struct Load {
    rate: f64,
    latency: Vec<Duration>,
}

async fn load(addr: SocketAddr) -> Result<Load> {
    // Warm up (connections, pools), then measure.
    let warm = Instant::now() + Duration::from_millis(500);
    let _ = client(addr, warm).await?;
    let started = Instant::now();
    let until = started + RUN;
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(client(addr, until)))
        .collect();
    let mut latency = Vec::new();
    for task in tasks {
        latency.extend(task.await??);
    }
    let took = started.elapsed();
    latency.sort();
    Ok(Load {
        rate: latency.len() as f64 / took.as_secs_f64(),
        latency,
    })
}

/// nginx in the node namespace, proxying `HOST` to the pod with keep-alive upstream
/// connections, two workers (the ingress runs on two threads).
struct Nginx {
    child: Child,
    /// Its config and temp folders, removed after it stops.
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx(ns: &str) -> Result<Nginx> {
    let dir = tempfile::tempdir()?;
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
           upstream pod {{ server {POD_IP}:{POD_PORT}; keepalive 32; keepalive_requests 10000000; }}\n\
           server {{\n    listen {NODE_IP}:{NGINX_PORT};\n    server_name {HOST};\n    location / {{\n      proxy_pass http://pod;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-For $remote_addr;\n    }}\n  }}\n}}\n",
        dir = dir.path().display()
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "nginx", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start nginx (Debian's nginx package; tests/run.sh installs it)")?;
    Ok(Nginx { child, _dir: dir })
}

fn ingress_object() -> k8s_openapi::api::networking::v1::Ingress {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {"rules": [{"host": HOST, "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}
        ]}}]}
    }))
    .expect("a valid Ingress")
}

pub async fn rows(rows: &mut Vec<Row>) -> Result<()> {
    let mut net = Net::new();
    let node_ns = net.ns("ingnode");
    let pod_ns = net.ns("ingpod");
    net.link(
        &node_ns,
        "pod0",
        &format!("{NODE_IP}/24"),
        &pod_ns,
        "eth0",
        &format!("{POD_IP}/24"),
    );
    let pod = NsRuntime::start(&pod_ns);
    pod.run(pod_server()).await?;

    let allow = |_: &edgemesh::PeerId, _: edgemesh::tunnel::Kind, _: SocketAddr| true;
    let node = MeshHost::start("bench-node", &node_ns, 0, false, allow, false).await?;
    let port = ServicePort {
        namespace: "bench".into(),
        service: "web".into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        cluster_ip: "10.43.98.1".parse()?,
        port: 80,
        backends: vec![Backend {
            ip: POD_IP.parse()?,
            port: POD_PORT,
            node: Some("bench-node".into()),
        }],
        balancing: Balancing::RoundRobin,
        affinity: None,
        node_port: None,
        external_ips: Vec::new(),
        external_local: false,
        internal_local: false,
        health_check_port: None,
    };
    let (_ports_tx, ports_rx) = tokio::sync::watch::channel(Arc::new(vec![port]));
    let (_peers_tx, peers_rx) =
        tokio::sync::watch::channel(Arc::new(edgemesh::services::NodePeers::new()));
    let dialer = edgemesh::dial::Dialer::new(
        "bench-node",
        node.mesh.clone(),
        peers_rx,
        Duration::from_secs(5),
    );
    let shared = Arc::new(ingress::proxy::Shared::new(ports_rx, dialer));
    let ingress_object = ingress_object();
    let (table, problems) = ingress::routes::Table::build(&[&ingress_object]);
    if !problems.is_empty() {
        bail!("the benchmark's Ingress: {problems:?}");
    }
    *shared.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    let stop = tokio_util::sync::CancellationToken::new();
    {
        let shared = shared.clone();
        let stop = stop.clone();
        node.runtime
            .run(async move {
                let listener = TcpListener::bind((NODE_IP, INGRESS_PORT)).await?;
                tokio::spawn(ingress::accept(listener, None, shared, INGRESS_PORT, stop));
                Ok::<_, std::io::Error>(())
            })
            .await?;
    }
    let _nginx = nginx(&node_ns)?;
    let load_runtime = NsRuntime::start(&node_ns);
    let measured = load_runtime
        .run(async {
            // nginx is up once it answers.
            let deadline = Instant::now() + Duration::from_secs(10);
            let nginx_addr: SocketAddr = (NODE_IP.parse::<std::net::IpAddr>()?, NGINX_PORT).into();
            while client(nginx_addr, Instant::now()).await.is_err() {
                if Instant::now() > deadline {
                    bail!("nginx did not start");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let ip: std::net::IpAddr = NODE_IP.parse()?;
            let pod_ip: std::net::IpAddr = POD_IP.parse()?;
            Ok::<_, anyhow::Error>([
                load((pod_ip, POD_PORT).into())
                    .await
                    .context("straight to the pod")?,
                load((ip, INGRESS_PORT).into())
                    .await
                    .context("through the ingress")?,
                load(nginx_addr).await.context("through nginx")?,
            ])
        })
        .await?;
    stop.cancel();
    let [direct, ours, peer] = &measured;
    let describe = |l: &Load| {
        format!(
            "{:.0} req/s, p50 {} p99 {}",
            l.rate,
            ms(percentile(&l.latency, 0.5)),
            ms(percentile(&l.latency, 0.99))
        )
    };
    rows.push(Row {
        metric: "ingress HTTP/1.1, 16 keep-alive connections: through the ingress to a local pod (straight to the pod)",
        measured: format!(
            "{} ({}; the ingress {:.0} % of it)",
            describe(ours),
            describe(direct),
            ours.rate / direct.rate * 100.0
        ),
        target: "",
        met: None,
    });
    rows.push(Row {
        metric: "the same route through nginx 1.22 (Debian's, 2 workers, keep-alive upstream)",
        measured: format!(
            "{} (the ingress {:.0} % of nginx's rate)",
            describe(peer),
            ours.rate / peer.rate * 100.0
        ),
        target: "",
        met: None,
    });
    drop(load_runtime);
    drop(node);
    drop(pod);
    drop(net);
    Ok(())
}
