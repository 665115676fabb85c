//! `edgesite-simnodes --kubeconfig K --count N`: registers N simulated nodes on a site and plays
//! their kubelets until interrupted. A test tool: never part of the product binary.

use anyhow::{Context, Result, bail};
use tests::simnodes::{SimConfig, SimNodes};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut kubeconfig = None;
    let mut config = SimConfig::default();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--kubeconfig" => kubeconfig = Some(value()?),
            "--count" => config.count = value()?.parse().context("--count takes a number")?,
            "--prefix" => config.prefix = value()?,
            "--cpu" => config.cpu = value()?,
            "--memory" => config.memory = value()?,
            "--pods" => config.pods = value()?,
            other => bail!(
                "unknown argument {other}; usage: edgesite-simnodes --kubeconfig FILE [--count N] [--prefix P] [--cpu C] [--memory M] [--pods N]"
            ),
        }
    }
    let kubeconfig = kubeconfig.context("--kubeconfig FILE is required")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let kube_config = runtime.block_on(kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    ))?;
    let nodes = SimNodes::start(kube_config, config)?;
    eprintln!(
        "{} simulated nodes running; Ctrl-C stops them",
        nodes.names().len()
    );
    runtime.block_on(tokio::signal::ctrl_c())?;
    nodes.stop();
    Ok(())
}
