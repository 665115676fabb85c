//! Interactive access through the site's API with real containers: `kubectl exec` (WebSocket
//! and SPDY, with and without a terminal), `kubectl cp`, `kubectl port-forward` (WebSocket-
//! tunnelled and plain SPDY), the Python client's exec, all reaching the node agent over its
//! dial-out tunnel. Needs root; run by tests/run.sh.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::node::{AgentProcess, BUSYBOX, Runtime};
use tests::{Site, eventually, kubectl_bin};

fn kubectl(
    site: &Site,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&[u8]>,
) -> std::process::Output {
    let mut cmd = Command::new(kubectl_bin());
    cmd.arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run kubectl");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    finish(child, args)
}

/// Waits for a child (at most a minute: a hang fails the test with what it printed).
fn finish(mut child: std::process::Child, what: &[&str]) -> std::process::Output {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what:?} hung; it printed:\n{}\n{}",
                String::from_utf8_lossy(&o.join().unwrap()),
                String::from_utf8_lossy(&e.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

const WEBSOCKETS: &[(&str, &str)] = &[];
const SPDY: &[(&str, &str)] = &[
    ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"),
    ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false"),
];

/// A site with a remote agent (its streams go through the tunnel it dialled) running `web`.
fn setup(rt: &Runtime) -> (Site, AgentProcess) {
    let site = Site::start_with(&[&format!("--cluster-cidr={}", rt.cluster_cidr())]).unwrap();
    let agent = rt.start_agent(&site, "edge-1").unwrap();
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
    command: ["sh", "-c", "mkdir -p /www /www2 && echo hello-through-the-tunnel > /www/index.html && head -c 10485760 /dev/urandom > /www/big && echo second-port > /www2/index.html && httpd -p 8081 -h /www2 && exec httpd -f -p 8080 -h /www"]
    ports: [{{name: http, containerPort: 8080}}, {{name: second, containerPort: 8081}}]
    readinessProbe: {{httpGet: {{path: /index.html, port: 8080}}, periodSeconds: 1}}
"#
        )),
    );
    assert!(
        eventually(Duration::from_secs(60), || {
            site.kubectl(&[
                "get",
                "pod",
                "web",
                "-o",
                "jsonpath={.status.containerStatuses[0].ready}",
            ])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "true")
        }),
        "web never became ready\n{}",
        agent.log()
    );
    (site, agent)
}

#[test]
fn exec_runs_commands_with_exit_codes_stdin_and_a_terminal() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    for (transport, env) in [("websocket", WEBSOCKETS), ("spdy", SPDY)] {
        let out = kubectl(
            &site,
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
            String::from_utf8_lossy(&out.stderr).contains("err\n"),
            "{transport}: {out:?}"
        );
        // The container's environment, not an empty one.
        let out = kubectl(
            &site,
            env,
            &["exec", "web", "--", "sh", "-c", "echo $PATH"],
            None,
        );
        assert!(out.status.success(), "{transport}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("/bin"),
            "{transport}: {out:?}"
        );
        // stdin, closed at its end.
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let out = kubectl(
            &site,
            env,
            &["exec", "-i", "web", "--", "md5sum"],
            Some(&input),
        );
        assert!(out.status.success(), "{transport}: {out:?}");
        let want = format!("{:032x}", md5_of(&input));
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&want),
            "{transport}: {out:?}"
        );
        // A missing command.
        let out = kubectl(&site, env, &["exec", "web", "--", "no-such-command"], None);
        assert!(!out.status.success(), "{transport}: {out:?}");
        // A terminal of the size of kubectl's own (set by `script`'s pty), then input typed in it.
        let mut child = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "stty cols 123 rows 45; {} --kubeconfig {} exec -it web -- sh",
                kubectl_bin(),
                site.kubeconfig().display()
            ))
            .arg("/dev/null")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        stdin.write_all(b"stty size; tty; echo $((6*7))\n").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        stdin.write_all(b"exit 5\n").unwrap();
        drop(stdin);
        let out = finish(child, &["exec", "-it"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("45 123"),
            "{transport}: the terminal size did not arrive: {text}"
        );
        assert!(
            text.contains("/dev/pts/"),
            "{transport}: no terminal: {text}"
        );
        assert!(text.contains("42"), "{transport}: {text}");
        assert_eq!(out.status.code(), Some(5), "{transport}: {text}");
    }
    let log = site.log();
    assert!(
        log.contains("exec session over WebSocket (v5.channel.k8s.io)"),
        "{log}"
    );
    assert!(
        log.contains("exec session over SPDY/3.1 (v4.channel.k8s.io)"),
        "{log}"
    );
}

