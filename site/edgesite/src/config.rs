//! The config file: `/etc/edgesite/config.yaml` with the flag names as keys (as K3s does);
//! `/etc/edgesite/cloudhub-config.yaml` for `edgesite cloudhub`.
//!
//! Its entries become command-line arguments placed before the user's own, so that flags given on
//! the command line win for single values and add to lists (`tls-san`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_yaml::Value;

pub const DEFAULT_CONFIG: &str = "/etc/edgesite/config.yaml";
pub const DEFAULT_HUB_CONFIG: &str = "/etc/edgesite/cloudhub-config.yaml";

/// Whose config file: the server's or the hub's (its default path, the environment variable
/// that names another, and the command whose flags are its keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Of {
    Server,
    Hub,
}

impl Of {
    fn default_path(self) -> &'static str {
        match self {
            Of::Server => DEFAULT_CONFIG,
            Of::Hub => DEFAULT_HUB_CONFIG,
        }
    }

    fn env(self) -> &'static str {
        match self {
            Of::Server => "EDGESITE_CONFIG_FILE",
            Of::Hub => "EDGESITE_CLOUDHUB_CONFIG_FILE",
        }
    }

    fn command(self) -> &'static str {
        match self {
            Of::Server => "edgesite server",
            Of::Hub => "edgesite cloudhub",
        }
    }
}

/// The config file the arguments name (`--config X`, `-c X`, `--config=X`), or `of`'s default.
pub fn config_path(args: &[String], of: Of) -> (PathBuf, bool) {
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == "--config" || a == "-c" {
            if let Some(p) = iter.next() {
                return (PathBuf::from(p), true);
            }
        } else if let Some(p) = a.strip_prefix("--config=") {
            return (PathBuf::from(p), true);
        }
    }
    if let Ok(p) = std::env::var(of.env()) {
        return (PathBuf::from(p), true);
    }
    (PathBuf::from(of.default_path()), false)
}

/// Reads the config file into `--key=value` arguments. A missing default file is fine; a missing
/// file the user named is an error. `known` are `of`'s flags, which an unknown key's error names.
pub fn file_args(path: &Path, explicit: bool, known: &[String], of: Of) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read config file {}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_yaml::from_str(&text)
        .with_context(|| format!("parse config file {} as YAML", path.display()))?;
    let Value::Mapping(map) = value else {
        bail!(
            "config file {}: expected a mapping of flag names to values",
            path.display()
        );
    };
    let mut args = Vec::new();
    for (k, v) in map {
        let Some(key) = k.as_str() else {
            bail!("config file {}: keys must be flag names", path.display());
        };
        if key == "config" || !known.iter().any(|n| n == key) {
            bail!(
                "config file {}: unknown key {key:?} (keys are the flag names of `{} --help`, without the leading --)",
                path.display(),
                of.command()
            );
        }
        let scalar = |v: &Value| -> Result<String> {
            Ok(match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => bail!(
                    "config file {}: key {key:?} has an unsupported value {other:?}",
                    path.display()
                ),
            })
        };
        match &v {
            Value::Bool(true) => args.push(format!("--{key}")),
            Value::Bool(false) | Value::Null => {}
            Value::Sequence(items) => {
                for item in items {
                    args.push(format!("--{key}={}", scalar(item)?));
                }
            }
            other => args.push(format!("--{key}={}", scalar(other)?)),
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_becomes_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "https-listen-port: 7443\ntls-san:\n  - a.example\n  - 10.0.0.1\ndisable-agent: true\n",
        )
        .unwrap();
        let known: Vec<String> = ["https-listen-port", "tls-san", "disable-agent"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let args = file_args(&path, true, &known, Of::Server).unwrap();
        assert_eq!(
            args,
            vec![
                "--https-listen-port=7443",
                "--tls-san=a.example",
                "--tls-san=10.0.0.1",
                "--disable-agent"
            ]
        );
        std::fs::write(&path, "bogus: 1\n").unwrap();
        assert!(
            file_args(&path, true, &known, Of::Server)
                .unwrap_err()
                .to_string()
                .contains("unknown key \"bogus\"")
        );
        assert!(
            file_args(&dir.path().join("none.yaml"), false, &known, Of::Server)
                .unwrap()
                .is_empty()
        );
        assert!(file_args(&dir.path().join("none.yaml"), true, &known, Of::Server).is_err());
    }

    #[test]
    fn finds_the_config_flag() {
        let args: Vec<String> = ["edgesite", "server", "--config=/x.yaml"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            config_path(&args, Of::Server),
            (PathBuf::from("/x.yaml"), true)
        );
    }
}
