//! Mooring's configuration: one TOML document assembled from three layers.
//!
//! The layers, weakest first, are the TOML file named by `--config`, environment variables
//! named `MOORING_*`, and command-line flags. Every layer is turned into a TOML table and
//! merged key by key before the result is deserialized, so a flag overrides the same key
//! from the environment, which overrides the file, and anything not given keeps its
//! embedded default. Nesting in environment variables uses a double underscore:
//! `MOORING_HTTP__LISTEN=0.0.0.0:4566` sets `http.listen`; `MOORING_DATA_DIR` sets
//! `data_dir`. Service sections that core does not know are kept verbatim and read by the
//! service with [`Config::section`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The complete, merged configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where every piece of state lives.
    pub data_dir: PathBuf,
    /// The 12-digit account id used in every ARN.
    #[serde(deserialize_with = "lenient_string")]
    pub account_id: String,
    /// The region used in ARNs and in generated endpoints.
    #[serde(deserialize_with = "lenient_string")]
    pub region: String,
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `mooring=debug`.
    #[serde(deserialize_with = "lenient_string")]
    pub log_level: String,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub stream_manager: StreamManagerConfig,
    /// Sections owned by individual services (`[events]`, `[video]`, …), kept as raw TOML.
    #[serde(flatten)]
    pub services: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Verify SigV4 on every signed route (the default).
    #[default]
    Sigv4,
    /// Accept every request without checking signatures. Development only.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Socket address of the HTTP listener serving every AWS API.
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    /// `sigv4` or `none`.
    pub auth: AuthMode,
    /// The URL clients use to reach the HTTP listener; derived from `listen` when empty.
    #[serde(deserialize_with = "lenient_string")]
    pub public_url: String,
    /// Fixed access key id; generated on first start when empty.
    #[serde(deserialize_with = "lenient_string")]
    pub access_key_id: String,
    /// Fixed secret access key; generated on first start when empty.
    #[serde(deserialize_with = "lenient_string")]
    pub secret_access_key: String,
    /// When set, signed requests with these keys must carry this session token.
    #[serde(deserialize_with = "lenient_string")]
    pub session_token: String,
    /// Largest request body buffered for a non-streaming operation, in bytes.
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Plain-TCP listener (development). Empty disables it.
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    /// TLS listener with client certificates. Empty disables it.
    #[serde(deserialize_with = "lenient_string")]
    pub tls_listen: String,
    /// `aws` follows AWS IoT Core's documented deviations; `strict` follows the MQTT specs.
    #[serde(deserialize_with = "lenient_string")]
    pub profile: String,
    /// Whether the plain-TCP listener and unsigned WebSocket accept clients without credentials.
    pub allow_anonymous: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamManagerConfig {
    /// Greengrass stream manager SDK listener. Empty disables it.
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    /// When non-empty, clients must present this token (as `AWS_CONTAINER_AUTHORIZATION_TOKEN`).
    #[serde(deserialize_with = "lenient_string")]
    pub auth_token: String,
    /// Whether the auth token is required at all.
    pub require_auth: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./mooring-data"),
            account_id: "000000000000".into(),
            region: "us-east-1".into(),
            log_format: LogFormat::Human,
            log_level: "info".into(),
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            stream_manager: StreamManagerConfig::default(),
            services: BTreeMap::new(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:4566".into(),
            auth: AuthMode::Sigv4,
            public_url: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            session_token: String::new(),
            max_body_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: "127.0.0.1:1883".into(),
            tls_listen: "127.0.0.1:8883".into(),
            profile: "aws".into(),
            allow_anonymous: true,
        }
    }
}

impl Default for StreamManagerConfig {
    fn default() -> Self {
        StreamManagerConfig {
            listen: "127.0.0.1:8088".into(),
            auth_token: String::new(),
            require_auth: false,
        }
    }
}

