//! Authorization end to end, with the real kubectl and the Python client: users made with
//! `edgesite kubeconfig`, RBAC's bootstrap roles (`view`, `edit`, `admin`) and aggregation,
//! escalation prevention, `kubectl auth can-i` / `whoami`, impersonation, and the Node
//! authorizer deciding for node credentials.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tests::{Site, edgesite_bin, eventually, kubectl_bin};

/// A kubeconfig for `user` (in `groups`), written by `edgesite kubeconfig`.
fn user_kubeconfig(site: &Site, user: &str, groups: &[&str]) -> PathBuf {
    let path = site.data_dir().join(format!("{user}.kubeconfig"));
    let mut cmd = Command::new(edgesite_bin());
    cmd.args(["kubeconfig", "--user", user, "--output"])
        .arg(&path)
        .arg("--data-dir")
        .arg(site.data_dir());
    for g in groups {
        cmd.args(["--group", g]);
    }
    let out = cmd.output().expect("run edgesite kubeconfig");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(kubeconfig.with_extension("cache"))
        .args(args)
        .output()
        .expect("run kubectl")
}

fn ok_as(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl_as(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_as(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl_as(kubeconfig, args);
    assert!(
        !out.status.success(),
        "kubectl {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn can_i(kubeconfig: &Path, args: &[&str]) -> String {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    // can-i exits 1 for "no": only its answer matters here.
    String::from_utf8_lossy(&kubectl_as(kubeconfig, &all).stdout)
        .trim()
        .to_string()
}

#[test]
fn users_get_what_their_roles_grant_and_no_more() {
    let site = Site::start().unwrap();
    for ns in ["dev", "prod"] {
        site.ok(&["create", "namespace", ns]);
        site.ok(&[
            "create",
            "configmap",
            "settings",
            "-n",
            ns,
            "--from-literal=k=v",
        ]);
    }
    site.ok(&[
        "create",
        "secret",
        "generic",
        "db",
        "-n",
        "dev",
        "--from-literal=pw=x",
    ]);

    // view in one namespace: reads there, Forbidden elsewhere, no Secrets, no exec.
    let jane = user_kubeconfig(&site, "jane", &["qa"]);
    let denied = fails_as(&jane, &["get", "configmaps", "-n", "dev"]);
    assert!(
        denied.contains(
            "configmaps is forbidden: User \"jane\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"dev\""
        ),
        "{denied}"
    );
    site.ok(&[
        "create",
        "rolebinding",
        "jane-view",
        "--clusterrole=view",
        "--user=jane",
        "-n",
        "dev",
    ]);
    assert!(eventually(Duration::from_secs(10), || kubectl_as(
        &jane,
        &["get", "configmaps", "-n", "dev"]
    )
    .status
    .success()));
    assert!(
        ok_as(
            &jane,
            &["get", "configmap", "settings", "-n", "dev", "-o", "name"]
        )
        .contains("configmap/settings")
    );
    let prod = fails_as(&jane, &["get", "configmap", "settings", "-n", "prod"]);
    assert!(
        prod.contains("configmaps \"settings\" is forbidden: User \"jane\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"prod\""),
        "{prod}"
    );
    let secret = fails_as(&jane, &["get", "secret", "db", "-n", "dev"]);
    assert!(secret.contains("secrets \"db\" is forbidden"), "{secret}");
    assert_eq!(can_i(&jane, &["list", "pods", "-n", "dev"]), "yes");
    assert_eq!(can_i(&jane, &["list", "pods", "-n", "prod"]), "no");
    assert_eq!(can_i(&jane, &["create", "pods", "-n", "dev"]), "no");
    assert_eq!(can_i(&jane, &["create", "pods/exec", "-n", "dev"]), "no");
    assert_eq!(can_i(&jane, &["get", "secrets", "-n", "dev"]), "no");
    let exec = fails_as(
        &jane,
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/dev/pods/p/exec?command=true",
        ],
    );
    assert!(
        exec.contains("Forbidden") || exec.contains("forbidden"),
        "{exec}"
    );
    let listed = ok_as(&jane, &["auth", "can-i", "--list", "-n", "dev"]);
    assert!(listed.contains("configmaps"), "{listed}");
    assert!(!listed.contains("secrets "), "{listed}");
    let whoami = ok_as(&jane, &["auth", "whoami", "-o", "json"]);
    let whoami: serde_json::Value = serde_json::from_str(&whoami).unwrap();
    assert_eq!(whoami["status"]["userInfo"]["username"], "jane");
    assert_eq!(
        whoami["status"]["userInfo"]["groups"],
        serde_json::json!(["qa", "system:authenticated"])
    );

    // edit: writes workloads and reads Secrets, but grants nothing.
    let bob = user_kubeconfig(&site, "bob", &[]);
    site.ok(&[
        "create",
        "rolebinding",
        "bob-edit",
        "--clusterrole=edit",
        "--user=bob",
        "-n",
        "dev",
    ]);
    assert!(eventually(Duration::from_secs(10), || kubectl_as(
        &bob,
        &["get", "secret", "db", "-n", "dev"]
    )
    .status
    .success()));
    ok_as(
        &bob,
        &[
            "create",
            "deployment",
            "web",
            "--image=example.invalid/web:1",
            "-n",
            "dev",
        ],
    );
    ok_as(
        &bob,
        &["scale", "deployment", "web", "--replicas=0", "-n", "dev"],
    );
    assert_eq!(can_i(&bob, &["create", "pods/exec", "-n", "dev"]), "yes");
    let grant = fails_as(
        &bob,
        &[
            "create",
            "rolebinding",
            "x",
            "--clusterrole=view",
            "--user=eve",
            "-n",
            "dev",
        ],
    );
    assert!(grant.contains("rolebindings.rbac.authorization.k8s.io is forbidden: User \"bob\" cannot create resource \"rolebindings\""), "{grant}");

    // admin: grants what it holds in its namespace, nothing more.
    let carol = user_kubeconfig(&site, "carol", &[]);
    site.ok(&[
        "create",
        "rolebinding",
        "carol-admin",
        "--clusterrole=admin",
        "--user=carol",
        "-n",
        "dev",
    ]);
    assert!(eventually(Duration::from_secs(10), || kubectl_as(
        &carol,
        &[
            "create",
            "rolebinding",
            "eve-view",
            "--clusterrole=view",
            "--user=eve",
            "-n",
            "dev"
        ]
    )
    .status
    .success()));
    let escalation = fails_as(
        &carol,
        &[
            "create",
            "rolebinding",
            "eve-admin",
            "--clusterrole=cluster-admin",
            "--user=eve",
            "-n",
            "dev",
        ],
    );
    assert!(
        escalation.contains("rolebindings.rbac.authorization.k8s.io \"eve-admin\" is forbidden: user \"carol\" (groups=[\"system:authenticated\"]) is attempting to grant RBAC permissions not currently held:"),
        "{escalation}"
    );
    let role = fails_as(
        &carol,
        &[
            "create",
            "role",
            "nodes",
            "--verb=get",
            "--resource=nodes",
            "-n",
            "dev",
        ],
    );
    assert!(
        role.contains("is attempting to grant RBAC permissions not currently held"),
        "{role}"
    );
    ok_as(
        &carol,
        &[
            "create",
            "role",
            "cm-reader",
            "--verb=get",
            "--resource=configmaps",
            "-n",
            "dev",
        ],
    );
    let cluster = fails_as(&carol, &["get", "nodes"]);
    assert!(cluster.contains("at the cluster scope"), "{cluster}");

    // A binding's roleRef cannot change.
    let moved = site.fails(
        &[
            "patch",
            "rolebinding",
            "jane-view",
            "-n",
            "dev",
            "--type=merge",
            "-p",
            r#"{"roleRef":{"name":"edit"}}"#,
        ],
        None,
    );
    assert!(moved.contains("cannot change roleRef"), "{moved}");

    // A CRD's roles aggregate into view.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: widget-viewer
  labels: {rbac.authorization.k8s.io/aggregate-to-view: "true"}
rules:
- {apiGroups: [example.com], resources: [widgets], verbs: [get, list, watch]}
"#,
        ),
    );
    assert!(eventually(Duration::from_secs(20), || can_i(
        &jane,
        &["list", "widgets.example.com", "-n", "dev"]
    ) == "yes"));
    let view = site.json(&["get", "clusterrole", "view", "-o", "json"]);
    assert!(view.to_string().contains("widgets"), "{view}");

    // Impersonation: the admin may, jane may not.
    assert!(
        site.ok(&[
            "get",
            "configmaps",
            "-n",
            "dev",
            "--as",
            "jane",
            "-o",
            "name"
        ])
        .contains("configmap/settings")
    );
    let as_prod = site.fails(&["get", "configmaps", "-n", "prod", "--as", "jane"], None);
    assert!(
        as_prod.contains("User \"jane\" cannot list resource \"configmaps\""),
        "{as_prod}"
    );
    let whoami = site.json(&[
        "auth",
        "whoami",
        "--as",
        "jane",
        "--as-group",
        "qa",
        "-o",
        "json",
    ]);
    assert_eq!(whoami["status"]["userInfo"]["username"], "jane");
    let impersonate = fails_as(&jane, &["get", "configmaps", "-n", "dev", "--as", "bob"]);
    assert!(
        impersonate.contains("users \"bob\" is forbidden: User \"jane\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"),
        "{impersonate}"
    );
    assert_eq!(
        site.ok(&[
            "auth", "can-i", "get", "secrets", "-n", "dev", "--as", "bob"
        ])
        .trim(),
        "yes"
    );
    assert_eq!(can_i(&bob, &["get", "secrets", "-n", "prod"]), "no");
}

