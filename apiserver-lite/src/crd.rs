//! CustomResourceDefinitions: validation of the CRD itself, its status, and the served resources
//! it adds to the registry. Pure code; `http::resources` calls [`sync`] after CRD writes and
//! `server` at start-up.

use serde_json::{Value, json};

use crate::error::Cause;
use crate::registry::{
    CustomResource, PrinterColumn, Registry, ResourceInfo, ScalePaths, SubresourceInfo,
};
use crate::validation::{is_dns1035_label, is_dns1123_label, is_dns1123_subdomain};

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn strings(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Upstream's CRD validation (the parts a user is likely to get wrong).
pub fn validate(crd: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let group = s(crd, "/spec/group");
    let plural = s(crd, "/spec/names/plural");
    let name = s(crd, "/metadata/name");
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    } else if let Err(why) = is_dns1123_subdomain(group) {
        causes.push(Cause::invalid("spec.group", &json!(group), &why));
    } else if !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            &json!(group),
            "should be a domain with at least one dot",
        ));
    }
    for (field, value) in [
        ("plural", plural),
        ("singular", s(crd, "/spec/names/singular")),
    ] {
        if field == "plural" && value.is_empty() {
            causes.push(Cause::required("spec.names.plural"));
        } else if !value.is_empty()
            && let Err(why) = is_dns1123_label(value)
        {
            causes.push(Cause::invalid(
                format!("spec.names.{field}"),
                &json!(value),
                &why,
            ));
        }
    }
    if s(crd, "/spec/names/kind").is_empty() {
        causes.push(Cause::required("spec.names.kind"));
    }
    for short in strings(crd, "/spec/names/shortNames") {
        if let Err(why) = is_dns1035_label(&short) {
            causes.push(Cause::invalid("spec.names.shortNames", &json!(short), &why));
        }
    }
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match s(crd, "/spec/scope") {
        "Namespaced" | "Cluster" => {}
        "" => causes.push(Cause::required("spec.scope")),
        other => causes.push(Cause::unsupported(
            "spec.scope",
            &json!(other),
            &["Cluster", "Namespaced"],
        )),
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::required("spec.versions"));
    }
    let storage = versions.iter().filter(|v| v["storage"] == true).count();
    if !versions.is_empty() && storage != 1 {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(
                versions
                    .iter()
                    .map(|v| v["name"].clone())
                    .collect::<Vec<_>>()
            ),
            "must have exactly one version marked as storage version",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        if s(v, "/name").is_empty() {
            causes.push(Cause::required(format!("spec.versions[{i}].name")));
        }
        if v.pointer("/schema/openAPIV3Schema").is_none() {
            causes.push(Cause::required(format!(
                "spec.versions[{i}].schema.openAPIV3Schema"
            )));
        } else if s(v, "/schema/openAPIV3Schema/type") != "object" {
            causes.push(Cause::invalid(
                format!("spec.versions[{i}].schema.openAPIV3Schema.type"),
                &json!(s(v, "/schema/openAPIV3Schema/type")),
                "must be object at the root",
            ));
        }
        for (j, c) in v
            .pointer("/additionalPrinterColumns")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let t = s(c, "/type");
            if !["integer", "number", "string", "boolean", "date"].contains(&t) {
                causes.push(Cause::unsupported(
                    format!("spec.versions[{i}].additionalPrinterColumns[{j}].type"),
                    &json!(t),
                    &["boolean", "date", "integer", "number", "string"],
                ));
            }
            if s(c, "/jsonPath").is_empty() {
                causes.push(Cause::required(format!(
                    "spec.versions[{i}].additionalPrinterColumns[{j}].jsonPath"
                )));
            }
        }
    }
    causes
}

