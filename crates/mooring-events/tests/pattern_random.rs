//! Deterministic random-input tests of the pattern engine: mutated and generated pattern texts
//! never panic the parser, and for generated valid patterns the indexed rule set returns
//! exactly the patterns that direct evaluation says match, on generated events.

use std::sync::Arc;

use mooring_events::pattern;
use mooring_events::ruleset::RuleSet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const KEYS: &[&str] = &["source", "detail", "a", "b", "c.d", "$or", "state", "n"];
const STRINGS: &[&str] = &[
    "",
    "a",
    "ab",
    "aws.ec2",
    "x*y",
    "10.0.0.1",
    "2001:db8::1",
    "ÄBC",
    "äbc",
    "run",
];

fn scalar(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..6) {
        0 => json!(STRINGS[rng.gen_range(0..STRINGS.len())]),
        1 => json!(rng.gen_range(-3..4)),
        2 => json!(rng.gen_range(-3.0..3.0f64)),
        3 => json!(rng.gen_bool(0.5)),
        4 => Value::Null,
        _ => json!(format!("s{}", rng.gen_range(0..4))),
    }
}

fn matcher(rng: &mut StdRng) -> Value {
    let s = || STRINGS;
    match rng.gen_range(0..14) {
        0..=3 => scalar(rng),
        4 => json!({"prefix": s()[rng.gen_range(0..s().len())]}),
        5 => json!({"suffix": {"equals-ignore-case": s()[rng.gen_range(0..s().len())]}}),
        6 => json!({"equals-ignore-case": s()[rng.gen_range(0..s().len())]}),
        7 => {
            let w = ["*", "a*", "*b", "a*b*", "x\\*y", "a**"][rng.gen_range(0..6)];
            json!({"wildcard": w})
        }
        8 => {
            let operands = [
                json!("a"),
                json!([1, 2]),
                json!({"prefix": "r"}),
                json!(["a", 1]),
                Value::Null,
            ];
            json!({"anything-but": operands[rng.gen_range(0..5)].clone()})
        }
        9 => {
            let ranges = [
                json!([">", 0]),
                json!([">=", -1, "<", 2]),
                json!(["<", 0, ">", 1]),
            ];
            json!({"numeric": ranges[rng.gen_range(0..3)].clone()})
        }
        10 => json!({"exists": rng.gen_bool(0.5)}),
        11 => {
            let c = ["10.0.0.0/8", "2001:db8::/32", "10.0.0.0/40"][rng.gen_range(0..3)];
            json!({"cidr": c})
        }
        12 => json!({"unknown": 1}),
        _ => json!({"prefix": "a", "suffix": "b"}),
    }
}

fn pattern_value(rng: &mut StdRng, depth: u32) -> Value {
    let mut map = serde_json::Map::new();
    for _ in 0..rng.gen_range(1..4) {
        let key = KEYS[rng.gen_range(0..KEYS.len())];
        let value = if key == "$or" && depth < 3 {
            Value::Array(
                (0..rng.gen_range(1..4))
                    .map(|_| pattern_value(rng, depth + 1))
                    .collect(),
            )
        } else if depth < 3 && rng.gen_bool(0.3) {
            pattern_value(rng, depth + 1)
        } else {
            Value::Array((0..rng.gen_range(0..4)).map(|_| matcher(rng)).collect())
        };
        map.insert(key.to_string(), value);
    }
    Value::Object(map)
}

fn event_value(rng: &mut StdRng, depth: u32) -> Value {
    let mut map = serde_json::Map::new();
    for _ in 0..rng.gen_range(0..5) {
        let key = KEYS[rng.gen_range(0..KEYS.len())];
        let value = match rng.gen_range(0..5) {
            0 if depth < 3 => event_value(rng, depth + 1),
            1 => Value::Array((0..rng.gen_range(0..3)).map(|_| scalar(rng)).collect()),
            2 if depth < 3 => Value::Array(
                (0..rng.gen_range(0..3))
                    .map(|_| event_value(rng, depth + 1))
                    .collect(),
            ),
            _ => scalar(rng),
        };
        map.insert(key.to_string(), value);
    }
    Value::Object(map)
}

#[test]
fn mutated_pattern_texts_never_panic() {
    let vectors: Vec<Value> =
        serde_json::from_str(include_str!("data/pattern_vectors.json")).unwrap();
    let seeds: Vec<String> = vectors
        .iter()
        .map(|v| v["pattern"].as_str().unwrap().to_string())
        .collect();
    let mut rng = StdRng::seed_from_u64(0x5eed_e7e7);
    let alphabet = b"{}[]\":,.*\\-0123456789eE+ abcnulltruefalse$or";
    for i in 0..20_000 {
        let mut bytes = seeds[i % seeds.len()].clone().into_bytes();
        for _ in 0..rng.gen_range(1..6) {
            match rng.gen_range(0..3) {
                0 if !bytes.is_empty() => {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] = alphabet[rng.gen_range(0..alphabet.len())];
                }
                1 if !bytes.is_empty() => {
                    let at = rng.gen_range(0..bytes.len());
                    bytes.truncate(at);
                }
                _ => {
                    let at = rng.gen_range(0..=bytes.len());
                    bytes.insert(at, alphabet[rng.gen_range(0..alphabet.len())]);
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(p) = pattern::parse(&text) {
            let _ = p.matches(&json!({"a": "x", "detail": {"state": "running"}}));
        }
    }
}

#[test]
fn indexed_matching_agrees_with_direct_evaluation_on_generated_patterns() {
    let mut rng = StdRng::seed_from_u64(42);
    let mut patterns = Vec::new();
    let mut attempts = 0;
    while patterns.len() < 400 && attempts < 20_000 {
        attempts += 1;
        let value = pattern_value(&mut rng, 0);
        if let Ok(p) = pattern::parse(&value.to_string()) {
            patterns.push(Arc::new(p));
        }
    }
    assert!(
        patterns.len() >= 200,
        "only {} valid patterns generated",
        patterns.len()
    );
    let mut set = RuleSet::new();
    for (i, p) in patterns.iter().enumerate() {
        set.insert(i, p.clone());
    }
    assert!(
        set.unindexed_len() < patterns.len(),
        "some generated patterns must be indexed"
    );
    let mut matched = 0;
    for _ in 0..3_000 {
        let event = event_value(&mut rng, 0);
        let direct: Vec<usize> = patterns
            .iter()
            .enumerate()
            .filter(|(_, p)| p.matches(&event))
            .map(|(i, _)| i)
            .collect();
        matched += direct.len();
        assert_eq!(set.matching(&event), direct, "event {event}");
    }
    assert!(
        matched > 0,
        "generated events never matched: the comparison would be vacuous"
    );
}