fn md5_of(data: &[u8]) -> u128 {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    u128::from_str_radix(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap(),
        16,
    )
    .unwrap()
}

#[test]
fn exec_processes_go_away_when_the_client_does_and_cp_copies_both_ways() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let container = site.ok(&[
        "get",
        "pod",
        "web",
        "-o",
        "jsonpath={.status.containerStatuses[0].containerID}",
    ]);
    let container = container.rsplit('/').next().unwrap().to_string();
    let processes = || {
        rt.ctr("edge-1", &["tasks", "ps", &container])
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before = processes();
    let mut child = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(["exec", "web", "--", "sleep", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || processes() > before),
        "the exec process never started"
    );
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        eventually(Duration::from_secs(20), || processes() == before),
        "the exec process outlived its client"
    );

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("data.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let out = kubectl(
        &site,
        WEBSOCKETS,
        &["cp", local.to_str().unwrap(), "web:/tmp/data.bin"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let back = dir.path().join("back.bin");
    let out = kubectl(
        &site,
        WEBSOCKETS,
        &["cp", "web:/tmp/data.bin", back.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
}

/// Starts `kubectl port-forward` and returns it with the local ports it reports.
fn port_forward(
    site: &Site,
    env: &[(&str, &str)],
    ports: &[&str],
) -> (std::process::Child, Vec<u16>) {
    let mut child = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(["port-forward", "pod/web"])
        .args(ports)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut local = Vec::new();
    while local.len() < ports.len() {
        let line = lines
            .next()
            .expect("port-forward printed its ports")
            .unwrap();
        // "Forwarding from 127.0.0.1:41234 -> 8080"
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            local.push(rest.split_whitespace().next().unwrap().parse().unwrap());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (child, local)
}

fn get(port: u16, path: &str) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer")
        + 4;
    out.split_off(at)
}

#[test]
fn port_forward_carries_requests_and_downloads_on_several_ports() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let big = site.ok(&["exec", "web", "--", "md5sum", "/www/big"]);
    let big = big.split_whitespace().next().unwrap().to_string();
    for (transport, env) in [("websocket", WEBSOCKETS), ("spdy", SPDY)] {
        let (mut child, ports) = port_forward(&site, env, &[":8080", ":8081"]);
        assert_eq!(
            get(ports[0], "/index.html"),
            b"hello-through-the-tunnel\n",
            "{transport}"
        );
        assert_eq!(
            get(ports[1], "/index.html"),
            b"second-port\n",
            "{transport}"
        );
        // Several connections at once, one of them 10 MB.
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let port = ports[i % 2];
                std::thread::spawn(move || get(port, "/index.html"))
            })
            .collect();
        let body = get(ports[0], "/big");
        assert_eq!(body.len(), 10 << 20, "{transport}");
        assert_eq!(format!("{:032x}", md5_of(&body)), big, "{transport}");
        for t in threads {
            assert!(!t.join().unwrap().is_empty(), "{transport}");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // Both transports were really used (kubectl falls back to SPDY silently).
    let log = site.log();
    assert!(
        log.contains("port-forward session over WebSocket (SPDY/3.1+portforward.k8s.io)"),
        "{log}"
    );
    assert!(
        log.contains("port-forward session over SPDY/3.1 (portforward.k8s.io)"),
        "{log}"
    );
}

/// The proxy subresources: `get --raw` and `kubectl proxy` URLs reach a pod's port and a
/// Service's endpoints (by port name or number) through the node agent's tunnel, with the
/// far end's status and body; bad targets get a Status saying why.
#[test]
fn proxy_subresources_reach_pods_and_services_through_the_tunnel() {
    use std::io::BufRead;
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: second, port: 81, targetPort: 8081}\n",
        ),
    );
    let raw = |path: &str| site.kubectl(&["get", "--raw", path]).unwrap();
    let pods = "/api/v1/namespaces/default/pods";
    let services = "/api/v1/namespaces/default/services";
    for (path, body) in [
        (
            format!("{pods}/web:8080/proxy/index.html"),
            "hello-through-the-tunnel\n",
        ),
        // No port: the first declared container port.
        (
            format!("{pods}/web/proxy/index.html"),
            "hello-through-the-tunnel\n",
        ),
        (format!("{pods}/http:web:8081/proxy/"), "second-port\n"),
        (
            format!("{services}/web:http/proxy/index.html"),
            "hello-through-the-tunnel\n",
        ),
        (
            format!("{services}/web:81/proxy/index.html"),
            "second-port\n",
        ),
        (
            format!("{services}/http:web:second/proxy/index.html"),
            "second-port\n",
        ),
    ] {
        let ok = eventually(Duration::from_secs(30), || {
            String::from_utf8_lossy(&raw(&path).stdout) == body
        });
        assert!(ok, "{path}: {:?}", raw(&path));
    }
    // A 10 MB download arrives whole.
    let big = site.ok(&["exec", "web", "--", "md5sum", "/www/big"]);
    let out = raw(&format!("{services}/web:http/proxy/big"));
    assert_eq!(out.stdout.len(), 10 << 20);
    assert_eq!(
        format!("{:032x}", md5_of(&out.stdout)),
        big.split_whitespace().next().unwrap()
    );
    // The far end's own status comes back; bad targets are refused with the reason.
    let err = site.fails(
        &["get", "--raw", &format!("{pods}/web:8080/proxy/missing")],
        None,
    );
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    let err = site.fails(
        &["get", "--raw", &format!("{services}/https:web:80/proxy/")],
        None,
    );
    assert!(err.contains("https"), "{err}");
    let err = site.fails(
        &["get", "--raw", &format!("{services}/web:9999/proxy/")],
        None,
    );
    assert!(err.contains("no endpoints available"), "{err}");
    let err = site.fails(&["get", "--raw", &format!("{pods}/web:http/proxy/")], None);
    assert!(err.contains("not a number"), "{err}");
    let err = site.fails(
        &["get", "--raw", &format!("{services}/nothing:80/proxy/")],
        None,
    );
    assert!(err.contains("not found"), "{err}");

    // `kubectl proxy`: the URL a dashboard link uses.
    let mut proxy = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(["proxy", "--port=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("kubectl proxy said {line:?}"));
    // kubectl proxy answers only requests addressed to localhost.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {services}/web:http/proxy/index.html HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = answer.split_off(at);
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!(body, b"hello-through-the-tunnel\n");
}

/// The Python client's port-forward speaks WebSocket channel framing (`v4.channel.k8s.io`), not
/// SPDY: two ports of one session, each answering.
#[test]
fn the_python_client_port_forwards_over_websocket_channels() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let script = r#"
import http.client
import sys
from kubernetes import client, config
from kubernetes.stream import portforward
config.load_kube_config()
api = client.CoreV1Api()
pf = portforward(api.connect_get_namespaced_pod_portforward, "web", "default", ports="8080,8081")
for port, want in ((8080, b"hello-through-the-tunnel"), (8081, b"second-port")):
    sock = pf.socket(port)
    sock.setblocking(True)
    sock.sendall(b"GET /index.html HTTP/1.0\r\nHost: web\r\n\r\n")
    # As the client's own tests read: by Content-Length (a port's connection ending is not
    # signalled on its own in this framing).
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    print(port, response.status, body)
    if response.status != 200 or want not in body or pf.error(port):
        print("error:", pf.error(port))
        sys.exit(1)
pf.close()

# The same in base64 text framing (`v4.base64.channel.k8s.io`), through the client's WebSocket.
import base64
from kubernetes.stream.ws_client import create_websocket
conf = client.Configuration.get_default_copy()
url = conf.host.replace("https://", "wss://") + "/api/v1/namespaces/default/pods/web/portforward?ports=8080"
ws = create_websocket(conf, url, headers={"sec-websocket-protocol": "v4.base64.channel.k8s.io"})
first = [ws.recv(), ws.recv()]
want = ["0" + base64.b64encode((8080).to_bytes(2, "little")).decode(),
        "1" + base64.b64encode((8080).to_bytes(2, "little")).decode()]
print("base64 port frames", first, want)
if first != want:
    sys.exit(1)
ws.send("0" + base64.b64encode(b"GET /index.html HTTP/1.0\r\nHost: web\r\n\r\n").decode())
got = b""
while b"hello-through-the-tunnel" not in got:
    m = ws.recv()
    if not m:
        break
    if m[0] != "0":
        print("unexpected channel", m)
        sys.exit(1)
    got += base64.b64decode(m[1:])
print("base64 got", got)
if b"200 OK" not in got or b"hello-through-the-tunnel" not in got:
    sys.exit(1)
ws.close()
"#;
    site.python_ok(script);
    assert!(
        site.log()
            .contains("port-forward session over WebSocket (v4.channel.k8s.io)"),
        "{}",
        site.log()
    );
}

