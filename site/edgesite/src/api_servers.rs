//! An agent's view of the site's API servers. The agent's API clients go through its load
//! balancer ([`link::balancer::Balancer`]); this module follows the `kubernetes` Service's
//! EndpointSlices (one entry per live server, `apiserver_lite::api_endpoints`), tells the
//! balancer, and keeps the node tunnel to every server, so that logs, exec and port-forward work
//! through whichever server kubectl talks to (K3s's agents do the same).
//!
//! With one server the tunnel goes to the URL the agent was given (`--server`), which is known
//! to reach it even through NAT or a name the server does not advertise; with several, to each
//! server's advertised address (`--advertise-address`, which every agent must reach).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `host:port` of the URL an agent was given (`https://host[:port][/]`; 443 when no port).
pub fn authority(server: &str) -> anyhow::Result<String> {
    let (host, port) = link::dial::host_port(server)?;
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    })
}

/// The servers a set of slices names, as `ip:port`.
fn addresses(slices: &BTreeMap<String, EndpointSlice>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for slice in slices.values() {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("https"))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    out.insert(SocketAddr::new(ip, port).to_string());
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Follows the servers until `shutdown`: the balancer learns them, `tunnels` receives the URLs
/// the node tunnel should reach.
pub async fn follow(
    client: kube::Client,
    balancer: link::balancer::Balancer,
    given: String,
    tunnels: watch::Sender<Vec<String>>,
    shutdown: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, "default");
    let config = watcher::Config::default().labels("kubernetes.io/service-name=kubernetes");
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut initial: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        match event {
            None => return,
            Some(Err(e)) => {
                tracing::debug!("the kubernetes Service's endpoints: {e}");
                continue;
            }
            Some(Ok(watcher::Event::Init)) => {
                initial.clear();
                continue;
            }
            Some(Ok(watcher::Event::InitApply(s))) => {
                initial.insert(name(&s), s);
                continue;
            }
            Some(Ok(watcher::Event::InitDone)) => slices = std::mem::take(&mut initial),
            Some(Ok(watcher::Event::Apply(s))) => {
                slices.insert(name(&s), s);
            }
            Some(Ok(watcher::Event::Delete(s))) => {
                slices.remove(&name(&s));
            }
        }
        let servers = addresses(&slices);
        balancer.set_servers(servers.clone());
        let urls = if servers.len() > 1 {
            servers.iter().map(|s| format!("https://{s}")).collect()
        } else {
            vec![given.clone()]
        };
        tunnels.send_if_modified(|current| {
            if *current == urls {
                return false;
            }
            *current = urls;
            true
        });
    }
}

/// Keeps one node tunnel up to each URL `urls` names, until `shutdown`.
pub async fn tunnels(
    base: edged::streaming::tunnel::TunnelConfig,
    router: axum::Router,
    mut urls: watch::Receiver<Vec<String>>,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let wanted = urls.borrow_and_update().clone();
        running.retain(|url, stop| {
            let keep = wanted.contains(url);
            if !keep {
                tracing::info!(server = %url, "node tunnel: server gone");
                stop.cancel();
            }
            keep
        });
        for url in wanted {
            if running.contains_key(&url) {
                continue;
            }
            let stop = shutdown.child_token();
            let config = edged::streaming::tunnel::TunnelConfig {
                server: url.clone(),
                ..base.clone()
            };
            tokio::spawn(edged::streaming::tunnel::run(
                config,
                router.clone(),
                stop.clone(),
            ));
            running.insert(url, stop);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = urls.changed() => if changed.is_err() {
                // The follower stopped: keep the tunnels as they are.
                shutdown.cancelled().await;
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_of_the_given_url() {
        assert_eq!(authority("https://10.0.0.1:6443").unwrap(), "10.0.0.1:6443");
        assert_eq!(
            authority("https://site.example/").unwrap(),
            "site.example:443"
        );
        assert_eq!(
            authority("https://[fd00::1]:6443").unwrap(),
            "[fd00::1]:6443"
        );
        assert!(authority("not a url").is_err());
    }

    #[test]
    fn servers_of_the_slices() {
        let slice = |name: &str, port: i32, ips: &[&str], ready: Option<bool>| {
            let v = serde_json::json!({
                "metadata": {"name": name},
                "addressType": "IPv4",
                "endpoints": ips.iter().map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": ready}})).collect::<Vec<_>>(),
                "ports": [{"name": "https", "port": port}]
            });
            (name.to_string(), serde_json::from_value(v).unwrap())
        };
        let slices = BTreeMap::from([
            slice("kubernetes", 6443, &["10.0.0.2", "10.0.0.1"], Some(true)),
            slice("kubernetes-7000", 7000, &["127.0.0.1"], None),
            slice("kubernetes-7001", 7001, &["127.0.0.1"], Some(false)),
        ]);
        assert_eq!(
            addresses(&slices),
            ["10.0.0.1:6443", "10.0.0.2:6443", "127.0.0.1:7000"]
        );
    }
}
