//! The real kubectl against a real `edgesite server`: everyday commands and their exact output.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{Site, eventually, kubectl_bin, kubectl_minor};

/// Validation on, for every kubectl (before 1.27 it validates client-side with OpenAPI v2).
fn validate() -> &'static str {
    "--validate=true"
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
  labels:
    app: nginx
spec:
  replicas: 3
  selector:
    matchLabels:
      app: nginx
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
        env:
        - name: MODE
          value: fast
        - name: DEBUG
          value: \"1\"
        ports:
        - containerPort: 80
";

fn lines(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn default_namespaces_discovery_and_version() {
    let site = Site::start().unwrap();
    let out = site.ok(&["get", "ns"]);
    let rows = lines(&out);
    assert_eq!(rows[0], vec!["NAME", "STATUS", "AGE"]);
    let names: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        names,
        vec!["default", "kube-node-lease", "kube-public", "kube-system"]
    );
    assert!(rows[1..].iter().all(|r| r[1] == "Active"));
    let resources = site.ok(&["api-resources"]);
    assert!(
        resources
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["deployments", "deploy", "apps/v1", "true", "Deployment"])
    );
    assert!(
        resources
            .lines()
            .any(|l| l.starts_with("customresourcedefinitions") && l.contains("crd,crds"))
    );
    let version = site.ok(&["get", "--raw", "/version"]);
    assert!(version.contains("\"gitVersion\""));
    // The build is stamped with its date (it was the epoch).
    let version: serde_json::Value = serde_json::from_str(&version).unwrap();
    let built = version["buildDate"].as_str().unwrap_or_default();
    assert!(
        built.len() == 20 && built.ends_with('Z') && built.as_bytes()[0..2] == *b"20",
        "{version}"
    );
    // Anonymous requests may read only the public health and version endpoints (upstream's
    // system:public-info-viewer); anything else is Forbidden with upstream's message.
    let raw = site.ok(&["get", "--raw", "/readyz"]);
    assert_eq!(raw.trim(), "ok");
}

#[test]
fn apply_edit_and_reapply_a_deployment_like_upstream() {
    let site = Site::start().unwrap();
    let v = validate();
    let out = site.ok_stdin(&["apply", v, "-f", "-"], Some(DEPLOYMENT));
    assert_eq!(out.trim(), "deployment.apps/nginx-deployment created");
    let out = site.ok(&["get", "deployments"]);
    let rows = lines(&out);
    assert_eq!(
        rows[0],
        vec!["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    );
    // No nodes: the pods exist (UP-TO-DATE may already say 3) but none is ready.
    assert_eq!(&rows[1][..2], &["nginx-deployment", "0/3"]);
    let wide = site.ok(&["get", "deploy", "-o", "wide"]);
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .ends_with("CONTAINERS   IMAGES         SELECTOR"),
        "{wide}"
    );
    assert!(wide.contains("nginx:1.14.2") && wide.contains("app=nginx"));
    let out = site.ok_stdin(&["apply", v, "-f", "-"], Some(DEPLOYMENT));
    assert_eq!(out.trim(), "deployment.apps/nginx-deployment unchanged");
    // Edit: new image, one env var removed, one port added.
    let edited = DEPLOYMENT
        .replace("nginx:1.14.2", "nginx:1.16.1")
        .replace("        - name: DEBUG\n          value: \"1\"\n", "")
        .replace(
            "        - containerPort: 80\n",
            "        - containerPort: 80\n        - containerPort: 443\n",
        );
    let out = site.ok_stdin(&["apply", v, "-f", "-"], Some(&edited));
    assert_eq!(out.trim(), "deployment.apps/nginx-deployment configured");
    let json = site.json(&["get", "deploy", "nginx-deployment", "-o", "json"]);
    let c = &json["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx:1.16.1");
    assert_eq!(
        c["env"],
        serde_json::json!([{"name": "MODE", "value": "fast"}])
    );
    assert_eq!(
        c["ports"],
        serde_json::json!([{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 443, "protocol": "TCP"}])
    );
    assert_eq!(json["metadata"]["generation"], 2);
    assert_eq!(json["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
    let out = site.ok_stdin(&["apply", v, "-f", "-"], Some(&edited));
    assert_eq!(out.trim(), "deployment.apps/nginx-deployment unchanged");
    // describe works and shows the pod template.
    let describe = site.ok(&["describe", "deployment", "nginx-deployment"]);
    assert!(
        describe.contains("Name:") && describe.contains("nginx:1.16.1"),
        "{describe}"
    );
}

#[test]
fn server_side_apply_conflicts_and_force() {
    let site = Site::start().unwrap();
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n";
    let v = validate();
    let out = site.ok_stdin(&["apply", v, "--server-side", "-f", "-"], Some(cm));
    assert_eq!(out.trim(), "configmap/ssa serverside-applied");
    let changed = cm.replace("\"1\"", "\"2\"");
    let err = site.fails(
        &[
            "apply",
            v,
            "--server-side",
            "--field-manager=other",
            "-f",
            "-",
        ],
        Some(&changed),
    );
    assert!(
        err.contains("Apply failed with 1 conflict: conflict with \"kubectl\" using v1: .data.a"),
        "{err}"
    );
    let out = site.ok_stdin(
        &[
            "apply",
            v,
            "--server-side",
            "--field-manager=other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&changed),
    );
    assert_eq!(out.trim(), "configmap/ssa serverside-applied");
    assert_eq!(
        site.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"]),
        "2"
    );
    // kubectl before 1.21 always shows managedFields and has no flag for it.
    let mut args = vec!["get", "cm", "ssa", "-o", "json"];
    if kubectl_minor() >= 21 {
        args.push("--show-managed-fields");
    }
    let managed = site.ok(&args);
    assert!(
        managed.contains("\"manager\": \"other\"") && managed.contains("\"operation\": \"Apply\""),
        "{managed}"
    );
}

#[test]
fn patches_labels_annotations_and_scale() {
    let site = Site::start().unwrap();
    site.ok_stdin(&["apply", validate(), "-f", "-"], Some(DEPLOYMENT));
    let d = "deployment/nginx-deployment";
    site.ok(&[
        "patch",
        d,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":2}]"#,
    ]);
    assert_eq!(site.ok(&["get", d, "-o", "jsonpath={.spec.replicas}"]), "2");
    site.ok(&[
        "patch",
        d,
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":4}}"#,
    ]);
    assert_eq!(site.ok(&["get", d, "-o", "jsonpath={.spec.replicas}"]), "4");
    site.ok(&[
        "patch",
        d,
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"nginx","image":"nginx:1.25"}]}}}}"#,
    ]);
    assert_eq!(
        site.ok(&[
            "get",
            d,
            "-o",
            "jsonpath={.spec.template.spec.containers[*].image}"
        ]),
        "nginx:1.25"
    );
    assert_eq!(
        site.ok(&[
            "get",
            d,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].env[0].name}"
        ]),
        "MODE"
    );
    site.ok(&["scale", d, "--replicas=7"]);
    assert_eq!(site.ok(&["get", d, "-o", "jsonpath={.spec.replicas}"]), "7");
    site.ok(&["label", d, "tier=web"]);
    site.ok(&["annotate", d, "owner=ops"]);
    let out = site.ok(&["get", "deploy", "--show-labels"]);
    assert!(out.contains("app=nginx,tier=web"), "{out}");
    assert_eq!(
        site.ok(&["get", d, "-o", "jsonpath={.metadata.annotations.owner}"]),
        "ops"
    );
    let err = site.fails(&["label", d, "tier=db"], None);
    assert!(
        err.contains("'tier' already has a value (web), and --overwrite is false"),
        "{err}"
    );
    site.ok(&["label", d, "tier-"]);
    assert!(
        !site
            .ok(&["get", "deploy", "--show-labels"])
            .contains("tier=")
    );
    // Patches of the wrong shape are clear errors.
    let err = site.fails(
        &[
            "patch",
            d,
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/nope"}]"#,
        ],
        None,
    );
    assert!(err.contains("The request is invalid"), "{err}");
}

