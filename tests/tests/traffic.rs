//! Traffic into a site from outside, as a user on the LAN sees it: a client in a network
//! namespace of its own reaches NodePort and LoadBalancer Services on the site's two nodes,
//! with real containers behind them. Needs root (containerd, namespaces, iptables); run by
//! tests/run.sh.
//!
//! ```text
//!     server 192.168.50.10    node-a 192.168.50.11    client 192.168.50.100
//!            |                        |                        |
//!     [LAN switch 192.168.50.0/24 ------------------------------]
//! ```

use std::process::Command;
use std::time::Duration;

use tests::netns::Net;
use tests::node::{BUSYBOX, Runtime, busybox_image};
use tests::{Site, eventually};

const SERVER_IP: &str = "192.168.50.10";
const NODE_A_IP: &str = "192.168.50.11";
const CLIENT_IP: &str = "192.168.50.100";

/// Answers `GET /cgi-bin/who` with the pod's node and the address the request came from.
const WHO: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: who}
data:
  who: |
    #!/bin/sh
    echo "Content-Type: text/plain"
    echo
    echo "$NODE $REMOTE_ADDR"
"#;

/// A pod on `node` labelled `app` that serves [`WHO`] on port 8080.
fn who_pod(name: &str, app: &str, node: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers:
  - name: httpd
    image: {BUSYBOX}
    imagePullPolicy: Never
    env: [{{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}]
    command: ["sh", "-c", "mkdir -p /www/cgi-bin && cp /who/who /www/cgi-bin/who && chmod +x /www/cgi-bin/who && exec httpd -f -p 8080 -h /www"]
    volumeMounts: [{{name: who, mountPath: /who}}]
    readinessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
  volumes: [{{name: who, configMap: {{name: who}}}}]
"#
    )
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-lb}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{name: http, port: 8000, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: local-np}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: local}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
"#;

