//! The server's side of the built-in ingress (the nodes serve it, crate `ingress`): installs
//! the IngressClass `edgesite` (default, unless the site's admin changed it), writes the
//! `status.loadBalancer` of the Ingresses it serves (the addresses of the Ready nodes whose
//! agent announces an ingress), and reports what is wrong with them as Events (a path another
//! Ingress holds, a bad host, a backend naming no Service port). Whole-world recompute on any
//! change, like the service load balancer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use ingress::routes;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, Patch, PatchParams, PostParams};
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

/// The GatewayClass installed with the site.
pub fn gateway_class() -> serde_json::Value {
    json!({
        "apiVersion": format!("{}/v1", ingress::gateway::GROUP),
        "kind": "GatewayClass",
        "metadata": {"name": ingress::gateway::CLASS},
        "spec": {
            "controllerName": ingress::gateway::CONTROLLER,
            "description": "Served by every node's built-in ingress"
        }
    })
}

/// `conditions` as the API writes them, keeping `lastTransitionTime` where a condition's
/// status did not change.
fn conditions_json(
    wanted: &[ingress::gateway::Condition],
    current: Option<&serde_json::Value>,
    generation: i64,
    now: &str,
) -> serde_json::Value {
    let current = current
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    wanted
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = current
                .iter()
                .find(|old| old["type"] == c.type_ && old["status"] == status)
                .and_then(|old| old["lastTransitionTime"].as_str())
                .unwrap_or(now)
                .to_string();
            json!({
                "type": c.type_,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            })
        })
        .collect::<Vec<_>>()
        .into()
}

/// Patches `status` onto a Gateway API object when it differs from what is there.
async fn write_status(
    client: &kube::Client,
    resource: &kube::api::ApiResource,
    object: &kube::api::DynamicObject,
    status: serde_json::Value,
) {
    if object.data.get("status") == Some(&status) {
        return;
    }
    let name = object.metadata.name.clone().unwrap_or_default();
    let api: Api<kube::api::DynamicObject> = match &object.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    let patch = json!({ "status": status });
    if let Err(error) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(kind = %resource.kind, %name, %error, "cannot write the status");
    }
}

/// Creates `object` unless it exists (the admin's edits are theirs).
async fn install_once(
    api: &Api<kube::api::DynamicObject>,
    object: serde_json::Value,
    shutdown: &CancellationToken,
) {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let Ok(object) = serde_json::from_value::<kube::api::DynamicObject>(object) else {
        return;
    };
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(30),
    );
    loop {
        match api.get_opt(&name).await {
            Ok(Some(_)) => return,
            Ok(None) => match api.create(&PostParams::default(), &object).await {
                Ok(_) => {
                    tracing::info!(%name, "installed");
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => return,
                Err(error) => tracing::warn!(%name, %error, "cannot install yet"),
            },
            Err(error) => tracing::warn!(%name, %error, "cannot read yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_wait()) => {}
        }
    }
}

pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let nodes = informers.nodes();
    let mut node_changes = nodes.subscribe(256);
    let node_store = nodes.store();
    let services = informers.services();
    let mut service_changes = services.subscribe(256);
    let service_store = services.store();
    let ready = futures::future::join(nodes.synced(), services.synced());
    let client = informers.client_for("ingress-controller");
    async move {
        let ingress_class = serde_json::to_value(class()).expect("an IngressClass serializes");
        let classes_api: Api<kube::api::DynamicObject> = Api::all_with(
            client.clone(),
            &kube::api::ApiResource::erase::<IngressClass>(&()),
        );
        install_once(&classes_api, ingress_class, &shutdown).await;
        let gateway_classes: Api<kube::api::DynamicObject> =
            Api::all_with(client.clone(), &ingress::gateway_class_resource());
        install_once(&gateway_classes, gateway_class(), &shutdown).await;
        let (sources, mut events) = ingress::Sources::start(&client);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        // What was last reported about each Ingress.
        let mut said: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
        loop {
            let services = service_store.state();
            let exists = |ns: &str, name: &str| {
                services.iter().any(|s| {
                    s.metadata.namespace.as_deref() == Some(ns)
                        && s.metadata.name.as_deref() == Some(name)
                })
            };
            // Statuses do not depend on the nodes' ports; the defaults stand for them.
            let built = sources.build(
                ingress::gateway::Ports {
                    http: 80,
                    https: 443,
                },
                &exists,
            );
            let mut by_ingress: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
            for p in built.problems {
                by_ingress
                    .entry((p.namespace, p.name))
                    .or_default()
                    .push((p.reason.to_string(), p.message));
            }
            let wanted = addresses(&node_store.state());
            for ingress in &built.ingresses {
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
                        recorder.warning(ingress.as_ref(), reason, message.clone());
                    }
                    said.insert(key, problems);
                }
            }
            said.retain(|key, _| {
                built.ingresses.iter().any(|i| {
                    i.metadata.namespace.as_ref() == Some(&key.0)
                        && i.metadata.name.as_ref() == Some(&key.1)
                })
            });
            gateway_statuses(&client, &sources, &built.statuses, &wanted).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => if event.is_none() { return },
                change = node_changes.recv() => if change.is_none() { return },
                change = service_changes.recv() => if change.is_none() { return },
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while node_changes.try_recv().is_ok() {}
            while service_changes.try_recv().is_ok() {}
            while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
        }
    }
}

