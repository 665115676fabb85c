//! OpenAPI v2 (`/openapi/v2`): one Swagger 2.0 document of every served group version, in JSON
//! or in the protobuf form kubectl asks for (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`,
//! gnostic's `openapi.v2.Document`; client-go has no JSON fallback). kubectl reads it where v3
//! does not serve: client-side validation of kubectl before 1.27, and kinds it finds only here.
//!
//! The document is made from the v3 documents ([`crate::openapi`]): the same schemas under
//! `#/definitions/`, and each operation's request body and responses in v2's form (a `body`
//! parameter, `consumes`/`produces`, inline parameter types). Built on first request after the
//! served resources change, then cached.

mod proto;

use std::sync::Mutex;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::openapi::OpenApi;

/// The media type the protobuf form is served as: clients ask for
/// `application/com.github.proto-openapi.spec.v2@v1.0+protobuf`, but `@` is not allowed in a
/// media type (Go's parser refuses it), so upstream answers with `.` in its place.
pub const PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// Both forms of the document, for one set of served resources.
#[derive(Clone)]
pub struct Document {
    pub json: Bytes,
    pub protobuf: Bytes,
}

#[derive(Default)]
pub struct Cache {
    built: Mutex<Option<(String, Document)>>,
}

impl Cache {
    /// The document for what `openapi` serves now.
    pub fn document(&self, openapi: &OpenApi) -> Document {
        let hash = openapi.hash_all();
        if let Some((h, doc)) = &*self.built.lock().unwrap_or_else(|e| e.into_inner())
            && *h == hash
        {
            return doc.clone();
        }
        let value = build(openapi);
        let doc = Document {
            json: Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
            protobuf: Bytes::from(proto::document(&value)),
        };
        *self.built.lock().unwrap_or_else(|e| e.into_inner()) = Some((hash, doc.clone()));
        doc
    }
}

/// The Swagger 2.0 document of every served group version.
pub fn build(openapi: &OpenApi) -> Value {
    let mut definitions = Map::new();
    let mut paths = Map::new();
    for v3 in openapi.all_documents() {
        if let Some(Value::Object(schemas)) = v3.pointer("/components/schemas") {
            for (name, schema) in schemas {
                definitions
                    .entry(name.clone())
                    .or_insert_with(|| definition_v2(name, schema));
            }
        }
        if let Some(Value::Object(items)) = v3.get("paths") {
            for (path, item) in items {
                paths.insert(path.clone(), path_item_v2(item));
            }
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": crate::http::KUBE_GIT_VERSION},
        "paths": paths,
        "definitions": definitions,
    })
}

/// Definitions whose v2 form upstream writes differently from their v3 one: int-or-string and
/// quantities are strings (v2 validation lets a string field hold a number), an arbitrary JSON
/// value has no type.
fn definition_v2(name: &str, schema: &Value) -> Value {
    let mut out = schema_v2(schema);
    let description = schema.get("description").cloned().unwrap_or(json!(""));
    match name {
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString" => {
            json!({"description": description, "type": "string", "format": "int-or-string"})
        }
        "io.k8s.apimachinery.pkg.api.resource.Quantity" => {
            json!({"description": description, "type": "string"})
        }
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSON" => {
            json!({"description": description})
        }
        _ => {
            if let Some(o) = out.as_object_mut()
                && o.get("x-kubernetes-int-or-string") == Some(&json!(true))
                && !o.contains_key("type")
            {
                o.insert("type".into(), json!("string"));
                o.insert("format".into(), json!("int-or-string"));
            }
            out
        }
    }
}

/// A schema node that keeps unknown fields (`x-kubernetes-preserve-unknown-fields`) says
/// nothing more in v2 than its description: v2 readers would refuse the fields it keeps.
fn open_node(map: &Map<String, Value>) -> Option<Value> {
    if map.get("x-kubernetes-preserve-unknown-fields") != Some(&json!(true)) {
        return None;
    }
    let mut out = Map::new();
    for (key, value) in map {
        if key == "description" || key.starts_with("x-") {
            out.insert(key.clone(), value.clone());
        }
    }
    Some(Value::Object(out))
}

