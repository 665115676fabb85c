//! The CNI plugin chain edged runs for every pod: `loopback` for `lo`, then `bridge` (with
//! `host-local` IPAM over the node's pod CIDR, masquerading traffic that leaves the cluster
//! CIDR) and `portmap` (hostPorts) for `eth0`. The plugins are the standard binaries from the
//! OS package (`containernetworking-plugins`); edgesite generates their configuration.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const CNI_VERSION: &str = "1.0.0";
/// Directories searched for plugins, in order (Debian's package, then the upstream default).
pub const DEFAULT_BIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error(
        "CNI plugin {0} not found in {1}: install the CNI plugins (apt-get install containernetworking-plugins; the EdgeSite installer does this) or pass --cni-bin-dir"
    )]
    PluginMissing(String, String),
    #[error("CNI {plugin} {command}: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI {0}")]
    Io(String),
}

/// Static settings of the node's pod network.
#[derive(Clone, Debug)]
pub struct CniConfig {
    pub bin_dirs: Vec<PathBuf>,
    /// The network's name (host-local keeps its leases under it).
    pub network: String,
    /// The Linux bridge pods attach to.
    pub bridge: String,
    /// host-local's lease directory.
    pub ipam_dir: PathBuf,
    pub mtu: Option<u32>,
}

/// A hostPort to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
    pub host_ip: Option<String>,
}

/// Who the attachment is for (CNI_ARGS, and the id host-local and portmap key on).
pub struct Attachment<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub netns: &'a Path,
    pub ports: &'a [PortMapping],
}

#[derive(Clone, Debug)]
pub struct Cni {
    config: CniConfig,
}

impl Cni {
    pub fn new(config: CniConfig) -> Self {
        Cni { config }
    }

    /// Fails with the fix when the plugins are not installed.
    pub fn check(&self) -> Result<(), CniError> {
        for p in ["loopback", "bridge", "host-local", "portmap"] {
            self.plugin(p)?;
        }
        Ok(())
    }

    fn plugin(&self, name: &str) -> Result<PathBuf, CniError> {
        self.config
            .bin_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::PluginMissing(
                    name.into(),
                    self.config
                        .bin_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":"),
                )
            })
    }

    fn bridge_config(&self, subnet: &str) -> Value {
        let mut bridge = json!({
            "type": "bridge",
            "bridge": self.config.bridge,
            "isGateway": true,
            // One rule per node instead (masquerade.rs).
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.config.ipam_dir,
            },
        });
        if let Some(mtu) = self.config.mtu {
            bridge["mtu"] = json!(mtu);
        }
        bridge
    }

    fn plugins(&self, subnet: &str) -> Vec<Value> {
        vec![
            self.bridge_config(subnet),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ]
    }

    /// Sets up `lo` and `eth0` in the pod's namespace; returns the pod's IP.
    pub async fn add(&self, a: &Attachment<'_>, subnet: &str) -> Result<IpAddr, CniError> {
        let lo =
            json!({"cniVersion": CNI_VERSION, "name": self.config.network, "type": "loopback"});
        self.exec("loopback", "ADD", a, "lo", &lo).await?;
        let mut prev: Option<Value> = None;
        for plugin in self.plugins(subnet) {
            let mut conf = plugin.clone();
            conf["cniVersion"] = json!(CNI_VERSION);
            conf["name"] = json!(self.config.network);
            if let Some(p) = &prev {
                conf["prevResult"] = p.clone();
            }
            if plugin["type"] == "portmap" {
                if a.ports.is_empty() {
                    continue;
                }
                conf["runtimeConfig"] = json!({"portMappings": port_json(a.ports)});
            }
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            let result = self.exec(&ty, "ADD", a, "eth0", &conf).await?;
            prev = Some(result);
        }
        let result = prev.unwrap_or(Value::Null);
        result["ips"]
            .as_array()
            .and_then(|ips| ips.first())
            .and_then(|ip| ip["address"].as_str())
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| CniError::Plugin {
                plugin: "bridge".into(),
                command: "ADD",
                message: format!("no IP address in the result {result}"),
            })
    }

    /// Releases the pod's IP, port mappings and masquerade rules (the namespace may be gone).
    pub async fn del(&self, a: &Attachment<'_>, subnet: &str) -> Result<(), CniError> {
        let mut first_error = None;
        for plugin in self.plugins(subnet).into_iter().rev() {
            let mut conf = plugin.clone();
            conf["cniVersion"] = json!(CNI_VERSION);
            conf["name"] = json!(self.config.network);
            if plugin["type"] == "portmap" {
                if a.ports.is_empty() {
                    continue;
                }
                conf["runtimeConfig"] = json!({"portMappings": port_json(a.ports)});
            }
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            if let Err(e) = self.exec(&ty, "DEL", a, "eth0", &conf).await {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn exec(
        &self,
        plugin: &str,
        command: &'static str,
        a: &Attachment<'_>,
        ifname: &str,
        conf: &Value,
    ) -> Result<Value, CniError> {
        let path = self.plugin(plugin)?;
        let cni_path = self
            .config
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let netns = if a.netns.exists() {
            a.netns.display().to_string()
        } else {
            String::new()
        };
        let mut child = tokio::process::Command::new(&path)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", a.id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    a.namespace, a.name, a.id
                ),
            )
            .env("CNI_PATH", cni_path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CniError::Io(format!("start {}: {e}", path.display())))?;
        let input = serde_json::to_vec(conf).unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&input)
                .await
                .map_err(|e| CniError::Io(format!("write to {plugin}: {e}")))?;
        }
        let output =
            tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
                .await
                .map_err(|_| CniError::Plugin {
                    plugin: plugin.into(),
                    command,
                    message: "no answer within 60 s".into(),
                })?
                .map_err(|e| CniError::Io(format!("run {plugin}: {e}")))?;
        let stdout: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if !output.status.success() {
            // CNI errors are JSON on stdout: {"code":..,"msg":..,"details":..}.
            let message = match (stdout["msg"].as_str(), stdout["details"].as_str()) {
                (Some(m), Some(d)) if !d.is_empty() => format!("{m}: {d}"),
                (Some(m), _) => m.to_string(),
                _ => String::from_utf8_lossy(&output.stderr).trim().to_string(),
            };
            return Err(CniError::Plugin {
                plugin: plugin.into(),
                command,
                message,
            });
        }
        Ok(stdout)
    }
}

fn port_json(ports: &[PortMapping]) -> Value {
    Value::Array(
        ports
            .iter()
            .map(|p| {
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol.to_lowercase(),
                });
                if let Some(ip) = &p.host_ip {
                    m["hostIP"] = json!(ip);
                }
                m
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_config_uses_the_node_subnet_and_our_ipam_dir() {
        let cni = Cni::new(CniConfig {
            bin_dirs: vec!["/usr/lib/cni".into()],
            network: "edgesite".into(),
            bridge: "es0".into(),
            ipam_dir: "/var/lib/edgesite/agent/cni".into(),
            mtu: None,
        });
        let plugins = cni.plugins("10.42.3.0/24");
        assert_eq!(plugins[0]["ipam"]["ranges"][0][0]["subnet"], "10.42.3.0/24");
        assert_eq!(plugins[0]["bridge"], "es0");
        assert_eq!(plugins[0]["ipam"]["dataDir"], "/var/lib/edgesite/agent/cni");
        assert_eq!(plugins[1]["type"], "portmap");
        let ports = port_json(&[PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "TCP".into(),
            host_ip: None,
        }]);
        assert_eq!(ports[0]["protocol"], "tcp");
    }
}
