//! `edgesite-bench etcd`: the API rows on a site of three servers, each with its embedded etcd
//! member (Debian's etcd), beside raw etcd measured on the same members in the same run: plain
//! puts (etcd's ceiling) and exactly the writes and watches the API asks of etcd (the API's ceiling).

use std::path::{Path, PathBuf};

use apiserver_lite::storage::etcd::EtcdConfig;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
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
    let api_pids: Vec<u32> = servers.iter().map(|s| s.child.id()).collect();
    let groups = CpuGroups::new(vec![
        ("etcd members", children_of(&api_pids)),
        ("the API server written to", api_pids[..1].to_vec()),
        ("the two others", api_pids[1..].to_vec()),
        ("benchmark client", vec![std::process::id()]),
    ]);
    let before = groups.sample()?;
    let profile = Profile::start()?;
    let creates = create_phase(&kubeconfig, "default").await?;
    drop(profile);
    let create_cpu = groups.since(&before, CREATES)?;
    let list_time = list_phase(&kubeconfig, "default").await?;
    let before = groups.sample()?;
    let data_dirs: Vec<PathBuf> = servers.iter().map(|s| s.dir.join("data")).collect();
    let raw = raw_puts(&data_dirs, Raw::Put).await?;
    let raw_cpu = groups.since(&before, CREATES)?;
    let before = groups.sample()?;
    let txn = raw_puts(&data_dirs, Raw::WatchedTxn).await?;
    let txn_cpu = groups.since(&before, CREATES)?;
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
        metric: "etcd, 3 members: CPU per API create (machine busy)",
        measured: create_cpu,
        target: "-",
        met: None,
    });
    rows.push(Row {
        metric: "raw etcd, same 3 members: CPU per put (machine busy)",
        measured: raw_cpu,
        target: "-",
        met: None,
    });
    rows.push(Row {
        metric: "raw etcd, same 3 members: what API creates ask of etcd, straight from the client (guarded transactions of ConfigMap JSON, a watch on each member): creates/s (p99)",
        measured: format!("{:.0}/s ({})", txn.0, ms(txn.1)),
        target: "-",
        met: None,
    });
    rows.push(Row {
        metric: "raw etcd, same 3 members: CPU per guarded create with a watch on each member (machine busy)",
        measured: txn_cpu,
        target: "-",
        met: None,
    });
    rows.push(Row {
        metric: "etcd, 3 members: API creates as a share of raw etcd puts / of raw guarded creates",
        measured: format!(
            "{:.0} % / {:.0} %",
            100.0 * creates.rate / raw.0,
            100.0 * creates.rate / txn.0
        ),
        target: "-",
        met: None,
    });
    drop(servers);
    Ok(())
}

