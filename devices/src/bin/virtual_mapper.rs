//! `edgesite-mapper-virtual`: simulated devices for demos and benchmarks (protocol `virtual`).
//! Each property holds the last value written to it; a property whose visitor `configData` has
//! `follows: OTHER` moves towards OTHER's value by `rate` (default 0.5) per collect, like a room
//! warming to its thermostat's target; `noise` adds that much random jitter to a reading.
//!
//!     edgesite-mapper-virtual --node NODE [--broker mqtt://127.0.0.1:1883]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use clap::Parser;
use devices::mapper::{self, Connection, Device, Driver, Property};
use rand::Rng;
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    name = "edgesite-mapper-virtual",
    version,
    about = "EdgeSite virtual device mapper"
)]
struct Args {
    #[command(flatten)]
    mapper: mapper::MapperArgs,
    #[arg(long, default_value = "virtual")]
    protocol: String,
}

struct Virtual {
    protocol: String,
}

struct Sim {
    values: Arc<Mutex<BTreeMap<String, f64>>>,
    text: BTreeMap<String, String>,
}

#[async_trait::async_trait]
impl Driver for Virtual {
    type Conn = Sim;

    fn protocol(&self) -> &str {
        &self.protocol
    }

    async fn open(&self, device: &Device) -> Result<Sim, String> {
        let mut values = BTreeMap::new();
        for p in &device.properties {
            let initial = p.visitor.get("initial").and_then(|v| match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            });
            values.insert(p.name.clone(), initial.unwrap_or(0.0));
        }
        Ok(Sim {
            values: Arc::new(Mutex::new(values)),
            text: BTreeMap::new(),
        })
    }
}

fn render(kind: &str, v: f64) -> String {
    match kind {
        "INT" => format!("{}", v.round() as i64),
        "BOOLEAN" => (v != 0.0).to_string(),
        _ => format!("{:.2}", v),
    }
}

#[async_trait::async_trait]
impl Connection for Sim {
    async fn read(&mut self, p: &Property) -> Result<String, String> {
        if let Some(t) = self.text.get(&p.name) {
            return Ok(t.clone());
        }
        let mut values = self.values.lock().map_err(|e| e.to_string())?;
        let mut v = values.get(&p.name).copied().unwrap_or(0.0);
        if let Some(target) = p.visitor.get("follows").and_then(Value::as_str)
            && let Some(t) = values.get(target).copied()
        {
            let rate = p.visitor.get("rate").and_then(Value::as_f64).unwrap_or(0.5);
            v += (t - v) * rate.clamp(0.0, 1.0);
        }
        values.insert(p.name.clone(), v);
        let noise = p
            .visitor
            .get("noise")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        if noise > 0.0 {
            v += rand::rng().random_range(-noise..=noise);
        }
        Ok(render(&p.kind, v))
    }

    async fn write(&mut self, p: &Property, value: &str) -> Result<(), String> {
        let parsed = match (p.kind.as_str(), value) {
            ("BOOLEAN", "true") => Some(1.0),
            ("BOOLEAN", "false") => Some(0.0),
            _ => value.trim().parse::<f64>().ok(),
        };
        match parsed {
            Some(v) => {
                self.text.remove(&p.name);
                self.values
                    .lock()
                    .map_err(|e| e.to_string())?
                    .insert(p.name.clone(), v);
            }
            None if p.kind == "STRING" => {
                self.text.insert(p.name.clone(), value.to_string());
            }
            None => return Err(format!("{value:?} is not a {}", p.kind)),
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mapper::main_with(
        "edgesite-mapper-virtual",
        &args.mapper,
        Virtual {
            protocol: args.protocol.clone(),
        },
    )
}
