//! The per-stream image generation and notification configurations: their validation (the
//! botocore model's constraints and the spec's rules), their persistence (own `db.migrate`
//! component, keyed by stream ARN) and the four control-plane operations
//! Update/DescribeImageGenerationConfiguration and Update/DescribeNotificationConfiguration.
//! What the configurations cause when a tagged fragment is persisted lives in
//! [`crate::tag_effects`].

use mooring_core::store::StoreResult;
use mooring_core::Db;
use rusqlite::{params, OptionalExtension};
use serde_json::{json, Map, Value};

use crate::api::{find_stream, JsonRequest};
use crate::model::{ErrorKind, VideoError, VideoResult};
use crate::VideoState;

const MIGRATIONS: &[&str] = &["
CREATE TABLE video_stream_configurations (
    stream_arn TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (stream_arn, kind)
);
"];

/// Which configuration a row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    ImageGeneration,
    Notification,
}

impl ConfigKind {
    fn column(self) -> &'static str {
        match self {
            ConfigKind::ImageGeneration => "image-generation",
            ConfigKind::Notification => "notification",
        }
    }

    /// The request/response member holding the configuration.
    pub fn member(self) -> &'static str {
        match self {
            ConfigKind::ImageGeneration => "ImageGenerationConfiguration",
            ConfigKind::Notification => "NotificationConfiguration",
        }
    }
}

/// The configurations table on core's [`Db`].
#[derive(Clone)]
pub struct ConfigurationStore {
    db: Db,
}

impl ConfigurationStore {
    pub fn open(db: Db) -> StoreResult<ConfigurationStore> {
        db.migrate("video-image-generation", MIGRATIONS)?;
        Ok(ConfigurationStore { db })
    }

    pub fn get(&self, arn: &str, kind: ConfigKind) -> StoreResult<Option<Value>> {
        let body: Option<String> = self.db.read_blocking(|c| {
            Ok(c.query_row(
                "SELECT body FROM video_stream_configurations WHERE stream_arn = ?1 AND kind = ?2",
                params![arn, kind.column()],
                |r| r.get(0),
            )
            .optional()?)
        })?;
        Ok(match body {
            Some(b) => Some(serde_json::from_str(&b)?),
            None => None,
        })
    }

    /// Stores a configuration, or deletes it when `config` is `None`.
    pub fn put(
        &self,
        arn: &str,
        kind: ConfigKind,
        config: Option<&Value>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let body = config.map(Value::to_string);
        self.db.write_blocking(|tx| {
            match body {
                Some(b) => tx.execute(
                    "INSERT INTO video_stream_configurations (stream_arn, kind, body, updated_ms)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (stream_arn, kind) DO UPDATE SET body = ?3, updated_ms = ?4",
                    params![arn, kind.column(), b, now_ms],
                )?,
                None => tx.execute(
                    "DELETE FROM video_stream_configurations WHERE stream_arn = ?1 AND kind = ?2",
                    params![arn, kind.column()],
                )?,
            };
            Ok(())
        })
    }
}

fn constraint(value: impl std::fmt::Display, field: &str, rule: &str) -> VideoError {
    VideoError::invalid(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: {rule}"
    ))
}

fn required<T>(value: Option<T>, field: &str) -> VideoResult<T> {
    value.ok_or_else(|| {
        VideoError::invalid(format!(
            "1 validation error detected: Value null at '{field}' failed to satisfy constraint: Member must not be null"
        ))
    })
}

fn one_of(value: String, field: &str, allowed: &[&str]) -> VideoResult<String> {
    if allowed.contains(&value.as_str()) {
        return Ok(value);
    }
    Err(constraint(
        &value,
        field,
        &format!(
            "Member must satisfy enum value set: [{}]",
            allowed.join(", ")
        ),
    ))
}

/// A destination URI split by `^[a-zA-Z_0-9]+:(//)?([^/]+)/?([^*]*)$`: scheme, authority
/// (an S3 bucket) and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationUri {
    pub scheme: String,
    pub authority: String,
    pub path: String,
}

