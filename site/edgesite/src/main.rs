//! `edgesite`: the single binary of an EdgeSite site.
//!
//! This file parses flags (and the config file), sets up logging and signals, and starts the
//! components; the components themselves live in their crates and take typed configuration.

mod agent;
mod api_servers;
mod backup;
mod cloudhub;
mod config;
mod control_plane;
mod csr_signer;
mod devices;
mod etcd;
mod ingress;
mod join;
mod kubelet_api;
mod logging;
mod mesh;
mod pki;
mod server;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "edgesite",
    version,
    about = "EdgeSite: a single-binary, Kubernetes-compatible edge cluster",
    long_about = "EdgeSite runs a small Kubernetes-compatible cluster at an edge site from one binary.\n\n\
                  Start a site with `edgesite server`, then point kubectl at the kubeconfig it writes\n\
                  (default /etc/edgesite/edgesite.yaml)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the site's control plane (the Kubernetes API server on embedded SQLite or etcd, the
    /// scheduler and controllers) and, unless --disable-agent, a node agent on this machine.
    Server(Box<ServerArgs>),
    /// Join this machine to a site as a node: edgesite agent --server https://HOST:6443 --token TOKEN
    Agent(Box<AgentCommandArgs>),
    /// Join tokens for agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Write a kubeconfig for a user of this site: a client certificate signed by the site's CA.
    /// RBAC decides what the user may do: bind roles to the user or the groups, e.g.
    /// `kubectl create rolebinding NAME --clusterrole=view --user=NAME -n NAMESPACE`.
    Kubeconfig(KubeconfigArgs),
    /// Nodes of the site: `edgesite node remove NAME` takes a machine out for good.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// A standalone mesh relay for a machine every site can reach (a public VM): nodes that
    /// cannot reach each other directly meet through it.
    Relay(mesh::RelayArgs),
    /// The node's mesh: `edgesite mesh status` lists its peers, direct or relayed.
    Mesh {
        #[command(subcommand)]
        command: MeshCommand,
    },
    /// Images on this node's containerd.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Write a consistent copy of this server's datastore while it runs (SQLite's online
    /// backup); prints the copy's path.
    Backup(backup::BackupArgs),
    /// Snapshots of the embedded etcd (`--cluster-init`): save, ls, delete, prune.
    EtcdSnapshot {
        #[command(subcommand)]
        command: EtcdSnapshotCommand,
    },
    /// The servers' etcd members: `edgesite etcd member list|remove NAME`.
    Etcd {
        #[command(subcommand)]
        command: EtcdCommand,
    },
    /// The cloud hub that sites attach to (`edgesite server --cloudhub URL --cloudhub-token
    /// TOKEN`): Karmada's Cluster API for every site, and kubectl to any site through the hub.
    Cloudhub(CloudhubCommand),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct CloudhubCommand {
    #[command(subcommand)]
    command: Option<CloudhubSubcommand>,
    #[command(flatten)]
    args: Box<cloudhub::HubArgs>,
}

#[derive(Subcommand)]
enum EtcdSnapshotCommand {
    /// Save a snapshot now (etcd's own format; `--cluster-reset-restore-path` restores it).
    Save {
        /// The snapshot's name starts with this.
        #[arg(long, default_value = "on-demand")]
        name: String,
        #[command(flatten)]
        at: SnapshotPlace,
    },
    /// List the snapshots.
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        at: SnapshotPlace,
    },
    /// Delete snapshots by name.
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        at: SnapshotPlace,
    },
    /// Delete all but the newest snapshots whose names start with --name.
    Prune {
        #[arg(long, default_value = "on-demand")]
        name: String,
        #[arg(long, default_value_t = 5)]
        snapshot_retention: usize,
        #[command(flatten)]
        at: SnapshotPlace,
    },
}

#[derive(Subcommand)]
enum EtcdCommand {
    /// The etcd members of the site's servers.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// Every member: name, id, whether it votes, its URLs.
    #[command(alias = "ls")]
    List {
        /// This server's data dir.
        #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
        data_dir: PathBuf,
    },
    /// Take a server that is gone for good out of the etcd cluster (by member name or id), so
    /// the others need fewer votes; run on a server that stays.
    Remove {
        name: String,
        #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
        data_dir: PathBuf,
    },
}

