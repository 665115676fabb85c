//! The node's service rules in the kernel, laid out as kube-proxy's iptables mode lays them
//! out, under one prefix (`EDGEMESH` by default) owned by the proxy alone:
//!
//! - nat `EDGEMESH` (from PREROUTING and OUTPUT): a service's cluster IP and port jump to its
//!   `-SVC-` chain, its external IPs (`spec.externalIPs`, a LoadBalancer's ingress IPs) to its
//!   `-EXT-` chain, and anything addressed to the node itself goes on to `EDGEMESH-NODEPORTS`
//!   (every node address, `127.0.0.1` included, as K3s users expect).
//! - `-SVC-`/`-EXT-` pick an endpoint (round robin with `statistic --mode nth`, or random;
//!   `sessionAffinity: ClientIP` with `recent`): an endpoint on this node is a `-SEP-` chain
//!   that DNATs to it in the kernel; the endpoints on other nodes are one `-RMT-` bucket,
//!   weighted by their number, that redirects to the mesh proxy's listener for the port.
//! - `externalTrafficPolicy: Local` keeps external traffic on this node's endpoints and its
//!   source address; otherwise external traffic is marked and masqueraded in
//!   `EDGEMESH-POST` (from POSTROUTING), as is a pod reaching itself through its service.
//! - filter `EDGEMESH-GUARD` (INPUT) keeps the proxy's listeners to redirected traffic and
//!   `127.0.0.0/8` to local senders (the node answers node ports on localhost, which needs
//!   `route_localnet`); `EDGEMESH-REJECT` (INPUT, FORWARD, OUTPUT) refuses connections to a
//!   service port with no endpoint to take them.
//!
//! [`render`] is pure: the whole ruleset for a service table, one `iptables-restore --noflush`
//! transaction that also deletes the chains of services that went away. [`Netfilter`] runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;

use tokio::io::AsyncWriteExt;

use crate::services::{Backend, Balancing, ServicePort};

/// The packet mark that asks `-POST` to masquerade (kube-proxy's bit).
const MASQ_BIT: &str = "0x4000";
/// iptables' limit on a chain name.
const MAX_CHAIN: usize = 28;
/// The comment on the rules that jump from the built-in chains to the proxy's.
const HOOK_COMMENT: &str = "edgesite mesh: services";
/// Dynamic chains' kinds: per service port (`SVC`, `EXT`, `RMT`) and per endpoint (`SEP`).
const KINDS: [&str; 4] = ["SVC", "EXT", "SEP", "RMT"];

/// One service port as the proxy serves it on this node.
pub struct Entry<'a> {
    pub port: &'a ServicePort,
    /// The proxy's listener for the port's endpoints on other nodes.
    pub listener: u16,
}

/// A ruleset for `iptables-restore --noflush`, and the dynamic nat chains it leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub chains: BTreeSet<String>,
}

/// The chains under `prefix`: fixed ones and the names of dynamic ones.
struct Names<'a> {
    prefix: &'a str,
}

impl Names<'_> {
    fn services(&self) -> String {
        self.prefix.to_string()
    }
    fn node_ports(&self) -> String {
        format!("{}-NODEPORTS", self.prefix)
    }
    fn post(&self) -> String {
        format!("{}-POST", self.prefix)
    }
    fn guard(&self) -> String {
        format!("{}-GUARD", self.prefix)
    }
    fn reject(&self) -> String {
        format!("{}-REJECT", self.prefix)
    }

    /// A dynamic chain: `{prefix}-{kind}-{hash of what it is for}`, at most 28 characters.
    fn dynamic(&self, kind: &str, what: &str) -> String {
        let head = format!("{}-{kind}-", self.prefix);
        let room = MAX_CHAIN.saturating_sub(head.len()).clamp(4, 13);
        format!("{head}{}", &hash32(what)[..room])
    }

    fn is_dynamic(&self, chain: &str) -> bool {
        KINDS
            .iter()
            .any(|kind| chain.starts_with(&format!("{}-{kind}-", self.prefix)))
    }
}

