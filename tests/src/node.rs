//! Real nodes for end-to-end tests: a private containerd per test (its own root, state and
//! socket), a test image built from Debian's `busybox-static`, and a real OCI registry
//! (Debian's `docker-registry`) on loopback.
//!
//! Each test takes a *slot* (a file lock) that gives it a cluster CIDR and bridge names no
//! other test uses at the same time, so tests run in parallel on one machine.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Site, free_port};

/// The image the harness builds and every node imports at start.
pub const BUSYBOX: &str = "edgesite.test/busybox:1.0";

const SLOTS: u32 = 120;

/// Fails, naming what is missing, when the machine cannot run real containers.
pub fn require_node_prerequisites() -> Result<()> {
    if !nix_is_root() {
        bail!("this test runs real containers and needs root (run tests/run.sh as root)");
    }
    for (bin, package) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("iptables", "iptables"),
    ] {
        if which(bin).is_none() {
            bail!(
                "{bin} is missing: install the {package} package (tests/run.sh installs it: apt-get install containerd runc containernetworking-plugins docker-registry busybox-static iptables)"
            );
        }
    }
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists()
            && !Path::new("/opt/cni/bin").join(plugin).exists()
        {
            bail!(
                "the CNI plugin {plugin} is missing: install containernetworking-plugins (tests/run.sh installs it)"
            );
        }
    }
    if !Path::new("/bin/busybox").exists() {
        bail!("/bin/busybox is missing: install busybox-static (tests/run.sh installs it)");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// A slot: an index no concurrent test holds (released when dropped).
pub struct Slot {
    _lock: File,
    pub index: u32,
}

impl Slot {
    pub fn take() -> Result<Slot> {
        let dir = std::env::temp_dir().join("edgesite-test-slots");
        std::fs::create_dir_all(&dir)?;
        let start = std::process::id() % SLOTS;
        for i in 0..SLOTS {
            let index = (start + i) % SLOTS;
            let file = File::create(dir.join(format!("{index}.lock")))?;
            if file.try_lock().is_ok() {
                return Ok(Slot { _lock: file, index });
            }
        }
        bail!("all {SLOTS} test slots are taken")
    }
}

/// A private containerd.
pub struct Runtime {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    pub slot: Slot,
    /// How many nodes this runtime serves so far (bridges and CIDRs per node).
    nodes: std::cell::Cell<u32>,
    /// The MQTT port of each node's EventBus.
    mqtt: std::cell::RefCell<std::collections::BTreeMap<String, u16>>,
    kubelet: std::cell::RefCell<std::collections::BTreeMap<String, u16>>,
}

impl Runtime {
    pub fn start() -> Result<Runtime> {
        require_node_prerequisites()?;
        let slot = Slot::take()?;
        // Short paths: containerd's socket path must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("es-ctd")
            .tempdir_in("/tmp")?;
        let socket = dir.path().join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{socket}\"\n[ttrpc]\n  address = \"{socket}.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            socket = socket.display(),
        );
        std::fs::write(dir.path().join("config.toml"), config)?;
        let mut rt = Runtime {
            dir,
            socket,
            child: None,
            slot,
            nodes: std::cell::Cell::new(0),
            mqtt: Default::default(),
            kubelet: Default::default(),
        };
        rt.spawn_containerd()?;
        Ok(rt)
    }

    fn spawn_containerd(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start containerd")?;
        self.child = Some(child);
        let rt = &*self;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ok = Command::new("ctr")
                .arg("--address")
                .arg(&rt.socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "containerd did not start; its log:\n{}",
            std::fs::read_to_string(rt.dir.path().join("containerd.log")).unwrap_or_default()
        )
    }

    /// Kills every task (SIGKILL), as a power cut does.
    fn kill_tasks(&self) {
        if let Ok(namespaces) = self.ctr("default", &["namespaces", "ls", "-q"]) {
            for ns in namespaces.lines() {
                if let Ok(tasks) = self.ctr(ns, &["tasks", "ls", "-q"]) {
                    for t in tasks.lines() {
                        let _ = self.ctr(ns, &["tasks", "kill", "-a", "-s", "SIGKILL", t]);
                    }
                    std::thread::sleep(Duration::from_millis(300));
                    for t in tasks.lines() {
                        let _ = self.ctr(ns, &["tasks", "delete", "-f", t]);
                    }
                }
            }
        }
    }

    /// A simulated power cycle of the machine `agent` runs on: the agent must be stopped
    /// already; every container process dies, containerd stops, everything mounted under the
    /// agent's data dir (network namespaces, tmpfs volumes) and the node's bridge, NAT rules and
    /// pod cgroups are gone; then containerd starts again with its stored containers and images,
    /// as after boot.
    pub fn reboot(&mut self, agent: &AgentProcess) -> Result<()> {
        self.kill_tasks();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // containerd's own state dir is a tmpfs on a real machine (/run/containerd).
        unmount_under(&self.dir.path().join("state"));
        let _ = std::fs::remove_dir_all(self.dir.path().join("state"));
        unmount_under(agent.dir.path());
        self.remove_nat_rules();
        for n in 0..self.nodes.get() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge(n)])
                .stderr(Stdio::null())
                .status();
        }
        self.spawn_containerd()
    }

    /// The bridge of the `n`-th node this runtime set up.
    pub fn bridge(&self, n: u32) -> String {
        format!("est{}n{n}", self.slot.index)
    }

    /// Flags that make a site's node agent use this runtime, with a bridge and a cluster
    /// CIDR of its own.
    pub fn node_flags(&self, node: &str) -> Vec<String> {
        let n = self.nodes.get();
        self.nodes.set(n + 1);
        vec![
            format!("--container-runtime-endpoint={}", self.socket.display()),
            format!("--containerd-namespace={node}"),
            format!("--cni-bridge={}", self.bridge(n)),
            format!("--node-name={node}"),
            format!(
                "--private-registry={}",
                self.dir.path().join("registries.yaml").display()
            ),
            format!("--mqtt-bind=127.0.0.1:{}", self.mqtt_port(node)),
            // Not the machine's 10250, which an installed site (or a kubelet) may hold.
            format!("--kubelet-port={}", self.kubelet_port(node)),
            // Nodes on the test machine share its network: the mesh (its port, DNS address
            // and iptables chain) runs only in the mesh tests' own namespaces; so does the
            // ingress (ports 80 and 443).
            "--disable-mesh".to_string(),
            "--disable-ingress".to_string(),
        ]
    }

    /// The port of `node`'s MQTT broker (EventBus), on 127.0.0.1.
    pub fn mqtt_port(&self, node: &str) -> u16 {
        *self
            .mqtt
            .borrow_mut()
            .entry(node.to_string())
            .or_insert_with(crate::free_port)
    }

    /// The port of `node`'s kubelet API (all addresses).
    pub fn kubelet_port(&self, node: &str) -> u16 {
        *self
            .kubelet
            .borrow_mut()
            .entry(node.to_string())
            .or_insert_with(crate::free_port)
    }

    /// Starts a site whose node agent runs containers here; the test image is dropped into
    /// its import folder first, so it is imported at start like an air-gapped site's.
    pub fn start_site(&self, extra: &[&str]) -> Result<Site> {
        let image = busybox_image()?;
        let mut flags = self.node_flags("node-a");
        flags.push(format!("--cluster-cidr={}", self.cluster_cidr()));
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Site::start_prepared(&flags, |data| {
            let images = data.join("agent").join("images");
            std::fs::create_dir_all(&images)?;
            std::fs::copy(&image, images.join("busybox.tar"))?;
            Ok(())
        })
    }

    /// Joins another node to `site`: an `edgesite agent` process with its own data dir and
    /// containerd namespace, joined with a token from `edgesite token create`.
    pub fn start_agent(&self, site: &Site, node: &str) -> Result<AgentProcess> {
        self.start_agent_via(site, node, &format!("https://127.0.0.1:{}", site.port), &[])
    }

    /// Like [`Runtime::start_agent`], with the agent told `server` as the site's URL (a
    /// [`crate::link::Link`] in front of it) and extra agent flags.
    pub fn start_agent_via(
        &self,
        site: &Site,
        node: &str,
        server: &str,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        self.spawn_agent(site, node, server, extra, None)
    }

    /// An agent in network namespace `netns`, with the mesh on (the namespace is its own
    /// network: port, DNS address and iptables chain are not shared).
    pub fn start_agent_in_netns(
        &self,
        site: &Site,
        node: &str,
        netns: &str,
        server: &str,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        self.spawn_agent(site, node, server, extra, Some(netns))
    }

    /// Flags for a node with the mesh and the ingress on (in a namespace of its own).
    pub fn node_flags_with_mesh(&self, node: &str) -> Vec<String> {
        let mut flags = self.node_flags(node);
        flags.retain(|f| f != "--disable-mesh" && f != "--disable-ingress");
        flags
    }

    fn spawn_agent(
        &self,
        site: &Site,
        node: &str,
        server: &str,
        extra: &[&str],
        netns: Option<&str>,
    ) -> Result<AgentProcess> {
        let out = Command::new(crate::edgesite_bin())
            .args(["token", "create", "--data-dir"])
            .arg(site.data_dir())
            .output()?;
        if !out.status.success() {
            bail!(
                "edgesite token create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        let dir = tempfile::Builder::new()
            .prefix("edgesite-agent")
            .tempdir()?;
        let images = dir.path().join("data").join("agent").join("images");
        std::fs::create_dir_all(&images)?;
        std::fs::copy(busybox_image()?, images.join("busybox.tar"))?;
        let mut agent = AgentProcess {
            dir,
            args: vec![
                "agent".into(),
                format!("--server={server}"),
                format!("--token={token}"),
            ],
            child: None,
            netns: netns.map(String::from),
        };
        agent.args.push(format!(
            "--data-dir={}",
            agent.dir.path().join("data").display()
        ));
        if netns.is_some() {
            agent.args.extend(self.node_flags_with_mesh(node));
        } else {
            agent.args.extend(self.node_flags(node));
        }
        agent.args.extend(extra.iter().map(|s| s.to_string()));
        agent.launch()?;
        Ok(agent)
    }

    /// Imports an image tarball into `node`'s containerd namespace with `edgesite images import`.
    pub fn import(&self, node: &str, tarball: &Path) -> Result<()> {
        let out = Command::new(crate::edgesite_bin())
            .args(["images", "import"])
            .arg(tarball)
            .arg(format!(
                "--container-runtime-endpoint={}",
                self.socket.display()
            ))
            .arg(format!("--containerd-namespace={node}"))
            .output()?;
        if !out.status.success() {
            bail!(
                "edgesite images import: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `ctr` against this containerd.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The cluster CIDR of this runtime's site (unique per slot).
    pub fn cluster_cidr(&self) -> String {
        let i = self.slot.index;
        format!("10.{}.{}.0/20", 100 + i / 16, (i % 16) * 16)
    }

    /// Removes the NAT rules of this runtime's pods (masquerade, hostPort DNAT) that pods still
    /// running when the test ended left behind.
    fn remove_nat_rules(&self) {
        let cidr = self.cluster_cidr();
        let (base, len) = cidr.split_once('/').unwrap_or((&cidr, "32"));
        let base: u32 = base
            .parse::<std::net::Ipv4Addr>()
            .map(u32::from)
            .unwrap_or(0);
        let mask = u32::MAX << (32 - len.parse::<u32>().unwrap_or(32));
        // Any IPv4 address in the rule inside the cluster CIDR makes it ours.
        let inside = |rule: &str| {
            rule.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|t| t.parse::<std::net::Ipv4Addr>().ok())
                .any(|ip| u32::from(ip) & mask == base)
        };
        let rules = || {
            Command::new("iptables-save")
                .args(["-t", "nat"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        // iptables-save quotes comments; the shell keeps them whole.
        let delete = |rule: &str| {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("iptables -w 5 -t nat -D {rule}"))
                .stderr(Stdio::null())
                .status();
        };
        // A pod's hostPort chain (CNI-DN-...) is ours when its DNAT rule is.
        let mut chains = std::collections::BTreeSet::new();
        for line in rules().lines() {
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            if inside(rule) {
                let chain = rule.split_whitespace().next().unwrap_or("");
                if chain.starts_with("CNI-DN-") {
                    chains.insert(chain.to_string());
                }
                delete(rule);
            }
        }
        // Then the jumps to those chains and the chains themselves (the portmap plugin's DEL
        // would have removed them with the pod).
        for line in rules().lines() {
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            let mut words = rule.split_whitespace();
            let chain = words.next().unwrap_or("");
            let target = rule.rsplit_once("-j ").map(|(_, t)| t.trim()).unwrap_or("");
            if chains.contains(chain) || chains.contains(target) {
                delete(rule);
            }
        }
        for chain in &chains {
            let _ = Command::new("iptables")
                .args(["-w", "5", "-t", "nat", "-X", chain])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Writes the nodes' registries.yaml.
    pub fn set_registries(&self, yaml: &str) -> Result<()> {
        std::fs::write(self.dir.path().join("registries.yaml"), yaml)?;
        Ok(())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Kill every task in every namespace, then containerd itself.
        self.kill_tasks();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount_under(self.dir.path());
        self.remove_nat_rules();
        for n in 0..self.nodes.get() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge(n)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Lazily unmounts everything mounted below `dir` (network namespaces, tmpfs volumes,
/// overlays) so the folder can be removed.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount")
            .args(["-l", &p])
            .stderr(Stdio::null())
            .status();
    }
}

/// The busybox layer: /bin/busybox with its applets, a passwd/group, and the usual dirs.
fn busybox_layer() -> Result<Vec<u8>> {
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut builder = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, std::io::empty())?;
        Ok(())
    };
    for (d, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("www", 0o755),
        ("proc", 0o755),
        ("sys", 0o755),
        ("dev", 0o755),
        ("var", 0o755),
    ] {
        dir(&mut builder, d, mode)?;
    }
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    let busybox = std::fs::read("/bin/busybox")?;
    file(&mut builder, "bin/busybox", &busybox, 0o755)?;
    file(
        &mut builder,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nweb:x:1000:1000::/www:/bin/sh\n",
        0o644,
    )?;
    file(
        &mut builder,
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\nweb:x:1000:\n",
        0o644,
    )?;
    file(
        &mut builder,
        "www/index.html",
        b"hello from edgesite\n",
        0o644,
    )?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        builder.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    Ok(builder.into_inner()?)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The layer, config and manifest of the test image.
pub struct ImageParts {
    pub layer: Vec<u8>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

pub fn busybox_parts() -> Result<ImageParts> {
    let layer = busybox_layer()?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]},
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha256_hex(&layer)), "size": layer.len()}],
    }))?;
    Ok(ImageParts {
        layer,
        config,
        manifest,
    })
}

