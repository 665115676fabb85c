//! `edgesite-bench etcd`: the API rows on a site of three servers, each with its embedded etcd
//! member (Debian's etcd), beside raw etcd measured on the same members in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{
    CLIENTS, CREATES, Row, Server, create_phase, list_phase, ms, percentile, start_with,
    watch_phase,
};

/// Three servers (`--cluster-init`, then two `--server` joins), the rows measured through the
/// first, then raw puts on the same etcd.
pub async fn rows(bin: &Path, work: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let ports = |_: usize| (tests::free_port(), tests::free_port(), tests::free_port());
    let mut servers: Vec<Server> = Vec::new();
    let mut first_url = String::new();
    let mut token = String::new();
    for i in 0..3 {
        let (api, client_port, peer_port) = ports(i);
        let dir = work.join(format!("server-{i}"));
        let mut extra = vec![
            "--disable-agent".to_string(),
            format!("--etcd-client-port={client_port}"),
            format!("--etcd-peer-port={peer_port}"),
        ];
        if i == 0 {
            extra.push("--cluster-init".into());
        } else {
            extra.push(format!("--server={first_url}"));
            extra.push(format!("--token={token}"));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (server, _) = start_with(bin, &dir, api, &extra)
            .await
            .with_context(|| format!("server {i}"))?;
        if i == 0 {
            first_url = format!("https://127.0.0.1:{api}");
            token = std::fs::read_to_string(dir.join("data/server/token"))?
                .trim()
                .to_string();
        }
        servers.push(server);
    }
    let kubeconfig = servers[0].dir.join("kubeconfig.yaml");
    let watch = watch_phase(&kubeconfig, "kube-public").await?;
    let creates = create_phase(&kubeconfig, "default").await?;
    let list_time = list_phase(&kubeconfig, "default").await?;
    let raw = raw_puts(&servers[0].dir.join("data")).await?;
    rows.push(Row {
        metric: "etcd, 3 members: creates/s, 32 concurrent clients, 10,000 ConfigMaps",
        measured: format!("{:.0}/s", creates.rate),
        target: ">= 3,000/s",
        met: Some(creates.rate >= 3000.0),
    });
    rows.push(Row {
        metric: "etcd, 3 members: create latency p50 / p99",
        measured: format!("{} / {}", ms(creates.p50), ms(creates.p99)),
        target: "p99 < 50 ms",
        met: Some(creates.p99 < Duration::from_millis(50)),
    });
    rows.push(Row {
        metric: "etcd, 3 members: watch delivery p99, create sent -> event at all 100 watchers",
        measured: watch.describe(),
        target: "-",
        met: None,
    });
    rows.push(Row {
        metric: "etcd, 3 members: list 10,000 ConfigMaps (median of 3)",
        measured: ms(list_time),
        target: "-",
        met: None,
    });
    rows.push(Row {
        metric: "raw etcd, same 3 members: puts/s, 32 concurrent clients, 400-byte values (p99)",
        measured: format!("{:.0}/s ({})", raw.0, ms(raw.1)),
        target: "-",
        met: None,
    });
    rows.push(Row {
        metric: "etcd, 3 members: API creates as a share of raw etcd puts",
        measured: format!("{:.0} %", 100.0 * creates.rate / raw.0),
        target: "-",
        met: None,
    });
    drop(servers);
    Ok(())
}

/// 32 clients putting 10,000 keys of 400 bytes straight into the site's etcd (the first
/// server's member, with its client certificate): puts/s and p99.
async fn raw_puts(data_dir: &Path) -> Result<(f64, Duration)> {
    let endpoint = std::fs::read_to_string(data_dir.join("server/db/etcd-endpoint"))?;
    let tls = data_dir.join("server/tls");
    let mut config =
        apiserver_lite::storage::etcd::EtcdConfig::new(vec![endpoint.trim().to_string()]);
    config.ca_file = Some(tls.join("ca.crt"));
    config.cert_file = Some(tls.join("etcd-client.crt"));
    config.key_file = Some(tls.join("etcd-client.key"));
    let value = "x".repeat(400);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let config = config.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let client = apiserver_lite::storage::etcd::connect(&config)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut kv = client.kv_client();
            let mut latencies = Vec::new();
            let mut i = c;
            while i < CREATES {
                let t = Instant::now();
                kv.put(format!("/bench/raw/{i}"), value.clone(), None)
                    .await?;
                latencies.push(t.elapsed());
                i += CLIENTS;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok((
        CREATES as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.99),
    ))
}
