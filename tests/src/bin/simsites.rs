//! `edgesite-simsites --hub https://HUB:5443 --hub-data-dir DIR --count N`: attaches N simulated
//! sites to a cloud hub (each speaking the real site side of the link over its own connection,
//! certificates signed with the hub's CA from its data dir) until interrupted. A test tool: never
//! part of the product binary.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use tests::simsites::SimSites;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut hub, mut data, mut count, mut prefix) = (None, None, 10usize, "sim-".to_string());
    let mut labels = BTreeMap::new();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--hub" => hub = Some(value()?),
            "--hub-data-dir" => data = Some(std::path::PathBuf::from(value()?)),
            "--count" => count = value()?.parse().context("--count takes a number")?,
            "--prefix" => prefix = value()?,
            "--label" => {
                let v = value()?;
                let (k, v) = v.split_once('=').context("--label takes KEY=VALUE")?;
                labels.insert(k.to_string(), v.to_string());
            }
            other => bail!(
                "unknown argument {other}; usage: edgesite-simsites --hub URL --hub-data-dir DIR [--count N] [--prefix P] [--label K=V]"
            ),
        }
    }
    let hub = hub.context("--hub URL is required")?;
    let data = data.context("--hub-data-dir DIR is required (the hub's CA signs the sites)")?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let sites = SimSites::start(&hub, &data, count, &prefix, &labels)?;
        eprintln!(
            "{} simulated sites attaching to {hub}; Ctrl-C stops them",
            sites.sites.len()
        );
        tokio::signal::ctrl_c().await?;
        drop(sites);
        Ok(())
    })
}
