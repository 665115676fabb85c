//! The v2 document in gnostic's protobuf form (`openapi.v2.Document` of gnostic's
//! `OpenAPIv2.proto`, which client-go decodes). Field numbers are that file's. Values of
//! `default`, `example`, `enum` and vendor extensions are gnostic `Any`s carrying YAML text;
//! JSON is YAML, so they carry the value's JSON.

use serde_json::{Map, Value};

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

    fn key(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, data: &[u8]) {
        self.key(field, 2);
        self.varint(data.len() as u64);
        self.0.extend_from_slice(data);
    }

    /// proto3: empty strings are not written.
    fn string(&mut self, field: u32, value: Option<&Value>) {
        if let Some(s) = value.and_then(Value::as_str)
            && !s.is_empty()
        {
            self.bytes(field, s.as_bytes());
        }
    }

    fn strings(&mut self, field: u32, value: Option<&Value>) {
        for s in value
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            self.bytes(field, s.as_bytes());
        }
    }

    fn bool(&mut self, field: u32, value: Option<&Value>) {
        if value.and_then(Value::as_bool) == Some(true) {
            self.key(field, 0);
            self.varint(1);
        }
    }

    fn int64(&mut self, field: u32, value: Option<&Value>) {
        if let Some(n) = value.and_then(Value::as_i64)
            && n != 0
        {
            self.key(field, 0);
            self.varint(n as u64);
        }
    }

    fn double(&mut self, field: u32, value: Option<&Value>) {
        if let Some(n) = value.and_then(Value::as_f64)
            && n != 0.0
        {
            self.key(field, 1);
            self.0.extend_from_slice(&n.to_le_bytes());
        }
    }

    fn message(&mut self, field: u32, body: W) {
        self.bytes(field, &body.0);
    }
}

/// gnostic `Any`: `yaml = 2`.
fn any(value: &Value) -> W {
    let mut w = W::default();
    w.bytes(2, value.to_string().as_bytes());
    w
}

/// `NamedAny` entries for the `x-` keys of `map` (`vendor_extension` fields).
fn extensions(w: &mut W, field: u32, map: &Map<String, Value>) {
    for (name, value) in map.iter().filter(|(k, _)| k.starts_with("x-")) {
        let mut named = W::default();
        named.string(1, Some(&Value::String(name.clone())));
        named.message(2, any(value));
        w.message(field, named);
    }
}

pub fn document(doc: &Value) -> Vec<u8> {
    let mut w = W::default();
    w.string(1, doc.get("swagger"));
    if let Some(info) = doc.get("info") {
        let mut i = W::default();
        i.string(1, info.get("title"));
        i.string(2, info.get("version"));
        w.message(2, i);
    }
    if let Some(Value::Object(paths)) = doc.get("paths") {
        let mut p = W::default();
        for (name, item) in paths {
            let mut named = W::default();
            named.string(1, Some(&Value::String(name.clone())));
            named.message(2, path_item(item));
            p.message(2, named);
        }
        w.message(8, p);
    }
    if let Some(Value::Object(definitions)) = doc.get("definitions") {
        let mut d = W::default();
        for (name, schema) in definitions {
            d.message(1, named_schema(name, schema));
        }
        w.message(9, d);
    }
    if let Some(map) = doc.as_object() {
        extensions(&mut w, 16, map);
    }
    w.0
}

fn named_schema(name: &str, schema: &Value) -> W {
    let mut named = W::default();
    named.string(1, Some(&Value::String(name.to_string())));
    named.message(2, schema_message(schema));
    named
}

