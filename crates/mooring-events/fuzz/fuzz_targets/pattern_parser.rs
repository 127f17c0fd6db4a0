//! Fuzzes the event-pattern parser: any input must parse or be rejected without panicking,
//! and a parsed pattern must evaluate against a fixed event and against the input itself
//! (when it is JSON) without panicking. The parsed pattern is also filed in a rule set beside
//! a few fixed patterns, and the indexed lookup must return exactly the patterns that direct
//! evaluation says match.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mooring_events::pattern::{self, Pattern};
use mooring_events::ruleset::RuleSet;
use serde_json::Value;

const FIXED: &[&str] = &[
    r#"{"source":["aws.ec2"],"detail-type":["x"]}"#,
    r#"{"detail":{"state":["running"]}}"#,
    r#"{"detail":{"n":[{"numeric":[">",1]}]}}"#,
];

fn indexed_agrees_with_direct(patterns: &[Arc<Pattern>], event: &Value) {
    let mut set = RuleSet::new();
    for (i, p) in patterns.iter().enumerate() {
        set.insert(i, p.clone());
    }
    assert_eq!(
        set.matching(event),
        set.matching_by_scan(event),
        "event {event}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = pattern::parse(text) {
        let event = serde_json::json!({
            "source": "aws.ec2", "detail-type": "x", "resources": ["a", "b"],
            "detail": {"state": "running", "n": 5, "ip": "10.0.0.1", "arr": [1, {"k": null}], "o": {}}
        });
        let mut patterns: Vec<Arc<Pattern>> = FIXED
            .iter()
            .map(|f| Arc::new(pattern::parse(f).expect("fixed pattern")))
            .collect();
        patterns.insert(1, Arc::new(p));
        indexed_agrees_with_direct(&patterns, &event);
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            indexed_agrees_with_direct(&patterns, &v);
        }
    }
});
