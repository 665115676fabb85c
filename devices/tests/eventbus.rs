//! The EventBus's guards: logins (refused clients get CONNACK 5) and their roles' topic
//! permissions, TLS with required client certificates, and the twin on an external broker
//! (Debian's mosquitto).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use devices::devicetwin;
use devices::eventbus::{self, BrokerConfig, BrokerTls, ClientTls, Endpoint};
use devices::logins::{Login, Logins, Role};
use devices::store::{DeviceRecord, Store};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The CONNACK code a client gets, or the error that came instead.
async fn connack(endpoint: &Endpoint, id: &str) -> Result<ConnectReturnCode, String> {
    let (_client, mut events) = AsyncClient::new(endpoint.options(id), 8);
    let poll = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Ok(code),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// Subscribes to `result`, publishes `request`, returns the answer's payload.
async fn request(endpoint: &Endpoint, topic: &str, result: &str) -> serde_json::Value {
    let (client, mut events) = AsyncClient::new(endpoint.options("asker"), 8);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("an answer in time");
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.subscribe(result, QoS::AtLeastOnce).await.unwrap();
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                client
                    .publish(topic, QoS::AtLeastOnce, false, "{}")
                    .await
                    .unwrap();
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == result => {
                return serde_json::from_slice(&p.payload).unwrap();
            }
            Ok(_) => {}
            Err(e) => panic!("MQTT: {e}"),
        }
    }
}

/// A twin serving one device `default/d` on `broker`, until the returned guard drops.
async fn twin(broker: Endpoint, dir: &std::path::Path) -> tokio_util::sync::DropGuard {
    let db = dir.join("devices.db");
    Store::open(&db)
        .unwrap()
        .put_device(&DeviceRecord {
            namespace: "default".into(),
            name: "d".into(),
            ..Default::default()
        })
        .unwrap();
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(devicetwin::run(
        devicetwin::Config {
            node_name: "n1".into(),
            database: db,
            broker,
        },
        None,
        stop.clone(),
        Some(tx),
    ));
    rx.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.drop_guard()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_file_guards_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = eventbus::start(&BrokerConfig {
        logins: Some(Logins::new(HashMap::from([(
            "mapper".into(),
            Login {
                password: "s3cret".into(),
                role: Role::Mapper,
            },
        )]))),
        node: "n1".into(),
        ..BrokerConfig::loopback(port)
    })
    .unwrap();
    let _twin = twin(broker.internal.clone(), dir.path()).await;
    let public = Endpoint::plain(SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(
        connack(&public, "anonymous").await,
        Ok(ConnectReturnCode::NotAuthorized)
    );
    let wrong = Endpoint {
        username: Some("mapper".into()),
        password: Some("nope".into()),
        ..public.clone()
    };
    assert_eq!(
        connack(&wrong, "wrong").await,
        Ok(ConnectReturnCode::NotAuthorized)
    );
    let right = Endpoint {
        username: Some("mapper".into()),
        password: Some("s3cret".into()),
        ..public.clone()
    };
    // The twin (on its own loopback listener) answers a logged-in client.
    let got = request(
        &right,
        "$hw/events/device/default/d/twin/get",
        "$hw/events/device/default/d/twin/get/result",
    )
    .await;
    assert!(got.get("twin").is_some(), "{got}");
    // What mosquitto_pub users see.
    if let Ok(out) = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "x",
            "-m",
            "y",
        ])
        .output()
    {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("not authorised"), "{stderr}");
    }
}

