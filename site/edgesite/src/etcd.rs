//! The embedded etcd: `edgesite server --cluster-init` starts and supervises a local etcd member
//! (Debian's `etcd` binary) and keeps the cluster state in it, as K3s does.
//!
//! Layout under `<data-dir>/server/db`: `etcd/` is the member's data dir (`etcd/name` its
//! member name), `etcd.log` its log, `snapshots/` the snapshots. Client and peer traffic use
//! TLS with certificates the site's CA signs (`server/tls/etcd-*.crt`); the member listens for
//! clients on loopback and the advertised address, for peers on the advertised address.
//!
//! A server that once ran an embedded etcd keeps using it (its `db/etcd/member` exists), with or
//! without the flag. Snapshots are etcd's own format (`etcdctl snapshot restore` reads them);
//! `--cluster-reset --cluster-reset-restore-path FILE` restores one, checking it first, before
//! anything is moved aside.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apiserver_lite::storage::etcd::EtcdConfig;
use tokio_util::sync::CancellationToken;

use crate::pki::EtcdTls;

/// The etcd binary: `EDGESITE_ETCD`, else `etcd` on PATH.
pub fn binary() -> String {
    std::env::var("EDGESITE_ETCD").unwrap_or_else(|_| "etcd".into())
}

/// etcdctl, for checking and restoring snapshots: `EDGESITE_ETCDCTL`, else on PATH.
fn etcdctl() -> String {
    std::env::var("EDGESITE_ETCDCTL").unwrap_or_else(|_| "etcdctl".into())
}

fn missing(what: &str, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot run {what}: {e}. The embedded etcd needs Debian's etcd-server and etcd-client \
         packages (`apt-get install etcd-server etcd-client`; ./installer/install.sh \
         --cluster-init installs them)"
    )
}

