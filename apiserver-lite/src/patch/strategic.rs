//! Kubernetes strategic merge patch for built-in kinds. Pure code.
//!
//! Like a JSON merge patch, except that some lists are merged instead of replaced: lists of
//! objects by a merge key (`containers` by `name`, container `ports` by `containerPort`, ...) and
//! some lists of strings as sets (`finalizers`). Directives: `$patch: replace|delete|merge`,
//! `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>`, `$retainKeys`.
//! The merge keys are upstream's `patchMergeKey` tags for the fields of the kinds we serve.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ListStrategy {
    Replace,
    MergePrimitive,
    MergeKey(&'static str),
}

const CONTAINER_LISTS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];

/// The strategy of list `field` under `parents` (field names from the root, no indices).
pub fn list_strategy(parents: &[String], field: &str) -> ListStrategy {
    let parent = parents.last().map(String::as_str).unwrap_or("");
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => ListStrategy::MergeKey("name"),
        "volumeMounts" => ListStrategy::MergeKey("mountPath"),
        "volumeDevices" => ListStrategy::MergeKey("devicePath"),
        "hostAliases" => ListStrategy::MergeKey("ip"),
        "podIPs" | "hostIPs" => ListStrategy::MergeKey("ip"),
        "topologySpreadConstraints" => ListStrategy::MergeKey("topologyKey"),
        "ownerReferences" if parent == "metadata" => ListStrategy::MergeKey("uid"),
        "finalizers" if parent == "metadata" => ListStrategy::MergePrimitive,
        "conditions" => ListStrategy::MergeKey("type"),
        "addresses" if parent == "status" => ListStrategy::MergeKey("type"),
        "secrets" if parents.is_empty() => ListStrategy::MergeKey("name"),
        "ports" if CONTAINER_LISTS.contains(&parent) => ListStrategy::MergeKey("containerPort"),
        "ports" if parent == "spec" && parents.len() == 1 => ListStrategy::MergeKey("port"),
        _ => ListStrategy::Replace,
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatchError {
    #[error("{0}")]
    Invalid(String),
}

/// Applies a strategic merge patch to `live` (an object of a built-in kind).
pub fn apply(live: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::Invalid(
            "strategic merge patch must be a JSON object".into(),
        ));
    };
    let mut out = live.clone();
    if !out.is_object() {
        out = Value::Object(Map::new());
    }
    let mut path = Vec::new();
    merge_map(out.as_object_mut().expect("object"), patch, &mut path)?;
    Ok(out)
}

fn merge_map(
    live: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *live = patch
                .iter()
                .filter(|(k, _)| *k != "$patch")
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect();
            return Ok(());
        }
        Some("delete") => {
            live.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::Invalid(format!(
                "unknown patch type: {other:?}"
            )));
        }
    }
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = value
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            if let Some(Value::Array(items)) = live.get_mut(list) {
                items.retain(|v| !remove.contains(&v));
            }
            continue;
        }
        if value.is_null() {
            live.remove(key);
            continue;
        }
        match value {
            Value::Object(p) => {
                if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                    live.remove(key);
                    continue;
                }
                let entry = live
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                path.push(key.clone());
                let result = merge_map(entry.as_object_mut().expect("object"), p, path);
                path.pop();
                result?;
            }
            Value::Array(items) => {
                let strategy = list_strategy(path, key);
                let current = live.remove(key);
                path.push(key.clone());
                let merged = merge_list(current, items, strategy, path);
                path.pop();
                let mut merged = merged?;
                if let Some(Value::Array(order)) = patch.get(&format!("$setElementOrder/{key}")) {
                    reorder(&mut merged, order, strategy);
                }
                live.insert(key.clone(), Value::Array(merged));
            }
            other => {
                live.insert(key.clone(), other.clone());
            }
        }
    }
    // `$setElementOrder` for a list the patch did not otherwise touch.
    for (key, order) in patch {
        if let (Some(list), Value::Array(order)) = (key.strip_prefix("$setElementOrder/"), order)
            && !patch.contains_key(list)
            && let Some(Value::Array(items)) = live.get_mut(list)
        {
            let strategy = list_strategy(path, list);
            reorder(items, order, strategy);
        }
    }
    if let Some(Value::Array(retain)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        live.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge_list(
    current: Option<Value>,
    patch: &[Value],
    strategy: ListStrategy,
    path: &mut Vec<String>,
) -> Result<Vec<Value>, PatchError> {
    let mut live = match current {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|p| p.get("$patch").is_none())
            .map(strip_directives)
            .collect());
    }
    match strategy {
        ListStrategy::Replace => Ok(patch.iter().map(strip_directives).collect()),
        ListStrategy::MergePrimitive => {
            for p in patch {
                if !live.contains(p) {
                    live.push(p.clone());
                }
            }
            Ok(live)
        }
        ListStrategy::MergeKey(key) => {
            for p in patch {
                let Some(pm) = p.as_object() else {
                    return Err(PatchError::Invalid(format!(
                        "list {} with merge key {key:?} must contain objects",
                        path.join(".")
                    )));
                };
                let Some(id) = pm.get(key) else {
                    return Err(PatchError::Invalid(format!(
                        "map: {p} does not contain declared merge key: {key}"
                    )));
                };
                let position = live.iter().position(|l| l.get(key) == Some(id));
                match pm.get("$patch").and_then(Value::as_str) {
                    Some("delete") => {
                        live.retain(|l| l.get(key) != Some(id));
                    }
                    _ => match position {
                        Some(i) => {
                            if !live[i].is_object() {
                                live[i] = Value::Object(Map::new());
                            }
                            merge_map(live[i].as_object_mut().expect("object"), pm, path)?;
                        }
                        None => live.push(strip_directives(p)),
                    },
                }
            }
            Ok(live)
        }
    }
}

