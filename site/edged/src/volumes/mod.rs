//! What a container sees besides its image: volumes (emptyDir, hostPath, configMap, secret,
//! downwardAPI, projected), the kubelet-managed `/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname`, its environment (`env`, `envFrom`, `valueFrom`) and its user.
//!
//! Files of configMap/secret/downwardAPI/projected volumes are written like upstream's atomic
//! writer: the data goes into a fresh `..<time>` directory, `..data` is switched to it with one
//! rename, and every key is a symlink through `..data`; so a running container sees either the
//! old or the new content, never a mix. [`refresh`] runs on every pod sync and rewrites a
//! volume only when its content changed.

pub mod atomic;
pub mod env;
pub mod user;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};

pub use env::resolve_env;
pub use user::user_of;

use crate::spec::BindMount;
use crate::{Agent, AgentError};

/// The pod's host name (`spec.hostname` or its name, at most 63 characters).
pub fn hostname(pod: &Pod, host_network: bool) -> String {
    if host_network {
        return nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
    }
    let spec = pod.spec.as_ref();
    let name = spec
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(['-', '.'])
        .to_string()
}

/// Writes `etc-hosts`, `resolv.conf` and `hostname` in the pod directory.
pub fn write_etc_files(
    agent: &Agent,
    pod: &Pod,
    dir: &Path,
    ip: Option<IpAddr>,
) -> Result<(), AgentError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let name = hostname(pod, host_network);
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let domain = &agent.config.cluster_domain;
    let io =
        |e: std::io::Error| AgentError::Io(format!("write pod files in {}: {e}", dir.display()));
    let hosts = if host_network {
        std::fs::read_to_string("/etc/hosts").unwrap_or_default()
    } else {
        let mut h = String::from(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
        );
        if let Some(ip) = ip {
            match spec.subdomain.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => h.push_str(&format!(
                    "{ip}\t{name}.{sub}.{namespace}.svc.{domain}\t{name}\n"
                )),
                None => h.push_str(&format!("{ip}\t{name}\n")),
            }
        }
        for alias in spec.host_aliases.iter().flatten() {
            h.push_str(&format!(
                "\n# Entries added by HostAliases.\n{}\t{}\n",
                alias.ip,
                alias.hostnames.clone().unwrap_or_default().join("\t")
            ));
        }
        h
    };
    std::fs::write(dir.join("etc-hosts"), hosts).map_err(io)?;
    std::fs::write(dir.join("hostname"), format!("{name}\n")).map_err(io)?;
    std::fs::write(dir.join("resolv.conf"), resolv_conf(agent, pod)).map_err(io)?;
    Ok(())
}

/// `/etc/resolv.conf` by dnsPolicy: ClusterFirst uses the cluster DNS when the node has one
/// (otherwise the host's, like a node without CoreDNS), Default the host's, None only dnsConfig.
pub fn resolv_conf(agent: &Agent, pod: &Pod) -> String {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec
        .dns_policy
        .clone()
        .unwrap_or_else(|| "ClusterFirst".into());
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let domain = &agent.config.cluster_domain;
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut nameservers: Vec<String> = Vec::new();
    let mut searches: Vec<String> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let host_parts = |ns: &mut Vec<String>, se: &mut Vec<String>, op: &mut Vec<String>| {
        for line in host.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => ns.extend(words.map(String::from)),
                Some("search") | Some("domain") => se.extend(words.map(String::from)),
                Some("options") => op.extend(words.map(String::from)),
                _ => {}
            }
        }
    };
    let cluster_first = match policy.as_str() {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    };
    match (policy.as_str(), agent.config.cluster_dns) {
        ("None", _) => {}
        (_, Some(dns)) if cluster_first => {
            nameservers.push(dns.to_string());
            searches.extend([
                format!("{namespace}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.clone(),
            ]);
            let mut host_search = Vec::new();
            host_parts(&mut Vec::new(), &mut host_search, &mut Vec::new());
            searches.extend(host_search);
            options.push("ndots:5".into());
        }
        _ => host_parts(&mut nameservers, &mut searches, &mut options),
    }
    if let Some(cfg) = &spec.dns_config {
        nameservers.extend(cfg.nameservers.clone().unwrap_or_default());
        searches.extend(cfg.searches.clone().unwrap_or_default());
        for o in cfg.options.iter().flatten() {
            let Some(name) = &o.name else { continue };
            options.retain(|x| x.split(':').next() != Some(name.as_str()));
            options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.clone(),
            });
        }
    }
    nameservers.dedup();
    nameservers.truncate(3);
    searches.dedup();
    searches.truncate(32);
    let mut out = String::new();
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    for ns in &nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

