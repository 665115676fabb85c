//! Images: what a pod's `image` names, resolved to content in containerd and unpacked into
//! overlayfs snapshots.
//!
//! Start at [`ImageService::ensure`] (the pull policy), then [`ImageService::pull`]
//! (`registry.rs` talks to registries) and [`ImageService::import`] (`archive.rs` reads OCI
//! layout and docker-archive tarballs). Whatever the source, blobs land in containerd's content
//! store with the garbage-collection labels containerd's own clients set, an image record names
//! the top descriptor, and [`ImageService::unpack`] applies the layers into snapshots named by
//! their chain ids, so an image is unpacked once whatever number of containers use it.

pub mod archive;
pub mod gc;

pub mod registry;

use std::collections::HashMap;
use std::time::Duration;

use containerd_client::types::Descriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::runtime::containerd::{Containerd, RuntimeError, SNAPSHOTTER};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Manifests, indexes and configs are small; anything bigger is refused rather than buffered.
pub const SMALL_BLOB_LIMIT: usize = 4 << 20;
/// How long an interrupted pull keeps its partial content pinned.
const PULL_LEASE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0}")]
    Registry(String),
    #[error("image {image}: {reason}")]
    Content { image: String, reason: String },
    #[error("image {0} is not present on this node and the pull policy is Never")]
    NeverPull(String),
    #[error("{0}")]
    Archive(String),
}

/// The platform images are resolved for: the node's own.
#[derive(Clone, Debug)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(String::from),
        }
    }

    fn matches(&self, p: &PlatformJson) -> bool {
        p.os == self.os
            && p.architecture == self.architecture
            && match (&self.variant, &p.variant) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    }
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct DescriptorJson {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub platform: Option<PlatformJson>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

impl DescriptorJson {
    pub fn to_containerd(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: HashMap::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize, Clone)]
pub struct PlatformJson {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest or an index (manifest list); both parse into this.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestJson {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<DescriptorJson>,
    #[serde(default)]
    pub config: Option<DescriptorJson>,
    #[serde(default)]
    pub layers: Vec<DescriptorJson>,
}

impl ManifestJson {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid JSON: {e}"))
    }
    pub fn is_index(&self) -> bool {
        matches!(self.media_type.as_deref(), Some(OCI_INDEX | DOCKER_LIST))
            || (self.config.is_none() && !self.manifests.is_empty())
    }
}

/// The runtime part of an image config (`config` in the config blob).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigJson {
    #[serde(default)]
    config: Option<RuntimeConfig>,
    #[serde(default)]
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// An image ready to run: unpacked, with its config.
#[derive(Debug, Clone)]
pub struct Image {
    /// The normalized name, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// What `containerStatuses[].imageID` shows: `<repository>@<digest>`.
    pub image_id: String,
    /// The config blob's digest (CRI's image id).
    pub config_digest: String,
    /// The top snapshot's name (chain id of all layers).
    pub chain_id: String,
    pub config: RuntimeConfig,
    pub size: i64,
}

/// `imagePullPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The pod's field, with upstream's default (Always for `:latest` or no tag).
    pub fn of(policy: Option<&str>, image: &str) -> Self {
        match policy {
            Some("Always") => PullPolicy::Always,
            Some("Never") => PullPolicy::Never,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            _ => {
                let last = image.rsplit('/').next().unwrap_or(image);
                if image.contains('@') || (last.contains(':') && !last.ends_with(":latest")) {
                    PullPolicy::IfNotPresent
                } else {
                    PullPolicy::Always
                }
            }
        }
    }
}

/// Docker's normalization: `busybox` -> `docker.io/library/busybox:latest`.
pub fn normalize(image: &str) -> Result<String, ImageError> {
    let reference: oci_client::Reference = image
        .parse()
        .map_err(|e: oci_client::ParseError| ImageError::Reference(image.into(), e.to_string()))?;
    Ok(reference.whole())
}

/// Chain ids of a layer stack (the snapshot names), from the config's diff ids.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => format!(
                "sha256:{:x}",
                Sha256::digest(format!("{parent} {diff}").as_bytes())
            ),
        };
        out.push(next);
    }
    out
}

/// Images on this node: resolve, pull, import, unpack.
#[derive(Clone)]
pub struct ImageService {
    rt: Containerd,
    registries: registry::Registries,
    platform: Platform,
}

impl ImageService {
    pub fn new(rt: Containerd, registries: registry::Registries) -> Self {
        ImageService {
            rt,
            registries,
            platform: Platform::host(),
        }
    }

    pub fn runtime(&self) -> &Containerd {
        &self.rt
    }

    /// The image a container needs under its pull policy: the local one, or pulled.
    pub async fn ensure(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: &[registry::Credential],
    ) -> Result<(Image, bool), ImageError> {
        let name = normalize(image)?;
        if policy != PullPolicy::Always
            && let Some(found) = self.local(&name).await?
        {
            return Ok((found, false));
        }
        if policy == PullPolicy::Never {
            return Err(ImageError::NeverPull(image.to_string()));
        }
        Ok((self.pull(&name, credentials).await?, true))
    }

