//! `edgesite server`: prepares the data dir, PKI, tokens and kubeconfig, then runs the API server
//! until SIGINT or SIGTERM.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use tokio_util::sync::CancellationToken;

use crate::ServerArgs;
use crate::pki::{CertAndKey, Pki};

/// How long in-flight requests get after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

pub fn hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
        .to_lowercase()
}

/// The machine's own addresses, as K3s puts the node's addresses in its serving certificate:
/// global and private unicast addresses of every interface, not loopback (listed already),
/// link-local ones, or those of the pod bridge and the pods' veths.
fn machine_addresses(bridge: &str) -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for a in addresses {
        if a.interface_name == bridge
            || a.interface_name.starts_with("veth")
            || a.interface_name.starts_with("cni")
        {
            continue;
        }
        let Some(address) = a.address else { continue };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast() && !link_local {
            found.push(ip);
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Where agents and pods reach this server (the `kubernetes` Service's endpoint): as K3s,
/// --advertise-address, else the address it listens on, else the node IP.
fn advertise_address(args: &ServerArgs) -> SocketAddr {
    let ip = args.advertise_address.unwrap_or_else(|| {
        if args.bind_address.is_unspecified() {
            edged::node::detect_node_ip(args.agent.node_ip)
        } else {
            args.bind_address
        }
    });
    SocketAddr::new(ip, args.advertise_port.unwrap_or(args.https_listen_port))
}

/// Names and addresses the serving certificate must cover (the `kubernetes` Service's cluster IP
/// too: in-cluster clients connect to it).
fn sans(args: &ServerArgs, service_ip: Option<String>) -> Vec<String> {
    let mut sans: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    let host = hostname();
    if !host.is_empty() {
        sans.push(host);
    }
    if args.bind_address.is_unspecified() {
        // Reachable on every address of the machine: agents join by any of them.
        for ip in machine_addresses(&args.agent.cni_bridge) {
            let ip = ip.to_string();
            if !sans.contains(&ip) {
                sans.push(ip);
            }
        }
    } else {
        sans.push(args.bind_address.to_string());
    }
    sans.extend(service_ip);
    if let Some(ip) = args.advertise_address {
        let ip = ip.to_string();
        if !sans.contains(&ip) {
            sans.push(ip);
        }
    }
    for s in &args.tls_san {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    sans
}

/// How often the machine's addresses are compared with the serving certificate's.
const ADDRESS_CHECK: Duration = Duration::from_secs(15);

/// Re-issues the serving certificate when the names and addresses it must cover change while
/// the server runs (an address from DHCP, a new interface, a new hostname), and presents it
/// from the next connection on: agents that join by the new address are not refused.
async fn follow_addresses(
    args: ServerArgs,
    service_ip: String,
    mut current: Vec<String>,
    (pki, ca, serving): (Pki, CertAndKey, Arc<crate::pki::ServingCert>),
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ADDRESS_CHECK) => {}
        }
        let args = args.clone();
        let service_ip = service_ip.clone();
        let Ok(wanted) = tokio::task::spawn_blocking(move || sans(&args, Some(service_ip))).await
        else {
            continue;
        };
        if wanted == current {
            continue;
        }
        let added: Vec<&String> = wanted.iter().filter(|s| !current.contains(s)).collect();
        let removed: Vec<&String> = current.iter().filter(|s| !wanted.contains(s)).collect();
        match pki
            .serving(&ca, &wanted)
            .and_then(|pair| serving.replace(&pair))
        {
            Ok(()) => {
                tracing::info!(
                    ?added,
                    ?removed,
                    "serving certificate re-issued for the machine's names and addresses"
                );
                current = wanted;
            }
            Err(error) => {
                tracing::warn!(%error, ?added, "serving certificate not re-issued");
            }
        }
    }
}

pub(crate) fn write_kubeconfig(
    path: &Path,
    mode: u32,
    server: &str,
    ca: &CertAndKey,
    admin: &CertAndKey,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: {}\n    server: {server}\n  name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\npreferences: {{}}\nusers:\n- name: default\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(&ca.cert),
        b64(&admin.cert),
        b64(&admin.key)
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("write kubeconfig {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write kubeconfig {}", path.display()))?;
    Ok(())
}

