//! The Kinesis Video Streams model: streams and fragments as values, the validation rules of
//! every field, and the service's errors. Nothing here knows HTTP or SQL.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Maximum tags per stream or channel.
pub const MAX_TAGS: usize = 50;
/// Maximum data retention: ten years.
pub const MAX_RETENTION_HOURS: i64 = 87_600;

/// The kinds of error KVS answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    ResourceNotFound,
    ResourceInUse,
    VersionMismatch,
    TagsPerResourceExceededLimit,
    InvalidResourceFormat,
    ClientLimitExceeded,
    NoDataRetention,
    ConnectionLimitExceeded,
    Internal,
    NotAuthorized,
    UnsupportedStreamMediaType,
    MissingCodecPrivateData,
    InvalidCodecPrivateData,
    InvalidMediaFrame,
}

impl ErrorKind {
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "InvalidArgumentException",
            ErrorKind::ResourceNotFound => "ResourceNotFoundException",
            ErrorKind::ResourceInUse => "ResourceInUseException",
            ErrorKind::VersionMismatch => "VersionMismatchException",
            ErrorKind::TagsPerResourceExceededLimit => "TagsPerResourceExceededLimitException",
            ErrorKind::InvalidResourceFormat => "InvalidResourceFormatException",
            ErrorKind::ClientLimitExceeded => "ClientLimitExceededException",
            ErrorKind::NoDataRetention => "NoDataRetentionException",
            ErrorKind::ConnectionLimitExceeded => "ConnectionLimitExceededException",
            ErrorKind::Internal => "InternalFailure",
            ErrorKind::NotAuthorized => "NotAuthorizedException",
            ErrorKind::UnsupportedStreamMediaType => "UnsupportedStreamMediaTypeException",
            ErrorKind::MissingCodecPrivateData => "MissingCodecPrivateDataException",
            ErrorKind::InvalidCodecPrivateData => "InvalidCodecPrivateDataException",
            ErrorKind::InvalidMediaFrame => "InvalidMediaFrameException",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ErrorKind::ResourceNotFound => 404,
            ErrorKind::Internal => 500,
            ErrorKind::NotAuthorized => 401,
            _ => 400,
        }
    }
}

/// An error of the service, rendered by the api layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.code())]
pub struct VideoError {
    pub kind: ErrorKind,
    pub message: String,
}

impl VideoError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        VideoError {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceNotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<mooring_core::store::StoreError> for VideoError {
    fn from(e: mooring_core::store::StoreError) -> Self {
        VideoError::internal(e.to_string())
    }
}

pub type VideoResult<T> = Result<T, VideoError>;

/// A stream as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stream {
    pub name: String,
    pub arn: String,
    pub device_name: Option<String>,
    pub media_type: Option<String>,
    pub kms_key_id: String,
    pub retention_hours: i64,
    pub version: String,
    pub status: String,
    pub creation_ms: i64,
    pub storage_tier: String,
    pub tags: BTreeMap<String, String>,
}

#[cfg(test)]
impl Stream {
    /// An ACTIVE stream with one hour of retention, for unit tests of the stores and readers.
    pub(crate) fn for_tests(name: &str, arn: &str) -> Stream {
        Stream {
            name: name.into(),
            arn: arn.into(),
            device_name: None,
            media_type: None,
            kms_key_id: "k".into(),
            retention_hours: 1,
            version: "v1".into(),
            status: "ACTIVE".into(),
            creation_ms: 0,
            storage_tier: "HOT".into(),
            tags: Default::default(),
        }
    }
}

/// How a request names a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRef {
    Name(String),
    Arn(String),
}

impl StreamRef {
    /// Exactly one of name and ARN, each valid.
    pub fn from_parts(name: Option<String>, arn: Option<String>) -> VideoResult<StreamRef> {
        match (name, arn) {
            (Some(_), Some(_)) => Err(VideoError::invalid(
                "Specify either StreamName or StreamARN, not both",
            )),
            (None, None) => Err(VideoError::invalid(
                "Either StreamName or StreamARN must be specified",
            )),
            (Some(name), None) => {
                validate_stream_name(&name, "StreamName")?;
                Ok(StreamRef::Name(name))
            }
            (None, Some(arn)) => {
                validate_stream_arn(&arn)?;
                Ok(StreamRef::Arn(arn))
            }
        }
    }

