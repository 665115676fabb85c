//! Shared informers: one watch and one cache per kind, read by every loop that needs the kind,
//! with changes fanned out to each subscriber over a bounded channel.
//!
//! kube-runtime's `Controller` gives each loop its own watch and cache; with ten loops reading
//! pods that is ten copies of every pod. Here a kind is watched once ([`Informer::run`]), the
//! cache is kube-runtime's [`Store`], and loops run through kube-runtime's [`applier`] fed by
//! [`Informer::subscribe`]. Unlike kube-runtime's shared streams, deletions are delivered too,
//! including objects that vanished while the watch was re-listing.
//!
//! [`applier`]: kube::runtime::controller::applier

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A change seen by an informer.
#[derive(Debug)]
pub enum Change<K> {
    /// Added or modified (also sent for every object after a re-list).
    Applied(Arc<K>),
    Deleted(Arc<K>),
}

impl<K> Change<K> {
    pub fn object(&self) -> &Arc<K> {
        match self {
            Change::Applied(o) | Change::Deleted(o) => o,
        }
    }
}

impl<K> Clone for Change<K> {
    fn clone(&self) -> Self {
        match self {
            Change::Applied(o) => Change::Applied(o.clone()),
            Change::Deleted(o) => Change::Deleted(o.clone()),
        }
    }
}

/// Waits for an informer's first full list.
pub struct SyncSignal(tokio::sync::watch::Receiver<bool>);

impl SyncSignal {
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|synced| *synced).await;
    }
}

pub struct Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    api: Api<K>,
    config: watcher::Config,
    store: Store<K>,
    writer: Mutex<Option<reflector::store::Writer<K>>>,
    subscribers: Mutex<Vec<mpsc::Sender<Change<K>>>>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn new(api: Api<K>, config: watcher::Config) -> Arc<Self> {
        let (store, writer) = reflector::store();
        Arc::new(Informer {
            api,
            config,
            store,
            writer: Mutex::new(Some(writer)),
            subscribers: Mutex::new(Vec::new()),
            synced: tokio::sync::watch::Sender::new(false),
        })
    }

    /// The cache. Wait for [`Informer::synced`] before trusting its contents.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Completes once the cache holds a full list. (kube-runtime's `Store::wait_until_ready`
    /// wakes only one of several concurrent waiters, so loops wait here instead.)
    pub fn synced(&self) -> impl Future<Output = ()> + Send + use<K> {
        self.sync_signal().wait()
    }

    /// A handle to wait on later for [`Informer::synced`].
    pub fn sync_signal(&self) -> SyncSignal {
        SyncSignal(self.synced.subscribe())
    }

    /// A bounded stream of changes. Subscribe before [`Informer::run`] starts to see the
    /// initial list; a slow subscriber slows the informer down (back-pressure), it never
    /// loses changes.
    pub fn subscribe(&self, capacity: usize) -> mpsc::Receiver<Change<K>> {
        let (tx, rx) = mpsc::channel(capacity);
        self.subscribers.lock().expect("subscribers lock").push(tx);
        rx
    }

    async fn publish(&self, change: Change<K>) {
        let subscribers: Vec<mpsc::Sender<Change<K>>> =
            self.subscribers.lock().expect("subscribers lock").clone();
        let mut closed = false;
        for s in &subscribers {
            closed |= s.send(change.clone()).await.is_err();
        }
        if closed {
            self.subscribers
                .lock()
                .expect("subscribers lock")
                .retain(|s| !s.is_closed());
        }
    }

    /// Watches until `shutdown` (re-listing with backoff after errors). Runs once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut writer) = self.writer.lock().expect("writer lock").take() else {
            tracing::error!("informer started twice");
            return;
        };
        let mut events = watcher(self.api.clone(), self.config.clone())
            .default_backoff()
            .boxed();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = events.next() => e,
            };
            let event = match event {
                None => return,
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::debug!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
                    continue;
                }
            };
            match &event {
                watcher::Event::Apply(obj) => {
                    writer.apply_watcher_event(&event);
                    let key = ObjectRef::from_obj(obj);
                    if let Some(cached) = self.store.get(&key) {
                        self.publish(Change::Applied(cached)).await;
                    }
                }
                watcher::Event::Delete(obj) => {
                    writer.apply_watcher_event(&event);
                    self.publish(Change::Deleted(Arc::new(obj.clone()))).await;
                }
                watcher::Event::Init | watcher::Event::InitApply(_) => {
                    writer.apply_watcher_event(&event)
                }
                watcher::Event::InitDone => {
                    tracing::debug!(kind = %K::kind(&()), "informer synced");
                    let before = self.store.state();
                    writer.apply_watcher_event(&event);
                    self.synced.send_replace(true);
                    for old in before {
                        if self.store.get(&ObjectRef::from_obj(&*old)).is_none() {
                            self.publish(Change::Deleted(old)).await;
                        }
                    }
                    for obj in self.store.state() {
                        self.publish(Change::Applied(obj)).await;
                    }
                }
            }
        }
    }
}

