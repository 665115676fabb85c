//! The SQLite backend: current state in one table, WAL mode, one writer thread with group commit.
//!
//! Writers send operations over a bounded channel to a dedicated thread. The thread takes every
//! operation that is already waiting (up to [`MAX_BATCH`]), applies them in one transaction, commits
//! with `synchronous=FULL` (so an acknowledged write survives `kill -9` and power loss), publishes
//! the events, and only then answers each caller. Concurrent writers therefore share one fsync
//! instead of queueing for one each, and SQLite never sees two writers ("database is locked").
//!
//! Reads use a small pool of read-only connections on blocking threads; WAL lets them run beside
//! the writer and gives each list a consistent snapshot.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::watch::{EventType, WatchEvent, WatchHub};
use super::{Listing, RawObject, Storage, StorageError, Stored, stamp_revision};

/// The most operations one transaction takes.
const MAX_BATCH: usize = 512;
/// Writers waiting for the writer thread; callers beyond it wait for a place (backpressure).
const QUEUE: usize = 4096;
/// Read connections open at once.
const READERS: usize = 4;

enum Op {
    Create,
    Update(Option<u64>),
    Delete(Option<u64>),
}

struct WriteRequest {
    key: String,
    op: Op,
    object: Option<Value>,
    reply: oneshot::Sender<Result<Stored, StorageError>>,
}

pub struct SqliteStorage {
    path: PathBuf,
    writer: mpsc::Sender<WriteRequest>,
    revision: Arc<AtomicU64>,
    hub: Arc<WatchHub>,
    readers: Arc<Mutex<Vec<Connection>>>,
    reader_slots: Arc<Semaphore>,
    /// Set by the first operation that finds the file damaged.
    damaged: Arc<Mutex<Option<String>>>,
}

/// A backend failure; SQLite's own codes for a damaged file become [`StorageError::Damaged`],
/// and so does a stored value that is not UTF-8 text (the server writes only JSON text: such a
/// value is a page damaged where SQLite's own checks do not look).
fn backend<E: std::fmt::Display + 'static>(e: E) -> StorageError {
    let error = (&e as &dyn std::any::Any).downcast_ref::<rusqlite::Error>();
    if let Some(
        rusqlite::Error::Utf8Error(..)
        | rusqlite::Error::FromSqlConversionFailure(_, rusqlite::types::Type::Text, _),
    ) = error
    {
        return StorageError::Damaged(format!("a stored value is not text: {e}"));
    }
    let code = error.and_then(rusqlite::Error::sqlite_error_code);
    match code {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StorageError::Damaged(e.to_string())
        }
        _ => StorageError::Backend(e.to_string()),
    }
}

/// The database file and SQLite's companions (`-wal`, `-shm`, which SQLite creates with the
/// database file's mode).
fn files(path: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    [path.to_path_buf(), with("-wal"), with("-shm")]
}

/// Creates the database file readable by its owner only, and takes other users' access away from
/// an existing one: it holds every Secret.
fn make_private(path: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StorageError::Backend(format!("open {}: {e}", path.display())))?;
    for file in files(path) {
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StorageError::Backend(format!(
                    "restrict {}: {e}",
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

/// What a datastore file holds before the server opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// No file, an empty file, or no objects: a cluster that has never started here.
    Nothing,
    /// Objects of a cluster.
    Cluster,
}

/// Looks at the file at `path` without creating or changing it.
pub fn inspect(path: &Path) -> Result<Contents, StorageError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Contents::Nothing),
        Err(e) => return Err(StorageError::Backend(format!("{}: {e}", path.display()))),
        Ok(m) if m.len() == 0 => return Ok(Contents::Nothing),
        Ok(_) => {}
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(backend)?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'objects'",
            [],
            |r| r.get(0),
        )
        .map_err(backend)?;
    if tables == 0 {
        return Ok(Contents::Nothing);
    }
    let any: Option<i64> = conn
        .query_row("SELECT 1 FROM objects LIMIT 1", [], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    Ok(if any.is_some() {
        Contents::Cluster
    } else {
        Contents::Nothing
    })
}

