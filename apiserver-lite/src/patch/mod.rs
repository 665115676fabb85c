//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386), strategic merge patch and
//! server-side apply. Pure code; the HTTP layer reads the current object, calls [`apply_patch`],
//! and stores the result through the normal update path.

pub mod fields;
pub mod strategic;

use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        match essence {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }

    pub fn media_types() -> &'static [&'static str] {
        &[
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml",
        ]
    }
}

/// Parses a JSON body, as a 400 on failure.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Applies a JSON, merge or strategic patch to `live`. `builtin` says whether the kind has
/// strategic merge information (custom resources do not).
pub fn apply_patch(
    kind: PatchType,
    live: &Value,
    body: &[u8],
    builtin: bool,
) -> Result<Value, ApiError> {
    match kind {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            let mut doc = live.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?;
            Ok(doc)
        }
        PatchType::Merge => {
            let patch = parse_json(body)?;
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "error decoding patch: merge patch must be a JSON object",
                ));
            }
            let mut doc = live.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchType::Strategic => {
            if !builtin {
                return Err(ApiError::unsupported_media_type(
                    "application/strategic-merge-patch+json is not supported for custom resources; use application/merge-patch+json",
                ));
            }
            let patch = parse_json(body)?;
            strategic::apply(live, &patch).map_err(|e| ApiError::bad_request(e.to_string()))
        }
        PatchType::Apply => Err(ApiError::internal("apply patches go through fields::apply")),
    }
}

/// The `metadata.resourceVersion` a JSON, merge or strategic patch sets, if any: a precondition.
pub fn pinned_resource_version(kind: PatchType, body: &[u8]) -> Option<String> {
    let patch: Value = serde_json::from_slice(body).ok()?;
    match kind {
        PatchType::Json => patch.as_array()?.iter().find_map(|op| {
            let path = op.get("path")?.as_str()?;
            let verb = op.get("op")?.as_str()?;
            (path == "/metadata/resourceVersion" && matches!(verb, "add" | "replace" | "test"))
                .then(|| op.get("value").and_then(Value::as_str).map(String::from))
                .flatten()
        }),
        _ => patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|rv| !rv.is_empty())
            .map(String::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_and_merge_patches() {
        let live = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}});
        let out = apply_patch(
            PatchType::Json,
            &live,
            br#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
            true,
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 3);
        let err = apply_patch(
            PatchType::Json,
            &live,
            br#"[{"op":"remove","path":"/spec/nope"}]"#,
            true,
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        let out = apply_patch(
            PatchType::Merge,
            &live,
            br#"{"metadata":{"labels":{"a":null,"b":"2"}}}"#,
            true,
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(
            apply_patch(PatchType::Merge, &live, b"{nope", true)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            apply_patch(PatchType::Strategic, &live, b"{}", false)
                .unwrap_err()
                .code,
            415
        );
    }
}
