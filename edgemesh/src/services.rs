//! The service table: Services and their EndpointSlices turned into what the proxy forwards
//! (cluster IP + port -> backends, each on a node) and what the DNS server answers. Pure.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Chooses how a Service's connections spread over its endpoints.
pub const LB_ANNOTATION: &str = "mesh.edgesite.io/load-balancing";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Upstream's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY: Duration = Duration::from_secs(10_800);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn parse(text: Option<&str>) -> Option<Self> {
        match text.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None, // SCTP is not proxied.
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balancing {
    #[default]
    RoundRobin,
    Random,
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    /// The node the endpoint runs on (`nodeName` of the slice's endpoint).
    pub node: Option<String>,
}

impl Backend {
    /// Whether the endpoint is reached from `node` without the mesh: it runs there, or it names
    /// no node (an address the node routes to itself).
    pub fn is_local(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }
}

/// A Service port the proxy intercepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// Ready endpoints only, sorted.
    pub backends: Vec<Backend>,
    pub balancing: Balancing,
    /// `sessionAffinity: ClientIP` and its timeout.
    pub affinity: Option<Duration>,
    /// `nodePort`: the port also answers on every address of the node.
    pub node_port: Option<u16>,
    /// `spec.externalIPs` and the IPs of `status.loadBalancer.ingress`: the port answers there
    /// too (on the nodes holding them; other nodes' pods are short-circuited, as kube-proxy does).
    pub external_ips: Vec<IpAddr>,
    /// `externalTrafficPolicy: Local`: traffic from outside goes to this node's endpoints only,
    /// and keeps its source address.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: traffic to the cluster IP goes to this node's endpoints
    /// only.
    pub internal_local: bool,
    /// `healthCheckNodePort` (a LoadBalancer with `externalTrafficPolicy: Local`): each node
    /// answers there whether it has a local endpoint.
    pub health_check_port: Option<u16>,
}

impl ServicePort {
    /// What identifies the listener: cluster IP, port, protocol.
    pub fn key(&self) -> (IpAddr, u16, Protocol) {
        (self.cluster_ip, self.port, self.protocol)
    }
}

/// A DNS SRV answer for a named port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    pub target: String,
    pub port: u16,
}

#[derive(Debug, Default, Clone)]
pub struct ServiceTable {
    services: BTreeMap<(String, String), Service>,
    /// EndpointSlices by service, then by slice name.
    slices: BTreeMap<(String, String), BTreeMap<String, EndpointSlice>>,
}

