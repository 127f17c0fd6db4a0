//! The EventBridge operations, one function each: read the JSON input, apply the change to the
//! model (persisting it), and render the output in the shapes of the `events` 2015-10-07
//! service model. Every function runs on the blocking pool (it may write to SQLite).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::delivery::TargetKind;
use crate::model::{
    bus_name_from, check_name, compact, compile_pattern, envelope, epoch, parse_tags, render_tags,
    route, validate_entry, ApiDestination, Archive, Bus, BusState, Connection, EventsError,
    EventsResult, Replay, Rule, State,
};
use crate::schedule;
use crate::store::IngestBatch;
use crate::Events;

/// Runs operation `op` with `input`.
pub fn dispatch(events: &Arc<Events>, op: &str, input: &Value) -> EventsResult<Value> {
    match op {
        "PutEvents" => put_events(events, input),
        "CreateEventBus" => create_event_bus(events, input),
        "DescribeEventBus" => describe_event_bus(events, input),
        "ListEventBuses" => list_event_buses(events, input),
        "UpdateEventBus" => update_event_bus(events, input),
        "DeleteEventBus" => delete_event_bus(events, input),
        "PutPermission" => put_permission(events, input),
        "RemovePermission" => remove_permission(events, input),
        "PutRule" => put_rule(events, input),
        "DescribeRule" => describe_rule(events, input),
        "ListRules" => list_rules(events, input),
        "DeleteRule" => delete_rule(events, input),
        "EnableRule" => set_rule_state(events, input, "ENABLED"),
        "DisableRule" => set_rule_state(events, input, "DISABLED"),
        "PutTargets" => put_targets(events, input),
        "RemoveTargets" => remove_targets(events, input),
        "ListTargetsByRule" => list_targets_by_rule(events, input),
        "ListRuleNamesByTarget" => list_rule_names_by_target(events, input),
        "TestEventPattern" => test_event_pattern(input),
        "CreateArchive" => create_archive(events, input),
        "DescribeArchive" => describe_archive(events, input),
        "ListArchives" => list_archives(events, input),
        "UpdateArchive" => update_archive(events, input),
        "DeleteArchive" => delete_archive(events, input),
        "StartReplay" => start_replay(events, input),
        "DescribeReplay" => describe_replay(events, input),
        "ListReplays" => list_replays(events, input),
        "CancelReplay" => cancel_replay(events, input),
        "CreateConnection" => create_connection(events, input),
        "DescribeConnection" => describe_connection(events, input),
        "ListConnections" => list_connections(events, input),
        "UpdateConnection" => update_connection(events, input),
        "DeauthorizeConnection" => deauthorize_connection(events, input),
        "DeleteConnection" => delete_connection(events, input),
        "CreateApiDestination" => create_api_destination(events, input),
        "DescribeApiDestination" => describe_api_destination(events, input),
        "ListApiDestinations" => list_api_destinations(events, input),
        "UpdateApiDestination" => update_api_destination(events, input),
        "DeleteApiDestination" => delete_api_destination(events, input),
        "TagResource" => tag_resource(events, input),
        "UntagResource" => untag_resource(events, input),
        "ListTagsForResource" => list_tags_for_resource(events, input),
        other => Err(EventsError::new(
            "UnknownOperationException",
            format!("Unknown operation AWSEvents.{other}"),
        )),
    }
}

// ---------------------------------------------------------------- input helpers

fn opt<'a>(input: &'a Value, key: &str) -> Option<&'a str> {
    input.get(key).and_then(Value::as_str)
}

fn req<'a>(input: &'a Value, key: &str) -> EventsResult<&'a str> {
    opt(input, key).ok_or_else(|| {
        let mut member = key.to_string();
        member[..1].make_ascii_lowercase();
        EventsError::validation(format!(
            "1 validation error detected: Value null at '{member}' failed to satisfy constraint: Member must not be null"
        ))
    })
}

fn max_len(key: &str, value: Option<&str>, max: usize) -> EventsResult<()> {
    if value.is_some_and(|v| v.chars().count() > max) {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value at '{key}' failed to satisfy constraint: Member must have length less than or equal to {max}"
        )));
    }
    Ok(())
}

fn bus_param(input: &Value, key: &str) -> EventsResult<String> {
    match opt(input, key) {
        None => Ok("default".into()),
        Some(name) => bus_name_from(name),
    }
}

fn time_param(input: &Value, key: &str) -> EventsResult<f64> {
    match input.get(key) {
        Some(Value::Number(n)) => Ok(n.as_f64().unwrap_or(0.0)),
        Some(Value::String(s)) => crate::model::parse_rfc3339(s)
            .map(epoch)
            .ok_or_else(|| EventsError::validation(format!("Parameter {key} is not valid."))),
        _ => Err(EventsError::validation(format!(
            "1 validation error detected: Value null at '{key}' failed to satisfy constraint: Member must not be null"
        ))),
    }
}

/// Slices `items` by `NextToken`/`Limit`; the token is the offset of the next page.
fn page(items: Vec<Value>, input: &Value) -> EventsResult<(Vec<Value>, Option<String>)> {
    let limit = match input.get("Limit") {
        None | Some(Value::Null) => 100,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=100) => n as usize,
            _ => {
                return Err(EventsError::validation(
                    "1 validation error detected: Value at 'limit' failed to satisfy constraint: Member must have value between 1 and 100",
                ))
            }
        },
    };
    let start = match opt(input, "NextToken") {
        None => 0,
        Some(token) => token
            .strip_prefix("mooring-page-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= items.len())
            .ok_or_else(|| EventsError::validation("The NextToken provided is not valid."))?,
    };
    let end = (start + limit).min(items.len());
    let next = (end < items.len()).then(|| format!("mooring-page-{end}"));
    Ok((items[start..end].to_vec(), next))
}

fn with_token(mut out: Map<String, Value>, next: Option<String>) -> Value {
    if let Some(token) = next {
        out.insert("NextToken".into(), json!(token));
    }
    Value::Object(out)
}

/// The rule `rule_name` on bus `bus_name`, or the not-found error for whichever is missing.
fn rule_in<'a>(state: &'a State, bus_name: &str, rule_name: &str) -> EventsResult<&'a Rule> {
    state
        .buses
        .get(bus_name)
        .ok_or_else(|| bus_not_found(bus_name))?
        .rules
        .get(rule_name)
        .ok_or_else(|| rule_not_found(rule_name, bus_name))
}

fn rule_in_mut<'a>(
    state: &'a mut State,
    bus_name: &str,
    rule_name: &str,
) -> EventsResult<&'a mut Rule> {
    state
        .buses
        .get_mut(bus_name)
        .ok_or_else(|| bus_not_found(bus_name))?
        .rules
        .get_mut(rule_name)
        .ok_or_else(|| rule_not_found(rule_name, bus_name))
}

/// One page of a List* operation: `{key: [...], "NextToken": ...}`.
fn list_response(key: &str, items: Vec<Value>, input: &Value) -> EventsResult<Value> {
    let (items, next) = page(items, input)?;
    let mut out = Map::new();
    out.insert(key.into(), Value::Array(items));
    Ok(with_token(out, next))
}

fn internal(e: impl std::fmt::Display) -> EventsError {
    EventsError::internal(format!("storage failure: {e}"))
}

fn rule_not_found(rule: &str, bus: &str) -> EventsError {
    EventsError::not_found(format!("Rule {rule} does not exist on EventBus {bus}."))
}

fn bus_not_found(bus: &str) -> EventsError {
    EventsError::not_found(format!("Event bus {bus} does not exist."))
}

impl Events {
    fn save_bus(&self, bus: &Bus) -> EventsResult<()> {
        self.store
            .put_resource(
                "bus",
                &bus.name,
                &serde_json::to_value(bus).map_err(internal)?,
            )
            .map_err(internal)
    }

    fn save_rule(&self, rule: &Rule) -> EventsResult<()> {
        self.store
            .put_resource(
                "rule",
                &format!("{}|{}", rule.bus, rule.name),
                &serde_json::to_value(rule).map_err(internal)?,
            )
            .map_err(internal)
    }

    fn save<T: serde::Serialize>(&self, kind: &str, name: &str, value: &T) -> EventsResult<()> {
        self.store
            .put_resource(kind, name, &serde_json::to_value(value).map_err(internal)?)
            .map_err(internal)
    }