/// Where a server's embedded etcd lives and how it is reached.
#[derive(Debug, Clone)]
pub struct Member {
    /// `<data-dir>/server/db`.
    pub db: PathBuf,
    pub name: String,
    /// The address other servers reach this member at.
    pub address: IpAddr,
    pub client_port: u16,
    pub peer_port: u16,
    pub tls: EtcdTls,
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// This data dir's member name: `<node>-<8 hex>`, made once and kept.
pub fn member_name(data_dir: &Path, node: &str) -> Result<String> {
    let db = data_dir.join("server").join("db");
    crate::private_dir(&db)?;
    let name_file = db.join("etcd-name");
    Ok(match std::fs::read_to_string(&name_file) {
        Ok(name) if !name.trim().is_empty() => name.trim().to_string(),
        _ => {
            let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
            let name = format!("{node}-{suffix}");
            crate::pki::write_private(&name_file, &name)?;
            name
        }
    })
}

/// The peer URL of a member at `address`.
pub fn peer_url(address: IpAddr, port: u16) -> String {
    format!("https://{}:{port}", host(address))
}

/// Promotes this member once etcd lets it (a learner that has caught up), asking the voting
/// members at `voters` (a learner serves no requests), then returns once this member itself
/// serves quorum reads (it refuses them until it has applied its promotion).
pub async fn promote_when_caught_up(member: &Member, voters: &[String]) -> Result<()> {
    use apiserver_lite::storage::etcd;
    let mut config = member.datastore("/registry");
    if !voters.is_empty() {
        config.endpoints = voters.to_vec();
    }
    let started = std::time::Instant::now();
    loop {
        match etcd::members(&config).await {
            Ok(members) => match members.iter().find(|m| m.name == member.name) {
                Some(me) if me.learner => match etcd::promote(&config, me.id).await {
                    Ok(()) => {
                        tracing::info!(member = %member.name, "this etcd member votes now");
                        break;
                    }
                    Err(e) => tracing::debug!("not promoted yet: {e}"),
                },
                Some(_) => break,
                None => tracing::debug!("this member is not listed yet"),
            },
            Err(e) => tracing::debug!("listing etcd members: {e}"),
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "this server's etcd member has not caught up with the others in 10 minutes; see {}",
                member.db.join("etcd.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    etcd::wait_voting(&member.datastore("/registry"), Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("this server's etcd member: {e}"))
}

/// The client URLs of every voting member, this one's loopback URL first: the API server's
/// etcd client spreads over them and goes on when one member is down.
pub async fn endpoints(member: &Member) -> Vec<String> {
    let mut endpoints = vec![member.local_client_url()];
    if let Ok(members) =
        apiserver_lite::storage::etcd::members(&member.datastore("/registry")).await
    {
        for m in members {
            if m.learner || m.name == member.name {
                continue;
            }
            for url in m.client_urls {
                if !endpoints.contains(&url) {
                    endpoints.push(url);
                }
            }
        }
    }
    endpoints
}

/// How a member starts the first time.
#[derive(Debug, Clone)]
pub enum Initial {
    /// A new one-member cluster.
    New,
    /// Joining a cluster whose members (with this one) are `cluster` (`name=peer-url,...`).
    Existing(String),
}

impl Member {
    /// The member of the server whose data dir is `data_dir`; its name is made once and kept.
    pub fn new(
        data_dir: &Path,
        node: &str,
        address: IpAddr,
        ports: (u16, u16),
        tls: EtcdTls,
    ) -> Result<Member> {
        let db = data_dir.join("server").join("db");
        let name = member_name(data_dir, node)?;
        Ok(Member {
            db,
            name,
            address,
            client_port: ports.0,
            peer_port: ports.1,
            tls,
        })
    }

    pub fn data(&self) -> PathBuf {
        self.db.join("etcd")
    }

    pub fn snapshots(&self) -> PathBuf {
        self.db.join("snapshots")
    }

    /// Whether this data dir has run an embedded etcd before.
    pub fn exists(data_dir: &Path) -> bool {
        data_dir
            .join("server")
            .join("db")
            .join("etcd")
            .join("member")
            .exists()
    }

    pub fn peer_url(&self) -> String {
        peer_url(self.address, self.peer_port)
    }

    pub fn client_url(&self) -> String {
        format!("https://{}:{}", host(self.address), self.client_port)
    }

    fn local_client_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// How the API server (and the tools) reach this member.
    pub fn datastore(&self, prefix: &str) -> EtcdConfig {
        let mut config = EtcdConfig::new(vec![self.local_client_url()]);
        config.prefix = prefix.to_string();
        config.ca_file = Some(self.tls.ca.clone());
        config.cert_file = Some(self.tls.client.0.clone());
        config.key_file = Some(self.tls.client.1.clone());
        config
    }

    fn args(&self, initial: &Initial, force_new_cluster: bool) -> Vec<String> {
        let mut listen_clients = vec![self.local_client_url()];
        if !self.address.is_loopback() {
            listen_clients.push(self.client_url());
        }
        let (cert, key) = (&self.tls.server.0, &self.tls.server.1);
        let (peer_cert, peer_key) = (&self.tls.peer.0, &self.tls.peer.1);
        let path = |p: &PathBuf| p.display().to_string();
        let mut args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data().display()),
            format!("--listen-client-urls={}", listen_clients.join(",")),
            format!("--advertise-client-urls={}", self.client_url()),
            format!("--listen-peer-urls={}", self.peer_url()),
            format!("--initial-advertise-peer-urls={}", self.peer_url()),
            format!("--cert-file={}", path(cert)),
            format!("--key-file={}", path(key)),
            format!("--trusted-ca-file={}", path(&self.tls.ca)),
            "--client-cert-auth=true".into(),
            format!("--peer-cert-file={}", path(peer_cert)),
            format!("--peer-key-file={}", path(peer_key)),
            format!("--peer-trusted-ca-file={}", path(&self.tls.ca)),
            "--peer-client-cert-auth=true".into(),
            // The API servers compact (upstream's compactor, every 5 minutes).
            "--quota-backend-bytes=4294967296".into(),
            "--experimental-initial-corrupt-check=true".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        match initial {
            Initial::New => {
                args.push(format!(
                    "--initial-cluster={}={}",
                    self.name,
                    self.peer_url()
                ));
                args.push("--initial-cluster-state=new".into());
            }
            Initial::Existing(cluster) => {
                args.push(format!("--initial-cluster={cluster}"));
                args.push("--initial-cluster-state=existing".into());
            }
        }
        if force_new_cluster {
            args.push("--force-new-cluster".into());
        }
        args
    }

    fn spawn(&self, initial: &Initial, force_new_cluster: bool) -> Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.db.join("etcd.log"))
            .with_context(|| format!("open {}", self.db.join("etcd.log").display()))?;
        // setpriv: the member dies with this server (a SIGKILLed server leaves no etcd behind
        // holding the ports and the data dir).
        let mut command = tokio::process::Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--"])
            .arg(binary())
            .args(self.args(initial, force_new_cluster))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        command
            .spawn()
            .map_err(|e| missing("etcd (through setpriv)", e))
    }

    /// Starts the member and keeps it running until `shutdown`; returns once it answers.
    pub async fn start(
        &self,
        initial: Initial,
        force_new_cluster: bool,
        shutdown: CancellationToken,
    ) -> Result<()> {
        check_binary()?;
        // Where the tools (`edgesite etcd-snapshot`) find this member.
        crate::pki::write_private(&self.db.join("etcd-endpoint"), &self.local_client_url())?;
        let mut child = self.spawn(&initial, force_new_cluster)?;
        let config = self.datastore("/registry");
        let ready = apiserver_lite::storage::etcd::wait_ready(&config, Duration::from_secs(60));
        tokio::select! {
            r = ready => r.map_err(|e| anyhow::anyhow!("{e}; see {}", self.db.join("etcd.log").display()))?,
            status = child.wait() => {
                let log = self.db.join("etcd.log");
                bail!(
                    "the embedded etcd exited during start-up ({}): {}; see {}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    last_complaint(&std::fs::read_to_string(&log).unwrap_or_default()),
                    log.display()
                );
            }
        }
        tracing::info!(
            member = %self.name,
            client = %self.client_url(),
            peer = %self.peer_url(),
            "embedded etcd running"
        );
        let member = self.clone();
        tokio::spawn(async move {
            // A member that ran a minute starts the waits from the beginning again.
            let mut backoff = link::backoff::Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(30),
                Duration::from_secs(60),
            );
            let mut started = std::time::Instant::now();
            loop {
                let status = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        return;
                    }
                    status = child.wait() => status,
                };
                let pause = backoff.next(started);
                tracing::error!(
                    "the embedded etcd exited ({}); starting it again in {pause:?}; see {}",
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string()),
                    member.db.join("etcd.log").display()
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                started = std::time::Instant::now();
                // Its data dir exists now: the initial flags no longer matter.
                match member.spawn(&Initial::New, false) {
                    Ok(c) => child = c,
                    Err(e) => tracing::error!("restarting the embedded etcd failed: {e:#}"),
                }
            }
        });
        Ok(())
    }
}

