//! Upstream's atomic writer for projected files: `..<time>/` holds the data, `..data` points at
//! it, each top-level name is a symlink through `..data`. An update writes a new directory and
//! switches `..data` with one rename; unchanged content is left alone.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    /// Relative path inside the volume (may contain `/`).
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
}

fn valid(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.starts_with("..")
        && path.split('/').all(|p| !p.is_empty() && p != "..")
}

fn unchanged(dir: &Path, files: &[File]) -> bool {
    let data = dir.join("..data");
    if !data.exists() {
        return false;
    }
    let mut count = 0;
    for f in files {
        count += 1;
        match std::fs::read(data.join(&f.path)) {
            Ok(c) if c == f.content => {}
            _ => return false,
        }
    }
    // Same number of top-level entries (a removed key is a change).
    let tops: BTreeSet<String> = files
        .iter()
        .map(|f| f.path.split('/').next().unwrap_or_default().to_string())
        .collect();
    let existing = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with(".."))
                .count()
        })
        .unwrap_or(0);
    count == files.len() && existing == tops.len()
}

/// Writes `files` into `dir` atomically; a no-op when nothing changed.
pub fn write(dir: &Path, files: &[File], group: Option<u32>) -> std::io::Result<()> {
    for f in files {
        if !valid(&f.path) {
            return Err(std::io::Error::other(format!(
                "invalid path {:?}: it must be relative, without '..'",
                f.path
            )));
        }
    }
    if unchanged(dir, files) {
        return Ok(());
    }
    let stamp = format!("..{}", chrono::Utc::now().format("%Y_%m_%d_%H_%M_%S.%f"));
    let fresh = dir.join(&stamp);
    std::fs::create_dir_all(&fresh)?;
    for f in files {
        let target = fresh.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, &f.content)?;
        let mode = if group.is_some() {
            f.mode | 0o040
        } else {
            f.mode
        };
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o7777))?;
        if let Some(g) = group {
            let _ = nix::unistd::chown(&target, None, Some(nix::unistd::Gid::from_raw(g)));
        }
    }
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755))?;
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link)?;
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp_link, dir.join("..data"))?;
    // Top-level names point through ..data.
    let tops: BTreeSet<String> = files
        .iter()
        .map(|f| f.path.split('/').next().unwrap_or_default().to_string())
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_switch_the_data_link_and_drop_removed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = |p: &str, c: &str| File {
            path: p.into(),
            content: c.into(),
            mode: 0o644,
        };
        write(dir.path(), &[f("a", "1"), f("sub/b", "2")], None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("a")).unwrap(), "1");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sub/b")).unwrap(),
            "2"
        );
        let first = std::fs::read_link(dir.path().join("..data")).unwrap();
        write(dir.path(), &[f("a", "1"), f("sub/b", "2")], None).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("..data")).unwrap(),
            first
        );
        write(dir.path(), &[f("a", "3")], None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("a")).unwrap(), "3");
        assert!(!dir.path().join("sub").exists());
        assert!(!dir.path().join(&first).exists());
        assert!(write(dir.path(), &[f("../x", "1")], None).is_err());
    }
}
