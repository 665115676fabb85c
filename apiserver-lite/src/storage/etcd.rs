//! The etcd backend, as kube-apiserver's etcd3 store uses etcd.
//!
//! An object lives at `<prefix><key>` (the prefix defaults to `/registry`, so a pod is at
//! `/registry/core/pods/default/web`); its value is the object's JSON text without
//! `metadata.resourceVersion`, which is the key's mod revision and is written into the object when
//! it is read. A create is a transaction on `mod_revision == 0`; an update or delete with an
//! expected revision is a transaction on the key's mod revision (else the current value is read
//! back to say why: not found, or a conflict).
//!
//! One watch on the prefix (from the revision the store started at, with the previous values and
//! progress notifications) feeds the [`WatchHub`], so every server's watchers see every server's
//! writes in revision order. A write answers only after that watch has published its revision,
//! so a client that writes and then watches from the returned revision never misses its own
//! change. The watch resumes from the last revision it published after a broken connection; a
//! revision etcd has compacted meanwhile expires every watcher (HTTP 410, they relist).
//!
//! The same watch keeps this server's copy of every namespace ([`KEPT_PREFIX`]), which admission
//! reads on each namespaced create, as upstream's NamespaceLifecycle reads its informer's cache:
//! no etcd read per create.
//!
//! Compaction runs every [`COMPACT_EVERY`] as upstream's compactor does: the servers sharing an
//! etcd race for a compare-and-swap on [`COMPACT_KEY`]; the winner compacts to the revision it saw
//! one interval earlier, so every watcher has at least one interval to catch up.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType as EtcdEventType,
    GetOptions, Identity, KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions,
};
use link::backoff::Backoff;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::watch::{EventType, WatchEvent, WatchHub};
use super::{Listing, RawObject, Storage, StorageError, Stored, stamp_revision};

/// The compare-and-swap key the servers sharing an etcd compact through (upstream's name).
pub const COMPACT_KEY: &str = "compact_rev_key";
/// How often the store compacts etcd's history (upstream's default).
pub const COMPACT_EVERY: Duration = Duration::from_secs(300);
/// How long one request to etcd may take before the caller gets a clear error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write waits for the watch to publish it.
const PUBLISH_WAIT: Duration = Duration::from_secs(10);
/// Keys one list request reads at most.
const LIST_CHUNK: i64 = 500;
/// The keys every server keeps a copy of, from its watch: the namespaces.
pub const KEPT_PREFIX: &str = "/core/namespaces/";

/// This server's copy of the objects under [`KEPT_PREFIX`], as of what its watch has published;
/// `None` while it is not known (after etcd compacted changes the watch had not seen, until it
/// is read again).
type Kept = Arc<Mutex<Option<HashMap<String, Stored>>>>;

/// Where the etcd is and how to talk to it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs: `http://127.0.0.1:2379` or `https://...`.
    pub endpoints: Vec<String>,
    /// Prepended to every key: one prefix per site, so one etcd can hold several.
    pub prefix: String,
    /// PEM files for TLS to etcd: its CA, and our client certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How often to compact (tests shorten it).
    pub compact_every: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: "/registry".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            compact_every: COMPACT_EVERY,
        }
    }
}

pub struct EtcdStorage {
    client: Client,
    /// The client URLs, for messages.
    endpoints: String,
    prefix: String,
    /// The latest revision this server has seen from etcd (responses and the watch).
    revision: Arc<AtomicU64>,
    hub: Arc<WatchHub>,
    /// Why etcd cannot be reached, while it cannot.
    unavailable: Arc<Mutex<Option<String>>>,
    kept: Kept,
    stop: CancellationToken,
    /// Tests: how many of the next committed writes have their answer lost on the way back, as
    /// a connection that breaks after etcd committed loses it.
    #[cfg(test)]
    lose_answers: std::sync::atomic::AtomicUsize,
}

impl Drop for EtcdStorage {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A client of the etcd `config` names (TLS as it says); fails with a clear error when a file
/// cannot be read or etcd cannot be reached.
pub async fn connect(config: &EtcdConfig) -> Result<Client, StorageError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if config.ca_file.is_some() || config.cert_file.is_some() {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| StorageError::Backend(format!("cannot read {}: {e}", p.display())))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => {
                return Err(StorageError::Backend(
                    "a client certificate for etcd needs both --datastore-certfile and --datastore-keyfile".into(),
                ));
            }
        }
        options = options.with_tls(tls);
    }
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| {
            StorageError::Unavailable(format!(
                "cannot reach etcd at {}: {e}",
                config.endpoints.join(",")
            ))
        })
}

/// Waits until the etcd `config` names answers a (serializable) read, for at most `timeout`.
pub async fn wait_ready(config: &EtcdConfig, timeout: Duration) -> Result<(), StorageError> {
    // Serializable: a learner (a member still catching up) answers it too.
    wait_answering(config, timeout, true).await
}

/// Waits until the etcd `config` names answers a quorum read, for at most `timeout`: a member
/// just promoted from learner refuses them until it has applied its own promotion.
pub async fn wait_voting(config: &EtcdConfig, timeout: Duration) -> Result<(), StorageError> {
    wait_answering(config, timeout, false).await
}

