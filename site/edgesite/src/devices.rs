//! The node's device side as the binary starts it: flags, the embedded MQTT broker (or an
//! external one), and the device twin on the node's API client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use devices::eventbus::{self, BrokerConfig, BrokerTls, ClientTls, Endpoint};
use devices::logins::{self, Logins};
use tokio_util::sync::CancellationToken;

/// Flags of the node's EventBus and device twin (names follow KubeEdge's edgecore settings).
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where the node's embedded MQTT broker (EventBus) listens; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:1883", value_name = "ADDR:PORT")]
    pub mqtt_bind: SocketAddr,
    /// A file of `username:password[:role]` lines (role: mapper (the default), reader or full):
    /// more MQTT logins beside the ones the node generates into <data-dir>/agent/mqtt/.
    #[arg(long, value_name = "FILE")]
    pub mqtt_users: Option<PathBuf>,
    /// Let MQTT clients connect without a login and use every topic (mappers that cannot log
    /// in; the behaviour before logins were required).
    #[arg(long, conflicts_with = "mqtt_users")]
    pub mqtt_allow_anonymous: bool,
    /// TLS on the embedded broker: its certificate (PEM); needs --mqtt-tls-key and
    /// --mqtt-client-ca, and clients must present a certificate that CA signed.
    #[arg(long, value_name = "FILE", requires_all = ["mqtt_tls_key", "mqtt_client_ca"])]
    pub mqtt_tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "mqtt_tls_cert")]
    pub mqtt_tls_key: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "mqtt_tls_cert")]
    pub mqtt_client_ca: Option<PathBuf>,
    /// Use this broker instead of the embedded one (mosquitto, ...):
    /// mqtt://[user:pass@]host:port, or mqtts://... with --mqtt-external-ca.
    #[arg(long, value_name = "URL", conflicts_with_all = ["mqtt_users", "mqtt_tls_cert"])]
    pub mqtt_external: Option<String>,
    /// For an mqtts:// external broker: the CA of its certificate, and this node's client
    /// certificate and key when it asks for one (PEM files).
    #[arg(long, value_name = "FILE", requires = "mqtt_external")]
    pub mqtt_external_ca: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires_all = ["mqtt_external", "mqtt_external_key"])]
    pub mqtt_external_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "mqtt_external_cert")]
    pub mqtt_external_key: Option<PathBuf>,
    /// Run neither the device twin nor the MQTT broker on this node.
    #[arg(long)]
    pub disable_devices: bool,
}

/// What [`start`] needs, checked before anything starts.
pub struct Setup {
    node: String,
    database: PathBuf,
    broker: Broker,
    /// The generated mapper login's file, when the embedded broker asks for logins.
    mapper_login: PathBuf,
    /// Where the logins of the mapper pods on this node are kept.
    pod_logins: PathBuf,
}

enum Broker {
    Embedded(BrokerConfig),
    External(Endpoint),
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// The broker's logins: the node's generated ones and those of `users` (a `--mqtt-users` file).
fn logins(data_dir: &Path, users: Option<&Path>) -> Result<Logins> {
    let mut all = logins::ensure_generated(data_dir).with_context(|| {
        format!(
            "write the MQTT logins into {}",
            data_dir.join("agent").join("mqtt").display()
        )
    })?;
    if let Some(path) = users {
        let text = String::from_utf8(read(path)?)
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        let users =
            logins::parse_users(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
        if users.is_empty() {
            bail!(
                "{} names no user (lines of username:password[:role])",
                path.display()
            );
        }
        for (user, login) in users {
            if all.contains_key(&user) {
                bail!(
                    "{}: {user} is a login the node makes itself; choose another name",
                    path.display()
                );
            }
            all.insert(user, login);
        }
    }
    Ok(Logins::new(all))
}

impl DeviceArgs {
    /// `None` with --disable-devices.
    pub fn setup(&self, data_dir: &Path, node: &str) -> Result<Option<Setup>> {
        if self.disable_devices {
            return Ok(None);
        }
        let broker = match &self.mqtt_external {
            Some(url) => {
                let mut endpoint =
                    Endpoint::parse(url).map_err(|e| anyhow::anyhow!("--mqtt-external: {e}"))?;
                if let Some(ca) = &self.mqtt_external_ca {
                    endpoint.tls = Some(ClientTls {
                        ca_pem: read(ca)?,
                        cert_pem: self.mqtt_external_cert.as_deref().map(read).transpose()?,
                        key_pem: self.mqtt_external_key.as_deref().map(read).transpose()?,
                    });
                } else if url.starts_with("mqtts") {
                    bail!(
                        "--mqtt-external {url} needs --mqtt-external-ca (the CA of the broker's certificate)"
                    );
                }
                Broker::External(endpoint)
            }
            None => {
                let mut listen = self.mqtt_bind;
                if listen.port() == 0 {
                    let l = std::net::TcpListener::bind(listen)
                        .with_context(|| format!("--mqtt-bind {listen}"))?;
                    listen = l.local_addr()?;
                }
                // Logins are required unless anonymous clients are allowed, or TLS asks
                // every client for a certificate (then that is the credential) and no users
                // file adds logins.
                let logins = if self.mqtt_allow_anonymous
                    || (self.mqtt_tls_cert.is_some() && self.mqtt_users.is_none())
                {
                    None
                } else {
                    Some(logins(data_dir, self.mqtt_users.as_deref())?)
                };
                Broker::Embedded(BrokerConfig {
                    listen,
                    node: node.to_string(),
                    logins,
                    tls: match (
                        &self.mqtt_tls_cert,
                        &self.mqtt_tls_key,
                        &self.mqtt_client_ca,
                    ) {
                        (Some(cert), Some(key), Some(ca)) => Some(BrokerTls {
                            cert: cert.clone(),
                            key: key.clone(),
                            client_ca: ca.clone(),
                        }),
                        _ => None,
                    },
                    max_connections: 1024,
                })
            }
        };
        Ok(Some(Setup {
            node: node.to_string(),
            database: data_dir.join("agent").join("cache").join("devices.db"),
            broker,
            mapper_login: logins::generated_file(data_dir, logins::Role::Mapper),
            pod_logins: data_dir.join("agent").join("mqtt").join("pods.logins"),
        }))
    }
}

/// Starts the broker (when embedded) and the device twin. The broker's failure to listen is an
/// error here, before the node reports Ready.
pub fn start(
    setup: Setup,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let endpoint = match setup.broker {
        Broker::Embedded(config) => {
            let broker = eventbus::start(&config)?;
            if let Some(logins) = &config.logins {
                // Mapper pods on this node log in with their Secrets.
                tokio::spawn(devices::pod_logins::follow(
                    client.clone(),
                    setup.node.clone(),
                    logins.clone(),
                    setup.pod_logins.clone(),
                    shutdown.clone(),
                ));
                tracing::info!(
                    "devices: MQTT mappers connect to mqtt://{} with the login in {}",
                    config.listen,
                    setup.mapper_login.display()
                );
            } else {
                tracing::info!("devices: MQTT mappers connect to mqtt://{}", config.listen);
            }
            broker.internal
        }
        Broker::External(endpoint) => {
            tracing::info!(host = %endpoint.host, port = endpoint.port, "devices: using an external MQTT broker");
            endpoint
        }
    };
    let config = devices::devicetwin::Config {
        node_name: setup.node,
        database: setup.database,
        broker: endpoint,
    };
    Ok(tokio::spawn(async move {
        if let Err(e) = devices::devicetwin::run(config, Some(client), shutdown, None).await {
            tracing::error!("device twin stopped: {e}");
        }
    }))
}
