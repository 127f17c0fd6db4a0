//! MQTT topic filters as rules use them: validation, matching, an index from filters to
//! rules, and Basic Ingest topics.
//!
//! Matching follows AWS IoT: `+` matches exactly one level, `#` (last, alone in its level)
//! matches the parent level and everything below it, and a filter starting with a wildcard
//! does not match topics starting with `$`. [`FilterIndex`] is a trie over filter levels,
//! so finding the rules for a topic costs the topic's depth, not the number of rules.

use std::collections::HashMap;

/// Checks a topic filter: non-empty, `+` alone in its level, `#` alone in the last level.
pub fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("a topic filter must not be empty");
    }
    if filter.len() > 256 {
        return Err("a topic filter must be at most 256 bytes");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("'#' must be alone in the last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("'+' must occupy a whole level");
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

/// A Basic Ingest topic `$aws/rules/<ruleName>[/<rest>]`, split into the rule name and the
/// topic that rule sees (the rest, without the prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicIngest<'a> {
    pub rule_name: &'a str,
    pub topic: &'a str,
}

/// Parses a Basic Ingest topic; `None` for any other topic (or a malformed rule name).
pub fn parse_basic_ingest(topic: &str) -> Option<BasicIngest<'_>> {
    let rest = topic.strip_prefix("$aws/rules/")?;
    let (rule_name, suffix) = match rest.split_once('/') {
        Some((name, suffix)) => (name, suffix),
        None => (rest, ""),
    };
    let valid = !rule_name.is_empty()
        && rule_name.len() <= 128
        && rule_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    valid.then_some(BasicIngest {
        rule_name,
        topic: suffix,
    })
}

/// A trie from topic filters to values (rule indices), answering every value whose filter
/// matches a topic.
#[derive(Debug, Clone)]
pub struct FilterIndex<T> {
    root: Node<T>,
}

impl<T> Default for FilterIndex<T> {
    fn default() -> Self {
        FilterIndex {
            root: Node::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct Node<T> {
    children: HashMap<String, Node<T>>,
    plus: Option<Box<Node<T>>>,
    /// Values of filters ending with `#` at this node.
    hash: Vec<T>,
    /// Values of filters ending exactly at this node.
    exact: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: Vec::new(),
            exact: Vec::new(),
        }
    }
}

impl<T: Clone> FilterIndex<T> {
    pub fn new() -> Self {
        FilterIndex {
            root: Node::default(),
        }
    }

    pub fn insert(&mut self, filter: &str, value: T) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            match level {
                "#" => {
                    node.hash.push(value);
                    return;
                }
                "+" => node = node.plus.get_or_insert_with(Default::default),
                literal => node = node.children.entry(literal.to_string()).or_default(),
            }
        }
        node.exact.push(value);
    }

    /// Calls `found` with every value whose filter matches `topic`.
    pub fn for_each_match(&self, topic: &str, mut found: impl FnMut(&T)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let reserved = topic.starts_with('$');
        Self::walk(&self.root, &levels, 0, reserved, &mut found);
    }

    fn walk(
        node: &Node<T>,
        levels: &[&str],
        depth: usize,
        reserved: bool,
        found: &mut impl FnMut(&T),
    ) {
        let wildcards_allowed = !(reserved && depth == 0);
        if wildcards_allowed {
            node.hash.iter().for_each(&mut *found);
        }
        let Some(level) = levels.get(depth) else {
            node.exact.iter().for_each(found);
            return;
        };
        if let Some(child) = node.children.get(*level) {
            Self::walk(child, levels, depth + 1, reserved, found);
        }
        if wildcards_allowed {
            if let Some(plus) = &node.plus {
                Self::walk(plus, levels, depth + 1, reserved, found);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_aws_iot_does() {
        assert!(matches(
            "$aws/events/#",
            "$aws/events/presence/connected/c1"
        ));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("#", "$aws/events/x"));
        assert!(!matches("+/events/x", "$aws/events/x"));
        assert!(matches("a/+", "a/"));
        assert!(validate_filter("a/#/b").is_err());
        assert!(validate_filter("a/b+").is_err());
        assert!(validate_filter("").is_err());
        assert!(validate_filter("a/+/#").is_ok());
    }

    #[test]
    fn the_index_agrees_with_pairwise_matching() {
        let filters = [
            "a/b",
            "a/+",
            "a/#",
            "#",
            "+/b",
            "+/+",
            "$aws/events/#",
            "a/b/c",
            "+",
            "a/+/c",
        ];
        let mut index = FilterIndex::new();
        for (i, f) in filters.iter().enumerate() {
            index.insert(f, i);
        }
        for topic in [
            "a/b",
            "a",
            "a/b/c",
            "x/b",
            "$aws/events/p/c",
            "b",
            "a/x/c",
            "$x",
            "",
        ] {
            let mut got = Vec::new();
            index.for_each_match(topic, |i| got.push(*i));
            got.sort();
            let want: Vec<usize> = (0..filters.len())
                .filter(|i| matches(filters[*i], topic))
                .collect();
            assert_eq!(got, want, "topic {topic}");
        }
    }

    #[test]
    fn basic_ingest_topics_split_into_rule_and_topic() {
        assert_eq!(
            parse_basic_ingest("$aws/rules/my_rule/device/1/data"),
            Some(BasicIngest {
                rule_name: "my_rule",
                topic: "device/1/data"
            })
        );
        assert_eq!(
            parse_basic_ingest("$aws/rules/r"),
            Some(BasicIngest {
                rule_name: "r",
                topic: ""
            })
        );
        assert_eq!(parse_basic_ingest("$aws/rules/bad-name/x"), None);
        assert_eq!(parse_basic_ingest("$aws/rules/"), None);
        assert_eq!(parse_basic_ingest("devices/x"), None);
    }
}
