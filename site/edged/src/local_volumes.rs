//! The node's half of the site's local-path provisioner: when a volume it holds is released and
//! its reclaim policy is Delete, the node removes the directory and then the PersistentVolume
//! (K3s's provisioner runs a helper pod on the node for this; the agent does it itself, so no
//! image is needed). `Retain` volumes, volumes of other provisioners and directories whose
//! volume cannot be read are left alone.
//!
//! It also publishes the free space of the storage path's filesystem on its Node
//! ([`pv::STORAGE_FREE`]), as upstream's external-provisioner does with storage capacity
//! objects when it runs on each node: the scheduler keeps claims that would not fit away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use controllers::persistent_volume as pv;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

use crate::Agent;

/// How often the storage directory is looked over (a released volume's directory goes within
/// this time).
const PERIOD: Duration = Duration::from_secs(10);

pub async fn run(agent: Arc<Agent>, shutdown: CancellationToken) {
    let Some(root) = agent.config.local_storage.clone() else {
        return;
    };
    let mut published: Option<i64> = None;
    loop {
        if agent.meta.online() {
            publish_free(&agent, &root, &mut published).await;
            reclaim(&agent, &root).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PERIOD) => {}
        }
    }
}

/// Bytes free for unprivileged writers and the size of the filesystem that holds `root` (or
/// would: the nearest existing ancestor's, before the first volume makes the directory).
fn free_space(root: &Path) -> Option<(i64, i64)> {
    let existing = root.ancestors().find(|p| p.exists())?;
    let stat = nix::sys::statvfs::statvfs(existing).ok()?;
    let unit = stat.fragment_size() as i64;
    Some((
        (stat.blocks_available() as i64).saturating_mul(unit),
        (stat.blocks() as i64).saturating_mul(unit),
    ))
}

/// Whether the free space moved enough since it was published to say it again (more than 1 %
/// of the filesystem: a Node write per small file would be churn).
pub fn worth_publishing(published: Option<i64>, free: i64, size: i64) -> bool {
    published.is_none_or(|p| (p - free).abs() > size / 100)
}

async fn publish_free(agent: &Agent, root: &Path, published: &mut Option<i64>) {
    let Some((free, size)) = free_space(root) else {
        return;
    };
    if !worth_publishing(*published, free, size) {
        return;
    }
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let patch =
        serde_json::json!({"metadata": {"annotations": {pv::STORAGE_FREE: free.to_string()}}});
    match nodes
        .patch(
            &agent.config.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => *published = Some(free),
        Err(error) => tracing::debug!(%error, "cannot publish the free local storage"),
    }
}

/// The volume a directory under the storage path belongs to: `pvc-<uid>` of
/// `pvc-<uid>_<namespace>_<claim>`.
fn volume_of(directory: &str) -> Option<&str> {
    let (volume, _) = directory.split_once('_')?;
    volume.starts_with("pvc-").then_some(volume)
}

/// Whether `directory` is the released, Delete-policy local-path volume `volume`'s own.
pub fn to_remove(volume: &PersistentVolume, directory: &Path) -> bool {
    let provisioned_here = volume
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(pv::PROVISIONED_BY))
        .is_some_and(|p| p == pv::PROVISIONER);
    let spec = volume.spec.as_ref();
    let delete = spec.and_then(|s| s.persistent_volume_reclaim_policy.as_deref()) == Some("Delete");
    let released = volume.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    let same_path = spec
        .and_then(|s| s.host_path.as_ref())
        .is_some_and(|h| Path::new(h.path.trim_end_matches('/')) == directory);
    provisioned_here && delete && released && same_path
}

async fn reclaim(agent: &Agent, root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let api: Api<PersistentVolume> = Api::all(agent.client.clone());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(volume_name) = volume_of(&name) else {
            continue;
        };
        let directory: PathBuf = root.join(&name);
        let volume = match api.get_opt(volume_name).await {
            Ok(Some(volume)) => volume,
            // Gone, or not readable: the data is kept (only a released volume says to delete).
            Ok(None) | Err(_) => continue,
        };
        if !to_remove(&volume, &directory) {
            continue;
        }
        if let Err(error) = std::fs::remove_dir_all(&directory) {
            tracing::warn!(volume = volume_name, directory = %directory.display(), %error, "cannot remove a released volume's directory");
            continue;
        }
        match api.delete(volume_name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(volume = volume_name, directory = %directory.display(), "released volume deleted")
            }
            Err(error) => {
                tracing::warn!(volume = volume_name, %error, "directory removed, the volume not deleted")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn volume(policy: &str, phase: &str, provisioner: &str) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "pvc-1", "annotations": {pv::PROVISIONED_BY: provisioner}},
            "spec": {"persistentVolumeReclaimPolicy": policy, "hostPath": {"path": "/s/pvc-1_ns_data"}},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn only_released_delete_volumes_of_the_site_lose_their_directory() {
        let dir = Path::new("/s/pvc-1_ns_data");
        assert!(to_remove(
            &volume("Delete", "Released", pv::PROVISIONER),
            dir
        ));
        assert!(!to_remove(
            &volume("Retain", "Released", pv::PROVISIONER),
            dir
        ));
        assert!(!to_remove(&volume("Delete", "Bound", pv::PROVISIONER), dir));
        assert!(!to_remove(
            &volume("Delete", "Released", "example.com/nfs"),
            dir
        ));
        assert!(!to_remove(
            &volume("Delete", "Released", pv::PROVISIONER),
            Path::new("/s/pvc-1_ns_other")
        ));
        assert_eq!(volume_of("pvc-1_ns_data"), Some("pvc-1"));
        assert_eq!(volume_of("lost+found"), None);
    }

    #[test]
    fn free_space_is_published_again_only_when_it_moved_more_than_a_percent() {
        let gib = 1 << 30;
        assert!(worth_publishing(None, 5 * gib, 100 * gib));
        assert!(!worth_publishing(
            Some(5 * gib),
            5 * gib + gib / 2,
            100 * gib
        ));
        assert!(worth_publishing(Some(5 * gib), 3 * gib, 100 * gib));
        assert!(worth_publishing(Some(5 * gib), 7 * gib, 100 * gib));
        // The directory need not exist yet: its filesystem is found through its parents.
        let (free, size) = free_space(Path::new("/tmp/edgesite-no-such-dir/storage")).unwrap();
        assert!(free > 0 && size >= free);
    }
}
