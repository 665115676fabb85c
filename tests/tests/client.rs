//! kube-rs against a real `edgesite server`: informers stay in sync, acknowledged writes survive
//! SIGKILL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tests::Site;

fn cm(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("v".to_string(), value.to_string())])),
        ..ConfigMap::default()
    }
}

/// What the server has: name -> data value.
async fn server_state(api: &Api<ConfigMap>) -> BTreeMap<String, String> {
    api.list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|c| {
            (
                c.metadata.name.unwrap_or_default(),
                c.data.and_then(|d| d.get("v").cloned()).unwrap_or_default(),
            )
        })
        .collect()
}

fn store_state(store: &reflector::Store<ConfigMap>) -> BTreeMap<String, String> {
    store
        .state()
        .iter()
        .map(|c| {
            (
                c.metadata.name.clone().unwrap_or_default(),
                c.data
                    .as_ref()
                    .and_then(|d| d.get("v").cloned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

async fn wait_in_sync(
    api: &Api<ConfigMap>,
    store: &reflector::Store<ConfigMap>,
    timeout: Duration,
) {
    let start = Instant::now();
    loop {
        let want = server_state(api).await;
        let have = store_state(store);
        if want == have {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "reflector out of sync after {timeout:?}: server has {} objects, store {}",
            want.len(),
            have.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A ConfigMap reflector over `api`, driven by a task, returned once it has listed.
async fn start_reflector(
    api: &Api<ConfigMap>,
) -> (reflector::Store<ConfigMap>, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let driver = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {}
    });
    store.wait_until_ready().await.unwrap();
    (store, driver)
}

/// Creates, updates and deletes: `count` writes in all.
async fn churn(api: &Api<ConfigMap>, prefix: &str, count: usize) {
    let mut written = 0;
    let mut round = 0;
    while written < count {
        let name = format!("{prefix}-{}", round % 150);
        match api.get_opt(&name).await.expect("get") {
            None => {
                api.create(&PostParams::default(), &cm(&name, &round.to_string()))
                    .await
                    .expect("create");
            }
            Some(_) if round % 7 == 0 => {
                api.delete(&name, &DeleteParams::default())
                    .await
                    .expect("delete");
            }
            Some(mut existing) => {
                existing.data = Some(BTreeMap::from([("v".to_string(), round.to_string())]));
                api.replace(&name, &PostParams::default(), &existing)
                    .await
                    .expect("replace");
            }
        }
        written += 1;
        round += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_stays_in_sync_across_writes_and_a_restart() {
    let mut site = Site::start().unwrap();
    let client = site.client().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let (store, driver) = start_reflector(&api).await;

    churn(&api, "a", 1000).await;
    wait_in_sync(&api, &store, Duration::from_secs(30)).await;

    // Restart the server on the same data dir and port; the watcher reconnects by itself.
    let _site = tokio::task::spawn_blocking(move || {
        site.stop();
        site.launch().unwrap();
        site
    })
    .await
    .unwrap();

    churn(&api, "b", 300).await;
    wait_in_sync(&api, &store, Duration::from_secs(60)).await;
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let mut site = Site::start().unwrap();
    let client = site.client().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..16 {
        let api = api.clone();
        let acknowledged = acknowledged.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                match api.create(&PostParams::default(), &cm(&name, "x")).await {
                    Ok(_) => acknowledged.lock().unwrap().push(name),
                    Err(_) => return,
                }
                i += 1;
            }
        }));
    }
    // Let the storm run, then cut the power.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let pid = site.pid().unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked: Vec<String> = acknowledged.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the write storm wrote too little to mean anything: {}",
        acked.len()
    );

    let site = tokio::task::spawn_blocking(move || {
        site.kill();
        site.launch().unwrap();
        site
    })
    .await
    .unwrap();
    let client = site.client().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let list = api.list(&ListParams::default()).await.unwrap();
    let present: std::collections::BTreeSet<String> = list
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost after SIGKILL, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // The store is consistent and revisions keep increasing.
    let before: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    let created = api
        .create(&PostParams::default(), &cm("after-restart", "y"))
        .await
        .unwrap();
    let after: u64 = created.metadata.resource_version.unwrap().parse().unwrap();
    assert!(after > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_to_one_object_all_land() {
    let site = Site::start().unwrap();
    let client = site.client().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("shared", "0"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let patch = serde_json::json!({"data": {format!("k{i}"): i.to_string()}});
            api.patch(
                "shared",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("a patch failed instead of being retried");
    }
    let shared = api.get("shared").await.unwrap();
    let data = shared.data.unwrap();
    for i in 0..32 {
        assert_eq!(
            data.get(&format!("k{i}")).map(String::as_str),
            Some(i.to_string().as_str()),
            "update k{i} lost"
        );
    }
    // A client that pins a stale resourceVersion gets a Conflict instead of a silent overwrite.
    let mut stale = api.get("shared").await.unwrap();
    api.patch(
        "shared",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"data": {"x": "1"}})),
    )
    .await
    .unwrap();
    stale.data = Some(BTreeMap::from([("v".to_string(), "stale".to_string())]));
    let err = api
        .replace("shared", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 409),
        other => panic!("expected a 409, got {other}"),
    }
}

/// `replace` of a Scale that names no resourceVersion is unconditional, as upstream: writes
/// racing it (status, labels) make the server try again, not answer 409 (lightkube's scale
/// replace failed so once). A stale resourceVersion still gets 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_replaces_without_a_resource_version_survive_concurrent_writes() {
    use k8s_openapi::api::apps::v1::Deployment;
    let site = Site::start().unwrap();
    let client = site.client().await.unwrap();
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "racy"},
        "spec": {"selector": {"matchLabels": {"app": "racy"}},
                 "template": {"metadata": {"labels": {"app": "racy"}},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let scale = |replicas: i32, rv: Option<&str>| {
        let mut metadata = serde_json::json!({"name": "racy", "namespace": "default"});
        if let Some(rv) = rv {
            metadata["resourceVersion"] = rv.into();
        }
        serde_json::from_value::<k8s_openapi::api::autoscaling::v1::Scale>(serde_json::json!({
            "metadata": metadata, "spec": {"replicas": replicas}
        }))
        .unwrap()
    };
    let mut tasks = Vec::new();
    for i in 0..24 {
        let api = api.clone();
        let body = scale(i % 4, None);
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                api.replace_scale("racy", &PostParams::default(), &body)
                    .await
                    .map(|_| ())
            } else {
                let patch = serde_json::json!({"metadata": {"labels": {format!("k{i}"): "v"}}});
                api.patch(
                    "racy",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map(|_| ())
            }
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("a write failed instead of being retried");
    }
    let err = api
        .replace_scale("racy", &PostParams::default(), &scale(5, Some("1")))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 409),
        other => panic!("expected a 409, got {other}"),
    }
}