fn pod(name: &str, labels: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: busybox:1.36\n"
    )
}

#[test]
fn get_outputs_selectors_and_sorting() {
    let site = Site::start().unwrap();
    let v = validate();
    site.ok(&["create", "namespace", "other"]);
    site.ok_stdin(
        &["create", v, "-f", "-"],
        Some(&pod("b", "app: web, tier: front", "n1")),
    );
    site.ok_stdin(&["create", v, "-f", "-"], Some(&pod("a", "app: db", "n2")));
    site.ok_stdin(
        &["create", v, "-n", "other", "-f", "-"],
        Some(&pod("c", "app: web", "n1")),
    );
    let out = site.ok(&["get", "pods"]);
    let rows = lines(&out);
    assert_eq!(rows[0], vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert_eq!(&rows[1][..4], &["a", "0/1", "Pending", "0"]);
    let wide = site.ok(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .contains("IP       NODE   NOMINATED NODE   READINESS GATES"),
        "{wide}"
    );
    assert_eq!(site.ok(&["get", "pods", "-o", "name"]), "pod/a\npod/b\n");
    assert_eq!(
        site.ok(&["get", "pods", "-l", "app=web", "-o", "name"]),
        "pod/b\n"
    );
    assert_eq!(
        site.ok(&[
            "get",
            "pods",
            "-l",
            "app in (web,db),tier!=front",
            "-o",
            "name"
        ]),
        "pod/a\n"
    );
    assert_eq!(
        site.ok(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=n1",
            "-o",
            "name"
        ]),
        "pod/b\npod/c\n"
    );
    assert_eq!(
        site.ok(&[
            "get",
            "pods",
            "--field-selector",
            "metadata.name!=a",
            "-o",
            "name"
        ]),
        "pod/b\n"
    );
    let all = site.ok(&["get", "pods", "-A"]);
    assert_eq!(lines(&all)[0][0], "NAMESPACE");
    assert_eq!(lines(&all).len(), 4);
    let sorted = site.ok(&[
        "get",
        "pods",
        "-A",
        "--sort-by=.spec.nodeName",
        "-o",
        "custom-columns=N:.metadata.name,NODE:.spec.nodeName",
        "--no-headers",
    ]);
    let order: Vec<String> = lines(&sorted).iter().map(|r| r[1].clone()).collect();
    assert_eq!(order, vec!["n1", "n1", "n2"]);
    let labels = site.ok(&["get", "pods", "--show-labels"]);
    assert!(labels.contains("app=web,tier=front"));
    let yaml = site.ok(&["get", "pod", "a", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: Pod") && yaml.contains("resourceVersion:") && yaml.contains("uid:")
    );
    let json = site.json(&["get", "pod", "a", "-o", "json"]);
    assert_eq!(json["status"]["phase"], "Pending");
    assert_eq!(
        json["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    // limit/continue round-trips through kubectl's chunking.
    let chunked = site.ok(&["get", "pods", "-A", "--chunk-size=1", "-o", "name"]);
    assert_eq!(chunked.lines().count(), 3);
}

#[test]
fn errors_are_printed_as_upstream_prints_them() {
    let site = Site::start().unwrap();
    let v = validate();
    assert_eq!(
        site.fails(&["get", "pod", "nope"], None).trim(),
        "Error from server (NotFound): pods \"nope\" not found"
    );
    let bad =
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: c\n";
    assert_eq!(
        site.fails(&["create", v, "-f", "-"], Some(bad)).trim(),
        "The Pod \"bad\" is invalid: spec.containers[0].image: Required value"
    );
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dup\n";
    site.ok_stdin(&["create", v, "-f", "-"], Some(cm));
    assert_eq!(
        site.fails(&["create", v, "-f", "-"], Some(cm)).trim(),
        "Error from server (AlreadyExists): error when creating \"STDIN\": configmaps \"dup\" already exists"
    );
    if kubectl_minor() >= 27 {
        let unknown = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\nbogus: 1\n";
        assert_eq!(
            site.fails(&["create", "-f", "-"], Some(unknown)).trim(),
            "Error from server (BadRequest): error when creating \"STDIN\": strict decoding error: unknown field \"bogus\""
        );
    }
    let err = site.fails(&["get", "pods", "-l", "a in ("], None);
    assert!(
        err.contains("Error from server (BadRequest)")
            && err.contains("unable to parse requirement"),
        "{err}"
    );
    let err = site.fails(&["get", "pods", "--field-selector", "spec.bogus=1"], None);
    assert!(
        err.contains("field label not supported: spec.bogus"),
        "{err}"
    );
    let err = site.fails(&["create", "namespace", "Bad_Name"], None);
    assert!(err.contains("The Namespace \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 label"), "{err}");
    let err = site.fails(&["get", "widgets"], None);
    assert!(
        err.contains("the server doesn't have a resource type \"widgets\""),
        "{err}"
    );
    let err = site.fails(&["create", v, "-n", "missing", "-f", "-"], Some(cm));
    assert!(err.contains("namespaces \"missing\" not found"), "{err}");
}

#[test]
fn watch_sees_changes() {
    let site = Site::start().unwrap();
    // A marker object: once the watcher prints it, its list is done and its watch runs.
    site.ok(&["create", "configmap", "w0", "--from-literal=a=0"]);
    let mut child = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(["get", "configmaps", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let listed = eventually(Duration::from_secs(20), || {
        while let Ok(line) = rx.try_recv() {
            seen.push(line);
        }
        seen.iter().any(|l| l.contains("w0"))
    });
    assert!(listed, "the watcher never listed the marker: {seen:?}");
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: w1\ndata:\n  a: \"1\"\n";
    site.ok_stdin(&["create", validate(), "-f", "-"], Some(cm));
    site.ok(&[
        "patch",
        "configmap",
        "w1",
        "--type=merge",
        "-p",
        r#"{"data":{"b":"2"}}"#,
    ]);
    site.ok(&["delete", "configmap", "w1"]);
    let got_all = eventually(Duration::from_secs(15), || {
        while let Ok(line) = rx.try_recv() {
            seen.push(line);
        }
        seen.iter().any(|l| l.starts_with("DELETED"))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(got_all, "watch output: {seen:?}");
    let events: Vec<(String, String)> = seen
        .iter()
        .filter(|l| !l.starts_with("EVENT"))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[0].to_string(), cols[1].to_string())
        })
        .collect();
    let w1: Vec<&str> = events
        .iter()
        .filter(|(_, n)| n == "w1")
        .map(|(e, _)| e.as_str())
        .collect();
    assert_eq!(w1, vec!["ADDED", "MODIFIED", "DELETED"], "{seen:?}");
}

#[test]
fn wait_for_delete_and_cascade_modes() {
    let site = Site::start().unwrap();
    let v = validate();
    for name in ["bg", "orphan", "fg"] {
        site.ok_stdin(
            &["create", v, "-f", "-"],
            Some(&format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"
            )),
        );
    }
    // `gone` is held by a finalizer, so it still exists whenever the waiter looks first; removing
    // the finalizer completes the deletion the waiter is waiting for.
    site.ok_stdin(
        &["create", v, "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: gone\n  finalizers: [example.com/hold]\n"),
    );
    site.ok(&["delete", "configmap", "gone", "--wait=false"]);
    let waiter = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(["wait", "--for=delete", "configmap/gone", "--timeout=30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        site.ok(&[
            "get",
            "configmap",
            "gone",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}"
        ])
        .len()
            > 10
    );
    site.ok(&[
        "patch",
        "configmap",
        "gone",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "wait failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configmap/gone condition met"));

    assert_eq!(
        site.ok(&["delete", "configmap", "bg", "--cascade=background"])
            .trim(),
        "configmap \"bg\" deleted"
    );
    assert!(
        site.kubectl(&["get", "configmap", "bg"])
            .unwrap()
            .status
            .code()
            != Some(0)
    );
    // Orphan and foreground deletions put a finalizer on the object, which the garbage
    // collector removes once the dependents (none here) are dealt with; kubectl waits for that.
    for (name, cascade) in [
        ("orphan", "--cascade=orphan"),
        ("fg", "--cascade=foreground"),
    ] {
        site.ok(&["delete", "configmap", name, cascade, "--timeout=30s"]);
        assert!(
            site.kubectl(&["get", "configmap", name])
                .unwrap()
                .status
                .code()
                != Some(0)
        );
    }
}

#[test]
fn graceful_pod_deletion_waits_for_the_node() {
    let site = Site::start().unwrap();
    site.ok_stdin(
        &["create", validate(), "-f", "-"],
        Some(&pod("p", "app: x", "node-a")),
    );
    site.ok(&["delete", "pod", "p", "--wait=false"]);
    let json = site.json(&["get", "pod", "p", "-o", "json"]);
    assert!(json["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(json["metadata"]["deletionGracePeriodSeconds"], 30);
    let out = site.ok(&["get", "pods"]);
    assert!(out.contains("Terminating"), "{out}");
    site.ok(&["delete", "pod", "p", "--grace-period=0", "--force"]);
    assert!(site.kubectl(&["get", "pod", "p"]).unwrap().status.code() != Some(0));
}

#[test]
fn explain_uses_real_schemas() {
    let site = Site::start().unwrap();
    if kubectl_minor() < 27 {
        return;
    }
    let out = site.ok(&["explain", "pod.spec.containers"]);
    assert!(out.contains("FIELD: containers <[]Container>"), "{out}");
    assert!(out.contains("image\t<string>"), "{out}");
    let out = site.ok(&["explain", "deployment.spec.strategy"]);
    assert!(out.contains("rollingUpdate"), "{out}");
}

/// kubectl's typed clients send protobuf bodies: `create namespace|configmap|secret|deployment`,
/// `run`, `expose`, `create job|cronjob|role|rolebinding`.
#[test]
fn imperative_commands_send_protobuf_and_work() {
    let site = Site::start().unwrap();
    for args in [
        &["create", "namespace", "demo"][..],
        &[
            "create",
            "configmap",
            "c1",
            "--from-literal=a=1",
            "-n",
            "demo",
        ],
        &[
            "create",
            "secret",
            "generic",
            "s1",
            "--from-literal=pw=x",
            "-n",
            "demo",
        ],
        &[
            "create",
            "deployment",
            "web",
            "--image=nginx:1.25",
            "--replicas=0",
            "-n",
            "demo",
        ],
        &[
            "create",
            "service",
            "clusterip",
            "svc",
            "--tcp=80:8080",
            "-n",
            "demo",
        ],
        &[
            "run",
            "p1",
            "--image=busybox:1.36",
            "-n",
            "demo",
            "--",
            "sleep",
            "3600",
        ],
        &[
            "create",
            "job",
            "j1",
            "--image=busybox:1.36",
            "-n",
            "demo",
            "--",
            "echo",
            "hi",
        ],
        &[
            "create",
            "cronjob",
            "cj",
            "--image=busybox:1.36",
            "--schedule=*/5 * * * *",
            "-n",
            "demo",
        ],
        &[
            "expose",
            "deployment",
            "web",
            "--name=web2",
            "--port=81",
            "-n",
            "demo",
        ],
        &[
            "create",
            "role",
            "r",
            "--verb=get",
            "--resource=pods",
            "-n",
            "demo",
        ],
        &[
            "create",
            "rolebinding",
            "rb",
            "--role=r",
            "--user=bob",
            "-n",
            "demo",
        ],
    ] {
        // kubectl before 1.21 creates batch/v1beta1 CronJobs, which 1.25+ servers no longer serve.
        if args[1] == "cronjob" && kubectl_minor() < 21 {
            continue;
        }
        site.ok(args);
    }
    let d = site.json(&["get", "deploy", "web", "-n", "demo", "-o", "json"]);
    assert_eq!(
        d["spec"]["replicas"], 0,
        "an explicit zero survives protobuf decoding"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.25"
    );
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
    assert_eq!(
        site.ok(&["get", "cm", "c1", "-n", "demo", "-o", "jsonpath={.data.a}"]),
        "1"
    );
    assert_eq!(
        site.ok(&[
            "get",
            "secret",
            "s1",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.pw}"
        ]),
        "eA=="
    );
    let pod = site.json(&["get", "pod", "p1", "-n", "demo", "-o", "json"]);
    assert_eq!(
        pod["spec"]["containers"][0]["args"],
        serde_json::json!(["sleep", "3600"])
    );
    assert_eq!(pod["metadata"]["labels"]["run"], "p1");
    let svc = site.json(&["get", "svc", "web2", "-n", "demo", "-o", "json"]);
    assert_eq!(svc["spec"]["ports"][0]["port"], 81);
    let all = site.ok(&["get", "all", "-n", "demo", "-o", "name"]);
    for name in [
        "pod/p1",
        "service/svc",
        "deployment.apps/web",
        "job.batch/j1",
        "cronjob.batch/cj",
    ] {
        if name.starts_with("cronjob") && kubectl_minor() < 21 {
            continue;
        }
        assert!(all.contains(name), "{name} missing from `get all`: {all}");
    }
}

const CRONTAB_CRD: &str = include_str!("../testdata/crontab-crd.yaml");
const CRONTAB: &str = include_str!("../testdata/crontab.yaml");

#[test]
fn custom_resources_from_a_crd() {
    let site = Site::start().unwrap();
    let v = validate();
    site.ok_stdin(&["apply", v, "-f", "-"], Some(CRONTAB_CRD));
    let crd = site.json(&["get", "crd", "crontabs.stable.example.com", "-o", "json"]);
    let established = crd["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True");
    assert!(established, "{crd}");
    site.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/crontabs.stable.example.com",
        "--timeout=10s",
    ]);
    assert_eq!(
        site.ok_stdin(&["apply", v, "-f", "-"], Some(CRONTAB))
            .trim(),
        "crontab.stable.example.com/my-new-cron-object created"
    );
    // Printer columns, short name, defaults from the schema.
    let out = site.ok(&["get", "ct"]);
    let rows = lines(&out);
    assert_eq!(rows[0], vec!["NAME", "SPEC", "REPLICAS", "AGE"]);
    assert_eq!(&rows[1][..2], &["my-new-cron-object", "*"]);
    assert_eq!(rows[1][6], "1", "replicas defaulted by the schema: {out}");
    assert_eq!(
        site.ok_stdin(&["apply", v, "-f", "-"], Some(CRONTAB))
            .trim(),
        "crontab.stable.example.com/my-new-cron-object unchanged"
    );
    // Schema validation errors as upstream prints them.
    let bad = CRONTAB.replace("* * * * */5", "bad");
    let err = site.fails(&["apply", v, "-f", "-"], Some(&bad));
    assert!(
        err.contains("The CronTab \"my-new-cron-object\" is invalid: spec.cronSpec: Invalid value: \"bad\": spec.cronSpec in body should match"),
        "{err}"
    );
    let too_many = CRONTAB.replace(
        "  image: my-awesome-cron-image\n",
        "  image: x\n  replicas: 11\n",
    );
    let err = site.fails(&["apply", v, "-f", "-"], Some(&too_many));
    assert!(
        err.contains("spec.replicas in body should be less than or equal to 10"),
        "{err}"
    );
    if kubectl_minor() >= 27 {
        let unknown = "apiVersion: stable.example.com/v1\nkind: CronTab\nmetadata:\n  name: x\nspec:\n  bogus: 1\n";
        let err = site.fails(&["create", "-f", "-"], Some(unknown));
        assert!(
            err.contains("strict decoding error: unknown field \"spec.bogus\""),
            "{err}"
        );
    }
    // Scale and status subresources.
    site.ok(&["scale", "crontab", "my-new-cron-object", "--replicas=3"]);
    assert_eq!(
        site.ok(&[
            "get",
            "ct",
            "my-new-cron-object",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "3"
    );
    // `--subresource` arrived in kubectl 1.24.
    if kubectl_minor() >= 24 {
        site.ok(&[
            "patch",
            "ct",
            "my-new-cron-object",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"replicas":3}}"#,
        ]);
        assert_eq!(
            site.ok(&[
                "get",
                "ct",
                "my-new-cron-object",
                "-o",
                "jsonpath={.status.replicas}"
            ]),
            "3"
        );
        // Main-resource writes ignore status.
        site.ok(&[
            "patch",
            "ct",
            "my-new-cron-object",
            "--type=merge",
            "-p",
            r#"{"status":{"replicas":9}}"#,
        ]);
        assert_eq!(
            site.ok(&[
                "get",
                "ct",
                "my-new-cron-object",
                "-o",
                "jsonpath={.status.replicas}"
            ]),
            "3"
        );
    }
    // Discovery: short name and category.
    let resources = site.ok(&["api-resources", "--api-group=stable.example.com"]);
    assert!(
        resources.contains("crontabs") && resources.contains(" ct "),
        "{resources}"
    );
    assert!(
        site.ok(&["get", "all", "-o", "name"])
            .contains("crontab.stable.example.com/my-new-cron-object")
    );
    if kubectl_minor() >= 27 {
        let explain = site.ok(&["explain", "crontab.spec"]);
        assert!(
            explain.contains("cronSpec") && explain.contains("<string>"),
            "{explain}"
        );
    }
    // Deleting the CRD deletes its objects and stops serving the resource.
    site.ok(&["delete", "crd", "crontabs.stable.example.com"]);
    let err = site.fails(
        &[
            "get",
            "--raw",
            "/apis/stable.example.com/v1/namespaces/default/crontabs",
        ],
        None,
    );
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[test]
fn crds_are_served_again_after_a_restart() {
    let mut site = Site::start().unwrap();
    site.ok_stdin(&["apply", validate(), "-f", "-"], Some(CRONTAB_CRD));
    site.ok_stdin(&["apply", validate(), "-f", "-"], Some(CRONTAB));
    site.stop();
    site.launch().unwrap();
    assert_eq!(
        site.ok(&["get", "crontabs", "-o", "name"]),
        "crontab.stable.example.com/my-new-cron-object\n"
    );
}

#[test]
fn bad_input_gets_a_clear_status_and_the_store_stays_consistent() {
    let site = Site::start().unwrap();
    let path = "/api/v1/namespaces/default/configmaps";
    let write = |name: &str, body: &str| {
        let file = site.dir.path().join(name);
        std::fs::write(&file, body).unwrap();
        site.kubectl(&["create", "--raw", path, "-f", file.to_str().unwrap()])
            .unwrap()
    };
    let out = write(
        "malformed.json",
        "{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", ",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("BadRequest"), "{err}");
    let out = write(
        "wrong-kind.json",
        r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"x"}}"#,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match the expected API version"),
        "{err}"
    );
    let out = write("array.json", "[1, 2, 3]");
    assert!(String::from_utf8_lossy(&out.stderr).contains("BadRequest"));
    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"a":"{}"}}}}"#,
        "x".repeat(4 * 1024 * 1024)
    );
    let out = write("big.json", &big);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Request entity too large") || err.contains("RequestEntityTooLarge"),
        "{err}"
    );
    let out = write(
        "wrong-type.json",
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"t"},"data":{"a":1}}"#,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be handled as a ConfigMap"), "{err}");
    let out = write(
        "ok.json",
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ok"},"data":{"a":"1"}}"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing half-written; the good write is there.
    // (kube-root-ca.crt is the cluster CA every namespace gets.)
    assert_eq!(
        site.ok(&["get", "configmaps", "-o", "name"])
            .replace("configmap/kube-root-ca.crt\n", ""),
        "configmap/ok\n"
    );
    // Unknown resources and paths are NotFound Statuses.
    let err = site.fails(&["get", "--raw", "/api/v1/widgets"], None);
    assert!(err.contains("NotFound"), "{err}");
    let err = site.fails(&["get", "--raw", "/apis/nope.example.com/v1/things"], None);
    assert!(err.contains("NotFound"), "{err}");
    // Anonymous requests may read only the public health and version endpoints (upstream's
    // system:public-info-viewer); anything else is Forbidden with upstream's message.
    let port = site.port.to_string();
    let anon = Command::new("curl")
        .args([
            "-sk",
            &format!("https://127.0.0.1:{port}/api/v1/namespaces"),
        ])
        .output();
    if let Ok(anon) = anon {
        let body = String::from_utf8_lossy(&anon.stdout);
        assert!(
            body.contains("\"reason\":\"Forbidden\"")
                && body.contains("\"code\":403")
                && body.contains("namespaces is forbidden: User \\\"system:anonymous\\\" cannot list resource \\\"namespaces\\\" in API group \\\"\\\" at the cluster scope"),
            "{body}"
        );
        let health = Command::new("curl")
            .args(["-sk", &format!("https://127.0.0.1:{port}/readyz")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&health.stdout), "ok");
    }
}

