//! `kubectl debug` with real containers on a remote agent: ephemeral containers added through
//! `pods/NAME/ephemeralcontainers`, attached with a terminal, sharing their target's processes
//! (`--target`), logged, never restarted; what the API refuses; and `kubectl debug node/NAME`,
//! a pod in the host's namespaces with the host's root at `/host`. Needs root; run by
//! tests/run.sh.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::node::{AgentProcess, BUSYBOX, Runtime};
use tests::{Site, eventually, kubectl_bin};

/// A site with agent `edge-1`, registered.
fn site_with_agent(rt: &Runtime) -> (Site, AgentProcess) {
    let site = Site::start_with(&[&format!("--cluster-cidr={}", rt.cluster_cidr())]).unwrap();
    let agent = rt.start_agent(&site, "edge-1").unwrap();
    assert!(
        eventually(Duration::from_secs(60), || {
            site.kubectl(&["get", "node", "edge-1"])
                .is_ok_and(|o| o.status.success())
        }),
        "edge-1 never registered: {}",
        agent.log()
    );
    (site, agent)
}

/// A site with agent `edge-1` running pod `app` (one container `app`, a recognisable sleep).
fn setup(rt: &Runtime) -> (Site, AgentProcess) {
    let (site, agent) = site_with_agent(rt);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: app}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: app, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sh", "-c", "exec sleep 3601"]}}
"#
        )),
    );
    site.ok(&["wait", "--for=condition=Ready", "pod/app", "--timeout=60s"]);
    (site, agent)
}

/// A jsonpath of pod `name`.
fn field(site: &Site, name: &str, path: &str) -> String {
    site.ok(&["get", "pod", name, "-o", &format!("jsonpath={path}")])
}

/// Runs `kubectl ARGS` under a pseudo-terminal (`script`), typing `lines` once it is up;
/// returns what the terminal showed.
fn in_terminal(site: &Site, args: &str, lines: &[&str]) -> String {
    let mut child = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} --kubeconfig {} {args}",
            kubectl_bin(),
            site.kubeconfig().display()
        ))
        .arg("/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script (util-linux)");
    let mut stdin = child.stdin.take().unwrap();
    let out = std::thread::spawn({
        let mut stdout = child.stdout.take().unwrap();
        move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
            v
        }
    });
    // The ephemeral container starts (the image is local) and kubectl attaches; then type.
    std::thread::sleep(Duration::from_secs(4));
    for line in lines {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    drop(stdin);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.wait();
    String::from_utf8_lossy(&out.join().unwrap()).into_owned()
}

