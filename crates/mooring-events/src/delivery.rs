//! Target delivery: the queue of pending deliveries, the worker that sends them with retries,
//! dead-lettering, and one sender per target kind.
//!
//! Every delivery is persisted (by the ingesting call) before it is queued, and removed only
//! after the target accepted it or it was handed over to its dead-letter destination, so
//! delivery is at-least-once across restarts. Target ARNs understood:
//!
//! | Target | ARN |
//! |---|---|
//! | another event bus | `arn:aws:events:<region>:<account>:event-bus/<name>` |
//! | API destination (HTTP with a connection's auth) | `arn:aws:events:…:api-destination/<name>/<id>` |
//! | plain HTTP endpoint (Mooring extension) | `http://host:port/path` |
//! | MQTT publish through Mooring's broker | `arn:aws:iot:<region>:<account>:topic/<topic>` |
//! | stream-manager append | `arn:aws:greengrass:<region>:<account>:stream/<name>` |
//! | log file (JSON lines under `<data>/events/logs/`) | `arn:aws:logs:<region>:<account>:log-group:<name>` |
//!
//! Retries follow the target's `RetryPolicy` (default 185 attempts, 24 hours) with exponential
//! backoff and jitter; a handle that is not wired yet (broker, stream manager) is a retryable
//! failure, so deliveries wait for it. A dead-letter destination may be any of the ARNs above
//! and receives `{"attributes": {RULE_ARN, TARGET_ARN, ERROR_CODE, ERROR_MESSAGE,
//! EXHAUSTED_RETRY_CONDITION, RETRY_ATTEMPTS}, "body": <event>}`.
//!
//! A bus's own `DeadLetterConfig` receives the events the bus refuses to process: an event
//! forwarded from bus to bus more than `max_event_hops` times (a rule loop), with attributes
//! `{EVENT_BUS_ARN, ERROR_CODE: "EVENT_LOOP_DETECTED", ERROR_MESSAGE, HOPS}`. Every delivery
//! document carries the event's hop count for this. API destinations are held to their
//! `InvocationRateLimitPerSecond` by [`InvocationLimiter`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mooring_core::handles::{HandleError, PublishMessage};
use mooring_core::Arns;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};

use crate::model::{ApiDestination, Connection};
use crate::store::IngestBatch;
use crate::Events;

/// Why a send failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub retryable: bool,
    pub code: &'static str,
    pub message: String,
    /// Retry-After the target asked for, in milliseconds; negative stops retrying.
    pub retry_after_ms: Option<i64>,
}

