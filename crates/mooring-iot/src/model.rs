//! Topic rules: their wire shape, validation, compilation, and the operations on them.
//!
//! A rule is kept as AWS returns it (the `TopicRulePayload` members, the actions as the JSON
//! the client sent) plus its name, ARN and creation time. Before a rule is stored it is
//! compiled: the SQL is parsed under its version (a failure is `SqlParseException`), every
//! action is checked to have exactly one supported type with its required fields, and every
//! substitution template is parsed. The compiled form is what the [`RulesEngine`] runs.
//! [`TopicRules`] implements the control-plane operations over a [`RuleStore`] and keeps
//! the engine's rule set current after every change.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::engine::RulesEngine;
use crate::sql::template::Template;
use crate::sql::{self, SqlVersion, Statement};
use crate::store::RuleStore;

/// The action types Mooring carries out.
pub const SUPPORTED_ACTIONS: &[&str] = &["republish", "http", "lambda", "kinesis", "s3", "sqs"];

/// The `cannedAcl` values of the `s3` action.
pub const CANNED_ACLS: &[&str] = &[
    "private",
    "public-read",
    "public-read-write",
    "aws-exec-read",
    "authenticated-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
    "log-delivery-write",
];

/// Every action type in the `iot` model, supported or not.
pub const KNOWN_ACTIONS: &[&str] = &[
    "dynamoDB",
    "dynamoDBv2",
    "lambda",
    "sns",
    "sqs",
    "kinesis",
    "republish",
    "s3",
    "firehose",
    "cloudwatchMetric",
    "cloudwatchAlarm",
    "cloudwatchLogs",
    "elasticsearch",
    "salesforce",
    "iotAnalytics",
    "iotEvents",
    "iotSiteWise",
    "stepFunctions",
    "timestream",
    "http",
    "kafka",
    "openSearch",
    "location",
    "influxDB",
];

/// `TopicRulePayload` as it travels in CreateTopicRule and ReplaceTopicRule.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopicRulePayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_iot_sql_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_action: Option<serde_json::Value>,
}

/// A rule as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredRule {
    pub name: String,
    pub arn: String,
    pub payload: TopicRulePayload,
    /// Epoch seconds with fraction.
    pub created_at: f64,
    pub tags: Vec<(String, String)>,
}

impl StoredRule {
    pub fn disabled(&self) -> bool {
        self.payload.rule_disabled.unwrap_or(false)
    }

    pub fn sql_version(&self) -> SqlVersion {
        self.payload
            .aws_iot_sql_version
            .as_deref()
            .and_then(SqlVersion::parse)
            .unwrap_or(SqlVersion::DEFAULT)
    }

    /// The FROM filter, as ListTopicRules reports it in `topicPattern`.
    pub fn topic_pattern(&self) -> Option<String> {
        let sql = self.payload.sql.as_deref()?;
        sql::parse(sql, self.sql_version()).ok()?.from
    }
}

/// Why an operation on rules failed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{0}")]
    SqlParse(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("rule {0} already exists")]
    AlreadyExists(String),
    #[error("rule {0} does not exist")]
    NotFound(String),
    #[error("storage failed: {0}")]
    Store(String),
}

impl From<mooring_core::store::StoreError> for RuleError {
    fn from(e: mooring_core::store::StoreError) -> Self {
        RuleError::Store(e.to_string())
    }
}

/// MQTT 5 headers of a republish action, each a template.
#[derive(Debug, Clone, Default)]
pub struct CompiledHeaders {
    pub payload_format_indicator: Option<Template>,
    pub content_type: Option<Template>,
    pub response_topic: Option<Template>,
    pub correlation_data: Option<Template>,
    pub message_expiry: Option<Template>,
    pub user_properties: Vec<(Template, Template)>,
}

/// The `auth.sigv4` member of an `http` action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigV4Signing {
    pub signing_region: String,
    pub service_name: String,
}

