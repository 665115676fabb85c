//! The mapper SDK: everything a mapper does besides talking to its devices. A mapper implements
//! [`Driver`] (open a device, read a property, write a property) and calls [`run`]; the SDK
//! connects to the node's EventBus, asks for the node's devices (`membership/get`), follows
//! membership updates, reads each property every `collectCycle`, reports every `reportCycle`
//! (`twin/update` with the actual values, and `state/update`), writes desired values it receives
//! as `twin/update/delta` (then reads them back and reports at once), and reconnects with backoff
//! when the broker goes away. Only devices whose `spec.protocol.protocolName` is the mapper's
//! protocol are served.
//!
//! Everything here is plain MQTT and JSON: `docs/devices.md` shows the same exchange for mappers
//! written in any language.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::devicetwin::{DEVICE_PREFIX, NODE_PREFIX};
use crate::eventbus::Endpoint;

/// One property of a device, as the mapper needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub name: String,
    /// The model's type (`INT`, `FLOAT`, ...), upper case as in DeviceModel manifests; empty
    /// when the device's model is unknown.
    pub kind: String,
    pub read_only: bool,
    /// The visitor's `configData`.
    pub visitor: Value,
    pub collect_cycle: Duration,
    pub report_cycle: Duration,
}

/// A device the node binds to this mapper.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// `<namespace>/<name>`.
    pub id: String,
    pub name: String,
    pub protocol: String,
    /// `spec.protocol.configData`.
    pub config: Value,
    pub properties: Vec<Property>,
}

/// A property's default cycle when the Device names none (KubeEdge's mappers use 1 s).
pub const DEFAULT_CYCLE: Duration = Duration::from_secs(1);

fn cycle(v: Option<&Value>) -> Duration {
    match v.and_then(Value::as_u64) {
        Some(ms) if ms > 0 => Duration::from_millis(ms.max(10)),
        _ => DEFAULT_CYCLE,
    }
}

impl Device {
    /// From an entry of `membership/get/result` or `membership/updated`.
    pub fn from_membership(entry: &Value) -> Option<Device> {
        let id = entry.get("id")?.as_str()?.to_string();
        let spec = entry.get("spec")?;
        let model_props = entry
            .pointer("/model/spec/properties")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let properties = spec
            .get("properties")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let name = p.get("name")?.as_str()?.to_string();
                let model = model_props.iter().find(|m| m["name"] == name.as_str());
                Some(Property {
                    // Unknown (no model yet): drivers read it as a number.
                    kind: model
                        .and_then(|m| m["type"].as_str())
                        .unwrap_or("")
                        .to_ascii_uppercase(),
                    read_only: model.and_then(|m| m["accessMode"].as_str()) == Some("ReadOnly"),
                    visitor: p
                        .pointer("/visitors/configData")
                        .cloned()
                        .unwrap_or(json!({})),
                    collect_cycle: cycle(p.get("collectCycle")),
                    report_cycle: cycle(p.get("reportCycle")),
                    name,
                })
            })
            .collect();
        Some(Device {
            name: entry
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(&id)
                .to_string(),
            protocol: spec
                .pointer("/protocol/protocolName")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            config: spec
                .pointer("/protocol/configData")
                .cloned()
                .unwrap_or(json!({})),
            properties,
            id,
        })
    }
}

/// A mapper's connection to its devices.
#[async_trait::async_trait]
pub trait Driver: Send + Sync + 'static {
    type Conn: Connection;
    /// The `protocolName` this mapper serves.
    fn protocol(&self) -> &str;
    /// Opens a device (checks its config; may connect lazily).
    async fn open(&self, device: &Device) -> Result<Self::Conn, String>;
}

#[async_trait::async_trait]
pub trait Connection: Send + 'static {
    async fn read(&mut self, property: &Property) -> Result<String, String>;
    async fn write(&mut self, property: &Property, value: &str) -> Result<(), String>;
}