async fn wait_answering(
    config: &EtcdConfig,
    timeout: Duration,
    serializable: bool,
) -> Result<(), StorageError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut client = connect(config).await?;
            let mut options = GetOptions::new().with_count_only();
            if serializable {
                options = options.with_serializable();
            }
            client.get("health", Some(options)).await.map_err(failed)
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(StorageError::Unavailable(format!(
                    "etcd at {} did not become ready in {timeout:?}: {e}",
                    config.endpoints.join(",")
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Streams a snapshot of the whole etcd (its own format, as `etcdctl snapshot save` writes) to
/// `to`: written beside it and moved in once complete. Returns its size and the revision it
/// holds.
pub async fn save_snapshot(
    config: &EtcdConfig,
    to: &std::path::Path,
) -> Result<(u64, u64), StorageError> {
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| StorageError::Backend(format!("{}: {e}", to.display()));
    let mut client = connect(config).await?;
    let revision = revision_of(
        client
            .get("health", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(failed)?
            .header(),
    );
    let mut stream = client.snapshot().await.map_err(failed)?;
    let partial = to.with_extension("part");
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .await
        .map_err(io)?;
    let mut size = 0u64;
    while let Some(chunk) = stream.message().await.map_err(failed)? {
        file.write_all(chunk.blob()).await.map_err(io)?;
        size += chunk.blob().len() as u64;
    }
    file.sync_all().await.map_err(io)?;
    drop(file);
    if size == 0 {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(StorageError::Backend("etcd sent an empty snapshot".into()));
    }
    tokio::fs::rename(&partial, to).await.map_err(io)?;
    Ok((size, revision))
}

/// One member of an etcd cluster, as `member list` shows it.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub learner: bool,
}

impl From<&etcd_client::Member> for MemberInfo {
    fn from(m: &etcd_client::Member) -> Self {
        MemberInfo {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
            learner: m.is_learner(),
        }
    }
}

/// The cluster's members.
pub async fn members(config: &EtcdConfig) -> Result<Vec<MemberInfo>, StorageError> {
    let mut client = connect(config).await?;
    let list = client.member_list().await.map_err(failed)?;
    Ok(list.members().iter().map(MemberInfo::from).collect())
}

/// Adds a member (as a learner: it votes only once promoted) and returns the cluster's members
/// as the new member must be started with (`--initial-cluster`).
pub async fn add_learner(
    config: &EtcdConfig,
    peer_url: &str,
) -> Result<(u64, Vec<MemberInfo>), StorageError> {
    let mut client = connect(config).await?;
    let added = client
        .member_add(
            [peer_url],
            Some(etcd_client::MemberAddOptions::new().with_is_learner()),
        )
        .await
        .map_err(failed)?;
    let id = added.member().map_or(0, |m| m.id());
    let members = added.member_list().iter().map(MemberInfo::from).collect();
    Ok((id, members))
}

/// Promotes a learner; etcd refuses while it has not caught up with the leader.
pub async fn promote(config: &EtcdConfig, id: u64) -> Result<(), StorageError> {
    let mut client = connect(config).await?;
    client.member_promote(id).await.map_err(failed)?;
    Ok(())
}

/// Removes a member.
pub async fn remove_member(config: &EtcdConfig, id: u64) -> Result<(), StorageError> {
    let mut client = connect(config).await?;
    client.member_remove(id).await.map_err(failed)?;
    Ok(())
}

/// How many times one request is tried.
const ATTEMPTS: u32 = 4;
/// How long one write attempt may take before it is sent again ([`EtcdStorage::write_txn`]):
/// etcd itself waits 7 s for a proposal forwarded to a leader that died meanwhile.
const WRITE_ATTEMPT: Duration = Duration::from_secs(2);
/// How long a write keeps being sent again.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// Whether a write that failed with `e` reached a member and may have been committed all the
/// same: the leader it was forwarded to died or changed, or etcd stopped waiting for it.
fn ambiguous(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    ["request timed out", "leader changed", "no leader"]
        .iter()
        .any(|m| text.contains(m))
        || matches!(e, etcd_client::Error::GRpcStatus(status) if matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
        ))
}

/// Whether `e` says the request never reached a member (the client's channel picked one that
/// is down): any request may be sent again.
fn never_sent(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    [
        "tcp connect error",
        "Connection refused",
        "error trying to connect",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// Whether a read that failed with `e` may be sent again (see `retrying`): it never reached a
/// member, or the member had connection or leader trouble.
fn transient(e: &etcd_client::Error) -> bool {
    never_sent(e)
        || matches!(e, etcd_client::Error::GRpcStatus(status) if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ) && !e.to_string().contains("compacted"))
}

/// An etcd client error as the API reports it: etcd's own words (`etcdserver: ...`), a revision
/// etcd has compacted as `Expired`, and a connection failure as `Unavailable`.
fn failed(e: etcd_client::Error) -> StorageError {
    match &e {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message().to_string();
            if message.contains("required revision has been compacted") {
                return StorageError::Expired {
                    requested: 0,
                    oldest: 0,
                };
            }
            match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown => StorageError::Unavailable(message),
                _ => StorageError::Backend(message),
            }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            StorageError::Unavailable(e.to_string())
        }
        _ => StorageError::Backend(e.to_string()),
    }
}

fn text<'a>(bytes: &'a [u8], key: &str) -> Result<&'a str, StorageError> {
    std::str::from_utf8(bytes)
        .map_err(|_| StorageError::Damaged(format!("the value at {key} is not text")))
}

/// An object's stored text with `metadata.resourceVersion` set to `revision`, without building
/// the object's tree: the top level and `metadata` are split into their members' raw text, the
/// version is put in, and the two levels are joined again in Go's key order (`kind`,
/// `apiVersion`, then sorted, as [`crate::go_json`] writes them).
pub fn with_revision(stored: &str, revision: u64) -> Result<String, StorageError> {
    match spliced(stored, revision) {
        Some(text) => Ok(text),
        None => rebuilt(stored, revision),
    }
}

/// [`with_revision`] without copying the members: their names and values are borrowed from
/// `stored` (every watch event on every server goes through this). `None` when a member name
/// has escapes or there is no `metadata`, which [`rebuilt`] handles.
fn spliced(stored: &str, revision: u64) -> Option<String> {
    let top: BTreeMap<&str, &RawValue> = serde_json::from_str(stored).ok()?;
    let mut metadata: BTreeMap<&str, &RawValue> =
        serde_json::from_str(top.get("metadata")?.get()).ok()?;
    let version = RawValue::from_string(format!("\"{revision}\"")).ok()?;
    metadata.insert("resourceVersion", &version);
    let mut out = String::with_capacity(stored.len() + 40);
    // Names borrowed from valid JSON have no escapes and no control characters: written as read.
    let member = |out: &mut String, key: &str| {
        if !out.ends_with('{') {
            out.push(',');
        }
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
    };
    out.push('{');
    for key in ["kind", "apiVersion"] {
        if let Some(value) = top.get(key) {
            member(&mut out, key);
            out.push_str(value.get());
        }
    }
    for (key, value) in &top {
        match *key {
            "kind" | "apiVersion" => {}
            "metadata" => {
                member(&mut out, key);
                out.push('{');
                for (name, value) in &metadata {
                    member(&mut out, name);
                    out.push_str(value.get());
                }
                out.push('}');
            }
            _ => {
                member(&mut out, key);
                out.push_str(value.get());
            }
        }
    }
    out.push('}');
    Some(out)
}

