//! `edgesite`: the single binary of an EdgeSite site.
//!
//! This file parses flags (and the config file), sets up logging and signals, and starts the
//! components; the components themselves live in their crates and take typed configuration.

mod config;
mod control_plane;
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
    /// Run the site's control plane: the Kubernetes API server on embedded SQLite.
    Server(ServerArgs),
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
    /// Run only the control plane here, no node agent (this release has no node agent yet, so this is the behaviour either way).
    #[arg(long)]
    pub disable_agent: bool,
    /// Shared secret that agents will use to join this site (generated when absent).
    #[arg(long, env = "EDGESITE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: the installer's log file and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// Names of the server flags, for the config file's keys.
fn server_flag_names() -> Vec<String> {
    let cmd = Cli::command();
    cmd.find_subcommand("server")
        .map(|s| {
            s.get_arguments()
                .filter_map(|a| a.get_long().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn parse() -> Result<Cli> {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("server") {
        let (path, explicit) = config::config_path(&args);
        let extra = config::file_args(&path, explicit, &server_flag_names())?;
        args.splice(2..2, extra);
    }
    let matches = Cli::command()
        .args_override_self(true)
        .get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches)?)
}

fn main() {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("edgesite: {e:#}");
            std::process::exit(2);
        }
    };
    init_logging();
    let result: Result<()> = match cli.command {
        Command::Server(args) => server::run(args),
    };
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("edgesite: {e:#}");
        std::process::exit(1);
    }
}
