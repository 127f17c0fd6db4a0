//! The event bus's state and rules, without HTTP: buses with their rules and targets, archives,
//! replays, connections and API destinations, the event envelope, PutEvents validation and
//! routing of an event to the targets of the rules it matches.
//!
//! All state lives in memory behind one mutex and is written through to the
//! [`crate::store::EventsStore`] on every change; routing an event produces the pending
//! deliveries and archive records that the caller commits before acknowledging.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::pattern::{self, Pattern};
use crate::ruleset::RuleSet;
use crate::store::{ArchiveRecord, IngestBatch};
use crate::transform;

/// An error the API answers with; `code` is the AWS error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsError {
    pub code: &'static str,
    pub message: String,
}

impl EventsError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        EventsError {
            code,
            message: message.into(),
        }
    }
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new("ValidationException", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new("ResourceNotFoundException", message)
    }
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new("ResourceAlreadyExistsException", message)
    }
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new("LimitExceededException", message)
    }
    pub fn pattern(e: &pattern::PatternError) -> Self {
        Self::new(
            "InvalidEventPatternException",
            format!("Event pattern is not valid. Reason: {e}"),
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new("InternalException", message)
    }
}

pub type EventsResult<T> = Result<T, EventsError>;

/// Limits, from the `[events]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EventsConfig {
    /// Limit on the summed entry size of one PutEvents request (262 144 = the historic 256 KB).
    pub max_entry_bytes: usize,
    pub max_buses: usize,
    pub max_rules_per_bus: usize,
    pub max_targets_per_rule: usize,
    pub max_active_replays: usize,
    /// First retry delay of a failed delivery; doubles per attempt up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Timeout of one HTTP delivery.
    pub http_timeout_ms: u64,
    /// Newest events kept for `mooring events tail`.
    pub tail_keep: i64,
    /// Extra PEM certificates trusted for HTTPS deliveries, besides the public web roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Loop guard: how many times one event may be forwarded from bus to bus (through
    /// event-bus targets) before the receiving bus stops routing it and dead-letters it
    /// instead; 0 turns the guard off.
    pub max_event_hops: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_entry_bytes: 262_144,
            max_buses: 100,
            max_rules_per_bus: 300,
            max_targets_per_rule: 5,
            max_active_replays: 10,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            http_timeout_ms: 5_000,
            tail_keep: 10_000,
            tls_ca_file: None,
            max_event_hops: 16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bus {
    pub name: String,
    pub arn: String,
    pub description: Option<String>,
    pub kms_key_identifier: Option<String>,
    pub dead_letter_config: Option<Value>,
    pub log_config: Option<Value>,
    pub policy: Option<String>,
    pub creation_time: f64,
    pub last_modified_time: f64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub bus: String,
    pub arn: String,
    pub event_pattern: Option<String>,
    pub schedule_expression: Option<String>,
    pub state: String,
    pub description: Option<String>,
    pub role_arn: Option<String>,
    pub created_by: String,
    pub created_ms: i64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Targets in `Id` order, as given to PutTargets.
    #[serde(default)]
    pub targets: Vec<Value>,
}

