//! The cloud link at scale: a release `edgesite cloudhub` and 1,000 simulated sites
//! (`tests::simsites`: the real site side of the link, in this process, each over its own TLS
//! connection). Rows: the hub's memory per connected idle site, link traffic per idle site, a
//! Deployment placed on every site (time until each applied it), a change for one site (which
//! sites got a batch), and a hub SIGKILL (time until every site is back and compared, and how
//! many were sent everything again).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};

use super::{Row, Server, rss_kib};

pub const SITES: usize = 1_000;

fn spawn_hub(bin: &Path, dir: &Path, port: u16) -> Result<Server> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("hub.log"))?;
    let child = Command::new(bin)
        .args([
            "cloudhub",
            "--bind-address",
            "127.0.0.1",
            "--https-listen-port",
            &port.to_string(),
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--write-kubeconfig")
        .arg(dir.join("kubeconfig.yaml"))
        .env("RUST_LOG", "warn")
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()?;
    Ok(Server {
        child,
        dir: dir.to_path_buf(),
    })
}

async fn client(dir: &Path) -> Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(dir.join("kubeconfig.yaml"))?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

async fn wait_ready_api(dir: &Path) -> Result<kube::Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if dir.join("kubeconfig.yaml").exists()
            && let Ok(c) = client(dir).await
            && c.apiserver_version().await.is_ok()
        {
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!(
                "the hub did not start; see {}",
                dir.join("hub.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready_sites(client: &kube::Client) -> usize {
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &cloudhub::crds::cluster_resource());
    let Ok(list) = api.list(&ListParams::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|c| {
            c.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count()
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f().await {
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Bytes this process read and wrote (sockets included).
fn io_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn apply(client: &kube::Client, yaml: &str) -> Result<()> {
    for doc in yaml.split("\n---\n") {
        let object: DynamicObject = serde_yaml::from_str(doc)?;
        let types = object.types.clone().context("apiVersion and kind")?;
        let (group, version) = match types.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), types.api_version.clone()),
        };
        let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &types.kind);
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
        let api: Api<DynamicObject> = match (&caps.scope, &object.metadata.namespace) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            _ => Api::all_with(client.clone(), &resource),
        };
        let name = object.metadata.name.clone().context("a name")?;
        api.patch(&name, &PatchParams::apply("bench"), &Patch::Apply(&object))
            .await?;
    }
    Ok(())
}

pub async fn rows(bin: &Path, work: &Path, rows: &mut Vec<Row>) -> Result<()> {
    // Each simulated site holds a connection: this process needs more descriptors than 1,024.
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let dir = work.join("cloudhub");
    let port = tests::free_port();
    let mut hub = spawn_hub(bin, &dir, port)?;
    let client = wait_ready_api(&dir).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_kib, _) = rss_kib(hub.child.id());
    let url = format!("https://127.0.0.1:{port}");
    let labels = [("tier".to_string(), "pop".to_string())].into();
    let attach_started = Instant::now();
    let sims = tests::simsites::SimSites::start(&url, &dir.join("data"), SITES, "sim-", &labels)?;
    wait_for("all sites Ready", Duration::from_secs(300), async || {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ready_sites(&client).await == SITES
    })
    .await?;
    let attach = attach_started.elapsed();
    rows.push(Row {
        metric: "cloud hub: 1,000 sites attach (all Ready)",
        measured: format!("{:.1} s", attach.as_secs_f64()),
        target: "-",
        met: None,
    });

    // Idle: memory per site, and what an idle link costs.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (connected_kib, _) = rss_kib(hub.child.id());
    let per_site = (connected_kib.saturating_sub(idle_kib)) as f64 / SITES as f64;
    rows.push(Row {
        metric: "cloud hub RSS per connected idle site",
        measured: format!(
            "{per_site:.0} KB ({:.0} MB idle, {:.0} MB with 1,000 sites)",
            idle_kib as f64 / 1024.0,
            connected_kib as f64 / 1024.0
        ),
        target: "<= 150 KB",
        met: Some(per_site <= 150.0),
    });
    let before = io_bytes();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let per_minute = (io_bytes() - before) as f64 / SITES as f64;
    rows.push(Row {
        metric: "cloud link traffic per idle site",
        measured: format!(
            "{:.2} KB/min (both directions, TLS included)",
            per_minute / 1024.0
        ),
        target: "< 2 KB/min",
        met: Some(per_minute < 2048.0),
    });

    // One Deployment placed on every site.
    apply(
        &client,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: edge}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: cdn-cache, namespace: edge}\n\
         spec:\n  replicas: 2\n  selector: {matchLabels: {app: cdn-cache}}\n  template:\n    \
         metadata: {labels: {app: cdn-cache}}\n    spec: {containers: [{name: cache, image: busybox}]}",
    )
    .await?;
    let placed = Instant::now();
    apply(
        &client,
        "apiVersion: policy.karmada.io/v1alpha1\nkind: ClusterPropagationPolicy\nmetadata: {name: pops}\n\
         spec:\n  resourceSelectors: [{apiVersion: apps/v1, kind: Deployment}]\n  \
         placement: {clusterAffinity: {labelSelector: {matchLabels: {tier: pop}}}}",
    )
    .await?;
    wait_for(
        "the Deployment at every site",
        Duration::from_secs(300),
        async || {
            sims.first_applied("Deployment/edge/cdn-cache")
                .iter()
                .all(Option::is_some)
        },
    )
    .await?;
    let mut latencies: Vec<Duration> = sims
        .first_applied("Deployment/edge/cdn-cache")
        .into_iter()
        .flatten()
        .map(|t| t.saturating_duration_since(placed))
        .collect();
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    rows.push(Row {
        metric: "cloud: a Deployment placed on 1,000 sites, applied at each (p50 / p99)",
        measured: format!(
            "{:.2} s / {:.2} s",
            percentile(&latencies, 0.5).as_secs_f64(),
            p99.as_secs_f64()
        ),
        target: "p99 < 5 s",
        met: Some(p99 < Duration::from_secs(5)),
    });

    // A change that concerns one site.
    let before = sims.counts();
    apply(
        &client,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: only-7, namespace: edge}\ndata: {a: b}\n---\n\
         apiVersion: policy.karmada.io/v1alpha1\nkind: PropagationPolicy\nmetadata: {name: only-7, namespace: edge}\n\
         spec:\n  resourceSelectors: [{apiVersion: v1, kind: ConfigMap, name: only-7}]\n  \
         placement: {clusterAffinity: {clusterNames: [sim-7]}}",
    )
    .await?;
    wait_for(
        "the ConfigMap at sim-7",
        Duration::from_secs(60),
        async || sims.first_applied("ConfigMap/edge/only-7")[7].is_some(),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let touched = sims
        .counts()
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.batches > b.batches)
        .count();
    rows.push(Row {
        metric: "cloud: a change for one site, sites sent a batch",
        measured: format!("{touched} of {SITES}"),
        target: "that site only",
        met: Some(touched == 1),
    });

    // The hub dies and comes back.
    let asks: Vec<u64> = sims.counts().iter().map(|c| c.cursor_asks).collect();
    let full_before: u64 = sims.counts().iter().map(|c| c.full_batches).sum();
    let _ = hub.child.kill();
    let _ = hub.child.wait();
    let restarted = Instant::now();
    hub = spawn_hub(bin, &dir, port)?;
    let client = wait_ready_api(&dir).await?;
    wait_for("every site back", Duration::from_secs(300), async || {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sims.counts()
            .iter()
            .zip(&asks)
            .all(|(c, before)| c.cursor_asks > *before)
            && ready_sites(&client).await == SITES
    })
    .await?;
    let back = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let full_after: u64 = sims.counts().iter().map(|c| c.full_batches).sum();
    rows.push(Row {
        metric: "cloud: hub SIGKILL, restart to all 1,000 sites back and compared",
        measured: format!(
            "{:.1} s ({} sites sent everything again)",
            back.as_secs_f64(),
            full_after - full_before
        ),
        target: "< 60 s, none re-sent",
        met: Some(back < Duration::from_secs(60) && full_after == full_before),
    });
    drop(sims);
    drop(hub);
    Ok(())
}
