//! Event patterns: parsing, validation and matching of one pattern against one event.
//!
//! A pattern is parsed once (at PutRule, CreateArchive or TestEventPattern) into a tree of
//! [`Node`]s whose leaves are typed [`Matcher`]s; every syntax rule of the EventBridge pattern
//! language is checked here and reported as a [`PatternError`] whose text becomes the
//! `InvalidEventPatternException` message. Matching walks the pattern tree against the event
//! JSON: fields are AND-ed, the matchers of a leaf are OR-ed, `$or` groups need one branch, and
//! when the event holds an array the whole sub-pattern must match inside one element (array
//! consistent matching). Keys containing dots are split into nested objects, as event-ruler
//! joins paths with `.`. The rule index in [`crate::ruleset`] decides which patterns are worth
//! evaluating for an event; this module decides whether one of them matches.

use std::net::IpAddr;

use serde_json::{Map, Value};

/// Why a pattern was rejected; the text is shown to the client after
/// "Event pattern is not valid. Reason: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, PatternError> {
    Err(PatternError(message.into()))
}

/// The largest product of `$or` branch counts a pattern may expand to.
pub const MAX_OR_COMBINATIONS: u64 = 1000;
/// The largest number of `*` in all wildcard expressions of one pattern.
pub const MAX_WILDCARD_STARS: usize = 30;

/// Matcher names that may not be used as field names inside `$or` branches.
const RESERVED: &[&str] = &[
    "exactly",
    "equals-ignore-case",
    "prefix",
    "suffix",
    "anything-but",
    "exists",
    "wildcard",
    "numeric",
    "cidr",
    "=",
    "<",
    "<=",
    ">",
    ">=",
    "regex",
    "not-wildcard",
    "not-equals-ignore-case",
    "date-after",
    "date-on-or-after",
    "date-before",
    "date-on-or-before",
    "in-date-range",
    "ip-address-in-range",
    "ip-address-not-in-range",
];

/// A parsed, validated event pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    pub(crate) root: Node,
}

/// One object level of a pattern: every field must match and every `$or` group must have a
/// matching branch.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Node {
    pub(crate) fields: Vec<(String, Field)>,
    pub(crate) ors: Vec<Vec<Node>>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field {
    /// An array of alternatives applied to a leaf value.
    Leaf(Vec<Matcher>),
    /// A nested object pattern.
    Object(Node),
}

/// One alternative inside a leaf array.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Matcher {
    ExactString(String),
    ExactNumber(f64),
    Bool(bool),
    Null,
    Prefix(String),
    PrefixIgnoreCase(String),
    Suffix(String),
    SuffixIgnoreCase(String),
    EqualsIgnoreCase(String),
    Wildcard(Wildcard),
    AnythingButStrings(Vec<String>),
    AnythingButNumbers(Vec<f64>),
    AnythingButPrefix(Vec<String>),
    AnythingButSuffix(Vec<String>),
    AnythingButIgnoreCase(Vec<String>),
    AnythingButWildcard(Vec<Wildcard>),
    Numeric(NumericRange),
    Cidr(Cidr),
    Exists(bool),
}

/// A `numeric` expression: an optional lower and an optional upper bound, or an equality.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NumericRange {
    lower: Option<(f64, bool)>,
    upper: Option<(f64, bool)>,
}

impl NumericRange {
    fn contains(&self, x: f64) -> bool {
        let above = match self.lower {
            None => true,
            Some((bound, inclusive)) => x > bound || (inclusive && x == bound),
        };
        let below = match self.upper {
            None => true,
            Some((bound, inclusive)) => x < bound || (inclusive && x == bound),
        };
        above && below
    }
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cidr {
    network: u128,
    prefix: u32,
    v4: bool,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, PatternError> {
        let bad = || PatternError(format!("Nonstandard IP address: {text}"));
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
            return Err(bad());
        }
        let prefix: u32 = prefix.parse().map_err(|_| bad())?;
        let (bits, width, v4) = match address {
            IpAddr::V4(a) => (u32::from(a) as u128, 32, true),
            IpAddr::V6(a) => {
                if a.to_ipv4_mapped().is_some() {
                    return Err(bad());
                }
                (u128::from(a), 128, false)
            }
        };
        if prefix > width {
            return Err(bad());
        }
        Ok(Cidr {
            network: bits & mask(prefix, width),
            prefix,
            v4,
        })
    }

