//! The servers a link or balancer learned, kept in a file (a JSON list of strings) so a restart
//! while the given server is down still finds the others.

use std::path::Path;

/// The list saved in `file` (empty when it is missing or unreadable).
pub fn load(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Replaces `file` whole with `servers`: a crash leaves the old list or the new one.
pub fn save(file: &Path, servers: &[String]) -> std::io::Result<()> {
    let text = serde_json::to_string(servers).map_err(std::io::Error::other)?;
    let partial = file.with_extension("partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, file)
}