    fn now(&self) -> i64 {
        self.clock.now_millis()
    }

    fn bus_arn(&self, name: &str) -> String {
        self.arns.arn("events", &format!("event-bus/{name}"))
    }
}

// ---------------------------------------------------------------- PutEvents

/// PutEvents: validates each entry, routes the accepted ones, and makes every resulting
/// delivery and archive record durable before answering.
pub fn put_events(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let Some(entries) = input.get("Entries").and_then(Value::as_array) else {
        return Err(EventsError::validation(
            "1 validation error detected: Value null at 'entries' failed to satisfy constraint: Member must not be null",
        ));
    };
    if entries.is_empty() || entries.len() > 10 {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value '[...]' at 'entries' failed to satisfy constraint: Member must have length {} 10",
            if entries.is_empty() { "greater than or equal to 1 and less than or equal to" } else { "less than or equal to" }
        )));
    }
    let total: usize = entries.iter().map(crate::model::entry_size).sum();
    if total > events.config.max_entry_bytes {
        return Err(EventsError::validation(
            "Total size of the entries in the request is over the limit.",
        ));
    }
    let validated: Vec<_> = entries.iter().map(validate_entry).collect();
    let complete = |e: &Value| {
        ["Source", "DetailType", "Detail"]
            .iter()
            .all(|k| e.get(*k).and_then(Value::as_str).is_some())
    };
    if !entries.iter().any(complete) {
        return Err(EventsError::validation(
            "Parameters Source, DetailType and Detail are required in at least one entry.",
        ));
    }
    let now = events.now();
    let mut results = Vec::with_capacity(entries.len());
    let mut failed = 0;
    let mut batch = IngestBatch::default();
    {
        let state = events.state.lock().expect("state lock");
        for entry in validated {
            match entry {
                Err((code, message)) => {
                    failed += 1;
                    results.push(json!({"ErrorCode": code, "ErrorMessage": message}));
                }
                Ok(entry) => {
                    let id = uuid::Uuid::new_v4().to_string();
                    if state.buses.contains_key(&entry.bus) {
                        let record = envelope(
                            &id,
                            &entry.detail_type,
                            &entry.source,
                            &events.arns.account_id,
                            entry.time_ms.unwrap_or(now),
                            &events.arns.region,
                            &entry.resources,
                            &entry.detail,
                            None,
                        );
                        route(&state, &entry.bus, &record, None, now, 0, &mut batch);
                        batch.log.push((entry.bus.clone(), now, record.text));
                    }
                    results.push(json!({"EventId": id}));
                }
            }
        }
    }
    events.commit_blocking(batch)?;
    Ok(json!({"FailedEntryCount": failed, "Entries": results}))
}

// ---------------------------------------------------------------- buses

fn render_bus(bus: &Bus, full: bool) -> Value {
    let mut m = Map::new();
    m.insert("Name".into(), json!(bus.name));
    m.insert("Arn".into(), json!(bus.arn));
    m.insert("Description".into(), json!(bus.description));
    if full {
        m.insert("KmsKeyIdentifier".into(), json!(bus.kms_key_identifier));
        m.insert(
            "DeadLetterConfig".into(),
            bus.dead_letter_config.clone().unwrap_or(Value::Null),
        );
        m.insert(
            "LogConfig".into(),
            bus.log_config.clone().unwrap_or(Value::Null),
        );
    }
    m.insert("Policy".into(), json!(bus.policy));
    m.insert("CreationTime".into(), json!(bus.creation_time));
    m.insert("LastModifiedTime".into(), json!(bus.last_modified_time));
    compact(m)
}

fn create_event_bus(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let source = opt(input, "EventSourceName");
    if name.contains('/') && source.is_none() {
        return Err(EventsError::validation(format!(
            "Event bus name must not contain '/': {name}"
        )));
    }
    bus_name_from(name)?;
    if name.starts_with("arn:") {
        return Err(EventsError::validation("Parameter Name is not valid."));
    }
    max_len("description", opt(input, "Description"), 512)?;
    let tags = parse_tags(input.get("Tags"))?;
    let mut state = events.state.lock().expect("state lock");
    if state.buses.contains_key(name) {
        return Err(EventsError::exists(format!(
            "Event bus {name} already exists."
        )));
    }
    if let Some(source) = source {
        return Err(EventsError::not_found(format!(
            "Event source {source} does not exist."
        )));
    }
    if state.buses.len() >= events.config.max_buses {
        return Err(EventsError::limit(format!(
            "The requested resource exceeds the maximum number allowed: {} event buses.",
            events.config.max_buses
        )));
    }
    let now = epoch(events.now());
    let bus = Bus {
        name: name.to_string(),
        arn: events.bus_arn(name),
        description: opt(input, "Description").map(String::from),
        kms_key_identifier: opt(input, "KmsKeyIdentifier").map(String::from),
        dead_letter_config: input.get("DeadLetterConfig").cloned(),
        log_config: input.get("LogConfig").cloned(),
        policy: None,
        creation_time: now,
        last_modified_time: now,
        tags,
    };
    events.save_bus(&bus)?;
    let mut out = Map::new();
    out.insert("EventBusArn".into(), json!(bus.arn));
    out.insert("Description".into(), json!(bus.description));
    out.insert("KmsKeyIdentifier".into(), json!(bus.kms_key_identifier));
    out.insert(
        "DeadLetterConfig".into(),
        bus.dead_letter_config.clone().unwrap_or(Value::Null),
    );
    out.insert(
        "LogConfig".into(),
        bus.log_config.clone().unwrap_or(Value::Null),
    );
    state.buses.insert(name.to_string(), BusState::new(bus));
    Ok(compact(out))
}

fn describe_event_bus(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = bus_param(input, "Name")?;
    let state = events.state.lock().expect("state lock");
    let bus = state.buses.get(&name).ok_or_else(|| bus_not_found(&name))?;
    Ok(render_bus(&bus.bus, true))
}

fn list_event_buses(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let prefix = opt(input, "NamePrefix").unwrap_or("");
    let items: Vec<Value> = {
        let state = events.state.lock().expect("state lock");
        state
            .buses
            .values()
            .filter(|b| b.bus.name.starts_with(prefix))
            .map(|b| render_bus(&b.bus, false))
            .collect()
    };
    list_response("EventBuses", items, input)
}

fn update_event_bus(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = bus_param(input, "Name")?;
    max_len("description", opt(input, "Description"), 512)?;
    let mut state = events.state.lock().expect("state lock");
    let bus = state
        .buses
        .get_mut(&name)
        .ok_or_else(|| bus_not_found(&name))?;
    let mut updated = bus.bus.clone();
    updated.description = opt(input, "Description").map(String::from);
    updated.kms_key_identifier = opt(input, "KmsKeyIdentifier").map(String::from);
    updated.dead_letter_config = input.get("DeadLetterConfig").cloned();
    updated.log_config = input.get("LogConfig").cloned();
    updated.last_modified_time = epoch(events.now());
    events.save_bus(&updated)?;
    bus.bus = updated;
    let mut out = Map::new();
    out.insert("Arn".into(), json!(bus.bus.arn));
    out.insert("Name".into(), json!(bus.bus.name));
    out.insert("Description".into(), json!(bus.bus.description));
    out.insert("KmsKeyIdentifier".into(), json!(bus.bus.kms_key_identifier));
    out.insert(
        "DeadLetterConfig".into(),
        bus.bus.dead_letter_config.clone().unwrap_or(Value::Null),
    );
    out.insert(
        "LogConfig".into(),
        bus.bus.log_config.clone().unwrap_or(Value::Null),
    );
    Ok(compact(out))
}

fn delete_event_bus(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = bus_param(input, "Name")?;
    if name == "default" {
        return Err(EventsError::validation("Cannot delete event bus default."));
    }
    let mut state = events.state.lock().expect("state lock");
    let Some(bus) = state.buses.get(&name) else {
        return Ok(json!({}));
    };
    if !bus.rules.is_empty() {
        return Err(EventsError::validation(format!(
            "Cannot delete event bus {name}: it still has rules; delete them first."
        )));
    }
    events
        .store
        .delete_resource("bus", &name)
        .map_err(internal)?;
    state.buses.remove(&name);
    Ok(json!({}))
}