/// FNV-1a (64 bits) in base32 (`A-Z2-7`, 13 characters): stable across versions, unlike std's
/// hasher.
pub(crate) fn hash32(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..13)
        .map(|i| ALPHABET[((hash >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// Where a selection sends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    chain: String,
    /// How many endpoints the target stands for (a remote bucket: all of the other nodes').
    weight: usize,
}

/// The rules of one nat chain that pick among `targets`, in order: affine clients first, then
/// each target with its share of what is left; the last takes the rest.
fn select(out: &mut String, chain: &str, targets: &[Target], port: &ServicePort, comment: &str) {
    if let Some(timeout) = port.affinity {
        for target in targets {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment {comment} -m recent --name {} --mask 255.255.255.255 --rsource --rcheck --seconds {} --reap -j {}",
                target.chain,
                timeout.as_secs().max(1),
                target.chain
            );
        }
    }
    let total: usize = targets.iter().map(|t| t.weight).sum();
    let mut taken = 0;
    for (i, target) in targets.iter().enumerate() {
        let left = total - taken;
        if i + 1 == targets.len() {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment {comment} -j {}",
                target.chain
            );
        } else {
            // Only the last target (the remote bucket) weighs more than one.
            let matcher = match port.balancing {
                Balancing::RoundRobin => {
                    format!("-m statistic --mode nth --every {left} --packet 0")
                }
                Balancing::Random => format!(
                    "-m statistic --mode random --probability {:.10}",
                    target.weight as f64 / left as f64
                ),
            };
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment {comment} {matcher} -j {}",
                target.chain
            );
        }
        taken += target.weight;
    }
}

/// A comment iptables takes as one word, quoted: the service port's name.
fn comment_of(port: &ServicePort) -> String {
    let name: String = format!("{}/{}:{}", port.namespace, port.service, port.port_name)
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .take(200)
        .collect();
    format!("\"{name}\"")
}

