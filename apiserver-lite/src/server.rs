//! Starting an API server: open the store, create the default namespaces, serve until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenAuthenticator;
use crate::http::{self, ApiServer};
use crate::services::ServiceNetwork;
use crate::storage::etcd::{EtcdConfig, EtcdStorage};
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{Storage, StorageError};

/// Where the cluster state lives.
#[derive(Debug, Clone)]
pub enum Datastore {
    /// One SQLite file (one server).
    Sqlite(PathBuf),
    /// An etcd cluster (several servers may share it).
    Etcd(EtcdConfig),
}

impl Datastore {
    pub async fn open(&self, watch_window: usize) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(match self {
            Datastore::Sqlite(path) => Arc::new(SqliteStorage::open(path, watch_window)?),
            Datastore::Etcd(config) => Arc::new(EtcdStorage::open(config, watch_window).await?),
        })
    }
}

impl From<&std::path::Path> for Datastore {
    fn from(path: &std::path::Path) -> Self {
        Datastore::Sqlite(path.to_path_buf())
    }
}

/// Namespaces every cluster has after start.
pub const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Typed configuration of the API server; the binary builds it from flags and files.
pub struct Config {
    /// Where the cluster state lives.
    pub datastore: Datastore,
    pub tls: Arc<rustls::ServerConfig>,
    pub tokens: TokenAuthenticator,
    /// How many recent changes watchers can resume from.
    pub watch_window: usize,
    /// Where Service cluster IPs and node ports come from.
    pub service_network: ServiceNetwork,
    /// The address clients in pods reach this server at: the `kubernetes` Service's endpoint.
    pub advertise: Option<Advertise>,
    /// PKCS#8 (DER) ECDSA P-256 key that signs ServiceAccount tokens.
    pub service_account_key: Option<Vec<u8>>,
}

/// Where pods reach the API server: the `kubernetes` Service's endpoint.
#[derive(Debug, Clone)]
pub struct Advertise {
    pub address: SocketAddr,
    /// The server's own node, when it runs one: the endpoint is put on it, so the mesh carries
    /// pods of every node to it (also through NATs) and an unspecified or loopback address
    /// still works.
    pub node: Option<String>,
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
        &config.datastore,
        config.watch_window,
        config.tokens.clone(),
        config.service_network.clone(),
        config.advertise.clone(),
        shutdown,
    )
    .await
    .and_then(|server| {
        if let Some(key) = &config.service_account_key {
            let issuer = crate::service_accounts::TokenIssuer::new(
                key,
                crate::service_accounts::DEFAULT_ISSUER,
            )
            .map_err(|e| ServerError::Bootstrap {
                name: "service account key".into(),
                message: e.to_string(),
            })?;
            let _ = server.service_account_tokens.set(issuer);
        }
        Ok(server)
    })
}

/// [`prepare`] without TLS settings: what an in-process server (tests, one-binary wiring) needs.
pub async fn prepare_store(
    datastore: &Datastore,
    watch_window: usize,
    tokens: TokenAuthenticator,
    service_network: ServiceNetwork,
    advertise: Option<Advertise>,
    shutdown: CancellationToken,
) -> Result<Arc<ApiServer>, ServerError> {
    let storage = datastore.open(watch_window).await?;
    let server = Arc::new(ApiServer::new(storage, tokens, service_network, shutdown));
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
    // Serve the custom resources of the CRDs already stored, then follow the CRDs: another
    // server sharing the datastore may add, change or remove one.
    let crd_cursor = server.storage.hub().cursor(None)?;
    load_crds(&server).await?;
    tokio::spawn(follow_crds(server.clone(), crd_cursor));
    for problem in server.services.repair(&*server.storage).await? {
        tracing::warn!("{problem}");
    }
    reconcile_policy(&server).await?;
    // The authorizer's caches load before the server answers anything, then follow the store.
    server.authorizer.load(&*server.storage).await?;
    tokio::spawn(
        server
            .authorizer
            .clone()
            .run(server.storage.clone(), server.shutdown.clone()),
    );
    let shared = matches!(datastore, Datastore::Etcd(_));
    kubernetes_service(&server, advertise, shared).await?;
    system_priority_classes(&server).await?;
    crate::apiservices::sync(&server).await;
    server.ready.store(true, Ordering::Release);
    Ok(server)
}

