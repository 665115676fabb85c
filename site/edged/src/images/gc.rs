//! Image garbage collection: when the disk holding the agent's data passes the high mark,
//! images no container uses are removed, least recently updated first, until usage is below
//! the low mark (kubelet's imageGCHighThresholdPercent / imageGCLowThresholdPercent).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Agent;

const PERIOD: Duration = Duration::from_secs(300);

/// Percent of the file system holding `path` that is used.
pub fn disk_usage_percent(path: &std::path::Path) -> Option<u8> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let total = s.blocks() as f64;
    if total == 0.0 {
        return None;
    }
    let free = s.blocks_available() as f64;
    Some((((total - free) / total) * 100.0).round() as u8)
}

pub async fn run(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PERIOD) => {}
        }
        if let Err(e) = collect(&agent).await {
            tracing::warn!("image garbage collection: {e}");
        }
    }
}

/// One pass: returns how many images were removed.
pub async fn collect(agent: &Agent) -> Result<usize, crate::AgentError> {
    let root = &agent.config.root;
    let Some(usage) = disk_usage_percent(root) else {
        return Ok(0);
    };
    if usage < agent.config.image_gc_high_percent {
        return Ok(0);
    }
    let rt = &agent.runtime;
    let used: HashSet<String> = rt
        .list_containers(&[])
        .await?
        .into_iter()
        .map(|c| c.image)
        .collect();
    let mut images = rt.list_images().await?;
    images.sort_by_key(|i| i.updated_at.as_ref().map(|t| (t.seconds, t.nanos)));
    let mut removed = 0;
    for image in images {
        if used.contains(&image.name) {
            continue;
        }
        if disk_usage_percent(root).unwrap_or(0) < agent.config.image_gc_low_percent {
            break;
        }
        tracing::info!(image = %image.name, "removing unused image (disk {usage}% used)");
        rt.delete_image(&image.name).await?;
        removed += 1;
    }
    Ok(removed)
}