#[derive(Clone, Debug)]
pub struct Config {
    pub broker: Endpoint,
    pub node: String,
    /// MQTT client id; unique per broker.
    pub client_id: String,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

enum Cmd {
    Desired(BTreeMap<String, String>),
}

/// Runs the mapper until `shutdown`.
pub async fn run<D: Driver>(config: Config, driver: D, shutdown: CancellationToken) {
    let driver = Arc::new(driver);
    let mut options = config.broker.options(&config.client_id);
    options.set_clean_session(true);
    let (client, mut events) = AsyncClient::new(options, 256);
    let membership_result = format!("{NODE_PREFIX}{}/membership/get/result", config.node);
    let membership_updated = format!("{NODE_PREFIX}{}/membership/updated", config.node);
    // device id -> (its spec, the channel to its task, the task's stop token)
    let mut running: BTreeMap<String, (Device, mpsc::Sender<Cmd>, CancellationToken)> =
        BTreeMap::new();
    let mut backoff =
        controllers::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!(node = %config.node, protocol = driver.protocol(), "mapper connected to the EventBus");
                for filter in [
                    membership_result.clone(),
                    membership_updated.clone(),
                    format!("{DEVICE_PREFIX}+/+/twin/update/delta"),
                    format!("{DEVICE_PREFIX}+/twin/update/delta"),
                ] {
                    let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                }
                let ask = json!({"event_id": format!("{}-{}", config.client_id, now_ms()), "timestamp": now_ms()});
                let _ = client.try_publish(
                    format!("{NODE_PREFIX}{}/membership/get", config.node),
                    QoS::AtLeastOnce,
                    false,
                    ask.to_string(),
                );
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(body) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                if p.topic == membership_result || p.topic == membership_updated {
                    let full = p.topic == membership_result;
                    let list = |key: &str| -> Vec<Value> {
                        body.get(key)
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default()
                    };
                    let (added, removed) = if full {
                        (list("devices"), Vec::new())
                    } else {
                        (list("added_devices"), list("removed_devices"))
                    };
                    let wanted: BTreeMap<String, (Device, Value)> = added
                        .iter()
                        .filter_map(|e| Device::from_membership(e).map(|d| (d, e.clone())))
                        .filter(|(d, _)| d.protocol == driver.protocol())
                        .map(|(d, e)| (d.id.clone(), (d, e)))
                        .collect();
                    let mut stop: Vec<String> = removed
                        .iter()
                        .filter_map(|e| e.get("id").and_then(Value::as_str).map(String::from))
                        .collect();
                    if full {
                        stop.extend(
                            running
                                .keys()
                                .filter(|id| !wanted.contains_key(*id))
                                .cloned(),
                        );
                    }
                    for id in stop {
                        if let Some((_, _, token)) = running.remove(&id) {
                            tracing::info!(device = %id, "device removed from this node");
                            token.cancel();
                        }
                    }
                    for (id, (device, entry)) in wanted {
                        if running.get(&id).is_some_and(|(d, _, _)| *d == device) {
                            continue;
                        }
                        if let Some((_, _, token)) = running.remove(&id) {
                            token.cancel();
                        }
                        // Desired values the twin holds that the device has not reached yet.
                        let pending: BTreeMap<String, String> = entry
                            .get("twin")
                            .and_then(Value::as_object)
                            .into_iter()
                            .flatten()
                            .filter_map(|(k, t)| {
                                let expected = t.pointer("/expected/value")?.as_str()?;
                                let actual = t.pointer("/actual/value").and_then(Value::as_str);
                                (actual != Some(expected))
                                    .then(|| (k.clone(), expected.to_string()))
                            })
                            .collect();
                        let (tx, rx) = mpsc::channel(16);
                        if !pending.is_empty() {
                            let _ = tx.try_send(Cmd::Desired(pending));
                        }
                        let token = shutdown.child_token();
                        tracing::info!(device = %id, "serving device");
                        tokio::spawn(device_task(
                            driver.clone(),
                            device.clone(),
                            client.clone(),
                            rx,
                            token.clone(),
                        ));
                        running.insert(id, (device, tx, token));
                    }
                } else if let Some(rest) = p.topic.strip_prefix(DEVICE_PREFIX)
                    && let Some(id) = rest.strip_suffix("/twin/update/delta")
                {
                    let full_id = if id.contains('/') {
                        id.to_string()
                    } else {
                        format!("default/{id}")
                    };
                    let Some((_, tx, _)) = running.get(&full_id) else {
                        continue;
                    };
                    let delta: BTreeMap<String, String> = body
                        .get("delta")
                        .and_then(Value::as_object)
                        .into_iter()
                        .flatten()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect();
                    if !delta.is_empty() && tx.try_send(Cmd::Desired(delta)).is_err() {
                        tracing::warn!(device = %full_id, "device busy; desired values dropped until the next delta");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                let wait = backoff.next_wait();
                if matches!(
                    e,
                    rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::NotAuthorized
                            | rumqttc::ConnectReturnCode::BadUserNamePassword
                    )
                ) {
                    tracing::warn!(
                        "mapper: the EventBus refused this mapper's login ({:?}): pass --mqtt-username and --mqtt-password, or --mqtt-login-file with the node's <data-dir>/agent/mqtt/mapper.login; retrying in {wait:?}",
                        config.broker.username
                    );
                } else {
                    tracing::warn!("mapper: EventBus connection: {e}; retrying in {wait:?}");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    for (_, (_, _, token)) in running {
        token.cancel();
    }
}

async fn device_task<D: Driver>(
    driver: Arc<D>,
    device: Device,
    client: AsyncClient,
    mut commands: mpsc::Receiver<Cmd>,
    stop: CancellationToken,
) {
    let topic = |suffix: &str| format!("{DEVICE_PREFIX}{}/{suffix}", device.id);
    let mut conn = loop {
        match driver.open(&device).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(device = %device.id, "cannot open device: {e}");
                let _ = client
                    .publish(
                        topic("state/update"),
                        QoS::AtLeastOnce,
                        false,
                        json!({"event_id": "", "timestamp": now_ms(), "state": "unhealthy"})
                            .to_string(),
                    )
                    .await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    let start = tokio::time::Instant::now();
    let mut next_collect: Vec<tokio::time::Instant> = vec![start; device.properties.len()];
    let mut next_report: Vec<tokio::time::Instant> = vec![start; device.properties.len()];
    let mut values: Vec<Option<String>> = vec![None; device.properties.len()];
    let mut state = String::new();
    let mut state_sent = start;
    loop {
        let wake = next_collect
            .iter()
            .chain(next_report.iter())
            .min()
            .copied()
            .unwrap_or(start + Duration::from_secs(30));
        let mut desired = None;
        tokio::select! {
            _ = stop.cancelled() => return,
            cmd = commands.recv() => match cmd {
                Some(Cmd::Desired(d)) => desired = Some(d),
                None => return,
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
        let now = tokio::time::Instant::now();
        let mut report = BTreeMap::new();
        let mut healthy = true;
        if let Some(desired) = desired {
            for (name, value) in desired {
                let Some(i) = device.properties.iter().position(|p| p.name == name) else {
                    continue;
                };
                let p = &device.properties[i];
                if p.read_only {
                    tracing::warn!(device = %device.id, property = %name, "desired value for a read-only property ignored");
                    continue;
                }
                match conn.write(p, &value).await {
                    Ok(()) => {
                        tracing::info!(device = %device.id, property = %name, %value, "wrote desired value");
                        next_collect[i] = now;
                        next_report[i] = now;
                    }
                    Err(e) => {
                        healthy = false;
                        tracing::warn!(device = %device.id, property = %name, "write {value:?}: {e}");
                    }
                }
            }
        }
        for (i, p) in device.properties.iter().enumerate() {
            if next_collect[i] <= now {
                match conn.read(p).await {
                    Ok(v) => values[i] = Some(v),
                    Err(e) => {
                        healthy = false;
                        tracing::debug!(device = %device.id, property = %p.name, "read: {e}");
                    }
                }
                next_collect[i] = now + p.collect_cycle;
            }
            if next_report[i] <= now {
                if let Some(v) = &values[i] {
                    let mut twin =
                        json!({"actual": {"value": v, "metadata": {"timestamp": now_ms()}}});
                    if !p.kind.is_empty() {
                        twin["metadata"] = json!({"type": p.kind.to_ascii_lowercase()});
                    }
                    report.insert(p.name.clone(), twin);
                }
                next_report[i] = now + p.report_cycle;
            }
        }
        if !report.is_empty() {
            let body = json!({"event_id": "", "timestamp": now_ms(), "twin": report});
            if let Err(e) = client
                .publish(
                    topic("twin/update"),
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                )
                .await
            {
                tracing::debug!(device = %device.id, "report: {e}");
            }
        }
        let new_state = if healthy { "online" } else { "unhealthy" };
        if new_state != state || now.duration_since(state_sent) > Duration::from_secs(30) {
            let body = json!({"event_id": "", "timestamp": now_ms(), "state": new_state});
            if client
                .publish(
                    topic("state/update"),
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                )
                .await
                .is_ok()
            {
                state = new_state.to_string();
                state_sent = now;
            }
        }
    }
}

/// Flags every mapper binary shares.
#[derive(clap::Args, Debug, Clone)]
pub struct MapperArgs {
    /// The EventBus: mqtt://[user:pass@]host:port, or mqtts://... with --mqtt-ca.
    #[arg(long, env = "MQTT_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// PEM file: the CA of the broker's certificate (mqtts:// only).
    #[arg(long)]
    pub mqtt_ca: Option<std::path::PathBuf>,
    /// PEM files: this mapper's client certificate and key (brokers that ask for one).
    #[arg(long, requires = "mqtt_key")]
    pub mqtt_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "mqtt_cert")]
    pub mqtt_key: Option<std::path::PathBuf>,
    /// The node whose devices to serve (in a pod: the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// MQTT client id (default: <binary>-<node>).
    #[arg(long)]
    pub client_id: Option<String>,
    /// The MQTT login (in a pod: from a Secret through env). Without it and without a login in
    /// --broker, the node's generated mapper login is read from --mqtt-login-file.
    #[arg(long, env = "MQTT_USERNAME", requires = "mqtt_password")]
    pub mqtt_username: Option<String>,
    #[arg(
        long,
        env = "MQTT_PASSWORD",
        requires = "mqtt_username",
        hide_env_values = true
    )]
    pub mqtt_password: Option<String>,
    /// A file holding `username:password`; used when it exists and no other login is given.
    #[arg(
        long,
        env = "MQTT_LOGIN_FILE",
        default_value = "/var/lib/edgesite/agent/mqtt/mapper.login"
    )]
    pub mqtt_login_file: std::path::PathBuf,
}

