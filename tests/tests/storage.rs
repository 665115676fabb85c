//! Persistent volumes with real containers: the site's `local-path` StorageClass provisions a
//! directory on the node a claim's first pod is scheduled to, the pod's data outlives the pod,
//! and a pod with a local claim follows its volume to its node. Needs root; run by
//! tests/run.sh.

use std::time::Duration;

use serde_json::Value;
use tests::node::{BUSYBOX, Runtime};
use tests::{Site, eventually};

fn wait_for(site: &Site, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    assert!(
        eventually(timeout, &mut f),
        "timed out waiting for {what}\n{}\n{}\n{}",
        site.ok(&["get", "pods,pvc,pv", "-o", "wide"]),
        site.ok(&["get", "events", "--sort-by=.lastTimestamp"]),
        site.log()
    );
}

fn running(site: &Site, pod: &str) -> bool {
    site.kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"])
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "Running")
}

fn node_ready(site: &Site, node: &str) -> bool {
    site.kubectl(&["get", "node", node])
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" Ready "))
}

fn field(site: &Site, args: &[&str], path: &str) -> String {
    let mut all: Vec<&str> = args.to_vec();
    let jsonpath = format!("jsonpath={{{path}}}");
    all.extend(["-o", jsonpath.as_str()]);
    site.kubectl(&all)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn a_statefulset_keeps_its_data_on_a_provisioned_local_path_volume() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    wait_for(&site, "node-a Ready", Duration::from_secs(40), || {
        node_ready(&site, "node-a")
    });
    // The default class, as K3s's.
    wait_for(
        &site,
        "the local-path class",
        Duration::from_secs(20),
        || {
            site.kubectl(&["get", "storageclass"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("local-path (default)"))
        },
    );
    let class = site.json(&["get", "storageclass", "local-path", "-o", "json"]);
    assert_eq!(class["provisioner"], "rancher.io/local-path");
    assert_eq!(class["volumeBindingMode"], "WaitForFirstConsumer");
    assert_eq!(class["reclaimPolicy"], "Delete");

    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: db}}