#[test]
fn watch_options_initial_events_bookmarks_and_timeouts() {
    let site = Site::start().unwrap();
    for name in ["a", "b"] {
        site.ok(&["create", "configmap", name, "--from-literal=k=v"]);
    }
    // sendInitialEvents: ADDED for what exists, then a bookmark marking the end; the server ends
    // the stream after timeoutSeconds.
    let out = site.ok(&[
        "get",
        "--raw",
        // (kube-root-ca.crt, which every namespace holds, is left out)
        "/api/v1/namespaces/default/configmaps?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1&fieldSelector=metadata.name!%3Dkube-root-ca.crt",
    ]);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{out}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[1]["object"]["metadata"]["name"], "b");
    assert_eq!(events[2]["type"], "BOOKMARK");
    assert_eq!(
        events[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    // sendInitialEvents without resourceVersionMatch=NotOlderThan is refused, not ignored.
    let err = site.fails(
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/default/configmaps?watch=1&sendInitialEvents=true",
        ],
        None,
    );
    assert!(
        err.contains("sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"),
        "{err}"
    );
    // A watch from a list's resourceVersion sees only later changes, with label selection.
    let list = site.json(&["get", "--raw", "/api/v1/namespaces/default/configmaps"]);
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    site.ok(&["label", "configmap", "a", "pick=yes"]);
    site.ok(&["label", "configmap", "a", "pick-"]);
    let out = site.ok(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&labelSelector=pick%3Dyes&timeoutSeconds=1"),
    ]);
    let kinds: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // Entering the selection is ADDED, leaving it is DELETED, as upstream reports.
    assert_eq!(kinds, vec!["ADDED", "DELETED"], "{out}");
    // A resourceVersion the site never reached (a client that saw the state before a restore
    // took it back) is refused after a moment, as upstream's watch cache does; clients relist.
    let future = rv.parse::<u64>().unwrap() + 1_000_000;
    let err = site.fails(
        &[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={future}&timeoutSeconds=1"),
        ],
        None,
    );
    assert!(err.contains("Too large resource version"), "{err}");
    assert_eq!(site.ok(&["get", "--raw", "/livez"]).trim(), "ok");
}