// ---------------------------------------------------------------- bus policies

/// The longest resource policy a bus may have.
const MAX_POLICY_CHARS: usize = 10_240;

fn policy_statements(policy: Option<&str>) -> Vec<Value> {
    policy
        .and_then(|p| serde_json::from_str::<Value>(p).ok())
        .and_then(|p| p.get("Statement").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

fn render_policy(statements: Vec<Value>) -> Option<String> {
    (!statements.is_empty())
        .then(|| json!({"Version": "2012-10-17", "Statement": statements}).to_string())
}

/// Replaces the bus's policy, refusing one over the length limit.
fn store_policy(events: &Events, bus: &mut Bus, policy: Option<String>) -> EventsResult<()> {
    if policy
        .as_ref()
        .is_some_and(|p| p.chars().count() > MAX_POLICY_CHARS)
    {
        return Err(EventsError::new(
            "PolicyLengthExceededException",
            format!("The event bus policy is longer than {MAX_POLICY_CHARS} characters."),
        ));
    }
    let mut updated = bus.clone();
    updated.policy = policy;
    updated.last_modified_time = epoch(events.now());
    events.save_bus(&updated)?;
    *bus = updated;
    Ok(())
}

/// PutPermission: either a whole `Policy` document, or one `events:PutEvents` statement built
/// from `Principal` (an account id, or `*` with a `Condition`) under `StatementId`, replacing a
/// statement with the same id. The policy is stored and shown by DescribeEventBus; with one
/// account per Mooring instance there is no other account whose calls it could admit.
fn put_permission(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let bus_name = bus_param(input, "EventBusName")?;
    let new_policy = match opt(input, "Policy") {
        Some(policy) => {
            let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(policy) else {
                return Err(EventsError::validation("This policy contains invalid Json"));
            };
            if !doc.get("Statement").is_some_and(Value::is_array) {
                return Err(EventsError::validation(
                    "The policy must contain a Statement list.",
                ));
            }
            Some(policy.to_string())
        }
        None => None,
    };
    let statement = match new_policy {
        Some(_) => None,
        None => Some(permission_statement(input)?),
    };
    let mut state = events.state.lock().expect("state lock");
    let bus = state
        .buses
        .get_mut(&bus_name)
        .ok_or_else(|| bus_not_found(&bus_name))?;
    let policy = match (new_policy, statement) {
        (Some(policy), _) => Some(policy),
        (None, Some((sid, mut statement))) => {
            statement["Resource"] = json!(bus.bus.arn);
            let mut statements = policy_statements(bus.bus.policy.as_deref());
            statements.retain(|s| s["Sid"] != json!(sid));
            statements.push(statement);
            render_policy(statements)
        }
        (None, None) => unreachable!("one of the two is built above"),
    };
    store_policy(events, &mut bus.bus, policy)?;
    Ok(json!({}))
}

/// The statement PutPermission adds, without its `Resource`, and its id.
fn permission_statement(input: &Value) -> EventsResult<(String, Value)> {
    let principal = opt(input, "Principal")
        .ok_or_else(|| EventsError::validation("Parameter Principal must be specified."))?;
    let action = opt(input, "Action").unwrap_or_default();
    if action != "events:PutEvents" {
        return Err(EventsError::validation(
            "Provided value in parameter 'action' is not supported.",
        ));
    }
    let sid = req(input, "StatementId")?;
    if sid.is_empty()
        || sid.len() > 64
        || !sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(EventsError::validation(
            "StatementId must match ^[a-zA-Z0-9-_]{1,64}$",
        ));
    }
    let account = principal.len() == 12 && principal.bytes().all(|b| b.is_ascii_digit());
    if principal != "*" && !account {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value '{principal}' at 'principal' failed to satisfy constraint: Member must satisfy regular expression pattern: (\\d{{12}}|\\*)"
        )));
    }
    let condition = match input.get("Condition") {
        None | Some(Value::Null) => None,
        Some(c) => {
            let (Some(kind), Some(key), Some(value)) = (
                c.get("Type").and_then(Value::as_str),
                c.get("Key").and_then(Value::as_str),
                c.get("Value").and_then(Value::as_str),
            ) else {
                return Err(EventsError::validation(
                    "Parameter Condition must have Type, Key and Value.",
                ));
            };
            if principal != "*" {
                return Err(EventsError::validation(
                    "Value of the parameter 'principal' must be '*' when the parameter 'condition' is set.",
                ));
            }
            Some(json!({kind: {key: value}}))
        }
    };
    let principal = if account {
        json!({"AWS": format!("arn:aws:iam::{principal}:root")})
    } else {
        json!("*")
    };
    let mut statement = json!({
        "Sid": sid, "Effect": "Allow", "Principal": principal, "Action": action,
    });
    if let Some(condition) = condition {
        statement["Condition"] = condition;
    }
    Ok((sid.to_string(), statement))
}

/// RemovePermission: one statement by `StatementId`, or the whole policy with
/// `RemoveAllPermissions`.
fn remove_permission(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let bus_name = bus_param(input, "EventBusName")?;
    let all = input
        .get("RemoveAllPermissions")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let sid = opt(input, "StatementId");
    if !all && sid.is_none() {
        return Err(EventsError::validation(
            "Parameter StatementId or RemoveAllPermissions must be specified.",
        ));
    }
    let mut state = events.state.lock().expect("state lock");
    let bus = state
        .buses
        .get_mut(&bus_name)
        .ok_or_else(|| bus_not_found(&bus_name))?;
    if all {
        return store_policy(events, &mut bus.bus, None).map(|_| json!({}));
    }
    let Some(policy) = bus.bus.policy.as_deref() else {
        return Err(EventsError::not_found("EventBus does not have a policy."));
    };
    let mut statements = policy_statements(Some(policy));
    let before = statements.len();
    statements.retain(|s| s["Sid"].as_str() != sid);
    if statements.len() == before {
        return Err(EventsError::not_found(
            "Statement with the provided id does not exist.",
        ));
    }
    store_policy(events, &mut bus.bus, render_policy(statements))?;
    Ok(json!({}))
}

// ---------------------------------------------------------------- rules

fn render_rule(rule: &Rule, describe: bool) -> Value {
    let mut m = Map::new();
    m.insert("Name".into(), json!(rule.name));
    m.insert("Arn".into(), json!(rule.arn));
    m.insert("EventPattern".into(), json!(rule.event_pattern));
    m.insert("ScheduleExpression".into(), json!(rule.schedule_expression));
    m.insert("State".into(), json!(rule.state));
    m.insert("Description".into(), json!(rule.description));
    m.insert("RoleArn".into(), json!(rule.role_arn));
    m.insert("EventBusName".into(), json!(rule.bus));
    if describe {
        m.insert("CreatedBy".into(), json!(rule.created_by));
    }
    compact(m)
}

fn put_rule(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    check_name("name", name, 64)?;
    let bus_name = bus_param(input, "EventBusName")?;
    let pattern_text = opt(input, "EventPattern");
    let schedule_text = opt(input, "ScheduleExpression");
    if pattern_text.is_none() && schedule_text.is_none() {
        return Err(EventsError::validation(
            "Parameter(s) EventPattern or ScheduleExpression must be specified.",
        ));
    }
    max_len("description", opt(input, "Description"), 512)?;
    let rule_state = opt(input, "State").unwrap_or("ENABLED");
    if !matches!(
        rule_state,
        "ENABLED" | "DISABLED" | "ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS"
    ) {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value '{rule_state}' at 'state' failed to satisfy constraint: Member must satisfy enum value set: [ENABLED, DISABLED, ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS]"
        )));
    }
    let compiled = pattern_text.map(compile_pattern).transpose()?;
    if let Some(expr) = schedule_text {
        schedule::parse(expr).map_err(EventsError::validation)?;
        if bus_name != "default" {
            return Err(EventsError::validation(
                "ScheduleExpression is supported only on the default event bus.",
            ));
        }
    }
    let tags = parse_tags(input.get("Tags"))?;
    let mut state = events.state.lock().expect("state lock");
    let bus = state
        .buses
        .get_mut(&bus_name)
        .ok_or_else(|| bus_not_found(&bus_name))?;
    let existing = bus.rules.get(name).cloned();
    if existing.is_none() && bus.rules.len() >= events.config.max_rules_per_bus {
        return Err(EventsError::limit(format!(
            "The requested resource exceeds the maximum number allowed: {} rules on event bus {bus_name}.",
            events.config.max_rules_per_bus
        )));
    }
    let arn = if bus_name == "default" {
        events.arns.arn("events", &format!("rule/{name}"))
    } else {
        events
            .arns
            .arn("events", &format!("rule/{bus_name}/{name}"))
    };
    let rule = Rule {
        name: name.to_string(),
        bus: bus_name.clone(),
        arn: arn.clone(),
        event_pattern: pattern_text.map(String::from),
        schedule_expression: schedule_text.map(String::from),
        state: rule_state.to_string(),
        description: opt(input, "Description").map(String::from),
        role_arn: opt(input, "RoleArn").map(String::from),
        created_by: events.arns.account_id.clone(),
        created_ms: existing.as_ref().map_or(events.now(), |r| r.created_ms),
        tags: existing.as_ref().map_or(tags, |r| r.tags.clone()),
        targets: existing.map(|r| r.targets).unwrap_or_default(),
    };
    events.save_rule(&rule)?;
    match compiled {
        Some(p) => bus.patterns.insert(name.to_string(), p),
        None => bus.patterns.remove(name),
    };
    bus.rules.insert(name.to_string(), rule);
    bus.recompile();
    Ok(json!({"RuleArn": arn}))
}

