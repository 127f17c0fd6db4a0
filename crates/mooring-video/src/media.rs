//! The readers: GetMedia (archive then live tail), ListFragments and GetMediaForFragmentList.
//!
//! Every fragment goes out as a chunk laid out like real KVS output: its own EBML document
//! (the producer's EBML header, an unknown-size Segment, the producer's segment-level
//! elements), a Tags element with the fragment number and the server and producer
//! timestamps, the Cluster as the producer sent it (known or unknown size), the producer's
//! Tags (and Cues) that followed it, and for GetMedia a trailing
//! Tags element with MILLIS_BEHIND_NOW and the CONTINUATION_TOKEN.
//!
//! A GetMedia that cannot deliver a fragment ends with an error document instead: tags
//! AWS_KINESISVIDEO_FRAGMENT_NUMBER, AWS_KINESISVIDEO_ERROR_ID and
//! AWS_KINESISVIDEO_ERROR_CODE (4000 when the fragment's media is gone, 45xx when the
//! stream's KMS key is failing, 5000 otherwise). Output is paced to
//! `get_media_bytes_per_sec` per session.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response};
use base64::Engine;
use bytes::Bytes;
use mooring_aws::{json_response, AwsRequest, OperationName, Protocol};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{find_stream, JsonRequest};
use crate::ebml;
use crate::fragments::StoredFragment;
use crate::mkv::{self, ID_EBML, ID_SEGMENT};
use crate::model::{
    self, fragment_seq, json_timestamp, parse_json_timestamp, seconds_text,
    validate_fragment_number, ErrorKind, FragmentMeta, VideoError, VideoResult,
};
use crate::store::TimeClock;
use crate::{error_response, VideoState};

/// The chunk of one fragment; `tail` adds GetMedia's MILLIS_BEHIND_NOW / CONTINUATION_TOKEN.
pub fn chunk(fragment: &StoredFragment, millis_behind_now: Option<i64>) -> Vec<u8> {
    let number = fragment.meta.number();
    let mut out = Vec::with_capacity(
        fragment.ebml_header.len() + fragment.segment_prefix.len() + fragment.cluster.len() + 512,
    );
    out.extend_from_slice(&fragment.ebml_header);
    ebml::write_unknown_size_header(&mut out, ID_SEGMENT);
    out.extend_from_slice(&fragment.segment_prefix);
    out.extend(mkv::tags_element(&[
        ("AWS_KINESISVIDEO_FRAGMENT_NUMBER", &number),
        (
            "AWS_KINESISVIDEO_SERVER_TIMESTAMP",
            &seconds_text(fragment.meta.server_ms),
        ),
        (
            "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP",
            &seconds_text(fragment.meta.producer_ms),
        ),
    ]));
    out.extend_from_slice(&fragment.cluster);
    out.extend_from_slice(&fragment.tags);
    if let Some(behind) = millis_behind_now {
        out.extend(mkv::tags_element(&[
            ("AWS_KINESISVIDEO_MILLIS_BEHIND_NOW", &behind.to_string()),
            ("AWS_KINESISVIDEO_CONTINUATION_TOKEN", &number),
        ]));
    }
    out
}

/// A document holding only error tags (for fragments that cannot be delivered).
pub fn error_chunk(tags: &[(&str, &str)]) -> Vec<u8> {
    let mut header = Vec::new();
    ebml::write_element(&mut header, 0x4286, &[1]);
    ebml::write_element(&mut header, 0x42F7, &[1]);
    ebml::write_element(&mut header, 0x42F2, &[4]);
    ebml::write_element(&mut header, 0x42F3, &[8]);
    ebml::write_element(&mut header, mkv::ID_DOCTYPE, b"matroska");
    ebml::write_element(&mut header, 0x4287, &[4]);
    ebml::write_element(&mut header, 0x4285, &[2]);
    let mut out = Vec::new();
    ebml::write_element(&mut out, ID_EBML, &header);
    ebml::write_unknown_size_header(&mut out, ID_SEGMENT);
    out.extend(mkv::tags_element(tags));
    out
}

fn media_response(rx: mpsc::Receiver<Bytes>, operation: &str) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("video/webm"));
    response
        .extensions_mut()
        .insert(OperationName(operation.to_string()));
    response
}

/// Concurrent GetMedia connections allowed per stream.
const GET_MEDIA_CONNECTIONS: usize = 3;

