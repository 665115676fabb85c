//! The control loops of `edgesite server`: shared informers, the scheduler and the
//! controllers, all on the in-process client.

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

/// What the flags say about the loops.
#[derive(Clone)]
pub struct Settings {
    pub node_monitor_grace_period: std::time::Duration,
    /// What happens to pods of nodes that stopped answering (`--disconnected-node-pods`).
    pub disconnected_node_pods: controllers::node_lifecycle::DisconnectedPods,
    /// This server's candidate identity for leader election.
    pub identity: String,
    /// The cluster CA (PEM), published to every namespace.
    pub ca: String,
    /// The cluster CA with its key: signs approved client certificate requests.
    pub ca_signer: crate::pki::CertAndKey,
    /// Pod CIDRs for nodes are cut from this (`--cluster-cidr`).
    pub cluster_cidr: controllers::node_ipam::ClusterCidr,
    /// A cloud hub: only the loops that keep the API's own objects (namespaces, garbage,
    /// ServiceAccounts and their tokens, certificates, role aggregation); no nodes, pods or
    /// workloads are run there.
    pub hub: bool,
}

/// The Lease that decides which server runs the loops.
pub const LEASE: &str = "edgesite-control-plane";

/// The user the informers and leader election act as.
pub const CONTROLLER_MANAGER: &str = "system:kube-controller-manager";

/// Runs the loops while this server leads (so servers sharing a datastore never run the same
/// loop twice), until `shutdown`. `clients` makes each component's client: the informers and
/// leader election act as `system:kube-controller-manager`, the scheduler as
/// `system:kube-scheduler`, every loop as its ServiceAccount in `kube-system`.
pub async fn run(
    clients: controllers::informer::ClientFactory,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let client = clients(CONTROLLER_MANAGER);
    let election = controllers::leader::Config::new("kube-system", LEASE, &settings.identity);
    controllers::leader::while_leading(client, election, shutdown, |leading| {
        run_loops(clients.clone(), settings.clone(), leading)
    })
    .await;
}

/// Every loop, until `shutdown` (leadership lost or the server stopping).
async fn run_loops(
    clients: controllers::informer::ClientFactory,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let informers =
        controllers::informer::Informers::new(clients(CONTROLLER_MANAGER), shutdown.clone())
            .with_identities(clients.clone());
    // Events carry the loop's name and are written with its identity.
    let recorder = |component: &str| {
        // Upstream's ServiceAccount names differ from two event sources' names.
        let account = match component {
            "daemonset-controller" => "daemon-set-controller",
            other => other,
        };
        controllers::events::Recorder::start(
            informers.client_for(account),
            component,
            shutdown.clone(),
        )
    };
    // The loops that keep the API's own objects, on a site and on a hub alike. Each registers
    // its informers when made; they are spawned once the informers have started.
    let mut loops: Vec<futures::future::BoxFuture<'static, ()>> = vec![
        Box::pin(controllers::clusterrole_aggregation::controller(
            &informers,
            shutdown.clone(),
        )),
        Box::pin(crate::csr_signer::run(
            informers.client_for("certificate-controller"),
            settings.ca_signer.clone(),
            shutdown.clone(),
        )),
        Box::pin(controllers::serviceaccount::controller(
            &informers,
            shutdown.clone(),
        )),
        Box::pin(controllers::serviceaccount::root_ca_publisher(
            &informers,
            settings.ca.clone(),
            shutdown.clone(),
        )),
        Box::pin(controllers::serviceaccount::token_controller(
            &informers,
            settings.ca.clone(),
            shutdown.clone(),
        )),
        Box::pin(controllers::namespace::run(
            informers.client_for("namespace-controller"),
            shutdown.clone(),
        )),
        Box::pin(controllers::garbage_collector::run(
            informers.client_for("generic-garbage-collector"),
            shutdown.clone(),
        )),
    ];
    if settings.hub {
        informers.start();
        join_all(loops.into_iter().map(tokio::spawn)).await;
        return;
    }
    let scheduler = scheduler::Scheduler::new(
        &informers,
        controllers::events::Recorder::start(
            informers.client_as("system:kube-scheduler"),
            "default-scheduler",
            shutdown.clone(),
        ),
        scheduler::Config::default(),
    );
    let replicasets = controllers::replicaset::controller(
        &informers,
        recorder("replicaset-controller"),
        shutdown.clone(),
    );
    let deployments = controllers::deployment::controller(
        &informers,
        recorder("deployment-controller"),
        shutdown.clone(),
    );
    let endpoints = controllers::endpoints::controller(&informers, shutdown.clone());
    let grace = settings.node_monitor_grace_period;
    let node_lifecycle = controllers::node_lifecycle::controller(
        &informers,
        recorder("node-controller"),
        controllers::node_lifecycle::Config {
            grace_period: grace,
            period: (grace / 8).clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(5),
            ),
            disconnected_pods: settings.disconnected_node_pods,
        },
        shutdown.clone(),
    );
    let disruption = controllers::disruption::controller(&informers, shutdown.clone());
    let jobs =
        controllers::job::controller(&informers, recorder("job-controller"), shutdown.clone());
    let cron_jobs = controllers::cronjob::controller(
        &informers,
        recorder("cronjob-controller"),
        shutdown.clone(),
    );
    let daemon_sets = controllers::daemonset::controller(
        &informers,
        recorder("daemonset-controller"),
        shutdown.clone(),
    );
    let stateful_sets = controllers::statefulset::controller(
        &informers,
        recorder("statefulset-controller"),
        shutdown.clone(),
    );
    let node_ipam =
        controllers::node_ipam::controller(&informers, settings.cluster_cidr, shutdown.clone());
    let service_lb = controllers::servicelb::controller(
        &informers,
        recorder("service-lb-controller"),
        shutdown.clone(),
    );
    let ingress = controllers::ingress::controller(
        &informers,
        recorder("ingress-controller"),
        shutdown.clone(),
    );
    let network_policy = controllers::network_policy::controller(&informers, shutdown.clone());
    let persistent_volumes = controllers::persistent_volume::controller(
        &informers,
        recorder("persistent-volume-binder"),
        shutdown.clone(),
    );
    let ephemeral_volumes = controllers::ephemeral_volume::controller(
        &informers,
        recorder("ephemeral-volume-controller"),
        shutdown.clone(),
    );
    let autoscalers = controllers::podautoscaler::controller(
        &informers,
        recorder("horizontal-pod-autoscaler"),
        shutdown.clone(),
    );
    informers.start();
    loops.extend([
        Box::pin(node_ipam) as futures::future::BoxFuture<'static, ()>,
        Box::pin(scheduler.run(shutdown.clone())),
        Box::pin(replicasets),
        Box::pin(deployments),
        Box::pin(endpoints),
        Box::pin(node_lifecycle),
        Box::pin(disruption),
        Box::pin(jobs),
        Box::pin(cron_jobs),
        Box::pin(daemon_sets),
        Box::pin(stateful_sets),
        Box::pin(service_lb),
        Box::pin(ingress),
        Box::pin(network_policy),
        Box::pin(persistent_volumes),
        Box::pin(autoscalers),
        Box::pin(ephemeral_volumes),
        Box::pin(devices::controller::run(
            informers.client_for("device-controller"),
            recorder("device-controller"),
            shutdown.clone(),
        )),
    ]);
    join_all(loops.into_iter().map(tokio::spawn)).await;
}