/// What a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    pub objects: u64,
    pub revision: u64,
    pub bytes: u64,
}

/// Copies the datastore at `path` to `to` while a server may be writing it: SQLite's online
/// backup in one step, so the copy is one consistent read of the store (a WAL reader never blocks
/// the writer). The copy is written beside `to` first, checked (`quick_check`, objects and
/// revision readable), made private and only then moved to `to`.
pub fn backup(path: &Path, to: &Path) -> Result<BackupSummary, StorageError> {
    if !path.exists() {
        return Err(StorageError::Backend(format!(
            "no datastore at {}",
            path.display()
        )));
    }
    let source = open_reader(path)?;
    let partial = to.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let result = (|| {
        let mut copy = Connection::open(&partial).map_err(backend)?;
        make_private(&partial)?;
        {
            use rusqlite::backup::StepResult;
            let run = rusqlite::backup::Backup::new(&source, &mut copy).map_err(backend)?;
            // Every page in one step: one read of one revision.
            let mut tries = 0;
            loop {
                match run.step(-1).map_err(backend)? {
                    StepResult::Done => break,
                    StepResult::More => {}
                    StepResult::Busy | StepResult::Locked if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    other => {
                        return Err(StorageError::Backend(format!(
                            "the datastore stayed busy: {other:?}"
                        )));
                    }
                }
            }
        }
        check_integrity(&copy)?;
        let objects: i64 = copy
            .query_row("SELECT count(*) FROM objects", [], |r| r.get(0))
            .map_err(backend)?;
        let revision: i64 = copy
            .query_row("SELECT value FROM meta WHERE name = 'revision'", [], |r| {
                r.get(0)
            })
            .map_err(backend)?;
        // One self-contained file: no WAL beside it.
        copy.execute_batch("PRAGMA journal_mode=DELETE;")
            .map_err(backend)?;
        drop(copy);
        std::fs::rename(&partial, to).map_err(backend)?;
        let bytes = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
        Ok(BackupSummary {
            objects: objects as u64,
            revision: revision as u64,
            bytes,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// SQLite's `quick_check`: the file's structure (pages, b-trees, records), without the slower
/// index cross-checks of `integrity_check`.
fn check_integrity(conn: &Connection) -> Result<(), StorageError> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)").map_err(backend)?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(StorageError::Damaged(problems.join("; ")))
}

fn open_writer(path: &Path) -> Result<Connection, StorageError> {
    make_private(path)?;
    let conn = Connection::open(path).map_err(backend)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=FULL;
         PRAGMA busy_timeout=10000;
         CREATE TABLE IF NOT EXISTS objects (
             key TEXT PRIMARY KEY NOT NULL,
             revision INTEGER NOT NULL,
             value TEXT NOT NULL
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS meta (
             name TEXT PRIMARY KEY NOT NULL,
             value INTEGER NOT NULL
         );
         INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);",
    )
    .map_err(backend)?;
    check_integrity(&conn)?;
    // The WAL and shared-memory files exist now: make sure they are private too (an older
    // version, or a copied file, may have left them readable).
    make_private(path)?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(backend)?;
    conn.execute_batch("PRAGMA busy_timeout=10000;")
        .map_err(backend)?;
    Ok(conn)
}

/// A stored object; one that is not JSON was damaged on disk (the server writes only JSON).
fn parse(text: &str) -> Result<Value, StorageError> {
    serde_json::from_str(text)
        .map_err(|e| StorageError::Damaged(format!("a stored object is not JSON: {e}")))
}

impl SqliteStorage {
    /// Opens (creating if needed) the database at `path` and starts the writer thread.
    pub fn open(path: &Path, watch_window: usize) -> Result<Self, StorageError> {
        let conn = open_writer(path)?;
        let current: u64 = conn
            .query_row("SELECT value FROM meta WHERE name = 'revision'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(backend)? as u64;
        let revision = Arc::new(AtomicU64::new(current));
        let hub = Arc::new(WatchHub::new(current, watch_window));
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_revision = revision.clone();
        let writer_hub = hub.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_revision, writer_hub))
            .map_err(backend)?;
        Ok(SqliteStorage {
            path: path.to_path_buf(),
            writer: tx,
            revision,
            hub,
            readers: Arc::new(Mutex::new(Vec::new())),
            reader_slots: Arc::new(Semaphore::new(READERS)),
            damaged: Arc::new(Mutex::new(None)),
        })
    }

    /// Remembers (and logs, once) that the file is damaged.
    fn noticed<T>(&self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(StorageError::Damaged(why)) = &result {
            let mut damaged = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
            if damaged.is_none() {
                tracing::error!(
                    path = %self.path.display(),
                    "the datastore is damaged: {why}; the server reports itself not ready. Stop it and restore the file from a backup"
                );
                *damaged = Some(why.clone());
            }
        }
        result
    }

    async fn write(
        &self,
        key: &str,
        op: Op,
        object: Option<Value>,
    ) -> Result<Stored, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteRequest {
                key: key.to_string(),
                op,
                object,
                reply,
            })
            .await
            .map_err(|_| StorageError::Closed)?;
        self.noticed(answer.await.map_err(|_| StorageError::Closed)?)
    }

    /// Runs `f` on a pooled read connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
    {
        let _slot = self
            .reader_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Closed)?;
        let readers = self.readers.clone();
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let result = f(&conn);
            readers.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
            result
        })
        .await
        .map_err(backend)?;
        self.noticed(result)
    }
}