fn volume_dir(pod_dir: &Path, name: &str) -> PathBuf {
    pod_dir.join("volumes").join(name)
}

fn fs_group(pod: &Pod) -> Option<u32> {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group)
        .map(|g| g as u32)
}

/// The bind mounts of a container: the pod's etc files and its volumeMounts.
pub async fn mounts(
    agent: &Agent,
    pod: &Pod,
    c: &Container,
    pod_dir: &Path,
) -> Result<Vec<BindMount>, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let volumes: BTreeMap<String, Volume> = spec
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let mut out = Vec::new();
    let mounted: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for (file, target) in [
        ("etc-hosts", "/etc/hosts"),
        ("resolv.conf", "/etc/resolv.conf"),
        ("hostname", "/etc/hostname"),
    ] {
        if !mounted.contains(&target) {
            out.push(BindMount {
                host_path: pod_dir.join(file),
                container_path: target.into(),
                read_only: false,
            });
        }
    }
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes.get(&m.name).ok_or_else(|| {
            format!(
                "volumeMount {:?} of container {:?} names no volume of the pod",
                m.name, c.name
            )
        })?;
        let source = prepare(agent, pod, v, pod_dir).await?;
        let mut host_path = source.path;
        let sub = m.sub_path.clone().filter(|s| !s.is_empty()).or_else(|| {
            m.sub_path_expr.clone().filter(|s| !s.is_empty()).map(|e| {
                let vars: BTreeMap<String, String> = c
                    .env
                    .iter()
                    .flatten()
                    .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                    .collect();
                crate::spec::expand(&e, &vars)
            })
        });
        if let Some(sub) = sub {
            if sub.starts_with('/') || sub.split('/').any(|p| p == "..") {
                return Err(format!(
                    "subPath {sub:?} of volumeMount {:?} must be a relative path without '..'",
                    m.name
                ));
            }
            host_path = host_path.join(&sub);
            if !host_path.exists() {
                std::fs::create_dir_all(&host_path)
                    .map_err(|e| format!("create subPath {}: {e}", host_path.display()))?;
            }
        }
        out.push(BindMount {
            host_path,
            container_path: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false) || source.read_only,
        });
    }
    Ok(out)
}

struct Prepared {
    path: PathBuf,
    read_only: bool,
}