    /// The image if its record and content are here (unpacking it when needed).
    pub async fn local(&self, name: &str) -> Result<Option<Image>, ImageError> {
        let Some(record) = self.rt.get_image(name).await? else {
            return Ok(None);
        };
        let Some(target) = record.target else {
            return Ok(None);
        };
        match self.resolve(name, &target.digest).await {
            Ok(image) => Ok(Some(image)),
            // A record whose content was removed underneath: pull again.
            Err(ImageError::Runtime(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// From a stored top descriptor (index or manifest) to an unpacked image.
    async fn resolve(&self, name: &str, top_digest: &str) -> Result<Image, ImageError> {
        let bad = |reason: String| ImageError::Content {
            image: name.to_string(),
            reason,
        };
        let top = self.rt.read_content(top_digest, SMALL_BLOB_LIMIT).await?;
        let mut manifest = ManifestJson::parse(&top).map_err(bad)?;
        if manifest.is_index() {
            let chosen = self.choose(&manifest).ok_or_else(|| {
                bad(format!(
                    "no manifest for this node's platform {}/{}",
                    self.platform.os, self.platform.architecture
                ))
            })?;
            let bytes = self
                .rt
                .read_content(&chosen.digest, SMALL_BLOB_LIMIT)
                .await?;
            manifest = ManifestJson::parse(&bytes).map_err(bad)?;
        }
        let config_desc = manifest
            .config
            .clone()
            .ok_or_else(|| bad("the manifest has no config".into()))?;
        let config_bytes = self
            .rt
            .read_content(&config_desc.digest, SMALL_BLOB_LIMIT)
            .await?;
        let config: ConfigJson = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("the image config is not valid JSON: {e}")))?;
        let chain = self
            .unpack(name, &manifest, &config.rootfs.diff_ids)
            .await?;
        let repository = name
            .rsplit_once('@')
            .map(|(r, _)| r)
            .or_else(|| {
                // Strip the tag, not a registry port.
                let slash = name.rfind('/').unwrap_or(0);
                name[slash..].rfind(':').map(|i| &name[..slash + i])
            })
            .unwrap_or(name);
        Ok(Image {
            name: name.to_string(),
            image_id: format!("{repository}@{top_digest}"),
            config_digest: config_desc.digest.clone(),
            chain_id: chain,
            config: config.config.unwrap_or_default(),
            size: manifest.layers.iter().map(|l| l.size).sum(),
        })
    }

    /// The index entry for this node's platform.
    pub fn choose<'a>(&self, index: &'a ManifestJson) -> Option<&'a DescriptorJson> {
        let with_platform = index.manifests.iter().find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| self.platform.matches(p))
        });
        // An index without platforms (single-image OCI layouts) means its only manifest.
        with_platform.or_else(|| {
            if index.manifests.iter().all(|m| m.platform.is_none()) {
                index.manifests.first()
            } else {
                None
            }
        })
    }

    /// Applies the layers into snapshots (skipping those already there); returns the chain id
    /// of the top layer and labels the config so containerd keeps the snapshots.
    pub async fn unpack(
        &self,
        name: &str,
        manifest: &ManifestJson,
        diff_ids: &[String],
    ) -> Result<String, ImageError> {
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Content {
                image: name.to_string(),
                reason: format!(
                    "the config lists {} layers but the manifest {}",
                    diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        let chain = chain_ids(diff_ids);
        let Some(top) = chain.last().cloned() else {
            return Err(ImageError::Content {
                image: name.to_string(),
                reason: "the image has no layers".into(),
            });
        };
        if self.rt.snapshot_exists(&top).await? {
            return Ok(top);
        }
        let lease = self.rt.create_lease(PULL_LEASE).await?;
        let result = self
            .unpack_leased(name, manifest, diff_ids, &chain, &lease)
            .await;
        let _ = self.rt.delete_lease(&lease).await;
        result?;
        if let Some(config) = &manifest.config {
            let mut labels = HashMap::new();
            labels.insert(
                format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                top.clone(),
            );
            self.rt.label_content(&config.digest, labels).await?;
        }
        Ok(top)
    }

    async fn unpack_leased(
        &self,
        name: &str,
        manifest: &ManifestJson,
        diff_ids: &[String],
        chain: &[String],
        lease: &str,
    ) -> Result<(), ImageError> {
        let mut parent = String::new();
        for (i, layer) in manifest.layers.iter().enumerate() {
            let chain_id = &chain[i];
            if !self.rt.snapshot_exists(chain_id).await? {
                let key = format!("extract-{} {chain_id}", uuid::Uuid::new_v4().simple());
                let mounts = self.rt.prepare_snapshot(&key, &parent, Some(lease)).await?;
                let applied = match self.rt.apply_layer(layer.to_containerd(), mounts).await {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = self.rt.remove_snapshot(&key).await;
                        return Err(e.into());
                    }
                };
                if applied != diff_ids[i] {
                    let _ = self.rt.remove_snapshot(&key).await;
                    return Err(ImageError::Content {
                        image: name.to_string(),
                        reason: format!(
                            "layer {} unpacks to {applied}, but the config says {}",
                            layer.digest, diff_ids[i]
                        ),
                    });
                }
                match self.rt.commit_snapshot(chain_id, &key, lease).await {
                    Ok(()) => {}
                    // Another unpack of the same layer won the race.
                    Err(e) if e.is_already_exists() => {
                        let _ = self.rt.remove_snapshot(&key).await;
                    }
                    Err(e) => {
                        let _ = self.rt.remove_snapshot(&key).await;
                        return Err(e.into());
                    }
                }
            }
            parent = chain_id.clone();
        }
        Ok(())
    }

    /// Pulls `name` (normalized) from its registry or a configured mirror.
    pub async fn pull(
        &self,
        name: &str,
        credentials: &[registry::Credential],
    ) -> Result<Image, ImageError> {
        let lease = self.rt.create_lease(PULL_LEASE).await?;
        let result = self
            .registries
            .pull(&self.rt, &lease, name, credentials, self)
            .await;
        let top = match result {
            Ok(top) => top,
            Err(e) => {
                let _ = self.rt.delete_lease(&lease).await;
                return Err(e);
            }
        };
        let result = async {
            self.rt.put_image(name, top.clone(), HashMap::new()).await?;
            self.resolve(name, &top.digest).await
        }
        .await;
        let _ = self.rt.delete_lease(&lease).await;
        result
    }

    /// Imports an OCI-layout or docker-archive tarball; returns the image names it held.
    pub async fn import(&self, path: &std::path::Path) -> Result<Vec<String>, ImageError> {
        let lease = self.rt.create_lease(PULL_LEASE).await?;
        let result = archive::import(&self.rt, &lease, path).await;
        let images = match result {
            Ok(images) => images,
            Err(e) => {
                let _ = self.rt.delete_lease(&lease).await;
                return Err(e);
            }
        };
        let mut names = Vec::new();
        let mut outcome = Ok(());
        for (name, top) in images {
            if let Err(e) = self.rt.put_image(&name, top.clone(), HashMap::new()).await {
                outcome = Err(e.into());
                break;
            }
            if let Err(e) = self.resolve(&name, &top.digest).await {
                outcome = Err(e);
                break;
            }
            names.push(name);
        }
        let _ = self.rt.delete_lease(&lease).await;
        outcome.map(|()| names)
    }
}