#[async_trait::async_trait]
impl Storage for SqliteStorage {
    async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        let key = key.to_string();
        self.read(move |conn| {
            let row: Option<(i64, String)> = conn
                .prepare_cached("SELECT revision, value FROM objects WHERE key = ?1")
                .map_err(backend)?
                .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(backend)?;
            match row {
                None => Ok(None),
                Some((revision, text)) => Ok(Some(Stored {
                    revision: revision as u64,
                    object: Arc::new(parse(&text)?),
                })),
            }
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Listing, StorageError> {
        let prefix = prefix.to_string();
        let start_after = start_after.map(str::to_string);
        self.read(move |conn| {
            // Keys are ASCII and prefixes end in '/', so '0' (the next byte) bounds the range.
            let upper = format!("{}0", &prefix[..prefix.len() - 1]);
            let lower = start_after.unwrap_or_else(|| prefix.clone());
            let fetch = limit.map(|l| l as i64 + 1).unwrap_or(-1);
            let tx = conn.unchecked_transaction().map_err(backend)?;
            let revision: i64 = tx
                .query_row("SELECT value FROM meta WHERE name = 'revision'", [], |r| {
                    r.get(0)
                })
                .map_err(backend)?;
            let mut items = Vec::new();
            let mut last_key = None;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT key, revision, value FROM objects
                         WHERE key > ?1 AND key < ?2 ORDER BY key LIMIT ?3",
                    )
                    .map_err(backend)?;
                let mut rows = stmt.query(params![lower, upper, fetch]).map_err(backend)?;
                let mut more = false;
                while let Some(row) = rows.next().map_err(backend)? {
                    if let Some(l) = limit
                        && items.len() == l
                    {
                        more = true;
                        break;
                    }
                    let key: String = row.get(0).map_err(backend)?;
                    let rev: i64 = row.get(1).map_err(backend)?;
                    let text: String = row.get(2).map_err(backend)?;
                    items.push(RawObject {
                        key: key.clone(),
                        revision: rev as u64,
                        raw: Arc::from(text),
                    });
                    last_key = Some(key);
                }
                if !more {
                    last_key = None;
                }
            }
            tx.finish().map_err(backend)?;
            Ok(Listing {
                revision: revision as u64,
                items,
                continue_after: last_key,
            })
        })
        .await
    }

