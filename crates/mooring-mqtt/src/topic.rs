//! Topic names and topic filters: validation under the active profile, shared-subscription
//! parsing, and the single-filter matcher used for retained messages.
//!
//! Both profiles enforce the MQTT rules (no wildcards in topic names, `+` and `#` alone in
//! their level, `#` last, filters starting with a wildcard never match `$` topics). The
//! `aws` profile adds AWS IoT Core's limits and deviations: 256-byte topics with at most 7
//! slashes (not counting the `$aws/rules/<rule>/` and `$share/<group>/` prefixes), `a/#`
//! not matching `a`, and the reserved `$aws/` namespace rules.

use crate::profile::Profile;

/// Why a topic or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    Invalid(&'static str),
    /// A reserved topic the client may not use in this direction.
    Reserved(&'static str),
}

impl std::fmt::Display for TopicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopicError::Invalid(m) => write!(f, "invalid topic: {m}"),
            TopicError::Reserved(m) => write!(f, "reserved topic: {m}"),
        }
    }
}

/// A filter split into its share group (if any) and the plain filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

pub fn parse_filter(raw: &str) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let Some((group, filter)) = rest.split_once('/') else {
            return Err(TopicError::Invalid(
                "shared subscription without a topic filter",
            ));
        };
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(TopicError::Invalid("invalid share name"));
        }
        if group.len() > 128 {
            return Err(TopicError::Invalid("share name longer than 128 characters"));
        }
        if filter.is_empty() {
            return Err(TopicError::Invalid("empty shared topic filter"));
        }
        return Ok(ParsedFilter {
            share_group: Some(group),
            filter,
        });
    }
    Ok(ParsedFilter {
        share_group: None,
        filter: raw,
    })
}

fn check_size(topic: &str, profile: &Profile) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Invalid("empty topic"));
    }
    if let Some(max) = profile.max_topic_bytes {
        if topic.len() > max {
            return Err(TopicError::Invalid("topic longer than 256 bytes"));
        }
    }
    if let Some(max) = profile.max_topic_slashes {
        let counted = topic
            .strip_prefix("$aws/rules/")
            .map(|rest| rest.split_once('/').map(|(_, r)| r).unwrap_or(""))
            .unwrap_or(topic);
        if counted.matches('/').count() > max {
            return Err(TopicError::Invalid("topic has more than 7 forward slashes"));
        }
    }
    Ok(())
}

/// Validates a topic name a client publishes to.
pub fn validate_publish_topic(
    topic: &str,
    retain: bool,
    profile: &Profile,
) -> Result<(), TopicError> {
    check_size(topic, profile)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::Invalid("wildcards in a topic name"));
    }
    if profile.aws_reserved_topics && topic.starts_with('$') {
        if retain {
            return Err(TopicError::Reserved(
                "retained messages on $ topics are not allowed",
            ));
        }
        if !topic.starts_with("$aws/") {
            return Err(TopicError::Reserved("only $aws/ reserved topics exist"));
        }
        if topic.starts_with("$aws/events/") {
            return Err(TopicError::Reserved(
                "$aws/events/ topics are subscribe-only",
            ));
        }
    }
    Ok(())
}

/// Validates a subscription filter (after `$share/<group>/` is removed).
pub fn validate_filter(filter: &str, shared: bool, profile: &Profile) -> Result<(), TopicError> {
    check_size(filter, profile)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(TopicError::Invalid("# must be the last level and alone"));
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::Invalid("+ must occupy a whole level"));
        }
    }
    if profile.aws_reserved_topics && filter.starts_with('$') {
        if !filter.starts_with("$aws/") {
            return Err(TopicError::Reserved("only $aws/ reserved topics exist"));
        }
        if filter.starts_with("$aws/rules/") {
            return Err(TopicError::Reserved(
                "basic ingest topics cannot be subscribed to",
            ));
        }
    }
    let _ = shared;
    Ok(())
}

/// Whether `filter` (without share prefix) matches `topic` under `profile`.
pub fn matches(filter: &str, topic: &str, profile: &Profile) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), Some(_)) => return true,
            (Some("#"), None) => return !profile.hash_excludes_parent,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_parent_level_follow_the_profile() {
        let aws = Profile::aws();
        let strict = Profile::strict();
        assert!(!matches("sensor/#", "sensor", &aws));
        assert!(matches("sensor/#", "sensor", &strict));
        for p in [&aws, &strict] {
            assert!(matches("sensor/#", "sensor/", p));
            assert!(matches("sensor/#", "sensor/a/b", p));
            assert!(matches("sensor/+/t", "sensor/x/t", p));
            assert!(!matches("sensor/+/t", "sensor/x/y/t", p));
            assert!(matches("#", "a", p));
            assert!(!matches("#", "$aws/events/presence/connected/x", p));
            assert!(!matches("+/events/#", "$aws/events/x", p));
            assert!(matches("$aws/events/#", "$aws/events/x", p));
            assert!(matches("+", "", p) || !matches("+", "", p));
        }
    }

    #[test]
    fn filters_and_topics_are_validated() {
        let aws = Profile::aws();
        let strict = Profile::strict();
        assert!(validate_filter("a/+/b/#", false, &aws).is_ok());
        assert!(validate_filter("a/b#", false, &strict).is_err());
        assert!(validate_filter("a/#/b", false, &strict).is_err());
        assert!(validate_filter("a+/b", false, &strict).is_err());
        assert!(validate_filter("a/b/c/d/e/f/g/h/i", false, &aws).is_err());
        assert!(validate_filter("a/b/c/d/e/f/g/h/i", false, &strict).is_ok());
        assert!(validate_filter("$aws/rules/r", false, &aws).is_err());
        assert!(validate_publish_topic("a/+", false, &strict).is_err());
        assert!(validate_publish_topic(&"x".repeat(257), false, &aws).is_err());
        assert!(validate_publish_topic("$aws/rules/r/a/b/c/d/e/f/g", false, &aws).is_ok());
        assert!(validate_publish_topic("$aws/things/t/shadow/update", true, &aws).is_err());
        assert!(validate_publish_topic("$aws/events/presence/connected/x", false, &aws).is_err());
        assert!(validate_publish_topic("$SYS/x", false, &aws).is_err());
        assert!(validate_publish_topic("$SYS/x", false, &strict).is_ok());
        assert_eq!(
            parse_filter("$share/g/a/b").unwrap(),
            ParsedFilter {
                share_group: Some("g"),
                filter: "a/b"
            }
        );
        assert!(parse_filter("$share/g").is_err());
        assert!(parse_filter("$share/g+/a").is_err());
    }
}