    pub fn describe(&self) -> &str {
        match self {
            StreamRef::Name(n) | StreamRef::Arn(n) => n,
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// `[a-zA-Z0-9_.-]+`, 1–256.
pub fn validate_stream_name(name: &str, field: &str) -> VideoResult<()> {
    validate_name(name, field, 256)
}

fn validate_name(name: &str, field: &str, max: usize) -> VideoResult<()> {
    if name.is_empty() || name.len() > max {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{name}' at '{field}' failed to satisfy constraint: Member must have length between 1 and {max}"
        )));
    }
    if !name.chars().all(is_name_char) {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{name}' at '{field}' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9_.-]+"
        )));
    }
    Ok(())
}

pub fn validate_device_name(name: &str) -> VideoResult<()> {
    validate_name(name, "DeviceName", 128)
}

/// `[\w\-\.\+]+/[\w\-\.\+]+(,[\w\-\.\+]+/[\w\-\.\+]+)*`, 1–128.
pub fn validate_media_type(media_type: &str) -> VideoResult<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'))
    };
    let ok =
        !media_type.is_empty() && media_type.len() <= 128 && media_type.split(',').all(|item| {
            let mut halves = item.splitn(2, '/');
            matches!((halves.next(), halves.next()), (Some(a), Some(b)) if part_ok(a) && part_ok(b))
        });
    if ok {
        Ok(())
    } else {
        Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{media_type}' at 'MediaType' failed to satisfy constraint: Member must satisfy regular expression pattern"
        )))
    }
}

pub fn validate_kms_key_id(key: &str) -> VideoResult<()> {
    if key.is_empty() || key.len() > 2048 {
        return Err(VideoError::invalid(
            "KmsKeyId must have length between 1 and 2048",
        ));
    }
    Ok(())
}

/// `[a-zA-Z0-9]+`, 1–64.
pub fn validate_version(version: &str) -> VideoResult<()> {
    if version.is_empty()
        || version.len() > 64
        || !version.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{version}' at 'CurrentVersion' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9]+"
        )));
    }
    Ok(())
}

/// The name and numeric suffix of a stream ARN, when it has the model's shape.
pub fn parse_stream_arn(arn: &str) -> Option<(&str, &str)> {
    let parsed = mooring_core::Arns::parse(arn)?;
    if parsed.service != "kinesisvideo"
        || parsed.region.is_empty()
        || parsed.account.is_empty()
        || !parsed.account.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let mut parts = parsed.resource.splitn(3, '/');
    let (kind, name, suffix) = (parts.next()?, parts.next()?, parts.next()?);
    if kind != "stream"
        || name.is_empty()
        || !name.chars().all(is_name_char)
        || suffix.is_empty()
        || !suffix.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    Some((name, suffix))
}

pub fn validate_stream_arn(arn: &str) -> VideoResult<()> {
    if arn.is_empty() || arn.len() > 1024 || parse_stream_arn(arn).is_none() {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{arn}' at 'StreamARN' failed to satisfy constraint: Member must satisfy regular expression pattern: arn:[a-z\\d-]+:kinesisvideo:[a-z0-9-]+:[0-9]+:[a-z]+/[a-zA-Z0-9_.-]+/[0-9]+"
        )));
    }
    Ok(())
}

fn is_tag_char(c: char) -> bool {
    c.is_alphabetic()
        || c.is_numeric()
        || c.is_whitespace()
        || matches!(c, '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@')
}

pub fn validate_tag_key(key: &str) -> VideoResult<()> {
    if key.is_empty() || key.chars().count() > 128 || !key.chars().all(is_tag_char) {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{key}' at 'TagKey' failed to satisfy constraint: Member must have length between 1 and 128 and satisfy pattern ^([\\p{{L}}\\p{{Z}}\\p{{N}}_.:/=+\\-@]*)$"
        )));
    }
    Ok(())
}

pub fn validate_tag_value(value: &str) -> VideoResult<()> {
    if value.chars().count() > 256 || !value.chars().all(is_tag_char) {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{value}' at 'TagValue' failed to satisfy constraint: Member must have length at most 256 and satisfy pattern [\\p{{L}}\\p{{Z}}\\p{{N}}_.:/=+\\-@]*"
        )));
    }
    Ok(())
}

/// Validates a tag map given in a request (1–50 entries).
pub fn validate_tags(tags: &BTreeMap<String, String>) -> VideoResult<()> {
    if tags.is_empty() {
        return Err(VideoError::invalid(
            "1 validation error detected: Value at 'Tags' failed to satisfy constraint: Member must have length greater than or equal to 1",
        ));
    }
    if tags.len() > MAX_TAGS {
        return Err(VideoError::new(
            ErrorKind::TagsPerResourceExceededLimit,
            "The resource can have at most 50 tags",
        ));
    }
    for (k, v) in tags {
        validate_tag_key(k)?;
        validate_tag_value(v)?;
    }
    Ok(())
}