#[test]
fn an_ephemeral_container_attaches_and_sees_its_target_processes() {
    let rt = Runtime::start().unwrap();
    let (site, agent) = setup(&rt);

    // `kubectl debug -it --target`: a shell in the pod that sees the target's processes.
    let shown = in_terminal(
        &site,
        &format!(
            "debug -it app --image={BUSYBOX} --image-pull-policy=Never --profile=general --target=app -c dbg -- sh"
        ),
        &["ps -o pid,args | grep -c 'sleep 360[1]'", "exit"],
    );
    assert!(
        shown.lines().any(|l| l.trim() == "1"),
        "the debugger did not see the target's sleep:\n{shown}\n{}",
        agent.log()
    );
    assert!(
        eventually(Duration::from_secs(30), || {
            field(
                &site,
                "app",
                "{.status.ephemeralContainerStatuses[?(@.name==\"dbg\")].state.terminated.exitCode}",
            ) == "0"
        }),
        "the debugger's exit is not reported: {}",
        site.ok(&["get", "pod", "app", "-o", "yaml"])
    );
    // It stays exited (never restarted), and the pod's own container was not touched.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        field(
            &site,
            "app",
            "{.status.ephemeralContainerStatuses[?(@.name==\"dbg\")].restartCount}"
        ),
        "0"
    );
    assert_eq!(
        field(&site, "app", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
    assert_eq!(field(&site, "app", "{.status.phase}"), "Running");

    // Without a target it has its own process namespace; its output is in its logs.
    let asked = std::time::Instant::now();
    site.ok(&[
        "debug",
        "app",
        &format!("--image={BUSYBOX}"),
        "--image-pull-policy=Never",
        "-c",
        "alone",
        "--",
        "sh",
        "-c",
        "ps -o args; echo alone-done",
    ]);
    assert!(
        eventually(Duration::from_secs(30), || {
            field(
                &site,
                "app",
                "{.status.ephemeralContainerStatuses[?(@.name==\"alone\")].state.terminated.reason}",
            ) == "Completed"
        }),
        "{}",
        site.ok(&["get", "pod", "app", "-o", "yaml"])
    );
    eprintln!(
        "measured: `kubectl debug` to the ephemeral container's completion reported: {:.2} s",
        asked.elapsed().as_secs_f64()
    );
    let logs = site.ok(&["logs", "app", "-c", "alone"]);
    assert!(
        logs.contains("alone-done") && !logs.contains("sleep 3601"),
        "{logs}"
    );
    assert_eq!(
        field(&site, "app", "{.spec.ephemeralContainers[*].name}"),
        "dbg alone"
    );
    // `kubectl get` shows the ephemeral containers as part of the pod, as upstream (READY 1/1).
    let table = site.ok(&["get", "pod", "app"]);
    assert!(table.contains("1/1"), "{table}");

    // `--copy-to`: a copy of the pod with the debugger as another container (a plain pod).
    site.ok(&[
        "debug",
        "app",
        "--copy-to=app-copy",
        "--share-processes",
        &format!("--image={BUSYBOX}"),
        "--image-pull-policy=Never",
        "-c",
        "extra",
        "--",
        "sleep",
        "3600",
    ]);
    site.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/app-copy",
        "--timeout=60s",
    ]);
    assert_eq!(
        field(&site, "app-copy", "{.spec.containers[*].name}"),
        "app extra"
    );
    // With `--share-processes` the copy's containers see each other's processes.
    assert_eq!(
        field(&site, "app-copy", "{.spec.shareProcessNamespace}"),
        "true"
    );
    let seen = site.ok(&["exec", "app-copy", "-c", "extra", "--", "ps", "-o", "args"]);
    assert!(seen.contains("sleep 3601"), "{seen}");

    // What the API refuses, with upstream's messages.
    let err = site.fails(
        &[
            "debug",
            "app",
            &format!("--image={BUSYBOX}"),
            "--target=nope",
            "-c",
            "x",
        ],
        None,
    );
    assert!(
        err.contains("spec.ephemeralContainers[2].targetContainerName: Not found: \"nope\""),
        "{err}"
    );
    let refused = |patch: &str, expected: &str| {
        let err = site.fails(
            &[
                "patch",
                "pod",
                "app",
                "--subresource=ephemeralcontainers",
                "--type=json",
                "-p",
                patch,
            ],
            None,
        );
        assert!(err.contains(expected), "{err}");
    };
    refused(
        r#"[{"op": "replace", "path": "/spec/ephemeralContainers/0/image", "value": "other"}]"#,
        "existing ephemeral containers \"dbg\" may not be changed",
    );
    refused(
        r#"[{"op": "add", "path": "/spec/ephemeralContainers/-", "value": {"name": "p", "image": "x", "ports": [{"containerPort": 80}]}}]"#,
        "spec.ephemeralContainers[2].ports: Forbidden: cannot be set for an Ephemeral Container",
    );
    // Not through the pod itself, and not on create.
    let err = site.fails(
        &[
            "patch",
            "pod",
            "app",
            "--type=json",
            "-p",
            r#"[{"op": "add", "path": "/spec/ephemeralContainers/-", "value": {"name": "z", "image": "x"}}]"#,
        ],
        None,
    );
    assert!(err.contains("pod updates may not change fields"), "{err}");
    let err = site.fails(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: born-with-one}}
spec:
  containers: [{{name: a, image: {BUSYBOX}}}]
  ephemeralContainers: [{{name: e, image: {BUSYBOX}}}]
"#
        )),
    );
    assert!(
        err.contains("spec.ephemeralContainers: Forbidden: cannot be set on create"),
        "{err}"
    );
}