/// One action, ready to run.
#[derive(Debug, Clone)]
pub enum CompiledAction {
    Republish {
        topic: Template,
        qos: u8,
        headers: CompiledHeaders,
    },
    Http {
        url: Template,
        headers: Vec<(String, Template)>,
        /// `auth.sigv4`: sign each request with the `[iot.outbound]` credentials.
        sigv4: Option<SigV4Signing>,
    },
    Lambda {
        function_arn: String,
    },
    Kinesis {
        stream_name: String,
        partition_key: Option<Template>,
    },
    S3 {
        bucket_name: Template,
        key: Template,
        canned_acl: Option<String>,
    },
    Sqs {
        queue_url: Template,
        use_base64: bool,
    },
}

impl CompiledAction {
    /// The name AWS uses for the action in error-action payloads (`failedAction`).
    pub fn failed_action_name(&self) -> &'static str {
        match self {
            CompiledAction::Republish { .. } => "RepublishAction",
            CompiledAction::Http { .. } => "HttpAction",
            CompiledAction::Lambda { .. } => "LambdaAction",
            CompiledAction::Kinesis { .. } => "KinesisAction",
            CompiledAction::S3 { .. } => "S3Action",
            CompiledAction::Sqs { .. } => "SqsAction",
        }
    }

    /// The action's key in the rule (`republish`, `http`, ...), for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CompiledAction::Republish { .. } => "republish",
            CompiledAction::Http { .. } => "http",
            CompiledAction::Lambda { .. } => "lambda",
            CompiledAction::Kinesis { .. } => "kinesis",
            CompiledAction::S3 { .. } => "s3",
            CompiledAction::Sqs { .. } => "sqs",
        }
    }
}

/// A rule ready for the engine.
#[derive(Debug)]
pub struct CompiledRule {
    pub name: String,
    pub arn: String,
    pub disabled: bool,
    pub statement: Statement,
    pub actions: Vec<CompiledAction>,
    pub error_action: Option<CompiledAction>,
}

/// Checks a rule name: `^[a-zA-Z0-9_]+$`, 1 to 128 characters.
pub fn validate_rule_name(name: &str) -> Result<(), RuleError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(RuleError::InvalidRequest(format!(
            "1 validation error detected: Value '{name}' at 'ruleName' failed to satisfy constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9_]+$"
        )))
    }
}

/// Compiles a rule, or explains why it cannot run.
pub fn compile(rule: &StoredRule) -> Result<CompiledRule, RuleError> {
    let payload = &rule.payload;
    let version = match payload.aws_iot_sql_version.as_deref() {
        None => SqlVersion::DEFAULT,
        Some(v) => SqlVersion::parse(v).ok_or_else(|| {
            RuleError::InvalidRequest(format!(
                "Invalid awsIotSqlVersion '{v}': expected 2015-10-08, 2016-03-23 or beta"
            ))
        })?,
    };
    let sql_text = payload
        .sql
        .as_deref()
        .ok_or_else(|| RuleError::InvalidRequest("sql is required".into()))?;
    let statement = sql::parse(sql_text, version).map_err(|e| RuleError::SqlParse(e.message()))?;
    let actions = payload
        .actions
        .as_ref()
        .ok_or_else(|| RuleError::InvalidRequest("actions is required".into()))?;
    if actions.len() > 10 {
        return Err(RuleError::InvalidRequest(
            "A rule can have at most 10 actions".into(),
        ));
    }
    let actions = actions
        .iter()
        .enumerate()
        .map(|(i, a)| compile_action(a, version, &format!("actions[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let error_action = payload
        .error_action
        .as_ref()
        .map(|a| compile_action(a, version, "errorAction"))
        .transpose()?;
    Ok(CompiledRule {
        name: rule.name.clone(),
        arn: rule.arn.clone(),
        disabled: rule.disabled(),
        statement,
        actions,
        error_action,
    })
}

fn invalid(message: String) -> RuleError {
    RuleError::InvalidRequest(message)
}

fn template(value: &str, version: SqlVersion, field: &str) -> Result<Template, RuleError> {
    Template::parse(value, version).map_err(|e| {
        invalid(format!(
            "Invalid substitution template in {field}: {}",
            e.message()
        ))
    })
}

fn required_str<'a>(
    object: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
    at: &str,
) -> Result<&'a str, RuleError> {
    match object.get(key) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(invalid(format!("{at}.{key} is required"))),
    }
}

