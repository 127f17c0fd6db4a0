//! The handles through which services call each other.
//!
//! Services never import each other's crates for runtime calls. Each one that offers
//! something to the others implements a trait from this module, and `mooring serve` fills a
//! shared [`ServiceHandles`] at wiring time. A consumer (an event-bus target that publishes to
//! MQTT, a rule that appends to a stream) asks the registry for the handle when it needs it;
//! a service that is not wired answers [`HandleError::Unavailable`].

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::future::BoxFuture;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HandleError {
    #[error("the {0} service is not running")]
    Unavailable(&'static str),
    #[error("{0} not found")]
    NotFound(String),
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A message handed to the broker for delivery, as a rule's republish or an event target
/// would send it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub message_expiry_interval: Option<u32>,
}

/// Publishing into the MQTT broker.
pub trait BrokerHandle: Send + Sync {
    fn publish(&self, message: PublishMessage) -> BoxFuture<'_, Result<(), HandleError>>;
}

/// Appending to a stream-manager stream; returns the sequence number assigned.
pub trait StreamsHandle: Send + Sync {
    fn append(&self, stream: &str, data: Bytes) -> BoxFuture<'_, Result<i64, HandleError>>;
}

/// Putting events on an event bus. Entries and results use PutEvents' JSON shapes
/// (`Source`, `DetailType`, … in; `EventId` or `ErrorCode`/`ErrorMessage` out).
pub trait EventsHandle: Send + Sync {
    fn put_events(
        &self,
        entries: Vec<serde_json::Value>,
    ) -> BoxFuture<'_, Result<Vec<serde_json::Value>, HandleError>>;
}

/// The late-bound registry of handles, shared by every service.
#[derive(Default)]
pub struct ServiceHandles {
    broker: OnceLock<Arc<dyn BrokerHandle>>,
    streams: OnceLock<Arc<dyn StreamsHandle>>,
    events: OnceLock<Arc<dyn EventsHandle>>,
}

impl std::fmt::Debug for ServiceHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandles")
            .field("broker", &self.broker.get().is_some())
            .field("streams", &self.streams.get().is_some())
            .field("events", &self.events.get().is_some())
            .finish()
    }
}

impl ServiceHandles {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_broker(&self, handle: Arc<dyn BrokerHandle>) {
        let _ = self.broker.set(handle);
    }

    pub fn set_streams(&self, handle: Arc<dyn StreamsHandle>) {
        let _ = self.streams.set(handle);
    }

    pub fn set_events(&self, handle: Arc<dyn EventsHandle>) {
        let _ = self.events.set(handle);
    }

    pub fn broker(&self) -> Result<&Arc<dyn BrokerHandle>, HandleError> {
        self.broker
            .get()
            .ok_or(HandleError::Unavailable("MQTT broker"))
    }

    pub fn streams(&self) -> Result<&Arc<dyn StreamsHandle>, HandleError> {
        self.streams
            .get()
            .ok_or(HandleError::Unavailable("stream manager"))
    }

    pub fn events(&self) -> Result<&Arc<dyn EventsHandle>, HandleError> {
        self.events
            .get()
            .ok_or(HandleError::Unavailable("event bus"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct RecordingBroker(Mutex<Vec<PublishMessage>>);

    impl BrokerHandle for RecordingBroker {
        fn publish(&self, message: PublishMessage) -> BoxFuture<'_, Result<(), HandleError>> {
            self.0.lock().unwrap().push(message);
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn handles_are_unavailable_until_wired() {
        let handles = ServiceHandles::new();
        assert_eq!(
            handles.broker().err(),
            Some(HandleError::Unavailable("MQTT broker"))
        );
        let broker = Arc::new(RecordingBroker::default());
        handles.set_broker(broker.clone());
        handles
            .broker()
            .unwrap()
            .publish(PublishMessage {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"hi"),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(broker.0.lock().unwrap()[0].topic, "a/b");
    }
}