#[test]
fn debug_node_runs_a_pod_in_the_host_namespaces_with_its_root() {
    let rt = Runtime::start().unwrap();
    let (site, agent) = site_with_agent(&rt);
    // Something only the host has, to find under /host.
    let marker = tempfile::Builder::new()
        .prefix("edgesite-debug-node-")
        .tempfile_in("/tmp")
        .unwrap();
    std::fs::write(marker.path(), "on-the-host\n").unwrap();
    let ns = |kind: &str| {
        std::fs::read_link(format!("/proc/self/ns/{kind}"))
            .unwrap()
            .display()
            .to_string()
    };
    let script = format!(
        "cat /host{}\nreadlink /proc/self/ns/pid\nreadlink /proc/self/ns/ipc\nreadlink /proc/self/ns/net\nexit\n",
        marker.path().display()
    );
    let out = site
        .kubectl_stdin(
            &[
                "debug",
                "node/edge-1",
                "-i",
                "--profile=general",
                &format!("--image={BUSYBOX}"),
                "--image-pull-policy=Never",
                "--",
                "sh",
            ],
            Some(&script),
        )
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("on-the-host"),
        "no host root at /host: {shown}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    for kind in ["pid", "ipc", "net"] {
        assert!(
            shown.contains(&ns(kind)),
            "not in the host's {kind} namespace ({}): {shown}",
            ns(kind)
        );
    }
    // The pod kubectl made: on that node, finished once the shell exited.
    let pods = site.ok(&[
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName}{\"\\n\"}{end}",
    ]);
    let line = pods
        .lines()
        .find(|l| l.starts_with("node-debugger-edge-1-"))
        .unwrap_or_else(|| panic!("{pods}"));
    let name = line.split(' ').next().unwrap();
    assert!(line.ends_with(" edge-1"), "{line}");
    assert!(
        eventually(Duration::from_secs(30), || field(
            &site,
            name,
            "{.status.phase}"
        ) == "Succeeded"),
        "{}",
        site.ok(&["get", "pod", name, "-o", "yaml"])
    );
}

/// The host PIDs of the processes whose command line contains `text`.
fn processes_with(text: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
        })
        .collect()
}

#[test]
fn containers_of_a_pod_sharing_its_process_namespace_see_each_other() {
    let rt = Runtime::start().unwrap();
    let (site, agent) = site_with_agent(&rt);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: shared}}
spec:
  shareProcessNamespace: true
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: a, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sleep", "3611"]}}
  - {{name: b, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sleep", "3612"]}}
"#
        )),
    );
    assert!(
        eventually(Duration::from_secs(60), || {
            site.kubectl(&["get", "pod", "shared", "-o", "jsonpath={.status.phase}"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "Running")
        }),
        "{}",
        agent.log()
    );
    let seen = site.ok(&["exec", "shared", "-c", "a", "--", "ps", "-o", "pid,args"]);
    assert!(seen.contains("sleep 3612"), "a does not see b: {seen}");
    // PID 1 is the namespace's holder, as the pause container is upstream.
    assert!(
        seen.lines()
            .any(|l| l.trim().starts_with("1 ") && l.contains("edgesite-pid-holder")),
        "{seen}"
    );
    // A container restarted joins the same namespace (b ends a's process).
    site.ok(&[
        "exec",
        "shared",
        "-c",
        "b",
        "--",
        "sh",
        "-c",
        "for p in /proc/[0-9]*; do [ \"$(cat $p/comm)\" = sleep ] && grep -q 3611 $p/cmdline && kill ${p#/proc/}; done; true",
    ]);
    let restarted = eventually(Duration::from_secs(60), || {
        site.kubectl(&[
            "get",
            "pod",
            "shared",
            "-o",
            "jsonpath={.status.containerStatuses[?(@.name==\"a\")].restartCount}",
        ])
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "1")
            && site
                .kubectl(&["exec", "shared", "-c", "b", "--", "ps", "-o", "args"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("sleep 3611"))
    });
    assert!(
        restarted,
        "{}",
        site.ok(&["get", "pod", "shared", "-o", "yaml"])
    );
    // The holder goes with the pod.
    let uid = site.ok(&["get", "pod", "shared", "-o", "jsonpath={.metadata.uid}"]);
    assert_eq!(processes_with(&uid).len(), 1, "one holder for the pod");
    site.ok(&["delete", "pod", "shared", "--timeout=60s"]);
    assert!(
        eventually(Duration::from_secs(10), || processes_with(&uid).is_empty()),
        "the holder outlived its pod"
    );
    // Not together with the host's PID namespace.
    let err = site.fails(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: both}}
spec:
  shareProcessNamespace: true
  hostPID: true
  containers: [{{name: a, image: {BUSYBOX}}}]
"#
        )),
    );
    assert!(
        err.contains("ShareProcessNamespace and HostPID cannot both be enabled"),
        "{err}"
    );
}
