//! The mesh's status on loopback: `GET /status` (JSON, what `edgesite mesh status` prints) and
//! `GET /metrics` (Prometheus text: per peer the connection kind, RTT, bytes and failed hole
//! punches; relay reservations).

use std::fmt::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::host::{MeshHandle, MeshStatus};

/// Binds `address` and serves until `shutdown`.
pub async fn serve(
    address: SocketAddr,
    mesh: MeshHandle,
    shutdown: CancellationToken,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("mesh status: binding {address}"))?;
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(mesh);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(())
}

async fn status(State(mesh): State<MeshHandle>) -> Response {
    match mesh.status().await {
        Ok(status) => axum::Json(status).into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

async fn metrics(State(mesh): State<MeshHandle>) -> Response {
    match mesh.status().await {
        Ok(status) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            prometheus_text(&status),
        )
            .into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The status as Prometheus metrics.
pub fn prometheus_text(status: &MeshStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP edgesite_mesh_peer_connection Connection to a peer by kind (1 for the kind in use)."
    );
    let _ = writeln!(out, "# TYPE edgesite_mesh_peer_connection gauge");
    for peer in &status.peers {
        for kind in ["direct", "relayed", "none"] {
            let value = u8::from(peer.connection == kind);
            let _ = writeln!(
                out,
                "edgesite_mesh_peer_connection{{node=\"{}\",kind=\"{kind}\"}} {value}",
                label(&peer.node)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP edgesite_mesh_peer_rtt_seconds Round trip time to a peer (libp2p ping)."
    );
    let _ = writeln!(out, "# TYPE edgesite_mesh_peer_rtt_seconds gauge");
    for peer in &status.peers {
        if let Some(rtt) = peer.rtt_ms {
            let _ = writeln!(
                out,
                "edgesite_mesh_peer_rtt_seconds{{node=\"{}\"}} {}",
                label(&peer.node),
                rtt / 1000.0
            );
        }
    }
    for (name, help, pick) in [
        (
            "edgesite_mesh_peer_sent_bytes_total",
            "Bytes sent to a peer in mesh streams.",
            0,
        ),
        (
            "edgesite_mesh_peer_received_bytes_total",
            "Bytes received from a peer in mesh streams.",
            1,
        ),
        (
            "edgesite_mesh_hole_punch_failures_total",
            "Failed hole punching attempts with a peer.",
            2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for peer in &status.peers {
            let value = match pick {
                0 => peer.bytes_sent,
                1 => peer.bytes_received,
                _ => peer.punch_failures as u64,
            };
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {value}", label(&peer.node));
        }
    }
    let _ = writeln!(
        out,
        "# HELP edgesite_mesh_relay_reservations Relays holding a reservation for this node."
    );
    let _ = writeln!(out, "# TYPE edgesite_mesh_relay_reservations gauge");
    let _ = writeln!(
        out,
        "edgesite_mesh_relay_reservations {}",
        status.reservations.len()
    );
    out
}

/// `edgesite mesh status` output: one line per peer.
pub fn table(status: &MeshStatus) -> String {
    let mut out = format!(
        "peer id: {}\nnat: {}\nrelay reservations: {}\n\n",
        status.peer_id,
        status.nat,
        if status.reservations.is_empty() {
            "none".to_string()
        } else {
            status.reservations.join(", ")
        }
    );
    let rows: Vec<[String; 7]> = status
        .peers
        .iter()
        .map(|p| {
            [
                p.node.clone(),
                if p.relay {
                    format!("{} (relay)", p.connection)
                } else {
                    p.connection.clone()
                },
                p.address.clone().unwrap_or_else(|| "-".into()),
                p.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms")),
                human(p.bytes_sent),
                human(p.bytes_received),
                p.punch_ms.map_or_else(
                    || {
                        if p.punch_failures > 0 {
                            format!("failed x{}", p.punch_failures)
                        } else {
                            "-".into()
                        }
                    },
                    |ms| format!("{ms}ms"),
                ),
            ]
        })
        .collect();
    let header = [
        "NODE",
        "CONNECTION",
        "ADDRESS",
        "RTT",
        "SENT",
        "RECEIVED",
        "HOLE PUNCH",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}KiB", b as f64 / 1024.0),
        b => format!("{b}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::PeerStatus;

    #[test]
    fn renders() {
        let status = MeshStatus {
            peer_id: "12D3Koo".into(),
            listen: vec![],
            external: vec![],
            nat: "private".into(),
            reservations: vec!["server".into()],
            peers: vec![PeerStatus {
                node: "node-b".into(),
                peer_id: "12D3KooB".into(),
                relay: false,
                connection: "direct".into(),
                address: Some("/ip4/10.100.0.2/tcp/4001".into()),
                rtt_ms: Some(1.5),
                bytes_sent: 3 << 20,
                bytes_received: 10,
                punch_ms: Some(120),
                punch_failures: 0,
            }],
        };
        let text = prometheus_text(&status);
        assert!(
            text.contains("edgesite_mesh_peer_connection{node=\"node-b\",kind=\"direct\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("edgesite_mesh_peer_rtt_seconds{node=\"node-b\"} 0.0015"),
            "{text}"
        );
        assert!(
            text.contains("edgesite_mesh_relay_reservations 1"),
            "{text}"
        );
        let table = table(&status);
        assert!(table.contains("node-b   direct"), "{table}");
        assert!(table.contains("3.0MiB"), "{table}");
        assert!(table.contains("120ms"), "{table}");
    }
}
