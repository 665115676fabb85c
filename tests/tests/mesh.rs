//! The mesh end to end: a site whose server sits on a "public" segment and two nodes behind
//! two NAT routers, all in network namespaces this test makes, with real containers. A pod on
//! node A reaches, by name, a Service whose only endpoint is a pod on node B, with no VPN and
//! no port forwarding: through the nodes' hole-punched connection. Needs root (containerd,
//! namespaces, iptables); run by tests/run.sh.
//!
//! ```text
//!             server 172.30.0.10 (API, relay)
//!                     |
//!     [public switch 172.30.0.0/24]
//!          |                      |
//!     natA 172.30.0.1        natB 172.30.0.2     (MASQUERADE)
//!          |                      |
//!     node-a 192.168.1.2     node-b 192.168.2.2
//! ```

use std::process::Command;
use std::time::Duration;

use tests::netns::TwoNats;
use tests::node::{BUSYBOX, KUBECTL_IMAGE, Runtime, busybox_image, kubectl_image};
use tests::{Site, edgesite_bin, eventually};

fn mesh_status(ns: &str) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(edgesite_bin())
        .args(["mesh", "status", "-o", "json"])
        .output()
        .expect("edgesite mesh status");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn connection_to(status: &serde_json::Value, node: &str) -> String {
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node"] == node)
        .and_then(|p| p["connection"].as_str())
        .unwrap_or("none")
        .to_string()
}

#[test]
fn a_pod_reaches_a_service_on_a_node_behind_another_nat_by_name() {
    serve_by_name_across_nats(false);
}

/// The same with node B behind a symmetric NAT: no hole can be punched, the server relays.
#[test]
fn behind_a_symmetric_nat_the_service_is_reached_through_the_relay() {
    serve_by_name_across_nats(true);
}

fn serve_by_name_across_nats(symmetric_b: bool) {
    let expected = if symmetric_b { "relayed" } else { "direct" };
    let rt = Runtime::start().unwrap();
    let topology = TwoNats::new(symmetric_b);
    let (server_ns, node_a, node_b) = (&topology.relay, &topology.node_a, &topology.node_b);
    // The server's node needs a default route for its node IP; the public segment has no
    // router, so its own link is the way out.
    topology
        .net
        .exec(server_ns, &["ip", "route", "add", "default", "dev", "wan"]);

    let image = busybox_image().unwrap();
    let mut flags = rt.node_flags_with_mesh("server");
    flags.push(format!("--cluster-cidr={}", rt.cluster_cidr()));
    // No --tls-san: a server listening on all addresses puts its machine's addresses in its
    // certificate, so agents join by IP address with default flags (the README's path).
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let site = Site::start_in_netns(server_ns, &flags, |data| {
        let images = data.join("agent").join("images");
        std::fs::create_dir_all(&images)?;
        std::fs::copy(&image, images.join("busybox.tar"))?;
        Ok(())
    })
    .unwrap();
    let url = format!("https://172.30.0.10:{}", site.port);
    let agent_a = rt
        .start_agent_in_netns(&site, "node-a", node_a, &url, &[])
        .unwrap();
    let agent_b = rt
        .start_agent_in_netns(&site, "node-b", node_b, &url, &[])
        .unwrap();
    for node in ["server", "node-a", "node-b"] {
        let ready = eventually(Duration::from_secs(120), || {
            site.kubectl(&[
                "wait",
                "--for=condition=Ready",
                &format!("node/{node}"),
                "--timeout=5s",
            ])
            .is_ok_and(|o| o.status.success())
        });
        assert!(
            ready,
            "node {node} not Ready; agent logs:\n{}\n{}",
            agent_a.log(),
            agent_b.log()
        );
    }
    // Each node published its mesh identity on its Node object.
    let published = eventually(Duration::from_secs(30), || {
        ["server", "node-a", "node-b"].iter().all(|n| {
            let node = site.json(&["get", "node", n, "-o", "json"]);
            node["metadata"]["annotations"]["mesh.edgesite.io/peer-id"].is_string()
        })
    });
    assert!(
        published,
        "mesh identities not published; node-b log:\n{}",
        agent_b.log()
    );
    let node = site.json(&["get", "node", "node-b", "-o", "json"]);
    let annotations = &node["metadata"]["annotations"];
    assert!(
        annotations["mesh.edgesite.io/peer-id"]
            .as_str()
            .is_some_and(|p| p.starts_with("12D3")),
        "{annotations}"
    );
    assert!(
        annotations["mesh.edgesite.io/addrs"]
            .as_str()
            .unwrap_or_default()
            .contains("192.168.2.2"),
        "{annotations}"
    );
    let server = site.json(&["get", "node", "server", "-o", "json"]);
    assert_eq!(
        server["metadata"]["annotations"]["mesh.edgesite.io/relay"],
        "true"
    );

    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  nodeName: node-b
  containers:
  - name: httpd
    image: {BUSYBOX}
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-node-b > /www/index.html && exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  nodeName: node-a
  containers:
  - name: client
    image: {BUSYBOX}
    imagePullPolicy: Never
    command: ["sleep", "3600"]
"#
        )),
    );
    let ready = site
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "pod/web",
            "pod/client",
            "--timeout=120s",
        ])
        .unwrap();
    assert!(
        ready.status.success(),
        "pods not ready: {}\nnode-a log:\n{}\nnode-b log:\n{}",
        String::from_utf8_lossy(&site.kubectl(&["describe", "pods"]).unwrap().stdout),
        agent_a.log(),
        agent_b.log()
    );

    // The nodes behind the two NATs hole-punched a direct connection, or (symmetric NAT) stay
    // on the relayed one. A punch that fails (its timing suffers on a loaded machine) is
    // retried after 5, 10, 20, 40 s: the wait covers several retries. Both logs go into a
    // failure: the side that accepted the relayed connection starts the punch and logs how it
    // went.
    let direct = eventually(Duration::from_secs(120), || {
        connection_to(&mesh_status(node_a), "node-b") == expected
    });
    assert!(
        direct,
        "node-a -> node-b is not {expected}: {:#}\nnode-a log:\n{}\nnode-b log:\n{}",
        mesh_status(node_a),
        agent_a.log(),
        agent_b.log()
    );

    // By name, from a pod on node A, to the pod on node B: the pod's resolver (the node's mesh
    // DNS, through the search path) gives the cluster IP, the node's proxy takes the connection
    // to node B. (The test image's static busybox wget crashes in glibc's NSS lookups, so
    // busybox's own nslookup resolves and nc speaks HTTP to the address.)
    // The short sleep first: kubectl 1.32's WebSocket exec client may drop output that arrives
    // before it has set up its streams (kubernetes/kubernetes#131189, fixed in 1.33).
    let fetch = |name: &str| {
        let script = format!(
            "sleep 0.3; ip=$(nslookup {name} | awk '/^Address/ {{a=$2}} END {{print a}}'); echo \"$ip\"; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 \"$ip\" 80"
        );
        let out = site
            .kubectl(&["exec", "client", "--", "sh", "-c", &script])
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let mut last = String::new();
    let reached = eventually(Duration::from_secs(60), || {
        last = fetch("web");
        last.contains("hello-from-node-b")
    });
    assert!(
        reached,
        "the service was not reached by name: {last}\nnode-a log:\n{}",
        agent_a.log()
    );
    let cluster_ip = site.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(
        last.starts_with(&format!("{cluster_ip}\n")),
        "`web` resolved to the cluster IP {cluster_ip}: {last}"
    );
    let out = fetch("web.default.svc.cluster.local");
    assert!(out.contains("hello-from-node-b"), "{out}");
    // The SRV record of the named port.
    let out = site.ok(&[
        "exec",
        "client",
        "--",
        "nslookup",
        "-type=SRV",
        "_http._tcp.web.default.svc.cluster.local",
    ]);
    assert!(out.contains("web.default.svc.cluster.local"), "{out}");

    // `edgesite mesh status` tells the story: B is direct (or relayed), with bytes counted.
    let out = Command::new("ip")
        .args(["netns", "exec", node_a])
        .arg(edgesite_bin())
        .args(["mesh", "status"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("node-b") && table.contains(expected),
        "{table}"
    );
    let status = mesh_status(node_a);
    let b = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "node-b")
        .unwrap()
        .clone();
    assert!(b["bytes_sent"].as_u64().unwrap_or(0) > 0, "{b}");

    if !symmetric_b {
        in_cluster_client_on_a_joined_node(&rt, &site, &agent_b);
    }
    drop(agent_a);
    drop(agent_b);

    // A clean stop (SIGTERM) takes the mesh's iptables rules with it: the host's own traffic
    // to cluster IPs must not keep being redirected to ports nobody listens on.
    let mut site = site;
    site.stop();
    let nat = std::process::Command::new("ip")
        .args(["netns", "exec", server_ns, "iptables-save", "-t", "nat"])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(
        !nat.contains("EDGEMESH") && !nat.contains("edgesite mesh"),
        "the mesh's rules stayed after a clean stop:\n{nat}"
    );
}