    async fn create(&self, key: &str, object: Value) -> Result<Stored, StorageError> {
        self.write(key, Op::Create, Some(object)).await
    }

    async fn update(
        &self,
        key: &str,
        object: Value,
        expected: Option<u64>,
    ) -> Result<Stored, StorageError> {
        self.write(key, Op::Update(expected), Some(object)).await
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<Stored, StorageError> {
        self.write(key, Op::Delete(expected), None).await
    }

    fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    fn hub(&self) -> &WatchHub {
        &self.hub
    }

    fn damaged(&self) -> Option<String> {
        self.damaged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The outcome of one operation inside a batch, before the commit decides its fate.
struct Applied {
    reply: oneshot::Sender<Result<Stored, StorageError>>,
    result: Result<(Stored, WatchEvent), StorageError>,
}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<WriteRequest>,
    revision: Arc<AtomicU64>,
    hub: Arc<WatchHub>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let start = revision.load(Ordering::Acquire);
        let (applied, end) = match apply_batch(&mut conn, batch.drain(..), start) {
            Ok(done) => done,
            Err((requests, e)) => {
                tracing::error!(error = %e, "storage transaction failed");
                for reply in requests {
                    let _ = reply.send(Err(e.clone()));
                }
                continue;
            }
        };
        revision.store(end, Ordering::Release);
        let mut events = Vec::with_capacity(applied.len());
        let mut replies = Vec::with_capacity(applied.len());
        for a in applied {
            match a.result {
                Ok((stored, event)) => {
                    events.push(event);
                    replies.push((a.reply, Ok(stored)));
                }
                Err(e) => replies.push((a.reply, Err(e))),
            }
        }
        hub.publish(events);
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }
}

type BatchFailure = (
    Vec<oneshot::Sender<Result<Stored, StorageError>>>,
    StorageError,
);

fn apply_batch(
    conn: &mut Connection,
    requests: impl Iterator<Item = WriteRequest>,
    start: u64,
) -> Result<(Vec<Applied>, u64), BatchFailure> {
    let requests: Vec<WriteRequest> = requests.collect();
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return Err((requests.into_iter().map(|r| r.reply).collect(), backend(e))),
    };
    let mut next = start;
    let mut applied = Vec::with_capacity(requests.len());
    let mut failure = None;
    for request in requests {
        if failure.is_some() {
            applied.push(Applied {
                reply: request.reply,
                result: Err(StorageError::Closed),
            });
            continue;
        }
        match apply_one(&tx, &request.key, request.op, request.object, next + 1) {
            Ok(Ok(done)) => {
                next += 1;
                applied.push(Applied {
                    reply: request.reply,
                    result: Ok(done),
                });
            }
            Ok(Err(refused)) => applied.push(Applied {
                reply: request.reply,
                result: Err(refused),
            }),
            Err(e) => {
                failure = Some(e);
                applied.push(Applied {
                    reply: request.reply,
                    result: Err(StorageError::Closed),
                });
            }
        }
    }
    let commit = match failure {
        Some(e) => Err(e),
        None => tx
            .execute(
                "UPDATE meta SET value = ?1 WHERE name = 'revision'",
                params![next as i64],
            )
            .and_then(|_| tx.commit())
            .map_err(backend),
    };
    match commit {
        Ok(()) => Ok((applied, next)),
        Err(e) => Err((applied.into_iter().map(|a| a.reply).collect(), e)),
    }
}

