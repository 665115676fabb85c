//! Property tests: whatever a client sends, the parsers and decoders answer with a value or an
//! error, never a panic.

use apiserver_lite::http::request::{Query, negotiate, parse_route};
use apiserver_lite::patch::{PatchType, apply_patch, strategic};
use apiserver_lite::selectors::{FieldSelector, LabelSelector};
use apiserver_lite::{protobuf, structural, tables};
use proptest::prelude::*;
use serde_json::Value;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z$/.:]{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                "[a-z$/]{1,6}|\\$patch|\\$retainKeys|containers|name|ports|finalizers|metadata",
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn selectors(text in ".{0,64}") {
        let _ = LabelSelector::parse(&text);
        let _ = FieldSelector::parse(&text);
    }

    #[test]
    fn selector_like_text(text in "[a-z!=,() .\\\\/-]{0,40}") {
        if let Ok(s) = LabelSelector::parse(&text) {
            let _ = s.matches(&Default::default());
        }
        let _ = FieldSelector::parse(&text);
    }

    #[test]
    fn paths_queries_and_accept_headers(path in "(/[a-z%0-9.]{0,10}){0,8}", query in ".{0,40}", accept in ".{0,60}") {
        let _ = parse_route(&path);
        let _ = Query::parse(Some(&query)).flag("watch");
        let _ = negotiate(Some(&accept));
    }

    #[test]
    fn protobuf_bodies(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = protobuf::decode(&body);
        let mut framed = b"k8s\0".to_vec();
        framed.extend(&body);
        let _ = protobuf::decode(&framed);
    }

    #[test]
    fn patches(live in json_value(), patch in json_value()) {
        let _ = strategic::apply(&live, &patch);
        let body = serde_json::to_vec(&patch).unwrap();
        for kind in [PatchType::Json, PatchType::Merge, PatchType::Strategic] {
            let _ = apply_patch(kind, &live, &body, true);
        }
    }

    #[test]
    fn structural_schemas(schema in json_value(), mut value in json_value()) {
        let mut pruned = Vec::new();
        structural::prune_and_default(&schema, &mut value, "", &mut pruned, true);
        let mut causes = Vec::new();
        structural::validate(&schema, &value, "", &mut causes, true);
    }

    #[test]
    fn printer_column_paths(object in json_value(), path in "[.a-z\\[\\]?@=\"'*0-9()]{0,24}") {
        let _ = tables::json_path(&object, &path);
    }
}
