//! kube-rs's own integration tests (its `#[ignore = "needs cluster ..."]` tests of the
//! `kube-client` crate, the version this project locks) against a site with a node, as a
//! compatibility suite: built once into `target/kube-rs-suite` from the crate's published
//! sources (cargo has them, the project depends on it) with `kube` added as the dev-dependency
//! its git checkout has by path. Needs root and containerd like the other node tests; the
//! pods it makes run the test image imported as `busybox:stable`.
//!
//! Skipped: `pod_can_exec_and_write_to_stdin_from_node_proxy`, which dials a kubelet at
//! `localhost:10250` (the machine's port, which an installed site may hold); the same client
//! call runs against a node's kubelet API in `interactive.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::Site;
use tests::node::{Runtime, busybox_image, busybox_image_as};

const SKIPPED: &[&str] = &["pod_can_exec_and_write_to_stdin_from_node_proxy"];

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `kube-client` version in the workspace's lock file.
fn locked_version() -> String {
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).expect("Cargo.lock");
    let at = lock
        .find("name = \"kube-client\"\nversion = \"")
        .expect("kube-client in Cargo.lock");
    let rest = &lock[at + "name = \"kube-client\"\nversion = \"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// The published sources cargo keeps for `kube-client-<version>`.
fn published_sources(version: &str) -> PathBuf {
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let registry = cargo_home.join("registry").join("src");
    std::fs::read_dir(&registry)
        .unwrap_or_else(|e| panic!("cargo's registry sources at {}: {e}", registry.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(format!("kube-client-{version}")))
        .find(|p| p.join("Cargo.toml").exists())
        .unwrap_or_else(|| {
            panic!(
                "kube-client-{version} is not in {} (cargo fetches it when building the workspace)",
                registry.display()
            )
        })
}

/// Builds the crate's test binary once; returns its path.
fn build(version: &str) -> PathBuf {
    let suite = workspace().join("target").join("kube-rs-suite");
    let crate_dir = suite.join(format!("kube-client-{version}"));
    if !crate_dir.join(".prepared").exists() {
        let _ = std::fs::remove_dir_all(&crate_dir);
        std::fs::create_dir_all(&suite).unwrap();
        let copied = Command::new("cp")
            .arg("-r")
            .arg(published_sources(version))
            .arg(&crate_dir)
            .status()
            .unwrap();
        assert!(copied.success());
        let mut manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
        manifest.push_str(&format!(
            "\n[dev-dependencies.kube]\nversion = \"={version}\"\nfeatures = [\"runtime\", \"derive\", \"ws\", \"admission\", \"jsonpatch\", \"kubelet-debug\", \"unstable-client\"]\n"
        ));
        // Not part of the workspace it is copied into.
        manifest.push_str("\n[workspace]\n");
        std::fs::write(crate_dir.join("Cargo.toml"), manifest).unwrap();
        std::fs::copy(workspace().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
        std::fs::write(crate_dir.join(".prepared"), "").unwrap();
    }
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--lib",
            "--no-run",
            "--message-format=json",
            "--features",
            "ws,kubelet-debug,unstable-client,jsonpatch,admission,gzip,rustls-tls,ring",
        ])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", suite.join("target"))
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building kube-client's tests failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "kube_client")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("the test binary")
}

fn node_ready(site: &Site) -> bool {
    tests::eventually(std::time::Duration::from_secs(60), || {
        site.kubectl(&[
            "get",
            "node",
            "node-a",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ])
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "True")
    })
}

#[test]
fn kube_rs_needs_cluster_tests_pass_against_a_site() {
    let version = locked_version();
    let binary = build(&version);
    let rt = Runtime::start().unwrap();
    let mut flags = rt.node_flags("node-a");
    flags.push(format!("--cluster-cidr={}", rt.cluster_cidr()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let images = [
        busybox_image().unwrap(),
        busybox_image_as("docker.io/library/busybox:stable").unwrap(),
    ];
    let site = Site::start_prepared(&flags, |data: &Path| {
        let dir = data.join("agent").join("images");
        std::fs::create_dir_all(&dir)?;
        for (i, image) in images.iter().enumerate() {
            std::fs::copy(image, dir.join(format!("image-{i}.tar")))?;
        }
        Ok(())
    })
    .unwrap();
    assert!(
        node_ready(&site),
        "node-a never became Ready\n{}",
        site.log()
    );
    let mut args = vec!["--ignored".to_string(), "--test-threads=1".to_string()];
    for skipped in SKIPPED {
        args.push("--skip".into());
        args.push(skipped.to_string());
    }
    let out = Command::new(&binary)
        .args(&args)
        .env("KUBECONFIG", site.kubeconfig())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("kube-client {version}'s needs-cluster tests:\n{stdout}");
    assert!(
        out.status.success(),
        "kube-client {version}'s needs-cluster tests failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        site.log()
    );
    assert!(stdout.contains("test result: ok."), "{stdout}");
}
