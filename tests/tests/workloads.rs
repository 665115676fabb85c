//! The control loops seen through kubectl, on a site with simulated nodes: scheduling,
//! Deployments, ReplicaSets, ... (the rest of the workload kinds arrive with their loops).

use std::time::Duration;

use tests::Site;
use tests::simnodes::SimNodes;

const WAIT: Duration = Duration::from_secs(60);

fn pod_field(site: &Site, pod: &str, path: &str) -> String {
    site.ok(&["get", "pod", pod, "-o", &format!("jsonpath={{{path}}}")])
}

#[test]
fn pods_are_scheduled_onto_simulated_nodes_and_run() {
    let site = Site::start().unwrap();
    let nodes = SimNodes::for_site(&site, 3).unwrap();
    let out = site.ok(&["get", "nodes"]);
    assert_eq!(out.matches(" Ready ").count(), 3, "{out}");
    site.ok(&["run", "web", "--image=nginx:1.25"]);
    assert!(
        tests::eventually(WAIT, || pod_field(&site, "web", ".status.phase")
            == "Running"),
        "pod never ran: {}\n{}",
        site.ok(&["describe", "pod", "web"]),
        site.log()
    );
    let node = pod_field(&site, "web", ".spec.nodeName");
    assert!(nodes.names().contains(&node), "{node}");
    assert!(!pod_field(&site, "web", ".status.podIP").is_empty());
    let scheduled = pod_field(
        &site,
        "web",
        ".status.conditions[?(@.type==\"PodScheduled\")].status",
    );
    assert_eq!(scheduled, "True");
    assert!(
        tests::eventually(WAIT, || site
            .ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=web"
            ])
            .contains(&format!("Successfully assigned default/web to {node}"))),
        "no Scheduled event: {}",
        site.ok(&["get", "events"])
    );
}

#[test]
fn unschedulable_pods_say_why_like_upstream_and_schedule_once_they_fit() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    site.ok(&["taint", "node", "sim-1", "dedicated=db:NoSchedule"]);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: v1
kind: Pod
metadata: {name: big}
spec:
  containers:
  - name: c
    image: busybox
    resources: {requests: {cpu: "6"}}
"#,
        ),
    );
    let expected = "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: db}.";
    assert!(
        tests::eventually(WAIT, || site
            .ok(&["describe", "pod", "big"])
            .contains(expected)),
        "{}",
        site.ok(&["describe", "pod", "big"])
    );
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=FailedScheduling",
    ]);
    assert!(events.contains("Warning"), "{events}");
    assert_eq!(pod_field(&site, "big", ".status.phase"), "Pending");
    // Node changes make the scheduler try again; the repeated event is aggregated (count grows,
    // one Event object) as upstream's recorder does.
    for i in 0..3 {
        site.ok(&[
            "label",
            "node",
            "sim-0",
            &format!("attempt={i}"),
            "--overwrite",
        ]);
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(
        tests::eventually(WAIT, || {
            let counts = site.ok(&[
                "get",
                "events",
                "--field-selector",
                "reason=FailedScheduling,involvedObject.name=big",
                "-o",
                "jsonpath={.items[*].count}",
            ]);
            let counts: Vec<i64> = counts
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect();
            counts.len() == 1 && counts[0] >= 2
        }),
        "{}",
        site.ok(&["get", "events", "-o", "wide"])
    );
    // A bigger node arrives: the pod is retried and placed there.
    let client_nodes = tests::simnodes::SimConfig {
        count: 1,
        prefix: "big-".into(),
        cpu: "8".into(),
        ..Default::default()
    };
    let _big = SimNodes::start(site.kube_config().unwrap(), client_nodes).unwrap();
    assert!(
        tests::eventually(WAIT, || pod_field(&site, "big", ".spec.nodeName")
            == "big-0"),
        "{}",
        site.ok(&["describe", "pod", "big"])
    );
}

fn count_pods(site: &Site, selector: &str, phase: &str) -> usize {
    site.ok(&[
        "get",
        "pods",
        "-l",
        selector,
        "--field-selector",
        &format!("status.phase={phase}"),
        "-o",
        "name",
    ])
    .lines()
    .count()
}

#[test]
fn replicasets_keep_their_replica_count() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    // An orphan pod with matching labels is adopted instead of creating a third pod.
    site.ok(&["run", "orphan", "--image=busybox", "--labels=app=cache"]);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: cache}
