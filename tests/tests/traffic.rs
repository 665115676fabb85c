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
---
apiVersion: v1
kind: Service
metadata: {name: local-lb}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: local}
  ports: [{name: http, port: 8100, targetPort: 8080}]
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

/// The LAN of the diagram: a site (server + node-a, mesh and ingress on) and a client.
struct Lan {
    // Dropped first: the processes, then the namespaces they run in.
    agent: tests::node::AgentProcess,
    site: Site,
    _net: Net,
    server_ns: String,
    node_a: String,
    client: String,
    _rt: Runtime,
}

impl Lan {
    fn start() -> Lan {
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
        Lan {
            agent,
            site,
            _net: net,
            server_ns,
            node_a,
            client,
            _rt: rt,
        }
    }

    /// Applies `objects` and waits for `pods` to be Ready.
    fn apply_and_wait(&self, objects: &str, pods: &[&str]) {
        self.site.ok_stdin(&["apply", "-f", "-"], Some(objects));
        let mut args = vec!["wait", "--for=condition=Ready", "--timeout=120s"];
        let names: Vec<String> = pods.iter().map(|p| format!("pod/{p}")).collect();
        args.extend(names.iter().map(String::as_str));
        let ready = self.site.kubectl(&args).unwrap();
        assert!(
            ready.status.success(),
            "pods not ready: {}\nagent log:\n{}",
            String::from_utf8_lossy(&self.site.kubectl(&["describe", "pods"]).unwrap().stdout),
            self.agent.log()
        );
    }
}

#[test]
fn node_ports_and_load_balancers_answer_a_client_on_the_lan() {
    let lan = Lan::start();
    let (site, server_ns, client) = (&lan.site, &lan.server_ns, &lan.client);
    let workloads = [
        WHO.to_string(),
        who_pod("web-server", "web", "server"),
        who_pod("web-a", "web", "node-a"),
        who_pod("local-a", "local", "node-a"),
    ]
    .join("---");
    lan.apply_and_wait(
        &format!("{workloads}---{SERVICES}"),
        &["web-server", "web-a", "local-a"],
    );

    // NodePort: on every node's address, to the endpoints on both nodes (the other node's
    // through the mesh).
    for node_ip in [SERVER_IP, NODE_A_IP] {
        let addr = format!("{node_ip}:30080");
        let mut last = String::new();
        let both = eventually(Duration::from_secs(60), || {
            last = format!(
                "{:?}",
                (0..6).map(|_| who(client, &addr)).collect::<Vec<_>>()
            );
            last.contains("server ") && last.contains("node-a ")
        });
        assert!(
            both,
            "{addr} did not reach both nodes' pods: {last}\n{}",
            iptables(server_ns)
        );
    }
    // ... and on the node's 127.0.0.1, as K3s answers it.
    let local = answering_nodes(server_ns, "127.0.0.1:30080", 6);
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
        let answered = eventually(Duration::from_secs(30), || who(client, &addr).is_ok());
        assert!(answered, "{addr}: {:?}", who(client, &addr));
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
    let nodes = answering_nodes(client, &format!("{NODE_A_IP}:8000"), 4);
    assert!(
        nodes.iter().all(|n| n == "server" || n == "node-a"),
        "{nodes:?}"
    );

    // externalTrafficPolicy: Local: the pod sees the client's own address, and a node with no
    // local endpoint refuses.
    let mut last = Err(String::new());
    let seen = eventually(Duration::from_secs(30), || {
        last = who(client, &format!("{NODE_A_IP}:30081"));
        // busybox httpd listens on IPv6 too: the address comes as [::ffff:a.b.c.d].
        last.as_ref()
            .is_ok_and(|a| a.starts_with("node-a ") && a.contains(CLIENT_IP))
    });
    assert!(seen, "local-np on node-a: {last:?}");
    let refused = who(client, &format!("{SERVER_IP}:30081"));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("refused") || e.contains("Couldn't connect")),
        "local-np on a node without its endpoint: {refused:?}"
    );
    // With the default policy the pod sees the node instead (masqueraded, so replies come back
    // the way they came).
    for _ in 0..4 {
        let answer = who(client, &format!("{NODE_A_IP}:30080")).unwrap();
        assert!(!answer.contains(CLIENT_IP), "{answer}");
    }

    // A LoadBalancer with externalTrafficPolicy Local: only the node with its endpoint serves
    // it, and the health check node port says so on each node (as kube-proxy answers it).
    let mut last = String::new();
    let only_a = eventually(Duration::from_secs(30), || {
        last = site.ok(&[
            "get",
            "svc",
            "local-lb",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[*].ip}",
        ]);
        last == NODE_A_IP
    });
    assert!(only_a, "local-lb's addresses: {last:?}");
    let health_port = site.ok(&[
        "get",
        "svc",
        "local-lb",
        "-o",
        "jsonpath={.spec.healthCheckNodePort}",
    ]);
    assert!(health_port.parse::<u16>().is_ok(), "{health_port:?}");
    let status_of = |ip: &str| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                client,
                "curl",
                "-s",
                "--max-time",
                "5",
                "-w",
                " %{http_code}",
            ])
            .arg(format!("http://{ip}:{health_port}/healthz"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut answer = String::new();
    let healthy = eventually(Duration::from_secs(30), || {
        answer = status_of(NODE_A_IP);
        answer.ends_with(" 200") && answer.contains("\"localEndpoints\":1")
    });
    assert!(healthy, "health check on node-a: {answer}");
    let answer = status_of(SERVER_IP);
    assert!(
        answer.ends_with(" 503"),
        "health check on the server: {answer}"
    );
    let answer = who(client, &format!("{NODE_A_IP}:8100")).unwrap();
    assert!(
        answer.contains(CLIENT_IP),
        "local-lb keeps the client's address: {answer}"
    );

    let Lan {
        agent,
        mut site,
        server_ns,
        ..
    } = lan;
    drop(agent);
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

/// Runs `curl` in namespace `ns` with `args`: (exit success, stdout, stderr).
fn curl(ns: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const INGRESS_OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: secure}
spec:
  selector: {app: secure}
  ports: [{port: 8443, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: ws}
spec:
  ports: [{name: ws, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ws-1, labels: {kubernetes.io/service-name: ws}}
addressType: IPv4
ports: [{name: ws, port: 9100, protocol: TCP}]
endpoints: [{addresses: [NODE_A_IP], nodeName: node-a, conditions: {ready: true}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: shop}
spec:
  tls: [{hosts: [secure.example], secretName: secure-tls}]
  rules:
  - host: web.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}]
  - host: secure.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: secure, port: {number: 8443}}}}]
  - host: ws.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: ws, port: {number: 80}}}}]
  - host: gone.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: missing, port: {number: 80}}}}]
