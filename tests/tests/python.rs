//! The official Python `kubernetes` client against a real server (tests/python/client_smoke.py).
//! `tests/run.sh` installs it into `target/python-venv`; without it this test fails naming it.

use std::path::PathBuf;
use std::process::Command;

use tests::Site;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("EDGESITE_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/python-venv/bin/python")
}

#[test]
fn python_client_works_unchanged() {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import kubernetes"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the Python `kubernetes` client is missing at {} (tests/run.sh installs it: python3 -m venv target/python-venv && target/python-venv/bin/pip install kubernetes)",
        python.display()
    );
    let site = Site::start().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/client_smoke.py");
    let out = Command::new(&python)
        .arg(script)
        .env("KUBECONFIG", site.kubeconfig())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
