//! The IoT Analytics and IoT SiteWise exporters, through the official `aws-sdk-iotanalytics`
//! and `aws-sdk-iotsitewise` crates.
//!
//! IoT Analytics: one `BatchPutMessage` per batch into `iotChannel`, each message's id being
//! `iotMsgIdPrefix` followed by its sequence number (unique within a batch, stable across
//! retries), the payload unchanged. SiteWise: every stream message must be one JSON
//! `PutAssetPropertyValueEntry`; a batch becomes one `BatchPutAssetPropertyValue` whose
//! `entries` are those messages, sent as appended, or several in order when an entry id
//! repeats (ids must be unique within a request, so the repeat starts the next request).
//! Messages that cannot succeed as given (malformed JSON, values or IDs outside the model, an
//! entry the service rejects as invalid, not found, out of range or denied) are skipped and
//! reported in `errorMessage`; throttling, internal and unavailable errors, and whole-call
//! failures, are retried by the engine from the first such message, forever.
//!
//! SiteWise's model puts the host prefix `data.` in front of the endpoint; when an endpoint
//! override is configured (a local fake, a gateway) requests go to exactly that endpoint.

use aws_sdk_iotsitewise::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_iotsitewise::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_iotsitewise::types as sw;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::{BatchOutcome, Destination};
use crate::definition::ExportConfig;
use crate::log::StoredMessage;

/// What to do with one message after a call.
#[derive(Debug, Clone, PartialEq)]
enum MessageResult {
    Delivered,
    /// Not deliverable as given: skip it and report why.
    Rejected(String),
    /// Worth sending again.
    Retry(String),
}

/// Folds per-message results, in order, into the engine's outcome: the processed prefix
/// stops at the first retryable failure.
fn outcome_of(batch: &[StoredMessage], results: &[MessageResult]) -> BatchOutcome {
    let mut outcome = BatchOutcome::default();
    let mut rejected = Vec::new();
    for (message, result) in batch.iter().zip(results) {
        match result {
            MessageResult::Delivered => {
                outcome.exported_messages += 1;
                outcome.exported_bytes += message.payload.len() as i64;
            }
            MessageResult::Rejected(why) => rejected.push(format!(
                "message {} skipped: {why}",
                message.sequence_number
            )),
            MessageResult::Retry(why) => {
                rejected.push(format!(
                    "message {} will be retried: {why}",
                    message.sequence_number
                ));
                break;
            }
        }
        outcome.processed += 1;
    }
    if !rejected.is_empty() {
        outcome.error = Some(rejected.join("; "));
    }
    outcome
}

/// IoT Analytics `BatchPutMessage`.
pub struct IotAnalyticsDestination {
    pub client: aws_sdk_iotanalytics::Client,
}

/// Error codes of `batchPutMessageErrorEntries` that sending again cannot fix.
fn analytics_code_is_permanent(code: &str) -> bool {
    matches!(
        code,
        "InvalidRequestException" | "ResourceNotFoundException" | "AccessDeniedException"
    )
}

/// The message id of a stream message: the configured prefix and the sequence number.
pub fn analytics_message_id(prefix: Option<&str>, sequence_number: i64) -> String {
    format!("{}{sequence_number}", prefix.unwrap_or_default())
}