impl Failure {
    fn retry(code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            retryable: true,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            retryable: false,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// Pending deliveries ordered by their next attempt.
#[derive(Default)]
pub struct DeliveryQueue {
    pending: Mutex<BTreeMap<(i64, i64), Value>>,
    wake: Notify,
}

impl DeliveryQueue {
    pub fn push(&self, id: i64, doc: Value) {
        let next = doc["next_ms"].as_i64().unwrap_or(0);
        self.pending
            .lock()
            .expect("queue lock")
            .insert((next, id), doc);
        self.wake.notify_one();
    }

    fn take_due(&self, now_ms: i64) -> (Vec<(i64, Value)>, Option<i64>) {
        let mut pending = self.pending.lock().expect("queue lock");
        let mut due = Vec::new();
        while let Some(entry) = pending.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, id), doc) = entry.remove_entry();
            due.push((id, doc));
        }
        (due, pending.keys().next().map(|k| k.0))
    }

    pub fn len(&self) -> usize {
        self.pending.lock().expect("queue lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs until shutdown: sends due deliveries, at most 64 at a time.
pub async fn run_worker(events: Arc<Events>) {
    let limit = Arc::new(Semaphore::new(64));
    loop {
        let now = events.clock.now_millis();
        let (due, next) = events.queue.take_due(now);
        for (id, doc) in due {
            let permit = limit.clone().acquire_owned().await.expect("semaphore open");
            let events = events.clone();
            tokio::spawn(async move {
                attempt(&events, id, doc).await;
                drop(permit);
            });
        }
        let wait = next.map_or(Duration::from_secs(3600), |n| {
            Duration::from_millis((n - events.clock.now_millis()).clamp(1, 3_600_000) as u64)
        });
        tokio::select! {
            _ = events.shutdown.triggered() => return,
            _ = events.queue.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn attempt(events: &Arc<Events>, id: i64, mut doc: Value) {
    let target = doc["target"].clone();
    let payload = doc["payload"].as_str().unwrap_or_default().to_string();
    let event = doc["event"].as_str().unwrap_or_default().to_string();
    let hops = doc["hops"].as_u64().unwrap_or(0) as u32;
    let result = send(events, &target, &payload, &event, hops).await;
    let store = events.store.clone();
    let failure = match result {
        Ok(()) => {
            let _ = tokio::task::spawn_blocking(move || store.delete_delivery(id)).await;
            return;
        }
        Err(f) => f,
    };
    let now = events.clock.now_millis();
    let policy = &target["RetryPolicy"];
    let max_age_ms = policy["MaximumEventAgeInSeconds"]
        .as_i64()
        .unwrap_or(86_400)
        * 1000;
    let first = doc["first_ms"].as_i64().unwrap_or(now);
    if failure.code == RATE_LIMITED && now - first < max_age_ms {
        // Deferred by the destination's rate limit: not an attempt; the delivery stays stored.
        doc["next_ms"] = json!(now + failure.retry_after_ms.unwrap_or(1));
        events.queue.push(id, doc);
        return;
    }
    let attempts = doc["attempts"].as_u64().unwrap_or(0) + 1;
    doc["attempts"] = json!(attempts);
    let max_attempts = policy["MaximumRetryAttempts"].as_u64().unwrap_or(185);
    let exhausted = if !failure.retryable || failure.retry_after_ms.is_some_and(|r| r < 0) {
        None
    } else if attempts > max_attempts {
        Some("MaximumRetryAttempts")
    } else if now - first >= max_age_ms {
        Some("MaximumEventAgeInSeconds")
    } else {
        let backoff = backoff_ms(events, attempts, failure.retry_after_ms);
        doc["next_ms"] = json!(now + backoff);
        doc["last_error"] = json!(failure.message);
        let body = doc.clone();
        let stored = tokio::task::spawn_blocking(move || store.update_delivery(id, &body)).await;
        if !matches!(stored, Ok(Ok(()))) {
            tracing::warn!(id, "could not record a delivery retry");
        }
        tracing::debug!(id, attempts, error = %failure.message, "delivery failed; will retry");
        events.queue.push(id, doc);
        return;
    };
    tracing::warn!(id, code = failure.code, error = %failure.message, "delivery failed for good");
    let dlq = target["DeadLetterConfig"]["Arn"]
        .as_str()
        .map(str::to_string);
    let mut batch = IngestBatch {
        remove_delivery: Some(id),
        ..Default::default()
    };
    if let (Some(dlq), false) = (dlq, doc["dlq"].as_bool().unwrap_or(false)) {
        let attributes = json!({
            "RULE_ARN": doc["rule_arn"],
            "TARGET_ARN": target["Arn"],
            "ERROR_CODE": if failure.code == RATE_LIMITED { "THROTTLING" } else { failure.code },
            "ERROR_MESSAGE": failure.message,
            "EXHAUSTED_RETRY_CONDITION": exhausted,
            "RETRY_ATTEMPTS": attempts - 1,
        });
        batch.deliveries.push(dead_letter_document(
            &dlq,
            Some(&doc),
            attributes,
            &event,
            now,
            hops,
        ));
    }
    events.commit_and_queue(batch).await;
}

/// A delivery of `event` to a dead-letter destination: `{"attributes": …, "body": <event>}`.
/// `origin` is the failed delivery, if the event was dead-lettered by a target (not a bus).
pub fn dead_letter_document(
    dlq_arn: &str,
    origin: Option<&Value>,
    attributes: Value,
    event: &str,
    now_ms: i64,
    hops: u32,
) -> Value {
    let body = json!({
        "attributes": attributes,
        "body": serde_json::from_str::<Value>(event).unwrap_or(Value::String(event.to_string())),
    });
    json!({
        "rule_arn": origin.map_or(Value::Null, |d| d["rule_arn"].clone()),
        "rule_name": origin.map_or(Value::Null, |d| d["rule_name"].clone()),
        "target": {"Id": "dead-letter", "Arn": dlq_arn},
        "payload": body.to_string(),
        "event": event,
        "attempts": 0,
        "first_ms": now_ms,
        "next_ms": now_ms,
        "hops": hops,
        "dlq": true,
    })
}

fn backoff_ms(events: &Events, attempts: u64, retry_after: Option<i64>) -> i64 {
    if let Some(ms) = retry_after.filter(|ms| *ms >= 0) {
        return ms.max(1);
    }
    let base = events.config.retry_base_ms.max(1);
    let exp = base.saturating_mul(1u64 << attempts.saturating_sub(1).min(20));
    let capped = exp.min(events.config.retry_max_ms.max(base));
    let jitter = rand::random::<u64>() % (capped / 4 + 1);
    (capped - capped / 8 + jitter) as i64
}

/// Sends `payload` to the target; the original `event` feeds dynamic parameters.
pub async fn send(
    events: &Arc<Events>,
    target: &Value,
    payload: &str,
    event: &str,
    hops: u32,
) -> Result<(), Failure> {
    let arn = target["Arn"].as_str().unwrap_or_default();
    match TargetKind::parse(arn) {
        Some(TargetKind::Bus(bus)) => {
            let events = events.clone();
            let payload = payload.to_string();
            tokio::task::spawn_blocking(move || events.ingest_forwarded(&bus, &payload, hops + 1))
                .await
                .map_err(|e| Failure::retry("INTERNAL", e.to_string()))?
        }
        Some(TargetKind::ApiDestination(name)) => {
            send_api_destination(events, &name, target, payload, event).await
        }
        Some(TargetKind::Http(url)) => {
            let headers = vec![(
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            )];
            http_send(events, "POST", &url, &headers, payload)
                .await
                .map(|_| ())
        }
        Some(TargetKind::Mqtt(topic)) => {
            let broker = events.handles.broker().map_err(handle_failure)?.clone();
            broker
                .publish(PublishMessage {
                    topic,
                    payload: Bytes::from(payload.to_string()),
                    qos: 1,
                    content_type: Some("application/json".into()),
                    ..Default::default()
                })
                .await
                .map_err(handle_failure)
        }
        Some(TargetKind::Stream(stream)) => {
            let streams = events.handles.streams().map_err(handle_failure)?.clone();
            streams
                .append(&stream, Bytes::from(payload.to_string()))
                .await
                .map(|_| ())
                .map_err(handle_failure)
        }
        Some(TargetKind::Log(group)) => {
            let path = events.log_dir.join(format!("{}.log", sanitize(&group)));
            // One JSON document per line: the payload as sent when it is single-line JSON
            // (keeping the envelope's field order), else re-serialized or quoted.
            let line = match serde_json::from_str::<Value>(payload) {
                Ok(_) if !payload.contains(['\n', '\r']) => payload.trim().to_string(),
                Ok(v) => v.to_string(),
                Err(_) => Value::String(payload.to_string()).to_string(),
            };
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                file.write_all(format!("{line}\n").as_bytes())?;
                file.sync_data()
            })
            .await
            .map_err(|e| Failure::retry("INTERNAL", e.to_string()))?
            .map_err(|e| Failure::retry("INTERNAL", format!("writing the log: {e}")))
        }
        None => Err(Failure::fatal(
            "NO_RESOURCE",
            format!("target {arn} is not a supported target"),
        )),
    }
}

fn handle_failure(e: HandleError) -> Failure {
    match e {
        HandleError::Unavailable(_) | HandleError::Internal(_) => {
            Failure::retry("SDK_CLIENT_ERROR", e.to_string())
        }
        HandleError::NotFound(_) => Failure::fatal("NO_RESOURCE", e.to_string()),
        HandleError::Rejected(_) => Failure::fatal("NO_PERMISSIONS", e.to_string()),
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The kinds of targets Mooring delivers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    Bus(String),
    ApiDestination(String),
    Http(String),
    Mqtt(String),
    Stream(String),
    Log(String),
}

impl TargetKind {
    pub fn parse(arn: &str) -> Option<TargetKind> {
        if arn.starts_with("http://") || arn.starts_with("https://") {
            return Some(TargetKind::Http(arn.to_string()));
        }
        let parsed = Arns::parse(arn)?;
        let r = parsed.resource;
        match parsed.service {
            "events" => {
                if let Some(bus) = r.strip_prefix("event-bus/") {
                    Some(TargetKind::Bus(bus.to_string()))
                } else {
                    let rest = r.strip_prefix("api-destination/")?;
                    let name = rest.split('/').next().unwrap_or(rest);
                    Some(TargetKind::ApiDestination(name.to_string()))
                }
            }
            "iot" => r
                .strip_prefix("topic/")
                .filter(|t| !t.is_empty())
                .map(|t| TargetKind::Mqtt(t.to_string())),
            "greengrass" | "mooring" => r
                .strip_prefix("stream/")
                .filter(|s| !s.is_empty())
                .map(|s| TargetKind::Stream(s.to_string())),
            "logs" => {
                let group = r.strip_prefix("log-group:")?;
                let group = group.strip_suffix(":*").unwrap_or(group);
                (!group.is_empty()).then(|| TargetKind::Log(group.to_string()))
            }
            _ => None,
        }
    }
}

/// The invocation rate limit of API destinations (`InvocationRateLimitPerSecond`): each send
/// reserves the destination's next free slot, slots being `1/rate` seconds apart. A send whose
/// slot is less than [`InvocationLimiter::MAX_WAIT_MS`] away waits for it; a later one does not
/// reserve anything and is put back in the queue until about then (see [`RATE_LIMITED`]),
/// without counting as a failed attempt.
#[derive(Default)]
pub struct InvocationLimiter(Mutex<HashMap<String, f64>>);

/// The failure code of a send deferred by the invocation rate limit.
pub const RATE_LIMITED: &str = "RATE_LIMITED";

impl InvocationLimiter {
    pub const MAX_WAIT_MS: f64 = 1_000.0;

    /// Milliseconds to wait before sending to `destination` at `rate` per second, or
    /// `Err(ms)` when the next slot is further away than [`Self::MAX_WAIT_MS`].
    pub fn reserve(&self, destination: &str, rate: i64, now_ms: f64) -> Result<f64, f64> {
        let mut next_free = self.0.lock().expect("limiter lock");
        let slot = next_free
            .get(destination)
            .copied()
            .unwrap_or(now_ms)
            .max(now_ms);
        let wait = slot - now_ms;
        if wait > Self::MAX_WAIT_MS {
            return Err(wait);
        }
        next_free.insert(destination.to_string(), slot + 1_000.0 / rate.max(1) as f64);
        Ok(wait)
    }
}

/// OAuth access tokens by connection ARN.
#[derive(Default)]
pub struct TokenCache(pub(crate) Mutex<HashMap<String, String>>);

async fn send_api_destination(
    events: &Arc<Events>,
    name: &str,
    target: &Value,
    payload: &str,
    event: &str,
) -> Result<(), Failure> {
    let (destination, connection) = {
        let state = events.state.lock().expect("state lock");
        let destination: ApiDestination =
            state.api_destinations.get(name).cloned().ok_or_else(|| {
                Failure::fatal(
                    "NO_RESOURCE",
                    format!("API destination {name} does not exist"),
                )
            })?;
        let connection: Connection = state
            .connections
            .values()
            .find(|c| c.arn == destination.connection_arn)
            .cloned()
            .ok_or_else(|| {
                Failure::fatal(
                    "NO_RESOURCE",
                    "the API destination's connection does not exist",
                )
            })?;
        (destination, connection)
    };
    match connection.state.as_str() {
        "AUTHORIZED" => {}
        "AUTHORIZING" => {
            return Err(Failure::retry(
                "SDK_CLIENT_ERROR",
                format!("connection {} is still being authorized", connection.name),
            ))
        }
        other => {
            return Err(Failure::fatal(
                "NO_PERMISSIONS",
                format!("connection {} is {other}", connection.name),
            ))
        }
    }
    let now = events.clock.now_millis() as f64;
    match events.limiter.reserve(
        &destination.name,
        destination.invocation_rate_limit_per_second,
        now,
    ) {
        Ok(wait) if wait > 0.0 => {
            tokio::time::sleep(Duration::from_micros((wait * 1000.0) as u64)).await
        }
        Ok(_) => {}
        Err(wait) => {
            return Err(Failure {
                retryable: true,
                code: RATE_LIMITED,
                message: format!(
                    "API destination {} is at its invocation rate limit of {}/s",
                    destination.name, destination.invocation_rate_limit_per_second
                ),
                retry_after_ms: Some(wait.ceil() as i64),
            })
        }
    }
    let event_value: Value = serde_json::from_str(event).unwrap_or(Value::Null);
    let http_parameters = &target["HttpParameters"];
    let dynamic = |v: &Value| -> String {
        let text = v.as_str().unwrap_or_default();
        if text.starts_with("$.") {
            match crate::transform::select(&event_value, text) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            }
        } else {
            text.to_string()
        }
    };
    let mut url = String::new();
    let mut path_values = http_parameters["PathParameterValues"]
        .as_array()
        .into_iter()
        .flatten();
    for c in destination.invocation_endpoint.chars() {
        if c == '*' {
            if let Some(v) = path_values.next() {
                url.push_str(&dynamic(v));
                continue;
            }
        }
        url.push(c);
    }
    let invocation = &connection.auth_parameters["InvocationHttpParameters"];
    let pairs = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["Key"].as_str()?.to_string(),
                    p["Value"].as_str()?.to_string(),
                ))
            })
            .collect()
    };
    let mut query: BTreeMap<String, String> = http_parameters["QueryStringParameters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), dynamic(v)))
        .collect();
    query.extend(pairs(&invocation["QueryStringParameters"]));
    if !query.is_empty() {
        let encoded: Vec<String> = query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    percent_encoding::utf8_percent_encode(k, percent_encoding::NON_ALPHANUMERIC),
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .collect();
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&encoded.join("&"));
    }
    let mut headers: BTreeMap<String, String> = http_parameters["HeaderParameters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.to_ascii_lowercase(), dynamic(v)))
        .collect();
    headers.extend(
        pairs(&invocation["HeaderParameters"])
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v)),
    );
    headers.insert(
        "user-agent".into(),
        "Amazon/EventBridge/ApiDestinations".into(),
    );
    headers.insert(
        "content-type".into(),
        "application/json; charset=utf-8".into(),
    );
    headers.insert("range".into(), "bytes=0-1048575".into());
    headers.insert("accept-encoding".into(), "gzip,deflate".into());
    let auth = &connection.auth_parameters;
    match connection.authorization_type.as_str() {
        "BASIC" => {
            let b = &auth["BasicAuthParameters"];
            let raw = format!(
                "{}:{}",
                b["Username"].as_str().unwrap_or_default(),
                b["Password"].as_str().unwrap_or_default()
            );
            headers.insert(
                "authorization".into(),
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ),
            );
        }
        "API_KEY" => {
            let k = &auth["ApiKeyAuthParameters"];
            headers.insert(
                k["ApiKeyName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                k["ApiKeyValue"].as_str().unwrap_or_default().to_string(),
            );
        }
        "OAUTH_CLIENT_CREDENTIALS" => {
            let token = oauth_token(events, &connection, false).await?;
            headers.insert("authorization".into(), format!("Bearer {token}"));
        }
        _ => {}
    }
    let mut body = payload.to_string();
    let body_parameters = pairs(&invocation["BodyParameters"]);
    if !body_parameters.is_empty() {
        if let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(payload) {
            for (k, v) in body_parameters {
                map.insert(k, Value::String(v));
            }
            body = Value::Object(map).to_string();
        }
    }
    let headers: Vec<(String, String)> = headers.into_iter().collect();
    match http_send(events, &destination.http_method, &url, &headers, &body).await {
        Err(f)
            if f.code == "UNAUTHORIZED"
                && connection.authorization_type == "OAUTH_CLIENT_CREDENTIALS" =>
        {
            events
                .tokens
                .0
                .lock()
                .expect("token lock")
                .remove(&connection.arn);
            Err(Failure::retry("UNAUTHORIZED", f.message))
        }
        other => other.map(|_| ()),
    }
}