/// Components inside `edgesite server` use a kube client on the router itself: no socket, no
/// TLS, and the same request path as a remote client (ARCHITECTURE.md, principle 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_client_runs_the_same_code_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = apiserver_lite::server::prepare_store(
        &dir.path().join("state.db").as_path().into(),
        1024,
        Default::default(),
        Default::default(),
        None,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let client = kube::Client::new(
        apiserver_lite::http::in_process(server, apiserver_lite::auth::Identity::loopback()),
        "default",
    );
    // Discovery, as controllers' dynamic clients use it.
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    assert!(discovery.groups().any(|g| g.name() == "apps"));
    // An informer and writes through the same service.
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let (store, driver) = start_reflector(&api).await;
    churn(&api, "in", 200).await;
    wait_in_sync(&api, &store, Duration::from_secs(20)).await;
    driver.abort();
    // Errors are the same Statuses a remote client gets.
    match api.get("nope").await.unwrap_err() {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.message, "configmaps \"nope\" not found");
        }
        other => panic!("expected a 404 Status, got {other}"),
    }
}

/// Two servers sharing a datastore: only one leads; when it stops, the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_candidate_leads_and_the_other_takes_over() {
    use controllers::leader;
    let dir = tempfile::tempdir().unwrap();
    let server = apiserver_lite::server::prepare_store(
        &dir.path().join("state.db").as_path().into(),
        1024,
        Default::default(),
        Default::default(),
        None,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let client = kube::Client::new(
        apiserver_lite::http::in_process(server, apiserver_lite::auth::Identity::loopback()),
        "default",
    );
    let config = |who: &str| leader::Config {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(200),
        ..leader::Config::new("kube-system", "test-lease", who)
    };
    let stop_a = tokio_util::sync::CancellationToken::new();
    let a = leader::lead(client.clone(), config("a"), stop_a.clone())
        .await
        .expect("a leads");
    let stop_b = tokio_util::sync::CancellationToken::new();
    let b = tokio::spawn(leader::lead(client.clone(), config("b"), stop_b.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!b.is_finished(), "b must not lead while a renews");
    assert!(!a.is_cancelled());
    // a stops (its server went away): b takes over once the lease expires.
    stop_a.cancel();
    let started = Instant::now();
    let b_leading = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("b leads in time")
        .unwrap()
        .expect("b leads");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "not before the lease expired"
    );
    assert!(!b_leading.is_cancelled());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-system");
    let lease = leases.get("test-lease").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("b"));
    assert_eq!(lease.lease_transitions, Some(1));
    stop_b.cancel();
}