/// Merges `new` into `tags`, enforcing the 50-tag limit on the result.
pub fn merge_tags(
    tags: &mut BTreeMap<String, String>,
    new: BTreeMap<String, String>,
) -> VideoResult<()> {
    let mut merged = tags.clone();
    merged.extend(new);
    if merged.len() > MAX_TAGS {
        return Err(VideoError::new(
            ErrorKind::TagsPerResourceExceededLimit,
            "The resource can have at most 50 tags",
        ));
    }
    *tags = merged;
    Ok(())
}

/// A fresh opaque version string.
pub fn new_version() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..20].to_string()
}

/// Fragment numbers are 47-digit decimal strings that sort like the per-stream sequence
/// behind them: a fixed 14-digit prefix and the sequence zero-padded to 33 digits.
const FRAGMENT_NUMBER_PREFIX: &str = "91343852333181";

pub fn fragment_number(seq: i64) -> String {
    format!("{FRAGMENT_NUMBER_PREFIX}{seq:033}")
}

/// The sequence behind a fragment number, or `None` when it is not one of ours.
pub fn fragment_seq(number: &str) -> Option<i64> {
    if number.len() != 47 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number
        .strip_prefix(FRAGMENT_NUMBER_PREFIX)?
        .parse::<i64>()
        .ok()
}

/// `^[0-9]+$`, 1–128.
pub fn validate_fragment_number(number: &str, field: &str) -> VideoResult<()> {
    if number.is_empty() || number.len() > 128 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{number}' at '{field}' failed to satisfy constraint: Member must satisfy regular expression pattern: ^[0-9]+$"
        )));
    }
    Ok(())
}

/// The index entry of a stored fragment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FragmentMeta {
    pub seq: i64,
    /// Cluster timecode as received, in ticks.
    pub timecode: i64,
    pub producer_ms: i64,
    pub server_ms: i64,
    pub duration_ms: i64,
    /// Size of the fragment including its metadata (cluster plus tags).
    pub size: i64,
    pub tags: Vec<(String, String)>,
}

impl FragmentMeta {
    pub fn number(&self) -> String {
        fragment_number(self.seq)
    }
}

/// Seconds with three decimals, as the GetMedia tags write timestamps.
pub fn seconds_text(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

/// Epoch seconds as a JSON number.
pub fn json_timestamp(ms: i64) -> serde_json::Value {
    serde_json::json!(ms as f64 / 1000.0)
}

/// A JSON timestamp member (number of seconds, or an ISO-8601 string as a courtesy) in ms.
pub fn parse_json_timestamp(value: &serde_json::Value, field: &str) -> VideoResult<i64> {
    match value {
        serde_json::Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(|f| (f * 1000.0).round() as i64)
            .ok_or_else(|| VideoError::invalid(format!("{field} is not a valid timestamp"))),
        serde_json::Value::String(s) => {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                .map_err(|_| VideoError::invalid(format!("{field} is not a valid timestamp")))
        }
        _ => Err(VideoError::invalid(format!(
            "{field} is not a valid timestamp"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_numbers_sort_like_their_sequence() {
        let a = fragment_number(9);
        let b = fragment_number(10);
        assert_eq!(a.len(), 47);
        assert!(a < b);
        assert_eq!(fragment_seq(&b), Some(10));
        assert_eq!(fragment_seq("123"), None);
    }

    #[test]
    fn stream_arns_parse() {
        let arn = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam-1/1700000000000";
        assert_eq!(parse_stream_arn(arn), Some(("cam-1", "1700000000000")));
        assert!(parse_stream_arn("arn:aws:kinesisvideo:us-east-1:1:stream/cam").is_none());
        assert!(parse_stream_arn("arn:aws:s3:::bucket").is_none());
    }

    #[test]
    fn validation_rules() {
        assert!(validate_stream_name("a.b_c-1", "StreamName").is_ok());
        assert!(validate_stream_name("a b", "StreamName").is_err());
        assert!(validate_stream_name(&"x".repeat(257), "StreamName").is_err());
        assert!(validate_media_type("video/h264,audio/aac").is_ok());
        assert!(validate_media_type("video").is_err());
        assert!(validate_version("abc123").is_ok());
        assert!(validate_version("abc-123").is_err());
        assert!(validate_tag_key("team name:a@b").is_ok());
        assert!(validate_tag_key("bad*").is_err());
        assert_eq!(seconds_text(1511852108513), "1511852108.513");
    }
}