/// The join token: `--token`, else the one kept in the data dir, else a new random one.
fn cluster_token(args: &ServerArgs, server_dir: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = server_dir.join("token");
    if let Some(t) = &args.token {
        if t.trim().is_empty() {
            bail!("--token must not be empty");
        }
        // A K10 token names the cluster token after its CA hash: keep the token itself.
        let t = &crate::join::JoinToken::parse(t)?.credential;
        std::fs::write(&path, t).with_context(|| format!("write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        return Ok(t.clone());
    }
    if let Ok(existing) = std::fs::read_to_string(&path) {
        return Ok(existing.trim().to_string());
    }
    let bytes: [u8; 24] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, &token).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(token)
}

/// This server's leader-election identity: the host name and an id kept in the data dir, so a
/// restarted server takes its lease back at once (the data-dir lock rules out two processes).
fn server_identity(server_dir: &Path) -> Result<String> {
    let path = server_dir.join("identity");
    let id = match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::write(&path, &id).with_context(|| format!("write {}", path.display()))?;
            id
        }
    };
    Ok(format!("{}_{id}", hostname()))
}

/// `edgesite kubeconfig --user NAME [--group G]...`: a kubeconfig for a user, with a client
/// certificate signed by the site's CA (a year's validity). What the user may do is what RBAC
/// grants `NAME` and the groups.
pub fn user_kubeconfig(
    data_dir: &Path,
    user: &str,
    groups: &[String],
    server: Option<&str>,
    output: &Path,
) -> Result<()> {
    if user.trim().is_empty() {
        bail!("--user must name the user (the certificate's common name)");
    }
    if user.starts_with("system:") {
        bail!(
            "--user {user:?}: names starting with \"system:\" are reserved for the site's own components"
        );
    }
    let url = match server {
        Some(s) => s.to_string(),
        None => admin_server_url(data_dir)?,
    };
    kubeconfig_for(data_dir, user, groups, &url, output)
}

/// The API server's URL as the data dir's admin kubeconfig has it.
pub fn admin_server_url(data_dir: &Path) -> Result<String> {
    let admin = data_dir
        .join("server")
        .join("cred")
        .join("admin.kubeconfig");
    let text = std::fs::read_to_string(&admin).with_context(|| {
        format!(
            "read {} for the server's address (or pass --server)",
            admin.display()
        )
    })?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .map(str::to_string)
        .with_context(|| format!("no server address in {}; pass --server", admin.display()))
}

/// Writes a kubeconfig for `user` in `groups` at `server`, with a certificate signed by the
/// data dir's CA.
pub fn kubeconfig_for(
    data_dir: &Path,
    user: &str,
    groups: &[String],
    server: &str,
    output: &Path,
) -> Result<()> {
    let pki = Pki::new(data_dir);
    if !pki.dir.join("ca.key").exists() {
        bail!(
            "no CA in {}: run this on the server, with its --data-dir",
            pki.dir.display()
        );
    }
    let ca = pki.ca()?;
    let certificate = pki.user_certificate(&ca, user, groups)?;
    write_kubeconfig(output, 0o600, server, &ca, &certificate)
}

/// A data dir whose CA exists belongs to a site that has run: starting it on a missing or empty
/// datastore would bring up an empty cluster that its agents (holding valid certificates) join
/// as if nothing happened. Refuse, unless `--reset-datastore` says that is what is wanted.
fn check_datastore(pki: &Pki, database: &Path, reset: bool) -> Result<()> {
    use apiserver_lite::storage::sqlite::{Contents, inspect};
    if !pki.has_ca() {
        return Ok(());
    }
    let contents = inspect(database).map_err(|e| {
        anyhow::anyhow!(
            "the datastore {} cannot be read: {e}. Restore it from a backup (stop the server, copy the backup over it, start again)",
            database.display()
        )
    })?;
    if contents == Contents::Cluster {
        return Ok(());
    }
    if reset {
        tracing::warn!(
            "--reset-datastore: starting an empty datastore at {} for an existing site; every node must join again",
            database.display()
        );
        return Ok(());
    }
    let state = if database.exists() {
        "empty"
    } else {
        "missing"
    };
    bail!(
        "the datastore {} is {state}, but this data dir's certificates belong to a site that already ran: \
         restore state.db from a backup, or pass --reset-datastore to start an empty cluster \
         (its nodes' pods are then unknown to it and every node must join again)",
        database.display()
    )
}