/// Imports the tarballs dropped in `<data-dir>/agent/images/` (each file once: its name, size
/// and modification time are remembered in `.imported`).
pub async fn import_dropped(agent: &crate::Agent) {
    let dir = agent.config.images_dir();
    let ledger = dir.join(".imported");
    let mut done: Vec<String> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    files.sort();
    for file in files {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let key = format!("{}\t{}\t{mtime}", file.display(), meta.len());
        if done.contains(&key) {
            continue;
        }
        match agent.images.import(&file).await {
            Ok(names) => {
                tracing::info!(file = %file.display(), "imported images {}", names.join(", "));
                done.push(key);
                let _ = std::fs::write(&ledger, done.join("\n") + "\n");
            }
            Err(e) => tracing::warn!(file = %file.display(), "image import failed: {e}"),
        }
    }
}

/// The garbage-collection labels of a manifest or index blob: references to what it names.
pub fn gc_labels(manifest: &ManifestJson, only: Option<&str>) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    if let Some(config) = &manifest.config {
        labels.insert(
            "containerd.io/gc.ref.content.config".into(),
            config.digest.clone(),
        );
    }
    for (i, layer) in manifest.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest.clone(),
        );
    }
    for (i, m) in manifest.manifests.iter().enumerate() {
        if only.is_none_or(|d| d == m.digest) {
            labels.insert(
                format!("containerd.io/gc.ref.content.m.{i}"),
                m.digest.clone(),
            );
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let ids = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        let expected = format!("sha256:{:x}", Sha256::digest(b"sha256:a sha256:b"));
        assert_eq!(ids[1], expected);
    }

    #[test]
    fn pull_policy_defaults_like_upstream() {
        assert_eq!(PullPolicy::of(None, "busybox"), PullPolicy::Always);
        assert_eq!(PullPolicy::of(None, "busybox:latest"), PullPolicy::Always);
        assert_eq!(
            PullPolicy::of(None, "busybox:1.36"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            PullPolicy::of(None, "localhost:5000/busybox"),
            PullPolicy::Always
        );
        assert_eq!(
            PullPolicy::of(None, "busybox@sha256:abc"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(PullPolicy::of(Some("Never"), "x"), PullPolicy::Never);
    }

    #[test]
    fn names_are_normalized_like_docker() {
        assert_eq!(
            normalize("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize("127.0.0.1:5000/web:v1").unwrap(),
            "127.0.0.1:5000/web:v1"
        );
        assert!(normalize("bad image!").is_err());
    }
}