fn schema_message(schema: &Value) -> W {
    let mut w = W::default();
    let Some(map) = schema.as_object() else {
        return w;
    };
    let get = |k: &str| map.get(k);
    w.string(1, get("$ref"));
    w.string(2, get("format"));
    w.string(3, get("title"));
    w.string(4, get("description"));
    if let Some(d) = get("default") {
        w.message(5, any(d));
    }
    w.double(6, get("multipleOf"));
    w.double(7, get("maximum"));
    w.bool(8, get("exclusiveMaximum"));
    w.double(9, get("minimum"));
    w.bool(10, get("exclusiveMinimum"));
    w.int64(11, get("maxLength"));
    w.int64(12, get("minLength"));
    w.string(13, get("pattern"));
    w.int64(14, get("maxItems"));
    w.int64(15, get("minItems"));
    w.bool(16, get("uniqueItems"));
    w.int64(17, get("maxProperties"));
    w.int64(18, get("minProperties"));
    w.strings(19, get("required"));
    for v in get("enum").and_then(Value::as_array).into_iter().flatten() {
        w.message(20, any(v));
    }
    match get("additionalProperties") {
        Some(Value::Bool(b)) => {
            // A oneof member: written even when false.
            let mut a = W::default();
            a.key(2, 0);
            a.varint(u64::from(*b));
            w.message(21, a);
        }
        Some(s @ Value::Object(_)) => {
            let mut a = W::default();
            a.message(1, schema_message(s));
            w.message(21, a);
        }
        _ => {}
    }
    match get("type") {
        Some(Value::String(t)) => {
            let mut t2 = W::default();
            t2.bytes(1, t.as_bytes());
            w.message(22, t2);
        }
        Some(types @ Value::Array(_)) => {
            let mut t2 = W::default();
            t2.strings(1, Some(types));
            w.message(22, t2);
        }
        _ => {}
    }
    match get("items") {
        Some(items @ Value::Object(_)) => {
            let mut i = W::default();
            i.message(1, schema_message(items));
            w.message(23, i);
        }
        Some(Value::Array(list)) => {
            let mut i = W::default();
            for s in list {
                i.message(1, schema_message(s));
            }
            w.message(23, i);
        }
        _ => {}
    }
    for s in get("allOf").and_then(Value::as_array).into_iter().flatten() {
        w.message(24, schema_message(s));
    }
    if let Some(Value::Object(props)) = get("properties") {
        let mut p = W::default();
        for (name, s) in props {
            p.message(1, named_schema(name, s));
        }
        w.message(25, p);
    }
    w.string(26, get("discriminator"));
    w.bool(27, get("readOnly"));
    if let Some(e) = get("example") {
        w.message(30, any(e));
    }
    extensions(&mut w, 31, map);
    w
}

fn path_item(item: &Value) -> W {
    let mut w = W::default();
    let Some(map) = item.as_object() else {
        return w;
    };
    for (field, method) in [
        (2, "get"),
        (3, "put"),
        (4, "post"),
        (5, "delete"),
        (6, "options"),
        (7, "head"),
        (8, "patch"),
    ] {
        if let Some(op) = map.get(method) {
            w.message(field, operation(op));
        }
    }
    for p in map
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        w.message(9, parameters_item(p));
    }
    extensions(&mut w, 10, map);
    w
}

fn operation(op: &Value) -> W {
    let mut w = W::default();
    let Some(map) = op.as_object() else {
        return w;
    };
    w.strings(1, map.get("tags"));
    w.string(2, map.get("summary"));
    w.string(3, map.get("description"));
    w.string(5, map.get("operationId"));
    w.strings(6, map.get("produces"));
    w.strings(7, map.get("consumes"));
    for p in map
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        w.message(8, parameters_item(p));
    }
    if let Some(Value::Object(codes)) = map.get("responses") {
        let mut responses = W::default();
        for (code, response) in codes {
            let mut r = W::default();
            r.string(1, response.get("description"));
            if let Some(schema) = response.get("schema") {
                let mut item = W::default();
                item.message(1, schema_message(schema));
                r.message(2, item);
            }
            let mut value = W::default();
            value.message(1, r);
            let mut named = W::default();
            named.string(1, Some(&Value::String(code.clone())));
            named.message(2, value);
            responses.message(1, named);
        }
        w.message(9, responses);
    }
    w.strings(10, map.get("schemes"));
    w.bool(11, map.get("deprecated"));
    extensions(&mut w, 13, map);
    w
}