#[test]
fn service_account_tokens_and_the_python_client_see_rbac() {
    let python = tests::python();
    let site = Site::start().unwrap();
    site.ok(&["create", "namespace", "ci"]);
    site.ok(&["create", "serviceaccount", "runner", "-n", "ci"]);
    site.ok(&[
        "create",
        "rolebinding",
        "runner-view",
        "--clusterrole=view",
        "--serviceaccount=ci:runner",
        "-n",
        "ci",
    ]);
    let token = site
        .ok(&["create", "token", "runner", "-n", "ci"])
        .trim()
        .to_string();
    let ca = site.data_dir().join("server").join("tls").join("ca.crt");
    let script = r#"
import sys, kubernetes
from kubernetes.client.rest import ApiException
c = kubernetes.client.Configuration()
c.host, c.api_key, c.ssl_ca_cert = sys.argv[1], {"authorization": "Bearer " + sys.argv[2]}, sys.argv[3]
api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(c))
print("listed", len(api.list_namespaced_config_map("ci").items))
try:
    api.list_namespaced_config_map("default")
    print("unexpected: allowed")
except ApiException as e:
    print("status", e.status, e.reason)
    print(e.body)
"#;
    // The Python client with `token`: lists ConfigMaps in ci, then tries default.
    let run_python = |token: &str| {
        Command::new(&python)
            .args([
                "-c",
                script,
                &format!("https://127.0.0.1:{}", site.port),
                token,
            ])
            .arg(&ca)
            .output()
            .expect("run python")
    };
    let mut ok = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let out = run_python(&token);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let done = text.contains("listed");
            ok = Some((text, String::from_utf8_lossy(&out.stderr).into_owned()));
            done
        }),
        "{ok:?}"
    );
    let (text, _) = ok.unwrap();
    assert!(text.contains("status 403"), "{text}");
    assert!(
        text.contains("configmaps is forbidden: User \\\"system:serviceaccount:ci:runner\\\" cannot list resource \\\"configmaps\\\" in API group \\\"\\\" in the namespace \\\"default\\\""),
        "{text}"
    );
    // TokenReview says who the token is.
    let review = site.ok_stdin(
        &["create", "--raw", "/apis/authentication.k8s.io/v1/tokenreviews", "-f", "-"],
        Some(&format!(
            r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{{"token":"{token}"}}}}"#
        )),
    );
    let review: serde_json::Value = serde_json::from_str(&review).unwrap();
    assert_eq!(review["status"]["authenticated"], true);
    assert_eq!(
        review["status"]["user"]["username"],
        "system:serviceaccount:ci:runner"
    );
    // A token bound to a pod dies with the pod.
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"holder","namespace":"ci"},"spec":{"serviceAccountName":"runner","containers":[{"name":"c","image":"example.invalid/x:1"}]}}"#),
    );
    let bound = site
        .ok(&[
            "create",
            "token",
            "runner",
            "-n",
            "ci",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "holder",
        ])
        .trim()
        .to_string();
    let with_token = |token: &str| {
        site.kubectl_as(
            &[format!("--token={token}")],
            &["get", "configmaps", "-n", "ci", "-o", "name"],
        )
    };
    let ok = with_token(&bound);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    site.ok(&[
        "delete",
        "pod",
        "holder",
        "-n",
        "ci",
        "--grace-period=0",
        "--force",
    ]);
    let gone = with_token(&bound);
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    // A token that is not one: 401.
    let forged = with_token(&(token.clone() + "x"));
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    // The account is deleted: its tokens stop working.
    site.ok(&["delete", "serviceaccount", "runner", "-n", "ci"]);
    let out = run_python(&token);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("401") || text.contains("Unauthorized"),
        "{text}"
    );
}

