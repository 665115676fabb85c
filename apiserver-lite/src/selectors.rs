//! Label and field selectors: parsing upstream's text forms and matching objects. Pure code.
//!
//! Label selectors: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, `a>1`, `a<1`,
//! joined by commas. Field selectors: `f=v`, `f==v`, `f!=v`, joined by commas, with `\,`, `\=` and
//! `\\` escapes in values.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::validation::{is_label_value, is_qualified_name};

#[derive(Debug, Clone, PartialEq)]
pub enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed label selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    pub requirements: Vec<LabelRequirement>,
}

fn requirement_error(detail: impl std::fmt::Display) -> String {
    format!("unable to parse requirement: {detail}")
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => i += 1,
            ',' => {
                tokens.push(Token::Comma);
                i += 1
            }
            '(' => {
                tokens.push(Token::Open);
                i += 1
            }
            ')' => {
                tokens.push(Token::Close);
                i += 1
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                tokens.push(Token::Op("!="));
                i += 2
            }
            '!' => {
                tokens.push(Token::Op("!"));
                i += 1
            }
            '=' if chars.get(i + 1) == Some(&'=') => {
                tokens.push(Token::Op("=="));
                i += 2
            }
            '=' => {
                tokens.push(Token::Op("="));
                i += 1
            }
            '>' => {
                tokens.push(Token::Op(">"));
                i += 1
            }
            '<' => {
                tokens.push(Token::Op("<"));
                i += 1
            }
            _ => {
                let start = i;
                while i < chars.len() && !" \t,()!=<>".contains(chars[i]) {
                    i += 1;
                }
                tokens.push(Token::Word(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(tokens)
}

fn check_key(key: &str) -> Result<(), String> {
    if let Err(why) = is_qualified_name(key) {
        return Err(requirement_error(format!(
            "key: Invalid value: {key:?}: {why}"
        )));
    }
    Ok(())
}

fn check_value(key: &str, value: &str) -> Result<(), String> {
    if let Err(why) = is_label_value(value) {
        return Err(requirement_error(format!(
            "values[0][{key}]: Invalid value: {value:?}: {why}"
        )));
    }
    Ok(())
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let tokens = tokenize(text)?;
        let mut requirements = Vec::new();
        let mut i = 0;
        let word = |i: usize| match tokens.get(i) {
            Some(Token::Word(w)) => Some(w.clone()),
            _ => None,
        };
        while i < tokens.len() {
            if tokens[i] == Token::Op("!") {
                let key = word(i + 1)
                    .ok_or_else(|| requirement_error("found '!' with no key after it"))?;
                check_key(&key)?;
                requirements.push(LabelRequirement::DoesNotExist(key));
                i += 2;
            } else {
                let key = word(i).ok_or_else(|| {
                    requirement_error(format!(
                        "found {:?}, expected: identifier",
                        describe(tokens.get(i))
                    ))
                })?;
                check_key(&key)?;
                i += 1;
                match tokens.get(i) {
                    None | Some(Token::Comma) => requirements.push(LabelRequirement::Exists(key)),
                    Some(Token::Op(op @ ("=" | "==" | "!="))) => {
                        let op = *op;
                        let value = match tokens.get(i + 1) {
                            Some(Token::Word(w)) => {
                                i += 2;
                                w.clone()
                            }
                            None | Some(Token::Comma) => {
                                i += 1;
                                String::new()
                            }
                            other => {
                                return Err(requirement_error(format!(
                                    "found {:?}, expected: identifier",
                                    describe(other)
                                )));
                            }
                        };
                        check_value(&key, &value)?;
                        requirements.push(if op == "!=" {
                            LabelRequirement::NotEquals(key, value)
                        } else {
                            LabelRequirement::Equals(key, value)
                        });
                    }
                    Some(Token::Op(op @ (">" | "<"))) => {
                        let op = *op;
                        let value = word(i + 1)
                            .ok_or_else(|| requirement_error("expected an integer after > or <"))?;
                        let n: i64 = value.parse().map_err(|_| {
                            requirement_error(format!(
                                "for 'Gt', 'Lt' operators, the value must be an integer: {value:?}"
                            ))
                        })?;
                        requirements.push(if op == ">" {
                            LabelRequirement::GreaterThan(key, n)
                        } else {
                            LabelRequirement::LessThan(key, n)
                        });
                        i += 2;
                    }
                    Some(Token::Word(op)) if op == "in" || op == "notin" => {
                        let negate = op == "notin";
                        i += 1;
                        if tokens.get(i) != Some(&Token::Open) {
                            return Err(requirement_error(format!(
                                "found {:?}, expected: '('",
                                describe(tokens.get(i))
                            )));
                        }
                        i += 1;
                        let mut values = Vec::new();
                        loop {
                            match tokens.get(i) {
                                Some(Token::Word(w)) => {
                                    check_value(&key, w)?;
                                    values.push(w.clone());
                                    i += 1;
                                }
                                Some(Token::Comma) => i += 1,
                                Some(Token::Close) => {
                                    i += 1;
                                    break;
                                }
                                other => {
                                    return Err(requirement_error(format!(
                                        "found {:?}, expected: ',', ')' or identifier",
                                        describe(other)
                                    )));
                                }
                            }
                        }
                        if values.is_empty() {
                            return Err(requirement_error(
                                "for 'in', 'notin' operators, values set can't be empty",
                            ));
                        }
                        requirements.push(if negate {
                            LabelRequirement::NotIn(key, values)
                        } else {
                            LabelRequirement::In(key, values)
                        });
                    }
                    other => {
                        return Err(requirement_error(format!(
                            "found {:?}, expected: in, notin, =, ==, !=, gt, lt",
                            describe(other)
                        )));
                    }
                }
            }
            match tokens.get(i) {
                None => break,
                Some(Token::Comma) => {
                    i += 1;
                    if i == tokens.len() {
                        return Err(requirement_error(
                            "found '', expected: identifier after ','",
                        ));
                    }
                }
                other => {
                    return Err(requirement_error(format!(
                        "found {:?}, expected: ','",
                        describe(other)
                    )));
                }
            }
        }
        Ok(LabelSelector { requirements })
    }

    /// Builds the selector of a `metav1.LabelSelector` object (`matchLabels` / `matchExpressions`).
    pub fn from_object(selector: &Value) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in labels {
                requirements.push(LabelRequirement::Equals(
                    k.clone(),
                    v.as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        if let Some(exprs) = selector.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e["key"].as_str().unwrap_or_default().to_string();
                let values: Vec<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                requirements.push(match e["operator"].as_str() {
                    Some("In") => LabelRequirement::In(key, values),
                    Some("NotIn") => LabelRequirement::NotIn(key, values),
                    Some("Exists") => LabelRequirement::Exists(key),
                    Some("DoesNotExist") => LabelRequirement::DoesNotExist(key),
                    other => {
                        return Err(format!("{other:?} is not a valid label selector operator"));
                    }
                });
            }
        }
        Ok(LabelSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
            LabelRequirement::GreaterThan(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            LabelRequirement::LessThan(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        })
    }

    /// Matches the labels of a JSON object (`metadata.labels`).
    pub fn matches_object(&self, object: &Value) -> bool {
        if self.is_empty() {
            return true;
        }
        self.matches(&labels_of(object))
    }
}

fn describe(token: Option<&Token>) -> String {
    match token {
        None => String::new(),
        Some(Token::Word(w)) => w.clone(),
        Some(Token::Op(o)) => o.to_string(),
        Some(Token::Open) => "(".into(),
        Some(Token::Close) => ")".into(),
        Some(Token::Comma) => ",".into(),
    }
}

pub fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub negate: bool,
}

/// A parsed field selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

fn split_unescaped(text: &str, separator: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            current.push('\\');
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == separator {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    if escaped {
        current.push('\\');
    }
    parts.push(current);
    parts
}

fn unescape(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(other) => {
                    return Err(format!(
                        "invalid field selector: invalid escape sequence: \\{other}"
                    ));
                }
                None => return Err("invalid field selector: invalid escape sequence at end".into()),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(FieldSelector::default());
        }
        for part in split_unescaped(text, ',') {
            let (field, value, negate) = if let Some(i) = find_unescaped(&part, "!=") {
                (&part[..i], &part[i + 2..], true)
            } else if let Some(i) = find_unescaped(&part, "==") {
                (&part[..i], &part[i + 2..], false)
            } else if let Some(i) = find_unescaped(&part, "=") {
                (&part[..i], &part[i + 1..], false)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                ));
            };
            requirements.push(FieldRequirement {
                field: field.trim().to_string(),
                value: unescape(value.trim())?,
                negate,
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Matches a set of field values (from [`crate::kinds::selectable_fields`]).
    pub fn matches(&self, fields: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| {
            let actual = fields.get(&r.field).map(String::as_str).unwrap_or("");
            (actual == r.value) != r.negate
        })
    }

    /// The value a requirement pins with `=`, for a cheaper narrower query.
    pub fn pinned(&self, field: &str) -> Option<&str> {
        self.requirements
            .iter()
            .find(|r| r.field == field && !r.negate)
            .map(|r| r.value.as_str())
    }
}

fn find_unescaped(text: &str, pattern: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            chars.next();
            continue;
        }
        if text[i..].starts_with(pattern) {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_label_operator() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("n", "5")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier=back", false),
            ("n>4", true),
            ("n<5", false),
            ("missing!=x", true),
            ("example.com/role in (a)", false),
        ] {
            let s = LabelSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn absurd_label_selectors_are_errors() {
        for bad in [
            "a=(", "in (a)", "a in ()", "a in b", "=x", "a,", "a b", "-bad-=x", "a=b c", "!",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn field_selectors() {
        let f = FieldSelector::parse("metadata.name=a\\,b,status.phase!=Failed").unwrap();
        assert_eq!(f.requirements[0].value, "a,b");
        let fields: BTreeMap<String, String> = [
            ("metadata.name".to_string(), "a,b".to_string()),
            ("status.phase".to_string(), "Running".to_string()),
        ]
        .into();
        assert!(f.matches(&fields));
        assert!(FieldSelector::parse("nonsense").is_err());
        assert_eq!(f.pinned("metadata.name"), Some("a,b"));
        let unicode = FieldSelector::parse("metadata.name=é\\=ü,x!=ñ").unwrap();
        assert_eq!(unicode.requirements[0].value, "é=ü");
        assert!(unicode.requirements[1].negate);
    }

    #[test]
    fn from_match_expressions() {
        let s = LabelSelector::from_object(&serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]
        }))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
    }
}