/// Orders `items` as `order` lists them; items not listed keep their relative order after them.
fn reorder(items: &mut Vec<Value>, order: &[Value], strategy: ListStrategy) {
    let id_of = |v: &Value| -> Value {
        match strategy {
            ListStrategy::MergeKey(key) => v.get(key).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let wanted: Vec<Value> = order.iter().map(id_of).collect();
    let mut ordered = Vec::with_capacity(items.len());
    for w in &wanted {
        if let Some(i) = items.iter().position(|it| &id_of(it) == w) {
            ordered.push(items.remove(i));
        }
    }
    ordered.append(items);
    *items = ordered;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name_and_env_entries_delete() {
        let live = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1.14", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
             "ports": [{"containerPort": 80}]},
            {"name": "side", "image": "busybox"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "web"}, {"name": "side"}],
            "containers": [{"name": "web", "image": "nginx:1.16",
                "$setElementOrder/env": [{"name": "A"}],
                "env": [{"name": "B", "$patch": "delete"}],
                "ports": [{"containerPort": 443}]}]}}}});
        let out = apply(&live, &patch).unwrap();
        let c = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["image"], "nginx:1.16");
        assert_eq!(c[0]["env"], json!([{"name": "A", "value": "1"}]));
        assert_eq!(
            c[0]["ports"],
            json!([{"containerPort": 80}, {"containerPort": 443}])
        );
        assert_eq!(c[1]["name"], "side");
    }

    #[test]
    fn service_ports_by_port_and_nulls_delete() {
        let live = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"ports": [{"port": 80, "targetPort": 8080}]}});
        let patch = json!({"metadata": {"labels": {"a": null}, "finalizers": ["y"]},
            "spec": {"ports": [{"port": 80, "targetPort": 9090}, {"port": 443}]}});
        let out = apply(&live, &patch).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "targetPort": 9090}, {"port": 443}])
        );
    }

    #[test]
    fn directives() {
        let live = json!({"spec": {"tolerations": [{"key": "a"}], "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}},
            "metadata": {"finalizers": ["a", "b"]}});
        let patch = json!({"spec": {"tolerations": [{"key": "b"}],
            "strategy": {"$retainKeys": ["type"], "type": "Recreate"}},
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}});
        let out = apply(&live, &patch).unwrap();
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "b"}]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        let replaced = apply(&live, &json!({"spec": {"$patch": "replace", "x": 1}})).unwrap();
        assert_eq!(replaced["spec"], json!({"x": 1}));
        assert!(apply(&live, &json!([1])).is_err());
        assert!(apply(&live, &json!({"spec": {"containers": [{"image": "x"}]}})).is_err());
    }
}