#[test]
fn a_node_credential_reaches_only_its_own_pods_objects() {
    // Node identities by token, so no containers are needed: the Node authorizer decides by the
    // pods bound to each node.
    let site = Site::start_prepared(&["--disable-agent"], |dir| {
        std::fs::create_dir_all(dir.join("server"))?;
        std::fs::write(
            dir.join("server").join("token-auth.csv"),
            "node-a-token,system:node:node-a,a,\"system:nodes\"\nnode-b-token,system:node:node-b,b,\"system:nodes\"\n",
        )?;
        Ok(())
    })
    .unwrap();
    let as_node = |token: &str, args: &[&str]| site.kubectl_as(&[format!("--token={token}")], args);
    site.ok(&["create", "namespace", "shop"]);
    site.ok(&[
        "create",
        "secret",
        "generic",
        "till",
        "-n",
        "shop",
        "--from-literal=k=v",
    ]);
    site.ok(&[
        "create",
        "configmap",
        "menu",
        "-n",
        "shop",
        "--from-literal=k=v",
    ]);
    for node in ["node-a", "node-b"] {
        site.ok_stdin(
            &["apply", "-f", "-"],
            Some(&format!(
                r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}"}}}}"#
            )),
        );
    }
    site.ok_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: register, namespace: shop}