#[test]
fn the_python_client_execs_over_websockets() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let script = r#"
import sys
from kubernetes import client, config
from kubernetes.stream import stream
config.load_kube_config()
api = client.CoreV1Api()
resp = stream(api.connect_get_namespaced_pod_exec, "web", "default",
              command=["sh", "-c", "echo from-python; exit 4"],
              stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False)
resp.run_forever(timeout=30)
out = resp.read_stdout()
print("stdout:", out.strip(), "code:", resp.returncode)
if out.strip() != "from-python" or resp.returncode != 4:
    sys.exit(1)
# Only one of the output streams (the shim once refused: opening file "" failed).
for stdout, stderr in ((True, False), (False, True)):
    resp = stream(api.connect_get_namespaced_pod_exec, "web", "default",
                  command=["sh", "-c", "echo to-out; echo to-err >&2; exit 3"],
                  stderr=stderr, stdin=False, stdout=stdout, tty=False, _preload_content=False)
    resp.run_forever(timeout=30)
    got_out, got_err = resp.read_stdout().strip(), resp.read_stderr().strip()
    print("only", "stdout" if stdout else "stderr", repr(got_out), repr(got_err), resp.returncode)
    want = ("to-out", "") if stdout else ("", "to-err")
    if (got_out, got_err) != want or resp.returncode != 3:
        sys.exit(1)
