//! Property tests for the MQTT decoder an outsider reaches (the embedded broker's, vendored
//! rumqttd): any bytes give a packet, an error or a request for more bytes, never a panic, and
//! always within the size limit. A longer run: `PROPTEST_CASES=100000 cargo test --release -p
//! devices --test mqtt_decoder`.

use bytes::BytesMut;
use proptest::prelude::*;
use rumqttd::protocol::Protocol;
use rumqttd::protocol::v4::V4;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(cases)
}

/// A fixed header of a random packet type with a plausible length, then random bytes: the
/// decoder gets past the first checks more often than with bytes alone.
fn packet() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..16,
        0u8..16,
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(kind, flags, body)| {
            let mut p = vec![kind << 4 | flags, body.len().min(127) as u8];
            p.extend(body);
            p
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut stream = BytesMut::from(&bytes[..]);
        // Reads until the decoder wants more or refuses; each packet consumes bytes.
        for _ in 0..64 {
            let before = stream.len();
            if V4.read_mut(&mut stream, 256 * 1024).is_err() || stream.len() == before {
                break;
            }
        }
    }

    #[test]
    fn framed_packets(packets in proptest::collection::vec(packet(), 1..8)) {
        let mut stream = BytesMut::from(&packets.concat()[..]);
        for _ in 0..16 {
            let before = stream.len();
            if V4.read_mut(&mut stream, 256 * 1024).is_err() || stream.len() == before {
                break;
            }
        }
    }
}
