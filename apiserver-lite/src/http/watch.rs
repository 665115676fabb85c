//! Watch streams: `?watch=true` answers 200 and then one JSON event per line, flushed per event.
//!
//! A watch from "now" (`resourceVersion` unset, `""` or `"0"`) takes a cursor on the hub first and
//! then lists, so that no change falls between the list and the stream; synthetic ADDED events
//! carry the listed state. A watch from revision N replays the hub's window after N, or answers an
//! ERROR event with a 410 `Expired` Status when N is older than the window (or when the watcher
//! falls that far behind later). Selectors are applied per event, turning objects that enter or
//! leave the selection into ADDED and DELETED, as upstream does.
//!
//! Memory per watcher is bounded: the listed objects are encoded one at a time as the socket takes
//! them, and what waits between the encoder and the socket is at most [`BUFFER`] lines and
//! [`BUFFER_BYTES`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use chrono::Utc;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::ApiServer;
use super::body_response;
use super::list_options::{ListOptions, list_options};
use super::request::{Output, Query};
use crate::error::ApiError;
use crate::registry::ResourceInfo;
use crate::storage::{EventType, StorageError, WatchEvent, list_prefix};
use crate::tables;

/// Events buffered per watcher between the hub and the socket.
const BUFFER: usize = 256;
/// Bytes buffered per watcher between the hub and the socket (a larger event waits until the
/// buffer is empty, then goes alone).
const BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Events taken from the hub at once.
const BATCH: usize = 256;

/// The encoder's side of a watcher's buffer.
struct Outbox {
    tx: mpsc::Sender<(Bytes, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
}

impl Outbox {
    /// Queues `line` once the buffer has room; `Err` when the client has gone.
    async fn send(&self, line: Bytes) -> Result<(), ()> {
        let cost = line.len().clamp(1, BUFFER_BYTES) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| ())?;
        self.tx.send((line, permit)).await.map_err(|_| ())
    }
}
/// How often a watcher that allows bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(30);

struct Encoder {
    ctx_output: Output,
    info: Arc<crate::registry::ResourceInfo>,
    first_table: bool,
}

/// The object of an outgoing event: the stored text, or a tree when a selector needed one.
enum Payload {
    Raw(Arc<str>),
    Parsed(Value),
}

impl Encoder {
    fn object(&mut self, object: &Value) -> Value {
        match self.ctx_output {
            Output::Table => {
                let mut table = tables::object_table(&self.info, object, Utc::now());
                if !self.first_table {
                    table["columnDefinitions"] = Value::Null;
                }
                self.first_table = false;
                table
            }
            Output::PartialMetadata => tables::partial_metadata(object),
            _ => object.clone(),
        }
    }

    fn line(&mut self, kind: &str, payload: Payload) -> Bytes {
        if self.ctx_output == Output::Protobuf {
            let value = match payload {
                Payload::Parsed(v) => v,
                Payload::Raw(raw) => serde_json::from_str(&raw).unwrap_or(Value::Null),
            };
            return Self::raw(Output::Protobuf, kind, &value);
        }
        let mut bytes = match (self.ctx_output, payload) {
            (Output::Json | Output::Yaml, Payload::Raw(raw)) => {
                format!("{{\"type\":\"{kind}\",\"object\":{raw}}}").into_bytes()
            }
            (_, payload) => {
                let value = match payload {
                    Payload::Parsed(v) => v,
                    Payload::Raw(raw) => serde_json::from_str(&raw).unwrap_or(Value::Null),
                };
                let event = json!({"type": kind, "object": self.object(&value)});
                crate::go_json::to_vec(&event)
            }
        };
        bytes.push(b'\n');
        Bytes::from(bytes)
    }

    /// An event line as is: JSON, or a length-prefixed protobuf frame.
    fn raw(output: Output, kind: &str, object: &Value) -> Bytes {
        if output == Output::Protobuf {
            return Bytes::from(crate::protobuf::watch_frame(kind, object).unwrap_or_default());
        }
        let mut bytes = crate::go_json::to_vec(&json!({"type": kind, "object": object}));
        bytes.push(b'\n');
        Bytes::from(bytes)
    }

