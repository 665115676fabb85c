//! The node's twin and EventBus on their own: a real embedded broker, the twin serving devices
//! from its file (no API server), and MQTT clients speaking KubeEdge's topics and payloads.

use std::net::SocketAddr;
use std::time::Duration;

use devices::devicetwin::{self, DeviceTwin};
use devices::eventbus::{self, BrokerConfig, Endpoint};
use devices::store::{DeviceRecord, Store};
use devices::twin::{MsgTwin, TwinValue, TwinVersion};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Client {
    client: AsyncClient,
    rx: mpsc::Receiver<(String, Value)>,
}

impl Client {
    async fn connect(endpoint: &Endpoint, id: &str, filters: &[&str]) -> Client {
        let (client, mut events) = AsyncClient::new(endpoint.options(id), 64);
        let (tx, rx) = mpsc::channel(1024);
        let (ready_tx, mut ready_rx) = mpsc::channel(1);
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let sub = client.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for f in &filters {
                            sub.subscribe(f, QoS::AtLeastOnce).await.unwrap();
                        }
                        if filters.is_empty() {
                            let _ = ready_tx.try_send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.try_send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((p.topic.clone(), body)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .expect("subscribed");
        // Every filter acknowledged.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Client { client, rx }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    /// The next message on `topic` (others are skipped).
    async fn expect(&mut self, topic: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (t, body) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no message on {topic} within 10 s"))
                .expect("client running");
            if t == topic {
                return body;
            }
        }
    }
}

struct Node {
    broker: Endpoint,
    twin: DeviceTwin,
    _stop: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

async fn node(records: Vec<DeviceRecord>) -> Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("devices.db");
    {
        let store = Store::open(&db).unwrap();
        for r in &records {
            store.put_device(r).unwrap();
        }
    }
    let port = free_port();
    let broker = eventbus::start(&BrokerConfig::loopback(port)).unwrap();
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(devicetwin::run(
        devicetwin::Config {
            node_name: "n1".into(),
            database: db,
            broker: broker.internal.clone(),
        },
        None,
        stop.clone(),
        Some(tx),
    ));
    let twin = rx.await.unwrap();
    // Give the twin time to subscribe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Node {
        broker: Endpoint::plain(SocketAddr::from(([127, 0, 0, 1], port))),
        twin,
        _stop: stop.drop_guard(),
        _dir: dir,
    }
}

fn fan() -> DeviceRecord {
    let mut r = DeviceRecord {
        namespace: "default".into(),
        name: "fan".into(),
        uid: "u1".into(),
        generation: 1,
        spec: json!({"deviceModelRef": {"name": "fan-model"}, "nodeName": "n1",
            "protocol": {"protocolName": "virtual"},
            "properties": [{"name": "speed", "desired": {"value": "3"}}]}),
        properties: vec!["speed".into()],
        ..Default::default()
    };
    r.twins.insert(
        "speed".into(),
        MsgTwin {
            expected: Some(TwinValue::new("3", 1)),
            expected_version: Some(TwinVersion { cloud: 1, edge: 0 }),
            ..Default::default()
        },
    );
    r
}

const FAN: &str = "$hw/events/device/default/fan";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeedge_topics_and_payloads() {
    let node = node(vec![fan()]).await;
    let mut app = Client::connect(
        &node.broker,
        "app",
        &["$hw/events/device/#", "$hw/events/node/n1/membership/#"],
    )
    .await;

    // twin/get: the twin as stored, under the caller's event id.
    app.publish(
        &format!("{FAN}/twin/get"),
        r#"{"event_id":"g1","timestamp":1}"#,
    )
    .await;
    let got = app.expect(&format!("{FAN}/twin/get/result")).await;
    assert_eq!(got["event_id"], "g1");
    assert_eq!(got["twin"]["speed"]["expected"]["value"], "3");

    // A mapper reports: result with the changed twin, a document {last, current}, the version
    // bumped on the edge side.
    app.publish(
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"u1","timestamp":2,"twin":{"speed":{"actual":{"value":"2","metadata":{"timestamp":2}},"metadata":{"type":"int"}}}}"#,
    )
    .await;
    let result = app.expect(&format!("{FAN}/twin/update/result")).await;
    assert_eq!(result["event_id"], "u1");
    assert_eq!(result["twin"]["speed"]["actual"]["value"], "2");
    assert_eq!(result["twin"]["speed"]["actual_version"]["edge"], 1);
    let doc = app.expect(&format!("{FAN}/twin/update/document")).await;
    assert!(doc["twin"]["speed"]["last"]["actual"].is_null());
    assert_eq!(doc["twin"]["speed"]["current"]["actual"]["value"], "2");