/// Makes a volume ready on the host and returns where it is.
async fn prepare(agent: &Agent, pod: &Pod, v: &Volume, pod_dir: &Path) -> Result<Prepared, String> {
    let dir = volume_dir(pod_dir, &v.name);
    if let Some(host) = &v.host_path {
        check_host_path(&host.path, host.type_.as_deref())?;
        return Ok(Prepared {
            path: PathBuf::from(&host.path),
            read_only: false,
        });
    }
    if let Some(e) = &v.empty_dir {
        let memory = e.medium.as_deref() == Some("Memory");
        // After a reboot the directory is there but its tmpfs is not.
        if !dir.exists() || (memory && !is_mount_point(&dir)) {
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            if memory {
                let size = e
                    .size_limit
                    .as_ref()
                    .and_then(sitekit::quantity::units)
                    .unwrap_or(agent.memory_capacity / 2)
                    .max(4096);
                mount_tmpfs(&dir, size)?;
            }
            set_mode(&dir, 0o777);
            if let Some(g) = fs_group(pod) {
                let _ = nix::unistd::chown(&dir, None, Some(nix::unistd::Gid::from_raw(g)));
            }
        }
        return Ok(Prepared {
            path: dir,
            read_only: false,
        });
    }
    if v.config_map.is_some()
        || v.secret.is_some()
        || v.downward_api.is_some()
        || v.projected.is_some()
    {
        // Secrets never touch the disk.
        let memory = v.secret.is_some() || v.projected.is_some();
        if !dir.exists() || (memory && !is_mount_point(&dir)) {
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            if memory {
                mount_tmpfs(&dir, 64 << 20)?;
            }
        }
        let files = project(agent, pod, v).await?;
        if let Some(files) = files {
            atomic::write(&dir, &files, fs_group(pod))
                .map_err(|e| format!("write volume {:?}: {e}", v.name))?;
        }
        return Ok(Prepared {
            path: dir,
            read_only: true,
        });
    }
    if v.ephemeral.is_some() {
        // A generic ephemeral volume: the claim the server made for this pod.
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let claim =
            sitekit::claims::ephemeral_claim(pod.metadata.name.as_deref().unwrap_or(""), &v.name);
        let path = claim_path(agent, namespace, &claim).await?;
        return Ok(Prepared {
            path,
            read_only: false,
        });
    }
    if let Some(source) = &v.persistent_volume_claim {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let path = claim_path(agent, namespace, &source.claim_name).await?;
        return Ok(Prepared {
            path,
            read_only: source.read_only.unwrap_or(false),
        });
    }
    Err(format!(
        "volume {:?}: this volume type is not supported by EdgeSite (supported: emptyDir, hostPath, configMap, secret, downwardAPI, projected, persistentVolumeClaim, ephemeral)",
        v.name
    ))
}

/// Where the volume bound to a claim is on this node (from the node's cache when the API is
/// away, so a node restarted offline mounts its pods' claims). A `local` volume's path must
/// exist; a `hostPath` one is checked or made by its type; a volume the site's local-path
/// provisioner made is created world-writable, as K3s's provisioner does, so containers that
/// do not run as root can write to it.
async fn claim_path(agent: &Agent, namespace: &str, claim: &str) -> Result<PathBuf, String> {
    use controllers::persistent_volume as pv;
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let found = agent
        .meta
        .get::<PersistentVolumeClaim>(namespace, claim)
        .await
        .map_err(|e| format!("get persistentvolumeclaim \"{claim}\": {e}"))?
        .ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" not found"))?;
    let volume_name = pv::volume_name(&found)
        .ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" is not bound to a volume yet"))?
        .to_string();
    let volume = agent
        .meta
        .get_cluster::<PersistentVolume>(&volume_name)
        .await
        .map_err(|e| format!("get persistentvolume \"{volume_name}\": {e}"))?
        .ok_or_else(|| {
            format!("persistentvolume \"{volume_name}\" (of claim \"{claim}\") not found")
        })?;
    let spec = volume.spec.clone().unwrap_or_default();
    if let Some(host) = &spec.host_path {
        let made_here = volume
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(pv::PROVISIONED_BY))
            .is_some_and(|p| p == pv::PROVISIONER);
        let path = Path::new(&host.path);
        if made_here && !path.exists() {
            std::fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", host.path))?;
            set_mode(path, 0o777);
        }
        check_host_path(&host.path, host.type_.as_deref())?;
        return Ok(PathBuf::from(&host.path));
    }
    if let Some(local) = &spec.local {
        if !Path::new(&local.path).exists() {
            return Err(format!(
                "local volume \"{volume_name}\": path \"{}\" does not exist on this node",
                local.path
            ));
        }
        return Ok(PathBuf::from(&local.path));
    }
    Err(format!(
        "persistentvolume \"{volume_name}\": only hostPath and local volumes can be mounted on this node"
    ))
}

