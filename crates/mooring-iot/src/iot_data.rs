//! The `iot-data` HTTP API (signing name `iotdata`): Publish into the live broker,
//! GetRetainedMessage and ListRetainedMessages over the broker's retained store, and
//! DeleteConnection, which closes a client's connection as `API_INITIATED_DISCONNECT`
//! (MQTT 5 reason 0x98), sends its will unless `preventWillMessage=true` and ends its
//! persistent session when `cleanSession=true`.
//!
//! Publish takes the topic from the percent-decoded path (`POST /topics/a%2Fb`), QoS,
//! retain and MQTT 5 properties from the query and the `x-amz-mqtt5-*` headers, and the raw
//! body as payload. Publishes beyond `[iot.data] publish_per_second` are answered with
//! iot-data's `ThrottlingException` (HTTP 429). `lastModifiedTime` of retained messages is
//! tracked from the broker's publish hook; a message retained before this process started
//! reports the start time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::body::Body;
use axum::http::{Method, Response, StatusCode};
use base64::Engine;
use bytes::Bytes;
use futures::future::BoxFuture;
use mooring_aws::{
    json_response, AwsError, AwsRequest, AwsService, OperationName, Protocol, Route,
};
use mooring_core::ServiceContext;
use mooring_mqtt::broker::Kick;
use mooring_mqtt::lifecycle::DisconnectReason;
use mooring_mqtt::{Broker, Message, MessageProperties, Origin};
use serde::Deserialize;
use serde_json::json;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The `[iot.data]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IotDataSettings {
    /// HTTP publishes accepted per second (AWS's account default is 20,000); 0 = unlimited.
    pub publish_per_second: u32,
}

impl Default for IotDataSettings {
    fn default() -> Self {
        IotDataSettings {
            publish_per_second: 20_000,
        }
    }
}

/// A token bucket refilled continuously at `rate` per second, holding at most `rate`.
struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(rate: u32) -> RateLimiter {
        RateLimiter {
            rate: rate as f64,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    fn admit(&self) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(state.1).as_secs_f64() * self.rate;
        state.0 = (state.0 + refill).min(self.rate);
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The `iot-data` service.
pub struct IotDataService {
    broker: Broker,
    limiter: RateLimiter,
    modified: Arc<RwLock<HashMap<String, i64>>>,
    started_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl IotDataService {
    pub fn new(ctx: &ServiceContext, broker: Broker) -> anyhow::Result<Arc<IotDataService>> {
        let config: crate::config::IotConfig = ctx.config.section("iot")?;
        let modified: Arc<RwLock<HashMap<String, i64>>> = Arc::default();
        let tracked = modified.clone();
        broker.add_publish_hook(Arc::new(move |m: &Arc<Message>| {
            if m.retain {
                let mut map = tracked.write().unwrap_or_else(|e| e.into_inner());
                if m.payload.is_empty() {
                    map.remove(&m.topic);
                } else {
                    map.insert(m.topic.clone(), now_ms());
                }
            }
        }));
        Ok(Arc::new(IotDataService {
            broker,
            limiter: RateLimiter::new(config.data.publish_per_second),
            modified,
            started_ms: now_ms(),
        }))
    }

    fn last_modified(&self, topic: &str) -> i64 {
        self.modified
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied()
            .unwrap_or(self.started_ms)
    }
}

/// Which operation a path names, with its decoded topic.
fn operation(path: &str) -> Option<(&'static str, Option<String>)> {
    let decode = |raw: &str| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned()
    };
    if let Some(raw) = path.strip_prefix("/topics/") {
        return (!raw.is_empty()).then(|| ("Publish", Some(decode(raw))));
    }
    if path == "/retainedMessage" || path == "/retainedMessage/" {
        return Some(("ListRetainedMessages", None));
    }
    if let Some(raw) = path.strip_prefix("/retainedMessage/") {
        return Some(("GetRetainedMessage", Some(decode(raw))));
    }
    if let Some(raw) = path.strip_prefix("/connections/") {
        return (!raw.is_empty()).then(|| ("DeleteConnection", Some(decode(raw))));
    }
    None
}

fn invalid(message: impl Into<String>) -> AwsError {
    AwsError::client("InvalidRequestException", message)
}

impl AwsService for IotDataService {
    fn name(&self) -> &'static str {
        "iot-data"
    }

    fn signing_names(&self) -> &'static [&'static str] {
        &["iotdata", "iotdevicegateway"]
    }

    fn protocol(&self) -> Protocol {
        Protocol::RestJson1
    }

    fn matches(&self, route: &Route<'_>) -> bool {
        if route.target.is_some() {
            return false;
        }
        if let Some(name) = route.signing_name {
            if !self.signing_names().contains(&name) {
                return false;
            }
        }
        operation(route.path).is_some()
    }

    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>> {
        let found = operation(request.request.uri().path());
        let method = request.request.method().clone();
        let result = match found {
            None => Err(AwsError::unknown_operation(request.request.uri().path())),
            Some((op, topic)) => {
                let expected = match op {
                    "Publish" => Method::POST,
                    "DeleteConnection" => Method::DELETE,
                    _ => Method::GET,
                };
                let outcome = if method != expected {
                    Err(AwsError::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowedException",
                        format!("{method} is not supported on this resource"),
                    ))
                } else {
                    match op {
                        "Publish" => Ok(self.publish(&request, topic.unwrap_or_default())),
                        "GetRetainedMessage" => {
                            self.get_retained_message(&topic.unwrap_or_default())
                        }
                        "DeleteConnection" => {
                            self.delete_connection(&request, &topic.unwrap_or_default())
                        }
                        _ => self.list_retained_messages(&request),
                    }
                };
                outcome.map(|r| (op, r))
            }
        };
        Box::pin(async move {
            match result {
                Ok((op, response)) => {
                    let mut response = match response {
                        Reply::Ready(r) => r,
                        Reply::Pending(f) => f.await,
                    };
                    response
                        .extensions_mut()
                        .insert(OperationName(op.to_string()));
                    response
                }
                Err(e) => e.into_response(Protocol::RestJson1),
            }
        })
    }
}

/// A response now, or one that waits for the broker.
enum Reply {
    Ready(Response<Body>),
    Pending(BoxFuture<'static, Response<Body>>),
}

#[derive(Deserialize)]
struct UserProperty(HashMap<String, String>);

/// Parses `x-amz-mqtt5-user-properties`: base64 of a JSON array of one-pair objects.
fn user_properties(header: &str) -> Result<Vec<(String, String)>, AwsError> {
    let bytes = B64
        .decode(header.trim())
        .map_err(|_| invalid("x-amz-mqtt5-user-properties must be base64-encoded JSON"))?;
    let bad = || {
        invalid("x-amz-mqtt5-user-properties must be a JSON array of objects with string values")
    };
    // botocore JSON-encodes the (string) member before base64, so the array may arrive
    // wrapped in a JSON string.
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if let serde_json::Value::String(inner) = &value {
        value = serde_json::from_str(inner).map_err(|_| bad())?;
    }
    let items: Vec<UserProperty> = serde_json::from_value(value).map_err(|_| bad())?;
    let mut out = Vec::new();
    for item in items {
        let mut pairs: Vec<(String, String)> = item.0.into_iter().collect();
        pairs.sort();
        out.extend(pairs);
    }
    Ok(out)
}

impl IotDataService {
    fn publish(&self, request: &AwsRequest, topic: String) -> Reply {
        match self.prepare_publish(request, topic) {
            Err(e) => Reply::Ready(e.into_response(Protocol::RestJson1)),
            Ok(message) => {
                let broker = self.broker.clone();
                Reply::Pending(Box::pin(async move {
                    match broker.publish(message).await {
                        Ok(()) => json_response(
                            Protocol::RestJson1,
                            &json!({ "message": "OK", "traceId": uuid::Uuid::new_v4().to_string() }),
                        ),
                        Err(e) => AwsError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "InternalFailureException",
                            e.to_string(),
                        )
                        .into_response(Protocol::RestJson1),
                    }
                }))
            }
        }
    }

    fn prepare_publish(&self, request: &AwsRequest, topic: String) -> Result<Message, AwsError> {
        let profile = self.broker.profile().clone();
        let qos = match request.query_param("qos").as_deref() {
            None => 0,
            Some("0") => 0,
            Some("1") => 1,
            Some(other) => return Err(invalid(format!("qos must be 0 or 1, not '{other}'"))),
        };
        let retain = match request.query_param("retain").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "retain must be true or false, not '{other}'"
                )))
            }
        };
        mooring_mqtt::topic::validate_publish_topic(&topic, retain, &profile)
            .map_err(|e| invalid(format!("Invalid topic '{topic}': {e}")))?;
        if profile
            .max_payload
            .is_some_and(|max| request.body.len() > max)
        {
            return Err(invalid(format!(
                "The payload is {} bytes; the limit is {} bytes",
                request.body.len(),
                profile.max_payload.unwrap_or_default()
            )));
        }
        let user_properties = match request.header("x-amz-mqtt5-user-properties") {
            Some(h) => user_properties(h)?,
            None => Vec::new(),
        };
        let payload_format_indicator = match request.header("x-amz-mqtt5-payload-format-indicator")
        {
            None => None,
            Some("UNSPECIFIED_BYTES") => Some(0),
            Some("UTF8_DATA") => {
                if std::str::from_utf8(&request.body).is_err() {
                    return Err(invalid("The payload is not valid UTF-8 but is marked UTF8_DATA"));
                }
                Some(1)
            }
            Some(other) => {
                return Err(invalid(format!(
                    "x-amz-mqtt5-payload-format-indicator must be UNSPECIFIED_BYTES or UTF8_DATA, not '{other}'"
                )))
            }
        };
        let correlation_data = match request.header("x-amz-mqtt5-correlation-data") {
            None => None,
            Some(h) => Some(
                B64.decode(h.trim())
                    .map_err(|_| invalid("x-amz-mqtt5-correlation-data must be base64"))?,
            ),
        };
        let expires_at_ms = match request.query_param("messageExpiry") {
            None => None,
            Some(s) => {
                let secs: i64 = s.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    invalid(format!(
                        "messageExpiry must be a number of seconds, not '{s}'"
                    ))
                })?;
                Some(self.broker.now() + secs * 1000)
            }
        };
        if !self.limiter.admit() {
            return Err(AwsError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingException",
                "Rate exceeded",
            ));
        }
        Ok(Message {
            topic,
            payload: Bytes::copy_from_slice(&request.body),
            qos,
            retain,
            properties: MessageProperties {
                payload_format_indicator,
                content_type: request.query_param("contentType"),
                response_topic: request.query_param("responseTopic"),
                correlation_data,
                user_properties,
            },
            expires_at_ms,
            origin: Origin::default(),
        })
    }

    fn delete_connection(&self, request: &AwsRequest, client_id: &str) -> Result<Reply, AwsError> {
        if client_id.starts_with('$') {
            return Err(invalid("clientId must not start with '$'"));
        }
        let flag = |name: &str| match request.query_param(name).as_deref() {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => Err(invalid(format!("{name} must be true or false, got {v:?}"))),
        };
        let kick = Kick {
            reason: DisconnectReason::ApiInitiatedDisconnect,
            send_will: !flag("preventWillMessage")?,
            end_session: flag("cleanSession")?,
        };
        if !self.broker.disconnect_client(client_id, kick) {
            return Err(AwsError::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                format!("No connection found for client id {client_id}"),
            ));
        }
        Ok(Reply::Ready(json_response(Protocol::RestJson1, &json!({}))))
    }

    fn get_retained_message(&self, topic: &str) -> Result<Reply, AwsError> {
        let Some(message) = self.broker.retained(topic) else {
            return Err(AwsError::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                format!("No retained message found for topic {topic}"),
            ));
        };
        let mut body = json!({
            "topic": message.topic,
            "payload": B64.encode(&message.payload),
            "qos": message.qos,
            "lastModifiedTime": self.last_modified(topic),
        });
        if !message.properties.user_properties.is_empty() {
            let pairs: Vec<serde_json::Value> = message
                .properties
                .user_properties
                .iter()
                .map(|(k, v)| json!({ k: v }))
                .collect();
            body["userProperties"] =
                json!(B64.encode(serde_json::to_vec(&pairs).unwrap_or_default()));
        }
        Ok(Reply::Ready(json_response(Protocol::RestJson1, &body)))
    }

    fn list_retained_messages(&self, request: &AwsRequest) -> Result<Reply, AwsError> {
        let max = match request.query_param("maxResults") {
            None => 200,
            Some(m) => match m.parse::<usize>() {
                Ok(n @ 1..=200) => n,
                _ => {
                    return Err(invalid(format!(
                        "1 validation error detected: Value '{m}' at 'maxResults' failed to satisfy constraint: Member must have value between 1 and 200"
                    )))
                }
            },
        };
        let start = match request.query_param("nextToken") {
            None => 0,
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| invalid(format!("The nextToken '{t}' is not valid")))?,
        };
        let all = self.broker.retained_messages();
        let page: Vec<serde_json::Value> = all
            .iter()
            .skip(start)
            .take(max)
            .map(|m| {
                json!({
                    "topic": m.topic,
                    "payloadSize": m.payload.len(),
                    "qos": m.qos,
                    "lastModifiedTime": self.last_modified(&m.topic),
                })
            })
            .collect();
        let end = start + page.len();
        let mut body = json!({ "retainedTopics": page });
        if end < all.len() {
            body["nextToken"] = json!(end.to_string());
        }
        Ok(Reply::Ready(json_response(Protocol::RestJson1, &body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_operations_and_topics_are_decoded() {
        assert_eq!(
            operation("/topics/a%2Fb%2F%24c"),
            Some(("Publish", Some("a/b/$c".into())))
        );
        assert_eq!(
            operation("/topics/a/b"),
            Some(("Publish", Some("a/b".into())))
        );
        assert_eq!(operation("/topics/"), None);
        assert_eq!(
            operation("/retainedMessage"),
            Some(("ListRetainedMessages", None))
        );
        assert_eq!(
            operation("/retainedMessage/x%2Fy"),
            Some(("GetRetainedMessage", Some("x/y".into())))
        );
        assert_eq!(operation("/things/t/shadow"), None);
    }

    #[test]
    fn user_properties_header_is_base64_json_pairs() {
        let header = B64.encode(r#"[{"a":"1"},{"b":"2"}]"#);
        assert_eq!(
            user_properties(&header).unwrap(),
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string())
            ]
        );
        let wrapped = B64.encode(r#""[{\"a\":\"1\"}]""#);
        assert_eq!(
            user_properties(&wrapped).unwrap(),
            vec![("a".to_string(), "1".to_string())]
        );
        assert!(user_properties("not base64!").is_err());
        assert!(user_properties(&B64.encode("{}")).is_err());
    }

    #[test]
    fn the_rate_limiter_admits_a_burst_then_refuses() {
        let limiter = RateLimiter::new(3);
        assert!(limiter.admit() && limiter.admit() && limiter.admit());
        assert!(!limiter.admit());
        assert!(RateLimiter::new(0).admit());
    }
}