/// `edgesite etcd member ...`.
fn etcd_members(command: EtcdCommand) -> Result<()> {
    use apiserver_lite::storage::etcd;
    let EtcdCommand::Member { command } = command;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fail = |e: apiserver_lite::storage::StorageError| anyhow::anyhow!("{e}");
    match command {
        MemberCommand::List { data_dir } => {
            let config = crate::etcd::local(&data_dir, "/registry")?;
            let members = runtime.block_on(etcd::members(&config)).map_err(fail)?;
            println!(
                "{:<24} {:<18} {:<8} {:<32} CLIENT",
                "NAME", "ID", "VOTES", "PEER"
            );
            for m in members {
                println!(
                    "{:<24} {:<18x} {:<8} {:<32} {}",
                    if m.name.is_empty() {
                        "(not started)"
                    } else {
                        &m.name
                    },
                    m.id,
                    if m.learner { "no" } else { "yes" },
                    m.peer_urls.join(","),
                    m.client_urls.join(",")
                );
            }
        }
        MemberCommand::Remove { name, data_dir } => {
            let config = crate::etcd::local(&data_dir, "/registry")?;
            let members = runtime.block_on(etcd::members(&config)).map_err(fail)?;
            let id = u64::from_str_radix(&name, 16).ok();
            let Some(member) = members.iter().find(|m| m.name == name || Some(m.id) == id) else {
                anyhow::bail!("no etcd member {name:?}; `edgesite etcd member list` shows them");
            };
            let mine =
                std::fs::read_to_string(data_dir.join("server/db/etcd-name")).unwrap_or_default();
            if mine.trim() == member.name {
                anyhow::bail!(
                    "{name} is this server's own member: run the removal on a server that stays"
                );
            }
            runtime
                .block_on(etcd::remove_member(&config, member.id))
                .map_err(fail)?;
            eprintln!(
                "removed etcd member {} ({:x}); that server must not start again with its old \
                 data dir (empty its <data-dir>/server/db to join anew)",
                member.name, member.id
            );
        }
    }
    Ok(())
}

#[derive(Args)]
struct SnapshotPlace {
    /// The server's data dir.
    #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
    data_dir: PathBuf,
    /// Where the snapshots are (default: <data-dir>/server/db/snapshots).
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl SnapshotPlace {
    fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("server").join("db").join("snapshots"))
    }
}