fn describe_rule(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let bus_name = bus_param(input, "EventBusName")?;
    let state = events.state.lock().expect("state lock");
    let bus = state
        .buses
        .get(&bus_name)
        .ok_or_else(|| bus_not_found(&bus_name))?;
    let rule = bus
        .rules
        .get(name)
        .ok_or_else(|| rule_not_found(name, &bus_name))?;
    Ok(render_rule(rule, true))
}

fn list_rules(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let bus_name = bus_param(input, "EventBusName")?;
    let prefix = opt(input, "NamePrefix").unwrap_or("");
    let items: Vec<Value> = {
        let state = events.state.lock().expect("state lock");
        let bus = state
            .buses
            .get(&bus_name)
            .ok_or_else(|| bus_not_found(&bus_name))?;
        bus.rules
            .values()
            .filter(|r| r.name.starts_with(prefix))
            .map(|r| render_rule(r, false))
            .collect()
    };
    list_response("Rules", items, input)
}

fn delete_rule(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let bus_name = bus_param(input, "EventBusName")?;
    let mut state = events.state.lock().expect("state lock");
    let bus = state
        .buses
        .get_mut(&bus_name)
        .ok_or_else(|| bus_not_found(&bus_name))?;
    let Some(rule) = bus.rules.get(name) else {
        return Ok(json!({}));
    };
    if !rule.targets.is_empty() {
        return Err(EventsError::validation(
            "Rule can't be deleted since it has targets.",
        ));
    }
    events
        .store
        .delete_resource("rule", &format!("{bus_name}|{name}"))
        .map_err(internal)?;
    bus.rules.remove(name);
    bus.patterns.remove(name);
    bus.recompile();
    Ok(json!({}))
}

fn set_rule_state(events: &Arc<Events>, input: &Value, new_state: &str) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let bus_name = bus_param(input, "EventBusName")?;
    let mut state = events.state.lock().expect("state lock");
    let bus = state
        .buses
        .get_mut(&bus_name)
        .ok_or_else(|| bus_not_found(&bus_name))?;
    let rule = bus
        .rules
        .get_mut(name)
        .ok_or_else(|| rule_not_found(name, &bus_name))?;
    let mut updated = rule.clone();
    updated.state = new_state.to_string();
    events.save_rule(&updated)?;
    *rule = updated;
    bus.recompile();
    Ok(json!({}))
}

// ---------------------------------------------------------------- targets

fn validate_target(target: &Value) -> Result<(), String> {
    let id = target.get("Id").and_then(Value::as_str).unwrap_or_default();
    if check_name("id", id, 64).is_err() {
        return Err(format!("Target Id {id:?} is not valid."));
    }
    let arn = target
        .get("Arn")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if arn.is_empty() || arn.len() > 1600 {
        return Err("Parameter Arn is not valid.".into());
    }
    if TargetKind::parse(arn).is_none() {
        return Err(format!(
            "Target Arn {arn} is not a supported target: use an event bus, API destination, http:// endpoint, IoT topic, Greengrass stream or CloudWatch Logs log group ARN."
        ));
    }
    let shaping = ["Input", "InputPath", "InputTransformer"]
        .iter()
        .filter(|k| target.get(**k).is_some_and(|v| !v.is_null()))
        .count();
    if shaping > 1 {
        return Err("Only one of Input, InputPath, or InputTransformer must be provided.".into());
    }
    if let Some(input) = target.get("Input").and_then(Value::as_str) {
        if input.len() > 8192 || serde_json::from_str::<Value>(input).is_err() {
            return Err("Input is not valid JSON text.".into());
        }
    }
    if let Some(path) = target.get("InputPath").and_then(Value::as_str) {
        if path.len() > 256 || !path.starts_with('$') {
            return Err("InputPath is not a valid JSONPath.".into());
        }
    }
    if let Some(t) = target.get("InputTransformer") {
        let template = t
            .get("InputTemplate")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if template.is_empty() || template.len() > 8192 {
            return Err("InputTemplate must have length between 1 and 8192.".into());
        }
        if let Some(map) = t.get("InputPathsMap").and_then(Value::as_object) {
            if map.len() > 100 {
                return Err("InputPathsMap has more than 100 entries.".into());
            }
            for (k, v) in map {
                let key_ok = !k.is_empty()
                    && k.len() <= 256
                    && !k.starts_with("aws.")
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !key_ok || !v.as_str().is_some_and(|p| p.starts_with('$')) {
                    return Err(format!("InputPathsMap entry {k:?} is not valid."));
                }
            }
        }
    }
    if let Some(policy) = target.get("RetryPolicy") {
        if let Some(n) = policy.get("MaximumRetryAttempts") {
            if n.as_u64().is_none_or(|n| n > 185) {
                return Err("MaximumRetryAttempts must be between 0 and 185.".into());
            }
        }
        if let Some(n) = policy.get("MaximumEventAgeInSeconds") {
            if !n.as_u64().is_some_and(|n| (60..=86_400).contains(&n)) {
                return Err("MaximumEventAgeInSeconds must be between 60 and 86400.".into());
            }
        }
    }
    if let Some(dlq) = target
        .get("DeadLetterConfig")
        .and_then(|d| d.get("Arn"))
        .and_then(Value::as_str)
    {
        if TargetKind::parse(dlq).is_none() {
            return Err(format!(
                "DeadLetterConfig Arn {dlq} is not a supported destination."
            ));
        }
    }
    Ok(())
}

fn put_targets(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let rule_name = req(input, "Rule")?;
    let bus_name = bus_param(input, "EventBusName")?;
    let targets = input.get("Targets").and_then(Value::as_array).ok_or_else(|| {
        EventsError::validation("1 validation error detected: Value null at 'targets' failed to satisfy constraint: Member must not be null")
    })?;
    if targets.is_empty() || targets.len() > 10 {
        return Err(EventsError::validation(
            "1 validation error detected: Value at 'targets' failed to satisfy constraint: Member must have length between 1 and 10",
        ));
    }
    let mut state = events.state.lock().expect("state lock");
    let rule = rule_in_mut(&mut state, &bus_name, rule_name)?;
    let mut merged: BTreeMap<String, Value> = rule
        .targets
        .iter()
        .map(|t| (t["Id"].as_str().unwrap_or_default().to_string(), t.clone()))
        .collect();
    let mut failed = Vec::new();
    for target in targets {
        match validate_target(target) {
            Ok(()) => {
                let id = target["Id"].as_str().unwrap_or_default().to_string();
                merged.insert(id, target.clone());
            }
            Err(message) => failed.push(json!({
                "TargetId": target.get("Id").cloned().unwrap_or(Value::Null),
                "ErrorCode": "ValidationException",
                "ErrorMessage": message,
            })),
        }
    }
    if merged.len() > events.config.max_targets_per_rule {
        return Err(EventsError::limit(format!(
            "The requested resource exceeds the maximum number allowed: {} targets per rule.",
            events.config.max_targets_per_rule
        )));
    }
    let mut updated = rule.clone();
    updated.targets = merged.into_values().collect();
    events.save_rule(&updated)?;
    *rule = updated;
    Ok(json!({"FailedEntryCount": failed.len(), "FailedEntries": failed}))
}