impl Destination for IotAnalyticsDestination {
    fn send<'a>(
        &'a self,
        _stream: &'a str,
        config: &'a ExportConfig,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<BatchOutcome, String>> {
        Box::pin(async move {
            let prefix = config.iot_msg_id_prefix.as_deref();
            let mut messages = Vec::with_capacity(batch.len());
            for message in batch {
                messages.push(
                    aws_sdk_iotanalytics::types::Message::builder()
                        .message_id(analytics_message_id(prefix, message.sequence_number))
                        .payload(aws_sdk_iotanalytics::primitives::Blob::new(
                            message.payload.to_vec(),
                        ))
                        .build()
                        .map_err(|e| e.to_string())?,
                );
            }
            let response = self
                .client
                .batch_put_message()
                .channel_name(config.iot_channel.clone().unwrap_or_default())
                .set_messages(Some(messages))
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "IoT Analytics BatchPutMessage failed: {}",
                        aws_sdk_iotanalytics::error::DisplayErrorContext(e)
                    )
                })?;
            let results: Vec<MessageResult> = batch
                .iter()
                .map(|message| {
                    let id = analytics_message_id(prefix, message.sequence_number);
                    let failure = response
                        .batch_put_message_error_entries()
                        .iter()
                        .find(|e| e.message_id() == Some(id.as_str()));
                    match failure {
                        None => MessageResult::Delivered,
                        Some(entry) => {
                            let code = entry.error_code().unwrap_or("UnknownError");
                            let why = format!(
                                "IoT Analytics rejected message id {id}: {code}: {}",
                                entry.error_message().unwrap_or_default()
                            );
                            if analytics_code_is_permanent(code) {
                                MessageResult::Rejected(why)
                            } else {
                                MessageResult::Retry(why)
                            }
                        }
                    }
                })
                .collect();
            Ok(outcome_of(batch, &results))
        })
    }
}

/// A `PutAssetPropertyValueEntry` as the stream manager SDKs serialize it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntryJson {
    entry_id: String,
    #[serde(default)]
    asset_id: Option<String>,
    #[serde(default)]
    property_id: Option<String>,
    #[serde(default)]
    property_alias: Option<String>,
    property_values: Vec<ValueJson>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ValueJson {
    value: VariantJson,
    timestamp: TimeJson,
    #[serde(default)]
    quality: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VariantJson {
    #[serde(default)]
    string_value: Option<String>,
    #[serde(default)]
    integer_value: Option<i64>,
    #[serde(default)]
    double_value: Option<f64>,
    #[serde(default)]
    boolean_value: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TimeJson {
    time_in_seconds: i64,
    #[serde(default)]
    offset_in_nanos: Option<i64>,
}

const MAX_TIME_IN_SECONDS: i64 = 31_556_889_864_403_199;

/// Parses and checks one SiteWise message against the SDK's model; the error says what is
/// wrong in the SDK's field names.
pub fn parse_entry(payload: &[u8]) -> Result<sw::PutAssetPropertyValueEntry, String> {
    let entry: EntryJson = serde_json::from_slice(payload)
        .map_err(|e| format!("not a PutAssetPropertyValueEntry JSON: {e}"))?;
    let id_ok = (1..=64).contains(&entry.entry_id.len())
        && entry
            .entry_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !id_ok {
        return Err(format!(
            "entryId {:?} must be 1 to 64 characters of [a-zA-Z0-9_-]",
            entry.entry_id
        ));
    }
    match (&entry.property_alias, &entry.asset_id, &entry.property_id) {
        (Some(alias), _, _) => {
            if alias.is_empty() || alias.len() > 2048 || alias.chars().any(char::is_control) {
                return Err(
                    "propertyAlias must be 1 to 2048 characters without control characters".into(),
                );
            }
        }
        (None, Some(_), Some(_)) => {}
        _ => return Err("an entry needs propertyAlias, or assetId and propertyId".into()),
    }
    for (member, id) in [
        ("assetId", &entry.asset_id),
        ("propertyId", &entry.property_id),
    ] {
        if let Some(id) = id {
            if !is_sitewise_id(id) {
                return Err(format!(
                    "{member} {id:?} must be a SiteWise ID: a lower-case, non-nil UUID"
                ));
            }
        }
    }
    if entry.property_values.is_empty() || entry.property_values.len() > 10 {
        return Err(format!(
            "propertyValues must hold 1 to 10 values, got {}",
            entry.property_values.len()
        ));
    }
    let mut builder = sw::PutAssetPropertyValueEntry::builder()
        .entry_id(&entry.entry_id)
        .set_asset_id(entry.asset_id.clone())
        .set_property_id(entry.property_id.clone())
        .set_property_alias(entry.property_alias.clone());
    for value in entry.property_values {
        builder = builder.property_values(parse_value(value)?);
    }
    builder.build().map_err(|e| e.to_string())
}

/// SiteWise's `ID` shape: 36 characters, a lower-case UUID in its hyphenated form, not the
/// nil UUID. The service refuses a whole request holding another value, so such an entry is
/// skipped rather than sent.
fn is_sitewise_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    bytes.len() == 36
        && id != "00000000-0000-0000-0000-000000000000"
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(b),
        })
}