/// `edgesite etcd-snapshot ...`.
fn etcd_snapshot(command: EtcdSnapshotCommand) -> Result<()> {
    match command {
        EtcdSnapshotCommand::Save { name, at } => {
            let config = etcd::local(&at.data_dir, "/registry")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let node = server::hostname();
            let saved = runtime.block_on(etcd::save(&config, &at.dir(), &name, &node))?;
            println!("{}", saved.path.display());
            eprintln!("saved snapshot {} ({} bytes)", saved.name, saved.size);
        }
        EtcdSnapshotCommand::Ls { at } => {
            println!("{:<50} {:<60} {:>12} CREATED", "NAME", "LOCATION", "SIZE");
            for s in etcd::list_snapshots(&at.dir())? {
                let created: chrono::DateTime<chrono::Utc> = s.created.into();
                println!(
                    "{:<50} {:<60} {:>12} {}",
                    s.name,
                    format!("file://{}", s.path.display()),
                    s.size,
                    created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
            }
        }
        EtcdSnapshotCommand::Delete { names, at } => {
            let dir = at.dir();
            for name in names {
                if name.contains('/') || name.starts_with('.') {
                    anyhow::bail!(
                        "{name:?} is not a snapshot name (see `edgesite etcd-snapshot ls`)"
                    );
                }
                let path = dir.join(&name);
                std::fs::remove_file(&path).map_err(|e| {
                    anyhow::anyhow!("cannot delete snapshot {name} ({}): {e}", path.display())
                })?;
                eprintln!("deleted snapshot {name}");
            }
        }
        EtcdSnapshotCommand::Prune {
            name,
            snapshot_retention,
            at,
        } => {
            for deleted in etcd::prune(&at.dir(), &name, snapshot_retention)? {
                eprintln!("deleted snapshot {deleted}");
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum CloudhubSubcommand {
    /// Tokens that attach sites to this hub.
    Token {
        #[command(subcommand)]
        command: HubTokenCommand,
    },
    /// Write a kubeconfig for the hub, or with --site for one site through the hub's cluster
    /// proxy. The user's certificate is signed by the hub's CA; the hub's RBAC decides who may
    /// use which site's proxy (`clusters/proxy`), the site's RBAC what they may do there.
    Kubeconfig(cloudhub::KubeconfigArgs),
}

#[derive(Subcommand)]
enum HubTokenCommand {
    /// Create a token for sites to attach with, and print it (on the last line).
    Create {
        /// The hub's data dir.
        #[arg(long, short = 'd', default_value = cloudhub::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// How long the token may be used to attach (e.g. 24h, 30m; 0 = no expiry).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
}

#[derive(Args)]
struct KubeconfigArgs {
    /// The user name (the certificate's common name; RBAC subjects of kind User).
    #[arg(long)]
    user: String,
    /// Groups of the user (the certificate's organizations); repeat for several.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// The server's data dir (holds the cluster CA).
    #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
    data_dir: PathBuf,
    /// The address users reach the API server at (default: the admin kubeconfig's).
    #[arg(long)]
    server: Option<String>,
    /// Where to write the kubeconfig (mode 0600).
    #[arg(long, short = 'o')]
    output: PathBuf,
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Import image tarballs (OCI layout or `docker save` archives) for air-gapped sites.
    Import {
        /// Tarballs to import.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// containerd's socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        container_runtime_endpoint: PathBuf,
        /// containerd namespace of the node's images.
        #[arg(long, default_value = "edgesite")]
        containerd_namespace: String,
    },
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Each peer of this node: connection (direct or relayed), address, RTT, bytes, hole punch.
    Status {
        /// The mesh status address of the local node (its --mesh-status).
        #[arg(long, default_value = "127.0.0.1:10351")]
        address: std::net::SocketAddr,
        /// `json` for the raw status.
        #[arg(long, short = 'o', value_name = "table|json", default_value = "table")]
        output: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Remove a node for good: its Node object goes (its pods are deleted), its certificate
    /// stops working, and its name is free for another machine. Bring the machine back by
    /// joining it again with a new token.
    Remove {
        /// The node's name.
        name: String,
        /// The server's data dir (holds the admin credentials).
        #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token and print it (on the last line).
    Create {
        /// The server's data dir.
        #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
        data_dir: PathBuf,
        /// How long the token may be used to join (e.g. 24h, 30m; 0 = no expiry).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
}

fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    parse_duration(text)
}

/// Flags of `edgesite agent`.
#[derive(Args, Clone, Debug)]
pub struct AgentCommandArgs {
    /// The site's API server, e.g. https://10.0.0.1:6443.
    #[arg(long, env = "EDGESITE_URL")]
    pub server: String,
    /// Join token from `edgesite token create` (needed only for the first start).
    #[arg(long, env = "EDGESITE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Folder for this agent's state: certificates, pod files, logs.
    #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// `90s`, `2m`, `1h` or plain seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 40s, 2m or 1h"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?} is not a duration such as 40s, 2m or 1h")),
    };
    if seconds == 0 {
        return Err("the duration must be at least one second".into());
    }
    Ok(std::time::Duration::from_secs(seconds))
}

/// Where a server keeps the cluster state: SQLite in the data dir unless an etcd is named.
/// Names follow K3s.
#[derive(Args, Clone, Debug, Default)]
pub struct DatastoreArgs {
    /// Keep the cluster state in this etcd instead of SQLite: its client URLs, comma separated
    /// (e.g. https://etcd1:2379,https://etcd2:2379). Several servers may share it.
    #[arg(
        long,
        value_name = "URLS",
        env = "EDGESITE_DATASTORE_ENDPOINT",
        hide_env_values = true
    )]
    pub datastore_endpoint: Option<String>,
    /// CA certificate (PEM) that etcd's serving certificate is checked against.
    #[arg(long, value_name = "FILE", env = "EDGESITE_DATASTORE_CAFILE")]
    pub datastore_cafile: Option<PathBuf>,
    /// Client certificate (PEM) this server presents to etcd.
    #[arg(long, value_name = "FILE", env = "EDGESITE_DATASTORE_CERTFILE")]
    pub datastore_certfile: Option<PathBuf>,
    /// Key (PEM) of --datastore-certfile.
    #[arg(long, value_name = "FILE", env = "EDGESITE_DATASTORE_KEYFILE")]
    pub datastore_keyfile: Option<PathBuf>,
    /// Prefix of this site's keys in etcd: sites with different prefixes can share one etcd.
    #[arg(long, value_name = "PREFIX", default_value = "/registry")]
    pub etcd_prefix: String,
}

/// The embedded etcd (K3s's flag names): `--cluster-init` on the first server.
#[derive(Args, Clone, Debug)]
pub struct EmbeddedEtcdArgs {
    /// Keep the cluster state in an etcd member this server starts and supervises (Debian's
    /// etcd), so that more servers can join; a SQLite site moves its state into it once. A
    /// server that ran one keeps it.
    #[arg(long)]
    pub cluster_init: bool,
    /// Join the site whose server is at this URL as another server (with --token, that
    /// server's token from <data-dir>/server/token): this server gets the site's keys and an
    /// etcd member of its own.
    #[arg(long, value_name = "URL", env = "EDGESITE_SERVER_URL")]
    pub server: Option<String>,
    /// Make this server's etcd member a cluster of one again (after losing the others), then
    /// exit; with --cluster-reset-restore-path, from that snapshot instead.
    #[arg(long)]
    pub cluster_reset: bool,
    /// A snapshot (`edgesite etcd-snapshot save`) to restore with --cluster-reset.
    #[arg(long, value_name = "FILE", requires = "cluster_reset")]
    pub cluster_reset_restore_path: Option<PathBuf>,
    /// The embedded etcd's client port.
    #[arg(long, value_name = "PORT", default_value_t = 2379)]
    pub etcd_client_port: u16,
    /// The embedded etcd's peer port (member to member).
    #[arg(long, value_name = "PORT", default_value_t = 2380)]
    pub etcd_peer_port: u16,
    /// When to take scheduled snapshots (five cron fields, UTC).
    #[arg(long, value_name = "CRON", default_value = "0 */12 * * *")]
    pub etcd_snapshot_schedule_cron: String,
    /// How many scheduled snapshots to keep.
    #[arg(long, value_name = "COUNT", default_value_t = 5)]
    pub etcd_snapshot_retention: usize,
    /// Where snapshots go (default: <data-dir>/server/db/snapshots).
    #[arg(long, value_name = "DIR")]
    pub etcd_snapshot_dir: Option<PathBuf>,
    /// No scheduled snapshots.
    #[arg(long)]
    pub etcd_disable_snapshots: bool,
}

impl DatastoreArgs {
    /// The etcd these flags name, if any; a clear error for a URL that is not one.
    pub fn etcd(&self) -> Result<Option<apiserver_lite::storage::etcd::EtcdConfig>> {
        let Some(endpoint) = &self.datastore_endpoint else {
            if self.datastore_cafile.is_some()
                || self.datastore_certfile.is_some()
                || self.datastore_keyfile.is_some()
            {
                anyhow::bail!("--datastore-cafile/-certfile/-keyfile need --datastore-endpoint");
            }
            return Ok(None);
        };
        let endpoints: Vec<String> = endpoint
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            anyhow::bail!(
                "--datastore-endpoint is empty: give etcd's client URLs, e.g. https://etcd1:2379"
            );
        }
        for e in &endpoints {
            let Some((scheme, rest)) = e.split_once("://") else {
                anyhow::bail!("--datastore-endpoint {e:?}: give a URL such as https://etcd1:2379");
            };
            if scheme != "http" && scheme != "https" {
                anyhow::bail!(
                    "--datastore-endpoint {e:?}: only etcd is supported (http:// or https:// URLs); \
                     without the flag the state is kept in SQLite in the data dir"
                );
            }
            if rest.is_empty() {
                anyhow::bail!("--datastore-endpoint {e:?}: the host is missing");
            }
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.trim_matches('/').is_empty() {
            anyhow::bail!(
                "--etcd-prefix {:?}: give a path such as /registry or /sites/shop-17",
                self.etcd_prefix
            );
        }
        let mut config = apiserver_lite::storage::etcd::EtcdConfig::new(endpoints);
        config.prefix = self.etcd_prefix.clone();
        config.ca_file = self.datastore_cafile.clone();
        config.cert_file = self.datastore_certfile.clone();
        config.key_file = self.datastore_keyfile.clone();
        Ok(Some(config))
    }
}

/// Flags of `edgesite server`; names follow K3s where K3s has the same flag.
#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// Config file whose keys are these flag names (without --); command-line flags win.
    #[arg(long, short = 'c', default_value = config::DEFAULT_CONFIG, env = "EDGESITE_CONFIG_FILE")]
    pub config: PathBuf,
    /// Folder that holds the datastore, certificates and tokens.
    #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
    pub data_dir: PathBuf,
    /// Address the API server listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// HTTPS port of the API server.
    #[arg(long, default_value_t = 6443)]
    pub https_listen_port: u16,
    /// Address agents and pods reach this server at: the `kubernetes` Service's endpoint
    /// (default: --bind-address, or the node IP when that is 0.0.0.0).
    #[arg(long, value_name = "IP")]
    pub advertise_address: Option<IpAddr>,
    /// Port agents and pods reach this server at (default: --https-listen-port).
    #[arg(long, value_name = "PORT")]
    pub advertise_port: Option<u16>,
    /// IPv4 network Service cluster IPs are allocated from.
    #[arg(
        long = "service-cidr",
        value_name = "CIDR",
        default_value = "10.43.0.0/16"
    )]
    pub service_cidr: String,
    /// Port range for NodePort Services.
    #[arg(
        long = "service-node-port-range",
        value_name = "RANGE",
        default_value = "30000-32767"
    )]
    pub service_node_port_range: String,
    /// How long a node may stop heartbeating before it is marked NotReady (e.g. 40s, 2m).
    #[arg(long = "node-monitor-grace-period", value_name = "DURATION", default_value = "40s", value_parser = parse_duration)]
    pub node_monitor_grace_period: std::time::Duration,
    /// Pods of a node that stopped answering: `keep` them bound and running there (an edge node
    /// runs on from its cache), or `evict` them after their tolerationSeconds as upstream
    /// Kubernetes does. A node's `edgesite.io/disconnected-pods` annotation overrides this.
    #[arg(
        long = "disconnected-node-pods",
        value_name = "keep|evict",
        default_value = "keep"
    )]
    pub disconnected_node_pods: controllers::node_lifecycle::DisconnectedPods,
    /// Extra host name or IP for the serving certificate (repeat for several).
    #[arg(long = "tls-san", value_name = "NAME")]
    pub tls_san: Vec<String>,
    /// Where to write the admin kubeconfig.
    #[arg(
        long,
        default_value = "/etc/edgesite/edgesite.yaml",
        env = "EDGESITE_KUBECONFIG_OUTPUT"
    )]
    pub write_kubeconfig: PathBuf,
    /// File mode of the kubeconfig, in octal (for example 0644 to let other users read it).
    #[arg(long, default_value = "0600", env = "EDGESITE_KUBECONFIG_MODE")]
    pub write_kubeconfig_mode: String,
    /// Run only the control plane here, no node agent (no containers run on this machine).
    #[arg(long)]
    pub disable_agent: bool,
    /// IPv4 network pod IPs are allocated from; each node gets a /24 of it.
    #[arg(
        long = "cluster-cidr",
        value_name = "CIDR",
        default_value = "10.42.0.0/16"
    )]
    pub cluster_cidr: String,
    /// Do not serve as a mesh relay for the site's nodes (by default the server is one).
    #[arg(long)]
    pub disable_mesh_relay: bool,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub datastore: DatastoreArgs,
    #[command(flatten)]
    pub etcd: EmbeddedEtcdArgs,
    /// Shared secret that agents will use to join this site (generated when absent).
    #[arg(long, env = "EDGESITE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Start with an empty datastore although this data dir's certificates belong to a site that
    /// already ran (its state.db is missing or empty). Every node must then join again.
    #[arg(long)]
    pub reset_datastore: bool,
    /// Attach this site to a cloud hub (`edgesite cloudhub`), e.g. https://hub.example:5443. The
    /// site dials out (through HTTPS_PROXY if set); it runs on by itself while the hub is away.
    #[arg(long, value_name = "URL", env = "EDGESITE_CLOUDHUB_URL")]
    pub cloudhub: Option<String>,
    /// Token from `edgesite cloudhub token create` (needed only to attach the first time).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "EDGESITE_CLOUDHUB_TOKEN",
        hide_env_values = true
    )]
    pub cloudhub_token: Option<String>,
    /// This site's name at the hub (its Cluster's name; default: the host name).
    #[arg(long, value_name = "NAME")]
    pub site_name: Option<String>,
    /// Label of this site's Cluster at the hub, KEY=VALUE (repeat for several); placement
    /// policies select sites by them.
    #[arg(long = "site-label", value_name = "KEY=VALUE")]
    pub site_label: Vec<String>,
}

