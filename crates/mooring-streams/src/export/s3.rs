//! The S3 export task executor: each stream message is an `S3ExportTaskDefinition` (JSON)
//! naming a local file, a bucket and a key; tasks run one at a time in append order.
//!
//! A task's key may hold `!{timestamp:FORMAT}` placeholders, resolved with the upload time
//! in UTC using Java `DateTimeFormatter` pattern letters. Files up to the executor's
//! `sizeThresholdForMultipartUploadBytes` go up with one PutObject, larger ones with a
//! multipart upload (parts of the configured minimum part size), aborted on failure.
//! `userMetadata` becomes `x-amz-meta-*`. With a `statusConfig`, status messages (JSON
//! `StatusMessage`, integer enums) are appended to the status stream at or below its
//! `statusLevel`: InProgress when a task starts, then Success or Failure, Warning when a
//! failed multipart upload could not be aborted, Canceled for every task not yet done when
//! the stream or the export is removed. Malformed tasks, unreadable files and
//! permanent S3 errors (missing bucket, access denied) fail the task and move on; other
//! errors are retried by the engine with backoff, forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::future::BoxFuture;
use mooring_core::handles::ServiceHandles;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{BatchOutcome, Destination};
use crate::definition::ExportConfig;
use crate::log::StoredMessage;

/// `Status` values of a `StatusMessage`.
const SUCCESS: i64 = 0;
const FAILURE: i64 = 1;
const IN_PROGRESS: i64 = 2;
const WARNING: i64 = 3;
const CANCELED: i64 = 4;
/// `StatusLevel` values.
const ERROR_LEVEL: i64 = 0;
const WARN_LEVEL: i64 = 1;
const INFO_LEVEL: i64 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct S3ExportTaskDefinition {
    pub input_url: String,
    pub bucket: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_metadata: Option<HashMap<String, String>>,
}

pub struct S3Destination {
    pub client: aws_sdk_s3::Client,
    pub min_part_size: i64,
    pub handles: Arc<ServiceHandles>,
    pub clock: Arc<dyn mooring_core::Clock>,
    /// Tasks whose InProgress status was already written (retries do not repeat it).
    started: Mutex<HashMap<(String, String), i64>>,
}

enum TaskError {
    /// The task cannot succeed as given: report Failure and move on.
    Permanent(String),
    /// Worth retrying later.
    Transient(String),
}

impl S3Destination {
    pub fn new(
        client: aws_sdk_s3::Client,
        min_part_size: i64,
        handles: Arc<ServiceHandles>,
        clock: Arc<dyn mooring_core::Clock>,
    ) -> S3Destination {
        S3Destination {
            client,
            min_part_size,
            handles,
            clock,
            started: Mutex::new(HashMap::new()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn status(
        &self,
        stream: &str,
        config: &ExportConfig,
        message: &StoredMessage,
        task: Option<&serde_json::Value>,
        status: i64,
        level: i64,
        text: String,
    ) {
        let Some(status_config) = &config.status_config else {
            return;
        };
        let Some(target) = &status_config.status_stream_name else {
            return;
        };
        if level > status_config.status_level.unwrap_or(INFO_LEVEL) {
            return;
        }
        let mut context = serde_json::json!({
            "exportIdentifier": config.identifier.clone().unwrap_or_default(),
            "streamName": stream,
            "sequenceNumber": message.sequence_number,
        });
        if let Some(task) = task {
            context["s3ExportTaskDefinition"] = task.clone();
        }
        let body = serde_json::json!({
            "eventType": 0,
            "statusLevel": level,
            "status": status,
            "statusContext": context,
            "message": text,
            "timestampEpochMs": self.clock.now_millis(),
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        match self.handles.streams() {
            Ok(handle) => {
                if let Err(e) = handle.append(target, bytes.into()).await {
                    tracing::warn!(status_stream = %target, error = %e, "could not write an S3 export status");
                }
            }
            Err(e) => tracing::warn!(error = %e, "no streams handle for S3 export statuses"),
        }
    }

    /// Runs one task; returns the object key. Problems that do not fail the task (a
    /// multipart upload that could not be aborted) are pushed to `warnings`.
    async fn run_task(
        &self,
        config: &ExportConfig,
        task: &S3ExportTaskDefinition,
        warnings: &mut Vec<String>,
    ) -> Result<String, TaskError> {
        let path = local_path(&task.input_url).ok_or_else(|| {
            TaskError::Permanent(format!(
                "inputUrl {:?} is not a local file URL",
                task.input_url
            ))
        })?;
        let size = tokio::fs::metadata(&path)
            .await
            .map_err(|e| TaskError::Permanent(format!("cannot read input file {path}: {e}")))?
            .len() as i64;
        let key = resolve_key(&task.key, self.clock.now_millis());
        let threshold = config
            .size_threshold_for_multipart_upload_bytes
            .unwrap_or(crate::definition::MIN_MULTIPART_THRESHOLD);
        let metadata = task.user_metadata.clone();
        if size <= threshold {
            let body = tokio::fs::read(&path)
                .await
                .map_err(|e| TaskError::Permanent(format!("cannot read input file {path}: {e}")))?;
            self.client
                .put_object()
                .bucket(&task.bucket)
                .key(&key)
                .set_metadata(metadata)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| {
                    classify(
                        aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                        e.raw_response().map(|r| r.status().as_u16()),
                    )
                })?;
            return Ok(key);
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&task.bucket)
            .key(&key)
            .set_metadata(metadata)
            .send()
            .await
            .map_err(|e| {
                classify(
                    aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                    e.raw_response().map(|r| r.status().as_u16()),
                )
            })?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        match self.upload_parts(task, &key, &upload_id, &path).await {
            Ok(()) => Ok(key),
            Err(error) => {
                let abort = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&task.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                if let Err(a) = abort {
                    warnings.push(format!(
                        "could not abort multipart upload {upload_id} of s3://{}/{key}: {}",
                        task.bucket,
                        aws_sdk_s3::error::DisplayErrorContext(a)
                    ));
                }
                Err(error)
            }
        }
    }

    async fn upload_parts(
        &self,
        task: &S3ExportTaskDefinition,
        key: &str,
        upload_id: &str,
        path: &str,
    ) -> Result<(), TaskError> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| TaskError::Permanent(format!("cannot read input file {path}: {e}")))?;
        let part_size = self
            .min_part_size
            .max(crate::definition::MIN_MULTIPART_THRESHOLD) as usize;
        let mut parts = Vec::new();
        let mut number = 1;
        loop {
            let mut chunk = Vec::with_capacity(part_size);
            (&mut file)
                .take(part_size as u64)
                .read_to_end(&mut chunk)
                .await
                .map_err(|e| TaskError::Permanent(format!("reading {path}: {e}")))?;
            if chunk.is_empty() {
                break;
            }
            let part = self
                .client
                .upload_part()
                .bucket(&task.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk))
                .send()
                .await
                .map_err(|e| {
                    classify(
                        aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                        e.raw_response().map(|r| r.status().as_u16()),
                    )
                })?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build(),
            );
            number += 1;
        }
        self.client
            .complete_multipart_upload()
            .bucket(&task.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                classify(
                    aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                    e.raw_response().map(|r| r.status().as_u16()),
                )
            })?;
        Ok(())
    }
}