/// Builds (once per target dir) an OCI-layout tarball of the test image named [`BUSYBOX`].
pub fn busybox_image() -> Result<PathBuf> {
    oci_tarball("busybox-oci.tar", BUSYBOX, || {
        let parts = busybox_parts()?;
        Ok((vec![parts.layer], parts.config, parts.manifest))
    })
}

/// The test image under another name (clients' own tests ask for `busybox:stable`, which this
/// machine cannot pull).
pub fn busybox_image_as(name: &str) -> Result<PathBuf> {
    let file: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    oci_tarball(&format!("{file}-oci.tar"), name, || {
        let parts = busybox_parts()?;
        Ok((vec![parts.layer], parts.config, parts.manifest))
    })
}

/// The test image with a statically linked kubectl at /bin/kubectl (an in-cluster client).
pub const KUBECTL_IMAGE: &str = "edgesite.test/kubectl:1.0";

/// Builds (once per target dir) an OCI-layout tarball of [`KUBECTL_IMAGE`]: the busybox layer
/// and a layer holding this machine's kubectl, which must be statically linked.
pub fn kubectl_image() -> Result<PathBuf> {
    oci_tarball("kubectl-oci.tar", KUBECTL_IMAGE, || {
        let which = Command::new("sh")
            .args(["-c", &format!("command -v {}", crate::kubectl_bin())])
            .output()?;
        let path = String::from_utf8_lossy(&which.stdout).trim().to_string();
        let binary = std::fs::read(&path).with_context(|| format!("read kubectl at {path:?}"))?;
        if binary
            .windows(14)
            .take(4096)
            .any(|w| w.starts_with(b"/lib64/ld-linux") || w.starts_with(b"/lib/ld-linux"))
        {
            bail!(
                "{path} is dynamically linked: the in-cluster test copies kubectl into a busybox image and needs a static one"
            );
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(binary.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, "bin/kubectl", binary.as_slice())?;
        let kubectl_layer = b.into_inner()?;
        let busybox = busybox_layer()?;
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": go_arch(), "os": "linux",
            "config": {"Env": ["PATH=/bin", "HOME=/tmp"], "Cmd": ["sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [
                format!("sha256:{}", sha256_hex(&busybox)),
                format!("sha256:{}", sha256_hex(&kubectl_layer)),
            ]},
        }))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha256_hex(&busybox)), "size": busybox.len()},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha256_hex(&kubectl_layer)), "size": kubectl_layer.len()},
            ],
        }))?;
        Ok((vec![busybox, kubectl_layer], config, manifest))
    })
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An OCI-layout tarball named `file` in the test-images dir (built once per target dir by
/// `parts`: layers, config, manifest), holding one image called `name`.
fn oci_tarball(
    file: &str,
    name: &str,
    parts: impl FnOnce() -> Result<(Vec<Vec<u8>>, Vec<u8>, Vec<u8>)>,
) -> Result<PathBuf> {
    let dir = crate::edgesite_bin()
        .parent()
        .map(|p| p.join("test-images"))
        .unwrap_or_else(|| std::env::temp_dir().join("edgesite-test-images"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(file);
    let lock = File::create(dir.join(".lock"))?;
    lock.lock()?;
    if path.exists() {
        return Ok(path);
    }
    let (layers, config, manifest) = parts()?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "1.0"},
        }],
    }))?;
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, name, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    for blob in layers.iter().chain([&config, &manifest]) {
        add(&format!("blobs/sha256/{}", sha256_hex(blob)), blob)?;
    }
    add("index.json", &index)?;
    let bytes = b.into_inner()?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Writes the test image as a `docker save` archive (manifest.json with RepoTags, a config
/// JSON and `<id>/layer.tar`) tagged `tag`.
pub fn busybox_docker_archive(path: &Path, tag: &str) -> Result<()> {
    let parts = busybox_parts()?;
    let config_name = format!("{}.json", sha256_hex(&parts.config));
    let layer_dir = sha256_hex(&parts.layer);
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [tag],
        "Layers": [format!("{layer_dir}/layer.tar")],
    }]))?;
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, name, data)?;
        Ok(())
    };
    add(&config_name, &parts.config)?;
    add(&format!("{layer_dir}/layer.tar"), &parts.layer)?;
    add("manifest.json", &manifest)?;
    std::fs::write(path, b.into_inner()?)?;
    Ok(())
}

