//! The connected peers by name: a newer connection under a name replaces the older one, and a
//! connection's [`Registration`] removes only itself when dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A peer and the id of the registration that made it.
type Registered<C> = (u64, Arc<C>);

pub struct Registry<C: ?Sized> {
    peers: RwLock<HashMap<String, Registered<C>>>,
    next: AtomicU64,
}

impl<C: ?Sized> Default for Registry<C> {
    fn default() -> Self {
        Registry {
            peers: RwLock::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

/// Removes its registration when dropped (unless a newer one replaced it).
pub struct Registration<C: ?Sized> {
    registry: Arc<Registry<C>>,
    name: String,
    id: u64,
}

impl<C: ?Sized> Drop for Registration<C> {
    fn drop(&mut self) {
        let mut peers = self
            .registry
            .peers
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if peers.get(&self.name).is_some_and(|(id, _)| *id == self.id) {
            peers.remove(&self.name);
        }
    }
}

impl<C: ?Sized> Registry<C> {
    /// Registers `name`'s peer, replacing an older one.
    pub fn register(self: &Arc<Self>, name: &str, peer: Arc<C>) -> Registration<C> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), (id, peer));
        Registration {
            registry: self.clone(),
            name: name.to_string(),
            id,
        }
    }

    /// The names connected now, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub fn get(&self, name: &str) -> Option<Arc<C>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|(_, c)| c.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_registration_does_not_remove_its_replacement() {
        let registry: Arc<Registry<str>> = Arc::default();
        let old = registry.register("a", Arc::from("old"));
        let new = registry.register("a", Arc::from("new"));
        drop(old);
        assert_eq!(registry.get("a").as_deref(), Some("new"));
        assert_eq!(registry.names(), vec!["a".to_string()]);
        drop(new);
        assert!(registry.get("a").is_none());
    }
}