    // An app sets a new expected value: the mapper hears a delta.
    app.publish(
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"u2","twin":{"speed":{"expected":{"value":"5"}}}}"#,
    )
    .await;
    let delta = app.expect(&format!("{FAN}/twin/update/delta")).await;
    assert_eq!(delta["delta"]["speed"], "5");
    assert_eq!(delta["twin"]["speed"]["actual"]["value"], "2");

    // The older single-segment id reaches the same device.
    app.publish("$hw/events/device/fan/twin/get", r#"{"event_id":"g2"}"#)
        .await;
    let got = app.expect("$hw/events/device/fan/twin/get/result").await;
    assert_eq!(got["twin"]["speed"]["expected"]["value"], "5");

    // State.
    app.publish(
        &format!("{FAN}/state/update"),
        r#"{"event_id":"s1","timestamp":3,"state":"online"}"#,
    )
    .await;
    let state = app.expect(&format!("{FAN}/state/update/result")).await;
    assert_eq!(state["device"]["state"], "online");
    assert!(!state["device"]["last_online"].as_str().unwrap().is_empty());
    app.publish(&format!("{FAN}/state/get"), "{}").await;
    let state = app.expect(&format!("{FAN}/state/get/result")).await;
    assert_eq!(state["device"]["state"], "online");

    // Membership: the node's devices with their twins and specs.
    app.publish("$hw/events/node/n1/membership/get", r#"{"event_id":"m1"}"#)
        .await;
    let members = app.expect("$hw/events/node/n1/membership/get/result").await;
    assert_eq!(members["event_id"], "m1");
    assert_eq!(members["devices"][0]["id"], "default/fan");
    assert_eq!(
        members["devices"][0]["twin"]["speed"]["actual"]["value"],
        "2"
    );
    assert_eq!(
        members["devices"][0]["spec"]["protocol"]["protocolName"],
        "virtual"
    );

    // Deleting a twin.
    app.publish(
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"d1","twin":{"extra":{"actual":{"value":"x"}}}}"#,
    )
    .await;
    app.expect(&format!("{FAN}/twin/update/result")).await;
    app.publish(
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"d2","twin":{"extra":{"metadata":{"type":"deleted"}}}}"#,
    )
    .await;
    let doc = loop {
        let d = app.expect(&format!("{FAN}/twin/update/document")).await;
        if d["twin"]
            .get("extra")
            .is_some_and(|e| e["current"].is_null())
        {
            break d;
        }
    };
    assert_eq!(doc["twin"]["extra"]["last"]["actual"]["value"], "x");
    app.publish(&format!("{FAN}/twin/get"), "{}").await;
    let got = app.expect(&format!("{FAN}/twin/get/result")).await;
    assert!(got["twin"].get("extra").is_none());
    assert_eq!(node.twin.devices().await, vec!["default/fan".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_result_codes() {
    let node = node(vec![fan()]).await;
    let mut app = Client::connect(&node.broker, "bad", &["$hw/events/device/#"]).await;
    let result = format!("{FAN}/twin/update/result");

    app.publish(&format!("{FAN}/twin/update"), "{not json")
        .await;
    let r = app.expect(&result).await;
    assert_eq!(r["code"], 400);
    assert!(r["reason"].as_str().unwrap().contains("malformed"));

    app.publish(
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"v","twin":{"speed":{"actual":{"value":7}}}}"#,
    )
    .await;
    let r = app.expect(&result).await;
    assert_eq!(
        (r["code"].as_u64(), r["event_id"].as_str()),
        (Some(400), Some("v"))
    );

    let big = "9".repeat(513);
    app.publish(
        &format!("{FAN}/twin/update"),
        format!(r#"{{"event_id":"big","twin":{{"speed":{{"actual":{{"value":"{big}"}}}}}}}}"#),
    )
    .await;
    let r = app.expect(&result).await;
    assert_eq!(r["code"], 400);
    assert!(r["reason"].as_str().unwrap().contains("512"));

    let key = "k".repeat(129);
    app.publish(
        &format!("{FAN}/twin/update"),
        format!(r#"{{"twin":{{"{key}":{{"actual":{{"value":"1"}}}}}}}}"#),
    )
    .await;
    assert_eq!(app.expect(&result).await["code"], 400);

    app.publish(
        "$hw/events/device/default/nothing/twin/update",
        r#"{"event_id":"n","twin":{"a":{"actual":{"value":"1"}}}}"#,
    )
    .await;
    let r = app
        .expect("$hw/events/device/default/nothing/twin/update/result")
        .await;
    assert_eq!(r["code"], 404);
    app.publish("$hw/events/device/nothing/twin/get", "{}")
        .await;
    assert_eq!(
        app.expect("$hw/events/device/nothing/twin/get/result")
            .await["code"],
        404
    );

    // Two reports, then one made against the first version: a conflict, nothing changes.
    for v in ["1", "2"] {
        app.publish(
            &format!("{FAN}/twin/update"),
            format!(r#"{{"twin":{{"speed":{{"actual":{{"value":"{v}"}}}}}}}}"#),
        )
        .await;
        app.expect(&result).await;
    }
    app.publish(
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"c","twin":{"speed":{"actual":{"value":"9"},"actual_version":{"cloud":0,"edge":1}}}}"#,
    )
    .await;
    let r = app.expect(&result).await;
    assert_eq!(r["code"], 409);
    app.publish(&format!("{FAN}/twin/get"), "{}").await;
    let got = app.expect(&format!("{FAN}/twin/get/result")).await;
    assert_eq!(got["twin"]["speed"]["actual"]["value"], "2");

    app.publish(&format!("{FAN}/state/update"), r#"{"state":""}"#)
        .await;
    assert_eq!(
        app.expect(&format!("{FAN}/state/update/result")).await["code"],
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_stalls_no_one() {
    use tokio::io::AsyncWriteExt;
    let node = node(vec![fan()]).await;
    // A raw client: connects, subscribes to everything of the device, never reads again.
    let addr = format!("{}:{}", node.broker.host, node.broker.port);
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let connect: &[u8] = &[
        0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x05, b's',
        b'l', b'o', b'w', b'1',
    ];
    raw.write_all(connect).await.unwrap();
    let filter = b"$hw/events/device/#";
    let mut sub = vec![
        0x82,
        (2 + 2 + filter.len() + 1) as u8,
        0x00,
        0x01,
        0x00,
        filter.len() as u8,
    ];
    sub.extend_from_slice(filter);
    sub.push(0x00);
    raw.write_all(&sub).await.unwrap();

    // The flood comes from a client that reads nothing back; the answer is awaited by another.
    let flood = Client::connect(&node.broker, "busy", &[]).await;
    let mut app = Client::connect(
        &node.broker,
        "observer",
        &["$hw/events/device/default/fan/twin/get/result"],
    )
    .await;
    let value = "x".repeat(500);
    // Far more than the slow client's buffers hold.
    for i in 0..3000 {
        flood
            .client
            .publish(
                format!("{FAN}/twin/update"),
                QoS::AtMostOnce,
                false,
                format!(
                    r#"{{"event_id":"{i}","twin":{{"speed":{{"actual":{{"value":"{value}"}}}}}}}}"#
                ),
            )
            .await
            .unwrap();
    }
    app.publish(&format!("{FAN}/twin/get"), r#"{"event_id":"after-flood"}"#)
        .await;
    loop {
        let got = app.expect(&format!("{FAN}/twin/get/result")).await;
        if got["event_id"] == "after-flood" {
            break;
        }
    }
    drop(raw);
}