spec:
  replicas: 3
  selector: {matchLabels: {app: cache}}
  template:
    metadata: {labels: {app: cache}}
    spec: {containers: [{name: c, image: busybox}]}
"#,
        ),
    );
    let ready = |n: &str| {
        site.ok(&[
            "get",
            "rs",
            "cache",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ]) == n
    };
    assert!(
        tests::eventually(WAIT, || ready("3")),
        "{}\n{}",
        site.ok(&["get", "pods", "-o", "wide"]),
        site.log()
    );
    assert_eq!(count_pods(&site, "app=cache", "Running"), 3);
    let owner = pod_field(&site, "orphan", ".metadata.ownerReferences[0].name");
    assert_eq!(owner, "cache", "the orphan was adopted");
    // A deleted pod is replaced.
    site.ok(&["delete", "pod", "orphan", "--wait=false"]);
    assert!(tests::eventually(WAIT, || ready("3")
        && count_pods(&site, "app=cache", "Running") == 3
        && !site
            .ok(&["get", "pods", "-o", "name"])
            .contains("pod/orphan")));
    site.ok(&["scale", "rs", "cache", "--replicas=1"]);
    assert!(tests::eventually(WAIT, || ready("1")
        && count_pods(&site, "app=cache", "Running") == 1));
    let events = site.ok(&["describe", "rs", "cache"]);
    assert!(
        events.contains("SuccessfulCreate") && events.contains("SuccessfulDelete"),
        "{events}"
    );
    // A pod whose labels stop matching is released and replaced.
    let pod = site.ok(&[
        "get",
        "pods",
        "-l",
        "app=cache",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    site.ok(&["label", "pod", &pod, "app=other", "--overwrite"]);
    assert!(tests::eventually(WAIT, || pod_field(
        &site,
        &pod,
        ".metadata.ownerReferences"
    )
    .is_empty()
        && count_pods(&site, "app=cache", "Running") == 1));
}

fn rollout_status(site: &Site, deployment: &str) -> String {
    site.ok(&[
        "rollout",
        "status",
        &format!("deployment/{deployment}"),
        "--timeout=90s",
    ])
}

#[test]
fn deployments_roll_out_scale_undo_pause_and_restart() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 3).unwrap();
    site.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx:1.25",
        "--replicas=3",
    ]);
    let out = rollout_status(&site, "web");
    assert!(out.contains("successfully rolled out"), "{out}");
    let d = site.json(&["get", "deployment", "web", "-o", "json"]);
    assert_eq!(d["status"]["availableReplicas"], 3, "{d}");
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    let ready = site.ok(&["get", "deployment", "web"]);
    assert!(ready.contains("3/3"), "{ready}");

    site.ok(&["scale", "deployment", "web", "--replicas=5"]);
    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
    assert_eq!(count_pods(&site, "app=web", "Running"), 5);

    site.ok(&["set", "image", "deployment/web", "nginx=nginx:1.26"]);
    site.ok(&[
        "annotate",
        "deployment/web",
        "kubernetes.io/change-cause=move to 1.26",
    ]);
    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
    let images = site.ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].spec.containers[0].image}",
    ]);
    assert!(
        tests::eventually(WAIT, || {
            let images = site.ok(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "--field-selector=status.phase=Running",
                "-o",
                "jsonpath={.items[*].spec.containers[0].image}",
            ]);
            images.split_whitespace().count() == 5
                && images.split_whitespace().all(|i| i == "nginx:1.26")
        }),
        "{images}"
    );
    let rs = site.ok(&["get", "rs", "-l", "app=web"]);
    assert_eq!(rs.lines().count(), 3, "two ReplicaSets: {rs}");
    let history = site.ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("1 ") && history.contains("2         move to 1.26"),
        "{history}"
    );

    site.ok(&["rollout", "undo", "deployment/web"]);
    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
    let image = site.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(image, "nginx:1.25");
    let history = site.ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("2 ") && history.contains("3 ") && !history.contains("\n1 "),
        "revision 1 became 3: {history}"
    );
    let d = site.json(&["get", "deployment", "web", "-o", "json"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );

    // Paused: template changes wait; resume rolls them out.
    site.ok(&["rollout", "pause", "deployment/web"]);
    site.ok(&["set", "image", "deployment/web", "nginx=nginx:1.27"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        site.ok(&["get", "rs", "-l", "app=web", "-o", "name"])
            .lines()
            .count(),
        2,
        "no new ReplicaSet while paused"
    );
    let cond = site.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Progressing\")].reason}",
    ]);
    assert_eq!(cond, "DeploymentPaused");
    site.ok(&["rollout", "resume", "deployment/web"]);
    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
    site.ok(&["rollout", "restart", "deployment/web"]);
    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
    let events = site.ok(&["describe", "deployment", "web"]);
    assert!(
        events.contains("ScalingReplicaSet") && events.contains("Scaled up replica set web-"),
        "{events}"
    );
}

