//! End-to-end harness: start real `edgesite server` processes in temporary data dirs on free
//! loopback ports, and drive them with the real `kubectl` and the `kube` client.
//!
//! Every test starts its own site, so tests run in parallel. The binary is found through
//! `EDGESITE_BIN`, else next to the test executable (`target/<profile>/edgesite`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod link;
pub mod netns;
pub mod node;
pub mod simnodes;
pub mod simsites;

pub fn edgesite_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EDGESITE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // A binary of this crate (the bench) sits next to it: target/<profile>/edgesite.
    let beside = exe.with_file_name("edgesite");
    if beside.exists() {
        return beside;
    }
    // target/<profile>/deps/<test> -> target/<profile>/edgesite
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("edgesite")
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up): a port picked there can be handed to
    // any process's outgoing connection between this check and the server binding it (an
    // agent's MQTT port was, once). A random start spreads parallel tests apart; 20000-29999
    // stays clear of node ports and of the ports an installed site holds.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919).wrapping_add(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0),
    );
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(389)) % 10_000) as u16;
        let free = |addr: &str| TcpListener::bind((addr, port)).is_ok();
        if free("127.0.0.1") && free("0.0.0.0") {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// One running site.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Extra `edgesite server` flags.
    extra: Vec<String>,
    /// The network namespace the server (and kubectl) run in, for topology tests.
    netns: Option<String>,
    /// A cloud hub (`edgesite cloudhub`) rather than a site.
    hub: bool,
    /// Extra environment of the server process (`HTTPS_PROXY`, ...).
    env: Vec<(String, String)>,
}

impl Site {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// What the server logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts a site in a new temporary folder and waits until it is ready.
    pub fn start() -> Result<Site> {
        Site::start_with(&[])
    }

    /// Starts a site with extra `edgesite server` flags. Without a container runtime the
    /// site runs the control plane only (`--disable-agent`); see [`node::Runtime`] for sites
    /// whose node agent runs real containers.
    pub fn start_with(extra: &[&str]) -> Result<Site> {
        let mut flags: Vec<&str> = extra.to_vec();
        if !flags
            .iter()
            .any(|f| f.starts_with("--container-runtime-endpoint"))
        {
            flags.push("--disable-agent");
        }
        Site::start_prepared(&flags, |_| Ok(()))
    }

    /// Starts a site (control plane only) whose server process has `env` too.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Result<Site> {
        let mut flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        flags.push("--disable-agent".into());
        let mut site = Site {
            dir: tempfile::Builder::new().prefix("edgesite-test").tempdir()?,
            port: free_port(),
            child: None,
            extra: flags,
            netns: None,
            hub: false,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        site.launch()?;
        Ok(site)
    }

