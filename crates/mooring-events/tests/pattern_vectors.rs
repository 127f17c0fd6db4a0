//! Runs every pattern test vector of the EventBridge spec (§12, transcribed verbatim into
//! `tests/data/pattern_vectors.json` by reading the markdown tables) through the pattern engine.

use mooring_events::pattern;
use serde_json::Value;

#[test]
fn all_spec_vectors_give_the_expected_result() {
    let text = include_str!("data/pattern_vectors.json");
    let vectors: Vec<Value> = serde_json::from_str(text).unwrap();
    assert_eq!(vectors.len(), 129, "the spec has 129 vectors");
    let mut failures = Vec::new();
    for v in &vectors {
        let id = v["id"].as_str().unwrap();
        let source = v["pattern"].as_str().unwrap();
        let parsed = pattern::parse(source);
        match (&v["expected"], parsed) {
            (Value::String(s), Err(_)) if s == "INVALID" => {}
            (Value::String(_), Ok(_)) => failures.push(format!("{id}: {source} should be invalid")),
            (Value::Bool(_), Err(e)) => failures.push(format!("{id}: {source} rejected: {e}")),
            (Value::Bool(expected), Ok(p)) => {
                let got = p.matches(&v["event"]);
                if got != *expected {
                    failures.push(format!("{id}: {source} on {} gave {got}", v["event"]));
                }
            }
            (other, _) => failures.push(format!("{id}: bad expectation {other}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The spec file itself, when present next to the repository, still has exactly the vectors
/// transcribed here (so an edited spec cannot silently drift from the test data).
#[test]
fn transcribed_vectors_cover_the_spec_table() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        repo.join("../shared/spec/eventbridge.md"),
        repo.join("../../shared/spec/eventbridge.md"),
    ];
    let Some(text) = candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
    else {
        eprintln!("spec not found next to the repository; checked the transcription only");
        return;
    };
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| V"))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let data: Vec<Value> = serde_json::from_str(include_str!("data/pattern_vectors.json")).unwrap();
    let data_ids: Vec<String> = data
        .iter()
        .map(|v| v["id"].as_str().unwrap()[1..].to_string())
        .collect();
    assert_eq!(ids, data_ids);
}