#[test]
fn recreate_stops_old_pods_before_starting_new_ones() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: db}
spec:
  replicas: 2
  strategy: {type: Recreate}
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: "postgres:16"}]}
"#,
        ),
    );
    assert!(rollout_status(&site, "db").contains("successfully rolled out"));
    site.ok(&["set", "image", "deployment/db", "db=postgres:17"]);
    assert!(rollout_status(&site, "db").contains("successfully rolled out"));
    let images = site.ok(&[
        "get",
        "pods",
        "-l",
        "app=db",
        "-o",
        "jsonpath={.items[*].spec.containers[0].image}",
    ]);
    assert_eq!(images, "postgres:17 postgres:17");
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=db",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    let down = events.find("Scaled down").expect("scaled down the old set");
    let up_new = events.rfind("Scaled up").expect("scaled up the new set");
    assert!(down < up_new, "old pods stop first: {events}");
}

fn names(site: &Site, kind: &str, selector: &str) -> Vec<String> {
    site.ok(&["get", kind, "-l", selector, "-o", "name"])
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn deleting_a_deployment_cascades_as_asked() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    for app in ["bg", "fg", "orphan"] {
        site.ok(&["create", "deployment", app, "--image=nginx", "--replicas=2"]);
    }
    for app in ["bg", "fg", "orphan"] {
        assert!(rollout_status(&site, app).contains("successfully rolled out"));
    }
    // Background (kubectl's default): the Deployment goes at once, then its ReplicaSet and pods.
    site.ok(&["delete", "deployment", "bg", "--wait=false"]);
    assert!(
        tests::eventually(WAIT, || names(&site, "rs", "app=bg").is_empty()
            && names(&site, "pods", "app=bg").is_empty()),
        "{}",
        site.ok(&["get", "all"])
    );
    // Foreground: the Deployment stays (with the foregroundDeletion finalizer) until its
    // dependents are gone; `kubectl delete --wait` returns once it is.
    site.ok(&[
        "delete",
        "deployment",
        "fg",
        "--cascade=foreground",
        "--timeout=60s",
    ]);
    assert!(names(&site, "rs", "app=fg").is_empty());
    assert!(names(&site, "pods", "app=fg").is_empty());
    assert!(names(&site, "deployment", "app=fg").is_empty());
    // Orphan: the ReplicaSet and pods stay, without the owner reference.
    site.ok(&[
        "delete",
        "deployment",
        "orphan",
        "--cascade=orphan",
        "--timeout=60s",
    ]);
    let rs = names(&site, "rs", "app=orphan");
    assert_eq!(rs.len(), 1, "{rs:?}");
    let owners = site.ok(&["get", &rs[0], "-o", "jsonpath={.metadata.ownerReferences}"]);
    assert!(owners.is_empty(), "{owners}");
    assert_eq!(count_pods(&site, "app=orphan", "Running"), 2);
    // A pod whose owner vanished while the collector was not looking is collected too.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: stray
  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: never-was, uid: 6f1d4f0e-0000-4000-8000-000000000000}]
"#,
        ),
    );
    assert!(
        tests::eventually(WAIT, || !site
            .ok(&["get", "cm", "-o", "name"])
            .contains("stray")),
        "an object whose owner does not exist is deleted"
    );
}

