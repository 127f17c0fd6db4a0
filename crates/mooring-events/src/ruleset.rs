//! The compiled rule set of one event bus: which patterns match an event, without looking at
//! patterns that cannot.
//!
//! Every pattern is analysed for a set of *entry keys*: (path, exact value) pairs of which any
//! matching event must contain at least one, for instance `source = "aws.ec2"`. A pattern is
//! filed under each of its entry keys; patterns without one (only `prefix`, `exists`,
//! `anything-but`, … leaves) go to a short list that is always evaluated. Matching an event
//! walks the event once, looks each (path, scalar) pair up in the index, and evaluates only the
//! patterns found there plus the unindexed ones. The cost therefore grows with the size of the
//! event and the number of plausible rules, not with the rules that require other values.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::pattern::{Field, Matcher, Node, Pattern};

/// An exact scalar a pattern requires at some path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ScalarKey {
    String(String),
    Number(u64),
    Bool(bool),
    Null,
}

fn number_key(x: f64) -> u64 {
    if x == 0.0 {
        0.0f64.to_bits()
    } else {
        x.to_bits()
    }
}

#[derive(Debug, Default)]
struct PathIndex {
    strings: HashMap<String, Vec<u32>>,
    others: HashMap<ScalarKey, Vec<u32>>,
}

/// Patterns keyed by `K` (a rule name, an archive name, …), indexed for matching.
pub struct RuleSet<K> {
    entries: Vec<(K, Arc<Pattern>)>,
    by_path: HashMap<String, PathIndex>,
    unindexed: Vec<u32>,
}

impl<K> Default for RuleSet<K> {
    fn default() -> Self {
        RuleSet {
            entries: Vec::new(),
            by_path: HashMap::new(),
            unindexed: Vec::new(),
        }
    }
}

impl<K: Clone> RuleSet<K> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a pattern under `key`.
    pub fn insert(&mut self, key: K, pattern: Arc<Pattern>) {
        let id = self.entries.len() as u32;
        match entry_keys(&pattern.root, "") {
            Some(keys) => {
                for (path, scalar) in keys {
                    let index = self.by_path.entry(path).or_default();
                    let list = match scalar {
                        ScalarKey::String(s) => index.strings.entry(s).or_default(),
                        other => index.others.entry(other).or_default(),
                    };
                    if list.last() != Some(&id) {
                        list.push(id);
                    }
                }
            }
            None => self.unindexed.push(id),
        }
        self.entries.push((key, pattern));
    }

    /// The number of patterns that every event has to be checked against.
    pub fn unindexed_len(&self) -> usize {
        self.unindexed.len()
    }

    /// The keys of the patterns that match `event`, in insertion order.
    pub fn matching(&self, event: &Value) -> Vec<K> {
        let mut candidates: Vec<u32> = self.unindexed.clone();
        if !self.by_path.is_empty() {
            let mut path = String::new();
            self.collect(event, &mut path, &mut candidates);
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .filter_map(|id| {
                let (key, pattern) = &self.entries[id as usize];
                pattern.matches(event).then(|| key.clone())
            })
            .collect()
    }

    fn collect(&self, value: &Value, path: &mut String, out: &mut Vec<u32>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let len = path.len();
                    if len > 0 {
                        path.push('.');
                    }
                    path.push_str(key);
                    self.collect(child, path, out);
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.collect(item, path, out);
                }
            }
            scalar => {
                let Some(index) = self.by_path.get(path.as_str()) else {
                    return;
                };
                let found = match scalar {
                    Value::String(s) => index.strings.get(s.as_str()),
                    Value::Number(n) => n
                        .as_f64()
                        .and_then(|x| index.others.get(&ScalarKey::Number(number_key(x)))),
                    Value::Bool(b) => index.others.get(&ScalarKey::Bool(*b)),
                    _ => index.others.get(&ScalarKey::Null),
                };
                if let Some(ids) = found {
                    out.extend_from_slice(ids);
                }
            }
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A set of (path, scalar) pairs of which every matching event holds at least one, choosing
/// the smallest such set found; `None` when the pattern has no exact requirement.
fn entry_keys(node: &Node, prefix: &str) -> Option<Vec<(String, ScalarKey)>> {
    let mut best: Option<Vec<(String, ScalarKey)>> = None;
    let mut consider = |keys: Vec<(String, ScalarKey)>| {
        if best.as_ref().is_none_or(|b| keys.len() < b.len()) {
            best = Some(keys);
        }
    };
    for (key, field) in &node.fields {
        let path = join(prefix, key);
        match field {
            Field::Leaf(matchers) => {
                let keys: Option<Vec<_>> = matchers
                    .iter()
                    .map(|m| match m {
                        Matcher::ExactString(s) => {
                            Some((path.clone(), ScalarKey::String(s.clone())))
                        }
                        Matcher::ExactNumber(x) => {
                            Some((path.clone(), ScalarKey::Number(number_key(*x))))
                        }
                        Matcher::Bool(b) => Some((path.clone(), ScalarKey::Bool(*b))),
                        Matcher::Null => Some((path.clone(), ScalarKey::Null)),
                        _ => None,
                    })
                    .collect();
                if let Some(keys) = keys {
                    consider(keys);
                }
            }
            Field::Object(inner) => {
                if let Some(keys) = entry_keys(inner, &path) {
                    consider(keys);
                }
            }
        }
    }
    for group in &node.ors {
        let union: Option<Vec<_>> = group
            .iter()
            .map(|branch| entry_keys(branch, prefix))
            .collect::<Option<Vec<_>>>()
            .map(|sets| sets.into_iter().flatten().collect());
        if let Some(keys) = union {
            consider(keys);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::parse;
    use serde_json::json;

    fn set(patterns: &[&str]) -> RuleSet<usize> {
        let mut set = RuleSet::new();
        for (i, p) in patterns.iter().enumerate() {
            set.insert(i, Arc::new(parse(p).unwrap()));
        }
        set
    }

    #[test]
    fn indexes_exact_requirements_and_scans_the_rest() {
        let s = set(&[
            r#"{"source":["a"]}"#,
            r#"{"source":["b"],"detail":{"n":[{"numeric":[">",1]}]}}"#,
            r#"{"detail":{"n":[{"exists":true}]}}"#,
            r#"{"$or":[{"x":[1]},{"y":[true]}]}"#,
            r#"{"detail":{"n":[2.0]}}"#,
        ]);
        assert_eq!(s.unindexed_len(), 1);
        assert_eq!(
            s.matching(&json!({"source":"b","detail":{"n":2}})),
            vec![1, 2, 4]
        );
        assert_eq!(s.matching(&json!({"source":"a","y":true})), vec![0, 3]);
        assert_eq!(s.matching(&json!({"x":[0,1]})), vec![3]);
    }

    #[test]
    fn index_agrees_with_direct_evaluation_on_the_spec_vectors() {
        let text = include_str!("../tests/data/pattern_vectors.json");
        let vectors: Vec<Value> = serde_json::from_str(text).unwrap();
        let mut s = RuleSet::new();
        let mut valid = Vec::new();
        for v in &vectors {
            if let Ok(p) = parse(v["pattern"].as_str().unwrap()) {
                let p = Arc::new(p);
                s.insert(valid.len(), p.clone());
                valid.push(p);
            }
        }
        for v in &vectors {
            if v["event"].is_null() {
                continue;
            }
            let event = &v["event"];
            let direct: Vec<usize> = valid
                .iter()
                .enumerate()
                .filter(|(_, p)| p.matches(event))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(s.matching(event), direct, "event of {}", v["id"]);
        }
    }
}
