//! `POST /portForward/{namespace}/{pod}?port=N`: one TCP connection to `localhost:N` inside the
//! pod's network namespace (so servers bound to the pod's loopback are reachable, as with the
//! kubelet), carried as the raw bytes of the request and response bodies. The end of the
//! request body half-closes the connection; the response ends when the pod's side closes.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::exec::text;
use crate::Agent;
use crate::pod_worker::{LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID};

/// The pod's uid on this node, from its containers' labels.
async fn pod_uid(agent: &Agent, namespace: &str, pod: &str) -> Option<String> {
    let found = agent
        .runtime
        .list_containers(&[(LABEL_POD_NAMESPACE, namespace), (LABEL_POD_NAME, pod)])
        .await
        .ok()?;
    found
        .into_iter()
        .find_map(|c| c.labels.get(LABEL_POD_UID).cloned())
}

/// Connects to 127.0.0.1:`port` inside the network namespace at `netns` (a thread enters it;
/// the socket stays in it).
fn connect_in(
    netns: Option<std::path::PathBuf>,
    port: u16,
) -> std::io::Result<std::net::TcpStream> {
    std::thread::spawn(move || {
        if let Some(path) = &netns {
            let file = std::fs::File::open(path)?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                std::io::Error::other(format!("enter the pod's network namespace: {e}"))
            })?;
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .join()
    .map_err(|_| std::io::Error::other("the connecting thread failed"))?
}

pub async fn port_forward(
    State(agent): State<Arc<Agent>>,
    UrlPath((ns, pod)): UrlPath<(String, String)>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let mut port = None;
    let mut uid = None;
    for (k, v) in form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "port" => port = v.parse::<u16>().ok().filter(|p| *p > 0),
            "podUID" if !v.is_empty() => uid = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(port) = port else {
        return text(
            StatusCode::BAD_REQUEST,
            "a port (1-65535) is required".into(),
        );
    };
    let uid = match uid {
        Some(u) => Some(u),
        None => pod_uid(&agent, &ns, &pod).await,
    };
    let Some(uid) = uid else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} is not running on this node"),
        );
    };
    let netns = agent.config.netns_dir().join(&uid);
    // Host-network pods have no namespace of their own.
    let netns = crate::network::netns::is_namespace(&netns).then_some(netns);
    let connected = tokio::task::spawn_blocking(move || connect_in(netns, port)).await;
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "error forwarding port {port} to pod {uid}: failed to connect to localhost:{port} inside the pod: {e}"
                ),
            );
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if stream.set_nonblocking(true).is_err() {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "socket setup failed".into(),
        );
    }
    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "socket setup failed".into(),
        );
    };
    let (mut read, mut write) = stream.into_split();
    tokio::spawn(async move {
        let mut input = body.into_data_stream();
        while let Some(Ok(chunk)) = input.next().await {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    });
    let (tx, response) = super::exec::channel_body();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send(bytes::Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Response::new(response)
}
