//! The broker's [`Authorizer`] backed by IoT policies.
//!
//! A client's principal decides which policies apply: a certificate client gets the policies
//! attached to its certificate ARN (and is refused outright when the certificate is unknown
//! or not ACTIVE); an anonymous client on the dev listener gets the configured
//! `anonymous_policy`; a SigV4 (IAM credentials) WebSocket client holds the account's keys
//! and is allowed everything. Connect checks `iot:Connect` on `client/<id>` (plus
//! `iot:Publish` on the will topic), publishes `iot:Publish` (and `iot:RetainPublish`),
//! subscriptions `iot:Subscribe` on `topicfilter/<filter>`, deliveries `iot:Receive`.
//!
//! Evaluation contexts (policy variables) are built once per client and reused until the
//! security registry changes, so the per-message cost is one policy walk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mooring_mqtt::auth::ConnectRequest;
use mooring_mqtt::{Authorizer, ClientInfo, Principal};

use super::certificates::CertificateStatus;
use super::model::Security;
use super::policy::{decide, Context, PolicyDocument, Request};

/// Cached contexts beyond which the cache is cleared (bounded memory with many client ids).
const MAX_CACHED_CONTEXTS: usize = 100_000;

/// Principal identifier and client id.
type ClientKey = (Arc<str>, Arc<str>);

/// What applies to one client.
struct ClientPolicies {
    /// Unknown or inactive certificate: everything is refused.
    refused: bool,
    allow_all: bool,
    documents: Vec<Arc<PolicyDocument>>,
    context: Context,
}

/// IoT policy enforcement for the broker.
pub struct PolicyAuthorizer {
    security: Security,
    anonymous: Arc<PolicyDocument>,
    anonymous_allows_all: bool,
    cache: Mutex<HashMap<ClientKey, (u64, Arc<ClientPolicies>)>>,
}