/// The whole ruleset for `entries` on node `node`. `existing`: dynamic chains the kernel has now
/// (those no longer wanted are flushed and deleted in the same transaction).
pub fn render(
    prefix: &str,
    node: &str,
    entries: &[Entry<'_>],
    existing: &BTreeSet<String>,
) -> Rendered {
    let names = Names { prefix };
    let mark = format!("-j MARK --set-xmark {MASQ_BIT}/{MASQ_BIT}");
    let mut chains = BTreeSet::new();
    let mut nat = String::new();
    let mut dynamic = String::new();
    let mut node_ports = String::new();
    let mut guard = String::new();
    let mut reject = String::new();
    let _ = writeln!(
        guard,
        "-A {} -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m comment --comment \"localhost:local-senders-only\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        names.guard()
    );

    let mut entries: Vec<&Entry<'_>> = entries
        .iter()
        .filter(|e| e.port.cluster_ip.is_ipv4())
        .collect();
    entries.sort_by_key(|e| (e.port.cluster_ip, e.port.port, e.port.protocol));
    for entry in entries {
        let port = entry.port;
        let proto = port.protocol.as_str();
        let comment = comment_of(port);
        let what = format!(
            "{}/{}:{}/{}/{}:{}",
            port.namespace, port.service, port.port_name, proto, port.cluster_ip, port.port
        );
        let _ = writeln!(
            guard,
            "-A {} -p {proto} -m {proto} --dport {} -m comment --comment {comment} -m conntrack ! --ctstate DNAT -j DROP",
            names.guard(),
            entry.listener
        );

        let local: Vec<&Backend> = port.backends.iter().filter(|b| b.is_local(node)).collect();
        let remote = port.backends.len() - local.len();
        let mut local_targets = Vec::new();
        for backend in &local {
            let sep = names.dynamic("SEP", &format!("{what}>{}:{}", backend.ip, backend.port));
            chains.insert(sep.clone());
            let _ = writeln!(
                dynamic,
                "-A {sep} -s {}/32 -m comment --comment {comment} {mark}",
                backend.ip
            );
            let recent = port
                .affinity
                .map(|_| format!(" -m recent --set --name {sep} --mask 255.255.255.255 --rsource"))
                .unwrap_or_default();
            let _ = writeln!(
                dynamic,
                "-A {sep} -p {proto} -m comment --comment {comment}{recent} -m {proto} -j DNAT --to-destination {}",
                std::net::SocketAddr::new(backend.ip, backend.port)
            );
            local_targets.push(Target {
                chain: sep,
                weight: 1,
            });
        }
        let mut cluster_targets = local_targets.clone();
        if remote > 0 {
            let rmt = names.dynamic("RMT", &what);
            chains.insert(rmt.clone());
            // Redirected traffic is delivered here, not masqueraded.
            let _ = writeln!(
                dynamic,
                "-A {rmt} -m comment --comment {comment} -j MARK --set-xmark 0x0/{MASQ_BIT}"
            );
            let recent = port
                .affinity
                .map(|_| format!(" -m recent --set --name {rmt} --mask 255.255.255.255 --rsource"))
                .unwrap_or_default();
            let _ = writeln!(
                dynamic,
                "-A {rmt} -p {proto} -m comment --comment {comment}{recent} -m {proto} -j REDIRECT --to-ports {}",
                entry.listener
            );
            cluster_targets.push(Target {
                chain: rmt,
                weight: remote,
            });
        }
        let internal = if port.internal_local {
            &local_targets
        } else {
            &cluster_targets
        };
        let external = if port.external_local {
            &local_targets
        } else {
            &cluster_targets
        };

        // The cluster IP.
        let cluster = format!(
            "-d {}/32 -p {proto} -m {proto} --dport {}",
            port.cluster_ip, port.port
        );
        if internal.is_empty() {
            let _ = writeln!(
                reject,
                "-A {} {cluster} -m comment --comment {comment} -j REJECT",
                names.reject()
            );
        } else {
            let svc = names.dynamic("SVC", &what);
            chains.insert(svc.clone());
            let _ = writeln!(
                nat,
                "-A {} {cluster} -m comment --comment {comment} -j {svc}",
                names.services()
            );
            select(&mut dynamic, &svc, internal, port, &comment);
        }

        // Node ports and external IPs.
        let external_ips: Vec<IpAddr> = port
            .external_ips
            .iter()
            .filter(|ip| ip.is_ipv4())
            .copied()
            .collect();
        if port.node_port.is_none() && external_ips.is_empty() {
            continue;
        }
        let mut frontends = Vec::new();
        for ip in &external_ips {
            frontends.push((
                names.services(),
                format!("-d {ip}/32 -p {proto} -m {proto} --dport {}", port.port),
            ));
        }
        if let Some(node_port) = port.node_port {
            frontends.push((
                names.node_ports(),
                format!("-p {proto} -m {proto} --dport {node_port}"),
            ));
        }
        if external.is_empty() {
            for (from, matcher) in &frontends {
                let local = if *from == names.node_ports() {
                    "-m addrtype --dst-type LOCAL "
                } else {
                    ""
                };
                let _ = writeln!(
                    reject,
                    "-A {} {local}{matcher} -m comment --comment {comment} -j REJECT",
                    names.reject()
                );
            }
            continue;
        }
        let ext = names.dynamic("EXT", &what);
        chains.insert(ext.clone());
        if port.external_local {
            // The client's address is kept; only localhost senders must be masqueraded.
            let _ = writeln!(
                dynamic,
                "-A {ext} -s 127.0.0.0/8 -m comment --comment {comment} {mark}"
            );
        } else {
            let _ = writeln!(dynamic, "-A {ext} -m comment --comment {comment} {mark}");
        }
        if external == internal {
            let _ = writeln!(
                dynamic,
                "-A {ext} -m comment --comment {comment} -j {}",
                names.dynamic("SVC", &what)
            );
        } else {
            select(&mut dynamic, &ext, external, port, &comment);
        }
        for (from, matcher) in &frontends {
            let out = if *from == names.node_ports() {
                &mut node_ports
            } else {
                &mut nat
            };
            let _ = writeln!(
                out,
                "-A {from} {matcher} -m comment --comment {comment} -j {ext}"
            );
        }
    }
    let _ = writeln!(
        nat,
        "-A {} -m comment --comment \"node-ports\" -m addrtype --dst-type LOCAL -j {}",
        names.services(),
        names.node_ports()
    );

    let mut text = String::from("*nat\n");
    for chain in [names.services(), names.node_ports(), names.post()] {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    let stale: Vec<&String> = existing
        .iter()
        .filter(|c| names.is_dynamic(c) && !chains.contains(*c))
        .collect();
    for chain in chains.iter().chain(stale.iter().copied()) {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    text.push_str(&nat);
    text.push_str(&node_ports);
    text.push_str(&dynamic);
    let post = names.post();
    let _ = writeln!(
        text,
        "-A {post} -m mark ! --mark {MASQ_BIT}/{MASQ_BIT} -j RETURN\n-A {post} -j MARK --xor-mark {MASQ_BIT}\n-A {post} -m comment --comment \"service-traffic-returning-through-this-node\" -j MASQUERADE --random-fully"
    );
    for chain in &stale {
        let _ = writeln!(text, "-X {chain}");
    }
    text.push_str("COMMIT\n*filter\n");
    let _ = writeln!(
        text,
        ":{} - [0:0]\n:{} - [0:0]",
        names.guard(),
        names.reject()
    );
    text.push_str(&guard);
    text.push_str(&reject);
    text.push_str("COMMIT\n");
    Rendered { text, chains }
}

/// The proxy's rules in the kernel: installed once, then replaced whole on every change.
pub struct Netfilter {
    prefix: String,
    /// Dynamic nat chains the kernel has.
    chains: BTreeSet<String>,
    /// The UDP frontends DNATed in the kernel and their endpoints, as last written.
    udp: UdpFrontends,
    /// The conntrack tool was found missing (said once).
    no_conntrack: bool,
}

/// UDP frontends (cluster or external IP and port; a node port as `None` and the port) and the
/// endpoints on this node they are DNATed to.
pub type UdpFrontends = BTreeMap<(Option<IpAddr>, u16), BTreeSet<IpAddr>>;

/// The UDP frontends of `entries` whose traffic the kernel DNATs to endpoints on `node`.
pub fn udp_frontends(node: &str, entries: &[Entry<'_>]) -> UdpFrontends {
    let mut out = UdpFrontends::new();
    for entry in entries {
        let port = entry.port;
        if port.protocol != crate::services::Protocol::Udp || !port.cluster_ip.is_ipv4() {
            continue;
        }
        let local: BTreeSet<IpAddr> = port
            .backends
            .iter()
            .filter(|b| b.is_local(node))
            .map(|b| b.ip)
            .collect();
        out.insert((Some(port.cluster_ip), port.port), local.clone());
        for ip in port.external_ips.iter().filter(|ip| ip.is_ipv4()) {
            out.insert((Some(*ip), port.port), local.clone());
        }
        if let Some(node_port) = port.node_port {
            out.insert((None, node_port), local.clone());
        }
    }
    out
}

/// `conntrack -D` arguments for the UDP flows the kernel would keep sending to an endpoint
/// that left, or keep answering without DNAT although a frontend now has endpoints (as
/// kube-proxy clears them): UDP has no connection to end.
pub fn stale_udp(before: &UdpFrontends, after: &UdpFrontends) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let frontend = |ip: &Option<IpAddr>, port: u16| {
        let mut args = vec!["-D".to_string(), "-p".into(), "udp".into()];
        if let Some(ip) = ip {
            args.extend(["--orig-dst".to_string(), ip.to_string()]);
        }
        args.extend(["--orig-port-dst".to_string(), port.to_string()]);
        args
    };
    for ((ip, port), now) in after {
        let was = before.get(&(*ip, *port));
        if was.is_none_or(|w| w.is_empty()) && !now.is_empty() {
            out.push(frontend(ip, *port));
            continue;
        }
        for gone in was.into_iter().flatten().filter(|e| !now.contains(e)) {
            let mut args = frontend(ip, *port);
            args.extend(["--dst-nat".to_string(), gone.to_string()]);
            out.push(args);
        }
    }
    for ((ip, port), was) in before {
        if !after.contains_key(&(*ip, *port)) && !was.is_empty() {
            out.push(frontend(ip, *port));
        }
    }
    out
}

impl Netfilter {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            chains: BTreeSet::new(),
            udp: UdpFrontends::new(),
            no_conntrack: false,
        }
    }

    /// Where the fixed chains are jumped to from: (table, built-in chain, chain).
    fn hooks(&self) -> Vec<(&'static str, &'static str, String)> {
        let names = Names {
            prefix: &self.prefix,
        };
        vec![
            ("nat", "PREROUTING", names.services()),
            ("nat", "OUTPUT", names.services()),
            ("nat", "POSTROUTING", names.post()),
            ("filter", "INPUT", names.guard()),
            ("filter", "INPUT", names.reject()),
            ("filter", "FORWARD", names.reject()),
            ("filter", "OUTPUT", names.reject()),
        ]
    }

    /// Creates the chains (dropping what a previous run left), hooks them in and sets the
    /// kernel switches the rules need.
    pub async fn install(&mut self, node: &str) -> anyhow::Result<()> {
        switches();
        let names = Names {
            prefix: &self.prefix,
        };
        self.chains = chains_in("nat", |c| names.is_dynamic(c)).await?;
        self.sync(node, &[]).await.map_err(|e| {
            anyhow::anyhow!("cannot create the proxy's iptables chains (is this root?): {e}")
        })?;
        for (table, builtin, chain) in self.hooks() {
            hook(table, builtin, Place::First, HOOK_COMMENT, &chain).await?;
        }
        Ok(())
    }

    /// Replaces every rule in one transaction.
    pub async fn sync(&mut self, node: &str, entries: &[Entry<'_>]) -> io::Result<()> {
        let rendered = render(&self.prefix, node, entries, &self.chains);
        run(
            "iptables-restore",
            &["-w", "5", "--noflush"],
            Some(&rendered.text),
        )
        .await?;
        self.chains = rendered.chains;
        let udp = udp_frontends(node, entries);
        for args in stale_udp(&self.udp, &udp) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            // conntrack exits 1 when nothing matched: only a missing tool is worth a word.
            if let Err(error) = run("conntrack", &args, None).await
                && error.to_string().starts_with("running conntrack")
                && !self.no_conntrack
            {
                self.no_conntrack = true;
                tracing::warn!(%error, "UDP flows to removed endpoints are not cleared (apt-get install conntrack)");
            }
        }
        self.udp = udp;
        Ok(())
    }

    /// Takes every rule and chain out of the kernel.
    pub async fn remove(&mut self, node: &str) {
        if let Err(error) = self.sync(node, &[]).await {
            tracing::warn!(%error, "cannot empty the proxy's iptables chains");
        }
        let names = Names {
            prefix: &self.prefix,
        };
        for (table, builtin, chain) in self.hooks() {
            unhook(table, builtin, HOOK_COMMENT, &chain).await;
        }
        for (table, chain) in [
            ("nat", names.services()),
            ("nat", names.node_ports()),
            ("nat", names.post()),
            ("filter", names.guard()),
            ("filter", names.reject()),
        ] {
            let _ = run("iptables", &["-w", "5", "-t", table, "-F", &chain], None).await;
            let _ = run("iptables", &["-w", "5", "-t", table, "-X", &chain], None).await;
        }
    }
}

/// The chains of `table` the kernel has now whose names `wanted` accepts.
pub(crate) async fn chains_in(
    table: &str,
    wanted: impl Fn(&str) -> bool,
) -> io::Result<BTreeSet<String>> {
    let saved = run("iptables-save", &["-t", table], None).await?;
    Ok(saved
        .lines()
        .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next())
        .filter(|c| wanted(c))
        .map(str::to_string)
        .collect())
}

