//! The node agent's HTTP API (the kubelet's paths, so the API server forwards requests
//! unchanged): `GET /containerLogs/{namespace}/{pod}/{container}` today. The API server reaches
//! it through a connection the agent registers (in process) or dials out (remote agents), never
//! by dialling the node.

pub mod logs;
pub mod tunnel;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

use crate::Agent;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(logs::container_logs),
        )
        .with_state(agent)
}
