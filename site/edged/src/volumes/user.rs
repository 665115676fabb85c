//! The user a container runs as: securityContext (container, then pod), else the image's
//! `User` (numeric, or a name looked up in the image's `/etc/passwd` and `/etc/group`, read
//! straight from the unpacked layers), plus fsGroup and supplementalGroups.

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::Agent;
use crate::images::Image;

fn lookup(lines: &str, name: &str) -> Option<(u32, u32)> {
    lines.lines().find_map(|l| {
        let mut parts = l.split(':');
        if parts.next()? != name {
            return None;
        }
        let _password = parts.next()?;
        let id: u32 = parts.next()?.parse().ok()?;
        let gid: u32 = parts.next().and_then(|g| g.parse().ok()).unwrap_or(id);
        Some((id, gid))
    })
}

/// Reads a file of the image through the snapshot's mounts (overlay lowerdirs, or a bind).
async fn image_file(agent: &Agent, image: &Image, path: &str) -> Option<String> {
    let rt = &agent.runtime;
    let key = format!("view-{}", uuid::Uuid::new_v4().simple());
    // A view is cheap: an overlay description over the committed layers.
    let mounts = rt
        .prepare_snapshot(&key, &image.chain_id, None)
        .await
        .ok()?;
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    for m in &mounts {
        if m.r#type == "bind" {
            dirs.push(m.source.clone().into());
        }
        for o in &m.options {
            if let Some(l) = o.strip_prefix("lowerdir=") {
                dirs.extend(l.split(':').map(std::path::PathBuf::from));
            }
        }
    }
    let found = dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join(path.trim_start_matches('/'))).ok());
    let _ = rt.remove_snapshot(&key).await;
    found
}

/// (uid, gid, supplementary gids).
pub async fn user_of(
    agent: &Agent,
    pod: &Pod,
    c: &Container,
    image: &Image,
) -> Result<(u32, u32, Vec<u32>), String> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_sc.and_then(|s| s.run_as_group));
    let image_user = image.config.user.clone().unwrap_or_default();
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u.to_string(), Some(g.to_string())),
        None => (image_user.clone(), None),
    };
    let (mut uid, mut gid) = (0u32, 0u32);
    if let Some(u) = run_as_user {
        uid = u as u32;
    } else if !user_part.is_empty() {
        match user_part.parse::<u32>() {
            Ok(n) => uid = n,
            Err(_) => {
                let passwd = image_file(agent, image, "/etc/passwd")
                    .await
                    .unwrap_or_default();
                let (u, g) = lookup(&passwd, &user_part).ok_or_else(|| {
                    format!("the image's user {user_part:?} is not in its /etc/passwd")
                })?;
                uid = u;
                gid = g;
            }
        }
    }
    let runs_as_non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or_else(|| pod_sc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if runs_as_non_root && uid == 0 {
        return Err("container has runAsNonRoot and image will run as root".into());
    }
    if let Some(g) = run_as_group {
        gid = g as u32;
    } else if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                let groups = image_file(agent, image, "/etc/group")
                    .await
                    .unwrap_or_default();
                lookup(&groups, &g)
                    .map(|(id, _)| id)
                    .ok_or_else(|| format!("the image's group {g:?} is not in its /etc/group"))?
            }
        };
    }
    let mut extra: Vec<u32> = Vec::new();
    if let Some(g) = pod_sc.and_then(|s| s.fs_group) {
        extra.push(g as u32);
    }
    for g in pod_sc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
    {
        if !extra.contains(&(g as u32)) {
            extra.push(g as u32);
        }
    }
    Ok((uid, gid, extra))
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n";
        assert_eq!(super::lookup(passwd, "nobody"), Some((65534, 65534)));
        assert_eq!(super::lookup(passwd, "www"), None);
    }
}
