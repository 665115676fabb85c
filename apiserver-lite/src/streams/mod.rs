//! `pods/exec`, `pods/attach` and `pods/portforward`: the client's upgraded connection is
//! terminated here and bridged to the pod's node agent over the node's connection
//! ([`crate::node_streams`]: in process, or the tunnel a remote agent dialled out), so agents
//! behind NAT are reachable.
//!
//! Client side, the protocols kubectl and the client libraries speak (REFERENCE.md §1):
//! - WebSocket with subprotocol `v5.channel.k8s.io` or `v4.channel.k8s.io` for exec/attach
//!   (kubectl 1.30+, the Python client): binary messages whose first byte is the channel (0
//!   stdin, 1 stdout, 2 stderr, 3 status, 4 resize, 255 close in v5); also upstream's older
//!   `channel.k8s.io` (or no subprotocol), and the text forms `base64.channel.k8s.io` and
//!   `v4.base64.channel.k8s.io` (each message the channel as an ASCII digit, then the data in
//!   base64). Before v4 the status channel carries a failure's message as plain text, and
//!   nothing on success;
//! - SPDY/3.1 (`spdy.rs`) with `X-Stream-Protocol-Version: v4.channel.k8s.io` for exec/attach
//!   (kubectl's fallback, and all kubectl 1.20 speaks): one stream per channel; the older
//!   `v3.channel.k8s.io`, `v2.channel.k8s.io` and `channel.k8s.io` as upstream (plain-text
//!   errors);
//! - SPDY/3.1 with `portforward.k8s.io` for port-forward, plain or carried inside a WebSocket
//!   (subprotocol `SPDY/3.1+portforward.k8s.io`, kubectl 1.31+): an error and a data stream
//!   per forwarded connection;
//! - WebSocket channel framing for port-forward (`v4.channel.k8s.io` or `portforward.k8s.io`,
//!   the Python clients, kr8s, client-node; `v4.base64.channel.k8s.io` in text): the `ports` of
//!   the query, one connection each, on data channel `2i` and error channel `2i+1`, each
//!   channel's first message the port number.
//!
//! Node side, one HTTP request per session with full-duplex streaming bodies:
//! `POST /exec/{ns}/{pod}/{container}` and `/attach/...` carry [`frame`]s (the same channel
//! numbers; channel 3 from the node is `{"exitCode": n}` or `{"error": "..."}`), and
//! `POST /portForward/{ns}/{pod}?port=N` carries the raw bytes of one TCP connection. Closing
//! the request body tells the agent the client is gone (it kills the exec process).

pub mod spdy;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::error::ApiError;
use crate::node_streams::NodeConnection;

pub use link::frames::{CLOSE, Frames, RESIZE, STATUS, STDERR, STDIN, STDOUT, frame};

/// How long a SPDY client may take to open the streams it announced.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(30);

type BodySender = futures::channel::mpsc::Sender<Result<Bytes, Infallible>>;

/// A streaming request body and its sender.
fn body_channel() -> (BodySender, Body) {
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, Infallible>>(16);
    (tx, Body::from_stream(rx))
}

/// The client's transport, from its upgrade request.
enum Transport {
    WebSocket { key: String, protocol: String },
    Spdy { protocol: String },
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::WebSocket { protocol, .. } => write!(f, "WebSocket ({protocol})"),
            Transport::Spdy { protocol } => write!(f, "SPDY/3.1 ({protocol})"),
        }
    }
}