    /// Starts a site after `prepare` has filled its data dir.
    pub fn start_prepared(
        extra: &[&str],
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Site> {
        let bin = edgesite_bin();
        if !bin.exists() {
            bail!(
                "the edgesite binary is missing at {} (build it with `cargo build --bins`, or set EDGESITE_BIN)",
                bin.display()
            );
        }
        let mut site = Site {
            dir: tempfile::Builder::new().prefix("edgesite-test").tempdir()?,
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: None,
            hub: false,
            env: Vec::new(),
        };
        prepare(&site.data_dir())?;
        site.launch()?;
        Ok(site)
    }

    /// Starts a cloud hub (`edgesite cloudhub`) in a new temporary folder; kubectl talks to the
    /// hub.
    pub fn start_hub(extra: &[&str]) -> Result<Site> {
        let mut hub = Site {
            dir: tempfile::Builder::new().prefix("edgesite-hub").tempdir()?,
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: None,
            hub: true,
            env: Vec::new(),
        };
        hub.launch()?;
        Ok(hub)
    }

    /// Starts a cloud hub inside network namespace `netns`, listening on all of its addresses;
    /// kubectl runs there too.
    pub fn start_hub_in_netns(netns: &str, extra: &[&str]) -> Result<Site> {
        let mut hub = Site {
            dir: tempfile::Builder::new().prefix("edgesite-hub").tempdir()?,
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: Some(netns.to_string()),
            hub: true,
            env: Vec::new(),
        };
        hub.launch()?;
        Ok(hub)
    }

    /// `edgesite cloudhub kubeconfig` on this hub for `site` (as `user`, default the hub's
    /// admin): a kubeconfig whose server is the hub's cluster proxy for the site.
    pub fn hub_site_kubeconfig(&self, site: &str, user: Option<&str>) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("{site}-{}.kubeconfig", user.unwrap_or("admin")));
        let mut command = Command::new(edgesite_bin());
        command
            .args(["cloudhub", "kubeconfig", "--site", site, "--data-dir"])
            .arg(self.data_dir())
            .arg("-o")
            .arg(&path);
        if let Some(user) = user {
            command.args(["--user", user]);
        }
        let out = command.output().expect("run edgesite cloudhub kubeconfig");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }

    /// Starts a site attached to this hub as `name` (no node agent) and waits until the hub's
    /// cluster proxy reaches it; the site and the kubeconfig that reaches it through the hub.
    pub fn attach_site(&self, name: &str) -> Result<(Site, PathBuf)> {
        let token = self.hub_token();
        let url = self.url();
        let site = Site::start_with(&[
            "--cloudhub",
            &url,
            "--cloudhub-token",
            &token,
            "--site-name",
            name,
            "--disable-agent",
        ])?;
        let kubeconfig = self.hub_site_kubeconfig(name, None);
        let reachable = eventually(Duration::from_secs(60), || {
            Command::new(kubectl_bin())
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "--raw", "/version"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !reachable {
            bail!(
                "site {name} never became reachable through the hub\n{}\n{}",
                self.log(),
                site.log()
            );
        }
        Ok((site, kubeconfig))
    }

    /// The HTTPS port this hub (or site) listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// This hub's (or site's) URL on loopback.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `edgesite cloudhub token create` on this hub: the token.
    pub fn hub_token(&self) -> String {
        let out = Command::new(edgesite_bin())
            .args(["cloudhub", "token", "create", "--data-dir"])
            .arg(self.data_dir())
            .output()
            .expect("run edgesite cloudhub token create");
        assert!(
            out.status.success(),
            "edgesite cloudhub token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Starts a site inside network namespace `netns`, listening on all of its addresses;
    /// kubectl runs there too.
    pub fn start_in_netns(
        netns: &str,
        extra: &[&str],
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Site> {
        let mut site = Site {
            dir: tempfile::Builder::new().prefix("edgesite-test").tempdir()?,
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: Some(netns.to_string()),
            hub: false,
            env: Vec::new(),
        };
        prepare(&site.data_dir())?;
        site.launch()?;
        Ok(site)
    }

    /// A command that runs in this site's network namespace, if it has one.
    fn command(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                // Only the network namespace (see node.rs: pod namespaces must stay visible).
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Starts again on the same data dir and port with other extra flags.
    pub fn launch_with(&mut self, extra: &[&str]) -> Result<()> {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.launch()
    }

    /// Replaces the extra `edgesite server` flags the next [`Site::launch`] uses.
    pub fn set_flags(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Runs `edgesite server` on this site's data dir and port to its end (a start that must
    /// fail): its exit status and what it printed. One still running after 30 s is killed and
    /// reported as an error.
    pub fn run_to_exit(&self, extra: &[&str]) -> Result<Output> {
        let mut child = self
            .server_command()
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run edgesite server")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "edgesite server was still running after 30 s:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child.wait_with_output()?)
    }

    /// `edgesite server` on this site's data dir, port and kubeconfig, with an explicit empty
    /// config file (a site installed on this machine must not leak its config into the test).
    fn server_command(&self) -> Command {
        let bind = if self.netns.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let mut command = self.command(&edgesite_bin());
        command
            .arg(if self.hub { "cloudhub" } else { "server" })
            .arg("--config")
            .arg(self.dir.path().join("no-config.yaml"));
        if let Some((endpoint, prefix)) = self.shared_etcd() {
            command
                .arg("--datastore-endpoint")
                .arg(endpoint)
                .arg("--etcd-prefix")
                .arg(prefix);
        }
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--bind-address")
            .arg(bind)
            .arg("--https-listen-port")
            .arg(self.port.to_string())
            .arg("--write-kubeconfig")
            .arg(self.kubeconfig());
        command
    }

    /// With `EDGESITE_TEST_ETCD` (an etcd's client URL, as `tests/run.sh` sets for its etcd pass)
    /// every site keeps its state there, under a prefix of its own, instead of in SQLite; a test
    /// that names its own datastore, or runs in a network namespace, keeps SQLite.
    pub fn shared_etcd(&self) -> Option<(String, String)> {
        let endpoint = std::env::var("EDGESITE_TEST_ETCD")
            .ok()
            .filter(|e| !e.is_empty())?;
        // A server in a network namespace cannot reach the etcd on the host's loopback.
        if self.netns.is_some()
            || self
                .extra
                .iter()
                .any(|f| f.starts_with("--datastore-endpoint") || f.starts_with("--cluster-"))
        {
            return None;
        }
        let name = self.dir.path().file_name()?.to_string_lossy().into_owned();
        Some((endpoint, format!("/edgesite-test/{name}")))
    }

    /// Starts (again) on the same data dir and port.
    pub fn launch(&mut self) -> Result<()> {
        // An explicit, empty config file: a site or hub installed on this machine must not leak
        // its /etc/edgesite/config.yaml or cloudhub-config.yaml into the test.
        std::fs::write(self.dir.path().join("no-config.yaml"), "")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = self
            .server_command()
            .args(&self.extra)
            .env("RUST_LOG", "info,kube_client::client::builder=off")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawn edgesite server")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "edgesite server exited with {status} during start-up; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            let listening = self.netns.is_some()
                || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if self.kubeconfig().exists() && listening {
                let out = self.kubectl(&["get", "--raw", "/readyz"])?;
                if out.status.success() {
                    let sqlite = self.data_dir().join("server").join("state.db");
                    if self.shared_etcd().is_some() && sqlite.exists() {
                        bail!(
                            "the site was to keep its state in etcd, but {} exists",
                            sqlite.display()
                        );
                    }
                    return Ok(());
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "edgesite server not ready after {timeout:?}; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a power cut or OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait, as systemd would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs kubectl against this site with its own discovery cache.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = self.command(Path::new(&kubectl_bin()));
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut child = cmd
            .spawn()
            .context("run kubectl (is it installed? tests/run.sh installs it)")?;
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())?;
        }
        Ok(wait_within(child, kubectl_limit(args), "kubectl")?)
    }

    /// kubectl against this site with other credentials than the admin's: `credentials` are
    /// kubectl flags (`--token=T`, or `--client-certificate=C` and `--client-key=K`); the
    /// server and its CA come from the site.
    pub fn kubectl_as(&self, credentials: &[String], args: &[&str]) -> Output {
        let ca = self.data_dir().join("server").join("tls").join("ca.crt");
        self.command(Path::new(&kubectl_bin()))
            .args(["--kubeconfig", "/dev/null"])
            .arg(format!("--server=https://127.0.0.1:{}", self.port))
            .arg(format!("--certificate-authority={}", ca.display()))
            .args(credentials)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|child| wait_within(child, kubectl_limit(args), "kubectl"))
            .expect("run kubectl")
    }

    /// kubectl that must succeed; returns stdout.
    /// Runs a Python script (`python -c`) with this site's kubeconfig; panics with its output
    /// and the server's log unless it exits 0. Returns its stdout.
    pub fn python_ok(&self, script: &str) -> String {
        let out = Command::new(python())
            .args(["-c", script])
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .expect("run python");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        stdout
    }

    /// Runs a Node.js ES module with `@kubernetes/client-node` importable and this site's
    /// kubeconfig; panics with its output and the server's log unless it exits 0. Returns its
    /// stdout.
    pub fn node_ok(&self, script: &str) -> String {
        self.node_ok_with(&self.kubeconfig(), script)
    }

    /// Runs a JavaScript module with `@kubernetes/client-node` against `kubeconfig` (this
    /// site's, or a hub's kubeconfig for a site through its cluster proxy); its stdout.
    pub fn node_ok_with(&self, kubeconfig: &Path, script: &str) -> String {
        let dir = node_client();
        assert!(
            dir.join("node_modules/@kubernetes/client-node/package.json")
                .exists(),
            "@kubernetes/client-node is missing under {} (tests/run.sh installs it with npm)",
            dir.display()
        );
        // ES modules resolve imports from their own folder.
        let file = tempfile::Builder::new()
            .prefix("check-")
            .suffix(".mjs")
            .tempfile_in(&dir)
            .expect("a script file");
        std::fs::write(file.path(), script).expect("write the script");
        let out = Command::new("node")
            .arg(file.path())
            .env("KUBECONFIG", kubeconfig)
            .output()
            .expect("run node (tests/run.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        stdout
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_stdin(args, None)
    }

    /// kubectl again and again (every 200 ms) until it succeeds, for at most `timeout`; panics
    /// with its last error otherwise (a write refused while the datastore recovers).
    pub fn ok_within(&self, timeout: Duration, args: &[&str], stdin: Option<&str>) {
        let mut last = String::new();
        let done = eventually(timeout, || {
            let out = self.kubectl_stdin(args, stdin).expect("run kubectl");
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() {
                std::thread::sleep(Duration::from_millis(150));
            }
            out.status.success()
        });
        assert!(
            done,
            "kubectl {args:?} kept failing for {timeout:?}: {last}"
        );
    }

    pub fn ok_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_stdin(args, stdin).expect("run kubectl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            // A wait that timed out says little by itself: show where the pods are and why.
            let context = if args.first() == Some(&"wait") {
                self.diagnostics()
            } else {
                String::new()
            };
            panic!("kubectl {args:?} failed: {stderr}\nstdout: {stdout}{context}");
        }
        stdout
    }

    /// The pods and the latest events, for a failure message.
    pub fn diagnostics(&self) -> String {
        let show = |args: &[&str]| match self.kubectl(args) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => e.to_string(),
        };
        let events = show(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
        let tail: Vec<&str> = events.lines().rev().take(40).collect();
        format!(
            "\n---- pods ----\n{}\n---- latest events ----\n{}",
            show(&["get", "pods", "-A", "-o", "wide"]),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// kubectl that must succeed and print JSON (`-o json`, `get --raw`); returns it parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {args:?} printed no JSON ({e}): {out}"))
    }

    /// kubectl that must fail; returns stderr.
    pub fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_stdin(args, stdin).expect("run kubectl");
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The `kube` configuration for this site (usable from any runtime).
    pub fn kube_config(&self) -> Result<kube::Config> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            ))?)
    }

    /// A `kube` client for this site.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- edgesite server log ----\n{}", self.log());
        }
        self.kill();
        // Network namespaces and tmpfs volumes of pods live under the data dir.
        node::unmount_under(self.dir.path());
    }
}