impl Rule {
    pub fn enabled(&self) -> bool {
        self.state != "DISABLED"
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Archive {
    pub name: String,
    pub arn: String,
    pub event_source_arn: String,
    pub bus: String,
    pub description: Option<String>,
    pub event_pattern: Option<String>,
    pub retention_days: i64,
    pub state: String,
    pub creation_time: f64,
    pub kms_key_identifier: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replay {
    pub name: String,
    pub arn: String,
    pub description: Option<String>,
    pub event_source_arn: String,
    pub archive: String,
    pub destination: Value,
    pub event_start_time: f64,
    pub event_end_time: f64,
    pub state: String,
    pub state_reason: Option<String>,
    pub event_last_replayed_time: Option<f64>,
    pub replay_start_time: f64,
    pub replay_end_time: Option<f64>,
    /// Last archive sequence number replayed, so a restart resumes after it.
    #[serde(default)]
    pub last_seq: i64,
}

impl Replay {
    pub fn active(&self) -> bool {
        matches!(self.state.as_str(), "STARTING" | "RUNNING" | "CANCELLING")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connection {
    pub name: String,
    pub arn: String,
    pub description: Option<String>,
    pub authorization_type: String,
    /// As given, secrets included; never rendered as is.
    pub auth_parameters: Value,
    pub state: String,
    pub state_reason: Option<String>,
    pub creation_time: f64,
    pub last_modified_time: f64,
    pub last_authorized_time: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiDestination {
    pub name: String,
    pub arn: String,
    pub description: Option<String>,
    pub connection_arn: String,
    pub invocation_endpoint: String,
    pub http_method: String,
    pub invocation_rate_limit_per_second: i64,
    pub state: String,
    pub creation_time: f64,
    pub last_modified_time: f64,
}

/// A bus with its rules and their compiled matcher.
pub struct BusState {
    pub bus: Bus,
    pub rules: BTreeMap<String, Rule>,
    pub patterns: HashMap<String, Arc<Pattern>>,
    pub matcher: RuleSet<String>,
}

impl BusState {
    pub fn new(bus: Bus) -> Self {
        BusState {
            bus,
            rules: BTreeMap::new(),
            patterns: HashMap::new(),
            matcher: RuleSet::new(),
        }
    }

    /// Rebuilds the matcher from the enabled rules that have a pattern.
    pub fn recompile(&mut self) {
        let mut matcher = RuleSet::new();
        for (name, rule) in &self.rules {
            if rule.enabled() {
                if let Some(p) = self.patterns.get(name) {
                    matcher.insert(name.clone(), p.clone());
                }
            }
        }
        self.matcher = matcher;
    }
}

/// The whole in-memory state.
#[derive(Default)]
pub struct State {
    pub buses: BTreeMap<String, BusState>,
    pub archives: BTreeMap<String, (Archive, Option<Arc<Pattern>>)>,
    pub replays: BTreeMap<String, Replay>,
    pub connections: BTreeMap<String, Connection>,
    pub api_destinations: BTreeMap<String, ApiDestination>,
}

/// An event ready for routing: its wire text and parsed form.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub text: String,
    pub value: Value,
    pub time_ms: i64,
}

/// Formats epoch milliseconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_seconds(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Parses an RFC 3339 time back into epoch milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Builds the envelope of §3 with fields in AWS's order.
#[allow(clippy::too_many_arguments)]
pub fn envelope(
    id: &str,
    detail_type: &str,
    source: &str,
    account: &str,
    time_ms: i64,
    region: &str,
    resources: &[String],
    detail: &Value,
    replay_name: Option<&str>,
) -> EventRecord {
    let s = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let mut text = format!(
        "{{\"version\":\"0\",\"id\":{},\"detail-type\":{},\"source\":{},\"account\":{},\"time\":{},\"region\":{},\"resources\":{},\"detail\":{}",
        s(id),
        s(detail_type),
        s(source),
        s(account),
        s(&rfc3339_seconds(time_ms)),
        s(region),
        serde_json::to_string(resources).unwrap_or_default(),
        serde_json::to_string(detail).unwrap_or_default(),
    );
    if let Some(name) = replay_name {
        text.push_str(&format!(",\"replay-name\":{}", s(name)));
    }
    text.push('}');
    let mut value = json!({
        "version": "0",
        "id": id,
        "detail-type": detail_type,
        "source": source,
        "account": account,
        "time": rfc3339_seconds(time_ms),
        "region": region,
        "resources": resources,
        "detail": detail,
    });
    if let Some(name) = replay_name {
        value["replay-name"] = json!(name);
    }
    EventRecord {
        text,
        value,
        time_ms,
    }
}

/// Adds `replay-name` to an archived event's text and value.
pub fn with_replay_name(text: &str, replay: &str) -> Option<EventRecord> {
    let mut value: Value = serde_json::from_str(text).ok()?;
    let time_ms = value["time"].as_str().and_then(parse_rfc3339).unwrap_or(0);
    value
        .as_object_mut()?
        .insert("replay-name".into(), json!(replay));
    let trimmed = text.trim_end();
    let body = trimmed.strip_suffix('}')?;
    let text = format!(
        "{body},\"replay-name\":{}}}",
        serde_json::to_string(replay).ok()?
    );
    Some(EventRecord {
        text,
        value,
        time_ms,
    })
}

/// The size of a PutEvents entry per the seed: 14 bytes for `Time`, plus the UTF-8 bytes of
/// `Source`, `DetailType`, `Detail` and every non-null `Resources` element.
pub fn entry_size(entry: &Value) -> usize {
    let text = |k: &str| entry.get(k).and_then(Value::as_str).map_or(0, str::len);
    let mut size = 0;
    if entry.get("Time").is_some_and(|t| !t.is_null()) {
        size += 14;
    }
    size += text("Source") + text("DetailType") + text("Detail");
    if let Some(resources) = entry.get("Resources").and_then(Value::as_array) {
        size += resources
            .iter()
            .filter_map(Value::as_str)
            .map(str::len)
            .sum::<usize>();
    }
    size
}

/// Depth of a JSON value's nesting.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A validated PutEvents entry.
#[derive(Debug, Clone)]
pub struct ValidEntry {
    pub bus: String,
    pub source: String,
    pub detail_type: String,
    pub detail: Value,
    pub resources: Vec<String>,
    pub time_ms: Option<i64>,
}

/// Checks one entry; the error is the per-entry `(ErrorCode, ErrorMessage)`.
pub fn validate_entry(entry: &Value) -> Result<ValidEntry, (&'static str, String)> {
    let arg = |m: &str| ("InvalidArgument", m.to_string());
    let Some(entry) = entry.as_object() else {
        return Err(arg("Entry is not an object."));
    };
    let string = |k: &str| entry.get(k).and_then(Value::as_str);
    let source = string("Source").filter(|s| !s.is_empty());
    let detail_type = string("DetailType").filter(|s| !s.is_empty());
    let detail = string("Detail");
    let (Some(source), Some(detail_type), Some(detail)) = (source, detail_type, detail) else {
        return Err(arg(
            "Parameters Source, DetailType and Detail are required.",
        ));
    };
    if detail_type.chars().count() > 128 {
        return Err(arg(
            "Parameter DetailType is not valid: it must be at most 128 characters.",
        ));
    }
    if source.starts_with("aws.") {
        return Err((
            "NotAuthorizedForSourceException",
            format!("Not authorized for the source {source}."),
        ));
    }
    let bus = match entry.get("EventBusName") {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(name)) => {
            bus_name_from(name).map_err(|_| arg("Parameter EventBusName is not valid."))?
        }
        Some(_) => return Err(arg("Parameter EventBusName is not valid.")),
    };
    let resources = match entry.get("Resources") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    Value::String(s) if s.len() <= 2048 => out.push(s.clone()),
                    Value::Null => {}
                    _ => return Err(arg("Parameter Resources is not valid.")),
                }
            }
            out
        }
        Some(_) => return Err(arg("Parameter Resources is not valid.")),
    };
    if let Some(trace) = entry.get("TraceHeader").and_then(Value::as_str) {
        if trace.is_empty() || trace.len() > 500 {
            return Err(arg("Parameter TraceHeader is not valid."));
        }
    }
    let time_ms = match entry.get("Time") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64().map(|s| (s * 1000.0) as i64),
        Some(Value::String(s)) => {
            match parse_rfc3339(s).or_else(|| s.parse::<f64>().ok().map(|x| (x * 1000.0) as i64)) {
                Some(ms) => Some(ms),
                None => return Err(arg("Parameter Time is not valid.")),
            }
        }
        Some(_) => return Err(arg("Parameter Time is not valid.")),
    };
    let detail: Value = match serde_json::from_str::<Value>(detail) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Err(("MalformedDetail", "Detail is not a JSON object.".into())),
        Err(_) => return Err(("MalformedDetail", "Detail is malformed.".into())),
    };
    if depth(&detail) > 1000 {
        return Err(("MalformedDetail", "Detail is nested too deeply.".into()));
    }
    if !fits_i64(&detail) {
        return Err((
            "MalformedDetail",
            "Detail contains an integer that does not fit in 64 bits.".into(),
        ));
    }
    Ok(ValidEntry {
        bus,
        source: source.to_string(),
        detail_type: detail_type.to_string(),
        detail,
        resources,
        time_ms,
    })
}