/// The status the API server reports for an accepted CRD.
pub fn status(crd: &Value, now: &str) -> Value {
    let storage: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v["storage"] == true)
                .map(|v| v["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    let mut stored: Vec<Value> = crd
        .pointer("/status/storedVersions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for v in storage {
        if !stored.contains(&v) {
            stored.push(v);
        }
    }
    let mut names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    if names.get("singular").is_none_or(|v| v == "") {
        names["singular"] = json!(s(crd, "/spec/names/kind").to_lowercase());
    }
    if names.get("listKind").is_none_or(|v| v == "") {
        names["listKind"] = json!(format!("{}List", s(crd, "/spec/names/kind")));
    }
    json!({
        "acceptedNames": names,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
        "storedVersions": stored,
    })
}

fn columns(version: &Value) -> Vec<PrinterColumn> {
    let defined = version
        .pointer("/additionalPrinterColumns")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if defined.is_empty() {
        return vec![PrinterColumn {
            name: "Age".into(),
            kind: "date".into(),
            format: String::new(),
            description: String::new(),
            priority: 0,
            json_path: ".metadata.creationTimestamp".into(),
        }];
    }
    defined
        .iter()
        .map(|c| PrinterColumn {
            name: s(c, "/name").to_string(),
            kind: s(c, "/type").to_string(),
            format: s(c, "/format").to_string(),
            description: s(c, "/description").to_string(),
            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
            json_path: s(c, "/jsonPath").to_string(),
        })
        .collect()
}

/// The resources a CRD serves, one per served version.
pub fn resources(crd: &Value) -> Vec<ResourceInfo> {
    let group = s(crd, "/spec/group");
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let kind = s(&names, "/kind");
    let plural = s(&names, "/plural");
    let singular = match s(&names, "/singular") {
        "" => kind.to_lowercase(),
        other => other.to_string(),
    };
    let namespaced = s(crd, "/spec/scope") == "Namespaced";
    let storage_version = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == true)
        .map(|v| s(v, "/name").to_string())
        .unwrap_or_default();
    let mut out = Vec::new();
    for v in crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        if v["served"] != true {
            continue;
        }
        let mut subresources = Vec::new();
        let status = v.pointer("/subresources/status").is_some();
        if status {
            subresources.push(SubresourceInfo {
                name: "status",
                group: "",
                version: "",
                kind: "",
                verbs: &["get", "patch", "update"],
            });
        }
        let scale = v.pointer("/subresources/scale").map(|sc| ScalePaths {
            spec_replicas: s(sc, "/specReplicasPath").to_string(),
            status_replicas: s(sc, "/statusReplicasPath").to_string(),
            label_selector: s(sc, "/labelSelectorPath").to_string(),
        });
        if scale.is_some() {
            subresources.push(SubresourceInfo {
                name: "scale",
                group: "autoscaling",
                version: "v1",
                kind: "Scale",
                verbs: &["get", "patch", "update"],
            });
        }
        let schema =
            std::sync::Arc::new(v.pointer("/schema/openAPIV3Schema").cloned().unwrap_or(
                json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            ));
        out.push(ResourceInfo {
            strategy: std::sync::Arc::new(crate::kinds::Custom {
                schema: schema.clone(),
            }),
            printer: std::sync::Arc::new(crate::tables::CustomColumns {
                columns: columns(&v),
            }),
            // Versions other than the storage version are views of its objects.
            stored_as: (s(&v, "/name") != storage_version && !storage_version.is_empty()).then(
                || crate::registry::StoredAs {
                    group: group.to_string(),
                    version: storage_version.clone(),
                    resource: plural.to_string(),
                    kind: kind.to_string(),
                },
            ),
            group: group.to_string(),
            version: s(&v, "/name").to_string(),
            resource: plural.to_string(),
            singular: singular.clone(),
            kind: kind.to_string(),
            namespaced,
            short_names: strings(&names, "/shortNames"),
            categories: strings(&names, "/categories"),
            verbs: crate::registry::builtin::ALL_VERBS.to_vec(),
            subresources,
            typed: None,
            custom: Some(CustomResource {
                schema,
                status,
                scale,
                list_kind: match s(&names, "/listKind") {
                    "" => format!("{kind}List"),
                    other => other.to_string(),
                },
                selectable: v
                    .get("selectableFields")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.get("jsonPath").and_then(Value::as_str))
                    .map(|path| {
                        let label = path.trim_start_matches('.').to_string();
                        let pointer = format!("/{}", label.replace('.', "/"));
                        (label, pointer)
                    })
                    .collect(),
            }),
        });
    }
    out
}

/// Brings the registry in line with a CRD after it was written (or deleted: `None`).
pub fn sync(registry: &Registry, name: &str, crd: Option<&Value>) {
    // One step: the writing server and its follower of the stored CRDs both apply a write, and
    // a request between a removal and an addition must not find the resource gone.
    registry.replace(
        |r| r.custom.is_some() && format!("{}.{}", r.resource, r.group) == name,
        crd.map(resources).unwrap_or_default(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crontab() -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "crontabs.stable.example.com"},
            "spec": {"group": "stable.example.com", "scope": "Namespaced",
                "names": {"plural": "crontabs", "singular": "crontab", "kind": "CronTab", "shortNames": ["ct"]},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                    "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}},
                    "additionalPrinterColumns": [{"name": "Spec", "type": "string", "jsonPath": ".spec.cronSpec"}]}]}})
    }

    #[test]
    fn a_crd_applied_again_is_never_missing_meanwhile() {
        let registry = Registry::new();
        sync(&registry, "crontabs.stable.example.com", Some(&crontab()));
        let writer = {
            let registry = registry.clone();
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    sync(&registry, "crontabs.stable.example.com", Some(&crontab()));
                }
            })
        };
        while !writer.is_finished() {
            assert!(
                registry
                    .get("stable.example.com", "v1", "crontabs")
                    .is_some()
            );
        }
        writer.join().unwrap();
    }

    #[test]
    fn a_valid_crd_serves_its_versions() {
        assert!(validate(&crontab()).is_empty());
        let rs = resources(&crontab());
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].short_names, vec!["ct"]);
        assert!(rs[0].has_status() && rs[0].has_subresource("scale"));
        let registry = Registry::new();
        sync(&registry, "crontabs.stable.example.com", Some(&crontab()));
        assert!(
            registry
                .get("stable.example.com", "v1", "crontabs")
                .is_some()
        );
        sync(&registry, "crontabs.stable.example.com", None);
        assert!(
            registry
                .get("stable.example.com", "v1", "crontabs")
                .is_none()
        );
    }

    #[test]
    fn mistakes_are_reported() {
        let mut bad = crontab();
        bad["metadata"]["name"] = json!("wrong");
        bad["spec"]["versions"][0]["storage"] = json!(false);
        let causes: Vec<String> = validate(&bad).iter().map(Cause::display).collect();
        assert!(
            causes
                .iter()
                .any(|c| c.starts_with("metadata.name: Invalid value: \"wrong\"")),
            "{causes:?}"
        );
        assert!(
            causes
                .iter()
                .any(|c| c.contains("exactly one version marked as storage version")),
            "{causes:?}"
        );
    }
}
