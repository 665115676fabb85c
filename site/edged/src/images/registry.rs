//! Registry pulls over the distribution (v2) API, with K3s-style `registries.yaml`.
//!
//! ```yaml
//! mirrors:
//!   docker.io:
//!     endpoint: ["https://mirror.example:5000", "http://10.0.0.5:5000"]
//!   "*":                      # any registry without its own entry
//!     endpoint: ["http://cache.local:5000"]
//! configs:
//!   "mirror.example:5000":
//!     auth: { username: u, password: p }     # or `auth: <base64 user:pass>` or `identitytoken`
//!     tls: { ca_file: /etc/ssl/mirror.pem, insecure_skip_verify: false }
//! ```
//!
//! Mirrors are tried in order, then the registry itself. An `http://` endpoint is plain HTTP;
//! registries on loopback addresses default to plain HTTP like Docker's and containerd's.
//! Credentials come from `configs` and from the pod's `imagePullSecrets`
//! (`kubernetes.io/dockerconfigjson` and `kubernetes.io/dockercfg`). Token (Bearer) and basic
//! authentication are handled by `oci-client`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use containerd_client::types::Descriptor;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use super::{
    DOCKER_LIST, DOCKER_MANIFEST, DescriptorJson, ImageError, ImageService, ManifestJson,
    OCI_INDEX, OCI_MANIFEST, SMALL_BLOB_LIMIT, gc_labels,
};
use crate::runtime::containerd::Containerd;

#[derive(Debug, Default, Deserialize, Clone)]
pub struct RegistriesFile {
    #[serde(default)]
    pub mirrors: HashMap<String, Mirror>,
    #[serde(default)]
    pub configs: HashMap<String, RegistryConfig>,
}

#[derive(Debug, Default, Deserialize, Clone)]
pub struct Mirror {
    #[serde(default)]
    pub endpoint: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
pub struct RegistryConfig {
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Default, Deserialize, Clone)]
pub struct AuthConfig {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// base64 of `user:password`.
    #[serde(default)]
    pub auth: Option<String>,
    #[serde(default)]
    pub identitytoken: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
pub struct TlsConfig {
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A registry credential (from a pull secret or the registries file).
#[derive(Clone, Debug)]
pub struct Credential {
    /// Registry host (and port) it applies to; `docker.io` also matches Docker Hub's aliases.
    pub registry: String,
    pub auth: RegistryAuth,
}

/// Credentials in a `kubernetes.io/dockerconfigjson` (or legacy `dockercfg`) secret payload.
pub fn credentials_from_docker_config(bytes: &[u8], legacy: bool) -> Vec<Credential> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        identitytoken: Option<String>,
    }
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    let entries: HashMap<String, Entry> = if legacy {
        serde_json::from_slice(bytes).unwrap_or_default()
    } else {
        serde_json::from_slice::<File>(bytes)
            .map(|f| f.auths)
            .unwrap_or_default()
    };
    entries
        .into_iter()
        .filter_map(|(key, e)| {
            let auth = auth_of(AuthConfig {
                username: e.username,
                password: e.password,
                auth: e.auth,
                identitytoken: e.identitytoken,
            })?;
            Some(Credential {
                registry: registry_host_of(&key),
                auth,
            })
        })
        .collect()
}

/// `https://index.docker.io/v1/` -> `docker.io`; `host:5000/path` -> `host:5000`.
fn registry_host_of(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or(without_scheme);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        h => h.to_string(),
    }
}

