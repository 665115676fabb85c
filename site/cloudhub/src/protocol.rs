//! What the hub and a site say to each other over the link. The hub is the HTTP/2 client on the
//! link (the site dialed, [`link`]), so every exchange is a request the hub makes:
//!
//! - `GET` [`STATUS_PATH`]: a long-lived answer in which the site writes one JSON
//!   [`StatusMessage`] per line: its cluster status when it changes, a heartbeat otherwise.
//! - `POST` [`API_PATH`]: a byte pipe ([`link::pipe`]) carrying one HTTP/1.1 connection to the
//!   site's API, for the cluster proxy. Every request on it impersonates the hub's caller.
//!
//! - `GET` [`CURSOR_PATH`]: the site's cursor, the hub revision up to which it has applied
//!   everything meant for it ([`Cursor`]).
//! - `POST` [`SYNC_PATH`]: a [`SyncBatch`] of the site's Works (the latest version of each
//!   one that changed after the cursor, and the deleted ones); the site answers after its own
//!   API committed them ([`SyncReply`]).
//! - `GET` [`HOLDINGS_PATH`]: when the cursor has left the hub's window (a restarted hub keeps
//!   no window from before), the Works the site holds and the version of each ([`Holdings`]):
//!   the hub sends only those that differ from what it wants, and the deletions.
//! - `PUT` [`SERVERS_PATH`]: the hub's servers now ([`Servers`]), sent when the link opens and
//!   whenever they change, so a site reaches servers added after it attached when the ones it
//!   knew are gone (the answer to the upgrade names them too).
//!
//! The upgrade request that opens the link carries the site's labels in [`LABELS_HEADER`].

use serde::{Deserialize, Serialize};

pub const STATUS_PATH: &str = "/edgesite/v1/link/status";
pub const CURSOR_PATH: &str = "/edgesite/v1/link/cursor";
pub const SYNC_PATH: &str = "/edgesite/v1/link/sync";
pub const HOLDINGS_PATH: &str = "/edgesite/v1/link/holdings";
pub const API_PATH: &str = "/edgesite/v1/link/api";
pub const SERVERS_PATH: &str = "/edgesite/v1/link/servers";
/// `key=value` pairs, comma-separated, from the site's `--site-label` flags.
pub const LABELS_HEADER: &str = "x-edgesite-site-labels";

/// The hub's live servers, `https://host:port` each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Servers {
    pub servers: Vec<String>,
}

/// How often a site speaks on its status stream when nothing changed, and how often it checks
/// for changes.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);
/// A site not heard from for this long is not Ready (its Ready condition turns Unknown).
pub const READY_GRACE: std::time::Duration = std::time::Duration::from_secs(40);

/// One line of the status stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum StatusMessage {
    /// The site's state, as Karmada's Cluster status says it (without conditions: the hub
    /// decides readiness).
    Cluster { status: serde_json::Value },
    /// Nothing changed; the site is alive.
    Heartbeat,
    /// What the site holds of one Work: each manifest's object status and health (sent when it
    /// changes).
    Work {
        /// The Work's name (in the site's namespace at the hub).
        name: String,
        /// The binding the Work belongs to, as the Work's annotation names it.
        binding: String,
        objects: Vec<ObjectStatus>,
    },
}

/// One object a Work placed at a site, as the site sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    pub applied: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Healthy, Unhealthy or Unknown, as Karmada's interpreter says.
    pub health: String,
    #[serde(default)]
    pub status: serde_json::Value,
}

/// The site's cursor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub revision: u64,
}

/// Works for a site. `full`: these are all of its Works (the site removes what else it holds
/// from the hub).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncBatch {
    pub full: bool,
    /// The hub revision the site may record once it has applied this batch.
    pub revision: u64,
    #[serde(default)]
    pub works: Vec<serde_json::Value>,
    /// Works deleted at the hub (their last state).
    #[serde(default)]
    pub deleted: Vec<serde_json::Value>,
}

/// What a site holds: each Work's name and the resourceVersion it applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Holdings {
    pub works: std::collections::BTreeMap<String, String>,
}

/// The site's answer to a batch: the cursor it recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReply {
    pub revision: u64,
}

/// Parses `--site-label` values (`key=value`) into a map; an error names the bad one.
pub fn parse_labels(
    labels: &[String],
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for label in labels {
        for pair in label.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                format!("--site-label {pair:?} is not KEY=VALUE (for example region=eu-west)")
            })?;
            let (k, v) = (k.trim(), v.trim());
            if let Err(e) = apiserver_lite::validation::is_qualified_name(k) {
                return Err(format!("--site-label {pair:?}: the key {e}"));
            }
            if let Err(e) = apiserver_lite::validation::is_label_value(v) {
                return Err(format!("--site-label {pair:?}: the value {e}"));
            }
            out.insert(k.to_string(), v.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_bad_ones_are_named() {
        let l = parse_labels(&["region=eu,tier=pop".into(), "x=y".into()]).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l["tier"], "pop");
        assert!(
            parse_labels(&["nope".into()])
                .unwrap_err()
                .contains("KEY=VALUE")
        );
        assert!(parse_labels(&["a=b c".into()]).is_err());
    }

    #[test]
    fn status_messages_are_tagged_lines() {
        let m = StatusMessage::Heartbeat;
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"heartbeat"}"#
        );
    }
}