/// What a client logged in as `login` sees: the SUBACK codes of `subscribe` (one SUBSCRIBE per
/// filter), then whether publishing `publish` keeps the connection open.
async fn try_topics(
    endpoint: &Endpoint,
    id: &str,
    subscribe: &[&str],
    publish: Option<&str>,
) -> (Vec<rumqttc::SubscribeReasonCode>, Option<bool>) {
    let (client, mut events) = AsyncClient::new(endpoint.options(id), 16);
    let mut codes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    async fn next(
        events: &mut rumqttc::EventLoop,
        deadline: tokio::time::Instant,
    ) -> Result<Event, rumqttc::ConnectionError> {
        tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("the broker answers in time")
    }
    loop {
        match next(&mut events, deadline).await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("connect as {id}: {e}"),
        }
    }
    for filter in subscribe {
        client.subscribe(*filter, QoS::AtLeastOnce).await.unwrap();
        loop {
            match next(&mut events, deadline).await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    codes.extend(ack.return_codes);
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("subscribe {filter} as {id}: {e}"),
            }
        }
    }
    let Some(topic) = publish else {
        return (codes, None);
    };
    client
        .publish(topic, QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    loop {
        match next(&mut events, deadline).await {
            Ok(Event::Incoming(Packet::PubAck(_))) => return (codes, Some(true)),
            Ok(_) => {}
            Err(_) => return (codes, Some(false)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_limit_what_a_login_may_publish_and_read() {
    use rumqttc::SubscribeReasonCode::{Failure, Success};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let login = |password: &str, role| Login {
        password: password.into(),
        role,
    };
    let broker = eventbus::start(&BrokerConfig {
        logins: Some(Logins::new(HashMap::from([
            ("m".into(), login("mpw", Role::Mapper)),
            ("r".into(), login("rpw", Role::Reader)),
            ("f".into(), login("fpw", Role::Full)),
        ]))),
        node: "n1".into(),
        ..BrokerConfig::loopback(port)
    })
    .unwrap();
    let _twin = twin(broker.internal.clone(), dir.path()).await;
    let public = Endpoint::plain(SocketAddr::from(([127, 0, 0, 1], port)));
    let as_ = |user: &str, password: &str| Endpoint {
        username: Some(user.into()),
        password: Some(password.into()),
        ..public.clone()
    };
    let (mapper, reader, full) = (as_("m", "mpw"), as_("r", "rpw"), as_("f", "fpw"));

    // A mapper: its deltas and the twin's answers yes, everything else no.
    let (codes, _) = try_topics(
        &mapper,
        "m1",
        &[
            "$hw/events/device/+/+/twin/update/delta",
            "#",
            "$hw/events/device/#",
            "$hw/events/node/n2/membership/updated",
        ],
        None,
    )
    .await;
    assert_eq!(
        codes,
        vec![Success(QoS::AtLeastOnce), Failure, Failure, Failure]
    );
    let got = request(
        &mapper,
        "$hw/events/device/default/d/twin/get",
        "$hw/events/device/default/d/twin/get/result",
    )
    .await;
    assert!(got.get("twin").is_some(), "{got}");

    // A delta forged by a mapper or a reader closes its connection and reaches nobody.
    let (delta_tx, mut delta_rx) = tokio::sync::mpsc::channel(16);
    let watcher = {
        let full = full.clone();
        tokio::spawn(async move {
            let (client, mut events) = AsyncClient::new(full.options("watcher"), 16);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe("$hw/events/device/+/+/twin/update/delta", QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = delta_tx.send(None).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = delta_tx.send(Some(p.topic)).await;
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
    };
    assert_eq!(delta_rx.recv().await, Some(None), "the watcher subscribed");
    let forged = "$hw/events/device/default/d/twin/update/delta";
    let (_, open) = try_topics(&mapper, "m2", &[], Some(forged)).await;
    assert_eq!(
        open,
        Some(false),
        "a mapper publishing a delta is disconnected"
    );
    let (codes, open) = try_topics(&reader, "r1", &["$hw/events/device/#"], Some(forged)).await;
    assert_eq!(codes, vec![Success(QoS::AtLeastOnce)]);
    assert_eq!(
        open,
        Some(false),
        "a reader publishing anything is disconnected"
    );
    let (_, open) = try_topics(
        &mapper,
        "m3",
        &[],
        Some("$hw/events/device/default/d/twin/update"),
    )
    .await;
    assert_eq!(open, Some(true), "a mapper reports its device");
    // A full login's delta does arrive: the watcher would have seen a forged one by now.
    let (_, open) = try_topics(&full, "f1", &[], Some(forged)).await;
    assert_eq!(open, Some(true));
    let first = tokio::time::timeout(Duration::from_secs(10), delta_rx.recv())
        .await
        .expect("the full login's delta arrives");
    assert_eq!(
        first,
        Some(Some(forged.into())),
        "only the full login's delta"
    );
    watcher.abort();

    // A will on a topic the login may not publish is refused at CONNECT.
    let mut options = mapper.options("m4");
    options.set_last_will(rumqttc::LastWill::new(forged, "{}", QoS::AtMostOnce, false));
    let (_client, mut events) = AsyncClient::new(options, 8);
    let refused = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("an answer")
        {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack.code,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(refused, ConnectReturnCode::NotAuthorized);
}

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    /// Client certificates whose Organizational Unit is `reader`, `full` and `admin`.
    reader: (String, String),
    full: (String, String),
    unknown_unit: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    let issue_in = |cn: &str, unit: Option<&str>, san: Option<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(unit) = unit {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, unit);
        }
        p.subject_alt_names.extend(san);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let issue = |cn: &str, san: Option<SanType>| issue_in(cn, None, san);
    Pki {
        ca: ca.pem(),
        server: issue(
            "broker",
            Some(SanType::IpAddress("127.0.0.1".parse().unwrap())),
        ),
        client: issue("mapper", None),
        reader: issue_in("dashboard", Some("reader"), None),
        full: issue_in("bridge", Some("full"), None),
        unknown_unit: issue_in("stranger", Some("admin"), None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_requires_a_client_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let port = free_port();
    let broker = eventbus::start(&BrokerConfig {
        tls: Some(BrokerTls {
            cert: write("server.pem", &pki.server.0),
            key: write("server.key", &pki.server.1),
            client_ca: write("ca.pem", &pki.ca),
        }),
        ..BrokerConfig::loopback(port)
    })
    .unwrap();
    let _twin = twin(broker.internal.clone(), dir.path()).await;
    let plain = Endpoint::plain(SocketAddr::from(([127, 0, 0, 1], port)));
    let no_cert = Endpoint {
        tls: Some(ClientTls {
            ca_pem: pki.ca.clone().into_bytes(),
            cert_pem: None,
            key_pem: None,
        }),
        ..plain.clone()
    };
    assert!(connack(&plain, "plain").await.is_err());
    assert!(connack(&no_cert, "no-cert").await.is_err());
    let with = |(cert, key): &(String, String)| Endpoint {
        tls: Some(ClientTls {
            ca_pem: pki.ca.clone().into_bytes(),
            cert_pem: Some(cert.clone().into_bytes()),
            key_pem: Some(key.clone().into_bytes()),
        }),
        ..plain.clone()
    };
    let with_cert = with(&pki.client);
    let got = request(
        &with_cert,
        "$hw/events/device/default/d/twin/get",
        "$hw/events/device/default/d/twin/get/result",
    )
    .await;
    assert!(got.get("twin").is_some(), "{got}");

    // The certificate is the credential, and its Organizational Unit the role: none is a
    // mapper, which may not speak with the twin's voice.
    use rumqttc::SubscribeReasonCode::{Failure, Success};
    let forged = "$hw/events/device/default/d/twin/update/delta";
    let (_, open) = try_topics(&with_cert, "m1", &[], Some(forged)).await;
    assert_eq!(
        open,
        Some(false),
        "a mapper's certificate publishing a delta is disconnected"
    );
    let (codes, open) = try_topics(
        &with(&pki.reader),
        "r1",
        &["$hw/events/device/#"],
        Some("$hw/events/device/default/d/twin/update"),
    )
    .await;
    assert_eq!(codes, vec![Success(QoS::AtLeastOnce)]);
    assert_eq!(open, Some(false), "a reader's certificate may not publish");
    let (_, open) = try_topics(&with(&pki.full), "f1", &[], Some(forged)).await;
    assert_eq!(open, Some(true), "OU=full speaks for the twin");
    let (codes, _) = try_topics(
        &with(&pki.unknown_unit),
        "u1",
        &["$hw/events/device/#"],
        None,
    )
    .await;
    assert_eq!(codes, vec![Failure], "an unknown unit gets no topic");
}

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_twin_works_on_an_external_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto is missing: install Debian's mosquitto (tests/run.sh does)");
    let _mosquitto = Mosquitto(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let endpoint = Endpoint::parse(&format!("mqtt://127.0.0.1:{port}")).unwrap();
    let _twin = twin(endpoint.clone(), dir.path()).await;
    let got = request(
        &endpoint,
        "$hw/events/device/d/twin/get",
        "$hw/events/device/d/twin/get/result",
    )
    .await;
    assert!(got.get("twin").is_some(), "{got}");
}

/// MQTT 3.1.1 CONNECT with `flags` (clean session = 0x02) for client `id`.
fn connect_packet(id: &str, flags: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

fn subscribe_packet(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    let mut packet = vec![0x82, body.len() as u8];
    packet.extend(body);
    packet
}

fn publish_packet(topic: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(b"x");
    let mut packet = vec![0x30, body.len() as u8];
    packet.extend(body);
    packet
}

/// Sends `packets` on a fresh connection; whether the broker then closes it (reads reach the
/// end within 3 s). Bytes it sends before (a CONNACK) are skipped.
fn closed_after(port: u16, packets: &[Vec<u8>]) -> bool {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    for p in packets {
        stream.write_all(p).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 256];
    while std::time::Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn the_broker_closes_connections_that_break_the_protocol() {
    let port = free_port();
    eventbus::start(&BrokerConfig::loopback(port)).expect("start the broker");
    let ok = connect_packet("fine", 0x02);
    // A well-behaved client stays connected (the control for the cases below).
    assert!(
        !closed_after(port, std::slice::from_ref(&ok)),
        "a valid CONNECT was closed"
    );
    // Reserved CONNECT flag set (MQTT-3.1.2-3).
    assert!(closed_after(port, &[connect_packet("reserved", 0x03)]));
    // A second CONNECT (MQTT-3.1.0-2).
    assert!(closed_after(
        port,
        &[connect_packet("twice", 0x02), connect_packet("twice", 0x02)]
    ));
    // `#` not last, `+` sharing a level (MQTT-4.7.1-2, -3).
    assert!(closed_after(
        port,
        &[connect_packet("f1", 0x02), subscribe_packet("a/#/b")]
    ));
    assert!(closed_after(
        port,
        &[connect_packet("f2", 0x02), subscribe_packet("a/b+")]
    ));
    // Wildcards in a publish topic (MQTT-3.3.2-2).
    assert!(closed_after(
        port,
        &[connect_packet("p1", 0x02), publish_packet("a/+")]
    ));
    assert!(closed_after(
        port,
        &[connect_packet("p2", 0x02), publish_packet("$hw/events/#")]
    ));
}
