//! Several servers per site (K3s's `--cluster-init` and `--server URL --token TOKEN`): three
//! `edgesite server` processes on loopback, each with its own embedded etcd member (Debian's
//! etcd), real kubectl.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::{Site, free_port};

fn server_flags(join: Option<(&Site, &str)>) -> Vec<String> {
    let mut flags = vec![
        "--disable-agent".to_string(),
        format!("--etcd-client-port={}", free_port()),
        format!("--etcd-peer-port={}", free_port()),
    ];
    match join {
        None => flags.push("--cluster-init".into()),
        Some((first, token)) => {
            flags.push(format!("--server=https://127.0.0.1:{}", first.port));
            flags.push(format!("--token={token}"));
        }
    }
    flags
}

fn start(flags: &[String]) -> Site {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Site::start_with(&flags).expect("a server starts")
}

/// `edgesite ARGS --data-dir <site's>`, run to its end.
fn edgesite(site: &Site, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tests::edgesite_bin())
        .args(args)
        .arg("--data-dir")
        .arg(site.data_dir())
        .output()
        .expect("run edgesite")
}

/// Whether `holder` (a Lease's holderIdentity, `<host>_<id>`) is this server.
fn holds(site: &Site, holder: &str) -> bool {
    let id = std::fs::read_to_string(site.data_dir().join("server").join("identity")).unwrap();
    holder.ends_with(&format!("_{}", id.trim()))
}

fn rv(site: &Site, name: &str) -> u64 {
    site.ok(&[
        "get",
        "configmap",
        name,
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])
    .parse()
    .unwrap()
}