"#;
    site.python_ok(script);
}

/// Upstream's older exec subprotocols, through the Python client's own WebSocket factory:
/// binary `channel.k8s.io` (and no subprotocol), and the base64 text forms.
#[test]
fn exec_speaks_the_older_and_base64_websocket_subprotocols() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let script = r#"
import base64, json, sys
from urllib.parse import urlencode
from websocket import ABNF
from kubernetes import client, config
from kubernetes.stream.ws_client import create_websocket
config.load_kube_config()
conf = client.Configuration.get_default_copy()
base = conf.host.replace("https://", "wss://")

def run(protocol, command, stdin=None):
    query = urlencode([("command", c) for c in command] + [("stdout", "true"), ("stderr", "true"), ("stdin", "true" if stdin else "false")])
    ws = create_websocket(conf, base + "/api/v1/namespaces/default/pods/web/exec?" + query,
                          headers={"sec-websocket-protocol": protocol})
    text = "base64" in protocol
    if stdin:
        if text:
            ws.send("0" + base64.b64encode(stdin).decode())
        else:
            ws.send(b"\x00" + stdin, opcode=ABNF.OPCODE_BINARY)
    got = {1: b"", 2: b"", 3: b""}
    while True:
        opcode, data = ws.recv_data()
        if opcode == ABNF.OPCODE_CLOSE:
            break
        if not data:
            continue
        if text:
            assert opcode == ABNF.OPCODE_TEXT, ("text frames expected", protocol, opcode)
            channel, payload = data[0] - ord("0"), base64.b64decode(data[1:])
        else:
            channel, payload = data[0], data[1:]
        got[channel] = got.get(channel, b"") + payload
    ws.close()
    return got

