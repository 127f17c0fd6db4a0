//! The subscription trie: topic filters stored level by level, matched against a topic in
//! one walk whose cost depends on the topic's depth and the wildcards on its path, not on
//! the number of subscriptions.
//!
//! Each node holds ordinary subscribers keyed by [`SubscriberId`] and shared-subscription
//! groups (`$share/<group>/<filter>`) keyed by group name. A filter beginning with `+` or
//! `#` never matches a topic beginning with `$`. Whether `a/#` matches `a` is the profile's
//! choice (MQTT: yes; AWS IoT: no).

use std::collections::HashMap;
use std::sync::Arc;

/// Who holds a subscription: an MQTT client (by client id) or an in-process subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubscriberId {
    Client(Arc<str>),
    Internal(u64),
}

/// One hit of a match.
#[derive(Debug, Clone)]
pub enum Matched<T> {
    Direct(SubscriberId, T),
    /// Every member of one share group on one filter; the router picks one.
    Shared {
        group: String,
        members: Vec<(SubscriberId, T)>,
    },
}

struct Node<T> {
    children: HashMap<String, Node<T>>,
    subscribers: HashMap<SubscriberId, T>,
    shared: HashMap<String, HashMap<SubscriberId, T>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            subscribers: HashMap::new(),
            shared: HashMap::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

pub struct SubscriptionTrie<T> {
    root: Node<T>,
    count: usize,
}

impl<T> Default for SubscriptionTrie<T> {
    fn default() -> Self {
        SubscriptionTrie {
            root: Node::default(),
            count: 0,
        }
    }
}

impl<T: Clone> SubscriptionTrie<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of stored subscriptions (shared members counted individually).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces a subscription; returns whether one existed already.
    pub fn insert(
        &mut self,
        filter: &str,
        group: Option<&str>,
        id: SubscriberId,
        value: T,
    ) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_string()).or_default();
        }
        let existed = match group {
            None => node.subscribers.insert(id, value).is_some(),
            Some(g) => node
                .shared
                .entry(g.to_string())
                .or_default()
                .insert(id, value)
                .is_some(),
        };
        if !existed {
            self.count += 1;
        }
        existed
    }

    /// Removes a subscription; returns whether it existed.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, id: &SubscriberId) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, group, id);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Every subscription matching `topic`.
    pub fn matches(&self, topic: &str, hash_excludes_parent: bool) -> Vec<Matched<T>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        let dollar = topic.starts_with('$');
        walk(
            &self.root,
            &levels,
            0,
            dollar,
            hash_excludes_parent,
            &mut out,
        );
        out
    }
}

fn remove_at<T>(
    node: &mut Node<T>,
    levels: &[&str],
    group: Option<&str>,
    id: &SubscriberId,
) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => node.subscribers.remove(id).is_some(),
            Some(g) => {
                let Some(members) = node.shared.get_mut(g) else {
                    return false;
                };
                let removed = members.remove(id).is_some();
                if members.is_empty() {
                    node.shared.remove(g);
                }
                removed
            }
        };
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest, group, id);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn collect<T: Clone>(node: &Node<T>, out: &mut Vec<Matched<T>>) {
    for (id, v) in &node.subscribers {
        out.push(Matched::Direct(id.clone(), v.clone()));
    }
    for (group, members) in &node.shared {
        out.push(Matched::Shared {
            group: group.clone(),
            members: members
                .iter()
                .map(|(i, v)| (i.clone(), v.clone()))
                .collect(),
        });
    }
}

