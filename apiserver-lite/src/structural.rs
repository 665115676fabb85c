//! Structural schemas of custom resources (a CRD's `openAPIV3Schema`): pruning of unknown
//! fields, defaulting, and validation with upstream's messages. Pure code.
//!
//! Validation covers types (with `x-kubernetes-int-or-string`), `required`, `enum`, numeric
//! bounds, string lengths and `pattern`, item counts, `uniqueItems`, `nullable`, and the
//! `allOf`/`anyOf`/`oneOf`/`not` combinators. CEL rules (`x-kubernetes-validations`) are not
//! evaluated yet.

use serde_json::Value;

use crate::error::Cause;

fn type_of(schema: &Value) -> &str {
    schema.get("type").and_then(Value::as_str).unwrap_or("")
}

fn preserves_unknown(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Removes fields the schema does not know (listing them in `pruned`) and fills in defaults.
/// `root` skips apiVersion, kind and metadata, which every object keeps.
pub fn prune_and_default(
    schema: &Value,
    value: &mut Value,
    path: &str,
    pruned: &mut Vec<String>,
    root: bool,
) {
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            if let Some(props) = properties {
                for (key, prop) in props {
                    if let Some(default) = prop.get("default")
                        && map.get(key).is_none_or(|v| {
                            v.is_null() && prop.get("nullable") != Some(&Value::Bool(true))
                        })
                    {
                        map.insert(key.clone(), default.clone());
                    }
                }
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if root && (key == "apiVersion" || key == "kind" || key == "metadata") {
                    continue;
                }
                let child_path = join(path, &key);
                let child_schema = properties.and_then(|p| p.get(&key)).or(match additional {
                    Some(Value::Object(_)) => additional,
                    _ => None,
                });
                match child_schema {
                    Some(s) => {
                        let drop_null = map.get(&key).is_some_and(Value::is_null)
                            && s.get("nullable").and_then(Value::as_bool) != Some(true);
                        if drop_null {
                            map.remove(&key);
                        } else if let Some(child) = map.get_mut(&key) {
                            prune_and_default(s, child, &child_path, pruned, false);
                        }
                    }
                    None => {
                        let keep = preserves_unknown(schema)
                            || additional == Some(&Value::Bool(true))
                            || (properties.is_none() && type_of(schema).is_empty());
                        if !keep {
                            map.remove(&key);
                            pruned.push(child_path);
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_and_default(item_schema, item, &format!("{path}[{i}]"), pruned, false);
                }
            }
        }
        _ => {}
    }
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Validates `value` against `schema`, appending causes.
pub fn validate(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>, root: bool) {
    let field = if path.is_empty() {
        "<root>".to_string()
    } else {
        path.to_string()
    };
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true)
            && !type_of(schema).is_empty()
        {
            causes.push(Cause::invalid(
                &field,
                value,
                &format!(
                    "{field} in body must be of type {}: \"null\"",
                    type_of(schema)
                ),
            ));
        }
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    let wanted = type_of(schema);
    let actual = json_type(value);
    let type_ok = match wanted {
        "" => true,
        _ if int_or_string => matches!(actual, "integer" | "string"),
        "number" => matches!(actual, "number" | "integer"),
        w => w == actual,
    };
    if !type_ok {
        causes.push(Cause::invalid(
            &field,
            value,
            &format!("{field} in body must be of type {wanted}: {:?}", actual),
        ));
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let list: Vec<String> = options.iter().map(shown).collect();
        causes.push(Cause::new(
            "FieldValueNotSupported",
            &field,
            format!(
                "Unsupported value: {}: supported values: {}",
                shown(value),
                list.join(", ")
            ),
        ));
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                let exclusive =
                    schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
                if x < min || (exclusive && x == min) {
                    let op = if exclusive {
                        "greater than"
                    } else {
                        "greater than or equal to"
                    };
                    causes.push(Cause::invalid(
                        &field,
                        value,
                        &format!(
                            "{field} in body should be {op} {}",
                            Value::from(min).as_f64().map(fmt_num).unwrap_or_default()
                        ),
                    ));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                let exclusive =
                    schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
                if x > max || (exclusive && x == max) {
                    let op = if exclusive {
                        "less than"
                    } else {
                        "less than or equal to"
                    };
                    causes.push(Cause::invalid(
                        &field,
                        value,
                        &format!("{field} in body should be {op} {}", fmt_num(max)),
                    ));
                }
            }
            if let Some(m) = schema.get("multipleOf").and_then(Value::as_f64)
                && m > 0.0
                && (x / m).fract().abs() > 1e-9
            {
                causes.push(Cause::invalid(
                    &field,
                    value,
                    &format!("{field} in body should be a multiple of {}", fmt_num(m)),
                ));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                causes.push(Cause::too_long(&field, max as usize));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                causes.push(Cause::invalid(
                    &field,
                    value,
                    &format!("{field} in body should be at least {min} chars long"),
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(pattern) {
                    Ok(re) if !re.is_match(s) => {
                        causes.push(Cause::invalid(
                            &field,
                            value,
                            &format!("{field} in body should match '{pattern}'"),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => causes.push(Cause::invalid(
                        &field,
                        value,
                        &format!("the schema's pattern {pattern:?} does not compile"),
                    )),
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                causes.push(Cause::invalid(
                    &field,
                    &Value::from(items.len()),
                    &format!("{field} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && (items.len() as u64) > max
            {
                causes.push(Cause::new(
                    "FieldValueTooMany",
                    &field,
                    format!("Too many: {}: must have at most {max} items", items.len()),
                ));
            }
            if schema.get("uniqueItems").and_then(Value::as_bool) == Some(true)
                || schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set")
            {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        causes.push(Cause::duplicate(format!("{field}[{i}]"), item));
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item_schema, item, &format!("{path}[{i}]"), causes, false);
                }
            }
        }
        Value::Object(map) => {
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if map.get(r).is_none_or(Value::is_null) {
                        causes.push(Cause::required(join(path, r)));
                    }
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if root && (key == "apiVersion" || key == "kind" || key == "metadata") {
                    continue;
                }
                if let Some(s) = properties.and_then(|p| p.get(key)).or(additional) {
                    validate(s, child, &join(path, key), causes, false);
                }
            }
            for (bound, cmp) in [("minProperties", true), ("maxProperties", false)] {
                if let Some(n) = schema.get(bound).and_then(Value::as_u64) {
                    let count = map.len() as u64;
                    if (cmp && count < n) || (!cmp && count > n) {
                        let word = if cmp { "at least" } else { "at most" };
                        causes.push(Cause::invalid(
                            &field,
                            &Value::from(count),
                            &format!("{field} in body should have {word} {n} properties"),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    combinators(schema, value, path, &field, causes);
}

fn combinators(schema: &Value, value: &Value, path: &str, field: &str, causes: &mut Vec<Cause>) {
    let passes = |s: &Value| {
        let mut c = Vec::new();
        validate(s, value, path, &mut c, false);
        c.is_empty()
    };
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            validate(s, value, path, causes, false);
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
        && !any.is_empty()
        && !any.iter().any(passes)
    {
        causes.push(Cause::invalid(
            field,
            value,
            &format!("{field} in body must validate at least one schema (anyOf)"),
        ));
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array)
        && !one.is_empty()
        && one.iter().filter(|s| passes(s)).count() != 1
    {
        causes.push(Cause::invalid(
            field,
            value,
            &format!("{field} in body must validate one and only one schema (oneOf)"),
        ));
    }
    if let Some(not) = schema.get("not")
        && passes(not)
    {
        causes.push(Cause::invalid(
            field,
            value,
            &format!("{field} in body should not validate the given schema"),
        ));
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crontab_schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["cronSpec"], "properties": {
                "cronSpec": {"type": "string", "pattern": "^(\\d+|\\*)(/\\d+)?(\\s+(\\d+|\\*)(/\\d+)?){4}$"},
                "image": {"type": "string", "maxLength": 20},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
                "color": {"type": "string", "enum": ["red", "blue"]},
                "port": {"x-kubernetes-int-or-string": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }},
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
        }})
    }

    #[test]
    fn prunes_unknown_fields_and_defaults() {
        let mut v = json!({"apiVersion": "x/v1", "kind": "CronTab", "metadata": {"name": "a"},
            "spec": {"cronSpec": "* * * * */5", "bogus": 1, "labels": {"a": "b"}, "free": {"anything": [1]}}, "top": true});
        let mut pruned = Vec::new();
        prune_and_default(&crontab_schema(), &mut v, "", &mut pruned, true);
        assert_eq!(pruned, vec!["spec.bogus", "top"]);
        assert_eq!(v["spec"]["replicas"], 1);
        assert_eq!(v["spec"]["free"]["anything"], json!([1]));
        assert_eq!(v["metadata"]["name"], "a");
    }

    #[test]
    fn validation_messages() {
        let v = json!({"spec": {"image": "a-very-long-image-name-indeed", "replicas": 0, "color": "pink", "port": "http"}});
        let mut causes = Vec::new();
        validate(&crontab_schema(), &v, "", &mut causes, true);
        let shown: Vec<String> = causes.iter().map(Cause::display).collect();
        assert_eq!(
            shown,
            vec![
                "spec.cronSpec: Required value",
                "spec.color: Unsupported value: \"pink\": supported values: \"red\", \"blue\"",
                "spec.image: Too long: may not be more than 20 bytes",
                "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1",
            ]
        );
        let mut causes = Vec::new();
        validate(
            &crontab_schema(),
            &json!({"spec": {"cronSpec": "nope", "replicas": "3"}}),
            "",
            &mut causes,
            true,
        );
        let shown: Vec<String> = causes.iter().map(Cause::display).collect();
        assert_eq!(
            shown,
            vec![
                "spec.cronSpec: Invalid value: \"nope\": spec.cronSpec in body should match '^(\\d+|\\*)(/\\d+)?(\\s+(\\d+|\\*)(/\\d+)?){4}$'",
                "spec.replicas: Invalid value: \"3\": spec.replicas in body must be of type integer: \"string\"",
            ]
        );
    }
}