/// `ParametersItem { Parameter { BodyParameter = 1 | NonBodyParameter = 2 } }`.
fn parameters_item(p: &Value) -> W {
    let get = |k: &str| p.get(k);
    let mut parameter = W::default();
    if get("in").and_then(Value::as_str) == Some("body") {
        let mut b = W::default();
        b.string(1, get("description"));
        b.string(2, get("name"));
        b.string(3, get("in"));
        b.bool(4, get("required"));
        if let Some(s) = get("schema") {
            b.message(5, schema_message(s));
        }
        parameter.message(1, b);
    } else {
        // Query (3) and path (4) sub-schemas; header and form data are not used here.
        let path = get("in").and_then(Value::as_str) == Some("path");
        let mut s = W::default();
        s.bool(1, get("required"));
        s.string(2, get("in"));
        s.string(3, get("description"));
        s.string(4, get("name"));
        // The path sub-schema has no allowEmptyValue: its fields after `name` are one lower.
        let shift = if path { 0 } else { 1 };
        s.string(5 + shift, get("type"));
        s.string(6 + shift, get("format"));
        s.bool(19 + shift, get("uniqueItems"));
        let mut non_body = W::default();
        non_body.message(if path { 4 } else { 3 }, s);
        parameter.message(2, non_body);
    }
    let mut item = W::default();
    item.message(1, parameter);
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Reads (field, wire, payload) triples of one message.
    fn fields(mut data: &[u8]) -> Vec<(u64, Vec<u8>)> {
        fn varint(data: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let b = data[0];
                *data = &data[1..];
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return v;
                }
                shift += 7;
            }
        }
        let mut out = Vec::new();
        while !data.is_empty() {
            let key = varint(&mut data);
            match key & 7 {
                0 => out.push((key >> 3, varint(&mut data).to_le_bytes().to_vec())),
                1 => {
                    out.push((key >> 3, data[..8].to_vec()));
                    data = &data[8..];
                }
                2 => {
                    let n = varint(&mut data) as usize;
                    out.push((key >> 3, data[..n].to_vec()));
                    data = &data[n..];
                }
                w => panic!("wire type {w}"),
            }
        }
        out
    }

    #[test]
    fn a_schema_with_its_kind_extension_encodes_by_gnostics_numbers() {
        let doc = json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.33.0"},
            "definitions": {"io.k8s.api.core.v1.Pod": {"type": "object", "description": "Pod",
                "required": ["spec"],
                "properties": {"spec": {"$ref": "#/definitions/io.k8s.api.core.v1.PodSpec"}},
                "additionalProperties": false,
                "x-kubernetes-group-version-kind": [{"group": "", "kind": "Pod", "version": "v1"}]}}});
        let bytes = document(&doc);
        let top = fields(&bytes);
        assert_eq!(top[0], (1, b"2.0".to_vec()));
        let definitions = &top.iter().find(|(f, _)| *f == 9).unwrap().1;
        let named = fields(&fields(definitions)[0].1);
        assert_eq!(named[0], (1, b"io.k8s.api.core.v1.Pod".to_vec()));
        let schema = fields(&named[1].1);
        let by = |n: u64| {
            schema
                .iter()
                .filter(|(f, _)| *f == n)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(by(4), vec![b"Pod".to_vec()]);
        assert_eq!(by(19), vec![b"spec".to_vec()]);
        assert_eq!(fields(&by(22)[0]), vec![(1, b"object".to_vec())]);
        // additionalProperties: false is present (field 2 = 0).
        assert_eq!(fields(&by(21)[0]), vec![(2, 0u64.to_le_bytes().to_vec())]);
        let ext = fields(&by(31)[0]);
        assert_eq!(ext[0], (1, b"x-kubernetes-group-version-kind".to_vec()));
        let yaml = fields(&ext[1].1);
        assert_eq!(yaml[0].0, 2);
        let value: Value = serde_json::from_slice(&yaml[0].1).unwrap();
        assert_eq!(value[0]["kind"], "Pod");
        let props = fields(&by(25)[0]);
        let spec = fields(&props[0].1);
        assert_eq!(spec[0], (1, b"spec".to_vec()));
        assert_eq!(
            fields(&spec[1].1)[0],
            (1, b"#/definitions/io.k8s.api.core.v1.PodSpec".to_vec())
        );
    }
}
