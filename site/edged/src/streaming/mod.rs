//! The node agent's HTTP API (the kubelet's paths, so the API server forwards requests
//! unchanged): `GET /containerLogs/{namespace}/{pod}/{container}`, `POST /exec/..` and
//! `/attach/..` (`exec.rs`, framed stdio), `POST /portForward/{namespace}/{pod}`
//! (`portforward.rs`, one TCP connection per request). The API server reaches
//! it through a connection the agent registers (in process) or dials out (remote agents), never
//! by dialling the node.

pub mod attach;
pub mod exec;
pub mod logs;
pub mod portforward;
pub mod tunnel;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::Agent;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(logs::container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", post(exec::exec))
        .route(
            "/attach/{namespace}/{pod}/{container}",
            post(attach::attach),
        )
        .route("/stats/summary", get(crate::stats::summary_handler))
        .route("/metrics/resource", get(crate::stats::resource_handler))
        .route("/metrics", get(crate::stats::metrics_handler))
        .route("/metrics/cadvisor", get(crate::stats::cadvisor_handler))
        .route("/pods", get(crate::stats::pods_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/portForward/{namespace}/{pod}",
            post(portforward::port_forward),
        )
        .with_state(agent)
}
