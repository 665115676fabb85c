//! The cloud link end to end: a real hub (`edgesite cloudhub`) and real sites that attach to
//! it by dialing out, on loopback. kubectl at the hub sees every site as a Karmada Cluster and
//! reaches any site through the hub's cluster proxy, as the caller.

use std::process::Command;
use std::time::Duration;

use tests::{Site, eventually};

/// Starts a site attached to `hub` as `name` with `labels`.
fn attached(hub: &Site, token: &str, name: &str, labels: &[&str]) -> Site {
    let url = hub.url();
    let mut flags = vec![
        "--cloudhub",
        url.as_str(),
        "--cloudhub-token",
        token,
        "--site-name",
        name,
    ];
    for label in labels {
        flags.push("--site-label");
        flags.push(label);
    }
    Site::start_with(&flags).expect("start an attached site")
}

fn ready(hub: &Site, site: &str) -> String {
    hub.kubectl(&[
        "get",
        "cluster",
        site,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ])
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default()
}

/// `edgesite cloudhub kubeconfig` for `site` (and a user): its path.
fn site_kubeconfig(hub: &Site, site: &str, user: Option<&str>) -> std::path::PathBuf {
    hub.hub_site_kubeconfig(site, user)
}

fn kubectl_with(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(tests::kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

#[test]
fn sites_attach_by_dialing_out_and_kubectl_reaches_each_through_the_hub() {
    let hub = Site::start_hub(&[]).expect("start the hub");
    let token = hub.hub_token();
    assert!(token.starts_with("K10"), "{token}");
    let shop1 = attached(&hub, &token, "shop-1", &["region=eu", "tier=pop"]);
    let shop2 = attached(&hub, &token, "shop-2", &["region=us"]);

    // Each site is a Karmada Cluster, Pull mode, with its labels, and turns Ready.
    assert!(
        eventually(Duration::from_secs(30), || ready(&hub, "shop-1") == "True"
            && ready(&hub, "shop-2") == "True"),
        "{}\n{}",
        hub.ok(&["get", "clusters", "-o", "yaml"]),
        hub.log()
    );
    let table = hub.ok(&["get", "clusters"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "VERSION", "MODE", "READY", "AGE"],
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("shop-1")
            && l.contains("v1.33.0+edgesite")
            && l.contains("Pull")
            && l.contains("True")),
        "{table}"
    );
    let eu = hub.ok(&["get", "clusters", "-l", "region=eu", "-o", "name"]);
    assert_eq!(eu.trim(), "cluster.cluster.karmada.io/shop-1");
    let cluster = hub.json(&["get", "cluster", "shop-1", "-o", "json"]);
    assert_eq!(cluster["spec"]["syncMode"], "Pull");
    assert_eq!(cluster["status"]["nodeSummary"]["totalNum"], 0, "{cluster}");
    let apis = cluster["status"]["apiEnablements"].as_array().unwrap();
    assert!(
        apis.iter().any(|g| g["groupVersion"] == "apps/v1"
            && g["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "deployments" && r["kind"] == "Deployment")),
        "{cluster}"
    );
    assert!(
        apis.iter()
            .any(|g| g["groupVersion"] == "devices.kubeedge.io/v1beta1"),
        "{cluster}"
    );

    // kubectl through the hub's cluster proxy reaches each site's own API.
    shop1.ok(&[
        "create",
        "configmap",
        "only-at-shop-1",
        "--from-literal=a=b",
    ]);
    let to_shop1 = site_kubeconfig(&hub, "shop-1", None);
    let to_shop2 = site_kubeconfig(&hub, "shop-2", None);
    let out = kubectl_with(
        &to_shop1,
        &["get", "configmap", "only-at-shop-1", "-o", "name"],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        shop1.log()
    );
    let out = kubectl_with(&to_shop2, &["get", "configmap", "only-at-shop-1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Writes and a watch go through too.
    let out = kubectl_with(&to_shop2, &["create", "namespace", "from-the-hub"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shop2.ok(&["get", "namespace", "from-the-hub"]);
    let out = kubectl_with(
        &to_shop2,
        &["get", "namespaces", "--watch", "--request-timeout=2s"],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from-the-hub"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The site sees the hub's caller, not the hub: `auth whoami` through the proxy.
    let out = kubectl_with(&to_shop1, &["auth", "whoami", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(me["status"]["userInfo"]["username"], "admin", "{me}");

    // The hub's RBAC decides who may use a site's proxy; the site's RBAC what they do there.
    let jane = site_kubeconfig(&hub, "shop-1", Some("jane"));
    let out = kubectl_with(&jane, &["get", "configmaps"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("clusters/proxy"),
        "{err}"
    );
    hub.ok(&[
        "create",
        "clusterrole",
        "shop-1-proxy",
        "--verb=get,list,watch,create,update,patch,delete",
        "--resource=clusters/proxy",
        "--resource-name=shop-1",
    ]);
    hub.ok(&[
        "create",
        "clusterrolebinding",
        "jane-shop-1",
        "--clusterrole=shop-1-proxy",
        "--user=jane",
    ]);
    assert!(
        eventually(Duration::from_secs(10), || {
            let err = String::from_utf8_lossy(&kubectl_with(&jane, &["get", "configmaps"]).stderr)
                .into_owned();
            // Now the site answers, and its RBAC refuses jane.
            err.contains("User \"jane\" cannot list resource \"configmaps\"")
        }),
        "{}",
        String::from_utf8_lossy(&kubectl_with(&jane, &["get", "configmaps"]).stderr)
    );
    shop1.ok(&[
        "create",
        "rolebinding",
        "jane-view",
        "--clusterrole=view",
        "--user=jane",
        "-n",
        "default",
    ]);
    assert!(eventually(Duration::from_secs(10), || {
        let out = kubectl_with(&jane, &["get", "configmap", "only-at-shop-1", "-o", "name"]);
        out.status.success()
    }));
    // jane's grant at the hub names shop-1 only.
    let jane2 = site_kubeconfig(&hub, "shop-2", Some("jane"));
    let out = kubectl_with(&jane2, &["get", "configmaps"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("clusters/proxy"));

    // A site's certificate is for its link, nothing else at the hub.
    let cred = shop1.data_dir().join("server").join("cloudhub");
    let out = hub.kubectl_as(
        &[
            format!("--client-certificate={}", cred.join("site.crt").display()),
            format!("--client-key={}", cred.join("site.key").display()),
        ],
        &["get", "clusters"],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("system:site:shop-1") && err.contains("forbidden"),
        "{err}"
    );
    // A certificate naming the site but not signed by the hub's CA opens nothing.
    let forged = tempfile::tempdir().unwrap();
    let (cert, key) = (forged.path().join("c.pem"), forged.path().join("k.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=system:site:shop-1/O=edgesite:sites",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{made:?}");
    let out = hub.kubectl_as(
        &[
            format!("--client-certificate={}", cert.display()),
            format!("--client-key={}", key.display()),
        ],
        &["get", "--raw", "/edgesite/v1/site-link"],
    );
    // The TLS handshake refuses it; kubectl says so in whatever words the timing gives it (an
    // alert about the certificate, or the connection reset while it was still writing).
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success()
            && [
                "certificate",
                "Unauthorized",
                "reset by peer",
                "tls",
                "EOF",
                "broken pipe",
                "could not be established"
            ]
            .iter()
            .any(|w| err.contains(w)),
        "{err}"
    );
}

#[test]
fn a_site_that_goes_away_turns_not_ready_and_its_proxy_says_why() {
    let hub = Site::start_hub(&[]).expect("start the hub");
    let token = hub.hub_token();
    let mut site = attached(&hub, &token, "factory-7", &[]);
    assert!(
        eventually(Duration::from_secs(30), || ready(&hub, "factory-7")
            == "True"),
        "{}",
        hub.log()
    );
    site.stop();
    // kubectl's discovery says only "unable to handle the request"; the Status says why.
    let proxy = "/apis/cluster.karmada.io/v1alpha1/clusters/factory-7/proxy/api";
    let err = hub.fails(&["get", "--raw", proxy], None);
    assert!(
        err.contains("site \"factory-7\" is not connected to the hub"),
        "{err}"
    );
    let err = hub.fails(
        &[
            "get",
            "--raw",
            "/apis/cluster.karmada.io/v1alpha1/clusters/nope/proxy/api",
        ],
        None,
    );
    assert!(
        err.contains("clusters.cluster.karmada.io \"nope\" not found"),
        "{err}"
    );
    // Unknown once not heard from for 40 s, as Karmada's cluster status says.
    assert!(
        eventually(Duration::from_secs(60), || ready(&hub, "factory-7")
            == "Unknown"),
        "{}",
        hub.ok(&["get", "cluster", "factory-7", "-o", "yaml"])
    );
    // Back: Ready again, on the certificate it kept (no token needed).
    site.launch_with(&[
        "--cloudhub",
        &hub.url(),
        "--site-name",
        "factory-7",
        "--disable-agent",
    ])
    .expect("restart the site");
    assert!(
        eventually(Duration::from_secs(30), || ready(&hub, "factory-7")
            == "True"),
        "{}",
        site.log()
    );
}

/// A link that goes silent without closing (a NAT or firewall dropping its packets, no FIN,
/// no RST) is noticed by both ends through their HTTP/2 pings within 45 s: the hub says the
/// site is not connected instead of hanging its callers, the site dials again, and once the
/// path is back the site is reachable again. The hub and the site run in two network
/// namespaces joined by a veth pair; iptables in the site's namespace drops the packets.
#[test]
fn a_half_open_link_is_noticed_by_both_ends_and_the_site_comes_back() {
    let mut net = tests::netns::Net::new();
    let hub_ns = net.ns("hub");
    let site_ns = net.ns("site");
    net.link(
        &hub_ns,
        "h0",
        "10.77.0.1/24",
        &site_ns,
        "s0",
        "10.77.0.2/24",
    );
    let hub =
        Site::start_hub_in_netns(&hub_ns, &["--tls-san", "10.77.0.1"]).expect("start the hub");
    let token = hub.hub_token();
    let url = format!("https://10.77.0.1:{}", hub.port());
    let site = Site::start_in_netns(
        &site_ns,
        &[
            "--cloudhub",
            &url,
            "--cloudhub-token",
            &token,
            "--site-name",
            "pop-silent",
            "--disable-agent",
        ],
        |_| Ok(()),
    )
    .expect("start the site");
    let proxy = "/apis/cluster.karmada.io/v1alpha1/clusters/pop-silent/proxy/version";
    let reachable = || {
        hub.kubectl(&["get", "--raw", proxy, "--request-timeout=5s"])
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        eventually(Duration::from_secs(60), reachable),
        "the site never became reachable through the hub\n{}\n{}",
        hub.log(),
        site.log()
    );
    let site_log_before = site.log().len();

    // Silence: every packet between the two dropped in the site's namespace.
    let drop_rules = |action: &str| {
        for rule in [["OUTPUT", "-d", "10.77.0.1"], ["INPUT", "-s", "10.77.0.1"]] {
            net.exec(
                &site_ns,
                &["iptables", action, rule[0], rule[1], rule[2], "-j", "DROP"],
            );
        }
    };
    drop_rules("-A");
    let silenced = std::time::Instant::now();
    // The hub: its registry lets go of the link, and callers are told why at once.
    let not_connected = || {
        hub.kubectl(&["get", "--raw", proxy, "--request-timeout=5s"])
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .contains("site \"pop-silent\" is not connected to the hub")
            })
    };
    assert!(
        eventually(Duration::from_secs(60), not_connected),
        "the hub never noticed the silent link\n{}",
        hub.log()
    );
    let hub_noticed = silenced.elapsed();
    // The site: its end of the link ends and it dials again.
    let site_noticed = || {
        let log = site.log();
        let new = &log[site_log_before.min(log.len())..];
        new.contains("link to the cloud hub: retrying")
            || new.contains("link to the cloud hub closed")
    };
    assert!(
        eventually(Duration::from_secs(60), site_noticed),
        "the site never noticed the silent link\n{}",
        site.log()
    );
    let site_noticed = silenced.elapsed();
    assert!(
        hub_noticed <= Duration::from_secs(45) && site_noticed <= Duration::from_secs(50),
        "noticed after {hub_noticed:?} (hub) and {site_noticed:?} (site): keepalive is 20 s + 20 s"
    );

    // The path is back: the site's next dial (backoff at most 30 s) gets through.
    drop_rules("-D");
    assert!(
        eventually(Duration::from_secs(60), reachable),
        "the site did not come back\n{}",
        site.log()
    );
}

#[test]
fn a_bad_token_or_a_wrong_hub_is_refused_with_the_fix() {
    let hub = Site::start_hub(&[]).expect("start the hub");
    let good = hub.hub_token();
    // A token whose secret is wrong: the hub refuses it and says how to make one.
    let (pinned, _) = good.split_once("::").unwrap();
    let bad = format!("{pinned}::abcdef.0123456789abcdef");
    let site = attached(&hub, &bad, "intruder", &[]);
    assert!(
        eventually(Duration::from_secs(20), || site
            .log()
            .contains("edgesite cloudhub token create")),
        "{}",
        site.log()
    );
    // A token pinning another CA: the site refuses the hub.
    let other = format!(
        "K10{}::{}",
        "0".repeat(64),
        good.split_once("::").unwrap().1
    );
    let site2 = attached(&hub, &other, "elsewhere", &[]);
    assert!(
        eventually(Duration::from_secs(20), || site2
            .log()
            .contains("does not match the join token")),
        "{}",
        site2.log()
    );
    assert!(!hub.ok(&["get", "clusters"]).contains("intruder"));
    // --site-label without --cloudhub is a mistake, said at start.
    let out = site2
        .run_to_exit(&["--site-label", "a=b"])
        .expect("run a server that must refuse its flags");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--cloudhub https://HUB:5443"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A site with a node running a real container, reached only through the hub: logs, exec
/// (WebSocket and SPDY, exit codes, stdin), port-forward.
#[test]
fn logs_exec_and_port_forward_reach_a_sites_pods_through_the_hub() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;
    use tests::node::{BUSYBOX, Runtime};

    let rt = Runtime::start().unwrap();
    let hub = Site::start_hub(&[]).expect("start the hub");
    let token = hub.hub_token();
    let url = hub.url();
    let site = rt
        .start_site(&[
            "--cloudhub",
            &url,
            "--cloudhub-token",
            &token,
            "--site-name",
            "pop-ams",
        ])
        .unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {BUSYBOX}
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /www && echo served-at-the-edge > /www/index.html && echo started-web && exec httpd -f -p 8080 -h /www"]
    readinessProbe: {{httpGet: {{path: /index.html, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"#
        )),
    );
    let to_site = site_kubeconfig(&hub, "pop-ams", None);
    let through = |env: &[(&str, &str)], args: &[&str], stdin: Option<&[u8]>| {
        let mut child = Command::new(tests::kubectl_bin())
            .arg("--kubeconfig")
            .arg(&to_site)
            .args(args)
            .envs(env.iter().copied())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input).unwrap();
        }
        child.wait_with_output().unwrap()
    };
    assert!(
        eventually(Duration::from_secs(90), || {
            let out = through(
                &[],
                &[
                    "get",
                    "pod",
                    "web",
                    "-o",
                    "jsonpath={.status.containerStatuses[0].ready}",
                ],
                None,
            );
            String::from_utf8_lossy(&out.stdout) == "true"
        }),
        "web never became ready\n{}",
        site.log()
    );
    let out = through(&[], &["logs", "web"], None);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "started-web\n",
        "{out:?}"
    );
    // A cloud application calls an HTTP server at the edge through the hub (KubeEdge's
    // ServiceBus): the site's service proxy, reached through the hub's cluster proxy.
    let service = "/apis/cluster.karmada.io/v1alpha1/clusters/pop-ams/proxy/api/v1/namespaces/default/services/web:http/proxy/index.html";
    assert!(
        eventually(Duration::from_secs(30), || {
            hub.kubectl(&["get", "--raw", service])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "served-at-the-edge\n")
        }),
        "the service proxy through the hub: {:?}",
        hub.kubectl(&["get", "--raw", service])
    );
    let pod = "/apis/cluster.karmada.io/v1alpha1/clusters/pop-ams/proxy/api/v1/namespaces/default/pods/web:8080/proxy/index.html";
    assert_eq!(hub.ok(&["get", "--raw", pod]), "served-at-the-edge\n");
    let spdy: &[(&str, &str)] = &[
        ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"),
        ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false"),
    ];
    for (transport, env) in [("websocket", &[][..]), ("spdy", spdy)] {
        let out = through(
            env,
            &[
                "exec",
                "web",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 3",
            ],
            None,
        );
        assert_eq!(out.status.code(), Some(3), "{transport}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n", "{transport}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("err"),
            "{transport}"
        );
        let input = vec![b'x'; 100_000];
        let out = through(env, &["exec", "-i", "web", "--", "wc", "-c"], Some(&input));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "100000",
            "{transport}: {out:?}"
        );
        // port-forward through the hub: a local port to the pod's 8080.
        let mut child = Command::new(tests::kubectl_bin())
            .arg("--kubeconfig")
            .arg(&to_site)
            .args(["port-forward", "pod/web", ":8080"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port: u16 = loop {
            let line = lines
                .next()
                .expect("port-forward printed its port")
                .unwrap();
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.ends_with("served-at-the-edge\n"),
            "{transport}: {answer}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A real HTTPS proxy (tinyproxy) on loopback, logging every CONNECT; killed when dropped.
struct Proxy {
    child: std::process::Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Proxy {
    fn start() -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port = tests::free_port();
        let config = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 50\nAllow 127.0.0.1\nLogLevel Connect\nLogFile \"{}\"\n",
                dir.path().join("proxy.log").display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tinyproxy must be installed (tests/run.sh installs it)");
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "tinyproxy did not listen"
        );
        Proxy { child, dir, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Shops and CDN racks often allow egress only through an HTTPS proxy: the site attaches and
/// keeps its link through one (HTTPS_PROXY), and the hub reaches it as before.
#[test]
fn a_site_attaches_through_an_https_proxy() {
    let proxy = Proxy::start();
    let hub = Site::start_hub(&[]).expect("start the hub");
    let token = hub.hub_token();
    let url = hub.url();
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port);
    let site = Site::start_with_env(
        &[
            "--cloudhub",
            &url,
            "--cloudhub-token",
            &token,
            "--site-name",
            "behind-proxy",
        ],
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "")],
    )
    .expect("start a site behind the proxy");
    assert!(
        eventually(Duration::from_secs(30), || ready(&hub, "behind-proxy")
            == "True"),
        "{}\n{}",
        site.log(),
        proxy.log()
    );
    let to_site = site_kubeconfig(&hub, "behind-proxy", None);
    let out = kubectl_with(&to_site, &["get", "namespace", "kube-system", "-o", "name"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The join and the link both went through it.
    let hub_port = hub.port.to_string();
    let connects = proxy
        .log()
        .lines()
        .filter(|l| l.contains("CONNECT") && l.contains(&hub_port))
        .count();
    assert!(connects >= 2, "{}", proxy.log());
}

/// Waits until `check` passes, or panics with `what` and the logs of `sites`.
fn wait_for(what: &str, sites: &[&Site], mut check: impl FnMut() -> bool) {
    if !eventually(Duration::from_secs(60), &mut check) {
        let logs: Vec<String> = sites.iter().map(|s| s.log()).collect();
        panic!("{what}\n{}", logs.join("\n-----\n"));
    }
}

fn has(site: &Site, args: &[&str]) -> bool {
    site.kubectl(args).is_ok_and(|o| o.status.success())
}

fn jsonpath(site: &Site, args: &[&str], path: &str) -> String {
    let mut all: Vec<&str> = args.to_vec();
    let p = format!("jsonpath={path}");
    all.extend(["-o", &p]);
    site.kubectl(&all)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

const WEB: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config, namespace: shop}
data: {greeting: hello}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: edgesite.test/busybox:1.0
        envFrom: [{configMapRef: {name: web-config}}]
---
apiVersion: policy.karmada.io/v1alpha1
kind: PropagationPolicy
metadata: {name: web-to-eu, namespace: shop}
spec:
  resourceSelectors:
  - {apiVersion: apps/v1, kind: Deployment, name: web}
  propagateDeps: true
  placement:
    clusterAffinity:
      labelSelector: {matchLabels: {region: eu}}
---
apiVersion: policy.karmada.io/v1alpha1
kind: OverridePolicy
metadata: {name: eu-2-mirror, namespace: shop}
spec:
  resourceSelectors:
  - {apiVersion: apps/v1, kind: Deployment, name: web}
  overrideRules:
  - targetCluster: {clusterNames: [eu-2]}
    overriders:
      imageOverrider:
      - {component: Registry, operator: replace, value: mirror.eu-2.example}
      labelsOverrider:
      - {operator: add, value: {mirror: eu-2}}
"#;

#[test]
fn templates_placed_by_a_policy_reach_their_sites_and_report_back_across_outages() {
    let mut hub = Site::start_hub(&[]).expect("start the hub");
    let token = hub.hub_token();
    let eu1 = attached(&hub, &token, "eu-1", &["region=eu"]);
    let mut eu2 = attached(&hub, &token, "eu-2", &["region=eu"]);
    let us1 = attached(&hub, &token, "us-1", &["region=us"]);
    for s in ["eu-1", "eu-2", "us-1"] {
        wait_for(&format!("{s} Ready"), &[&hub], || ready(&hub, s) == "True");
    }
    hub.ok_stdin(&["apply", "-f", "-"], Some(WEB));

    // The Deployment and the ConfigMap it uses (propagateDeps) reach the eu sites only.
    for site in [&eu1, &eu2] {
        wait_for("the Deployment at an eu site", &[&hub, site], || {
            has(site, &["get", "deploy", "web", "-n", "shop"])
                && has(site, &["get", "cm", "web-config", "-n", "shop"])
        });
    }
    assert!(!has(&us1, &["get", "deploy", "web", "-n", "shop"]));
    // The override changed eu-2's copy only.
    let image = "{.spec.template.spec.containers[0].image}";
    assert_eq!(
        jsonpath(&eu2, &["get", "deploy", "web", "-n", "shop"], image),
        "mirror.eu-2.example/busybox:1.0"
    );
    assert_eq!(
        jsonpath(
            &eu2,
            &["get", "deploy", "web", "-n", "shop"],
            "{.metadata.labels.mirror}"
        ),
        "eu-2"
    );
    assert_eq!(
        jsonpath(&eu1, &["get", "deploy", "web", "-n", "shop"], image),
        "edgesite.test/busybox:1.0"
    );
    let binding = hub.json(&[
        "get",
        "resourcebinding",
        "web-deployment",
        "-n",
        "shop",
        "-o",
        "json",
    ]);
    let clusters: Vec<&str> = binding["spec"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(clusters, ["eu-1", "eu-2"], "{binding}");
    let placed = eu1.json(&[
        "get",
        "deploy",
        "web",
        "-n",
        "shop",
        "-o",
        "json",
        "--show-managed-fields",
    ]);
    assert_eq!(placed["metadata"]["labels"]["karmada.io/managed"], "true");
    assert!(
        placed["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["manager"] == "edgesite-cloudhub" && m["operation"] == "Apply"),
        "{placed}"
    );
    // Each site's report is in the binding; the template's status is their sum.
    wait_for("the aggregated status", &[&hub], || {
        jsonpath(
            &hub,
            &["get", "deploy", "web", "-n", "shop"],
            "{.status.replicas}",
        ) == "4"
    });
    let binding = hub.json(&["get", "rb", "web-deployment", "-n", "shop", "-o", "json"]);
    let aggregated = binding["status"]["aggregatedStatus"].as_array().unwrap();
    assert_eq!(aggregated.len(), 2, "{binding}");
    assert!(aggregated.iter().all(|a| a["applied"] == true), "{binding}");

    // Drift: what the hub placed, changed or deleted by a site admin, is put back, with an Event.
    eu1.ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=7"]);
    eu1.ok(&["delete", "cm", "web-config", "-n", "shop"]);
    wait_for("the placed objects put back", &[&eu1], || {
        jsonpath(
            &eu1,
            &["get", "deploy", "web", "-n", "shop"],
            "{.spec.replicas}",
        ) == "2"
            && has(&eu1, &["get", "cm", "web-config", "-n", "shop"])
    });
    let events = eu1.ok(&[
        "get",
        "events",
        "-n",
        "shop",
        "--field-selector",
        "reason=Restored",
    ]);
    assert!(
        events.contains("deployment/web") && events.contains("put back as the hub wants it"),
        "{events}"
    );

    // A site cut off: changes made at the hub meanwhile arrive when it is back.
    eu2.stop();
    hub.ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=3"]);
    hub.ok(&[
        "patch",
        "cm",
        "web-config",
        "-n",
        "shop",
        "-p",
        r#"{"data":{"greeting":"hej"}}"#,
    ]);
    wait_for("the change at the connected site", &[&hub, &eu1], || {
        jsonpath(
            &eu1,
            &["get", "deploy", "web", "-n", "shop"],
            "{.spec.replicas}",
        ) == "3"
            && jsonpath(
                &eu1,
                &["get", "cm", "web-config", "-n", "shop"],
                "{.data.greeting}",
            ) == "hej"
    });
    // The hub restarts (SIGKILL) while the site is away; nothing acknowledged is lost.
    hub.kill();
    hub.launch().expect("restart the hub");
    eu2.launch_with(&[
        "--cloudhub",
        &hub.url(),
        "--site-name",
        "eu-2",
        "--disable-agent",
    ])
    .expect("bring eu-2 back");
    wait_for(
        "the changes at the site that was away",
        &[&hub, &eu2],
        || {
            jsonpath(
                &eu2,
                &["get", "deploy", "web", "-n", "shop"],
                "{.spec.replicas}",
            ) == "3"
                && jsonpath(
                    &eu2,
                    &["get", "cm", "web-config", "-n", "shop"],
                    "{.data.greeting}",
                ) == "hej"
        },
    );
    // eu-1 stayed up through the hub's restart: its cursor was older than the restarted hub's
    // window, so the hub compared what eu-1 holds and sent nothing (nothing had changed).
    wait_for("eu-1 compared, not re-sent", &[&hub], || {
        hub.log().lines().any(|l| {
            l.contains("sent what differs from what the site holds")
                && l.contains("site=eu-1")
                && l.contains("changed=0")
                && l.contains("removed=0")
        })
    });
    wait_for("the new aggregate", &[&hub], || {
        jsonpath(
            &hub,
            &["get", "deploy", "web", "-n", "shop"],
            "{.status.replicas}",
        ) == "6"
    });

    // Re-placed: the policy now names us-1 only; the eu sites let go of what it placed.
    hub.ok(&[
        "patch",
        "pp",
        "web-to-eu",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"spec":{"placement":{"clusterAffinity":{"labelSelector":null,"clusterNames":["us-1"]}}}}"#,
    ]);
    wait_for("the move to us-1", &[&hub, &us1, &eu1], || {
        has(&us1, &["get", "deploy", "web", "-n", "shop"])
            && !has(&eu1, &["get", "deploy", "web", "-n", "shop"])
            && !has(&eu1, &["get", "cm", "web-config", "-n", "shop"])
    });
    // Objects the hub did not place are never touched.
    eu1.ok(&["create", "configmap", "local-only", "-n", "shop"]);
    // The template deleted at the hub: gone from its site.
    hub.ok(&["delete", "deploy", "web", "-n", "shop"]);
    wait_for("the deletion at us-1", &[&hub, &us1], || {
        !has(&us1, &["get", "deploy", "web", "-n", "shop"])
    });
    assert!(has(&eu1, &["get", "cm", "local-only", "-n", "shop"]));
}

/// A site's name belongs to the site that first attached with it (as a node's name belongs to
/// its machine): another machine with a valid token is refused until the Cluster is deleted at
/// the hub, and then the old site's certificate stops working.
#[test]
fn a_site_name_belongs_to_the_machine_that_attached_with_it() {
    let hub = Site::start_hub(&[]).expect("start the hub");
    let token = hub.hub_token();
    let first = attached(&hub, &token, "depot", &[]);
    wait_for("depot Ready", &[&hub], || ready(&hub, "depot") == "True");
    let second = attached(&hub, &token, "depot", &[]);
    wait_for("the second machine refused", &[&second], || {
        second
            .log()
            .contains("already attached from another machine")
    });
    hub.ok(&["delete", "cluster", "depot"]);
    wait_for("the second machine attached", &[&hub, &second], || {
        second.log().contains("attached to the cloud hub") && ready(&hub, "depot") == "True"
    });
    // The first one's link closed and its certificate no longer authenticates.
    wait_for(
        "the first machine's certificate refused",
        &[&hub, &first],
        || first.log().contains("is no longer valid"),
    );
    let cred = first.data_dir().join("server").join("cloudhub");
    let out = hub.kubectl_as(
        &[
            format!("--client-certificate={}", cred.join("site.crt").display()),
            format!("--client-key={}", cred.join("site.key").display()),
        ],
        &["get", "--raw", "/version"],
    );
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("is no longer valid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A site renews its certificate over its own connection when two thirds of its life have
/// passed (the hub signs them for 90 s here), the link starts again on the new one, the old one
/// stops authenticating, and the site stays reachable through the hub throughout.
#[test]
fn a_site_renews_its_certificate_before_it_expires() {
    let hub = Site::start_hub(&["--site-certificate-lifetime", "90s"]).expect("start the hub");
    let token = hub.hub_token();
    let site = attached(&hub, &token, "renewing", &[]);
    wait_for("renewing Ready", &[&hub], || {
        ready(&hub, "renewing") == "True"
    });
    let cred = site.data_dir().join("server").join("cloudhub");
    let old = tempfile::tempdir().unwrap();
    for file in ["site.crt", "site.key"] {
        std::fs::copy(cred.join(file), old.path().join(file)).unwrap();
    }
    // Renewed after 60 s of the 90.
    assert!(
        eventually(Duration::from_secs(120), || site
            .log()
            .contains("renewed the site's certificate")),
        "{}\n{}",
        site.log(),
        hub.log()
    );
    assert!(hub.log().contains("site renewed its certificate"));
    assert_ne!(
        std::fs::read_to_string(cred.join("site.crt")).unwrap(),
        std::fs::read_to_string(old.path().join("site.crt")).unwrap()
    );
    let proxy = "/apis/cluster.karmada.io/v1alpha1/clusters/renewing/proxy/version";
    assert!(
        eventually(Duration::from_secs(30), || hub
            .kubectl(&["get", "--raw", proxy])
            .is_ok_and(|o| o.status.success())),
        "the site is not reachable on its new certificate\n{}",
        site.log()
    );
    let out = hub.kubectl_as(
        &[
            format!(
                "--client-certificate={}",
                old.path().join("site.crt").display()
            ),
            format!("--client-key={}", old.path().join("site.key").display()),
        ],
        &["get", "--raw", "/version"],
    );
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("is no longer valid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Offline past its certificate's end: started again with a token, it attaches again under
    // its name (its site password proves the name is its own).
    let mut site = site;
    site.stop();
    std::thread::sleep(Duration::from_secs(95));
    let token = hub.hub_token();
    site.launch_with(&[
        "--cloudhub",
        &hub.url(),
        "--cloudhub-token",
        &token,
        "--site-name",
        "renewing",
        "--disable-agent",
    ])
    .expect("restart the site");
    assert!(
        eventually(Duration::from_secs(60), || hub
            .kubectl(&["get", "--raw", proxy])
            .is_ok_and(|o| o.status.success())),
        "the site did not attach again\n{}",
        site.log()
    );
    assert!(
        site.log()
            .contains("the site certificate has expired; attaching again"),
        "{}",
        site.log()
    );
}

fn ready_count(hub: &Site) -> usize {
    jsonpath(
        hub,
        &["get", "clusters"],
        "{.items[*].status.conditions[?(@.type==\"Ready\")].status}",
    )
    .split_whitespace()
    .filter(|s| *s == "True")
    .count()
}

/// A hundred simulated sites (the real site side of the link, in-memory state): all attach and
/// turn Ready, a Deployment placed on all of them reaches each and sums up at the hub, a change
/// for one site sends batches to that site only, and after a hub SIGKILL every site reconnects
/// and is compared, not re-sent everything.
#[test]
fn a_hundred_simulated_sites_get_placements_and_resync_after_a_hub_restart() {
    const SITES: usize = 100;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut hub = Site::start_hub(&[]).expect("start the hub");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let labels = [("tier".to_string(), "pop".to_string())].into();
    let sims =
        tests::simsites::SimSites::start(&hub.url(), &hub.data_dir(), SITES, "sim-", &labels)
            .expect("start the simulated sites");
    wait_for("all simulated sites Ready", &[&hub], || {
        ready_count(&hub) == SITES
    });

    hub.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: v1
kind: Namespace
metadata: {name: edge}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cdn-cache, namespace: edge}
spec:
  replicas: 2
  selector: {matchLabels: {app: cdn-cache}}
  template:
    metadata: {labels: {app: cdn-cache}}
    spec: {containers: [{name: cache, image: edgesite.test/busybox:1.0}]}
---
apiVersion: policy.karmada.io/v1alpha1
kind: ClusterPropagationPolicy
metadata: {name: pops}
spec:
  resourceSelectors: [{apiVersion: apps/v1, kind: Deployment}]
  placement: {clusterAffinity: {labelSelector: {matchLabels: {tier: pop}}}}
"#,
        ),
    );
    wait_for("the Deployment at every site", &[&hub], || {
        sims.first_applied("Deployment/edge/cdn-cache")
            .iter()
            .all(Option::is_some)
    });
    wait_for("the sum over the sites", &[&hub], || {
        jsonpath(
            &hub,
            &["get", "deploy", "cdn-cache", "-n", "edge"],
            "{.status.readyReplicas}",
        ) == (2 * SITES).to_string()
    });

    // A change that concerns one site sends batches to that site only.
    let before = sims.counts();
    hub.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: v1
kind: ConfigMap
metadata: {name: only-7, namespace: edge}
data: {a: b}
---
apiVersion: policy.karmada.io/v1alpha1
kind: PropagationPolicy
metadata: {name: only-7, namespace: edge}
spec:
  resourceSelectors: [{apiVersion: v1, kind: ConfigMap, name: only-7}]
  placement: {clusterAffinity: {clusterNames: [sim-7]}}
"#,
        ),
    );
    wait_for("the ConfigMap at sim-7", &[&hub], || {
        sims.first_applied("ConfigMap/edge/only-7")[7].is_some()
    });
    std::thread::sleep(Duration::from_secs(3));
    let after = sims.counts();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if i == 7 {
            assert!(a.batches > b.batches);
        } else {
            assert_eq!(
                a.batches, b.batches,
                "sim-{i} got a batch for sim-7's change"
            );
        }
    }
    assert!(
        sims.first_applied("ConfigMap/edge/only-7")
            .iter()
            .enumerate()
            .all(|(i, t)| t.is_some() == (i == 7))
    );

    // The hub dies and comes back: every site reconnects, is compared, and gets nothing again.
    hub.kill();
    hub.launch().expect("restart the hub");
    wait_for("every site back", &[&hub], || {
        sims.counts().iter().all(|c| c.cursor_asks >= 2) && ready_count(&hub) == SITES
    });
    std::thread::sleep(Duration::from_secs(2));
    let counts = sims.counts();
    assert!(
        counts.iter().all(|c| c.full_batches == 1),
        "a site was sent everything again: {counts:?}"
    );
}

/// Karmada's Divided replica scheduling with static weights: a Deployment's replicas are split
/// over the sites by the weights of the rules that select them, each site's Work carries its
/// share, the binding lists the shares, and the hub's Deployment status sums them; scaling the
/// template moves the shares.
#[test]
fn divided_replicas_follow_static_weights_across_sites() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let hub = Site::start_hub(&[]).expect("start the hub");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let big = [("size".to_string(), "big".to_string())].into();
    let small = [("size".to_string(), "small".to_string())].into();
    let _big = tests::simsites::SimSites::start(&hub.url(), &hub.data_dir(), 1, "big-", &big)
        .expect("start the simulated sites");
    let _small = tests::simsites::SimSites::start(&hub.url(), &hub.data_dir(), 2, "small-", &small)
        .expect("start the simulated sites");
    wait_for("three simulated sites Ready", &[&hub], || {
        ready_count(&hub) == 3
    });
    let apply = |replicas: u32| {
        hub.ok_stdin(
            &["apply", "-f", "-"],
            Some(&format!(
                r#"apiVersion: v1
kind: Namespace
metadata: {{name: edge}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: edge}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: edgesite.test/busybox:1.0}}]}}
---
apiVersion: policy.karmada.io/v1alpha1
kind: PropagationPolicy
metadata: {{name: web, namespace: edge}}
spec:
  resourceSelectors: [{{apiVersion: apps/v1, kind: Deployment, name: web}}]
  placement:
    clusterAffinity: {{labelSelector: {{matchExpressions: [{{key: size, operator: Exists}}]}}}}
    replicaScheduling:
      replicaSchedulingType: Divided
      replicaDivisionPreference: Weighted
      weightPreference:
        staticWeightList:
        - targetCluster: {{labelSelector: {{matchLabels: {{size: big}}}}}}
          weight: 3
        - targetCluster: {{labelSelector: {{matchLabels: {{size: small}}}}}}
          weight: 1
"#
            )),
        );
    };
    let share = |site: &str| {
        jsonpath(
            &hub,
            &["get", "work", "-n", &format!("karmada-es-{site}")],
            "{.items[0].spec.workload.manifests[0].spec.replicas}",
        )
    };
    let shares = || {
        ["big-0", "small-0", "small-1"]
            .iter()
            .map(|s| share(s))
            .collect::<Vec<_>>()
            .join(",")
    };
    // 7 by weights 3:1:1 is 4.2, 1.4, 1.4: 4, 1, 1, and the one left to the heaviest.
    apply(7);
    wait_for("the shares 5,1,1", &[&hub], || shares() == "5,1,1");
    assert_eq!(
        jsonpath(
            &hub,
            &["get", "resourcebinding", "web-deployment", "-n", "edge"],
            "{range .spec.clusters[*]}{.name}={.replicas} {end}",
        ),
        "big-0=5 small-0=1 small-1=1 "
    );
    wait_for("the sum at the hub", &[&hub], || {
        jsonpath(
            &hub,
            &["get", "deploy", "web", "-n", "edge"],
            "{.status.readyReplicas}",
        ) == "7"
    });
    // Scaled: 10 is 6, 2, 2.
    apply(10);
    wait_for("the shares 6,2,2", &[&hub], || shares() == "6,2,2");
    wait_for("the new sum at the hub", &[&hub], || {
        jsonpath(
            &hub,
            &["get", "deploy", "web", "-n", "edge"],
            "{.status.readyReplicas}",
        ) == "10"
    });
    // Fields the hub does not implement are refused, not ignored.
    let err = hub.fails(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: policy.karmada.io/v1alpha1\nkind: PropagationPolicy\nmetadata: {name: dyn, namespace: edge}\nspec:\n  resourceSelectors: [{apiVersion: apps/v1, kind: Deployment}]\n  placement:\n    replicaScheduling: {replicaSchedulingType: Divided, replicaDivisionPreference: Aggregated}\n",
        ),
    );
    assert!(err.contains("Aggregated"), "{err}");
}