for protocol in ("channel.k8s.io", "base64.channel.k8s.io", "v4.base64.channel.k8s.io", ""):
    got = run(protocol, ["sh", "-c", "echo out; echo err >&2; exit 5"])
    print(repr(protocol), got)
    if got[1] != b"out\n" or got[2] != b"err\n":
        sys.exit(1)
    if protocol.startswith("v4."):
        status = json.loads(got[3])
        if status["reason"] != "NonZeroExitCode" or status["details"]["causes"][0]["message"] != "5":
            sys.exit(1)
    elif b"exit code 5" not in got[3] or got[3].startswith(b"{"):
        # Before v4 the error channel carries the message as plain text.
        sys.exit(1)
    ok = run(protocol, ["sh", "-c", "head -n1"], stdin=b"typed in " + protocol.encode() + b"\n")
    print(repr(protocol), ok)
    if ok[1] != b"typed in " + protocol.encode() + b"\n":
        sys.exit(1)
    if protocol.startswith("v4."):
        if json.loads(ok[3])["status"] != "Success":
            sys.exit(1)
    elif ok[3] != b"":
        # Success writes nothing there before v4.
        sys.exit(1)
"#;
    site.python_ok(script);
    let log = site.log();
    for protocol in [
        "channel.k8s.io",
        "base64.channel.k8s.io",
        "v4.base64.channel.k8s.io",
    ] {
        assert!(
            log.contains(&format!("exec session over WebSocket ({protocol})")),
            "{log}"
        );
    }
    assert!(log.contains("exec session over WebSocket ()"), "{log}");
}

