//! `edgesite-mapper-modbus`: serves the node's devices whose protocol is `modbus` over Modbus
//! TCP. Run it as a process on the node or as a pod (host network, `NODE_NAME` from the
//! downward API):
//!
//!     edgesite-mapper-modbus --node NODE [--broker mqtt://127.0.0.1:1883]

use clap::Parser;
use devices::mapper;
use devices::modbus::ModbusDriver;

#[derive(Parser, Debug)]
#[command(
    name = "edgesite-mapper-modbus",
    version,
    about = "EdgeSite Modbus TCP mapper"
)]
struct Args {
    #[command(flatten)]
    mapper: mapper::MapperArgs,
    /// The protocolName of the devices to serve.
    #[arg(long, default_value = "modbus")]
    protocol: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mapper::main_with(
        "edgesite-mapper-modbus",
        &args.mapper,
        ModbusDriver {
            protocol: args.protocol.clone(),
        },
    )
}
