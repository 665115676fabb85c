//! NetworkPolicy on a node. The server resolves the site's policies into what concerns each
//! node (ConfigMap `kube-system/netpol.<node>`, written by its `network-policy-controller`
//! loop): for each of the node's pods a policy selects, whether it is isolated for ingress and
//! for egress and the peers and ports its rules allow, selectors and named ports already
//! turned into addresses and numbers. A node cannot list other nodes' pods; it does not need to.
//!
//! Enforced where the traffic passes:
//! - in the kernel ([`render`], filter `<prefix>-NETPOL` at the top of FORWARD): traffic that
//!   crosses this node's pod bridge or leaves it, to and from this node's pods, judged on the
//!   addresses after the service DNAT (the endpoint the kernel picked);
//! - in the mesh: the proxy checks a local pod's egress before it opens a tunnel to an endpoint
//!   on another node, and a node checks its pod's ingress before it connects a tunnel another
//!   node opened, on the original client address the tunnel carries.
//!
//! Traffic from a node of the site itself (kubelet probes, the built-in ingress, a tunnel from a
//! node's own process) is allowed, as kube-router in K3s allows its node's traffic; a pod may
//! always reach itself. `<prefix>-FORWARD` (appended to FORWARD) accepts the node's pod traffic
//! that the policy let through, so a host whose FORWARD policy is DROP still forwards it.

use std::collections::{BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::netfilter::{Place, chains_in, hash32, hook, run, unhook};

/// Where the server writes a node's rules.
pub const NAMESPACE: &str = "kube-system";
pub const KEY: &str = "policy.json";
/// The label on those ConfigMaps (its value: the node).
pub const NODE_LABEL: &str = "netpol.edgesite.io/node";
/// The mark bit that says "an allow rule with exceptions matched" between chains (kube-router's).
const MATCH_BIT: &str = "0x10000";
const MAX_CHAIN: usize = 28;
const HOOK_COMMENT: &str = "edgesite mesh: network policy";
const KINDS: [&str; 3] = ["NPI", "NPE", "NPX"];

/// The ConfigMap holding `node`'s rules (the API server's node authorizer lets the node read
/// this name and no other ConfigMap of `kube-system`). A node name longer than 246 characters
/// makes no valid name: such a node gets no rules.
pub fn configmap_name(node: &str) -> String {
    format!("netpol.{node}")
}

/// An address block: `10.0.0.0/8`, `10.42.1.5/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net {
    pub addr: IpAddr,
    pub bits: u8,
}

impl Net {
    pub fn host(addr: IpAddr) -> Self {
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        Net { addr, bits }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl FromStr for Net {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not an address block (10.0.0.0/8)");
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(bits) => bits.parse().ok().filter(|b| *b <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Net { addr, bits })
    }
}

impl Serialize for Net {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Proto {
    fn iptables(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl From<crate::tunnel::Kind> for Proto {
    fn from(kind: crate::tunnel::Kind) -> Self {
        match kind {
            crate::tunnel::Kind::Tcp => Proto::Tcp,
            crate::tunnel::Kind::Udp => Proto::Udp,
        }
    }
}

/// A peer's addresses: a block less its exceptions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Block {
    pub cidr: Net,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Net>,
}

impl Block {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

/// Ports of one protocol: all of them (`port` unset), one, or `port..=end_port`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ports {
    pub protocol: Proto,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

impl Ports {
    pub fn matches(&self, protocol: Proto, port: u16) -> bool {
        protocol == self.protocol
            && match self.port {
                None => true,
                Some(first) => (first..=self.end_port.unwrap_or(first).max(first)).contains(&port),
            }
    }
}

/// One thing a rule lets through: any of `peers` (every address when unset) on any of `ports`
/// (every port when unset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<Block>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Ports>>,
}

impl Allow {
    pub fn matches(&self, peer: IpAddr, protocol: Proto, port: u16) -> bool {
        self.peers
            .as_ref()
            .is_none_or(|p| p.iter().any(|b| b.contains(peer)))
            && self
                .ports
                .as_ref()
                .is_none_or(|p| p.iter().any(|p| p.matches(protocol, port)))
    }
}

/// A pod of the node that some policy selects. A direction that is `None` is not isolated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRules {
    pub ip: IpAddr,
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Allow>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Allow>>,
}

/// A node's rules, as the server writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicy {
    pub pods: Vec<PodRules>,
}

/// A node's rules with its pods found by address, and the node's pod network.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub rules: NodePolicy,
    pub pod_cidr: Option<Net>,
    by_ip: HashMap<IpAddr, usize>,
}

