//! The watch hub: a bounded window of recent committed changes, read by watchers with cursors.
//!
//! The window is the only place events are kept: bounded by count and by bytes
//! ([`WINDOW_BYTES`]), so a burst of large objects cannot grow the server without limit. A
//! watcher holds a [`Cursor`] (the last revision it has taken) and is woken when the window moves
//! on; it takes the events after its cursor, so a slow watcher holds nothing of its own. A
//! revision that has left the window (a watch from an old resourceVersion, or a watcher that fell
//! that far behind) answers `Expired` (HTTP 410) and the client relists, exactly as with an
//! etcd-backed server after compaction.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::watch;

use super::StorageError;

/// The most bytes of object text the window keeps.
pub const WINDOW_BYTES: usize = 32 * 1024 * 1024;

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

    /// What keeping it costs.
    fn size(&self) -> usize {
        self.key.len() + self.object.len() + self.previous.as_ref().map_or(0, |p| p.len())
    }
}

struct Window {
    events: VecDeque<Arc<WatchEvent>>,
    /// Every change after this revision is in `events`.
    oldest: u64,
    capacity: usize,
    bytes: usize,
    max_bytes: usize,
}

pub struct WatchHub {
    window: Mutex<Window>,
    /// The latest published revision; watchers wait for it to change.
    latest: watch::Sender<u64>,
}

/// A watcher's place in the stream of changes.
pub struct Cursor {
    /// The last revision taken.
    pub after: u64,
    changed: watch::Receiver<u64>,
}

impl WatchHub {
    /// `current` is the store's revision at start; the window keeps at most `capacity` events
    /// and [`WINDOW_BYTES`].
    pub fn new(current: u64, capacity: usize) -> Self {
        Self::with_bytes(current, capacity, WINDOW_BYTES)
    }

    pub fn with_bytes(current: u64, capacity: usize, max_bytes: usize) -> Self {
        WatchHub {
            window: Mutex::new(Window {
                events: VecDeque::with_capacity(capacity.min(1024)),
                oldest: current,
                capacity: capacity.max(1),
                bytes: 0,
                max_bytes,
            }),
            latest: watch::Sender::new(current),
        }
    }

    /// Publishes committed events, in revision order.
    pub fn publish(&self, events: Vec<WatchEvent>) {
        let Some(last) = events.last().map(|e| e.revision) else {
            return;
        };
        {
            let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
            for event in events {
                window.bytes += event.size();
                window.events.push_back(Arc::new(event));
                while window.events.len() > window.capacity
                    || (window.bytes > window.max_bytes && window.events.len() > 1)
                {
                    let Some(dropped) = window.events.pop_front() else {
                        break;
                    };
                    window.bytes -= dropped.size();
                    window.oldest = dropped.revision;
                }
            }
        }
        self.latest.send_replace(last);
    }

    /// Moves the latest revision on without events: every change up to `revision` has been
    /// published (an etcd progress notification).
    pub fn advance(&self, revision: u64) {
        self.latest.send_if_modified(|latest| {
            if revision > *latest {
                *latest = revision;
                true
            } else {
                false
            }
        });
    }

    /// Forgets every kept event and starts again at `revision`: every cursor before it expires
    /// (its watcher relists). For a datastore that lost changes the hub had not seen.
    pub fn reset(&self, revision: u64) {
        {
            let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
            window.events.clear();
            window.bytes = 0;
            window.oldest = window.oldest.max(revision);
        }
        self.latest.send_replace(revision.max(self.latest()));
    }

    /// Waits until `revision` has been published.
    pub async fn wait_for(&self, revision: u64) {
        let mut changed = self.latest.subscribe();
        let _ = changed.wait_for(|latest| *latest >= revision).await;
    }