const CRD_PREFIX: &str = "/apiextensions.k8s.io/customresourcedefinitions/";

/// Serves exactly the custom resources of the stored CRDs.
async fn load_crds(server: &Arc<ApiServer>) -> Result<(), StorageError> {
    let crds = server.storage.list(CRD_PREFIX, None, None).await?;
    let mut names = std::collections::HashSet::new();
    for raw in crds.items {
        let item = raw.value()?;
        let name = item
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        crate::crd::sync(&server.registry, &name, Some(&item));
        names.insert(name);
    }
    server
        .registry
        .retain(|r| r.custom.is_none() || names.contains(&format!("{}.{}", r.resource, r.group)));
    Ok(())
}

/// Keeps the served custom resources in step with the stored CRDs, whichever server wrote them
/// (the writing server has already applied its own write; applying the stored state again is
/// harmless). A cursor that fell behind the watch window reloads every CRD.
async fn follow_crds(server: Arc<ApiServer>, mut cursor: crate::storage::Cursor) {
    loop {
        let events = tokio::select! {
            _ = server.shutdown.cancelled() => return,
            events = cursor.next(server.storage.hub(), 256) => events,
        };
        let changed: std::collections::BTreeSet<String> = match events {
            Ok(events) => events
                .iter()
                .filter_map(|e| e.key.strip_prefix(CRD_PREFIX))
                .map(str::to_string)
                .collect(),
            Err(StorageError::Expired { .. }) => {
                match server.storage.hub().cursor(None) {
                    Ok(c) => cursor = c,
                    Err(_) => continue,
                }
                if let Err(e) = load_crds(&server).await {
                    tracing::warn!("reloading the CRDs failed: {e}");
                }
                crate::apiservices::sync_soon(server.clone());
                continue;
            }
            Err(_) => return,
        };
        if changed.is_empty() {
            continue;
        }
        for name in &changed {
            let key = format!("{CRD_PREFIX}{name}");
            match server.storage.get(&key).await {
                Ok(stored) => {
                    crate::crd::sync(&server.registry, name, stored.as_ref().map(|s| &*s.object))
                }
                Err(e) => tracing::warn!("reading CRD {name} failed: {e}"),
            }
        }
        crate::apiservices::sync_soon(server.clone());
    }
}

/// Creates the bootstrap RBAC policy's missing roles and bindings and adds what the stored ones
/// lack (`auth::policy::reconcile`), at every start, as upstream does.
async fn reconcile_policy(server: &Arc<ApiServer>) -> Result<(), ServerError> {
    use crate::auth::policy::{Reconcile, bootstrap, reconcile};
    let policy = bootstrap();
    let kinds = [
        ("clusterroles", &policy.cluster_roles),
        ("clusterrolebindings", &policy.cluster_role_bindings),
    ];
    for (resource, objects) in kinds {
        for wanted in objects.iter() {
            let name = wanted["metadata"]["name"].as_str().unwrap_or_default();
            let key = crate::storage::object_key(crate::auth::rbac::GROUP, resource, "", name);
            let stored = server.storage.get(&key).await?;
            let failed = |e: crate::error::ApiError| ServerError::Bootstrap {
                name: format!("{resource}/{name}"),
                message: e.message,
            };
            let create = |object: Value| async move {
                match http::resources::create_internal(
                    server,
                    crate::auth::rbac::GROUP,
                    "v1",
                    resource,
                    "",
                    object,
                )
                .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.code == 409 => Ok(()),
                    Err(e) => Err(e),
                }
            };
            match reconcile(stored.as_ref().map(|s| &*s.object), wanted) {
                Reconcile::Keep => {}
                Reconcile::Create(object) => create(object).await.map_err(failed)?,
                Reconcile::Update(object) => {
                    let revision = stored.map(|s| s.revision);
                    server.storage.update(&key, object, revision).await?;
                }
                Reconcile::Recreate(object) => {
                    tracing::info!(
                        "{resource}/{name}: the bootstrap policy's roleRef replaces the stored one"
                    );
                    server
                        .storage
                        .delete(&key, stored.map(|s| s.revision))
                        .await?;
                    create(object).await.map_err(failed)?;
                }
            }
        }
    }
    Ok(())
}

