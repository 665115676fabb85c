//! Field management: `metadata.managedFields` (FieldsV1) and server-side apply. Pure code.
//!
//! A field set is a tree in FieldsV1 shape: `{"f:spec": {"f:replicas": {}}}`, list items by key
//! `k:{"name":"web"}`, set members `v:"x"`, and `.` for a list item itself. Every write records
//! which manager set which fields; an apply that would change a field another manager owns is a
//! conflict unless forced. This follows structured-merge-diff's model with one simplification: a
//! list whose strategic merge key we know is a map keyed by it, other lists are atomic.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::strategic::{ListStrategy, list_strategy};

/// A FieldsV1 tree; an empty map is a leaf.
pub type FieldSet = Map<String, Value>;

/// Metadata fields that identify the object or belong to the system, never owned by a manager.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// The fields set in `object` (an applied configuration or a whole object).
pub fn field_set(object: &Value, include_status: bool) -> FieldSet {
    let mut set = Map::new();
    let Some(map) = object.as_object() else {
        return set;
    };
    for (k, v) in map {
        if k == "apiVersion" || k == "kind" || (k == "status" && !include_status) {
            continue;
        }
        if k == "metadata" {
            let mut meta = Map::new();
            if let Some(m) = v.as_object() {
                for (mk, mv) in m {
                    if SYSTEM_METADATA.contains(&mk.as_str()) || mv.is_null() {
                        continue;
                    }
                    let mut path = vec!["metadata".to_string()];
                    meta.insert(
                        format!("f:{mk}"),
                        Value::Object(value_set(mv, &mut path, mk)),
                    );
                }
            }
            if !meta.is_empty() {
                set.insert("f:metadata".into(), Value::Object(meta));
            }
            continue;
        }
        if v.is_null() {
            continue;
        }
        let mut path = Vec::new();
        set.insert(format!("f:{k}"), Value::Object(value_set(v, &mut path, k)));
    }
    set
}

/// The set below field `field` whose value is `value`, at `parents`.
fn value_set(value: &Value, parents: &mut Vec<String>, field: &str) -> FieldSet {
    match value {
        Value::Object(m) => {
            let mut set = Map::new();
            parents.push(field.to_string());
            for (k, v) in m {
                if v.is_null() {
                    continue;
                }
                set.insert(format!("f:{k}"), Value::Object(value_set(v, parents, k)));
            }
            parents.pop();
            set
        }
        Value::Array(items) => match list_strategy(parents, field) {
            ListStrategy::Replace => Map::new(),
            ListStrategy::MergePrimitive => items
                .iter()
                .map(|i| (format!("v:{i}"), json!({})))
                .collect(),
            ListStrategy::MergeKey(key) => {
                let mut set = Map::new();
                parents.push(field.to_string());
                for item in items {
                    let Some(id) = item.get(key) else { continue };
                    let mut child = Map::new();
                    child.insert(".".into(), json!({}));
                    if let Some(m) = item.as_object() {
                        for (k, v) in m {
                            if v.is_null() {
                                continue;
                            }
                            child.insert(format!("f:{k}"), Value::Object(value_set(v, parents, k)));
                        }
                    }
                    set.insert(format!("k:{}", json!({ key: id })), Value::Object(child));
                }
                parents.pop();
                set
            }
        },
        _ => Map::new(),
    }
}

/// Every leaf path of a set (each path a list of elements such as `f:spec`).
pub fn leaves(set: &FieldSet) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    collect_leaves(set, &mut path, &mut out);
    out
}

fn collect_leaves(set: &FieldSet, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (k, v) in set {
        path.push(k.clone());
        match v.as_object() {
            Some(child) if !child.is_empty() => collect_leaves(child, path, out),
            _ => out.push(path.clone()),
        }
        path.pop();
    }
}