"#;

/// A WebSocket client from PyPI (websocket-client, as the Kubernetes Python client uses).
const WS_CLIENT: &str = r#"
import sys, websocket
ws = websocket.create_connection("ws://%s/echo" % sys.argv[1], host="ws.example", timeout=10)
ws.send("hello through the ingress")
print(ws.recv())
ws.close()
"#;

#[test]
fn the_ingress_serves_two_hosts_tls_and_websockets() {
    let lan = Lan::start();
    let (site, client) = (&lan.site, &lan.client);

    // A real WebSocket server on node A (an endpoint named by hand: the node's own address).
    let ws_runtime = tests::netns::NsRuntime::start(&lan.node_a);
    let bound = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(ws_runtime.run(async {
            let listener = tokio::net::TcpListener::bind((NODE_A_IP, 9100)).await?;
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        use futures::{SinkExt, StreamExt};
                        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                            return;
                        };
                        while let Some(Ok(message)) = ws.next().await {
                            if message.is_text() && ws.send(message).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            Ok::<_, std::io::Error>(())
        }));
    bound.unwrap();

    // The TLS Secret, as a user makes one.
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["secure.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    site.ok(&[
        "create",
        "secret",
        "tls",
        "secure-tls",
        &format!("--cert={}", cert_path.display()),
        &format!("--key={}", key_path.display()),
    ]);

    let objects = [
        WHO.to_string(),
        who_pod("web-server", "web", "server"),
        who_pod("web-a", "web", "node-a"),
        who_pod("secure-a", "secure", "node-a"),
        INGRESS_OBJECTS.replace("NODE_A_IP", NODE_A_IP),
    ]
    .join("---");
    lan.apply_and_wait(&objects, &["web-server", "web-a", "secure-a"]);

    // The class the site installs, default; the Ingress names none and is served.
    let class = site.ok(&["get", "ingressclass", "edgesite", "-o", "json"]);
    assert!(
        class.contains("\"ingressclass.kubernetes.io/is-default-class\": \"true\""),
        "{class}"
    );
    // DefaultIngressClass admission named it.
    assert_eq!(
        site.ok(&[
            "get",
            "ingress",
            "shop",
            "-o",
            "jsonpath={.spec.ingressClassName}"
        ]),
        "edgesite"
    );
    // Both nodes' addresses in the status (kubectl's ADDRESS).
    let mut last = String::new();
    let listed = eventually(Duration::from_secs(30), || {
        last = site.ok(&["get", "ingress", "shop", "--no-headers"]);
        last.contains(&format!("{SERVER_IP},{NODE_A_IP}"))
    });
    assert!(listed, "the Ingress's ADDRESS: {last}");

    // Plain HTTP by host, on both nodes, to the pods on both nodes.
    for node_ip in [SERVER_IP, NODE_A_IP] {
        let url = format!("http://{node_ip}/cgi-bin/who");
        let mut answers = String::new();
        let both = eventually(Duration::from_secs(60), || {
            answers = (0..6)
                .map(|_| curl(client, &["-H", "Host: web.example", &url]).1)
                .collect();
            answers.contains("server ") && answers.contains("node-a ")
        });
        assert!(both, "web.example on {node_ip}: {answers}");
    }

    // A body limit of its own (ingress-nginx's annotation): 413 for a larger body, declared
    // or streamed in chunks; a smaller one goes through.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: upload
  annotations: {nginx.ingress.kubernetes.io/proxy-body-size: 1k}