spec:
  nodeName: node-a
  containers:
  - name: c
    image: example.invalid/till:1
    envFrom: [{configMapRef: {name: menu}}]
    volumeMounts: [{name: s, mountPath: /s}]
  volumes: [{name: s, secret: {secretName: till}}]
"#,
        ),
    );
    let out = as_node(
        "node-a-token",
        &["get", "secret", "till", "-n", "shop", "-o", "name"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node(
        "node-a-token",
        &["get", "configmap", "menu", "-n", "shop", "-o", "name"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node("node-b-token", &["get", "secret", "till", "-n", "shop"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secrets \"till\" is forbidden: User \"system:node:node-b\" cannot get resource \"secrets\" in API group \"\" in the namespace \"shop\": no relationship found between node 'node-b' and this object"),
        "{err}"
    );
    // Lists of Secrets or of every pod are not a node's to make.
    assert!(
        !as_node("node-a-token", &["get", "secrets", "-n", "shop"])
            .status
            .success()
    );
    assert!(
        !as_node("node-a-token", &["get", "pods", "-A"])
            .status
            .success()
    );
    let own = as_node(
        "node-a-token",
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=node-a",
            "-o",
            "name",
        ],
    );
    assert!(
        String::from_utf8_lossy(&own.stdout).contains("pod/register"),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    // Its own Node it may label; another node's not, nor restricted labels.
    assert!(
        as_node("node-a-token", &["label", "node", "node-a", "zone=north"])
            .status
            .success()
    );
    let other = as_node(
        "node-b-token",
        &["label", "--overwrite", "node", "node-a", "zone=south"],
    );
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let restricted = as_node(
        "node-a-token",
        &[
            "label",
            "node",
            "node-a",
            "node-restriction.kubernetes.io/tier=gold",
        ],
    );
    assert!(
        String::from_utf8_lossy(&restricted.stderr)
            .contains("is not allowed to modify labels: node-restriction.kubernetes.io/tier"),
        "{}",
        String::from_utf8_lossy(&restricted.stderr)
    );
    // A node creates no pods of its own.
    let pod = as_node(
        "node-a-token",
        &["run", "x", "--image=example.invalid/x:1", "-n", "shop"],
    );
    assert!(
        String::from_utf8_lossy(&pod.stderr).contains("node can only create mirror pods"),
        "{}",
        String::from_utf8_lossy(&pod.stderr)
    );
    // The pod moves to node-b (deleted and made again there): access follows it.
    site.ok(&[
        "delete",
        "pod",
        "register",
        "-n",
        "shop",
        "--grace-period=0",
        "--force",
    ]);
    assert!(eventually(Duration::from_secs(5), || !as_node(
        "node-a-token",
        &["get", "secret", "till", "-n", "shop"]
    )
    .status
    .success()));
    let count = site.ok(&["get", "pods", "-n", "shop", "-o", "name"]);
    assert!(count.trim().is_empty(), "{count}");
}

/// A key and a CSR for `CN=<user>, O=<group>`, made by openssl.
fn openssl_csr(dir: &Path, user: &str, group: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{user}.key"));
    let csr = dir.join(format!("{user}.csr"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
        ])
        .arg(&key)
        .args(["-subj", &format!("/CN={user}/O={group}"), "-out"])
        .arg(&csr)
        .output()
        .expect("openssl is needed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use base64::Engine;
    let pem = std::fs::read(&csr).unwrap();
    (key, base64::engine::general_purpose::STANDARD.encode(pem))
}

fn csr_manifest(name: &str, request: &str) -> String {
    format!(
        r#"{{"apiVersion":"certificates.k8s.io/v1","kind":"CertificateSigningRequest","metadata":{{"name":"{name}"}},
        "spec":{{"request":"{request}","signerName":"kubernetes.io/kube-apiserver-client","expirationSeconds":86400,"usages":["client auth"]}}}}"#
    )
}

#[test]
fn a_colleague_gets_access_through_a_certificate_signing_request() {
    let site = Site::start().unwrap();
    let dir = site.data_dir();
    let (key, request) = openssl_csr(&dir, "dave", "devs");
    site.ok_stdin(
        &["create", "-f", "-"],
        Some(&csr_manifest("dave", &request)),
    );
    // Who asked is recorded from the request's own identity.
    let csr = site.json(&["get", "csr", "dave", "-o", "json"]);
    assert_eq!(csr["spec"]["username"], "admin");
    // Someone with only `view` cannot approve.
    let jane = user_kubeconfig(&site, "jane", &[]);
    site.ok(&[
        "create",
        "clusterrolebinding",
        "jane-view",
        "--clusterrole=view",
        "--user=jane",
    ]);
    let refused = fails_as(&jane, &["certificate", "approve", "dave"]);
    assert!(refused.contains("forbidden"), "{refused}");
    site.ok(&["certificate", "approve", "dave"]);
    let mut certificate = String::new();
    assert!(eventually(Duration::from_secs(15), || {
        certificate = site
            .ok(&["get", "csr", "dave", "-o", "jsonpath={.status.certificate}"])
            .trim()
            .to_string();
        !certificate.is_empty()
    }));
    use base64::Engine;
    let cert = dir.join("dave.crt");
    std::fs::write(
        &cert,
        base64::engine::general_purpose::STANDARD
            .decode(&certificate)
            .unwrap(),
    )
    .unwrap();
    let conditions = site.ok(&[
        "get",
        "csr",
        "dave",
        "-o",
        "jsonpath={.status.conditions[*].type}",
    ]);
    assert_eq!(conditions.trim(), "Approved");
    let dave = [
        format!("--client-certificate={}", cert.display()),
        format!("--client-key={}", key.display()),
    ];
    let as_dave = |args: &[&str]| site.kubectl_as(&dave, args);
    let whoami = as_dave(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username} {.status.userInfo.groups}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "dave [\"devs\",\"system:authenticated\"]",
        "{}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    assert!(
        !as_dave(&["get", "configmaps", "-n", "default"])
            .status
            .success()
    );
    site.ok(&[
        "create",
        "rolebinding",
        "devs-view",
        "--clusterrole=view",
        "--group=devs",
        "-n",
        "default",
    ]);
    assert!(eventually(Duration::from_secs(10), || as_dave(&[
        "get",
        "configmaps",
        "-n",
        "default"
    ])
    .status
    .success()));

    // A denied request gets no certificate; a decision cannot be taken back.
    let (_, request) = openssl_csr(&dir, "eve", "devs");
    site.ok_stdin(&["create", "-f", "-"], Some(&csr_manifest("eve", &request)));
    site.ok(&["certificate", "deny", "eve"]);
    std::thread::sleep(Duration::from_secs(2));
    let eve = site.json(&["get", "csr", "eve", "-o", "json"]);
    assert!(eve["status"]["certificate"].is_null(), "{eve}");
    assert_eq!(eve["status"]["conditions"][0]["type"], "Denied");
    // Nobody gets a system:masters certificate through the API, whoever would approve it.
    let (_, request) = openssl_csr(&dir, "mallory", "system:masters");
    let masters = site.fails(
        &["create", "-f", "-"],
        Some(&csr_manifest("mallory", &request)),
    );
    assert!(
        masters.contains("use of kubernetes.io/kube-apiserver-client signer with system:masters group is not allowed"),
        "{masters}"
    );
    // A request that is not a CSR is refused with the field named.
    let bad = site.fails(
        &["create", "-f", "-"],
        Some(&csr_manifest("bad", "bm90IGEgY3Ny")),
    );
    assert!(bad.contains("spec.request"), "{bad}");
}