    /// A cursor after revision `after` (`None`: after the latest one).
    pub fn cursor(&self, after: Option<u64>) -> Result<Cursor, StorageError> {
        let mut changed = self.latest.subscribe();
        let latest = *changed.borrow_and_update();
        let after = after.unwrap_or(latest);
        let oldest = self.oldest();
        if after < oldest {
            return Err(StorageError::Expired {
                requested: after,
                oldest,
            });
        }
        Ok(Cursor { after, changed })
    }

    /// At most `max` kept events after revision `after`.
    pub fn read(&self, after: u64, max: usize) -> Result<Vec<Arc<WatchEvent>>, StorageError> {
        let window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if after < window.oldest {
            return Err(StorageError::Expired {
                requested: after,
                oldest: window.oldest,
            });
        }
        let first = window.events.partition_point(|e| e.revision <= after);
        Ok(window.events.range(first..).take(max).cloned().collect())
    }

    /// The latest published revision.
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// The oldest revision a watch may start from.
    pub fn oldest(&self) -> u64 {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).oldest
    }

    /// What the window keeps now: events and bytes.
    pub fn kept(&self) -> (usize, usize) {
        let window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        (window.events.len(), window.bytes)
    }
}

impl Cursor {
    /// The next events after the cursor (at most `max`), waiting for some; moves the cursor past
    /// them. `Expired` when they have left the window; `Closed` when the hub is gone.
    pub async fn next(
        &mut self,
        hub: &WatchHub,
        max: usize,
    ) -> Result<Vec<Arc<WatchEvent>>, StorageError> {
        loop {
            self.changed.borrow_and_update();
            let events = hub.read(self.after, max)?;
            if let Some(last) = events.last() {
                self.after = last.revision;
                return Ok(events);
            }
            self.changed
                .changed()
                .await
                .map_err(|_| StorageError::Closed)?;
        }
    }

    /// The events already waiting, without waiting (possibly none).
    pub fn ready(
        &mut self,
        hub: &WatchHub,
        max: usize,
    ) -> Result<Vec<Arc<WatchEvent>>, StorageError> {
        let events = hub.read(self.after, max)?;
        if let Some(last) = events.last() {
            self.after = last.revision;
        }
        Ok(events)
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

    #[tokio::test]
    async fn a_cursor_takes_the_kept_events_then_new_ones_without_gaps() {
        let hub = WatchHub::new(10, 4);
        hub.publish(vec![event(11), event(12)]);
        let mut cursor = hub.cursor(Some(11)).unwrap();
        let first = cursor.next(&hub, 10).await.unwrap();
        assert_eq!(first.iter().map(|e| e.revision).collect::<Vec<_>>(), [12]);
        hub.publish(vec![event(13)]);
        assert_eq!(cursor.next(&hub, 10).await.unwrap()[0].revision, 13);
        // From now: only what comes next.
        let mut now = hub.cursor(None).unwrap();
        assert!(now.ready(&hub, 10).unwrap().is_empty());
        hub.publish(vec![event(14)]);
        assert_eq!(now.next(&hub, 10).await.unwrap()[0].revision, 14);
    }

    #[test]
    fn too_old_is_expired() {
        let hub = WatchHub::new(10, 2);
        hub.publish(vec![event(11), event(12), event(13)]);
        assert_eq!(hub.oldest(), 11);
        assert!(matches!(
            hub.cursor(Some(10)),
            Err(StorageError::Expired { .. })
        ));
        assert_eq!(hub.read(11, 10).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_window_is_bounded_in_bytes_and_a_watcher_left_behind_is_expired() {
        let big = |revision: u64| WatchEvent {
            object: Arc::from("x".repeat(1000)),
            ..event(revision)
        };
        let hub = WatchHub::with_bytes(0, 1000, 10_000);
        let mut slow = hub.cursor(None).unwrap();
        hub.publish((1..=50).map(big).collect());
        let (events, bytes) = hub.kept();
        assert!(
            bytes <= 10_000 && events < 11,
            "{events} events, {bytes} bytes"
        );
        assert!(matches!(
            slow.next(&hub, 10).await,
            Err(StorageError::Expired { .. })
        ));
    }
}