/// Where a GetMedia reader starts: the sequence it delivers fragments after.
fn start_after(state: &VideoState, arn: &str, selector: &JsonRequest) -> VideoResult<i64> {
    let kind = selector.required_string("StartSelectorType")?;
    let fragments = &state.fragments;
    match kind.as_str() {
        "EARLIEST" => Ok(0),
        "NOW" => Ok(fragments.latest(arn)?.map_or(0, |m| m.seq - 1)),
        "FRAGMENT_NUMBER" | "CONTINUATION_TOKEN" => {
            let field = if kind == "FRAGMENT_NUMBER" {
                "AfterFragmentNumber"
            } else {
                "ContinuationToken"
            };
            let value = selector.string(field)?.ok_or_else(|| {
                VideoError::invalid(format!("{field} is required for StartSelectorType {kind}"))
            })?;
            validate_fragment_number(&value, field)?;
            fragment_seq(&value).ok_or_else(|| {
                VideoError::invalid(format!("{field} {value} is not a fragment of this stream"))
            })
        }
        "SERVER_TIMESTAMP" | "PRODUCER_TIMESTAMP" => {
            let at = selector.value("StartTimestamp").ok_or_else(|| {
                VideoError::invalid(format!(
                    "StartTimestamp is required for StartSelectorType {kind}"
                ))
            })?;
            let at = parse_json_timestamp(at, "StartTimestamp")?;
            let clock = if kind == "SERVER_TIMESTAMP" {
                TimeClock::Server
            } else {
                TimeClock::Producer
            };
            let time_of = |m: &FragmentMeta| match clock {
                TimeClock::Server => m.server_ms,
                TimeClock::Producer => m.producer_ms,
            };
            let memory = fragments.memory_fragments(arn);
            let in_memory = memory
                .iter()
                .find(|m| time_of(m) <= at && at < time_of(m) + m.duration_ms.max(1))
                .or_else(|| memory.iter().find(|m| time_of(m) >= at))
                .map(|m| m.seq);
            let on_disk = state.store.fragment_at(arn, clock, at)?;
            let found = match (in_memory, on_disk) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match found {
                Some(seq) => Ok(seq - 1),
                None => Ok(fragments.latest(arn)?.map_or(0, |m| m.seq)),
            }
        }
        other => Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{other}' at 'StartSelector.StartSelectorType' failed to satisfy constraint: Member must satisfy enum value set: [FRAGMENT_NUMBER, SERVER_TIMESTAMP, PRODUCER_TIMESTAMP, NOW, EARLIEST, CONTINUATION_TOKEN]"
        ))),
    }
}