/// [`with_revision`] for any object: the members copied out, the version put in, joined again.
fn rebuilt(stored: &str, revision: u64) -> Result<String, StorageError> {
    let corrupt = |e: serde_json::Error| StorageError::Backend(format!("corrupt object: {e}"));
    let mut top: BTreeMap<String, Box<RawValue>> = serde_json::from_str(stored).map_err(corrupt)?;
    let mut metadata: BTreeMap<String, Box<RawValue>> = match top.get("metadata") {
        Some(raw) => serde_json::from_str(raw.get()).map_err(corrupt)?,
        None => BTreeMap::new(),
    };
    let version = RawValue::from_string(format!("\"{revision}\"")).map_err(corrupt)?;
    metadata.insert("resourceVersion".into(), version);
    let metadata = serde_json::to_string(&metadata).map_err(corrupt)?;
    top.insert(
        "metadata".into(),
        RawValue::from_string(metadata).map_err(corrupt)?,
    );
    let mut out = String::with_capacity(stored.len() + 40);
    out.push('{');
    let mut first = true;
    let mut member = |out: &mut String, key: &str, value: &RawValue| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&serde_json::to_string(key).unwrap_or_default());
        out.push(':');
        out.push_str(value.get());
    };
    for key in ["kind", "apiVersion"] {
        if let Some(value) = top.get(key) {
            member(&mut out, key, value);
        }
    }
    for (key, value) in &top {
        if key != "kind" && key != "apiVersion" {
            member(&mut out, key, value);
        }
    }
    out.push('}');
    Ok(out)
}

/// The text stored for `object`, whose resourceVersion is taken out first (etcd's mod revision
/// is the version; the writer stamps the new one back), so the object is not copied per write.
fn stored_text(object: &mut Value) -> Result<String, StorageError> {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    let text = crate::go_json::to_string(object);
    super::check_size(&text)?;
    Ok(text)
}

/// The current value a refused transaction read back (its `or_else` get).
fn current_of(response: &TxnResponse) -> Option<KeyValue> {
    match response.op_responses().first() {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
        _ => None,
    }
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header.map_or(0, |h| h.revision().max(0) as u64)
}

impl EtcdStorage {
    /// Connects to etcd, reads its current revision and starts following the prefix and
    /// compacting. Fails with etcd's own words when it cannot be reached.
    pub async fn open(config: &EtcdConfig, watch_window: usize) -> Result<Self, StorageError> {
        let prefix = config.prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            return Err(StorageError::Backend(format!(
                "the etcd prefix {:?} must start with '/'",
                config.prefix
            )));
        }
        let mut client = connect(config).await?;
        // A quorum read: the revision every later list and watch starts from.
        let first = client
            .get(
                format!("{prefix}/"),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(|e| {
                StorageError::Unavailable(format!(
                    "etcd at {} does not answer: {}",
                    config.endpoints.join(","),
                    failed(e)
                ))
            })?;
        let current = revision_of(first.header());
        // What the watch (from `current` on) then keeps up to date.
        let kept = read_kept(&client, &prefix, current).await.map_err(|e| {
            StorageError::Unavailable(format!(
                "etcd at {} does not answer: {}",
                config.endpoints.join(","),
                failed(e)
            ))
        })?;
        let store = EtcdStorage {
            client,
            endpoints: config.endpoints.join(","),
            prefix,
            revision: Arc::new(AtomicU64::new(current)),
            hub: Arc::new(WatchHub::new(current, watch_window)),
            unavailable: Arc::new(Mutex::new(None)),
            kept: Arc::new(Mutex::new(Some(kept))),
            stop: CancellationToken::new(),
            #[cfg(test)]
            lose_answers: Default::default(),
        };
        tokio::spawn(
            Follower {
                client: store.client.clone(),
                endpoints: store.endpoints.clone(),
                prefix: format!("{}/", store.prefix),
                hub: store.hub.clone(),
                seen: store.revision.clone(),
                unavailable: store.unavailable.clone(),
                kept: store.kept.clone(),
                stop: store.stop.clone(),
            }
            .run(current),
        );
        tokio::spawn(compact(
            store.client.clone(),
            config.compact_every,
            store.stop.clone(),
        ));
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn seen(&self, revision: u64) {
        self.revision.fetch_max(revision, Ordering::AcqRel);
    }

    /// Notes whether etcd answered: `/readyz` reports it while it does not.
    fn noticed<T>(&self, result: Result<T, etcd_client::Error>) -> Result<T, StorageError> {
        let mut unavailable = self.unavailable.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(v) => {
                *unavailable = None;
                Ok(v)
            }
            Err(e) => match failed(e) {
                StorageError::Unavailable(why) => {
                    let why = format!("etcd at {} is unavailable: {why}", self.endpoints);
                    *unavailable = Some(why.clone());
                    Err(StorageError::Unavailable(why))
                }
                e => Err(e),
            },
        }
    }