fn check_binary() -> Result<()> {
    match std::process::Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("`{} --version` failed ({s})", binary()),
        Err(e) => Err(missing("etcd", e)),
    }
}

/// How the tools reach the embedded etcd of the server whose data dir is `data_dir`.
pub fn local(data_dir: &Path, prefix: &str) -> Result<EtcdConfig> {
    let db = data_dir.join("server").join("db");
    let endpoint = std::fs::read_to_string(db.join("etcd-endpoint")).map_err(|_| {
        anyhow::anyhow!(
            "{} runs no embedded etcd (start the server with --cluster-init), or this is not \
             its --data-dir",
            data_dir.display()
        )
    })?;
    let tls = data_dir.join("server").join("tls");
    let mut config = EtcdConfig::new(vec![endpoint.trim().to_string()]);
    config.prefix = prefix.to_string();
    config.ca_file = Some(tls.join("ca.crt"));
    config.cert_file = Some(tls.join("etcd-client.crt"));
    config.key_file = Some(tls.join("etcd-client.key"));
    Ok(config)
}

/// Checks a snapshot file with `etcdctl snapshot status` (it reads the whole database): a
/// damaged or foreign file is refused before anything is changed. Returns etcdctl's summary.
pub fn check_snapshot(file: &Path) -> Result<String> {
    if !file.is_file() {
        bail!("snapshot {} does not exist", file.display());
    }
    let out = std::process::Command::new(etcdctl())
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "--write-out=simple"])
        .arg(file)
        .output()
        .map_err(|e| missing("etcdctl", e))?;
    if !out.status.success() {
        bail!(
            "snapshot {} is damaged or not an etcd snapshot: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `--cluster-reset`: the member becomes a one-member cluster again, from `restore` when given
/// (checked first; the old data dir is kept beside it as `etcd-old-<time>`), else from its own
/// data (etcd's --force-new-cluster). Returns whether the next start must force a new cluster.
pub fn reset(member: &Member, restore: Option<&Path>) -> Result<bool> {
    let Some(file) = restore else {
        if !member.data().join("member").exists() {
            bail!(
                "--cluster-reset: this server has no embedded etcd data in {} to reset",
                member.data().display()
            );
        }
        return Ok(true);
    };
    check_snapshot(file)?;
    let restored = member.db.join("etcd-restoring");
    let _ = std::fs::remove_dir_all(&restored);
    let out = std::process::Command::new(etcdctl())
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(file)
        .arg(format!("--data-dir={}", restored.display()))
        .arg(format!("--name={}", member.name))
        .arg(format!(
            "--initial-cluster={}={}",
            member.name,
            member.peer_url()
        ))
        .arg(format!(
            "--initial-advertise-peer-urls={}",
            member.peer_url()
        ))
        .output()
        .map_err(|e| missing("etcdctl", e))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&restored);
        bail!(
            "restoring {} failed, nothing was changed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if member.data().exists() {
        let old = member.db.join(format!(
            "etcd-old-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        ));
        std::fs::rename(member.data(), &old)
            .with_context(|| format!("move {} aside", member.data().display()))?;
        tracing::warn!("the previous etcd data is kept in {}", old.display());
    }
    std::fs::rename(&restored, member.data())
        .with_context(|| format!("move the restored data to {}", member.data().display()))?;
    Ok(false)
}

/// A snapshot file as `etcd-snapshot ls` shows it.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub created: std::time::SystemTime,
}

/// Snapshots in `dir`, oldest first.
pub fn list_snapshots(dir: &Path) -> Result<Vec<SnapshotFile>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".part") || !entry.file_type()?.is_file() {
            continue;
        }
        let meta = entry.metadata()?;
        found.push(SnapshotFile {
            name,
            path: entry.path(),
            size: meta.len(),
            created: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        });
    }
    found.sort_by_key(|s| (s.created, s.name.clone()));
    Ok(found)
}