spec:
  rules:
  - host: up.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}]
"#,
        ),
    );
    let post = |body: &str, chunked: bool| {
        let mut args = vec!["-H", "Host: up.example", "-w", " %{http_code}"];
        if chunked {
            args.extend(["-H", "Transfer-Encoding: chunked"]);
        }
        let url = format!("http://{NODE_A_IP}/cgi-bin/who");
        args.extend(["--data-binary", body, &url]);
        curl(client, &args).1
    };
    let big = "x".repeat(2000);
    let mut answer = String::new();
    let limited = eventually(Duration::from_secs(30), || {
        answer = post(&big, false);
        answer.ends_with(" 413")
    });
    assert!(limited, "a 2000-byte body to a 1k route: {answer}");
    assert!(
        answer.contains("413 Content Too Large")
            && answer.contains("Ingress default/upload takes at most 1024"),
        "{answer}"
    );
    let streamed = post(&big, true);
    assert!(streamed.ends_with(" 413"), "chunked: {streamed}");
    let small = post(&"x".repeat(500), false);
    assert!(small.ends_with(" 200"), "500 bytes: {small}");

    // TLS with SNI, over HTTP/2, with the Secret's certificate (curl verifies it).
    let (ok, out, err) = curl(
        client,
        &[
            "--http2",
            "-w",
            " http/%{http_version}",
            "--cacert",
            &cert_path.display().to_string(),
            "--resolve",
            &format!("secure.example:443:{SERVER_IP}"),
            "https://secure.example/cgi-bin/who",
        ],
    );
    assert!(ok, "https://secure.example: {err}");
    assert!(
        out.starts_with("node-a ") && out.ends_with(" http/2"),
        "{out}"
    );
    // Another name gets the default certificate (which curl does not trust).
    let (ok, _, err) = curl(
        client,
        &[
            "--cacert",
            &cert_path.display().to_string(),
            "--resolve",
            &format!("web.example:443:{SERVER_IP}"),
            "https://web.example/",
        ],
    );
    assert!(!ok && err.contains("certificate"), "{err}");

    // What is missing is said.
    let (_, out, _) = curl(
        client,
        &[
            "-H",
            "Host: nothing.example",
            &format!("http://{NODE_A_IP}/"),
        ],
    );
    assert!(
        out.contains("404") && out.contains("no Ingress or HTTPRoute rule"),
        "{out}"
    );
    let (_, out, _) = curl(
        client,
        &["-H", "Host: gone.example", &format!("http://{NODE_A_IP}/")],
    );
    assert!(
        out.contains("503") && out.contains("default/missing does not exist"),
        "{out}"
    );

    // Bad input is refused as upstream refuses it, and breaks nothing else.
    let refused = |manifest: &str| {
        let out = site
            .kubectl_stdin(&["apply", "-f", "-"], Some(manifest))
            .unwrap();
        assert!(!out.status.success(), "accepted: {manifest}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: bad}\nspec:\n  rules: [{host: Bad_Host, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}}]\n",
    );
    assert!(
        err.contains("spec.rules[0].host: Invalid value: \"Bad_Host\""),
        "{err}"
    );
    let err = refused(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
    );
    assert!(
        err.contains("spec.ingress[0].from[0].ipBlock.cidr: Invalid value: \"10.0.0.0/33\""),
        "{err}"
    );
    let (_, out, _) = curl(
        client,
        &[
            "-H",
            "Host: web.example",
            &format!("http://{NODE_A_IP}/cgi-bin/who"),
        ],
    );
    assert!(
        out.starts_with("server ") || out.starts_with("node-a "),
        "{out}"
    );

    // The same Service through the API server's service proxy (kubectl get --raw, kubectl
    // proxy URLs), to a pod on the agent's node through its tunnel, and the agent's own API.
    let mut via_api = String::new();
    let proxied = eventually(Duration::from_secs(30), || {
        via_api = site.ok(&[
            "get",
            "--raw",
            "/api/v1/namespaces/default/services/secure:8443/proxy/cgi-bin/who",
        ]);
        via_api.starts_with("node-a ")
    });
    assert!(proxied, "services/secure:8443/proxy: {via_api}");
    let metrics = site.ok(&["get", "--raw", "/api/v1/nodes/node-a/proxy/metrics"]);
    assert!(metrics.contains("# TYPE"), "{metrics}");

    // A WebSocket through the ingress on the server, to the endpoint on node A (through the
    // mesh), with a real client.
    let python = tests::python();
    let mut last = String::new();
    let echoed = eventually(Duration::from_secs(30), || {
        let out = Command::new("ip")
            .args(["netns", "exec", client])
            .arg(&python)
            .args(["-c", WS_CLIENT, SERVER_IP])
            .output()
            .unwrap();
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        last.trim() == "hello through the ingress"
    });
    assert!(echoed, "WebSocket through the ingress: {last}");
    drop(ws_runtime);
}