fn fits_i64(v: &Value) -> bool {
    match v {
        Value::Number(n) => !(n.is_u64() && n.as_i64().is_none()),
        Value::Array(a) => a.iter().all(fits_i64),
        Value::Object(o) => o.values().all(fits_i64),
        _ => true,
    }
}

/// Accepts a bus name or bus ARN and returns the name.
pub fn bus_name_from(name_or_arn: &str) -> Result<String, EventsError> {
    let name = match name_or_arn.strip_prefix("arn:") {
        Some(_) => match name_or_arn.split_once(":event-bus/") {
            Some((_, name)) => name,
            None => {
                return Err(EventsError::validation(
                    "Parameter EventBusName is not valid.",
                ))
            }
        },
        None => name_or_arn,
    };
    if name.is_empty()
        || name.len() > 256
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value '{name_or_arn}' at 'eventBusName' failed to satisfy constraint: Member must satisfy regular expression pattern: [/\\.\\-_A-Za-z0-9]+"
        )));
    }
    Ok(name.to_string())
}

/// Checks a resource name against `[\.\-_A-Za-z0-9]+` and a maximum length.
pub fn check_name(what: &str, name: &str, max: usize) -> EventsResult<()> {
    if name.is_empty()
        || name.len() > max
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value '{name}' at '{what}' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\.\\-_A-Za-z0-9]+ and have length between 1 and {max}"
        )));
    }
    Ok(())
}

