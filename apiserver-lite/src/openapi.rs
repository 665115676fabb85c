//! OpenAPI v3: the index at `/openapi/v3` and one document per group-version.
//!
//! Schemas come from `k8s-openapi`'s `schemars` support (upstream's descriptions included), with
//! `x-kubernetes-group-version-kind` on every kind so `kubectl explain` finds them, and one path per
//! operation so kubectl sees the `fieldValidation` parameter on PATCH and switches to server-side
//! field validation. Documents are built on first request and cached; the index's `hash` changes
//! whenever the set of served resources does, so kubectl's cache follows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::registry::{Registry, ResourceInfo};

/// upstream's `patchStrategy`/`patchMergeKey` tags (and list types) for the types we serve:
/// kubectl computes strategic merge patches from these. `None` marks a set of strings.
const PATCH_META: &[(&str, &str, Option<&str>)] = &[
    ("io.k8s.api.core.v1.PodSpec", "containers", Some("name")),
    ("io.k8s.api.core.v1.PodSpec", "initContainers", Some("name")),
    (
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        Some("name"),
    ),
    ("io.k8s.api.core.v1.PodSpec", "volumes", Some("name")),
    (
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        Some("name"),
    ),
    ("io.k8s.api.core.v1.PodSpec", "hostAliases", Some("ip")),
    (
        "io.k8s.api.core.v1.PodSpec",
        "topologySpreadConstraints",
        Some("topologyKey"),
    ),
    ("io.k8s.api.core.v1.PodSpec", "resourceClaims", Some("name")),
    (
        "io.k8s.api.core.v1.PodSpec",
        "schedulingGates",
        Some("name"),
    ),
    ("io.k8s.api.core.v1.Container", "env", Some("name")),
    (
        "io.k8s.api.core.v1.Container",
        "ports",
        Some("containerPort"),
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        Some("mountPath"),
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        Some("devicePath"),
    ),
    ("io.k8s.api.core.v1.EphemeralContainer", "env", Some("name")),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "ports",
        Some("containerPort"),
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeMounts",
        Some("mountPath"),
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeDevices",
        Some("devicePath"),
    ),
    ("io.k8s.api.core.v1.PodStatus", "conditions", Some("type")),
    ("io.k8s.api.core.v1.PodStatus", "podIPs", Some("ip")),
    ("io.k8s.api.core.v1.PodStatus", "hostIPs", Some("ip")),
    ("io.k8s.api.core.v1.NodeStatus", "addresses", Some("type")),
    ("io.k8s.api.core.v1.NodeStatus", "conditions", Some("type")),
    (
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        Some("type"),
    ),
    (
        "io.k8s.api.core.v1.PersistentVolumeClaimStatus",
        "conditions",
        Some("type"),
    ),
    ("io.k8s.api.core.v1.ServiceSpec", "ports", Some("port")),
    ("io.k8s.api.core.v1.ServiceAccount", "secrets", Some("name")),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        None,
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        Some("uid"),
    ),
    (
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        Some("type"),
    ),
    (
        "io.k8s.api.apps.v1.ReplicaSetStatus",
        "conditions",
        Some("type"),
    ),
    (
        "io.k8s.api.apps.v1.StatefulSetStatus",
        "conditions",
        Some("type"),
    ),
    (
        "io.k8s.api.apps.v1.DaemonSetStatus",
        "conditions",
        Some("type"),
    ),
    ("io.k8s.api.batch.v1.JobStatus", "conditions", Some("type")),
    (
        "io.k8s.api.policy.v1.PodDisruptionBudgetStatus",
        "conditions",
        Some("type"),
    ),
];

fn add_patch_meta(schemas: &mut Map<String, Value>) {
    for (type_name, field, key) in PATCH_META {
        let Some(Value::Object(property)) = schemas
            .get_mut(*type_name)
            .and_then(|s| s.get_mut("properties"))
            .and_then(|p| p.get_mut(*field))
        else {
            continue;
        };
        match key {
            Some(key) => {
                let strategy = if *field == "volumes" {
                    "merge,retainKeys"
                } else {
                    "merge"
                };
                property.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
                property.insert("x-kubernetes-patch-merge-key".into(), json!(key));
                property.insert("x-kubernetes-list-type".into(), json!("map"));
                property.insert("x-kubernetes-list-map-keys".into(), json!([key]));
            }
            None => {
                property.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
                property.insert("x-kubernetes-list-type".into(), json!("set"));
            }
        }
    }
}