    fn contains(&self, value: &str) -> bool {
        let Ok(address) = value.parse::<IpAddr>() else {
            return false;
        };
        let (bits, width) = match (address, self.v4) {
            (IpAddr::V4(a), true) => (u32::from(a) as u128, 32),
            (IpAddr::V6(a), false) => (u128::from(a), 128),
            _ => return false,
        };
        bits & mask(self.prefix, width) == self.network
    }
}

fn mask(prefix: u32, width: u32) -> u128 {
    if prefix == 0 {
        0
    } else {
        let all = if width == 32 {
            u32::MAX as u128
        } else {
            u128::MAX
        };
        all & !(all >> prefix)
    }
}

/// A wildcard expression: literal pieces separated by `*`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Wildcard {
    pieces: Vec<String>,
    leading_star: bool,
    trailing_star: bool,
    stars: usize,
}

impl Wildcard {
    fn parse(text: &str) -> Result<Wildcard, PatternError> {
        let mut pieces = vec![String::new()];
        let mut chars = text.chars().peekable();
        let mut previous_star = false;
        let mut stars = 0;
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    match chars.next() {
                        Some(e @ ('*' | '\\')) => pieces.last_mut().unwrap().push(e),
                        _ => {
                            return invalid(format!(
                                "Invalid escape character in wildcard pattern: {text}"
                            ))
                        }
                    }
                    previous_star = false;
                }
                '*' => {
                    if previous_star {
                        return invalid(format!(
                            "Consecutive wildcard characters at pos {} in {text}",
                            pieces.iter().map(|p| p.chars().count() + 1).sum::<usize>() - 1
                        ));
                    }
                    previous_star = true;
                    stars += 1;
                    pieces.push(String::new());
                }
                c => {
                    previous_star = false;
                    pieces.last_mut().unwrap().push(c);
                }
            }
        }
        let leading_star = stars > 0 && pieces.first().is_some_and(String::is_empty);
        let trailing_star = stars > 0 && pieces.last().is_some_and(String::is_empty);
        Ok(Wildcard {
            pieces,
            leading_star,
            trailing_star,
            stars,
        })
    }

    fn matches(&self, value: &str) -> bool {
        if self.stars == 0 {
            return value == self.pieces[0];
        }
        let first = &self.pieces[0];
        let last = &self.pieces[self.pieces.len() - 1];
        if !value.starts_with(first.as_str()) {
            return false;
        }
        let mut rest = &value[first.len()..];
        if rest.len() < last.len() || !rest.ends_with(last.as_str()) {
            return false;
        }
        rest = &rest[..rest.len() - last.len()];
        for piece in &self.pieces[1..self.pieces.len() - 1] {
            match rest.find(piece.as_str()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        let _ = (self.leading_star, self.trailing_star);
        true
    }
}

/// Parses and validates a pattern given as JSON text.
pub fn parse(text: &str) -> Result<Pattern, PatternError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| PatternError(format!("Filter is not valid JSON: {e}")))?;
    parse_value(&value)
}

/// Parses and validates a pattern given as a JSON value.
pub fn parse_value(value: &Value) -> Result<Pattern, PatternError> {
    let Value::Object(map) = value else {
        return invalid("Filter is not an object");
    };
    let mut stars = 0;
    let root = parse_object(map, &mut stars)?;
    if combinations(&root) > MAX_OR_COMBINATIONS {
        return invalid(format!(
            "The event pattern has more than {MAX_OR_COMBINATIONS} $or combinations"
        ));
    }
    if stars > MAX_WILDCARD_STARS {
        return invalid("Rule is too complex: too many wildcard characters");
    }
    Ok(Pattern { root })
}