/// Flags of the node agent (`edgesite server` without --disable-agent, and `edgesite agent`);
/// names follow K3s.
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Node name (default: the host name).
    #[arg(long, env = "EDGESITE_NODE_NAME")]
    pub node_name: Option<String>,
    /// Label to register the node with, key=value (repeat for several).
    #[arg(long = "node-label", value_name = "KEY=VALUE")]
    pub node_label: Vec<String>,
    /// Taint to register the node with, key=value:Effect (repeat for several).
    #[arg(long = "node-taint", value_name = "KEY=VALUE:EFFECT")]
    pub node_taint: Vec<String>,
    /// IP address to advertise for the node (default: the address of the default route).
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ip: Option<IpAddr>,
    /// Port of the node's kubelet API (`/pods`, `/stats/summary`, `/metrics/*`, exec, logs and
    /// port-forward for Prometheus, metrics-server and kubelet clients); 0 turns it off.
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub container_runtime_endpoint: PathBuf,
    /// containerd namespace this node's containers and images live in.
    #[arg(long, default_value = "edgesite")]
    pub containerd_namespace: String,
    /// Directory of the CNI plugins (default: /usr/lib/cni, then /opt/cni/bin).
    #[arg(long = "cni-bin-dir", value_name = "DIR")]
    pub cni_bin_dir: Vec<PathBuf>,
    /// Linux bridge the node's pods attach to.
    #[arg(long, default_value = "edgesite0")]
    pub cni_bridge: String,
    /// Nameserver written into ClusterFirst pods' resolv.conf (default: the host's resolvers
    /// until the mesh provides cluster DNS).
    #[arg(long = "cluster-dns", value_name = "IP")]
    pub cluster_dns: Option<IpAddr>,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Registry mirrors, credentials and TLS settings (K3s's registries.yaml format).
    #[arg(long, default_value = "/etc/edgesite/registries.yaml")]
    pub private_registry: PathBuf,
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Container log rotation: the size of one file in bytes, and how many files to keep.
    #[arg(long, default_value_t = 10 << 20)]
    pub container_log_max_size: u64,
    #[arg(long, default_value_t = 5)]
    pub container_log_max_files: usize,
    /// This node's policy when it loses the site (annotation edgesite.io/disconnected-pods):
    /// `keep` its pods, or `evict` them; default: the site's --disconnected-node-pods.
    #[arg(long = "disconnected-pods", value_name = "keep|evict")]
    pub disconnected_pods: Option<controllers::node_lifecycle::DisconnectedPods>,
    /// Where this node keeps the site's local-path volumes (K3s's flag; default:
    /// <data-dir>/storage).
    #[arg(long = "default-local-storage-path", value_name = "DIR")]
    pub default_local_storage_path: Option<PathBuf>,
    #[command(flatten)]
    pub devices: crate::devices::DeviceArgs,
    #[command(flatten)]
    pub mesh: crate::mesh::MeshArgs,
    #[command(flatten)]
    pub ingress: crate::ingress::IngressArgs,
}

