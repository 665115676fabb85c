//! Request bodies into values, with bounded cost whatever a client sends.
//!
//! JSON nests at most [`MAX_DEPTH`] levels (serde_json's own limit). YAML's parser (libyaml,
//! under serde_yaml) spends time proportional to tokens x flow nesting depth before serde_yaml's
//! recursion limit is reached, so a 200 KB `[[[[...` took half a minute: flow nesting deeper than
//! [`MAX_DEPTH`] is refused by a linear scan first. Large bodies decode on a blocking thread, so
//! one request never holds an async worker that others wait for.

use serde_json::Value;

use crate::error::ApiError;

/// The deepest nesting a body may have (serde_json's and serde_yaml's recursion limit).
pub const MAX_DEPTH: usize = 128;

/// Bodies up to this size decode in place; larger ones on a blocking thread.
const INLINE: usize = 64 * 1024;

/// Runs `decode` on `body`, on a blocking thread when the body is large.
pub async fn off_workers<T: Send + 'static>(
    body: &bytes::Bytes,
    decode: impl FnOnce(&[u8]) -> T + Send + 'static,
) -> T {
    if body.len() <= INLINE {
        return decode(body);
    }
    let body = body.clone();
    match tokio::task::spawn_blocking(move || decode(&body)).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A YAML document (or JSON, which is YAML) into a value.
pub fn yaml(body: &[u8]) -> Result<Value, String> {
    if let Some(line) = flow_too_deep(body, MAX_DEPTH) {
        return Err(format!(
            "the document nests deeper than {MAX_DEPTH} levels (line {line})"
        ));
    }
    serde_yaml::from_slice(body).map_err(|e| e.to_string())
}

/// Decodes a create/update body as JSON, YAML or protobuf; it must be an object. Also returns
/// the paths of keys a JSON object repeats (YAML's decoder refuses them itself), for the
/// `fieldValidation` policy.
pub fn document(content_type: &str, body: &[u8]) -> Result<(Value, Vec<String>), ApiError> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let mut duplicates = Vec::new();
    let value: Value = match essence {
        "application/json" | "" | "*/*" => json_checked(body, &mut duplicates)
            .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))?,
        crate::protobuf::CONTENT_TYPE => crate::protobuf::decode(body).map_err(|e| {
            ApiError::bad_request(format!("error decoding protobuf request body: {e}"))
        })?,
        "application/yaml" | "application/x-yaml" | "text/yaml" => yaml(body).map_err(|e| {
            ApiError::bad_request(format!("error decoding request body as YAML: {e}"))
        })?,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "error decoding request body: expected a JSON object",
        ));
    }
    Ok((value, duplicates))
}

/// JSON into a value in one pass, noting the path of every key an object repeats (the last
/// one wins, as with serde_json, upstream's decoder and most parsers).
pub fn json_checked(body: &[u8], duplicates: &mut Vec<String>) -> Result<Value, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let found = std::cell::RefCell::new(Vec::new());
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = Tracked {
        at: None,
        found: &found,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    duplicates.extend(found.into_inner());
    Ok(value)
}

/// Where a value sits: its key or index and its parent's place (paths are only spelled out for
/// a duplicate).
struct Place<'a> {
    parent: Option<&'a Place<'a>>,
    key: Option<&'a str>,
    index: usize,
}

impl Place<'_> {
    fn path(&self) -> String {
        let mut parts = Vec::new();
        let mut at = Some(self);
        while let Some(p) = at {
            parts.push(match p.key {
                Some(k) => format!(".{k}"),
                None => format!("[{}]", p.index),
            });
            at = p.parent;
        }
        parts.reverse();
        parts.concat().trim_start_matches('.').to_string()
    }
}

