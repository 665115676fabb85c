//! Waking a loop on an in-process datastore's committed changes: the hub's placement and the
//! site's status stream both look again when something they care about changed, instead of on a
//! short timer, without a watch per kind.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use apiserver_lite::storage::{Storage, StorageError};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Keys of the datastore's own bookkeeping, which never concerns either loop.
pub fn bookkeeping(key: &str) -> bool {
    key.starts_with("/core/events/")
        || key.starts_with("/events.k8s.io/")
        || key.starts_with("/coordination.k8s.io/leases/")
}

/// Fires `wake` on each batch of committed changes with a key `concerns` accepts (and once after
/// falling behind the window), until `shutdown` or the datastore closes.
pub async fn wake_on(
    storage: Arc<dyn Storage>,
    concerns: fn(&str) -> bool,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let hub = storage.hub();
    let mut cursor = match hub.cursor(None) {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(%error, "the datastore's change feed");
            return;
        }
    };
    loop {
        let events = tokio::select! {
            _ = shutdown.cancelled() => return,
            events = cursor.next(hub, 1024) => events,
        };
        match events {
            Ok(events) => {
                if events.iter().any(|e| concerns(&e.key)) {
                    wake.notify_one();
                }
            }
            Err(StorageError::Closed) => return,
            Err(_) => {
                // Fell behind the window: look once, and follow from now.
                wake.notify_one();
                match hub.cursor(None) {
                    Ok(c) => cursor = c,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        }
    }
}

/// A hash of a JSON value's text: enough to tell whether it changed without keeping it.
pub fn hash_of(value: &Value) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut hasher);
    hasher.finish()
}