#[test]
fn tokens_dry_run_terminating_namespaces_and_node_only_endpoints() {
    let mut site = Site::start().unwrap();
    // Bearer tokens from the static token file.
    std::fs::write(
        site.data_dir().join("server").join("token-auth.csv"),
        "s3cret,alice,1001,\"dev\"\n",
    )
    .unwrap();
    site.stop();
    site.launch().unwrap();
    let as_token = |token: &str| {
        site.kubectl_as(
            &[format!("--token={token}")],
            &["get", "namespaces", "-o", "name"],
        )
    };
    // Authenticated, but nothing is bound to alice yet: Forbidden, as upstream says it.
    let denied = as_token("s3cret");
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains(
            "namespaces is forbidden: User \"alice\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
        ),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    site.ok(&[
        "create",
        "clusterrolebinding",
        "alice-view",
        "--clusterrole=view",
        "--user=alice",
    ]);
    // `view` gathers its rules from the aggregated roles (the aggregation controller).
    assert!(eventually(Duration::from_secs(10), || as_token("s3cret")
        .status
        .success()));
    let ok = as_token("s3cret");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("namespace/default"));
    let bad = as_token("wrong");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // Server-side dry run validates and answers without storing (kubectl before 1.27 looks for
    // dryRun support in OpenAPI v2 first).
    {
        let out = site.ok(&[
            "create",
            "configmap",
            "dry",
            "--from-literal=a=1",
            "--dry-run=server",
        ]);
        assert!(
            out.contains("configmap/dry created (server dry run)"),
            "{out}"
        );
        assert!(
            site.kubectl(&["get", "configmap", "dry"])
                .unwrap()
                .status
                .code()
                != Some(0)
        );
    }

    // A terminating namespace takes no new content. An object held by a finalizer keeps it
    // Terminating; releasing the finalizer lets the namespace controller finish.
    site.ok(&["create", "namespace", "leaving"]);
    site.ok_stdin(
        &["create", validate(), "-n", "leaving", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\n"),
    );
    site.ok(&["delete", "namespace", "leaving", "--wait=false"]);
    assert!(
        site.ok(&["get", "namespace", "leaving"])
            .contains("Terminating")
    );
    let err = site.fails(&["create", "configmap", "late", "-n", "leaving"], None);
    assert!(err.contains("because it is being terminated"), "{err}");
    site.ok(&[
        "patch",
        "configmap",
        "held",
        "-n",
        "leaving",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    assert!(
        eventually(Duration::from_secs(20), || site
            .kubectl(&["get", "namespace", "leaving"])
            .unwrap()
            .status
            .code()
            != Some(0)),
        "the namespace was not deleted after its last object went"
    );

    // Logs, exec and port-forward need the node agent: a clear error, not a hang.
    site.ok_stdin(
        &["create", validate(), "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    image: busybox\n"),
    );
    let err = site.fails(&["logs", "p"], None);
    assert!(err.contains("node agent"), "{err}");
}

#[test]
fn diff_replace_edit_and_auth_commands() {
    let site = Site::start().unwrap();
    let v = validate();
    site.ok_stdin(&["apply", v, "-f", "-"], Some(DEPLOYMENT));
    // kubectl diff needs kubectl's OpenAPI v3 support: 1.27 or newer.
    if kubectl_minor() >= 27 {
        // kubectl diff: a server-side dry run; exit code 1 when there are differences.
        let changed = DEPLOYMENT.replace("replicas: 3", "replicas: 4");
        let out = site
            .kubectl_stdin(&["diff", "-f", "-"], Some(&changed))
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("-  replicas: 3") && text.contains("+  replicas: 4"),
            "{text}"
        );
        assert!(
            !text.contains("resourceVersion"),
            "a dry run keeps the resourceVersion: {text}"
        );
        assert_eq!(
            site.ok(&[
                "get",
                "deploy",
                "nginx-deployment",
                "-o",
                "jsonpath={.spec.replicas}"
            ]),
            "3"
        );
        let same = site
            .kubectl_stdin(&["diff", "-f", "-"], Some(DEPLOYMENT))
            .unwrap();
        assert_eq!(same.status.code(), Some(0));
    }
    // replace with the object read back. The deployment controller writes the status meanwhile,
    // so a replace may meet a newer resourceVersion: kubectl says conflict and we read again, as a
    // user would.
    let mut live = String::new();
    let replaced = eventually(Duration::from_secs(30), || {
        live = site.ok(&["get", "deploy", "nginx-deployment", "-o", "yaml"]);
        let out = site
            .kubectl_stdin(
                &["replace", v, "-f", "-"],
                Some(&live.replace("replicas: 3", "replicas: 2")),
            )
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("the object has been modified"),
            "{err}"
        );
        out.status.success()
    });
    assert!(replaced, "kubectl replace kept meeting conflicts");
    assert_eq!(
        site.ok(&[
            "get",
            "deploy",
            "nginx-deployment",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "2"
    );
    // replace with a stale resourceVersion is a conflict.
    let err = site.fails(&["replace", v, "-f", "-"], Some(&live));
    assert!(err.contains("the object has been modified"), "{err}");
    if kubectl_minor() >= 27 {
        // auth: every authenticated user is allowed until RBAC enforcement, and kubectl says so.
        assert_eq!(site.ok(&["auth", "can-i", "delete", "pods"]).trim(), "yes");
        let whoami = site.ok(&["auth", "whoami"]);
        assert!(
            whoami.contains("admin") && whoami.contains("system:masters"),
            "{whoami}"
        );
    }
}

const MANY_KINDS: &str = include_str!("../testdata/many-kinds.yaml");

/// Examples from the Kubernetes docs for many kinds: applied, re-applied unchanged, listed.
#[test]
fn manifests_of_many_kinds_apply_and_reapply() {
    let site = Site::start().unwrap();
    let v = validate();
    let first = site.ok_stdin(&["apply", v, "-f", "-"], Some(MANY_KINDS));
    assert_eq!(
        first.lines().filter(|l| l.ends_with(" created")).count(),
        10,
        "{first}"
    );
    let rv_before = site.ok(&[
        "get",
        "sts",
        "web",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    let second = site.ok_stdin(&["apply", v, "-f", "-"], Some(MANY_KINDS));
    // kubectl always resends a StatefulSet's volumeClaimTemplates (an atomic list whose stored
    // items carry apiVersion/kind, as upstream stores them), so it says "configured"; the server
    // sees a no-op and writes nothing.
    for line in second.lines() {
        if line.starts_with("statefulset.apps/web") {
            assert_eq!(line, "statefulset.apps/web configured");
        } else if line.starts_with("cronjob") && kubectl_minor() < 21 {
            // kubectl 1.20 has no compiled-in batch/v1 CronJob type and replaces whole lists.
        } else {
            assert!(line.ends_with(" unchanged"), "{second}");
        }
    }
    let rv_after = site.ok(&[
        "get",
        "sts",
        "web",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    assert_eq!(rv_before, rv_after, "a no-op patch must not write");
    let out = site.ok(&["get", "ingress"]);
    assert_eq!(
        lines(&out)[0],
        vec!["NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS", "AGE"]
    );
    assert_eq!(
        &lines(&out)[1][..3],
        &["minimal-ingress", "nginx-example", "*"]
    );
    let out = site.ok(&[
        "get",
        "sts",
        "web",
        "-o",
        "jsonpath={.spec.volumeClaimTemplates[0].metadata.name}",
    ]);
    assert_eq!(out, "www");
    let job = site.json(&["get", "job", "pi", "-o", "json"]);
    let uid = job["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        uid
    );
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["job-name"],
        "pi"
    );
    // A kind the server does not know is named in the error.
    let unknown = "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g\n";
    let err = site.fails(&["apply", "--validate=true", "-f", "-"], Some(unknown));
    assert!(
        err.contains("no matches for kind \"Gadget\" in version \"example.com/v1\""),
        "{err}"
    );
}

/// `kubectl delete namespace` deletes what the namespace holds, then the namespace itself.
#[test]
fn deleting_a_namespace_deletes_its_contents() {
    let site = Site::start().unwrap();
    let v = validate();
    site.ok(&["create", "namespace", "demo"]);
    site.ok(&[
        "create",
        "configmap",
        "c1",
        "--from-literal=a=1",
        "-n",
        "demo",
    ]);
    site.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx:1.25",
        "-n",
        "demo",
    ]);
    site.ok(&[
        "create",
        "service",
        "clusterip",
        "svc",
        "--tcp=80:80",
        "-n",
        "demo",
    ]);
    // A pod bound to a node that does not exist: nothing would ever confirm its termination.
    site.ok_stdin(
        &["create", v, "-n", "demo", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  nodeName: gone-node\n  containers:\n  - name: c\n    image: busybox\n"),
    );
    site.ok_stdin(&["apply", v, "-f", "-"], Some(CRONTAB_CRD));
    site.ok_stdin(&["apply", v, "-n", "demo", "-f", "-"], Some(CRONTAB));
    site.ok(&["create", "configmap", "elsewhere", "-n", "default"]);
    let out = site.ok(&["delete", "namespace", "demo", "--timeout=60s"]);
    assert_eq!(out.trim(), "namespace \"demo\" deleted");
    assert!(
        site.kubectl(&["get", "namespace", "demo"])
            .unwrap()
            .status
            .code()
            != Some(0)
    );
    for kind in ["configmaps", "deployments", "services", "pods", "crontabs"] {
        let out = site.ok(&["get", kind, "-A", "-o", "name"]);
        assert!(
            !out.contains("demo") && !out.contains("my-new-cron-object") && !out.contains("pod/p"),
            "{kind}: {out}"
        );
    }
    assert_eq!(
        site.ok(&["get", "configmap", "elsewhere", "-o", "name"])
            .trim(),
        "configmap/elsewhere"
    );
    // The namespace can be created again.
    site.ok(&["create", "namespace", "demo"]);
}

/// What a rendered Helm chart often holds: empty maps and lists wherever a value was left out.
const RENDERED_WITH_EMPTIES: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: NAME
  labels: {}
  annotations: {}
  finalizers: []
data: {}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: NAME
  labels: {}
spec:
  selector:
    matchLabels: {app: NAME}
    matchExpressions: []
  template:
    metadata:
      labels: {app: NAME}
      annotations: {}
    spec:
      containers:
      - name: c
        image: busybox
        env: []
        resources: {}
      tolerations: []
      nodeSelector: {}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: NAME
  labels: {}
spec:
  properties: []
";

#[test]
fn empty_maps_and_lists_pass_strict_validation() {
    let site = Site::start().unwrap();
    // `metadata: {labels: {}}` was refused: strict decoding error: unknown field "metadata.labels".
    let applied = RENDERED_WITH_EMPTIES.replace("NAME", "applied");
    let out = site.ok_stdin(&["apply", validate(), "-f", "-"], Some(&applied));
    assert!(out.contains("configmap/applied created"), "{out}");
    assert!(out.contains("deployment.apps/applied created"), "{out}");
    assert!(
        out.contains("devicemodel.devices.kubeedge.io/applied created"),
        "{out}"
    );
    let created = RENDERED_WITH_EMPTIES.replace("NAME", "created");
    let out = site.ok_stdin(&["create", validate(), "-f", "-"], Some(&created));
    assert!(out.contains("configmap/created created"), "{out}");
    // A field that does not exist is still refused, empty or not.
    let bogus = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bogus\n  colours: {}\n";
    let out = site
        .kubectl_stdin(&["create", "--validate=strict", "-f", "-"], Some(bogus))
        .unwrap();
    if kubectl_minor() >= 25 {
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("metadata.colours"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn autoscaler_targets_show_current_and_target_per_metric() {
    let site = Site::start().unwrap();
    site.ok(&["create", "deployment", "web", "--image=busybox"]);
    site.ok(&[
        "autoscale",
        "deployment",
        "web",
        "--cpu-percent=50",
        "--min=1",
        "--max=4",
    ]);
    let out = site.ok(&["get", "hpa", "web"]);
    let rows = lines(&out);
    assert_eq!(
        rows[0],
        [
            "NAME",
            "REFERENCE",
            "TARGETS",
            "MINPODS",
            "MAXPODS",
            "REPLICAS",
            "AGE"
        ],
        "{out}"
    );
    // Before the controller has measured anything (it showed "1 metric(s)").
    assert!(
        out.contains("deployment/web") || out.contains("Deployment/web"),
        "{out}"
    );
    assert!(out.contains("cpu: <unknown>/50%"), "{out}");
    // One object, both versions (kubectl before 1.23 autoscales through autoscaling/v1).
    let v1 = site.json(&[
        "get",
        "horizontalpodautoscalers.v1.autoscaling",
        "web",
        "-o",
        "json",
    ]);
    assert_eq!(v1["apiVersion"], "autoscaling/v1", "{v1}");
    assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50, "{v1}");
    let v2 = site.json(&[
        "get",
        "horizontalpodautoscalers.v2.autoscaling",
        "web",
        "-o",
        "json",
    ]);
    assert_eq!(v2["apiVersion"], "autoscaling/v2", "{v2}");
    assert_eq!(
        v2["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"], 50,
        "{v2}"
    );
    let out = site.ok(&["get", "horizontalpodautoscalers.v1.autoscaling", "web"]);
    assert!(out.contains("cpu: <unknown>/50%"), "{out}");
    // A metric v1 cannot say survives a write through v1.
    site.ok(&[
        "patch",
        "horizontalpodautoscalers.v2.autoscaling",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/metrics/-","value":{"type":"Resource","resource":{"name":"memory","target":{"type":"AverageValue","averageValue":"100Mi"}}}}]"#,
    ]);
    site.ok(&[
        "patch",
        "horizontalpodautoscalers.v1.autoscaling",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"maxReplicas":6}}"#,
    ]);
    let v2 = site.json(&[
        "get",
        "horizontalpodautoscalers.v2.autoscaling",
        "web",
        "-o",
        "json",
    ]);
    assert_eq!(v2["spec"]["maxReplicas"], 6, "{v2}");
    assert_eq!(
        v2["spec"]["metrics"][1]["resource"]["target"]["averageValue"], "100Mi",
        "{v2}"
    );
    assert!(v2["metadata"].get("annotations").is_none(), "{v2}");
}

#[test]
fn priority_classes_fill_a_pods_priority() {
    let site = Site::start().unwrap();
    let classes = site.ok(&["get", "priorityclasses", "-o", "name"]);
    assert!(
        classes.contains("system-node-critical") && classes.contains("system-cluster-critical"),
        "{classes}"
    );
    let pod = |name: &str, class: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  priorityClassName: {class}\n  containers:\n  - name: c\n    image: busybox\n"
        )
    };
    site.ok_stdin(
        &["create", "-f", "-"],
        Some(&pod("critical", "system-cluster-critical")),
    );
    let priority = site.ok(&["get", "pod", "critical", "-o", "jsonpath={.spec.priority}"]);
    assert_eq!(priority, "2000000000");
    // An unknown class is refused, as upstream's Priority admission refuses it.
    let out = site
        .kubectl_stdin(&["create", "-f", "-"], Some(&pod("lost", "no-such-class")))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no PriorityClass with name no-such-class was found"),
        "{stderr}"
    );
    // A class marked globalDefault applies to pods that name none.
    site.ok_stdin(
        &["create", "-f", "-"],
        Some("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata:\n  name: shop-default\nvalue: 1000\nglobalDefault: true\n"),
    );
    site.ok(&["run", "plain", "--image=busybox"]);
    let spec = site.ok(&[
        "get",
        "pod",
        "plain",
        "-o",
        "jsonpath={.spec.priorityClassName}/{.spec.priority}",
    ]);
    assert_eq!(spec, "shop-default/1000");
}

/// kubectl's typed commands send protobuf, where Go's embedded structs (LocalObjectReference,
/// VolumeSource, ProbeHandler, IngressRuleValue) are messages of their own: they must arrive as
/// the JSON form has them, inline.
#[test]
fn typed_commands_keep_embedded_fields() {
    let site = Site::start().unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: '0 3 * * *'
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: c
            image: busybox
            env:
            - name: MODE
              valueFrom:
                configMapKeyRef: {name: settings, key: mode}
            readinessProbe:
              exec: {command: [cat, /tmp/ready]}
            volumeMounts: [{name: data, mountPath: /data}]
          volumes:
          - name: data
            configMap: {name: settings}
",
        ),
    );
    // `create job --from` copies the template through a typed (protobuf) create (kubectl 1.20
    // knows only batch/v1beta1 CronJobs).
    if kubectl_minor() < 21 {
        return;
    }
    site.ok(&["create", "job", "manual", "--from=cronjob/nightly"]);
    let job = site.json(&["get", "job", "manual", "-o", "json"]);
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(
        spec["containers"][0]["env"][0]["valueFrom"]["configMapKeyRef"],
        serde_json::json!({"name": "settings", "key": "mode"}),
        "{job}"
    );
    assert_eq!(spec["volumes"][0]["configMap"]["name"], "settings", "{job}");
    assert_eq!(
        spec["containers"][0]["readinessProbe"]["exec"]["command"][0], "cat",
        "{job}"
    );
    // `create ingress` (IngressRuleValue is embedded in IngressRule).
    site.ok(&["create", "ingress", "shop", "--rule=shop.example/=web:80"]);
    let ingress = site.json(&["get", "ingress", "shop", "-o", "json"]);
    let rule = &ingress["spec"]["rules"][0];
    assert_eq!(rule["host"], "shop.example", "{ingress}");
    assert_eq!(
        rule["http"]["paths"][0]["backend"]["service"]["name"], "web",
        "{ingress}"
    );
    // What a lost embedded struct left behind is refused, as upstream refuses it.
    let out = site
        .kubectl_stdin(
            &["create", "-f", "-"],
            Some("apiVersion: v1\nkind: Pod\nmetadata: {name: broken}\nspec:\n  containers:\n  - name: c\n    image: busybox\n    env:\n    - name: A\n      valueFrom:\n        configMapKeyRef: {key: k}\n  volumes:\n  - name: v\n"),
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("spec.containers[0].env[0].valueFrom.configMapKeyRef.name: Required value"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.volumes[0]: Required value: must specify a volume type"),
        "{stderr}"
    );
}

