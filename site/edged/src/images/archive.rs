//! Image tarballs for air-gapped sites: OCI image layouts (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) and docker-archive files (`docker save`: `manifest.json` with
//! `RepoTags`, a config JSON and `layer.tar` files). Both may be in one file (Docker 25+).
//!
//! The tarball is read once, sequentially, on a blocking thread; every file that can be a blob
//! is streamed into containerd's content store as it passes, so memory stays flat whatever the
//! image size. The names come from `io.containerd.image.name` /
//! `org.opencontainers.image.ref.name` annotations or `RepoTags`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use containerd_client::types::Descriptor;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, ImageError, ManifestJson, OCI_INDEX,
    SMALL_BLOB_LIMIT, gc_labels, normalize,
};
use crate::runtime::containerd::Containerd;

/// Below glibc's mmap threshold juggling: big transient buffers would stay in the heap after
/// an import and show up as resident memory for the agent's lifetime.
const CHUNK: usize = 128 << 10;

enum Item {
    /// A file small enough to keep (JSON documents; may also be a blob).
    Small {
        path: String,
        bytes: Vec<u8>,
    },
    /// Start of a streamed file.
    Begin {
        path: String,
        size: u64,
        expected: Option<String>,
    },
    Data(Vec<u8>),
    End,
    Failed(String),
}

struct Stored {
    digest: String,
    size: i64,
    gzip: bool,
}

fn normalize_path(p: &str) -> String {
    p.trim_start_matches("./").to_string()
}

