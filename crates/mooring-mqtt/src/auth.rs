//! Who a client is and what it may do: the principal established by the transport, and the
//! [`Authorizer`] hook through which a policy engine decides connect, publish, subscribe and
//! receive.
//!
//! The broker itself establishes identity only: a client certificate signed by Mooring's CA
//! on the TLS listener, a SigV4-presigned WebSocket URL, or an anonymous client on the plain
//! listener (accepted when `mqtt.allow_anonymous` is true). Policies are not the broker's
//! business: the default [`AllowAll`] permits everything, and the IoT control plane installs
//! its own authorizer with [`crate::Broker::set_authorizer`].

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

/// How a client reached the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    WebSocket,
}

/// The identity a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials (plain listener or unsigned WebSocket).
    Anonymous,
    /// A client certificate, by AWS's certificate id (hex SHA-256 of the DER; the registry
    /// holds the rest).
    Certificate { certificate_id: Arc<str> },
    /// A SigV4-presigned WebSocket URL, by access key id.
    SigV4 { access_key_id: Arc<str> },
}

impl Principal {
    /// The lifecycle events' `principalIdentifier` (anonymous clients share one copy).
    pub fn identifier(&self, account_id: &str) -> Arc<str> {
        static ANONYMOUS: OnceLock<Arc<str>> = OnceLock::new();
        match self {
            Principal::Anonymous => ANONYMOUS.get_or_init(|| Arc::from("anonymous")).clone(),
            Principal::Certificate { certificate_id } => certificate_id.clone(),
            Principal::SigV4 { access_key_id } => {
                Arc::from(format!("{account_id}/{access_key_id}"))
            }
        }
    }
}

/// What the authorizer sees of a connected (or connecting) client.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Shared with the session (and the broker's maps), so a connection holds one copy.
    pub client_id: Arc<str>,
    pub principal: Principal,
    pub principal_identifier: Arc<str>,
    pub source_ip: Option<IpAddr>,
    pub transport: Transport,
    pub protocol_version: u8,
}

/// A CONNECT as the authorizer sees it.
#[derive(Debug, Clone)]
pub struct ConnectRequest<'a> {
    pub client: &'a ClientInfo,
    pub password: Option<&'a [u8]>,
    /// Clean session 0 / session expiry > 0 (`iot:ConnectAttributes` `PersistentConnect`).
    pub persistent: bool,
    /// The will topic, when the CONNECT carries a will (`LastWill`).
    pub will_topic: Option<&'a str>,
}

/// Decides what clients may do. Every method defaults to allowing.
pub trait Authorizer: Send + Sync + 'static {
    /// `iot:Connect` (and `iot:Publish` on the will topic). A refusal answers CONNACK
    /// "not authorized" and emits `connect_failed`.
    fn connect(&self, _request: &ConnectRequest<'_>) -> bool {
        true
    }
    /// `iot:Publish` (and `iot:RetainPublish` when `retain`).
    fn publish(&self, _client: &ClientInfo, _topic: &str, _retain: bool) -> bool {
        true
    }
    /// `iot:Subscribe` on the literal filter (including any `$share/` prefix).
    fn subscribe(&self, _client: &ClientInfo, _filter: &str) -> bool {
        true
    }
    /// `iot:Receive`, checked on every delivery; a refusal silently drops that delivery.
    fn receive(&self, _client: &ClientInfo, _topic: &str) -> bool {
        true
    }
    /// The thing the client's principal is attached to exclusively (AttachThingPrincipal with
    /// `EXCLUSIVE_THING`): its lifecycle events carry that `thingName`.
    fn exclusive_thing(&self, _client: &ClientInfo) -> Option<String> {
        None
    }
}

/// The authorizer in force until a policy engine is installed.
#[derive(Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {}
