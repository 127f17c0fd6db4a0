//! The `[iot]` configuration section: rules declared in the file, local functions that
//! `lambda` actions invoke, and rules-engine tuning.
//!
//! ```toml
//! [iot.outbound]                    # s3, sqs and kinesis actions
//! endpoint_url = "http://127.0.0.1:5000"
//! access_key_id = "test"
//! secret_access_key = "test"
//!
//! [[iot.rules]]
//! name = "presence"
//! sql = "SELECT * FROM '$aws/events/#'"
//! actions = [{ lambda = { functionArn = "arn:aws:lambda:us-east-1:000000000000:function:broker" } }]
//!
//! [iot.functions.broker]            # a function name or a full function ARN
//! command = ["node", "broker.js"]   # receives the event JSON on stdin
//! # url = "http://127.0.0.1:9000/"  # or receives it as an HTTP POST body
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::TopicRulePayload;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IotConfig {
    /// Rules created (or replaced) at start-up.
    pub rules: Vec<DeclaredRule>,
    /// Local functions by function name or ARN.
    pub functions: BTreeMap<String, LocalFunction>,
    pub engine: EngineSettings,
    /// `[iot.security]`: DescribeEndpoint's address and the anonymous clients' policy.
    pub security: crate::security::SecuritySettings,
    /// `[iot.data]`: the iot-data HTTP API's publish rate limit.
    pub data: crate::iot_data::IotDataSettings,
    /// `[iot.jobs]`: timer and rollout tuning.
    pub jobs: crate::jobs::JobsConfig,
    /// Where the `s3`, `sqs` and `kinesis` actions send their calls.
    pub outbound: OutboundSettings,
}

/// The `[iot.outbound]` section: the AWS (or AWS-compatible) endpoint and credentials the
/// `s3`, `sqs` and `kinesis` actions call, and the `decode(..., 'proto', ...)` descriptor
/// reads. Empty strings mean "the SDK's default" (AWS's endpoint, the standard credential
/// chain, the process region).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundSettings {
    pub region: String,
    /// One endpoint for S3, SQS and Kinesis (moto, LocalStack).
    pub endpoint_url: String,
    pub s3_endpoint: String,
    pub sqs_endpoint: String,
    pub kinesis_endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

/// A rule declared in the configuration file; members mirror `TopicRulePayload`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredRule {
    pub name: String,
    pub sql: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default, alias = "awsIotSqlVersion")]
    pub sql_version: Option<String>,
    #[serde(default, alias = "ruleDisabled")]
    pub disabled: bool,
    #[serde(default)]
    pub actions: Vec<serde_json::Value>,
    #[serde(default, alias = "errorAction")]
    pub error_action: Option<serde_json::Value>,
}

impl DeclaredRule {
    pub fn payload(&self) -> TopicRulePayload {
        TopicRulePayload {
            sql: Some(self.sql.clone()),
            description: self.description.clone(),
            actions: Some(self.actions.clone()),
            rule_disabled: Some(self.disabled),
            aws_iot_sql_version: self.sql_version.clone(),
            error_action: self.error_action.clone(),
        }
    }
}

/// Where a `lambda` action's events go: an HTTP endpoint or a command.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalFunction {
    /// POSTed the event JSON; a 2xx answer is success.
    pub url: Option<String>,
    /// Started per event with the event JSON on stdin; exit status 0 is success.
    pub command: Option<Vec<String>>,
    /// Environment variables for the command.
    pub env: BTreeMap<String, String>,
    /// Longest a single invocation may take.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Matched messages waiting for their actions; beyond it new ones are dropped.
    pub queue_capacity: usize,
    /// Rule executions whose actions run at the same time.
    pub concurrency: usize,
    /// Attempts of an HTTP action (and a local function over HTTP) before it fails.
    pub http_attempts: u32,
    /// Timeout of one HTTP attempt.
    pub http_timeout_ms: u64,
    /// Backoff before the second attempt; doubled for each further one.
    pub http_backoff_ms: u64,
    /// Journal matched executions durably before their actions run (at-least-once actions).
    pub durable: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            queue_capacity: 10_000,
            concurrency: 64,
            http_attempts: 3,
            http_timeout_ms: 3_000,
            http_backoff_ms: 200,
            durable: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rules_and_functions_from_toml() {
        let text = r#"
            [[rules]]
            name = "presence"
            sql = "SELECT * FROM '$aws/events/#'"
            actions = [{ lambda = { functionArn = "arn:aws:lambda:us-east-1:0:function:broker" } }]

            [functions.broker]
            command = ["cat"]

            [engine]
            http_attempts = 5
        "#;
        let config: IotConfig = toml::from_str(text).unwrap();
        assert_eq!(config.rules[0].name, "presence");
        assert_eq!(
            config.rules[0].payload().actions.unwrap()[0]["lambda"]["functionArn"],
            "arn:aws:lambda:us-east-1:0:function:broker"
        );
        assert_eq!(
            config.functions["broker"].command.as_deref(),
            Some(&["cat".to_string()][..])
        );
        assert_eq!(config.engine.http_attempts, 5);
        assert_eq!(config.engine.queue_capacity, 10_000);
    }
}