fn parse_value(value: ValueJson) -> Result<sw::AssetPropertyValue, String> {
    let v = value.value;
    let set = [
        v.string_value.is_some(),
        v.integer_value.is_some(),
        v.double_value.is_some(),
        v.boolean_value.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(
            "value must hold exactly one of stringValue, integerValue, doubleValue, booleanValue"
                .into(),
        );
    }
    let mut variant = sw::Variant::builder();
    if let Some(s) = v.string_value {
        if s.is_empty() || s.chars().count() > 1024 || s.chars().any(char::is_control) {
            return Err(
                "stringValue must be 1 to 1024 characters without control characters".into(),
            );
        }
        variant = variant.string_value(s);
    }
    if let Some(i) = v.integer_value {
        let i = i32::try_from(i).map_err(|_| format!("integerValue {i} is out of range"))?;
        variant = variant.integer_value(i);
    }
    if let Some(d) = v.double_value {
        variant = variant.double_value(d);
    }
    if let Some(b) = v.boolean_value {
        variant = variant.boolean_value(b);
    }
    let seconds = value.timestamp.time_in_seconds;
    if !(1..=MAX_TIME_IN_SECONDS).contains(&seconds) {
        return Err(format!("timeInSeconds {seconds} is out of range"));
    }
    // An absent offset stays absent (the entry goes out as appended; SiteWise reads it as 0).
    let nanos = value.timestamp.offset_in_nanos;
    if let Some(nanos) = nanos.filter(|n| !(0..=999_999_999).contains(n)) {
        return Err(format!("offsetInNanos {nanos} is out of range"));
    }
    let timestamp = sw::TimeInNanos::builder()
        .time_in_seconds(seconds)
        .set_offset_in_nanos(nanos.map(|n| n as i32))
        .build()
        .map_err(|e| e.to_string())?;
    let quality = match value.quality.as_deref() {
        None => None,
        Some(q @ ("GOOD" | "BAD" | "UNCERTAIN")) => Some(sw::Quality::from(q)),
        Some(other) => return Err(format!("quality {other:?} is not GOOD, BAD or UNCERTAIN")),
    };
    Ok(sw::AssetPropertyValue::builder()
        .value(variant.build())
        .timestamp(timestamp)
        .set_quality(quality)
        .build())
}

/// SiteWise error codes that sending again may fix.
fn sitewise_code_is_retryable(code: &str) -> bool {
    matches!(
        code,
        "ThrottlingException"
            | "InternalFailureException"
            | "ServiceUnavailableException"
            | "LimitExceededException"
            | "ConflictingOperationException"
    )
}

/// IoT SiteWise `BatchPutAssetPropertyValue`.
pub struct IotSiteWiseDestination {
    pub client: aws_sdk_iotsitewise::Client,
}

/// The next SiteWise request from the front of `messages`: every message up to (not
/// including) the first whose entry id the request already holds, since the entry ids of one
/// `BatchPutAssetPropertyValue` must be unique. Messages that are not valid entries get their
/// result at once (`Some`); the entries to send get `None`, in order.
struct SiteWiseRequest {
    results: Vec<Option<MessageResult>>,
    entries: Vec<sw::PutAssetPropertyValueEntry>,
}