spec: {{clusterIP: None, selector: {{app: db}}, ports: [{{port: 80}}]}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db}}
spec:
  serviceName: db
  replicas: 1
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext: {{runAsUser: 1000}}
      containers:
      - name: db
        image: {BUSYBOX}
        imagePullPolicy: Never
        command: ["sleep", "3600"]
        volumeMounts: [{{name: data, mountPath: /data}}, {{name: data, mountPath: /logs, subPath: logs}}]
  persistentVolumeClaimRetentionPolicy: {{whenScaled: Delete}}
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
"#
        )),
    );
    // Before the pod is scheduled nothing is bound; then the claim binds on node-a.
    wait_for(&site, "db-0 running", Duration::from_secs(90), || {
        running(&site, "db-0")
    });
    let claim = site.json(&["get", "pvc", "data-db-0", "-o", "json"]);
    assert_eq!(claim["status"]["phase"], "Bound", "{claim:#}");
    assert_eq!(claim["spec"]["storageClassName"], "local-path");
    assert_eq!(
        claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"],
        "node-a"
    );
    assert!(
        claim["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "kubernetes.io/pvc-protection")),
        "{claim:#}"
    );
    let volume_name = claim["spec"]["volumeName"].as_str().unwrap().to_string();
    let volume = site.json(&["get", "pv", &volume_name, "-o", "json"]);
    assert_eq!(volume["status"]["phase"], "Bound");
    assert_eq!(volume["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    assert_eq!(
        volume["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
            [0],
        "node-a"
    );
    let path = volume["spec"]["hostPath"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        path.starts_with(&site.data_dir().join("storage").display().to_string()),
        "{path}"
    );
    // kubectl's columns, upstream's.
    let table = site.ok(&["get", "pvc"]);
    assert!(
        table.starts_with("NAME") && table.contains("STATUS") && table.contains("VOLUME"),
        "{table}"
    );
    assert!(
        table.contains("Bound") && table.contains("1Gi") && table.contains("RWO"),
        "{table}"
    );

    // A user that is not root writes to it (the directory is made as K3s's provisioner makes it).
    site.ok(&["exec", "db-0", "--", "sh", "-c", "echo kept > /data/f"]);
    assert_eq!(
        std::fs::read_to_string(format!("{path}/f")).unwrap(),
        "kept\n"
    );
    // The subPath is the volume's `logs` directory (made by the node, root's, as upstream's).
    std::fs::write(format!("{path}/logs/l"), "line\n").unwrap();
    assert_eq!(site.ok(&["exec", "db-0", "--", "cat", "/logs/l"]), "line\n");

    // The pod goes; its replacement finds the data.
    let uid = field(&site, &["get", "pod", "db-0"], ".metadata.uid");
    site.ok(&["delete", "pod", "db-0", "--wait=false"]);
    wait_for(&site, "a new db-0", Duration::from_secs(90), || {
        running(&site, "db-0") && field(&site, &["get", "pod", "db-0"], ".metadata.uid") != uid
    });
    assert_eq!(site.ok(&["exec", "db-0", "--", "cat", "/data/f"]), "kept\n");

    // Growing the claim: the class allows it; a directory has no size, the figure follows.
    site.ok(&[
        "patch",
        "pvc",
        "data-db-0",
        "--type=merge",
        "-p",
        r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
    ]);
    wait_for(&site, "the claim at 2Gi", Duration::from_secs(30), || {
        field(
            &site,
            &["get", "pvc", "data-db-0"],
            ".status.capacity.storage",
        ) == "2Gi"
    });
    let refused = site
        .kubectl(&[
            "patch",
            "pvc",
            "data-db-0",
            "--type=merge",
            "-p",
            r#"{"spec":{"accessModes":["ReadWriteMany"]}}"#,
        ])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("spec is immutable after creation"),
        "{refused:?}"
    );
    // Not below what the volume has.
    let refused = site.fails(
        &[
            "patch",
            "pvc",
            "data-db-0",
            "--type=merge",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}"#,
        ],
        None,
    );
    assert!(
        refused.contains(
            "spec.resources.requests.storage: Forbidden: field can not be less than status.capacity"
        ),
        "{refused}"
    );

    // whenScaled: Delete: a replica scaled away takes its claim with it.
    site.ok(&["scale", "statefulset", "db", "--replicas=2"]);
    wait_for(&site, "db-1 running", Duration::from_secs(90), || {
        running(&site, "db-1")
    });
    assert_eq!(
        field(&site, &["get", "pvc", "data-db-1"], ".status.phase"),
        "Bound"
    );
    site.ok(&["scale", "statefulset", "db", "--replicas=1"]);
    wait_for(&site, "data-db-1 to go", Duration::from_secs(60), || {
        site.kubectl(&["get", "pvc", "data-db-1"])
            .is_ok_and(|o| !o.status.success())
    });
    assert_eq!(
        field(&site, &["get", "pvc", "data-db-0"], ".status.phase"),
        "Bound"
    );

    // A claim in use is not removed: it waits (Terminating) until its pod is gone.
    site.ok(&["delete", "pvc", "data-db-0", "--wait=false"]);
    std::thread::sleep(Duration::from_secs(2));
    let claim = site.json(&["get", "pvc", "data-db-0", "-o", "json"]);
    assert!(
        claim["metadata"]["deletionTimestamp"].is_string(),
        "{claim:#}"
    );
    site.ok(&["delete", "statefulset", "db"]);
    site.ok(&["delete", "pod", "db-0", "--wait=false"]);
    wait_for(&site, "the claim to go", Duration::from_secs(60), || {
        site.kubectl(&["get", "pvc", "data-db-0"])
            .is_ok_and(|o| !o.status.success())
    });
    // Its volume is released; the node removes the directory, then the volume (Delete).
    wait_for(
        &site,
        "the volume and its directory to go",
        Duration::from_secs(60),
        || {
            site.kubectl(&["get", "pv", &volume_name])
                .is_ok_and(|o| !o.status.success())
                && !std::path::Path::new(&path).exists()
        },
    );

    // A class that retains: the released volume and its data stay.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: local-keep}}
provisioner: rancher.io/local-path
reclaimPolicy: Retain
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: keep}}
spec: {{storageClassName: local-keep, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 10Mi}}}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: keeper}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: c, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sh", "-c", "echo mine > /data/f; sleep 3600"], volumeMounts: [{{name: d, mountPath: /data}}]}}]
  volumes: [{{name: d, persistentVolumeClaim: {{claimName: keep}}}}]