    fn bookmark(&self, revision: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": self.info.kind, "apiVersion": self.info.api_version(), "metadata": metadata});
        Self::raw(self.ctx_output, "BOOKMARK", &object)
    }
}

/// The event a watcher with these selectors sees for a committed change, if any. Without
/// selectors nothing is parsed.
fn translate(
    opts: &ListOptions,
    info: &crate::registry::ResourceInfo,
    selecting: bool,
    event: &WatchEvent,
) -> Option<(&'static str, Payload)> {
    let converting = info.stored_as.is_some();
    if !selecting && !converting {
        let kind = match event.event_type {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        };
        return Some((kind, Payload::Raw(event.object.clone())));
    }
    let viewed = |mut o: Value| {
        info.from_storage(&mut o);
        o
    };
    let object = viewed(event.object_value()?);
    let previous = || event.previous_value().map(viewed);
    let now_matches = |o: &Value| opts.matches(info, o);
    match event.event_type {
        EventType::Added => now_matches(&object).then_some(("ADDED", Payload::Parsed(object))),
        EventType::Modified => {
            let was = previous().is_some_and(|p| now_matches(&p));
            let is = now_matches(&object);
            match (was, is) {
                (true, true) => Some(("MODIFIED", Payload::Parsed(object))),
                (false, true) => Some(("ADDED", Payload::Parsed(object))),
                (true, false) => Some(("DELETED", Payload::Parsed(object))),
                (false, false) => None,
            }
        }
        EventType::Deleted => {
            let was = previous()
                .map(|p| now_matches(&p))
                .unwrap_or_else(|| now_matches(&object));
            was.then_some(("DELETED", Payload::Parsed(object)))
        }
    }
}