const GATEWAY_OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: v1}
spec:
  selector: {app: v1}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: v2}
spec:
  selector: {app: v2}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: edgesite
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary}
spec:
  parentRefs: [{name: gw}]
  hostnames: [canary.example]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: v1, port: 80, weight: 80}, {name: v2, port: 80, weight: 20}]
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: X-Canary, value: always}]}]
    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Served-By, value: canary}]}}]
    backendRefs: [{name: v2, port: 80}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /cgi-bin/who}, statusCode: 301}}]
"#;

#[test]
fn a_gateway_route_splits_traffic_80_20_and_reports_its_status() {
    let lan = Lan::start();
    let (site, client) = (&lan.site, &lan.client);
    let objects = [
        WHO.to_string(),
        who_pod("v1-server", "v1", "server"),
        who_pod("v2-a", "v2", "node-a"),
        GATEWAY_OBJECTS.to_string(),
    ]
    .join("---");
    lan.apply_and_wait(&objects, &["v1-server", "v2-a"]);

    // Statuses as the Gateway API specifies them.
    let mut last = String::new();
    let accepted = eventually(Duration::from_secs(30), || {
        last = site.ok(&["get", "gatewayclass", "edgesite", "--no-headers"]);
        last.contains("edgesite.io/gateway-controller") && last.contains("True")
    });
    assert!(accepted, "GatewayClass: {last}");
    let programmed = eventually(Duration::from_secs(30), || {
        last = site.ok(&["get", "gateway", "gw", "--no-headers"]);
        let addresses = site.ok(&[
            "get",
            "gateway",
            "gw",
            "-o",
            "jsonpath={.status.addresses[*].value}",
        ]);
        last.contains("True") && addresses == format!("{SERVER_IP} {NODE_A_IP}")
    });
    assert!(programmed, "Gateway: {last}");
    let route_ok = eventually(Duration::from_secs(30), || {
        last = site.ok(&[
            "get",
            "httproute",
            "canary",
            "-o",
            "jsonpath={range .status.parents[*].conditions[*]}{.type}={.status} {end}",
        ]);
        last.contains("Accepted=True") && last.contains("ResolvedRefs=True")
    });
    assert!(route_ok, "HTTPRoute conditions: {last}");
    let listener = site.ok(&[
        "get",
        "gateway",
        "gw",
        "-o",
        "jsonpath={.status.listeners[0].attachedRoutes}",
    ]);
    assert_eq!(listener, "1");

    // 80/20 between v1 (on the server) and v2 (on node A).
    let url = format!("http://{SERVER_IP}/cgi-bin/who");
    let served = eventually(Duration::from_secs(60), || {
        curl(client, &["-H", "Host: canary.example", &url])
            .1
            .starts_with("server ")
    });
    assert!(served, "the route never answered");
    let mut v2 = 0;
    for _ in 0..100 {
        let (ok, out, err) = curl(client, &["-H", "Host: canary.example", &url]);
        assert!(ok, "{err}");
        if out.starts_with("node-a ") {
            v2 += 1;
        }
    }
    assert!((12..=28).contains(&v2), "v2 got {v2} of 100 (weight 20)");

    // A header match goes to v2 only, with the response header the filter sets.
    for _ in 0..5 {
        let (_, out, _) = curl(
            client,
            &[
                "-i",
                "-H",
                "Host: canary.example",
                "-H",
                "X-Canary: always",
                &url,
            ],
        );
        assert!(
            out.contains("node-a ") && out.to_ascii_lowercase().contains("x-served-by: canary"),
            "{out}"
        );
    }
    // A redirect.
    let (_, out, _) = curl(
        client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Host: canary.example",
            &format!("http://{SERVER_IP}/old"),
        ],
    );
    assert_eq!(out, "301 http://canary.example/cgi-bin/who");

    // A route to a Service that does not exist says so in its status.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken}\nspec:\n  parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{name: nowhere, port: 80}]}]\n"),
    );
    let reported = eventually(Duration::from_secs(30), || {
        last = site.ok(&[
            "get",
            "httproute",
            "broken",
            "-o",
            "jsonpath={.status.parents[0].conditions[?(@.type==\"ResolvedRefs\")].reason}",
        ]);
        last == "BackendNotFound"
    });
    assert!(reported, "broken route's ResolvedRefs: {last}");
}