pub fn contains(set: &FieldSet, path: &[String]) -> bool {
    let mut node = set;
    for (i, element) in path.iter().enumerate() {
        match node.get(element).and_then(Value::as_object) {
            Some(child) if i + 1 == path.len() => {
                let _ = child;
                return true;
            }
            Some(child) => node = child,
            None => return false,
        }
    }
    true
}

/// Removes a path (and what is below it), pruning parents left empty.
pub fn remove_path(set: &mut FieldSet, path: &[String]) {
    fn go(node: &mut FieldSet, path: &[String]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return false;
        };
        if rest.is_empty() {
            node.remove(first);
        } else if let Some(Value::Object(child)) = node.get_mut(first)
            && go(child, rest)
        {
            node.remove(first);
        }
        node.is_empty()
    }
    go(set, path);
}

pub fn insert_path(set: &mut FieldSet, path: &[String]) {
    let mut node = set;
    for element in path {
        let entry = node.entry(element.clone()).or_insert_with(|| json!({}));
        if !entry.is_object() {
            *entry = json!({});
        }
        node = entry.as_object_mut().expect("object");
    }
}

/// The value a path points at, or `None` when the object does not set it.
pub fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = object;
    for element in path {
        if element == "." {
            continue;
        }
        if let Some(field) = element.strip_prefix("f:") {
            node = node.get(field)?;
        } else if let Some(key) = element.strip_prefix("k:") {
            let key: Value = serde_json::from_str(key).ok()?;
            let key = key.as_object()?;
            node = node
                .as_array()?
                .iter()
                .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))?;
        } else if let Some(member) = element.strip_prefix("v:") {
            let member: Value = serde_json::from_str(member).ok()?;
            node = node.as_array()?.iter().find(|item| **item == member)?;
        } else {
            return None;
        }
    }
    Some(node)
}

/// Removes the field a path points at from an object.
pub fn remove_value(object: &mut Value, path: &[String]) {
    let path: Vec<&String> = path.iter().filter(|e| *e != ".").collect();
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = object;
    for element in parents {
        let next = if let Some(field) = element.strip_prefix("f:") {
            node.get_mut(field)
        } else if let Some(key) = element.strip_prefix("k:") {
            let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key) else {
                return;
            };
            node.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(m) = node.as_object_mut() {
            m.remove(field);
        }
    } else if let Some(key) = last.strip_prefix("k:") {
        if let (Ok(Value::Object(key)), Some(items)) =
            (serde_json::from_str::<Value>(key), node.as_array_mut())
        {
            items.retain(|item| !key.iter().all(|(k, v)| item.get(k) == Some(v)));
        }
    } else if let Some(member) = last.strip_prefix("v:")
        && let (Ok(member), Some(items)) =
            (serde_json::from_str::<Value>(member), node.as_array_mut())
    {
        items.retain(|item| *item != member);
    }
}

/// `.spec.template.spec.containers[name="web"].image`, as upstream prints conflicting fields.
pub fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(field) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = element.strip_prefix("k:") {
            let shown = serde_json::from_str::<Value>(key)
                .ok()
                .and_then(|k| {
                    k.as_object().map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                })
                .unwrap_or_default();
            out.push_str(&format!("[{shown}]"));
        } else if let Some(member) = element.strip_prefix("v:") {
            out.push_str(&format!("[{member}]"));
        }
    }
    out
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: FieldSet,
}

impl ManagedEntry {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": Value::Object(self.fields.clone()),
        });
        if !self.subresource.is_empty() {
            v["subresource"] = json!(self.subresource);
        }
        v
    }

    fn from_json(v: &Value) -> Option<Self> {
        Some(ManagedEntry {
            manager: v.get("manager")?.as_str()?.to_string(),
            operation: v
                .get("operation")
                .and_then(Value::as_str)
                .unwrap_or("Update")
                .to_string(),
            api_version: v
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            time: v
                .get("time")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            subresource: v
                .get("subresource")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            fields: v
                .get("fieldsV1")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        })
    }
}