/// Saves a snapshot named `<prefix>-<node>-<unix time>` into `dir` and checks it.
pub async fn save(
    config: &EtcdConfig,
    dir: &Path,
    prefix: &str,
    node: &str,
) -> Result<SnapshotFile> {
    crate::private_dir(dir)?;
    let now = chrono::Utc::now().timestamp();
    let name = format!("{prefix}-{node}-{now}");
    let path = dir.join(&name);
    apiserver_lite::storage::etcd::save_snapshot(config, &path)
        .await
        .map_err(|e| anyhow::anyhow!("saving snapshot {name}: {e}"))?;
    check_snapshot(&path)?;
    let size = std::fs::metadata(&path)?.len();
    Ok(SnapshotFile {
        name,
        path,
        size,
        created: std::time::SystemTime::now(),
    })
}

/// Deletes all but the newest `keep` snapshots whose names start with `prefix`; returns the
/// deleted names.
pub fn prune(dir: &Path, prefix: &str, keep: usize) -> Result<Vec<String>> {
    let mut ours: Vec<SnapshotFile> = list_snapshots(dir)?
        .into_iter()
        .filter(|s| s.name.starts_with(&format!("{prefix}-")))
        .collect();
    let mut deleted = Vec::new();
    while ours.len() > keep {
        let oldest = ours.remove(0);
        std::fs::remove_file(&oldest.path)
            .with_context(|| format!("delete {}", oldest.path.display()))?;
        deleted.push(oldest.name);
    }
    Ok(deleted)
}