#[test]
fn top_shows_usage_and_the_figures_are_scrapable_as_prometheus_metrics() {
    let rt = Runtime::start().unwrap();
    let (site, agent) = setup(&rt);
    // Two samples make a rate: within a couple of sampling periods.
    let mut nodes = String::new();
    assert!(
        eventually(Duration::from_secs(45), || {
            nodes = site
                .kubectl(&["top", "nodes"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            nodes.contains("edge-1")
        }),
        "kubectl top nodes: {nodes}\n{}",
        agent.log()
    );
    assert!(
        nodes.contains("CPU(cores)") && nodes.contains("MEMORY(bytes)"),
        "{nodes}"
    );
    let mut pods = String::new();
    assert!(
        eventually(Duration::from_secs(45), || {
            pods = site
                .kubectl(&["top", "pods", "--containers"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            pods.contains("web")
        }),
        "kubectl top pods: {pods}"
    );
    // The web container holds a 10 MB file in its writable layer's page cache at least.
    let usage = site.json(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/web",
    ]);
    let memory = usage["containers"][0]["usage"]["memory"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(memory.ends_with("Ki"), "{usage}");
    let by_label = site.ok(&["top", "pods", "-l", "app=nothing"]);
    assert!(!by_label.contains("web"), "{by_label}");
    // The agent's Prometheus endpoints through the API server, as with a kubelet.
    let node_metrics = site.ok(&["get", "--raw", "/api/v1/nodes/edge-1/proxy/metrics"]);
    assert!(
        node_metrics.contains("container_memory_working_set_bytes{container=\"web\",namespace=\"default\",pod=\"web\"}"),
        "{node_metrics}"
    );
    assert!(
        node_metrics.contains("edgesite_agent_api_reachable 1"),
        "{node_metrics}"
    );
    let resource = site.ok(&[
        "get",
        "--raw",
        "/api/v1/nodes/edge-1/proxy/metrics/resource",
    ]);
    assert!(
        resource.contains("node_cpu_usage_seconds_total"),
        "{resource}"
    );
    let summary = site.json(&["get", "--raw", "/api/v1/nodes/edge-1/proxy/stats/summary"]);
    assert_eq!(summary["node"]["nodeName"], "edge-1");
    // The API server's own request metrics.
    let api = site.ok(&["get", "--raw", "/metrics"]);
    assert!(
        api.contains("apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"GET\"}"),
        "{api}"
    );
    assert!(
        api.contains("apiserver_request_duration_seconds_bucket"),
        "{api}"
    );
}

#[test]
fn attach_joins_a_running_process_with_its_terminal() {
    let rt = Runtime::start().unwrap();
    let (site, agent) = setup(&rt);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: shell}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: sh, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sh"], stdin: true, tty: true}}
  - {{name: ticker, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"]}}
"#
        )),
    );
    assert!(
        eventually(Duration::from_secs(60), || {
            site.kubectl(&["get", "pod", "shell", "-o", "jsonpath={.status.phase}"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "Running")
        }),
        "{}",
        agent.log()
    );
    // Output only: what the process prints from now on.
    for (transport, env) in [("websocket", WEBSOCKETS), ("spdy", SPDY)] {
        let mut child = Command::new(kubectl_bin())
            .arg("--kubeconfig")
            .arg(site.kubeconfig())
            .args(["attach", "shell", "-c", "ticker"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let second = lines.next().unwrap().unwrap();
        assert!(
            first.starts_with("tick-") && second.starts_with("tick-"),
            "{transport}: {first} {second}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
    // The terminal of the shell: what is typed runs there, and exiting ends the container.
    {
        let (transport, env) = ("websocket", WEBSOCKETS);
        let mut child = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "{} --kubeconfig {} attach -it shell -c sh",
                kubectl_bin(),
                site.kubeconfig().display()
            ))
            .arg("/dev/null")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        stdin.write_all(b"echo attached-$((6*7))\n").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        stdin.write_all(b"exit\n").unwrap();
        drop(stdin);
        let out = finish(child, &["attach", "-it"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("attached-42"), "{transport}: {text}");
    }
    assert!(
        eventually(Duration::from_secs(30), || {
            site.kubectl(&[
                "get",
                "pod",
                "shell",
                "-o",
                "jsonpath={.status.containerStatuses[?(@.name==\"sh\")].state.terminated.exitCode}",
            ])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "0")
        }),
        "the shell did not end with exit: {}",
        site.ok(&["get", "pod", "shell", "-o", "yaml"])
    );
}

/// The node's kubelet API (`--kubelet-port`): TLS with a serving certificate the site signed
/// for the node's address (a `kubernetes.io/kubelet-serving` request the control plane
/// approved), kube-rs's kubelet client exec (its `needs cluster` node-proxy test), and the
/// paths Prometheus and metrics-server scrape, each authorized by the API server.
#[test]
fn the_kubelet_api_serves_kubelet_clients_on_the_node() {
    let rt = Runtime::start().unwrap();
    let (site, agent) = setup(&rt);
    let port = rt.kubelet_port("edge-1");
    let ip = site.ok(&[
        "get",
        "node",
        "edge-1",
        "-o",
        r#"jsonpath={.status.addresses[?(@.type=="InternalIP")].address}"#,
    ]);
    let reported = site.ok(&[
        "get",
        "node",
        "edge-1",
        "-o",
        "jsonpath={.status.daemonEndpoints.kubeletEndpoint.Port}",
    ]);
    assert_eq!(reported.trim(), port.to_string());
    let csrs = site.ok(&["get", "csr", "-o", "custom-columns=SIGNER:.spec.signerName,REQUESTOR:.spec.username,CONDITION:.status.conditions[0].type"]);
    let url = format!("https://{}:{port}", ip.trim());
    let rt_async = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt_async.block_on(async {
        use kube::api::AttachParams;
        use kube::core::kubelet_debug::KubeletDebugParams;
        // The admin's client certificate, and the site CA checks the node's certificate.
        let mut config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(site.kubeconfig()).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        config.cluster_url = url.parse().unwrap();
        let kubelet = kube::Client::try_from(config).unwrap();
        let get = |path: &str| {
            let kubelet = kubelet.clone();
            let request = http::Request::get(path).body(Vec::new()).unwrap();
            async move { kubelet.request_text(request).await }
        };
        // The serving certificate comes once the control plane signed it.
        let started = std::time::Instant::now();
        loop {
            match get("/healthz").await {
                Ok(ok) => {
                    assert_eq!(ok, "ok");
                    break;
                }
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!(
                    "the kubelet API at {url} never answered: {e}\nCSRs:\n{csrs}\n{}",
                    agent.log()
                ),
            }
        }
        let mut attached = kubelet
            .kubelet_node_exec(
                &KubeletDebugParams {
                    name: "web",
                    namespace: "default",
                    ..Default::default()
                },
                "web",
                vec!["sh", "-c", "for i in 1 2 3; do echo $i; done"],
                &AttachParams::default().stderr(false),
            )
            .await
            .expect("exec through the kubelet API");
        let mut stdout = attached.stdout().unwrap();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut out)
            .await
            .unwrap();
        attached.join().await.unwrap();
        assert_eq!(out, "1\n2\n3\n");

        let pods: serde_json::Value = serde_json::from_str(&get("/pods").await.unwrap()).unwrap();
        assert_eq!(pods["kind"], "PodList");
        assert!(
            pods["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["metadata"]["name"] == "web"),
            "{pods}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&get("/stats/summary").await.unwrap()).unwrap();
        assert_eq!(summary["node"]["nodeName"], "edge-1", "{summary}");
        // Samples come every 10 s.
        let mut cadvisor = String::new();
        for _ in 0..40 {
            cadvisor = get("/metrics/cadvisor").await.unwrap();
            if cadvisor.contains(r#"pod="web""#) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            cadvisor.contains("container_memory_working_set_bytes{container=\"web\"")
                && cadvisor.contains(r#"pod="web""#),
            "{cadvisor}"
        );
        let resource = get("/metrics/resource").await.unwrap();
        assert!(
            resource.contains("node_cpu_usage_seconds_total"),
            "{resource}"
        );
        let logs = get("/containerLogs/default/web/web").await;
        assert!(logs.is_ok(), "{logs:?}");
    });

    // Bearer tokens are reviewed by the API server; access is its decision.
    site.ok(&["create", "serviceaccount", "scraper"]);
    let token = site.ok(&["create", "token", "scraper"]);
    let token = token.trim();
    let with_token = |path: &str, token: Option<&str>| -> u16 {
        let url = format!("https://{}:{port}", ip.trim());
        let rt_async = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt_async.block_on(async {
            let mut config = kube::Config::new(url.parse().unwrap());
            config.accept_invalid_certs = true;
            if let Some(t) = token {
                config.auth_info.token = Some(t.to_string().into());
            }
            let client = kube::Client::try_from(config).unwrap();
            let request = http::Request::get(path).body(Vec::new()).unwrap();
            match client.request_text(request).await {
                Ok(_) => 200,
                Err(kube::Error::Api(s)) => s.code,
                Err(e) => panic!("{path}: {e}"),
            }
        })
    };
    assert_eq!(with_token("/metrics", None), 401);
    assert_eq!(with_token("/pods", Some(token)), 403);
    site.ok(&[
        "create",
        "clusterrole",
        "scrape-nodes",
        "--verb=get",
        "--resource=nodes/metrics,nodes/stats",
    ]);
    site.ok(&[
        "create",
        "clusterrolebinding",
        "scraper",
        "--clusterrole=scrape-nodes",
        "--serviceaccount=default:scraper",
    ]);
    // (Decisions are cached for 30 s: these subresources were not asked before.)
    assert_eq!(with_token("/metrics/resource", Some(token)), 200);
    assert_eq!(with_token("/stats/summary", Some(token)), 200);
    assert_eq!(with_token("/pods", Some(token)), 403);
    assert!(
        agent.log().contains("kubelet API listening"),
        "{}",
        agent.log()
    );
}

/// kr8s (PyPI): exec with separate streams and exit codes, port-forward to the pod, `wait()`.
#[test]
fn kr8s_execs_port_forwards_and_waits() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let script = r#"
import sys, urllib.request
import kr8s
from kr8s.objects import Pod
pod = Pod.get("web", namespace="default")
pod.wait("condition=Ready", timeout=30)
ex = pod.exec(["sh", "-c", "echo out; echo err >&2"])
print("exec", ex.stdout, ex.stderr, ex.returncode)
if ex.stdout != b"out\n" or ex.stderr != b"err\n" or ex.returncode != 0:
    sys.exit(1)
failed = pod.exec(["sh", "-c", "exit 3"], check=False)
print("exit", failed.returncode)
if failed.returncode != 3:
    sys.exit(1)
with pod.portforward(remote_port=8080) as port:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10).read()
    print("forwarded", body)
    if b"hello-through-the-tunnel" not in body:
        sys.exit(1)
"#;
    site.python_ok(script);
}

/// kubernetes-asyncio (PyPI): exec over its WebSocket client with stderr off (the shim once
/// refused: opening file "").
#[test]
fn kubernetes_asyncio_execs_with_one_output_stream() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let script = r#"
import asyncio, sys
from kubernetes_asyncio import client, config
from kubernetes_asyncio.stream import WsApiClient
async def main():
    await config.load_kube_config()
    async with WsApiClient() as ws:
        v1 = client.CoreV1Api(api_client=ws)
        out = await v1.connect_get_namespaced_pod_exec("web", "default",
            command=["sh", "-c", "echo only-out; echo hidden >&2"],
            stderr=False, stdin=False, stdout=True, tty=False)
        print("stdout only:", repr(out))
        if "only-out" not in out or "hidden" in out:
            sys.exit(1)
        # The status channel's Status, as upstream writes it.
        resp = await v1.connect_get_namespaced_pod_exec("web", "default",
            command=["sh", "-c", "exit 7"], stderr=True, stdin=False, stdout=True, tty=False,
            _preload_content=False)
        code = None
        async with resp as ws_resp:
            async for msg in ws_resp:
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                if data and data[0] == 3:
                    code = data[1:].decode()
        print("status:", code)
        if code is None or '"NonZeroExitCode"' not in code:
            sys.exit(1)
asyncio.run(main())
"#;
    site.python_ok(script);
}

/// `@kubernetes/client-node` (npm): exec with a null stderr, and port-forward over its
/// WebSocket channel framing.
#[test]
fn client_node_execs_and_port_forwards() {
    let rt = Runtime::start().unwrap();
    let (site, _agent) = setup(&rt);
    let script = r#"
import * as k8s from '@kubernetes/client-node';
import * as net from 'node:net';
import { Writable } from 'node:stream';
const kc = new k8s.KubeConfig();
kc.loadFromDefault();
let out = '';
const stdout = new Writable({ write(chunk, _enc, done) { out += chunk.toString(); done(); } });
const status = await new Promise((resolve, reject) => {
  new k8s.Exec(kc)
    .exec('default', 'web', 'web', ['sh', '-c', 'echo from-node; echo hidden >&2'], stdout, null, null, false, resolve)
    .catch(reject);
});
console.log('exec', JSON.stringify(out), status.status);
if (out !== 'from-node\n' || status.status !== 'Success') process.exit(1);

const forward = new k8s.PortForward(kc);
const server = net.createServer((socket) => {
  forward.portForward('default', 'web', [8080], socket, null, socket).catch((e) => console.log('forward failed', e));
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const port = server.address().port;
const body = await new Promise((resolve, reject) => {
  const c = net.connect(port, '127.0.0.1', () => c.write('GET /index.html HTTP/1.0\r\nHost: web\r\n\r\n'));
  let got = '';
  c.on('data', (d) => { got += d.toString(); if (got.includes('hello-through-the-tunnel')) { resolve(got); c.destroy(); } });
  c.on('error', reject);
  setTimeout(() => resolve(got), 15000);
});
console.log('forwarded', JSON.stringify(body.slice(0, 40)));
server.close();
if (!body.includes('200 OK') || !body.includes('hello-through-the-tunnel')) process.exit(1);
process.exit(0);
"#;
    site.node_ok(script);
}