/// Makes a client that acts as a user (a ServiceAccount user name for a loop, or a component's
/// user name such as `system:kube-scheduler`).
pub type ClientFactory = Arc<dyn Fn(&str) -> kube::Client + Send + Sync>;

/// The namespace of the controllers' ServiceAccounts, as upstream's
/// `--use-service-account-credentials`.
pub const CONTROLLER_NAMESPACE: &str = "kube-system";

/// The site's informers, created on first use and started together by [`Informers::start`].
pub struct Informers {
    client: kube::Client,
    identities: Option<ClientFactory>,
    started: Mutex<bool>,
    runners: Mutex<Vec<futures::future::BoxFuture<'static, ()>>>,
    shutdown: CancellationToken,
    pods: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::Pod>>>,
    nodes: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::Node>>>,
    namespaces: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::Namespace>>>,
    replica_sets: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::apps::v1::ReplicaSet>>>,
    deployments: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::apps::v1::Deployment>>>,
    services: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::Service>>>,
    endpoint_slices:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::discovery::v1::EndpointSlice>>>,
    endpoints: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::Endpoints>>>,
    leases: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::coordination::v1::Lease>>>,
    pod_disruption_budgets:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::policy::v1::PodDisruptionBudget>>>,
    stateful_sets: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::apps::v1::StatefulSet>>>,
    daemon_sets: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::apps::v1::DaemonSet>>>,
    jobs: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::batch::v1::Job>>>,
    cron_jobs: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::batch::v1::CronJob>>>,
    controller_revisions:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::apps::v1::ControllerRevision>>>,
    persistent_volume_claims:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::PersistentVolumeClaim>>>,
    persistent_volumes:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::PersistentVolume>>>,
    storage_classes:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::storage::v1::StorageClass>>>,
    horizontal_pod_autoscalers: std::sync::OnceLock<
        Arc<Informer<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>>,
    >,
    secrets: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::Secret>>>,
    config_maps: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::ConfigMap>>>,
    netpol_config_maps: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::ConfigMap>>>,
    network_policies:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::networking::v1::NetworkPolicy>>>,
    service_accounts:
        std::sync::OnceLock<Arc<Informer<k8s_openapi::api::core::v1::ServiceAccount>>>,
    cluster_roles: std::sync::OnceLock<Arc<Informer<k8s_openapi::api::rbac::v1::ClusterRole>>>,
}

macro_rules! informer_accessor {
    ($name:ident, $field:ident, $kind:ty) => {
        informer_accessor!($name, $field, $kind, watcher::Config::default());
    };
    ($name:ident, $field:ident, $kind:ty, $config:expr) => {
        pub fn $name(&self) -> Arc<Informer<$kind>> {
            self.$field
                .get_or_init(|| {
                    let informer = Informer::new(Api::all(self.client.clone()), $config);
                    self.add_runner(informer.clone());
                    informer
                })
                .clone()
        }
    };
}

impl Informers {
    pub fn new(client: kube::Client, shutdown: CancellationToken) -> Self {
        Informers {
            client,
            identities: None,
            started: Mutex::new(false),
            runners: Mutex::new(Vec::new()),
            shutdown,
            pods: Default::default(),
            nodes: Default::default(),
            namespaces: Default::default(),
            replica_sets: Default::default(),
            deployments: Default::default(),
            services: Default::default(),
            endpoint_slices: Default::default(),
            endpoints: Default::default(),
            leases: Default::default(),
            pod_disruption_budgets: Default::default(),
            stateful_sets: Default::default(),
            daemon_sets: Default::default(),
            jobs: Default::default(),
            cron_jobs: Default::default(),
            controller_revisions: Default::default(),
            persistent_volume_claims: Default::default(),
            persistent_volumes: Default::default(),
            storage_classes: Default::default(),
            horizontal_pod_autoscalers: Default::default(),
            service_accounts: Default::default(),
            secrets: Default::default(),
            config_maps: Default::default(),
            netpol_config_maps: Default::default(),
            network_policies: Default::default(),
            cluster_roles: Default::default(),
        }
    }

    /// The informers' own client (their watches use it).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Each loop writes as its own identity: `client_for("deployment-controller")` acts as the
    /// ServiceAccount `kube-system/deployment-controller`, whose bootstrap role holds what the
    /// loop needs and nothing more.
    pub fn with_identities(mut self, factory: ClientFactory) -> Self {
        self.identities = Some(factory);
        self
    }