/// A pod on `node` that only sleeps, labelled `labels` (`{}` for none): a client to exec in.
fn client_pod(name: &str, labels: &str, node: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {labels}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 0
  containers:
  - {{name: c, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sleep", "3600"]}}
"#
    )
}

const POLICY_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]
"#;

const DENY_ALL: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

/// Lets pods labelled role=client in on the named port, and the LAN (but the server's own
/// address) on any port.
const ALLOW_CLIENTS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-clients}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: http}]
"#;

const ALLOW_LAN: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-lan}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 192.168.50.0/24, except: [192.168.50.10/32]}}]
"#;

const CLIENTS_EGRESS_LAN_ONLY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: clients-out}
spec:
  podSelector: {matchLabels: {role: client}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 192.168.50.0/24}}]
"#;

#[test]
fn network_policy_default_deny_then_an_allow_rule_lets_a_labelled_client_in() {
    let lan = Lan::start();
    let (site, client) = (&lan.site, &lan.client);
    // A named port ("http") for the allow rule to name.
    let web = who_pod("web-a", "web", "node-a").replace(
        "    readinessProbe:",
        "    ports: [{name: http, containerPort: 8080}]\n    readinessProbe:",
    );
    let workloads = [
        WHO.to_string(),
        web,
        POLICY_SERVICE.to_string(),
        client_pod("client-a", "{role: client}", "node-a"),
        client_pod("stranger-a", "{}", "node-a"),
        client_pod("client-s", "{role: client}", "server"),
        client_pod("stranger-s", "{}", "server"),
    ]
    .join("---");
    let pods = ["web-a", "client-a", "stranger-a", "client-s", "stranger-s"];
    lan.apply_and_wait(&workloads, &pods);
    let cluster_ip = site.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    // Each client pod fetches through the cluster IP: on node-a the kernel DNATs to web-a
    // (same node), on the server the proxy tunnels to node-a.
    let last_error = std::cell::RefCell::new(String::new());
    let fetch = |pod: &str| {
        let out = site
            .kubectl(&[
                "exec",
                pod,
                "--",
                "sh",
                "-c",
                &format!(
                    "printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {cluster_ip} 80"
                ),
            ])
            .unwrap();
        // busybox's wget crashes in the test image's NSS lookups; nc speaks HTTP/1.0.
        let answered = String::from_utf8_lossy(&out.stdout).contains("node-a ");
        if !answered {
            *last_error.borrow_mut() = format!(
                "{pod}: {} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        answered
    };
    let lan_client = || who(client, &format!("{NODE_A_IP}:30090")).is_ok();
    let lan_via_server = || who(client, &format!("{SERVER_IP}:30090")).is_ok();
    let expect = |what: &str, want: [bool; 6]| {
        let mut got = [false; 6];
        let start = std::time::Instant::now();
        let settled = eventually(Duration::from_secs(20), || {
            got = [
                fetch("client-a"),
                fetch("stranger-a"),
                fetch("client-s"),
                fetch("stranger-s"),
                lan_client(),
                lan_via_server(),
            ];
            got == want
        });
        eprintln!("{what}: as wanted after {:?}", start.elapsed());
        assert!(
            settled,
            "{what}: reached [client-a, stranger-a, client-s, stranger-s, lan via node-a, lan via server] = {got:?}, wanted {want:?} (last refusal: {})\n{}\nagent log:\n{}",
            last_error.borrow(),
            iptables(&lan.node_a),
            lan.agent.log()
        );
    };

    expect("no policy", [true; 6]);

    // From `kubectl apply` to the rules in node-a's kernel: the server resolves, writes the
    // node's ConfigMap, the node's watch sees it and replaces its chains.
    let applied = std::time::Instant::now();
    site.ok_stdin(&["apply", "-f", "-"], Some(DENY_ALL));
    let enforced = eventually(Duration::from_secs(10), || {
        iptables(&lan.node_a).contains("-A EDGEMESH-NETPOL -d ")
    });
    eprintln!(
        "default deny: in node-a's kernel {:?} after kubectl apply started",
        applied.elapsed()
    );
    assert!(
        enforced,
        "no policy chain on node-a:\n{}",
        iptables(&lan.node_a)
    );
    expect("default deny", [false; 6]);
    // The kubelet's probes come from the node: web-a stays Ready and in the Service.
    let ready = site.ok(&[
        "get",
        "pod",
        "web-a",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    assert_eq!(ready, "True", "web-a under default deny");

    site.ok_stdin(&["apply", "-f", "-"], Some(ALLOW_CLIENTS));
    expect("clients allowed", [true, false, true, false, false, false]);

    // ipBlock with except: the LAN client is in, through either node (through the server,
    // the tunnel names the client's address to node-a).
    site.ok_stdin(&["apply", "-f", "-"], Some(ALLOW_LAN));
    expect("LAN allowed", [true, false, true, false, true, true]);

    // Egress: clients may only reach the LAN; web-a's pod address is not in it.
    site.ok_stdin(&["apply", "-f", "-"], Some(CLIENTS_EGRESS_LAN_ONLY));
    expect("clients' egress", [false, false, false, false, true, true]);

    site.ok(&["delete", "networkpolicy", "--all"]);
    expect("no policy again", [true; 6]);
    let rules = site.ok(&[
        "get",
        "configmap",
        "-n",
        "kube-system",
        "netpol.node-a",
        "-o",
        "jsonpath={.data.policy\\.json}",
    ]);
    assert_eq!(rules, r#"{"pods":[]}"#);
}