/// Parses a pattern as PutRule, CreateArchive and TestEventPattern do.
pub fn compile_pattern(text: &str) -> EventsResult<Arc<Pattern>> {
    if text.chars().count() > 4096 {
        return Err(EventsError::validation(
            "1 validation error detected: Value at 'eventPattern' failed to satisfy constraint: Member must have length less than or equal to 4096",
        ));
    }
    pattern::parse(text)
        .map(Arc::new)
        .map_err(|e| EventsError::pattern(&e))
}

/// A pending delivery document, as stored. `hops` counts the bus-to-bus forwards the event
/// went through before reaching the rule's bus (0 for an event put on it directly).
pub fn delivery_document(
    rule: &Rule,
    target: &Value,
    payload: String,
    event: &str,
    now_ms: i64,
    hops: u32,
) -> Value {
    json!({
        "hops": hops,
        "rule_arn": rule.arn,
        "rule_name": rule.name,
        "target": target,
        "payload": payload,
        "event": event,
        "attempts": 0,
        "first_ms": now_ms,
        "next_ms": now_ms,
    })
}

/// The deliveries (one per target of every matching enabled rule) and archive records for
/// `event` arriving on `bus`. A replayed event is restricted to `filter_rules` (rule ARNs)
/// when given, and never archived. `hops` is the event's bus-to-bus forward count.
pub fn route(
    state: &State,
    bus: &str,
    event: &EventRecord,
    replay_filter: Option<&[String]>,
    now_ms: i64,
    hops: u32,
    batch: &mut IngestBatch,
) {
    let Some(bus_state) = state.buses.get(bus) else {
        return;
    };
    bus_state.matcher.for_each_match(&event.value, |rule_name| {
        let Some(rule) = bus_state.rules.get(rule_name) else {
            return;
        };
        if let Some(filter) = replay_filter {
            if !filter.is_empty() && !filter.contains(&rule.arn) {
                return;
            }
        }
        for target in &rule.targets {
            let payload = transform::shape(target, &event.value, &event.text, rule, now_ms);
            batch.deliveries.push(delivery_document(
                rule,
                target,
                payload,
                &event.text,
                now_ms,
                hops,
            ));
        }
    });
    if replay_filter.is_none() {
        for (archive, pattern) in state.archives.values() {
            if archive.bus != bus || archive.state != "ENABLED" {
                continue;
            }
            if pattern.as_ref().is_none_or(|p| p.matches(&event.value)) {
                batch.archive.push(ArchiveRecord {
                    archive: archive.name.clone(),
                    time_ms: event.time_ms,
                    received_ms: now_ms,
                    event: event.text.clone(),
                });
            }
        }
    }
}

/// Renders seconds-since-epoch with milliseconds as AWS's JSON timestamps.
pub fn epoch(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// `{Key, Value}` list → map, validating the tag limits.
pub fn parse_tags(tags: Option<&Value>) -> EventsResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Some(tags) = tags else { return Ok(out) };
    let Some(items) = tags.as_array() else {
        return Err(EventsError::validation("Tags must be a list."));
    };
    for item in items {
        let key = item.get("Key").and_then(Value::as_str).unwrap_or_default();
        let value = item
            .get("Value")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if key.is_empty() || key.chars().count() > 128 || value.chars().count() > 256 {
            return Err(EventsError::validation(format!(
                "Tag {key:?} is not valid."
            )));
        }
        out.insert(key.to_string(), value.to_string());
    }
    Ok(out)
}

pub fn render_tags(tags: &BTreeMap<String, String>) -> Value {
    Value::Array(
        tags.iter()
            .map(|(k, v)| json!({"Key": k, "Value": v}))
            .collect(),
    )
}

/// Drops `None`s from an object built with optional members.
pub fn compact(map: Map<String, Value>) -> Value {
    Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
}