struct Tracked<'a> {
    at: Option<&'a Place<'a>>,
    found: &'a std::cell::RefCell<Vec<String>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Tracked<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Tracked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        loop {
            let place = Place {
                parent: self.at,
                key: None,
                index: items.len(),
            };
            let seed = Tracked {
                at: Some(&place),
                found: self.found,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => items.push(v),
                None => break,
            }
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let place = Place {
                parent: self.at,
                key: Some(&key),
                index: 0,
            };
            let value = map.next_value_seed(Tracked {
                at: Some(&place),
                found: self.found,
            })?;
            let path = object.contains_key(&key).then(|| place.path());
            if let Some(path) = path {
                self.found.borrow_mut().push(path);
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The line at which flow collections (`[`, `{`) nest deeper than `limit`, if they do.
///
/// A scan, not a parser: brackets count where YAML makes them indicators (inside a flow
/// collection, or where a value starts in block context), not inside quoted scalars, comments or
/// the middle of a plain scalar. It can only over-count (a block scalar's line starting with
/// `[`), which matters only past `limit`, where the real parser refuses anyway.
fn flow_too_deep(body: &[u8], limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut line = 1;
    // The last byte that was not a space or tab on this line (b'\n' at a line's start).
    let mut last = b'\n';
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        // A token starts here when the byte before is a separator.
        let token_start = matches!(last, b'\n' | b':' | b'-' | b'?' | b',' | b'[' | b'{')
            && (i == 0
                || matches!(
                    body[i - 1],
                    b' ' | b'\t' | b'\n' | b'\r' | b'[' | b'{' | b','
                ));
        match b {
            b'\n' => {
                line += 1;
                last = b'\n';
            }
            b' ' | b'\t' | b'\r' => {}
            b'#' if i == 0 || matches!(body[i - 1], b' ' | b'\t' | b'\n') => {
                while i < body.len() && body[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' if token_start => {
                // Skip the quoted scalar ("" escapes with backslashes, '' doubles the quote).
                i += 1;
                while i < body.len() {
                    match body[i] {
                        b'\\' if b == b'"' => i += 1,
                        b'\n' => line += 1,
                        q if q == b => {
                            if b == b'\'' && body.get(i + 1) == Some(&b'\'') {
                                i += 1;
                            } else {
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                last = b'"';
            }
            b'[' | b'{' if depth > 0 || token_start => {
                depth += 1;
                if depth > limit {
                    return Some(line);
                }
                last = b;
            }
            b']' | b'}' if depth > 0 => {
                depth -= 1;
                last = b;
            }
            _ => last = b,
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_refused_in_linear_time() {
        let deep = format!("x: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let err = yaml(deep.as_bytes()).unwrap_err();
        assert!(err.contains("deeper than 128"), "{err}");
        // Generous for a debug build on a loaded machine; it was 34 s.
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let maps = format!("x: {}{}", "{a: ".repeat(200), "}".repeat(200));
        assert!(yaml(maps.as_bytes()).unwrap_err().contains("deeper"));
    }

    #[test]
    fn repeated_keys_are_found_with_their_paths() {
        let mut found = Vec::new();
        let v = json_checked(
            br#"{"spec":{"replicas":1,"replicas":2,"template":{"spec":{"containers":[{"name":"a","name":"b"}]}}},"n":1.5}"#,
            &mut found,
        )
        .unwrap();
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(v["n"], 1.5);
        assert_eq!(
            found,
            ["spec.replicas", "spec.template.spec.containers[0].name"]
        );
        let mut none = Vec::new();
        json_checked(br#"{"a":[1,{"b":null}],"c":"d"}"#, &mut none).unwrap();
        assert!(none.is_empty());
        assert!(json_checked(b"{} x", &mut none).is_err());
    }

    #[test]
    fn ordinary_documents_with_brackets_in_text_decode() {
        let doc = "a: [1, [2, {b: c}]]\n\
                   text: x[[[[ and {{{{ in a plain scalar\n\
                   quoted: \"[[[[ {{{{\"\n\
                   single: '[[[[ it''s'\n\
                   # a comment [[[[\n\
                   ini: |\n  [section]\n  k = v\n";
        let v = yaml(doc.as_bytes()).unwrap();
        assert_eq!(v["a"][1][1]["b"], "c");
        assert_eq!(v["single"], "[[[[ it's");
        let nested = format!("x: {}1{}", "[".repeat(100), "]".repeat(100));
        assert!(yaml(nested.as_bytes()).is_ok());
        // Unbalanced text brackets in many values do not add up.
        let many: String = (0..500).map(|i| format!("k{i}: v[\n")).collect();
        assert!(yaml(many.as_bytes()).is_ok());
    }
}