/// kube-rs's metadata calls and `metadata_watcher` (operators' garbage collectors use them) get
/// PartialObjectMetadata, not whole objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_only_gets_lists_and_watches() {
    let site = Site::start().expect("start site");
    let client = site.client().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(
        &PostParams::default(),
        &cm("meta-1", "x".repeat(1000).as_str()),
    )
    .await
    .unwrap();
    let one = api.get_metadata("meta-1").await.unwrap();
    assert_eq!(one.metadata.name.as_deref(), Some("meta-1"));
    let types = one.types.clone().expect("kind and apiVersion");
    assert_eq!(
        (types.kind.as_str(), types.api_version.as_str()),
        ("PartialObjectMetadata", "meta.k8s.io/v1")
    );
    let list = api.list_metadata(&ListParams::default()).await.unwrap();
    assert!(
        list.items
            .iter()
            .any(|m| m.metadata.name.as_deref() == Some("meta-1"))
    );
    // A metadata watcher (an `Api` of PartialObjectMeta asks for metadata only) sees a new
    // object arrive with its metadata only.
    let metadata: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::namespaced(client, "default");
    let mut events = watcher(metadata, watcher::Config::default())
        .applied_objects()
        .boxed();
    let created = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.create(&PostParams::default(), &cm("meta-2", "y"))
            .await
            .unwrap();
    };
    let seen = async {
        loop {
            let m = events.next().await.expect("stream").expect("event");
            if m.metadata.name.as_deref() == Some("meta-2") {
                return m;
            }
        }
    };
    let (_, seen) = tokio::join!(created, tokio::time::timeout(Duration::from_secs(20), seen));
    let seen = seen.expect("meta-2 through the metadata watcher");
    assert_eq!(
        seen.types.map(|t| t.kind).as_deref(),
        Some("PartialObjectMetadata")
    );
}

/// Every served group version has its APIService, as kube-aggregator keeps them upstream; kube-rs
/// discovers the apiregistration group; a CRD's group version gets one and loses it with the CRD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_services_follow_the_served_group_versions() {
    let site = Site::start().expect("start site");
    let client = site.client().await.unwrap();
    let group = kube::discovery::oneshot::group(&client, "apiregistration.k8s.io")
        .await
        .expect("the apiregistration group");
    assert!(
        group
            .recommended_resources()
            .iter()
            .any(|(r, _)| r.kind == "APIService"),
        "{:?}",
        group.recommended_resources()
    );
    let out = site.ok(&["get", "apiservices"]);
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "SERVICE", "AVAILABLE", "AGE"], "{out}");
    for name in ["v1.", "v1.apps", "v1beta1.devices.kubeedge.io"] {
        assert!(
            rows.iter().any(|r| r.first() == Some(&name)
                && r.get(1) == Some(&"Local")
                && r.get(2) == Some(&"True")),
            "{name}: {out}"
        );
    }
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.shop.example}
spec:
  group: shop.example
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object}}
",
        ),
    );
    let has = |present: bool| {
        tests::eventually(Duration::from_secs(20), || {
            site.kubectl(&["get", "apiservice", "v1.shop.example"])
                .is_ok_and(|o| o.status.success() == present)
        })
    };
    assert!(has(true), "{}", site.ok(&["get", "apiservices"]));
    site.ok(&["delete", "crd", "widgets.shop.example"]);
    assert!(has(false), "{}", site.ok(&["get", "apiservices"]));
}

