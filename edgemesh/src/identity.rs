//! A node's mesh identity: a random Ed25519 key made once and kept in the node's data dir.
//! (EdgeMesh derived keys from node names, so anyone who knew a name could impersonate the node.)

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use libp2p::identity::Keypair;

/// Loads the key at `path`, or makes a new one there (mode 0600) when the file does not exist.
pub fn load_or_create(path: &Path) -> Result<Keypair> {
    match fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).with_context(|| {
            format!(
                "{} is not a mesh key; move it away and a new identity is made at the next start",
                path.display()
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .context("encoding the mesh key")?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let partial = path.with_extension("partial");
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
            Ok(key)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh/key");
        let first = load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        let other = load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(
            first.public().to_peer_id(),
            other.public().to_peer_id(),
            "keys are random"
        );
        fs::write(&path, b"garbage").unwrap();
        let error = load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("is not a mesh key"), "{error}");
    }
}
