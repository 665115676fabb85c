//! What the server serves: one [`ResourceInfo`] per REST resource.
//!
//! Built-in kinds are listed in [`builtin`], each tied to its `k8s-openapi` type, which gives the
//! server upstream's decoding (unknown fields dropped, wrong types rejected) and the schema behind
//! OpenAPI and `kubectl explain`. Each carries its [`crate::kinds::Strategy`] (defaults,
//! validation, status handling, field selectors), as upstream's REST strategies.

pub mod builtin;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;

/// A subresource as discovery shows it (`pods/status`, `deployments/scale`, ...).
#[derive(Debug, Clone)]
pub struct SubresourceInfo {
    pub name: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub verbs: &'static [&'static str],
}

/// Why a body does not decode into its kind: where, and what serde said.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// `spec.containers[0]`; empty at the root.
    pub path: String,
    pub message: String,
}

impl DecodeError {
    /// The field a "missing field" error names, with its full path.
    pub fn missing_field(&self) -> Option<String> {
        let field = self
            .message
            .strip_prefix("missing field `")?
            .strip_suffix('`')?;
        Some(if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        })
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Typed operations of a kind that `k8s-openapi` knows.
pub struct TypedKind {
    /// Decodes into the typed struct and encodes back: upstream's decoding in one step.
    pub normalize: fn(&Value) -> Result<Value, DecodeError>,
    pub schema_name: fn() -> Cow<'static, str>,
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

/// A printer column of a custom resource (`additionalPrinterColumns`).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    pub name: String,
    pub kind: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// Where a custom resource keeps the numbers of its scale subresource (JSON paths like `.spec.replicas`).
#[derive(Debug, Clone)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: String,
}

/// What a CRD says about one served version of a custom resource.
#[derive(Debug, Clone)]
pub struct CustomResource {
    /// Shared with the resource's strategy, which validates against it.
    pub schema: Arc<serde_json::Value>,
    pub status: bool,
    pub scale: Option<ScalePaths>,
    pub list_kind: String,
    /// Field selector labels from the version's `selectableFields` (`spec.nodeName`), with the
    /// JSON pointer of each (`/spec/nodeName`).
    pub selectable: Vec<(String, String)>,
}

/// Where a resource's objects live when they are another resource's: a second view of the same
/// stored objects, converted on the way in and out, as upstream stores one object per
/// resource whatever version it is written in. `events.k8s.io/v1` Events are core/v1 Events
/// (`regarding` is `involvedObject`, `note` is `message`, ...); a CRD's served versions share
/// the objects of its storage version (the `None` conversion: only `apiVersion` changes).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAs {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub kind: String,
}

impl StoredAs {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// One REST resource.
pub struct ResourceInfo {
    pub group: String,
    pub version: String,
    /// Plural, lower case: `pods`.
    pub resource: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub verbs: Vec<&'static str>,
    pub subresources: Vec<SubresourceInfo>,
    pub typed: Option<TypedKind>,
    /// Set for resources defined by a CustomResourceDefinition.
    pub custom: Option<CustomResource>,
    /// The kind's behaviour (defaults, preparation, validation, field labels).
    pub strategy: Arc<dyn crate::kinds::Strategy>,
    /// How it prints as a Table.
    pub printer: Arc<dyn crate::tables::Printer>,
    /// Set when its objects are stored as another version or resource ([`StoredAs`]).
    pub stored_as: Option<StoredAs>,
}

impl ResourceInfo {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        match &self.custom {
            Some(c) => c.list_kind.clone(),
            None => format!("{}List", self.kind),
        }
    }

    /// The group and resource its objects are stored under.
    pub fn storage_resource(&self) -> (&str, &str) {
        match &self.stored_as {
            Some(s) => (&s.group, &s.resource),
            None => (&self.group, &self.resource),
        }
    }

    /// A stored object as this resource serves it (see [`StoredAs`]). Objects of resources that
    /// own their storage are left alone.
    pub fn from_storage(&self, object: &mut Value) {
        let Some(stored) = &self.stored_as else {
            return;
        };
        let ours = self.api_version();
        if object.get("apiVersion").and_then(Value::as_str) == Some(ours.as_str()) {
            return;
        }
        crate::conversion::to_view(&stored.group, &stored.resource, &ours, object);
        if let Some(o) = object.as_object_mut() {
            o.insert("apiVersion".into(), Value::String(ours));
            o.insert("kind".into(), Value::String(self.kind.clone()));
        }
    }

    /// An object of this resource as it is stored (the inverse of [`Self::from_storage`]).
    pub fn to_storage(&self, object: &mut Value) {
        let Some(stored) = &self.stored_as else {
            return;
        };
        let ours = self.api_version();
        crate::conversion::to_storage(&stored.group, &stored.resource, &ours, object);
        if let Some(o) = object.as_object_mut() {
            o.insert("apiVersion".into(), Value::String(stored.api_version()));
            o.insert("kind".into(), Value::String(stored.kind.clone()));
        }
    }

    pub fn has_subresource(&self, name: &str) -> bool {
        self.subresources.iter().any(|s| s.name == name)
    }

    pub fn has_status(&self) -> bool {
        self.has_subresource("status")
    }

    /// The path of a collection, for `selfLink`-like messages and OpenAPI.
    pub fn collection_path(&self, namespace: Option<&str>) -> String {
        let root = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{root}/namespaces/{ns}/{}", self.resource),
            _ => format!("{root}/{}", self.resource),
        }
    }
}