/// The commented default configuration written by `mooring init`.
pub const DEFAULT_CONFIG_TOML: &str = r#"# Mooring configuration.
#
# Every key may also be set with an environment variable (MOORING_ plus the key path in
# capitals, sections joined by a double underscore: MOORING_HTTP__LISTEN) or with a flag
# (`--set http.listen=0.0.0.0:4566`). Flags beat the environment, which beats this file.

# Where all state lives: metadata (SQLite), stream segments, video fragments, the CA.
data_dir = "./mooring-data"

# Used in every ARN Mooring returns.
account_id = "000000000000"
region = "us-east-1"

# "human" or "json".
log_format = "human"
# A tracing filter, e.g. "info" or "info,mooring_mqtt=debug".
log_level = "info"

[http]
# Every AWS API, MQTT over WebSocket (/mqtt), /health and /metrics.
listen = "127.0.0.1:4566"
# "sigv4" verifies every request; "none" accepts anything (development only).
auth = "sigv4"
# The URL clients reach this listener at (used in banners and returned endpoints).
# Empty means http://<listen>.
public_url = ""
# Fixed credentials. Empty means: generate on first start and keep them in
# <data_dir>/credentials (AWS shared-credentials format, profile "mooring").
access_key_id = ""
secret_access_key = ""
# When set, requests must carry this X-Amz-Security-Token.
session_token = ""
# Largest buffered request body, in bytes (streaming uploads are not limited by this).
max_body_bytes = 16777216

[mqtt]
# Plain TCP listener (development). "" disables it.
listen = "127.0.0.1:1883"
# TLS listener; clients authenticate with certificates issued by Mooring's CA. "" disables it.
tls_listen = "127.0.0.1:8883"
# "aws" follows AWS IoT Core's documented behaviour; "strict" follows the MQTT specifications.
profile = "aws"
# Accept clients without credentials on the plain listener and unsigned WebSocket.
allow_anonymous = true

[stream_manager]
# Greengrass stream manager SDK protocol. "" disables it.
listen = "127.0.0.1:8088"
# Require clients to present auth_token (the SDK sends AWS_CONTAINER_AUTHORIZATION_TOKEN).
require_auth = false
auth_token = ""
"#;

impl Config {
    /// Builds the configuration from the optional file, the process environment and the
    /// flag overrides (`key.path`, value) given on the command line.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[(String, String)],
    ) -> Result<Config> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let file_table: toml::Table = text
                .parse()
                .with_context(|| format!("parsing config file {}", path.display()))?;
            merge(&mut table, file_table);
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("MOORING_") else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            set_path(&mut table, &path, &value)
                .with_context(|| format!("environment variable {name}"))?;
        }
        for (key, value) in flags {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            set_path(&mut table, &path, value).with_context(|| format!("flag for {key}"))?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.account_id.len() != 12 || !self.account_id.bytes().all(|b| b.is_ascii_digit()) {
            bail!("account_id must be 12 digits, got {:?}", self.account_id);
        }
        if let Some((key, _)) = self.services.iter().find(|(_, v)| !v.is_table()) {
            bail!("unknown configuration key {key:?}");
        }
        if self.region.is_empty() {
            bail!("region must not be empty");
        }
        let configured_keys =
            [&self.http.access_key_id, &self.http.secret_access_key].map(|s| !s.is_empty());
        if configured_keys[0] != configured_keys[1] {
            bail!("http.access_key_id and http.secret_access_key must be set together");
        }
        Ok(())
    }

    /// Deserializes a service's own section (`[name]`), or its defaults when absent.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T> {
        match self.services.get(name) {
            None => Ok(T::default()),
            Some(value) => value
                .clone()
                .try_into()
                .with_context(|| format!("invalid [{name}] configuration")),
        }
    }

    /// The base URL of the HTTP listener as clients should use it.
    pub fn public_http_url(&self) -> String {
        if !self.http.public_url.is_empty() {
            return self.http.public_url.trim_end_matches('/').to_string();
        }
        let listen = self.http.listen.replace("0.0.0.0", "127.0.0.1");
        format!("http://{listen}")
    }
}