fn auth_of(c: AuthConfig) -> Option<RegistryAuth> {
    if let Some(token) = c.identitytoken.filter(|t| !t.is_empty()) {
        return Some(RegistryAuth::Bearer(token));
    }
    if let (Some(u), Some(p)) = (&c.username, &c.password)
        && !u.is_empty()
    {
        return Some(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(c.auth?.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(RegistryAuth::Basic(u.to_string(), p.to_string()))
}

/// One place to fetch from: a mirror or the registry itself.
#[derive(Clone, Debug, PartialEq)]
struct Endpoint {
    host: String,
    plain_http: bool,
}

/// The node's registry configuration and one client per endpoint (each keeps its tokens).
#[derive(Clone, Default)]
pub struct Registries {
    file: RegistriesFile,
    clients: Arc<Mutex<HashMap<String, Client>>>,
}

impl Registries {
    pub fn new(file: RegistriesFile) -> Self {
        Registries {
            file,
            clients: Arc::default(),
        }
    }

    /// Reads `registries.yaml`; a missing file means no mirrors and no credentials.
    pub fn load(path: &Path) -> Result<Self, ImageError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let file: RegistriesFile = serde_yaml::from_str(&text)
                    .map_err(|e| ImageError::Registry(format!("{}: {e}", path.display())))?;
                Ok(Registries::new(file))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registries::default()),
            Err(e) => Err(ImageError::Registry(format!(
                "read {}: {e}",
                path.display()
            ))),
        }
    }

    fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mirror = self
            .file
            .mirrors
            .get(registry)
            .or_else(|| self.file.mirrors.get("*"));
        let mut out: Vec<Endpoint> = mirror
            .map(|m| {
                m.endpoint
                    .iter()
                    .map(|e| {
                        let plain_http = e.starts_with("http://");
                        let host = e
                            .trim_start_matches("https://")
                            .trim_start_matches("http://")
                            .trim_end_matches('/')
                            .split('/')
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        Endpoint { host, plain_http }
                    })
                    .filter(|e| !e.host.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let own = Endpoint {
            host: registry.to_string(),
            plain_http: is_loopback_host(registry) && !self.file.configs.contains_key(registry),
        };
        if !out.iter().any(|e| e.host == own.host) {
            out.push(own);
        }
        out
    }

    /// A client for `endpoint` used with `auth` only: oci-client remembers a registry's
    /// credentials and tokens, so sharing one client between pods would let a pod without a
    /// pull secret pull with another pod's.
    fn client(&self, endpoint: &Endpoint, auth: &RegistryAuth) -> Result<Client, ImageError> {
        use sha2::Digest;
        let identity = match auth {
            RegistryAuth::Anonymous => "anonymous".to_string(),
            RegistryAuth::Basic(u, p) => {
                format!("{:x}", sha2::Sha256::digest(format!("basic\0{u}\0{p}")))
            }
            RegistryAuth::Bearer(t) => {
                format!("{:x}", sha2::Sha256::digest(format!("bearer\0{t}")))
            }
        };
        let key = format!("{}|{}|{identity}", endpoint.host, endpoint.plain_http);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        // Bounded: forget them all rather than grow without end.
        if clients.len() >= 64 {
            clients.clear();
        }
        let mut config = ClientConfig {
            protocol: if endpoint.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            user_agent: "edgesite",
            ..Default::default()
        };
        if let Some(tls) = self
            .file
            .configs
            .get(&endpoint.host)
            .and_then(|c| c.tls.clone())
        {
            config.accept_invalid_certificates = tls.insecure_skip_verify;
            if let Some(ca) = tls.ca_file {
                let pem = std::fs::read(&ca)
                    .map_err(|e| ImageError::Registry(format!("read ca_file {ca}: {e}")))?;
                config
                    .extra_root_certificates
                    .push(oci_client::client::Certificate {
                        encoding: oci_client::client::CertificateEncoding::Pem,
                        data: pem,
                    });
            }
        }
        let client = Client::new(config);
        clients.insert(key, client.clone());
        Ok(client)
    }

    fn auth_for(&self, host: &str, registry: &str, credentials: &[Credential]) -> RegistryAuth {
        if let Some(auth) = self
            .file
            .configs
            .get(host)
            .and_then(|c| c.auth.clone())
            .and_then(auth_of)
        {
            return auth;
        }
        credentials
            .iter()
            .find(|c| c.registry == host || c.registry == registry)
            .map(|c| c.auth.clone())
            .unwrap_or(RegistryAuth::Anonymous)
    }

    /// Fetches the image's blobs into the content store under `lease`; returns the top
    /// descriptor (index or manifest) for the image record.
    pub(super) async fn pull(
        &self,
        rt: &Containerd,
        lease: &str,
        name: &str,
        credentials: &[Credential],
        images: &ImageService,
    ) -> Result<Descriptor, ImageError> {
        let reference: Reference = name.parse().map_err(|e: oci_client::ParseError| {
            ImageError::Reference(name.into(), e.to_string())
        })?;
        let registry = reference.registry().to_string();
        let mut errors = Vec::new();
        for endpoint in self.endpoints(&registry) {
            let mut r = reference.clone();
            if endpoint.host != registry {
                r.set_mirror_registry(endpoint.host.clone());
            }
            let auth = self.auth_for(&endpoint.host, &registry, credentials);
            let client = self.client(&endpoint, &auth)?;
            match pull_from(&client, &auth, &r, rt, lease, images).await {
                Ok(top) => return Ok(top),
                Err(e) => {
                    tracing::debug!(image = name, endpoint = %endpoint.host, "pull failed: {e}");
                    errors.push(if endpoint.host == registry {
                        e
                    } else {
                        format!("mirror {}: {e}", endpoint.host)
                    });
                }
            }
        }
        Err(ImageError::Registry(errors.join("; ")))
    }
}

fn is_loopback_host(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(registry);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

const ACCEPT: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

fn describe(e: oci_client::errors::OciDistributionError) -> String {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::AuthenticationFailure(m) => format!("authentication failed: {m}"),
        E::UnauthorizedError { url } => format!("unauthorized: {url}"),
        E::ImageManifestNotFoundError(m) => format!("not found: {m}"),
        E::RegistryError { envelope, url } => {
            let reasons: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect();
            format!("{url}: {}", reasons.join(", "))
        }
        E::ServerError { code, url, message } => format!("{url}: HTTP {code}: {message}"),
        other => {
            // reqwest's message alone ("error sending request") hides the cause.
            let mut text = other.to_string();
            let mut source = std::error::Error::source(&other);
            while let Some(s) = source {
                let m = s.to_string();
                if !text.contains(&m) {
                    text.push_str(": ");
                    text.push_str(&m);
                }
                source = s.source();
            }
            text
        }
    }
}

async fn pull_from(
    client: &Client,
    auth: &RegistryAuth,
    reference: &Reference,
    rt: &Containerd,
    lease: &str,
    images: &ImageService,
) -> Result<Descriptor, String> {
    let (bytes, digest) = client
        .pull_manifest_raw(reference, auth, ACCEPT)
        .await
        .map_err(describe)?;
    let top_manifest = ManifestJson::parse(&bytes)?;
    let media_type = top_manifest.media_type.clone().unwrap_or_else(|| {
        if top_manifest.is_index() {
            OCI_INDEX.into()
        } else {
            OCI_MANIFEST.into()
        }
    });
    let top = Descriptor {
        media_type,
        digest: digest.clone(),
        size: bytes.len() as i64,
        annotations: HashMap::new(),
    };
    let (manifest, manifest_bytes, manifest_digest) = if top_manifest.is_index() {
        let chosen = images.choose(&top_manifest).cloned().ok_or_else(|| {
            format!(
                "no manifest for this node's platform {}/{}",
                images.platform.os, images.platform.architecture
            )
        })?;
        let by_digest = reference.clone_with_digest(chosen.digest.clone());
        let (m_bytes, m_digest) = client
            .pull_manifest_raw(&by_digest, auth, ACCEPT)
            .await
            .map_err(describe)?;
        (ManifestJson::parse(&m_bytes)?, m_bytes, m_digest)
    } else {
        (top_manifest, bytes.clone(), digest.clone())
    };
    let config = manifest
        .config
        .clone()
        .ok_or_else(|| "the manifest has no config".to_string())?;
    // Bottom up: layers, config, manifest, index, so every reference points at stored content.
    for layer in &manifest.layers {
        fetch_blob(client, reference, layer, rt, lease).await?;
    }
    fetch_blob(client, reference, &config, rt, lease).await?;
    rt.put_content(
        lease,
        &manifest_digest,
        &manifest_bytes,
        gc_labels(&manifest, None),
    )
    .await
    .map_err(|e| e.to_string())?;
    if digest != manifest_digest {
        let index = ManifestJson::parse(&bytes)?;
        rt.put_content(
            lease,
            &digest,
            &bytes,
            gc_labels(&index, Some(&manifest_digest)),
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(top)
}

async fn fetch_blob(
    client: &Client,
    reference: &Reference,
    desc: &DescriptorJson,
    rt: &Containerd,
    lease: &str,
) -> Result<(), String> {
    if rt
        .content_exists(&desc.digest)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(());
    }
    if desc.size < 0
        || (desc.media_type.contains("config") && desc.size as usize > SMALL_BLOB_LIMIT)
    {
        return Err(format!(
            "blob {} has an unusable size {}",
            desc.digest, desc.size
        ));
    }
    let mut stream = client
        .pull_blob_stream(reference, desc.digest.as_str())
        .await
        .map_err(describe)?;
    let mut w = rt
        .write_content(
            lease,
            Some(&desc.digest),
            Some(desc.size as u64),
            HashMap::new(),
        )
        .await
        .map_err(|e| e.to_string())?;
    while let Some(chunk) = stream.stream.next().await {
        let chunk = chunk.map_err(|e| format!("download {}: {e}", desc.digest))?;
        w.write(&chunk).await.map_err(|e| e.to_string())?;
    }
    w.commit().await.map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_secrets_give_credentials() {
        let json = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"reg.local:5000":{"username":"a","password":"b"}}}"#;
        let mut creds = credentials_from_docker_config(json, false);
        creds.sort_by(|a, b| a.registry.cmp(&b.registry));
        assert_eq!(creds[0].registry, "docker.io");
        assert!(matches!(&creds[0].auth, RegistryAuth::Basic(u, p) if u == "u" && p == "p"));
        assert_eq!(creds[1].registry, "reg.local:5000");
    }

    #[test]
    fn mirrors_come_first_and_loopback_is_plain_http() {
        let file: RegistriesFile = serde_yaml::from_str(
            "mirrors:\n  docker.io:\n    endpoint: [\"http://127.0.0.1:5000\"]\n",
        )
        .unwrap();
        let r = Registries::new(file);
        let e = r.endpoints("docker.io");
        assert_eq!(e[0].host, "127.0.0.1:5000");
        assert!(e[0].plain_http);
        assert_eq!(e[1].host, "docker.io");
        assert!(!e[1].plain_http);
        assert!(r.endpoints("localhost:5000")[0].plain_http);
        assert!(!r.endpoints("quay.io")[0].plain_http);
    }
}