#[test]
fn exposed_deployments_get_cluster_ips_and_endpoints_with_ready_pod_ips() {
    let mut site = Site::start().unwrap();
    let nodes = SimNodes::for_site(&site, 2).unwrap();
    site.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx",
        "--replicas=3",
        "--port=8080",
    ]);
    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
    site.ok(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ]);
    let ip = site.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(ip.starts_with("10.43."), "{ip}");
    let pod_ips = |site: &Site| {
        let mut ips: Vec<String> = site
            .ok(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].status.podIP}",
            ])
            .split_whitespace()
            .map(|s| format!("{s}:8080"))
            .collect();
        ips.sort();
        ips
    };
    let endpoints = |site: &Site| {
        let mut eps: Vec<String> = site
            .ok(&[
                "get",
                "endpoints",
                "web",
                "-o",
                "jsonpath={range .subsets[*].addresses[*]}{.ip}:8080 {end}",
            ])
            .split_whitespace()
            .map(str::to_string)
            .collect();
        eps.sort();
        eps
    };
    assert!(
        tests::eventually(WAIT, || endpoints(&site) == pod_ips(&site)
            && endpoints(&site).len() == 3),
        "{:?} vs {:?}",
        endpoints(&site),
        pod_ips(&site)
    );
    let slices = site.json(&[
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=web",
        "-o",
        "json",
    ]);
    let slice = &slices["items"][0];
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), 3, "{slice}");
    assert_eq!(slice["ports"][0]["port"], 8080);
    assert_eq!(slice["metadata"]["ownerReferences"][0]["kind"], "Service");
    // Scaling down removes the address.
    site.ok(&["scale", "deployment", "web", "--replicas=1"]);
    assert!(tests::eventually(WAIT, || endpoints(&site).len() == 1
        && endpoints(&site) == pod_ips(&site)));
    // A NodePort service and a fixed cluster IP.
    site.ok(&[
        "create",
        "service",
        "nodeport",
        "np",
        "--tcp=80:8080",
        "--node-port=30080",
    ]);
    let err = site.fails(
        &[
            "create",
            "service",
            "nodeport",
            "np2",
            "--tcp=80:8080",
            "--node-port=30080",
        ],
        None,
    );
    assert!(err.contains("provided port is already allocated"), "{err}");
    let err = site.fails(
        &[
            "create",
            "service",
            "clusterip",
            "dup",
            "--tcp=80",
            &format!("--clusterip={ip}"),
        ],
        None,
    );
    assert!(err.contains("provided IP is already allocated"), "{err}");
    // After a restart the allocations are intact: no new Service reuses an address.
    drop(nodes);
    site.stop();
    site.launch().unwrap();
    assert_eq!(
        site.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]),
        ip
    );
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        site.ok(&[
            "create",
            "service",
            "clusterip",
            &format!("s{i}"),
            "--tcp=80",
        ]);
    }
    for line in site
        .ok(&[
            "get",
            "svc",
            "-o",
            "jsonpath={range .items[*]}{.spec.clusterIP}{\"\\n\"}{end}",
        ])
        .lines()
    {
        assert!(seen.insert(line.to_string()), "duplicate cluster IP {line}");
    }
    assert!(!site.log().contains("assigned to multiple services"));
    // The API server's own Service.
    let k = site.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(k, "10.43.0.1");
    let ep = site.ok(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[0].ports[0].port}",
    ]);
    assert_eq!(ep, site.port.to_string());
}

#[test]
fn a_silent_node_becomes_not_ready_is_tainted_and_its_pods_are_evicted_when_the_site_says_so() {
    // EdgeSite keeps a disconnected node's pods by default; this site asks for upstream's
    // eviction.
    let site = Site::start_with(&[
        "--node-monitor-grace-period=4s",
        "--disconnected-node-pods=evict",
    ])
    .unwrap();
    let nodes = SimNodes::start(
        site.kube_config().unwrap(),
        tests::simnodes::SimConfig {
            count: 2,
            heartbeat: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: 4
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers: [{name: c, image: busybox}]
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 3}
"#,
        ),
    );
    assert!(rollout_status(&site, "app").contains("successfully rolled out"));
    let on_node = |node: &str| {
        site.ok(&[
            "get",
            "pods",
            "-l",
            "app=app",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "name",
        ])
        .lines()
        .count()
    };
    assert!(
        on_node("sim-0") > 0,
        "{}",
        site.ok(&["get", "pods", "-o", "wide"])
    );
    nodes.silence("sim-0");
    assert!(
        tests::eventually(WAIT, || site
            .ok(&["get", "node", "sim-0"])
            .contains("NotReady")),
        "{}",
        site.ok(&["describe", "node", "sim-0"])
    );
    let taints = site.ok(&[
        "get",
        "node",
        "sim-0",
        "-o",
        "jsonpath={.spec.taints[*].key}",
    ]);
    assert!(
        taints.contains("node.kubernetes.io/unreachable"),
        "{taints}"
    );
    let ready = site.ok(&[
        "get",
        "node",
        "sim-0",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
    ]);
    assert_eq!(ready, "NodeStatusUnknown");
    // After tolerationSeconds the pods there are evicted (they stay Terminating: nobody on the
    // node confirms) and replaced on the healthy node.
    assert!(
        tests::eventually(WAIT, || {
            let terminating = site.ok(&[
                "get",
                "pods",
                "-l",
                "app=app",
                "--field-selector",
                "spec.nodeName=sim-0",
                "-o",
                "jsonpath={.items[*].metadata.deletionTimestamp}",
            ]);
            terminating.split_whitespace().count() == on_node("sim-0")
                && count_pods(&site, "app=app", "Running") >= 4
                && site.ok(&[
                    "get",
                    "deployment",
                    "app",
                    "-o",
                    "jsonpath={.status.availableReplicas}",
                ]) == "4"
        }),
        "{}",
        site.ok(&["get", "pods", "-o", "wide"])
    );
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=TaintManagerEviction",
    ]);
    assert!(events.contains("Marking for deletion"), "{events}");
    // Nothing new goes to the silent node.
    site.ok(&["scale", "deployment", "app", "--replicas=6"]);
    assert!(rollout_status(&site, "app").contains("successfully rolled out"));
    let fresh = site.ok(&[
        "get",
        "pods",
        "-l",
        "app=app",
        "--field-selector",
        "spec.nodeName=sim-0",
        "-o",
        "jsonpath={.items[?(@.metadata.deletionTimestamp)].metadata.name}",
    ]);
    assert_eq!(fresh.split_whitespace().count(), on_node("sim-0"));
}