/// Missing buckets, denied access and other client errors will not fix themselves.
fn classify(message: String, status: Option<u16>) -> TaskError {
    match status {
        Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => TaskError::Permanent(message),
        _ => TaskError::Transient(message),
    }
}

fn local_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("file:")?;
    let path = rest.trim_start_matches('/');
    Some(format!("/{path}"))
}

/// Replaces `!{timestamp:PATTERN}` placeholders with the time formatted by Java
/// `DateTimeFormatter` letters (UTC).
pub fn resolve_key(key: &str, now_millis: i64) -> String {
    let mut out = String::with_capacity(key.len());
    let mut rest = key;
    while let Some(start) = rest.find("!{timestamp:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "!{timestamp:".len()..];
        match after.find('}') {
            Some(end) => {
                out.push_str(&format_java_pattern(&after[..end], now_millis));
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn format_java_pattern(pattern: &str, now_millis: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(now_millis as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = String::new();
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut n = 1;
        while i + n < chars.len() && chars[i + n] == c {
            n += 1;
        }
        i += n;
        let num = |v: i64, width: usize| format!("{v:0width$}");
        let text = match c {
            'y' | 'u' | 'Y' => {
                let year = if c == 'Y' {
                    t.to_iso_week_date().0 as i64
                } else {
                    t.year() as i64
                };
                if n == 2 {
                    num(year.rem_euclid(100), 2)
                } else {
                    num(year, n)
                }
            }
            'M' | 'L' => match n {
                1 | 2 => num(t.month() as u8 as i64, n),
                3 => t.month().to_string()[..3].to_string(),
                _ => t.month().to_string(),
            },
            'd' => num(t.day() as i64, n),
            'D' => num(t.ordinal() as i64, n),
            'H' => num(t.hour() as i64, n),
            'h' => num(((t.hour() as i64 + 11) % 12) + 1, n),
            'm' => num(t.minute() as i64, n),
            's' => num(t.second() as i64, n),
            'S' => format!("{:09}", t.nanosecond())[..n.min(9)].to_string(),
            'w' => num(t.iso_week() as i64, n),
            'E' => {
                let day = t.weekday().to_string();
                if n <= 3 {
                    day[..3].to_string()
                } else {
                    day
                }
            }
            'a' => (if t.hour() < 12 { "AM" } else { "PM" }).to_string(),
            other => other.to_string().repeat(n),
        };
        out.push_str(&text);
    }
    out
}

impl Destination for S3Destination {
    fn cancel<'a>(
        &'a self,
        stream: &'a str,
        config: &'a ExportConfig,
        pending: &'a [StoredMessage],
        why: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for message in pending {
                let raw: Option<serde_json::Value> = serde_json::from_slice(&message.payload).ok();
                self.status(
                    stream,
                    config,
                    message,
                    raw.as_ref(),
                    CANCELED,
                    WARN_LEVEL,
                    why.to_string(),
                )
                .await;
            }
        })
    }

    fn send<'a>(
        &'a self,
        stream: &'a str,
        config: &'a ExportConfig,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<BatchOutcome, String>> {
        Box::pin(async move {
            let Some(message) = batch.first() else {
                return Ok(BatchOutcome::default());
            };
            let raw: Option<serde_json::Value> = serde_json::from_slice(&message.payload).ok();
            let task: Option<S3ExportTaskDefinition> =
                raw.clone().and_then(|v| serde_json::from_value(v).ok());
            let Some(task) = task else {
                let error = format!(
                    "message {} is not an S3ExportTaskDefinition (JSON with inputUrl, bucket and key); skipped",
                    message.sequence_number
                );
                self.status(
                    stream,
                    config,
                    message,
                    raw.as_ref(),
                    FAILURE,
                    ERROR_LEVEL,
                    error.clone(),
                )
                .await;
                return Ok(BatchOutcome {
                    processed: 1,
                    error: Some(error),
                    ..Default::default()
                });
            };
            let key = (
                stream.to_string(),
                config.identifier.clone().unwrap_or_default(),
            );
            let first_attempt = self
                .started
                .lock()
                .unwrap()
                .insert(key.clone(), message.sequence_number)
                != Some(message.sequence_number);
            if first_attempt {
                self.status(
                    stream,
                    config,
                    message,
                    raw.as_ref(),
                    IN_PROGRESS,
                    INFO_LEVEL,
                    format!("uploading {} to s3://{}", task.input_url, task.bucket),
                )
                .await;
            }
            let mut warnings = Vec::new();
            let result = self.run_task(config, &task, &mut warnings).await;
            for warning in warnings {
                self.status(
                    stream,
                    config,
                    message,
                    raw.as_ref(),
                    WARNING,
                    WARN_LEVEL,
                    warning,
                )
                .await;
            }
            match result {
                Ok(object_key) => {
                    self.status(
                        stream,
                        config,
                        message,
                        raw.as_ref(),
                        SUCCESS,
                        INFO_LEVEL,
                        format!("uploaded s3://{}/{object_key}", task.bucket),
                    )
                    .await;
                    Ok(BatchOutcome {
                        processed: 1,
                        exported_messages: 1,
                        exported_bytes: message.payload.len() as i64,
                        error: None,
                    })
                }
                Err(TaskError::Permanent(error)) => {
                    self.status(
                        stream,
                        config,
                        message,
                        raw.as_ref(),
                        FAILURE,
                        ERROR_LEVEL,
                        error.clone(),
                    )
                    .await;
                    Ok(BatchOutcome {
                        processed: 1,
                        error: Some(format!("task {} failed: {error}", message.sequence_number)),
                        ..Default::default()
                    })
                }
                Err(TaskError::Transient(error)) => Err(error),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_placeholders_use_java_pattern_letters() {
        // 2020-12-31T23:59:58.123Z, a Thursday; ISO week-based year 2020 (week 53).
        let t = 1_609_459_198_123;
        assert_eq!(
            resolve_key(
                "my-key/!{timestamp:YYYY}/!{timestamp:MM}/!{timestamp:dd}/data.txt",
                t
            ),
            "my-key/2020/12/31/data.txt"
        );
        assert_eq!(
            resolve_key("!{timestamp:yyyy/MM/dd/HH/mm/ss}-!{timestamp:D}", t),
            "2020/12/31/23/59/58-366"
        );
        assert_eq!(
            resolve_key("a/!{timestamp:yy}/E/!{timestamp:EEE}", t),
            "a/20/E/Thu"
        );
        assert_eq!(resolve_key("plain/key", t), "plain/key");
        assert_eq!(
            resolve_key("open/!{timestamp:yyyy", t),
            "open/!{timestamp:yyyy"
        );
        // 2021-01-01 belongs to ISO week-based year 2020.
        assert_eq!(resolve_key("!{timestamp:YYYY}", t + 10_000), "2020");
        assert_eq!(resolve_key("!{timestamp:yyyy}", t + 10_000), "2021");
    }

    #[test]
    fn file_urls_map_to_paths() {
        assert_eq!(
            local_path("file:/data/in/a.txt").as_deref(),
            Some("/data/in/a.txt")
        );
        assert_eq!(
            local_path("file:///data/in/a.txt").as_deref(),
            Some("/data/in/a.txt")
        );
        assert_eq!(local_path("s3://x/y"), None);
    }
}
