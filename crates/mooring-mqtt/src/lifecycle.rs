//! AWS IoT lifecycle events: the topics and exact JSON payloads of `connected`,
//! `disconnected`, `connect_failed`, `subscribed` and `unsubscribed`.
//!
//! The broker publishes them as ordinary messages (so MQTT subscribers, in-process
//! subscribers and publish hooks all see them). Field order follows AWS's documentation
//! examples; timestamps are epoch milliseconds. Client ids containing `#` or `+` get no
//! events, as in AWS.

use serde_json::{json, Value};

/// A JSON object that keeps its fields in insertion order (AWS's documented order).
#[derive(Debug, Clone, Default)]
pub struct OrderedObject(Vec<(&'static str, Value)>);

impl OrderedObject {
    fn insert(&mut self, key: &'static str, value: Value) {
        self.0.push((key, value));
    }

    /// The compact JSON text.
    pub fn to_json(&self) -> String {
        let fields: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{}:{}", json!(k), v))
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// Why a connection ended, with AWS's `disconnectReason` spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    AuthError,
    ClientInitiatedDisconnect,
    ClientError,
    ConnectionLost,
    DuplicateClientId,
    ForbiddenAccess,
    MqttKeepAliveTimeout,
    ServerError,
    ServerInitiatedDisconnect,
    ApiInitiatedDisconnect,
    Throttled,
    WebsocketTtlExpiration,
    CustomauthTtlExpiration,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 13] = [
        DisconnectReason::AuthError,
        DisconnectReason::ClientInitiatedDisconnect,
        DisconnectReason::ClientError,
        DisconnectReason::ConnectionLost,
        DisconnectReason::DuplicateClientId,
        DisconnectReason::ForbiddenAccess,
        DisconnectReason::MqttKeepAliveTimeout,
        DisconnectReason::ServerError,
        DisconnectReason::ServerInitiatedDisconnect,
        DisconnectReason::ApiInitiatedDisconnect,
        DisconnectReason::Throttled,
        DisconnectReason::WebsocketTtlExpiration,
        DisconnectReason::CustomauthTtlExpiration,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::AuthError => "AUTH_ERROR",
            DisconnectReason::ClientInitiatedDisconnect => "CLIENT_INITIATED_DISCONNECT",
            DisconnectReason::ClientError => "CLIENT_ERROR",
            DisconnectReason::ConnectionLost => "CONNECTION_LOST",
            DisconnectReason::DuplicateClientId => "DUPLICATE_CLIENTID",
            DisconnectReason::ForbiddenAccess => "FORBIDDEN_ACCESS",
            DisconnectReason::MqttKeepAliveTimeout => "MQTT_KEEP_ALIVE_TIMEOUT",
            DisconnectReason::ServerError => "SERVER_ERROR",
            DisconnectReason::ServerInitiatedDisconnect => "SERVER_INITIATED_DISCONNECT",
            DisconnectReason::ApiInitiatedDisconnect => "API_INITIATED_DISCONNECT",
            DisconnectReason::Throttled => "THROTTLED",
            DisconnectReason::WebsocketTtlExpiration => "WEBSOCKET_TTL_EXPIRATION",
            DisconnectReason::CustomauthTtlExpiration => "CUSTOMAUTH_TTL_EXPIRATION",
        }
    }

    /// Whether the client's will is published for this reason.
    pub fn sends_will(self) -> bool {
        !matches!(self, DisconnectReason::ClientInitiatedDisconnect)
    }

    /// The MQTT 5 reason code of the server's DISCONNECT, when the server sends one.
    pub fn mqtt5_code(self) -> Option<u8> {
        use crate::codec::reason;
        Some(match self {
            DisconnectReason::AuthError | DisconnectReason::ForbiddenAccess => {
                reason::NOT_AUTHORIZED
            }
            DisconnectReason::DuplicateClientId => reason::SESSION_TAKEN_OVER,
            DisconnectReason::MqttKeepAliveTimeout => reason::KEEP_ALIVE_TIMEOUT,
            DisconnectReason::ServerInitiatedDisconnect => reason::SERVER_SHUTTING_DOWN,
            DisconnectReason::ApiInitiatedDisconnect => reason::ADMINISTRATIVE_ACTION,
            DisconnectReason::Throttled => reason::QUOTA_EXCEEDED,
            DisconnectReason::WebsocketTtlExpiration => reason::MAXIMUM_CONNECT_TIME,
            DisconnectReason::ServerError => reason::UNSPECIFIED_ERROR,
            DisconnectReason::ClientError => reason::PROTOCOL_ERROR,
            _ => return None,
        })
    }
}

/// What every event of one connection shares.
#[derive(Debug, Clone)]
pub struct EventIdentity {
    pub client_id: String,
    pub thing_name: Option<String>,
    pub session_identifier: String,
    pub principal_identifier: String,
}

/// Whether events are produced for `client_id`.
pub fn emits_events(client_id: &str) -> bool {
    !client_id.contains(['#', '+'])
}

fn base(id: &EventIdentity, timestamp_ms: i64, event_type: &str) -> OrderedObject {
    let mut m = OrderedObject::default();
    m.insert("clientId", json!(id.client_id));
    if let Some(thing) = &id.thing_name {
        m.insert("thingName", json!(thing));
    }
    m.insert("timestamp", json!(timestamp_ms));
    m.insert("eventType", json!(event_type));
    m.insert("sessionIdentifier", json!(id.session_identifier));
    m.insert("principalIdentifier", json!(id.principal_identifier));
    m
}

/// `$aws/events/presence/connected/{clientId}`.
pub fn connected(id: &EventIdentity, ts: i64, ip: &str, version: u64) -> (String, String) {
    let mut m = base(id, ts, "connected");
    m.insert("ipAddress", json!(ip));
    m.insert("versionNumber", json!(version));
    (
        format!("$aws/events/presence/connected/{}", id.client_id),
        m.to_json(),
    )
}

/// `$aws/events/presence/disconnected/{clientId}`.
pub fn disconnected(
    id: &EventIdentity,
    ts: i64,
    version: u64,
    reason: DisconnectReason,
) -> (String, String) {
    let mut m = base(id, ts, "disconnected");
    m.insert(
        "clientInitiatedDisconnect",
        json!(reason == DisconnectReason::ClientInitiatedDisconnect),
    );
    m.insert("disconnectReason", json!(reason.as_str()));
    m.insert("versionNumber", json!(version));
    (
        format!("$aws/events/presence/disconnected/{}", id.client_id),
        m.to_json(),
    )
}

/// `$aws/events/presence/connect_failed/{clientId}`.
pub fn connect_failed(id: &EventIdentity, ts: i64, ip: &str) -> (String, String) {
    let mut m = base(id, ts, "connect_failed");
    m.insert("connectFailureReason", json!("AUTHORIZATION_FAILED"));
    m.insert("ipAddress", json!(ip));
    (
        format!("$aws/events/presence/connect_failed/{}", id.client_id),
        m.to_json(),
    )
}

/// `$aws/events/subscriptions/subscribed|unsubscribed/{clientId}`.
pub fn subscriptions(
    id: &EventIdentity,
    ts: i64,
    subscribed: bool,
    topics: &[String],
) -> (String, String) {
    let kind = if subscribed {
        "subscribed"
    } else {
        "unsubscribed"
    };
    let mut m = base(id, ts, kind);
    m.insert("topics", json!(topics));
    (
        format!("$aws/events/subscriptions/{kind}/{}", id.client_id),
        m.to_json(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> EventIdentity {
        EventIdentity {
            client_id: "dev-1".into(),
            thing_name: None,
            session_identifier: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            principal_identifier: "p".into(),
        }
    }

    #[test]
    fn payloads_match_the_documented_shapes() {
        let (topic, v) = connected(&identity(), 1_700_000_000_123, "203.0.113.7", 3);
        assert_eq!(topic, "$aws/events/presence/connected/dev-1");
        assert_eq!(
            v,
            r#"{"clientId":"dev-1","timestamp":1700000000123,"eventType":"connected","sessionIdentifier":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0","principalIdentifier":"p","ipAddress":"203.0.113.7","versionNumber":3}"#
        );
        let (topic, v) = disconnected(&identity(), 5, 3, DisconnectReason::ConnectionLost);
        let v: Value = serde_json::from_str(&v).unwrap();
        assert_eq!(topic, "$aws/events/presence/disconnected/dev-1");
        assert_eq!(v["clientInitiatedDisconnect"], json!(false));
        assert_eq!(v["disconnectReason"], json!("CONNECTION_LOST"));
        assert!(v.get("ipAddress").is_none());
        let (_, v) = connect_failed(&identity(), 5, "::1");
        let v: Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["connectFailureReason"], json!("AUTHORIZATION_FAILED"));
        assert!(v.get("versionNumber").is_none());
        let (topic, v) = subscriptions(&identity(), 5, false, &["a/#".into()]);
        let v: Value = serde_json::from_str(&v).unwrap();
        assert_eq!(topic, "$aws/events/subscriptions/unsubscribed/dev-1");
        assert_eq!(v["topics"], json!(["a/#"]));
        assert!(!emits_events("a+b") && emits_events("ab"));
        let names: Vec<&str> = DisconnectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), 13);
        assert!(!DisconnectReason::ClientInitiatedDisconnect.sends_will());
    }
}
