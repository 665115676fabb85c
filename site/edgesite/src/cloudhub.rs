//! `edgesite cloudhub`: the hub that sites attach to. It is the site's API server on its own
//! datastore with no node and no workload controllers, plus Karmada's `Cluster` API and the hub's
//! side of the cloud link (the `cloudhub` crate); `server::run_as` starts both kinds.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, FromArgMatches};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/edgesite-cloudhub";

/// Flags of `edgesite cloudhub`, named as `edgesite server`'s where they mean the same.
#[derive(Args, Clone, Debug)]
pub struct HubArgs {
    /// Config file whose keys are these flag names (without --); command-line flags win.
    #[arg(long, short = 'c', default_value = crate::config::DEFAULT_HUB_CONFIG, env = "EDGESITE_CLOUDHUB_CONFIG_FILE")]
    pub config: PathBuf,
    /// Folder that holds the hub's datastore, certificates and tokens.
    #[arg(long, short = 'd', default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address the hub listens on (kubectl and the sites' links alike).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// HTTPS port of the hub (Karmada's API server uses 5443 too).
    #[arg(long, default_value_t = 5443)]
    pub https_listen_port: u16,
    /// Extra host name or IP for the serving certificate (repeat for several): every name
    /// sites use in --cloudhub must be listed (the machine's addresses are).
    #[arg(long = "tls-san", value_name = "NAME")]
    pub tls_san: Vec<String>,
    /// Where to write the hub's admin kubeconfig.
    #[arg(long, default_value = "/etc/edgesite/cloudhub.yaml")]
    pub write_kubeconfig: PathBuf,
    /// File mode of the kubeconfig, in octal.
    #[arg(long, default_value = "0600")]
    pub write_kubeconfig_mode: String,
    /// Start with an empty datastore although this data dir's certificates belong to a hub that
    /// already ran. Every site must then attach again.
    #[arg(long)]
    pub reset_datastore: bool,
    /// How long a site's certificate lasts (`90s`, `30m`, `12h`, `365d`). Sites renew theirs
    /// over their link when two thirds of it have passed.
    #[arg(long, default_value = "365d", value_parser = parse_lifetime)]
    pub site_certificate_lifetime: std::time::Duration,
    /// Several hubs share one etcd: the same flags as `edgesite server`'s.
    #[command(flatten)]
    pub datastore: crate::DatastoreArgs,
    /// Several hub servers with embedded etcd members: `--cluster-init` on the first, `--server
    /// https://FIRST:5443 --token TOKEN` on the others, as `edgesite server`.
    #[command(flatten)]
    pub etcd: crate::EmbeddedEtcdArgs,
    /// The hub servers' shared secret: another server joins with the first one's
    /// <data-dir>/server/token.
    #[arg(long, env = "EDGESITE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Address the other hub servers reach this one at (default: --bind-address, or the
    /// address of the default route when that is 0.0.0.0).
    #[arg(long, value_name = "IP")]
    pub advertise_address: Option<IpAddr>,
    /// Port the other hub servers reach this one at (default: --https-listen-port).
    #[arg(long, value_name = "PORT")]
    pub advertise_port: Option<u16>,
}

/// `90s`, `30m`, `12h` or `365d`, at least a minute.
fn parse_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?}: give a number with s, m, h or d, e.g. 365d");
    let last = text.char_indices().last().map_or(0, |(i, _)| i);
    let (number, unit) = text.split_at(last);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    if seconds < 60 {
        return Err(format!(
            "{text:?}: a site certificate must last at least a minute"
        ));
    }
    Ok(std::time::Duration::from_secs(seconds))
}