fn optional_str<'a>(
    object: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<&'a str> {
    object.get(key).and_then(|v| v.as_str())
}

/// Compiles one `Action` object (exactly one member naming its type).
pub fn compile_action(
    action: &serde_json::Value,
    version: SqlVersion,
    at: &str,
) -> Result<CompiledAction, RuleError> {
    let Some(object) = action.as_object() else {
        return Err(invalid(format!("{at} must be an object")));
    };
    let present: Vec<&String> = object.keys().collect();
    let [kind] = present.as_slice() else {
        return Err(invalid(format!(
            "{at} must specify exactly one action type, found {}",
            present.len()
        )));
    };
    let kind = kind.as_str();
    if !SUPPORTED_ACTIONS.contains(&kind) {
        let known = if KNOWN_ACTIONS.contains(&kind) {
            "is not supported by Mooring"
        } else {
            "is not an action type"
        };
        return Err(invalid(format!(
            "{at}: action type '{kind}' {known}; supported action types are {}",
            SUPPORTED_ACTIONS.join(", ")
        )));
    }
    let here = format!("{at}.{kind}");
    let Some(fields) = object[kind].as_object() else {
        return Err(invalid(format!("{here} must be an object")));
    };
    match kind {
        "republish" => {
            required_str(fields, "roleArn", &here)?;
            let topic_text = required_str(fields, "topic", &here)?;
            let topic = template(topic_text, version, &format!("{here}.topic"))?;
            let qos = match fields.get("qos") {
                None | Some(serde_json::Value::Null) => 0,
                Some(q) => match q.as_u64() {
                    Some(q @ 0..=1) => q as u8,
                    _ => return Err(invalid(format!("{here}.qos must be 0 or 1"))),
                },
            };
            let mut headers = CompiledHeaders::default();
            if let Some(h) = fields.get("headers").and_then(|h| h.as_object()) {
                let t = |key: &str| -> Result<Option<Template>, RuleError> {
                    optional_str(h, key)
                        .map(|v| template(v, version, &format!("{here}.headers.{key}")))
                        .transpose()
                };
                headers.payload_format_indicator = t("payloadFormatIndicator")?;
                headers.content_type = t("contentType")?;
                headers.response_topic = t("responseTopic")?;
                headers.correlation_data = t("correlationData")?;
                headers.message_expiry = t("messageExpiry")?;
                if let Some(props) = h.get("userProperties").and_then(|p| p.as_array()) {
                    for (i, p) in props.iter().enumerate() {
                        let p = p.as_object().ok_or_else(|| {
                            invalid(format!(
                                "{here}.headers.userProperties[{i}] must be an object"
                            ))
                        })?;
                        let at = format!("{here}.headers.userProperties[{i}]");
                        let key = template(required_str(p, "key", &at)?, version, &at)?;
                        let value = template(required_str(p, "value", &at)?, version, &at)?;
                        headers.user_properties.push((key, value));
                    }
                }
            }
            Ok(CompiledAction::Republish {
                topic,
                qos,
                headers,
            })
        }
        "http" => {
            let url_text = required_str(fields, "url", &here)?;
            let lower = url_text.to_ascii_lowercase();
            if !(lower.starts_with("https://") || lower.starts_with("http://")) {
                return Err(invalid(format!("{here}.url must be an http(s) URL")));
            }
            let url = template(url_text, version, &format!("{here}.url"))?;
            let mut headers = Vec::new();
            if let Some(list) = fields.get("headers").and_then(|h| h.as_array()) {
                for (i, h) in list.iter().enumerate() {
                    let at = format!("{here}.headers[{i}]");
                    let h = h
                        .as_object()
                        .ok_or_else(|| invalid(format!("{at} must be an object")))?;
                    let key = required_str(h, "key", &at)?.to_string();
                    let value = template(required_str(h, "value", &at)?, version, &at)?;
                    headers.push((key, value));
                }
            }
            let sigv4 = match fields.get("auth") {
                None | Some(serde_json::Value::Null) => None,
                Some(auth) => {
                    let at = format!("{here}.auth.sigv4");
                    let sigv4 = auth
                        .get("sigv4")
                        .and_then(|s| s.as_object())
                        .ok_or_else(|| invalid(format!("{at} is required when auth is given")))?;
                    required_str(sigv4, "roleArn", &at)?;
                    Some(SigV4Signing {
                        signing_region: required_str(sigv4, "signingRegion", &at)?.to_string(),
                        service_name: required_str(sigv4, "serviceName", &at)?.to_string(),
                    })
                }
            };
            Ok(CompiledAction::Http {
                url,
                headers,
                sigv4,
            })
        }
        "lambda" => Ok(CompiledAction::Lambda {
            function_arn: required_str(fields, "functionArn", &here)?.to_string(),
        }),
        "kinesis" => {
            required_str(fields, "roleArn", &here)?;
            let stream_name = required_str(fields, "streamName", &here)?.to_string();
            let partition_key = optional_str(fields, "partitionKey")
                .map(|p| template(p, version, &format!("{here}.partitionKey")))
                .transpose()?;
            Ok(CompiledAction::Kinesis {
                stream_name,
                partition_key,
            })
        }
        "s3" => {
            required_str(fields, "roleArn", &here)?;
            let bucket_name = template(
                required_str(fields, "bucketName", &here)?,
                version,
                &format!("{here}.bucketName"),
            )?;
            let key = template(
                required_str(fields, "key", &here)?,
                version,
                &format!("{here}.key"),
            )?;
            let canned_acl = optional_str(fields, "cannedAcl").map(str::to_string);
            if let Some(acl) = &canned_acl {
                if !CANNED_ACLS.contains(&acl.as_str()) {
                    return Err(invalid(format!(
                        "{here}.cannedAcl '{acl}' is not one of {}",
                        CANNED_ACLS.join(", ")
                    )));
                }
            }
            Ok(CompiledAction::S3 {
                bucket_name,
                key,
                canned_acl,
            })
        }
        "sqs" => {
            required_str(fields, "roleArn", &here)?;
            let queue_url = template(
                required_str(fields, "queueUrl", &here)?,
                version,
                &format!("{here}.queueUrl"),
            )?;
            let use_base64 = match fields.get("useBase64") {
                None | Some(serde_json::Value::Null) => false,
                Some(serde_json::Value::Bool(b)) => *b,
                Some(_) => return Err(invalid(format!("{here}.useBase64 must be a boolean"))),
            };
            Ok(CompiledAction::Sqs {
                queue_url,
                use_base64,
            })
        }
        _ => unreachable!("checked against SUPPORTED_ACTIONS"),
    }
}