"#
        )),
    );
    wait_for(&site, "keeper running", Duration::from_secs(90), || {
        running(&site, "keeper")
    });
    let kept = field(&site, &["get", "pvc", "keep"], ".spec.volumeName");
    let kept_path = field(&site, &["get", "pv", &kept], ".spec.hostPath.path");
    site.ok(&["delete", "pod", "keeper"]);
    site.ok(&["delete", "pvc", "keep"]);
    wait_for(
        &site,
        "the retained volume released",
        Duration::from_secs(30),
        || field(&site, &["get", "pv", &kept], ".status.phase") == "Released",
    );
    // Longer than the node's look over its storage: still there.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        field(&site, &["get", "pv", &kept], ".status.phase"),
        "Released"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{kept_path}/f")).unwrap(),
        "mine\n"
    );
}

#[test]
fn a_pod_with_a_local_claim_follows_its_volume_and_bad_claims_say_why() {
    let rt = Runtime::start().unwrap();
    let site = rt.start_site(&[]).unwrap();
    let _agent = rt.start_agent(&site, "edge-1").unwrap();
    wait_for(&site, "both nodes Ready", Duration::from_secs(60), || {
        node_ready(&site, "node-a") && node_ready(&site, "edge-1")
    });
    let pod = |name: &str, affinity: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  {affinity}
  containers: [{{name: c, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sleep", "3600"], volumeMounts: [{{name: d, mountPath: /data}}]}}]
  volumes: [{{name: d, persistentVolumeClaim: {{claimName: data}}}}]
"#
        )
    };
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 100Mi}}}\n",
        ),
    );
    // Unbound until a pod uses it, and it says so.
    wait_for(
        &site,
        "WaitForFirstConsumer",
        Duration::from_secs(20),
        || {
            site.ok(&["describe", "pvc", "data"])
                .contains("waiting for first consumer to be created before binding")
        },
    );
    assert_eq!(
        field(&site, &["get", "pvc", "data"], ".status.phase"),
        "Pending"
    );
    // The first pod is placed on edge-1 ...
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&pod(
            "first",
            "nodeSelector: {kubernetes.io/hostname: edge-1}",
        )),
    );
    let created = std::time::Instant::now();
    wait_for(&site, "the claim bound", Duration::from_secs(60), || {
        field(&site, &["get", "pvc", "data"], ".status.phase") == "Bound"
    });
    eprintln!(
        "claim bound {:?} after its first pod was created",
        created.elapsed()
    );
    wait_for(&site, "first running", Duration::from_secs(90), || {
        running(&site, "first")
    });
    site.ok(&["exec", "first", "--", "sh", "-c", "echo on-edge > /data/f"]);
    site.ok(&["delete", "pod", "first", "--grace-period=1"]);
    // ... and a second one, that would rather be on node-a, follows the volume to edge-1.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&pod(
            "second",
            "affinity: {nodeAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: 100, preference: {matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [node-a]}]}}]}}",
        )),
    );
    wait_for(&site, "second running", Duration::from_secs(90), || {
        running(&site, "second")
    });
    assert_eq!(
        field(&site, &["get", "pod", "second"], ".spec.nodeName"),
        "edge-1"
    );
    assert_eq!(
        site.ok(&["exec", "second", "--", "cat", "/data/f"]),
        "on-edge\n"
    );

    // A pod that must be on node-a cannot have the volume: upstream's reason.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&pod(
            "elsewhere",
            "nodeSelector: {kubernetes.io/hostname: node-a}",
        )),
    );
    wait_for(&site, "FailedScheduling", Duration::from_secs(30), || {
        site.ok(&["describe", "pod", "elsewhere"])
            .contains("node(s) had volume node affinity conflict")
    });

    // A generic ephemeral volume: a claim made for the pod, provisioned, gone with the pod.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: scratchy}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: c, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sh", "-c", "echo x > /scratch/f; sleep 3600"], volumeMounts: [{{name: scratch, mountPath: /scratch}}]}}]
  volumes:
  - name: scratch
    ephemeral: {{volumeClaimTemplate: {{spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 10Mi}}}}}}}}}}