pub struct OpenApi {
    registry: Registry,
    cache: Mutex<HashMap<(String, String, String), Bytes>>,
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn camel(text: &str) -> String {
    text.split(['.', '-'])
        .filter(|p| !p.is_empty() && *p != "k8s" && *p != "io")
        .map(|p| {
            let mut c = p.chars();
            match c.next() {
                Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn query_param(name: &str, description: &str, kind: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": kind, "uniqueItems": true}})
}

fn write_params() -> Vec<Value> {
    vec![
        query_param(
            "dryRun",
            "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed",
            "string",
        ),
        query_param(
            "fieldManager",
            "fieldManager is a name associated with the actor or entity that is making these changes.",
            "string",
        ),
        query_param(
            "fieldValidation",
            "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict",
            "string",
        ),
    ]
}

fn list_params() -> Vec<Value> {
    vec![
        query_param(
            "allowWatchBookmarks",
            "allowWatchBookmarks requests watch events with type \"BOOKMARK\".",
            "boolean",
        ),
        query_param(
            "continue",
            "The continue option should be set when retrieving more results from the server.",
            "string",
        ),
        query_param(
            "fieldSelector",
            "A selector to restrict the list of returned objects by their fields. Defaults to everything.",
            "string",
        ),
        query_param(
            "labelSelector",
            "A selector to restrict the list of returned objects by their labels. Defaults to everything.",
            "string",
        ),
        query_param(
            "limit",
            "limit is a maximum number of responses to return for a list call.",
            "integer",
        ),
        query_param(
            "resourceVersion",
            "resourceVersion sets a constraint on what resource versions a request may be served from.",
            "string",
        ),
        query_param(
            "resourceVersionMatch",
            "resourceVersionMatch determines how resourceVersion is applied to list calls.",
            "string",
        ),
        query_param(
            "sendInitialEvents",
            "`sendInitialEvents=true` may be set together with `watch=true`.",
            "boolean",
        ),
        query_param(
            "timeoutSeconds",
            "Timeout for the list/watch call.",
            "integer",
        ),
        query_param(
            "watch",
            "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications.",
            "boolean",
        ),
    ]
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}})
}

fn body(schema: &str, media: &[&str]) -> Value {
    let mut content = Map::new();
    for m in media {
        content.insert(
            m.to_string(),
            json!({"schema": {"$ref": format!("#/components/schemas/{schema}")}}),
        );
    }
    json!({"content": content, "required": true})
}

fn response(schema: &str, codes: &[&str]) -> Value {
    let mut responses = Map::new();
    for code in codes {
        responses.insert(
            code.to_string(),
            json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}),
        );
    }
    responses.insert("401".into(), json!({"description": "Unauthorized"}));
    Value::Object(responses)
}

fn operation(
    action: &str,
    id: String,
    gvk: &Value,
    params: Vec<Value>,
    request: Option<Value>,
    responses: Value,
) -> Value {
    let mut op = json!({
        "operationId": id,
        "parameters": params,
        "responses": responses,
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
    });
    if let Some(r) = request {
        op["requestBody"] = r;
    }
    op
}

