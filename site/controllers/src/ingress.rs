//! The server's side of the built-in ingress (the nodes serve it, crate `ingress`): installs
//! the IngressClass `edgesite` (default, unless the site's admin changed it), writes the
//! `status.loadBalancer` of the Ingresses it serves (the addresses of the Ready nodes whose
//! agent announces an ingress), and reports what is wrong with them as Events (a path another
//! Ingress holds, a bad host, a backend naming no Service port). Whole-world recompute on any
//! change, like the service load balancer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use ingress::routes::{self, Table};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::informer::Informers;
use crate::servicelb::{address_of, is_ready};

/// The IngressClass installed with the site.
pub fn class() -> IngressClass {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "IngressClass",
        "metadata": {
            "name": routes::CLASS,
            "annotations": {ingress::DEFAULT_CLASS_ANNOTATION: "true"}
        },
        "spec": {"controller": routes::CONTROLLER}
    }))
    .expect("a valid IngressClass")
}

/// The addresses Ingresses are served on: Ready nodes announcing an ingress.
pub fn addresses(nodes: &[Arc<Node>]) -> Vec<String> {
    let set: BTreeSet<String> = nodes
        .iter()
        .filter(|n| {
            n.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(ingress::NODE_ANNOTATION))
        })
        .filter(|n| is_ready(n))
        .filter_map(|n| address_of(n))
        .collect();
    set.into_iter().collect()
}

fn current(ingress: &Ingress) -> Vec<String> {
    ingress
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .collect()
}

pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let nodes = informers.nodes();
    let mut node_changes = nodes.subscribe(256);
    let node_store = nodes.store();
    let nodes_ready = nodes.synced();
    let client = informers.client_for("ingress-controller");
    async move {
        let classes_api: Api<IngressClass> = Api::all(client.clone());
        // Installed once; an admin's later edits (another default) are theirs.
        let mut delay = std::time::Duration::from_secs(1);
        loop {
            match classes_api.get_opt(routes::CLASS).await {
                Ok(Some(_)) => break,
                Ok(None) => match classes_api.create(&PostParams::default(), &class()).await {
                    Ok(_) => {
                        tracing::info!(class = routes::CLASS, "IngressClass installed");
                        break;
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => break,
                    Err(error) => tracing::warn!(%error, "cannot install the IngressClass yet"),
                },
                Err(error) => tracing::warn!(%error, "cannot read the IngressClass yet"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(30));
        }
        let (ingresses, ingress_writer) = reflector::store::<Ingress>();
        let (classes, class_writer) = reflector::store::<IngressClass>();
        let ingress_events = reflector(
            ingress_writer,
            watcher(
                Api::<Ingress>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|_| ());
        let class_events = reflector(
            class_writer,
            watcher(classes_api, watcher::Config::default()),
        )
        .default_backoff()
        .map(|_| ());
        let mut events = futures::stream::select(ingress_events, class_events).boxed();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = nodes_ready => {}
        }
        // What was last reported about each Ingress.
        let mut said: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
        loop {
            let default = ingress::ours_is_default(&classes.state());
            let all = ingresses.state();
            let ours: Vec<&Ingress> = all
                .iter()
                .map(|i| i.as_ref())
                .filter(|i| routes::is_ours(i, default))
                .collect();
            let (_, problems) = Table::build(&ours);
            let mut by_ingress: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
            for p in problems {
                by_ingress
                    .entry((p.namespace, p.name))
                    .or_default()
                    .push((p.reason.to_string(), p.message));
            }
            let wanted = addresses(&node_store.state());
            for ingress in &ours {
                let key = (
                    ingress.metadata.namespace.clone().unwrap_or_default(),
                    ingress.metadata.name.clone().unwrap_or_default(),
                );
                if current(ingress) != wanted {
                    let list: Vec<serde_json::Value> =
                        wanted.iter().map(|ip| json!({"ip": ip})).collect();
                    let patch = json!({"status": {"loadBalancer": {"ingress": if list.is_empty() { serde_json::Value::Null } else { list.into() }}}});
                    let api: Api<Ingress> = Api::namespaced(client.clone(), &key.0);
                    if let Err(error) = api
                        .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        tracing::warn!(ingress = %format!("{}/{}", key.0, key.1), %error, "cannot write the Ingress status");
                    }
                }
                let problems = by_ingress.remove(&key).unwrap_or_default();
                if said.get(&key) != Some(&problems) {
                    for (reason, message) in &problems {
                        recorder.warning(*ingress, reason, message.clone());
                    }
                    said.insert(key, problems);
                }
            }
            said.retain(|key, _| {
                ours.iter().any(|i| {
                    i.metadata.namespace.as_ref() == Some(&key.0)
                        && i.metadata.name.as_ref() == Some(&key.1)
                })
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => if event.is_none() { return },
                change = node_changes.recv() => if change.is_none() { return },
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while node_changes.try_recv().is_ok() {}
            while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_nodes_announcing_an_ingress_serve_it() {
        let node = |name: &str, ip: &str, announced: bool, ready: bool| -> Arc<Node> {
            let annotations = if announced {
                json!({ingress::NODE_ANNOTATION: "http=80,https=443"})
            } else {
                json!({})
            };
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "annotations": annotations},
                    "status": {
                        "addresses": [{"type": "InternalIP", "address": ip}],
                        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
                    }
                }))
                .unwrap(),
            )
        };
        let nodes = [
            node("b", "192.168.1.3", true, true),
            node("a", "192.168.1.2", true, true),
            node("c", "192.168.1.4", false, true),
            node("d", "192.168.1.5", true, false),
        ];
        assert_eq!(addresses(&nodes), ["192.168.1.2", "192.168.1.3"]);
        assert_eq!(
            class().spec.unwrap().controller.unwrap(),
            routes::CONTROLLER
        );
    }
}
