//! etcd as the datastore: the embedded member (`--cluster-init`), a SQLite site moving into it,
//! snapshots and restore, and an external etcd (`--datastore-endpoint`) that goes away. Real
//! etcd (Debian's etcd-server), real kubectl.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::{Site, edgesite_bin, free_port};

/// Names and resourceVersions of the ConfigMaps in `default`, in creation order.
fn configmaps(site: &Site) -> Vec<(String, u64)> {
    let out = site.ok(&[
        "get",
        "configmaps",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.metadata.resourceVersion}{\"\\n\"}{end}",
    ]);
    let mut found: Vec<(String, u64)> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, _)| *n != "kube-root-ca.crt")
        .map(|(n, rv)| (n.to_string(), rv.parse().unwrap()))
        .collect();
    found.sort_by_key(|(_, rv)| *rv);
    found
}

fn embedded(client: u16, peer: u16) -> Vec<String> {
    vec![
        "--disable-agent".into(),
        "--cluster-init".into(),
        format!("--etcd-client-port={client}"),
        format!("--etcd-peer-port={peer}"),
    ]
}

/// K3s's path: a SQLite site restarted with --cluster-init moves its state into the embedded
/// etcd once (every object, in the same order), keeps the old file, and from then on runs on
/// etcd; a snapshot saved while it runs restores every object after a wipe; a damaged snapshot
/// is refused before anything changes.
#[test]
fn a_sqlite_site_moves_into_its_embedded_etcd_and_a_snapshot_brings_everything_back() {
    let mut site = Site::start_with(&[]).unwrap();
    for name in ["first", "second", "third"] {
        site.ok(&["create", "configmap", name, "--from-literal=k=v"]);
    }
    site.ok(&["label", "configmap", "first", "touched=yes"]);
    let before = configmaps(&site);
    assert_eq!(before.len(), 3);
    site.stop();

    let flags = embedded(free_port(), free_port());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    site.set_flags(&flags);
    site.launch().unwrap();
    let server = site.data_dir().join("server");
    assert!(
        !server.join("state.db").exists(),
        "the SQLite file is moved aside"
    );
    let kept = std::fs::read_dir(&server)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.db.migrated-")
        });
    assert!(kept, "the old SQLite file is kept as a backup");
    assert!(
        site.log()
            .contains("moved the SQLite datastore into the embedded etcd")
    );
    let after = configmaps(&site);
    let names = |l: &[(String, u64)]| l.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&after),
        names(&before),
        "every object, in resourceVersion order"
    );
    assert_eq!(
        site.ok(&[
            "get",
            "configmap",
            "first",
            "-o",
            "jsonpath={.metadata.labels.touched}"
        ]),
        "yes"
    );
    // Writes go on, on etcd.
    site.ok(&["create", "configmap", "on-etcd"]);

    // A snapshot while it runs.
    let out = Command::new(edgesite_bin())
        .args(["etcd-snapshot", "save", "--data-dir"])
        .arg(site.data_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let listed = Command::new(edgesite_bin())
        .args(["etcd-snapshot", "ls", "--data-dir"])
        .arg(site.data_dir())
        .output()
        .unwrap();
    let snapshot_name = std::path::Path::new(&snapshot)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&snapshot_name));

    // Things change after it, then the server stops.
    site.ok(&["delete", "configmap", "first", "second"]);
    site.ok(&["create", "configmap", "after-snapshot"]);
    site.stop();

    // A damaged snapshot is refused and nothing is touched.
    let bad = site.dir.path().join("damaged.db");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, &bytes).unwrap();
    let mut reset: Vec<&str> = flags.clone();
    reset.push("--cluster-reset");
    reset.push("--cluster-reset-restore-path");
    let bad_path = bad.display().to_string();
    reset.push(&bad_path);
    let refused = site.run_to_exit(&reset).unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("damaged or not an etcd snapshot"), "{said}");
    let db = server.join("db");
    assert!(
        !std::fs::read_dir(&db)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("etcd-old-")),
        "nothing was moved aside"
    );

    // The real one restores; the server then starts as usual.
    reset.pop();
    reset.push(&snapshot);
    let restored = site.run_to_exit(&reset).unwrap();
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert!(String::from_utf8_lossy(&restored.stderr).contains("without --cluster-reset"));
    site.launch().unwrap();
    let back = names(&configmaps(&site));
    // In resourceVersion order: "first" was labelled after "third" was made.
    assert_eq!(back, ["second", "third", "first", "on-etcd"]);
}

/// An etcd on loopback ports for a test, stopped when dropped.
struct Etcd {
    url: String,
    peer: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    fn start() -> Etcd {
        let mut etcd = Etcd {
            url: format!("http://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        etcd.spawn();
        etcd
    }

    fn spawn(&mut self) {
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &format!("t={}", self.peer)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian's etcd-server; tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.url.trim_start_matches("http://")).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// With --datastore-endpoint the state is in that etcd under --etcd-prefix; when the etcd goes
/// away requests fail at once with a 503 in etcd's words and /readyz says why; when it comes back
/// the site goes on where it was.
#[test]
fn an_external_etcd_that_goes_away_gives_clear_errors_and_the_site_comes_back() {
    let mut etcd = Etcd::start();
    let site = Site::start_with(&[
        "--datastore-endpoint",
        &etcd.url,
        "--etcd-prefix",
        "/sites/shop-17",
    ])
    .unwrap();
    site.ok(&["create", "configmap", "kept"]);
    let stored = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.url, "get", "--keys-only", "--prefix"])
        .arg("/sites/shop-17/core/configmaps/default/kept")
        .output()
        .expect("run etcdctl (Debian's etcd-client)");
    assert!(
        String::from_utf8_lossy(&stored.stdout)
            .contains("/sites/shop-17/core/configmaps/default/kept"),
        "the object is in etcd under the prefix"
    );
    assert!(!site.data_dir().join("server").join("state.db").exists());

    etcd.kill();
    let started = Instant::now();
    let out = site.kubectl(&["create", "configmap", "refused"]).unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(15), "no hang");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("etcd at"), "{said}");
    let ready = site.kubectl(&["get", "--raw", "/readyz"]).unwrap();
    assert!(!ready.status.success());
    assert!(String::from_utf8_lossy(&ready.stderr).contains("etcd"));

    etcd.spawn();
    site.ok_within(
        Duration::from_secs(30),
        &["create", "configmap", "after"],
        None,
    );
    assert!(
        site.kubectl(&["get", "--raw", "/readyz"])
            .unwrap()
            .status
            .success()
    );
    let names: Vec<String> = configmaps(&site).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["kept", "after"]);
}