    /// Runs one etcd read, again (up to [`ATTEMPTS`] times, briefly apart) after connection or
    /// leader trouble. Writes go through [`EtcdStorage::write_txn`].
    async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, StorageError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 1;
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::MAX,
        );
        loop {
            let started = std::time::Instant::now();
            let result = request(self.client.clone()).await;
            match &result {
                Err(e) if attempt < ATTEMPTS && transient(e) => {
                    attempt += 1;
                    tokio::time::sleep(backoff.next(started)).await;
                }
                _ => return self.noticed(result),
            }
        }
    }

    /// Sends a guarded write (a transaction whose compare makes a second copy of it fail)
    /// until etcd answers, for at most [`WRITE_DEADLINE`]. An attempt that fails without
    /// reaching a member, fails in a way that leaves its fate unknown, or gets no answer within
    /// [`WRITE_ATTEMPT`] (its leader died: etcd would hold it 7 s) is sent again. The second
    /// answer is true when an earlier attempt may have been committed: the caller then takes
    /// a refused compare whose current value is exactly what it wrote as its own success.
    async fn write_txn(&self, txn: Txn) -> Result<(TxnResponse, bool), StorageError> {
        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
            Duration::MAX,
        );
        let mut uncertain = false;
        loop {
            let attempt = std::time::Instant::now();
            let sent =
                tokio::time::timeout(WRITE_ATTEMPT, self.client.kv_client().txn(txn.clone())).await;
            #[cfg(test)]
            let sent = match sent {
                Ok(Ok(_))
                    if self
                        .lose_answers
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_ok() =>
                {
                    Ok(Err(etcd_client::Error::GRpcStatus(
                        tonic::Status::unavailable("the answer was lost"),
                    )))
                }
                other => other,
            };
            let error = match sent {
                Ok(Ok(response)) => return self.noticed(Ok(response)).map(|r| (r, uncertain)),
                Ok(Err(e)) => e,
                Err(_) => etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
                    "etcdserver: request timed out",
                )),
            };
            let maybe = ambiguous(&error);
            if !(never_sent(&error) || maybe) || started.elapsed() >= WRITE_DEADLINE {
                return self.noticed(Err(error));
            }
            uncertain |= maybe;
            tracing::debug!(error = %error, "etcd write: sending again");
            tokio::time::sleep(backoff.next(attempt)).await;
        }
    }

    /// Waits until the watch has published `revision`, so the writer's own watch sees it.
    async fn published(&self, revision: u64) {
        if tokio::time::timeout(PUBLISH_WAIT, self.hub.wait_for(revision))
            .await
            .is_err()
        {
            tracing::warn!(
                revision,
                "etcd's watch has not delivered a committed write yet; answering anyway"
            );
        }
    }

    /// Why a conditional write failed, from the current value the transaction read instead.
    fn refused(
        &self,
        key: &str,
        expected: Option<u64>,
        current: Option<&KeyValue>,
    ) -> StorageError {
        match (current, expected) {
            (None, _) => StorageError::NotFound(key.to_string()),
            (Some(kv), Some(expected)) => StorageError::Conflict {
                key: key.to_string(),
                expected,
                found: kv.mod_revision() as u64,
            },
            (Some(_), None) => StorageError::Backend(format!("the write to {key} was refused")),
        }
    }

    /// A guarded write: `ops` run when `key`'s mod revision is `expected` (or the key exists, for
    /// `None`); otherwise the current value is read back to say why.
    async fn guarded(
        &self,
        key: &str,
        expected: Option<u64>,
        op: TxnOp,
        written: Option<&str>,
    ) -> Result<(u64, Option<KeyValue>), StorageError> {
        let full = self.full(key);
        let guard = match expected {
            Some(rev) => Compare::mod_revision(full.clone(), CompareOp::Equal, rev as i64),
            None => Compare::mod_revision(full.clone(), CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([op])
            .or_else([TxnOp::get(full, None)]);
        let (response, uncertain) = self.write_txn(txn).await?;
        let revision = revision_of(response.header());
        self.seen(revision);
        if !response.succeeded() {
            let current = current_of(&response);
            // An earlier attempt of this write made it: the value is what it wrote, at a newer
            // revision than it expected.
            if let (true, Some(kv), Some(written)) = (uncertain, &current, written)
                && kv.value() == written.as_bytes()
                && expected.is_none_or(|e| kv.mod_revision() as u64 > e)
            {
                return Ok((kv.mod_revision() as u64, None));
            }
            // A deletion whose earlier attempt may have made it finds the key gone: the watch
            // says whether it was deleted from exactly the version this one was guarded on.
            if let (true, None, None, Some(expected)) = (uncertain, &current, written, expected) {
                self.published(revision).await;
                if let Some(deleted) = self.deletion_of(key, expected) {
                    return Ok((deleted, None));
                }
            }
            return Err(self.refused(key, expected, current.as_ref()));
        }
        let answers = response.op_responses();
        let previous = match answers.into_iter().next() {
            Some(TxnOpResponse::Put(put)) => put.prev_key().cloned(),
            Some(TxnOpResponse::Delete(delete)) => delete.prev_kvs().first().cloned(),
            _ => None,
        };
        Ok((revision, previous))
    }

    /// The revision at which the watch saw `key` deleted from its version `from`, while the
    /// window still holds it.
    fn deletion_of(&self, key: &str, from: u64) -> Option<u64> {
        let events = self.hub.read(from, usize::MAX).ok()?;
        let version = from.to_string();
        events
            .iter()
            .filter(|e| e.event_type == EventType::Deleted && e.key == key)
            .find(|e| {
                e.previous_value().is_some_and(|p| {
                    p["metadata"]["resourceVersion"].as_str() == Some(version.as_str())
                })
            })
            .map(|e| e.revision)
    }

    /// The object as the deletion event at `revision` left it (its last state, stamped with
    /// the deletion's revision).
    fn deleted_at(&self, key: &str, revision: u64) -> Result<Stored, StorageError> {
        let event = self
            .hub
            .read(revision - 1, 1)?
            .into_iter()
            .next()
            .filter(|e| e.revision == revision && e.key == key)
            .ok_or_else(|| StorageError::NotFound(key.to_string()))?;
        let object = event
            .object_value()
            .ok_or_else(|| StorageError::Backend(format!("corrupt object {key}")))?;
        Ok(Stored {
            revision,
            object: Arc::new(object),
        })
    }

    /// etcd's current revision (a quorum read), which this server then knows of.
    pub async fn current(&self) -> Result<u64, StorageError> {
        let key = format!("{}/", self.prefix);
        let response = self
            .retrying(|c| {
                let key = key.clone();
                async move {
                    c.kv_client()
                        .get(key, Some(GetOptions::new().with_prefix().with_count_only()))
                        .await
                }
            })
            .await?;
        let revision = revision_of(response.header());
        self.seen(revision);
        Ok(revision)
    }
}

#[async_trait::async_trait]
impl Storage for EtcdStorage {
    async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        let full = self.full(key);
        let response = self
            .retrying(|c| {
                let full = full.clone();
                async move { c.kv_client().get(full, None).await }
            })
            .await?;
        self.seen(revision_of(response.header()));
        response
            .kvs()
            .first()
            .map(|kv| stored_of(kv, key))
            .transpose()
    }

    async fn get_recent(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        if key.starts_with(KEPT_PREFIX)
            && let Some(kept) = self.kept.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
        {
            return Ok(kept.get(key).cloned());
        }
        let full = self.full(key);
        let response = self
            .retrying(|c| {
                let full = full.clone();
                async move {
                    c.kv_client()
                        .get(full, Some(GetOptions::new().with_serializable()))
                        .await
                }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| stored_of(kv, key))
            .transpose()
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Listing, StorageError> {
        self.list_at(prefix, start_after, limit, None).await
    }

    async fn list_at(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
        at: Option<u64>,
    ) -> Result<Listing, StorageError> {
        let full_prefix = self.full(prefix);
        // Keys are ASCII and prefixes end in '/', so '0' (the next byte) bounds the range.
        let end = format!("{}0", &full_prefix[..full_prefix.len() - 1]);
        let mut from = match start_after {
            // The first key after `start_after`: itself followed by the smallest byte.
            Some(after) => {
                let mut k = self.full(after).into_bytes();
                k.push(0);
                k
            }
            None => full_prefix.clone().into_bytes(),
        };
        let mut revision = at.unwrap_or(0);
        let mut items = Vec::new();
        let mut continue_after = None;
        loop {
            // One more than wanted says whether anything is left.
            let want = match limit {
                Some(l) => ((l - items.len()) as i64 + 1).min(LIST_CHUNK),
                None => LIST_CHUNK,
            };
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(want);
            if revision > 0 {
                options = options.with_revision(revision as i64);
            }
            let result = self
                .retrying(|c| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { c.kv_client().get(from, Some(options)).await }
                })
                .await;
            let mut response = match result {
                Err(StorageError::Expired { .. }) => {
                    return Err(StorageError::Expired {
                        requested: revision,
                        oldest: revision + 1,
                    });
                }
                other => other?,
            };
            if revision == 0 {
                revision = revision_of(response.header());
                self.seen(revision);
            }
            let more = response.more();
            let kvs = response.take_kvs();
            let got = kvs.len();
            for kv in kvs {
                let full = text(kv.key(), "a listed key")?;
                let key = full[self.prefix.len()..].to_string();
                if let Some(l) = limit
                    && items.len() == l
                {
                    continue_after = items.last().map(|i: &RawObject| i.key.clone());
                    break;
                }
                let rev = kv.mod_revision() as u64;
                let raw = with_revision(text(kv.value(), &key)?, rev)?;
                from = kv.key().to_vec();
                from.push(0);
                items.push(RawObject {
                    key,
                    revision: rev,
                    raw: Arc::from(raw),
                });
            }
            if continue_after.is_some() || !more || got == 0 {
                break;
            }
        }
        Ok(Listing {
            revision,
            items,
            continue_after,
        })
    }

    async fn create(&self, key: &str, mut object: Value) -> Result<Stored, StorageError> {
        let text = stored_text(&mut object)?;
        let full = self.full(key);
        let txn = Txn::new()
            .when([Compare::mod_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(full.clone(), text.clone(), None)])
            .or_else([TxnOp::get(full, None)]);
        let (response, uncertain) = self.write_txn(txn).await?;
        let mut revision = revision_of(response.header());
        self.seen(revision);
        if !response.succeeded() {
            // An earlier attempt of this very write may have made it (the text holds the new
            // object's uid and creation time: nobody else wrote these bytes).
            match current_of(&response) {
                Some(kv)
                    if uncertain
                        && kv.value() == text.as_bytes()
                        && kv.create_revision() == kv.mod_revision() =>
                {
                    revision = kv.mod_revision() as u64;
                }
                _ => return Err(StorageError::AlreadyExists(key.to_string())),
            }
        }
        self.published(revision).await;
        stamp_revision(&mut object, revision);
        Ok(Stored {
            revision,
            object: Arc::new(object),
        })
    }

    async fn update(
        &self,
        key: &str,
        mut object: Value,
        expected: Option<u64>,
    ) -> Result<Stored, StorageError> {
        let text = stored_text(&mut object)?;
        let (revision, _) = self
            .guarded(
                key,
                expected,
                TxnOp::put(self.full(key), text.clone(), None),
                Some(&text),
            )
            .await?;
        self.published(revision).await;
        stamp_revision(&mut object, revision);
        Ok(Stored {
            revision,
            object: Arc::new(object),
        })
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<Stored, StorageError> {
        let (revision, previous) = self
            .guarded(
                key,
                expected,
                TxnOp::delete(
                    self.full(key),
                    Some(etcd_client::DeleteOptions::new().with_prev_key()),
                ),
                None,
            )
            .await?;
        let Some(previous) = previous else {
            // Only an earlier attempt's deletion, found in the window, succeeds without one.
            return self.deleted_at(key, revision);
        };
        self.published(revision).await;
        let mut last = stored_of(&previous, key)?;
        let mut object = (*last.object).clone();
        stamp_revision(&mut object, revision);
        last.revision = revision;
        last.object = Arc::new(object);
        Ok(last)
    }

    fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    async fn current_revision(&self) -> Result<u64, StorageError> {
        self.current().await
    }

    fn hub(&self) -> &WatchHub {
        &self.hub
    }

    fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One etcd watch event as the hub keeps it.
fn event_of(event: &etcd_client::Event, prefix_len: usize) -> Result<WatchEvent, StorageError> {
    let kv = event
        .kv()
        .ok_or_else(|| StorageError::Backend("a watch event without a key".into()))?;
    let key = text(kv.key(), "a watched key")?[prefix_len..].to_string();
    let revision = kv.mod_revision() as u64;
    let previous = match event.prev_kv() {
        Some(prev) => Some(Arc::from(with_revision(
            text(prev.value(), &key)?,
            prev.mod_revision() as u64,
        )?)),
        None => None,
    };
    let (event_type, object) = match event.event_type() {
        EtcdEventType::Put => {
            let kind = if kv.create_revision() == kv.mod_revision() {
                EventType::Added
            } else {
                EventType::Modified
            };
            (
                kind,
                Arc::from(with_revision(text(kv.value(), &key)?, revision)?),
            )
        }
        EtcdEventType::Delete => {
            // The last state, stamped with the deletion's revision.
            let prev = event.prev_kv().ok_or_else(|| {
                StorageError::Backend(format!("the deletion of {key} came without its last state"))
            })?;
            (
                EventType::Deleted,
                Arc::from(with_revision(text(prev.value(), &key)?, revision)?),
            )
        }
    };
    Ok(WatchEvent {
        revision,
        event_type,
        key,
        object,
        previous,
    })
}

/// Follows the prefix into the hub, resuming after broken connections.
struct Follower {
    client: Client,
    endpoints: String,
    prefix: String,
    hub: Arc<WatchHub>,
    seen: Arc<AtomicU64>,
    unavailable: Arc<Mutex<Option<String>>>,
    kept: Kept,
    stop: CancellationToken,
}

impl Follower {
    async fn run(self, mut after: u64) {
        let Follower {
            client,
            endpoints,
            prefix,
            hub,
            seen,
            unavailable,
            kept,
            stop,
        } = self;
        let prefix_len = prefix.len() - 1;
        // A watch that stayed up a minute starts the waits from the beginning again.
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
        let set = |why: Option<String>| {
            *unavailable.lock().unwrap_or_else(|e| e.into_inner()) =
                why.map(|why| format!("etcd at {endpoints} is unavailable: {why}"));
        };
        loop {
            let started = std::time::Instant::now();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(after as i64 + 1)
                .with_prev_key()
                .with_progress_notify();
            let mut watcher = client.watch_client();
            let watched = tokio::select! {
                _ = stop.cancelled() => return,
                w = watcher.watch(prefix.clone(), Some(options)) => w,
            };
            let mut stream = match watched {
                Ok(stream) => stream,
                Err(e) => {
                    set(Some(failed(e).to_string()));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next(started)) => {}
                    }
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = stream.message() => m,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        set(Some("etcd closed the watch".into()));
                        break;
                    }
                    Err(e) => {
                        set(Some(failed(e).to_string()));
                        break;
                    }
                };
                if response.compact_revision() > 0 {
                    // Compacted past what this server published: nothing can be resumed.
                    let now =
                        revision_of(response.header()).max(response.compact_revision() as u64);
                    tracing::warn!(
                        after,
                        compacted = response.compact_revision(),
                        "etcd compacted changes this server had not seen: every watch relists"
                    );
                    let again = read_kept(&client, &prefix[..prefix_len], now).await.ok();
                    *kept.lock().unwrap_or_else(|e| e.into_inner()) = again;
                    hub.reset(now);
                    seen.fetch_max(now, Ordering::AcqRel);
                    after = now;
                    break;
                }
                if response.canceled() {
                    set(Some(format!(
                        "etcd cancelled the watch: {}",
                        response.cancel_reason()
                    )));
                    break;
                }
                set(None);
                let mut events = Vec::with_capacity(response.events().len());
                for event in response.events() {
                    match event_of(event, prefix_len) {
                        Ok(e) if e.revision > after => events.push(e),
                        Ok(_) => {}
                        Err(e) => tracing::error!("skipping an etcd watch event: {e}"),
                    }
                }
                if let Some(last) = events.last() {
                    after = last.revision;
                    seen.fetch_max(after, Ordering::AcqRel);
                    keep(&kept, &events);
                    hub.publish(events);
                } else if !response.created() && response.events().is_empty() {
                    // A progress notification: every change up to its revision has been sent.
                    let progress = revision_of(response.header());
                    if progress > after {
                        after = progress;
                        seen.fetch_max(progress, Ordering::AcqRel);
                        hub.advance(progress);
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next(started)) => {}
            }
        }
    }
}

/// A stored value as the object it holds, stamped with its mod revision.
fn stored_of(kv: &KeyValue, key: &str) -> Result<Stored, StorageError> {
    let revision = kv.mod_revision() as u64;
    let mut object: Value = serde_json::from_slice(kv.value())
        .map_err(|e| StorageError::Backend(format!("corrupt object {key}: {e}")))?;
    stamp_revision(&mut object, revision);
    Ok(Stored {
        revision,
        object: Arc::new(object),
    })
}

/// The objects under [`KEPT_PREFIX`] at `revision`.
async fn read_kept(
    client: &Client,
    prefix: &str,
    revision: u64,
) -> Result<HashMap<String, Stored>, etcd_client::Error> {
    let mut kv = client.kv_client();
    let response = kv
        .get(
            format!("{prefix}{KEPT_PREFIX}"),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_revision(revision as i64),
            ),
        )
        .await?;
    let mut kept = HashMap::new();
    for kv in response.kvs() {
        let Ok(full) = std::str::from_utf8(kv.key()) else {
            continue;
        };
        let key = &full[prefix.len()..];
        match stored_of(kv, key) {
            Ok(stored) => {
                kept.insert(key.to_string(), stored);
            }
            Err(e) => tracing::error!("{e}; skipping it"),
        }
    }
    Ok(kept)
}