/// kube-rs's own `fetch_fails` (kube-client 5.0.0): fetching a Service as a Pod fails at the
/// column just after `{"kind":"Service"`, as against upstream, whose objects start with
/// `kind` then `apiVersion`; the same order in lists and watch events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_start_with_kind_then_api_version() {
    use k8s_openapi::api::core::v1::Pod;
    let site = Site::start().expect("start site");
    let client = site.client().await.unwrap();
    // What its `Client::fetch` (behind kube's unstable-client feature) does for this reference.
    let request = http::Request::get("/api/v1/namespaces/default/services/kubernetes")
        .body(Vec::new())
        .unwrap();
    let err = client.request::<Pod>(request).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Error deserializing response: invalid value: string \"Service\", expected Pod at line 1 column 17"
    );
    // Lists' items and watch events too (raw text from the store, and parsed objects).
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), &cm("ordered", "1"))
        .await
        .unwrap();
    let list = site.ok(&["get", "--raw", "/api/v1/namespaces/default/configmaps"]);
    assert!(
        list.starts_with(r#"{"kind":"ConfigMapList","apiVersion":"v1""#)
            && list.contains(r#"[{"kind":"ConfigMap","apiVersion":"v1","data""#),
        "{list}"
    );
    let watched = site.ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1&labelSelector=!absent",
    ]);
    assert!(
        watched.starts_with(r#"{"type":"ADDED","object":{"kind":"ConfigMap","apiVersion":"v1""#),
        "{watched}"
    );
}