#[test]
fn cordon_and_drain_evict_pods_and_a_budget_blocks_them() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: c, image: nginx}]
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: web}
spec:
  minAvailable: 2
  selector: {matchLabels: {app: web}}
"#,
        ),
    );
    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
    let nodes = site.ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].spec.nodeName}",
    ]);
    let mut nodes: Vec<&str> = nodes.split_whitespace().collect();
    nodes.sort();
    assert_eq!(nodes, vec!["sim-0", "sim-1"], "spread one per node");
    assert!(tests::eventually(WAIT, || site.ok(&[
        "get",
        "pdb",
        "web",
        "-o",
        "jsonpath={.status.currentHealthy}/{.status.disruptionsAllowed}"
    ]) == "2/0"));
    site.ok(&["cordon", "sim-0"]);
    assert!(
        site.ok(&["get", "node", "sim-0"])
            .contains("SchedulingDisabled")
    );
    let err = site.fails(
        &["drain", "sim-0", "--ignore-daemonsets", "--timeout=5s"],
        None,
    );
    assert!(err.contains("disruption budget"), "{err}");
    site.ok(&[
        "patch",
        "pdb",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"minAvailable":1}}"#,
    ]);
    assert!(tests::eventually(WAIT, || site.ok(&[
        "get",
        "pdb",
        "web",
        "-o",
        "jsonpath={.status.disruptionsAllowed}"
    ]) == "1"));
    let out = site.ok(&["drain", "sim-0", "--ignore-daemonsets", "--timeout=60s"]);
    assert!(
        out.contains("evicted") && out.contains("node/sim-0 drained"),
        "{out}"
    );
    // The replacement cannot go to the cordoned node; the spread constraint keeps it pending
    // until the node is uncordoned.
    site.ok(&["uncordon", "sim-0"]);

    assert!(rollout_status(&site, "web").contains("successfully rolled out"));
}

fn job_field(site: &Site, job: &str, path: &str) -> String {
    site.ok(&["get", "job", job, "-o", &format!("jsonpath={{{path}}}")])
}

#[test]
fn jobs_run_to_completion_fail_by_the_rules_and_expire() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    site.ok(&[
        "create",
        "job",
        "hello",
        "--image=busybox",
        "--",
        "echo",
        "hi",
    ]);
    site.ok(&[
        "wait",
        "--for=condition=complete",
        "job/hello",
        "--timeout=60s",
    ]);
    assert!(site.ok(&["get", "job", "hello"]).contains("1/1"));
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: batch/v1
kind: Job
metadata: {name: batch}
spec:
  completions: 4
  parallelism: 2
  template:
    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: indexed}
spec:
  completions: 3
  parallelism: 3
  completionMode: Indexed
  template:
    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: failing}
spec:
  backoffLimit: 0
  template:
    metadata: {annotations: {sim.edgesite.io/fail-after: 100ms}}
    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: slow}
spec:
  activeDeadlineSeconds: 2
  template:
    metadata: {annotations: {sim.edgesite.io/complete-after: 10m}}
    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: shortlived}
