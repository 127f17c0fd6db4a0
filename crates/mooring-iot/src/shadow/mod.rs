//! The AWS IoT Device Shadow service: classic and named shadows of things, updated, read and
//! deleted over MQTT (`$aws/things/<thing>/shadow[/name/<shadow>]/get|update|delete`) and
//! over the `iot-data` HTTP API, and read from IoT SQL by `get_thing_shadow`.
//!
//! [`model`] holds the document rules (merge, delta, metadata, versions, every response
//! shape), [`store`] persists each shadow before anyone is answered, [`mqtt`] answers the
//! device topics, and [`api`] serves GetThingShadow, UpdateThingShadow, DeleteThingShadow and
//! ListNamedShadowsForThing. Responses (`accepted`, `rejected`, `delta`, `documents`) are
//! ordinary broker publishes: every authorized subscriber and the rules engine see them.

pub mod api;
pub mod model;
pub mod mqtt;
pub mod store;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use mooring_core::{Clock, ServiceContext};
use mooring_mqtt::{Broker, Message, MessageProperties, Origin};
use serde_json::Value;

use model::{Applied, ShadowError, ShadowKey, StoredShadow};
use store::{ShadowStore, SqliteShadowStore};

/// The shadow service: the store, the clock and (once attached) the broker it publishes on.
pub struct Shadows {
    store: Arc<dyn ShadowStore>,
    clock: Arc<dyn Clock>,
    broker: OnceLock<Broker>,
    /// Serializes read-modify-write of shadows.
    writes: tokio::sync::Mutex<()>,
}

fn internal(e: impl std::fmt::Display) -> ShadowError {
    tracing::error!(error = %e, "shadow store failed");
    ShadowError::new(500, "Internal service failure")
}

impl Shadows {
    pub fn open(ctx: &ServiceContext) -> anyhow::Result<Arc<Shadows>> {
        let store = SqliteShadowStore::open(ctx.db.clone())?;
        Ok(Shadows::with_store(Arc::new(store), ctx.clock.clone()))
    }

    pub fn with_store(store: Arc<dyn ShadowStore>, clock: Arc<dyn Clock>) -> Arc<Shadows> {
        Arc::new(Shadows {
            store,
            clock,
            broker: OnceLock::new(),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    /// Answers the device topics on `broker` and publishes responses there.
    pub fn attach_broker(self: &Arc<Self>, broker: &Broker) -> anyhow::Result<()> {
        let _ = self.broker.set(broker.clone());
        mqtt::attach(self.clone(), broker)
    }

    /// Epoch seconds.
    pub fn now(&self) -> i64 {
        self.clock.now_secs()
    }

    /// The stored shadow, or the 404 when it does not exist.
    pub async fn get(&self, key: &ShadowKey) -> Result<StoredShadow, ShadowError> {
        match self.store.get(key).await.map_err(internal)? {
            Some(s) if s.exists() => Ok(s),
            _ => Err(key.not_found()),
        }
    }

    /// The stored shadow, read synchronously (IoT SQL's `get_thing_shadow`).
    pub fn get_blocking(&self, key: &ShadowKey) -> Option<StoredShadow> {
        match self.store.get_blocking(key) {
            Ok(s) => s.filter(|s| s.exists()),
            Err(e) => {
                internal(e);
                None
            }
        }
    }

    /// Applies an update payload; the result is durable when this returns `Ok`.
    pub async fn update(&self, key: &ShadowKey, payload: &[u8]) -> Result<Applied, ShadowError> {
        let request = model::parse_update(payload)?;
        let _guard = self.writes.lock().await;
        let stored = self.store.get(key).await.map_err(internal)?;
        let applied = model::apply_update(stored.as_ref(), &request, self.now())?;
        self.store
            .put(key, &applied.current)
            .await
            .map_err(internal)?;
        Ok(applied)
    }

    /// Deletes a shadow (keeping its version); answers the `/delete/accepted` document.
    pub async fn delete(
        &self,
        key: &ShadowKey,
        client_token: Option<&str>,
    ) -> Result<Value, ShadowError> {
        let _guard = self.writes.lock().await;
        let stored = self.store.get(key).await.map_err(internal)?;
        let (tombstone, body) =
            model::apply_delete(key, stored.as_ref(), self.now(), client_token)?;
        self.store.put(key, &tombstone).await.map_err(internal)?;
        Ok(body)
    }

    /// The names of `thing`'s named shadows.
    pub async fn list_named(&self, thing: &str) -> Result<Vec<String>, ShadowError> {
        self.store.list_named(thing).await.map_err(internal)
    }

    /// Publishes `document` on `topic` as an ordinary broker message (no-op before a broker
    /// is attached).
    pub async fn publish(&self, topic: String, document: &Value, qos: u8) {
        let Some(broker) = self.broker.get() else {
            return;
        };
        let message = Message {
            topic,
            payload: Bytes::from(document.to_string()),
            qos,
            retain: false,
            properties: MessageProperties::default(),
            expires_at_ms: None,
            origin: Origin::default(),
        };
        if let Err(e) = broker.publish(message).await {
            tracing::warn!(error = %e, "publishing a shadow response failed");
        }
    }

    /// Publishes the `/update/accepted`, `/update/delta` and `/update/documents` messages of
    /// an accepted update, in that order.
    pub async fn publish_update(&self, key: &ShadowKey, applied: &Applied, qos: u8) {
        let prefix = key.topic_prefix();
        self.publish(format!("{prefix}/update/accepted"), &applied.accepted, qos)
            .await;
        if let Some(delta) = &applied.delta {
            self.publish(format!("{prefix}/update/delta"), delta, qos)
                .await;
        }
        self.publish(
            format!("{prefix}/update/documents"),
            &applied.documents,
            qos,
        )
        .await;
    }
}

#[cfg(test)]
mod tests;