/// A v3 schema as v2 writes it: references under `#/definitions/`, a reference with its own
/// description as a `$ref` beside the description (v3 needs `allOf` for that; v2 readers such as
/// kubectl's do not follow `allOf`), no `nullable`, and the unions v2 lacks (`oneOf`, `anyOf`,
/// `not`) left out (what they allowed, v2 leaves open).
fn schema_v2(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            if let Some(open) = open_node(map) {
                return open;
            }
            let mut out = Map::new();
            if let Some(Value::Array(all)) = map.get("allOf")
                && let [only] = all.as_slice()
                && let Some(r) = only.get("$ref")
            {
                let mut flat = map.clone();
                flat.remove("allOf");
                flat.insert("$ref".into(), r.clone());
                return schema_v2(&Value::Object(flat));
            }
            for (key, value) in map {
                match key.as_str() {
                    "nullable" | "oneOf" | "anyOf" | "not" => {}
                    "$ref" => {
                        let r = value.as_str().unwrap_or_default();
                        out.insert(
                            key.clone(),
                            json!(r.replace("#/components/schemas/", "#/definitions/")),
                        );
                    }
                    // Names of properties are not schemas; their values are.
                    "properties" | "definitions" | "patternProperties" => {
                        let named = value
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), schema_v2(v)))
                                    .collect::<Map<_, _>>()
                            })
                            .unwrap_or_default();
                        out.insert(key.clone(), Value::Object(named));
                    }
                    // Values, not schemas.
                    "default" | "example" | "enum" | "required" => {
                        out.insert(key.clone(), value.clone());
                    }
                    k if k.starts_with("x-") => {
                        out.insert(key.clone(), value.clone());
                    }
                    _ => {
                        out.insert(key.clone(), schema_v2(value));
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(schema_v2).collect()),
        other => other.clone(),
    }
}

/// A v3 parameter as v2 writes it: the type inline instead of under `schema`.
fn parameter_v2(p: &Value) -> Value {
    let mut out = Map::new();
    for key in ["name", "in", "description", "required"] {
        if let Some(v) = p.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(Value::Object(schema)) = p.get("schema") {
        for (k, v) in schema {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

fn path_item_v2(item: &Value) -> Value {
    let mut out = Map::new();
    let Some(item) = item.as_object() else {
        return Value::Object(out);
    };
    for (key, value) in item {
        match key.as_str() {
            "parameters" => {
                let params = value.as_array().into_iter().flatten().map(parameter_v2);
                out.insert(key.clone(), Value::Array(params.collect()));
            }
            "get" | "put" | "post" | "delete" | "patch" | "head" | "options" => {
                out.insert(key.clone(), operation_v2(value));
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(out)
}

fn operation_v2(op: &Value) -> Value {
    let mut out = Map::new();
    let mut params: Vec<Value> = op
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(parameter_v2)
        .collect();
    if let Some(Value::Object(content)) = op.pointer("/requestBody/content") {
        out.insert("consumes".into(), json!(content.keys().collect::<Vec<_>>()));
        if let Some(schema) = content.values().find_map(|c| c.get("schema")) {
            params.insert(
                0,
                json!({"name": "body", "in": "body", "required": true, "schema": schema_v2(schema)}),
            );
        }
    }
    out.insert("parameters".into(), Value::Array(params));
    out.insert(
        "produces".into(),
        json!([
            "application/json",
            "application/yaml",
            "application/vnd.kubernetes.protobuf"
        ]),
    );
    out.insert("schemes".into(), json!(["https"]));
    let mut responses = Map::new();
    if let Some(Value::Object(codes)) = op.get("responses") {
        for (code, response) in codes {
            let mut r = Map::new();
            r.insert(
                "description".into(),
                response.get("description").cloned().unwrap_or(json!("")),
            );
            if let Some(schema) = response.pointer("/content/application~1json/schema") {
                r.insert("schema".into(), schema_v2(schema));
            }
            responses.insert(code.clone(), Value::Object(r));
        }
    }
    out.insert("responses".into(), Value::Object(responses));
    for (key, value) in op.as_object().into_iter().flatten() {
        if key == "operationId" || key == "description" || key.starts_with("x-") {
            out.insert(key.clone(), value.clone());
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn one_document_of_every_group_version_in_v2_form() {
        let registry = Registry::new();
        let openapi = OpenApi::new(&registry);
        let doc = build(&openapi);
        assert_eq!(doc["swagger"], "2.0");
        let pod = &doc["definitions"]["io.k8s.api.core.v1.Pod"];
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        assert_eq!(
            pod["properties"]["spec"]["$ref"],
            "#/definitions/io.k8s.api.core.v1.PodSpec"
        );
        assert!(pod["properties"]["spec"]["description"].is_string());
        assert!(
            pod.get("required").is_none(),
            "metadata is never required: {pod}"
        );
        assert_eq!(
            doc["definitions"]["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["format"],
            "int-or-string"
        );
        let ssar = &doc["definitions"]["io.k8s.api.authorization.v1.SelfSubjectAccessReview"];
        assert_eq!(
            ssar["x-kubernetes-group-version-kind"][0]["kind"],
            "SelfSubjectAccessReview"
        );
        assert!(doc["definitions"]["io.k8s.api.apps.v1.Deployment"].is_object());
        let create = &doc["paths"]["/api/v1/namespaces/{namespace}/pods"]["post"];
        let body = create["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["in"] == "body")
            .expect("a body parameter");
        assert_eq!(
            body["schema"]["$ref"],
            "#/definitions/io.k8s.api.core.v1.Pod"
        );
        assert!(
            create["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation" && p["type"] == "string")
        );
        assert_eq!(
            create["responses"]["201"]["schema"]["$ref"],
            "#/definitions/io.k8s.api.core.v1.Pod"
        );
        assert!(!doc.to_string().contains("#/components/"));
    }
}