/// Whether something is mounted on `dir` (it lives on another device than its parent).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(d), Some(Ok(p))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) else {
        return false;
    };
    d.dev() != p.dev()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

fn mount_tmpfs(dir: &Path, size: i64) -> Result<(), String> {
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(format!("size={size}").as_str()),
    )
    .map_err(|e| format!("mount tmpfs on {}: {e}", dir.display()))
}

fn check_host_path(path: &str, kind: Option<&str>) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let p = Path::new(path);
    let meta = std::fs::metadata(p);
    let wrong = |what: &str| Err(format!("hostPath type check failed: {path} is not {what}"));
    match kind.unwrap_or("") {
        "" => Ok(()),
        "DirectoryOrCreate" => {
            if !p.exists() {
                std::fs::create_dir_all(p).map_err(|e| format!("create {path}: {e}"))?;
                set_mode(p, 0o755);
            }
            Ok(())
        }
        "FileOrCreate" => {
            if !p.exists() {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| format!("create {path}: {e}"))?;
                }
                std::fs::write(p, b"").map_err(|e| format!("create {path}: {e}"))?;
                set_mode(p, 0o644);
            }
            Ok(())
        }
        "Directory" => match meta {
            Ok(m) if m.is_dir() => Ok(()),
            _ => wrong("a directory"),
        },
        "File" => match meta {
            Ok(m) if m.is_file() => Ok(()),
            _ => wrong("a file"),
        },
        "Socket" => match meta {
            Ok(m) if m.file_type().is_socket() => Ok(()),
            _ => wrong("a socket file"),
        },
        "CharDevice" => match meta {
            Ok(m) if m.file_type().is_char_device() => Ok(()),
            _ => wrong("a character device"),
        },
        "BlockDevice" => match meta {
            Ok(m) if m.file_type().is_block_device() => Ok(()),
            _ => wrong("a block device"),
        },
        other => Err(format!("hostPath type {other:?} is not a known type")),
    }
}

/// The files a configMap/secret/downwardAPI/projected volume holds now; `None` when an
/// optional source is missing and nothing should change.
async fn project(
    agent: &Agent,
    pod: &Pod,
    v: &Volume,
) -> Result<Option<Vec<atomic::File>>, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut files = Vec::new();
    if let Some(cm) = &v.config_map {
        let name = cm.name.clone();
        let data = config_map_data(agent, &namespace, &name, cm.optional.unwrap_or(false)).await?;
        files.extend(select(
            &data,
            cm.items.as_deref(),
            cm.default_mode,
            &format!("configmap {name:?}"),
            cm.optional.unwrap_or(false),
        )?);
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let data = secret_data(agent, &namespace, &name, s.optional.unwrap_or(false)).await?;
        files.extend(select(
            &data,
            s.items.as_deref(),
            s.default_mode.or(Some(0o644)),
            &format!("secret {name:?}"),
            s.optional.unwrap_or(false),
        )?);
    } else if let Some(d) = &v.downward_api {
        for item in d.items.iter().flatten() {
            files.push(downward_file(agent, pod, item, d.default_mode)?);
        }
    } else if let Some(p) = &v.projected {
        for source in p.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                let name = cm.name.clone();
                let data =
                    config_map_data(agent, &namespace, &name, cm.optional.unwrap_or(false)).await?;
                files.extend(select(
                    &data,
                    cm.items.as_deref(),
                    p.default_mode,
                    &format!("configmap {name:?}"),
                    cm.optional.unwrap_or(false),
                )?);
            }
            if let Some(s) = &source.secret {
                let name = s.name.clone();
                let data =
                    secret_data(agent, &namespace, &name, s.optional.unwrap_or(false)).await?;
                files.extend(select(
                    &data,
                    s.items.as_deref(),
                    p.default_mode,
                    &format!("secret {name:?}"),
                    s.optional.unwrap_or(false),
                )?);
            }
            if let Some(d) = &source.downward_api {
                for item in d.items.iter().flatten() {
                    files.push(downward_file(agent, pod, item, p.default_mode)?);
                }
            }
            if let Some(t) = &source.service_account_token {
                files.push(env::service_account_token(agent, pod, t, p.default_mode).await?);
            }
            if let Some(ctb) = &source.cluster_trust_bundle {
                return Err(format!(
                    "clusterTrustBundle projections ({:?}) are not supported",
                    ctb.path
                ));
            }
        }
    }
    Ok(Some(files))
}

