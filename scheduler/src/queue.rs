//! The scheduling queue: pods waiting to be scheduled, highest priority first (then oldest).
//!
//! Like upstream's it has three parts: *active* (ready to try now), *backoff* (failed recently:
//! wait 1 s, doubling up to 10 s) and *unschedulable* (no node fits; they move back when the
//! cluster changes in a way that might help, or after five minutes at the latest). A pod that
//! failed while the cluster changed under it goes to backoff, not unschedulable, so the change
//! is not missed. Pure: time is passed in.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use crate::framework::PodInfo;

pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Upstream's `podMaxInUnschedulablePodsDuration`.
pub const MAX_UNSCHEDULABLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Active,
    Backoff,
    Unschedulable,
    InFlight,
}

struct Queued {
    info: PodInfo,
    place: Place,
    /// Incremented on every (re)insertion so stale heap entries can be skipped.
    generation: u64,
    attempts: u32,
    /// When the pod first entered the queue (ordering among equal priorities).
    since: Instant,
    /// When it last failed (backoff and unschedulable timing).
    failed_at: Instant,
    /// The queue's move counter when the pod was popped.
    popped_at_move: u64,
}

#[derive(PartialEq, Eq)]
struct ActiveEntry {
    priority: i32,
    since: Instant,
    generation: u64,
    key: String,
}

impl Ord for ActiveEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.since.cmp(&self.since))
            .then_with(|| other.generation.cmp(&self.generation))
    }
}

impl PartialOrd for ActiveEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What happened to a popped pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Bound (or gone): it leaves the queue.
    Done,
    /// No node fits.
    Unschedulable,
    /// Something else failed (binding, API errors): retry after backoff.
    Error,
}

#[derive(Default)]
pub struct SchedulingQueue {
    pods: HashMap<String, Queued>,
    active: BinaryHeap<ActiveEntry>,
    backoff: BinaryHeap<Reverse<(Instant, u64, String)>>,
    next_generation: u64,
    moves: u64,
}

pub fn backoff_for(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(10);
    (INITIAL_BACKOFF * 2u32.pow(exp)).min(MAX_BACKOFF)
}

