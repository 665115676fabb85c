//! Modbus visitors: how a Device property maps onto Modbus registers or coils (KubeEdge's
//! visitor `configData`: `register`, `offset`, `limit`, `scale`, `isSwap`, `isRegisterSwap`),
//! and the conversion between register words and the twin's string values. Pure; the Modbus TCP
//! client that uses it is [`ModbusDevice`].

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio_modbus::client::{Context, Reader, Writer};

use crate::mapper::{Connection, Device, Driver, Property};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    Coil,
    DiscreteInput,
    Holding,
    Input,
}

/// One property's visitor.
#[derive(Debug, Clone, PartialEq)]
pub struct Visitor {
    pub register: Register,
    pub offset: u16,
    pub limit: u16,
    pub scale: f64,
    /// Swap the two bytes of each register.
    pub swap: bool,
    /// Swap the order of the registers of a multi-register value.
    pub register_swap: bool,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    match v.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn flag(v: &Value, key: &str) -> bool {
    match v.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

impl Visitor {
    pub fn parse(config: &Value) -> Result<Visitor, String> {
        let register = match config.get("register").and_then(Value::as_str).unwrap_or("") {
            "CoilRegister" | "Coil" => Register::Coil,
            "DiscreteInputRegister" | "DiscreteInput" => Register::DiscreteInput,
            "HoldingRegister" | "Holding" => Register::Holding,
            "InputRegister" | "Input" => Register::Input,
            other => {
                return Err(format!(
                    "visitor register {other:?}: use CoilRegister, DiscreteInputRegister, HoldingRegister or InputRegister"
                ));
            }
        };
        let offset = num(config, "offset").unwrap_or(0.0);
        if !(0.0..=65535.0).contains(&offset) {
            return Err(format!("visitor offset {offset} is outside 0..65535"));
        }
        let limit = num(config, "limit").unwrap_or(1.0);
        if !(1.0..=4.0).contains(&limit) {
            return Err(format!(
                "visitor limit {limit}: a property spans 1 to 4 registers"
            ));
        }
        let scale = num(config, "scale").unwrap_or(1.0);
        if scale == 0.0 || !scale.is_finite() {
            return Err("visitor scale must be a non-zero number".into());
        }
        Ok(Visitor {
            register,
            offset: offset as u16,
            limit: limit as u16,
            scale,
            swap: flag(config, "isSwap"),
            register_swap: flag(config, "isRegisterSwap"),
        })
    }

    pub fn writable(&self) -> bool {
        matches!(self.register, Register::Coil | Register::Holding)
    }

    fn order(&self, words: &[u16]) -> Vec<u16> {
        let mut w: Vec<u16> = words
            .iter()
            .map(|x| if self.swap { x.swap_bytes() } else { *x })
            .collect();
        if self.register_swap {
            w.reverse();
        }
        w
    }

    /// Register words (as read) to the twin value, for a property of model type `kind`.
    pub fn decode(&self, words: &[u16], kind: &str) -> String {
        let w = self.order(words);
        let raw: u64 = w.iter().fold(0u64, |acc, x| (acc << 16) | u64::from(*x));
        let kind = kind.to_ascii_uppercase();
        match (kind.as_str(), w.len()) {
            ("FLOAT", 2) | ("DOUBLE", 2) => {
                fmt_float(f64::from(f32::from_bits(raw as u32)) * self.scale)
            }
            ("DOUBLE", 4) | ("FLOAT", 4) => fmt_float(f64::from_bits(raw) * self.scale),
            ("STRING", _) => {
                let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_be_bytes()).collect();
                String::from_utf8_lossy(&bytes)
                    .trim_end_matches('\0')
                    .to_string()
            }
            ("BOOLEAN", _) => (raw != 0).to_string(),
            (k, n) => {
                // Integers are signed, two's complement over the registers read.
                let bits = 16 * n as u32;
                let signed = if bits < 64 && raw >> (bits - 1) & 1 == 1 {
                    raw as i64 - (1i64 << bits)
                } else {
                    raw as i64
                };
                let v = signed as f64 * self.scale;
                if k == "INT" || (v.fract() == 0.0 && self.scale.fract() == 0.0) {
                    format!("{}", v.round() as i64)
                } else {
                    fmt_float(v)
                }
            }
        }
    }

    /// A twin value to the register words to write.
    pub fn encode(&self, value: &str, kind: &str) -> Result<Vec<u16>, String> {
        let kind = kind.to_ascii_uppercase();
        let n = usize::from(self.limit);
        let words: Vec<u16> = match kind.as_str() {
            "BOOLEAN" => {
                let b = parse_bool(value)?;
                let mut w = vec![0u16; n];
                w[n - 1] = u16::from(b);
                w
            }
            "STRING" => {
                let mut bytes = value.as_bytes().to_vec();
                if bytes.len() > 2 * n {
                    return Err(format!("{value:?} does not fit in {n} registers"));
                }
                bytes.resize(2 * n, 0);
                bytes
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect()
            }
            "FLOAT" | "DOUBLE" if n == 2 || n == 4 => {
                let v: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{value:?} is not a number"))?;
                let v = v / self.scale;
                let raw: u64 = if n == 2 {
                    u64::from((v as f32).to_bits())
                } else {
                    v.to_bits()
                };
                (0..n).rev().map(|i| (raw >> (16 * i)) as u16).collect()
            }
            _ => {
                let v: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{value:?} is not a number"))?;
                let raw = (v / self.scale).round();
                let bits = 16 * n as u32;
                let (min, max) = if bits >= 64 {
                    (i64::MIN as f64, i64::MAX as f64)
                } else {
                    (-(1i64 << (bits - 1)) as f64, ((1i64 << bits) - 1) as f64)
                };
                if raw < min || raw > max {
                    return Err(format!("{value} does not fit in {n} registers"));
                }
                let raw = raw as i64 as u64;
                (0..n).rev().map(|i| (raw >> (16 * i)) as u16).collect()
            }
        };
        // `order` is its own inverse.
        Ok(self.order(&words))
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" | "1" | "on" | "ON" | "True" => Ok(true),
        "false" | "0" | "off" | "OFF" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean")),
    }
}

fn fmt_float(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// Where a Modbus TCP device is: the Device's `spec.protocol.configData` (`ip`, `port`,
/// `slaveID`; also accepted nested under `tcp` or `common.tcp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub slave: u8,
}

impl Target {
    pub fn parse(config: &Value) -> Result<Target, String> {
        let tcp = [
            config.clone(),
            config.get("tcp").cloned().unwrap_or_default(),
            config.pointer("/common/tcp").cloned().unwrap_or_default(),
        ]
        .into_iter()
        .find(|c| c.get("ip").is_some())
        .ok_or("protocol configData has no \"ip\" (Modbus TCP: ip, port, slaveID)")?;
        let ip = tcp["ip"].as_str().unwrap_or("");
        let port = num(&tcp, "port").unwrap_or(502.0) as u16;
        let addr = format!("{ip}:{port}")
            .parse::<SocketAddr>()
            .map_err(|_| format!("protocol configData ip {ip:?} is not an IP address"))?;
        let slave = num(config, "slaveID")
            .or_else(|| num(&tcp, "slaveID"))
            .or_else(|| config.get("modbus").and_then(|m| num(m, "slaveID")))
            .unwrap_or(1.0);
        Ok(Target {
            addr,
            slave: slave as u8,
        })
    }
}

/// A connection to one Modbus TCP device, reconnected on demand.
pub struct ModbusDevice {
    target: Target,
    ctx: Option<Context>,
}

const IO_TIMEOUT: Duration = Duration::from_secs(3);

impl ModbusDevice {
    pub fn new(target: Target) -> ModbusDevice {
        ModbusDevice { target, ctx: None }
    }

