//! OverridePolicy and ClusterOverridePolicy: what a template becomes at the sites a rule
//! targets, applied to the Work's manifest per site, in Karmada's order (cluster-wide policies
//! first, then the template namespace's, each by name; rules in order; within a rule the image,
//! command, args, labels and annotations overriders, then plaintext JSON patches).

use serde_json::{Value, json};

use apiserver_lite::selectors::LabelSelector;

/// Whether a policy's `resourceSelectors` select `manifest` (none: every template).
pub fn selects(selectors: &Value, manifest: &Value) -> bool {
    let Some(list) = selectors.as_array().filter(|l| !l.is_empty()) else {
        return true;
    };
    list.iter().any(|s| {
        let field = |v: &Value| v.as_str().unwrap_or_default().to_string();
        s["apiVersion"] == manifest["apiVersion"]
            && s["kind"] == manifest["kind"]
            && (field(&s["namespace"]).is_empty()
                || s["namespace"] == manifest["metadata"]["namespace"])
            && (field(&s["name"]).is_empty() || s["name"] == manifest["metadata"]["name"])
            && s.get("labelSelector")
                .filter(|l| !l.is_null())
                .and_then(|l| LabelSelector::from_object(l).ok())
                .is_none_or(|sel| sel.matches_object(manifest))
    })
}

/// The pod spec paths of a workload kind's containers.
fn pod_spec_pointer(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Pod" => "/spec",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => "/spec/template/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        _ => return None,
    })
}

/// An image reference split as Karmada's image parser does: `[registry/]repository[:tag|@digest]`.
#[derive(Debug, PartialEq)]
struct Image {
    registry: String,
    repository: String,
    /// `:tag` or `@sha256:...`, with its separator.
    tag: String,
}

impl Image {
    fn parse(text: &str) -> Image {
        let (registry, rest) = match text.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (String::new(), text.to_string()),
        };
        let (repository, tag) = if let Some(at) = rest.find('@') {
            (rest[..at].to_string(), rest[at..].to_string())
        } else if let Some(colon) = rest.rfind(':') {
            (rest[..colon].to_string(), rest[colon..].to_string())
        } else {
            (rest, String::new())
        };
        Image {
            registry,
            repository,
            tag,
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if !self.registry.is_empty() {
            out.push_str(&self.registry);
            out.push('/');
        }
        out.push_str(&self.repository);
        out.push_str(&self.tag);
        out
    }

    fn apply(&mut self, component: &str, operator: &str, value: &str) {
        let tag_value = || {
            if value.starts_with("sha256:") {
                format!("@{value}")
            } else {
                format!(":{value}")
            }
        };
        match (component, operator) {
            ("Registry", "add") => self.registry.push_str(value),
            ("Registry", "replace") => self.registry = value.to_string(),
            ("Registry", "remove") => self.registry.clear(),
            ("Repository", "add") => self.repository.push_str(value),
            ("Repository", "replace") => self.repository = value.to_string(),
            ("Repository", "remove") => self.repository.clear(),
            ("Tag", "add") if self.tag.is_empty() => self.tag = tag_value(),
            ("Tag", "add") => self.tag.push_str(value),
            ("Tag", "replace") => self.tag = tag_value(),
            ("Tag", "remove") => self.tag.clear(),
            _ => {}
        }
    }
}

fn containers<'a>(manifest: &'a mut Value, pointer: &str) -> Vec<&'a mut Value> {
    let mut out = Vec::new();
    if let Some(spec) = manifest.pointer_mut(pointer).and_then(Value::as_object_mut) {
        for (key, list) in spec.iter_mut() {
            if key == "containers" || key == "initContainers" {
                out.extend(list.as_array_mut().into_iter().flatten());
            }
        }
    }
    out
}

