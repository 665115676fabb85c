//! The node's DNS server for pods: `<service>.<namespace>.svc.<domain>` answers with the cluster
//! IP (a headless service with its ready endpoints), `<hostname>.<service>.<namespace>.svc...`
//! with that endpoint, `_<port>._<proto>.<service>...` SRV records for named ports, ExternalName
//! services as CNAMEs, `a-b-c-d.<namespace>.pod.<domain>` as the address it spells. Names
//! under the cluster domain that do not exist are NXDOMAIN; every other name goes to the
//! host's resolvers. Short names work through the search path edged writes in pods'
//! `resolv.conf`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::services::{Protocol, ServiceTable};

/// The link-local address the DNS server listens on by default (EdgeMesh's choice too).
pub const DEFAULT_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 96, 16);
const TTL: u32 = 5;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries being answered or forwarded at once; more are dropped (clients retry).
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// Resolvers for every other name (the host's).
    pub upstreams: Vec<SocketAddr>,
}

impl DnsConfig {
    /// The host's resolvers from `resolv.conf` text, skipping `own` (the server itself) and
    /// loopback stub resolvers that would not be reachable from pods anyway.
    pub fn upstreams_from_resolv_conf(text: &str, own: IpAddr) -> Vec<SocketAddr> {
        text.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some("nameserver"))
                    .then(|| words.next())
                    .flatten()
            })
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .filter(|ip| *ip != own)
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }
}

enum Answer {
    Local(Message),
    Forward,
}

fn name_of(text: &str) -> Name {
    Name::from_str(text).unwrap_or_default()
}

/// Answers `query` from the service table, or says it must be forwarded.
fn answer(query: &Message, table: &ServiceTable, domain: &str) -> Answer {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_queries(query.queries.iter().cloned());
    let Some(question) = query.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return Answer::Local(response);
    };
    if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
        response.metadata.response_code = ResponseCode::NotImp;
        return Answer::Local(response);
    }
    let asked = question.name().to_lowercase().to_ascii();
    let asked = asked.trim_end_matches('.');
    let suffix = format!(".{}", domain.trim_end_matches('.').to_ascii_lowercase());
    let Some(local) = asked.strip_suffix(&suffix) else {
        return Answer::Forward;
    };
    response.metadata.authoritative = true;
    let labels: Vec<&str> = local.split('.').collect();
    let qtype = question.query_type();
    let owner = question.name().clone();
    let mut found = false;
    let push_ip = |response: &mut Message, ip: IpAddr| match (ip, qtype) {
        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
            response.add_answer(Record::from_rdata(owner.clone(), TTL, RData::A(A(v4))));
        }
        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
            response.add_answer(Record::from_rdata(
                owner.clone(),
                TTL,
                RData::AAAA(AAAA(v6)),
            ));
        }
        _ => {}
    };
    match labels.as_slice() {
        // <service>.<namespace>.svc
        [service, namespace, "svc"] => {
            if let Some(target) = table.external_name(namespace, service) {
                found = true;
                let cname = RData::CNAME(CNAME(name_of(&format!("{target}."))));
                response.add_answer(Record::from_rdata(owner.clone(), TTL, cname));
            } else if let Some(ips) = table.addresses(namespace, service) {
                found = true;
                ips.into_iter().for_each(|ip| push_ip(&mut response, ip));
            }
        }
        // _<port>._<proto>.<service>.<namespace>.svc
        [port, proto, service, namespace, "svc"]
            if port.starts_with('_') && proto.starts_with('_') =>
        {
            let protocol = match *proto {
                "_tcp" => Some(Protocol::Tcp),
                "_udp" => Some(Protocol::Udp),
                _ => None,
            };
            if table.addresses(namespace, service).is_some() {
                found = true;
            }
            if let (Some(protocol), RecordType::SRV | RecordType::ANY) = (protocol, qtype) {
                let targets = table.srv(namespace, service, &port[1..], protocol, domain);
                for target in targets {
                    let srv =
                        SRV::new(0, 100, target.port, name_of(&format!("{}.", target.target)));
                    response.add_answer(Record::from_rdata(owner.clone(), TTL, RData::SRV(srv)));
                }
            }
        }
        // <hostname>.<service>.<namespace>.svc (an endpoint of a headless service)
        [host, service, namespace, "svc"] => {
            let ips = table.endpoint_host(namespace, service, host);
            found = !ips.is_empty();
            ips.into_iter().for_each(|ip| push_ip(&mut response, ip));
        }
        // a-b-c-d.<namespace>.pod
        [dashed, _namespace, "pod"] => {
            if let Ok(ip) = dashed.replace('-', ".").parse::<Ipv4Addr>() {
                found = true;
                push_ip(&mut response, IpAddr::V4(ip));
            }
        }
        // The domain itself, `svc.<domain>`, `<namespace>.svc.<domain>`: names that exist.
        [""] | ["svc"] | [_, "svc"] | ["pod"] | [_, "pod"] => found = true,
        _ => {}
    }
    if !found {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    Answer::Local(response)
}