/// A Service's cluster IPs (`clusterIPs`, else `clusterIP`); none for headless services.
fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<IpAddr> {
    spec.cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

fn key_of(namespace: Option<&String>, name: Option<&String>) -> Option<(String, String)> {
    Some((namespace?.clone(), name?.clone()))
}

impl ServiceTable {
    pub fn upsert_service(&mut self, service: Service) {
        if let Some(key) = key_of(
            service.metadata.namespace.as_ref(),
            service.metadata.name.as_ref(),
        ) {
            self.services.insert(key, service);
        }
    }

    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        self.services
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        let labels = slice.metadata.labels.as_ref();
        let service = labels.and_then(|l| l.get(SERVICE_NAME_LABEL));
        let (Some(key), Some(name)) = (
            key_of(slice.metadata.namespace.as_ref(), service),
            slice.metadata.name.clone(),
        ) else {
            return;
        };
        self.slices.entry(key).or_default().insert(name, slice);
    }

    pub fn remove_slice(&mut self, namespace: &str, name: &str) {
        for ((ns, _), slices) in self.slices.iter_mut() {
            if ns == namespace {
                slices.remove(name);
            }
        }
        self.slices.retain(|_, slices| !slices.is_empty());
    }

    /// Replaces everything (after a re-list).
    pub fn reset(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        self.services.clear();
        self.slices.clear();
        services.into_iter().for_each(|s| self.upsert_service(s));
        slices.into_iter().for_each(|s| self.upsert_slice(s));
    }

    /// Every (cluster IP, port, protocol) to intercept, with its ready backends.
    pub fn ports(&self) -> Vec<ServicePort> {
        let mut out = Vec::new();
        for ((namespace, name), service) in &self.services {
            let Some(spec) = &service.spec else { continue };
            let cluster_ips = cluster_ips(spec);
            if cluster_ips.is_empty() || spec.type_.as_deref() == Some("ExternalName") {
                continue; // headless or ExternalName: DNS only
            }
            let balancing = match service
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LB_ANNOTATION))
                .map(String::as_str)
            {
                Some("random") => Balancing::Random,
                _ => Balancing::RoundRobin,
            };
            let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .map_or(DEFAULT_AFFINITY, |s| Duration::from_secs(s.max(1) as u64))
            });
            let exposed = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
            let mut external_ips: Vec<IpAddr> = spec
                .external_ips
                .iter()
                .flatten()
                .filter_map(|ip| ip.parse().ok())
                .collect();
            if spec.type_.as_deref() == Some("LoadBalancer") {
                external_ips.extend(
                    service
                        .status
                        .as_ref()
                        .and_then(|s| s.load_balancer.as_ref())
                        .and_then(|lb| lb.ingress.as_ref())
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok()),
                );
            }
            external_ips.sort();
            external_ips.dedup();
            let external_local =
                exposed && spec.external_traffic_policy.as_deref() == Some("Local");
            let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
            let health_check_port = spec
                .health_check_node_port
                .filter(|_| external_local && spec.type_.as_deref() == Some("LoadBalancer"))
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0);
            for port in spec.ports.iter().flatten() {
                let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
                    continue;
                };
                let port_name = port.name.clone().unwrap_or_default();
                let backends = self.backends(namespace, name, &port_name, protocol);
                let node_port = port
                    .node_port
                    .filter(|_| exposed)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0);
                let primary = cluster_ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .unwrap_or(&cluster_ips[0]);
                for ip in &cluster_ips {
                    out.push(ServicePort {
                        namespace: namespace.clone(),
                        service: name.clone(),
                        port_name: port_name.clone(),
                        protocol,
                        cluster_ip: *ip,
                        port: port.port as u16,
                        backends: backends.clone(),
                        balancing,
                        affinity,
                        // The external frontends go with one cluster IP only (IPv4 first:
                        // the proxy intercepts IPv4).
                        node_port: node_port.filter(|_| ip == primary),
                        external_ips: if ip == primary {
                            external_ips.clone()
                        } else {
                            Vec::new()
                        },
                        external_local,
                        internal_local,
                        health_check_port: health_check_port.filter(|_| ip == primary),
                    });
                }
            }
        }
        out
    }

    /// Ready endpoints of a service for the port named `port_name`.
    fn backends(
        &self,
        namespace: &str,
        name: &str,
        port_name: &str,
        protocol: Protocol,
    ) -> Vec<Backend> {
        let mut backends = Vec::new();
        let key = (namespace.to_string(), name.to_string());
        for slice in self.slices.get(&key).into_iter().flat_map(|s| s.values()) {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let port = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && Protocol::parse(p.protocol.as_deref()) == Some(protocol)
            });
            let Some(port) = port.and_then(|p| p.port) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                // Upstream: a nil `ready` means ready.
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !ready {
                    continue;
                }
                let Some(ip) = endpoint.addresses.first().and_then(|a| a.parse().ok()) else {
                    continue;
                };
                backends.push(Backend {
                    ip,
                    port: port as u16,
                    node: endpoint.node_name.clone(),
                });
            }
        }
        backends.sort();
        backends.dedup();
        backends
    }

    /// A records for `<name>.<namespace>.svc`: the cluster IPs, or the ready endpoints' IPs of a
    /// headless service. `None`: no such service.
    pub fn addresses(&self, namespace: &str, name: &str) -> Option<Vec<IpAddr>> {
        let service = self
            .services
            .get(&(namespace.to_string(), name.to_string()))?;
        let spec = service.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return Some(Vec::new());
        }
        let cluster_ips = cluster_ips(spec);
        if !cluster_ips.is_empty() {
            return Some(cluster_ips);
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        let key = (namespace.to_string(), name.to_string());
        for slice in self.slices.get(&key).into_iter().flat_map(|s| s.values()) {
            for endpoint in &slice.endpoints {
                if endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true)
                {
                    ips.extend(
                        endpoint
                            .addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok()),
                    );
                }
            }
        }
        ips.sort();
        ips.dedup();
        Some(ips)
    }

    /// `spec.externalName` of an ExternalName service (a CNAME).
    pub fn external_name(&self, namespace: &str, name: &str) -> Option<String> {
        let service = self
            .services
            .get(&(namespace.to_string(), name.to_string()))?;
        let spec = service.spec.as_ref()?;
        (spec.type_.as_deref() == Some("ExternalName")).then(|| spec.external_name.clone())?
    }

    /// SRV records for `_<port>._<proto>.<name>.<namespace>.svc.<domain>`.
    pub fn srv(
        &self,
        namespace: &str,
        name: &str,
        port_name: &str,
        protocol: Protocol,
        domain: &str,
    ) -> Vec<SrvTarget> {
        let Some(service) = self
            .services
            .get(&(namespace.to_string(), name.to_string()))
        else {
            return Vec::new();
        };
        let Some(spec) = &service.spec else {
            return Vec::new();
        };
        let Some(port) = spec.ports.iter().flatten().find(|p| {
            p.name.as_deref() == Some(port_name)
                && Protocol::parse(p.protocol.as_deref()) == Some(protocol)
        }) else {
            return Vec::new();
        };
        let headless = spec.cluster_ip.as_deref() == Some("None");
        if !headless {
            return vec![SrvTarget {
                target: format!("{name}.{namespace}.svc.{domain}"),
                port: port.port as u16,
            }];
        }
        // Headless: one target per ready endpoint, named by its hostname or its address.
        let mut targets = Vec::new();
        let key = (namespace.to_string(), name.to_string());
        for slice in self.slices.get(&key).into_iter().flat_map(|s| s.values()) {
            let Some(slice_port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(port_name))
                .and_then(|p| p.port)
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                if !endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true)
                {
                    continue;
                }
                let Some(address) = endpoint.addresses.first() else {
                    continue;
                };
                let host = endpoint
                    .hostname
                    .clone()
                    .unwrap_or_else(|| address.replace(['.', ':'], "-"));
                targets.push(SrvTarget {
                    target: format!("{host}.{name}.{namespace}.svc.{domain}"),
                    port: slice_port as u16,
                });
            }
        }
        targets.sort_by(|a, b| a.target.cmp(&b.target));
        targets
    }

    /// The address of a headless service's endpoint named `host` (hostname or dashed IP).
    pub fn endpoint_host(&self, namespace: &str, name: &str, host: &str) -> Vec<IpAddr> {
        let key = (namespace.to_string(), name.to_string());
        let mut ips = Vec::new();
        for slice in self.slices.get(&key).into_iter().flat_map(|s| s.values()) {
            for endpoint in &slice.endpoints {
                let Some(address) = endpoint.addresses.first() else {
                    continue;
                };
                let named = endpoint.hostname.as_deref() == Some(host)
                    || address.replace(['.', ':'], "-") == host;
                if named {
                    ips.extend(address.parse::<IpAddr>().ok());
                }
            }
        }
        ips
    }

    /// Services by namespace, for the node-local view (status, tests).
    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// Which peer serves a node, by node name.