"#
        )),
    );
    wait_for(&site, "scratchy running", Duration::from_secs(90), || {
        running(&site, "scratchy")
    });
    assert_eq!(
        field(
            &site,
            &["get", "pvc", "scratchy-scratch"],
            ".metadata.ownerReferences[0].name"
        ),
        "scratchy"
    );
    assert_eq!(
        site.ok(&["exec", "scratchy", "--", "cat", "/scratch/f"]),
        "x\n"
    );
    site.ok(&["delete", "pod", "scratchy", "--grace-period=1"]);
    wait_for(
        &site,
        "the ephemeral claim to go",
        Duration::from_secs(60),
        || {
            site.kubectl(&["get", "pvc", "scratchy-scratch"])
                .is_ok_and(|o| !o.status.success())
        },
    );

    // What local-path cannot give, and a class that does not exist: Pending with an Event.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: shared}\nspec: {accessModes: [ReadWriteMany], resources: {requests: {storage: 1Gi}}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: gold}\nspec: {storageClassName: gold, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n",
        ),
    );
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&pod("sharer", "").replace("claimName: data", "claimName: shared")),
    );
    wait_for(
        &site,
        "the ReadWriteMany refusal",
        Duration::from_secs(30),
        || {
            site.ok(&["describe", "pvc", "shared"])
                .contains("ReadWriteMany")
        },
    );
    wait_for(&site, "the unknown class", Duration::from_secs(30), || {
        site.ok(&["describe", "pvc", "gold"])
            .contains("storageclass.storage.k8s.io \"gold\" not found")
    });
    let gold: Value = site.json(&["get", "pvc", "gold", "-o", "json"]);
    assert_eq!(gold["status"]["phase"], "Pending");

    // More than any node has free: no node is chosen, with upstream's capacity reason.
    let free: i64 = field(
        &site,
        &["get", "node", "edge-1"],
        ".metadata.annotations.edgesite\\.io/local-storage-free",
    )
    .parse()
    .unwrap_or_else(|_| panic!("edge-1 published no free storage"));
    assert!(free > 0);
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: huge}\nspec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Pi}}}\n",
        ),
    );
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&pod("hoarder", "").replace("claimName: data", "claimName: huge")),
    );
    wait_for(
        &site,
        "the capacity refusal",
        Duration::from_secs(30),
        || {
            site.ok(&["describe", "pod", "hoarder"])
                .contains("node(s) did not have enough free storage")
        },
    );
    assert_eq!(
        field(&site, &["get", "pvc", "huge"], ".status.phase"),
        "Pending"
    );
}

#[test]
fn a_pod_with_a_claim_comes_back_with_its_data_after_an_offline_reboot() {
    let mut rt = Runtime::start().unwrap();
    let site = Site::start_with(&[&format!("--cluster-cidr={}", rt.cluster_cidr())]).unwrap();
    let link = tests::link::Link::start(site.port).unwrap();
    let mut agent = rt
        .start_agent_via(&site, "edge-1", &link.url(), &[])
        .unwrap();
    wait_for(&site, "edge-1 Ready", Duration::from_secs(40), || {
        node_ready(&site, "edge-1")
    });
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 10Mi}}}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: logger}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: c, image: {BUSYBOX}, imagePullPolicy: Never, command: ["sh", "-c", "echo start >> /data/starts; sleep 3600"], volumeMounts: [{{name: d, mountPath: /data}}]}}]
  volumes: [{{name: d, persistentVolumeClaim: {{claimName: data}}}}]
"#
        )),
    );
    wait_for(&site, "logger running", Duration::from_secs(90), || {
        running(&site, "logger")
    });
    let volume = field(&site, &["get", "pvc", "data"], ".spec.volumeName");
    let path = field(&site, &["get", "pv", &volume], ".spec.hostPath.path");
    assert!(
        path.starts_with(&agent.dir.path().join("data/storage").display().to_string()),
        "{path}"
    );
    let starts = format!("{path}/starts");
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&starts).is_ok_and(|s| s == "start\n")
    }));

    // The cable is pulled, then the power; the machine comes back without the site.
    link.cut();
    agent.kill();
    rt.reboot(&agent).unwrap();
    agent.launch().unwrap();
    assert!(
        eventually(Duration::from_secs(90), || {
            std::fs::read_to_string(&starts).is_ok_and(|s| s == "start\nstart\n")
        }),
        "the pod did not start again on its volume offline: {:?}\n{}",
        std::fs::read_to_string(&starts),
        agent.log()
    );
    // Back online: the data is what the pod sees.
    link.restore();
    wait_for(
        &site,
        "logger reachable again",
        Duration::from_secs(90),
        || {
            site.kubectl(&["exec", "logger", "--", "cat", "/data/starts"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "start\nstart\n")
        },
    );
}