    async fn ctx(&mut self) -> Result<&mut Context, String> {
        if self.ctx.is_none() {
            let ctx = tokio::time::timeout(
                IO_TIMEOUT,
                tokio_modbus::client::tcp::connect_slave(
                    self.target.addr,
                    tokio_modbus::Slave(self.target.slave),
                ),
            )
            .await
            .map_err(|_| format!("connect to {}: timed out", self.target.addr))?
            .map_err(|e| format!("connect to {}: {e}", self.target.addr))?;
            self.ctx = Some(ctx);
        }
        Ok(self.ctx.as_mut().expect("just set"))
    }

    async fn io<T>(
        &mut self,
        what: &str,
        f: impl AsyncFnOnce(&mut Context) -> Result<T, String>,
    ) -> Result<T, String> {
        let addr = self.target.addr;
        let ctx = self.ctx().await?;
        let result = tokio::time::timeout(IO_TIMEOUT, f(ctx))
            .await
            .unwrap_or_else(|_| Err(format!("{what} on {addr}: timed out")));
        if result.is_err() {
            // A broken or confused connection is dropped; the next call dials again.
            self.ctx = None;
        }
        result
    }

    pub async fn read(&mut self, visitor: &Visitor, kind: &str) -> Result<String, String> {
        let v = visitor.clone();
        let (offset, limit) = (v.offset, v.limit);
        let words: Vec<u16> = match v.register {
            Register::Coil | Register::DiscreteInput => {
                let bits = self
                    .io("read", async |c: &mut Context| {
                        let r = if v.register == Register::Coil {
                            c.read_coils(offset, limit).await
                        } else {
                            c.read_discrete_inputs(offset, limit).await
                        };
                        flatten(r)
                    })
                    .await?;
                bits.into_iter().map(u16::from).collect()
            }
            Register::Holding | Register::Input => {
                self.io("read", async |c: &mut Context| {
                    let r = if v.register == Register::Holding {
                        c.read_holding_registers(offset, limit).await
                    } else {
                        c.read_input_registers(offset, limit).await
                    };
                    flatten(r)
                })
                .await?
            }
        };
        if matches!(v.register, Register::Coil | Register::DiscreteInput) {
            let on = words.first().copied().unwrap_or(0) != 0;
            return Ok(if kind.eq_ignore_ascii_case("BOOLEAN") {
                on.to_string()
            } else {
                u8::from(on).to_string()
            });
        }
        Ok(v.decode(&words, kind))
    }