fn parse_object(map: &Map<String, Value>, stars: &mut usize) -> Result<Node, PatternError> {
    if map.is_empty() {
        return invalid("Empty objects are not allowed");
    }
    let mut node = Node::default();
    for (key, value) in map {
        if key == "$or" {
            if let Value::Array(branches) = value {
                node.ors.push(parse_or(branches, stars)?);
                continue;
            }
        }
        let field = match value {
            Value::Object(inner) => Field::Object(parse_object(inner, stars)?),
            Value::Array(items) => {
                if items.is_empty() {
                    return invalid("Empty arrays are not allowed");
                }
                let matchers = items
                    .iter()
                    .map(|item| parse_matcher(key, item, stars))
                    .collect::<Result<Vec<_>, _>>()?;
                Field::Leaf(matchers)
            }
            _ => return invalid(format!("\"{key}\" must be an object or an array")),
        };
        insert_field(&mut node, key, field);
    }
    Ok(node)
}

/// Adds `field` under `key`, splitting dotted keys into nested objects and merging objects
/// that share a key, so that `{"a.b": …, "a": {"c": …}}` is one object pattern under `a`.
fn insert_field(node: &mut Node, key: &str, field: Field) {
    let (first, rest) = match key.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (key, None),
    };
    let field = match rest {
        None => field,
        Some(rest) => {
            let mut inner = Node::default();
            insert_field(&mut inner, rest, field);
            Field::Object(inner)
        }
    };
    if let Field::Object(incoming) = field {
        if let Some((_, Field::Object(existing))) = node
            .fields
            .iter_mut()
            .find(|(k, f)| k == first && matches!(f, Field::Object(_)))
        {
            for (k, f) in incoming.fields {
                insert_field(existing, &k, f);
            }
            existing.ors.extend(incoming.ors);
            return;
        }
        node.fields
            .push((first.to_string(), Field::Object(incoming)));
    } else {
        node.fields.push((first.to_string(), field));
    }
}

fn parse_or(branches: &[Value], stars: &mut usize) -> Result<Vec<Node>, PatternError> {
    if branches.len() < 2 {
        return invalid("There must have at least 2 elements in the $or array");
    }
    branches
        .iter()
        .map(|branch| {
            let Value::Object(map) = branch else {
                return invalid("Elements of the $or array must be objects");
            };
            if let Some(word) = map.keys().find(|k| RESERVED.contains(&k.as_str())) {
                return invalid(format!(
                    "\"{word}\" is a reserved word and cannot be used as a field name in $or"
                ));
            }
            parse_object(map, stars)
        })
        .collect()
}

fn parse_matcher(field: &str, item: &Value, stars: &mut usize) -> Result<Matcher, PatternError> {
    match item {
        Value::String(s) => Ok(Matcher::ExactString(s.clone())),
        Value::Number(n) => Ok(Matcher::ExactNumber(number(n)?)),
        Value::Bool(b) => Ok(Matcher::Bool(*b)),
        Value::Null => Ok(Matcher::Null),
        Value::Array(_) => invalid(format!(
            "Arrays are not allowed inside the match array of \"{field}\""
        )),
        Value::Object(map) => {
            if map.len() != 1 {
                return invalid(if map.is_empty() {
                    "Empty objects are not allowed".to_string()
                } else {
                    "Only one key allowed in match expression".to_string()
                });
            }
            let (kind, operand) = map.iter().next().expect("one entry");
            parse_match_expression(kind, operand, stars)
        }
    }
}