async fn config_map_data(
    agent: &Agent,
    namespace: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    match agent.meta.get::<ConfigMap>(namespace, name).await {
        Ok(Some(cm)) => {
            let mut out: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                out.insert(k, v.0);
            }
            Ok(out)
        }
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(format!("configmap \"{name}\" not found")),
        Err(e) => Err(format!("get configmap \"{name}\": {e}")),
    }
}

async fn secret_data(
    agent: &Agent,
    namespace: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    match agent.meta.get::<Secret>(namespace, name).await {
        Ok(Some(s)) => {
            let mut out: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                out.insert(k, v.into_bytes());
            }
            Ok(out)
        }
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(format!("secret \"{name}\" not found")),
        Err(e) => Err(format!("get secret \"{name}\": {e}")),
    }
}

fn select(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    what: &str,
    optional: bool,
) -> Result<Vec<atomic::File>, String> {
    let mode = default_mode.unwrap_or(0o644) as u32;
    match items {
        None => Ok(data
            .iter()
            .map(|(k, v)| atomic::File {
                path: k.clone(),
                content: v.clone(),
                mode,
            })
            .collect()),
        Some(items) => {
            let mut out = Vec::new();
            for item in items {
                match data.get(&item.key) {
                    Some(v) => out.push(atomic::File {
                        path: item.path.clone(),
                        content: v.clone(),
                        mode: item.mode.map(|m| m as u32).unwrap_or(mode),
                    }),
                    None if optional => {}
                    None => {
                        return Err(format!(
                            "{what} has no key {:?} (referenced by the volume's items)",
                            item.key
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

fn downward_file(
    agent: &Agent,
    pod: &Pod,
    item: &DownwardAPIVolumeFile,
    default_mode: Option<i32>,
) -> Result<atomic::File, String> {
    let value = if let Some(f) = &item.field_ref {
        env::field_value(pod, &f.field_path, None)?
    } else if let Some(r) = &item.resource_field_ref {
        env::resource_value(agent, pod, r)?
    } else {
        return Err(format!(
            "downwardAPI item {:?} needs fieldRef or resourceFieldRef",
            item.path
        ));
    };
    Ok(atomic::File {
        path: item.path.clone(),
        content: value.into_bytes(),
        mode: item.mode.or(default_mode).unwrap_or(0o644) as u32,
    })
}

/// Rewrites the content volumes of a running pod whose sources changed (configMap/secret
/// updates reach running containers, as upstream).
pub async fn refresh(agent: &Agent, pod: &Pod, pod_dir: &Path) -> Result<(), String> {
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let dir = volume_dir(pod_dir, &v.name);
        // Not set up yet (or its tmpfs is gone after a reboot): the next start prepares it.
        let memory = v.secret.is_some() || v.projected.is_some();
        if !dir.exists() || (memory && !is_mount_point(&dir)) {
            continue;
        }
        let projected = v.config_map.is_some()
            || v.secret.is_some()
            || v.downward_api.is_some()
            || v.projected.is_some();
        if projected && let Some(files) = project(agent, pod, v).await? {
            atomic::write(&dir, &files, fs_group(pod))
                .map_err(|e| format!("update volume {:?}: {e}", v.name))?;
        }
    }
    Ok(())
}

/// Unmounts the pod's tmpfs volumes so its directory can be removed.
pub fn cleanup(pod_dir: &Path) {
    let volumes = pod_dir.join("volumes");
    for entry in std::fs::read_dir(&volumes).into_iter().flatten().flatten() {
        let p = entry.path();
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