/// The Python with the test clients (`EDGESITE_PYTHON`, or the venv `tests/run.sh` builds in
/// `target/python-venv`).
pub fn python() -> PathBuf {
    match std::env::var("EDGESITE_PYTHON") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/python-venv/bin/python")
        }
    }
}

/// The folder whose `node_modules` holds `@kubernetes/client-node` (tests/run.sh fills it).
pub fn node_client() -> PathBuf {
    match std::env::var("EDGESITE_NODE_CLIENT") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/node-client"),
    }
}

pub fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// kubectl's minor version (kubectl 1.20 from Debian validates only with OpenAPI v2).
pub fn kubectl_minor() -> u32 {
    let out = Command::new(kubectl_bin())
        .args(["version", "--client", "-o", "json"])
        .output()
        .expect("kubectl must be installed: tests/run.sh installs it");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.pointer("/clientVersion/minor")
        .and_then(|m| m.as_str())
        .and_then(|m| m.trim_end_matches('+').parse().ok())
        .unwrap_or(0)
}

/// How long a kubectl call may take: two minutes, or a minute more than the `--timeout` it
/// was given. A server that stops answering must fail the test, not hang it.
fn kubectl_limit(args: &[&str]) -> Duration {
    let given = args.iter().enumerate().find_map(|(i, a)| {
        let value = match a.strip_prefix("--timeout=") {
            Some(v) => v,
            None if *a == "--timeout" => args.get(i + 1)?,
            None => return None,
        };
        let seconds: u64 = match value.strip_suffix('s') {
            Some(v) => v.parse().ok()?,
            None => value.strip_suffix('m')?.parse::<u64>().ok()? * 60,
        };
        Some(Duration::from_secs(seconds + 60))
    });
    given
        .unwrap_or(Duration::from_secs(120))
        .max(Duration::from_secs(120))
}

/// The output of `child`, which must end within `limit`: one still running then is killed
/// and reported as failed, with what it printed and a line saying so.
pub fn wait_within(child: Child, limit: Duration, what: &str) -> std::io::Result<Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output,
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let mut output = rx
                .recv()
                .map_err(|_| std::io::Error::other(format!("{what} vanished")))??;
            output.stderr.extend_from_slice(
                format!("\n{what} did not finish within {limit:?} and was killed\n").as_bytes(),
            );
            Ok(output)
        }
    }
}

/// Waits until `f` returns true or the time is up.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
