//! Property tests for every decoder a client reaches: whatever the bytes, each one answers (a
//! value or an error) without panicking, in bounded time. A short run is part of the suite;
//! a longer one: `PROPTEST_CASES=100000 cargo test --release -p apiserver-lite --test decoders`.

use std::time::Duration;

use apiserver_lite::http::decode;
use apiserver_lite::patch::{PatchType, apply_patch};
use apiserver_lite::protobuf;
use apiserver_lite::selectors::{FieldSelector, LabelSelector};
use proptest::prelude::*;
use serde_json::json;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
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
    ("v1", "Namespace"),
    ("apps/v1", "Deployment"),
    ("batch/v1", "Job"),
    ("batch/v1", "CronJob"),
    ("networking.k8s.io/v1", "Ingress"),
    ("meta.k8s.io/v1", "DeleteOptions"),
];

/// Arbitrary JSON-ish text: structure characters and short tokens, likelier to get deep into a
/// parser than uniformly random bytes.
fn jsonish() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("{".to_string()),
            Just("}".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just(",".to_string()),
            Just(":".to_string()),
            Just("\"a\"".to_string()),
            Just("\"metadata\"".to_string()),
            Just("\"name\"".to_string()),
            Just("null".to_string()),
            Just("1e999".to_string()),
            Just("-0".to_string()),
            Just("\"\\ud800\"".to_string()),
            Just("- ".to_string()),
            Just("\n  ".to_string()),
            Just("&a ".to_string()),
            Just("*a".to_string()),
            Just("!!binary ".to_string()),
            "[a-z0-9]{1,4}",
        ],
        0..64,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn protobuf_bodies_of_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = protobuf::decode(&bytes);
        let mut prefixed = b"k8s\0".to_vec();
        prefixed.extend(&bytes);
        let _ = protobuf::decode(&prefixed);
    }

    #[test]
    fn protobuf_messages_of_real_kinds(
        kind in 0..KINDS.len(),
        raw in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let (api_version, kind) = KINDS[kind];
        let _ = protobuf::decode(&envelope(api_version, kind, &raw));
    }

    #[test]
    fn json_and_yaml_bodies(text in jsonish(), bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        for content_type in ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf", "text/plain"] {
            let _ = decode::document(content_type, text.as_bytes());
            let _ = decode::document(content_type, &bytes);
        }
        let _ = decode::yaml(text.as_bytes());
    }

    #[test]
    fn selectors(text in "[a-z0-9=!,() .<>/_-]{0,80}") {
        let _ = LabelSelector::parse(&text);
        let _ = FieldSelector::parse(&text);
        let _ = LabelSelector::from_object(&json!({"matchExpressions": [{"key": text, "operator": "In", "values": [text]}]}));
    }

    #[test]
    fn patches_on_a_live_object(text in jsonish(), kind in 0..4usize) {
        let live = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}}}
        });
        let kind = [PatchType::Json, PatchType::Merge, PatchType::Strategic, PatchType::Apply][kind];
        let _ = apply_patch(kind, &live, text.as_bytes(), true);
        let _ = apply_patch(kind, &live, text.as_bytes(), false);
    }

    #[test]
    fn spdy_sessions_of_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            use tokio::io::AsyncWriteExt;
            let (mut client, server) = tokio::io::duplex(4096);
            let (mut streams, _session) = apiserver_lite::streams::spdy::serve(server);
            let _ = client.write_all(&bytes).await;
            drop(client);
            // The session ends (or at least yields) promptly: no spin, no panic.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while streams.recv().await.is_some() {}
            })
            .await;
        });
    }

    #[test]
    fn spdy_header_blocks(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut codec = apiserver_lite::streams::spdy::HeaderCodec::default();
        let _ = codec.decode(&bytes);
    }
}

/// A header block that inflates to far more than it weighs (a zlib bomb) is refused rather
/// than expanded in memory.
#[test]
fn a_compressed_header_bomb_is_refused() {
    let mut codec = apiserver_lite::streams::spdy::HeaderCodec::default();
    let mut encoder = apiserver_lite::streams::spdy::HeaderCodec::default();
    let value = "a".repeat(16 * 1024 * 1024);
    let block = encoder.encode(&[("x", value.as_str())]);
    assert!(block.len() < 1024 * 1024, "{}", block.len());
    assert!(codec.decode(&block).is_err());
}