/// Applies one operation inside the open transaction. The outer error aborts the batch; the inner
/// one refuses only this operation (a failed precondition).
#[allow(clippy::type_complexity)]
fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    key: &str,
    op: Op,
    object: Option<Value>,
    revision: u64,
) -> Result<Result<(Stored, WatchEvent), StorageError>, StorageError> {
    let current: Option<(i64, String)> = tx
        .prepare_cached("SELECT revision, value FROM objects WHERE key = ?1")
        .map_err(backend)?
        .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(backend)?;
    let check = |expected: Option<u64>, found: u64| match expected {
        Some(expected) if expected != found => Err(StorageError::Conflict {
            key: key.to_string(),
            expected,
            found,
        }),
        _ => Ok(()),
    };
    match op {
        Op::Create => {
            if current.is_some() {
                return Ok(Err(StorageError::AlreadyExists(key.to_string())));
            }
            let mut object = object.unwrap_or(Value::Null);
            stamp_revision(&mut object, revision);
            let text = crate::go_json::to_string(&object);
            if let Err(e) = super::check_size(&text) {
                return Ok(Err(e));
            }
            tx.prepare_cached("INSERT INTO objects (key, revision, value) VALUES (?1, ?2, ?3)")
                .map_err(backend)?
                .execute(params![key, revision as i64, text])
                .map_err(backend)?;
            Ok(Ok((
                Stored {
                    revision,
                    object: Arc::new(object),
                },
                WatchEvent {
                    revision,
                    event_type: EventType::Added,
                    key: key.to_string(),
                    object: Arc::from(text),
                    previous: None,
                },
            )))
        }
        Op::Update(expected) => {
            let Some((found, old)) = current else {
                return Ok(Err(StorageError::NotFound(key.to_string())));
            };
            if let Err(e) = check(expected, found as u64) {
                return Ok(Err(e));
            }
            let mut object = object.unwrap_or(Value::Null);
            stamp_revision(&mut object, revision);
            let text = crate::go_json::to_string(&object);
            if let Err(e) = super::check_size(&text) {
                return Ok(Err(e));
            }
            tx.prepare_cached("UPDATE objects SET revision = ?2, value = ?3 WHERE key = ?1")
                .map_err(backend)?
                .execute(params![key, revision as i64, text])
                .map_err(backend)?;
            Ok(Ok((
                Stored {
                    revision,
                    object: Arc::new(object),
                },
                WatchEvent {
                    revision,
                    event_type: EventType::Modified,
                    key: key.to_string(),
                    object: Arc::from(text),
                    previous: Some(Arc::from(old)),
                },
            )))
        }
        Op::Delete(expected) => {
            let Some((found, old)) = current else {
                return Ok(Err(StorageError::NotFound(key.to_string())));
            };
            if let Err(e) = check(expected, found as u64) {
                return Ok(Err(e));
            }
            tx.prepare_cached("DELETE FROM objects WHERE key = ?1")
                .map_err(backend)?
                .execute(params![key])
                .map_err(backend)?;
            let mut last = parse(&old)?;
            stamp_revision(&mut last, revision);
            let text = crate::go_json::to_string(&last);
            Ok(Ok((
                Stored {
                    revision,
                    object: Arc::new(last),
                },
                WatchEvent {
                    revision,
                    event_type: EventType::Deleted,
                    key: key.to_string(),
                    object: Arc::from(text),
                    previous: Some(Arc::from(old)),
                },
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}})
    }

    #[tokio::test]
    async fn create_update_delete_with_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStorage::open(&dir.path().join("state.db"), 100).unwrap();
        let a = store
            .create("/core/configmaps/default/a", cm("a"))
            .await
            .unwrap();
        assert_eq!(a.revision, 1);
        assert_eq!(a.object["metadata"]["resourceVersion"], "1");
        let dup = store.create("/core/configmaps/default/a", cm("a")).await;
        assert!(matches!(dup, Err(StorageError::AlreadyExists(_))));
        let stale = store
            .update("/core/configmaps/default/a", cm("a"), Some(7))
            .await;
        assert!(matches!(
            stale,
            Err(StorageError::Conflict { found: 1, .. })
        ));
        let b = store
            .update("/core/configmaps/default/a", cm("a"), Some(1))
            .await
            .unwrap();
        assert_eq!(b.revision, 2);
        store
            .create("/core/configmaps/other/z", cm("z"))
            .await
            .unwrap();
        let list = store
            .list("/core/configmaps/default/", None, None)
            .await
            .unwrap();
        assert_eq!(list.items.len(), 1);
        assert_eq!(list.revision, 3);
        let gone = store
            .delete("/core/configmaps/default/a", None)
            .await
            .unwrap();
        assert_eq!(gone.revision, 4);
        assert!(
            store
                .get("/core/configmaps/default/a")
                .await
                .unwrap()
                .is_none()
        );
        drop(store);
        let reopened = SqliteStorage::open(&dir.path().join("state.db"), 100).unwrap();
        assert_eq!(reopened.revision(), 4);
        let next = reopened
            .create("/core/configmaps/default/n", cm("n"))
            .await
            .unwrap();
        assert_eq!(next.revision, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_taken_during_writes_is_one_consistent_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Arc::new(SqliteStorage::open(&path, 100).unwrap());
        for i in 0..50 {
            store
                .create(&format!("/core/configmaps/default/before-{i}"), cm("x"))
                .await
                .unwrap();
        }
        // Writes go on while the copy is taken.
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    store
                        .create(&format!("/core/configmaps/default/during-{i}"), cm("x"))
                        .await
                        .unwrap();
                }
            })
        };
        let copy = dir.path().join("backup.db");
        let path2 = path.clone();
        let copy2 = copy.clone();
        let summary = tokio::task::spawn_blocking(move || backup(&path2, &copy2))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        // Consistent: the copy's revision counts exactly the objects it holds (one create
        // each), and everything from before is in it.
        assert!(summary.objects >= 50);
        assert_eq!(summary.revision, summary.objects);
        assert!(!dir.path().join("backup.partial").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Restored: a server opening the copy has every object and goes on from its revision.
        let restored = SqliteStorage::open(&copy, 100).unwrap();
        assert_eq!(restored.revision(), summary.revision);
        let listed = restored
            .list("/core/configmaps/default/", None, None)
            .await
            .unwrap();
        assert_eq!(listed.items.len() as u64, summary.objects);
        let next = restored
            .create("/core/configmaps/default/after", cm("x"))
            .await
            .unwrap();
        assert_eq!(next.revision, summary.revision + 1);
        // A backup of a stopped store works too; a missing store is refused.
        drop(store);
        assert_eq!(
            backup(&path, &dir.path().join("again.db")).unwrap().objects,
            250
        );
        let missing = backup(&dir.path().join("none.db"), &dir.path().join("x.db"));
        assert!(missing.unwrap_err().to_string().contains("no datastore"));
    }

    #[tokio::test]
    async fn list_pages_with_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStorage::open(&dir.path().join("state.db"), 100).unwrap();
        for i in 0..5 {
            store
                .create(
                    &format!("/core/configmaps/default/c{i}"),
                    cm(&format!("c{i}")),
                )
                .await
                .unwrap();
        }
        let page = store
            .list("/core/configmaps/", None, Some(2))
            .await
            .unwrap();
        assert_eq!(page.items.len(), 2);
        let after = page.continue_after.unwrap();
        let page2 = store
            .list("/core/configmaps/", Some(&after), Some(3))
            .await
            .unwrap();
        assert_eq!(page2.items.len(), 3);
        assert!(page2.continue_after.is_none());
    }

    #[tokio::test]
    async fn concurrent_writers_share_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStorage::open(&dir.path().join("state.db"), 100).unwrap());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .create(
                        &format!("/core/configmaps/default/c{i}"),
                        cm(&format!("c{i}")),
                    )
                    .await
                    .unwrap()
                    .revision
            }));
        }
        let mut revisions = Vec::new();
        for t in tasks {
            revisions.push(t.await.unwrap());
        }
        revisions.sort();
        revisions.dedup();
        assert_eq!(revisions.len(), 200);
        assert_eq!(store.revision(), 200);
    }
}
