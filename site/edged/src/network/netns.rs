//! Named network namespaces, as `ip netns` makes them: a new namespace bind-mounted onto a file,
//! so it outlives the processes in it. Every container of a pod joins the pod's namespace by
//! path; no pause container is needed to hold it.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// Creates a new network namespace mounted at `path` (a no-op when one is already there).
pub fn create(path: &Path) -> std::io::Result<()> {
    if is_namespace(path) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    // unshare() moves the calling thread into the new namespace: do it on a throwaway thread
    // so no runtime thread ever changes namespace.
    let result = std::thread::spawn(move || -> nix::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?;
    result.map_err(|e| {
        let _ = std::fs::remove_file(path);
        std::io::Error::other(format!("create network namespace {}: {e}", path.display()))
    })
}

/// Whether `path` is a mounted namespace.
pub fn is_namespace(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Unmounts and removes the namespace file; the namespace dies with its last process.
pub fn remove(path: &Path) -> std::io::Result<()> {
    if is_namespace(path) {
        nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(|e| {
            std::io::Error::other(format!("unmount network namespace {}: {e}", path.display()))
        })?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