fn resource_paths(
    info: &ResourceInfo,
    schema: &str,
    list_schema: &str,
    paths: &mut Map<String, Value>,
) {
    let gvk = json!({"group": info.group, "version": info.version, "kind": info.kind});
    let prefix = format!("/{}", gv_path(&info.group, &info.version));
    let scope = if info.namespaced { "Namespaced" } else { "" };
    let base = format!(
        "{}{}{}",
        camel(if info.group.is_empty() {
            "core"
        } else {
            &info.group
        }),
        camel(&info.version),
        scope
    );
    let (collection, mut shared) = if info.namespaced {
        (
            format!("{prefix}/namespaces/{{namespace}}/{}", info.resource),
            vec![path_param("namespace")],
        )
    } else {
        (format!("{prefix}/{}", info.resource), vec![])
    };
    // Custom resources take no strategic merge patch; kubectl then sends merge patches.
    let patch_types: &[&str] = if info.custom.is_some() {
        &[
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/apply-patch+yaml",
        ]
    } else {
        &[
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml",
        ]
    };
    let mut collection_ops = Map::new();
    if !info.verbs.contains(&"list") {
        // Create-only resources (reviews): one POST, nothing else.
        collection_ops.insert(
            "post".into(),
            operation(
                "post",
                format!("create{base}{}", info.kind),
                &gvk,
                write_params(),
                Some(body(schema, &["application/json", "application/yaml"])),
                response(schema, &["200", "201"]),
            ),
        );
        paths.insert(collection, Value::Object(collection_ops));
        return;
    }
    collection_ops.insert(
        "get".into(),
        operation(
            "list",
            format!("list{base}{}", info.kind),
            &gvk,
            list_params(),
            None,
            response(list_schema, &["200"]),
        ),
    );
    if info.verbs.contains(&"create") {
        collection_ops.insert(
            "post".into(),
            operation(
                "post",
                format!("create{base}{}", info.kind),
                &gvk,
                write_params(),
                Some(body(schema, &["application/json", "application/yaml"])),
                response(schema, &["200", "201", "202"]),
            ),
        );
    }
    if info.verbs.contains(&"deletecollection") {
        collection_ops.insert(
            "delete".into(),
            operation(
                "deletecollection",
                format!("deleteCollection{base}{}", info.kind),
                &gvk,
                list_params(),
                None,
                response("io.k8s.apimachinery.pkg.apis.meta.v1.Status", &["200"]),
            ),
        );
    }
    collection_ops.insert("parameters".into(), Value::Array(shared.clone()));
    paths.insert(collection.clone(), Value::Object(collection_ops));
    if info.namespaced {
        paths.insert(
            format!("{prefix}/{}", info.resource),
            json!({"get": operation("list", format!("list{}{}{}ForAllNamespaces", camel(if info.group.is_empty() { "core" } else { &info.group }), camel(&info.version), info.kind), &gvk, list_params(), None, response(list_schema, &["200"]))}),
        );
    }
    shared.push(path_param("name"));
    let item = format!("{collection}/{{name}}");
    let mut item_ops = Map::new();
    item_ops.insert(
        "get".into(),
        operation(
            "get",
            format!("read{base}{}", info.kind),
            &gvk,
            vec![],
            None,
            response(schema, &["200"]),
        ),
    );
    item_ops.insert(
        "put".into(),
        operation(
            "put",
            format!("replace{base}{}", info.kind),
            &gvk,
            write_params(),
            Some(body(schema, &["application/json", "application/yaml"])),
            response(schema, &["200", "201"]),
        ),
    );
    let mut patch_params = write_params();
    patch_params.push(query_param(
        "force",
        "Force is going to \"force\" Apply requests.",
        "boolean",
    ));
    item_ops.insert(
        "patch".into(),
        operation(
            "patch",
            format!("patch{base}{}", info.kind),
            &gvk,
            patch_params.clone(),
            Some(body(
                "io.k8s.apimachinery.pkg.apis.meta.v1.Patch",
                patch_types,
            )),
            response(schema, &["200", "201"]),
        ),
    );
    item_ops.insert(
        "delete".into(),
        operation(
            "delete",
            format!("delete{base}{}", info.kind),
            &gvk,
            vec![
                query_param(
                    "gracePeriodSeconds",
                    "The duration in seconds before the object should be deleted.",
                    "integer",
                ),
                query_param(
                    "propagationPolicy",
                    "Whether and how garbage collection will be performed.",
                    "string",
                ),
            ],
            Some(body(
                "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
                &["application/json"],
            )),
            response(
                "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
                &["200", "202"],
            ),
        ),
    );
    item_ops.insert("parameters".into(), Value::Array(shared.clone()));
    paths.insert(item.clone(), Value::Object(item_ops));
    for sub in &info.subresources {
        let sub_schema = match sub.name {
            "status" | "ephemeralcontainers" => schema.to_string(),
            "scale" => "io.k8s.api.autoscaling.v1.Scale".to_string(),
            _ => continue,
        };
        let sub_gvk = if sub.name == "scale" {
            json!({"group": "autoscaling", "version": "v1", "kind": "Scale"})
        } else {
            gvk.clone()
        };
        let suffix = camel(sub.name);
        let mut ops = Map::new();
        ops.insert(
            "get".into(),
            operation(
                "get",
                format!("read{base}{}{suffix}", info.kind),
                &sub_gvk,
                vec![],
                None,
                response(&sub_schema, &["200"]),
            ),
        );
        ops.insert(
            "put".into(),
            operation(
                "put",
                format!("replace{base}{}{suffix}", info.kind),
                &sub_gvk,
                write_params(),
                Some(body(&sub_schema, &["application/json"])),
                response(&sub_schema, &["200", "201"]),
            ),
        );
        ops.insert(
            "patch".into(),
            operation(
                "patch",
                format!("patch{base}{}{suffix}", info.kind),
                &sub_gvk,
                patch_params.clone(),
                Some(body(
                    "io.k8s.apimachinery.pkg.apis.meta.v1.Patch",
                    patch_types,
                )),
                response(&sub_schema, &["200", "201"]),
            ),
        );
        ops.insert("parameters".into(), Value::Array(shared.clone()));
        paths.insert(format!("{item}/{}", sub.name), Value::Object(ops));
    }
}

