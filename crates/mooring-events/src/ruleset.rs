//! The compiled rule set of one event bus: which patterns match an event, without looking at
//! patterns that cannot.
//!
//! Every pattern is analysed for a set of *entry keys*: (path, exact value) pairs of which any
//! matching event must contain at least one, for instance `source = "aws.ec2"`. A pattern is
//! filed under each of its entry keys; patterns without one (only `prefix`, `exists`,
//! `anything-but`, … leaves) go to a short list that is always evaluated. The index is a tree of
//! path segments; matching an event descends only into the event fields that some pattern
//! names, looks each scalar found there up in that path's value table, and evaluates only the
//! patterns found plus the unindexed ones. The cost therefore grows with the size of the
//! event and the number of plausible rules, not with the rules that require other values.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::pattern::{normalize_event, Field, Matcher, Node, Pattern};

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

/// The exact values indexed at one path, and the deeper paths below it.
#[derive(Debug, Default)]
struct PathNode {
    strings: HashMap<String, Vec<u32>>,
    others: HashMap<ScalarKey, Vec<u32>>,
    children: HashMap<String, PathNode>,
}

impl PathNode {
    fn at(&mut self, path: &[String]) -> &mut PathNode {
        path.iter().fold(self, |node, key| {
            node.children.entry(key.clone()).or_default()
        })
    }

    /// How many patterns are already filed under `scalar` at `path`.
    fn filed(&self, (path, scalar): &EntryKey) -> usize {
        let mut node = self;
        for key in path {
            match node.children.get(key) {
                Some(child) => node = child,
                None => return 0,
            }
        }
        let list = match scalar {
            ScalarKey::String(s) => node.strings.get(s),
            other => node.others.get(other),
        };
        list.map_or(0, Vec::len)
    }
}

/// Patterns keyed by `K` (a rule name, an archive name, …), indexed for matching.
pub struct RuleSet<K> {
    entries: Vec<(K, Arc<Pattern>)>,
    index: PathNode,
    unindexed: Vec<u32>,
}