/// The connection's OAuth access token: the cached one unless `refresh`, else a new one from
/// its authorization endpoint (client credentials grant), cached for later sends.
pub(crate) async fn oauth_token(
    events: &Arc<Events>,
    connection: &Connection,
    refresh: bool,
) -> Result<String, Failure> {
    if !refresh {
        if let Some(token) = events
            .tokens
            .0
            .lock()
            .expect("token lock")
            .get(&connection.arn)
        {
            return Ok(token.clone());
        }
    }
    let o = &connection.auth_parameters["OAuthParameters"];
    let client = &o["ClientParameters"];
    let raw = format!(
        "{}:{}",
        client["ClientID"].as_str().unwrap_or_default(),
        client["ClientSecret"].as_str().unwrap_or_default()
    );
    let mut headers = vec![
        (
            "authorization".to_string(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ),
        ),
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        ),
    ];
    let params = &o["OAuthHttpParameters"];
    for h in params["HeaderParameters"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (h["Key"].as_str(), h["Value"].as_str()) {
            headers.push((k.to_ascii_lowercase(), v.to_string()));
        }
    }
    let mut form = vec!["grant_type=client_credentials".to_string()];
    for p in params["BodyParameters"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (p["Key"].as_str(), p["Value"].as_str()) {
            form.push(format!(
                "{}={}",
                percent_encoding::utf8_percent_encode(k, percent_encoding::NON_ALPHANUMERIC),
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            ));
        }
    }
    let endpoint = o["AuthorizationEndpoint"].as_str().unwrap_or_default();
    let method = o["HttpMethod"].as_str().unwrap_or("POST");
    let body = http_send(events, method, endpoint, &headers, &form.join("&")).await?;
    let token = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["access_token"].as_str().map(str::to_string))
        .ok_or_else(|| {
            Failure::fatal(
                "NO_PERMISSIONS",
                "the authorization endpoint returned no access_token",
            )
        })?;
    events
        .tokens
        .0
        .lock()
        .expect("token lock")
        .insert(connection.arn.clone(), token.clone());
    Ok(token)
}

