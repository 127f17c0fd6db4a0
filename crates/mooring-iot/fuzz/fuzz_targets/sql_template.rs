//! Fuzzes `${...}` substitution templates: parsing and rendering must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_iot::sql::template::Template;
use mooring_iot::sql::{MessageFacts, NoExternalFunctions, SqlVersion};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(template) = Template::parse(text, SqlVersion::V2016_03_23) {
        let facts = MessageFacts::new("a/b", br#"{"a":{"b":[1,2]}}"#.to_vec());
        let _ = template.render(&facts, &[], &NoExternalFunctions);
    }
});