/// Flags of `edgesite cloudhub kubeconfig`.
#[derive(Args, Clone, Debug)]
pub struct KubeconfigArgs {
    /// A site: the kubeconfig's server is the hub's cluster proxy for it.
    #[arg(long)]
    pub site: Option<String>,
    /// The user (default: the hub's admin).
    #[arg(long)]
    pub user: Option<String>,
    /// Groups of the user (repeat for several).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// The hub's data dir.
    #[arg(long, short = 'd', default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The address users reach the hub at (default: the admin kubeconfig's).
    #[arg(long)]
    pub server: Option<String>,
    /// Where to write the kubeconfig (mode 0600).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

/// The server's flags for a hub: its own where it has them, the server's defaults otherwise, no
/// node agent.
fn server_args(hub: &HubArgs) -> Result<crate::ServerArgs> {
    let mut argv: Vec<String> = vec![
        "cloudhub".into(),
        "--data-dir".into(),
        hub.data_dir.display().to_string(),
        "--bind-address".into(),
        hub.bind_address.to_string(),
        "--https-listen-port".into(),
        hub.https_listen_port.to_string(),
        "--write-kubeconfig".into(),
        hub.write_kubeconfig.display().to_string(),
        "--write-kubeconfig-mode".into(),
        hub.write_kubeconfig_mode.clone(),
        "--disable-agent".into(),
        "--disable-mesh-relay".into(),
    ];
    for san in &hub.tls_san {
        argv.push("--tls-san".into());
        argv.push(san.clone());
    }
    if hub.reset_datastore {
        argv.push("--reset-datastore".into());
    }
    let store = &hub.datastore;
    let files = [
        ("--datastore-cafile", &store.datastore_cafile),
        ("--datastore-certfile", &store.datastore_certfile),
        ("--datastore-keyfile", &store.datastore_keyfile),
    ];
    if let Some(endpoint) = &store.datastore_endpoint {
        argv.push("--datastore-endpoint".into());
        argv.push(endpoint.clone());
    }
    for (flag, file) in files {
        if let Some(file) = file {
            argv.push(flag.into());
            argv.push(file.display().to_string());
        }
    }
    argv.push("--etcd-prefix".into());
    argv.push(store.etcd_prefix.clone());
    let etcd = &hub.etcd;
    for (flag, on) in [
        ("--cluster-init", etcd.cluster_init),
        ("--cluster-reset", etcd.cluster_reset),
        ("--etcd-disable-snapshots", etcd.etcd_disable_snapshots),
    ] {
        if on {
            argv.push(flag.into());
        }
    }
    let optional = [
        ("--server", etcd.server.clone()),
        (
            "--cluster-reset-restore-path",
            etcd.cluster_reset_restore_path
                .as_ref()
                .map(|p| p.display().to_string()),
        ),
        (
            "--etcd-snapshot-dir",
            etcd.etcd_snapshot_dir
                .as_ref()
                .map(|p| p.display().to_string()),
        ),
        ("--token", hub.token.clone()),
        (
            "--advertise-address",
            hub.advertise_address.map(|a| a.to_string()),
        ),
        (
            "--advertise-port",
            hub.advertise_port.map(|p| p.to_string()),
        ),
    ];
    for (flag, value) in optional {
        if let Some(value) = value {
            argv.push(flag.into());
            argv.push(value);
        }
    }
    for (flag, value) in [
        ("--etcd-client-port", etcd.etcd_client_port.to_string()),
        ("--etcd-peer-port", etcd.etcd_peer_port.to_string()),
        (
            "--etcd-snapshot-schedule-cron",
            etcd.etcd_snapshot_schedule_cron.clone(),
        ),
        (
            "--etcd-snapshot-retention",
            etcd.etcd_snapshot_retention.to_string(),
        ),
    ] {
        argv.push(flag.into());
        argv.push(value);
    }
    let command = crate::ServerArgs::augment_args(clap::Command::new("cloudhub"));
    let matches = command
        .try_get_matches_from(argv)
        .context("the hub's server settings")?;
    Ok(crate::ServerArgs::from_arg_matches(&matches)?)
}

pub fn run(args: HubArgs) -> Result<()> {
    crate::server::run_as(
        server_args(&args)?,
        crate::server::Role::Hub {
            site_certificates: args.site_certificate_lifetime,
        },
    )
}

/// `edgesite cloudhub kubeconfig [--site NAME]`.
pub fn kubeconfig(args: &KubeconfigArgs) -> Result<()> {
    let hub = match &args.server {
        Some(s) => s.clone(),
        None => crate::server::admin_server_url(&args.data_dir)?,
    };
    let server = match &args.site {
        Some(site) => {
            if let Err(e) = apiserver_lite::validation::is_dns1123_label(site) {
                bail!("--site {site:?}: {e}");
            }
            format!(
                "{}/apis/cluster.karmada.io/v1alpha1/clusters/{site}/proxy",
                hub.trim_end_matches('/')
            )
        }
        None => hub,
    };
    let user = args.user.as_deref().unwrap_or("admin");
    if user.trim().is_empty() || user.starts_with("system:") {
        bail!("--user {user:?}: name a user; names starting with \"system:\" are reserved");
    }
    let groups: Vec<String> = if args.user.is_none() && args.groups.is_empty() {
        vec!["system:masters".into()]
    } else {
        args.groups.clone()
    };
    crate::server::kubeconfig_for(&args.data_dir, user, &groups, &server, &args.output)?;
    match &args.site {
        Some(site) => eprintln!(
            "wrote {}: kubectl reaches site {site:?} through the hub as {user:?}",
            args.output.display()
        ),
        None => eprintln!("wrote {} for the hub", args.output.display()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_hub_is_a_server_without_a_node() {
        let hub = super::HubArgs {
            config: "/nonexistent.yaml".into(),
            data_dir: "/tmp/hub".into(),
            bind_address: "127.0.0.1".parse().unwrap(),
            https_listen_port: 5999,
            tls_san: vec!["hub.example".into()],
            write_kubeconfig: "/tmp/hub.yaml".into(),
            write_kubeconfig_mode: "0600".into(),
            reset_datastore: false,
            site_certificate_lifetime: std::time::Duration::from_secs(86_400),
            datastore: crate::DatastoreArgs {
                datastore_endpoint: Some("http://127.0.0.1:2379".into()),
                etcd_prefix: "/hub".into(),
                ..Default::default()
            },
            etcd: crate::EmbeddedEtcdArgs {
                cluster_init: false,
                server: Some("https://hub-1:5443".into()),
                cluster_reset: false,
                cluster_reset_restore_path: None,
                etcd_client_port: 3379,
                etcd_peer_port: 3380,
                etcd_snapshot_schedule_cron: "0 */12 * * *".into(),
                etcd_snapshot_retention: 5,
                etcd_snapshot_dir: None,
                etcd_disable_snapshots: true,
            },
            token: Some("secret".into()),
            advertise_address: Some("10.0.0.7".parse().unwrap()),
            advertise_port: None,
        };
        let args = super::server_args(&hub).unwrap();
        assert!(args.disable_agent);
        let etcd = args.datastore.etcd().unwrap().unwrap();
        assert_eq!(etcd.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(etcd.prefix, "/hub");
        assert_eq!(args.https_listen_port, 5999);
        assert_eq!(args.tls_san, vec!["hub.example".to_string()]);
        assert!(args.cloudhub.is_none());
        assert_eq!(args.etcd.server.as_deref(), Some("https://hub-1:5443"));
        assert_eq!(args.etcd.etcd_client_port, 3379);
        assert!(args.etcd.etcd_disable_snapshots);
        assert_eq!(args.token.as_deref(), Some("secret"));
        assert_eq!(args.advertise_address, Some("10.0.0.7".parse().unwrap()));
    }

    #[test]
    fn certificate_lifetimes_read_with_their_unit() {
        let secs = |t: &str| super::parse_lifetime(t).map(|d| d.as_secs());
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(secs("30m"), Ok(1800));
        assert_eq!(secs("12h"), Ok(43_200));
        assert_eq!(secs("365d"), Ok(31_536_000));
        assert!(secs("30").unwrap_err().contains("365d"));
        assert!(secs("10s").unwrap_err().contains("at least a minute"));
        assert!(secs("").is_err());
        assert!(secs("xd").is_err());
        assert!(secs("5é").is_err());
    }
}