fn parse_match_expression(
    kind: &str,
    operand: &Value,
    stars: &mut usize,
) -> Result<Matcher, PatternError> {
    match kind {
        "prefix" | "suffix" => {
            let is_prefix = kind == "prefix";
            match operand {
                Value::String(s) if is_prefix => Ok(Matcher::Prefix(s.clone())),
                Value::String(s) => Ok(Matcher::Suffix(s.clone())),
                Value::Object(inner) if inner.len() == 1 => match inner.get("equals-ignore-case") {
                    Some(Value::String(s)) if is_prefix => {
                        Ok(Matcher::PrefixIgnoreCase(s.to_lowercase()))
                    }
                    Some(Value::String(s)) => Ok(Matcher::SuffixIgnoreCase(s.to_lowercase())),
                    Some(_) => invalid(format!(
                        "equals-ignore-case match pattern inside {kind} must be a string"
                    )),
                    None => invalid(format!(
                        "Unsupported {kind} pattern: {}",
                        inner.keys().next().map(String::as_str).unwrap_or("")
                    )),
                },
                _ => invalid(format!("{kind} match pattern must be a string")),
            }
        }
        "equals-ignore-case" => match operand {
            Value::String(s) => Ok(Matcher::EqualsIgnoreCase(s.to_lowercase())),
            _ => invalid("equals-ignore-case match pattern must be a string"),
        },
        "exactly" => match operand {
            Value::String(s) => Ok(Matcher::ExactString(s.clone())),
            _ => invalid("exactly match pattern must be a string"),
        },
        "wildcard" => match operand {
            Value::String(s) => {
                let wildcard = Wildcard::parse(s)?;
                *stars += wildcard.stars;
                Ok(Matcher::Wildcard(wildcard))
            }
            _ => invalid("wildcard match pattern must be a string"),
        },
        "exists" => match operand {
            Value::Bool(b) => Ok(Matcher::Exists(*b)),
            _ => invalid("exists match pattern must be either true or false."),
        },
        "cidr" => match operand {
            Value::String(s) => Ok(Matcher::Cidr(Cidr::parse(s)?)),
            _ => invalid("cidr match pattern must be a string"),
        },
        "numeric" => match operand {
            Value::Array(items) => Ok(Matcher::Numeric(parse_numeric(items)?)),
            _ => invalid("Value of numeric must be an array."),
        },
        "anything-but" => parse_anything_but(operand, stars),
        other => invalid(format!("Unrecognized match type {other}")),
    }
}

fn number(n: &serde_json::Number) -> Result<f64, PatternError> {
    match n.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => invalid(format!("Cannot compare number {n}")),
    }
}

fn parse_numeric(items: &[Value]) -> Result<NumericRange, PatternError> {
    if items.is_empty() {
        return invalid("Empty arrays are not allowed");
    }
    if items.len() > 4 {
        return invalid("Too many elements in numeric expression");
    }
    let mut pairs = Vec::new();
    let mut it = items.iter();
    while let Some(op) = it.next() {
        let Value::String(op) = op else {
            return invalid("Invalid member in numeric match: operator must be a string");
        };
        if !matches!(op.as_str(), "=" | "<" | "<=" | ">" | ">=") {
            return invalid(format!("Unrecognized numeric range operator: {op}"));
        }
        let value = match it.next() {
            Some(Value::Number(n)) => number(n)?,
            Some(_) => return invalid(format!("Value of {op} must be numeric")),
            None => return invalid(format!("Value of {op} must be numeric")),
        };
        pairs.push((op.as_str(), value));
    }
    match pairs.as_slice() {
        [("=", v)] => Ok(NumericRange {
            lower: Some((*v, true)),
            upper: Some((*v, true)),
        }),
        [(op, v)] if op.starts_with('>') => Ok(NumericRange {
            lower: Some((*v, *op == ">=")),
            upper: None,
        }),
        [(op, v)] => Ok(NumericRange {
            lower: None,
            upper: Some((*v, *op == "<=")),
        }),
        [(low_op, low), (high_op, high)] => {
            if !low_op.starts_with('>') || !high_op.starts_with('<') {
                return invalid("Too many elements in numeric expression");
            }
            if low >= high {
                return invalid("Bottom must be less than top");
            }
            Ok(NumericRange {
                lower: Some((*low, *low_op == ">=")),
                upper: Some((*high, *high_op == "<=")),
            })
        }
        _ => invalid("Too many elements in numeric expression"),
    }
}