#[test]
fn managed_fields_name_the_sites_own_writers_and_the_scale_subresource() {
    let site = Site::start().unwrap();
    site.ok(&["create", "deployment", "web", "--image=busybox"]);
    // The ReplicaSet is the controller's: upstream records it as kube-controller-manager.
    let managers = |what: &str| {
        site.ok(&[
            "get",
            what,
            "-o",
            "jsonpath={range .items[*].metadata.managedFields[*]}{.manager}/{.subresource};{end}",
        ])
    };
    assert!(
        eventually(Duration::from_secs(20), || managers("replicasets")
            .contains("kube-controller-manager/;")),
        "{}",
        managers("replicasets")
    );
    assert!(
        !managers("replicasets").contains("unknown"),
        "{}",
        managers("replicasets")
    );
    site.ok(&["scale", "deployment", "web", "--replicas=2"]);
    let deployment = managers("deployments");
    assert!(deployment.contains("/scale;"), "{deployment}");
    assert!(
        eventually(Duration::from_secs(20), || managers("deployments")
            .contains("kube-controller-manager/status;")),
        "{}",
        managers("deployments")
    );
}

#[test]
fn client_side_apply_moves_to_server_side_apply() {
    // kubectl upgrades client-side apply's managed fields from 1.26.
    if kubectl_minor() < 26 {
        return;
    }
    let site = Site::start().unwrap();
    let manifest = |labels: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: moved\n  labels: {{{labels}}}\nspec:\n  selector:\n    matchLabels: {{app: x}}\n  template:\n    metadata:\n      labels: {{app: x}}\n    spec:\n      containers:\n      - name: c\n        image: busybox\n"
        )
    };
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&manifest("tier: web, team: shop")),
    );
    // Upstream shares ownership of equal values instead of conflicting with
    // kubectl-client-side-apply, and kubectl then moves that manager's fields to its own.
    let out = site.ok_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some(&manifest("tier: web, team: shop")),
    );
    assert!(out.contains("serverside-applied"), "{out}");
    let managers = site.ok(&[
        "get",
        "deployment",
        "moved",
        "-o",
        "jsonpath={range .metadata.managedFields[*]}{.manager}/{.operation};{end}",
    ]);
    assert!(managers.contains("kubectl/Apply;"), "{managers}");
    assert!(
        !managers.contains("kubectl-client-side-apply"),
        "{managers}"
    );
    // A field dropped from the manifest is pruned now.
    site.ok_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some(&manifest("tier: web")),
    );
    let labels = site.ok(&[
        "get",
        "deployment",
        "moved",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert_eq!(labels, r#"{"tier":"web"}"#);
}

const NEW_EVENT: &str = "apiVersion: events.k8s.io/v1
kind: Event
metadata:
  name: written-as-new
  namespace: default
eventTime: 2026-12-05T10:00:00.000000Z
reportingController: example.com/controller
reportingInstance: controller-1
action: Reconcile
reason: Reconciled
note: reconciled through events.k8s.io
type: Normal
regarding:
  apiVersion: v1
  kind: ConfigMap
  name: subject
  namespace: default
  uid: UID
";

const CORE_EVENT: &str = "apiVersion: v1
kind: Event
metadata:
  name: written-as-core
  namespace: default
involvedObject:
  apiVersion: v1
  kind: ConfigMap
  name: subject
  namespace: default
reason: Noticed
message: written through core/v1
type: Warning
count: 3
firstTimestamp: 2026-12-05T10:00:00Z
lastTimestamp: 2026-12-05T10:05:00Z
source:
  component: example
";

/// One store, two views: an event written through either API is the same object in both.
#[test]
fn events_are_one_store_with_two_views() {
    let site = Site::start().unwrap();
    site.ok(&["create", "configmap", "subject"]);
    let uid = site.ok(&[
        "get",
        "configmap",
        "subject",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    // A watch through the new API sees the core write converted.
    let mut watch = Command::new(kubectl_bin())
        .args([
            "--kubeconfig",
            site.kubeconfig().to_str().unwrap(),
            "get",
            "events.v1.events.k8s.io",
            "--watch-only",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    site.ok_stdin(
        &["create", "-f", "-"],
        Some(&NEW_EVENT.replace("UID", uid.trim())),
    );
    site.ok_stdin(&["create", "-f", "-"], Some(CORE_EVENT));

    // The new-API event through core/v1: kubectl get events, describe.
    let core = site.json(&["get", "events", "written-as-new", "-o", "json"]);
    assert_eq!(core["apiVersion"], "v1", "{core}");
    assert_eq!(
        core["message"], "reconciled through events.k8s.io",
        "{core}"
    );
    assert_eq!(core["involvedObject"]["name"], "subject", "{core}");
    assert_eq!(
        core["reportingComponent"], "example.com/controller",
        "{core}"
    );
    assert!(
        core.get("note").is_none() && core.get("regarding").is_none(),
        "{core}"
    );
    let out = site.ok(&["get", "events"]);
    assert!(out.contains("reconciled through events.k8s.io"), "{out}");
    assert!(out.contains("written through core/v1"), "{out}");
    let out = site.ok(&["describe", "configmap", "subject"]);
    assert!(out.contains("Reconciled"), "{out}");
    // The new API prints with the same columns and cells as core events.
    let out = site.ok(&["get", "events.v1.events.k8s.io"]);
    assert!(
        out.contains("written through core/v1") && out.contains("configmap/subject"),
        "{out}"
    );

    // The core event through events.k8s.io/v1.
    let new = site.json(&[
        "get",
        "events.v1.events.k8s.io",
        "written-as-core",
        "-o",
        "json",
    ]);
    assert_eq!(new["apiVersion"], "events.k8s.io/v1", "{new}");
    assert_eq!(new["note"], "written through core/v1", "{new}");
    assert_eq!(new["regarding"]["kind"], "ConfigMap", "{new}");
    assert_eq!(new["deprecatedCount"], 3, "{new}");
    assert_eq!(new["deprecatedSource"]["component"], "example", "{new}");
    assert_eq!(
        new["deprecatedLastTimestamp"], "2026-12-05T10:05:00Z",
        "{new}"
    );
    let list = site.json(&["get", "events.v1.events.k8s.io", "-o", "json"]);
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"written-as-new") && names.contains(&"written-as-core"),
        "{list}"
    );
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["apiVersion"] == "events.k8s.io/v1"),
        "{list}"
    );
    // Field selectors of each view.
    let out = site.ok(&[
        "get",
        "events.v1.events.k8s.io",
        "--field-selector",
        "regarding.name=subject,reason=Noticed",
        "-o",
        "name",
    ]);
    assert_eq!(out.trim(), "event.events.k8s.io/written-as-core", "{out}");
    let out = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=subject,reason=Reconciled",
        "-o",
        "name",
    ]);
    assert_eq!(out.trim(), "event/written-as-new", "{out}");

    // A change through one view shows in the other; the objects are one (one resourceVersion).
    site.ok(&[
        "patch",
        "events.v1.events.k8s.io",
        "written-as-core",
        "--type=merge",
        "-p",
        r#"{"note":"changed through the new API"}"#,
    ]);
    let core = site.json(&["get", "events", "written-as-core", "-o", "json"]);
    assert_eq!(core["message"], "changed through the new API", "{core}");
    assert_eq!(core["count"], 3, "{core}");
    let new = site.json(&[
        "get",
        "events.v1.events.k8s.io",
        "written-as-core",
        "-o",
        "json",
    ]);
    assert_eq!(
        new["metadata"]["resourceVersion"], core["metadata"]["resourceVersion"],
        "{new} {core}"
    );
    // Deleting through one removes it from both.
    site.ok(&["delete", "events.v1.events.k8s.io", "written-as-new"]);
    let out = site.kubectl(&["get", "events", "written-as-new"]).unwrap();
    assert!(!out.status.success());

    let _ = watch.kill();
    let watched = String::from_utf8_lossy(&watch.wait_with_output().unwrap().stdout).to_string();
    assert!(
        watched.contains("\"note\": \"written through core/v1\""),
        "{watched}"
    );
    assert!(!watched.contains("\"involvedObject\""), "{watched}");
}