/// Handles `POST /getMedia`.
pub async fn get_media(state: Arc<VideoState>, request: AwsRequest) -> Response<Body> {
    const OP: &str = "GetMedia";
    let prepared = async {
        let req = JsonRequest::parse(&request.body)?;
        let stream_ref = req.stream_ref()?;
        let selector = req
            .object("StartSelector")?
            .ok_or_else(|| VideoError::invalid("StartSelector is required"))?;
        state
            .blocking(move |s| {
                let stream = find_stream(s, &stream_ref)?;
                let after = start_after(s, &stream.arn, &selector)?;
                let kms = crate::ingest::kms_error(&s.config, &stream.kms_key_id);
                Ok((stream.arn, after, kms))
            })
            .await
    }
    .await;
    let (arn, mut after, kms) = match prepared {
        Ok(p) => p,
        Err(e) => return error_response(&e, OP),
    };
    let live = state.fragments.live(&arn);
    let Some(slot) = live.try_reader(GET_MEDIA_CONNECTIONS) else {
        let e = VideoError::new(
            ErrorKind::ConnectionLimitExceeded,
            format!("The stream already has {GET_MEDIA_CONNECTIONS} GetMedia connections"),
        );
        return error_response(&e, OP);
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let idle = Duration::from_millis(state.config.get_media_idle_ms);
    let task_state = state.clone();
    tokio::spawn(async move {
        // A local of the task: released when it returns, before the captured `tx` drops
        // and the response ends.
        let _slot = slot;
        let mut pacer = crate::admission::Pacer::new(task_state.config.get_media_bytes_per_sec);
        let mut changes = live.subscribe();
        loop {
            changes.borrow_and_update();
            if live.is_deleted() {
                return;
            }
            let a = arn.clone();
            let next = task_state
                .blocking(move |s| s.fragments.next_after(&a, after))
                .await;
            match next {
                Ok(Some(fragment)) => {
                    if let Some(error) = kms {
                        let number = fragment.meta.number();
                        let _ = tx
                            .send(Bytes::from(error_chunk(&[
                                ("AWS_KINESISVIDEO_FRAGMENT_NUMBER", &number),
                                ("AWS_KINESISVIDEO_ERROR_ID", &error.id.to_string()),
                                ("AWS_KINESISVIDEO_ERROR_CODE", error.code),
                            ])))
                            .await;
                        return;
                    }
                    let behind = task_state.clock().now_millis() - fragment.meta.server_ms;
                    after = fragment.meta.seq;
                    let bytes = Bytes::from(chunk(&fragment, Some(behind.max(0))));
                    let size = bytes.len();
                    if tx.send(bytes).await.is_err() {
                        return;
                    }
                    pacer.pace(size).await;
                }
                Ok(None) => match tokio::time::timeout(idle, changes.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "GetMedia read failed");
                    // The index still lists the fragment: its media is gone (4000), or its
                    // stored bytes fail their checksum so it cannot be written into the
                    // stream (3002).
                    let a = arn.clone();
                    let indexed = task_state
                        .blocking(move |s| Ok(s.store.fragment_after(&a, after)?))
                        .await;
                    let (number, id, code) = match indexed {
                        Ok(Some((meta, _))) if crate::fragments::is_damaged_media(&e) => {
                            (meta.number(), "3002", "ERROR_WRITING_TO_STREAM")
                        }
                        Ok(Some((meta, _))) => (meta.number(), "4000", "FRAGMENT_NOT_FOUND"),
                        _ => (model::fragment_number(after + 1), "5000", "INTERNAL_ERROR"),
                    };
                    let _ = tx
                        .send(Bytes::from(error_chunk(&[
                            ("AWS_KINESISVIDEO_FRAGMENT_NUMBER", &number),
                            ("AWS_KINESISVIDEO_ERROR_ID", id),
                            ("AWS_KINESISVIDEO_ERROR_CODE", code),
                        ])))
                        .await;
                    return;
                }
            }
        }
    });
    media_response(rx, OP)
}

fn fragment_json(m: &FragmentMeta) -> Value {
    json!({
        "FragmentNumber": m.number(),
        "FragmentSizeInBytes": m.size,
        "ProducerTimestamp": json_timestamp(m.producer_ms),
        "ServerTimestamp": json_timestamp(m.server_ms),
        "FragmentLengthInMilliseconds": m.duration_ms,
    })
}

/// A ListFragments page position: clock, range and the last sequence returned.
fn encode_list_token(clock: TimeClock, start: i64, end: i64, after: i64) -> String {
    let c = if clock == TimeClock::Server { "S" } else { "P" };
    base64::engine::general_purpose::STANDARD.encode(format!("{c}:{start}:{end}:{after}"))
}

fn decode_list_token(token: &str) -> VideoResult<(TimeClock, i64, i64, i64)> {
    let bad = || VideoError::invalid("NextToken is not valid");
    let text = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 4 {
        return Err(bad());
    }
    let clock = match parts[0] {
        "S" => TimeClock::Server,
        "P" => TimeClock::Producer,
        _ => return Err(bad()),
    };
    let n = |s: &str| s.parse::<i64>().map_err(|_| bad());
    Ok((clock, n(parts[1])?, n(parts[2])?, n(parts[3])?))
}

