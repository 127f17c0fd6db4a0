//! The IoT security control plane and its enforcement on the broker.
//!
//! [`certificates`] issues and checks device certificates, [`policy`] parses and evaluates
//! policy documents, [`model`] is the registry of certificates, policies, policy attachments
//! and thing principals (persisted by [`store`]), [`api`] serves their `iot` operations, and
//! [`authorizer`] enforces the policies on the MQTT broker. [`SecuritySettings`] is the
//! `[iot.security]` configuration section:
//!
//! ```toml
//! [iot.security]
//! # Host name DescribeEndpoint returns for every endpoint type. It must resolve to this
//! # server and be covered by the MQTTS server certificate (issued for localhost and 127.0.0.1).
//! endpoint_address = "localhost"
//! # Policy for anonymous clients (plain listener, unsigned WebSocket; see
//! # mqtt.allow_anonymous). The default allows everything, for development.
//! anonymous_policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}'
//! ```
//!
//! Certificate clients on the MQTTS listener get the policies attached to their certificate
//! and are refused unless the certificate is registered and ACTIVE; SigV4 WebSocket clients
//! hold the account's credentials and are allowed everything.

pub mod api;
pub mod authorizer;
pub mod certificates;
pub mod model;
pub mod policy;
pub mod store;

use std::sync::Arc;

use anyhow::Context as _;
use mooring_core::ServiceContext;
use mooring_mqtt::lifecycle::DisconnectReason;
use mooring_mqtt::{Broker, Principal};
use serde::Deserialize;

pub use authorizer::PolicyAuthorizer;
pub use model::Security;
pub use policy::PolicyDocument;

use crate::registry::things::ThingRegistry;

/// The default `anonymous_policy`: everything allowed.
pub const ALLOW_ALL_POLICY: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#;

/// The endpoint types DescribeEndpoint knows.
pub const ENDPOINT_TYPES: [&str; 4] = [
    "iot:Data",
    "iot:Data-ATS",
    "iot:CredentialProvider",
    "iot:Jobs",
];

/// The `[iot.security]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecuritySettings {
    /// What DescribeEndpoint answers for every endpoint type.
    pub endpoint_address: String,
    /// The policy document applied to anonymous clients.
    pub anonymous_policy: String,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        SecuritySettings {
            endpoint_address: "localhost".into(),
            anonymous_policy: ALLOW_ALL_POLICY.into(),
        }
    }
}

impl SecuritySettings {
    /// The address for `endpoint_type` (absent means `iot:Data`), or `None` when the type
    /// is not one AWS knows.
    pub fn endpoint_address(&self, endpoint_type: Option<&str>) -> Option<String> {
        let kind = endpoint_type.unwrap_or("iot:Data");
        ENDPOINT_TYPES
            .iter()
            .any(|t| t.eq_ignore_ascii_case(kind))
            .then(|| self.endpoint_address.clone())
    }
}

/// The security registry plus what the broker needs from it.
#[derive(Clone)]
pub struct SecurityPlane {
    pub registry: Security,
    pub settings: Arc<SecuritySettings>,
    anonymous_policy: Arc<PolicyDocument>,
}

impl SecurityPlane {
    /// Opens the registry on the metadata database and starts following the things
    /// registry. Needs a Tokio runtime.
    pub fn start(
        ctx: &ServiceContext,
        settings: SecuritySettings,
        things: ThingRegistry,
    ) -> anyhow::Result<SecurityPlane> {
        let anonymous_policy = PolicyDocument::parse(&settings.anonymous_policy)
            .map_err(|e| anyhow::anyhow!("[iot.security] anonymous_policy: {e}"))?;
        let store = Arc::new(
            store::SqliteSecurityStore::open(ctx.db.clone())
                .context("opening the security store")?,
        );
        let registry = Security::open(store, ctx.arns.clone(), ctx.ca.clone(), things)?;
        registry.follow_things();
        Ok(SecurityPlane {
            registry,
            settings: Arc::new(settings),
            anonymous_policy: Arc::new(anonymous_policy),
        })
    }

    /// Installs policy enforcement on `broker`, and closes the live connections of a
    /// certificate that stops being ACTIVE.
    pub fn install(&self, broker: &Broker) {
        broker.set_authorizer(Arc::new(PolicyAuthorizer::new(
            self.registry.clone(),
            (*self.anonymous_policy).clone(),
        )));
        let broker = broker.clone();
        self.registry.on_certificate_revoked(move |id| {
            let closed = broker.disconnect_clients(
                |client| {
                    matches!(&client.principal,
                        Principal::Certificate { certificate_id } if &**certificate_id == id)
                },
                DisconnectReason::AuthError,
            );
            if closed > 0 {
                tracing::info!(
                    certificate_id = id,
                    closed,
                    "closed connections of a deactivated certificate"
                );
            }
        });
    }
}