/// Brings the kept copies up to date with published `events`.
fn keep(kept: &Kept, events: &[WatchEvent]) {
    if !events.iter().any(|e| e.key.starts_with(KEPT_PREFIX)) {
        return;
    }
    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
    let Some(kept) = kept.as_mut() else {
        return;
    };
    for event in events.iter().filter(|e| e.key.starts_with(KEPT_PREFIX)) {
        if event.event_type == EventType::Deleted {
            kept.remove(&event.key);
            continue;
        }
        match serde_json::from_str::<Value>(&event.object) {
            Ok(object) => {
                kept.insert(
                    event.key.clone(),
                    Stored {
                        revision: event.revision,
                        object: Arc::new(object),
                    },
                );
            }
            Err(e) => {
                tracing::error!("skipping the corrupt object {}: {e}", event.key);
                kept.remove(&event.key);
            }
        }
    }
}

/// Upstream's compactor: every interval, whoever wins the compare-and-swap on [`COMPACT_KEY`]
/// compacts to the revision seen one interval earlier.
async fn compact(client: Client, every: Duration, stop: CancellationToken) {
    let mut version: i64 = 0;
    let mut last_seen: i64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let txn = Txn::new()
            .when([Compare::version(COMPACT_KEY, CompareOp::Equal, version)])
            .and_then([TxnOp::put(COMPACT_KEY, last_seen.to_string(), None)])
            .or_else([TxnOp::get(COMPACT_KEY, None)]);
        let response = match client.kv_client().txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("compaction skipped: {}", failed(e));
                continue;
            }
        };
        let now = revision_of(response.header()) as i64;
        if !response.succeeded() {
            // Another server compacts this interval; follow its count.
            if let Some(TxnOpResponse::Get(get)) = response.op_responses().first() {
                version = get.kvs().first().map_or(0, KeyValue::version);
            }
            last_seen = now;
            continue;
        }
        version += 1;
        if last_seen > 0 {
            match client.kv_client().compact(last_seen, None).await {
                Ok(_) => tracing::debug!(revision = last_seen, "compacted etcd"),
                Err(e) => {
                    let e = failed(e);
                    if !matches!(e, StorageError::Expired { .. }) {
                        tracing::warn!("compacting etcd to {last_seen} failed: {e}");
                    }
                }
            }
        }
        last_seen = now;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A real etcd (Debian's etcd-server) on loopback ports, in its own directory.
    pub(crate) struct TestEtcd {
        pub url: String,
        peer: String,
        dir: tempfile::TempDir,
        child: Option<std::process::Child>,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl TestEtcd {
        pub(crate) async fn start() -> TestEtcd {
            let binary = std::env::var("EDGESITE_ETCD").unwrap_or_else(|_| "etcd".into());
            let dir = tempfile::tempdir().unwrap();
            let mut etcd = TestEtcd {
                url: format!("http://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                dir,
                child: None,
            };
            etcd.spawn(&binary);
            // Answering: a store opens.
            drop(etcd.open("/registry").await);
            etcd
        }

        fn spawn(&mut self, binary: &str) {
            let child = std::process::Command::new(binary)
                .args(["--name", "test", "--data-dir"])
                .arg(self.dir.path().join("data"))
                .args(["--listen-client-urls", &self.url])
                .args(["--advertise-client-urls", &self.url])
                .args(["--listen-peer-urls", &self.peer])
                .args(["--initial-advertise-peer-urls", &self.peer])
                .args(["--initial-cluster", &format!("test={}", self.peer)])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(self.dir.path().join("etcd.log")).unwrap())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start etcd ({binary}): {e}; install Debian's etcd-server (tests/run.sh does)")
                });
            self.child = Some(child);
        }

        pub(crate) async fn open(&self, prefix: &str) -> EtcdStorage {
            let mut config = EtcdConfig::new(vec![self.url.clone()]);
            config.prefix = prefix.into();
            self.open_with(config).await
        }

        pub(crate) async fn open_with(&self, config: EtcdConfig) -> EtcdStorage {
            for _ in 0..100 {
                if let Ok(store) = EtcdStorage::open(&config, 1000).await {
                    return store;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("etcd at {} did not start", self.url);
        }

        pub(crate) fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        pub(crate) fn restart(&mut self) {
            self.kill();
            let binary = std::env::var("EDGESITE_ETCD").unwrap_or_else(|_| "etcd".into());
            self.spawn(&binary);
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}})
    }

    #[tokio::test]
    async fn writes_are_guarded_by_mod_revisions_and_lists_read_one_revision() {
        let etcd = TestEtcd::start().await;
        let store = etcd.open("/site-a").await;
        let a = store
            .create("/core/configmaps/default/a", cm("a"))
            .await
            .unwrap();
        assert_eq!(
            a.object["metadata"]["resourceVersion"],
            a.revision.to_string()
        );
        let got = store
            .get("/core/configmaps/default/a")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.revision, a.revision);
        assert_eq!(
            got.object["metadata"]["resourceVersion"],
            a.revision.to_string()
        );
        assert!(matches!(
            store.create("/core/configmaps/default/a", cm("a")).await,
            Err(StorageError::AlreadyExists(_))
        ));
        assert!(matches!(
            store
                .update("/core/configmaps/default/a", cm("a"), Some(a.revision + 100))
                .await,
            Err(StorageError::Conflict { found, .. }) if found == a.revision
        ));
        assert!(matches!(
            store
                .update("/core/configmaps/default/nope", cm("nope"), None)
                .await,
            Err(StorageError::NotFound(_))
        ));
        let b = store
            .update("/core/configmaps/default/a", cm("a"), Some(a.revision))
            .await
            .unwrap();
        assert!(b.revision > a.revision);
        for name in ["b", "c", "d", "e"] {
            store
                .create(&format!("/core/configmaps/default/{name}"), cm(name))
                .await
                .unwrap();
        }
        store
            .create("/core/configmaps/other/z", cm("z"))
            .await
            .unwrap();
        // Another site's prefix on the same etcd holds its own objects.
        let other = etcd.open("/site-b").await;
        other
            .create("/core/configmaps/default/x", cm("x"))
            .await
            .unwrap();
        let all = store.list("/core/configmaps/", None, None).await.unwrap();
        assert_eq!(all.items.len(), 6);
        assert!(
            all.items
                .iter()
                .all(|i| i.key.starts_with("/core/configmaps/"))
        );
        // Pages of two, read at the first page's revision: a create after it is not seen.
        let first = store
            .list("/core/configmaps/default/", None, Some(2))
            .await
            .unwrap();
        assert_eq!(first.items.len(), 2);
        let after = first.continue_after.clone().unwrap();
        store
            .create("/core/configmaps/default/bb", cm("bb"))
            .await
            .unwrap();
        let rest = store
            .list_at(
                "/core/configmaps/default/",
                Some(&after),
                None,
                Some(first.revision),
            )
            .await
            .unwrap();
        let names: Vec<_> = rest.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            names,
            [
                "/core/configmaps/default/c",
                "/core/configmaps/default/d",
                "/core/configmaps/default/e"
            ]
        );
        assert_eq!(rest.revision, first.revision);
        for item in &rest.items {
            let value = item.value().unwrap();
            assert_eq!(
                value["metadata"]["resourceVersion"],
                item.revision.to_string()
            );
        }
        let gone = store
            .delete("/core/configmaps/default/a", Some(b.revision))
            .await
            .unwrap();
        assert!(gone.revision > b.revision);
        assert_eq!(
            gone.object["metadata"]["resourceVersion"],
            gone.revision.to_string()
        );
        assert!(matches!(
            store.delete("/core/configmaps/default/a", None).await,
            Err(StorageError::NotFound(_))
        ));
        assert!(store.revision() >= gone.revision);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_server_sees_every_write_in_order_and_resumes_after_etcd_restarts() {
        let mut etcd = TestEtcd::start().await;
        let one = etcd.open("/registry").await;
        let two = etcd.open("/registry").await;
        let mut cursor = one.hub().cursor(None).unwrap();
        let made = two
            .create("/core/configmaps/default/a", cm("a"))
            .await
            .unwrap();
        two.update("/core/configmaps/default/a", cm("a"), None)
            .await
            .unwrap();
        two.delete("/core/configmaps/default/a", None)
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let events = tokio::time::timeout(Duration::from_secs(10), cursor.next(one.hub(), 10))
                .await
                .expect("the other server's writes arrive")
                .unwrap();
            seen.extend(events);
        }
        let kinds: Vec<_> = seen.iter().map(|e| e.event_type).collect();
        assert_eq!(
            kinds,
            [EventType::Added, EventType::Modified, EventType::Deleted]
        );
        assert_eq!(seen[0].revision, made.revision);
        assert!(seen.windows(2).all(|w| w[0].revision < w[1].revision));
        let deleted: Value = serde_json::from_str(&seen[2].object).unwrap();
        assert_eq!(
            deleted["metadata"]["resourceVersion"],
            seen[2].revision.to_string()
        );
        assert!(seen[2].previous.is_some());

        // etcd goes away: requests fail with a clear error and the store says why.
        etcd.kill();
        let err = one
            .create("/core/configmaps/default/b", cm("b"))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Unavailable(_)), "{err:?}");
        assert!(one.unavailable().is_some());
        // It comes back: a write through the other server reaches this one's watchers.
        etcd.restart();
        let mut written = None;
        for _ in 0..100 {
            if let Ok(s) = two.create("/core/configmaps/default/c", cm("c")).await {
                written = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let written = written.expect("etcd answers again");
        let events = tokio::time::timeout(Duration::from_secs(20), cursor.next(one.hub(), 10))
            .await
            .expect("the watch resumes")
            .unwrap();
        assert_eq!(events[0].revision, written.revision);
        assert_eq!(events[0].key, "/core/configmaps/default/c");
        one.get("/core/configmaps/default/c").await.unwrap();
        assert!(one.unavailable().is_none());
    }

    #[tokio::test]
    async fn a_write_whose_answer_was_lost_is_not_refused_when_sent_again() {
        let etcd = TestEtcd::start().await;
        let store = etcd.open("/site-lost").await;
        let lose_next = || store.lose_answers.store(1, Ordering::Release);
        let key = "/core/configmaps/default/lost";

        // Each write commits, its answer is lost, and it is sent again: the second attempt's
        // guard fails because the first made it, and that is taken as the success it was.
        lose_next();
        let created = store.create(key, cm("lost")).await.unwrap();
        assert_eq!(
            store.get(key).await.unwrap().unwrap().revision,
            created.revision
        );

        let mut changed = cm("lost");
        changed["data"] = json!({"k": "v"});
        lose_next();
        let updated = store
            .update(key, changed, Some(created.revision))
            .await
            .unwrap();
        assert!(updated.revision > created.revision);
        assert_eq!(updated.object["data"]["k"], "v");

        lose_next();
        let deleted = store.delete(key, Some(updated.revision)).await.unwrap();
        assert!(deleted.revision > updated.revision);
        assert_eq!(deleted.object["data"]["k"], "v");
        assert_eq!(
            deleted.object["metadata"]["resourceVersion"],
            deleted.revision.to_string()
        );
        assert!(store.get(key).await.unwrap().is_none());
        assert_eq!(store.lose_answers.load(Ordering::Acquire), 0);

        // Somebody else's write in between is still refused: the version sent again finds
        // the other's version, not its own.
        let again = store.create(key, cm("lost")).await.unwrap();
        let mut other = cm("lost");
        other["data"] = json!({"by": "somebody else"});
        let theirs = store
            .update(key, other, Some(again.revision))
            .await
            .unwrap();
        lose_next();
        assert!(matches!(
            store.update(key, cm("lost"), Some(again.revision)).await,
            Err(StorageError::Conflict { .. })
        ));
        lose_next();
        assert!(matches!(
            store.delete(key, Some(again.revision)).await,
            Err(StorageError::Conflict { .. })
        ));
        // ... and a deletion of a version that somebody else's deletion removed is not found.
        store.delete(key, Some(theirs.revision)).await.unwrap();
        lose_next();
        assert!(matches!(
            store.delete(key, Some(again.revision)).await,
            Err(StorageError::NotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_server_keeps_the_namespaces_its_watch_has_published() {
        let etcd = TestEtcd::start().await;
        let one = etcd.open("/registry").await;
        let ns = |name: &str| json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": name}});
        one.create("/core/namespaces/before", ns("before"))
            .await
            .unwrap();
        // A server that starts later reads what is there; its watch brings the rest.
        let two = etcd.open("/registry").await;
        let kept = two.get_recent("/core/namespaces/before").await.unwrap();
        assert_eq!(kept.unwrap().object["metadata"]["name"], "before");
        let made = one
            .create("/core/namespaces/after", ns("after"))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), two.hub().wait_for(made.revision))
            .await
            .expect("the watch publishes the create");
        let kept = two
            .get_recent("/core/namespaces/after")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept.revision, made.revision);
        assert_eq!(
            kept.object["metadata"]["resourceVersion"],
            made.revision.to_string()
        );
        // Marked for deletion, then gone: the copy follows, nothing read from etcd.
        let mut terminating = ns("after");
        terminating["metadata"]["deletionTimestamp"] = json!("2026-12-06T00:00:00Z");
        let marked = one
            .update("/core/namespaces/after", terminating, Some(made.revision))
            .await
            .unwrap();
        let gone = one.delete("/core/namespaces/after", None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), two.hub().wait_for(gone.revision))
            .await
            .expect("the watch publishes the delete");
        assert!(marked.revision < gone.revision);
        assert!(
            two.get_recent("/core/namespaces/after")
                .await
                .unwrap()
                .is_none()
        );
        // Other keys are still read from etcd.
        one.create("/core/configmaps/before/a", cm("a"))
            .await
            .unwrap();
        assert!(
            two.get_recent("/core/configmaps/before/a")
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_is_shared_and_an_old_revision_expires() {
        let etcd = TestEtcd::start().await;
        let mut config = EtcdConfig::new(vec![etcd.url.clone()]);
        config.compact_every = Duration::from_millis(300);
        let one = etcd.open_with(config.clone()).await;
        let _two = etcd.open_with(config).await;
        let first = one
            .create("/core/configmaps/default/a", cm("a"))
            .await
            .unwrap();
        for i in 0..5 {
            one.update("/core/configmaps/default/a", cm("a"), None)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = i;
        }
        let mut expired = false;
        for _ in 0..50 {
            match one
                .list_at("/core/configmaps/", None, None, Some(first.revision))
                .await
            {
                Err(StorageError::Expired { .. }) => {
                    expired = true;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(expired, "a compacted revision answers Expired");
        // The current state is intact.
        assert!(
            one.get("/core/configmaps/default/a")
                .await
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn the_version_goes_into_the_stored_text_in_go_order() {
        let stored = r#"{"apiVersion":"v1","data":{"a":"<b>"},"kind":"ConfigMap","metadata":{"name":"x","namespace":"default","uid":"u"}}"#;
        let text = with_revision(stored, 42).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"ConfigMap","apiVersion":"v1","data":{"a":"<b>"},"metadata":{"name":"x","namespace":"default","resourceVersion":"42","uid":"u"}}"#
        );
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["metadata"]["resourceVersion"], "42");
        assert!(with_revision("[1]", 1).is_err());
        // The borrowing splice and the rebuild agree, and the rebuild takes what the splice
        // cannot: escaped member names, no metadata, an empty object.
        for stored in [
            stored,
            r#"{"metadata":{}}"#,
            r#"{"kind":"X","metadata":{"resourceVersion":"1","a":[{"b":"c"}]},"spec":{"q\"":1}}"#,
            r#"{"kind":"X","we\"ird":1,"metadata":{"name":"n"}}"#,
            r#"{"kind":"X","spec":{}}"#,
            r#"{}"#,
        ] {
            let expected = rebuilt(stored, 9).unwrap();
            assert_eq!(with_revision(stored, 9).unwrap(), expected, "{stored}");
            if let Some(text) = spliced(stored, 9) {
                assert_eq!(text, expected, "{stored}");
            }
        }
        assert!(spliced(r#"{"kind":"X","we\"ird":1,"metadata":{}}"#, 9).is_none());
    }

    #[test]
    fn the_stored_text_has_no_version() {
        let mut object =
            json!({"kind": "ConfigMap", "metadata": {"name": "x", "resourceVersion": "7"}});
        let text = stored_text(&mut object).unwrap();
        assert!(!text.contains("resourceVersion"), "{text}");
        assert_eq!(text, r#"{"kind":"ConfigMap","metadata":{"name":"x"}}"#);
    }
}