/// Scheduled snapshots: at every time of `cron` (five fields), save one and keep `retention`.
pub async fn schedule(
    config: EtcdConfig,
    dir: PathBuf,
    node: String,
    cron: croner::Cron,
    retention: usize,
    shutdown: CancellationToken,
) {
    loop {
        let now = chrono::Utc::now();
        let Ok(next) = cron.find_next_occurrence(&now, false) else {
            return;
        };
        let wait = (next - now).to_std().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match save(&config, &dir, "etcd-snapshot", &node).await {
            Ok(s) => {
                tracing::info!(snapshot = %s.path.display(), size = s.size, "saved a scheduled etcd snapshot");
                match prune(&dir, "etcd-snapshot", retention) {
                    Ok(deleted) if !deleted.is_empty() => {
                        tracing::info!(?deleted, "pruned etcd snapshots");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("pruning etcd snapshots failed: {e:#}"),
                }
            }
            Err(e) => tracing::error!("a scheduled etcd snapshot failed: {e:#}"),
        }
    }
}

/// Moves a SQLite site's objects into an empty etcd once, in revision order (their new
/// resourceVersions keep the old order), and keeps the SQLite file beside as a backup. Returns
/// how many objects moved, or `None` when there was nothing to move.
pub async fn migrate_sqlite(database: &Path, etcd: &EtcdConfig) -> Result<Option<usize>> {
    use apiserver_lite::storage::Storage;
    use apiserver_lite::storage::sqlite::{Contents, SqliteStorage, inspect};
    if !database.exists() || inspect(database)? != Contents::Cluster {
        return Ok(None);
    }
    let target = apiserver_lite::storage::etcd::EtcdStorage::open(etcd, 16)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let existing = target
        .list("/", None, Some(1))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if !existing.items.is_empty() {
        bail!(
            "{} holds a cluster, and so does the embedded etcd: not moving anything. Move the \
             file away to keep the etcd's state, or start without --cluster-init to keep SQLite's",
            database.display()
        );
    }
    let source = SqliteStorage::open(database, 16).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut items = source
        .list("/", None, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .items;
    items.sort_by_key(|i| i.revision);
    let count = items.len();
    for item in items {
        let value = item.value().map_err(|e| anyhow::anyhow!("{e}"))?;
        target
            .create(&item.key, value)
            .await
            .map_err(|e| anyhow::anyhow!("moving {}: {e}", item.key))?;
    }
    drop(source);
    let kept = database.with_file_name(format!(
        "state.db.migrated-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::rename(database, &kept)
        .with_context(|| format!("keep {} as {}", database.display(), kept.display()))?;
    for suffix in ["-wal", "-shm"] {
        let mut companion = database.as_os_str().to_owned();
        companion.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(companion));
    }
    tracing::warn!(
        objects = count,
        backup = %kept.display(),
        "moved the SQLite datastore into the embedded etcd"
    );
    Ok(Some(count))
}

/// What etcd said last before it gave up: the message and error of its last fatal or error
/// line (it logs JSON), else its last line; for a start-up failure the user reads.
fn last_complaint(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let parsed = lines.iter().rev().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let level = value.get("level")?.as_str()?;
        if !matches!(level, "fatal" | "panic" | "error") {
            return None;
        }
        let message = value.get("msg").and_then(|m| m.as_str()).unwrap_or("");
        Some(match value.get("error").and_then(|e| e.as_str()) {
            Some(error) => format!("etcd: {message}: {error}"),
            None => format!("etcd: {message}"),
        })
    });
    let text = parsed
        .or_else(|| lines.last().map(|l| format!("etcd: {}", l.trim())))
        .unwrap_or_else(|| "etcd printed nothing".to_string());
    text.chars().take(400).collect()
}

#[cfg(test)]
mod tests {
    use super::last_complaint;

    #[test]
    fn a_failed_start_says_what_etcd_said() {
        let log = r#"{"level":"info","msg":"starting"}
{"level":"fatal","ts":"2026","msg":"listener failed","error":"listen tcp 127.0.0.1:2380: bind: address already in use"}
"#;
        assert_eq!(
            last_complaint(log),
            "etcd: listener failed: listen tcp 127.0.0.1:2380: bind: address already in use"
        );
        assert_eq!(last_complaint("plain words\n"), "etcd: plain words");
        assert_eq!(last_complaint(""), "etcd printed nothing");
    }
}
