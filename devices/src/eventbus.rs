//! EventBus: the node's MQTT broker (rumqttd, embedded) or the address of an external one
//! (mosquitto, ...), and how the twin and mappers connect to it.
//!
//! rumqttd runs its router and each listener on threads of their own; it has no stop, so a broker
//! lives as long as the process (the agent's). Memory is bounded per client (payload size,
//! inflight and outgoing packet counts) and per topic filter (a few small segments that roll over),
//! so a client that stops reading loses its own oldest messages instead of stalling the others.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::logins::{Login, Logins, Nothing, Role, RoleAcl};

/// Largest MQTT payload the broker accepts: a twin update of many keys at the 512-byte value
/// limit fits with room to spare.
pub const MAX_PAYLOAD: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EventBusError {
    #[error(
        "the MQTT broker cannot listen on {addr}: {source}; is mosquitto or another edgesite running? Pass --mqtt-bind ADDR:PORT, or --mqtt-external to use that broker"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("MQTT TLS: {0}")]
    Tls(String),
    #[error("the MQTT broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
    #[error("start the MQTT broker: {0}")]
    Start(String),
}

/// TLS for the broker's listener: clients must present a certificate signed by `client_ca`.
#[derive(Clone, Debug)]
pub struct BrokerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// The node whose broker this is: its membership topics are the ones mappers may use.
    pub node: String,
    /// The logins clients must give, each with its role's topic permissions; `None` lets any
    /// client connect and use every topic.
    pub logins: Option<Logins>,
    pub tls: Option<BrokerTls>,
    pub max_connections: usize,
}

impl BrokerConfig {
    /// An open broker on 127.0.0.1:`port` (tests and tools).
    pub fn loopback(port: u16) -> BrokerConfig {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            node: String::new(),
            logins: None,
            tls: None,
            max_connections: 1024,
        }
    }
}

/// How a client reaches the broker.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM: the CA that signed the broker's certificate, and the client's certificate and key.
    pub tls: Option<ClientTls>,
}

#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
}

impl Endpoint {
    pub fn plain(addr: SocketAddr) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            username: None,
            password: None,
            tls: None,
        }
    }

    /// Parses `mqtt://[user:pass@]host:port` or `mqtts://...` (TLS material set separately).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url));
        let default_port = match scheme {
            "mqtt" | "tcp" => 1883,
            "mqtts" | "ssl" | "tls" => 8883,
            other => {
                return Err(format!(
                    "unknown MQTT scheme {other:?} in {url:?}: use mqtt://host:port or mqtts://host:port"
                ));
            }
        };
        let rest = rest.trim_end_matches('/');
        let (login, hostport) = match rest.rsplit_once('@') {
            Some((login, hostport)) => (Some(login), hostport),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("bad port {p:?} in MQTT address {url:?}"))?,
            ),
            _ => (hostport.to_string(), default_port),
        };
        if host.is_empty() {
            return Err(format!("no host in MQTT address {url:?}"));
        }
        let (username, password) = match login {
            Some(l) => match l.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(l.to_string()), None),
            },
            None => (None, None),
        };
        Ok(Endpoint {
            host,
            port,
            username,
            password,
            tls: None,
        })
    }

    /// rumqttc options for a client called `client_id`.
    pub fn options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(client_id, &self.host, self.port);
        options.set_keep_alive(Duration::from_secs(15));
        options.set_max_packet_size(MAX_PAYLOAD + 1024, MAX_PAYLOAD + 1024);
        if let Some(user) = &self.username {
            options.set_credentials(user, self.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            let client_auth = match (&tls.cert_pem, &tls.key_pem) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                _ => None,
            };
            options.set_transport(rumqttc::Transport::tls(
                tls.ca_pem.clone(),
                client_auth,
                None,
            ));
        }
        options
    }
}

/// A running embedded broker.
pub struct Broker {
    /// Where the node's own components connect (an extra loopback listener with a generated
    /// password when the public one asks for credentials or certificates).
    pub internal: Endpoint,
    pub listen: SocketAddr,
}

fn free_loopback_port() -> Result<u16, EventBusError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let l = TcpListener::bind(addr).map_err(|source| EventBusError::Bind { addr, source })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| EventBusError::Bind { addr, source })
}

/// Permissions made once per role and shared by its clients.
fn role_acls(node: &str) -> HashMap<&'static str, Arc<dyn rumqttd::TopicAcl>> {
    [Role::Full, Role::Mapper, Role::Reader]
        .into_iter()
        .map(|role| {
            let acl: Arc<dyn rumqttd::TopicAcl> = Arc::new(RoleAcl::new(role, node));
            (role.as_str(), acl)
        })
        .collect()
}

/// The role of a client that logged in with a TLS client certificate and no login: its
/// certificate's Organizational Unit (`mapper`, `reader` or `full`), `mapper` without one.
fn certificate_role(unit: Option<&str>) -> Result<Role, String> {
    match unit {
        None => Ok(Role::Mapper),
        Some(unit) => unit.parse().map_err(|e| {
            format!("client certificate's Organizational Unit: {e}; the client gets no topic")
        }),
    }
}

