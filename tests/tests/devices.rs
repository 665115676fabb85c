//! Devices end to end: KubeEdge Device/DeviceModel manifests applied with kubectl, the node's
//! embedded MQTT broker and twin, the bundled Modbus mapper against a real Modbus TCP server
//! (pymodbus), a legacy mapper played by `mosquitto_pub`/`mosquitto_sub`, and the twin carrying
//! on while the node is cut off from the API server or the server is down. Needs root
//! (containerd for the node agent); run by tests/run.sh.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tests::link::Link;
use tests::node::Runtime;
use tests::{Site, edgesite_bin, eventually, python};

fn need(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is missing: install Debian's {package} (tests/run.sh does)"
    );
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pymodbus TCP server on 127.0.0.1:`port`: holding register 2 holds 23, coil 0 is off.
fn modbus_server(port: u16, dir: &std::path::Path) -> Proc {
    let script = dir.join("modbus_sim.py");
    std::fs::write(
        &script,
        r#"import sys
from pymodbus.datastore import ModbusSequentialDataBlock, ModbusSlaveContext, ModbusServerContext
from pymodbus.server import StartTcpServer
hr = ModbusSequentialDataBlock(0, [0] * 100)
hr.setValues(3, [23])  # address 2 (pymodbus blocks count from 1)
co = ModbusSequentialDataBlock(0, [0] * 100)
store = ModbusSlaveContext(hr=hr, co=co, zero_mode=False)
StartTcpServer(context=ModbusServerContext(slaves=store, single=True), address=("127.0.0.1", int(sys.argv[1])))
"#,
    )
    .unwrap();
    let ok = Command::new(python())
        .args(["-c", "import pymodbus"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "pymodbus is missing from {}: tests/run.sh installs it (pip install pymodbus==3.6.9)",
        python().display()
    );
    let child = Command::new(python())
        .arg(&script)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the Modbus server did not listen on {port}"
    );
    Proc(child)
}

/// Reads holding register `address` from the Modbus server, as any Modbus client would.
fn holding_register(port: u16, address: u16) -> Option<u16> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        use tokio_modbus::client::Reader;
        let mut ctx = tokio_modbus::client::tcp::connect(([127, 0, 0, 1], port).into())
            .await
            .ok()?;
        ctx.read_holding_registers(address, 1)
            .await
            .ok()?
            .ok()?
            .first()
            .copied()
    })
}

fn device(site: &Site, name: &str) -> Option<Value> {
    let out = site.kubectl(&["get", "device", name, "-o", "json"]).ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// `status.twins[property].<which>.value` of a device.
fn twin_value(site: &Site, name: &str, property: &str, which: &str) -> Option<String> {
    let d = device(site, name)?;
    d.pointer("/status/twins")?
        .as_array()?
        .iter()
        .find(|t| t["propertyName"] == property)?
        .get(which)?
        .get("value")?
        .as_str()
        .map(String::from)
}

/// `kubectl patch device NAME --type=json -p PATCH`.
fn patch_device(site: &Site, name: &str, patch: &str) {
    site.ok(&["patch", "device", name, "--type=json", "-p", patch]);
}

/// A node's broker and the login to use on it.
#[derive(Clone)]
struct Mqtt {
    port: u16,
    login: Option<(String, String)>,
}

impl Mqtt {
    /// The broker on `port` with the mapper login its node generated into `data_dir`.
    fn mapper(port: u16, data_dir: &std::path::Path) -> Mqtt {
        Mqtt::with_login(port, data_dir, "mapper")
    }

    fn with_login(port: u16, data_dir: &std::path::Path, role: &str) -> Mqtt {
        let file = data_dir
            .join("agent")
            .join("mqtt")
            .join(format!("{role}.login"));
        // An agent that was just launched writes it as it starts.
        eventually(Duration::from_secs(30), || file.exists());
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let (user, password) = text.trim().split_once(':').expect("username:password");
        Mqtt {
            port,
            login: Some((user.to_string(), password.to_string())),
        }
    }

    fn anonymous(port: u16) -> Mqtt {
        Mqtt { port, login: None }
    }

    /// mosquitto_pub/mosquitto_sub arguments for the broker and the login.
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "-h".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            self.port.to_string(),
        ];
        if let Some((user, password)) = &self.login {
            args.extend([
                "-u".to_string(),
                user.clone(),
                "-P".to_string(),
                password.clone(),
            ]);
        }
        args
    }
}

