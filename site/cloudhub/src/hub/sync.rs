//! Hub -> site: a connected site's Works, reliably. The site keeps one cursor, the hub revision
//! up to which it applied everything meant for it; the hub watches the site's namespace from
//! there and sends the latest version of each Work that changed (deletions included) in
//! batches, waiting for the site's answer (after its API committed) before the next. When the
//! cursor has left the hub's watch window (410), the hub sends all of the site's Works and the
//! site removes whatever else it holds from the hub. Objects that did not change are not sent,
//! so nothing at the site restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, DynamicObject, ListParams, WatchEvent, WatchParams};
use serde_json::Value;

use crate::protocol::{
    CURSOR_PATH, Cursor, HOLDINGS_PATH, Holdings, SYNC_PATH, SyncBatch, SyncReply,
};

/// How long changes are gathered into one batch.
const GATHER: Duration = Duration::from_millis(50);
/// Most Works in one batch.
const BATCH: usize = 256;
/// The longest a site's answer to a batch may take.
const ANSWER: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the site: {0}")]
    Site(String),
    #[error("the hub's API: {0}")]
    Hub(#[from] kube::Error),
    #[error("the cursor left the hub's window")]
    Expired,
}

async fn call<T: serde::de::DeserializeOwned>(
    peer: &link::accept::Peer<Body>,
    request: http::Request<Body>,
) -> Result<T, SyncError> {
    let response = tokio::time::timeout(ANSWER, peer.call(request))
        .await
        .map_err(|_| SyncError::Site("no answer".into()))?
        .map_err(|e| SyncError::Site(e.to_string()))?;
    let status = response.status();
    let body = axum::body::to_bytes(Body::new(response.into_body()), 1024 * 1024)
        .await
        .map_err(|e| SyncError::Site(e.to_string()))?;
    if !status.is_success() {
        return Err(SyncError::Site(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body).map_err(|e| SyncError::Site(e.to_string()))
}

async fn send(peer: &link::accept::Peer<Body>, batch: &SyncBatch) -> Result<u64, SyncError> {
    let body = serde_json::to_vec(batch).map_err(|e| SyncError::Site(e.to_string()))?;
    let request = http::Request::post(SYNC_PATH)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .map_err(|e| SyncError::Site(e.to_string()))?;
    let reply: SyncReply = call(peer, request).await?;
    Ok(reply.revision)
}

/// Keeps `site` in step with its Works until the link closes (the caller drops this future).
pub async fn run(site: String, peer: link::accept::Peer<Body>, client: kube::Client) {
    let namespace = super::placement::site_namespace(&site);
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &crate::crds::work());
    let request = http::Request::get(CURSOR_PATH)
        .body(Body::empty())
        .unwrap_or_default();
    let mut cursor = match call::<Cursor>(&peer, request).await {
        Ok(c) => c.revision,
        Err(error) => {
            tracing::warn!(%site, %error, "sync: the site's cursor");
            return;
        }
    };
    tracing::info!(%site, cursor, "sync: the site's cursor");
    let mut expired = false;
    loop {
        let result = if cursor == 0 {
            full(&site, &peer, &api).await
        } else if expired {
            differences(&site, &peer, &api).await
        } else {
            follow(&site, &peer, &client, &api, cursor).await
        };
        expired = false;
        match result {
            Ok(at) => cursor = at,
            Err(SyncError::Expired) => {
                tracing::info!(%site, cursor, "sync: the cursor left the window; comparing what the site holds");
                expired = true;
            }
            Err(error) => {
                tracing::warn!(%site, %error, "sync");
                tokio::time::sleep(Duration::from_secs(2)).await;
                if peer.is_closed() {
                    return;
                }
            }
        }
    }
}

/// The revision a list was read at.
fn list_revision(list: &kube::core::ObjectList<DynamicObject>) -> u64 {
    list.metadata
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// All of the site's Works: the new cursor.
async fn full(
    site: &str,
    peer: &link::accept::Peer<Body>,
    api: &Api<DynamicObject>,
) -> Result<u64, SyncError> {
    let list = api.list(&ListParams::default()).await?;
    let revision = list_revision(&list);
    let works: Vec<Value> = list
        .items
        .iter()
        .map(|w| serde_json::to_value(w).unwrap_or_default())
        .collect();
    let count = works.len();
    let batch = SyncBatch {
        full: true,
        revision,
        works,
        deleted: Vec::new(),
    };
    let at = send(peer, &batch).await?;
    tracing::info!(%site, works = count, revision = at, "sync: sent all Works");
    Ok(at)
}

/// The Works that differ from what the site holds, and the deletions: the new cursor.
async fn differences(
    site: &str,
    peer: &link::accept::Peer<Body>,
    api: &Api<DynamicObject>,
) -> Result<u64, SyncError> {
    let request = http::Request::get(HOLDINGS_PATH)
        .body(Body::empty())
        .unwrap_or_default();
    let held: Holdings = call(peer, request).await?;
    let list = api.list(&ListParams::default()).await?;
    let revision = list_revision(&list);
    let mut batch = SyncBatch {
        full: false,
        revision,
        ..SyncBatch::default()
    };
    let mut wanted = std::collections::BTreeSet::new();
    for work in &list.items {
        let name = work.metadata.name.clone().unwrap_or_default();
        if held.works.get(&name) != work.metadata.resource_version.as_ref() {
            batch
                .works
                .push(serde_json::to_value(work).unwrap_or_default());
        }
        wanted.insert(name);
    }
    for name in held.works.keys().filter(|n| !wanted.contains(*n)) {
        batch
            .deleted
            .push(serde_json::json!({"metadata": {"name": name}}));
    }
    let (changed, removed, total) = (batch.works.len(), batch.deleted.len(), list.items.len());
    let at = send(peer, &batch).await?;
    tracing::info!(%site, changed, removed, total, revision = at, "sync: sent what differs from what the site holds");
    Ok(at)
}

/// The site's Works changed after `cursor`, as a stream of watch events. Read line by line
/// with no buffer of its own while idle: a thousand idle sites' watches hold no read buffers.
async fn watch(
    client: &kube::Client,
    api: &Api<DynamicObject>,
    cursor: u64,
) -> Result<impl futures::Stream<Item = Result<WatchEvent<DynamicObject>, SyncError>>, SyncError> {
    let params = WatchParams::default().timeout(290);
    let request = kube::core::Request::new(api.resource_url())
        .watch(&params, &cursor.to_string())
        .map_err(|e| SyncError::Hub(kube::Error::BuildRequest(e)))?;
    let reader = match client.request_stream(request).await {
        Ok(reader) => reader,
        Err(kube::Error::Api(e)) if e.code == 410 => return Err(SyncError::Expired),
        Err(e) => return Err(e.into()),
    };
    Ok(futures::stream::unfold(
        Box::pin(reader),
        |mut reader| async move {
            use futures::AsyncBufReadExt;
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) => return None,
                    Ok(_) if line.iter().all(u8::is_ascii_whitespace) => continue,
                    Ok(_) => {
                        let event = serde_json::from_slice::<WatchEvent<DynamicObject>>(&line)
                            .map_err(|e| SyncError::Hub(kube::Error::SerdeError(e)));
                        return Some((event, reader));
                    }
                    Err(e) => {
                        return Some((Err(SyncError::Hub(kube::Error::ReadEvents(e))), reader));
                    }
                }
            }
        },
    ))
}