/// Serves DNS on `udp` and `tcp` until `shutdown`.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    config: DnsConfig,
    table: watch::Receiver<Arc<ServiceTable>>,
    shutdown: CancellationToken,
) {
    let udp = Arc::new(udp);
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            received = udp.recv_from(&mut buf) => {
                let Ok((length, from)) = received else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let request = buf[..length].to_vec();
                let (udp, config, table) = (udp.clone(), config.clone(), table.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Some(reply) = respond(&request, &config, &table, true).await {
                        let _ = udp.send_to(&reply, from).await;
                    }
                });
            }
            accepted = tcp.accept() => {
                let Ok((mut conn, _)) = accepted else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let (config, table) = (config.clone(), table.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    // Length-prefixed messages until the client closes or idles.
                    loop {
                        let read = async {
                            let length = conn.read_u16().await? as usize;
                            let mut request = vec![0u8; length];
                            conn.read_exact(&mut request).await?;
                            Ok::<_, std::io::Error>(request)
                        };
                        let Ok(Ok(request)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
                            return;
                        };
                        let Some(reply) = respond(&request, &config, &table, false).await else { return };
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        if conn.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    }
}

/// The reply to one request (wire format), or `None` when there is nothing to say.
async fn respond(
    request: &[u8],
    config: &DnsConfig,
    table: &watch::Receiver<Arc<ServiceTable>>,
    udp: bool,
) -> Option<Vec<u8>> {
    let query = match Message::from_vec(request) {
        Ok(query) if query.metadata.message_type == MessageType::Query => query,
        Ok(_) => return None,
        Err(_) => {
            // Echo the id back with FORMERR when there is one.
            let id = u16::from_be_bytes([*request.first()?, *request.get(1)?]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
    };
    let snapshot = table.borrow().clone();
    match answer(&query, &snapshot, &config.domain) {
        Answer::Local(response) => {
            let bytes = response.to_vec().ok()?;
            let limit = if udp {
                query.max_payload().max(512) as usize
            } else {
                usize::MAX
            };
            if bytes.len() > limit {
                return response.truncate().to_vec().ok();
            }
            Some(bytes)
        }
        Answer::Forward => match forward(request, &config.upstreams, udp).await {
            Some(reply) => Some(reply),
            None => Message::error_msg(query.metadata.id, OpCode::Query, ResponseCode::ServFail)
                .to_vec()
                .ok(),
        },
    }
}

/// Asks the upstream resolvers in turn (UDP; TCP when the client used TCP or the answer was
/// truncated).
async fn forward(request: &[u8], upstreams: &[SocketAddr], udp: bool) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let attempt = async {
            if udp {
                let bind: SocketAddr = if upstream.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(bind).await?;
                socket.connect(upstream).await?;
                socket.send(request).await?;
                let mut buf = vec![0u8; 4096];
                loop {
                    let length = socket.recv(&mut buf).await?;
                    // Only the answer to this request (same id).
                    if length >= 2 && buf[..2] == request[..2] {
                        return Ok::<_, std::io::Error>(buf[..length].to_vec());
                    }
                }
            } else {
                let mut conn = tokio::net::TcpStream::connect(upstream).await?;
                let mut framed = (request.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(request);
                conn.write_all(&framed).await?;
                let length = conn.read_u16().await? as usize;
                let mut reply = vec![0u8; length];
                conn.read_exact(&mut reply).await?;
                Ok(reply)
            }
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, attempt).await {
            Ok(Ok(reply)) => return Some(reply),
            Ok(Err(error)) => tracing::debug!(%upstream, %error, "upstream DNS failed"),
            Err(_) => tracing::debug!(%upstream, "upstream DNS timed out"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use serde_json::json;

    fn table() -> ServiceTable {
        let mut table = ServiceTable::default();
        let service = |v: serde_json::Value| serde_json::from_value(v).unwrap();
        table.upsert_service(service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.43.0.20", "clusterIPs": ["10.43.0.20"], "ports": [{"name": "http", "port": 80}]}
        })));
        table.upsert_service(service(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
        })));
        table.upsert_service(service(json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}
        })));
        table.upsert_slice(serde_json::from_value(json!({
            "metadata": {"name": "db-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.42.1.10"], "hostname": "db-0"}, {"addresses": ["10.42.2.3"]}]
        })).unwrap());
        table
    }

    fn ask(name: &str, qtype: RecordType) -> Message {
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        query
    }

    fn local(name: &str, qtype: RecordType) -> Message {
        match answer(&ask(name, qtype), &table(), "cluster.local") {
            Answer::Local(message) => message,
            Answer::Forward => panic!("{name} was forwarded"),
        }
    }

    fn rdata(message: &Message) -> Vec<String> {
        message.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn cluster_names() {
        let web = local("web.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(web.metadata.response_code, ResponseCode::NoError);
        assert!(web.metadata.authoritative);
        assert_eq!(rdata(&web), ["10.43.0.20"]);
        assert_eq!(web.answers[0].ttl, TTL);
        // Case-insensitive, and NODATA for AAAA of an IPv4 service.
        assert_eq!(
            rdata(&local("WEB.Shop.svc.cluster.local.", RecordType::A)),
            ["10.43.0.20"]
        );
        let aaaa = local("web.shop.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());
        let mut headless = rdata(&local("db.shop.svc.cluster.local.", RecordType::A));
        headless.sort();
        assert_eq!(headless, ["10.42.1.10", "10.42.2.3"]);
        assert_eq!(
            rdata(&local("db-0.db.shop.svc.cluster.local.", RecordType::A)),
            ["10.42.1.10"]
        );
        assert_eq!(
            rdata(&local(
                "10-42-2-3.db.shop.svc.cluster.local.",
                RecordType::A
            )),
            ["10.42.2.3"]
        );
        assert_eq!(
            rdata(&local(
                "_http._tcp.web.shop.svc.cluster.local.",
                RecordType::SRV
            )),
            ["0 100 80 web.shop.svc.cluster.local."]
        );
        let mut srv = rdata(&local(
            "_pg._tcp.db.shop.svc.cluster.local.",
            RecordType::SRV,
        ));
        srv.sort();
        assert_eq!(
            srv,
            [
                "0 100 5432 10-42-2-3.db.shop.svc.cluster.local.",
                "0 100 5432 db-0.db.shop.svc.cluster.local."
            ]
        );
        assert_eq!(
            rdata(&local("ext.shop.svc.cluster.local.", RecordType::A)),
            ["example.org."]
        );
        assert_eq!(
            rdata(&local("10-1-2-3.shop.pod.cluster.local.", RecordType::A)),
            ["10.1.2.3"]
        );
        for missing in [
            "nope.shop.svc.cluster.local.",
            "web.shop.svc.cluster.local.shop.svc.cluster.local.",
            "web.cluster.local.",
        ] {
            let reply = local(missing, RecordType::A);
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{missing}"
            );
        }
        assert_eq!(
            local("svc.cluster.local.", RecordType::A)
                .metadata
                .response_code,
            ResponseCode::NoError
        );
        assert!(matches!(
            answer(
                &ask("example.org.", RecordType::A),
                &table(),
                "cluster.local"
            ),
            Answer::Forward
        ));
    }

    #[test]
    fn upstreams_skip_the_server_itself() {
        let text = "search lan\nnameserver 169.254.96.16\nnameserver 192.168.1.1\nnameserver ::1\n";
        let upstreams = DnsConfig::upstreams_from_resolv_conf(text, IpAddr::V4(DEFAULT_ADDRESS));
        assert_eq!(
            upstreams,
            [
                "192.168.1.1:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
