//! The inverse of the decoder: objects in `application/vnd.kubernetes.protobuf`, for clients
//! that accept nothing else (client-go's default for core components). The same table gives
//! each JSON name its field number; Go's embedded structs (`-` in the table) take their fields
//! from the parent's JSON object; the well-known messages (Time, Duration, IntOrString,
//! Quantity, raw JSON, the CRD schema unions) are written as Go writes them. JSON fields the
//! table does not know (newer than the served API) are left out, as a protobuf client could
//! not read them anyway.

use base64::Engine;
use serde_json::{Map, Value};

use super::{Field, Kind, MAGIC, message_for, table};

#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    fn key(&mut self, tag: u32, wire: u8) {
        self.varint((u64::from(tag) << 3) | u64::from(wire));
    }

    fn bytes(&mut self, tag: u32, data: &[u8]) {
        self.key(tag, 2);
        self.varint(data.len() as u64);
        self.0.extend_from_slice(data);
    }

    fn int(&mut self, tag: u32, v: i64) {
        self.key(tag, 0);
        // Negative numbers take ten bytes, as Go writes them.
        self.varint(v as u64);
    }
}

/// Parses a Go duration (`1h2m3.5s`, `300ms`, `-1.5h`) into nanoseconds.
fn go_duration_nanos(text: &str) -> Result<i64, String> {
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Ok(0);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {text:?} lacks a unit"))?;
        let number: f64 = rest[..number_end]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}"))?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            unit => return Err(format!("unknown unit {unit:?} in duration {text:?}")),
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    let nanos = total.round() as i64;
    Ok(if negative { -nanos } else { nanos })
}

/// The well-known messages whose JSON form is not an object; `None` for the others.
fn special(path: &str, value: &Value) -> Result<Option<W>, String> {
    let short = path.rsplit('.').next().unwrap_or(path);
    let mut w = W::default();
    match (path, short) {
        ("apimachinery.pkg.apis.meta.v1.Time", _)
        | ("apimachinery.pkg.apis.meta.v1.MicroTime", _) => {
            let text = value.as_str().unwrap_or_default();
            if !text.is_empty() {
                let t = chrono::DateTime::parse_from_rfc3339(text)
                    .map_err(|e| format!("time {text:?}: {e}"))?;
                if t.timestamp() != 0 {
                    w.int(1, t.timestamp());
                }
                if t.timestamp_subsec_nanos() != 0 {
                    w.int(2, i64::from(t.timestamp_subsec_nanos()));
                }
            }
        }
        ("apimachinery.pkg.apis.meta.v1.Duration", _) => {
            let nanos = go_duration_nanos(value.as_str().unwrap_or("0"))?;
            w.int(1, nanos);
        }
        ("apimachinery.pkg.util.intstr.IntOrString", _) => match value {
            Value::String(s) => {
                w.int(1, 1);
                w.bytes(3, s.as_bytes());
            }
            other => {
                w.int(1, 0);
                w.int(2, other.as_i64().unwrap_or(0));
            }
        },
        ("apimachinery.pkg.api.resource.Quantity", _) => {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            w.bytes(1, text.as_bytes());
        }
        (_, "RawExtension" | "FieldsV1" | "JSON" | "Json") => {
            w.bytes(1, value.to_string().as_bytes());
        }
        (_, "JsonSchemaPropsOrBool") => match value {
            Value::Bool(b) => w.int(1, i64::from(*b)),
            schema => {
                w.int(1, 1);
                w.bytes(2, &message(&schema_path(path), schema, 0)?.0);
            }
        },
        (_, "JsonSchemaPropsOrArray") => match value {
            Value::Array(list) => {
                for s in list {
                    w.bytes(2, &message(&schema_path(path), s, 0)?.0);
                }
            }
            schema => w.bytes(1, &message(&schema_path(path), schema, 0)?.0),
        },
        (_, "JsonSchemaPropsOrStringArray") => match value {
            Value::Array(list) => {
                for s in list.iter().filter_map(Value::as_str) {
                    w.bytes(2, s.as_bytes());
                }
            }
            schema => w.bytes(1, &message(&schema_path(path), schema, 0)?.0),
        },
        (_, "ExtraValue") => {
            for s in value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                w.bytes(1, s.as_bytes());
            }
        }
        _ => return Ok(None),
    }
    Ok(Some(w))
}

/// `...v1.JsonSchemaPropsOrBool` -> `...v1.JsonSchemaProps`.
fn schema_path(union: &str) -> String {
    let (package, _) = union.rsplit_once('.').unwrap_or(("", union));
    format!("{package}.JsonSchemaProps")
}

fn scalar(w: &mut W, tag: u32, kind: &Kind, value: &Value, depth: usize) -> Result<(), String> {
    match kind {
        Kind::String => match value {
            Value::String(s) => w.bytes(tag, s.as_bytes()),
            Value::Null => {}
            other => w.bytes(tag, other.to_string().as_bytes()),
        },
        Kind::Bytes => {
            let text = value.as_str().unwrap_or_default();
            let data = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("bytes field is not base64: {e}"))?;
            w.bytes(tag, &data);
        }
        Kind::Int32 | Kind::Int64 => {
            let n = value
                .as_i64()
                .or_else(|| value.as_f64().map(|f| f as i64))
                .unwrap_or(0);
            w.int(tag, n);
        }
        Kind::Bool => w.int(tag, i64::from(value.as_bool().unwrap_or(false))),
        Kind::Double => {
            w.key(tag, 1);
            w.0.extend_from_slice(&value.as_f64().unwrap_or(0.0).to_le_bytes());
        }
        Kind::Message(path) => {
            let inner = message(path, value, depth + 1)?;
            w.bytes(tag, &inner.0);
        }
        Kind::Map(_) => return Err("a map inside a map".into()),
    }
    Ok(())
}

