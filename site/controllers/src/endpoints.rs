//! Endpoints and EndpointSlices for Services with a selector: the pods the selector picks,
//! with an IP, as ready or not-ready addresses, on each Service port (named target ports are
//! resolved per pod). Services without a selector keep the endpoints their users write.
//!
//! One loop writes both the `Endpoints` object (what `kubectl describe svc` and older clients
//! read) and the `EndpointSlice`s (what proxies read; at most 100 endpoints each, owned by the
//! Service so the garbage collector removes them with it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use crate::informer::{Change, Informers};
use crate::pods;
use crate::runner::{self, Loop};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const MAX_PER_SLICE: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("write endpoints: {0}")]
    Endpoints(#[source] kube::Error),
    #[error("write endpoint slices: {0}")]
    Slices(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    slices: Store<EndpointSlice>,
    endpoints: Store<Endpoints>,
}

fn selector(svc: &Service) -> Option<Selector> {
    let map = svc
        .spec
        .as_ref()?
        .selector
        .clone()
        .filter(|s| !s.is_empty())?;
    Some(map.into_iter().collect())
}

/// The port a Service port reaches on `pod`: a number, or a named container port.
fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<i32> {
    match port.target_port.as_ref() {
        None => Some(port.port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find_map(|p| {
                (p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().unwrap_or("TCP")
                        == port.protocol.as_deref().unwrap_or("TCP"))
                .then_some(p.container_port)
            }),
    }
}

/// One pod as seen by a Service.
/// The (name, port, protocol) triples a pod serves for a Service.
type PortSet = Vec<(Option<String>, i32, String)>;

pub struct Member<'a> {
    pub pod: &'a Pod,
    pub ip: String,
    pub ready: bool,
    pub terminating: bool,
    /// (name, port, protocol) for each Service port this pod serves.
    pub ports: PortSet,
}

/// The pods behind `svc`, with their resolved ports.
pub fn members<'a>(svc: &Service, pods: &'a [Arc<Pod>]) -> Vec<Member<'a>> {
    let Some(selector) = selector(svc) else {
        return Vec::new();
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut out = Vec::new();
    for pod in pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if pod.metadata.namespace != svc.metadata.namespace
            || !selector.matches(&labels)
            || pods::is_terminal(pod)
        {
            continue;
        }
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty())
        else {
            continue;
        };
        let terminating = pod.metadata.deletion_timestamp.is_some();
        if terminating && !publish_not_ready {
            continue;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone(),
                    target_port(p, pod)?,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ))
            })
            .collect::<Vec<_>>();
        let service_has_ports = spec.ports.as_ref().is_some_and(|p| !p.is_empty());
        if service_has_ports && ports.is_empty() {
            // None of the Service's ports exists on this pod.
            continue;
        }
        out.push(Member {
            pod,
            ip,
            ready: publish_not_ready || (pods::is_ready(pod) && !terminating),
            terminating,
            ports,
        });
    }
    out.sort_by(|a, b| a.ip.cmp(&b.ip));
    out
}

