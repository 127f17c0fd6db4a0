//! Fuzzes the incremental MKV parser: arbitrary bytes are pushed in pieces whose sizes come
//! from the input itself, then the body is finished; every event's cluster is re-walked with
//! `cluster_blocks`, whose answer must match what the parser reported.
//!
//! The first input byte is the piece size. Seed a corpus with real producer files for depth:
//! `mkdir -p corpus/mkv_parser; for f in ../../../../shared/testdata/kvs-mkv/*.mkv; do
//! (printf '\x40'; cat "$f") > corpus/mkv_parser/$(basename "$f"); done`, then
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run mkv_parser corpus/mkv_parser -- -max_len=65536`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_video::mkv::{cluster_blocks, MkvEvent, MkvParser};

fuzz_target!(|data: &[u8]| {
    let Some((&piece, body)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut parser = MkvParser::new();
    let mut events = Vec::new();
    let mut failed = false;
    for chunk in body.chunks(piece) {
        if parser.push_into(chunk, &mut events).is_err() {
            failed = true;
            break;
        }
    }
    if !failed {
        if let Ok(more) = parser.finish() {
            events.extend(more);
        }
    }
    for event in events {
        if let MkvEvent::ClusterEnd(cluster) = event {
            let blocks = cluster_blocks(cluster.timecode, &cluster.body)
                .expect("a cluster the parser accepted re-parses");
            assert_eq!(blocks, cluster.blocks);
            for b in &blocks {
                assert!(b.data_offset + b.data_len <= cluster.body.len());
            }
            let _ = cluster.to_element();
        }
    }
});
