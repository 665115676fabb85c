//! JSON text in the key order Go's API server writes: an object's `kind` then `apiVersion`
//! first (Go's `TypeMeta` leads every object), a watch event's `type` before its `object`; the
//! other keys in serde_json's (sorted) order, which for the rest of an object's top level
//! (`metadata`, `spec`, `status`) is Go's. Clients that decode by position see what they see
//! upstream (kube-rs reports a wrong kind at "line 1 column 17", just after `{"kind":"Service"`).
//! Applied to an object, the `items` of a list and the `object` of a watch event; nested
//! references (`ownerReferences`, `involvedObject`) keep their own Go order, which is not this.

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

const FIRST: [&str; 3] = ["kind", "apiVersion", "type"];

/// A value serialized in Go's key order.
pub struct GoOrder<'a>(pub &'a Value);

struct Items<'a>(&'a [Value]);

impl Serialize for Items<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for item in self.0 {
            seq.serialize_element(&GoOrder(item))?;
        }
        seq.end()
    }
}

impl Serialize for GoOrder<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Value::Object(map) = self.0 else {
            return self.0.serialize(s);
        };
        let mut out = s.serialize_map(Some(map.len()))?;
        for key in FIRST {
            if let Some(v) = map.get(key) {
                out.serialize_entry(key, v)?;
            }
        }
        for (key, value) in map {
            if FIRST.contains(&key.as_str()) {
                continue;
            }
            match (key.as_str(), value) {
                ("items", Value::Array(items)) => out.serialize_entry(key, &Items(items))?,
                ("object", Value::Object(_)) => out.serialize_entry(key, &GoOrder(value))?,
                _ => out.serialize_entry(key, value)?,
            }
        }
        out.end()
    }
}

pub fn to_vec(value: &Value) -> Vec<u8> {
    serde_json::to_vec(&GoOrder(value)).unwrap_or_default()
}

pub fn to_string(value: &Value) -> String {
    serde_json::to_string(&GoOrder(value)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kind_and_api_version_lead_objects_list_items_and_watch_events() {
        let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
            "spec": {}, "status": {}});
        let text = to_string(&service);
        assert!(
            text.starts_with(r#"{"kind":"Service","apiVersion":"v1","metadata""#),
            "{text}"
        );
        assert_eq!(r#"{"kind":"Service""#.len(), 17);
        let list = json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {},
            "items": [service.clone()]});
        let text = to_string(&list);
        assert!(
            text.contains(r#""items":[{"kind":"Service","apiVersion":"v1""#),
            "{text}"
        );
        let event = json!({"type": "ADDED", "object": service});
        let text = to_string(&event);
        assert!(
            text.starts_with(r#"{"type":"ADDED","object":{"kind":"Service""#),
            "{text}"
        );
        // References inside keep serde's order; values round-trip unchanged.
        let owned = json!({"kind": "Pod", "metadata": {"ownerReferences": [{"kind": "ReplicaSet", "apiVersion": "apps/v1"}]}});
        let text = to_string(&owned);
        assert!(
            text.contains(r#"[{"apiVersion":"apps/v1","kind":"ReplicaSet"}]"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), owned);
    }
}
