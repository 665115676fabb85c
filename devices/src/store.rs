//! The node's device file: the devices bound to this node with their twins, the models they
//! use, and the outbox of Device statuses still to write to the API. One SQLite file beside the
//! node cache (`<data-dir>/agent/cache/devices.db`), kept like the metamanager's
//! ([`metamanager::store::open_node_file`]): a crashed process never loses a committed twin, so
//! a restart offline serves the same twins and still delivers every reported value.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::twin::Twins;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("device store {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("device store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("device store: bad record {key}: {source}")]
    Json {
        key: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    File(#[from] metamanager::store::StoreError),
}

/// One device bound to this node, as the twin keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct DeviceRecord {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    /// `metadata.generation` of the spec last applied: the cloud version of its desired values.
    #[serde(default)]
    pub generation: i64,
    /// `Device.spec` as the API served it.
    #[serde(default)]
    pub spec: Value,
    /// The property names of the applied spec (so that dropped ones are deleted).
    #[serde(default)]
    pub properties: Vec<String>,
    #[serde(default)]
    pub twins: Twins,
    #[serde(default)]
    pub state: String,
    /// RFC 3339, the last time the mapper said the device was online.
    #[serde(default)]
    pub last_online: String,
    #[serde(default)]
    pub description: String,
}

impl DeviceRecord {
    /// `<namespace>/<name>`, the device id of KubeEdge 1.17 and later.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn model_name(&self) -> &str {
        self.spec
            .pointer("/deviceModelRef/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

pub struct Store {
    conn: Mutex<Connection>,
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = metamanager::store::open_node_file(path)?;
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, spec TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, seq INTEGER NOT NULL);",
        )
        .map_err(open_err)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare("SELECT id, record FROM devices ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, record) = row?;
            out.push(
                serde_json::from_str(&record).map_err(|source| StoreError::Json { key, source })?,
            );
        }
        Ok(out)
    }

    pub fn put_device(&self, record: &DeviceRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(|source| StoreError::Json {
            key: record.id(),
            source,
        })?;
        lock(&self.conn).execute(
            "INSERT INTO devices (id, record) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            params![record.id(), json],
        )?;
        Ok(())
    }

    pub fn remove_device(&self, id: &str) -> Result<(), StoreError> {
        let conn = lock(&self.conn);
        conn.execute("DELETE FROM devices WHERE id = ?1", params![id])?;
        conn.execute("DELETE FROM outbox WHERE id = ?1", params![id])?;
        Ok(())
    }

    pub fn models(&self) -> Result<Vec<(String, Value)>, StoreError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare("SELECT id, spec FROM models ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, spec) = row?;
            let spec = serde_json::from_str(&spec).map_err(|source| StoreError::Json {
                key: key.clone(),
                source,
            })?;
            out.push((key, spec));
        }
        Ok(out)
    }

    pub fn put_model(&self, id: &str, spec: &Value) -> Result<(), StoreError> {
        lock(&self.conn).execute(
            "INSERT INTO models (id, spec) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET spec = excluded.spec",
            params![id, spec.to_string()],
        )?;
        Ok(())
    }

    pub fn remove_model(&self, id: &str) -> Result<(), StoreError> {
        lock(&self.conn).execute("DELETE FROM models WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Marks a device's status as still to be written; `seq` orders the outbox.
    pub fn queue_status(&self, id: &str, seq: u64) -> Result<(), StoreError> {
        lock(&self.conn).execute(
            "INSERT INTO outbox (id, seq) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET seq = excluded.seq",
            params![id, seq as i64],
        )?;
        Ok(())
    }

    /// The outbox, oldest first.
    pub fn outbox(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare("SELECT id, seq FROM outbox ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Drops a written status, unless a newer one was queued meanwhile.
    pub fn status_written(&self, id: &str, seq: u64) -> Result<(), StoreError> {
        lock(&self.conn).execute(
            "DELETE FROM outbox WHERE id = ?1 AND seq = ?2",
            params![id, seq as i64],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_outbox_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.db");
        {
            let store = Store::open(&path).unwrap();
            let mut r = DeviceRecord {
                namespace: "default".into(),
                name: "d".into(),
                ..Default::default()
            };
            r.state = "online".into();
            store.put_device(&r).unwrap();
            store.queue_status("default/d", 1).unwrap();
            store.queue_status("default/d", 2).unwrap();
            store.status_written("default/d", 1).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.devices().unwrap()[0].state, "online");
        assert_eq!(store.outbox().unwrap(), vec![("default/d".to_string(), 2)]);
        store.status_written("default/d", 2).unwrap();
        assert!(store.outbox().unwrap().is_empty());
    }
}
