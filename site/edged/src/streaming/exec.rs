//! `POST /exec/{namespace}/{pod}/{container}?command=..&stdin=&stdout=&stderr=&tty=`: runs a
//! process in the container (containerd exec, with the container's environment, user and
//! capabilities) and streams its stdio as frames (see `apiserver_lite::streams`): channel 0
//! stdin, 4 resize (`{"Width":w,"Height":h}`), 255 closes stdin; 1 stdout, 2 stderr, and a final
//! 3 with `{"exitCode": n}` or `{"error": ".."}`. When the request body ends before the process
//! does, the client is gone: the process is killed and removed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use crate::Agent;
use crate::pod_worker::{
    LABEL_ATTEMPT, LABEL_CONTAINER, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
};
use crate::runtime::containerd::{ExecIo, TaskState};

pub use link::frames::{CLOSE, RESIZE, STATUS, STDERR, STDIN, STDOUT, frame};

/// Splits a request body into frames (bounded: see [`link::frames::MAX_FRAME`]).
pub type Frames = link::frames::Frames<axum::body::BodyDataStream>;

/// The frames of `body`.
pub fn frames(body: Body) -> Frames {
    link::frames::Frames::new(body.into_data_stream())
}

#[derive(Default, Debug)]
pub struct Params {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    pub pod_uid: Option<String>,
}

pub fn params(raw: Option<&str>) -> Params {
    let mut p = Params::default();
    let yes = |v: &str| matches!(v, "true" | "1" | "True");
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "command" => p.command.push(v.into_owned()),
            "stdin" => p.stdin = yes(&v),
            "stdout" => p.stdout = yes(&v),
            "stderr" => p.stderr = yes(&v),
            "tty" => p.tty = yes(&v),
            "podUID" if !v.is_empty() => p.pod_uid = Some(v.into_owned()),
            _ => {}
        }
    }
    p
}

pub fn text(code: StatusCode, message: String) -> Response {
    (code, message).into_response()
}

/// The running container a session targets, or the kubelet's 404 for it.
pub async fn target(
    agent: &Agent,
    ns: &str,
    pod: &str,
    container: &str,
    p: &Params,
) -> Result<String, Response> {
    running_container(agent, ns, pod, container, p.pod_uid.as_deref())
        .await
        .ok_or_else(|| {
            text(
                StatusCode::NOT_FOUND,
                format!("container not found (\"{container}\")"),
            )
        })
}

