//! Connects the rules engine to the MQTT broker.
//!
//! Every message the broker routes (device publishes over TCP, TLS and WebSocket, Basic
//! Ingest publishes to `$aws/rules/{rule}/…` that reach no subscriber, lifecycle events on
//! `$aws/events/…`, and in-process publishes) passes through a broker publish hook into
//! [`RulesEngine::on_message`], carrying who sent it and its MQTT 5 properties so that
//! `clientid()`, `principal()`, `sourceip()` and `get_mqtt_property()` answer as on AWS.
//! A QoS 1 PUBACK (QoS 2 PUBREC) is sent only once the matched rule executions are in the
//! durable journal, so an acknowledged message's actions run even after a crash.

use std::sync::Arc;

use mooring_mqtt::{Broker, DurableReceiver, Message, PublishHook};

use crate::engine::{InboundMessage, RulesEngine};

/// Feeds every message `broker` routes to `engine`. For QoS 1 and 2 publishes the broker's
/// acknowledgement waits until the rule executions the message caused are journaled.
pub fn connect(broker: &Broker, engine: Arc<RulesEngine>) {
    broker.add_publish_hook(Arc::new(EngineHook {
        broker: broker.clone(),
        engine,
    }));
}

struct EngineHook {
    broker: Broker,
    engine: Arc<RulesEngine>,
}

impl PublishHook for EngineHook {
    fn on_publish(&self, message: &Arc<Message>) {
        self.engine.on_message(&inbound(message, self.broker.now()));
    }

    fn on_publish_durable(&self, message: &Arc<Message>) -> Option<DurableReceiver> {
        self.engine
            .on_message_durable(&inbound(message, self.broker.now()))
    }
}

/// The engine's view of a broker message received at `now_ms`.
pub fn inbound(message: &Message, now_ms: i64) -> InboundMessage {
    let properties = &message.properties;
    InboundMessage {
        topic: message.topic.clone(),
        payload: message.payload.clone(),
        qos: message.qos,
        retain: message.retain,
        client_id: message.origin.client_id.clone(),
        principal: message.origin.principal.clone(),
        source_ip: message.origin.source_ip.map(|ip| ip.to_string()),
        user_properties: properties.user_properties.clone(),
        content_type: properties.content_type.clone(),
        response_topic: properties.response_topic.clone(),
        correlation_data: properties
            .correlation_data
            .as_ref()
            .map(|d| bytes::Bytes::copy_from_slice(d)),
        payload_format_indicator: properties.payload_format_indicator,
        message_expiry_interval: message
            .expires_at_ms
            .map(|at| ((at - now_ms).max(0) / 1000) as u32),
        timestamp_ms: Some(now_ms),
        trace_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooring_mqtt::{MessageProperties, Origin};

    #[test]
    fn carries_origin_and_properties() {
        let message = Message {
            topic: "$aws/rules/r1/a".into(),
            payload: bytes::Bytes::from_static(b"{\"v\":1}"),
            qos: 1,
            retain: false,
            properties: MessageProperties {
                content_type: Some("application/json".into()),
                user_properties: vec![("k".into(), "v".into())],
                correlation_data: Some(b"c".to_vec()),
                ..Default::default()
            },
            expires_at_ms: Some(61_000),
            origin: Origin {
                client_id: Some("dev-1".into()),
                principal: Some("abc".into()),
                source_ip: Some("127.0.0.1".parse().unwrap()),
                protocol_version: Some(5),
            },
        };
        let inbound = inbound(&message, 1_000);
        assert_eq!(inbound.client_id.as_deref(), Some("dev-1"));
        assert_eq!(inbound.source_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(inbound.message_expiry_interval, Some(60));
        assert_eq!(inbound.correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(
            inbound.user_properties,
            vec![("k".to_string(), "v".to_string())]
        );
        assert_eq!(inbound.timestamp_ms, Some(1_000));
    }
}