impl Policy {
    pub fn new(rules: NodePolicy, pod_cidr: Option<Net>) -> Self {
        let by_ip = rules
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.ip, i))
            .collect();
        Policy {
            rules,
            pod_cidr,
            by_ip,
        }
    }

    /// May `from` (`None`: a node of the site) open a connection to this node's pod `pod` on
    /// `port`?
    pub fn ingress_allows(
        &self,
        pod: IpAddr,
        from: Option<IpAddr>,
        protocol: Proto,
        port: u16,
    ) -> bool {
        let Some(from) = from else { return true };
        if from == pod {
            return true;
        }
        match self.by_ip.get(&pod).map(|i| &self.rules.pods[*i].ingress) {
            Some(Some(rules)) => rules.iter().any(|r| r.matches(from, protocol, port)),
            _ => true,
        }
    }

    /// May this node's pod `pod` open a connection to `to` on `port`?
    pub fn egress_allows(&self, pod: IpAddr, to: IpAddr, protocol: Proto, port: u16) -> bool {
        if to == pod {
            return true;
        }
        match self.by_ip.get(&pod).map(|i| &self.rules.pods[*i].egress) {
            Some(Some(rules)) => rules.iter().any(|r| r.matches(to, protocol, port)),
            _ => true,
        }
    }
}