spec:
  ttlSecondsAfterFinished: 1
  template:
    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}
"#,
        ),
    );
    site.ok(&[
        "wait",
        "--for=condition=complete",
        "job/batch",
        "job/indexed",
        "--timeout=60s",
    ]);
    assert_eq!(job_field(&site, "batch", ".status.succeeded"), "4");
    assert_eq!(
        job_field(&site, "indexed", ".status.completedIndexes"),
        "0-2"
    );
    site.ok(&[
        "wait",
        "--for=condition=failed",
        "job/failing",
        "job/slow",
        "--timeout=60s",
    ]);
    assert_eq!(
        job_field(
            &site,
            "failing",
            ".status.conditions[?(@.type==\"Failed\")].reason"
        ),
        "BackoffLimitExceeded"
    );
    assert_eq!(
        job_field(
            &site,
            "slow",
            ".status.conditions[?(@.type==\"Failed\")].reason"
        ),
        "DeadlineExceeded"
    );
    assert!(tests::eventually(WAIT, || site
        .ok(&[
            "get",
            "pods",
            "-l",
            "job-name=slow",
            "--field-selector=status.phase=Running",
            "-o",
            "name"
        ])
        .is_empty()));
    assert!(
        tests::eventually(WAIT, || !site
            .ok(&["get", "jobs", "-o", "name"])
            .contains("shortlived")),
        "ttlSecondsAfterFinished deletes the job"
    );
    assert!(tests::eventually(WAIT, || site
        .ok(&["get", "pods", "-l", "job-name=shortlived", "-o", "name"])
        .is_empty()));
}