impl PolicyAuthorizer {
    pub fn new(security: Security, anonymous: PolicyDocument) -> PolicyAuthorizer {
        PolicyAuthorizer {
            anonymous_allows_all: anonymous.allows_everything(),
            anonymous: Arc::new(anonymous),
            security,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn resource(&self, kind: &str, name: &str) -> String {
        self.security.arns().arn("iot", &format!("{kind}/{name}"))
    }

    /// The policies and variables of `client`, computed now.
    fn compute(&self, client: &ClientInfo) -> ClientPolicies {
        let mut context = Context::new();
        context.set("iot:ClientId", client.client_id.to_string());
        if let Some(ip) = client.source_ip {
            context.set("aws:SourceIp", ip.to_string());
        }
        match &client.principal {
            Principal::Anonymous => ClientPolicies {
                refused: false,
                allow_all: self.anonymous_allows_all,
                documents: vec![self.anonymous.clone()],
                context,
            },
            Principal::SigV4 { .. } => ClientPolicies {
                refused: false,
                allow_all: true,
                documents: Vec::new(),
                context,
            },
            Principal::Certificate { certificate_id } => {
                let Some(certificate) = self.security.certificate(certificate_id) else {
                    return ClientPolicies {
                        refused: true,
                        allow_all: false,
                        documents: Vec::new(),
                        context,
                    };
                };
                let facts = &certificate.facts;
                context.set("iot:CertificateId", certificate.id.clone());
                context.set("iot:Certificate.SerialNumber", facts.serial_number.clone());
                context.set(
                    "iot:Certificate.Validity.NotBefore",
                    facts.not_before.to_string(),
                );
                context.set(
                    "iot:Certificate.Validity.NotAfter",
                    facts.not_after.to_string(),
                );
                for (prefix, map) in [
                    ("iot:Certificate.Subject.", &facts.subject),
                    ("iot:Certificate.Issuer.", &facts.issuer),
                    (
                        "iot:Certificate.SubjectAlternativeName.",
                        &facts.alternative_names,
                    ),
                ] {
                    for (name, values) in map {
                        let key = format!("{prefix}{name}");
                        if let Some(first) = values.first() {
                            context.set(&key, first.clone());
                        }
                        for (i, v) in values.iter().enumerate() {
                            context.set(&format!("{key}.{i}"), v.clone());
                        }
                        context.set_all(&format!("{key}.List"), values.clone());
                    }
                }
                let attached = self
                    .security
                    .things_of(&certificate.arn)
                    .iter()
                    .any(|thing| *thing == *client.client_id);
                context.set(
                    "iot:Connection.Thing.IsAttached",
                    if attached { "true" } else { "false" },
                );
                if attached {
                    context.set(
                        "iot:Connection.Thing.ThingName",
                        client.client_id.to_string(),
                    );
                    if let Some(thing) = self.security.thing(&client.client_id) {
                        if let Some(t) = &thing.thing_type_name {
                            context.set("iot:Connection.Thing.ThingTypeName", t.clone());
                        }
                        for (k, v) in &thing.attributes {
                            context
                                .set(&format!("iot:Connection.Thing.Attributes[{k}]"), v.clone());
                        }
                    }
                }
                let mut documents = self.security.documents_for(&certificate.arn);
                if attached {
                    // The connection is its thing's: the policies of the thing's groups apply.
                    documents.extend(self.security.thing_group_documents(&client.client_id));
                }
                ClientPolicies {
                    refused: certificate.status != CertificateStatus::Active,
                    allow_all: false,
                    documents,
                    context,
                }
            }
        }
    }

    fn policies(&self, client: &ClientInfo) -> Arc<ClientPolicies> {
        let generation = self.security.generation();
        let key = (
            client.principal_identifier.clone(),
            client.client_id.clone(),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, p)) = cache.get(&key) {
            if *g == generation {
                return p.clone();
            }
        }
        let computed = Arc::new(self.compute(client));
        if cache.len() >= MAX_CACHED_CONTEXTS {
            cache.clear();
        }
        cache.insert(key, (generation, computed.clone()));
        computed
    }

    fn allowed(&self, policies: &ClientPolicies, action: &str, resource: &str) -> bool {
        if policies.refused {
            return false;
        }
        if policies.allow_all {
            return true;
        }
        decide(
            policies.documents.iter().map(|d| d.as_ref()),
            &Request { action, resource },
            &policies.context,
        )
        .allowed()
    }
}

impl Authorizer for PolicyAuthorizer {
    fn connect(&self, request: &ConnectRequest<'_>) -> bool {
        let mut policies = self.compute(request.client);
        let mut attributes = Vec::new();
        if request.persistent {
            attributes.push("PersistentConnect".to_string());
        }
        if request.will_topic.is_some() {
            attributes.push("LastWill".to_string());
        }
        policies
            .context
            .set_all("iot:ConnectAttributes", attributes);
        let client_arn = self.resource("client", &request.client.client_id);
        if !self.allowed(&policies, "iot:Connect", &client_arn) {
            return false;
        }
        match request.will_topic {
            Some(topic) => self.allowed(&policies, "iot:Publish", &self.resource("topic", topic)),
            None => true,
        }
    }

    fn exclusive_thing(&self, client: &ClientInfo) -> Option<String> {
        let Principal::Certificate { certificate_id } = &client.principal else {
            return None;
        };
        self.security
            .exclusive_thing_of(&self.security.certificate_arn(certificate_id))
    }

    fn publish(&self, client: &ClientInfo, topic: &str, retain: bool) -> bool {
        let policies = self.policies(client);
        if policies.allow_all && !policies.refused {
            return true;
        }
        let resource = self.resource("topic", topic);
        self.allowed(&policies, "iot:Publish", &resource)
            && (!retain || self.allowed(&policies, "iot:RetainPublish", &resource))
    }

    fn subscribe(&self, client: &ClientInfo, filter: &str) -> bool {
        let policies = self.policies(client);
        if policies.allow_all && !policies.refused {
            return true;
        }
        self.allowed(
            &policies,
            "iot:Subscribe",
            &self.resource("topicfilter", filter),
        )
    }

    fn receive(&self, client: &ClientInfo, topic: &str) -> bool {
        let policies = self.policies(client);
        if policies.allow_all && !policies.refused {
            return true;
        }
        self.allowed(&policies, "iot:Receive", &self.resource("topic", topic))
    }
}