/// `Accept: application/vnd.kubernetes.protobuf` alone (client-go's default for core
/// components) answers protobuf, read here with k8s-pb (prost types generated from upstream's
/// .proto files): get, list, create, a watch stream's frames; custom resources get 406.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_only_clients_get_protobuf() {
    use k8s_pb::api::apps::v1::Deployment as PbDeployment;
    use k8s_pb::api::core::v1::{ConfigMap as PbConfigMap, ConfigMapList as PbConfigMapList};
    use k8s_pb::apimachinery::pkg::apis::meta::v1::WatchEvent;
    use k8s_pb::apimachinery::pkg::runtime::{RawExtension, Unknown};
    use prost::Message;
    let site = Site::start().expect("start site");
    let client = site.client().await.unwrap();
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: pb, labels: {app: pb}}\nspec:\n  replicas: 0\n  selector: {matchLabels: {app: pb}}\n  strategy: {rollingUpdate: {maxSurge: 25%, maxUnavailable: 1}}\n  template:\n    metadata: {labels: {app: pb}}\n    spec: {containers: [{name: c, image: busybox, resources: {limits: {cpu: 500m}}}]}\n"),
    );
    let get = |path: &str| {
        let client = client.clone();
        let request = http::Request::get(path)
            .header("Accept", "application/vnd.kubernetes.protobuf")
            .body(Vec::new())
            .unwrap();
        async move {
            let response = client
                .send(request.map(kube::client::Body::from))
                .await
                .unwrap();
            let status = response.status();
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            (status, content_type, body)
        }
    };
    let unwrap = |body: &[u8]| -> Unknown {
        let rest = body.strip_prefix(b"k8s\x00").expect("the protobuf magic");
        Unknown::decode(rest).expect("a runtime.Unknown")
    };
    let (status, content_type, body) = get("/apis/apps/v1/namespaces/default/deployments/pb").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/vnd.kubernetes.protobuf");
    let envelope = unwrap(&body);
    let type_meta = envelope.type_meta.clone().unwrap();
    assert_eq!(
        (type_meta.api_version(), type_meta.kind()),
        ("apps/v1", "Deployment")
    );
    let deployment = PbDeployment::decode(envelope.raw()).unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(deployment.metadata.as_ref().unwrap().name(), "pb");
    assert_eq!(spec.replicas, Some(0));
    let surge = spec
        .strategy
        .unwrap()
        .rolling_update
        .unwrap()
        .max_surge
        .unwrap();
    assert_eq!((surge.r#type(), surge.str_val()), (1, "25%"));
    let container = &spec.template.unwrap().spec.unwrap().containers[0];
    assert_eq!(container.image(), "busybox");
    assert_eq!(
        container.resources.as_ref().unwrap().limits["cpu"].string(),
        "500m"
    );
    assert!(
        deployment
            .metadata
            .unwrap()
            .creation_timestamp
            .unwrap()
            .seconds()
            > 0
    );

    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), &cm("pb-cm", "x"))
        .await
        .unwrap();
    let (status, _, body) = get("/api/v1/namespaces/default/configmaps").await;
    assert_eq!(status, 200);
    let list = PbConfigMapList::decode(unwrap(&body).raw()).unwrap();
    let names: Vec<&str> = list
        .items
        .iter()
        .map(|c| c.metadata.as_ref().unwrap().name())
        .collect();
    assert!(names.contains(&"pb-cm"), "{names:?}");
    assert!(!list.metadata.unwrap().resource_version().is_empty());

    // A watch: length-prefixed WatchEvents, each object enveloped.
    let (status, content_type, body) = get(
        "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1&fieldSelector=metadata.name%3Dpb-cm",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        content_type,
        "application/vnd.kubernetes.protobuf;stream=watch"
    );
    let length = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
    let event = WatchEvent::decode(&body[4..4 + length]).unwrap();
    assert_eq!(event.r#type(), "ADDED");
    let raw: &RawExtension = event.object.as_ref().unwrap();
    let object = unwrap(raw.raw());
    let watched = PbConfigMap::decode(object.raw()).unwrap();
    assert_eq!(watched.data["v"], "x");

    // Custom resources have no protobuf form.
    let (status, _, _) = get("/apis/devices.kubeedge.io/v1beta1/namespaces/default/devices").await;
    assert_eq!(status, 406);
    // Clients that also accept JSON get JSON.
    let request = http::Request::get("/api/v1/namespaces/default/configmaps/pb-cm")
        .header(
            "Accept",
            "application/vnd.kubernetes.protobuf, application/json",
        )
        .body(Vec::new())
        .unwrap();
    let text = client.request_text(request).await.unwrap();
    assert!(text.starts_with(r#"{"kind":"ConfigMap""#), "{text}");
}

/// Two of kube-rs's own needs-cluster tests (kube-client 5.0.0) that failed on a site:
/// `create_token_request` (a TokenReview for other audiences answers the ones the token is
/// for) and `can_operate_on_pod_metadata` (a metadata patch answers PartialObjectMetadata).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_audiences_and_metadata_patches_answer_as_upstream() {
    use k8s_openapi::api::authentication::v1::{
        TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{Patch, PatchParams};
    use kube::core::PartialObjectMetaExt;
    let site = Site::start().expect("start site");
    let client = site.client().await.unwrap();
    let accounts: Api<ServiceAccount> = Api::default_namespaced(client.clone());
    let mut account = ServiceAccount::default();
    account.metadata.name = Some("audience".into());
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let audiences = vec!["api".to_string(), "vault".to_string()];
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = accounts
        .create_token_request("audience", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |asked: Vec<String>| {
        let reviews = reviews.clone();
        let token = token.clone();
        async move {
            reviews
                .create(
                    &PostParams::default(),
                    &TokenReview {
                        spec: TokenReviewSpec {
                            audiences: Some(asked),
                            token: Some(token),
                        },
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
                .status
                .unwrap()
        }
    };
    let status = review(vec!["api".into(), "elsewhere".into()]).await;
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(status.audiences, Some(vec!["api".to_string()]));
    assert_eq!(
        status.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:default:audience")
    );
    let status = review(vec!["elsewhere".into()]).await;
    assert_ne!(status.authenticated, Some(true));

    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), &cm("meta", "1"))
        .await
        .unwrap();
    let patch = kube::api::ObjectMeta {
        annotations: Some([("test".to_string(), "123".to_string())].into()),
        ..Default::default()
    }
    .into_request_partial::<ConfigMap>();
    let patched = api
        .patch_metadata("meta", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let types = patched.types.unwrap();
    assert_eq!(
        (types.kind.as_str(), types.api_version.as_str()),
        ("PartialObjectMetadata", "meta.k8s.io/v1")
    );
    assert_eq!(
        patched
            .metadata
            .annotations
            .unwrap()
            .get("test")
            .map(String::as_str),
        Some("123")
    );
}