pub type NodePeers = HashMap<String, libp2p::PeerId>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).unwrap()
    }

    fn slice(value: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(value).unwrap()
    }

    fn table() -> ServiceTable {
        let mut table = ServiceTable::default();
        table.upsert_service(service(json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": {LB_ANNOTATION: "random"}},
            "spec": {"clusterIP": "10.43.0.20", "clusterIPs": ["10.43.0.20"], "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                               {"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "sctp", "port": 9, "protocol": "SCTP"}]}
        })));
        table.upsert_service(service(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
        })));
        table.upsert_service(service(json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}
        })));
        table.upsert_slice(slice(json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.42.1.5"], "nodeName": "node-b", "conditions": {"ready": true}},
                {"addresses": ["10.42.0.7"], "nodeName": "node-a"},
                {"addresses": ["10.42.1.9"], "nodeName": "node-b", "conditions": {"ready": false}}
            ]
        })));
        table.upsert_slice(slice(json!({
            "metadata": {"name": "db-1", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.42.1.10"], "hostname": "db-0", "nodeName": "node-b"}]
        })));
        table
    }

    #[test]
    fn ports_carry_ready_backends_affinity_and_balancing() {
        let ports = table().ports();
        assert_eq!(
            ports.len(),
            2,
            "SCTP, headless and ExternalName are not proxied: {ports:#?}"
        );
        let http = ports.iter().find(|p| p.port == 80).unwrap();
        assert_eq!(http.protocol, Protocol::Tcp);
        assert_eq!(http.cluster_ip.to_string(), "10.43.0.20");
        assert_eq!(http.balancing, Balancing::Random);
        assert_eq!(http.affinity, Some(DEFAULT_AFFINITY));
        let backends: Vec<String> = http
            .backends
            .iter()
            .map(|b| format!("{}:{}@{}", b.ip, b.port, b.node.clone().unwrap()))
            .collect();
        assert_eq!(backends, ["10.42.0.7:8080@node-a", "10.42.1.5:8080@node-b"]);
        let dns = ports.iter().find(|p| p.port == 53).unwrap();
        assert_eq!(dns.protocol, Protocol::Udp);
        assert!(dns.backends.iter().all(|b| b.port == 5353));
    }

    #[test]
    fn exposed_services_carry_node_ports_external_ips_and_policies() {
        let mut table = ServiceTable::default();
        table.upsert_service(service(json!({
            "metadata": {"name": "lb", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIPs": ["fd00::5", "10.43.0.30"],
                     "externalIPs": ["203.0.113.9", "nonsense"],
                     "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.168.1.2"}, {"hostname": "lb.example"}]}}
        })));
        table.upsert_service(service(json!({
            "metadata": {"name": "plain", "namespace": "shop"},
            "spec": {"clusterIP": "10.43.0.31", "externalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "nodePort": 30081}]}
        })));
        let ports = table.ports();
        let v4 = ports
            .iter()
            .find(|p| p.cluster_ip.to_string() == "10.43.0.30")
            .unwrap();
        assert_eq!(v4.node_port, Some(30080));
        let ips: Vec<String> = v4.external_ips.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(ips, ["192.168.1.2", "203.0.113.9"]);
        assert!(v4.external_local && v4.internal_local);
        let v6 = ports
            .iter()
            .find(|p| p.cluster_ip.to_string() == "fd00::5")
            .unwrap();
        assert_eq!(
            v6.node_port, None,
            "external frontends go with the IPv4 cluster IP"
        );
        assert!(v6.external_ips.is_empty());
        // A ClusterIP service has no node port and no external policy, whatever its spec says.
        let plain = ports.iter().find(|p| p.service == "plain").unwrap();
        assert_eq!(plain.node_port, None);
        assert!(!plain.external_local);
    }

    #[test]
    fn dns_views() {
        let table = table();
        assert_eq!(
            table.addresses("shop", "web").unwrap()[0].to_string(),
            "10.43.0.20"
        );
        assert_eq!(
            table.addresses("shop", "db").unwrap()[0].to_string(),
            "10.42.1.10"
        );
        assert!(table.addresses("shop", "nope").is_none());
        assert_eq!(
            table.external_name("shop", "ext").as_deref(),
            Some("example.org")
        );
        let srv = table.srv("shop", "web", "http", Protocol::Tcp, "cluster.local");
        assert_eq!(
            srv,
            [SrvTarget {
                target: "web.shop.svc.cluster.local".into(),
                port: 80
            }]
        );
        let srv = table.srv("shop", "db", "pg", Protocol::Tcp, "cluster.local");
        assert_eq!(
            srv,
            [SrvTarget {
                target: "db-0.db.shop.svc.cluster.local".into(),
                port: 5432
            }]
        );
        assert_eq!(
            table.endpoint_host("shop", "db", "db-0")[0].to_string(),
            "10.42.1.10"
        );
        let mut table = table;
        table.remove_slice("shop", "web-abc");
        assert!(table.ports().iter().all(|p| p.backends.is_empty()));
        table.remove_service("shop", "web");
        assert!(table.ports().is_empty());
    }
}
