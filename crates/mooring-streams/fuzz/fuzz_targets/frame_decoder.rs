//! Fuzzes the stream manager's frame decoder and request decoding: arbitrary bytes, fed in
//! arbitrary pieces, must never panic, and every decoded frame's payload goes through the
//! request decoder of its operation.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mooring_streams::api::decode_request;
use mooring_streams::codec::{request_id_of, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the input is split into reads.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = (step as usize % 64) + 1;
    let decoder = FrameDecoder::default();
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let _ = decode_request(frame.operation, &frame.payload);
                    let _ = request_id_of(&frame.payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