fn list_fragments_blocking(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let stream_ref = req.stream_ref()?;
    let max = req.integer("MaxResults")?.unwrap_or(100);
    if !(1..=1000).contains(&max) {
        return Err(VideoError::invalid(
            "1 validation error detected: Value at 'MaxResults' failed to satisfy constraint: Member must have value between 1 and 1000",
        ));
    }
    let (clock, start, end, after) = match req.string("NextToken")? {
        Some(token) => decode_list_token(&token)?,
        None => {
            let selector = req.object("FragmentSelector")?.ok_or_else(|| {
                VideoError::invalid("FragmentSelector is required when NextToken is absent")
            })?;
            let clock = match selector.required_string("FragmentSelectorType")?.as_str() {
                "SERVER_TIMESTAMP" => TimeClock::Server,
                "PRODUCER_TIMESTAMP" => TimeClock::Producer,
                other => {
                    return Err(VideoError::invalid(format!(
                        "FragmentSelectorType must be PRODUCER_TIMESTAMP or SERVER_TIMESTAMP, got {other}"
                    )))
                }
            };
            let range = selector
                .object("TimestampRange")?
                .ok_or_else(|| VideoError::invalid("TimestampRange is required"))?;
            let start = range
                .value("StartTimestamp")
                .ok_or_else(|| VideoError::invalid("StartTimestamp is required"))?;
            let end = range
                .value("EndTimestamp")
                .ok_or_else(|| VideoError::invalid("EndTimestamp is required"))?;
            let start = parse_json_timestamp(start, "StartTimestamp")?;
            let end = parse_json_timestamp(end, "EndTimestamp")?;
            if end < start {
                return Err(VideoError::invalid(
                    "EndTimestamp must not be earlier than StartTimestamp",
                ));
            }
            (clock, start, end, 0)
        }
    };
    let stream = find_stream(s, &stream_ref)?;
    let mut fragments =
        s.store
            .fragments_in_range(&stream.arn, clock, start, end, after, max as usize + 1)?;
    let more = fragments.len() > max as usize;
    fragments.truncate(max as usize);
    let mut out = json!({ "Fragments": fragments.iter().map(fragment_json).collect::<Vec<_>>() });
    if more {
        if let Some(last) = fragments.last() {
            out["NextToken"] = json!(encode_list_token(clock, start, end, last.seq));
        }
    }
    Ok(out)
}

/// Handles `POST /listFragments`.
pub async fn list_fragments(state: Arc<VideoState>, request: AwsRequest) -> Response<Body> {
    const OP: &str = "ListFragments";
    let result = match JsonRequest::parse(&request.body) {
        Ok(req) => {
            state
                .blocking(move |s| list_fragments_blocking(s, &req))
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => {
            let mut response = json_response(Protocol::RestJson1, &body);
            response.extensions_mut().insert(OperationName(OP.into()));
            response
        }
        Err(e) => error_response(&e, OP),
    }
}

/// Handles `POST /getMediaForFragmentList`.
pub async fn get_media_for_fragment_list(
    state: Arc<VideoState>,
    request: AwsRequest,
) -> Response<Body> {
    const OP: &str = "GetMediaForFragmentList";
    let prepared = async {
        let req = JsonRequest::parse(&request.body)?;
        let stream_ref = req.stream_ref()?;
        let numbers = req
            .string_list("Fragments")?
            .ok_or_else(|| VideoError::invalid("Fragments is required"))?;
        if numbers.is_empty() || numbers.len() > 1000 {
            return Err(VideoError::invalid(
                "1 validation error detected: Value at 'Fragments' failed to satisfy constraint: Member must have length between 1 and 1000",
            ));
        }
        for n in &numbers {
            validate_fragment_number(n, "Fragments")?;
        }
        let stream = state
            .blocking(move |s| find_stream(s, &stream_ref))
            .await?;
        Ok((stream.arn, numbers))
    }
    .await;
    let (arn, numbers) = match prepared {
        Ok(p) => p,
        Err(e) => return error_response(&e, OP),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for number in numbers {
            let a = arn.clone();
            let seq = fragment_seq(&number);
            let found = match seq {
                Some(seq) => state.blocking(move |s| s.fragments.read(&a, seq)).await,
                None => Ok(None),
            };
            let bytes = match found {
                Ok(Some(fragment)) => chunk(&fragment, None),
                Ok(None) => error_chunk(&[
                    ("AWS_KINESISVIDEO_FRAGMENT_NUMBER", &number),
                    ("AWS_KINESISVIDEO_EXCEPTION_ERROR_CODE", "404"),
                    (
                        "AWS_KINESISVIDEO_EXCEPTION_MESSAGE",
                        "The requested fragment was not found",
                    ),
                ]),
                Err(e) => error_chunk(&[
                    ("AWS_KINESISVIDEO_FRAGMENT_NUMBER", &number),
                    ("AWS_KINESISVIDEO_EXCEPTION_ERROR_CODE", "500"),
                    ("AWS_KINESISVIDEO_EXCEPTION_MESSAGE", &e.message),
                ]),
            };
            if tx.send(Bytes::from(bytes)).await.is_err() {
                return;
            }
        }
    });
    media_response(rx, OP)
}
