//! A pod's shared PID namespace (`shareProcessNamespace: true`) without a pause container.
//!
//! The namespace needs a process to live in it for as long as the pod runs (when a PID
//! namespace's first process exits, the kernel ends every other one). The agent starts the
//! binary it runs in again as that process, a *holder*: marked by [`HOLDER_ENV`], the binary
//! calls [`run_holder_if_asked`] first thing in `main`, which unshares a PID namespace, starts
//! the binary once more as the namespace's PID 1 (reaping orphans, as the pause container does)
//! and prints that process's host PID.
//! The pod's containers join `/proc/<pid>/ns/pid`. The holder is a process of its own, so it
//! outlives an agent restart (the agent finds it again through `<pod dir>/pid-holder` and its
//! command line); it ends when the agent tears the pod down, or by itself once the pod's
//! directory is gone (a pod removed while the agent was away, a test's data dir).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Set (to the pod's uid) in the environment of a holder process.
pub const HOLDER_ENV: &str = "EDGESITE_PID_NAMESPACE_HOLDER";
/// Its `argv[0]`: what `ps` shows as PID 1 in the pod.
const HOLDER_NAME: &str = "edgesite-pid-holder";
/// Where the agent notes the holder's PID.
const PID_FILE: &str = "pid-holder";
/// Set in the environment of the namespace's PID 1 (the holder's child).
const INIT_ENV: &str = "EDGESITE_PID_NAMESPACE_INIT";

/// Becomes a holder and never returns, when this process was started as one; else returns.
pub fn run_holder_if_asked() {
    let Ok(uid) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let pod_dir = std::env::args_os().nth(2).map(PathBuf::from);
    if std::env::var_os(INIT_ENV).is_some()
        && let Some(dir) = &pod_dir
    {
        init(dir);
    }
    let code = match holder(&uid, pod_dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{HOLDER_NAME}: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Unshares a PID namespace for its children and starts the first one, the namespace's PID 1.
fn holder(uid: &str, pod_dir: Option<PathBuf>) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let pod_dir = pod_dir.ok_or("no pod directory given")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("unshare a PID namespace: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
    let child = std::process::Command::new(exe)
        .arg0(HOLDER_NAME)
        .arg(uid)
        .arg(&pod_dir)
        .env(HOLDER_ENV, uid)
        .env(INIT_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("start the namespace's first process: {e}"))?;
    println!("{}", child.id());
    Ok(())
}

/// PID 1 of the pod's namespace: reaps whatever is reparented to it; ends when the pod's
/// directory is gone.
fn init(pod_dir: &Path) -> ! {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let _ = nix::unistd::setsid();
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        if !pod_dir.exists() {
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The command line a holder for the pod `uid` has (`/proc/<pid>/cmdline`).
fn command_line(uid: &str, pod_dir: &Path) -> Vec<u8> {
    let mut line = Vec::new();
    for part in [
        HOLDER_NAME.as_bytes(),
        uid.as_bytes(),
        pod_dir.as_os_str().as_encoded_bytes(),
    ] {
        line.extend_from_slice(part);
        line.push(0);
    }
    line
}

/// The host PID of the pod's running holder, if it has one.
fn holder_pid(uid: &str, pod_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pod_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A PID noted before a reboot may be another process's now.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (cmdline == command_line(uid, pod_dir)).then_some(pid)
}

fn namespace_of(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/pid"))
}

/// The PID namespace path of the pod's running holder, if it has one.
pub fn running(uid: &str, pod_dir: &Path) -> Option<PathBuf> {
    holder_pid(uid, pod_dir).map(namespace_of)
}

/// Starts a holder for the pod and notes it; returns its PID namespace path.
pub async fn start(uid: &str, pod_dir: &Path) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the agent's binary: {e}"))?;
    std::fs::create_dir_all(pod_dir).map_err(|e| format!("{}: {e}", pod_dir.display()))?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg0(HOLDER_NAME)
        .arg(uid)
        .arg(pod_dir)
        .env(HOLDER_ENV, uid)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let output = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .map_err(|_| "the PID namespace holder did not start within 10 s".to_string())?
        .map_err(|e| format!("start the PID namespace holder: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "the PID namespace holder failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let pid: u32 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| "the PID namespace holder printed no PID".to_string())?;
    std::fs::write(pod_dir.join(PID_FILE), pid.to_string())
        .map_err(|e| format!("note the PID namespace holder: {e}"))?;
    Ok(namespace_of(pid))
}

/// Ends the pod's holder (and with it anything left in its namespace).
pub fn stop(uid: &str, pod_dir: &Path) {
    if let Some(pid) = holder_pid(uid, pod_dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_file(pod_dir.join(PID_FILE));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noted_pid_counts_only_while_it_is_the_pods_holder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(running("u1", dir.path()), None);
        // A PID that is some other process (this test) is not taken for the holder.
        std::fs::write(dir.path().join(PID_FILE), std::process::id().to_string()).unwrap();
        assert_eq!(running("u1", dir.path()), None);
        assert_eq!(
            command_line("u1", Path::new("/p")),
            b"edgesite-pid-holder\0u1\0/p\0".to_vec()
        );
    }
}
