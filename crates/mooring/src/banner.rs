//! The start-up banner and the endpoints file.
//!
//! After every listener is bound, Mooring prints where each one is, the credentials, and
//! the exact lines a user types to point the AWS CLI and boto3 at it. The same addresses go
//! to `DATA_DIR/endpoints.json`, so scripts and tests that start Mooring on ephemeral ports
//! can find them.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use mooring_core::credentials::{aws_config_path, credentials_path, Credentials, PROFILE};
use mooring_core::Config;
use serde::Serialize;

/// The addresses the listeners actually bound.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoints {
    pub http: String,
    pub http_url: String,
    pub mqtt: Option<String>,
    pub mqtts: Option<String>,
    pub stream_manager: Option<String>,
    pub websocket_url: String,
    pub ca_certificate: String,
    pub credentials_file: String,
    pub aws_config_file: String,
    pub account_id: String,
    pub region: String,
}

impl Endpoints {
    pub fn new(
        config: &Config,
        http: SocketAddr,
        mqtt: Option<SocketAddr>,
        mqtts: Option<SocketAddr>,
        stream_manager: Option<SocketAddr>,
        data_dir: &Path,
    ) -> Self {
        let http_url = if config.http.public_url.is_empty() {
            format!("http://{http}")
        } else {
            config.public_http_url()
        };
        Endpoints {
            http: http.to_string(),
            websocket_url: format!("{}/mqtt", http_url.replacen("http", "ws", 1)),
            http_url,
            mqtt: mqtt.map(|a| a.to_string()),
            mqtts: mqtts.map(|a| a.to_string()),
            stream_manager: stream_manager.map(|a| a.to_string()),
            ca_certificate: data_dir.join("ca/ca.pem").display().to_string(),
            credentials_file: credentials_path(data_dir).display().to_string(),
            aws_config_file: aws_config_path(data_dir).display().to_string(),
            account_id: config.account_id.clone(),
            region: config.region.clone(),
        }
    }

    pub fn write(&self, data_dir: &Path) -> Result<()> {
        let path = data_dir.join("endpoints.json");
        let tmp = data_dir.join("endpoints.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }
}

pub fn render(endpoints: &Endpoints, credentials: &Credentials, auth_none: bool) -> String {
    let e = endpoints;
    let off = || "(disabled)".to_string();
    let mqtt = e
        .mqtt
        .as_ref()
        .map(|a| format!("mqtt://{a}"))
        .unwrap_or_else(off);
    let mqtts = e
        .mqtts
        .as_ref()
        .map(|a| format!("mqtts://{a}"))
        .unwrap_or_else(off);
    let sm = e.stream_manager.clone().unwrap_or_else(off);
    let (http, key, secret) = (
        &e.http_url,
        &credentials.access_key_id,
        &credentials.secret_access_key,
    );
    let (creds, cfg, region) = (&e.credentials_file, &e.aws_config_file, &e.region);
    let lines = [
        String::new(),
        format!("Mooring {} is serving.", env!("CARGO_PKG_VERSION")),
        String::new(),
        format!("  AWS APIs (HTTP)       {http}"),
        format!("  MQTT (TCP, dev)       {mqtt}"),
        format!("  MQTT over TLS         {mqtts}  (CA certificate {})", e.ca_certificate),
        format!("  MQTT over WebSocket   {}", e.websocket_url),
        format!("  Stream manager        {sm}"),
        format!("  Health and metrics    {http}/health  {http}/metrics"),
        String::new(),
        format!("  Account {}, region {region}", e.account_id),
        format!("  Access key id         {key}"),
        format!("  Secret access key     {secret}"),
        format!("  Written to            {creds} (profile \"{PROFILE}\") and {cfg}"),
        String::new(),
        "Point the AWS CLI at it:".to_string(),
        format!("  aws configure set aws_access_key_id {key} --profile {PROFILE}"),
        format!("  aws configure set aws_secret_access_key {secret} --profile {PROFILE}"),
        format!("  aws configure set region {region} --profile {PROFILE}"),
        format!("  aws --profile {PROFILE} --endpoint-url {http} iot list-things"),
        "or, without touching ~/.aws (boto3 and AWS CLI v2 also read the endpoint from it):"
            .to_string(),
        format!("  export AWS_SHARED_CREDENTIALS_FILE={creds} AWS_CONFIG_FILE={cfg} AWS_PROFILE={PROFILE}"),
        format!("  aws --endpoint-url {http} iot list-things"),
        "boto3:".to_string(),
        format!("  boto3.Session(profile_name=\"{PROFILE}\").client(\"iot\", endpoint_url=\"{http}\")"),
    ];
    let mut out = lines.join("\n");
    out.push('\n');
    if auth_none {
        out.push_str(
            "\nWARNING: auth = \"none\": requests are NOT authenticated. Use only for development.\n",
        );
    }
    out
}
