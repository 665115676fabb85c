//! What the hub and a site say to each other over the link. The hub is the HTTP/2 client on the
//! link (the site dialed, [`link`]), so every exchange is a request the hub makes:
//!
//! - `GET` [`STATUS_PATH`]: a long-lived answer in which the site writes one JSON
//!   [`StatusMessage`] per line: its cluster status when it changes, a heartbeat otherwise.
//! - `POST` [`API_PATH`]: a byte pipe ([`link::pipe`]) carrying one HTTP/1.1 connection to the
//!   site's API, for the cluster proxy. Every request on it impersonates the hub's caller.
//!
//! The upgrade request that opens the link carries the site's labels in [`LABELS_HEADER`].

use serde::{Deserialize, Serialize};

pub const STATUS_PATH: &str = "/edgesite/v1/link/status";
pub const API_PATH: &str = "/edgesite/v1/link/api";
/// `key=value` pairs, comma-separated, from the site's `--site-label` flags.
pub const LABELS_HEADER: &str = "x-edgesite-site-labels";

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
