//! Starting an API server: open the store, create the default namespaces, serve until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenAuthenticator;
use crate::http::{self, ApiServer};
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{Storage, StorageError};

/// Namespaces every cluster has after start.
pub const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Typed configuration of the API server; the binary builds it from flags and files.
pub struct Config {
    /// The SQLite database file.
    pub database: PathBuf,
    pub tls: Arc<rustls::ServerConfig>,
    pub tokens: TokenAuthenticator,
    /// How many recent changes watchers can resume from.
    pub watch_window: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("open the datastore: {0}")]
    Storage(#[from] StorageError),
    #[error("create default namespace {name}: {message}")]
    Bootstrap { name: String, message: String },
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the store and prepares the server state (default namespaces included).
pub async fn prepare(
    config: &Config,
    shutdown: CancellationToken,
) -> Result<Arc<ApiServer>, ServerError> {
    prepare_store(
        &config.database,
        config.watch_window,
        config.tokens.clone(),
        shutdown,
    )
    .await
}

/// [`prepare`] without TLS settings: what an in-process server (tests, one-binary wiring) needs.
pub async fn prepare_store(
    database: &std::path::Path,
    watch_window: usize,
    tokens: TokenAuthenticator,
    shutdown: CancellationToken,
) -> Result<Arc<ApiServer>, ServerError> {
    let storage: Arc<dyn Storage> = Arc::new(SqliteStorage::open(database, watch_window)?);
    let server = Arc::new(ApiServer::new(storage, tokens, shutdown));
    for name in DEFAULT_NAMESPACES {
        let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        match http::resources::create_internal(&server, "", "v1", "namespaces", "", object).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => {
                return Err(ServerError::Bootstrap {
                    name: name.to_string(),
                    message: e.message,
                });
            }
        }
    }
    // Serve the custom resources of the CRDs already stored.
    let crds = server
        .storage
        .list(
            "/apiextensions.k8s.io/customresourcedefinitions/",
            None,
            None,
        )
        .await?;
    for raw in crds.items {
        let item = raw.value()?;
        let name = item
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("");
        crate::crd::sync(&server.registry, name, Some(&item));
    }
    server.ready.store(true, Ordering::Release);
    Ok(server)
}

/// Runs the API server on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let server = prepare(&config, shutdown.clone()).await?;
    let app = http::router(server);
    http::serve(listener, config.tls.clone(), app, shutdown).await?;
    Ok(())
}