/// Accepts a string, or a number or boolean written without quotes (as environment
/// variables and flags give them), as a string.
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }
    Ok(match Lenient::deserialize(d)? {
        Lenient::Text(s) => s,
        Lenient::Integer(i) => i.to_string(),
        Lenient::Float(f) => f.to_string(),
        Lenient::Flag(b) => b.to_string(),
    })
}

/// Merges `overlay` into `base`, recursing into tables so sibling keys survive.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge(existing, incoming)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets `path` in `table` to `raw`, read as a TOML value when it parses as one
/// (numbers, booleans, arrays) and as a string otherwise.
fn set_path(table: &mut toml::Table, path: &[String], raw: &str) -> Result<()> {
    let (last, parents) = path.split_last().context("empty key")?;
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("{part} is not a section"),
        };
    }
    current.insert(last.clone(), parse_scalar(raw));
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match probe.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_from_the_commented_template() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mooring.toml");
        std::fs::write(&path, DEFAULT_CONFIG_TOML).unwrap();
        let config = Config::load(Some(&path), Vec::new(), &[]).unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:4566");
        assert_eq!(config.mqtt.tls_listen, "127.0.0.1:8883");
        assert_eq!(config.stream_manager.listen, "127.0.0.1:8088");
        assert_eq!(config.account_id, "000000000000");
        assert_eq!(config.http.auth, AuthMode::Sigv4);
    }

    #[test]
    fn flags_beat_environment_which_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mooring.toml");
        std::fs::write(
            &path,
            "region = \"eu-west-1\"\naccount_id = \"111111111111\"\n[http]\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let env = vec![
            ("MOORING_REGION".to_string(), "eu-central-1".to_string()),
            (
                "MOORING_HTTP__LISTEN".to_string(),
                "127.0.0.1:2".to_string(),
            ),
            ("MOORING_HTTP__AUTH".to_string(), "none".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let flags = vec![("http.listen".to_string(), "127.0.0.1:3".to_string())];
        let config = Config::load(Some(&path), env, &flags).unwrap();
        assert_eq!(config.account_id, "111111111111");
        assert_eq!(config.region, "eu-central-1");
        assert_eq!(config.http.listen, "127.0.0.1:3");
        assert_eq!(config.http.auth, AuthMode::None);
    }

    #[test]
    fn numbers_from_environment_become_numbers_and_digits_in_ids_stay_strings() {
        let env = vec![
            (
                "MOORING_HTTP__MAX_BODY_BYTES".to_string(),
                "1024".to_string(),
            ),
            ("MOORING_ACCOUNT_ID".to_string(), "123456789012".to_string()),
        ];
        let config = Config::load(None, env, &[]).unwrap();
        assert_eq!(config.http.max_body_bytes, 1024);
        assert_eq!(config.account_id, "123456789012");
    }

    #[test]
    fn service_sections_are_kept_for_their_owner() {
        #[derive(Deserialize, Default, Debug)]
        struct Events {
            max_entry_bytes: u64,
        }
        let flags = vec![("events.max_entry_bytes".to_string(), "1048576".to_string())];
        let config = Config::load(None, Vec::new(), &flags).unwrap();
        let events: Events = config.section("events").unwrap();
        assert_eq!(events.max_entry_bytes, 1_048_576);
        let absent: Events = config.section("video").unwrap();
        assert_eq!(absent.max_entry_bytes, 0);
    }

    #[test]
    fn bad_values_are_refused_with_context() {
        let err =
            Config::load(None, vec![("MOORING_ACCOUNT_ID".into(), "12".into())], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("12 digits"), "{err:#}");
        let err =
            Config::load(None, Vec::new(), &[("http.auth".into(), "maybe".into())]).unwrap_err();
        assert!(
            format!("{err:#}").contains("invalid configuration"),
            "{err:#}"
        );
    }
}