fn reader_thread(path: &Path, tx: mpsc::Sender<Item>) {
    let fail = |tx: &mpsc::Sender<Item>, m: String| {
        let _ = tx.blocking_send(Item::Failed(m));
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(&tx, format!("open {}: {e}", path.display())),
    };
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_ok()
        && (magic[..2] == [0x1f, 0x8b] || magic == [0x28, 0xb5, 0x2f, 0xfd])
    {
        {
            return fail(
                &tx,
                format!(
                    "{} is compressed; decompress it first (gunzip / zstd -d) and import the .tar",
                    path.display()
                ),
            );
        }
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(&tx, format!("open {}: {e}", path.display())),
    };
    let mut archive = tar::Archive::new(file);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return fail(&tx, format!("{} is not a tar file: {e}", path.display())),
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return fail(&tx, format!("read {}: {e}", path.display())),
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => normalize_path(&p.to_string_lossy()),
            Err(_) => continue,
        };
        let size = entry.header().size().unwrap_or(0);
        let blob_digest = name
            .strip_prefix("blobs/sha256/")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .map(|h| format!("sha256:{h}"));
        // JSON documents are kept in memory; everything else (layers) is streamed.
        let small = blob_digest.is_none()
            && size as usize <= SMALL_BLOB_LIMIT
            && (name.ends_with(".json") || name == "oci-layout" || name == "repositories");
        if small {
            let mut bytes = Vec::with_capacity(size as usize);
            if let Err(e) = entry.read_to_end(&mut bytes) {
                return fail(&tx, format!("read {name}: {e}"));
            }
            if tx.blocking_send(Item::Small { path: name, bytes }).is_err() {
                return;
            }
            continue;
        }
        if tx
            .blocking_send(Item::Begin {
                path: name.clone(),
                size,
                expected: blob_digest,
            })
            .is_err()
        {
            return;
        }
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match entry.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return fail(&tx, format!("read {name}: {e}")),
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            if tx.blocking_send(Item::Data(buf)).is_err() {
                return;
            }
        }
        if tx.blocking_send(Item::End).is_err() {
            return;
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// Streams a tarball into the content store; returns (image name, top descriptor) pairs.
pub async fn import(
    rt: &Containerd,
    lease: &str,
    path: &Path,
) -> Result<Vec<(String, Descriptor)>, ImageError> {
    let (tx, mut rx) = mpsc::channel::<Item>(4);
    let owned = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || reader_thread(&owned, tx));
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut stored: HashMap<String, Stored> = HashMap::new();
    let archive_error = |m: String| ImageError::Archive(m);
    while let Some(item) = rx.recv().await {
        match item {
            Item::Small { path, bytes } => {
                small.insert(path, bytes);
            }
            Item::Begin {
                path,
                size,
                expected,
            } => {
                let exists = match &expected {
                    Some(d) => rt.content_exists(d).await?,
                    None => false,
                };
                let mut writer = if exists {
                    None
                } else {
                    Some(
                        rt.write_content(lease, expected.as_deref(), Some(size), HashMap::new())
                            .await?,
                    )
                };
                let mut gzip = None;
                let mut hasher = sha2::Sha256::default();
                loop {
                    match rx.recv().await {
                        Some(Item::Data(chunk)) => {
                            if gzip.is_none() {
                                gzip = Some(chunk.starts_with(&[0x1f, 0x8b]));
                            }
                            if let Some(w) = writer.as_mut() {
                                w.write(&chunk).await?;
                            } else if expected.is_none() {
                                sha2::Digest::update(&mut hasher, &chunk);
                            }
                        }
                        Some(Item::End) => break,
                        Some(Item::Failed(m)) => return Err(archive_error(m)),
                        _ => return Err(archive_error(format!("{path}: the tar ended early"))),
                    }
                }
                let digest = match writer {
                    Some(w) => w.commit().await?,
                    None => expected
                        .clone()
                        .unwrap_or_else(|| format!("sha256:{:x}", sha2::Digest::finalize(hasher))),
                };
                stored.insert(
                    path,
                    Stored {
                        digest,
                        size: size as i64,
                        gzip: gzip.unwrap_or(false),
                    },
                );
            }
            Item::Failed(m) => return Err(archive_error(m)),
            Item::Data(_) | Item::End => {}
        }
    }
    let _ = reader.await;

    let mut images = Vec::new();
    // OCI layout (also written by Docker 25+ next to manifest.json).
    if let Some(index_bytes) = small.get("index.json") {
        let index = ManifestJson::parse(index_bytes).map_err(archive_error)?;
        for m in &index.manifests {
            let name = m
                .annotations
                .get("io.containerd.image.name")
                .or_else(|| m.annotations.get("org.opencontainers.image.ref.name"))
                .filter(|n| n.contains('/') || n.contains(':'))
                .and_then(|n| normalize(n).ok());
            let Some(name) = name else { continue };
            // Make sure every blob this manifest (or nested index) names got stored.
            let top = Descriptor {
                media_type: m.media_type.clone(),
                digest: m.digest.clone(),
                size: m.size,
                annotations: HashMap::new(),
            };
            label_tree(rt, &m.digest).await?;
            images.push((name, top));
        }
    }
    if images.is_empty()
        && let Some(manifest_bytes) = small.get("manifest.json")
    {
        let entries: Vec<DockerEntry> = serde_json::from_slice(manifest_bytes)
            .map_err(|e| archive_error(format!("manifest.json: {e}")))?;
        for entry in entries {
            let config_path = normalize_path(&entry.config);
            let (config_digest, config_size) =
                match (small.get(&config_path), stored.get(&config_path)) {
                    (_, Some(s)) => (s.digest.clone(), s.size),
                    (Some(bytes), None) => {
                        let digest =
                            format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(bytes));
                        rt.put_content(lease, &digest, bytes, HashMap::new())
                            .await?;
                        (digest, bytes.len() as i64)
                    }
                    (None, None) => {
                        return Err(archive_error(format!(
                            "manifest.json names config {config_path}, which the tarball lacks"
                        )));
                    }
                };
            let mut layers = Vec::new();
            for layer in &entry.layers {
                let p = normalize_path(layer);
                let s = stored.get(&p).ok_or_else(|| {
                    archive_error(format!(
                        "manifest.json names layer {p}, which the tarball lacks"
                    ))
                })?;
                layers.push(serde_json::json!({
                    "mediaType": if s.gzip { "application/vnd.docker.image.rootfs.diff.tar.gzip" } else { DOCKER_LAYER },
                    "size": s.size,
                    "digest": s.digest,
                }));
            }
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "size": config_size, "digest": config_digest},
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&manifest).unwrap_or_default();
            let digest = format!(
                "sha256:{:x}",
                <sha2::Sha256 as sha2::Digest>::digest(&bytes)
            );
            let parsed = ManifestJson::parse(&bytes).map_err(archive_error)?;
            rt.put_content(lease, &digest, &bytes, gc_labels(&parsed, None))
                .await?;
            for tag in entry.repo_tags.unwrap_or_default() {
                let name = normalize(&tag)?;
                images.push((
                    name,
                    Descriptor {
                        media_type: DOCKER_MANIFEST.into(),
                        digest: digest.clone(),
                        size: bytes.len() as i64,
                        annotations: HashMap::new(),
                    },
                ));
            }
        }
    }
    if images.is_empty() {
        return Err(archive_error(format!(
            "{} holds no named image: expected an OCI layout whose index.json entries carry an io.containerd.image.name or org.opencontainers.image.ref.name annotation with a full name, or a docker-archive manifest.json with RepoTags",
            path.display()
        )));
    }
    Ok(images)
}

/// Labels a stored manifest or index (and nested manifests) with references to what it names,
/// so containerd's garbage collector keeps the whole tree once the import lease is gone.
async fn label_tree(rt: &Containerd, digest: &str) -> Result<(), ImageError> {
    let mut pending = vec![digest.to_string()];
    let mut seen = 0;
    while let Some(d) = pending.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        let bytes = rt.read_content(&d, SMALL_BLOB_LIMIT).await?;
        let m = ManifestJson::parse(&bytes).map_err(ImageError::Archive)?;
        let labels = gc_labels(&m, None);
        if !labels.is_empty() {
            rt.label_content(&d, labels).await?;
        }
        if m.media_type.as_deref() == Some(OCI_INDEX) || m.is_index() {
            for child in &m.manifests {
                if rt.content_exists(&child.digest).await? {
                    pending.push(child.digest.clone());
                }
            }
        }
    }
    Ok(())
}