fn header_values(headers: &HeaderMap, name: header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn negotiate(
    headers: &HeaderMap,
    websocket: &[&str],
    spdy: &[&str],
) -> Result<Transport, ApiError> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if upgrade == "websocket" {
        let key = headers
            .get("sec-websocket-key")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))?
            .to_string();
        let offered = header_values(headers, header::SEC_WEBSOCKET_PROTOCOL);
        // Our preference order, among what the client offers; `""` in ours accepts a client
        // that offers none (upstream's pre-v4 binary framing).
        let protocol = websocket
            .iter()
            .find(|p| offered.iter().any(|o| o == *p) || (p.is_empty() && offered.is_empty()))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unable to upgrade: none of the offered WebSocket subprotocols {offered:?} is supported (supported: {websocket:?})"
                ))
            })?;
        return Ok(Transport::WebSocket {
            key,
            protocol: protocol.to_string(),
        });
    }
    if upgrade.starts_with("spdy/3.1") {
        let offered = header_values(
            headers,
            header::HeaderName::from_static("x-stream-protocol-version"),
        );
        let protocol = spdy
            .iter()
            .find(|p| offered.iter().any(|o| o == *p))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unable to upgrade: none of the offered stream protocols {offered:?} is supported (supported: {spdy:?})"
                ))
            })?;
        return Ok(Transport::Spdy {
            protocol: protocol.to_string(),
        });
    }
    Err(ApiError::bad_request(
        "Upgrade request required: use kubectl, or a WebSocket (v5.channel.k8s.io) or SPDY/3.1 client",
    ))
}

fn accept_key(key: &str) -> String {
    use base64::Engine;
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn switching(transport: &Transport) -> Response<Body> {
    let mut r = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    match transport {
        Transport::WebSocket { key, protocol } => {
            r = r
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "Upgrade")
                .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(key));
            if !protocol.is_empty() {
                r = r.header(header::SEC_WEBSOCKET_PROTOCOL, protocol.as_str());
            }
        }
        Transport::Spdy { protocol } => {
            r = r
                .header(header::UPGRADE, "SPDY/3.1")
                .header(header::CONNECTION, "Upgrade")
                .header("X-Stream-Protocol-Version", protocol.as_str());
        }
    }
    r.body(Body::empty())
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The node's answer to a non-streaming failure (plain text) as a Status.
async fn node_error(response: Response<Body>) -> ApiError {
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&bytes).trim().to_string();
    match status.as_u16() {
        400 | 404 => ApiError::bad_request(message),
        _ => ApiError::internal(message),
    }
}

fn command_of(raw_query: Option<&str>) -> Vec<String> {
    form_urlencoded::parse(raw_query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// What an exec or attach session asks for.
#[derive(Clone, Copy, Debug)]
pub struct Wants {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// The Status a client gets on channel 3 for the node's `{"exitCode": n}` / `{"error": ..}`.
pub fn exit_status(node: &Value, command: &[String]) -> Value {
    if let Some(code) = node["exitCode"].as_i64() {
        if code == 0 {
            return json!({"metadata": {}, "status": "Success"});
        }
        return json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}
        });
    }
    let message = node["error"]
        .as_str()
        .unwrap_or("the node agent ended the session");
    json!({
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500
    })
}