fn pod_reference(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

fn hostname(svc: &Service, pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    (spec.subdomain.as_deref() == svc.metadata.name.as_deref())
        .then(|| spec.hostname.clone())
        .flatten()
}

/// The `Endpoints` subsets: pods grouped by the ports they serve (upstream's repacking).
pub fn subsets(svc: &Service, members: &[Member]) -> Vec<EndpointSubset> {
    let headless_without_ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_none_or(|p| p.is_empty());
    let mut groups: BTreeMap<PortSet, EndpointSubset> = BTreeMap::new();
    for m in members {
        if m.ports.is_empty() && !headless_without_ports {
            continue;
        }
        let subset = groups
            .entry(m.ports.clone())
            .or_insert_with(|| EndpointSubset {
                ports: (!m.ports.is_empty()).then(|| {
                    m.ports
                        .iter()
                        .map(|(name, port, protocol)| EndpointPort {
                            name: name.clone(),
                            port: *port,
                            protocol: Some(protocol.clone()),
                            app_protocol: None,
                        })
                        .collect()
                }),
                ..Default::default()
            });
        let address = EndpointAddress {
            ip: m.ip.clone(),
            hostname: hostname(svc, m.pod),
            node_name: m.pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(pod_reference(m.pod)),
        };
        let list = if m.ready {
            &mut subset.addresses
        } else {
            &mut subset.not_ready_addresses
        };
        list.get_or_insert_with(Vec::new).push(address);
    }
    groups.into_values().collect()
}

/// The slices' contents: (ports, endpoints) chunks of at most 100 endpoints.
pub fn slice_contents(svc: &Service, members: &[Member]) -> Vec<(Vec<SlicePort>, Vec<Endpoint>)> {
    let mut groups: BTreeMap<PortSet, Vec<Endpoint>> = BTreeMap::new();
    for m in members {
        groups.entry(m.ports.clone()).or_default().push(Endpoint {
            addresses: vec![m.ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(m.ready),
                serving: Some(m.ready || m.terminating && pods::is_ready(m.pod)),
                terminating: Some(m.terminating),
            }),
            hostname: hostname(svc, m.pod),
            node_name: m.pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(pod_reference(m.pod)),
            ..Default::default()
        });
    }
    let mut out = Vec::new();
    for (ports, endpoints) in groups {
        let ports: Vec<SlicePort> = ports
            .into_iter()
            .map(|(name, port, protocol)| SlicePort {
                name,
                port: Some(port),
                protocol: Some(protocol),
                app_protocol: None,
            })
            .collect();
        for chunk in endpoints.chunks(MAX_PER_SLICE) {
            out.push((ports.clone(), chunk.to_vec()));
        }
    }
    out
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let services = informers.services();
    let pod_informer = informers.pods();
    let slices = informers.endpoint_slices();
    let endpoints = informers.endpoints();
    let context = Arc::new(Context {
        client: informers.client_for("endpoint-controller"),
        pods: pod_informer.store(),
        slices: slices.store(),
        endpoints: endpoints.store(),
    });
    let svc_store = services.store();
    let own = runner::own_changes(services.subscribe(256));
    // A pod change concerns every Service of its namespace: its labels may have entered or
    // left a selector.
    let pod_triggers = {
        let svc_store = svc_store.clone();
        runner::triggers(pod_informer.subscribe(1024), move |c: &Change<Pod>| {
            let ns = c.object().metadata.namespace.clone();
            svc_store
                .state_filter(|s| s.metadata.namespace == ns && selector(s).is_some())
                .iter()
                .map(|s| ObjectRef::from_obj(&**s))
                .collect()
        })
    };
    // Endpoints of a deleted Service go with it (slices are owned and collected).
    let mut deleted = services.subscribe(256);
    let client = informers.client_for("endpoint-controller");
    let cleanup = async move {
        while let Some(change) = deleted.recv().await {
            let Change::Deleted(svc) = change else {
                continue;
            };
            if selector(&svc).is_none() {
                continue;
            }
            let api: Api<Endpoints> = Api::namespaced(
                client.clone(),
                svc.metadata.namespace.as_deref().unwrap_or(""),
            );
            let _ = api
                .delete(
                    svc.metadata.name.as_deref().unwrap_or(""),
                    &DeleteParams::default(),
                )
                .await;
        }
    };
    let ready = futures::future::join4(
        services.synced(),
        pod_informer.synced(),
        slices.synced(),
        endpoints.synced(),
    );
    let main = runner::run(
        Loop {
            name: "endpoints",
            concurrency: 4,
        },
        svc_store,
        ready,
        vec![own, pod_triggers],
        reconcile,
        context,
        shutdown.clone(),
    );
    async move {
        tokio::select! {
            _ = main => {}
            _ = cleanup => {}
        }
    }
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    if selector(&svc).is_none() || svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let pods = ctx
        .pods
        .state_filter(|p| p.metadata.namespace.as_deref() == Some(&namespace));
    let members = members(&svc, &pods);
    write_endpoints(&ctx, &svc, &namespace, &name, subsets(&svc, &members)).await?;
    write_slices(
        &ctx,
        &svc,
        &namespace,
        &name,
        slice_contents(&svc, &members),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

fn service_labels(svc: &Service) -> BTreeMap<String, String> {
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert("service.kubernetes.io/headless".into(), String::new());
    }
    labels
}

async fn write_endpoints(
    ctx: &Context,
    svc: &Service,
    namespace: &str,
    name: &str,
    subsets: Vec<EndpointSubset>,
) -> Result<(), Error> {
    let labels = service_labels(svc);
    let current = ctx.endpoints.get(&ObjectRef::new(name).within(namespace));
    let subsets = (!subsets.is_empty()).then_some(subsets);
    if let Some(current) = current.as_ref()
        && current.subsets == subsets
        && current.metadata.labels.clone().unwrap_or_default() == labels
    {
        return Ok(());
    }
    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), namespace);
    let mut object = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            ..Default::default()
        },
        subsets,
    };
    let result = match current {
        Some(current) => {
            object.metadata.resource_version = current.metadata.resource_version.clone();
            object.metadata.annotations = current.metadata.annotations.clone();
            api.replace(name, &PostParams::default(), &object).await
        }
        None => api.create(&PostParams::default(), &object).await,
    };
    match result {
        Ok(_) => Ok(()),
        // The cache was behind: the next event brings us back.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(Error::Endpoints(e)),
    }
}