/// Parses the `x-amz-tagging` header (`k1=v1&k2=v2`, URL-encoded).
pub fn parse_tagging(header: &str) -> Vec<(String, String)> {
    header
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

/// A page of rules.
#[derive(Debug, Clone)]
pub struct RulePage {
    pub rules: Vec<StoredRule>,
    pub next_token: Option<String>,
}

/// The topic-rule operations, over the store, keeping the engine in step.
#[derive(Clone)]
pub struct TopicRules {
    store: Arc<dyn RuleStore>,
    engine: Arc<RulesEngine>,
    arns: mooring_core::Arns,
    clock: Arc<dyn mooring_core::Clock>,
}

impl TopicRules {
    pub fn new(
        store: Arc<dyn RuleStore>,
        engine: Arc<RulesEngine>,
        arns: mooring_core::Arns,
        clock: Arc<dyn mooring_core::Clock>,
    ) -> TopicRules {
        TopicRules {
            store,
            engine,
            arns,
            clock,
        }
    }

    pub fn arn(&self, name: &str) -> String {
        self.arns.arn("iot", &format!("rule/{name}"))
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn RuleStore) -> Result<R, RuleError> + Send + 'static,
    ) -> Result<R, RuleError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| RuleError::Store(e.to_string()))?
    }

    /// Loads every stored rule into the engine (at start-up; blocking).
    pub fn load_into_engine_blocking(&self) -> Result<usize, RuleError> {
        let rules = self.store.list()?;
        self.engine.replace_all(&rules);
        Ok(rules.len())
    }

    async fn refresh_engine(&self) -> Result<(), RuleError> {
        let rules = self.blocking(|s| Ok(s.list()?)).await?;
        self.engine.replace_all(&rules);
        Ok(())
    }

    pub async fn create(
        &self,
        name: &str,
        payload: TopicRulePayload,
        tags: Vec<(String, String)>,
    ) -> Result<StoredRule, RuleError> {
        validate_rule_name(name)?;
        let rule = StoredRule {
            name: name.to_string(),
            arn: self.arn(name),
            payload,
            created_at: self.clock.now_millis() as f64 / 1000.0,
            tags,
        };
        compile(&rule)?;
        let to_store = rule.clone();
        let inserted = self.blocking(move |s| Ok(s.insert(&to_store)?)).await?;
        if !inserted {
            return Err(RuleError::AlreadyExists(name.to_string()));
        }
        self.refresh_engine().await?;
        Ok(rule)
    }

    pub async fn get(&self, name: &str) -> Result<StoredRule, RuleError> {
        let key = name.to_string();
        self.blocking(move |s| Ok(s.get(&key)?))
            .await?
            .ok_or_else(|| RuleError::NotFound(name.to_string()))
    }

    pub async fn list(
        &self,
        topic: Option<String>,
        disabled: Option<bool>,
        max_results: usize,
        next_token: Option<String>,
    ) -> Result<RulePage, RuleError> {
        let mut rules = self.blocking(|s| Ok(s.list()?)).await?;
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        let after =
            match next_token {
                Some(token) => Some(decode_token(&token).ok_or_else(|| {
                    RuleError::InvalidRequest("The nextToken is not valid".into())
                })?),
                None => None,
            };
        let mut selected: Vec<StoredRule> = rules
            .into_iter()
            .filter(|r| after.as_ref().is_none_or(|a| r.name.as_str() > a.as_str()))
            .filter(|r| disabled.is_none_or(|d| r.disabled() == d))
            .filter(|r| match &topic {
                None => true,
                Some(t) => r
                    .topic_pattern()
                    .is_some_and(|p| p == *t || crate::topic::matches(&p, t)),
            })
            .collect();
        let next_token = if selected.len() > max_results {
            selected.truncate(max_results);
            selected.last().map(|r| encode_token(&r.name))
        } else {
            None
        };
        Ok(RulePage {
            rules: selected,
            next_token,
        })
    }

    pub async fn replace(&self, name: &str, payload: TopicRulePayload) -> Result<(), RuleError> {
        let mut rule = self.get(name).await?;
        rule.payload = payload;
        compile(&rule)?;
        let updated = self.blocking(move |s| Ok(s.update(&rule)?)).await?;
        if !updated {
            return Err(RuleError::NotFound(name.to_string()));
        }
        self.refresh_engine().await
    }

    pub async fn delete(&self, name: &str) -> Result<(), RuleError> {
        let key = name.to_string();
        let deleted = self.blocking(move |s| Ok(s.delete(&key)?)).await?;
        if !deleted {
            return Err(RuleError::NotFound(name.to_string()));
        }
        self.refresh_engine().await
    }

    pub async fn set_disabled(&self, name: &str, disabled: bool) -> Result<(), RuleError> {
        let mut rule = self.get(name).await?;
        rule.payload.rule_disabled = Some(disabled);
        let updated = self.blocking(move |s| Ok(s.update(&rule)?)).await?;
        if !updated {
            return Err(RuleError::NotFound(name.to_string()));
        }
        self.refresh_engine().await
    }

    /// Creates or replaces a rule declared in the configuration file, keeping its creation
    /// time when it already exists (at start-up; blocking; the engine is not refreshed).
    pub fn upsert_declared_blocking(
        &self,
        name: &str,
        payload: TopicRulePayload,
    ) -> Result<(), RuleError> {
        validate_rule_name(name)?;
        let existing = self.store.get(name)?;
        let rule = StoredRule {
            name: name.to_string(),
            arn: self.arn(name),
            payload,
            created_at: existing
                .as_ref()
                .map(|r| r.created_at)
                .unwrap_or(self.clock.now_millis() as f64 / 1000.0),
            tags: existing
                .as_ref()
                .map(|r| r.tags.clone())
                .unwrap_or_default(),
        };
        compile(&rule)?;
        if existing.is_some() {
            self.store.update(&rule)?;
        } else {
            self.store.insert(&rule)?;
        }
        Ok(())
    }
}