/// The TLS client configuration for HTTPS deliveries: the public web roots plus any
/// certificates from `tls_ca_file`.
pub fn tls_connector(
    extra_ca: Option<&std::path::Path>,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)? {
            roots.add(cert?)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

type Exchange = (u16, Option<i64>, Bytes);

async fn exchange<IO>(io: IO, request: http::Request<Full<Bytes>>) -> Result<Exchange, Failure>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| Failure::retry("SDK_CLIENT_ERROR", e.to_string()))?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::retry("SDK_CLIENT_ERROR", e.to_string()))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|s| s.saturating_mul(1000));
    let bytes = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((status, retry_after, bytes))
}

/// One HTTP/1.1 request over plain TCP or TLS; 2xx/3xx (and 1xx) are success, 429/5xx
/// retryable, other 4xx final.
async fn http_send(
    events: &Events,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: &str,
) -> Result<Bytes, Failure> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| Failure::fatal("NO_RESOURCE", format!("invalid endpoint {url}")))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(Failure::fatal(
                "NO_RESOURCE",
                format!("{url}: not an http(s) URL"),
            ))
        }
    };
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let mut request = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            "host",
            uri.authority().map_or(host.clone(), |a| a.to_string()),
        )
        .header("connection", "close");
    for (k, v) in headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| Failure::fatal("NO_RESOURCE", e.to_string()))?;
    let timeout = Duration::from_millis(events.config.http_timeout_ms);
    let attempt = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| Failure::retry("SDK_CLIENT_ERROR", format!("connecting to {url}: {e}")))?;
        if tls {
            let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|_| {
                Failure::fatal(
                    "NO_RESOURCE",
                    format!("{host} is not a valid TLS server name"),
                )
            })?;
            let stream =
                events.tls.connect(name, stream).await.map_err(|e| {
                    Failure::retry("SDK_CLIENT_ERROR", format!("TLS with {url}: {e}"))
                })?;
            exchange(stream, request).await
        } else {
            exchange(stream, request).await
        }
    };
    let (status, retry_after, bytes) =
        tokio::time::timeout(timeout, attempt).await.map_err(|_| {
            Failure::retry(
                "TIMEOUT",
                format!("{url} did not answer within {timeout:?}"),
            )
        })??;
    match status {
        0..=399 => Ok(bytes),
        401 | 407 => Err(Failure::fatal(
            "UNAUTHORIZED",
            format!("{url} answered {status}"),
        )),
        429 | 500..=599 => Err(Failure {
            retryable: true,
            code: if status == 429 {
                "THROTTLING"
            } else {
                "SDK_CLIENT_ERROR"
            },
            message: format!("{url} answered {status}"),
            retry_after_ms: retry_after,
        }),
        _ => Err(Failure::fatal(
            "NO_PERMISSIONS",
            format!("{url} answered {status}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_limiter_spaces_slots_and_defers_far_ones() {
        let limiter = InvocationLimiter::default();
        // 4 per second: slots 250 ms apart, the first one now.
        let waits: Vec<_> = (0..5).map(|_| limiter.reserve("d", 4, 10_000.0)).collect();
        assert_eq!(
            waits,
            vec![Ok(0.0), Ok(250.0), Ok(500.0), Ok(750.0), Ok(1_000.0)]
        );
        // The next slot (1 250 ms away) is beyond the wait bound: deferred, nothing reserved.
        assert_eq!(limiter.reserve("d", 4, 10_000.0), Err(1_250.0));
        assert_eq!(limiter.reserve("d", 4, 10_000.0), Err(1_250.0));
        // Later, the slot is available again; other destinations are independent.
        assert_eq!(limiter.reserve("d", 4, 10_300.0), Ok(950.0));
        assert_eq!(limiter.reserve("other", 1, 10_000.0), Ok(0.0));
        assert_eq!(limiter.reserve("other", 1, 10_000.0), Ok(1_000.0));
        assert_eq!(limiter.reserve("other", 1, 10_000.0), Err(2_000.0));
    }

    #[test]
    fn dead_letter_documents_carry_the_event_and_its_origin() {
        let origin = json!({"rule_arn": "arn:r", "rule_name": "r"});
        let doc = dead_letter_document(
            "arn:aws:logs:r:1:log-group:dlq",
            Some(&origin),
            json!({"ERROR_CODE": "X"}),
            r#"{"id":"e"}"#,
            5,
            3,
        );
        assert_eq!(doc["rule_arn"], "arn:r");
        assert_eq!(doc["hops"], 3);
        assert_eq!(doc["dlq"], true);
        let payload: Value = serde_json::from_str(doc["payload"].as_str().unwrap()).unwrap();
        assert_eq!(
            payload,
            json!({"attributes": {"ERROR_CODE": "X"}, "body": {"id": "e"}})
        );
        let bus_level = dead_letter_document("arn:x", None, json!({}), "not json", 5, 0);
        assert_eq!(bus_level["rule_arn"], Value::Null);
        let payload: Value = serde_json::from_str(bus_level["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["body"], "not json");
    }

    #[test]
    fn target_arns_are_recognised() {
        assert_eq!(
            TargetKind::parse("arn:aws:events:us-east-1:123456789012:event-bus/b"),
            Some(TargetKind::Bus("b".into()))
        );
        assert_eq!(
            TargetKind::parse("arn:aws:events:us-east-1:1:api-destination/d/abc"),
            Some(TargetKind::ApiDestination("d".into()))
        );
        assert_eq!(
            TargetKind::parse("arn:aws:iot:us-east-1:1:topic/a/b"),
            Some(TargetKind::Mqtt("a/b".into()))
        );
        assert_eq!(
            TargetKind::parse("arn:aws:greengrass:us-east-1:1:stream/s1"),
            Some(TargetKind::Stream("s1".into()))
        );
        assert_eq!(
            TargetKind::parse("arn:aws:logs:us-east-1:1:log-group:/aws/events/x:*"),
            Some(TargetKind::Log("/aws/events/x".into()))
        );
        assert_eq!(TargetKind::parse("arn:aws:sqs:us-east-1:1:q"), None);
        assert_eq!(sanitize("/aws/events/x"), "_aws_events_x");
    }
}