/// Writes the Gateways' and HTTPRoutes' statuses (and the site's GatewayClass's).
async fn gateway_statuses(
    client: &kube::Client,
    sources: &ingress::Sources,
    statuses: &ingress::gateway::Statuses,
    addresses: &[String],
) {
    use ingress::gateway::{CONTROLLER, GROUP};
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let classes: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &ingress::gateway_class_resource());
    if let Ok(Some(class)) = classes.get_opt(ingress::gateway::CLASS).await
        && class.data["spec"]["controllerName"] == CONTROLLER
    {
        let generation = class.metadata.generation.unwrap_or(0);
        let accepted = [ingress::gateway::Condition {
            type_: "Accepted",
            status: true,
            reason: "Accepted",
            message: "Served by every node's built-in ingress".into(),
        }];
        let status = json!({
            "conditions": conditions_json(&accepted, class.data["status"].get("conditions"), generation, &now)
        });
        write_status(client, &ingress::gateway_class_resource(), &class, status).await;
    }
    for gateway in sources.gateways() {
        let key = (
            gateway.metadata.namespace.clone().unwrap_or_default(),
            gateway.metadata.name.clone().unwrap_or_default(),
        );
        let Some(wanted) = statuses.gateways.get(&key) else {
            continue;
        };
        let generation = gateway.metadata.generation.unwrap_or(0);
        let current = &gateway.data["status"];
        let listeners: Vec<serde_json::Value> = wanted
            .listeners
            .iter()
            .map(|l| {
                let old = current["listeners"]
                    .as_array()
                    .and_then(|all| all.iter().find(|o| o["name"] == l.name.as_str()))
                    .and_then(|o| o.get("conditions"));
                json!({
                    "name": l.name,
                    "attachedRoutes": l.attached_routes,
                    "supportedKinds": [{"group": GROUP, "kind": "HTTPRoute"}],
                    "conditions": conditions_json(&l.conditions, old, generation, &now),
                })
            })
            .collect();
        // No node serving the ingress: nothing carries the Gateway's traffic yet.
        let mut gateway_conditions = wanted.conditions.clone();
        if addresses.is_empty() {
            for c in gateway_conditions
                .iter_mut()
                .filter(|c| c.type_ == "Programmed")
            {
                c.status = false;
                c.reason = "AddressNotAssigned";
                c.message = "no Ready node serves the site's ingress".into();
            }
        }
        let status = json!({
            "addresses": addresses.iter().map(|a| json!({"type": "IPAddress", "value": a})).collect::<Vec<_>>(),
            "conditions": conditions_json(&gateway_conditions, current.get("conditions"), generation, &now),
            "listeners": listeners,
        });
        write_status(client, &ingress::gateway_resource(), &gateway, status).await;
    }
    for route in sources.http_routes() {
        let key = (
            route.metadata.namespace.clone().unwrap_or_default(),
            route.metadata.name.clone().unwrap_or_default(),
        );
        let Some(parents) = statuses.routes.get(&key) else {
            continue;
        };
        let generation = route.metadata.generation.unwrap_or(0);
        let current = route.data["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // Other controllers' entries stay.
        let mut all: Vec<serde_json::Value> = current
            .iter()
            .filter(|p| p["controllerName"] != CONTROLLER)
            .cloned()
            .collect();
        for parent in parents {
            let mut parent_ref =
                json!({"group": GROUP, "kind": "Gateway", "name": parent.parent.name});
            if let Some(ns) = &parent.parent.namespace {
                parent_ref["namespace"] = ns.clone().into();
            }
            if let Some(section) = &parent.parent.section_name {
                parent_ref["sectionName"] = section.clone().into();
            }
            if let Some(port) = parent.parent.port {
                parent_ref["port"] = port.into();
            }
            let old = current
                .iter()
                .find(|p| {
                    p["controllerName"] == CONTROLLER
                        && p["parentRef"]["name"] == parent.parent.name.as_str()
                })
                .and_then(|p| p.get("conditions"));
            all.push(json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER,
                "conditions": conditions_json(&parent.conditions, old, generation, &now),
            }));
        }
        write_status(
            client,
            &ingress::http_route_resource(),
            &route,
            json!({"parents": all}),
        )
        .await;
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
