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