impl MapperArgs {
    pub fn config(&self, program: &str) -> anyhow::Result<Config> {
        use anyhow::Context as _;
        let mut broker = Endpoint::parse(&self.broker).map_err(anyhow::Error::msg)?;
        if let Some(ca) = &self.mqtt_ca {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("read {}", p.display()))
            };
            broker.tls = Some(crate::eventbus::ClientTls {
                ca_pem: read(ca)?,
                cert_pem: self.mqtt_cert.as_deref().map(read).transpose()?,
                key_pem: self.mqtt_key.as_deref().map(read).transpose()?,
            });
        } else if self.broker.starts_with("mqtts") {
            anyhow::bail!(
                "{} needs --mqtt-ca (the CA of the broker's certificate)",
                self.broker
            );
        }
        if broker.username.is_none() {
            if let (Some(user), Some(password)) = (&self.mqtt_username, &self.mqtt_password) {
                broker.username = Some(user.clone());
                broker.password = Some(password.clone());
            } else if self.mqtt_login_file.exists() {
                let (user, password) = crate::logins::read_login_file(&self.mqtt_login_file)
                    .map_err(anyhow::Error::msg)?;
                broker.username = Some(user);
                broker.password = Some(password);
            }
        }
        let node = match &self.node {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_lowercase())
                .context("--node not given and the host name is unreadable")?,
        };
        Ok(Config {
            client_id: self
                .client_id
                .clone()
                .unwrap_or_else(|| format!("{program}-{node}")),
            broker,
            node,
        })
    }
}

/// Logging, signals and the run loop of a mapper binary.
pub fn main_with<D: Driver>(program: &str, args: &MapperArgs, driver: D) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // mqtts:// brokers: rustls needs its crypto provider chosen once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = args.config(program)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.cancel();
        });
        tracing::info!(node = %config.node, broker = %args.broker, "{program} starting");
        run(config, driver, shutdown).await;
        Ok(())
    })
}