/// 32 clients writing 10,000 keys straight into the site's etcd (the first server's member,
/// with its client certificate), as `shape` says: writes/s and p99.
async fn raw_puts(data_dirs: &[PathBuf], shape: Raw) -> Result<(f64, Duration)> {
    let config_of = |dir: &Path| -> Result<EtcdConfig> {
        let endpoint = std::fs::read_to_string(dir.join("server/db/etcd-endpoint"))?;
        let tls = dir.join("server/tls");
        let mut config = EtcdConfig::new(vec![endpoint.trim().to_string()]);
        config.ca_file = Some(tls.join("ca.crt"));
        config.cert_file = Some(tls.join("etcd-client.crt"));
        config.key_file = Some(tls.join("etcd-client.key"));
        Ok(config)
    };
    let config = config_of(&data_dirs[0])?;
    let prefix = match shape {
        Raw::Put => "/bench/raw/",
        Raw::WatchedTxn => "/bench/txn/",
    };
    // One watch on each member, as each server keeps one, read until every key arrived.
    let mut watches = Vec::new();
    if shape == Raw::WatchedTxn {
        for dir in data_dirs {
            let client = etcd_client_of(&config_of(dir)?).await?;
            let options = etcd_client::WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_progress_notify();
            let mut watcher = client.watch_client();
            let mut stream = watcher.watch(prefix, Some(options)).await?;
            watches.push(tokio::spawn(async move {
                let _keep = (client, watcher);
                let mut seen = 0;
                while seen < CREATES {
                    let Some(response) = stream.message().await? else {
                        anyhow::bail!("etcd closed the benchmark's watch");
                    };
                    for event in response.events() {
                        if let Some(kv) = event.kv() {
                            let _: serde_json::Value = serde_json::from_slice(kv.value())?;
                        }
                    }
                    seen += response.events().len();
                }
                anyhow::Ok(())
            }));
        }
    }
    let value = match shape {
        Raw::Put => "x".repeat(400),
        // The very text the API stored for the first ConfigMap of the create phase.
        Raw::WatchedTxn => {
            let client = etcd_client_of(&config).await?;
            let stored = client
                .kv_client()
                .get("/registry/core/configmaps/default/c-0", None)
                .await?;
            let kv = stored
                .kvs()
                .first()
                .context("the API's ConfigMap c-0 is not in etcd")?;
            String::from_utf8(kv.value().to_vec())?
        }
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let config = config.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let client = etcd_client_of(&config).await?;
            let mut kv = client.kv_client();
            let mut latencies = Vec::new();
            let mut i = c;
            while i < CREATES {
                let t = Instant::now();
                let key = format!("{prefix}{i}");
                match shape {
                    Raw::Put => {
                        kv.put(key, value.clone(), None).await?;
                    }
                    Raw::WatchedTxn => {
                        let txn = Txn::new()
                            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                            .or_else([TxnOp::get(key, None)]);
                        anyhow::ensure!(kv.txn(txn).await?.succeeded(), "a raw create was refused");
                    }
                }
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
    for w in watches {
        w.await??;
    }
    latencies.sort();
    Ok((
        CREATES as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.99),
    ))
}

/// A client of the etcd `config` names.
async fn etcd_client_of(config: &EtcdConfig) -> Result<etcd_client::Client> {
    apiserver_lite::storage::etcd::connect(config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// What the raw phase writes: plain puts of 400 bytes, or what an API create does to etcd (a
/// guarded transaction of a ConfigMap's JSON, seen by a watch on each member).
#[derive(Clone, Copy, PartialEq)]
enum Raw {
    Put,
    WatchedTxn,
}

/// CPU time of groups of processes and of the whole machine, from `/proc` (in USER_HZ ticks,
/// 100 a second on Linux): where a phase's CPU went.
struct CpuGroups {
    groups: Vec<(&'static str, Vec<u32>)>,
}

struct CpuSample {
    busy: u64,
    total: u64,
    groups: Vec<u64>,
}

impl CpuGroups {
    fn new(groups: Vec<(&'static str, Vec<u32>)>) -> Self {
        CpuGroups { groups }
    }

    fn sample(&self) -> Result<CpuSample> {
        let (busy, total) = machine_ticks()?;
        Ok(CpuSample {
            busy,
            total,
            groups: self
                .groups
                .iter()
                .map(|(_, pids)| pids.iter().map(|&p| process_ticks(p)).sum())
                .collect(),
        })
    }

    /// "etcd members 410 µs, ... (busy 97 %)": CPU per operation of each group since `before`,
    /// and how busy the machine's CPUs were.
    fn since(&self, before: &CpuSample, operations: usize) -> Result<String> {
        let now = self.sample()?;
        let per_op = |ticks: u64| ticks as f64 * 10_000.0 / operations as f64;
        let parts: Vec<String> = self
            .groups
            .iter()
            .zip(now.groups.iter().zip(&before.groups))
            .map(|((name, _), (n, b))| format!("{name} {:.0} µs", per_op(n - b)))
            .collect();
        let busy = (now.busy - before.busy) as f64 / (now.total - before.total).max(1) as f64;
        Ok(format!("{} (busy {:.0} %)", parts.join(", "), 100.0 * busy))
    }
}

/// The machine's busy and total ticks over all CPUs (`/proc/stat`; idle and iowait are idle).
fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("/proc/stat is empty")?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).unwrap_or(&0) + fields.get(4).unwrap_or(&0);
    Ok((total - idle, total))
}

/// A process's user and system ticks so far (0 once it is gone).
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the command's closing parenthesis: state, ppid, ... utime is the 12th, stime the 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum()
}

/// The direct children of `parents` (the servers' etcd members).
fn children_of(parents: &[u32]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                .is_some_and(|ppid| parents.contains(&ppid))
        })
        .collect()
}

/// `EDGESITE_BENCH_PERF=FILE`: the whole machine sampled by `perf record` (call graphs) while
/// the API creates run, into FILE for `perf report -i FILE` (DWARF call graphs: the release
/// binary keeps no frame pointers).
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start() -> Result<Self> {
        let Some(file) = std::env::var_os("EDGESITE_BENCH_PERF") else {
            return Ok(Profile(None));
        };
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "499",
                "-a",
                "--call-graph",
                "dwarf,8192",
                "-o",
            ])
            .arg(file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("EDGESITE_BENCH_PERF needs perf (Debian's linux-perf)")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(Profile(Some(child)))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}