/// Changes after `cursor` until the watch ends: the new cursor.
async fn follow(
    site: &str,
    peer: &link::accept::Peer<Body>,
    client: &kube::Client,
    api: &Api<DynamicObject>,
    mut cursor: u64,
) -> Result<u64, SyncError> {
    let mut stream = std::pin::pin!(watch(client, api, cursor).await?);
    loop {
        // Wait for a change, then gather what follows it for a moment.
        let Some(first) = stream.try_next().await? else {
            return Ok(cursor);
        };
        let mut events = vec![first];
        let deadline = tokio::time::Instant::now() + GATHER;
        while events.len() < BATCH {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(event)) => events.push(event?),
                Ok(None) | Err(_) => break,
            }
        }
        let mut latest: BTreeMap<String, (bool, Value)> = BTreeMap::new();
        let mut revision = cursor;
        for event in events {
            let (deleted, object) = match event {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => (false, o),
                WatchEvent::Deleted(o) => (true, o),
                WatchEvent::Bookmark(b) => {
                    revision = revision.max(b.metadata.resource_version.parse().unwrap_or(0));
                    continue;
                }
                WatchEvent::Error(e) if e.code == 410 => return Err(SyncError::Expired),
                WatchEvent::Error(e) => {
                    return Err(SyncError::Hub(kube::Error::Api(e)));
                }
            };
            revision = revision.max(
                object
                    .metadata
                    .resource_version
                    .as_deref()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
            );
            let name = object.metadata.name.clone().unwrap_or_default();
            latest.insert(
                name,
                (deleted, serde_json::to_value(&object).unwrap_or_default()),
            );
        }
        if latest.is_empty() {
            cursor = revision;
            continue;
        }
        let mut batch = SyncBatch {
            full: false,
            revision,
            ..SyncBatch::default()
        };
        for (_, (deleted, work)) in latest {
            if deleted {
                batch.deleted.push(work);
            } else {
                batch.works.push(work);
            }
        }
        let (changed, removed) = (batch.works.len(), batch.deleted.len());
        cursor = send(peer, &batch).await?;
        tracing::debug!(%site, changed, removed, cursor, "sync: batch applied");
    }
}