fn parse_anything_but(operand: &Value, stars: &mut usize) -> Result<Matcher, PatternError> {
    match operand {
        Value::String(s) => Ok(Matcher::AnythingButStrings(vec![s.clone()])),
        Value::Number(n) => Ok(Matcher::AnythingButNumbers(vec![number(n)?])),
        Value::Array(items) => {
            if items.is_empty() {
                return invalid("Empty arrays are not allowed");
            }
            if items.iter().all(Value::is_string) {
                Ok(Matcher::AnythingButStrings(
                    items
                        .iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect(),
                ))
            } else if items.iter().all(Value::is_number) {
                let numbers = items
                    .iter()
                    .map(|v| match v {
                        Value::Number(n) => number(n),
                        _ => unreachable!("checked above"),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Matcher::AnythingButNumbers(numbers))
            } else {
                invalid("Inside anything but list, all values must be strings or all numbers")
            }
        }
        Value::Object(map) => {
            if map.len() != 1 {
                return invalid("Only one key allowed in match expression");
            }
            let (kind, inner) = map.iter().next().expect("one entry");
            let strings: Vec<String> = match inner {
                Value::String(s) => vec![s.clone()],
                Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
                    items
                        .iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                }
                _ => {
                    return invalid(format!(
                    "Value of anything-but {kind} must be a string or a non-empty array of strings"
                ))
                }
            };
            match kind.as_str() {
                "prefix" => Ok(Matcher::AnythingButPrefix(strings)),
                "suffix" => Ok(Matcher::AnythingButSuffix(strings)),
                "equals-ignore-case" => Ok(Matcher::AnythingButIgnoreCase(
                    strings.iter().map(|s| s.to_lowercase()).collect(),
                )),
                "wildcard" => {
                    let wildcards = strings
                        .iter()
                        .map(|s| Wildcard::parse(s))
                        .collect::<Result<Vec<_>, _>>()?;
                    *stars += wildcards.iter().map(|w| w.stars).sum::<usize>();
                    Ok(Matcher::AnythingButWildcard(wildcards))
                }
                other => invalid(format!("Unsupported anything-but pattern: {other}")),
            }
        }
        Value::Null | Value::Bool(_) => {
            invalid("Value of anything-but must be an array, a string, a number or an object")
        }
    }
}

fn combinations(node: &Node) -> u64 {
    let mut total: u64 = 1;
    for (_, field) in &node.fields {
        if let Field::Object(inner) = field {
            total = total.saturating_mul(combinations(inner));
        }
    }
    for group in &node.ors {
        let sum = group
            .iter()
            .map(combinations)
            .fold(0u64, |a, b| a.saturating_add(b));
        total = total.saturating_mul(sum);
    }
    total
}

impl Pattern {
    /// Whether `event` matches this pattern.
    pub fn matches(&self, event: &Value) -> bool {
        self.matches_normalized(&normalize_event(event))
    }

    /// Whether an event already passed through [`normalize_event`] matches.
    pub(crate) fn matches_normalized(&self, event: &Value) -> bool {
        node_matches(&self.root, Some(event))
    }
}

/// The event as the matcher sees it: event-ruler flattens events into `.`-joined paths, so an
/// event key containing dots (`{"state.status": "x"}`) is the same path as the nested
/// `{"state": {"status": "x"}}`. Keys with dots are split into nested objects here (merged with
/// an existing object of the same name; a clash with a non-object value keeps both as the
/// elements of an array, so each still matches its own path). Events without dotted keys, the
/// usual case, are borrowed unchanged.
pub fn normalize_event(event: &Value) -> std::borrow::Cow<'_, Value> {
    if has_dotted_key(event) {
        std::borrow::Cow::Owned(split_dotted_keys(event))
    } else {
        std::borrow::Cow::Borrowed(event)
    }
}

fn has_dotted_key(value: &Value) -> bool {
    match value {
        // Keys are short: a plain byte scan beats `str::contains`'s searcher set-up, and this
        // runs over every key of every routed event.
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.bytes().any(|b| b == b'.') || has_dotted_key(v)),
        Value::Array(items) => items.iter().any(has_dotted_key),
        _ => false,
    }
}

fn split_dotted_keys(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, child) in map {
                let segments: Vec<&str> = key.split('.').collect();
                merge_at(&mut out, &segments, split_dotted_keys(child));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(split_dotted_keys).collect()),
        scalar => scalar.clone(),
    }
}

fn merge_at(map: &mut Map<String, Value>, segments: &[&str], value: Value) {
    let (first, rest) = segments.split_first().expect("split yields one segment");
    let value = if rest.is_empty() {
        value
    } else {
        let mut inner = Map::new();
        merge_at(&mut inner, rest, value);
        Value::Object(inner)
    };
    match map.get_mut(*first) {
        None => {
            map.insert(first.to_string(), value);
        }
        Some(existing) => merge_values(existing, value),
    }
}