/// Writes the fields of `value` that message `path` (and its embedded structs) name.
fn fields(w: &mut W, path: &str, object: &Map<String, Value>, depth: usize) -> Result<(), String> {
    let table = table()
        .messages
        .get(path)
        .ok_or_else(|| format!("unknown protobuf message {path}"))?;
    let mut tags: Vec<(&u32, &Field)> = table.iter().collect();
    tags.sort_by_key(|(t, _)| **t);
    for (tag, field) in tags {
        let tag = *tag;
        if field.json == "-" {
            // An embedded Go struct: its fields are the parent's in JSON.
            if let Kind::Message(inner) = &field.kind {
                let mut sub = W::default();
                fields(&mut sub, inner, object, depth + 1)?;
                w.bytes(tag, &sub.0);
            }
            continue;
        }
        let Some(value) = object.get(&field.json) else {
            continue;
        };
        if value.is_null() {
            continue;
        }
        match &field.kind {
            Kind::Map(value_kind) => {
                for (k, v) in value.as_object().into_iter().flatten() {
                    let mut entry = W::default();
                    entry.bytes(1, k.as_bytes());
                    scalar(&mut entry, 2, value_kind, v, depth)?;
                    w.bytes(tag, &entry.0);
                }
            }
            kind if field.repeated => {
                for item in value.as_array().into_iter().flatten() {
                    scalar(w, tag, kind, item, depth)?;
                }
            }
            kind => scalar(w, tag, kind, value, depth)?,
        }
    }
    Ok(())
}

fn message(path: &str, value: &Value, depth: usize) -> Result<W, String> {
    if depth > 64 {
        return Err("object nesting is too deep".into());
    }
    if let Some(w) = special(path, value)? {
        return Ok(w);
    }
    let mut w = W::default();
    if let Value::Object(object) = value {
        fields(&mut w, path, object, depth)?;
    }
    Ok(w)
}

/// The message of an object's kind (`Status` is meta/v1's whatever its apiVersion says).
fn message_of(api_version: &str, kind: &str) -> Option<String> {
    match kind {
        "Status" => Some("apimachinery.pkg.apis.meta.v1.Status".into()),
        _ => message_for(api_version, kind),
    }
}

/// An object (with `apiVersion` and `kind`) as a protobuf body: the magic, then a
/// `runtime.Unknown` whose `raw` is the object's message. Errors name a kind without one
/// (custom resources have none).
pub fn encode(object: &Value) -> Result<Vec<u8>, String> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let path = message_of(api_version, kind)
        .ok_or_else(|| format!("no protobuf schema for {kind} in {api_version}"))?;
    let raw = message(&path, object, 0)?;
    let mut type_meta = W::default();
    type_meta.bytes(1, api_version.as_bytes());
    type_meta.bytes(2, kind.as_bytes());
    let mut unknown = W::default();
    unknown.bytes(1, &type_meta.0);
    unknown.bytes(2, &raw.0);
    // contentEncoding and contentType: empty, as Go writes them.
    unknown.bytes(3, b"");
    unknown.bytes(4, b"");
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&unknown.0);
    Ok(out)
}

/// One frame of a protobuf watch stream: a big-endian length, then a `meta.v1.WatchEvent`
/// (without the envelope) whose object is [`encode`]d whole.
pub fn watch_frame(event_type: &str, object: &Value) -> Result<Vec<u8>, String> {
    let inner = encode(object)?;
    let mut raw = W::default();
    raw.bytes(1, &inner);
    let mut event = W::default();
    event.bytes(1, event_type.as_bytes());
    event.bytes(2, &raw.0);
    let mut out = (event.0.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&event.0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn go_durations_parse() {
        assert_eq!(go_duration_nanos("1h2m3.5s").unwrap(), 3_723_500_000_000);
        assert_eq!(go_duration_nanos("300ms").unwrap(), 300_000_000);
        assert_eq!(go_duration_nanos("-1.5h").unwrap(), -5_400_000_000_000);
        assert_eq!(go_duration_nanos("0s").unwrap(), 0);
        assert!(go_duration_nanos("5 parsecs").is_err());
    }

    #[test]
    fn objects_round_trip_through_the_decoder() {
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"},
                "creationTimestamp": "2026-12-05T10:00:00Z", "generation": 2,
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "apps/v1",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                    "containers": [{"name": "c", "image": "busybox",
                        "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                        "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "a"}}}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}],
                    "volumes": [{"name": "v", "configMap": {"name": "cm"}}]}}},
            "status": {"replicas": 1, "conditions": [{"type": "Available", "status": "True",
                "lastUpdateTime": "2026-12-05T10:00:01Z", "lastTransitionTime": "2026-12-05T10:00:01Z"}]},
        });
        let bytes = encode(&deployment).unwrap();
        assert!(bytes.starts_with(MAGIC));
        let back = super::super::decode(&bytes).unwrap();
        assert_eq!(back, deployment);
        let status = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": "no", "reason": "NotFound", "details": {"name": "x", "kind": "pods"}, "code": 404});
        let back = super::super::decode(&encode(&status).unwrap());
        // The decoder has no schema for `v1 Status` (it is meta's): check the message itself.
        assert!(back.is_err() || back.unwrap()["code"] == 404);
        assert!(encode(&json!({"apiVersion": "example.com/v1", "kind": "Widget"})).is_err());
    }
}