fn remove_targets(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let rule_name = req(input, "Rule")?;
    let bus_name = bus_param(input, "EventBusName")?;
    let ids: Vec<&str> = input
        .get("Ids")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if ids.is_empty() || ids.len() > 100 {
        return Err(EventsError::validation(
            "1 validation error detected: Value at 'ids' failed to satisfy constraint: Member must have length between 1 and 100",
        ));
    }
    let mut state = events.state.lock().expect("state lock");
    let rule = rule_in_mut(&mut state, &bus_name, rule_name)?;
    let mut updated = rule.clone();
    updated
        .targets
        .retain(|t| !ids.contains(&t["Id"].as_str().unwrap_or_default()));
    events.save_rule(&updated)?;
    *rule = updated;
    Ok(json!({"FailedEntryCount": 0, "FailedEntries": []}))
}

fn list_targets_by_rule(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let rule_name = req(input, "Rule")?;
    let bus_name = bus_param(input, "EventBusName")?;
    let items = {
        let state = events.state.lock().expect("state lock");
        let rule = rule_in(&state, &bus_name, rule_name)?;
        rule.targets.clone()
    };
    list_response("Targets", items, input)
}

fn list_rule_names_by_target(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let arn = req(input, "TargetArn")?;
    let bus_name = bus_param(input, "EventBusName")?;
    let items: Vec<Value> = {
        let state = events.state.lock().expect("state lock");
        let bus = state
            .buses
            .get(&bus_name)
            .ok_or_else(|| bus_not_found(&bus_name))?;
        bus.rules
            .values()
            .filter(|r| r.targets.iter().any(|t| t["Arn"].as_str() == Some(arn)))
            .map(|r| json!(r.name))
            .collect()
    };
    list_response("RuleNames", items, input)
}

fn test_event_pattern(input: &Value) -> EventsResult<Value> {
    let pattern = compile_pattern(req(input, "EventPattern")?)?;
    let event_text = req(input, "Event")?;
    let event: Value = serde_json::from_str(event_text)
        .map_err(|_| EventsError::validation("Parameter Event is not valid."))?;
    let complete = event.as_object().is_some_and(|o| {
        ["id", "account", "source", "time", "region", "detail-type"]
            .iter()
            .all(|k| o.contains_key(*k))
    });
    if !complete {
        return Err(EventsError::validation("Parameter Event is not valid."));
    }
    Ok(json!({"Result": pattern.matches(&event)}))
}

// ---------------------------------------------------------------- archives

fn render_archive(events: &Events, archive: &Archive, full: bool) -> EventsResult<Value> {
    let (count, size) = events
        .store
        .archive_stats(&archive.name)
        .map_err(internal)?;
    let mut m = Map::new();
    if full {
        m.insert("ArchiveArn".into(), json!(archive.arn));
    }
    m.insert("ArchiveName".into(), json!(archive.name));
    m.insert("EventSourceArn".into(), json!(archive.event_source_arn));
    if full {
        m.insert("Description".into(), json!(archive.description));
        m.insert("EventPattern".into(), json!(archive.event_pattern));
        m.insert("KmsKeyIdentifier".into(), json!(archive.kms_key_identifier));
    }
    m.insert("State".into(), json!(archive.state));
    m.insert("RetentionDays".into(), json!(archive.retention_days));
    m.insert("SizeBytes".into(), json!(size));
    m.insert("EventCount".into(), json!(count));
    m.insert("CreationTime".into(), json!(archive.creation_time));
    Ok(compact(m))
}

fn archive_not_found(name: &str) -> EventsError {
    EventsError::not_found(format!("Archive {name} does not exist."))
}

fn create_archive(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "ArchiveName")?;
    check_name("archiveName", name, 48)?;
    let source = req(input, "EventSourceArn")?;
    let bus_name = bus_name_from(source)?;
    max_len("description", opt(input, "Description"), 512)?;
    let pattern = opt(input, "EventPattern")
        .map(compile_pattern)
        .transpose()?;
    let retention = input
        .get("RetentionDays")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if retention < 0 {
        return Err(EventsError::validation(
            "RetentionDays must be 0 or greater.",
        ));
    }
    let mut state = events.state.lock().expect("state lock");
    if state.archives.contains_key(name) {
        return Err(EventsError::exists(format!(
            "Archive {name} already exists."
        )));
    }
    if !state.buses.contains_key(&bus_name) {
        return Err(bus_not_found(&bus_name));
    }
    let archive = Archive {
        name: name.to_string(),
        arn: events.arns.arn("events", &format!("archive/{name}")),
        event_source_arn: events.bus_arn(&bus_name),
        bus: bus_name,
        description: opt(input, "Description").map(String::from),
        event_pattern: opt(input, "EventPattern").map(String::from),
        retention_days: retention,
        state: "ENABLED".into(),
        creation_time: epoch(events.now()),
        kms_key_identifier: opt(input, "KmsKeyIdentifier").map(String::from),
    };
    events.save("archive", name, &archive)?;
    let out = json!({"ArchiveArn": archive.arn, "State": archive.state, "CreationTime": archive.creation_time});
    state.archives.insert(name.to_string(), (archive, pattern));
    Ok(out)
}

fn describe_archive(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "ArchiveName")?;
    let archive = {
        let state = events.state.lock().expect("state lock");
        state
            .archives
            .get(name)
            .map(|a| a.0.clone())
            .ok_or_else(|| archive_not_found(name))?
    };
    render_archive(events, &archive, true)
}

fn list_archives(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let prefix = opt(input, "NamePrefix").unwrap_or("");
    let source = opt(input, "EventSourceArn");
    let wanted_state = opt(input, "State");
    let archives: Vec<Archive> = {
        let state = events.state.lock().expect("state lock");
        state
            .archives
            .values()
            .map(|a| a.0.clone())
            .filter(|a| a.name.starts_with(prefix))
            .filter(|a| source.is_none_or(|s| s == a.event_source_arn))
            .filter(|a| wanted_state.is_none_or(|s| s == a.state))
            .collect()
    };
    let items = archives
        .iter()
        .map(|a| render_archive(events, a, false))
        .collect::<EventsResult<Vec<_>>>()?;
    list_response("Archives", items, input)
}

fn update_archive(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "ArchiveName")?;
    max_len("description", opt(input, "Description"), 512)?;
    let pattern = opt(input, "EventPattern")
        .map(compile_pattern)
        .transpose()?;
    let mut state = events.state.lock().expect("state lock");
    let entry = state
        .archives
        .get_mut(name)
        .ok_or_else(|| archive_not_found(name))?;
    let mut updated = entry.0.clone();
    if let Some(d) = opt(input, "Description") {
        updated.description = Some(d.to_string());
    }
    if let Some(p) = opt(input, "EventPattern") {
        updated.event_pattern = Some(p.to_string());
    }
    if let Some(r) = input.get("RetentionDays").and_then(Value::as_i64) {
        if r < 0 {
            return Err(EventsError::validation(
                "RetentionDays must be 0 or greater.",
            ));
        }
        updated.retention_days = r;
    }
    events.save("archive", name, &updated)?;
    entry.0 = updated;
    if pattern.is_some() {
        entry.1 = pattern;
    }
    Ok(
        json!({"ArchiveArn": entry.0.arn, "State": entry.0.state, "CreationTime": entry.0.creation_time}),
    )
}

fn delete_archive(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "ArchiveName")?;
    let mut state = events.state.lock().expect("state lock");
    if !state.archives.contains_key(name) {
        return Err(archive_not_found(name));
    }
    events
        .store
        .delete_resource("archive", name)
        .map_err(internal)?;
    events.store.purge_archive(name, None).map_err(internal)?;
    state.archives.remove(name);
    Ok(json!({}))
}

// ---------------------------------------------------------------- replays