impl AgentArgs {
    /// The agent's typed config.
    pub fn to_config(
        &self,
        data_dir: &std::path::Path,
        control_plane: bool,
    ) -> Result<edged::Config> {
        let node_name = self
            .node_name
            .clone()
            .unwrap_or_else(server::hostname)
            .to_lowercase();
        let mut labels = Vec::new();
        for l in &self.node_label {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--node-label {l:?} must be key=value"))?;
            labels.push((k.to_string(), v.to_string()));
        }
        for t in &self.node_taint {
            edged::node::parse_taint(t).map_err(|e| anyhow::anyhow!("--node-taint: {e}"))?;
        }
        let cni_bin_dirs = if self.cni_bin_dir.is_empty() {
            edged::network::cni::DEFAULT_BIN_DIRS
                .iter()
                .map(PathBuf::from)
                .collect()
        } else {
            self.cni_bin_dir.clone()
        };
        Ok(edged::Config {
            cgroup_root: format!("/edgesite/{node_name}"),
            node_name,
            root: data_dir.join("agent"),
            containerd_socket: self.container_runtime_endpoint.clone(),
            containerd_namespace: self.containerd_namespace.clone(),
            node_ip: self.node_ip,
            kubelet_port: self.kubelet_port,
            labels,
            taints: self.node_taint.clone(),
            control_plane,
            cni_bin_dirs,
            cni_bridge: self.cni_bridge.clone(),
            registries: self.private_registry.clone(),
            cluster_dns: self.cluster_dns.or(self.mesh.cluster_dns()),
            cluster_domain: self.cluster_domain.clone(),
            max_pods: self.max_pods,
            log_rotation: edged::logs::Rotation {
                max_size: self.container_log_max_size,
                max_files: self.container_log_max_files,
            },
            version: apiserver_lite::http::KUBE_GIT_VERSION.to_string(),
            status_update_frequency: std::time::Duration::from_secs(60),
            lease_duration: std::time::Duration::from_secs(40),
            image_gc_high_percent: 85,
            image_gc_low_percent: 80,
            local_storage: Some(
                self.default_local_storage_path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("storage")),
            ),
            annotations: self
                .disconnected_pods
                .map(|p| {
                    let v = match p {
                        controllers::node_lifecycle::DisconnectedPods::Keep => "keep",
                        controllers::node_lifecycle::DisconnectedPods::Evict => "evict",
                    };
                    vec![(
                        controllers::node_lifecycle::POLICY_ANNOTATION.to_string(),
                        v.to_string(),
                    )]
                })
                .unwrap_or_default(),
        })
    }
}