fn settings(
    name: &str,
    listen: SocketAddr,
    logins: Option<(Logins, String)>,
    certificates: Option<String>,
    tls: Option<rumqttd::TlsConfig>,
) -> rumqttd::ServerSettings {
    let (external_auth, acl) = match (logins, certificates) {
        (Some((logins, node)), _) => {
            let check = logins.clone();
            let auth: rumqttd::AuthHandler = Arc::new(move |_client, user, password| {
                let ok = check.check(&user, &password).is_some();
                Box::pin(async move { ok })
            });
            let acls = role_acls(&node);
            let acl: rumqttd::AclHandler =
                Arc::new(move |user, _| match user.and_then(|u| logins.role(u)) {
                    Some(role) => acls[role.as_str()].clone(),
                    None => Arc::new(Nothing),
                });
            (Some(auth), Some(acl))
        }
        // The certificate is the credential: its Organizational Unit names the role.
        (None, Some(node)) => {
            let acls = role_acls(&node);
            let acl: rumqttd::AclHandler = Arc::new(move |_, unit| match certificate_role(unit) {
                Ok(role) => acls[role.as_str()].clone(),
                Err(why) => {
                    tracing::warn!("{why}");
                    Arc::new(Nothing)
                }
            });
            (None, Some(acl))
        }
        (None, None) => (None, None),
    };
    rumqttd::ServerSettings {
        name: name.to_string(),
        listen,
        tls,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 100,
            auth: None,
            external_auth,
            dynamic_filters: true,
            acl,
        },
    }
}

/// Starts the broker and waits until it accepts connections.
pub fn start(config: &BrokerConfig) -> Result<Broker, EventBusError> {
    // rumqttd reports a listener that cannot bind only in its log: find out first.
    drop(
        TcpListener::bind(config.listen).map_err(|source| EventBusError::Bind {
            addr: config.listen,
            source,
        })?,
    );
    let tls = match &config.tls {
        Some(t) => {
            for p in [&t.cert, &t.key, &t.client_ca] {
                if !p.exists() {
                    return Err(EventBusError::Tls(format!(
                        "{} does not exist",
                        p.display()
                    )));
                }
            }
            Some(rumqttd::TlsConfig::Rustls {
                capath: Some(t.client_ca.display().to_string()),
                certpath: t.cert.display().to_string(),
                keypath: t.key.display().to_string(),
            })
        }
        None => None,
    };
    let mut servers = HashMap::new();
    servers.insert(
        "public".to_string(),
        settings(
            "mqtt",
            config.listen,
            config.logins.clone().map(|l| (l, config.node.clone())),
            tls.is_some().then(|| config.node.clone()),
            tls.clone(),
        ),
    );
    let guarded = config.logins.is_some() || tls.is_some();
    let internal = if guarded {
        let port = free_loopback_port()?;
        let password = crate::logins::random_password();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let internal_login = Logins::new(HashMap::from([(
            "edgesite-internal".to_string(),
            Login {
                password: password.clone(),
                role: Role::Full,
            },
        )]));
        servers.insert(
            "internal".to_string(),
            settings(
                "mqtt-internal",
                addr,
                Some((internal_login, config.node.clone())),
                None,
                None,
            ),
        );
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            username: Some("edgesite-internal".into()),
            password: Some(password),
            tls: None,
        }
    } else {
        let host = if config.listen.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            config.listen.ip().to_string()
        };
        Endpoint {
            host,
            port: config.listen.port(),
            username: None,
            password: None,
            tls: None,
        }
    };
    let broker_config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 256 * 1024,
            max_segment_count: 4,
            // The twin reads every device's requests through one filter: give it room to fall
            // behind a burst (32 MiB at most, used only while it is behind) before rumqttd drops
            // its oldest requests.
            custom_segment: Some(HashMap::from([(
                "$hw/events/device/#".to_string(),
                rumqttd::SegmentConfig {
                    max_segment_size: 1024 * 1024,
                    max_segment_count: 32,
                },
            )])),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(servers),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(broker_config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| EventBusError::Start(e.to_string()))?;
    // Ready when the node's own endpoint completes an MQTT handshake (a bare TCP probe would
    // make rumqttd log an error for a client that never said CONNECT). With the public
    // listener guarded, the internal one is probed: both start together.
    let internal_addr: SocketAddr = format!("{}:{}", internal.host, internal.port)
        .parse()
        .map_err(|e| EventBusError::Start(format!("{e}")))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !handshake(&internal, internal_addr) {
        if std::time::Instant::now() > deadline {
            return Err(EventBusError::NotListening(internal_addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(listen = %config.listen, tls = config.tls.is_some(), logins = config.logins.as_ref().map_or(0, Logins::len), "MQTT broker (EventBus) listening");
    Ok(Broker {
        internal,
        listen: config.listen,
    })
}

/// One MQTT 3.1.1 CONNECT (with the endpoint's login), CONNACK accepted, DISCONNECT.
fn handshake(endpoint: &Endpoint, addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let field = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    };
    let mut body = Vec::new();
    field(&mut body, b"MQTT");
    body.push(4);
    let mut flags = 0x02;
    if endpoint.username.is_some() {
        flags |= 0x80;
    }
    if endpoint.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&10u16.to_be_bytes());
    field(&mut body, b"edgesite-ready-probe");
    if let Some(u) = &endpoint.username {
        field(&mut body, u.as_bytes());
    }
    if let Some(p) = &endpoint.password {
        field(&mut body, p.as_bytes());
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut ack = [0u8; 4];
    let accepted = stream.write_all(&packet).is_ok()
        && stream.read_exact(&mut ack).is_ok()
        && ack[0] == 0x20
        && ack[3] == 0;
    // DISCONNECT, then let the broker close first (closing under it makes rumqttd log an error).
    if stream.write_all(&[0xe0, 0x00]).is_ok() {
        let mut rest = [0u8; 64];
        while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("mqtt://u:p@10.0.0.1:1884").unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.username.as_deref(),
                e.password.as_deref()
            ),
            ("10.0.0.1", 1884, Some("u"), Some("p"))
        );
        let e = Endpoint::parse("mqtts://broker.local").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("broker.local", 8883));
        let e = Endpoint::parse("127.0.0.1:1883").unwrap();
        assert_eq!(e.port, 1883);
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("mqtt://x:notaport").is_err());
    }
}