pub fn read_managed(object: &Value) -> Vec<ManagedEntry> {
    object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(ManagedEntry::from_json).collect())
        .unwrap_or_default()
}

pub fn write_managed(object: &mut Value, entries: &[ManagedEntry]) {
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let kept: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(ManagedEntry::to_json)
        .collect();
    if kept.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(kept));
    }
}

/// Who is writing: the manager name, its operation and the subresource written.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub time: &'a str,
    pub subresource: &'a str,
}

/// Records an Update operation: the fields that changed between `old` and `new` (all of `new` on
/// create) now belong to the writer; fields that disappeared belong to nobody.
pub fn track_update(old: Option<&Value>, new: &mut Value, writer: &Writer<'_>) {
    let status = writer.subresource == "status";
    let mut entries = match old {
        Some(old) => match new.pointer("/metadata/managedFields") {
            // A writer that sets managedFields (kubectl's upgrade from client-side to
            // server-side apply moves ownership this way) replaces them, as upstream's field
            // manager does; `[{}]` clears them; entries that cannot be read, or none, keep the
            // live ones (a client that does not know managedFields must not drop them).
            Some(given) if Some(given) != old.pointer("/metadata/managedFields") => {
                if *given == json!([{}]) {
                    Vec::new()
                } else {
                    let entries = read_managed(new);
                    if entries.is_empty() {
                        read_managed(old)
                    } else {
                        entries
                    }
                }
            }
            _ => read_managed(old),
        },
        None => read_managed(new),
    };
    let new_set = field_set(new, status);
    let old_set = old.map(|o| field_set(o, status)).unwrap_or_default();
    let mut changed = Vec::new();
    for path in leaves(&new_set) {
        if old.is_none()
            || value_at(old.expect("checked"), &path) != value_at(new, &path)
            || !contains(&old_set, &path)
        {
            changed.push(path);
        }
    }
    let removed: Vec<Vec<String>> = leaves(&old_set)
        .into_iter()
        .filter(|p| !contains(&new_set, p))
        .collect();
    for entry in entries.iter_mut() {
        for path in changed.iter().chain(removed.iter()) {
            if !(entry.manager == writer.manager
                && entry.operation == "Update"
                && entry.subresource == writer.subresource)
            {
                remove_path(&mut entry.fields, path);
            }
        }
        for path in &removed {
            remove_path(&mut entry.fields, path);
        }
    }
    if !changed.is_empty() {
        let position = entries.iter().position(|e| {
            e.manager == writer.manager
                && e.operation == "Update"
                && e.subresource == writer.subresource
        });
        let entry = match position {
            Some(i) => &mut entries[i],
            None => {
                entries.push(ManagedEntry {
                    manager: writer.manager.to_string(),
                    operation: "Update".into(),
                    api_version: writer.api_version.to_string(),
                    time: writer.time.to_string(),
                    subresource: writer.subresource.to_string(),
                    fields: Map::new(),
                });
                entries.last_mut().expect("just pushed")
            }
        };
        for path in &changed {
            insert_path(&mut entry.fields, path);
        }
        entry.time = writer.time.to_string();
        entry.api_version = writer.api_version.to_string();
    }
    write_managed(new, &entries);
}

/// A field another manager owns that the apply would change.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub path: String,
}

