//! The mapper SDK and the Modbus driver on their own: a Modbus TCP server (tokio-modbus's), the
//! embedded broker, a twin serving a Modbus device from its file, and the mapper between them.
//! The mapper reports the register; an expected value set on the twin reaches the register.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::devicetwin;
use devices::eventbus::{self, BrokerConfig, Endpoint};
use devices::mapper;
use devices::modbus::ModbusDriver;
use devices::store::{DeviceRecord, Store};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{Value, json};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone, Default)]
struct Registers(Arc<Mutex<HashMap<u16, u16>>>);

impl tokio_modbus::server::Service for Registers {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let mut regs = self.0.lock().unwrap();
        ready(match req {
            Request::ReadHoldingRegisters(addr, n) => Ok(Response::ReadHoldingRegisters(
                (addr..addr + n)
                    .map(|a| regs.get(&a).copied().unwrap_or(0))
                    .collect(),
            )),
            Request::WriteSingleRegister(addr, v) => {
                regs.insert(addr, v);
                Ok(Response::WriteSingleRegister(addr, v))
            }
            Request::WriteMultipleRegisters(addr, vs) => {
                for (i, v) in vs.iter().enumerate() {
                    regs.insert(addr + i as u16, *v);
                }
                Ok(Response::WriteMultipleRegisters(addr, vs.len() as u16))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

async fn modbus_server(registers: Registers) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio_modbus::server::tcp::Server::new(listener);
    tokio::spawn(async move {
        let on_connected = |stream, addr| {
            let registers = registers.clone();
            async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, addr, |_| {
                    Ok(Some(registers.clone()))
                })
            }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    port
}

/// The twin of `default/meter` as `twin/get` shows it.
async fn twin_get(endpoint: &Endpoint) -> Value {
    let (client, mut events) = AsyncClient::new(endpoint.options("probe"), 8);
    let topic = "$hw/events/device/default/meter/twin/get";
    let result = format!("{topic}/result");
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await.unwrap() {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client.subscribe(&result, QoS::AtLeastOnce).await.unwrap();
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, "{}")
                        .await
                        .unwrap();
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == result => {
                    return serde_json::from_slice::<Value>(&p.payload).unwrap();
                }
                _ => {}
            }
        }
    })
    .await
    .expect("twin/get answered");
    let _ = client.disconnect().await;
    answer
}

async fn eventually(mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_modbus_mapper_reads_and_writes_registers() {
    let registers = Registers::default();
    registers.0.lock().unwrap().insert(7, 1234);
    let modbus_port = modbus_server(registers.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("devices.db");
    Store::open(&db)
        .unwrap()
        .put_device(&DeviceRecord {
            namespace: "default".into(),
            name: "meter".into(),
            generation: 1,
            spec: json!({
                "deviceModelRef": {"name": "meter-model"}, "nodeName": "n1",
                "protocol": {"protocolName": "modbus", "configData": {"ip": "127.0.0.1", "port": modbus_port, "slaveID": 1}},
                "properties": [{"name": "power", "collectCycle": 100, "reportCycle": 100,
                    "visitors": {"protocolName": "modbus", "configData": {"register": "HoldingRegister", "offset": 7, "limit": 1, "scale": 0.1}}}]
            }),
            ..Default::default()
        })
        .unwrap();
    let broker_port = free_port();
    let broker = eventbus::start(&BrokerConfig::loopback(broker_port)).unwrap();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
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
    rx.await.unwrap();
    let endpoint = Endpoint::plain(SocketAddr::from(([127, 0, 0, 1], broker_port)));
    tokio::spawn(mapper::run(
        mapper::Config {
            broker: endpoint.clone(),
            node: "n1".into(),
            client_id: "mapper".into(),
        },
        ModbusDriver {
            protocol: "modbus".into(),
        },
        stop.clone(),
    ));

    // 1234 x 0.1
    assert!(
        eventually(
            async || twin_get(&endpoint).await["twin"]["power"]["actual"]["value"] == "123.4"
        )
        .await,
        "{}",
        twin_get(&endpoint).await
    );

    // An app on the node wants 50.0: the mapper writes 500 to the register.
    let (app, mut events) = AsyncClient::new(endpoint.options("app"), 8);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    app.publish(
        "$hw/events/device/default/meter/twin/update",
        QoS::AtLeastOnce,
        false,
        r#"{"twin":{"power":{"expected":{"value":"50"}}}}"#,
    )
    .await
    .unwrap();
    assert!(
        eventually(async || registers.0.lock().unwrap().get(&7) == Some(&500)).await,
        "register 7 never became 500: {:?}",
        registers.0.lock().unwrap()
    );
    assert!(
        eventually(async || twin_get(&endpoint).await["twin"]["power"]["actual"]["value"] == "50")
            .await
    );
}
