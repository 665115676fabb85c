//! Which hub server holds each site's link, in the hub's datastore, so several `edgesite
//! cloudhub` servers on one etcd act as one hub: the server a site attached to records itself
//! under [`PREFIX`] (one write per attach, none per heartbeat) and removes the record when the
//! link closes. The leading server's readiness loop reads the records (a site with no live
//! record goes Ready Unknown after the grace), and a server asked for the cluster proxy of a
//! site linked elsewhere forwards the request to the server that holds the link.
//!
//! A record names its server by the address the server advertises (the `kubernetes` endpoints');
//! a record whose server is no longer among the live servers counts as no record.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use apiserver_lite::http::ApiServer;
use apiserver_lite::storage::StorageError;
use serde_json::{Value, json};

/// Where the records live (the datastore's own bookkeeping, not an API resource).
pub const PREFIX: &str = "/edgesite.io/sitelinks/";

/// This server's side of the records.
#[derive(Clone)]
pub struct Links {
    api: Arc<ApiServer>,
    /// This server's advertised address; None for a hub that shares its datastore with nobody.
    me: Option<SocketAddr>,
}

fn key(site: &str) -> String {
    format!("{PREFIX}{site}")
}

fn holder_of(record: &Value) -> Option<String> {
    record
        .get("server")
        .and_then(Value::as_str)
        .map(String::from)
}

impl Links {
    pub fn new(api: Arc<ApiServer>, me: Option<SocketAddr>) -> Links {
        Links { api, me }
    }

    fn me(&self) -> String {
        self.me.map_or_else(|| "local".into(), |a| a.to_string())
    }

    /// The servers whose records count: this one and the live ones.
    fn live_servers(&self) -> Vec<String> {
        let mut live: Vec<String> = apiserver_lite::api_endpoints::servers(&self.api)
            .iter()
            .map(ToString::to_string)
            .collect();
        live.push(self.me());
        live
    }

    /// Forgets the records of this server's earlier run: it holds no link yet.
    pub async fn forget_mine(&self) -> Result<(), StorageError> {
        let listing = self.api.storage.list(PREFIX, None, None).await?;
        for item in listing.items {
            if holder_of(&item.value()?).as_deref() == Some(self.me().as_str()) {
                let _ = self
                    .api
                    .storage
                    .delete(&item.key, Some(item.revision))
                    .await;
            }
        }
        Ok(())
    }

    /// Records that this server holds `site`'s link.
    pub async fn attached(&self, site: &str) -> Result<(), StorageError> {
        let record = json!({"server": self.me(), "since": chrono::Utc::now().to_rfc3339()});
        let storage = &self.api.storage;
        match storage.get(&key(site)).await? {
            None => match storage.create(&key(site), record).await {
                Ok(_) | Err(StorageError::AlreadyExists(_)) => Ok(()),
                Err(e) => Err(e),
            },
            Some(held) => storage
                .update(&key(site), record, Some(held.revision))
                .await
                .map(|_| ()),
        }
    }

    /// Removes the record of `site`'s link if this server still holds it.
    pub async fn detached(&self, site: &str) {
        let storage = &self.api.storage;
        if let Ok(Some(held)) = storage.get(&key(site)).await
            && holder_of(&held.object).as_deref() == Some(self.me().as_str())
        {
            let _ = storage.delete(&key(site), Some(held.revision)).await;
        }
    }

    /// The live server that holds `site`'s link, when it is another one.
    pub async fn elsewhere(&self, site: &str) -> Option<SocketAddr> {
        let held = self.api.storage.get(&key(site)).await.ok()??;
        let server = holder_of(&held.object)?;
        if server == self.me() || !self.live_servers().contains(&server) {
            return None;
        }
        server.parse().ok()
    }

    /// The sites whose links a live server holds.
    pub async fn linked(&self) -> Result<HashMap<String, String>, StorageError> {
        let listing = self.api.storage.list(PREFIX, None, None).await?;
        let live = self.live_servers();
        let mut out = HashMap::new();
        for item in listing.items {
            if let Some(server) = holder_of(&item.value()?)
                && live.contains(&server)
            {
                out.insert(item.key[PREFIX.len()..].to_string(), server);
            }
        }
        Ok(out)
    }
}