fn merge_values(existing: &mut Value, incoming: Value) {
    match (existing, incoming) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    None => {
                        a.insert(k, v);
                    }
                    Some(slot) => merge_values(slot, v),
                }
            }
        }
        (Value::Array(items), incoming) => items.push(incoming),
        (existing, incoming) => {
            let old = existing.take();
            *existing = Value::Array(vec![old, incoming]);
        }
    }
}

fn node_matches(node: &Node, value: Option<&Value>) -> bool {
    match value {
        Some(Value::Array(items)) if !items.is_empty() => {
            items.iter().any(|item| node_matches(node, Some(item)))
        }
        Some(Value::Object(map)) => object_matches(node, Some(map)),
        _ => object_matches(node, None),
    }
}

fn object_matches(node: &Node, object: Option<&Map<String, Value>>) -> bool {
    node.fields.iter().all(|(key, field)| {
        let value = object.and_then(|o| o.get(key));
        match field {
            Field::Object(inner) => node_matches(inner, value),
            Field::Leaf(matchers) => leaf_matches(matchers, value),
        }
    }) && node
        .ors
        .iter()
        .all(|group| group.iter().any(|branch| object_matches(branch, object)))
}

fn leaf_matches(matchers: &[Matcher], value: Option<&Value>) -> bool {
    let absent = || matchers.contains(&Matcher::Exists(false));
    match value {
        None | Some(Value::Object(_)) => absent(),
        Some(Value::Array(items)) => {
            let mut scalars = Vec::new();
            collect_scalars(items, &mut scalars);
            if scalars.is_empty() {
                return absent();
            }
            matchers.iter().any(|m| match m {
                Matcher::Exists(exists) => *exists,
                m => scalars.iter().any(|s| scalar_matches(m, s)),
            })
        }
        Some(scalar) => matchers.iter().any(|m| match m {
            Matcher::Exists(exists) => *exists,
            m => scalar_matches(m, scalar),
        }),
    }
}

fn collect_scalars<'a>(items: &'a [Value], out: &mut Vec<&'a Value>) {
    for item in items {
        match item {
            Value::Array(inner) => collect_scalars(inner, out),
            Value::Object(_) => {}
            scalar => out.push(scalar),
        }
    }
}

