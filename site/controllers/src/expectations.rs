//! Expectations: what a loop has just asked for and not yet seen in its caches.
//!
//! After creating three pods a ReplicaSet must not count again until the cache shows them, or
//! it would create three more. Each loop notes the names it created or deleted per owner; a
//! reconcile first drops what the cache now confirms and waits while anything is outstanding.
//! Entries expire (upstream uses five minutes) so a lost watch event cannot wedge an owner.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const EXPIRY: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Pending {
    creates: Vec<String>,
    deletes: Vec<String>,
    since: Option<Instant>,
}

#[derive(Default)]
pub struct Expectations {
    owners: Mutex<HashMap<String, Pending>>,
}

impl Expectations {
    pub fn created(&self, owner: &str, name: &str) {
        let mut owners = self.owners.lock().expect("expectations lock");
        let p = owners.entry(owner.to_string()).or_default();
        p.creates.push(name.to_string());
        p.since.get_or_insert_with(Instant::now);
    }

    pub fn deleted(&self, owner: &str, name: &str) {
        let mut owners = self.owners.lock().expect("expectations lock");
        let p = owners.entry(owner.to_string()).or_default();
        p.deletes.push(name.to_string());
        p.since.get_or_insert_with(Instant::now);
    }

    /// The cache showed `name` (created, changed, or deleted): a create is confirmed; so is a
    /// delete if `gone` (deleted or terminating).
    pub fn observe(&self, owner: &str, name: &str, gone: bool) {
        let mut owners = self.owners.lock().expect("expectations lock");
        if let Some(p) = owners.get_mut(owner) {
            p.creates.retain(|n| n != name);
            if gone {
                p.deletes.retain(|n| n != name);
            }
        }
    }

    /// Whether everything asked for on behalf of `owner` is visible: `exists` says whether the
    /// cache holds a live (not terminating) object of that name now.
    pub fn satisfied(&self, owner: &str, exists: impl Fn(&str) -> bool) -> bool {
        let mut owners = self.owners.lock().expect("expectations lock");
        let Some(p) = owners.get_mut(owner) else {
            return true;
        };
        p.creates.retain(|n| !exists(n));
        p.deletes.retain(|n| exists(n));
        let expired = p.since.is_some_and(|s| s.elapsed() > EXPIRY);
        if p.creates.is_empty() && p.deletes.is_empty() || expired {
            owners.remove(owner);
            return true;
        }
        false
    }

    pub fn forget(&self, owner: &str) {
        self.owners.lock().expect("expectations lock").remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_cache_shows_creates_and_deletes() {
        let e = Expectations::default();
        assert!(e.satisfied("rs", |_| false));
        e.created("rs", "a");
        e.deleted("rs", "b");
        assert!(
            !e.satisfied("rs", |n| n == "b"),
            "a not seen, b still there"
        );
        assert!(
            !e.satisfied("rs", |n| n == "a" || n == "b"),
            "b still there"
        );
        assert!(e.satisfied("rs", |n| n == "a"));
        assert!(e.satisfied("rs", |_| false), "forgotten once satisfied");
    }

    #[test]
    fn a_pod_seen_then_gone_is_not_waited_for() {
        let e = Expectations::default();
        e.created("rs", "a");
        e.observe("rs", "a", false);
        assert!(e.satisfied("rs", |_| false));
    }
}
