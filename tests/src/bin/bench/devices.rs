//! Device rows of `edgesite-bench`: twin updates through the node's embedded broker with 1,000
//! devices, mapper-report -> `Device.status` latency at 100 updates/s, the memory 1,000 devices
//! cost, and the embedded broker's raw publish throughput beside mosquitto's on this machine.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use super::{Row, client, ms, percentile, rss_kib, start_with};

const DEVICES: usize = 1_000;
const THROUGHPUT_UPDATES: usize = 20_000;
const WINDOW: usize = 256;
const LATENCY_RATE: u64 = 100;
const LATENCY_UPDATES: usize = 1_000;
const RAW_MESSAGES: usize = 100_000;

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "devices.kubeedge.io".into(),
        version: "v1beta1".into(),
        api_version: "devices.kubeedge.io/v1beta1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// A broker on 127.0.0.1, and whether to log in with [`LOGIN`].
#[derive(Clone, Copy)]
struct Broker {
    port: u16,
    login: bool,
}

/// The bench's own login on the site's broker (a `full` line of a --mqtt-users file: the raw
/// throughput rows publish on a topic outside the device protocol).
const LOGIN: (&str, &str) = ("bench", "bench-password");

fn options(broker: Broker, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", broker.port);
    if broker.login {
        o.set_credentials(LOGIN.0, LOGIN.1);
    }
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(200);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// A subscriber on `filter` that counts messages (and keeps the payloads of those `keep` asks
/// for) until dropped.
struct Counter {
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    async fn start(port: Broker, id: &str, filter: &str) -> Result<Counter> {
        let (client, mut events) = AsyncClient::new(options(port, id), 1024);
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let filter = filter.to_string();
        let c = count.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(&filter, QoS::AtMostOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("subscribe")??;
        Ok(Counter { count, task })
    }

    fn get(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A publishing client whose event loop runs in the background.
async fn publisher(port: Broker, id: &str) -> Result<(AsyncClient, tokio::task::JoinHandle<()>)> {
    let (client, mut events) = AsyncClient::new(options(port, id), 1024);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .context("connect")??;
    Ok((client, task))
}

/// Raw broker throughput: one publisher, one subscriber, QoS 0, 100-byte payloads; messages
/// per second as the subscriber receives them.
async fn raw_throughput(port: Broker) -> Result<f64> {
    let counter = Counter::start(port, "raw-sub", "bench/raw").await?;
    let (client, task) = publisher(port, "raw-pub").await?;
    let payload = vec![b'x'; 100];
    let t0 = Instant::now();
    for _ in 0..RAW_MESSAGES {
        client
            .publish("bench/raw", QoS::AtMostOnce, false, payload.clone())
            .await?;
    }
    // QoS 0 may drop under overload: count what arrived, stop when it stops growing.
    let mut last = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = counter.get();
        if n >= RAW_MESSAGES {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let received = counter.get();
    let elapsed = if received >= RAW_MESSAGES {
        t0.elapsed()
    } else {
        last.1.duration_since(t0)
    };
    task.abort();
    Ok(received as f64 / elapsed.as_secs_f64())
}

struct Mosquitto(std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(dir: &Path) -> Result<(Mosquitto, u16)> {
    let port = tests::free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
        ),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start mosquitto (Debian's mosquitto package)")?;
    let m = Mosquitto(child);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("mosquitto did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((m, port))
}

pub async fn rows(bin: &Path, work: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let rt = tokio::task::spawn_blocking(tests::node::Runtime::start)
        .await?
        .context("start a private containerd (the device rows need a node agent)")?;
    let dir = work.join("devices");
    std::fs::create_dir_all(&dir)?;
    let port = tests::free_port();
    let mut flags = rt.node_flags("bench-dev");
    flags.push("--cluster-cidr=10.201.0.0/16".into());
    let users = dir.join("mqtt-users");
    std::fs::write(&users, format!("{}:{}:full\n", LOGIN.0, LOGIN.1))?;
    flags.push(format!("--mqtt-users={}", users.display()));
    let mqtt = Broker {
        port: rt.mqtt_port("bench-dev"),
        login: true,
    };
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (server, _) = start_with(bin, &dir, port, &flags).await?;
    let pid = server.child.id();
    let c = client(&dir.join("kubeconfig.yaml")).await?;
    let t0 = Instant::now();
    // The CRDs are installed at start; wait for the twin's broker too.
    while std::net::TcpStream::connect(("127.0.0.1", mqtt.port)).is_err() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the node's MQTT broker did not listen on {}", mqtt.port);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle, _) = rss_kib(pid);

    let models: Api<DynamicObject> = Api::namespaced_with(
        c.clone(),
        "default",
        &resource("DeviceModel", "devicemodels"),
    );
    let devices: Api<DynamicObject> =
        Api::namespaced_with(c.clone(), "default", &resource("Device", "devices"));
    let model: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
        "metadata": {"name": "sensor"},
        "spec": {"protocol": "virtual", "properties": [{"name": "temp", "type": "INT", "accessMode": "ReadWrite"}]}
    }))?;
    models.create(&PostParams::default(), &model).await?;
    let mut creates = futures::stream::iter((0..DEVICES).map(|i| {
        let devices = devices.clone();
        async move {
            let d: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
                "metadata": {"name": format!("sensor-{i}")},
                "spec": {"deviceModelRef": {"name": "sensor"}, "nodeName": "bench-dev",
                    "protocol": {"protocolName": "virtual"},
                    "properties": [{"name": "temp", "desired": {"value": "20"}}]}
            }))?;
            devices.create(&PostParams::default(), &d).await?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(32);
    while let Some(r) = creates.next().await {
        r?;
    }
    // Until the twin holds every device (the last one created answers twin/get with its twin).
    let t0 = Instant::now();
    while !twin_holds(mqtt, DEVICES - 1).await? {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the twin did not get all {DEVICES} devices within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (held, _) = rss_kib(pid);
    let (pubc, pub_task) = publisher(mqtt, "bench-mapper").await?;

    // Throughput: twin/update from one mapper connection, QoS 1, with at most WINDOW updates
    // unanswered (the broker acknowledges QoS 1 itself, so an open loop would only measure how
    // fast it buffers).
    let results = Counter::start(
        mqtt,
        "bench-results",
        "$hw/events/device/+/+/twin/update/result",
    )
    .await?;
    let t0 = Instant::now();
    for n in 0..THROUGHPUT_UPDATES {
        while n >= results.get() + WINDOW {
            if t0.elapsed() > Duration::from_secs(300) {
                bail!(
                    "twin updates stopped being answered after {}",
                    results.get()
                );
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let i = n % DEVICES;
        pubc.publish(
            format!("$hw/events/device/default/sensor-{i}/twin/update"),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"event_id":"","timestamp":0,"twin":{{"temp":{{"actual":{{"value":"{n}"}}}}}}}}"#),
        )
        .await?;
    }
    while results.get() < THROUGHPUT_UPDATES {
        if t0.elapsed() > Duration::from_secs(300) {
            bail!(
                "only {} of {THROUGHPUT_UPDATES} twin updates answered",
                results.get()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = THROUGHPUT_UPDATES as f64 / t0.elapsed().as_secs_f64();
    drop(results);
    rows.push(Row {
        metric: "twin updates through the embedded broker, 1,000 devices on one node, one mapper connection (QoS 1, 256 unanswered at most, update -> result)",
        measured: format!("{rate:.0} updates/s"),
        target: "-",
        met: None,
    });

    // Let the status writer catch up with the burst before timing single reports.
    let t0 = Instant::now();
    let last = THROUGHPUT_UPDATES - 1;
    loop {
        let d = devices.get(&format!("sensor-{}", last % DEVICES)).await?;
        let v = d.data.pointer("/status/twins/0/reported/value").cloned();
        if v == Some(json!(last.to_string())) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the burst's statuses were not written within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = t0.elapsed();

    // Latency at 100 updates/s: send time of each value, watch time of its status.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, String, Instant)>(4096);
    let watch_api = devices.clone();
    let watcher = tokio::spawn(async move {
        let stream = kube::runtime::watcher(watch_api, kube::runtime::watcher::Config::default());
        futures::pin_mut!(stream);
        while let Some(Ok(event)) = stream.next().await {
            if let kube::runtime::watcher::Event::Apply(d) = event
                && let Some(v) = d
                    .data
                    .pointer("/status/twins/0/reported/value")
                    .and_then(|v| v.as_str())
            {
                let _ = tx
                    .send((
                        d.metadata.name.unwrap_or_default(),
                        v.to_string(),
                        Instant::now(),
                    ))
                    .await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sent: HashMap<(String, String), Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    let mut n = 0;
    while n < LATENCY_UPDATES {
        tokio::select! {
            _ = tick.tick() => {
                let i = (n * 7919) % DEVICES;
                let value = format!("L{n}");
                sent.insert((format!("sensor-{i}"), value.clone()), Instant::now());
                pubc.publish(
                    format!("$hw/events/device/default/sensor-{i}/twin/update"),
                    QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"twin":{{"temp":{{"actual":{{"value":"{value}"}}}}}}}}"#),
                )
                .await?;
                n += 1;
            }
            Some((name, value, at)) = rx.recv() => {
                if let Some(t) = sent.remove(&(name, value)) {
                    latencies.push(at.duration_since(t));
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sent.is_empty() && Instant::now() < deadline {
        if let Ok(Some((name, value, at))) =
            tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
            && let Some(t) = sent.remove(&(name, value))
        {
            latencies.push(at.duration_since(t));
        }
    }
    watcher.abort();
    if !sent.is_empty() {
        bail!("{} reported values never reached Device.status", sent.len());
    }
    latencies.sort();
    let p50 = percentile(&latencies, 0.5);
    let p99 = percentile(&latencies, 0.99);
    rows.push(Row {
        metric: "mapper report -> Device.status (watch), 100 updates/s over 1,000 devices: p50 / p99",
        measured: format!("{} / {}", ms(p50), ms(p99)),
        target: "p99 < 250 ms",
        met: Some(p99 < Duration::from_millis(250)),
    });
    rows.push(Row {
        metric: "status write-back of a 20,000-update burst (1,000 devices): time until the last value is in Device.status",
        measured: format!("{:.1} s", drain.as_secs_f64()),
        target: "-",
        met: None,
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (busy, _) = rss_kib(pid);
    rows.push(Row {
        metric: "edgesite server+agent RSS: idle / 1,000 devices stored and in the twin / after 21,000 twin updates (broker buffers, status writes)",
        measured: format!(
            "{:.1} MB / {:.1} MB / {:.1} MB",
            idle as f64 / 1024.0,
            held as f64 / 1024.0,
            busy as f64 / 1024.0
        ),
        target: "-",
        met: None,
    });
    pub_task.abort();

    // The broker alone, against mosquitto on the same machine with the same client.
    let embedded = raw_throughput(mqtt).await?;
    let (mosq, mosq_port) = mosquitto(&dir)?;
    let reference = raw_throughput(Broker {
        port: mosq_port,
        login: false,
    })
    .await?;
    drop(mosq);
    rows.push(Row {
        metric: "MQTT publish throughput, 1 publisher -> 1 subscriber, QoS 0, 100 B: embedded rumqttd / mosquitto 2.0",
        measured: format!("{embedded:.0} / {reference:.0} msg/s"),
        target: "-",
        met: None,
    });
    drop(server);
    tests::node::unmount_under(&dir);
    drop(rt);
    Ok(())
}

/// Whether the twin answers `twin/get` for device `i` with its twin (not a 404).
async fn twin_holds(port: Broker, i: usize) -> Result<bool> {
    let (client, mut events) = AsyncClient::new(options(port, "bench-probe"), 16);
    let topic = format!("$hw/events/device/default/sensor-{i}/twin/get");
    let result = format!("{topic}/result");
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&result, QoS::AtLeastOnce).await?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, "{}")
                        .await?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == result => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
                    return anyhow::Ok(v.get("twin").is_some());
                }
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    Ok(matches!(answer, Ok(Ok(true))))
}