const MULTI_VERSION_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
  - name: v2
    served: true
    storage: false
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

/// A CRD's served versions are views of the same objects: each answers in its own version.
#[test]
fn every_served_version_of_a_crd_answers_in_its_own_version() {
    let site = Site::start().unwrap();
    site.ok_stdin(&["apply", "-f", "-"], Some(MULTI_VERSION_CRD));
    site.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/gadgets.example.com",
        "--timeout=10s",
    ]);
    assert!(eventually(Duration::from_secs(10), || {
        site.kubectl(&["get", "gadgets.v2.example.com"])
            .is_ok_and(|o| o.status.success())
    }));
    site.ok_stdin(
        &["create", "-f", "-"],
        Some("apiVersion: example.com/v2\nkind: Gadget\nmetadata: {name: two}\nspec: {size: 2}\n"),
    );
    let v1 = site.json(&["get", "gadgets.v1.example.com", "two", "-o", "json"]);
    assert_eq!(v1["apiVersion"], "example.com/v1", "{v1}");
    assert_eq!(v1["spec"]["size"], 2, "{v1}");
    let v2 = site.json(&["get", "gadgets.v2.example.com", "two", "-o", "json"]);
    assert_eq!(v2["apiVersion"], "example.com/v2", "{v2}");
    let list = site.json(&["get", "gadgets.v2.example.com", "-o", "json"]);
    assert_eq!(list["items"][0]["apiVersion"], "example.com/v2", "{list}");
}