/// The address this server's embedded etcd member advertises to other servers: --node-ip,
/// else the address the API server is bound to, else the machine's first address.
fn etcd_address(args: &ServerArgs) -> IpAddr {
    if let Some(ip) = args.agent.node_ip {
        return ip;
    }
    if !args.bind_address.is_unspecified() {
        return args.bind_address;
    }
    machine_addresses(&args.agent.cni_bridge)
        .into_iter()
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// What an `edgesite` process serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// A site: the control plane, a node (unless --disable-agent), and a link to a cloud hub
    /// with --cloudhub.
    Site,
    /// A cloud hub (`edgesite cloudhub`): the API server with Karmada's resources and the hub's
    /// side of sites' links; no node, no scheduler, no workload controllers. Sites' certificates
    /// last `site_certificates`.
    Hub {
        site_certificates: std::time::Duration,
    },
}

/// Where a site attaches to a hub (`--cloudhub` and its companions, checked).
struct Attach {
    hub: String,
    token: Option<String>,
    site: String,
    labels: std::collections::BTreeMap<String, String>,
}

fn attach_settings(args: &ServerArgs) -> Result<Option<Attach>> {
    let Some(hub) = &args.cloudhub else {
        if args.cloudhub_token.is_some() || args.site_name.is_some() || !args.site_label.is_empty()
        {
            bail!(
                "--cloudhub-token, --site-name and --site-label attach the site to a hub: pass the hub's address too (--cloudhub https://HUB:5443)"
            );
        }
        return Ok(None);
    };
    let hub = hub.trim_end_matches('/').to_string();
    link::dial::host_port(&hub).map_err(|e| anyhow::anyhow!("--cloudhub: {e}"))?;
    let site = args
        .site_name
        .clone()
        .unwrap_or_else(hostname)
        .to_lowercase();
    if let Err(e) = apiserver_lite::validation::is_dns1123_label(&site) {
        bail!("--site-name {site:?} (the hub's Cluster name): {e}");
    }
    let labels = cloudhub::protocol::parse_labels(&args.site_label).map_err(anyhow::Error::msg)?;
    Ok(Some(Attach {
        hub,
        token: args.cloudhub_token.clone(),
        site,
        labels,
    }))
}