impl DestinationUri {
    pub fn parse(uri: &str) -> Option<DestinationUri> {
        let (scheme, rest) = uri.split_once(':')?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return None;
        }
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        if authority.is_empty() || path.contains('*') {
            return None;
        }
        Some(DestinationUri {
            scheme: scheme.to_string(),
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

fn validate_uri(uri: &str, field: &str) -> VideoResult<DestinationUri> {
    if uri.is_empty() || uri.len() > 255 {
        return Err(constraint(
            uri,
            field,
            "Member must have length between 1 and 255",
        ));
    }
    DestinationUri::parse(uri).ok_or_else(|| {
        constraint(
            uri,
            field,
            "Member must satisfy regular expression pattern: ^[a-zA-Z_0-9]+:(//)?([^/]+)/?([^*]*)$",
        )
    })
}

/// `^[a-z]+(-[a-z]+)?-[a-z]+-[0-9]$`, 9–14 characters.
fn valid_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    let lower = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
    (9..=14).contains(&region.len())
        && (parts.len() == 3 || parts.len() == 4)
        && parts[..parts.len() - 1].iter().all(lower)
        && parts[parts.len() - 1].len() == 1
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
}

fn integer_in(
    req: &JsonRequest,
    field: &str,
    path: &str,
    min: i64,
    max: i64,
) -> VideoResult<Option<i64>> {
    let value = req.integer(field)?;
    if let Some(v) = value {
        if !(min..=max).contains(&v) {
            return Err(constraint(
                v,
                path,
                &format!("Member must have value between {min} and {max}"),
            ));
        }
    }
    Ok(value)
}

/// Validates an `ImageGenerationConfiguration` against the stream's region and returns it in
/// its canonical JSON form (what Describe returns).
pub fn validate_image_generation(req: &JsonRequest, stream_region: &str) -> VideoResult<Value> {
    const M: &str = "ImageGenerationConfiguration";
    let status = one_of(
        required(req.string("Status")?, &format!("{M}.Status"))?,
        &format!("{M}.Status"),
        &["ENABLED", "DISABLED"],
    )?;
    let selector = one_of(
        required(
            req.string("ImageSelectorType")?,
            &format!("{M}.ImageSelectorType"),
        )?,
        &format!("{M}.ImageSelectorType"),
        &["SERVER_TIMESTAMP", "PRODUCER_TIMESTAMP"],
    )?;
    let destination = required(
        req.object("DestinationConfig")?,
        &format!("{M}.DestinationConfig"),
    )?;
    let uri = required(
        destination.string("Uri")?,
        &format!("{M}.DestinationConfig.Uri"),
    )?;
    let parsed = validate_uri(&uri, &format!("{M}.DestinationConfig.Uri"))?;
    if parsed.scheme != "s3" {
        return Err(VideoError::invalid(format!(
            "The destination {uri} is not an S3 URI (s3://bucket/prefix)"
        )));
    }
    let region = required(
        destination.string("DestinationRegion")?,
        &format!("{M}.DestinationConfig.DestinationRegion"),
    )?;
    if !valid_region(&region) {
        return Err(constraint(
            &region,
            &format!("{M}.DestinationConfig.DestinationRegion"),
            "Member must satisfy regular expression pattern: ^[a-z]+(-[a-z]+)?-[a-z]+-[0-9]$",
        ));
    }
    if region != stream_region {
        return Err(VideoError::invalid(format!(
            "The DestinationRegion {region} must match the stream's region {stream_region}"
        )));
    }
    let interval = required(
        req.integer("SamplingInterval")?,
        &format!("{M}.SamplingInterval"),
    )?;
    if interval < crate::tag_effects::MIN_SAMPLING_INTERVAL_MS {
        return Err(constraint(
            interval,
            &format!("{M}.SamplingInterval"),
            "Member must have value greater than or equal to 200",
        ));
    }
    let format = one_of(
        required(req.string("Format")?, &format!("{M}.Format"))?,
        &format!("{M}.Format"),
        &["JPEG", "PNG"],
    )?;
    let mut out = json!({
        "Status": status,
        "ImageSelectorType": selector,
        "DestinationConfig": {"Uri": uri, "DestinationRegion": region},
        "SamplingInterval": interval,
        "Format": format,
    });
    if let Some(config) = req.tag_map("FormatConfig")? {
        if config.len() != 1 {
            return Err(constraint(
                config.len(),
                &format!("{M}.FormatConfig"),
                "Member must have length between 1 and 1",
            ));
        }
        let (key, value) = config.iter().next().expect("one entry");
        if key != "JPEGQuality" {
            return Err(constraint(
                key,
                &format!("{M}.FormatConfig"),
                "Map keys must satisfy enum value set: [JPEGQuality]",
            ));
        }
        if !matches!(value.parse::<u8>(), Ok(1..=100)) {
            return Err(VideoError::invalid(format!(
                "The JPEGQuality value {value} must be an integer between 1 and 100"
            )));
        }
        let mut map = Map::new();
        map.insert(key.clone(), json!(value));
        out["FormatConfig"] = Value::Object(map);
    }
    if let Some(w) = integer_in(req, "WidthPixels", &format!("{M}.WidthPixels"), 1, 3840)? {
        out["WidthPixels"] = json!(w);
    }
    if let Some(h) = integer_in(req, "HeightPixels", &format!("{M}.HeightPixels"), 1, 2160)? {
        out["HeightPixels"] = json!(h);
    }
    Ok(out)
}

/// Validates a `NotificationConfiguration` and returns its canonical JSON form.
pub fn validate_notification(req: &JsonRequest) -> VideoResult<Value> {
    const M: &str = "NotificationConfiguration";
    let status = one_of(
        required(req.string("Status")?, &format!("{M}.Status"))?,
        &format!("{M}.Status"),
        &["ENABLED", "DISABLED"],
    )?;
    let destination = required(
        req.object("DestinationConfig")?,
        &format!("{M}.DestinationConfig"),
    )?;
    let uri = required(
        destination.string("Uri")?,
        &format!("{M}.DestinationConfig.Uri"),
    )?;
    validate_uri(&uri, &format!("{M}.DestinationConfig.Uri"))?;
    Ok(json!({"Status": status, "DestinationConfig": {"Uri": uri}}))
}

/// The region of a stream, from its ARN.
fn stream_region(arn: &str) -> String {
    mooring_core::Arns::parse(arn)
        .map(|a| a.region.to_string())
        .unwrap_or_default()
}

/// `UpdateImageGenerationConfiguration` / `UpdateNotificationConfiguration`.
pub fn update(s: &VideoState, req: &JsonRequest, kind: ConfigKind) -> VideoResult<Value> {
    let stream_ref = req.stream_ref()?;
    let config = req.object(kind.member())?;
    let stream = find_stream(s, &stream_ref)?;
    let canonical = match (&config, kind) {
        (None, _) => None,
        (Some(c), ConfigKind::ImageGeneration) => {
            Some(validate_image_generation(c, &stream_region(&stream.arn))?)
        }
        (Some(c), ConfigKind::Notification) => Some(validate_notification(c)?),
    };
    if canonical.is_some() && stream.retention_hours == 0 {
        return Err(VideoError::new(
            ErrorKind::NoDataRetention,
            format!(
                "The stream {} has no data retention; {} needs DataRetentionInHours > 0",
                stream.name,
                kind.member()
            ),
        ));
    }
    s.configurations.put(
        &stream.arn,
        kind,
        canonical.as_ref(),
        s.clock().now_millis(),
    )?;
    Ok(json!({}))
}

/// `DescribeImageGenerationConfiguration` / `DescribeNotificationConfiguration`.
pub fn describe(s: &VideoState, req: &JsonRequest, kind: ConfigKind) -> VideoResult<Value> {
    let stream = find_stream(s, &req.stream_ref()?)?;
    let mut out = json!({});
    if let Some(config) = s.configurations.get(&stream.arn, kind)? {
        out[kind.member()] = config;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(v: Value) -> JsonRequest {
        JsonRequest::parse(v.to_string().as_bytes()).unwrap()
    }

    fn image_config() -> Value {
        json!({
            "Status": "ENABLED",
            "ImageSelectorType": "PRODUCER_TIMESTAMP",
            "DestinationConfig": {"Uri": "s3://bucket/prefix", "DestinationRegion": "us-east-1"},
            "SamplingInterval": 500,
            "Format": "JPEG",
            "FormatConfig": {"JPEGQuality": "70"},
            "WidthPixels": 160,
        })
    }

    #[test]
    fn image_generation_configurations_validate() {
        let ok = validate_image_generation(&request(image_config()), "us-east-1").unwrap();
        assert_eq!(ok, image_config());
        let mutate = |f: &dyn Fn(&mut Value)| {
            let mut v = image_config();
            f(&mut v);
            validate_image_generation(&request(v), "us-east-1").unwrap_err()
        };
        assert!(mutate(&|v| v["Status"] = json!("ON"))
            .message
            .contains("enum"));
        assert!(mutate(&|v| v["SamplingInterval"] = json!(199))
            .message
            .contains("200"));
        assert!(mutate(&|v| v["WidthPixels"] = json!(3841))
            .message
            .contains("3840"));
        assert!(mutate(&|v| v["HeightPixels"] = json!(0))
            .message
            .contains("2160"));
        assert!(
            mutate(&|v| v["FormatConfig"] = json!({"JPEGQuality": "101"}))
                .message
                .contains("JPEGQuality")
        );
        assert!(mutate(&|v| v["FormatConfig"] = json!({"Quality": "10"}))
            .message
            .contains("enum"));
        assert!(
            mutate(&|v| v["DestinationConfig"]["DestinationRegion"] = json!("eu-west-1"))
                .message
                .contains("match")
        );
        assert!(
            mutate(&|v| v["DestinationConfig"]["Uri"] = json!("no-scheme"))
                .message
                .contains("pattern")
        );
        assert!(mutate(&|v| v["Format"] = Value::Null)
            .message
            .contains("null"));
    }

    #[test]
    fn destination_uris_split_like_the_model_pattern() {
        let u = DestinationUri::parse("s3://bucket/a/b").unwrap();
        assert_eq!(
            (u.scheme.as_str(), u.authority.as_str(), u.path.as_str()),
            ("s3", "bucket", "a/b")
        );
        let arn = DestinationUri::parse("arn:aws:sns:us-east-1:123456789012:topic").unwrap();
        assert_eq!(arn.scheme, "arn");
        assert!(DestinationUri::parse("s3://").is_none());
        assert!(DestinationUri::parse("s3://b/*").is_none());
        assert!(valid_region("us-east-1"));
        assert!(valid_region("us-gov-west-1"));
        assert!(!valid_region("US-east-1"));
        assert!(!valid_region("useast1"));
    }
}