async fn write_slices(
    ctx: &Context,
    svc: &Service,
    namespace: &str,
    name: &str,
    wanted: Vec<(Vec<SlicePort>, Vec<Endpoint>)>,
) -> Result<(), Error> {
    let mut existing: Vec<Arc<EndpointSlice>> = ctx.slices.state_filter(|s| {
        s.metadata.namespace.as_deref() == Some(namespace)
            && s.metadata.labels.as_ref().is_some_and(|l| {
                l.get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
                    && l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
            })
    });
    existing.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), namespace);
    let mut labels = service_labels(svc);
    labels.insert(SERVICE_NAME_LABEL.into(), name.into());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let owner = pods::controller_reference(svc);
    // A Service with no endpoints still has one (empty) slice, as upstream keeps.
    let wanted = if wanted.is_empty() {
        vec![(Vec::new(), Vec::new())]
    } else {
        wanted
    };
    for (i, (ports, endpoints)) in wanted.iter().enumerate() {
        let mut slice = EndpointSlice {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}-")),
                namespace: Some(namespace.into()),
                labels: Some(labels.clone()),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: endpoints.clone(),
            ports: (!ports.is_empty()).then(|| ports.clone()),
        };
        let result = match existing.get(i) {
            Some(current) => {
                if current.endpoints == slice.endpoints
                    && current.ports == slice.ports
                    && current.metadata.labels.as_ref() == Some(&labels)
                {
                    continue;
                }
                slice.metadata.name = current.metadata.name.clone();
                slice.metadata.generate_name = current.metadata.generate_name.clone();
                slice.metadata.resource_version = current.metadata.resource_version.clone();
                api.replace(
                    current.metadata.name.as_deref().unwrap_or(""),
                    &PostParams::default(),
                    &slice,
                )
                .await
            }
            None => api.create(&PostParams::default(), &slice).await,
        };
        match result {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(Error::Slices(e)),
        }
    }
    for extra in existing.iter().skip(wanted.len()) {
        match api
            .delete(
                extra.metadata.name.as_deref().unwrap_or(""),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Slices(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, port_name: &str, port: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}, "uid": name},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": port_name, "containerPort": port}]}]},
                "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .unwrap(),
        )
    }

    fn service(target: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": target}]}
        }))
        .unwrap()
    }

    #[test]
    fn ready_and_not_ready_pods_with_named_ports() {
        let pods = vec![
            pod("a", "10.0.0.2", true, "http", 8080),
            pod("b", "10.0.0.1", false, "http", 8080),
            pod("c", "10.0.0.3", true, "web", 9090),
        ];
        let svc = service(json!("http"));
        let m = members(&svc, &pods);
        assert_eq!(m.len(), 2, "pod c has no port named http");
        let subsets = subsets(&svc, &m);
        assert_eq!(subsets.len(), 1);
        let s = &subsets[0];
        assert_eq!(s.addresses.as_ref().unwrap()[0].ip, "10.0.0.2");
        assert_eq!(s.not_ready_addresses.as_ref().unwrap()[0].ip, "10.0.0.1");
        assert_eq!(s.ports.as_ref().unwrap()[0].port, 8080);
        let slices = slice_contents(&svc, &m);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].1.len(), 2);
        assert_eq!(
            slices[0].1[0].conditions.as_ref().unwrap().ready,
            Some(false)
        );
    }

    #[test]
    fn large_services_split_into_slices_of_one_hundred() {
        let pods: Vec<Arc<Pod>> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                    true,
                    "http",
                    80,
                )
            })
            .collect();
        let svc = service(json!(80));
        let slices = slice_contents(&svc, &members(&svc, &pods));
        assert_eq!(
            slices.iter().map(|s| s.1.len()).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
    }
}
