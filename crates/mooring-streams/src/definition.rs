//! The stream manager's data model as the SDKs put it on the wire: stream definitions, export
//! configurations and read options, with the SDKs' defaults and validation rules.
//!
//! The same structs are decoded from CBOR requests, encoded into CBOR responses and kept as
//! JSON in the metadata store, so field names follow the wire exactly (`IotSitewise` included).
//! Optional fields stay `Option` here; [`MessageStreamDefinition::validated`] checks every
//! constraint of the spec and fills in the defaults, producing the effective definition that
//! DescribeMessageStream returns.

use serde::{Deserialize, Serialize};

use crate::status::{Status, StreamError};

pub const DEFAULT_MAX_SIZE: i64 = 256 * 1024 * 1024;
pub const DEFAULT_SEGMENT_SIZE: i64 = 16 * 1024 * 1024;
pub const MIN_TTL_MILLIS: i64 = 60_000;
pub const MAX_MILLIS: i64 = 9_223_372_036_854;
pub const MIN_MULTIPART_THRESHOLD: i64 = 5_242_880;

/// `StrategyOnFull`.
pub const REJECT_NEW_DATA: i64 = 0;
pub const OVERWRITE_OLDEST_DATA: i64 = 1;
/// `Persistence`.
pub const PERSISTENCE_FILE: i64 = 0;
pub const PERSISTENCE_MEMORY: i64 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStreamDefinition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_segment_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_live_millis: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_on_full: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_on_write: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_definition: Option<ExportDefinition>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportDefinition {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<ExportConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iot_analytics: Vec<ExportConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinesis: Vec<ExportConfig>,
    #[serde(rename = "IotSitewise", default, skip_serializing_if = "Vec::is_empty")]
    pub iot_sitewise: Vec<ExportConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub s3_task_executor: Vec<ExportConfig>,
}

/// The destination kind of an export configuration (which array it came from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportKind {
    Http,
    IotAnalytics,
    Kinesis,
    IotSiteWise,
    S3,
}

impl ExportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportKind::Http => "http",
            ExportKind::IotAnalytics => "iotAnalytics",
            ExportKind::Kinesis => "kinesis",
            ExportKind::IotSiteWise => "IotSitewise",
            ExportKind::S3 => "s3TaskExecutor",
        }
    }

    /// Default and maximum `batchSize`.
    pub fn batch_limit(self) -> i64 {
        match self {
            ExportKind::Http | ExportKind::Kinesis => 500,
            ExportKind::IotAnalytics => 100,
            ExportKind::IotSiteWise => 10,
            ExportKind::S3 => 1,
        }
    }
}

/// One export configuration of any kind; fields that do not belong to a kind stay `None`
/// and are never written back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_interval_millis: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_sequence_number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    // Kinesis
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinesis_stream_name: Option<String>,
    // IoT Analytics
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_msg_id_prefix: Option<String>,
    // HTTP
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_format: Option<i64>,
    // S3
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_threshold_for_multipart_upload_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_config: Option<StatusConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_level: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_stream_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadMessagesOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_start_sequence_number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_message_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_timeout_millis: Option<i64>,
}

/// Read options after defaults and validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub start: i64,
    pub min: i64,
    pub max: i64,
    pub timeout_millis: i64,
}

fn invalid(message: impl Into<String>) -> StreamError {
    StreamError::new(Status::InvalidRequest, message)
}

/// Checks the SDKs' name pattern `^[\w ,.\-_]*$` with length 1..=255.
pub fn validate_name(field: &str, value: Option<&str>) -> Result<String, StreamError> {
    let Some(value) = value else {
        return Err(invalid(format!("{field} is required")));
    };
    let length = value.chars().count();
    if length == 0 || length > 255 {
        return Err(invalid(format!(
            "{field} must be between 1 and 255 characters long, got {length}"
        )));
    }
    if !value
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | ',' | '.' | '-'))
    {
        return Err(invalid(format!(
            "{field} {value:?} must match ^[\\w ,.\\-_]*$ (letters, digits, underscore, space, comma, period, hyphen)"
        )));
    }
    Ok(value.to_string())
}

fn check_range(field: &str, value: i64, min: i64, max: i64) -> Result<i64, StreamError> {
    if value < min || value > max {
        return Err(invalid(format!(
            "{field} must be between {min} and {max}, got {value}"
        )));
    }
    Ok(value)
}

/// The effective, validated definition of a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamDefinition {
    pub name: String,
    pub max_size: i64,
    pub segment_size: i64,
    pub ttl_millis: Option<i64>,
    pub strategy_on_full: i64,
    pub persistence: i64,
    pub flush_on_write: bool,
    pub exports: Vec<(ExportKind, ExportConfig)>,
}

impl StreamDefinition {
    pub fn is_memory(&self) -> bool {
        self.persistence == PERSISTENCE_MEMORY
    }