/// The filter ruleset for `policy` (one `iptables-restore --noflush` transaction), and the
/// dynamic chains it leaves. `existing`: dynamic chains the kernel has now.
pub fn render(
    prefix: &str,
    policy: &NodePolicy,
    pod_cidr: Option<Net>,
    existing: &BTreeSet<String>,
) -> (String, BTreeSet<String>) {
    let dynamic = |kind: &str, what: &str| {
        let head = format!("{prefix}-{kind}-");
        let room = MAX_CHAIN.saturating_sub(head.len()).clamp(4, 13);
        format!("{head}{}", &hash32(what)[..room])
    };
    let top = format!("{prefix}-NETPOL");
    let forward = format!("{prefix}-FORWARD");
    let mut chains = BTreeSet::new();
    let mut body = String::new();
    let _ = writeln!(
        body,
        "-A {top} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    );
    let clear = format!("-A {top} -j MARK --set-xmark 0x0/{MATCH_BIT}");
    // Whoever else set the bit, an exception chain's answer must start from zero.
    let _ = writeln!(body, "{clear}");
    let mut pods: Vec<&PodRules> = policy.pods.iter().filter(|p| p.ip.is_ipv4()).collect();
    pods.sort_by_key(|p| p.ip);
    for (ingress, flag, peer_flag) in [(true, "-d", "-s"), (false, "-s", "-d")] {
        for pod in &pods {
            let Some(rules) = (if ingress { &pod.ingress } else { &pod.egress }) else {
                continue;
            };
            let who = format!("{}/{}", pod.namespace, pod.name);
            let what = format!("{who} {}", pod.ip);
            let chain = dynamic(if ingress { "NPI" } else { "NPE" }, &what);
            let comment = quoted(&format!(
                "{} of {who}",
                if ingress { "ingress" } else { "egress" }
            ));
            let host = Net::host(pod.ip);
            let _ = writeln!(
                body,
                "-A {top} {flag} {host} -m comment --comment {comment} -j {chain}"
            );
            let _ = writeln!(body, "-A {chain} {peer_flag} {host} -j RETURN");
            for (n, allow) in rules.iter().enumerate() {
                let ports: Vec<String> = match &allow.ports {
                    None => vec![String::new()],
                    Some(ports) => ports.iter().map(port_match).collect(),
                };
                let peers: Vec<Option<&Block>> = match &allow.peers {
                    None => vec![None],
                    Some(blocks) => blocks.iter().map(Some).collect(),
                };
                for (m, peer) in peers.iter().enumerate() {
                    let address = peer
                        .map(|b| format!(" {peer_flag} {}", b.cidr))
                        .unwrap_or_default();
                    let except_chain = match peer {
                        Some(block) if !block.except.is_empty() => {
                            let x = dynamic("NPX", &format!("{what} {ingress} {n} {m}"));
                            for except in &block.except {
                                let _ = writeln!(body, "-A {x} {peer_flag} {except} -j RETURN");
                            }
                            let _ = writeln!(
                                body,
                                "-A {x} -j MARK --set-xmark {MATCH_BIT}/{MATCH_BIT}"
                            );
                            chains.insert(x.clone());
                            Some(x)
                        }
                        _ => None,
                    };
                    for port in &ports {
                        match &except_chain {
                            None => {
                                let _ = writeln!(body, "-A {chain}{address}{port} -j RETURN");
                            }
                            Some(x) => {
                                let _ = writeln!(body, "-A {chain}{address}{port} -j {x}");
                                let _ = writeln!(
                                    body,
                                    "-A {chain} -m mark --mark {MATCH_BIT}/{MATCH_BIT} -j RETURN"
                                );
                            }
                        }
                    }
                }
            }
            // ICMP port unreachable, for TCP too: a reset made for a bridged packet leaves
            // without the service's reverse NAT (the client would not take it and time out);
            // the ICMP error is routed and translated, and a client sees "connection refused".
            let _ = writeln!(
                body,
                "-A {chain} -m comment --comment {comment} -j REJECT --reject-with icmp-port-unreachable"
            );
            chains.insert(chain);
        }
        if ingress {
            let _ = writeln!(body, "{clear}");
        }
    }
    let _ = writeln!(body, "{clear}");
    if let Some(cidr) = pod_cidr.filter(|c| c.addr.is_ipv4()) {
        let _ = writeln!(
            body,
            "-A {forward} -s {cidr} -m comment --comment \"pod traffic the policy let through\" -j ACCEPT\n-A {forward} -d {cidr} -m comment --comment \"pod traffic the policy let through\" -j ACCEPT"
        );
    }

    let mut text = String::from("*filter\n");
    let _ = writeln!(text, ":{top} - [0:0]\n:{forward} - [0:0]");
    let is_dynamic = |c: &String| {
        KINDS
            .iter()
            .any(|k| c.starts_with(&format!("{prefix}-{k}-")))
    };
    let stale: Vec<&String> = existing
        .iter()
        .filter(|c| is_dynamic(c) && !chains.contains(*c))
        .collect();
    for chain in chains.iter().chain(stale.iter().copied()) {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    text.push_str(&body);
    for chain in stale {
        let _ = writeln!(text, "-X {chain}");
    }
    text.push_str("COMMIT\n");
    (text, chains)
}

fn port_match(ports: &Ports) -> String {
    let proto = ports.protocol.iptables();
    match (ports.port, ports.end_port) {
        (None, _) => format!(" -p {proto}"),
        (Some(first), Some(last)) if last > first => {
            format!(" -p {proto} -m {proto} --dport {first}:{last}")
        }
        (Some(port), _) => format!(" -p {proto} -m {proto} --dport {port}"),
    }
}

fn quoted(text: &str) -> String {
    let inner: String = text
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .filter(|c| *c != '"' && *c != '\\')
        .take(200)
        .collect();
    format!("\"{inner}\"")
}

/// The policy's rules in the kernel: hooked once, then replaced whole on every change.
pub struct Netpol {
    prefix: String,
    chains: BTreeSet<String>,
}

impl Netpol {
    pub fn new(prefix: &str) -> Self {
        Netpol {
            prefix: prefix.to_string(),
            chains: BTreeSet::new(),
        }
    }

    /// The chains jumped to from FORWARD: the policy first, the accept of what it let through
    /// last.
    fn hooks(&self) -> [(Place, String); 2] {
        [
            (Place::First, format!("{}-NETPOL", self.prefix)),
            (Place::Last, format!("{}-FORWARD", self.prefix)),
        ]
    }

    /// Creates the chains (taking over what a previous run left) and hooks them into FORWARD.
    pub async fn install(&mut self) -> anyhow::Result<()> {
        let prefix = &self.prefix;
        self.chains = chains_in("filter", |c| {
            KINDS
                .iter()
                .any(|k| c.starts_with(&format!("{prefix}-{k}-")))
        })
        .await?;
        self.sync(&NodePolicy::default(), None).await.map_err(|e| {
            anyhow::anyhow!("cannot create the network policy's iptables chains: {e}")
        })?;
        for (place, chain) in self.hooks() {
            hook("filter", "FORWARD", place, HOOK_COMMENT, &chain).await?;
        }
        Ok(())
    }

    pub async fn sync(
        &mut self,
        policy: &NodePolicy,
        pod_cidr: Option<Net>,
    ) -> std::io::Result<()> {
        let (text, chains) = render(&self.prefix, policy, pod_cidr, &self.chains);
        run("iptables-restore", &["-w", "5", "--noflush"], Some(&text)).await?;
        self.chains = chains;
        Ok(())
    }

    /// Takes the rules and chains out of the kernel.
    pub async fn remove(&mut self) {
        if let Err(error) = self.sync(&NodePolicy::default(), None).await {
            tracing::warn!(%error, "cannot empty the network policy's iptables chains");
        }
        for (_, chain) in self.hooks() {
            unhook("filter", "FORWARD", HOOK_COMMENT, &chain).await;
            let _ = run("iptables", &["-w", "5", "-F", &chain], None).await;
            let _ = run("iptables", &["-w", "5", "-X", &chain], None).await;
        }
    }
}

/// Keeps the kernel's rules to the node's policy until `shutdown`, then removes them.
pub async fn enforce(
    prefix: String,
    mut policy: tokio::sync::watch::Receiver<std::sync::Arc<Policy>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut rules = Netpol::new(&prefix);
    if let Err(error) = rules.install().await {
        tracing::error!("network policy is not enforced in the kernel on this node: {error:#}");
        return;
    }
    loop {
        let current = policy.borrow_and_update().clone();
        if let Err(error) = rules.sync(&current.rules, current.pod_cidr).await {
            tracing::error!(%error, "network policy rules not written");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = policy.changed() => if changed.is_err() { break },
        }
    }
    rules.remove().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(text: &str, except: &[&str]) -> Block {
        Block {
            cidr: text.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    fn tcp(port: u16) -> Ports {
        Ports {
            protocol: Proto::Tcp,
            port: Some(port),
            end_port: None,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn web(ingress: Option<Vec<Allow>>, egress: Option<Vec<Allow>>) -> NodePolicy {
        NodePolicy {
            pods: vec![PodRules {
                ip: ip("10.42.0.5"),
                namespace: "shop".into(),
                name: "web".into(),
                ingress,
                egress,
            }],
        }
    }

    #[test]
    fn blocks_ports_and_allows_match_as_the_api_says() {
        let b = block("10.0.0.0/8", &["10.1.0.0/16"]);
        assert!(b.contains(ip("10.2.3.4")));
        assert!(!b.contains(ip("10.1.3.4")));
        assert!(!b.contains(ip("192.168.1.1")));
        assert!(block("0.0.0.0/0", &[]).contains(ip("8.8.8.8")));
        let range = Ports {
            protocol: Proto::Tcp,
            port: Some(8000),
            end_port: Some(8100),
        };
        assert!(range.matches(Proto::Tcp, 8050));
        assert!(!range.matches(Proto::Udp, 8050));
        assert!(!range.matches(Proto::Tcp, 8101));
        assert!("10.0.0.0/33".parse::<Net>().is_err());
        assert_eq!(
            "10.42.0.5".parse::<Net>().unwrap().to_string(),
            "10.42.0.5/32"
        );
    }

    #[test]
    fn isolation_is_per_direction_and_nodes_and_the_pod_itself_pass() {
        let policy = Policy::new(
            web(
                Some(vec![Allow {
                    peers: Some(vec![block("10.42.0.7/32", &[])]),
                    ports: Some(vec![tcp(80)]),
                }]),
                None,
            ),
            None,
        );
        let pod = ip("10.42.0.5");
        assert!(policy.ingress_allows(pod, Some(ip("10.42.0.7")), Proto::Tcp, 80));
        assert!(!policy.ingress_allows(pod, Some(ip("10.42.0.7")), Proto::Tcp, 81));
        assert!(!policy.ingress_allows(pod, Some(ip("10.42.0.8")), Proto::Tcp, 80));
        assert!(policy.ingress_allows(pod, None, Proto::Tcp, 22), "a node");
        assert!(
            policy.ingress_allows(pod, Some(pod), Proto::Tcp, 22),
            "itself"
        );
        assert!(
            policy.egress_allows(pod, ip("1.1.1.1"), Proto::Udp, 53),
            "not isolated"
        );
        // Default deny for egress: no rule at all.
        let deny = Policy::new(web(None, Some(Vec::new())), None);
        assert!(!deny.egress_allows(pod, ip("10.42.0.7"), Proto::Tcp, 80));
        assert!(deny.ingress_allows(pod, Some(ip("10.42.0.7")), Proto::Tcp, 80));
        // Another pod is not concerned.
        assert!(deny.egress_allows(ip("10.42.0.9"), ip("10.42.0.7"), Proto::Tcp, 80));
    }

    #[test]
    fn render_lays_out_per_pod_chains_with_exceptions_and_the_forward_accept() {
        let policy = web(
            Some(vec![
                Allow {
                    peers: Some(vec![block("10.0.0.0/8", &["10.1.0.0/16"])]),
                    ports: Some(vec![
                        tcp(80),
                        Ports {
                            protocol: Proto::Udp,
                            port: Some(5000),
                            end_port: Some(5010),
                        },
                    ]),
                },
                Allow {
                    peers: None,
                    ports: None,
                },
            ]),
            Some(Vec::new()),
        );
        let stale = BTreeSet::from(["EDGEMESH-NPI-OLDOLDOLDOLD".to_string()]);
        let (text, chains) = render(
            "EDGEMESH",
            &policy,
            Some("10.42.0.0/24".parse().unwrap()),
            &stale,
        );
        assert_eq!(chains.len(), 3, "{chains:?}");
        assert!(chains.iter().all(|c| c.len() <= 28));
        let npi = chains.iter().find(|c| c.contains("-NPI-")).unwrap();
        let npe = chains.iter().find(|c| c.contains("-NPE-")).unwrap();
        let npx = chains.iter().find(|c| c.contains("-NPX-")).unwrap();
        for line in [
            "-A EDGEMESH-NETPOL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_string(),
            format!("-A EDGEMESH-NETPOL -d 10.42.0.5/32 -m comment --comment \"ingress of shop/web\" -j {npi}"),
            format!("-A EDGEMESH-NETPOL -s 10.42.0.5/32 -m comment --comment \"egress of shop/web\" -j {npe}"),
            format!("-A {npi} -s 10.42.0.5/32 -j RETURN"),
            format!("-A {npi} -s 10.0.0.0/8 -p tcp -m tcp --dport 80 -j {npx}"),
            format!("-A {npi} -s 10.0.0.0/8 -p udp -m udp --dport 5000:5010 -j {npx}"),
            format!("-A {npi} -m mark --mark 0x10000/0x10000 -j RETURN"),
            format!("-A {npx} -s 10.1.0.0/16 -j RETURN"),
            format!("-A {npx} -j MARK --set-xmark 0x10000/0x10000"),
            format!("-A {npi} -j RETURN"),
            format!("-A {npe} -d 10.42.0.5/32 -j RETURN"),
            format!("-A {npe} -m comment --comment \"egress of shop/web\" -j REJECT --reject-with icmp-port-unreachable"),
            "-A EDGEMESH-NETPOL -j MARK --set-xmark 0x0/0x10000".to_string(),
            "-A EDGEMESH-FORWARD -s 10.42.0.0/24 -m comment --comment \"pod traffic the policy let through\" -j ACCEPT".to_string(),
            "-X EDGEMESH-NPI-OLDOLDOLDOLD".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // The ingress chain's mark is cleared before the egress chain reads it.
        let ingress_jump = text.find(&format!("-j {npi}")).unwrap();
        let egress_jump = text.find(&format!("-j {npe}")).unwrap();
        let first_clear = text.find("-A EDGEMESH-NETPOL -j MARK").unwrap();
        let clear = ingress_jump
            + text[ingress_jump..]
                .find("-A EDGEMESH-NETPOL -j MARK")
                .unwrap();
        assert!(first_clear < ingress_jump, "the bit starts clear: {text}");
        assert!(clear < egress_jump, "{text}");
        // Nothing selected: only the fixed chains, the old ones deleted.
        let (text, chains) = render("EDGEMESH", &NodePolicy::default(), None, &stale);
        assert!(chains.is_empty());
        assert!(text.contains("-X EDGEMESH-NPI-OLDOLDOLDOLD"));
        assert!(!text.contains("EDGEMESH-FORWARD -s"));
    }
}