    pub async fn write(
        &mut self,
        visitor: &Visitor,
        kind: &str,
        value: &str,
    ) -> Result<(), String> {
        let v = visitor.clone();
        match v.register {
            Register::Coil => {
                let on = parse_bool(value)?;
                self.io("write", async |c: &mut Context| {
                    flatten(c.write_single_coil(v.offset, on).await)
                })
                .await
            }
            Register::Holding => {
                let words = v.encode(value, kind)?;
                self.io("write", async |c: &mut Context| {
                    if words.len() == 1 {
                        flatten(c.write_single_register(v.offset, words[0]).await)
                    } else {
                        flatten(c.write_multiple_registers(v.offset, &words).await)
                    }
                })
                .await
            }
            _ => Err("discrete inputs and input registers are read-only".into()),
        }
    }
}

fn flatten<T>(
    r: Result<Result<T, tokio_modbus::ExceptionCode>, tokio_modbus::Error>,
) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(code)) => Err(format!("Modbus exception: {code}")),
        Err(e) => Err(format!("Modbus: {e}")),
    }
}

/// The Modbus TCP [`Driver`]: devices whose `protocolName` is `protocol`.
pub struct ModbusDriver {
    pub protocol: String,
}

/// An open Modbus device and the visitors of its properties.
pub struct Conn {
    device: ModbusDevice,
    visitors: Vec<(String, Result<Visitor, String>)>,
}