/// Resources keyed by (group, version, plural).
type ResourceMap = BTreeMap<(String, String, String), Arc<ResourceInfo>>;

/// The set of served resources. Built-ins are fixed; custom resources come and go with CRDs.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RwLock<ResourceMap>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let mut map = BTreeMap::new();
        for info in builtin::resources() {
            map.insert(
                (
                    info.group.clone(),
                    info.version.clone(),
                    info.resource.clone(),
                ),
                Arc::new(info),
            );
        }
        Registry {
            inner: Arc::new(RwLock::new(map)),
        }
    }

    pub fn get(&self, group: &str, version: &str, resource: &str) -> Option<Arc<ResourceInfo>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(group.to_string(), version.to_string(), resource.to_string()))
            .cloned()
    }

    /// All resources, ordered by group, version and resource.
    pub fn all(&self) -> Vec<Arc<ResourceInfo>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The served versions of each group, groups in discovery order (core first, then as upstream
    /// orders its built-in groups, custom groups last).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for info in self.all() {
            match groups.iter_mut().find(|(g, _)| *g == info.group) {
                Some((_, versions)) => {
                    if !versions.contains(&info.version) {
                        versions.push(info.version.clone());
                    }
                }
                None => groups.push((info.group.clone(), vec![info.version.clone()])),
            }
        }
        groups.sort_by_key(|(g, _)| group_rank(g));
        for (_, versions) in &mut groups {
            versions.sort_by_key(|v| version_priority(v));
        }
        groups
    }

    pub fn add(&self, info: ResourceInfo) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (
                    info.group.clone(),
                    info.version.clone(),
                    info.resource.clone(),
                ),
                Arc::new(info),
            );
    }

    /// Drops the resources for which `gone` is true and adds `added`, in one step: a request
    /// never finds a resource missing that is only being replaced.
    pub fn replace(&self, gone: impl Fn(&ResourceInfo) -> bool, added: Vec<ResourceInfo>) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, r| !gone(r));
        for info in added {
            map.insert(
                (
                    info.group.clone(),
                    info.version.clone(),
                    info.resource.clone(),
                ),
                Arc::new(info),
            );
        }
    }

    /// Keeps only the resources for which `keep` is true.
    pub fn retain(&self, keep: impl Fn(&ResourceInfo) -> bool) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, r| keep(r));
    }

    pub fn remove(&self, group: &str, version: &str, resource: &str) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(group.to_string(), version.to_string(), resource.to_string()));
    }

    /// Finds a resource by kind, for bodies whose kind must match the URL and for owner lookups.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceInfo>> {
        self.all()
            .into_iter()
            .find(|r| r.kind == kind && r.api_version() == api_version)
    }
}

/// Kubernetes' version priority, highest first (the first is the group's preferred version):
/// GA before beta before alpha, higher numbers first (`v2`, `v1`, `v1beta2`, `v1beta1`,
/// `v1alpha1`), then anything else by name.
pub fn version_priority(
    version: &str,
) -> (u8, std::cmp::Reverse<u64>, std::cmp::Reverse<u64>, String) {
    use std::cmp::Reverse;
    let parse = || -> Option<(u8, u64, u64)> {
        let rest = version.strip_prefix('v')?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let major: u64 = rest[..digits].parse().ok()?;
        let tail = &rest[digits..];
        if tail.is_empty() {
            return Some((0, major, 0));
        }
        let (class, number) = if let Some(n) = tail.strip_prefix("beta") {
            (1, n)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (2, n)
        } else {
            return None;
        };
        Some((class, major, number.parse().ok()?))
    };
    match parse() {
        Some((class, major, minor)) => (class, Reverse(major), Reverse(minor), String::new()),
        None => (3, Reverse(0), Reverse(0), version.to_string()),
    }
}

fn group_rank(group: &str) -> (usize, String) {
    const ORDER: &[&str] = &[
        "",
        "apiregistration.k8s.io",
        "apps",
        "events.k8s.io",
        "authentication.k8s.io",
        "authorization.k8s.io",
        "autoscaling",
        "batch",
        "certificates.k8s.io",
        "networking.k8s.io",
        "policy",
        "rbac.authorization.k8s.io",
        "storage.k8s.io",
        "admissionregistration.k8s.io",
        "apiextensions.k8s.io",
        "scheduling.k8s.io",
        "coordination.k8s.io",
        "node.k8s.io",
        "discovery.k8s.io",
        "flowcontrol.apiserver.k8s.io",
        "metrics.k8s.io",
    ];
    match ORDER.iter().position(|g| *g == group) {
        Some(i) => (i, String::new()),
        None => (ORDER.len(), group.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_by_kubernetes_priority() {
        let mut v = vec![
            "v1alpha1",
            "v1",
            "foo",
            "v2",
            "v1beta2",
            "v11alpha2",
            "v1beta1",
            "v10",
        ];
        v.sort_by_key(|x| version_priority(x));
        assert_eq!(
            v,
            [
                "v10",
                "v2",
                "v1",
                "v1beta2",
                "v1beta1",
                "v11alpha2",
                "v1alpha1",
                "foo"
            ]
        );
    }

    #[test]
    fn autoscaling_prefers_v2() {
        let groups = Registry::new().groups();
        let (_, versions) = groups.iter().find(|(g, _)| g == "autoscaling").unwrap();
        assert_eq!(versions, &["v2", "v1"]);
    }
}
