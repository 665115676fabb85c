//! Property tests: whatever a client sends, the parsers and decoders answer with a value or an
//! error, never a panic, in bounded time. A short run is part of the suite; a longer one:
//! `PROPTEST_CASES=100000 cargo test --release -p apiserver-lite --test never_panics`.

use std::time::Duration;

use apiserver_lite::http::decode;
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

/// 512 cases per property, or `PROPTEST_CASES`.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(512);
    ProptestConfig::with_cases(cases)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(number << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A Kubernetes protobuf envelope (`k8s\0` + runtime.Unknown) around `raw` as `kind`.
fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::new();
    field(1, api_version.as_bytes(), &mut type_meta);
    field(2, kind.as_bytes(), &mut type_meta);
    let mut unknown = Vec::new();
    field(1, &type_meta, &mut unknown);
    field(2, raw, &mut unknown);
    let mut body = b"k8s\0".to_vec();
    body.extend(unknown);
    body
}

const KINDS: &[(&str, &str)] = &[
    ("v1", "Pod"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("batch/v1", "CronJob"),
    ("networking.k8s.io/v1", "Ingress"),
    ("meta.k8s.io/v1", "DeleteOptions"),
];

/// JSON- and YAML-ish text: structure characters and short tokens, likelier to get deep into a
/// parser than uniformly random bytes.
fn documentish() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("{"),
            Just("}"),
            Just("["),
            Just("]"),
            Just(","),
            Just(":"),
            Just("\"a\""),
            Just("\"metadata\""),
            Just("null"),
            Just("1e999"),
            Just("-0"),
            Just("\"\\ud800\""),
            Just("- "),
            Just("\n  "),
            Just("&a "),
            Just("*a"),
            Just("!!binary "),
            Just("#"),
            Just("'"),
            Just("x"),
        ],
        0..64,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn protobuf_messages_of_real_kinds(kind in 0..KINDS.len(), raw in prop::collection::vec(any::<u8>(), 0..512)) {
        let (api_version, kind) = KINDS[kind];
        let _ = protobuf::decode(&envelope(api_version, kind, &raw));
    }

    #[test]
    fn json_and_yaml_bodies(text in documentish(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for content_type in ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf", "text/plain"] {
            let _ = decode::document(content_type, text.as_bytes());
            let _ = decode::document(content_type, &bytes);
        }
        let _ = decode::yaml(text.as_bytes());
    }

    #[test]
    fn spdy_sessions(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            use tokio::io::AsyncWriteExt;
            let (mut client, server) = tokio::io::duplex(4096);
            let (mut streams, _session) = apiserver_lite::streams::spdy::serve(server);
            let _ = client.write_all(&bytes).await;
            drop(client);
            // The session ends promptly: no spin, no panic.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while streams.recv().await.is_some() {}
            })
            .await;
        });
    }

    #[test]
    fn websocket_frames(
        frames in prop::collection::vec(
            (any::<bool>(), prop::sample::select(vec![0u8, 1, 2, 8, 9, 10, 3, 15]), any::<[u8; 4]>(), prop::collection::vec(any::<u8>(), 0..300)),
            0..6,
        ),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = Vec::new();
        for (fin, opcode, mask, payload) in &frames {
            bytes.push(if *fin { 0x80 } else { 0 } | opcode);
            match payload.len() {
                n @ 0..=125 => bytes.push(0x80 | n as u8),
                n => {
                    bytes.push(0x80 | 126);
                    bytes.extend_from_slice(&(n as u16).to_be_bytes());
                }
            }
            bytes.extend_from_slice(mask);
            bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        bytes.extend_from_slice(&garbage);
        websocket_session(&bytes);
    }

    #[test]
    fn spdy_header_blocks(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut codec = apiserver_lite::streams::spdy::HeaderCodec::default();
        let _ = codec.decode(&bytes);
    }

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

/// A header block that inflates to far more than it weighs (a zlib bomb) is refused rather
/// than expanded in memory.
/// Feeds `bytes` to a server-side WebSocket as the API server configures it, reading every
/// message: it ends promptly, without a panic.
fn websocket_session(bytes: &[u8]) -> Vec<String> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut ws = WebSocketStream::from_raw_socket(
            server,
            Role::Server,
            Some(apiserver_lite::streams::websocket_config()),
        )
        .await;
        let _ = client.write_all(bytes).await;
        drop(client);
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(m) => seen.push(format!("{}", m.len())),
                    Err(e) => {
                        seen.push(e.to_string());
                        break;
                    }
                }
            }
        })
        .await;
        seen
    })
}

#[test]
fn a_websocket_frame_larger_than_a_tunnel_frame_is_refused_before_it_is_read() {
    // A masked binary frame announcing 2 MiB (tungstenite takes 16 MiB frames by default),
    // with 1 KiB sent.
    let mut bytes = vec![0x82, 0x80 | 127];
    bytes.extend_from_slice(&(2u64 << 20).to_be_bytes());
    bytes.extend_from_slice(&[1, 2, 3, 4]);
    bytes.extend(std::iter::repeat_n(0u8, 1024));
    let seen = websocket_session(&bytes);
    assert!(
        seen.iter()
            .any(|e| e.contains("too long") || e.contains("Space limit")),
        "{seen:?}"
    );
}

#[test]
fn a_compressed_header_bomb_is_refused() {
    let mut codec = apiserver_lite::streams::spdy::HeaderCodec::default();
    let mut encoder = apiserver_lite::streams::spdy::HeaderCodec::default();
    let value = "a".repeat(16 * 1024 * 1024);
    let block = encoder.encode(&[("x", value.as_str())]);
    assert!(block.len() < 1024 * 1024, "{}", block.len());
    assert!(codec.decode(&block).is_err());
}