#[test]
fn cronjobs_fire_on_schedule_and_keep_history() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 1).unwrap();
    site.ok(&[
        "create",
        "cronjob",
        "tick",
        "--image=busybox",
        "--schedule=* * * * *",
        "--",
        "date",
    ]);
    assert!(
        tests::eventually(Duration::from_secs(90), || !job_field_list(&site)
            .is_empty()),
        "no job within 90 s: {}",
        site.ok(&["describe", "cronjob", "tick"])
    );
    let job = job_field_list(&site)[0].clone();
    assert!(job.starts_with("tick-"), "{job}");
    site.ok(&[
        "wait",
        "--for=condition=complete",
        &format!("job/{job}"),
        "--timeout=60s",
    ]);
    assert!(tests::eventually(WAIT, || !site
        .ok(&[
            "get",
            "cronjob",
            "tick",
            "-o",
            "jsonpath={.status.lastSuccessfulTime}"
        ])
        .is_empty()));
    assert!(
        !site
            .ok(&[
                "get",
                "cronjob",
                "tick",
                "-o",
                "jsonpath={.status.lastScheduleTime}"
            ])
            .is_empty()
    );
    // Suspended: nothing new is created.
    site.ok(&[
        "patch",
        "cronjob",
        "tick",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    let events = site.ok(&["describe", "cronjob", "tick"]);
    assert!(events.contains("SuccessfulCreate"), "{events}");
}

fn job_field_list(site: &Site) -> Vec<String> {
    site.ok(&["get", "jobs", "-o", "jsonpath={.items[*].metadata.name}"])
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn daemonsets_run_one_pod_per_eligible_node_and_roll_updates() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 3).unwrap();
    site.ok(&["taint", "node", "sim-2", "dedicated=db:NoSchedule"]);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec: {containers: [{name: agent, image: "agent:1"}]}
"#,
        ),
    );
    let status = |site: &Site| site.ok(&["rollout", "status", "daemonset/agent", "--timeout=60s"]);
    assert!(status(&site).contains("successfully rolled out"));
    let nodes = site.ok(&[
        "get",
        "pods",
        "-l",
        "app=agent",
        "-o",
        "jsonpath={.items[*].spec.nodeName}",
    ]);
    let mut nodes: Vec<&str> = nodes.split_whitespace().collect();
    nodes.sort();
    assert_eq!(nodes, vec!["sim-0", "sim-1"], "not on the tainted node");
    // A new node gets its pod.
    let _more = SimNodes::start(
        site.kube_config().unwrap(),
        tests::simnodes::SimConfig {
            count: 1,
            prefix: "extra-".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(tests::eventually(WAIT, || count_pods(
        &site,
        "app=agent",
        "Running"
    ) == 3));
    site.ok(&["set", "image", "daemonset/agent", "agent=agent:2"]);
    assert!(status(&site).contains("successfully rolled out"));
    assert!(tests::eventually(WAIT, || {
        let images = site.ok(&[
            "get",
            "pods",
            "-l",
            "app=agent",
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ]);
        images.split_whitespace().count() == 3 && images.split_whitespace().all(|i| i == "agent:2")
    }));
    let history = site.ok(&["rollout", "history", "daemonset/agent"]);
    assert!(
        history.contains("1 ") && history.contains("2 "),
        "{history}"
    );
    site.ok(&["rollout", "undo", "daemonset/agent"]);
    assert!(status(&site).contains("successfully rolled out"));
    assert!(tests::eventually(WAIT, || {
        let images = site.ok(&[
            "get",
            "pods",
            "-l",
            "app=agent",
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ]);
        images.split_whitespace().count() == 3 && images.split_whitespace().all(|i| i == "agent:1")
    }));
}

#[test]
fn statefulsets_create_in_order_with_claims_and_roll_back_down() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: "postgres:16", ports: [{containerPort: 5432}]}]}
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
"#,
        ),
    );
    let status = |site: &Site| site.ok(&["rollout", "status", "statefulset/db", "--timeout=60s"]);
    assert!(
        status(&site).contains("partitioned roll out complete")
            || status(&site).contains("complete")
    );
    let pods = site.ok(&[
        "get",
        "pods",
        "-l",
        "app=db",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    assert_eq!(pods, "db-0 db-1 db-2");
    // Ordered: each pod was created after its predecessor.
    let events = site.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=StatefulSet",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    let order: Vec<usize> = ["Pod db-0", "Pod db-1", "Pod db-2"]
        .iter()
        .map(|p| events.find(p).expect(p))
        .collect();
    assert!(order[0] < order[1] && order[1] < order[2], "{events}");
    let claims = site.ok(&["get", "pvc", "-o", "jsonpath={.items[*].metadata.name}"]);
    assert_eq!(claims, "data-db-0 data-db-1 data-db-2");
    assert_eq!(pod_field(&site, "db-1", ".spec.hostname"), "db-1");
    assert_eq!(pod_field(&site, "db-1", ".spec.subdomain"), "db");
    // Headless service endpoints carry the hostnames.
    assert!(tests::eventually(WAIT, || site
        .ok(&[
            "get",
            "endpoints",
            "db",
            "-o",
            "jsonpath={.subsets[0].addresses[*].hostname}"
        ])
        .split_whitespace()
        .count()
        == 3));
    // Rolling update from the highest ordinal down.
    site.ok(&["set", "image", "statefulset/db", "db=postgres:17"]);
    assert!(status(&site).contains("complete"));
    assert!(tests::eventually(WAIT, || {
        site.ok(&[
            "get",
            "pods",
            "-l",
            "app=db",
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ]) == "postgres:17 postgres:17 postgres:17"
    }));
    // Scale down removes the highest ordinal; the claims stay.
    site.ok(&["scale", "statefulset/db", "--replicas=1"]);
    assert!(tests::eventually(WAIT, || site.ok(&[
        "get",
        "pods",
        "-l",
        "app=db",
        "-o",
        "jsonpath={.items[*].metadata.name}"
    ]) == "db-0"));
    assert_eq!(site.ok(&["get", "pvc", "-o", "name"]).lines().count(), 3);
}

#[test]
fn service_accounts_exist_per_namespace_and_their_tokens_authenticate() {
    let site = Site::start().unwrap();
    site.ok(&["create", "namespace", "team"]);
    assert!(tests::eventually(WAIT, || site
        .ok(&["get", "sa", "-n", "team", "-o", "name"])
        .contains("serviceaccount/default")));
    site.ok(&["delete", "sa", "default", "-n", "team"]);
    assert!(
        tests::eventually(WAIT, || site
            .ok(&["get", "sa", "-n", "team", "-o", "name"])
            .contains("serviceaccount/default")),
        "re-created"
    );
    site.ok(&["create", "serviceaccount", "builder", "-n", "team"]);
    let token = site.ok(&["create", "token", "builder", "-n", "team", "--duration=15m"]);
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "{token}");
    // A kubeconfig with only the token (no admin client certificate).
    let ca = site.ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let server = site.ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ]);
    let kubeconfig = site.dir.path().join("builder.yaml");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: {server}, certificate-authority-data: {ca}}}}}]\nusers: [{{name: u, user: {{token: {token}}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"),
    )
    .unwrap();
    let as_builder = |args: &[&str]| {
        std::process::Command::new(tests::kubectl_bin())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap()
    };
    let whoami = as_builder(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert!(
        whoami.status.success(),
        "{}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "system:serviceaccount:team:builder"
    );
    let err = site.fails(
        &["create", "token", "builder", "-n", "team", "--duration=1m"],
        None,
    );
    assert!(
        err.contains("may not specify a duration less than 10 minutes"),
        "{err}"
    );
    // Every namespace has the cluster CA; legacy token Secrets are filled in.
    assert!(tests::eventually(WAIT, || site
        .ok(&[
            "get",
            "cm",
            "kube-root-ca.crt",
            "-n",
            "team",
            "-o",
            "jsonpath={.data.ca\\.crt}"
        ])
        .contains("BEGIN CERTIFICATE")));
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Secret\nmetadata:\n  name: builder-token\n  namespace: team\n  annotations: {kubernetes.io/service-account.name: builder}\ntype: kubernetes.io/service-account-token\n"),
    );
    let legacy = || {
        site.ok(&[
            "get",
            "secret",
            "builder-token",
            "-n",
            "team",
            "-o",
            "jsonpath={.data.token}",
        ])
    };
    assert!(
        tests::eventually(WAIT, || !legacy().is_empty()),
        "{}",
        site.ok(&["describe", "secret", "builder-token", "-n", "team"])
    );
    use base64::Engine;
    let legacy_token = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(legacy().trim())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(legacy_token.split('.').count(), 3);
    let legacy_config = site.dir.path().join("legacy.yaml");
    let text = std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .replace(token, &legacy_token);
    std::fs::write(&legacy_config, text).unwrap();
    let as_legacy = |args: &[&str]| {
        std::process::Command::new(tests::kubectl_bin())
            .arg("--kubeconfig")
            .arg(&legacy_config)
            .args(args)
            .output()
            .unwrap()
    };
    let whoami = as_legacy(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "system:serviceaccount:team:builder"
    );
    // Deleting the Secret revokes the token bound to it.
    site.ok(&["delete", "secret", "builder-token", "-n", "team"]);
    assert!(!as_legacy(&["get", "pods", "-n", "team"]).status.success());
    // A deleted account's tokens stop working.
    site.ok(&["delete", "sa", "builder", "-n", "team"]);
    let denied = as_builder(&["get", "pods", "-n", "team"]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("provide credentials") || stderr.contains("Unauthorized"),
        "{stderr}"
    );
}

#[test]
fn deleting_a_namespace_removes_its_workloads() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 2).unwrap();
    site.ok(&["create", "namespace", "shop"]);
    site.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx",
        "--replicas=3",
        "-n",
        "shop",
    ]);
    site.ok(&["expose", "deployment", "web", "--port=80", "-n", "shop"]);
    site.ok(&["create", "job", "once", "--image=busybox", "-n", "shop"]);
    assert!(
        site.ok(&[
            "rollout",
            "status",
            "deployment/web",
            "-n",
            "shop",
            "--timeout=60s"
        ])
        .contains("successfully")
    );
    site.ok(&["delete", "namespace", "shop", "--timeout=60s"]);
    assert!(
        !site
            .ok(&["get", "ns", "-o", "name"])
            .contains("namespace/shop")
    );
    let left = site.ok(&[
        "get",
        "pods,rs,deploy,svc,ep,jobs",
        "-A",
        "-o",
        "jsonpath={.items[*].metadata.namespace}",
    ]);
    assert!(!left.contains("shop"), "{left}");
}

#[test]
fn a_stuck_rollout_exceeds_its_progress_deadline() {
    let site = Site::start().unwrap();
    let _nodes = SimNodes::for_site(&site, 1).unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: stuck}
spec:
  replicas: 1
  progressDeadlineSeconds: 3
  selector: {matchLabels: {app: stuck}}
  template:
    metadata: {labels: {app: stuck}}
    spec:
      nodeSelector: {disk: ssd}
      containers: [{name: c, image: busybox}]
"#,
        ),
    );
    let out = site
        .kubectl(&["rollout", "status", "deployment/stuck", "--timeout=60s"])
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exceeded its progress deadline"),
        "{stderr}"
    );
    let reason = site.ok(&[
        "get",
        "deployment",
        "stuck",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Progressing\")].reason}",
    ]);
    assert_eq!(reason, "ProgressDeadlineExceeded");
}