/// Deep-merges an applied configuration into an object: maps merge, keyed lists merge by key,
/// set lists union, everything else is replaced.
fn merge_applied(live: &mut Value, applied: &Value, parents: &mut Vec<String>) {
    let (Some(live_map), Some(applied_map)) = (live.as_object_mut(), applied.as_object()) else {
        *live = applied.clone();
        return;
    };
    for (k, v) in applied_map {
        match v {
            Value::Null => {}
            Value::Object(_) => {
                let entry = live_map.entry(k.clone()).or_insert_with(|| json!({}));
                if !entry.is_object() {
                    *entry = json!({});
                }
                parents.push(k.clone());
                merge_applied(entry, v, parents);
                parents.pop();
            }
            Value::Array(items) => match list_strategy(parents, k) {
                ListStrategy::Replace => {
                    live_map.insert(k.clone(), v.clone());
                }
                ListStrategy::MergePrimitive => {
                    let entry = live_map.entry(k.clone()).or_insert_with(|| json!([]));
                    if let Some(list) = entry.as_array_mut() {
                        for i in items {
                            if !list.contains(i) {
                                list.push(i.clone());
                            }
                        }
                    }
                }
                ListStrategy::MergeKey(key) => {
                    let entry = live_map.entry(k.clone()).or_insert_with(|| json!([]));
                    if !entry.is_array() {
                        *entry = json!([]);
                    }
                    parents.push(k.clone());
                    let list = entry.as_array_mut().expect("array");
                    for item in items {
                        let id = item.get(key);
                        match list.iter_mut().find(|l| l.get(key) == id && id.is_some()) {
                            Some(existing) => merge_applied(existing, item, parents),
                            None => list.push(item.clone()),
                        }
                    }
                    parents.pop();
                }
            },
            other => {
                live_map.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Server-side apply. Returns the new object (with managedFields) or the conflicts.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    writer: &Writer<'_>,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let status = writer.subresource == "status";
    let applied_set = field_set(applied, status);
    let mut entries = live.map(read_managed).unwrap_or_default();
    let is_me = |e: &ManagedEntry| {
        e.manager == writer.manager && e.operation == "Apply" && e.subresource == writer.subresource
    };
    let mut result = live.cloned().unwrap_or_else(|| json!({}));
    merge_applied(&mut result, applied, &mut Vec::new());
    // Conflicts: fields others own whose value the apply changes.
    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, Vec<String>)> = Vec::new();
    if let Some(live) = live {
        for (i, entry) in entries.iter().enumerate() {
            if is_me(entry) || entry.subresource != writer.subresource {
                continue;
            }
            for path in leaves(&applied_set) {
                if !contains(&entry.fields, &path) {
                    continue;
                }
                // A list item's or map's own entry (`.`) is about its existence: applying an item
                // that is there changes nothing (its fields are leaves of their own). Only leaf
                // values are compared, so an apply of what a client-side apply wrote (same
                // values, defaulted fields beside them) shares ownership instead of conflicting.
                let changes = if path.last().is_some_and(|e| e == ".") {
                    value_at(live, &path).is_none()
                } else {
                    value_at(live, &path) != value_at(applied, &path)
                };
                if changes {
                    conflicts.push(Conflict {
                        manager: entry.manager.clone(),
                        api_version: entry.api_version.clone(),
                        path: display_path(&path),
                    });
                    taken.push((i, path));
                } else if entry.operation == "Update" {
                    // Same value: shared ownership, nothing to take away.
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for (i, path) in &taken {
        remove_path(&mut entries[*i].fields, path);
    }
    // Fields this manager applied before and no longer applies are removed unless someone else owns them.
    if let Some(mine) = entries.iter().find(|e| is_me(e)) {
        for path in leaves(&mine.fields) {
            if contains(&applied_set, &path) {
                continue;
            }
            let others_own = entries
                .iter()
                .any(|e| !is_me(e) && contains(&e.fields, &path));
            if !others_own {
                remove_value(&mut result, &path);
            }
        }
    }
    entries.retain(|e| !is_me(e));
    entries.push(ManagedEntry {
        manager: writer.manager.to_string(),
        operation: "Apply".into(),
        api_version: writer.api_version.to_string(),
        time: writer.time.to_string(),
        subresource: writer.subresource.to_string(),
        fields: applied_set,
    });
    write_managed(&mut result, &entries);
    Ok(result)
}

/// Groups conflicts by manager for upstream's message.
pub fn conflict_message(conflicts: &[Conflict]) -> String {
    let mut by_manager: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for c in conflicts {
        by_manager
            .entry((c.manager.clone(), c.api_version.clone()))
            .or_default()
            .push(c.path.clone());
    }
    let count = conflicts.len();
    let noun = if count == 1 { "conflict" } else { "conflicts" };
    if by_manager.len() == 1 && count == 1 {
        let c = &conflicts[0];
        return format!(
            "Apply failed with 1 conflict: conflict with {:?} using {}: {}",
            c.manager, c.api_version, c.path
        );
    }
    let mut parts = Vec::new();
    for ((manager, api_version), paths) in by_manager {
        let mut part = format!("conflicts with {manager:?} using {api_version}:");
        for p in paths {
            part.push_str(&format!("\n- {p}"));
        }
        parts.push(part);
    }
    format!("Apply failed with {count} {noun}: {}", parts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer<'a>(manager: &'a str) -> Writer<'a> {
        Writer {
            manager,
            api_version: "apps/v1",
            time: "2024-01-01T00:00:00Z",
            subresource: "",
        }
    }

    fn deploy(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"app": "d"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}})
    }

    #[test]
    fn field_sets_use_keys() {
        let set = field_set(&deploy(1, "nginx"), false);
        let paths: Vec<String> = leaves(&set).iter().map(|p| display_path(p)).collect();
        assert!(paths.contains(&".spec.replicas".to_string()));
        assert!(paths.contains(&".spec.template.spec.containers[name=\"web\"].image".to_string()));
        assert!(paths.contains(&".metadata.labels.app".to_string()));
    }

    #[test]
    fn apply_conflicts_and_force() {
        let first = apply(None, &deploy(1, "nginx"), &writer("kubectl"), false).unwrap();
        // Another manager applying a different replica count conflicts.
        let err = apply(Some(&first), &deploy(3, "nginx"), &writer("other"), false).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].path, ".spec.replicas");
        assert_eq!(
            conflict_message(&err),
            "Apply failed with 1 conflict: conflict with \"kubectl\" using apps/v1: .spec.replicas"
        );
        // Same values are shared, not conflicts.
        assert!(apply(Some(&first), &deploy(1, "nginx"), &writer("other"), false).is_ok());
        let forced = apply(Some(&first), &deploy(3, "nginx"), &writer("other"), true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let managed = read_managed(&forced);
        let kubectl = managed.iter().find(|e| e.manager == "kubectl").unwrap();
        assert!(!contains(
            &kubectl.fields,
            &["f:spec".into(), "f:replicas".into()]
        ));
    }

    #[test]
    fn apply_removes_fields_it_no_longer_sets() {
        let mut with_label = deploy(1, "nginx");
        with_label["metadata"]["labels"]["tier"] = json!("web");
        let first = apply(None, &with_label, &writer("kubectl"), false).unwrap();
        assert_eq!(first["metadata"]["labels"]["tier"], "web");
        let second = apply(Some(&first), &deploy(1, "nginx"), &writer("kubectl"), false).unwrap();
        assert!(second["metadata"]["labels"].get("tier").is_none());
    }

    #[test]
    fn updates_take_ownership() {
        let mut created = deploy(1, "nginx");
        track_update(None, &mut created, &writer("kubectl-create"));
        let mut scaled = created.clone();
        scaled["spec"]["replicas"] = json!(5);
        track_update(Some(&created), &mut scaled, &writer("kubectl-scale"));
        let managed = read_managed(&scaled);
        assert_eq!(managed.len(), 2);
        let create = managed
            .iter()
            .find(|e| e.manager == "kubectl-create")
            .unwrap();
        assert!(!contains(
            &create.fields,
            &["f:spec".into(), "f:replicas".into()]
        ));
        let err = apply(
            Some(&scaled),
            &deploy(2, "nginx"),
            &writer("kubectl"),
            false,
        )
        .unwrap_err();
        assert_eq!(err[0].manager, "kubectl-scale");
    }
}