#[async_trait::async_trait]
impl Driver for ModbusDriver {
    type Conn = Conn;

    fn protocol(&self) -> &str {
        &self.protocol
    }

    async fn open(&self, device: &Device) -> Result<Conn, String> {
        let target = Target::parse(&device.config)?;
        let visitors = device
            .properties
            .iter()
            .map(|p| {
                let v = Visitor::parse(&p.visitor);
                if let Err(e) = &v {
                    tracing::warn!(device = %device.id, property = %p.name, "{e}");
                }
                (p.name.clone(), v)
            })
            .collect();
        Ok(Conn {
            device: ModbusDevice::new(target),
            visitors,
        })
    }
}

impl Conn {
    fn visitor(&self, p: &Property) -> Result<Visitor, String> {
        self.visitors
            .iter()
            .find(|(n, _)| *n == p.name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| Err(format!("no visitor for {}", p.name)))
    }
}

#[async_trait::async_trait]
impl Connection for Conn {
    async fn read(&mut self, p: &Property) -> Result<String, String> {
        let v = self.visitor(p)?;
        self.device.read(&v, &p.kind).await
    }

    async fn write(&mut self, p: &Property, value: &str) -> Result<(), String> {
        let v = self.visitor(p)?;
        self.device.write(&v, &p.kind, value).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn visitor(config: Value) -> Visitor {
        Visitor::parse(&config).unwrap()
    }

    #[test]
    fn kubeedge_visitor_config_parses() {
        let v = visitor(
            json!({"register": "HoldingRegister", "offset": 2, "limit": 1, "scale": 1, "isSwap": true, "isRegisterSwap": true}),
        );
        assert_eq!(v.register, Register::Holding);
        assert_eq!((v.offset, v.limit), (2, 1));
        assert!(Visitor::parse(&json!({"register": "Nope"})).is_err());
        assert!(Visitor::parse(&json!({"register": "CoilRegister", "limit": 9})).is_err());
    }

    #[test]
    fn integers_round_trip_with_swaps_and_scale() {
        for (swap, rswap) in [(false, false), (true, false), (false, true), (true, true)] {
            let v = visitor(
                json!({"register": "HoldingRegister", "limit": 2, "scale": 0.1, "isSwap": swap, "isRegisterSwap": rswap}),
            );
            let w = v.encode("-1234.5", "FLOAT").unwrap();
            assert_eq!(v.decode(&w, "FLOAT"), "-1234.5");
            let v = visitor(
                json!({"register": "HoldingRegister", "limit": 2, "isSwap": swap, "isRegisterSwap": rswap}),
            );
            let w = v.encode("70000", "INT").unwrap();
            assert_eq!(v.decode(&w, "INT"), "70000");
        }
        let v = visitor(json!({"register": "HoldingRegister"}));
        assert_eq!(v.decode(&[0xffff], "INT"), "-1");
        assert_eq!(v.encode("42", "INT").unwrap(), vec![42]);
        assert!(v.encode("70000", "INT").is_err());
        assert!(v.encode("warm", "INT").is_err());
        let v = visitor(json!({"register": "HoldingRegister", "scale": 10}));
        assert_eq!(v.decode(&[3], "INT"), "30");
        assert_eq!(v.encode("30", "INT").unwrap(), vec![3]);
    }

    #[test]
    fn targets() {
        let t = Target::parse(&json!({"ip": "127.0.0.1", "port": 5020, "slaveID": 3})).unwrap();
        assert_eq!((t.addr.port(), t.slave), (5020, 3));
        let t = Target::parse(
            &json!({"common": {"tcp": {"ip": "10.0.0.2", "port": 502}}, "modbus": {"slaveID": 2}}),
        )
        .unwrap();
        assert_eq!((t.addr.port(), t.slave), (502, 2));
        assert!(Target::parse(&json!({"port": 1})).is_err());
    }
}