/// A real OCI registry (Debian's docker-registry) on a loopback port.
pub struct Registry {
    _dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        Registry::start_with_auth(None)
    }

    /// A registry that wants HTTP basic authentication (htpasswd, bcrypt) as `user:password`.
    pub fn start_with_auth(auth: Option<(&str, &str)>) -> Result<Registry> {
        if which("docker-registry").is_none() {
            bail!(
                "docker-registry is missing: install the docker-registry package (tests/run.sh installs it)"
            );
        }
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            if which("htpasswd").is_none() {
                bail!("htpasswd is missing: install apache2-utils (tests/run.sh installs it)");
            }
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()?;
            std::fs::write(dir.path().join("htpasswd"), &out.stdout)?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: edgesite-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config)?;
        let log = File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start docker-registry")?;
        let registry = Registry {
            _dir: dir,
            child,
            port,
        };
        let ok = crate::eventually(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !ok {
            bail!("docker-registry did not listen on 127.0.0.1:{port}");
        }
        Ok(registry)
    }

    /// Pushes the test image as `127.0.0.1:<port>/<repository>:<tag>`; returns that name.
    pub fn push_busybox(&self, repository_tag: &str) -> Result<String> {
        self.push_busybox_as(repository_tag, oci_client::secrets::RegistryAuth::Anonymous)
    }

    /// Pushes with credentials.
    pub fn push_busybox_as(
        &self,
        repository_tag: &str,
        auth: oci_client::secrets::RegistryAuth,
    ) -> Result<String> {
        let name = format!("127.0.0.1:{}/{repository_tag}", self.port);
        let parts = busybox_parts()?;
        let reference: oci_client::Reference = name.parse()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        });
        let layer = oci_client::client::ImageLayer::new(
            parts.layer,
            "application/vnd.oci.image.layer.v1.tar".into(),
            None,
        );
        let config = oci_client::client::Config::new(
            parts.config,
            "application/vnd.oci.image.config.v1+json".into(),
            None,
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(client.push(&reference, &[layer], config, &auth, None))
            .context("push the test image")?;
        Ok(name)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `edgesite agent` process (killed when dropped; its pods' mounts are released).
pub struct AgentProcess {
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    netns: Option<String>,
}

impl AgentProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))?;
        let mut command = match &self.netns {
            Some(ns) => {
                // nsenter joins only the network namespace: `ip netns exec` would also give the
                // agent a mount namespace of its own, hiding the pod namespaces it bind-mounts
                // from containerd.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(crate::edgesite_bin());
                c
            }
            None => Command::new(crate::edgesite_bin()),
        };
        let child = command
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("EDGESITE_AGENT_LOG")
                    .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawn edgesite agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits up to `timeout` for the agent to exit by itself; its status, or `None` if it runs on.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- edgesite agent log ----\n{}", self.log());
        }
        self.kill();
        unmount_under(self.dir.path());
    }
}