/// A real in-cluster client (kubectl, with no kubeconfig) in a pod on node B, behind its NAT:
/// `KUBERNETES_SERVICE_HOST`/`PORT` lead it through the mesh to the API server, where its
/// mounted ServiceAccount token is who it is; RBAC decides what it may do.
fn in_cluster_client_on_a_joined_node(
    rt: &Runtime,
    site: &tests::Site,
    agent_b: &tests::node::AgentProcess,
) {
    rt.import("node-b", &kubectl_image().unwrap()).unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: incluster}}
spec:
  nodeName: node-b
  containers:
  - name: kubectl
    image: {KUBECTL_IMAGE}
    imagePullPolicy: Never
    command: ["sh", "-c", "while true; do kubectl get configmaps -o name 2>&1; sleep 1; done"]
"#
        )),
    );
    let pod = site.json(&["get", "pod", "incluster", "-o", "json"]);
    let mount = pod["spec"]["containers"][0]["volumeMounts"][0].clone();
    assert_eq!(
        mount["mountPath"], "/var/run/secrets/kubernetes.io/serviceaccount",
        "{pod}"
    );
    let logs = |site: &tests::Site| {
        site.kubectl(&["logs", "incluster", "--tail=5"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut last = String::new();
    let forbidden = eventually(Duration::from_secs(120), || {
        last = logs(site);
        last.contains("configmaps is forbidden: User \"system:serviceaccount:default:default\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"default\"")
    });
    assert!(
        forbidden,
        "the in-cluster client did not reach the API as its ServiceAccount: {last}\n{}\nnode-b log:\n{}",
        String::from_utf8_lossy(
            &site
                .kubectl(&["describe", "pod", "incluster"])
                .unwrap()
                .stdout
        ),
        agent_b.log()
    );
    site.ok(&[
        "create",
        "rolebinding",
        "default-view",
        "--clusterrole=view",
        "--serviceaccount=default:default",
    ]);
    let listed = eventually(Duration::from_secs(30), || {
        last = logs(site);
        last.contains("configmap/kube-root-ca.crt")
    });
    assert!(
        listed,
        "the in-cluster client cannot list with view: {last}"
    );
}