/// Three servers, the second and third started at once: all vote in etcd, any of them serves
/// what any other wrote (CRDs too). Writes go on through the others while the leader server is
/// SIGKILLed: every acknowledged write is kept, resourceVersions never go back. With two of the
/// three etcd members down writes fail at once with a clear message, and go on when one returns.
#[test]
fn three_servers_share_the_site_and_survive_losing_one() {
    let first = start(&server_flags(None));
    let token = std::fs::read_to_string(first.data_dir().join("server").join("token")).unwrap();
    let token = token.trim().to_string();
    // A wrong token is refused with a message saying so.
    let wrong = server_flags(Some((&first, "not-the-token")));
    let stranger = Site::start_with(&wrong.iter().map(String::as_str).collect::<Vec<_>>());
    let message = format!("{:#}", stranger.err().expect("a wrong token is refused"));
    assert!(
        message.contains("not this site's cluster token"),
        "{message}"
    );

    let (second, third) = {
        let (a, b) = (
            server_flags(Some((&first, &token))),
            server_flags(Some((&first, &token))),
        );
        let one = std::thread::spawn(move || start(&a));
        let two = std::thread::spawn(move || start(&b));
        (one.join().unwrap(), two.join().unwrap())
    };
    let servers = [first, second, third];
    // The CA and keys are the site's: every server's kubeconfig works against every other.
    for (i, s) in servers.iter().enumerate() {
        s.ok(&["create", "configmap", &format!("from-{i}")]);
    }
    for s in &servers {
        let names = s.ok(&["get", "configmaps", "-o", "name"]);
        for i in 0..3 {
            assert!(names.contains(&format!("configmap/from-{i}")), "{names}");
        }
    }
    // A CRD made through one server is served by the others.
    servers[0].ok_stdin(
        &["apply", "-f", "-"],
        Some(r#"{"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "crontabs.stable.example.com"},
            "spec": {"group": "stable.example.com", "scope": "Namespaced",
              "names": {"plural": "crontabs", "singular": "crontab", "kind": "CronTab"},
              "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}}"#),
    );
    servers[2].ok_within(
        Duration::from_secs(20),
        &["apply", "-f", "-"],
        Some(r#"{"apiVersion": "stable.example.com/v1", "kind": "CronTab", "metadata": {"name": "c", "namespace": "default"}}"#),
    );
    assert!(
        servers[1]
            .ok(&["get", "crontabs", "-o", "name"])
            .contains("crontab.stable.example.com/c")
    );

    // The server whose controllers lead.
    let holder = servers[1].ok(&[
        "get",
        "lease",
        "-n",
        "kube-system",
        "edgesite-control-plane",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    let leader = servers
        .iter()
        .position(|s| holds(s, &holder))
        .expect("a server leads");
    let mut servers = servers.map(Some);
    let mut dead = servers[leader].take().unwrap();
    let live: Vec<&Site> = servers.iter().flatten().collect();

    // A watch open through each live server during what follows (kubectl, from now on).
    let watches: Vec<(std::process::Child, std::path::PathBuf)> = live
        .iter()
        .enumerate()
        .map(|(i, site)| {
            let out = site.dir.path().join(format!("watch-{i}.txt"));
            let child = std::process::Command::new(tests::kubectl_bin())
                .arg("--kubeconfig")
                .arg(site.kubeconfig())
                .args(["get", "configmaps", "--watch-only", "-o", "name"])
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // A write storm through the other two while the leader dies.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, usize)>::new()));
    // Writes acknowledged after the leader died (a write sent after it, answered).
    let killed = Arc::new(AtomicBool::new(false));
    let after_kill = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = live
        .iter()
        .enumerate()
        .map(|(w, site)| {
            let kubeconfig = site.kubeconfig();
            let stop = stop.clone();
            let acknowledged = acknowledged.clone();
            let (killed, after_kill) = (killed.clone(), after_kill.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("storm-{w}-{n}");
                    n += 1;
                    let sent_after_kill = killed.load(Ordering::Relaxed);
                    let out = std::process::Command::new(tests::kubectl_bin())
                        .arg("--kubeconfig")
                        .arg(&kubeconfig)
                        .args(["create", "configmap", &name])
                        .output()
                        .unwrap();
                    if out.status.success() {
                        acknowledged.lock().unwrap().push((name, w));
                        if sent_after_kill {
                            after_kill.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    dead.kill();
    let died = Instant::now();
    killed.store(true, Ordering::Relaxed);
    // Writes stall while etcd elects a leader and the servers' watches move to a live member:
    // the storm goes on until one sent after the death is acknowledged (30 s at most).
    tests::eventually(Duration::from_secs(30), || {
        after_kill.load(Ordering::Relaxed) > 0
    });
    eprintln!(
        "first write acknowledged after the leader died: {:?}",
        died.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    // However loaded the machine (CI runs four tests at once), writes went on after the leader
    // died.
    assert!(
        after_kill.load(Ordering::Relaxed) > 0,
        "no write was acknowledged after the leader died ({} before)",
        acknowledged.len()
    );
    // Every open watch went on through the leader's death without a gap: it saw every
    // acknowledged write (none ended, so none had to relist).
    std::thread::sleep(Duration::from_secs(2));
    for (mut child, out) in watches {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the watch through a live server ended"
        );
        let _ = child.kill();
        let _ = child.wait();
        let seen = std::fs::read_to_string(&out).unwrap();
        for (name, _) in &acknowledged {
            assert!(
                seen.contains(&format!("configmap/{name}\n")),
                "the watch missed {name}"
            );
        }
    }
    let listed = live[0].ok(&["get", "configmaps", "-o", "name"]);
    for (name, _) in &acknowledged {
        assert!(
            listed.contains(&format!("configmap/{name}")),
            "acknowledged {name} was lost"
        );
    }
    // Each writer's objects carry increasing resourceVersions, read through either server.
    for w in 0..2 {
        let mine: Vec<u64> = acknowledged
            .iter()
            .filter(|(_, by)| *by == w)
            .map(|(name, _)| rv(live[1 - w], name))
            .collect();
        assert!(mine.windows(2).all(|p| p[0] < p[1]), "{mine:?}");
    }
    // Another server leads now.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now = live[0].ok(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            "edgesite-control-plane",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        if now != holder && live.iter().any(|s| holds(s, &now)) {
            break;
        }
        assert!(Instant::now() < deadline, "no server took over the lead");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Two of three members down: writes fail, quickly and saying why.
    let (a, b) = (live[0], live[1]);
    let member_of = |s: &Site| -> u32 {
        let out = std::process::Command::new("pgrep")
            .args([
                "-f",
                &format!(
                    "^etcd .*data-dir={}",
                    s.data_dir().join("server/db/etcd").display()
                ),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .expect("its etcd runs")
            .trim()
            .parse()
            .unwrap()
    };
    let victim = member_of(b);
    std::process::Command::new("kill")
        .args(["-STOP", &victim.to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let out = a
        .kubectl(&["create", "configmap", "without-quorum"])
        .unwrap();
    assert!(!out.status.success(), "no quorum, no write");
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("etcd"), "{said}");
    // The leading server cannot renew its lease: it stops its control loops before the lease
    // could pass to another (client-go's renew deadline, 10 s of the 15).
    let stepped_down = "could not renew the lease in time";
    assert!(
        tests::eventually(Duration::from_secs(30), || {
            a.log().contains(stepped_down) || b.log().contains(stepped_down)
        }),
        "the leader kept acting without its lease"
    );
    std::process::Command::new("kill")
        .args(["-CONT", &victim.to_string()])
        .status()
        .unwrap();
    a.ok_within(
        Duration::from_secs(30),
        &["create", "configmap", "quorum-back"],
        None,
    );
    // The dead server comes back and catches up.
    dead.launch().unwrap();
    assert!(
        dead.ok(&["get", "configmap", "quorum-back", "-o", "name"])
            .contains("quorum-back")
    );

    // Taken out for good: its member leaves the etcd cluster, the other two go on.
    dead.stop();
    let gone = std::fs::read_to_string(dead.data_dir().join("server/db/etcd-name")).unwrap();
    let members = |site: &Site| {
        let out = edgesite(site, &["etcd", "member", "list"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(members(a).lines().count(), 4, "a header and three members");
    let own = std::fs::read_to_string(a.data_dir().join("server/db/etcd-name")).unwrap();
    let refused = edgesite(a, &["etcd", "member", "remove", own.trim()]);
    assert!(
        !refused.status.success(),
        "a server does not remove its own member"
    );
    let removed = edgesite(a, &["etcd", "member", "remove", gone.trim()]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    let listed = members(b);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(!listed.contains(gone.trim()));
    a.ok(&["create", "configmap", "two-servers"]);
}

/// An agent joined through one of three servers learns the others from the `kubernetes`
/// Service's endpoints; its tunnel reaches every server, so `kubectl logs` works through any of
/// them; when the server it joined through is SIGKILLed it moves to a live one (K3s's client-side
/// load balancer): its pods keep running, new pods start, and a restarted agent finds the live
/// servers though the one it was given is still dead.
#[test]
fn an_agent_moves_to_a_live_server_when_its_server_dies() {
    use tests::node::{BUSYBOX, Runtime};
    let rt = Runtime::start().expect("containerd, runc and the CNI plugins");
    let cidr = format!("--cluster-cidr={}", rt.cluster_cidr());
    let with_cidr = |mut flags: Vec<String>| {
        flags.push(cidr.clone());
        flags
    };
    let first = start(&with_cidr(server_flags(None)));
    let token = std::fs::read_to_string(first.data_dir().join("server").join("token")).unwrap();
    let token = token.trim().to_string();
    let second = start(&with_cidr(server_flags(Some((&first, &token)))));
    let third = start(&with_cidr(server_flags(Some((&first, &token)))));
    // The token is made on the first server (a bootstrap token Secret, shared by all); the agent
    // joins through the second, which then dies.
    let mut agent = rt
        .start_agent_via(
            &first,
            "node-b",
            &format!("https://127.0.0.1:{}", second.port),
            &[],
        )
        .expect("an agent joins through another server than the token's");
    let ready = |site: &Site| {
        site.kubectl(&["get", "node", "node-b"])
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(" Ready "))
            .unwrap_or(false)
    };
    assert!(
        tests::eventually(Duration::from_secs(60), || ready(&first)),
        "node-b is not Ready\n{}",
        agent.log()
    );
    // The endpoints name the three servers, one port each (they share 127.0.0.1).
    let endpoints = |site: &Site| {
        site.ok(&[
            "get",
            "endpoints",
            "kubernetes",
            "-o",
            "jsonpath={.subsets[*].ports[*].port}",
        ])
    };
    let ports = [&second, &first, &third].map(|s| s.port.to_string());
    assert!(
        tests::eventually(Duration::from_secs(20), || {
            let listed = endpoints(&first);
            ports.iter().all(|p| listed.split(' ').any(|l| l == p))
        }),
        "{}",
        endpoints(&first)
    );
    let pod = |name: &str| {
        format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}"}},
              "spec": {{"nodeName": "node-b", "terminationGracePeriodSeconds": 1,
                "containers": [{{"name": "c", "image": "{BUSYBOX}",
                  "command": ["sh", "-c", "echo hello from {name}; sleep 3600"]}}]}}}}"#
        )
    };
    first.ok_stdin(&["apply", "-f", "-"], Some(&pod("before")));
    // Logs through every server: the agent keeps a tunnel to each.
    for site in [&second, &first, &third] {
        site.ok_within(Duration::from_secs(60), &["logs", "before"], None);
        assert!(site.ok(&["logs", "before"]).contains("hello from before"));
    }

    // The server the agent was given dies.
    let mut second = second;
    second.kill();
    let died = Instant::now();
    // Writes wait while etcd elects a new leader (the dead server's member may have led).
    first.ok_within(
        Duration::from_secs(30),
        &["apply", "-f", "-"],
        Some(&pod("after")),
    );
    let running = |site: &Site, name: &str| {
        site.kubectl(&["get", "pod", name, "-o", "jsonpath={.status.phase}"])
            .map(|o| String::from_utf8_lossy(&o.stdout) == "Running")
            .unwrap_or(false)
    };
    assert!(
        tests::eventually(Duration::from_secs(40), || running(&third, "after")),
        "a pod made after the server died does not run\n{}",
        agent.log()
    );
    eprintln!(
        "the agent started a pod made after its server died in {:?}",
        died.elapsed()
    );
    assert!(running(&first, "before"), "the running pod was lost");
    third.ok_within(Duration::from_secs(30), &["logs", "after"], None);
    assert!(third.ok(&["logs", "after"]).contains("hello from after"));
    // The dead server leaves the endpoints once its record expires.
    let dead_port = ports[0].clone();
    assert!(
        tests::eventually(Duration::from_secs(40), || {
            !endpoints(&third).split(' ').any(|p| p == dead_port)
        }),
        "{}",
        endpoints(&third)
    );
    // Restarted while the server it was given is still dead, the agent finds the others.
    agent.kill();
    let stopped = Instant::now();
    agent.launch().unwrap();
    assert!(
        tests::eventually(Duration::from_secs(40), || {
            let lease = first.ok(&[
                "get",
                "lease",
                "-n",
                "kube-node-lease",
                "node-b",
                "-o",
                "jsonpath={.spec.renewTime}",
            ]);
            chrono_after(&lease, stopped)
        }),
        "the restarted agent did not reach a live server\n{}",
        agent.log()
    );
    first.ok_stdin(&["apply", "-f", "-"], Some(&pod("restarted")));
    assert!(
        tests::eventually(Duration::from_secs(40), || running(&first, "restarted")),
        "{}",
        agent.log()
    );
    for name in ["before", "after", "restarted"] {
        first.ok(&["delete", "pod", name, "--wait=false"]);
    }
    // The dead server comes back and is an endpoint again.
    second.launch().unwrap();
    let second_port = second.port.to_string();
    assert!(
        tests::eventually(Duration::from_secs(20), || {
            endpoints(&first).split(' ').any(|p| p == second_port)
        }),
        "{}",
        endpoints(&first)
    );
    // A server stopped on purpose withdraws from the endpoints as it goes, well before its
    // record would expire.
    let mut third = third;
    let third_port = third.port.to_string();
    third.stop();
    let listed = endpoints(&first);
    assert!(
        !listed.split(' ').any(|p| p == third_port),
        "a stopped server is still an endpoint: {listed}"
    );
}

/// ":PORT" of a server's URL (its advertised host may be another of this machine's addresses).
fn port_of(server: &Site) -> String {
    let url = server.url();
    format!(":{}", url.rsplit(':').next().unwrap_or_default())
}

/// Whether an RFC 3339 time (as a Lease's renewTime) is later than `instant` was.
fn chrono_after(time: &str, instant: Instant) -> bool {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(time.trim()) else {
        return false;
    };
    let then = chrono::Utc::now() - chrono::Duration::from_std(instant.elapsed()).unwrap();
    t > then
}

/// Three `edgesite cloudhub` servers on embedded etcd act as one hub: a site linked to one is
/// reached through the cluster proxy of any (kubeedge#5784: multi-cloudcore logs/exec fail when
/// the request lands on another instance), its Cluster is Ready on all, a fourth server added
/// later is made known to the site over its link, and when the hub server holding its link is
/// SIGKILLed the site links to another one it learned and is reachable again, and renews its
/// certificate through another server while the one it was given is dead.
#[test]
fn hub_servers_reach_every_site_whichever_holds_its_link() {
    let etcd_ports = || {
        vec![
            format!("--etcd-client-port={}", free_port()),
            format!("--etcd-peer-port={}", free_port()),
        ]
    };
    let hub_with = |flags: Vec<String>| {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Site::start_hub(&flags).expect("a hub server starts")
    };
    // Site certificates of 90 s: the site renews after 60.
    let mut first = hub_with(
        [
            vec![
                "--cluster-init".to_string(),
                "--site-certificate-lifetime=90s".to_string(),
            ],
            etcd_ports(),
        ]
        .concat(),
    );
    let token = std::fs::read_to_string(first.data_dir().join("server").join("token")).unwrap();
    let join = || {
        [
            vec![
                format!("--server={}", first.url()),
                format!("--token={}", token.trim()),
            ],
            etcd_ports(),
        ]
        .concat()
    };
    let second = hub_with(join());
    let third = hub_with(join());
    // The first server knows the other two (a link learns the servers when it connects).
    let endpoints = |hub: &Site| {
        hub.ok(&[
            "get",
            "endpoints",
            "kubernetes",
            "-o",
            "jsonpath={.subsets[*].ports[*].port}",
        ])
    };
    assert!(
        tests::eventually(Duration::from_secs(30), || {
            endpoints(&first).split(' ').count() == 3
        }),
        "{}",
        endpoints(&first)
    );
    let ready = |h: &Site| {
        h.ok(&[
            "get",
            "cluster",
            "shop-1",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]) == "True"
    };
    let (mut site, _) = first.attach_site("shop-1").expect("the site attaches");
    site.ok(&["create", "configmap", "on-the-site"]);
    for hub in [&second, &third] {
        let via = hub.hub_site_kubeconfig("shop-1", None);
        let kubectl = |args: &[&str]| {
            std::process::Command::new(tests::kubectl_bin())
                .arg("--kubeconfig")
                .arg(&via)
                .args(args)
                .output()
                .unwrap()
        };
        let out = kubectl(&["get", "configmap", "on-the-site", "-o", "name"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A watch streams through two hub servers and the link.
        let out = hub
            .kubectl(&[
                "get",
                "--raw",
                "/apis/cluster.karmada.io/v1alpha1/clusters/shop-1/proxy/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1",
            ])
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("on-the-site"),
            "{:?} {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The site's Cluster is Ready whichever server is asked.
        assert!(tests::eventually(Duration::from_secs(20), || ready(hub)));
    }

    // A server added after the site attached: the site is told of it over its link.
    let fourth = hub_with(join());
    let known = site.data_dir().join("server").join("hub-servers.json");
    assert!(
        tests::eventually(Duration::from_secs(60), || {
            std::fs::read_to_string(&known)
                .is_ok_and(|t| t.contains(&format!("{}\"", port_of(&fourth))))
        }),
        "the site was not told of the fourth hub server {}: {:?}\n{}",
        fourth.url(),
        std::fs::read_to_string(&known),
        site.log()
    );

    // The server holding the link dies: the site links to another within seconds.
    first.kill();
    let died = Instant::now();
    let via = second.hub_site_kubeconfig("shop-1", None);
    let reached = || {
        tests::eventually(Duration::from_secs(60), || {
            std::process::Command::new(tests::kubectl_bin())
                .arg("--kubeconfig")
                .arg(&via)
                .args(["get", "configmap", "on-the-site", "-o", "name"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    };
    let reachable = reached();
    assert!(
        reachable,
        "the site never linked to another hub server\n{}",
        site.log()
    );
    eprintln!(
        "the site was reachable through another hub server {:?} after its server died",
        died.elapsed()
    );
    // Ready through the others; the link is theirs now.
    assert!(tests::eventually(Duration::from_secs(30), || ready(&third)));
    // Its certificate is renewed by a live server (the one it was given is dead).
    assert!(
        tests::eventually(Duration::from_secs(120), || site
            .log()
            .contains("renewed the site's certificate")),
        "the site did not renew its certificate\n{}",
        site.log()
    );
    let renewed = site
        .log()
        .lines()
        .find(|l| l.contains("renewed the site's certificate"))
        .unwrap_or_default()
        .to_string();
    assert!(!renewed.contains(&port_of(&first)), "{renewed}");
    // Restarted while the hub server it was given is still dead, the site links to another it
    // had learned.
    site.stop();
    site.launch().unwrap();
    let back = reached();
    assert!(
        back,
        "the restarted site did not link to a live hub server\n{}",
        site.log()
    );
}
