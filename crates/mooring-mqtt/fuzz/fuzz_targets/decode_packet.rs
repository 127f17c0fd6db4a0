//! Fuzzes the MQTT packet decoder: arbitrary bytes, decoded as a connection would (first
//! byte picks the negotiated version), must never panic; every decoded packet must survive
//! an encode/decode round trip unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mooring_mqtt::codec::{self, Packet, V311, V5};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let version = match selector % 3 {
        0 => None,
        1 => Some(V311),
        _ => Some(V5),
    };
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(packet)) = codec::decode(&mut buf, version, 64 * 1024) {
        let encode_version = match &packet {
            Packet::Connect(c) => c.protocol_version,
            _ => version.unwrap_or(V311),
        };
        let mut encoded = BytesMut::new();
        codec::encode(&packet, encode_version, &mut encoded);
        let context = match &packet {
            Packet::Connect(_) => None,
            _ => version,
        };
        let again = codec::decode(&mut encoded, context, usize::MAX)
            .expect("re-encoded packet decodes")
            .expect("re-encoded packet is complete");
        assert_eq!(again, packet);
    }
});