/// The running containerd container of `container` in the pod (its newest attempt).
pub async fn running_container(
    agent: &Agent,
    namespace: &str,
    pod: &str,
    container: &str,
    uid: Option<&str>,
) -> Option<String> {
    let mut filter = vec![
        (LABEL_POD_NAMESPACE, namespace),
        (LABEL_POD_NAME, pod),
        (LABEL_CONTAINER, container),
    ];
    if let Some(uid) = uid {
        filter.push((LABEL_POD_UID, uid));
    }
    let mut found = agent.runtime.list_containers(&filter).await.ok()?;
    found.sort_by_key(|c| {
        std::cmp::Reverse(
            c.labels
                .get(LABEL_ATTEMPT)
                .and_then(|a| a.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    for c in found {
        if let Ok(Some(TaskState::Running { .. })) = agent.runtime.task_state(&c.id).await {
            return Some(c.id);
        }
    }
    None
}

fn mkfifo(path: &std::path::Path) -> std::io::Result<()> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| std::io::Error::other(format!("mkfifo {}: {e}", path.display())))
}

/// The body of a streaming response fed by a channel.
pub fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (tx, Body::from_stream(stream))
}

/// Copies a FIFO into frames of `channel` until it is idle after the process ended.
/// Forwards what the process writes on `rx` as frames of `channel` (`None`: read and dropped,
/// for the stream the client did not ask for).
async fn pump(
    mut rx: pipe::Receiver,
    channel: Option<u8>,
    out: mpsc::Sender<Bytes>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let r = if *exited.borrow() {
            match tokio::time::timeout(Duration::from_millis(100), rx.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = rx.read(&mut buf) => r,
                _ = exited.changed() => continue,
            }
        };
        match r {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(channel) = channel
                    && out.send(frame(channel, &buf[..n])).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

pub async fn exec(
    State(agent): State<Arc<Agent>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let p = params(raw.as_deref());
    if p.command.is_empty() {
        return text(StatusCode::BAD_REQUEST, "no command given".into());
    }
    let id = match target(&agent, &ns, &pod, &container, &p).await {
        Ok(id) => id,
        Err(response) => return response,
    };
    let spec = agent.runtime.container_spec(&id).await.unwrap_or_default();
    let mut process = match spec.get("process") {
        Some(Value::Object(o)) => Value::Object(o.clone()),
        _ => json!({"cwd": "/", "user": {"uid": 0, "gid": 0},
                    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
    };
    process["args"] = json!(p.command);
    process["terminal"] = json!(p.tty);
    if let Some(o) = process.as_object_mut() {
        o.remove("consoleSize");
    }
    let exec_id = format!("exec-{}", uuid::Uuid::new_v4().simple());
    let dir = agent.config.root.join("exec");
    // Without a terminal the shim opens stdout and stderr together, and an empty path for one
    // of them fails (`opening file ""`): when the client wants only one, the other is a FIFO
    // too, read and dropped.
    let output = !p.tty && (p.stdout || p.stderr);
    let paths = Fifos {
        stdin: p.stdin.then(|| dir.join(format!("{exec_id}-stdin"))),
        stdout: (p.stdout || output).then(|| dir.join(format!("{exec_id}-stdout"))),
        stderr: output.then(|| dir.join(format!("{exec_id}-stderr"))),
    };
    let forward = (p.stdout.then_some(STDOUT), p.stderr.then_some(STDERR));
    let opened = paths.open(&dir);
    let (stdin, stdout, stderr) = match opened {
        Ok(x) => x,
        Err(e) => {
            paths.remove();
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("exec: {e}"));
        }
    };
    let started = agent
        .runtime
        .exec_with(
            &id,
            &exec_id,
            serde_json::to_vec(&process).unwrap_or_default(),
            ExecIo {
                stdin: paths.stdin.as_deref(),
                stdout: paths.stdout.as_deref(),
                stderr: paths.stderr.as_deref(),
                terminal: p.tty,
            },
        )
        .await;
    let (out, response) = channel_body();
    if let Err(e) = started {
        let _ = agent.runtime.delete_exec(&id, &exec_id).await;
        paths.remove();
        let _ = out
            .send(frame(
                STATUS,
                json!({"error": e.to_string()}).to_string().as_bytes(),
            ))
            .await;
        return Response::new(response);
    }
    tokio::spawn(session(
        agent,
        id,
        exec_id,
        paths,
        Stdio {
            stdin,
            stdout: stdout.map(|rx| (rx, forward.0)),
            stderr: stderr.map(|rx| (rx, forward.1)),
        },
        body,
        out,
    ));
    Response::new(response)
}

pub struct Fifos {
    pub stdin: Option<PathBuf>,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
}

/// Our ends of an exec process's stdio, with the channel each output goes to (`None`: read and
/// dropped).
struct Stdio {
    stdin: Option<pipe::Sender>,
    stdout: Option<(pipe::Receiver, Option<u8>)>,
    stderr: Option<(pipe::Receiver, Option<u8>)>,
}

type Opened = (
    Option<pipe::Sender>,
    Option<pipe::Receiver>,
    Option<pipe::Receiver>,
);

impl Fifos {
    /// Makes the FIFOs and opens our ends (read-write, so opening never waits for the shim).
    fn open(&self, dir: &std::path::Path) -> std::io::Result<Opened> {
        std::fs::create_dir_all(dir)?;
        for p in [&self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .flatten()
        {
            mkfifo(p)?;
        }
        let receiver = |p: &Option<PathBuf>| -> std::io::Result<Option<pipe::Receiver>> {
            p.as_ref()
                .map(|p| pipe::OpenOptions::new().read_write(true).open_receiver(p))
                .transpose()
        };
        let stdin = self
            .stdin
            .as_ref()
            .map(|p| pipe::OpenOptions::new().read_write(true).open_sender(p))
            .transpose()?;
        Ok((stdin, receiver(&self.stdout)?, receiver(&self.stderr)?))
    }

    fn remove(&self) {
        for p in [&self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn session(
    agent: Arc<Agent>,
    id: String,
    exec_id: String,
    paths: Fifos,
    Stdio {
        stdin,
        stdout,
        stderr,
    }: Stdio,
    body: Body,
    out: mpsc::Sender<Bytes>,
) {
    let (exited_tx, exited) = watch::channel(false);
    let mut pumps = Vec::new();
    for (rx, channel) in [stdout, stderr].into_iter().flatten() {
        pumps.push(tokio::spawn(pump(rx, channel, out.clone(), exited.clone())));
    }
    let wait = {
        let agent = agent.clone();
        let (id, exec_id) = (id.clone(), exec_id.clone());
        tokio::spawn(async move { agent.runtime.wait_exec(&id, &exec_id).await })
    };
    tokio::pin!(wait);
    let mut input = frames(body);
    let mut stdin = stdin;
    let mut client_open = true;
    let code = loop {
        tokio::select! {
            r = &mut wait => break r.ok().and_then(|r| r.ok()),
            f = input.next(), if client_open => match f {
                Some((STDIN, data)) => {
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some((RESIZE, data)) => {
                    let size: Value = serde_json::from_slice(&data).unwrap_or_default();
                    let (w, h) = (size["Width"].as_u64().unwrap_or(0), size["Height"].as_u64().unwrap_or(0));
                    if w > 0 && h > 0 {
                        let _ = agent.runtime.resize_pty(&id, &exec_id, w as u32, h as u32).await;
                    }
                }
                Some((CLOSE, _)) => {
                    if stdin.take().is_some() {
                        let _ = agent.runtime.close_stdin(&id, &exec_id).await;
                    }
                }
                Some(_) => {}
                None => {
                    // The client is gone: the process goes too.
                    client_open = false;
                    tracing::debug!(container = %id, exec = %exec_id, "exec client left; killing the process");
                    let _ = agent.runtime.kill_exec(&id, &exec_id, libc::SIGKILL).await;
                }
            },
        }
    };
    drop(stdin);
    // The shim may still be copying the last output into our FIFOs when the exit is reported
    // (under load, for longer than the pumps' idle wait); deleting the process waits for its
    // copies to end, so the pumps drain only after that.
    let _ = agent.runtime.delete_exec(&id, &exec_id).await;
    let _ = exited_tx.send(true);
    for p in pumps {
        let _ = p.await;
    }
    let status = match code {
        Some(c) => json!({"exitCode": c}),
        None => json!({"error": "the exec process could not be waited for"}),
    };
    let _ = out.send(frame(STATUS, status.to_string().as_bytes())).await;
    drop(out);
    paths.remove();
}