impl<K> Default for RuleSet<K> {
    fn default() -> Self {
        RuleSet {
            entries: Vec::new(),
            index: PathNode::default(),
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
        match entry_keys(&pattern.root, &[], &self.index) {
            Some(keys) => {
                for (path, scalar) in keys {
                    let node = self.index.at(&path);
                    let list = match scalar {
                        ScalarKey::String(s) => node.strings.entry(s).or_default(),
                        other => node.others.entry(other).or_default(),
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
        let mut out = Vec::new();
        self.for_each_match(event, |key| out.push(key.clone()));
        out
    }

    /// The keys of the patterns that match `event`, found by evaluating every pattern without
    /// the index: the reference that tests and the fuzz target hold [`Self::matching`] to.
    pub fn matching_by_scan(&self, event: &Value) -> Vec<K> {
        self.entries
            .iter()
            .filter(|(_, p)| p.matches(event))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Calls `found` with the key of every pattern that matches `event`, in insertion order.
    /// Only the event paths some indexed pattern names are visited, so an event is looked up
    /// in a handful of hash maps however many rules require other values.
    pub fn for_each_match(&self, event: &Value, mut found: impl FnMut(&K)) {
        let event = normalize_event(event);
        // The candidate list is a per-thread buffer reused across events; taking it out of the
        // cell (rather than borrowing) keeps a reentrant call from `found` safe.
        let mut candidates = CANDIDATES.with(|cell| cell.take());
        candidates.clear();
        candidates.extend_from_slice(&self.unindexed);
        collect(&self.index, &event, &mut candidates);
        if candidates.len() > 1 {
            candidates.sort_unstable();
            candidates.dedup();
        }
        for &id in &candidates {
            let (key, pattern) = &self.entries[id as usize];
            if pattern.matches_normalized(&event) {
                found(key);
            }
        }
        CANDIDATES.with(|cell| cell.set(candidates));
    }
}

thread_local! {
    /// The scratch list of candidate pattern ids of [`RuleSet::for_each_match`].
    static CANDIDATES: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Adds the ids indexed under the values `value` holds at `node`'s path and below.
fn collect(node: &PathNode, value: &Value, out: &mut Vec<u32>) {
    match value {
        Value::Object(map) => {
            for (key, child) in &node.children {
                if let Some(v) = map.get(key) {
                    collect(child, v, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect(node, item, out);
            }
        }
        scalar => {
            let found = match scalar {
                Value::String(s) => node.strings.get(s.as_str()),
                Value::Number(n) => n
                    .as_f64()
                    .and_then(|x| node.others.get(&ScalarKey::Number(number_key(x)))),
                Value::Bool(b) => node.others.get(&ScalarKey::Bool(*b)),
                _ => node.others.get(&ScalarKey::Null),
            };
            if let Some(ids) = found {
                out.extend_from_slice(ids);
            }
        }
    }
}

fn join(prefix: &[String], key: &str) -> Vec<String> {
    let mut path = prefix.to_vec();
    path.push(key.to_string());
    path
}

type EntryKey = (Vec<String>, ScalarKey);

/// A set of (path, scalar) pairs of which every matching event holds at least one; `None`
/// when the pattern has no exact requirement. Of the sets found (one per required field or
/// `$or` group) the one with the fewest patterns already filed under its keys in `index` is
/// chosen, so that rules sharing a common value (`"detail-type": ["reading"]`) are filed under
/// their distinguishing one (`"source": ["svc-17"]`) and an event does not pull them all in.
fn entry_keys(node: &Node, prefix: &[String], index: &PathNode) -> Option<Vec<EntryKey>> {
    let mut best: Option<(usize, Vec<EntryKey>)> = None;
    let mut consider = |keys: Vec<EntryKey>| {
        let cost = keys.iter().map(|k| 1 + index.filed(k)).sum::<usize>();
        if best.as_ref().is_none_or(|(b, _)| cost < *b) {
            best = Some((cost, keys));
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
                if let Some(keys) = entry_keys(inner, &path, index) {
                    consider(keys);
                }
            }
        }
    }
    for group in &node.ors {
        let union: Option<Vec<_>> = group
            .iter()
            .map(|branch| entry_keys(branch, prefix, index))
            .collect::<Option<Vec<_>>>()
            .map(|sets| sets.into_iter().flatten().collect());
        if let Some(keys) = union {
            consider(keys);
        }
    }
    best.map(|(_, keys)| keys)
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
    fn rules_sharing_a_common_value_are_filed_under_their_distinguishing_one() {
        // "detail-type" sorts before "source", so a first-found choice would file every rule
        // under detail-type "reading" and each event would evaluate all of them.
        let patterns: Vec<String> = (0..1_000)
            .map(|i| format!(r#"{{"source":["svc-{i}"],"detail-type":["reading"]}}"#))
            .collect();
        let mut s = RuleSet::new();
        for (i, p) in patterns.iter().enumerate() {
            s.insert(i, Arc::new(parse(p).unwrap()));
        }
        let event = json!({"source": "svc-500", "detail-type": "reading"});
        let mut candidates = Vec::new();
        collect(&s.index, &event, &mut candidates);
        assert!(candidates.len() <= 2, "{} candidates", candidates.len());
        assert_eq!(s.matching(&event), vec![500]);
        assert_eq!(
            s.matching(&json!({"source": "svc-0", "detail-type": "reading"})),
            vec![0]
        );
    }

    #[test]
    fn index_finds_patterns_through_dotted_event_keys() {
        let s = set(&[
            r#"{"detail":{"state":{"status":["running"]}}}"#,
            r#"{"detail":{"state.status":["stopped"]}}"#,
            r#"{"source":["x"]}"#,
        ]);
        assert_eq!(s.unindexed_len(), 0);
        assert_eq!(
            s.matching(&json!({"detail":{"state.status":"running"}})),
            vec![0]
        );
        assert_eq!(
            s.matching(&json!({"detail.state.status":"stopped"})),
            vec![1]
        );
        assert_eq!(
            s.matching(&json!({"source":"x","detail":{"state":{"status":"running"}}})),
            vec![0, 2]
        );
    }

    #[test]
    fn index_agrees_with_direct_evaluation_on_the_spec_vectors() {
        let text = include_str!("../tests/data/pattern_vectors.json");
        let vectors: Vec<Value> = serde_json::from_str(text).unwrap();
        let mut s = RuleSet::new();
        for v in &vectors {
            if let Ok(p) = parse(v["pattern"].as_str().unwrap()) {
                s.insert(s.len(), Arc::new(p));
            }
        }
        for v in &vectors {
            if v["event"].is_null() {
                continue;
            }
            let event = &v["event"];
            assert_eq!(
                s.matching(event),
                s.matching_by_scan(event),
                "event of {}",
                v["id"]
            );
        }
    }
}