const SSAR: &str = "apiVersion: authorization.k8s.io/v1
kind: SelfSubjectAccessReview
spec:
  resourceAttributes: {verb: get, resource: pods}
";

/// Debian's kubectl 1.20, which validates against OpenAPI v2 only (tests/run.sh fetches it).
fn old_kubectl(site: &Site, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let bin = std::env::var("KUBECTL_OLD").expect(
        "KUBECTL_OLD must name Debian's kubectl 1.20 (tests/run.sh fetches it into target/tools)",
    );
    let mut child = Command::new(&bin)
        .arg("--kubeconfig")
        .arg(site.kubeconfig())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `/openapi/v2` in JSON and in the protobuf form kubectl reads: kinds whose only endpoint is
/// POST validate (they failed with "failed to download openapi"), and kubectl 1.20 validates,
/// explains and patches with it.
#[test]
fn openapi_v2_serves_kubectl_validation() {
    let site = Site::start().unwrap();
    let out = site.ok_stdin(
        &[
            "create",
            "--validate=true",
            "-f",
            "-",
            "-o",
            "jsonpath={.status.allowed}",
        ],
        Some(SSAR),
    );
    assert_eq!(out.trim(), "true", "{out}");
    let doc = site.json(&["get", "--raw", "/openapi/v2"]);
    assert_eq!(doc["swagger"], "2.0");
    assert_eq!(
        doc["definitions"]["io.k8s.api.apps.v1.Deployment"]["x-kubernetes-group-version-kind"][0]["kind"],
        "Deployment"
    );

    let old = old_kubectl(&site, &["version", "--client", "--short"], None);
    let version = String::from_utf8_lossy(&old.stdout).to_string();
    assert!(version.contains("v1.20"), "{version}");
    let out = old_kubectl(&site, &["create", "-f", "-", "-o", "name"], Some(SSAR));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = old_kubectl(
        &site,
        &["apply", "--validate=true", "-f", "-"],
        Some(DEPLOYMENT),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = DEPLOYMENT
        .replace("replicas: 3", "replicas: three")
        .replace("image: nginx", "imagex: nginx");
    let out = old_kubectl(&site, &["apply", "--validate=true", "-f", "-"], Some(&bad));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(r#"invalid type for io.k8s.api.apps.v1.DeploymentSpec.replicas: got "string", expected "integer""#)
            && err.contains(r#"unknown field "imagex" in io.k8s.api.core.v1.Container"#),
        "{err}"
    );
    // A strategic merge patch computed from the v2 document (kubectl 1.20 apply).
    let changed = DEPLOYMENT.replace("value: fast", "value: slow");
    let out = old_kubectl(
        &site,
        &["apply", "--validate=true", "-f", "-"],
        Some(&changed),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = site.ok(&[
        "get",
        "deployment",
        "nginx-deployment",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[*].value}",
    ]);
    assert_eq!(env.trim(), "slow 1");
    let out = old_kubectl(&site, &["explain", "deployment.spec.strategy"], None);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("The deployment strategy to use to replace existing pods")
            && text.contains("rollingUpdate"),
        "{text}"
    );
}