fn encode_token(name: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name.as_bytes())
}

fn decode_token(token: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.as_bytes())
        .ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(sql: &str, actions: serde_json::Value) -> StoredRule {
        StoredRule {
            name: "r".into(),
            arn: "arn:aws:iot:us-east-1:000000000000:rule/r".into(),
            payload: TopicRulePayload {
                sql: Some(sql.into()),
                actions: serde_json::from_value(actions).unwrap(),
                ..Default::default()
            },
            created_at: 0.0,
            tags: vec![],
        }
    }

    #[test]
    fn compiles_supported_actions_and_refuses_the_rest() {
        let ok = rule(
            "SELECT * FROM 'a/#'",
            json!([
                {"republish": {"roleArn": "arn:aws:iam::1:role/r", "topic": "${topic()}/out", "qos": 1}},
                {"http": {"url": "https://example.com/${topic(2)}", "headers": [{"key": "x-a", "value": "${clientid()}"}]}},
                {"lambda": {"functionArn": "arn:aws:lambda:us-east-1:1:function:f"}},
                {"kinesis": {"roleArn": "arn:aws:iam::1:role/r", "streamName": "s", "partitionKey": "${newuuid()}"}}
            ]),
        );
        let compiled = compile(&ok).unwrap();
        assert_eq!(compiled.actions.len(), 4);
        assert_eq!(compiled.statement.from.as_deref(), Some("a/#"));

        let outbound = rule(
            "SELECT * FROM 'a'",
            json!([
                {"s3": {"roleArn": "r", "bucketName": "b", "key": "${topic()}/${timestamp()}", "cannedAcl": "private"}},
                {"sqs": {"roleArn": "r", "queueUrl": "http://q/1/q", "useBase64": true}}
            ]),
        );
        assert_eq!(compile(&outbound).unwrap().actions.len(), 2);
        let bad_acl = rule(
            "SELECT * FROM 'a'",
            json!([{"s3": {"roleArn": "r", "bucketName": "b", "key": "k", "cannedAcl": "open"}}]),
        );
        assert!(compile(&bad_acl).is_err());
        let dynamo = rule(
            "SELECT * FROM 'a'",
            json!([{"dynamoDB": {"roleArn": "r", "tableName": "t"}}]),
        );
        let err = compile(&dynamo).unwrap_err().to_string();
        assert!(
            err.contains("'dynamoDB' is not supported by Mooring"),
            "{err}"
        );
        let two = rule(
            "SELECT * FROM 'a'",
            json!([{"lambda": {"functionArn": "f"}, "http": {"url": "https://x"}}]),
        );
        assert!(compile(&two)
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
        let missing = rule("SELECT * FROM 'a'", json!([{"republish": {"topic": "x"}}]));
        assert!(compile(&missing)
            .unwrap_err()
            .to_string()
            .contains("roleArn is required"));
        let bad_template = rule(
            "SELECT * FROM 'a'",
            json!([{"republish": {"roleArn": "r", "topic": "${topic(}"}}]),
        );
        assert!(matches!(
            compile(&bad_template),
            Err(RuleError::InvalidRequest(_))
        ));
        let bad_sql = rule("SELECT * FORM 'a'", json!([]));
        assert!(matches!(compile(&bad_sql), Err(RuleError::SqlParse(_))));
    }

    #[test]
    fn rule_names_and_tags_are_validated_and_parsed() {
        assert!(validate_rule_name("my_rule_1").is_ok());
        assert!(validate_rule_name("bad-name").is_err());
        assert!(validate_rule_name("").is_err());
        assert!(validate_rule_name(&"a".repeat(129)).is_err());
        assert_eq!(
            parse_tagging("env=prod&team=a%20b"),
            vec![("env".into(), "prod".into()), ("team".into(), "a b".into())]
        );
    }
}
