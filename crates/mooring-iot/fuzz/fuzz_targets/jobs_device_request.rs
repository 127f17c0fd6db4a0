//! Fuzzes the Jobs device API request parser: the first line is the topic, the rest the
//! payload. Parsing must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_iot::jobs::device::{parse_request, parse_topic};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (topic, payload) = text.split_once('\n').unwrap_or((&text, ""));
    if let Some((_, Ok(operation))) = parse_topic(&format!("$aws/things/t/jobs/{topic}")) {
        if let Ok(serde_json::Value::Object(body)) = serde_json::from_str(payload) {
            let _ = parse_request(operation, &body);
        }
    }
});