fn next_sitewise_request(messages: &[StoredMessage]) -> SiteWiseRequest {
    let mut request = SiteWiseRequest {
        results: Vec::new(),
        entries: Vec::new(),
    };
    for message in messages {
        match parse_entry(&message.payload) {
            Ok(entry) => {
                if request
                    .entries
                    .iter()
                    .any(|held| held.entry_id() == entry.entry_id())
                {
                    break;
                }
                request.entries.push(entry);
                request.results.push(None);
            }
            Err(why) => request.results.push(Some(MessageResult::Rejected(why))),
        }
    }
    request
}

/// The result of each message of a request, given SiteWise's answer.
fn sitewise_results(
    request: SiteWiseRequest,
    response: Option<&aws_sdk_iotsitewise::operation::batch_put_asset_property_value::BatchPutAssetPropertyValueOutput>,
) -> Vec<MessageResult> {
    let mut sent = request.entries.iter().map(|e| e.entry_id());
    request
        .results
        .into_iter()
        .map(|result| {
            if let Some(result) = result {
                return result;
            }
            let id = sent.next().expect("one entry per message sent");
            let failure =
                response.and_then(|r| r.error_entries().iter().find(|e| e.entry_id() == id));
            let Some(failure) = failure else {
                return MessageResult::Delivered;
            };
            let why = failure
                .errors()
                .iter()
                .map(|e| format!("{}: {}", e.error_code().as_str(), e.error_message()))
                .collect::<Vec<_>>()
                .join(", ");
            let why = format!("SiteWise rejected entry {id}: {why}");
            if failure
                .errors()
                .iter()
                .any(|e| sitewise_code_is_retryable(e.error_code().as_str()))
            {
                MessageResult::Retry(why)
            } else {
                MessageResult::Rejected(why)
            }
        })
        .collect()
}

impl Destination for IotSiteWiseDestination {
    /// Sends the batch as one request, or as several in order when entry ids repeat (a
    /// repeated id goes in the following request); stops at the first retryable failure.
    fn send<'a>(
        &'a self,
        _stream: &'a str,
        _config: &'a ExportConfig,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<BatchOutcome, String>> {
        Box::pin(async move {
            let mut results: Vec<MessageResult> = Vec::with_capacity(batch.len());
            let mut call_error = None;
            while results.len() < batch.len() {
                let request = next_sitewise_request(&batch[results.len()..]);
                let response = if request.entries.is_empty() {
                    None
                } else {
                    let sent = self
                        .client
                        .batch_put_asset_property_value()
                        .set_entries(Some(request.entries.clone()))
                        .send()
                        .await
                        .map_err(|e| {
                            format!(
                                "IoT SiteWise BatchPutAssetPropertyValue failed: {}",
                                aws_sdk_iotsitewise::error::DisplayErrorContext(e)
                            )
                        });
                    match sent {
                        Ok(response) => Some(response),
                        Err(e) if results.is_empty() => return Err(e),
                        Err(e) => {
                            call_error = Some(e);
                            break;
                        }
                    }
                };
                let request_results = sitewise_results(request, response.as_ref());
                let retry = request_results
                    .iter()
                    .any(|r| matches!(r, MessageResult::Retry(_)));
                results.extend(request_results);
                if retry {
                    break;
                }
            }
            let mut outcome = outcome_of(&batch[..results.len()], &results);
            if let Some(e) = call_error {
                outcome.error = Some(match outcome.error {
                    Some(skipped) => format!("{skipped}; {e}"),
                    None => e,
                });
            }
            Ok(outcome)
        })
    }
}

/// Sends SiteWise requests to the configured endpoint itself, without the model's `data.`
/// host prefix (which would make `127.0.0.1` into `data.127.0.0.1`).
#[derive(Debug)]
pub struct ExactEndpoint {
    pub authority: String,
}

