//! `healthCheckNodePort`s: for a LoadBalancer Service with `externalTrafficPolicy: Local`, each
//! node answers HTTP on that port with whether it has a ready endpoint of the Service (200) or
//! not (503), in kube-proxy's words, so an external load balancer sends traffic only to nodes
//! that keep it local.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::services::ServicePort;

/// What one health check port reports: the Service and its local endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

impl Report {
    /// The answer, as kube-proxy gives it.
    pub fn response(&self) -> String {
        let body = format!(
            "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}",
            self.namespace, self.name, self.local_endpoints
        );
        let status = if self.local_endpoints > 0 {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// The reports `ports` ask for, by health check port (endpoints on `node` counted once each).
pub fn reports(node: &str, ports: &[ServicePort]) -> BTreeMap<u16, Report> {
    let mut out: BTreeMap<u16, (Report, std::collections::BTreeSet<std::net::IpAddr>)> =
        BTreeMap::new();
    for port in ports {
        let Some(health) = port.health_check_port else {
            continue;
        };
        let entry = out.entry(health).or_insert_with(|| {
            (
                Report {
                    namespace: port.namespace.clone(),
                    name: port.service.clone(),
                    local_endpoints: 0,
                },
                Default::default(),
            )
        });
        entry.1.extend(
            port.backends
                .iter()
                .filter(|b| b.node.as_deref() == Some(node))
                .map(|b| b.ip),
        );
    }
    out.into_iter()
        .map(|(port, (mut report, ips))| {
            report.local_endpoints = ips.len();
            (port, report)
        })
        .collect()
}

/// The health check listeners of a node.
#[derive(Default)]
pub struct HealthChecks {
    servers: HashMap<u16, (Arc<Mutex<Report>>, CancellationToken)>,
}

impl HealthChecks {
    /// Serves exactly `wanted`: new ports get a listener, gone ones lose theirs.
    pub async fn set(&mut self, wanted: BTreeMap<u16, Report>, stop: &CancellationToken) {
        self.servers.retain(|port, (_, token)| {
            let keep = wanted.contains_key(port);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (port, report) in wanted {
            if let Some((current, _)) = self.servers.get(&port) {
                *current.lock().unwrap_or_else(|e| e.into_inner()) = report;
                continue;
            }
            let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(port, service = %format!("{}/{}", report.namespace, report.name), %error, "cannot serve the health check node port");
                    continue;
                }
            };
            let report = Arc::new(Mutex::new(report));
            let token = stop.child_token();
            tokio::spawn(serve(listener, report.clone(), token.clone()));
            self.servers.insert(port, (report, token));
        }
    }
}

async fn serve(listener: TcpListener, report: Arc<Mutex<Report>>, stop: CancellationToken) {
    loop {
        let (mut conn, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let answer = report.lock().unwrap_or_else(|e| e.into_inner()).response();
        tokio::spawn(async move {
            // The request itself says nothing the answer depends on; read its head briefly.
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{Backend, Balancing, Protocol};

    #[test]
    fn a_node_reports_its_own_endpoints_once_each() {
        let backend = |ip: &str, port: u16, node: &str| Backend {
            ip: ip.parse().unwrap(),
            port,
            node: Some(node.into()),
        };
        let port = |number: u16| ServicePort {
            namespace: "shop".into(),
            service: "web".into(),
            port_name: format!("p{number}"),
            protocol: Protocol::Tcp,
            cluster_ip: "10.43.0.9".parse().unwrap(),
            port: number,
            backends: vec![
                backend("10.42.0.5", number, "a"),
                backend("10.42.1.5", number, "b"),
            ],
            balancing: Balancing::RoundRobin,
            affinity: None,
            node_port: Some(30000 + number),
            external_ips: Vec::new(),
            external_local: true,
            internal_local: false,
            health_check_port: Some(32000),
        };
        let reports = reports("a", &[port(80), port(443)]);
        assert_eq!(reports[&32000].local_endpoints, 1);
        assert!(reports[&32000].response().starts_with("HTTP/1.1 200 OK"));
        assert!(
            reports[&32000]
                .response()
                .ends_with("{\"service\":{\"namespace\":\"shop\",\"name\":\"web\"},\"localEndpoints\":1,\"serviceProxyHealthy\":true}")
        );
        let none = super::reports("c", &[port(80)]);
        assert!(none[&32000].response().starts_with("HTTP/1.1 503"));
    }
}
