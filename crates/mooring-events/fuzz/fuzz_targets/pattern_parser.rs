//! Fuzzes the event-pattern parser: any input must parse or be rejected without panicking,
//! and a parsed pattern must evaluate against a fixed event and against the input itself
//! (when it is JSON) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_events::pattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = pattern::parse(text) {
        let event = serde_json::json!({
            "source": "aws.ec2", "detail-type": "x", "resources": ["a", "b"],
            "detail": {"state": "running", "n": 5, "ip": "10.0.0.1", "arr": [1, {"k": null}], "o": {}}
        });
        let _ = p.matches(&event);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
            let _ = p.matches(&v);
        }
    }
});