/// Fetches `http://{addr}/cgi-bin/who` from namespace `ns`: "node client-address", or the
/// error curl gave.
fn who(ns: &str, addr: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "5"])
        .arg(format!("http://{addr}/cgi-bin/who"))
        .output()
        .expect("curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The nodes that answered `tries` requests to `addr` from `ns` (all must answer).
fn answering_nodes(ns: &str, addr: &str, tries: usize) -> Vec<String> {
    let mut nodes: Vec<String> = (0..tries)
        .map(|_| {
            let answer = who(ns, addr).unwrap_or_else(|e| panic!("{addr} from {ns}: {e}"));
            answer
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

#[test]
fn node_ports_and_load_balancers_answer_a_client_on_the_lan() {
    let rt = Runtime::start().unwrap();
    let mut net = Net::new();
    let lan = net.ns("lan");
    let server_ns = net.ns("server");
    let node_a = net.ns("nodeA");
    let client = net.ns("client");
    net.switch(&lan);
    net.plug(&lan, "p-server", &server_ns, &format!("{SERVER_IP}/24"));
    net.plug(&lan, "p-nodeA", &node_a, &format!("{NODE_A_IP}/24"));
    net.plug(&lan, "p-client", &client, &format!("{CLIENT_IP}/24"));
    // The LAN has no router; each node's own link is its way out (for its node IP).
    for ns in [&server_ns, &node_a] {
        net.exec(ns, &["ip", "route", "add", "default", "dev", "wan"]);
    }

    let image = busybox_image().unwrap();
    let mut flags = rt.node_flags_with_mesh("server");
    flags.push(format!("--cluster-cidr={}", rt.cluster_cidr()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let site = Site::start_in_netns(&server_ns, &flags, |data| {
        let images = data.join("agent").join("images");
        std::fs::create_dir_all(&images)?;
        std::fs::copy(&image, images.join("busybox.tar"))?;
        Ok(())
    })
    .unwrap();
    let url = format!("https://{SERVER_IP}:{}", site.port);
    let agent = rt
        .start_agent_in_netns(&site, "node-a", &node_a, &url, &[])
        .unwrap();
    for node in ["server", "node-a"] {
        let ready = eventually(Duration::from_secs(120), || {
            site.kubectl(&[
                "wait",
                "--for=condition=Ready",
                &format!("node/{node}"),
                "--timeout=5s",
            ])
            .is_ok_and(|o| o.status.success())
        });
        assert!(ready, "node {node} not Ready; agent log:\n{}", agent.log());
    }
    let workloads = [
        WHO.to_string(),
        who_pod("web-server", "web", "server"),
        who_pod("web-a", "web", "node-a"),
        who_pod("local-a", "local", "node-a"),
    ]
    .join("---");
    site.ok_stdin(&["apply", "-f", "-"], Some(&workloads));
    site.ok_stdin(&["apply", "-f", "-"], Some(SERVICES));
    let ready = site
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "pod/web-server",
            "pod/web-a",
            "pod/local-a",
            "--timeout=120s",
        ])
        .unwrap();
    assert!(
        ready.status.success(),
        "pods not ready: {}\nagent log:\n{}",
        String::from_utf8_lossy(&site.kubectl(&["describe", "pods"]).unwrap().stdout),
        agent.log()
    );

    // NodePort: on every node's address, to the endpoints on both nodes (the other node's
    // through the mesh).
    for node_ip in [SERVER_IP, NODE_A_IP] {
        let addr = format!("{node_ip}:30080");
        let mut last = String::new();
        let both = eventually(Duration::from_secs(60), || {
            last = format!(
                "{:?}",
                (0..6).map(|_| who(&client, &addr)).collect::<Vec<_>>()
            );
            last.contains("server ") && last.contains("node-a ")
        });
        assert!(
            both,
            "{addr} did not reach both nodes' pods: {last}\n{}",
            iptables(&server_ns)
        );
    }
    // ... and on the node's 127.0.0.1, as K3s answers it.
    let local = answering_nodes(&server_ns, "127.0.0.1:30080", 6);
    assert!(!local.is_empty(), "127.0.0.1:30080 on the server");

    // LoadBalancer: both nodes' addresses in the status (kubectl's EXTERNAL-IP), both answer.
    let mut last = String::new();
    let listed = eventually(Duration::from_secs(30), || {
        last = site.ok(&["get", "svc", "web-lb", "-o", "wide", "--no-headers"]);
        last.contains(&format!("{SERVER_IP},{NODE_A_IP}"))
    });
    assert!(listed, "web-lb's EXTERNAL-IP: {last}");
    for node_ip in [SERVER_IP, NODE_A_IP] {
        let addr = format!("{node_ip}:8000");
        let answered = eventually(Duration::from_secs(30), || who(&client, &addr).is_ok());
        assert!(answered, "{addr}: {:?}", who(&client, &addr));
    }

    // A second LoadBalancer wanting the same port stays pending, and says why.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web-lb2}\nspec:\n  type: LoadBalancer\n  selector: {app: local}\n  ports: [{port: 8000, targetPort: 8080}]\n",
        ),
    );
    let mut events = String::new();
    let warned = eventually(Duration::from_secs(30), || {
        events = site.ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=web-lb2",
        ]);
        events.contains("UnAvailableLoadBalancer")
            && events.contains("8000/TCP is held by default/web-lb")
    });
    assert!(
        warned,
        "no event for the conflicting LoadBalancer: {events}"
    );
    let pending = site.ok(&["get", "svc", "web-lb2", "--no-headers"]);
    assert!(pending.contains("<pending>"), "{pending}");
    // The first still answers with its own pods.
    let nodes = answering_nodes(&client, &format!("{NODE_A_IP}:8000"), 4);
    assert!(
        nodes.iter().all(|n| n == "server" || n == "node-a"),
        "{nodes:?}"
    );

    // externalTrafficPolicy: Local: the pod sees the client's own address, and a node with no
    // local endpoint refuses.
    let mut last = Err(String::new());
    let seen = eventually(Duration::from_secs(30), || {
        last = who(&client, &format!("{NODE_A_IP}:30081"));
        // busybox httpd listens on IPv6 too: the address comes as [::ffff:a.b.c.d].
        last.as_ref()
            .is_ok_and(|a| a.starts_with("node-a ") && a.contains(CLIENT_IP))
    });
    assert!(seen, "local-np on node-a: {last:?}");
    let refused = who(&client, &format!("{SERVER_IP}:30081"));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("refused") || e.contains("Couldn't connect")),
        "local-np on a node without its endpoint: {refused:?}"
    );
    // With the default policy the pod sees the node instead (masqueraded, so replies come back
    // the way they came).
    for _ in 0..4 {
        let answer = who(&client, &format!("{NODE_A_IP}:30080")).unwrap();
        assert!(!answer.contains(CLIENT_IP), "{answer}");
    }

    drop(agent);
    let mut site = site;
    site.stop();
    let nat = iptables(&server_ns);
    assert!(
        !nat.contains("EDGEMESH"),
        "the proxy's rules stayed after a clean stop:\n{nat}"
    );
}

fn iptables(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-save"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
