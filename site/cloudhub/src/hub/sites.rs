//! The sites as placement sees them (name, labels, the kinds each serves), kept current by one
//! watch on the hub's Clusters instead of reading every Cluster on each placement pass. Sites
//! that serve the same APIs (nearly all of a fleet) share one set of kinds, so a thousand sites
//! cost a thousand names and label maps, not a thousand copies of `apiEnablements`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// `group/version` -> the kinds a site serves there.
pub type Kinds = HashMap<String, BTreeSet<String>>;

/// A site as placement sees it.
#[derive(Clone, Debug)]
pub struct Site {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Empty when the site has not reported yet.
    kinds: Arc<Kinds>,
}

impl Site {
    #[cfg(test)]
    pub fn new(name: &str, labels: BTreeMap<String, String>) -> Site {
        Site {
            name: name.into(),
            labels,
            kinds: Arc::default(),
        }
    }

    /// Whether the site serves `kind` in `api_version` (yes when it has not said yet: the Work
    /// waits there until it can be applied, as Karmada's APIEnablement filter lets a cluster
    /// without a status through).
    pub fn serves(&self, api_version: &str, kind: &str) -> bool {
        self.kinds.is_empty()
            || self
                .kinds
                .get(api_version)
                .is_some_and(|kinds| kinds.contains(kind))
    }
}

#[derive(Default)]
struct State {
    /// None until the first full list arrived: placement must not act on an empty fleet it
    /// has not read yet.
    sites: Option<BTreeMap<String, Site>>,
    /// One set of kinds per distinct `apiEnablements`, by a hash of its text.
    interned: HashMap<u64, Arc<Kinds>>,
    /// What the watch is rebuilding after a restart of its list.
    rebuilding: BTreeMap<String, Site>,
}

/// The sites, from a watch on Clusters.
#[derive(Default)]
pub struct Sites {
    state: Mutex<State>,
    /// Fires when a site appears, goes, or changes its labels or kinds.
    pub changed: Arc<Notify>,
}

impl State {
    fn site(&mut self, cluster: &DynamicObject) -> Site {
        let enablements = &cluster.data["status"]["apiEnablements"];
        let key = crate::changes::hash_of(enablements);
        let kinds = self
            .interned
            .entry(key)
            .or_insert_with(|| Arc::new(kinds_of(enablements)))
            .clone();
        Site {
            name: cluster.metadata.name.clone().unwrap_or_default(),
            labels: cluster.metadata.labels.clone().unwrap_or_default(),
            kinds,
        }
    }

    /// Forgets kind sets no site uses any more.
    fn prune(&mut self) {
        self.interned
            .retain(|_, kinds| Arc::strong_count(kinds) > 1);
    }
}

fn kinds_of(enablements: &Value) -> Kinds {
    let mut kinds = Kinds::new();
    for group in enablements.as_array().into_iter().flatten() {
        let gv = group["groupVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let entry = kinds.entry(gv).or_default();
        for r in group["resources"].as_array().into_iter().flatten() {
            entry.insert(r["kind"].as_str().unwrap_or_default().to_string());
        }
    }
    kinds
}

fn same(a: &Site, b: &Site) -> bool {
    a.labels == b.labels && Arc::ptr_eq(&a.kinds, &b.kinds)
}

impl Sites {
    /// The sites now, or None before the first list.
    pub fn snapshot(&self) -> Option<Vec<Site>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.sites.as_ref().map(|s| s.values().cloned().collect())
    }

    /// Follows the hub's Clusters until `shutdown`.
    pub async fn follow(self: Arc<Self>, client: kube::Client, shutdown: CancellationToken) {
        let api: Api<DynamicObject> = Api::all_with(client, &crate::crds::cluster_resource());
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => event,
            };
            let Some(event) = event else { return };
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    // The watcher retries by itself; wait a moment so a failing API is not
                    // asked in a tight loop.
                    tracing::warn!(%error, "watch Clusters");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            let changed = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                match event {
                    watcher::Event::Init => {
                        state.rebuilding.clear();
                        false
                    }
                    watcher::Event::InitApply(cluster) => {
                        let site = state.site(&cluster);
                        state.rebuilding.insert(site.name.clone(), site);
                        false
                    }
                    watcher::Event::InitDone => {
                        let rebuilt = std::mem::take(&mut state.rebuilding);
                        state.sites = Some(rebuilt);
                        state.prune();
                        true
                    }
                    watcher::Event::Apply(cluster) => {
                        let site = state.site(&cluster);
                        let sites = state.sites.get_or_insert_default();
                        let changed = sites.get(&site.name).is_none_or(|old| !same(old, &site));
                        sites.insert(site.name.clone(), site);
                        if changed {
                            state.prune();
                        }
                        changed
                    }
                    watcher::Event::Delete(cluster) => {
                        let name = cluster.metadata.name.clone().unwrap_or_default();
                        let removed = state.sites.as_mut().and_then(|s| s.remove(&name)).is_some();
                        state.prune();
                        removed
                    }
                }
            };
            if changed {
                self.changed.notify_one();
            }
        }
    }
}
