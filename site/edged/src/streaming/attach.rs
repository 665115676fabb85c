//! `POST /attach/{namespace}/{pod}/{container}?stdin=&stdout=&stderr=&tty=`: joins the
//! container's main process. Its output is tapped from the log copier as it is read (so logs
//! and attached clients see the same bytes); its stdin, for containers with `stdin: true`, is a
//! FIFO the agent keeps open from the container's start. With `stdinOnce`, stdin closes when
//! the first attached client closes it. A client leaving never stops the container.
//! Frames as in `exec.rs`.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::broadcast;

use super::exec::{
    CLOSE, RESIZE, STATUS, STDERR, STDIN, STDOUT, channel_body, frame, params, target, text,
};
use crate::Agent;

type SharedStdin = Arc<tokio::sync::Mutex<Option<pipe::Sender>>>;

/// What an attach needs of a running container.
#[derive(Clone)]
pub struct Attachable {
    pub output: broadcast::Sender<(u8, Bytes)>,
    pub stdin: Option<SharedStdin>,
    pub stdin_once: bool,
    pub tty: bool,
}

/// The stdin FIFO of a container (next to its output FIFOs).
pub fn stdin_fifo(fifo_dir: &Path, id: &str) -> std::path::PathBuf {
    fifo_dir.join(format!("{id}-stdin"))
}

/// Makes (or, after an agent restart, reopens) a container's stdin FIFO and registers the
/// container for attach; returns the output tap for its log copier.
pub fn register(
    agent: &Agent,
    id: &str,
    stdin: Option<&Path>,
    stdin_once: bool,
    tty: bool,
) -> broadcast::Sender<(u8, Bytes)> {
    let output = broadcast::Sender::new(256);
    let stdin = stdin.and_then(|p| {
        if !p.exists() {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).ok()?;
        }
        let w = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(p)
            .ok()?;
        Some(Arc::new(tokio::sync::Mutex::new(Some(w))))
    });
    agent
        .attachable
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id.to_string(),
            Attachable {
                output: output.clone(),
                stdin,
                stdin_once,
                tty,
            },
        );
    output
}

pub fn unregister(agent: &Agent, id: &str) {
    agent
        .attachable
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(id);
}

pub async fn attach(
    State(agent): State<Arc<Agent>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let p = params(raw.as_deref());
    let id = match target(&agent, &ns, &pod, &container, &p).await {
        Ok(id) => id,
        Err(response) => return response,
    };
    let found = agent
        .attachable
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .cloned();
    let Some(target) = found else {
        return text(
            StatusCode::NOT_FOUND,
            format!("container {container} cannot be attached to (its output is not tapped yet)"),
        );
    };
    if p.stdin && target.stdin.is_none() {
        return text(
            StatusCode::BAD_REQUEST,
            format!("container {container} was not started with stdin: true; attach without -i"),
        );
    }
    let (out, response) = channel_body();
    let mut output = target.output.subscribe();
    let want_out = p.stdout;
    let want_err = p.stderr;
    tokio::spawn(async move {
        let mut input = super::exec::frames(body);
        let client_open = true;
        loop {
            tokio::select! {
                o = output.recv() => match o {
                    Ok((channel, data)) => {
                        let channel = if target.tty { STDOUT } else { channel };
                        let wanted = (channel == STDOUT && want_out) || (channel == STDERR && want_err);
                        if wanted && out.send(frame(channel, &data)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The container ended.
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                f = input.next(), if client_open => match f {
                    Some((STDIN, data)) => {
                        if let Some(s) = &target.stdin
                            && let Some(w) = s.lock().await.as_mut()
                        {
                            let _ = w.write_all(&data).await;
                        }
                    }
                    Some((RESIZE, data)) if target.tty => {
                        let size: Value = serde_json::from_slice(&data).unwrap_or_default();
                        let (w, h) = (size["Width"].as_u64().unwrap_or(0), size["Height"].as_u64().unwrap_or(0));
                        if w > 0 && h > 0 {
                            let _ = agent.runtime.resize_pty(&id, "", w as u32, h as u32).await;
                        }
                    }
                    Some((CLOSE, _)) if target.stdin_once => {
                        if let Some(s) = &target.stdin
                            && s.lock().await.take().is_some()
                        {
                            let _ = agent.runtime.close_stdin(&id, "").await;
                        }
                    }
                    Some(_) => {}
                    // The client left: the container goes on.
                    None => return,
                },
            }
        }
        let _ = out
            .send(frame(STATUS, json!({"exitCode": 0}).to_string().as_bytes()))
            .await;
    });
    Response::new(response)
}