/// `pods/exec` and `pods/attach` for `pod` (the stored object), on its node's connection.
#[allow(clippy::too_many_arguments)]
pub async fn exec(
    connection: Arc<dyn NodeConnection>,
    namespace: &str,
    pod: &str,
    uid: &str,
    container: &str,
    attach: bool,
    wants: Wants,
    raw_query: Option<&str>,
    mut request: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let command = command_of(raw_query);
    if !attach && command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    if !(wants.stdin || wants.stdout || wants.stderr) {
        return Err(ApiError::bad_request(
            "you must specify at least one of stdin, stdout, stderr",
        ));
    }
    let transport = negotiate(
        request.headers(),
        &[
            "v5.channel.k8s.io",
            "v4.channel.k8s.io",
            "v4.base64.channel.k8s.io",
            "channel.k8s.io",
            "base64.channel.k8s.io",
            "",
        ],
        &[
            "v4.channel.k8s.io",
            "v3.channel.k8s.io",
            "v2.channel.k8s.io",
            "channel.k8s.io",
        ],
    )?;
    // Ask the node first: a missing container is an HTTP error the client can print.
    let query = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for c in &command {
            q.append_pair("command", c);
        }
        for (k, v) in [
            ("stdin", wants.stdin),
            ("stdout", wants.stdout),
            ("stderr", wants.stderr && !wants.tty),
            ("tty", wants.tty),
        ] {
            q.append_pair(k, if v { "true" } else { "false" });
        }
        q.append_pair("podUID", uid);
        q.finish()
    };
    let path = format!(
        "/{}/{namespace}/{pod}/{container}?{query}",
        if attach { "attach" } else { "exec" }
    );
    let (to_node, body) = body_channel();
    let node_request = Request::builder()
        .method("POST")
        .uri(path)
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let response = connection
        .call(node_request)
        .await
        .map_err(|e| ApiError::service_unavailable(format!("the pod's node agent failed: {e}")))?;
    if !response.status().is_success() {
        return Err(node_error(response).await);
    }
    let from_node = Frames::new(response.into_body().into_data_stream());
    tracing::info!(
        pod = %format!("{namespace}/{pod}"),
        container,
        tty = wants.tty,
        "{} session over {transport}",
        if attach { "attach" } else { "exec" }
    );
    let on_upgrade = hyper::upgrade::on(&mut request);
    let reply = switching(&transport);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!("exec upgrade failed: {e}");
                return;
            }
        };
        match transport {
            Transport::WebSocket { protocol, .. } => {
                let ws = WebSocketStream::from_raw_socket(
                    upgraded,
                    Role::Server,
                    Some(websocket_config()),
                )
                .await;
                websocket_exec(ws, &protocol, to_node, from_node, command).await;
            }
            Transport::Spdy { protocol } => {
                let statuses = protocol == "v4.channel.k8s.io";
                spdy_exec(upgraded, wants, statuses, to_node, from_node, command).await
            }
        }
    });
    Ok(reply)
}

/// How a WebSocket subprotocol frames its channels: a binary message whose first byte is the
/// channel, or (`*base64*`) a text message whose first character is the channel as an ASCII
/// digit (`'0' + channel`), then the data in standard base64.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Channels {
    base64: bool,
}

impl Channels {
    fn of(protocol: &str) -> Self {
        Channels {
            base64: protocol.contains("base64"),
        }
    }

    fn message(self, channel: u8, data: &[u8]) -> Message {
        use base64::Engine;
        if self.base64 {
            let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
            text.push(char::from(b'0'.wrapping_add(channel)));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            return Message::text(text);
        }
        let mut bytes = Vec::with_capacity(data.len() + 1);
        bytes.push(channel);
        bytes.extend_from_slice(data);
        Message::binary(bytes)
    }

    /// A client message's channel and data; `None` for a message that carries none (empty,
    /// control, or base64 that does not decode).
    fn read(self, message: &Message) -> Option<(u8, Bytes)> {
        use base64::Engine;
        let raw: &[u8] = match message {
            Message::Binary(b) => b,
            Message::Text(t) => t.as_bytes(),
            _ => return None,
        };
        let (&first, rest) = raw.split_first()?;
        if self.base64 {
            let data = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            return Some((first.wrapping_sub(b'0'), Bytes::from(data)));
        }
        Some((first, Bytes::copy_from_slice(rest)))
    }
}