/// Applies one rule's `overriders` to `manifest`.
pub fn apply(manifest: &mut Value, overriders: &Value) -> Result<(), String> {
    let kind = manifest["kind"].as_str().unwrap_or_default().to_string();
    let list = |name: &str| overriders[name].as_array().cloned().unwrap_or_default();
    for o in list("imageOverrider") {
        let component = o["component"].as_str().unwrap_or_default();
        let operator = o["operator"].as_str().unwrap_or_default();
        let value = o["value"].as_str().unwrap_or_default();
        let mut images: Vec<&mut Value> = match o["predicate"]["path"].as_str() {
            Some(path) => manifest.pointer_mut(path).into_iter().collect(),
            None => match pod_spec_pointer(&kind) {
                Some(p) => containers(manifest, p)
                    .into_iter()
                    .filter_map(|c| c.get_mut("image"))
                    .collect(),
                None => Vec::new(),
            },
        };
        for image in images.iter_mut() {
            let Some(text) = image.as_str() else { continue };
            let mut parsed = Image::parse(text);
            parsed.apply(component, operator, value);
            **image = json!(parsed.render());
        }
    }
    for (name, field) in [("commandOverrider", "command"), ("argsOverrider", "args")] {
        for o in list(name) {
            let Some(pointer) = pod_spec_pointer(&kind) else {
                continue;
            };
            let target = o["containerName"].as_str().unwrap_or_default();
            let values: Vec<Value> = o["value"].as_array().cloned().unwrap_or_default();
            for c in containers(manifest, pointer) {
                if c["name"].as_str() != Some(target) {
                    continue;
                }
                let current = c
                    .as_object_mut()
                    .map(|c| c.entry(field).or_insert_with(|| json!([])));
                let Some(Value::Array(current)) = current else {
                    continue;
                };
                match o["operator"].as_str() {
                    Some("add") => current.extend(values.iter().cloned()),
                    Some("remove") => current.retain(|v| !values.contains(v)),
                    _ => {}
                }
            }
        }
    }
    for (name, field) in [
        ("labelsOverrider", "labels"),
        ("annotationsOverrider", "annotations"),
    ] {
        for o in list(name) {
            let Some(meta) = manifest["metadata"].as_object_mut() else {
                continue;
            };
            let map = meta.entry(field).or_insert_with(|| json!({}));
            let Some(map) = map.as_object_mut() else {
                continue;
            };
            for (k, v) in o["value"].as_object().into_iter().flatten() {
                match o["operator"].as_str() {
                    Some("add") => {
                        map.insert(k.clone(), v.clone());
                    }
                    Some("replace") if map.contains_key(k) => {
                        map.insert(k.clone(), v.clone());
                    }
                    Some("remove") => {
                        map.remove(k);
                    }
                    _ => {}
                }
            }
        }
    }
    let patches: Vec<Value> = list("plaintext")
        .iter()
        .map(|p| {
            let mut op = json!({"op": p["operator"], "path": p["path"]});
            if p["operator"] != "remove" {
                op["value"] = p.get("value").cloned().unwrap_or(Value::Null);
            }
            op
        })
        .collect();
    if !patches.is_empty() {
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(patches))
            .map_err(|e| format!("plaintext overrider: {e}"))?;
        json_patch::patch(manifest, &patch).map_err(|e| format!("plaintext overrider: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_split_and_change_as_karmadas() {
        let i = Image::parse("registry.example:5000/team/web:1.2");
        assert_eq!(i.registry, "registry.example:5000");
        assert_eq!(i.repository, "team/web");
        assert_eq!(i.tag, ":1.2");
        let mut i = Image::parse("busybox");
        i.apply("Registry", "replace", "mirror.local");
        i.apply("Tag", "replace", "1.36");
        assert_eq!(i.render(), "mirror.local/busybox:1.36");
        let mut i = Image::parse("docker.io/library/nginx@sha256:abc");
        i.apply("Registry", "remove", "");
        assert_eq!(i.render(), "library/nginx@sha256:abc");
    }

    #[test]
    fn overriders_change_the_manifest() {
        let mut m = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"a": "1"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "web", "image": "busybox:1.0", "command": ["httpd"]}]}}}});
        apply(
            &mut m,
            &json!({
                "imageOverrider": [{"component": "Registry", "operator": "add", "value": "mirror.eu"}],
                "commandOverrider": [{"containerName": "web", "operator": "add", "value": ["-f"]}],
                "labelsOverrider": [{"operator": "add", "value": {"site": "eu"}}],
                "plaintext": [{"path": "/spec/replicas", "operator": "replace", "value": 5}],
            }),
        )
        .unwrap();
        let c = &m["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "mirror.eu/busybox:1.0");
        assert_eq!(c["command"], json!(["httpd", "-f"]));
        assert_eq!(m["metadata"]["labels"]["site"], "eu");
        assert_eq!(m["spec"]["replicas"], 5);
        assert!(
            apply(
                &mut m,
                &json!({"plaintext": [{"path": "/nope/x", "operator": "replace", "value": 1}]})
            )
            .is_err()
        );
    }
}