impl Intercept for ExactEndpoint {
    fn name(&self) -> &'static str {
        "ExactEndpoint"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let request = context.request_mut();
        let uri: http::Uri = request.uri().parse()?;
        if uri.authority().map(|a| a.as_str()) == Some(self.authority.as_str()) {
            return Ok(());
        }
        let mut parts = uri.into_parts();
        parts.authority = Some(self.authority.parse()?);
        let rewritten = http::Uri::from_parts(parts)?.to_string();
        request.set_uri(rewritten)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: i64, payload: &str) -> StoredMessage {
        StoredMessage {
            sequence_number: seq,
            ingest_time: 1,
            payload: bytes::Bytes::from(payload.to_string()),
        }
    }

    #[test]
    fn entries_parse_like_the_sdk_serializes_them() {
        let entry = parse_entry(
            br#"{"entryId":"e1","propertyAlias":"/plant/pump/temp","propertyValues":[
                {"value":{"doubleValue":21.5},"timestamp":{"timeInSeconds":1700000000,"offsetInNanos":5},"quality":"GOOD"}]}"#,
        )
        .unwrap();
        assert_eq!(entry.entry_id(), "e1");
        let value = &entry.property_values()[0];
        assert_eq!(value.value().unwrap().double_value(), Some(21.5));
        assert_eq!(value.timestamp().unwrap().offset_in_nanos(), Some(5));
        assert_eq!(value.quality().map(|q| q.as_str()), Some("GOOD"));
        let entry = parse_entry(
            br#"{"entryId":"e2","propertyAlias":"/p","propertyValues":[
                {"value":{"integerValue":3},"timestamp":{"timeInSeconds":1700000000}}]}"#,
        )
        .unwrap();
        let value = &entry.property_values()[0];
        assert_eq!(value.timestamp().unwrap().offset_in_nanos(), None);
        assert_eq!(value.quality(), None);
    }

    #[test]
    fn invalid_entries_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("not json", "not a PutAssetPropertyValueEntry"),
            (
                r#"{"entryId":"bad id!","propertyAlias":"a","propertyValues":[{"value":{"integerValue":1},"timestamp":{"timeInSeconds":1}}]}"#,
                "entryId",
            ),
            (
                r#"{"entryId":"e","propertyValues":[{"value":{"integerValue":1},"timestamp":{"timeInSeconds":1}}]}"#,
                "propertyAlias, or assetId",
            ),
            (
                r#"{"entryId":"e","propertyAlias":"a","propertyValues":[]}"#,
                "1 to 10",
            ),
            (
                r#"{"entryId":"e","propertyAlias":"a","propertyValues":[{"value":{"integerValue":1,"doubleValue":2},"timestamp":{"timeInSeconds":1}}]}"#,
                "exactly one",
            ),
            (
                r#"{"entryId":"e","propertyAlias":"a","propertyValues":[{"value":{"integerValue":1},"timestamp":{"timeInSeconds":0}}]}"#,
                "timeInSeconds",
            ),
            (
                r#"{"entryId":"e","propertyAlias":"a","propertyValues":[{"value":{"integerValue":1},"timestamp":{"timeInSeconds":1,"offsetInNanos":1000000000}}]}"#,
                "offsetInNanos",
            ),
            (
                r#"{"entryId":"e","propertyAlias":"a","propertyValues":[{"value":{"integerValue":1},"timestamp":{"timeInSeconds":1},"quality":"OK"}]}"#,
                "quality",
            ),
            (
                r#"{"entryId":"e","propertyAlias":"a","propertyValues":[{"value":{"integerValue":4294967296},"timestamp":{"timeInSeconds":1}}]}"#,
                "integerValue",
            ),
            (
                r#"{"entryId":"e","assetId":"a1b2","propertyId":"7e3f8a2c-0d4b-4c5e-9f60-1a2b3c4d5e6f","propertyValues":[{"value":{"integerValue":1},"timestamp":{"timeInSeconds":1}}]}"#,
                "assetId \"a1b2\" must be a SiteWise ID",
            ),
            (
                r#"{"entryId":"e","assetId":"7e3f8a2c-0d4b-4c5e-9f60-1a2b3c4d5e6f","propertyId":"7E3F8A2C-0D4B-4C5E-9F60-1A2B3C4D5E6F","propertyValues":[{"value":{"integerValue":1},"timestamp":{"timeInSeconds":1}}]}"#,
                "propertyId",
            ),
        ];
        for (payload, expected) in cases {
            let err = parse_entry(payload.as_bytes()).unwrap_err();
            assert!(err.contains(expected), "{payload}: {err}");
        }
    }

    #[test]
    fn the_processed_prefix_stops_at_the_first_retryable_failure() {
        let batch: Vec<_> = (0..4).map(|i| message(i, "xx")).collect();
        let outcome = outcome_of(
            &batch,
            &[
                MessageResult::Delivered,
                MessageResult::Rejected("bad".into()),
                MessageResult::Retry("busy".into()),
                MessageResult::Delivered,
            ],
        );
        assert_eq!(outcome.processed, 2);
        assert_eq!(outcome.exported_messages, 1);
        assert_eq!(outcome.exported_bytes, 2);
        let error = outcome.error.unwrap();
        assert!(error.contains("message 1 skipped: bad"), "{error}");
        assert!(error.contains("message 2 will be retried: busy"), "{error}");
    }

    #[test]
    fn sitewise_ids_are_lower_case_non_nil_uuids() {
        assert!(is_sitewise_id("7e3f8a2c-0d4b-4c5e-9f60-1a2b3c4d5e6f"));
        for bad in [
            "",
            "a1b2",
            "00000000-0000-0000-0000-000000000000",
            "7E3F8A2C-0D4B-4C5E-9F60-1A2B3C4D5E6F",
            "7e3f8a2c0d4b4c5e9f601a2b3c4d5e6f",
            "7e3f8a2c-0d4b-4c5e-9f60-1a2b3c4d5e6g",
            "7e3f8a2c-0d4b-4c5e-9f60-1a2b3c4d5e6f0",
            "{7e3f8a2c-0d4b-4c5e-9f60-1a2b3c4d5e6}",
        ] {
            assert!(!is_sitewise_id(bad), "{bad}");
        }
    }

    fn entry(id: &str) -> String {
        format!(
            r#"{{"entryId":"{id}","propertyAlias":"/p","propertyValues":[{{"value":{{"doubleValue":1.0}},"timestamp":{{"timeInSeconds":1700000000}}}}]}}"#
        )
    }

    #[test]
    fn a_repeated_entry_id_starts_the_next_request() {
        let payloads = [
            entry("a"),
            "not json".to_string(),
            entry("b"),
            entry("a"),
            entry("c"),
            entry("a"),
        ];
        let batch: Vec<_> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| message(i as i64, p))
            .collect();
        let mut requests = Vec::new();
        let mut next = 0;
        while next < batch.len() {
            let request = next_sitewise_request(&batch[next..]);
            next += request.results.len();
            let ids: Vec<_> = request
                .entries
                .iter()
                .map(|e| e.entry_id().to_string())
                .collect();
            let skipped = request.results.iter().filter(|r| r.is_some()).count();
            requests.push((ids, skipped));
        }
        assert_eq!(
            requests,
            [
                (vec!["a".to_string(), "b".to_string()], 1),
                (vec!["a".to_string(), "c".to_string()], 0),
                (vec!["a".to_string()], 0),
            ]
        );
        // Without a response every sent entry counts as delivered, skipped ones stay skipped.
        let results = sitewise_results(next_sitewise_request(&batch), None);
        assert_eq!(results.len(), 3);
        assert_eq!(results[0], MessageResult::Delivered);
        assert!(
            matches!(&results[1], MessageResult::Rejected(why) if why.contains("not a PutAssetPropertyValueEntry"))
        );
        assert_eq!(results[2], MessageResult::Delivered);
    }

    #[test]
    fn message_ids_carry_the_prefix_and_the_sequence_number() {
        assert_eq!(analytics_message_id(Some("gw1-"), 42), "gw1-42");
        assert_eq!(analytics_message_id(None, 7), "7");
    }
}