fn mqtt_pub(mqtt: &Mqtt, topic: &str, payload: &str) {
    let out = Command::new("mosquitto_pub")
        .args(mqtt.args())
        .args(["-q", "1", "-t", topic, "-m", payload])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mosquitto_sub` for `count` messages on `topic`, started before what should make them.
struct Sub(Option<Child>);

impl Sub {
    fn start(mqtt: &Mqtt, topic: &str, count: usize, timeout: Duration) -> Sub {
        let child = Command::new("mosquitto_sub")
            .args(mqtt.args())
            .args([
                "-q",
                "1",
                "-t",
                topic,
                "-C",
                &count.to_string(),
                "-W",
                &timeout.as_secs().to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // mosquitto_sub says nothing once subscribed: give it a moment.
        std::thread::sleep(Duration::from_millis(700));
        Sub(Some(child))
    }

    /// The messages received, as JSON (waits for `count` or the timeout).
    fn messages(mut self) -> Vec<Value> {
        let mut child = self.0.take().unwrap();
        let _ = child.wait();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        out.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn one(self, what: &str) -> Value {
        self.messages()
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no MQTT message: {what}"))
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Publishes `request` until the result topic answers (the twin may not hold the device yet).
fn ask(
    port: &Mqtt,
    topic: &str,
    request: &str,
    result: &str,
    until: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let sub = Sub::start(port, result, 1, Duration::from_secs(5));
        mqtt_pub(port, topic, request);
        if let Some(v) = sub.messages().into_iter().next()
            && until(&v)
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no satisfying answer on {result}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

const MODEL: &str = r#"apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: thermostat-model
  namespace: default
spec:
  properties:
    - name: temperature
      description: setpoint in degrees Celsius
      type: INT
      accessMode: ReadWrite
      maximum: "100"
      minimum: "1"
      unit: Celsius
    - name: heating
      description: heater relay
      type: BOOLEAN
      accessMode: ReadWrite
  protocol: modbus
"#;

fn modbus_device(node: &str, port: u16) -> String {
    format!(
        r#"apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: thermostat
  namespace: default
  labels:
    description: lab-thermostat
spec:
  deviceModelRef:
    name: thermostat-model
  nodeName: {node}
  properties:
    - name: temperature
      collectCycle: 200
      reportCycle: 200
      reportToCloud: true
      visitors:
        protocolName: modbus
        configData:
          register: "HoldingRegister"
          offset: 2
          limit: 1
          scale: 1
          isSwap: false
          isRegisterSwap: false
    - name: heating
      collectCycle: 200
      reportCycle: 200
      visitors:
        protocolName: modbus
        configData:
          register: "CoilRegister"
          offset: 0
          limit: 1
  protocol:
    protocolName: modbus
    configData:
      ip: 127.0.0.1
      port: {port}
      slaveID: 1
"#
    )
}

#[test]
fn a_modbus_device_is_readable_and_writable_through_kubectl() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    let mqtt = rt.mqtt_port("node-a");
    let dir = tempfile::tempdir().unwrap();
    let modbus_port = tests::free_port();
    let _sim = modbus_server(modbus_port, dir.path());

    // The CRDs are there from the start, with KubeEdge's names.
    let crds = site.ok(&["get", "crd"]);
    assert!(crds.contains("devices.devices.kubeedge.io"), "{crds}");
    assert!(crds.contains("devicemodels.devices.kubeedge.io"), "{crds}");
    site.ok_stdin(&["apply", "-f", "-"], Some(MODEL));
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&modbus_device("node-a", modbus_port)),
    );

    let mapper_bin = edgesite_bin().with_file_name("edgesite-mapper-modbus");
    assert!(
        mapper_bin.exists(),
        "{} is missing: cargo build --bins",
        mapper_bin.display()
    );
    let mapper_log = dir.path().join("mapper.log");
    let log = std::fs::File::create(&mapper_log).unwrap();
    let _mapper = Proc(
        Command::new(&mapper_bin)
            .args(["--node", "node-a", "--broker"])
            .arg(format!("mqtt://127.0.0.1:{mqtt}"))
            // The login the node generated (the default path is the installed site's).
            .arg("--mqtt-login-file")
            .arg(
                site.data_dir()
                    .join("agent")
                    .join("mqtt")
                    .join("mapper.login"),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let mapper_says = || std::fs::read_to_string(&mapper_log).unwrap_or_default();

    // The register's value reaches the Device's status.
    assert!(
        eventually(Duration::from_secs(40), || twin_value(
            &site,
            "thermostat",
            "temperature",
            "reported"
        )
        .as_deref()
            == Some("23")),
        "register 2 (23) never reported; device: {:?}\nmapper: {}\nserver: {}",
        device(&site, "thermostat"),
        mapper_says(),
        site.log()
    );
    let d = device(&site, "thermostat").unwrap();
    assert_eq!(d["status"]["state"], "online", "{d}");
    assert!(d["status"]["lastOnlineTime"].as_str().is_some(), "{d}");
    let table = site.ok(&["get", "devices"]);
    assert!(
        table.contains("NODE") && table.contains("node-a") && table.contains("thermostat-model"),
        "{table}"
    );
    let yaml = site.ok(&["get", "device", "thermostat", "-o", "yaml"]);
    assert!(
        yaml.contains("reported:") && yaml.contains("value: \"23\""),
        "{yaml}"
    );

    // kubectl patch of the desired value writes the register.
    patch_device(
        &site,
        "thermostat",
        r#"[{"op":"add","path":"/spec/properties/0/desired","value":{"value":"42"}}]"#,
    );
    assert!(
        eventually(Duration::from_secs(30), || holding_register(modbus_port, 2)
            == Some(42)),
        "register 2 never became 42; mapper: {}",
        mapper_says()
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            twin_value(&site, "thermostat", "temperature", "reported").as_deref() == Some("42")
                && twin_value(&site, "thermostat", "temperature", "observedDesired").as_deref()
                    == Some("42")
        }),
        "status never showed 42 reported and desired: {:?}",
        device(&site, "thermostat")
    );
    // A coil, through a merge patch of the whole property list.
    patch_device(
        &site,
        "thermostat",
        r#"[{"op":"add","path":"/spec/properties/1/desired","value":{"value":"true"}}]"#,
    );
    assert!(
        eventually(Duration::from_secs(30), || twin_value(
            &site,
            "thermostat",
            "heating",
            "reported"
        )
        .as_deref()
            == Some("true")),
        "the coil never reported true: {:?}\nmapper: {}",
        device(&site, "thermostat"),
        mapper_says()
    );

    // A desired value outside the model's range is reported where kubectl describe shows it.
    patch_device(
        &site,
        "thermostat",
        r#"[{"op":"replace","path":"/spec/properties/0/desired/value","value":"300"}]"#,
    );
    assert!(
        eventually(Duration::from_secs(20), || site
            .ok(&["describe", "device", "thermostat"])
            .contains("InvalidDesiredValue")),
        "{}",
        site.ok(&["describe", "device", "thermostat"])
    );

    // Deleting the device takes it off the node: the twin answers 404.
    site.ok(&["delete", "device", "thermostat"]);
    ask(
        &Mqtt::mapper(mqtt, &site.data_dir()),
        "$hw/events/device/default/thermostat/twin/get",
        "{}",
        "$hw/events/device/default/thermostat/twin/get/result",
        |v| v["code"] == 404,
    );
}

const LEGACY_MODEL: &str = r#"apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: fan-model
spec:
  protocol: legacy
  properties:
    - name: speed
      type: INT
      accessMode: ReadWrite
"#;

fn legacy_device(node: &str) -> String {
    format!(
        r#"apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: fan
spec:
  deviceModelRef: {{name: fan-model}}
  nodeName: {node}
  protocol: {{protocolName: legacy}}
  properties:
    - name: speed
      desired: {{value: "3"}}
"#
    )
}

const FAN: &str = "$hw/events/device/default/fan";

#[test]
fn a_legacy_mqtt_mapper_speaks_kubeedge_topics() {
    need("mosquitto_pub", "mosquitto-clients");
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    let port = &Mqtt::mapper(rt.mqtt_port("node-a"), &site.data_dir());
    site.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    site.ok_stdin(&["apply", "-f", "-"], Some(&legacy_device("node-a")));

    // Membership: the node's devices, with twins.
    let members = ask(
        port,
        "$hw/events/node/node-a/membership/get",
        r#"{"event_id":"m1"}"#,
        "$hw/events/node/node-a/membership/get/result",
        |v| v["devices"].as_array().is_some_and(|d| !d.is_empty()),
    );
    assert_eq!(members["event_id"], "m1");
    assert_eq!(members["devices"][0]["id"], "default/fan");
    assert_eq!(
        members["devices"][0]["twin"]["speed"]["expected"]["value"],
        "3"
    );

    // twin/get, under the new and the old device id.
    let got = ask(
        port,
        &format!("{FAN}/twin/get"),
        r#"{"event_id":"g1"}"#,
        &format!("{FAN}/twin/get/result"),
        |v| v.get("twin").is_some(),
    );
    assert_eq!(got["event_id"], "g1");
    assert_eq!(got["twin"]["speed"]["expected"]["value"], "3");
    let sub = Sub::start(
        port,
        "$hw/events/device/fan/twin/get/result",
        1,
        Duration::from_secs(10),
    );
    mqtt_pub(port, "$hw/events/device/fan/twin/get", "{}");
    assert_eq!(
        sub.one("legacy id twin/get")["twin"]["speed"]["expected"]["value"],
        "3"
    );

    // The mapper reports: result, document, and the value in the Device's status.
    let result = Sub::start(
        port,
        &format!("{FAN}/twin/update/result"),
        1,
        Duration::from_secs(10),
    );
    let document = Sub::start(
        port,
        &format!("{FAN}/twin/update/document"),
        1,
        Duration::from_secs(10),
    );
    mqtt_pub(
        port,
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"r1","timestamp":1690000000000,"twin":{"speed":{"actual":{"value":"2","metadata":{"timestamp":1690000000000}},"metadata":{"type":"int"}}}}"#,
    );
    let r = result.one("twin/update/result");
    assert_eq!(r["event_id"], "r1");
    assert_eq!(r["twin"]["speed"]["actual"]["value"], "2");
    let doc = document.one("twin/update/document");
    assert_eq!(doc["twin"]["speed"]["current"]["actual"]["value"], "2");
    assert!(
        eventually(Duration::from_secs(10), || twin_value(
            &site, "fan", "speed", "reported"
        )
        .as_deref()
            == Some("2")),
        "{:?}",
        device(&site, "fan")
    );
    let d = device(&site, "fan").unwrap();
    let ts = d["status"]["twins"][0]["reported"]["metadata"]["timestamp"].clone();
    assert_eq!(ts, "1690000000000", "{d}");

    // kubectl changes the desired value: the mapper hears a delta.
    let delta = Sub::start(
        port,
        &format!("{FAN}/twin/update/delta"),
        1,
        Duration::from_secs(20),
    );
    patch_device(
        &site,
        "fan",
        r#"[{"op":"replace","path":"/spec/properties/0/desired/value","value":"5"}]"#,
    );
    let delta = delta.one("twin/update/delta");
    assert_eq!(delta["delta"]["speed"], "5");
    assert_eq!(delta["twin"]["speed"]["actual"]["value"], "2");
    assert!(
        delta["twin"]["speed"]["expected_version"]["cloud"]
            .as_i64()
            .unwrap()
            >= 2
    );

    // State.
    let sub = Sub::start(
        port,
        &format!("{FAN}/state/update/result"),
        1,
        Duration::from_secs(10),
    );
    mqtt_pub(
        port,
        &format!("{FAN}/state/update"),
        r#"{"event_id":"s","timestamp":1,"state":"online"}"#,
    );
    assert_eq!(sub.one("state/update/result")["device"]["state"], "online");
    assert!(eventually(Duration::from_secs(10), || device(&site, "fan")
        .is_some_and(|d| d["status"]["state"] == "online")));

    // Bad input: result codes, and the twin unharmed.
    let results = Sub::start(
        port,
        &format!("{FAN}/twin/update/result"),
        4,
        Duration::from_secs(15),
    );
    mqtt_pub(port, &format!("{FAN}/twin/update"), "{this is not json");
    mqtt_pub(
        port,
        &format!("{FAN}/twin/update"),
        &format!(
            r#"{{"event_id":"big","twin":{{"speed":{{"actual":{{"value":"{}"}}}}}}}}"#,
            "9".repeat(600)
        ),
    );
    mqtt_pub(
        port,
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"stale","twin":{"speed":{"actual":{"value":"8"},"actual_version":{"cloud":0,"edge":0}}}}"#,
    );
    mqtt_pub(
        port,
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"ok","twin":{"speed":{"actual":{"value":"4"}}}}"#,
    );
    let codes: Vec<(String, i64)> = results
        .messages()
        .iter()
        .map(|m| {
            (
                m["event_id"].as_str().unwrap_or("").to_string(),
                m["code"].as_i64().unwrap_or(200),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            (String::new(), 400),
            ("big".into(), 400),
            ("stale".into(), 409),
            ("ok".into(), 200)
        ]
    );
    let sub = Sub::start(
        port,
        "$hw/events/device/default/ghost/twin/update/result",
        1,
        Duration::from_secs(10),
    );
    mqtt_pub(
        port,
        "$hw/events/device/default/ghost/twin/update",
        r#"{"twin":{"a":{"actual":{"value":"1"}}}}"#,
    );
    assert_eq!(sub.one("unknown device")["code"], 404);
    assert!(
        eventually(Duration::from_secs(10), || twin_value(
            &site, "fan", "speed", "reported"
        )
        .as_deref()
            == Some("4")),
        "{:?}",
        device(&site, "fan")
    );

    // The CRD's schema refuses what KubeEdge's does.
    let err = site.fails(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel\nmetadata: {name: bad}\nspec:\n  properties:\n  - {name: x, type: COMPLEX}\n",
        ),
    );
    assert!(
        err.contains("Unsupported value") || err.contains("COMPLEX"),
        "{err}"
    );
}

#[test]
fn the_broker_asks_for_logins_and_each_role_reaches_only_its_topics() {
    use std::os::unix::fs::PermissionsExt;
    need("mosquitto_pub", "mosquitto-clients");
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    let port = rt.mqtt_port("node-a");
    site.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    site.ok_stdin(&["apply", "-f", "-"], Some(&legacy_device("node-a")));
    let logins = site.data_dir().join("agent").join("mqtt");
    for file in ["mapper.login", "reader.login"] {
        let mode = std::fs::metadata(logins.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let (mapper, reader) = (
        &Mqtt::mapper(port, &site.data_dir()),
        &Mqtt::with_login(port, &site.data_dir(), "reader"),
    );

    // Before: any local process subscribed to '#' and changed a Device's reported value.
    let out = Command::new("mosquitto_sub")
        .args(Mqtt::anonymous(port).args())
        .args(["-t", "#", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not authorised"),
        "{stderr}"
    );

    // The mapper login is a mapper: the twin answers it.
    ask(
        mapper,
        &format!("{FAN}/twin/get"),
        "{}",
        &format!("{FAN}/twin/get/result"),
        |v| v["twin"]["speed"]["expected"]["value"] == "3",
    );
    // A reader sees the twin's traffic but cannot report for a device; a mapper cannot read
    // everything.
    let seen = Sub::start(reader, "$hw/events/device/#", 2, Duration::from_secs(10));
    let results = Sub::start(
        mapper,
        &format!("{FAN}/twin/update/result"),
        2,
        Duration::from_secs(5),
    );
    let _ = Command::new("mosquitto_pub")
        .args(reader.args())
        .args([
            "-q",
            "1",
            "-t",
            &format!("{FAN}/twin/update"),
            "-m",
            r#"{"event_id":"reader","twin":{"speed":{"actual":{"value":"7"}}}}"#,
        ])
        .output()
        .unwrap();
    mqtt_pub(
        mapper,
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"mapper","twin":{"speed":{"actual":{"value":"8"}}}}"#,
    );
    let ids: Vec<Value> = results
        .messages()
        .iter()
        .map(|m| m["event_id"].clone())
        .collect();
    assert_eq!(ids, vec![Value::from("mapper")], "twin/update results");
    assert!(!seen.messages().is_empty(), "the reader saw device traffic");
    let out = Command::new("mosquitto_sub")
        .args(mapper.args())
        .args(["-t", "#", "-C", "1", "-W", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("All subscription requests were denied"),
        "a mapper subscribing to '#': {stderr}"
    );
    assert!(
        eventually(Duration::from_secs(20), || twin_value(
            &site, "fan", "speed", "reported"
        )
        .as_deref()
            == Some("8")),
        "{:?}",
        device(&site, "fan")
    );

    // A mapper pod's login comes from a Secret its pod uses, and lasts as long as the pod.
    let pod_login = Mqtt {
        port,
        login: Some(("shop-mapper".into(), "pod-s3cret".into())),
    };
    let manifest = format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: shop-mapper-mqtt
type: edgesite.io/mqtt-login
stringData:
  username: shop-mapper
  password: pod-s3cret
---
apiVersion: v1
kind: Pod
metadata:
  name: shop-mapper
spec:
  nodeName: node-a
  terminationGracePeriodSeconds: 1
  containers:
  - name: mapper
    image: {}
    command: ["sleep", "3600"]
    env:
    - name: MQTT_USERNAME
      valueFrom: {{secretKeyRef: {{name: shop-mapper-mqtt, key: username}}}}
    - name: MQTT_PASSWORD
      valueFrom: {{secretKeyRef: {{name: shop-mapper-mqtt, key: password}}}}
"#,
        tests::node::BUSYBOX
    );
    let accepted = || {
        Command::new("mosquitto_pub")
            .args(pod_login.args())
            .args(["-t", &format!("{FAN}/twin/get"), "-m", "{}"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(!accepted(), "the login works before any pod uses it");
    site.ok_stdin(&["apply", "-f", "-"], Some(&manifest));
    assert!(
        eventually(Duration::from_secs(30), accepted),
        "the mapper pod's Secret never became a login; server log:\n{}",
        site.log()
    );
    // The pod's env holds the login, as the bundled mappers read it.
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/shop-mapper",
        "--timeout=60s",
    ]);
    let env = site.ok(&["exec", "shop-mapper", "--", "env"]);
    assert!(env.contains("MQTT_USERNAME=shop-mapper"), "{env}");
    // The login is saved for offline restarts, private.
    let saved = logins.join("pods.logins");
    assert!(
        std::fs::read_to_string(&saved)
            .unwrap()
            .contains("shop-mapper:pod-s3cret:mapper")
    );
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    site.ok(&["delete", "pod", "shop-mapper", "--wait=true"]);
    assert!(
        eventually(Duration::from_secs(30), || !accepted()),
        "the login outlived its pod"
    );
    drop(site);

    // --mqtt-allow-anonymous: the old, open broker, for mappers that cannot log in.
    let site = rt.start_site(&["--mqtt-allow-anonymous"]).unwrap();
    let port = rt.mqtt_port("node-a");
    site.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    site.ok_stdin(&["apply", "-f", "-"], Some(&legacy_device("node-a")));
    ask(
        &Mqtt::anonymous(port),
        &format!("{FAN}/twin/get"),
        "{}",
        &format!("{FAN}/twin/get/result"),
        |v| v["twin"]["speed"]["expected"]["value"] == "3",
    );
}

#[test]
fn the_twin_works_offline_and_catches_up() {
    need("mosquitto_pub", "mosquitto-clients");
    let rt = Runtime::start().unwrap();
    let mut site = Site::start_with(&[&format!("--cluster-cidr={}", rt.cluster_cidr())]).unwrap();
    let link = Link::start(site.port).unwrap();
    let agent = rt
        .start_agent_via(&site, "edge-1", &link.url(), &[])
        .unwrap();
    let port = &Mqtt::mapper(rt.mqtt_port("edge-1"), &agent.dir.path().join("data"));
    site.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    site.ok_stdin(&["apply", "-f", "-"], Some(&legacy_device("edge-1")));
    ask(
        port,
        &format!("{FAN}/twin/get"),
        "{}",
        &format!("{FAN}/twin/get/result"),
        |v| v["twin"]["speed"]["expected"]["value"] == "3",
    );
    mqtt_pub(
        port,
        &format!("{FAN}/twin/update"),
        r#"{"twin":{"speed":{"actual":{"value":"1"}}}}"#,
    );
    assert!(eventually(Duration::from_secs(20), || twin_value(
        &site, "fan", "speed", "reported"
    )
    .as_deref()
        == Some("1")));

    // The node loses the site; meanwhile a new desired value is set, and the mapper reports on.
    link.cut();
    patch_device(
        &site,
        "fan",
        r#"[{"op":"replace","path":"/spec/properties/0/desired/value","value":"7"}]"#,
    );
    for v in ["2", "3"] {
        mqtt_pub(
            port,
            &format!("{FAN}/twin/update"),
            &format!(r#"{{"twin":{{"speed":{{"actual":{{"value":"{v}"}}}}}}}}"#),
        );
    }
    // The API server itself goes down too, and the mapper still reports.
    site.stop();
    mqtt_pub(
        port,
        &format!("{FAN}/twin/update"),
        r#"{"twin":{"speed":{"actual":{"value":"4"}}}}"#,
    );
    let got = ask(
        port,
        &format!("{FAN}/twin/get"),
        r#"{"event_id":"offline"}"#,
        &format!("{FAN}/twin/get/result"),
        |v| v["event_id"] == "offline",
    );
    assert_eq!(got["twin"]["speed"]["actual"]["value"], "4", "{got}");
    assert_eq!(got["twin"]["speed"]["actual_version"]["edge"], 4, "{got}");
    // Offline, the expected value is still the one it had: nothing reverts, nothing invented.
    assert_eq!(got["twin"]["speed"]["expected"]["value"], "3", "{got}");

    // Back: the server restarts, the link returns.
    let delta = Sub::start(
        port,
        &format!("{FAN}/twin/update/delta"),
        1,
        Duration::from_secs(90),
    );
    site.launch().unwrap();
    link.restore();
    let delta = delta.one("the desired value set while offline");
    assert_eq!(delta["delta"]["speed"], "7", "{delta}");
    assert!(
        eventually(Duration::from_secs(40), || {
            twin_value(&site, "fan", "speed", "reported").as_deref() == Some("4")
                && twin_value(&site, "fan", "speed", "observedDesired").as_deref() == Some("7")
        }),
        "status after reconnect: {:?}\nagent: {}",
        device(&site, "fan"),
        agent.log()
    );
    let d = device(&site, "fan").unwrap();
    let got = ask(
        port,
        &format!("{FAN}/twin/get"),
        r#"{"event_id":"after"}"#,
        &format!("{FAN}/twin/get/result"),
        |v| v["event_id"] == "after",
    );
    assert_eq!(
        got["twin"]["speed"]["expected_version"]["cloud"], d["metadata"]["generation"],
        "{got}"
    );
    assert_eq!(got["twin"]["speed"]["actual_version"]["edge"], 4, "{got}");
}

#[test]
fn broker_flags_users_file_and_external_mosquitto() {
    need("mosquitto_pub", "mosquitto-clients");
    need("mosquitto", "mosquitto");
    let rt = Runtime::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The server's node: a users file.
    let users = dir.path().join("mqtt-users");
    std::fs::write(&users, "# mappers\nmapper:s3cret\n").unwrap();
    let site = rt
        .start_site(&[&format!("--mqtt-users={}", users.display())])
        .unwrap();
    // A second node on an external mosquitto.
    let mosquitto_port = tests::free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {mosquitto_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let _mosquitto = Proc(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _agent = rt
        .start_agent_via(
            &site,
            "edge-ext",
            &format!("https://127.0.0.1:{}", site.port),
            &[&format!(
                "--mqtt-external=mqtt://127.0.0.1:{mosquitto_port}"
            )],
        )
        .unwrap();
    site.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    site.ok_stdin(&["apply", "-f", "-"], Some(&legacy_device("edge-ext")));

    // The guarded broker refuses anonymous clients with return code 5 and serves the user.
    let port = rt.mqtt_port("node-a");
    let out = Command::new("mosquitto_pub")
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
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not authorised"), "{stderr}");
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            "mapper",
            "-P",
            "s3cret",
            "-t",
            "$hw/events/node/node-a/membership/get",
            "-m",
            "{}",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The device on edge-ext is served through mosquitto.
    let external = &Mqtt::anonymous(mosquitto_port);
    let got = ask(
        external,
        &format!("{FAN}/twin/get"),
        r#"{"event_id":"ext"}"#,
        &format!("{FAN}/twin/get/result"),
        |v| v["twin"]["speed"]["expected"]["value"] == "3",
    );
    assert_eq!(got["event_id"], "ext");
    mqtt_pub(
        external,
        &format!("{FAN}/twin/update"),
        r#"{"twin":{"speed":{"actual":{"value":"9"}}}}"#,
    );
    assert!(
        eventually(Duration::from_secs(20), || twin_value(
            &site, "fan", "speed", "reported"
        )
        .as_deref()
            == Some("9")),
        "{:?}",
        device(&site, "fan")
    );
}

#[test]
fn a_device_moves_between_nodes_and_leaves_when_deleted() {
    need("mosquitto_pub", "mosquitto-clients");
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    let agent = rt.start_agent(&site, "edge-2").unwrap();
    let (a, b) = (
        &Mqtt::mapper(rt.mqtt_port("node-a"), &site.data_dir()),
        &Mqtt::mapper(rt.mqtt_port("edge-2"), &agent.dir.path().join("data")),
    );
    site.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    site.ok_stdin(&["apply", "-f", "-"], Some(&legacy_device("node-a")));
    ask(
        a,
        &format!("{FAN}/twin/get"),
        "{}",
        &format!("{FAN}/twin/get/result"),
        |v| v["twin"]["speed"]["expected"]["value"] == "3",
    );
    // edge-2's twin is up (it answers, with a 404 for now).
    ask(
        b,
        &format!("{FAN}/twin/get"),
        "{}",
        &format!("{FAN}/twin/get/result"),
        |v| v["code"] == 404,
    );
    mqtt_pub(
        a,
        &format!("{FAN}/twin/update"),
        r#"{"twin":{"speed":{"actual":{"value":"6"}}}}"#,
    );
    assert!(eventually(Duration::from_secs(20), || twin_value(
        &site, "fan", "speed", "reported"
    )
    .as_deref()
        == Some("6")));

    let left = Sub::start(
        a,
        "$hw/events/node/node-a/membership/updated",
        1,
        Duration::from_secs(30),
    );
    let arrived = Sub::start(
        b,
        "$hw/events/node/edge-2/membership/updated",
        1,
        Duration::from_secs(30),
    );
    patch_device(
        &site,
        "fan",
        r#"[{"op":"replace","path":"/spec/nodeName","value":"edge-2"}]"#,
    );
    let left = left.one("node-a's membership update");
    assert_eq!(left["removed_devices"][0]["id"], "default/fan", "{left}");
    let arrived = arrived.one("edge-2's membership update");
    let entry = &arrived["added_devices"][0];
    assert_eq!(entry["id"], "default/fan", "{arrived}");
    // The new node starts from what the old one reported.
    assert_eq!(entry["twin"]["speed"]["actual"]["value"], "6", "{arrived}");
    assert_eq!(
        entry["twin"]["speed"]["expected"]["value"], "3",
        "{arrived}"
    );
    ask(
        a,
        &format!("{FAN}/twin/get"),
        "{}",
        &format!("{FAN}/twin/get/result"),
        |v| v["code"] == 404,
    );
    assert!(
        eventually(Duration::from_secs(20), || site
            .ok(&["describe", "device", "fan"])
            .contains("moved from node node-a to node edge-2")),
        "{}",
        site.ok(&["describe", "device", "fan"])
    );

    let gone = Sub::start(
        b,
        "$hw/events/node/edge-2/membership/updated",
        1,
        Duration::from_secs(30),
    );
    site.ok(&["delete", "device", "fan"]);
    let gone = gone.one("edge-2's membership update on delete");
    assert_eq!(gone["removed_devices"][0]["id"], "default/fan", "{gone}");
}

/// The reasons of the events about device `name`, oldest first.
fn device_event_reasons(site: &Site, name: &str) -> Vec<String> {
    let out = site.ok(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name},involvedObject.kind=Device"),
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ]);
    out.lines().map(str::to_string).collect()
}

#[test]
fn the_device_controller_says_what_is_wrong_and_when_it_is_fixed() {
    let site = Site::start().unwrap();
    let device = |name: &str, property: &str| {
        format!(
            "apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  deviceModelRef:\n    name: fan-model\n  nodeName: shed-1\n  properties:\n    - name: {property}\n"
        )
    };
    site.ok_stdin(&["apply", "-f", "-"], Some(&device("fan-1", "speed")));
    site.ok_stdin(&["apply", "-f", "-"], Some(&device("fan-2", "colour")));
    let has = |name: &str, reasons: &[&str]| {
        let seen = device_event_reasons(&site, name);
        reasons.iter().all(|r| seen.iter().any(|s| s == r))
    };
    assert!(
        eventually(Duration::from_secs(20), || has(
            "fan-1",
            &["NodeNotFound", "DeviceModelNotFound"]
        )),
        "{:?}",
        device_event_reasons(&site, "fan-1")
    );
    // The model and the node arrive: each device is judged again.
    site.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata:\n  name: shed-1\n"),
    );
    assert!(
        eventually(Duration::from_secs(20), || has("fan-1", &["Bound"])
            && has("fan-2", &["UnknownProperty"])),
        "{:?} {:?}",
        device_event_reasons(&site, "fan-1"),
        device_event_reasons(&site, "fan-2")
    );
    // Changes that do not change what is wrong say nothing new; a change that does, does.
    let before = device_event_reasons(&site, "fan-1").len();
    for i in 0..10 {
        site.ok(&[
            "annotate",
            "--overwrite",
            "device",
            "fan-1",
            &format!("seen={i}"),
        ]);
    }
    site.ok_stdin(&["apply", "-f", "-"], Some(&device("fan-2", "speed")));
    assert!(
        eventually(Duration::from_secs(20), || has("fan-2", &["Bound"])),
        "{:?}",
        device_event_reasons(&site, "fan-2")
    );
    assert_eq!(
        device_event_reasons(&site, "fan-1").len(),
        before,
        "{:?}",
        device_event_reasons(&site, "fan-1")
    );
}

/// A Device placed from a cloud hub: its model and it go to the site with the node, the
/// mapper's reported value shows at the hub, and a desired value set at the hub reaches the
/// mapper as a delta through the site's twin.
#[test]
fn a_device_placed_from_the_cloud_hub_reports_back_and_takes_desired_values() {
    need("mosquitto_pub", "mosquitto-clients");
    let rt = Runtime::start().unwrap();
    let hub = Site::start_hub(&[]).expect("start the hub");
    let token = hub.hub_token();
    let url = hub.url();
    let site = rt
        .start_site(&[
            "--cloudhub",
            &url,
            "--cloudhub-token",
            &token,
            "--site-name",
            "plant-1",
        ])
        .unwrap();
    let port = &Mqtt::mapper(rt.mqtt_port("node-a"), &site.data_dir());
    hub.ok_stdin(&["apply", "-f", "-"], Some(LEGACY_MODEL));
    hub.ok_stdin(&["apply", "-f", "-"], Some(&legacy_device("node-a")));
    hub.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: policy.karmada.io/v1alpha1
kind: ClusterPropagationPolicy
metadata: {name: devices-to-plant-1}
spec:
  resourceSelectors:
  - {apiVersion: devices.kubeedge.io/v1beta1, kind: DeviceModel}
  - {apiVersion: devices.kubeedge.io/v1beta1, kind: Device}
  placement:
    clusterAffinity: {clusterNames: [plant-1]}
"#,
        ),
    );
    assert!(
        eventually(Duration::from_secs(60), || device(&site, "fan").is_some()),
        "the Device never reached the site\n{}\n{}",
        hub.log(),
        site.log()
    );
    // The mapper reports; the value shows at the site, then at the hub.
    ask(
        port,
        &format!("{FAN}/twin/get"),
        r#"{"event_id":"g1"}"#,
        &format!("{FAN}/twin/get/result"),
        |v| v.get("twin").is_some(),
    );
    mqtt_pub(
        port,
        &format!("{FAN}/twin/update"),
        r#"{"event_id":"r1","timestamp":1690000000000,"twin":{"speed":{"actual":{"value":"2","metadata":{"timestamp":1690000000000}},"metadata":{"type":"int"}}}}"#,
    );
    assert!(
        eventually(Duration::from_secs(30), || twin_value(
            &hub, "fan", "speed", "reported"
        )
        .as_deref()
            == Some("2")),
        "{:?}\n{:?}",
        device(&hub, "fan"),
        device(&site, "fan")
    );
    // A desired value set at the hub reaches the mapper.
    let delta = Sub::start(
        port,
        &format!("{FAN}/twin/update/delta"),
        1,
        Duration::from_secs(30),
    );
    patch_device(
        &hub,
        "fan",
        r#"[{"op":"replace","path":"/spec/properties/0/desired/value","value":"5"}]"#,
    );
    let delta = delta.one("twin/update/delta from the hub");
    assert_eq!(delta["delta"]["speed"], "5");
}