fn walk<T: Clone>(
    node: &Node<T>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    hash_excludes_parent: bool,
    out: &mut Vec<Matched<T>>,
) {
    let wildcards_allowed = !(depth == 0 && dollar);
    if wildcards_allowed {
        if let Some(hash) = node.children.get("#") {
            // `a/#` reached with no levels left means the topic is the parent `a`.
            if !levels.is_empty() || !hash_excludes_parent {
                collect(hash, out);
            }
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        collect(node, out);
        return;
    };
    if let Some(child) = node.children.get(*first) {
        walk(child, rest, depth + 1, dollar, hash_excludes_parent, out);
    }
    if wildcards_allowed {
        if let Some(plus) = node.children.get("+") {
            walk(plus, rest, depth + 1, dollar, hash_excludes_parent, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;
    use crate::topic;

    fn client(s: &str) -> SubscriberId {
        SubscriberId::Client(Arc::from(s))
    }

    fn direct_ids(m: &[Matched<u8>]) -> Vec<String> {
        let mut ids: Vec<String> = m
            .iter()
            .filter_map(|m| match m {
                Matched::Direct(SubscriberId::Client(c), _) => Some(c.to_string()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn wildcards_dollar_topics_and_parent_level() {
        let mut t = SubscriptionTrie::new();
        t.insert("a/+/c", None, client("plus"), 0);
        t.insert("a/#", None, client("hash"), 0);
        t.insert("#", None, client("all"), 0);
        t.insert("$aws/events/#", None, client("events"), 1);
        t.insert("+/events/x", None, client("plus-first"), 0);
        assert_eq!(
            direct_ids(&t.matches("a/b/c", true)),
            ["all", "hash", "plus"]
        );
        assert_eq!(direct_ids(&t.matches("a", true)), ["all"]);
        assert_eq!(direct_ids(&t.matches("a", false)), ["all", "hash"]);
        assert_eq!(direct_ids(&t.matches("a/", true)), ["all", "hash"]);
        assert_eq!(direct_ids(&t.matches("$aws/events/x", true)), ["events"]);
        assert_eq!(
            direct_ids(&t.matches("x/events/x", true)),
            ["all", "plus-first"]
        );
        assert_eq!(t.len(), 5);
        assert!(t.remove("a/#", None, &client("hash")));
        assert!(!t.remove("a/#", None, &client("hash")));
        assert_eq!(direct_ids(&t.matches("a/b/c", true)), ["all", "plus"]);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn shared_groups_are_returned_once_per_group() {
        let mut t = SubscriptionTrie::new();
        t.insert("s/#", Some("g"), client("m1"), 1u8);
        t.insert("s/#", Some("g"), client("m2"), 1u8);
        t.insert("s/+", Some("h"), client("m3"), 0u8);
        let m = t.matches("s/x", true);
        let mut groups: Vec<(String, usize)> = m
            .iter()
            .filter_map(|m| match m {
                Matched::Shared { group, members } => Some((group.clone(), members.len())),
                _ => None,
            })
            .collect();
        groups.sort();
        assert_eq!(groups, [("g".to_string(), 2), ("h".to_string(), 1)]);
        t.remove("s/#", Some("g"), &client("m1"));
        t.remove("s/#", Some("g"), &client("m2"));
        t.remove("s/+", Some("h"), &client("m3"));
        assert!(t.is_empty());
        assert!(t.root.children.is_empty(), "empty branches are pruned");
    }

    /// The trie must agree with the plain single-filter matcher on random filters/topics.
    #[test]
    fn agrees_with_the_reference_matcher() {
        let words = ["a", "b", "$x", "", "c"];
        let mut state: u64 = 42;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % n
        };
        for profile in [Profile::aws(), Profile::strict()] {
            for _ in 0..2000 {
                let depth = 1 + next(4);
                let filter: Vec<&str> = (0..depth)
                    .map(|i| match next(6) {
                        0 => "+",
                        1 if i == depth - 1 => "#",
                        _ => words[next(words.len())],
                    })
                    .collect();
                let filter = filter.join("/");
                let tdepth = 1 + next(4);
                let topic: Vec<&str> = (0..tdepth).map(|_| words[next(words.len())]).collect();
                let topic = topic.join("/");
                let mut t = SubscriptionTrie::new();
                t.insert(&filter, None, client("c"), 0u8);
                let trie_says = !t.matches(&topic, profile.hash_excludes_parent).is_empty();
                assert_eq!(
                    trie_says,
                    topic::matches(&filter, &topic, &profile),
                    "{filter} vs {topic} ({})",
                    profile.name
                );
            }
        }
    }
}
