//! The watch hub: a bounded window of recent committed changes plus a broadcast of new ones.
//!
//! A watcher starting at revision `R` first gets every kept event after `R` from the window and then
//! follows the live broadcast; both happen under one lock so nothing falls between them. A revision
//! older than the window answers `Expired` (HTTP 410) and the client relists, exactly as with an
//! etcd-backed server after compaction. A watcher that falls more than the broadcast capacity behind
//! is ended the same way rather than buffering without bound.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::broadcast;

use super::StorageError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed change.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub revision: u64,
    pub event_type: EventType,
    pub key: String,
    /// The object after the change as JSON text; for deletions its last state, stamped with the
    /// deletion's revision. Text, not a tree: the window stays small and unfiltered watchers
    /// send it on without parsing.
    pub object: Arc<str>,
    /// The object before the change (for modifications and deletions), so filtered watchers can
    /// tell an object entering or leaving their selection.
    pub previous: Option<Arc<str>>,
}

impl WatchEvent {
    pub fn object_value(&self) -> Option<Value> {
        serde_json::from_str(&self.object).ok()
    }

    pub fn previous_value(&self) -> Option<Value> {
        self.previous
            .as_ref()
            .and_then(|p| serde_json::from_str(p).ok())
    }
}

struct Window {
    events: VecDeque<Arc<WatchEvent>>,
    /// Every change after this revision is in `events`.
    oldest: u64,
    capacity: usize,
    latest: u64,
}

pub struct WatchHub {
    window: Mutex<Window>,
    sender: broadcast::Sender<Arc<WatchEvent>>,
}

/// What a new watcher gets: the kept events after its revision and the live feed.
pub struct WatchSubscription {
    pub backlog: Vec<Arc<WatchEvent>>,
    pub live: broadcast::Receiver<Arc<WatchEvent>>,
    /// The latest revision published when the subscription was made.
    pub revision: u64,
}

impl WatchHub {
    /// `current` is the store's revision at start; `capacity` bounds both the window and each
    /// watcher's lag.
    pub fn new(current: u64, capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(16));
        WatchHub {
            window: Mutex::new(Window {
                events: VecDeque::with_capacity(capacity.min(1024)),
                oldest: current,
                capacity,
                latest: current,
            }),
            sender,
        }
    }

    /// Publishes committed events, in revision order.
    pub fn publish(&self, events: Vec<WatchEvent>) {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        for event in events {
            let event = Arc::new(event);
            window.latest = event.revision;
            if window.events.len() == window.capacity
                && let Some(dropped) = window.events.pop_front()
            {
                window.oldest = dropped.revision;
            }
            window.events.push_back(event.clone());
            // No receivers is fine: nobody is watching.
            let _ = self.sender.send(event);
        }
    }

    /// Subscribes to every change after `after`.
    pub fn subscribe(&self, after: u64) -> Result<WatchSubscription, StorageError> {
        let window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if after < window.oldest {
            return Err(StorageError::Expired {
                requested: after,
                oldest: window.oldest,
            });
        }
        let backlog = window
            .events
            .iter()
            .filter(|e| e.revision > after)
            .cloned()
            .collect();
        Ok(WatchSubscription {
            backlog,
            live: self.sender.subscribe(),
            revision: window.latest,
        })
    }

    /// The oldest revision a watch may start from.
    pub fn oldest(&self) -> u64 {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(revision: u64) -> WatchEvent {
        WatchEvent {
            revision,
            event_type: EventType::Added,
            key: format!("/core/configmaps/default/c{revision}"),
            object: Arc::from(json!({}).to_string()),
            previous: None,
        }
    }

    #[test]
    fn backlog_then_live_without_gaps() {
        let hub = WatchHub::new(10, 4);
        hub.publish(vec![event(11), event(12)]);
        let mut sub = hub.subscribe(11).unwrap();
        assert_eq!(sub.backlog.len(), 1);
        assert_eq!(sub.backlog[0].revision, 12);
        hub.publish(vec![event(13)]);
        assert_eq!(sub.live.try_recv().unwrap().revision, 13);
    }

    #[test]
    fn too_old_is_expired() {
        let hub = WatchHub::new(10, 2);
        hub.publish(vec![event(11), event(12), event(13)]);
        assert_eq!(hub.oldest(), 11);
        assert!(matches!(
            hub.subscribe(10),
            Err(StorageError::Expired { .. })
        ));
        assert_eq!(hub.subscribe(11).unwrap().backlog.len(), 2);
    }
}
