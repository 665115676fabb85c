//! Cluster state storage: one trait, the SQLite backend, and the watch hub.
//!
//! Keys look like `/<group|core>/<resource>/<namespace>/<name>` (cluster-scoped objects omit the
//! namespace). Every successful write gets the next value of one global, monotonically increasing
//! revision, which is also the object's `metadata.resourceVersion`. A write is acknowledged only
//! after it is durable; committed changes are published to [`watch::WatchHub`] in revision order
//! before the writer answers, so a client that writes and then watches from the returned revision
//! never misses its own change.
//!
//! Start with [`Storage`]; the SQLite implementation is in [`sqlite`], the etcd one in [`etcd`].

pub mod etcd;
pub mod sqlite;
pub mod watch;

use std::sync::Arc;

use serde_json::Value;

pub use watch::{Cursor, EventType, WatchEvent, WatchHub};

/// An object as stored, with the revision at which it was last written.
#[derive(Debug, Clone)]
pub struct Stored {
    pub revision: u64,
    pub object: Arc<Value>,
}

/// A listed object as its stored JSON text: lists are served without building object trees.
#[derive(Debug, Clone)]
pub struct RawObject {
    pub key: String,
    pub revision: u64,
    pub raw: Arc<str>,
}

impl RawObject {
    pub fn value(&self) -> Result<Value, StorageError> {
        serde_json::from_str(&self.raw)
            .map_err(|e| StorageError::Backend(format!("corrupt object {}: {e}", self.key)))
    }
}

/// A consistent list: the objects under a prefix at `revision`.
#[derive(Debug, Clone)]
pub struct Listing {
    pub revision: u64,
    pub items: Vec<RawObject>,
    /// Set when `limit` cut the list: the key to continue after.
    pub continue_after: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StorageError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    #[error("key {key}: expected revision {expected}, found {found}")]
    Conflict {
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("revision {requested} is older than the oldest kept revision {oldest}")]
    Expired { requested: u64, oldest: u64 },
    #[error("storage is shutting down")]
    Closed,
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// The object is larger than a datastore keeps ([`MAX_OBJECT`]).
    #[error("the object is {size} bytes, more than the {MAX_OBJECT} bytes the datastore keeps")]
    TooLarge { size: usize },
    /// The datastore's file is damaged (SQLite's "malformed" or "not a database").
    #[error("the datastore is damaged: {0}")]
    Damaged(String),
    /// The datastore cannot be reached or did not answer in time (etcd's own words).
    #[error("{0}")]
    Unavailable(String),
}

/// The largest object (as JSON) a datastore keeps: etcd's default request limit, so that what a
/// site stores would also fit a site on etcd.
pub const MAX_OBJECT: usize = 1536 * 1024;

/// Refuses an object's text above [`MAX_OBJECT`].
pub fn check_size(text: &str) -> Result<(), StorageError> {
    if text.len() > MAX_OBJECT {
        return Err(StorageError::TooLarge { size: text.len() });
    }
    Ok(())
}

/// What the API server needs from a datastore. Implemented by SQLite (default) and etcd.
#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError>;

    /// [`Storage::get`] where a slightly old answer will do (admission's namespace lookup, as
    /// upstream reads it from an informer cache): etcd answers from the member this server
    /// talks to without asking the leader.
    async fn get_recent(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        self.get(key).await
    }

    /// Objects whose key starts with `prefix` (which must end with `/`), ordered by key, starting
    /// after `start_after` when given, at most `limit` when given.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Listing, StorageError>;

    /// [`Storage::list`] as the datastore was at revision `at` (a continued list reads the
    /// revision its first page read). A datastore that keeps only the current state (SQLite)
    /// reads that; a revision the datastore no longer keeps is `Expired`.
    async fn list_at(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
        at: Option<u64>,
    ) -> Result<Listing, StorageError> {
        let _ = at;
        self.list(prefix, start_after, limit).await
    }

    /// Stores a new object; the stored copy carries the new `metadata.resourceVersion`.
    async fn create(&self, key: &str, object: Value) -> Result<Stored, StorageError>;

    /// Replaces an object. With `expected` the write fails with `Conflict` unless the current
    /// revision equals it.
    async fn update(
        &self,
        key: &str,
        object: Value,
        expected: Option<u64>,
    ) -> Result<Stored, StorageError>;

    /// Removes an object; returns its last state with the deletion's revision.
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<Stored, StorageError>;

    /// The latest committed revision this server knows of.
    fn revision(&self) -> u64;

    /// The datastore's latest revision, asked for now (with several servers another may have
    /// written since this one last heard).
    async fn current_revision(&self) -> Result<u64, StorageError> {
        Ok(self.revision())
    }

    /// The hub that publishes committed changes.
    fn hub(&self) -> &WatchHub;

    /// Why the datastore cannot be trusted, once an operation has found it damaged: `/readyz`
    /// and `/healthz` fail with it.
    fn damaged(&self) -> Option<String> {
        None
    }

    /// Why the datastore cannot be reached, while it cannot: `/readyz` fails with it.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// `/core/pods/default/web` and friends. `namespace` is empty for cluster-scoped objects.
pub fn object_key(group: &str, resource: &str, namespace: &str, name: &str) -> String {
    let group = if group.is_empty() { "core" } else { group };
    if namespace.is_empty() {
        format!("/{group}/{resource}/{name}")
    } else {
        format!("/{group}/{resource}/{namespace}/{name}")
    }
}

/// The prefix that lists a resource, in one namespace or in all of them.
pub fn list_prefix(group: &str, resource: &str, namespace: &str) -> String {
    let group = if group.is_empty() { "core" } else { group };
    if namespace.is_empty() {
        format!("/{group}/{resource}/")
    } else {
        format!("/{group}/{resource}/{namespace}/")
    }
}

/// Writes `revision` into `metadata.resourceVersion`.
pub fn stamp_revision(object: &mut Value, revision: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".to_string(),
            Value::String(revision.to_string()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_prefixes_nest() {
        let key = object_key("", "pods", "default", "web");
        assert_eq!(key, "/core/pods/default/web");
        assert!(key.starts_with(&list_prefix("", "pods", "default")));
        assert!(key.starts_with(&list_prefix("", "pods", "")));
        assert_eq!(
            object_key("apps", "deployments", "", "x"),
            "/apps/deployments/x"
        );
    }
}