impl OpenApi {
    pub fn new(registry: &Registry) -> Self {
        OpenApi {
            registry: registry.clone(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn resources(&self, group: &str, version: &str) -> Vec<Arc<ResourceInfo>> {
        self.registry
            .all()
            .into_iter()
            .filter(|r| r.group == group && r.version == version)
            .collect()
    }

    /// Changes when the served resources change (and with each release).
    fn hash(&self, group: &str, version: &str) -> String {
        let mut h = Sha256::new();
        h.update(env!("CARGO_PKG_VERSION"));
        for r in self.resources(group, version) {
            h.update(&r.resource);
            h.update(&r.kind);
            h.update(r.subresources.len().to_le_bytes());
            if let Some(c) = &r.custom {
                h.update(c.schema.to_string());
            }
        }
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    /// Changes when any group version's document does (the v2 document's cache key).
    pub fn hash_all(&self) -> String {
        let mut all = String::new();
        for (group, versions) in self.registry.groups() {
            for version in versions {
                all.push_str(&self.hash(&group, &version));
            }
        }
        all
    }

    /// Every served group version's document.
    pub fn all_documents(&self) -> Vec<Value> {
        let mut docs = Vec::new();
        for (group, versions) in self.registry.groups() {
            for version in versions {
                if let Some(bytes) = self.document(&group, &version)
                    && let Ok(doc) = serde_json::from_slice(&bytes)
                {
                    docs.push(doc);
                }
            }
        }
        docs
    }

    pub fn index(&self) -> Value {
        let mut paths = Map::new();
        for (group, versions) in self.registry.groups() {
            for version in versions {
                paths.insert(
                    gv_path(&group, &version),
                    json!({"serverRelativeURL": format!("/openapi/v3/{}?hash={}", gv_path(&group, &version), self.hash(&group, &version))}),
                );
            }
        }
        json!({"paths": paths})
    }

    /// The document of one group-version, built once and cached.
    pub fn document(&self, group: &str, version: &str) -> Option<Bytes> {
        let hash = self.hash(group, version);
        let key = (group.to_string(), version.to_string(), hash);
        if let Some(doc) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Some(doc.clone());
        }
        let resources = self.resources(group, version);
        if resources.is_empty() {
            return None;
        }
        let doc = Bytes::from(serde_json::to_vec(&self.build(&resources)).ok()?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(g, v, _), _| !(g == group && v == version));
        cache.insert(key, doc.clone());
        Some(doc)
    }

    fn build(&self, resources: &[Arc<ResourceInfo>]) -> Value {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
        let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
        let mut paths = Map::new();
        let mut kinds: Vec<(String, Value)> = Vec::new();
        for r in resources {
            let (schema_name, list_name) = match &r.typed {
                Some(t) => {
                    let name = (t.schema_name)().into_owned();
                    let schema = (t.schema)(&mut generator);
                    generator
                        .definitions_mut()
                        .insert(name.clone(), schema.to_value());
                    let list_name = format!("{name}List");
                    (name, list_name)
                }
                None => match &r.custom {
                    Some(custom) => {
                        let reversed: Vec<&str> = r.group.split('.').rev().collect();
                        let name = format!("{}.{}.{}", reversed.join("."), r.version, r.kind);
                        let mut schema = (*custom.schema).clone();
                        if !schema.is_object() {
                            schema = json!({"type": "object"});
                        }
                        let props = schema
                            .as_object_mut()
                            .expect("object")
                            .entry("properties")
                            .or_insert_with(|| json!({}));
                        props["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."});
                        props["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."});
                        props["metadata"] = json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}], "description": "Standard object's metadata."});
                        generator.definitions_mut().insert(name.clone(), schema);
                        let list_name = format!("{name}List");
                        (name, list_name)
                    }
                    None => continue,
                },
            };
            let gvk = json!([{"group": r.group, "version": r.version, "kind": r.kind}]);
            kinds.push((schema_name.clone(), gvk.clone()));
            // The list type: items of the kind plus list metadata.
            let list_schema = json!({
                "description": format!("{}List is a list of {} objects.", r.kind, r.kind),
                "type": "object",
                "required": ["items"],
                "properties": {
                    "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."},
                    "items": {"type": "array", "items": {"$ref": format!("#/components/schemas/{schema_name}")}},
                    "kind": {"type": "string", "description": "Kind is a string value representing the REST resource this object represents."},
                    "metadata": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"},
                },
                "x-kubernetes-group-version-kind": [{"group": r.group, "version": r.version, "kind": r.list_kind()}],
            });
            generator
                .definitions_mut()
                .insert(list_name.clone(), list_schema);
            resource_paths(r, &schema_name, &list_name, &mut paths);
        }
        for (name, schema) in [
            (
                "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta",
                generator.subschema_for::<meta::ListMeta>(),
            ),
            (
                "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
                generator.subschema_for::<meta::Status>(),
            ),
            (
                "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
                generator.subschema_for::<meta::DeleteOptions>(),
            ),
            (
                "io.k8s.apimachinery.pkg.apis.meta.v1.Patch",
                generator.subschema_for::<meta::Patch>(),
            ),
            (
                "io.k8s.api.autoscaling.v1.Scale",
                generator.subschema_for::<k8s_openapi::api::autoscaling::v1::Scale>(),
            ),
        ] {
            let _ = (name, schema);
        }
        let mut schemas = generator.take_definitions(true);
        add_patch_meta(&mut schemas);
        for (name, gvk) in kinds {
            if let Some(Value::Object(s)) = schemas.get_mut(&name) {
                // `metadata` is never required upstream (k8s-openapi's type has it always).
                if let Some(Value::Array(required)) = s.get_mut("required") {
                    required.retain(|r| r != "metadata");
                    if required.is_empty() {
                        s.remove("required");
                    }
                }
                s.insert("x-kubernetes-group-version-kind".into(), gvk);
            }
        }
        if let Some(Value::Object(s)) = schemas.get_mut("io.k8s.api.autoscaling.v1.Scale") {
            s.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": "autoscaling", "version": "v1", "kind": "Scale"}]),
            );
        }
        json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": crate::http::KUBE_GIT_VERSION},
            "paths": paths,
            "components": {"schemas": schemas},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_document_has_kinds_and_patch_params() {
        let registry = Registry::new();
        let api = OpenApi::new(&registry);
        let doc: Value = serde_json::from_slice(&api.document("", "v1").unwrap()).unwrap();
        let pod = &doc["components"]["schemas"]["io.k8s.api.core.v1.Pod"];
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        let container = &doc["components"]["schemas"]["io.k8s.api.core.v1.Container"];
        assert!(container["properties"]["image"]["description"].is_string());
        let containers =
            &doc["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        let patch = &doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"];
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(
            doc["components"]["schemas"]["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]
                .is_object()
        );
        let index = api.index();
        assert!(
            index["paths"]["apis/apps/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/apis/apps/v1?hash=")
        );
    }
}