    pub fn overwrite_oldest(&self) -> bool {
        self.strategy_on_full == OVERWRITE_OLDEST_DATA
    }

    /// The definition as DescribeMessageStream returns it: every default filled in.
    pub fn to_wire(&self) -> MessageStreamDefinition {
        let mut export = ExportDefinition::default();
        for (kind, config) in &self.exports {
            let list = match kind {
                ExportKind::Http => &mut export.http,
                ExportKind::IotAnalytics => &mut export.iot_analytics,
                ExportKind::Kinesis => &mut export.kinesis,
                ExportKind::IotSiteWise => &mut export.iot_sitewise,
                ExportKind::S3 => &mut export.s3_task_executor,
            };
            list.push(config.clone());
        }
        MessageStreamDefinition {
            name: Some(self.name.clone()),
            max_size: Some(self.max_size),
            stream_segment_size: Some(self.segment_size),
            time_to_live_millis: self.ttl_millis,
            strategy_on_full: Some(self.strategy_on_full),
            persistence: Some(self.persistence),
            flush_on_write: Some(self.flush_on_write),
            export_definition: (!self.exports.is_empty()).then_some(export),
        }
    }
}

impl MessageStreamDefinition {
    /// Validates every field and fills in defaults.
    pub fn validated(&self) -> Result<StreamDefinition, StreamError> {
        let name = validate_name("name", self.name.as_deref())?;
        let max_size = check_range(
            "maxSize",
            self.max_size.unwrap_or(DEFAULT_MAX_SIZE),
            1024,
            i64::MAX,
        )?;
        let segment_size = check_range(
            "streamSegmentSize",
            self.stream_segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE),
            1024,
            i32::MAX as i64,
        )?;
        let ttl_millis = match self.time_to_live_millis {
            Some(ttl) => Some(check_range(
                "timeToLiveMillis",
                ttl,
                MIN_TTL_MILLIS,
                MAX_MILLIS,
            )?),
            None => None,
        };
        let Some(strategy_on_full) = self.strategy_on_full else {
            return Err(invalid("strategyOnFull is required"));
        };
        let strategy_on_full = check_range("strategyOnFull", strategy_on_full, 0, 1)?;
        let persistence = check_range(
            "persistence",
            self.persistence.unwrap_or(PERSISTENCE_FILE),
            0,
            1,
        )?;
        let mut exports = Vec::new();
        if let Some(export) = &self.export_definition {
            let groups = [
                (ExportKind::Http, &export.http),
                (ExportKind::IotAnalytics, &export.iot_analytics),
                (ExportKind::Kinesis, &export.kinesis),
                (ExportKind::IotSiteWise, &export.iot_sitewise),
                (ExportKind::S3, &export.s3_task_executor),
            ];
            for (kind, configs) in groups {
                for config in configs {
                    exports.push((kind, validate_export(kind, config)?));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (_, config) in &exports {
            let id = config.identifier.as_deref().unwrap_or_default();
            if !seen.insert(id.to_string()) {
                return Err(invalid(format!(
                    "export identifier {id:?} is used more than once; identifiers must be unique within a stream"
                )));
            }
        }
        Ok(StreamDefinition {
            name,
            max_size,
            segment_size,
            ttl_millis,
            strategy_on_full,
            persistence,
            flush_on_write: self.flush_on_write.unwrap_or(false),
            exports,
        })
    }
}

fn validate_export(kind: ExportKind, config: &ExportConfig) -> Result<ExportConfig, StreamError> {
    let prefix = kind.as_str();
    let identifier = validate_name(
        &format!("{prefix}.identifier"),
        config.identifier.as_deref(),
    )?;
    let mut out = config.clone();
    out.identifier = Some(identifier);
    if kind != ExportKind::S3 {
        if let Some(batch) = config.batch_size {
            check_range(&format!("{prefix}.batchSize"), batch, 1, kind.batch_limit())?;
        }
        if let Some(interval) = config.batch_interval_millis {
            check_range(
                &format!("{prefix}.batchIntervalMillis"),
                interval,
                MIN_TTL_MILLIS,
                MAX_MILLIS,
            )?;
        }
        if let Some(start) = config.start_sequence_number {
            check_range(&format!("{prefix}.startSequenceNumber"), start, 0, i64::MAX)?;
        }
    }
    if let Some(priority) = config.priority {
        check_range(&format!("{prefix}.priority"), priority, 1, 10)?;
    }
    let required = |field: &str, value: &Option<String>| -> Result<(), StreamError> {
        match value {
            Some(v) if !v.is_empty() => Ok(()),
            _ => Err(invalid(format!("{prefix}.{field} is required"))),
        }
    };
    match kind {
        ExportKind::Kinesis => required("kinesisStreamName", &config.kinesis_stream_name)?,
        ExportKind::IotAnalytics => {
            required("iotChannel", &config.iot_channel)?;
            if let Some(p) = &config.iot_msg_id_prefix {
                if p.chars().count() > 32 {
                    return Err(invalid(format!(
                        "{prefix}.iotMsgIdPrefix must be at most 32 characters"
                    )));
                }
            }
        }
        ExportKind::Http => {
            required("uri", &config.uri)?;
            if let Some(format) = config.export_format {
                check_range(&format!("{prefix}.exportFormat"), format, 0, 1)?;
            }
        }
        ExportKind::IotSiteWise => {}
        ExportKind::S3 => {
            if let Some(threshold) = config.size_threshold_for_multipart_upload_bytes {
                check_range(
                    &format!("{prefix}.sizeThresholdForMultipartUploadBytes"),
                    threshold,
                    MIN_MULTIPART_THRESHOLD,
                    i64::MAX,
                )?;
            }
            if let Some(status) = &config.status_config {
                if let Some(level) = status.status_level {
                    check_range(&format!("{prefix}.statusConfig.statusLevel"), level, 0, 4)?;
                }
                if status.status_stream_name.is_some() {
                    validate_name(
                        &format!("{prefix}.statusConfig.statusStreamName"),
                        status.status_stream_name.as_deref(),
                    )?;
                }
            }
        }
    }
    Ok(out)
}

impl ReadMessagesOptions {
    pub fn validated(options: Option<&ReadMessagesOptions>) -> Result<ReadRequest, StreamError> {
        let default = ReadMessagesOptions::default();
        let o = options.unwrap_or(&default);
        let start = check_range(
            "desiredStartSequenceNumber",
            o.desired_start_sequence_number.unwrap_or(0),
            0,
            i64::MAX,
        )?;
        let min = check_range(
            "minMessageCount",
            o.min_message_count.unwrap_or(1),
            1,
            i32::MAX as i64,
        )?;
        let max = check_range(
            "maxMessageCount",
            o.max_message_count.unwrap_or(min),
            1,
            i32::MAX as i64,
        )?;
        if min > max {
            return Err(invalid(format!(
                "minMessageCount ({min}) must be less than or equal to maxMessageCount ({max})"
            )));
        }
        let timeout_millis = check_range(
            "readTimeoutMillis",
            o.read_timeout_millis.unwrap_or(0),
            0,
            MAX_MILLIS,
        )?;
        Ok(ReadRequest {
            start,
            min,
            max,
            timeout_millis,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_filled_in() {
        let def = MessageStreamDefinition {
            name: Some("s1".into()),
            strategy_on_full: Some(1),
            ..Default::default()
        }
        .validated()
        .unwrap();
        assert_eq!(def.max_size, DEFAULT_MAX_SIZE);
        assert_eq!(def.segment_size, DEFAULT_SEGMENT_SIZE);
        assert_eq!(def.persistence, PERSISTENCE_FILE);
        assert!(!def.flush_on_write);
        let wire = def.to_wire();
        assert_eq!(wire.persistence, Some(0));
        assert_eq!(wire.flush_on_write, Some(false));
    }

    #[test]
    fn validation_names_the_field() {
        let base = MessageStreamDefinition {
            name: Some("s1".into()),
            strategy_on_full: Some(0),
            ..Default::default()
        };
        let err = MessageStreamDefinition {
            strategy_on_full: None,
            ..base.clone()
        }
        .validated()
        .unwrap_err();
        assert!(err.message.contains("strategyOnFull"));
        let err = MessageStreamDefinition {
            name: Some("bad/name".into()),
            ..base.clone()
        }
        .validated()
        .unwrap_err();
        assert!(err.message.contains("name"), "{}", err.message);
        let err = MessageStreamDefinition {
            max_size: Some(10),
            ..base.clone()
        }
        .validated()
        .unwrap_err();
        assert!(err.message.contains("maxSize"));
        let mut export = ExportDefinition::default();
        export.kinesis.push(ExportConfig {
            identifier: Some("k".into()),
            kinesis_stream_name: Some("ks".into()),
            batch_size: Some(501),
            ..Default::default()
        });
        let err = MessageStreamDefinition {
            export_definition: Some(export),
            ..base
        }
        .validated()
        .unwrap_err();
        assert!(err.message.contains("kinesis.batchSize"), "{}", err.message);
    }

    #[test]
    fn read_options_follow_the_documented_defaults() {
        let r = ReadMessagesOptions::validated(None).unwrap();
        assert_eq!(
            r,
            ReadRequest {
                start: 0,
                min: 1,
                max: 1,
                timeout_millis: 0
            }
        );
        let r = ReadMessagesOptions::validated(Some(&ReadMessagesOptions {
            min_message_count: Some(5),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(r.max, 5);
        assert!(ReadMessagesOptions::validated(Some(&ReadMessagesOptions {
            min_message_count: Some(5),
            max_message_count: Some(2),
            ..Default::default()
        }))
        .is_err());
    }
}
