//! Mooring's MQTT broker with AWS IoT Core semantics.
//!
//! [`codec`] is the hand-written MQTT 3.1.1/5.0 wire format; [`trie`] stores subscriptions;
//! [`broker`] holds sessions, routing, retained messages and wills; [`connection`] drives one
//! client, and `parking` keeps idle plain-TCP connections without a task; [`listener`] and
//! [`websocket`] accept clients over TCP, TLS and WebSocket;
//! [`lifecycle`] renders AWS's presence and subscription events; [`profile`] lists where the
//! `aws` profile departs from the MQTT specifications; [`auth`] is the hook through which
//! the IoT policy engine decides what clients may do; [`store`] keeps sessions, queued
//! messages and retained messages durable on the metadata store.
//!
//! Other services use the broker in-process through [`Broker`]: `publish`,
//! `subscribe_channel`/`subscribe_callback`, `add_publish_hook` and `deliver_to_client`; the
//! broker also implements core's `BrokerHandle`.

pub mod auth;
pub mod broker;
pub mod codec;
pub mod connection;
pub mod lifecycle;
pub mod listener;
mod parking;
pub mod profile;
pub mod store;
pub mod topic;
pub mod trie;
pub mod websocket;

use std::sync::Arc;

pub use auth::{AllowAll, Authorizer, ClientInfo, Principal, Transport};
pub use broker::{
    Broker, BrokerSettings, DurableReceiver, InternalSubscription, Kick, Message, Origin,
    PublishHook,
};
pub use profile::Profile;
pub use store::MessageProperties;

use mooring_core::ServiceContext;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("storage failed: {0}")]
    Store(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
}

/// Builds the broker from the service context: profile and anonymous access from `[mqtt]`,
/// the profile's limits adjusted by `[broker]`,
/// durable state in the metadata store. Registers it as core's broker handle.
pub fn start(ctx: &ServiceContext) -> anyhow::Result<Broker> {
    let tuning: profile::BrokerTuning = ctx.config.section("broker")?;
    let profile = tuning.apply(Profile::by_name(&ctx.config.mqtt.profile)?);
    let store = Arc::new(store::SqliteBrokerStore::new(ctx.db.clone())?);
    let broker = Broker::new(
        BrokerSettings {
            profile,
            allow_anonymous: ctx.config.mqtt.allow_anonymous,
            account_id: ctx.config.account_id.clone(),
        },
        store,
        ctx.clock.clone(),
        ctx.shutdown.clone(),
    )?;
    ctx.handles.set_broker(Arc::new(broker.clone()));
    broker.register_metrics(&ctx.metrics);
    tracing::info!(
        profile = broker.profile().name,
        sessions = broker.session_count(),
        "MQTT broker ready"
    );
    Ok(broker)
}