/// Attaches the site to its hub (once: later starts reuse the certificate) and keeps the link
/// up until `shutdown`. The hub being away delays only this: the site runs regardless.
async fn attach(
    data_dir: std::path::PathBuf,
    attach: Attach,
    api: Arc<apiserver_lite::http::ApiServer>,
    shutdown: CancellationToken,
) {
    let mut backoff = link::backoff::Backoff::default();
    let credentials = loop {
        let started = std::time::Instant::now();
        match crate::join::site_credentials(
            &data_dir,
            &attach.hub,
            attach.token.as_deref(),
            &attach.site,
        )
        .await
        {
            Ok(c) => break c,
            Err(error) if attach.token.is_none() => {
                tracing::error!("cloud link: {error:#}");
                return;
            }
            Err(error) => tracing::warn!("cloud link: {error:#}; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next(started)) => {}
        }
    };
    let backend: Arc<dyn cloudhub::site::Backend> = Arc::new(cloudhub::site::ApiBackend::new(api));
    let mut config = cloudhub::site::SiteConfig {
        hub: attach.hub,
        name: attach.site,
        labels: attach.labels,
        ca_pem: credentials.ca,
        cert_pem: credentials.cert,
        key_pem: credentials.key,
        servers_file: Some(data_dir.join("server").join("hub-servers.json")),
    };
    // The link runs on the certificate it has until that is renewed, then starts again on the
    // new one.
    loop {
        let link = shutdown.child_token();
        let renewed = tokio::select! {
            result = cloudhub::site::run(config.clone(), backend.clone(), link.clone()) => {
                if let Err(error) = result {
                    tracing::error!("cloud link: {error}");
                }
                return;
            }
            renewed = renew_when_due(&data_dir, &config) => renewed,
        };
        link.cancel();
        config.cert_pem = renewed.cert;
        config.key_pem = renewed.key;
    }
}

/// Waits until two thirds of the site certificate's life have passed, then renews it (trying
/// again every minute while the hub cannot be reached; an expired certificate is the hub's to
/// refuse, and the log says how to attach again).
async fn renew_when_due(
    data_dir: &std::path::Path,
    config: &cloudhub::site::SiteConfig,
) -> crate::join::SiteCredentials {
    let due = match crate::pki::validity_of(&config.cert_pem) {
        Ok((from, until)) => from + until.duration_since(from).unwrap_or_default() * 2 / 3,
        Err(error) => {
            tracing::warn!("cloud link: the site certificate: {error:#}; renewing it now");
            std::time::SystemTime::now()
        }
    };
    if let Ok(wait) = due.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    loop {
        match crate::join::renew_site_certificate(data_dir, config).await {
            Ok(credentials) => return credentials,
            Err(error) => tracing::warn!(
                "cloud link: {error:#}; trying again in a minute (once the certificate has \
                 expired, attach again with --cloudhub-token)"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }
}

pub fn run(args: ServerArgs) -> Result<()> {
    run_as(args, Role::Site)
}

pub fn run_as(args: ServerArgs, role: Role) -> Result<()> {
    let attach_to = attach_settings(&args)?;
    let mode = u32::from_str_radix(args.write_kubeconfig_mode.trim_start_matches("0o"), 8)
        .with_context(|| {
            format!(
                "--write-kubeconfig-mode {:?} is not an octal file mode such as 0600 or 0644",
                args.write_kubeconfig_mode
            )
        })?;
    let service_network = apiserver_lite::services::ServiceNetwork::new(
        &args.service_cidr,
        &args.service_node_port_range,
    )
    .map_err(|e| anyhow::anyhow!("{e} (--service-cidr / --service-node-port-range)"))?;
    let cluster_cidr = controllers::node_ipam::ClusterCidr::parse(&args.cluster_cidr, 24)
        .map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?;
    let agent_config = if args.disable_agent {
        if !args.disable_mesh_relay {
            tracing::info!(
                "--disable-agent: this server runs no node, so no mesh and no relay; give a node \
                 --mesh-relay or run `edgesite relay` (docs/mesh.md)"
            );
        }
        None
    } else {
        Some(args.agent.to_config(&args.data_dir, true)?)
    };
    let device_setup = match &agent_config {
        Some(config) => args
            .agent
            .devices
            .setup(&args.data_dir, &config.node_name)?,
        None => None,
    };
    let mesh_config = match &agent_config {
        Some(config) => args.agent.mesh.to_config(
            &args.data_dir,
            &config.node_name,
            &config.cluster_domain,
            !args.disable_mesh_relay,
        )?,
        None => None,
    };
    let server_dir = args.data_dir.join("server");
    crate::private_dir(&server_dir)?;
    // One server per data dir: a second one would share the datastore.
    let lock_path = server_dir.join("edgesite.lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another edgesite server is already using data dir {}; stop it first or choose another --data-dir",
            args.data_dir.display()
        );
    }
    // The agent's state is this data dir's too: one agent per data dir.
    let _agent_lock = match &agent_config {
        Some(agent) => {
            crate::private_dir(&agent.root)?;
            let path = agent.root.join("edgesite-agent.lock");
            let lock = File::create(&path).with_context(|| format!("create {}", path.display()))?;
            if lock.try_lock().is_err() {
                bail!(
                    "an edgesite agent is already using data dir {}; stop it first or pass --disable-agent",
                    args.data_dir.display()
                );
            }
            Some(lock)
        }
        None => None,
    };
    let pki = Pki::new(&args.data_dir);
    let database = server_dir.join("state.db");
    let embedded = args.etcd.cluster_init
        || args.etcd.cluster_reset
        || args.etcd.server.is_some()
        || crate::etcd::Member::exists(&args.data_dir);
    let node = agent_config
        .as_ref()
        .map_or_else(hostname, |c| c.node_name.clone());
    let joined_file = server_dir.join("db").join("etcd-join.json");
    if let Some(url) = &args.etcd.server
        && !crate::etcd::Member::exists(&args.data_dir)
        && !joined_file.exists()
    {
        // Another server's site: its keys and an etcd member first, before anything here makes
        // keys of its own.
        let Some(token) = &args.token else {
            bail!(
                "--server needs --token: the token of the server at {url} (its \
                 <data-dir>/server/token)"
            );
        };
        let name = crate::etcd::member_name(&args.data_dir, &node)?;
        let peer = crate::etcd::peer_url(etcd_address(&args), args.etcd.etcd_peer_port);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let joined = runtime.block_on(crate::join::join_server(
            &args.data_dir,
            url.trim_end_matches('/'),
            token,
            &name,
            &peer,
        ))?;
        crate::pki::write_private(&joined_file, &serde_json::to_string(&joined)?)?;
    }
    if embedded && args.datastore.datastore_endpoint.is_some() {
        bail!(
            "--datastore-endpoint names an external etcd, but this server runs an embedded one \
             (--cluster-init, --cluster-reset, or {} exists): choose one",
            server_dir.join("db").join("etcd").display()
        );
    }
    let snapshot_schedule = if embedded && !args.etcd.etcd_disable_snapshots {
        Some(
            controllers::cronjob::parse_schedule(&args.etcd.etcd_snapshot_schedule_cron)
                .map_err(|e| anyhow::anyhow!("--etcd-snapshot-schedule-cron: {e}"))?,
        )
    } else {
        None
    };
    let datastore = match args.datastore.etcd()? {
        Some(etcd) => {
            tracing::info!(
                "cluster state in etcd at {} under {}",
                etcd.endpoints.join(","),
                etcd.prefix
            );
            apiserver_lite::Datastore::Etcd(etcd)
        }
        // Decided once the embedded etcd runs (below).
        None if embedded => apiserver_lite::Datastore::Sqlite(database.clone()),
        None => {
            check_datastore(&pki, &database, args.reset_datastore)?;
            apiserver_lite::Datastore::Sqlite(database.clone())
        }
    };
    let ca = pki.ca()?;
    let service_ip = service_network.first().to_string();
    let wanted = sans(&args, Some(service_ip.clone()));
    let serving = crate::pki::ServingCert::new(&pki.serving(&ca, &wanted)?)?;
    let admin = pki.client(&ca, "admin", "admin", &["system:masters"])?;
    let tls = crate::pki::server_tls(&ca, serving.clone())?;
    let service_account_key = pki.service_account_key()?;
    let token = cluster_token(&args, &server_dir)?;
    let token_file = server_dir.join("token-auth.csv");
    let tokens = if token_file.exists() {
        apiserver_lite::auth::TokenAuthenticator::from_file(&token_file)?
    } else {
        apiserver_lite::auth::TokenAuthenticator::default()
    };
    let host = match args.bind_address {
        a if a.is_unspecified() => "127.0.0.1".to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    };
    let url = format!("https://{host}:{}", args.https_listen_port);
    write_kubeconfig(&args.write_kubeconfig, mode, &url, &ca, &admin)?;
    // The data dir's own copy, so tools on the machine find it whatever --write-kubeconfig says.
    write_kubeconfig(
        &server_dir.join("cred").join("admin.kubeconfig"),
        0o600,
        &url,
        &ca,
        &admin,
    )?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgesite")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(args.bind_address, args.https_listen_port);
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("listen on {addr}: is another edgesite or kube-apiserver running? Stop it or pass --https-listen-port")
        })?;
        let shutdown = CancellationToken::new();
        tokio::spawn(follow_addresses(
            args.clone(),
            service_ip,
            wanted,
            (pki.clone(), ca.clone(), serving),
            shutdown.clone(),
        ));
        let mut datastore = datastore;
        let mut server_joiner = None;
        if embedded {
            let address = etcd_address(&args);
            let mut addresses = vec![address];
            if !address.is_loopback() {
                addresses.push(IpAddr::from([127, 0, 0, 1]));
            }
            let member = crate::etcd::Member::new(
                &args.data_dir,
                &node,
                address,
                (args.etcd.etcd_client_port, args.etcd.etcd_peer_port),
                pki.etcd(&ca, &addresses)?,
            )?;
            if args.etcd.cluster_reset {
                let force = crate::etcd::reset(
                    &member,
                    args.etcd.cluster_reset_restore_path.as_deref(),
                )?;
                let stop = CancellationToken::new();
                member
                    .start(crate::etcd::Initial::New, force, stop.clone())
                    .await?;
                stop.cancel();
                tokio::time::sleep(Duration::from_millis(500)).await;
                eprintln!(
                    "The embedded etcd is a cluster of one member again ({}). Start this server \
                     again without --cluster-reset; other servers must delete their \
                     <data-dir>/server/db and join again.",
                    match &args.etcd.cluster_reset_restore_path {
                        Some(file) => format!("restored from {}", file.display()),
                        None => "its own data".into(),
                    }
                );
                return Ok(());
            }
            let joining = if crate::etcd::Member::exists(&args.data_dir) {
                None
            } else {
                std::fs::read_to_string(&joined_file)
                    .ok()
                    .and_then(|text| {
                        serde_json::from_str::<crate::join::JoinedServer>(&text).ok()
                    })
            };
            let initial = match &joining {
                Some(joined) => crate::etcd::Initial::Existing(joined.initial_cluster.clone()),
                None => crate::etcd::Initial::New,
            };
            member.start(initial, false, shutdown.clone()).await?;
            if let Some(joined) = &joining {
                // A learner serves nothing: the API server starts once it votes.
                crate::etcd::promote_when_caught_up(&member, &joined.voters).await?;
            }
            let _ = std::fs::remove_file(&joined_file);
            let mut etcd = member.datastore(&args.datastore.etcd_prefix);
            etcd.endpoints = crate::etcd::endpoints(&member).await;
            server_joiner = Some(etcd.clone());
            if let Some(moved) = crate::etcd::migrate_sqlite(&database, &etcd).await? {
                eprintln!("moved {moved} objects from SQLite into the embedded etcd");
            }
            if let Some(cron) = snapshot_schedule {
                tokio::spawn(crate::etcd::schedule(
                    etcd.clone(),
                    args.etcd
                        .etcd_snapshot_dir
                        .clone()
                        .unwrap_or_else(|| member.snapshots()),
                    node.clone(),
                    cron,
                    args.etcd.etcd_snapshot_retention,
                    shutdown.clone(),
                ));
            }
            datastore = apiserver_lite::Datastore::Etcd(etcd);
        }
        let config = apiserver_lite::Config {
            datastore,
            tls,
            tokens,
            watch_window: 8192,
            service_network,
            advertise: Some(apiserver_lite::Advertise {
                address: advertise_address(&args),
                node: agent_config.as_ref().map(|c| c.node_name.clone()),
            }),
            service_account_key: Some(service_account_key),
        };
        if args.disable_agent {
            tracing::info!("--disable-agent given: this machine runs the control plane only");
        }
        // The node agent needs containerd and the CNI plugins: say what is missing before
        // anything starts.
        if let Some(agent) = &agent_config {
            edged::check(agent).await.map_err(|e| {
                anyhow::anyhow!("{e}\n(or run the control plane alone with --disable-agent)")
            })?;
        }
        let api = apiserver_lite::server::prepare(&config, shutdown.clone())
            .await
            .map_err(|e| match e {
                apiserver_lite::server::ServerError::Storage(
                    apiserver_lite::storage::StorageError::Damaged(why),
                ) => anyhow::anyhow!(
                    "the datastore {} is damaged ({why}): stop here and restore it from a backup; \
                     `sqlite3 {} .recover` may save what is readable",
                    database.display(),
                    database.display()
                ),
                e => anyhow::Error::new(e),
            })
            .context("start the API server")?;
        // Agents on other machines pin the CA and join with a token.
        let _ = api.ca_pem.set(ca.cert.clone());
        // More servers join through any server of the embedded etcd.
        if let Some(etcd) = server_joiner {
            let _ = api.server_join.set(std::sync::Arc::new(crate::join::ServerJoiner {
                server_dir: server_dir.clone(),
                cluster_token: token.clone(),
                etcd,
            }));
        }
        match role {
            Role::Site => {
                let _ = api.node_join.set(crate::join::joiner(&server_dir, &ca, &token));
            }
            Role::Hub { site_certificates } => {
                let _ = api.site_join.set(crate::join::site_joiner(
                    &server_dir,
                    &ca,
                    site_certificates,
                ));
            }
        }
        // Components talk to the API through in-process clients (no socket, the same path as a
        // remote client's), each with its own identity, which RBAC and the Node authorizer
        // decide for. The server's own set-up (the device CRDs) acts as the server.
        let client = kube::Client::new(
            apiserver_lite::http::in_process(api.clone(), apiserver_lite::auth::Identity::loopback()),
            "default",
        );
        let clients: controllers::informer::ClientFactory = {
            let api = api.clone();
            std::sync::Arc::new(move |user: &str| {
                let identity = match apiserver_lite::auth::Identity::service_account_of(user) {
                    Some((namespace, name)) => {
                        apiserver_lite::auth::Identity::service_account(namespace, name)
                    }
                    None => apiserver_lite::auth::Identity::new(user, &[apiserver_lite::auth::AUTHENTICATED]),
                };
                kube::Client::new(apiserver_lite::http::in_process(api.clone(), identity), "default")
            })
        };
        // The node agent, its device twin and its mesh act as the node, exactly like a remote
        // agent's (`system:node:<name>`).
        let node_client = agent_config.as_ref().map(|config| {
            kube::Client::new(
                apiserver_lite::http::in_process(
                    api.clone(),
                    apiserver_lite::auth::Identity::node(&config.node_name),
                ),
                "default",
            )
        });
        // KubeEdge's device API is part of every site.
        devices::crd::install(&client)
            .await
            .context("install the Device and DeviceModel CRDs")?;
        // So is the Gateway API, which every node's ingress serves.
        controllers::crds::install(&client, ingress::crds::definitions())
            .await
            .context("install the Gateway API CRDs")?;
        let hub = if matches!(role, Role::Hub { .. }) {
            cloudhub::crds::install(&client)
                .await
                .context("install Karmada's CRDs")?;
            let hub_client = kube::Client::new(
                apiserver_lite::http::in_process(
                    api.clone(),
                    apiserver_lite::auth::Identity::new(
                        cloudhub::hub::HUB_USER,
                        &[apiserver_lite::auth::MASTERS, apiserver_lite::auth::AUTHENTICATED],
                    ),
                ),
                "default",
            );
            // The other hub servers on this datastore take this server's cluster proxy
            // requests for the sites linked to them, as the callers (impersonated).
            let forwarder =
                pki.user_certificate(&ca, cloudhub::hub::HUB_USER, &["system:masters".into()])?;
            let peers = cloudhub::hub::Peers {
                me: Some(advertise_address(&args)),
                tls: Some(link::dial::client_tls(
                    &ca.cert,
                    &forwarder.cert,
                    &forwarder.key,
                )?),
            };
            let hub =
                cloudhub::hub::Hub::new(hub_client.clone(), api.clone(), peers, shutdown.clone());
            let _ = api.hub.set(Arc::new(cloudhub::hub::Hooks(hub.clone())));
            let election = controllers::leader::Config::new(
                "kube-system",
                "edgesite-cloudhub",
                &server_identity(&server_dir)?,
            );
            let stop = shutdown.clone();
            Some(tokio::spawn(async move {
                let leading = controllers::leader::while_leading(
                    hub_client,
                    election,
                    stop,
                    |leading| hub.clone().run_leading(leading),
                );
                tokio::join!(hub.clone().run_everywhere(), leading);
            }))
        } else {
            None
        };
        let link = attach_to.map(|a| {
            tokio::spawn(attach(args.data_dir.clone(), a, api.clone(), shutdown.clone()))
        });
        let loops = tokio::spawn(crate::control_plane::run(
            clients,
            crate::control_plane::Settings {
                node_monitor_grace_period: args.node_monitor_grace_period,
                disconnected_node_pods: args.disconnected_node_pods,
                identity: server_identity(&server_dir)?,
                ca: ca.cert.clone(),
                ca_signer: ca.clone(),
                cluster_cidr,
                hub: matches!(role, Role::Hub { .. }),
            },
            shutdown.clone(),
        ));
        let node_name = agent_config.as_ref().map(|c| c.node_name.clone());
        let agent = agent_config.map(|config| {
            // The co-located agent's HTTP API is called in process, like its API client.
            let streams = api.nodes.clone();
            let node = config.node_name.clone();
            let node_client = node_client.clone().unwrap_or_else(|| client.clone());
            let kubelet = crate::kubelet_api::Settings {
                port: config.kubelet_port,
                node: node.clone(),
                client: node_client.clone(),
                ca_pem: ca.cert.clone(),
                cert_dir: config.root.join("pki"),
                shutdown: shutdown.clone(),
            };
            let publish = move |router: axum::Router| {
                let kubelet = kubelet.start(&router);
                let registered = streams
                    .register(&node, Arc::new(apiserver_lite::node_streams::InProcess(router)));
                (registered, kubelet)
            };
            tokio::spawn(edged::run(config, node_client, publish, shutdown.clone()))
        });
        let device_twin = match device_setup {
            Some(setup) => Some(crate::devices::start(
                setup,
                node_client.clone().unwrap_or_else(|| client.clone()),
                shutdown.clone(),
            )?),
            None => None,
        };
        let share = match &node_name {
            Some(node_name) => crate::ingress::start(
                &args.agent.ingress,
                mesh_config.is_some(),
                node_name,
                node_client.clone().unwrap_or_else(|| client.clone()),
                shutdown.clone(),
            ),
            None => None,
        };
        let mesh = match mesh_config {
            Some(mesh) => Some(
                crate::mesh::start(
                    mesh,
                    node_client.clone().unwrap_or_else(|| client.clone()),
                    shutdown.clone(),
                    share,
                )
                .await?,
            ),
            None => None,
        };
        let app = apiserver_lite::http::router(api.clone());
        let mut server = tokio::spawn(apiserver_lite::http::serve(listener, config.tls.clone(), app, shutdown.clone()));
        tracing::info!(
            kubeconfig = %args.write_kubeconfig.display(),
            "EdgeSite API server listening on {addr}; try: KUBECONFIG={} kubectl get ns",
            args.write_kubeconfig.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received, shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            finished = &mut server => {
                // The server only ends by itself on a start-up or serving error.
                return match finished {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("API server")),
                    Err(e) => Err(anyhow::anyhow!("API server task failed: {e}")),
                };
            }
        }
        shutdown.cancel();
        // Other servers and agents hear at once that this one is going.
        let _ = tokio::time::timeout(DRAIN, api.finished()).await;
        let _ = tokio::time::timeout(DRAIN, loops).await;
        for task in [hub, link].into_iter().flatten() {
            let _ = tokio::time::timeout(DRAIN, task).await;
        }
        if let Some(twin) = device_twin {
            let _ = tokio::time::timeout(DRAIN, twin).await;
        }
        if let Some(mesh) = mesh {
            let _ = tokio::time::timeout(DRAIN, mesh).await;
        }
        if let Some(agent) = agent {
            match tokio::time::timeout(DRAIN, agent).await {
                Ok(Ok(Err(e))) => tracing::warn!("node agent: {e}"),
                Ok(Err(e)) => tracing::warn!("node agent task failed: {e}"),
                _ => {}
            }
        }
        match tokio::time::timeout(DRAIN, server).await {
            Ok(Ok(result)) => result.context("API server"),
            Ok(Err(e)) => Err(anyhow::anyhow!("API server task failed: {e}")),
            Err(_) => {
                tracing::warn!("requests still running after {DRAIN:?}; exiting");
                Ok(())
            }
        }
    })
}