/// Where a jump from a built-in chain goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    First,
    Last,
}

/// Jumps from `table`'s built-in chain `builtin` to `chain` (a rule marked with `comment`),
/// unless that jump is there already.
pub(crate) async fn hook(
    table: &str,
    builtin: &str,
    place: Place,
    comment: &str,
    chain: &str,
) -> anyhow::Result<()> {
    let jump = ["-m", "comment", "--comment", comment, "-j", chain];
    let check: Vec<&str> = ["-w", "5", "-t", table, "-C", builtin]
        .into_iter()
        .chain(jump)
        .collect();
    if run("iptables", &check, None).await.is_ok() {
        return Ok(());
    }
    let at: &[&str] = match place {
        Place::First => &["-w", "5", "-t", table, "-I", builtin, "1"],
        Place::Last => &["-w", "5", "-t", table, "-A", builtin],
    };
    let add: Vec<&str> = at.iter().copied().chain(jump).collect();
    run("iptables", &add, None)
        .await
        .map_err(|e| anyhow::anyhow!("cannot hook {chain} into {builtin}: {e}"))?;
    Ok(())
}

/// Takes the jump [`hook`] made out again (nothing if it is not there).
pub(crate) async fn unhook(table: &str, builtin: &str, comment: &str, chain: &str) {
    let args = [
        "-w",
        "5",
        "-t",
        table,
        "-D",
        builtin,
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        chain,
    ];
    let _ = run("iptables", &args, None).await;
}