pub async fn watch(
    server: Arc<ApiServer>,
    info: Arc<ResourceInfo>,
    namespace: String,
    output: Output,
    query: &Query,
) -> Result<Response, ApiError> {
    let opts = list_options(&info, query)?;
    if output == Output::Protobuf && !crate::protobuf::supports(&info.api_version(), &info.kind) {
        return Err(ApiError::not_acceptable(crate::protobuf::CONTENT_TYPE));
    }
    let selecting = !opts.labels.is_empty() || !opts.fields.is_empty();
    let bookmarks = query.flag("allowWatchBookmarks")?;
    let send_initial = match query.get("sendInitialEvents") {
        None | Some("") => None,
        Some(_) => Some(query.flag("sendInitialEvents")?),
    };
    if send_initial == Some(true) && query.get("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::invalid(
            "ListOptions",
            "meta.k8s.io",
            "",
            vec![crate::error::Cause::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )],
        ));
    }
    let timeout = match query.number("timeoutSeconds")? {
        Some(t) if t > 0 => Duration::from_secs(t as u64),
        _ => Duration::from_secs(1800 + (uuid::Uuid::new_v4().as_u128() % 1800) as u64),
    };
    let rv = query.get("resourceVersion").unwrap_or("");
    let from_now = rv.is_empty() || rv == "0";
    let start: Option<u64> = if from_now {
        None
    } else {
        Some(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        )
    };
    let initial = match send_initial {
        Some(v) => v,
        None => from_now,
    };
    let (group, resource) = info.storage_resource();
    let prefix = list_prefix(group, resource, &namespace);
    let hub_storage = server.storage.clone();
    let (tx, rx) = mpsc::channel::<(Bytes, OwnedSemaphorePermit)>(BUFFER);
    let outbox = Outbox {
        tx,
        budget: Arc::new(Semaphore::new(BUFFER_BYTES)),
    };
    let mut encoder = Encoder {
        ctx_output: output,
        info: info.clone(),
        first_table: true,
    };
    let shutdown = server.shutdown.clone();

    // A resourceVersion newer than this server has seen: another server's write on its way
    // here (wait a moment, as upstream's watch cache does), or one the datastore never reached
    // (a restore took it back): the client relists.
    if let Some(wanted) = start
        && wanted > hub_storage.hub().latest()
        && tokio::time::timeout(Duration::from_secs(3), hub_storage.hub().wait_for(wanted))
            .await
            .is_err()
    {
        let current = hub_storage
            .current_revision()
            .await
            .map_err(|e| ApiError::service_unavailable(e.to_string()))?;
        if wanted > current {
            return Err(ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {wanted}, current: {current}"),
            ));
        }
    }
    // The cursor comes before the list so nothing is lost between the two.
    let mut cursor = match hub_storage.hub().cursor(start) {
        Ok(c) => c,
        Err(StorageError::Expired { requested, oldest }) => {
            // Upstream answers 200 and an ERROR event; clients relist.
            let status =
                ApiError::expired(format!("too old resource version: {requested} ({oldest})"))
                    .status();
            let line = Encoder::raw(output, "ERROR", &status);
            return Ok(body_response(
                StatusCode::OK,
                content_type(output),
                Body::from(line),
            ));
        }
        Err(e) => return Err(ApiError::internal(e.to_string())),
    };
    let mut last_sent = start.unwrap_or(0);
    let listing = if initial {
        let listing = hub_storage
            .list(&prefix, None, None)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        last_sent = last_sent.max(listing.revision);
        Some(listing)
    } else {
        if from_now {
            // What the cursor starts after: with several servers the datastore's revision may
            // be ahead of what this server's watch has published.
            last_sent = cursor.after;
        }
        None
    };

    tokio::spawn(async move {
        if let Some(listing) = listing {
            let revision = listing.revision;
            for item in listing.items {
                let line = if selecting || info.stored_as.is_some() {
                    let Ok(mut value) = item.value() else {
                        continue;
                    };
                    info.from_storage(&mut value);
                    if !opts.matches(&info, &value) {
                        continue;
                    }
                    encoder.line("ADDED", Payload::Parsed(value))
                } else {
                    encoder.line("ADDED", Payload::Raw(item.raw))
                };
                if outbox.send(line).await.is_err() {
                    return;
                }
            }
            if send_initial == Some(true)
                && outbox.send(encoder.bookmark(revision, true)).await.is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark_timer = tokio::time::interval(BOOKMARK_EVERY);
        bookmark_timer.tick().await;
        let mut pending = std::collections::VecDeque::new();
        loop {
            let event = if let Some(e) = pending.pop_front() {
                e
            } else {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = shutdown.cancelled() => return,
                    _ = outbox.tx.closed() => return,
                    _ = bookmark_timer.tick(), if bookmarks => {
                        if outbox.send(encoder.bookmark(last_sent, false)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    taken = cursor.next(hub_storage.hub(), BATCH) => match taken {
                        Ok(events) => {
                            pending.extend(events);
                            continue;
                        }
                        Err(StorageError::Expired { .. }) => {
                            let status = ApiError::expired("the watcher fell too far behind; relist and watch again").status();
                            let _ = outbox.send(Encoder::raw(encoder.ctx_output, "ERROR", &status)).await;
                            return;
                        }
                        Err(_) => return,
                    },
                }
            };
            if event.revision <= last_sent || !event.key.starts_with(&prefix) {
                continue;
            }
            last_sent = event.revision;
            if let Some((kind, payload)) = translate(&opts, &info, selecting, &event) {
                let line = encoder.line(kind, payload);
                if outbox.send(line).await.is_err() {
                    return;
                }
            }
        }
    });
    // A line's share of the byte budget is released once it is handed to the connection.
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|(line, _permit)| (Ok::<Bytes, Infallible>(line), rx))
    });
    Ok(body_response(
        StatusCode::OK,
        content_type(output),
        Body::from_stream(stream),
    ))
}

fn content_type(output: Output) -> &'static str {
    if output == Output::Protobuf {
        "application/vnd.kubernetes.protobuf;stream=watch"
    } else {
        "application/json"
    }
}