fn render_replay(replay: &Replay, full: bool) -> Value {
    let mut m = Map::new();
    m.insert("ReplayName".into(), json!(replay.name));
    if full {
        m.insert("ReplayArn".into(), json!(replay.arn));
        m.insert("Description".into(), json!(replay.description));
        m.insert("Destination".into(), replay.destination.clone());
    }
    m.insert("EventSourceArn".into(), json!(replay.event_source_arn));
    m.insert("State".into(), json!(replay.state));
    m.insert("StateReason".into(), json!(replay.state_reason));
    m.insert("EventStartTime".into(), json!(replay.event_start_time));
    m.insert("EventEndTime".into(), json!(replay.event_end_time));
    m.insert(
        "EventLastReplayedTime".into(),
        json!(replay.event_last_replayed_time),
    );
    m.insert("ReplayStartTime".into(), json!(replay.replay_start_time));
    m.insert("ReplayEndTime".into(), json!(replay.replay_end_time));
    compact(m)
}

fn replay_not_found(name: &str) -> EventsError {
    EventsError::not_found(format!("Replay {name} does not exist."))
}

fn start_replay(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "ReplayName")?;
    check_name("replayName", name, 64)?;
    let source = req(input, "EventSourceArn")?;
    let start = time_param(input, "EventStartTime")?;
    let end = time_param(input, "EventEndTime")?;
    let destination = input
        .get("Destination")
        .filter(|d| d.get("Arn").and_then(Value::as_str).is_some())
        .cloned()
        .ok_or_else(|| EventsError::validation("Parameter Destination.Arn is required."))?;
    max_len("description", opt(input, "Description"), 512)?;
    if start >= end {
        return Err(EventsError::validation(
            "EventStartTime must be before EventEndTime.",
        ));
    }
    let mut state = events.state.lock().expect("state lock");
    if state.replays.contains_key(name) {
        return Err(EventsError::exists(format!(
            "Replay {name} already exists."
        )));
    }
    let archive_name = source
        .rsplit_once(":archive/")
        .map(|(_, n)| n)
        .unwrap_or("");
    let archive = state
        .archives
        .get(archive_name)
        .map(|a| a.0.clone())
        .ok_or_else(|| {
            archive_not_found(if archive_name.is_empty() {
                source
            } else {
                archive_name
            })
        })?;
    if destination["Arn"].as_str() != Some(archive.event_source_arn.as_str()) {
        return Err(EventsError::validation(
            "Parameter Destination.Arn is not valid: it must be the archive's event source bus.",
        ));
    }
    if state.replays.values().filter(|r| r.active()).count() >= events.config.max_active_replays {
        return Err(EventsError::limit(format!(
            "The requested resource exceeds the maximum number allowed: {} active replays.",
            events.config.max_active_replays
        )));
    }
    let replay = Replay {
        name: name.to_string(),
        arn: events.arns.arn("events", &format!("replay/{name}")),
        description: opt(input, "Description").map(String::from),
        event_source_arn: archive.arn.clone(),
        archive: archive.name.clone(),
        destination,
        event_start_time: start,
        event_end_time: end,
        state: "STARTING".into(),
        state_reason: None,
        event_last_replayed_time: None,
        replay_start_time: epoch(events.now()),
        replay_end_time: None,
        last_seq: 0,
    };
    events.save("replay", name, &replay)?;
    let out = json!({"ReplayArn": replay.arn, "State": replay.state, "ReplayStartTime": replay.replay_start_time});
    state.replays.insert(name.to_string(), replay);
    drop(state);
    events.spawn_replay(name.to_string());
    Ok(out)
}

fn describe_replay(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "ReplayName")?;
    let state = events.state.lock().expect("state lock");
    let replay = state
        .replays
        .get(name)
        .ok_or_else(|| replay_not_found(name))?;
    Ok(render_replay(replay, true))
}

fn list_replays(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let prefix = opt(input, "NamePrefix").unwrap_or("");
    let source = opt(input, "EventSourceArn");
    let wanted_state = opt(input, "State");
    let items: Vec<Value> = {
        let state = events.state.lock().expect("state lock");
        state
            .replays
            .values()
            .filter(|r| r.name.starts_with(prefix))
            .filter(|r| source.is_none_or(|s| s == r.event_source_arn))
            .filter(|r| wanted_state.is_none_or(|s| s == r.state))
            .map(|r| render_replay(r, false))
            .collect()
    };
    list_response("Replays", items, input)
}

fn cancel_replay(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "ReplayName")?;
    let mut state = events.state.lock().expect("state lock");
    let replay = state
        .replays
        .get_mut(name)
        .ok_or_else(|| replay_not_found(name))?;
    if !matches!(replay.state.as_str(), "STARTING" | "RUNNING") {
        return Err(EventsError::new(
            "IllegalStatusException",
            format!("Replay {name} is {} and cannot be cancelled.", replay.state),
        ));
    }
    let mut updated = replay.clone();
    updated.state = "CANCELLING".into();
    events.save("replay", name, &updated)?;
    *replay = updated;
    Ok(json!({"ReplayArn": replay.arn, "State": replay.state}))
}

// ---------------------------------------------------------------- connections

/// The connection's auth parameters without secrets, as Describe returns them.
fn public_auth_parameters(auth: &Value) -> Value {
    let mut out = auth.clone();
    if let Some(basic) = out
        .get_mut("BasicAuthParameters")
        .and_then(Value::as_object_mut)
    {
        basic.remove("Password");
    }
    if let Some(key) = out
        .get_mut("ApiKeyAuthParameters")
        .and_then(Value::as_object_mut)
    {
        key.remove("ApiKeyValue");
    }
    if let Some(client) = out
        .get_mut("OAuthParameters")
        .and_then(|o| o.get_mut("ClientParameters"))
        .and_then(Value::as_object_mut)
    {
        client.remove("ClientSecret");
    }
    strip_secret_parameters(&mut out);
    out
}

fn strip_secret_parameters(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.get("IsValueSecret") == Some(&Value::Bool(true)) {
                map.remove("Value");
            }
            for child in map.values_mut() {
                strip_secret_parameters(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_secret_parameters),
        _ => {}
    }
}

fn connection_not_found(name: &str) -> EventsError {
    EventsError::not_found(format!(
        "Failed to describe the connection(s). Connection '{name}' does not exist."
    ))
}

fn check_auth(kind: &str, auth: &Value) -> EventsResult<()> {
    let block = match kind {
        "BASIC" => "BasicAuthParameters",
        "API_KEY" => "ApiKeyAuthParameters",
        "OAUTH_CLIENT_CREDENTIALS" => "OAuthParameters",
        other => {
            return Err(EventsError::validation(format!(
                "1 validation error detected: Value '{other}' at 'authorizationType' failed to satisfy constraint: Member must satisfy enum value set: [BASIC, OAUTH_CLIENT_CREDENTIALS, API_KEY]"
            )))
        }
    };
    let Some(params) = auth.get(block).and_then(Value::as_object) else {
        return Err(EventsError::validation(format!(
            "The request failed because the AuthParameters did not contain {block}, which is required for AuthorizationType {kind}."
        )));
    };
    let required: &[&str] = match kind {
        "BASIC" => &["Username", "Password"],
        "API_KEY" => &["ApiKeyName", "ApiKeyValue"],
        _ => &["AuthorizationEndpoint", "HttpMethod", "ClientParameters"],
    };
    for key in required {
        if params.get(*key).is_none() {
            return Err(EventsError::validation(format!(
                "{block}.{key} is required."
            )));
        }
    }
    Ok(())
}

const OAUTH: &str = "OAUTH_CLIENT_CREDENTIALS";

/// Basic and API-key connections are authorized at once; an OAuth connection is
/// `AUTHORIZING` until its first token arrives (see `Events::spawn_authorization`).
fn initial_connection_state(kind: &str) -> &'static str {
    if kind == OAUTH {
        "AUTHORIZING"
    } else {
        "AUTHORIZED"
    }
}