    /// The client of the loop whose ServiceAccount is `account` (the informers' client when no
    /// identities were given).
    pub fn client_for(&self, account: &str) -> kube::Client {
        self.client_as(&format!(
            "system:serviceaccount:{CONTROLLER_NAMESPACE}:{account}"
        ))
    }

    /// The client of a component that has a user of its own (`system:kube-scheduler`).
    pub fn client_as(&self, user: &str) -> kube::Client {
        match &self.identities {
            Some(factory) => factory(user),
            None => self.client.clone(),
        }
    }

    fn add_runner<K>(&self, informer: Arc<Informer<K>>)
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        assert!(
            !*self.started.lock().expect("started lock"),
            "informers must be created before Informers::start"
        );
        let shutdown = self.shutdown.clone();
        self.runners
            .lock()
            .expect("runners lock")
            .push(Box::pin(informer.run(shutdown)));
    }

    informer_accessor!(pods, pods, k8s_openapi::api::core::v1::Pod);
    informer_accessor!(nodes, nodes, k8s_openapi::api::core::v1::Node);
    informer_accessor!(
        namespaces,
        namespaces,
        k8s_openapi::api::core::v1::Namespace
    );
    informer_accessor!(
        replica_sets,
        replica_sets,
        k8s_openapi::api::apps::v1::ReplicaSet
    );
    informer_accessor!(
        deployments,
        deployments,
        k8s_openapi::api::apps::v1::Deployment
    );
    informer_accessor!(services, services, k8s_openapi::api::core::v1::Service);
    informer_accessor!(
        endpoint_slices,
        endpoint_slices,
        k8s_openapi::api::discovery::v1::EndpointSlice
    );
    informer_accessor!(endpoints, endpoints, k8s_openapi::api::core::v1::Endpoints);
    informer_accessor!(leases, leases, k8s_openapi::api::coordination::v1::Lease);
    informer_accessor!(
        pod_disruption_budgets,
        pod_disruption_budgets,
        k8s_openapi::api::policy::v1::PodDisruptionBudget
    );
    informer_accessor!(
        stateful_sets,
        stateful_sets,
        k8s_openapi::api::apps::v1::StatefulSet
    );
    informer_accessor!(
        daemon_sets,
        daemon_sets,
        k8s_openapi::api::apps::v1::DaemonSet
    );
    informer_accessor!(jobs, jobs, k8s_openapi::api::batch::v1::Job);
    informer_accessor!(cron_jobs, cron_jobs, k8s_openapi::api::batch::v1::CronJob);
    informer_accessor!(
        controller_revisions,
        controller_revisions,
        k8s_openapi::api::apps::v1::ControllerRevision
    );
    informer_accessor!(
        persistent_volume_claims,
        persistent_volume_claims,
        k8s_openapi::api::core::v1::PersistentVolumeClaim
    );
    informer_accessor!(
        persistent_volumes,
        persistent_volumes,
        k8s_openapi::api::core::v1::PersistentVolume
    );
    informer_accessor!(
        horizontal_pod_autoscalers,
        horizontal_pod_autoscalers,
        k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler
    );
    informer_accessor!(
        storage_classes,
        storage_classes,
        k8s_openapi::api::storage::v1::StorageClass
    );
    informer_accessor!(
        service_accounts,
        service_accounts,
        k8s_openapi::api::core::v1::ServiceAccount
    );

    // Only what the loops need: caching every Secret and ConfigMap would cost memory for nothing.
    informer_accessor!(
        token_secrets,
        secrets,
        k8s_openapi::api::core::v1::Secret,
        watcher::Config::default().fields("type=kubernetes.io/service-account-token")
    );
    informer_accessor!(
        root_ca_config_maps,
        config_maps,
        k8s_openapi::api::core::v1::ConfigMap,
        watcher::Config::default().fields("metadata.name=kube-root-ca.crt")
    );
    informer_accessor!(
        netpol_config_maps,
        netpol_config_maps,
        k8s_openapi::api::core::v1::ConfigMap,
        watcher::Config::default().labels(edgemesh::netpol::NODE_LABEL)
    );
    informer_accessor!(
        network_policies,
        network_policies,
        k8s_openapi::api::networking::v1::NetworkPolicy
    );

    informer_accessor!(
        cluster_roles,
        cluster_roles,
        k8s_openapi::api::rbac::v1::ClusterRole
    );

    /// Starts every informer created so far.
    pub fn start(&self) {
        *self.started.lock().expect("started lock") = true;
        for runner in self.runners.lock().expect("runners lock").drain(..) {
            tokio::spawn(runner);
        }
    }
}
