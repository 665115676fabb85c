//! The SQLite file behind the cache: one table of objects, keyed by kind, namespace and name,
//! each stored as the JSON the API served.
//!
//! WAL journal with `synchronous=NORMAL`: a crash of the process never loses a committed
//! write; a power cut may roll back the last few, never corrupts the file. The file is
//! readable by root only (it holds the node's Secrets, as the kubelet's tmpfs volumes do).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("node cache {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("node cache: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("node cache: bad JSON for {kind} {key}: {source}")]
    Json {
        kind: String,
        key: String,
        source: serde_json::Error,
    },
    #[error("node cache {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub struct Store {
    conn: Mutex<Connection>,
}

/// Opens a node-local SQLite file the way every node file is kept (this cache, the device
/// twin's): its folder created, readable by root only, WAL with `synchronous=NORMAL`, a 5 s busy
/// timeout.
pub fn open_node_file(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let open_err = |source| StoreError::Open {
        path: path.display().to_string(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_err)?;
    Ok(conn)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = open_node_file(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS objects (
                kind TEXT NOT NULL,
                namespace TEXT NOT NULL,
                name TEXT NOT NULL,
                body TEXT NOT NULL,
                PRIMARY KEY (kind, namespace, name)
            ) WITHOUT ROWID;",
        )
        .map_err(open_err)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        body: &Value,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO objects (kind, namespace, name, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, namespace, name) DO UPDATE SET body = excluded.body",
            params![kind, namespace, name, body.to_string()],
        )?;
        Ok(())
    }

    pub fn get(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, StoreError> {
        let body: Option<String> = self
            .conn()
            .query_row(
                "SELECT body FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                params![kind, namespace, name],
                |row| row.get(0),
            )
            .optional()?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|source| StoreError::Json {
                kind: kind.into(),
                key: format!("{namespace}/{name}"),
                source,
            })
        })
        .transpose()
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
            params![kind, namespace, name],
        )?;
        Ok(n > 0)
    }

    /// Every object of `kind` (in `namespace` when given), as (namespace, name, body).
    pub fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<(String, String, Value)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT namespace, name, body FROM objects
             WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2) ORDER BY namespace, name",
        )?;
        let rows = stmt.query_map(params![kind, namespace], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (ns, name, body) = row?;
            match serde_json::from_str(&body) {
                Ok(v) => out.push((ns, name, v)),
                // One bad row must not hide the others.
                Err(e) => {
                    tracing::warn!(kind, namespace = %ns, name = %name, "skipping an unreadable cached object: {e}")
                }
            }
        }
        Ok(out)
    }

    /// Makes the cached objects of `kind` in `namespace` exactly `items` (a fresh list).
    pub fn replace(
        &self,
        kind: &str,
        namespace: &str,
        items: &[(String, Value)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2",
            params![kind, namespace],
        )?;
        for (name, body) in items {
            tx.execute(
                "INSERT INTO objects (kind, namespace, name, body) VALUES (?1, ?2, ?3, ?4)",
                params![kind, namespace, name, body.to_string()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// (kind, namespace, name) of every object.
    pub fn keys(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT kind, namespace, name FROM objects")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_survive_reopening_and_lists_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache").join("meta.db");
        {
            let s = Store::open(&path).unwrap();
            s.put("ConfigMap", "default", "a", &json!({"data": {"k": "1"}}))
                .unwrap();
            s.put("ConfigMap", "default", "a", &json!({"data": {"k": "2"}}))
                .unwrap();
            s.put("Service", "default", "x", &json!({})).unwrap();
            s.put("Service", "default", "y", &json!({})).unwrap();
            s.put("Service", "other", "z", &json!({})).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.get("ConfigMap", "default", "a").unwrap(),
            Some(json!({"data": {"k": "2"}}))
        );
        assert_eq!(s.get("ConfigMap", "default", "b").unwrap(), None);
        s.replace("Service", "default", &[("w".into(), json!({"w": 1}))])
            .unwrap();
        let names: Vec<String> = s
            .list("Service", None)
            .unwrap()
            .into_iter()
            .map(|(ns, n, _)| format!("{ns}/{n}"))
            .collect();
        assert_eq!(names, ["default/w", "other/z"]);
        assert!(s.delete("Service", "other", "z").unwrap());
        assert!(!s.delete("Service", "other", "z").unwrap());
        assert_eq!(s.keys().unwrap().len(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