fn create_connection(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    check_name("name", name, 64)?;
    let kind = req(input, "AuthorizationType")?;
    let auth = input
        .get("AuthParameters")
        .cloned()
        .ok_or_else(|| EventsError::validation("Parameter AuthParameters is required."))?;
    check_auth(kind, &auth)?;
    let mut state = events.state.lock().expect("state lock");
    if state.connections.contains_key(name) {
        return Err(EventsError::exists(format!(
            "Connection {name} already exists."
        )));
    }
    if state.connections.len() >= 3000 {
        return Err(EventsError::limit(
            "The requested resource exceeds the maximum number allowed: 3000 connections.",
        ));
    }
    let now = epoch(events.now());
    let connection = Connection {
        name: name.to_string(),
        arn: events.arns.arn(
            "events",
            &format!("connection/{name}/{}", uuid::Uuid::new_v4()),
        ),
        description: opt(input, "Description").map(String::from),
        authorization_type: kind.to_string(),
        auth_parameters: auth,
        state: initial_connection_state(kind).into(),
        state_reason: None,
        creation_time: now,
        last_modified_time: now,
        last_authorized_time: (kind != OAUTH).then_some(now),
    };
    events.save("connection", name, &connection)?;
    let out = json!({
        "ConnectionArn": connection.arn,
        "ConnectionState": connection.state,
        "CreationTime": now,
        "LastModifiedTime": now,
    });
    state.connections.insert(name.to_string(), connection);
    drop(state);
    if kind == OAUTH {
        events.spawn_authorization(name.to_string());
    }
    Ok(out)
}

fn describe_connection(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let state = events.state.lock().expect("state lock");
    let c = state
        .connections
        .get(name)
        .ok_or_else(|| connection_not_found(name))?;
    let mut m = Map::new();
    m.insert("ConnectionArn".into(), json!(c.arn));
    m.insert("Name".into(), json!(c.name));
    m.insert("Description".into(), json!(c.description));
    m.insert("ConnectionState".into(), json!(c.state));
    m.insert("StateReason".into(), json!(c.state_reason));
    m.insert("AuthorizationType".into(), json!(c.authorization_type));
    m.insert(
        "SecretArn".into(),
        json!(events.arns.arn(
            "secretsmanager",
            &format!("secret:events!connection/{}", c.name)
        )),
    );
    m.insert(
        "AuthParameters".into(),
        public_auth_parameters(&c.auth_parameters),
    );
    m.insert("CreationTime".into(), json!(c.creation_time));
    m.insert("LastModifiedTime".into(), json!(c.last_modified_time));
    m.insert("LastAuthorizedTime".into(), json!(c.last_authorized_time));
    Ok(compact(m))
}

fn render_connection_summary(c: &Connection) -> Value {
    let mut m = Map::new();
    m.insert("ConnectionArn".into(), json!(c.arn));
    m.insert("Name".into(), json!(c.name));
    m.insert("ConnectionState".into(), json!(c.state));
    m.insert("StateReason".into(), json!(c.state_reason));
    m.insert("AuthorizationType".into(), json!(c.authorization_type));
    m.insert("CreationTime".into(), json!(c.creation_time));
    m.insert("LastModifiedTime".into(), json!(c.last_modified_time));
    m.insert("LastAuthorizedTime".into(), json!(c.last_authorized_time));
    compact(m)
}

fn list_connections(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let prefix = opt(input, "NamePrefix").unwrap_or("");
    let wanted = opt(input, "ConnectionState");
    let items: Vec<Value> = {
        let state = events.state.lock().expect("state lock");
        state
            .connections
            .values()
            .filter(|c| c.name.starts_with(prefix) && wanted.is_none_or(|s| s == c.state))
            .map(render_connection_summary)
            .collect()
    };
    list_response("Connections", items, input)
}