/// Runs an iptables tool; its stdout, or an error with its stderr.
pub(crate) async fn run(program: &str, args: &[&str], input: Option<&str>) -> io::Result<String> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            let package = if program.starts_with("iptables") {
                "iptables"
            } else {
                program
            };
            io::Error::other(format!(
                "running {program} (install the {package} package): {e}"
            ))
        })?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        stdin.write_all(input.as_bytes()).await?;
    }
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{program}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Kernel switches the rules rely on: node ports on `127.0.0.1` are DNATed to pods only with
/// `route_localnet` (the guard chain keeps 127/8 to local senders, as kube-proxy does), and a
/// pod reaching a pod on the same bridge through a service needs bridged traffic to pass
/// iptables (`br_netfilter`).
fn switches() {
    if let Err(error) = std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1") {
        tracing::warn!(%error, "cannot set route_localnet: node ports will not answer on 127.0.0.1");
    }
    let bridge = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    match std::fs::read_to_string(bridge) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => {
            if let Err(error) = std::fs::write(bridge, "1") {
                tracing::warn!(%error, "cannot set bridge-nf-call-iptables: pods may not reach pods on their own node through a service");
            }
        }
        Err(_) => tracing::warn!(
            "bridged traffic does not pass iptables (modprobe br_netfilter): pods may not reach pods on their own node through a service"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::services::Protocol;

    fn backend(ip: &str, port: u16, node: &str) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
            node: Some(node.into()),
        }
    }

    fn port(backends: Vec<Backend>) -> ServicePort {
        ServicePort {
            namespace: "shop".into(),
            service: "web".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            cluster_ip: "10.43.0.10".parse().unwrap(),
            port: 80,
            backends,
            balancing: Balancing::RoundRobin,
            affinity: None,
            node_port: None,
            external_ips: Vec::new(),
            external_local: false,
            internal_local: false,
            health_check_port: None,
        }
    }

    fn rules(port: &ServicePort) -> Rendered {
        render(
            "EDGEMESH",
            "a",
            &[Entry {
                port,
                listener: 40000,
            }],
            &BTreeSet::new(),
        )
    }

    /// The rules of one chain (without the `-A chain` head).
    fn chain_of(rendered: &Rendered, chain: &str) -> Vec<String> {
        let head = format!("-A {chain} ");
        rendered
            .text
            .lines()
            .filter_map(|l| l.strip_prefix(&head))
            .map(|l| {
                // Comments make the assertions long; they are checked once below.
                let mut words: Vec<&str> = l.split_whitespace().collect();
                while let Some(i) = words.iter().position(|w| *w == "--comment") {
                    words.drain(i - 2..i + 2);
                }
                words.join(" ")
            })
            .collect()
    }

    fn jump_of(rules: &[String], matcher: &str) -> String {
        rules
            .iter()
            .find(|r| r.contains(matcher))
            .and_then(|r| r.split("-j ").nth(1))
            .unwrap_or_else(|| panic!("no rule with {matcher} in {rules:?}"))
            .to_string()
    }

    #[test]
    fn chain_names_fit_iptables_and_stay_stable() {
        let names = Names { prefix: "EDGEMESH" };
        let chain = names.dynamic("SVC", "shop/web:http/tcp/10.43.0.10:80");
        assert!(chain.len() <= MAX_CHAIN, "{chain}");
        assert_eq!(
            chain,
            names.dynamic("SVC", "shop/web:http/tcp/10.43.0.10:80")
        );
        assert_ne!(
            chain,
            names.dynamic("SVC", "shop/web:http/tcp/10.43.0.11:80")
        );
        assert_eq!(hash32(""), "FZIECCS44U4XM"); // FNV-1a offset basis, fixed forever
        let long = Names {
            prefix: "A-VERY-LONG-PREFIX",
        };
        assert_eq!(long.dynamic("SEP", "x").len(), MAX_CHAIN);
    }

    #[test]
    fn local_endpoints_are_dnated_and_remote_ones_share_a_weighted_bucket() {
        let port = port(vec![
            backend("10.42.0.5", 8080, "a"),
            backend("10.42.0.6", 8080, "a"),
            backend("10.42.1.5", 8080, "b"),
            backend("10.42.2.5", 8080, "c"),
        ]);
        let rendered = rules(&port);
        let top = chain_of(&rendered, "EDGEMESH");
        let svc = jump_of(&top, "-d 10.43.0.10/32 -p tcp -m tcp --dport 80");
        assert!(svc.starts_with("EDGEMESH-SVC-"));
        let select = chain_of(&rendered, &svc);
        assert_eq!(select.len(), 3, "{select:?}");
        assert!(
            select[0].starts_with("-m statistic --mode nth --every 4 --packet 0 -j EDGEMESH-SEP-")
        );
        assert!(
            select[1].starts_with("-m statistic --mode nth --every 3 --packet 0 -j EDGEMESH-SEP-")
        );
        assert!(select[2].starts_with("-j EDGEMESH-RMT-"), "{select:?}");
        let sep = select[0].rsplit(' ').next().unwrap();
        assert_eq!(
            chain_of(&rendered, sep),
            [
                "-s 10.42.0.5/32 -j MARK --set-xmark 0x4000/0x4000",
                "-p tcp -m tcp -j DNAT --to-destination 10.42.0.5:8080"
            ]
        );
        let rmt = select[2].rsplit(' ').next().unwrap();
        assert_eq!(
            chain_of(&rendered, rmt),
            [
                "-j MARK --set-xmark 0x0/0x4000",
                "-p tcp -m tcp -j REDIRECT --to-ports 40000"
            ]
        );
        // Node ports come last, for anything addressed to the node.
        assert_eq!(
            top.last().unwrap(),
            "-m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS"
        );
        assert!(rendered.text.contains("--comment \"shop/web:http\""));
        // The listener takes redirected traffic only.
        assert!(chain_of(&rendered, "EDGEMESH-GUARD").contains(
            &"-p tcp -m tcp --dport 40000 -m conntrack ! --ctstate DNAT -j DROP".to_string()
        ));
        assert_eq!(
            rendered.chains.len(),
            4,
            "SVC, two SEPs, RMT: {:?}",
            rendered.chains
        );
    }

    #[test]
    fn random_balancing_and_affinity() {
        let mut port = port(vec![
            backend("10.42.0.5", 8080, "a"),
            backend("10.42.1.5", 8080, "b"),
            backend("10.42.1.6", 8080, "b"),
        ]);
        port.balancing = Balancing::Random;
        port.affinity = Some(Duration::from_secs(600));
        let rendered = rules(&port);
        let top = chain_of(&rendered, "EDGEMESH");
        let select = chain_of(&rendered, &jump_of(&top, "10.43.0.10"));
        assert_eq!(select.len(), 4, "{select:?}");
        assert!(select[0].contains("-m recent --name EDGEMESH-SEP-"));
        assert!(select[0].contains("--rcheck --seconds 600 --reap -j EDGEMESH-SEP-"));
        assert!(select[1].contains("-m recent --name EDGEMESH-RMT-"));
        assert!(
            select[2].starts_with(
                "-m statistic --mode random --probability 0.3333333333 -j EDGEMESH-SEP-"
            )
        );
        assert!(select[3].starts_with("-j EDGEMESH-RMT-"));
        let sep = select[2].rsplit(' ').next().unwrap();
        assert!(chain_of(&rendered, sep)[1].contains(&format!("-m recent --set --name {sep} ")));
    }

    #[test]
    fn a_port_without_endpoints_is_rejected() {
        let mut port = port(Vec::new());
        port.node_port = Some(30080);
        port.external_ips = vec!["192.168.1.2".parse().unwrap()];
        let rendered = rules(&port);
        assert_eq!(
            chain_of(&rendered, "EDGEMESH-REJECT"),
            [
                "-d 10.43.0.10/32 -p tcp -m tcp --dport 80 -j REJECT",
                "-d 192.168.1.2/32 -p tcp -m tcp --dport 80 -j REJECT",
                "-m addrtype --dst-type LOCAL -p tcp -m tcp --dport 30080 -j REJECT",
            ]
        );
        assert!(rendered.chains.is_empty());
    }

    #[test]
    fn node_ports_and_external_ips_masquerade_unless_the_policy_is_local() {
        let mut port = port(vec![
            backend("10.42.0.5", 8080, "a"),
            backend("10.42.1.5", 8080, "b"),
        ]);
        port.node_port = Some(30080);
        port.external_ips = vec!["192.168.1.2".parse().unwrap()];
        let rendered = rules(&port);
        let top = chain_of(&rendered, "EDGEMESH");
        let svc = jump_of(&top, "-d 10.43.0.10/32");
        let ext = jump_of(&top, "-d 192.168.1.2/32 -p tcp -m tcp --dport 80");
        assert_eq!(
            jump_of(&chain_of(&rendered, "EDGEMESH-NODEPORTS"), "--dport 30080"),
            ext
        );
        assert_eq!(
            chain_of(&rendered, &ext),
            [
                "-j MARK --set-xmark 0x4000/0x4000".to_string(),
                format!("-j {svc}")
            ]
        );

        port.external_local = true;
        let rendered = rules(&port);
        let top = chain_of(&rendered, "EDGEMESH");
        let ext = chain_of(&rendered, &jump_of(&top, "-d 192.168.1.2/32"));
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert_eq!(ext[0], "-s 127.0.0.0/8 -j MARK --set-xmark 0x4000/0x4000");
        assert!(
            ext[1].starts_with("-j EDGEMESH-SEP-"),
            "local endpoints only: {ext:?}"
        );

        // No local endpoint: external traffic is refused here, the cluster IP still works.
        port.backends.remove(0);
        let rendered = rules(&port);
        let reject = chain_of(&rendered, "EDGEMESH-REJECT");
        assert_eq!(reject.len(), 2, "{reject:?}");
        assert!(
            jump_of(&chain_of(&rendered, "EDGEMESH"), "10.43.0.10").starts_with("EDGEMESH-SVC-")
        );
    }

    #[test]
    fn internal_traffic_policy_local_skips_other_nodes() {
        let mut port = port(vec![
            backend("10.42.0.5", 8080, "a"),
            backend("10.42.1.5", 8080, "b"),
        ]);
        port.internal_local = true;
        let rendered = rules(&port);
        let select = chain_of(
            &rendered,
            &jump_of(&chain_of(&rendered, "EDGEMESH"), "10.43.0.10"),
        );
        assert_eq!(select.len(), 1);
        assert!(select[0].starts_with("-j EDGEMESH-SEP-"));
        port.backends.remove(0);
        assert_eq!(chain_of(&rules(&port), "EDGEMESH-REJECT").len(), 1);
    }

    #[test]
    fn udp_flows_to_endpoints_that_left_are_cleared() {
        let mut dns = port(vec![
            backend("10.42.0.5", 53, "a"),
            backend("10.42.0.6", 53, "a"),
        ]);
        dns.protocol = Protocol::Udp;
        dns.node_port = Some(30053);
        let entry = |p: &ServicePort| {
            udp_frontends(
                "a",
                &[Entry {
                    port: p,
                    listener: 1,
                }],
            )
        };
        let before = entry(&dns);
        dns.backends.remove(0);
        let after = entry(&dns);
        let args: Vec<String> = stale_udp(&before, &after)
            .iter()
            .map(|a| a.join(" "))
            .collect();
        assert_eq!(
            args,
            [
                "-D -p udp --orig-port-dst 30053 --dst-nat 10.42.0.5",
                "-D -p udp --orig-dst 10.43.0.10 --orig-port-dst 80 --dst-nat 10.42.0.5",
            ]
        );
        // From no endpoint to one: flows conntracked before (refused) are cleared.
        let empty = entry(&port(Vec::new()));
        let mut none = port(Vec::new());
        none.protocol = Protocol::Udp;
        let first = entry(&dns);
        assert!(
            stale_udp(&entry(&none), &first)
                .iter()
                .any(|a| a.join(" ") == "-D -p udp --orig-dst 10.43.0.10 --orig-port-dst 80")
        );
        assert!(empty.is_empty(), "TCP ports have no UDP frontends");
        assert!(stale_udp(&first, &first).is_empty());
    }

    #[test]
    fn chains_of_services_gone_are_deleted_in_the_same_transaction() {
        let port = port(vec![backend("10.42.0.5", 8080, "a")]);
        let first = rules(&port);
        let empty = render("EDGEMESH", "a", &[], &first.chains);
        for chain in &first.chains {
            assert!(empty.text.contains(&format!(":{chain} - [0:0]\n")));
            assert!(empty.text.contains(&format!("-X {chain}\n")));
        }
        assert!(empty.chains.is_empty());
        // Someone else's chains are never touched.
        let foreign: BTreeSet<String> = ["KUBE-SVC-ABC".to_string()].into();
        assert!(!render("EDGEMESH", "a", &[], &foreign).text.contains("KUBE"));
    }
}