/// `edgesite images import`: straight into containerd, so it works with the agent stopped.
fn import_images(files: &[PathBuf], socket: &std::path::Path, namespace: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let rt = edged::runtime::containerd::Containerd::connect(socket, namespace).await?;
        let images = edged::images::ImageService::new(rt, Default::default());
        for file in files {
            let names = images
                .import(file)
                .await
                .map_err(|e| anyhow::anyhow!("import {}: {e}", file.display()))?;
            for name in names {
                println!("imported {name}");
            }
        }
        Ok(())
    })
}

fn init_logging() {
    logging::init();
}

/// Names of a command's flags (`server`, `cloudhub`), for its config file's keys.
fn flag_names(command: &str) -> Vec<String> {
    let cmd = Cli::command();
    cmd.find_subcommand(command)
        .map(|s| {
            s.get_arguments()
                .filter_map(|a| a.get_long().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn parse() -> Result<Cli> {
    parse_from(std::env::args().collect())
}

/// The command line with the config file's entries before the user's own flags (for `server`,
/// and for `cloudhub` itself, not its `token` and `kubeconfig` tools).
fn parse_from(mut args: Vec<String>) -> Result<Cli> {
    let of = match (
        args.get(1).map(String::as_str),
        args.get(2).map(String::as_str),
    ) {
        (Some("server"), _) => Some(config::Of::Server),
        (Some("cloudhub"), Some("token" | "kubeconfig" | "help")) => None,
        (Some("cloudhub"), _) => Some(config::Of::Hub),
        _ => None,
    };
    if let Some(of) = of {
        let (path, explicit) = config::config_path(&args, of);
        let command = if of == config::Of::Server {
            "server"
        } else {
            "cloudhub"
        };
        let extra = config::file_args(&path, explicit, &flag_names(command), of)?;
        args.splice(2..2, extra);
    }
    let matches = Cli::command()
        .args_override_self(true)
        .try_get_matches_from(args)
        .unwrap_or_else(|e| e.exit());
    Ok(Cli::from_arg_matches(&matches)?)
}

/// Creates `dir` for the server's or agent's state, readable by root only whatever `--data-dir`
/// is: it holds keys, the datastore with every Secret, and pods' volumes. The parents this call
/// creates (a new data dir) are private too; existing ones keep their mode (a data dir may sit
/// in a shared folder such as /srv).
pub(crate) fn private_dir(dir: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restrict {} to its owner", dir.display()))?;
    Ok(())
}

/// Raises the open-files limit to its hard limit, as K3s's unit does with LimitNOFILE: a site
/// holds a descriptor per connection, watch, container log and mesh stream, and a default soft
/// limit of 1,024 lets a stranger's idle connections exhaust it.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        tracing::debug!("could not raise the open-files limit from {soft} to {hard}");
    }
}

fn main() {
    // Started by an agent as a pod's PID namespace holder: that, and nothing else.
    edged::pid_namespace::run_holder_if_asked();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("edgesite: {e:#}");
            std::process::exit(2);
        }
    };
    init_logging();
    if matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Relay(_) | Command::Cloudhub(_)
    ) {
        raise_descriptor_limit();
    }
    // One TLS crypto provider for every client in the process (registry pulls included).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result: Result<()> = match cli.command {
        Command::Server(args) => server::run(*args),
        Command::Cloudhub(CloudhubCommand {
            command: None,
            args,
        }) => cloudhub::run(*args),
        Command::Cloudhub(CloudhubCommand {
            command: Some(CloudhubSubcommand::Kubeconfig(args)),
            ..
        }) => cloudhub::kubeconfig(&args),
        Command::Cloudhub(CloudhubCommand {
            command:
                Some(CloudhubSubcommand::Token {
                    command: HubTokenCommand::Create { data_dir, ttl },
                }),
            ..
        }) => join::create_token(&data_dir, ttl).map(|token| {
            eprintln!("Attach a site to this hub with:");
            eprintln!(
                "  edgesite server --cloudhub https://<this hub>:5443 --cloudhub-token <token> --site-name <name> [--site-label key=value]"
            );
            println!("{token}");
        }),
        Command::Agent(args) => agent::run(*args),
        Command::Images {
            command:
                ImagesCommand::Import {
                    files,
                    container_runtime_endpoint,
                    containerd_namespace,
                },
        } => import_images(&files, &container_runtime_endpoint, &containerd_namespace),
        Command::Relay(args) => mesh::run_relay(args),
        Command::Backup(args) => backup::run(&args),
        Command::EtcdSnapshot { command } => etcd_snapshot(command),
        Command::Etcd { command } => etcd_members(command),
        Command::Kubeconfig(args) => server::user_kubeconfig(
            &args.data_dir,
            &args.user,
            &args.groups,
            args.server.as_deref(),
            &args.output,
        )
        .map(|()| {
            eprintln!(
                "wrote {} for user {:?}; grant it access with RBAC, e.g.: kubectl create rolebinding {}-view --clusterrole=view --user={} -n default",
                args.output.display(),
                args.user,
                args.user,
                args.user
            )
        }),
        Command::Node {
            command: NodeCommand::Remove { name, data_dir },
        } => join::remove_node(&data_dir, &name).map(|()| {
            eprintln!(
                "node {name:?} removed: its certificate no longer works and its name is free; to bring the machine back, join it again with a new token (`edgesite token create`)"
            )
        }),
        Command::Mesh {
            command: MeshCommand::Status { address, output },
        } => mesh::print_status(address, output == "json"),
        Command::Token {
            command: TokenCommand::Create { data_dir, ttl },
        } => join::create_token(&data_dir, ttl).map(|token| {
            if !ttl.is_zero() {
                eprintln!(
                    "This token lets a machine join the site for {}s. On the new node run:",
                    ttl.as_secs()
                );
                eprintln!("  edgesite agent --server https://<this server>:6443 --token <token>");
            }
            println!("{token}");
        }),
    };
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("edgesite: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_hub_reads_its_own_config_file_and_its_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cloudhub-config.yaml");
        std::fs::write(
            &file,
            "site-certificate-lifetime: 30d\ntls-san: [hub.example]\nhttps-listen-port: 6443\n",
        )
        .unwrap();
        let config = format!("--config={}", file.display());
        let cli = parse_from(argv(&[
            "edgesite",
            "cloudhub",
            &config,
            "--https-listen-port",
            "7443",
            "--tls-san",
            "10.0.0.9",
        ]))
        .unwrap();
        let Command::Cloudhub(CloudhubCommand {
            command: None,
            args,
        }) = cli.command
        else {
            panic!("not the hub");
        };
        assert_eq!(args.site_certificate_lifetime.as_secs(), 30 * 86_400);
        assert_eq!(args.https_listen_port, 7443);
        assert_eq!(args.tls_san, vec!["hub.example", "10.0.0.9"]);
        // A key that is not a hub flag is refused, naming the hub's flags.
        std::fs::write(&file, "cluster-cidr: 10.0.0.0/8\n").unwrap();
        let error = parse_from(argv(&["edgesite", "cloudhub", &config]))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("unknown key \"cluster-cidr\""), "{error}");
        assert!(error.contains("edgesite cloudhub --help"), "{error}");
    }

    #[test]
    fn datastore_flags_name_an_etcd_or_say_what_is_wrong() {
        let store = |endpoint: Option<&str>, prefix: &str| DatastoreArgs {
            datastore_endpoint: endpoint.map(str::to_string),
            etcd_prefix: prefix.into(),
            ..Default::default()
        };
        assert!(store(None, "/registry").etcd().unwrap().is_none());
        let etcd = store(Some("https://a:2379, https://b:2379"), "/sites/x")
            .etcd()
            .unwrap()
            .unwrap();
        assert_eq!(etcd.endpoints, ["https://a:2379", "https://b:2379"]);
        assert_eq!(etcd.prefix, "/sites/x");
        let error = |s: DatastoreArgs| s.etcd().unwrap_err().to_string();
        assert!(error(store(Some("mysql://u@tcp(h)/db"), "/registry")).contains("only etcd"));
        assert!(error(store(Some("etcd1:2379"), "/registry")).contains("give a URL"));
        assert!(error(store(Some("http://a:2379"), "registry")).contains("--etcd-prefix"));
        let mut files = store(None, "/registry");
        files.datastore_cafile = Some("/ca.pem".into());
        assert!(error(files).contains("need --datastore-endpoint"));
    }
}
