//! Fuzzes the IoT SQL parser under both versions, and evaluates whatever parses against a
//! fixed JSON payload and against the fuzz input itself as the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_iot::sql::{self, MessageFacts, NoExternalFunctions, SqlVersion};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for version in [SqlVersion::V2015_10_08, SqlVersion::V2016_03_23] {
        match sql::parse(text, version) {
            Ok(statement) => {
                let json = MessageFacts::new("a/b/c", br#"{"a":1,"b":[1,"2",{"c":3.5}],"e":[{"n":1}]}"#.to_vec());
                let _ = sql::evaluate(&statement, &json, &NoExternalFunctions);
                let raw = MessageFacts::new("a/b/c", data.to_vec());
                let _ = sql::evaluate(&statement, &raw, &NoExternalFunctions);
            }
            Err(e) => assert!(e.offset <= text.len()),
        }
    }
});