fn scalar_matches(matcher: &Matcher, value: &Value) -> bool {
    let text = value.as_str();
    let num = || match value {
        Value::Number(n) => n.as_f64(),
        _ => None,
    };
    match matcher {
        Matcher::ExactString(s) => text == Some(s.as_str()),
        Matcher::ExactNumber(x) => num() == Some(*x),
        Matcher::Bool(b) => value.as_bool() == Some(*b),
        Matcher::Null => value.is_null(),
        Matcher::Prefix(p) => text.is_some_and(|t| t.starts_with(p.as_str())),
        Matcher::PrefixIgnoreCase(p) => {
            text.is_some_and(|t| t.to_lowercase().starts_with(p.as_str()))
        }
        Matcher::Suffix(s) => text.is_some_and(|t| t.ends_with(s.as_str())),
        Matcher::SuffixIgnoreCase(s) => {
            text.is_some_and(|t| t.to_lowercase().ends_with(s.as_str()))
        }
        Matcher::EqualsIgnoreCase(s) => text.is_some_and(|t| t.to_lowercase() == *s),
        Matcher::Wildcard(w) => text.is_some_and(|t| w.matches(t)),
        Matcher::AnythingButStrings(list) => !text.is_some_and(|t| list.iter().any(|s| s == t)),
        Matcher::AnythingButNumbers(list) => !num().is_some_and(|x| list.contains(&x)),
        Matcher::AnythingButPrefix(list) => {
            !text.is_some_and(|t| list.iter().any(|p| t.starts_with(p.as_str())))
        }
        Matcher::AnythingButSuffix(list) => {
            !text.is_some_and(|t| list.iter().any(|s| t.ends_with(s.as_str())))
        }
        Matcher::AnythingButIgnoreCase(list) => !text.is_some_and(|t| {
            let lower = t.to_lowercase();
            list.contains(&lower)
        }),
        Matcher::AnythingButWildcard(list) => {
            !text.is_some_and(|t| list.iter().any(|w| w.matches(t)))
        }
        Matcher::Numeric(range) => num().is_some_and(|x| range.contains(x)),
        Matcher::Cidr(cidr) => text.is_some_and(|t| cidr.contains(t)),
        Matcher::Exists(exists) => *exists,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(pattern: &str, event: Value) -> bool {
        parse(pattern).unwrap().matches(&event)
    }

    #[test]
    fn wildcards_match_with_backtracking_free_scan() {
        assert!(check(
            r#"{"a":[{"wildcard":"*.png"}]}"#,
            json!({"a":"x.png.png"})
        ));
        assert!(check(r#"{"a":[{"wildcard":"a*a"}]}"#, json!({"a":"aa"})));
        assert!(!check(r#"{"a":[{"wildcard":"a*a"}]}"#, json!({"a":"a"})));
        assert!(check(
            r#"{"a":[{"wildcard":"*"}]}"#,
            json!({"a":"anything"})
        ));
        assert!(check(
            r#"{"a":[{"wildcard":"x*y*"}]}"#,
            json!({"a":"xzzyq"})
        ));
    }

    #[test]
    fn dotted_event_keys_are_the_same_path_as_nested_objects() {
        // event-ruler joins event paths with '.', so dots in event keys collide with nesting.
        let nested = r#"{"detail":{"state":{"status":["running"]}}}"#;
        let dotted = r#"{"detail":{"state.status":["running"]}}"#;
        for p in [nested, dotted] {
            assert!(
                check(p, json!({"detail":{"state.status":"running"}})),
                "{p}"
            );
            assert!(
                check(p, json!({"detail":{"state":{"status":"running"}}})),
                "{p}"
            );
            assert!(
                !check(p, json!({"detail":{"state.status":"stopped"}})),
                "{p}"
            );
        }
        // Mixed: part dotted, part nested, merged with a sibling object.
        let p = r#"{"a":{"b":{"c":["1"],"d":["2"]}}}"#;
        assert!(check(p, json!({"a.b.c":"1","a":{"b":{"d":"2"}}})));
        assert!(check(p, json!({"a":{"b.c":"1","b":{"d":"2"}}})));
        // A dotted key clashing with a scalar of the same name keeps both paths.
        assert!(check(r#"{"a":["x"]}"#, json!({"a":"x","a.b":"y"})));
        assert!(check(r#"{"a":{"b":["y"]}}"#, json!({"a":"x","a.b":"y"})));
        assert!(check(
            r#"{"a":{"b":[{"exists":false}]}}"#,
            json!({"a.c":"y"})
        ));
        // Dotted keys inside arrays of objects.
        assert!(check(
            r#"{"items":{"k":{"v":["z"]}}}"#,
            json!({"items":[{"k.v":"q"},{"k.v":"z"}]})
        ));
    }

    #[test]
    fn dotted_keys_merge_with_nested_objects() {
        let p = r#"{"a.b":["1"],"a":{"c":["2"]}}"#;
        assert!(check(p, json!({"a":{"b":"1","c":"2"}})));
        assert!(!check(p, json!({"a":[{"b":"1"},{"c":"2"}]})));
    }

    #[test]
    fn or_combination_limit_is_enforced() {
        let branches: Vec<String> = (0..11).map(|i| format!(r#"{{"f{i}":["x"]}}"#)).collect();
        let group = format!("[{}]", branches.join(","));
        let pattern =
            format!(r#"{{"a":{{"$or":{group}}},"b":{{"$or":{group}}},"c":{{"$or":{group}}}}}"#);
        assert!(parse(&pattern).unwrap_err().0.contains("$or"));
    }

    #[test]
    fn ipv4_mapped_cidr_is_rejected() {
        assert!(parse(r#"{"a":[{"cidr":"::ffff:10.0.0.0/104"}]}"#).is_err());
        assert!(check(
            r#"{"a":[{"cidr":"0.0.0.0/0"}]}"#,
            json!({"a":"1.2.3.4"})
        ));
    }
}