fn update_connection(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let mut state = events.state.lock().expect("state lock");
    let c = state
        .connections
        .get_mut(name)
        .ok_or_else(|| connection_not_found(name))?;
    let mut updated = c.clone();
    if let Some(d) = opt(input, "Description") {
        updated.description = Some(d.to_string());
    }
    if let Some(kind) = opt(input, "AuthorizationType") {
        updated.authorization_type = kind.to_string();
    }
    if let Some(Value::Object(incoming)) = input.get("AuthParameters") {
        let base = updated
            .auth_parameters
            .as_object_mut()
            .expect("auth parameters are an object");
        for (k, v) in incoming {
            match (base.get_mut(k), v) {
                (Some(Value::Object(existing)), Value::Object(patch)) => {
                    for (pk, pv) in patch {
                        existing.insert(pk.clone(), pv.clone());
                    }
                }
                _ => {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
    }
    check_auth(&updated.authorization_type, &updated.auth_parameters)?;
    let now = epoch(events.now());
    let oauth = updated.authorization_type == OAUTH;
    updated.state = initial_connection_state(&updated.authorization_type).into();
    updated.state_reason = None;
    updated.last_modified_time = now;
    if !oauth {
        updated.last_authorized_time = Some(now);
    }
    events.save("connection", name, &updated)?;
    events.tokens_forget(&updated.arn);
    *c = updated;
    let out = compact(Map::from_iter([
        ("ConnectionArn".to_string(), json!(c.arn)),
        ("ConnectionState".to_string(), json!(c.state)),
        ("CreationTime".to_string(), json!(c.creation_time)),
        ("LastModifiedTime".to_string(), json!(now)),
        (
            "LastAuthorizedTime".to_string(),
            json!(c.last_authorized_time),
        ),
    ]));
    drop(state);
    if oauth {
        events.spawn_authorization(name.to_string());
    }
    Ok(out)
}

fn deauthorize_connection(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let mut state = events.state.lock().expect("state lock");
    let c = state
        .connections
        .get_mut(name)
        .ok_or_else(|| connection_not_found(name))?;
    let mut updated = c.clone();
    updated.auth_parameters = public_auth_parameters(&updated.auth_parameters);
    updated.state = "DEAUTHORIZED".into();
    updated.last_modified_time = epoch(events.now());
    events.save("connection", name, &updated)?;
    events.tokens_forget(&updated.arn);
    *c = updated;
    Ok(
        json!({"ConnectionArn": c.arn, "ConnectionState": "DEAUTHORIZING", "CreationTime": c.creation_time, "LastModifiedTime": c.last_modified_time, "LastAuthorizedTime": c.last_authorized_time}),
    )
}

fn delete_connection(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let mut state = events.state.lock().expect("state lock");
    let c = state
        .connections
        .get(name)
        .cloned()
        .ok_or_else(|| connection_not_found(name))?;
    events
        .store
        .delete_resource("connection", name)
        .map_err(internal)?;
    state.connections.remove(name);
    Ok(compact(Map::from_iter([
        ("ConnectionArn".to_string(), json!(c.arn)),
        ("ConnectionState".to_string(), json!("DELETING")),
        ("CreationTime".to_string(), json!(c.creation_time)),
        ("LastModifiedTime".to_string(), json!(c.last_modified_time)),
        (
            "LastAuthorizedTime".to_string(),
            json!(c.last_authorized_time),
        ),
    ])))
}

// ---------------------------------------------------------------- API destinations

const HTTP_METHODS: &[&str] = &["POST", "GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"];

fn destination_not_found(name: &str) -> EventsError {
    EventsError::not_found(format!(
        "Failed to describe the api-destination(s). An api-destination '{name}' does not exist."
    ))
}

fn check_endpoint(endpoint: &str) -> EventsResult<()> {
    let ok = endpoint.len() <= 2048
        && (endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        && endpoint
            .parse::<http::Uri>()
            .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
    if !ok {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value '{endpoint}' at 'invocationEndpoint' failed to satisfy constraint: Member must satisfy regular expression pattern: ^((%[0-9A-Fa-f]{{2}}|[-()_.!~*';/?:@\\x26=+$,A-Za-z0-9])+)([).!';/?:,])?$"
        )));
    }
    Ok(())
}

fn check_method(method: &str) -> EventsResult<()> {
    if !HTTP_METHODS.contains(&method) {
        return Err(EventsError::validation(format!(
            "1 validation error detected: Value '{method}' at 'httpMethod' failed to satisfy constraint: Member must satisfy enum value set: [POST, GET, HEAD, OPTIONS, PUT, PATCH, DELETE]"
        )));
    }
    Ok(())
}

fn create_api_destination(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    check_name("name", name, 64)?;
    let connection_arn = req(input, "ConnectionArn")?;
    let endpoint = req(input, "InvocationEndpoint")?;
    check_endpoint(endpoint)?;
    let method = req(input, "HttpMethod")?;
    check_method(method)?;
    let rate = input
        .get("InvocationRateLimitPerSecond")
        .and_then(Value::as_i64)
        .unwrap_or(300);
    if rate < 1 {
        return Err(EventsError::validation(
            "InvocationRateLimitPerSecond must be at least 1.",
        ));
    }
    let mut state = events.state.lock().expect("state lock");
    if state.api_destinations.contains_key(name) {
        return Err(EventsError::exists(format!(
            "An api-destination '{name}' already exists."
        )));
    }
    if !state.connections.values().any(|c| c.arn == connection_arn) {
        return Err(EventsError::not_found(format!(
            "Connection '{connection_arn}' does not exist."
        )));
    }
    let now = epoch(events.now());
    let destination = ApiDestination {
        name: name.to_string(),
        arn: events.arns.arn(
            "events",
            &format!("api-destination/{name}/{}", uuid::Uuid::new_v4()),
        ),
        description: opt(input, "Description").map(String::from),
        connection_arn: connection_arn.to_string(),
        invocation_endpoint: endpoint.to_string(),
        http_method: method.to_string(),
        invocation_rate_limit_per_second: rate,
        state: "ACTIVE".into(),
        creation_time: now,
        last_modified_time: now,
    };
    events.save("api-destination", name, &destination)?;
    let out = json!({
        "ApiDestinationArn": destination.arn,
        "ApiDestinationState": destination.state,
        "CreationTime": now,
        "LastModifiedTime": now,
    });
    state.api_destinations.insert(name.to_string(), destination);
    Ok(out)
}

fn render_destination(d: &ApiDestination) -> Value {
    let mut m = Map::new();
    m.insert("ApiDestinationArn".into(), json!(d.arn));
    m.insert("Name".into(), json!(d.name));
    m.insert("Description".into(), json!(d.description));
    m.insert("ApiDestinationState".into(), json!(d.state));
    m.insert("ConnectionArn".into(), json!(d.connection_arn));
    m.insert("InvocationEndpoint".into(), json!(d.invocation_endpoint));
    m.insert("HttpMethod".into(), json!(d.http_method));
    m.insert(
        "InvocationRateLimitPerSecond".into(),
        json!(d.invocation_rate_limit_per_second),
    );
    m.insert("CreationTime".into(), json!(d.creation_time));
    m.insert("LastModifiedTime".into(), json!(d.last_modified_time));
    compact(m)
}

fn describe_api_destination(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let state = events.state.lock().expect("state lock");
    let d = state
        .api_destinations
        .get(name)
        .ok_or_else(|| destination_not_found(name))?;
    Ok(render_destination(d))
}

fn list_api_destinations(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let prefix = opt(input, "NamePrefix").unwrap_or("");
    let connection = opt(input, "ConnectionArn");
    let items: Vec<Value> = {
        let state = events.state.lock().expect("state lock");
        state
            .api_destinations
            .values()
            .filter(|d| {
                d.name.starts_with(prefix) && connection.is_none_or(|c| c == d.connection_arn)
            })
            .map(|d| {
                let mut v = render_destination(d);
                if let Some(o) = v.as_object_mut() {
                    o.remove("Description");
                }
                v
            })
            .collect()
    };
    list_response("ApiDestinations", items, input)
}

fn update_api_destination(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let mut state = events.state.lock().expect("state lock");
    if let Some(arn) = opt(input, "ConnectionArn") {
        if !state.connections.values().any(|c| c.arn == arn) {
            return Err(EventsError::not_found(format!(
                "Connection '{arn}' does not exist."
            )));
        }
    }
    let d = state
        .api_destinations
        .get_mut(name)
        .ok_or_else(|| destination_not_found(name))?;
    let mut updated = d.clone();
    if let Some(v) = opt(input, "Description") {
        updated.description = Some(v.to_string());
    }
    if let Some(v) = opt(input, "ConnectionArn") {
        updated.connection_arn = v.to_string();
    }
    if let Some(v) = opt(input, "InvocationEndpoint") {
        check_endpoint(v)?;
        updated.invocation_endpoint = v.to_string();
    }
    if let Some(v) = opt(input, "HttpMethod") {
        check_method(v)?;
        updated.http_method = v.to_string();
    }
    if let Some(v) = input
        .get("InvocationRateLimitPerSecond")
        .and_then(Value::as_i64)
    {
        updated.invocation_rate_limit_per_second = v.max(1);
    }
    updated.last_modified_time = epoch(events.now());
    events.save("api-destination", name, &updated)?;
    *d = updated;
    Ok(
        json!({"ApiDestinationArn": d.arn, "ApiDestinationState": d.state, "CreationTime": d.creation_time, "LastModifiedTime": d.last_modified_time}),
    )
}

fn delete_api_destination(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let name = req(input, "Name")?;
    let mut state = events.state.lock().expect("state lock");
    if !state.api_destinations.contains_key(name) {
        return Err(destination_not_found(name));
    }
    events
        .store
        .delete_resource("api-destination", name)
        .map_err(internal)?;
    state.api_destinations.remove(name);
    Ok(json!({}))
}

// ---------------------------------------------------------------- tags

enum Taggable {
    Bus(String),
    Rule(String, String),
}

fn taggable(arn: &str) -> EventsResult<Taggable> {
    let not_found = || EventsError::not_found(format!("Resource {arn} does not exist."));
    let parsed = mooring_core::Arns::parse(arn)
        .filter(|p| p.service == "events")
        .ok_or_else(not_found)?;
    if let Some(bus) = parsed.resource.strip_prefix("event-bus/") {
        return Ok(Taggable::Bus(bus.to_string()));
    }
    if let Some(rest) = parsed.resource.strip_prefix("rule/") {
        return Ok(match rest.rsplit_once('/') {
            Some((bus, rule)) => Taggable::Rule(bus.to_string(), rule.to_string()),
            None => Taggable::Rule("default".into(), rest.to_string()),
        });
    }
    Err(not_found())
}

fn modify_tags(
    events: &Arc<Events>,
    arn: &str,
    change: impl FnOnce(&mut BTreeMap<String, String>) -> EventsResult<()>,
) -> EventsResult<()> {
    let not_found = || EventsError::not_found(format!("Resource {arn} does not exist."));
    let mut state = events.state.lock().expect("state lock");
    match taggable(arn)? {
        Taggable::Bus(name) => {
            let bus = state.buses.get_mut(&name).ok_or_else(not_found)?;
            let mut updated = bus.bus.clone();
            change(&mut updated.tags)?;
            events.save_bus(&updated)?;
            bus.bus = updated;
        }
        Taggable::Rule(bus_name, rule_name) => {
            let bus = state.buses.get_mut(&bus_name).ok_or_else(not_found)?;
            let rule = bus.rules.get_mut(&rule_name).ok_or_else(not_found)?;
            let mut updated = rule.clone();
            change(&mut updated.tags)?;
            events.save_rule(&updated)?;
            *rule = updated;
        }
    }
    Ok(())
}

fn tag_resource(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let arn = req(input, "ResourceARN")?;
    let tags = parse_tags(input.get("Tags"))?;
    modify_tags(events, arn, |existing| {
        existing.extend(tags);
        if existing.len() > 50 {
            return Err(EventsError::limit(
                "The requested resource exceeds the maximum number allowed: 50 tags.",
            ));
        }
        Ok(())
    })?;
    Ok(json!({}))
}

fn untag_resource(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let arn = req(input, "ResourceARN")?;
    let keys: Vec<String> = input
        .get("TagKeys")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    modify_tags(events, arn, |existing| {
        for k in &keys {
            existing.remove(k);
        }
        Ok(())
    })?;
    Ok(json!({}))
}

fn list_tags_for_resource(events: &Arc<Events>, input: &Value) -> EventsResult<Value> {
    let arn = req(input, "ResourceARN")?;
    let not_found = || EventsError::not_found(format!("Resource {arn} does not exist."));
    let state = events.state.lock().expect("state lock");
    let tags = match taggable(arn)? {
        Taggable::Bus(name) => state.buses.get(&name).map(|b| b.bus.tags.clone()),
        Taggable::Rule(bus, rule) => state
            .buses
            .get(&bus)
            .and_then(|b| b.rules.get(&rule))
            .map(|r| r.tags.clone()),
    }
    .ok_or_else(not_found)?;
    Ok(json!({"Tags": render_tags(&tags)}))
}