impl SchedulingQueue {
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.pods.contains_key(key)
    }

    fn push_active(&mut self, key: &str) {
        self.next_generation += 1;
        let g = self.next_generation;
        if let Some(q) = self.pods.get_mut(key) {
            q.place = Place::Active;
            q.generation = g;
            self.active.push(ActiveEntry {
                priority: q.info.priority,
                since: q.since,
                generation: g,
                key: key.to_string(),
            });
        }
    }

    fn push_backoff(&mut self, key: &str) {
        self.next_generation += 1;
        let g = self.next_generation;
        if let Some(q) = self.pods.get_mut(key) {
            q.place = Place::Backoff;
            q.generation = g;
            let ready = q.failed_at + backoff_for(q.attempts);
            self.backoff.push(Reverse((ready, g, key.to_string())));
        }
    }

    /// A new pod to schedule, or a newer version of one already queued. A pod whose
    /// scheduling-relevant fields changed while unschedulable is tried again.
    pub fn add_or_update(&mut self, info: PodInfo, now: Instant) {
        let key = info.key.clone();
        match self.pods.get_mut(&key) {
            None => {
                self.pods.insert(
                    key.clone(),
                    Queued {
                        info,
                        place: Place::Active,
                        generation: 0,
                        attempts: 0,
                        since: now,
                        failed_at: now,
                        popped_at_move: 0,
                    },
                );
                self.push_active(&key);
            }
            Some(q) => {
                let changed = q.info.pod.spec != info.pod.spec || q.info.labels != info.labels;
                let priority_changed = q.info.priority != info.priority;
                q.info = info;
                match q.place {
                    Place::Unschedulable if changed => self.push_backoff_or_active(&key, now),
                    Place::Active if priority_changed => self.push_active(&key),
                    _ => {}
                }
            }
        }
    }

    fn push_backoff_or_active(&mut self, key: &str, now: Instant) {
        let Some(q) = self.pods.get(key) else {
            return;
        };
        if q.failed_at + backoff_for(q.attempts) > now {
            self.push_backoff(key);
        } else {
            self.push_active(key);
        }
    }

    pub fn delete(&mut self, key: &str) {
        // Heap entries are skipped lazily once the pod is gone.
        self.pods.remove(key);
    }

    /// Moves pods whose backoff has expired into active, and old unschedulable pods too.
    fn flush(&mut self, now: Instant) {
        while let Some(Reverse((ready, generation, _))) = self.backoff.peek() {
            if *ready > now {
                break;
            }
            let generation = *generation;
            let Some(Reverse((_, _, key))) = self.backoff.pop() else {
                break;
            };
            if self
                .pods
                .get(&key)
                .is_some_and(|q| q.generation == generation && q.place == Place::Backoff)
            {
                self.push_active(&key);
            }
        }
    }

    /// Moves unschedulable pods that waited longer than [`MAX_UNSCHEDULABLE`]; call now and then.
    pub fn flush_unschedulable_leftovers(&mut self, now: Instant) {
        let old: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, q)| {
                q.place == Place::Unschedulable
                    && now.duration_since(q.failed_at) > MAX_UNSCHEDULABLE
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in old {
            self.push_active(&key);
        }
    }

    /// The highest-priority pod ready now; it stays "in flight" until [`SchedulingQueue::done`].
    pub fn pop(&mut self, now: Instant) -> Option<PodInfo> {
        self.flush(now);
        while let Some(entry) = self.active.pop() {
            let Some(q) = self.pods.get_mut(&entry.key) else {
                continue;
            };
            if q.generation != entry.generation || q.place != Place::Active {
                continue;
            }
            q.place = Place::InFlight;
            q.attempts += 1;
            q.popped_at_move = self.moves;
            return Some(q.info.clone());
        }
        None
    }

    /// When the next backed-off pod becomes ready.
    pub fn next_ready(&self) -> Option<Instant> {
        self.backoff.peek().map(|Reverse((t, _, _))| *t)
    }

    pub fn done(&mut self, key: &str, outcome: Outcome, now: Instant) {
        let moved_meanwhile = match self.pods.get_mut(key) {
            None => return,
            Some(q) => {
                q.failed_at = now;
                q.popped_at_move != self.moves
            }
        };
        match outcome {
            Outcome::Done => {
                self.pods.remove(key);
            }
            Outcome::Unschedulable if !moved_meanwhile => {
                if let Some(q) = self.pods.get_mut(key) {
                    q.place = Place::Unschedulable;
                }
            }
            Outcome::Unschedulable | Outcome::Error => self.push_backoff(key),
        }
    }

    /// The cluster changed in a way that may make unschedulable pods fit: try them again
    /// (after their backoff).
    pub fn move_all_unschedulable(&mut self, now: Instant) {
        self.moves += 1;
        let keys: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, q)| q.place == Place::Unschedulable)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.push_backoff_or_active(&key, now);
        }
    }

    /// How many pods are unschedulable right now (for logs and tests).
    pub fn unschedulable(&self) -> usize {
        self.pods
            .values()
            .filter(|q| q.place == Place::Unschedulable)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::framework::testing::pod;

    fn info(name: &str, priority: i32) -> PodInfo {
        let mut p = pod(name, "0", "0");
        p.spec.as_mut().unwrap().priority = Some(priority);
        PodInfo::new(Arc::new(p))
    }

    #[test]
    fn higher_priority_first_then_oldest() {
        let mut q = SchedulingQueue::default();
        let t = Instant::now();
        q.add_or_update(info("low", 0), t);
        q.add_or_update(info("high", 100), t + Duration::from_millis(1));
        q.add_or_update(info("low2", 0), t + Duration::from_millis(2));
        let order: Vec<String> =
            std::iter::from_fn(|| q.pop(t + Duration::from_millis(3)).map(|p| p.key)).collect();
        assert_eq!(order, vec!["default/high", "default/low", "default/low2"]);
    }

    #[test]
    fn unschedulable_pods_wait_for_a_cluster_change_then_backoff() {
        let mut q = SchedulingQueue::default();
        let t = Instant::now();
        q.add_or_update(info("p", 0), t);
        let p = q.pop(t).unwrap();
        q.done(&p.key, Outcome::Unschedulable, t);
        assert_eq!(q.unschedulable(), 1);
        assert!(
            q.pop(t + Duration::from_secs(60)).is_none(),
            "waits for a change"
        );
        q.move_all_unschedulable(t + Duration::from_millis(100));
        assert!(
            q.pop(t + Duration::from_millis(200)).is_none(),
            "still backing off (1 s)"
        );
        assert_eq!(q.pop(t + Duration::from_secs(2)).unwrap().key, "default/p");
    }

    #[test]
    fn a_change_during_the_attempt_is_not_missed() {
        let mut q = SchedulingQueue::default();
        let t = Instant::now();
        q.add_or_update(info("p", 0), t);
        let p = q.pop(t).unwrap();
        q.move_all_unschedulable(t); // a node was added while we were filtering
        q.done(&p.key, Outcome::Unschedulable, t);
        assert_eq!(q.unschedulable(), 0);
        assert!(q.pop(t + Duration::from_secs(2)).is_some());
    }

    #[test]
    fn backoff_doubles_up_to_ten_seconds() {
        assert_eq!(backoff_for(1), Duration::from_secs(1));
        assert_eq!(backoff_for(2), Duration::from_secs(2));
        assert_eq!(backoff_for(4), Duration::from_secs(8));
        assert_eq!(backoff_for(9), Duration::from_secs(10));
    }

    #[test]
    fn deleted_and_old_unschedulable_pods() {
        let mut q = SchedulingQueue::default();
        let t = Instant::now();
        q.add_or_update(info("gone", 0), t);
        q.delete("default/gone");
        assert!(q.pop(t).is_none());
        q.add_or_update(info("p", 0), t);
        let p = q.pop(t).unwrap();
        q.done(&p.key, Outcome::Unschedulable, t);
        q.flush_unschedulable_leftovers(t + MAX_UNSCHEDULABLE + Duration::from_secs(1));
        assert!(
            q.pop(t + MAX_UNSCHEDULABLE + Duration::from_secs(1))
                .is_some()
        );
    }
}