/// Upstream's two system PriorityClasses, which charts and system add-ons name.
async fn system_priority_classes(server: &Arc<ApiServer>) -> Result<(), ServerError> {
    for (name, value, description) in [
        (
            "system-node-critical",
            2_000_001_000,
            "Used for system critical pods that must not be moved from their current node.",
        ),
        (
            "system-cluster-critical",
            2_000_000_000,
            "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
        ),
    ] {
        let class = json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": name}, "value": value, "description": description,
            "preemptionPolicy": "PreemptLowerPriority",
        });
        match http::resources::create_internal(
            server,
            "scheduling.k8s.io",
            "v1",
            "priorityclasses",
            "",
            class,
        )
        .await
        {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => {
                return Err(ServerError::Bootstrap {
                    name: name.into(),
                    message: e.message,
                });
            }
        }
    }
    Ok(())
}

/// The `default/kubernetes` Service (the network's first address, port 443) and its endpoints
/// (this server, and the others sharing the datastore: [`crate::api_endpoints`]), which
/// in-cluster clients and agents use to reach the API.
async fn kubernetes_service(
    server: &Arc<ApiServer>,
    advertise: Option<Advertise>,
    shared: bool,
) -> Result<(), ServerError> {
    let ip = server.services.network().first().to_string();
    let port = advertise.as_ref().map_or(6443, |a| a.address.port());
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": ip, "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}], "type": "ClusterIP", "sessionAffinity": "None"}
    });
    let bootstrap = |e: crate::error::ApiError| ServerError::Bootstrap {
        name: "default/kubernetes".into(),
        message: e.message,
    };
    match http::resources::create_internal(server, "", "v1", "services", "default", service).await {
        Ok(_) => {}
        Err(e) if e.code == 409 => {}
        Err(e) => return Err(bootstrap(e)),
    }
    let Some(Advertise { address, node }) = advertise else {
        return Ok(());
    };
    let ip = if address.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        address.ip()
    };
    let me = crate::api_endpoints::ApiEndpoint {
        address: SocketAddr::new(ip, address.port()),
        node,
    };
    crate::api_endpoints::publish(server, me, shared).await?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::etcd::{EtcdConfig, tests::TestEtcd};

    async fn server_on(etcd: &TestEtcd) -> Arc<ApiServer> {
        let mut config = EtcdConfig::new(vec![etcd.url.clone()]);
        config.prefix = "/registry".into();
        let datastore = Datastore::Etcd(config);
        prepare_store(
            &datastore,
            1024,
            TokenAuthenticator::default(),
            ServiceNetwork::default(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap()
    }

    /// Two servers on one etcd: a CRD written through one is served by the other, and so is its
    /// removal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_server_serves_the_crds_any_server_stored() {
        let etcd = TestEtcd::start().await;
        let one = server_on(&etcd).await;
        let two = server_on(&etcd).await;
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "crontabs.stable.example.com"},
            "spec": {"group": "stable.example.com", "scope": "Namespaced",
                "names": {"plural": "crontabs", "singular": "crontab", "kind": "CronTab"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}});
        http::resources::create_internal(
            &one,
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "",
            crd,
        )
        .await
        .unwrap();
        let served =
            |server: &Arc<ApiServer>| server.registry.get("stable.example.com", "v1", "crontabs");
        assert!(served(&one).is_some());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while served(&two).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the other server never served it"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        http::resources::create_internal(
            &two,
            "stable.example.com",
            "v1",
            "crontabs",
            "default",
            json!({"apiVersion": "stable.example.com/v1", "kind": "CronTab", "metadata": {"name": "c"}}),
        )
        .await
        .unwrap();
        http::resources::delete_internal(
            &one,
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "",
            "crontabs.stable.example.com",
        )
        .await
        .unwrap();
        while served(&two).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the other server still serves it"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