async fn websocket_exec<IO, S, E>(
    ws: WebSocketStream<IO>,
    protocol: &str,
    mut to_node: BodySender,
    mut from_node: Frames<S>,
    command: Vec<String>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let channels = Channels::of(protocol);
    let v5 = protocol == "v5.channel.k8s.io";
    // From v4 the status channel carries a Status; before, a failure's message as text.
    let statuses = protocol.starts_with("v4.") || v5;
    let (mut sink, mut client) = ws.split();
    loop {
        tokio::select! {
            message = client.next() => {
                let message = match message {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(m)) => m,
                };
                let Some((channel, payload)) = channels.read(&message) else { continue };
                let forward = match channel {
                    STDIN | RESIZE => Some(frame(channel, &payload)),
                    CLOSE if v5 && payload.first() == Some(&STDIN) => Some(frame(CLOSE, &[STDIN])),
                    _ => None,
                };
                if let Some(f) = forward
                    && to_node.send(Ok(f)).await.is_err()
                {
                    return;
                }
            }
            f = from_node.next() => {
                let (channel, payload) = match f {
                    Some(x) => x,
                    None => (STATUS, Bytes::from_static(br#"{"error":"the node agent ended the session"}"#)),
                };
                match channel {
                    STDOUT | STDERR => {
                        let sent = sink.send(channels.message(channel, &payload)).await;
                        if sent.is_err() {
                            return;
                        }
                    }
                    STATUS => {
                        let node: Value = serde_json::from_slice(&payload).unwrap_or_default();
                        let status = exit_status(&node, &command);
                        if statuses {
                            let _ = sink.send(channels.message(STATUS, status.to_string().as_bytes())).await;
                        } else if status["status"] != "Success" {
                            let text = status["message"].as_str().unwrap_or_default();
                            let _ = sink.send(channels.message(STATUS, text.as_bytes())).await;
                        }
                        let _ = sink.send(normal_close()).await;
                        // Let the client read the close; it closes the connection.
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            while let Some(Ok(_)) = client.next().await {}
                        })
                        .await;
                        return;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// `statuses`: the error stream carries a Status (v4); before v4, a failure's message as text.
async fn spdy_exec<IO, S, E>(
    io: IO,
    wants: Wants,
    statuses: bool,
    mut to_node: BodySender,
    mut from_node: Frames<S>,
    command: Vec<String>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let (mut streams, session) = spdy::serve(io);
    let mut error = None;
    let mut stdin = None;
    let mut stdout = None;
    let mut stderr = None;
    let mut resize = None;
    let complete = |e: &Option<spdy::Stream>,
                    i: &Option<spdy::Stream>,
                    o: &Option<spdy::Stream>,
                    r: &Option<spdy::Stream>,
                    s: &Option<spdy::Stream>| {
        e.is_some()
            && (!wants.stdin || i.is_some())
            && (!wants.stdout || o.is_some())
            && (!wants.stderr || wants.tty || r.is_some())
            && (!wants.tty || s.is_some())
    };
    let deadline = tokio::time::Instant::now() + STREAMS_TIMEOUT;
    while !complete(&error, &stdin, &stdout, &stderr, &resize) {
        let s = match tokio::time::timeout_at(deadline, streams.recv()).await {
            Ok(Some(s)) => s,
            _ => {
                tracing::debug!("exec client did not open its streams");
                session.close_session().await;
                return;
            }
        };
        let kind = s.header("streamtype").unwrap_or("").to_string();
        match kind.as_str() {
            "error" => error = Some(s),
            "stdin" => stdin = Some(s),
            "stdout" => stdout = Some(s),
            "stderr" => stderr = Some(s),
            "resize" => resize = Some(s),
            _ => s.out.reset().await,
        }
    }
    let error = error.expect("complete");
    if let Some(mut s) = stdin {
        let mut tx = to_node.clone();
        tokio::spawn(async move {
            while let Some(data) = s.data.recv().await {
                if tx.send(Ok(frame(STDIN, &data))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Ok(frame(CLOSE, &[STDIN]))).await;
        });
    }
    if let Some(mut s) = resize {
        let mut tx = to_node.clone();
        tokio::spawn(async move {
            // A stream of JSON objects, one per size change.
            let mut pending = Vec::new();
            while let Some(data) = s.data.recv().await {
                pending.extend_from_slice(&data);
                let mut de = serde_json::Deserializer::from_slice(&pending).into_iter::<Value>();
                let mut used = 0;
                while let Some(Ok(v)) = de.next() {
                    used = de.byte_offset();
                    if tx
                        .send(Ok(frame(RESIZE, v.to_string().as_bytes())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                pending.drain(..used);
            }
        });
    }
    loop {
        tokio::select! {
            // The client hung up: dropping the node request ends the process.
            s = streams.recv() => match s {
                Some(extra) => extra.out.reset().await,
                None => return,
            },
            f = from_node.next() => {
                let (channel, payload) = match f {
                    Some(x) => x,
                    None => (STATUS, Bytes::from_static(br#"{"error":"the node agent ended the session"}"#)),
                };
                match channel {
                    STDOUT => { if let Some(s) = &stdout { s.out.send(payload).await; } }
                    STDERR => { if let Some(s) = &stderr { s.out.send(payload).await; } }
                    STATUS => {
                        let node: Value = serde_json::from_slice(&payload).unwrap_or_default();
                        let status = exit_status(&node, &command);
                        if status["status"] != "Success" {
                            let text = if statuses {
                                status.to_string()
                            } else {
                                status["message"].as_str().unwrap_or_default().to_string()
                            };
                            error.out.send(Bytes::from(text)).await;
                        }
                        for s in [&stdout, &stderr].into_iter().flatten() {
                            s.out.finish().await;
                        }
                        error.out.finish().await;
                        session.close_session().await;
                        let _ = to_node.close().await;
                        return;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// `pods/portforward` to the pod's node.
pub async fn port_forward(
    connection: Arc<dyn NodeConnection>,
    namespace: &str,
    pod: &str,
    uid: &str,
    mut request: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let transport = negotiate(
        request.headers(),
        &[
            "SPDY/3.1+portforward.k8s.io",
            "v4.channel.k8s.io",
            "v4.base64.channel.k8s.io",
            "portforward.k8s.io",
            "",
        ],
        &["portforward.k8s.io"],
    )?;
    // WebSocket channel framing names its ports in the query (`ports=80&ports=443` or `80,443`).
    let ports = match &transport {
        Transport::WebSocket { protocol, .. } if !protocol.starts_with("SPDY") => {
            let ports = query_ports(request.uri().query().unwrap_or(""))?;
            Some(ports)
        }
        _ => None,
    };
    tracing::info!(pod = %format!("{namespace}/{pod}"), "port-forward session over {transport}");
    let on_upgrade = hyper::upgrade::on(&mut request);
    let reply = switching(&transport);
    let (namespace, pod, uid) = (namespace.to_string(), pod.to_string(), uid.to_string());
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!("port-forward upgrade failed: {e}");
                return;
            }
        };
        let target = Target {
            connection,
            namespace,
            pod,
            uid,
        };
        match transport {
            Transport::Spdy { .. } => spdy_port_forward(upgraded, target).await,
            Transport::WebSocket { protocol, .. } if ports.is_some() => {
                let ws = WebSocketStream::from_raw_socket(
                    upgraded,
                    Role::Server,
                    Some(websocket_config()),
                )
                .await;
                let channels = Channels::of(&protocol);
                websocket_port_forward(ws, channels, target, ports.unwrap_or_default()).await;
            }
            Transport::WebSocket { .. } => {
                // SPDY frames inside WebSocket binary messages: unwrap into a byte stream.
                let ws = WebSocketStream::from_raw_socket(
                    upgraded,
                    Role::Server,
                    Some(websocket_config()),
                )
                .await;
                let (ours, theirs) = tokio::io::duplex(256 * 1024);
                tokio::spawn(websocket_bytes(ws, theirs));
                spdy_port_forward(ours, target).await;
            }
        }
    });
    Ok(reply)
}

/// The ports of a WebSocket port-forward request (`ports` to the API server, `port` to a
/// kubelet).
fn query_ports(query: &str) -> Result<Vec<u16>, ApiError> {
    let mut ports = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != "ports" && key != "port" {
            continue;
        }
        for port in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => ports.push(p),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid port {port:?}: must be 1-65535"
                    )));
                }
            }
        }
    }
    if ports.is_empty() {
        return Err(ApiError::bad_request(
            "query parameter \"ports\" is required for port-forwarding over WebSocket",
        ));
    }
    Ok(ports)
}

/// Port-forward in WebSocket channel framing (`v4.channel.k8s.io`, as the Python clients,
/// kr8s and client-node speak it): port `i` of the request has data channel `2i` and error
/// channel `2i+1`; each channel's first message from the server carries the port number (two
/// bytes, little-endian); every message starts with its channel byte.
async fn websocket_port_forward<IO>(
    ws: WebSocketStream<IO>,
    channels: Channels,
    target: Target,
    ports: Vec<u16>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let target = Arc::new(target);
    let (mut sink, mut stream) = ws.split();
    let (out, mut outgoing) = tokio::sync::mpsc::channel::<Message>(64);
    let frame = move |channel: usize, data: &[u8]| channels.message(channel as u8, data);
    let mut to_nodes = Vec::new();
    let mut tasks = Vec::new();
    for (i, port) in ports.iter().copied().enumerate() {
        for channel in [2 * i, 2 * i + 1] {
            if sink
                .send(frame(channel, &port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
        let (to_node, body) = body_channel();
        to_nodes.push(to_node);
        let (target, out) = (target.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            let failure = match target.open_port(port, body).await {
                Ok(r) => {
                    let mut from_node = r.into_body().into_data_stream();
                    while let Some(Ok(chunk)) = from_node.next().await {
                        if out.send(frame(2 * i, &chunk)).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                Err(message) => message,
            };
            let _ = out.send(frame(2 * i + 1, failure.as_bytes())).await;
        }));
    }
    drop(out);
    loop {
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(m)) => {
                    let Some((channel, data)) = channels.read(&m) else { continue };
                    let channel = usize::from(channel);
                    // Data for a port; what clients write on error channels is ignored.
                    if channel.is_multiple_of(2)
                        && let Some(to_node) = to_nodes.get_mut(channel / 2)
                        && to_node.send(Ok(data)).await.is_err()
                    {
                        tracing::debug!(channel, "port-forward: the pod connection is gone");
                    }
                }
            },
            m = outgoing.recv() => match m {
                Some(message) => {
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
                // Every port's connection has ended.
                None => {
                    let _ = sink.send(normal_close()).await;
                    break;
                }
            },
        }
    }
    for task in tasks {
        task.abort();
    }
}

/// Carries the bytes of a WebSocket's binary messages to and from `io`.
async fn websocket_bytes<IO>(ws: WebSocketStream<IO>, io: tokio::io::DuplexStream)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut read, mut write) = tokio::io::split(io);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if write.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            n = read.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = sink.send(normal_close()).await;
                    break;
                }
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
}

/// What a client's WebSocket messages may hold: one tunnel frame (1 MiB) and its channel byte.
/// (tungstenite's defaults buffer up to 64 MiB per message, per connection.)
pub fn websocket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let most = link::frames::MAX_FRAME + 1;
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(most))
        .max_frame_size(Some(most))
}

/// A close frame with status 1000: clients treat a close without a status (1005) as an error.
fn normal_close() -> Message {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// One TCP connection to `port` of a pod, through its node agent (the same path as
/// port-forward), as a byte stream.
pub async fn connect_pod(
    connection: Arc<dyn NodeConnection>,
    namespace: &str,
    pod: &str,
    uid: &str,
    port: u16,
) -> Result<link::pipe::BodyIo<Body>, String> {
    let target = Target {
        connection,
        namespace: namespace.to_string(),
        pod: pod.to_string(),
        uid: uid.to_string(),
    };
    let (writer, to_pod) = link::pipe::channel();
    let response = target.open_port(port, Body::new(to_pod)).await?;
    Ok(link::pipe::BodyIo::new(response.into_body(), writer))
}

struct Target {
    connection: Arc<dyn NodeConnection>,
    namespace: String,
    pod: String,
    uid: String,
}

impl Target {
    /// One connection to `port` of the pod through its node agent: `body` carries the client's
    /// bytes, the response body the pod's. The error is the message for the client.
    async fn open_port(&self, port: u16, body: Body) -> Result<Response<Body>, String> {
        let path = format!(
            "/portForward/{}/{}?port={port}&podUID={}",
            self.namespace, self.pod, self.uid
        );
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .body(body)
            .map_err(|e| e.to_string())?;
        match self.connection.call(request).await {
            Ok(r) if r.status().is_success() => Ok(r),
            Ok(r) => {
                let bytes = axum::body::to_bytes(r.into_body(), 64 * 1024)
                    .await
                    .unwrap_or_default();
                Err(format!(
                    "an error occurred forwarding {port}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ))
            }
            Err(e) => Err(format!("the pod's node agent failed: {e}")),
        }
    }
}

async fn spdy_port_forward<IO>(io: IO, target: Target)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let target = Arc::new(target);
    let (mut streams, _session) = spdy::serve(io);
    // requestID -> the error stream waiting for its data stream (or the other way round).
    let mut waiting: std::collections::HashMap<String, spdy::Stream> = Default::default();
    while let Some(s) = streams.recv().await {
        let kind = s.header("streamtype").unwrap_or("").to_string();
        let port = s.header("port").unwrap_or("").to_string();
        // kubectl before 1.7 sent no requestID: pair by port then.
        let id = s
            .header("requestid")
            .map(String::from)
            .unwrap_or_else(|| format!("port-{port}"));
        if kind != "error" && kind != "data" {
            s.out.reset().await;
            continue;
        }
        let Some(other) = waiting.remove(&id) else {
            waiting.insert(id, s);
            continue;
        };
        let (error, data) = if kind == "error" {
            (s, other)
        } else {
            (other, s)
        };
        tokio::spawn(forward_one(target.clone(), port, error, data));
    }
}

async fn forward_one(target: Arc<Target>, port: String, error: spdy::Stream, data: spdy::Stream) {
    let error = error.out;
    let spdy::Stream {
        data: mut from_client,
        out: to_client,
        ..
    } = data;
    let fail = async |message: String| {
        error.send(Bytes::from(message)).await;
        error.finish().await;
        to_client.finish().await;
    };
    let Ok(number) = port.parse::<u16>() else {
        fail(format!("invalid port {port:?}: must be 1-65535")).await;
        return;
    };
    let (mut to_node, body) = body_channel();
    let response = match target.open_port(number, body).await {
        Ok(r) => r,
        Err(message) => {
            fail(message).await;
            return;
        }
    };
    let upstream = tokio::spawn(async move {
        while let Some(chunk) = from_client.recv().await {
            if to_node.send(Ok(chunk)).await.is_err() {
                break;
            }
        }
        // The client closed its side: the node shuts down the pod connection's write half.
        let _ = to_node.close().await;
    });
    let mut from_node = response.into_body().into_data_stream();
    while let Some(Ok(chunk)) = from_node.next().await {
        if !to_client.send(chunk).await {
            break;
        }
    }
    to_client.finish().await;
    error.finish().await;
    upstream.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_channels_carry_the_channel_as_a_digit() {
        let text = Channels { base64: true };
        let m = text.message(STDOUT, b"hello\n");
        assert_eq!(m, Message::text("1aGVsbG8K"));
        assert_eq!(
            text.read(&Message::text("0aGVsbG8K")),
            Some((STDIN, Bytes::from_static(b"hello\n")))
        );
        assert_eq!(text.read(&Message::text("0not base64!")), None);
        assert_eq!(text.read(&Message::text("")), None);
        let binary = Channels { base64: false };
        assert_eq!(
            binary.message(STDERR, b"x"),
            Message::binary(vec![STDERR, b'x'])
        );
        assert_eq!(
            binary.read(&Message::binary(vec![STDIN, b'y'])),
            Some((STDIN, Bytes::from_static(b"y")))
        );
    }

    #[test]
    fn a_client_without_a_subprotocol_gets_the_binary_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        let t = negotiate(&headers, &["v4.channel.k8s.io", ""], &[]).unwrap();
        assert!(matches!(&t, Transport::WebSocket { protocol, .. } if protocol.is_empty()));
        let reply = switching(&t);
        assert!(
            reply
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .is_none()
        );
        // Without "" in ours, a client must offer one.
        assert!(negotiate(&headers, &["v4.channel.k8s.io"], &[]).is_err());
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "v4.base64.channel.k8s.io, channel.k8s.io".parse().unwrap(),
        );
        let t = negotiate(
            &headers,
            &[
                "v4.channel.k8s.io",
                "v4.base64.channel.k8s.io",
                "channel.k8s.io",
                "",
            ],
            &[],
        )
        .unwrap();
        assert!(
            matches!(&t, Transport::WebSocket { protocol, .. } if protocol == "v4.base64.channel.k8s.io")
        );
    }
}
