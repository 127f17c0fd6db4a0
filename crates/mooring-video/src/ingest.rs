//! PutMedia: a long-lived chunked MKV upload answered by a stream of acknowledgements.
//!
//! Headers and the stream are checked before the 200; from then on every problem is an
//! ERROR ack. The body is fed to the incremental parser as it arrives. Each Cluster becomes a
//! fragment: BUFFERING when its Timecode arrives (the fragment number is assigned then),
//! RECEIVED once it and the Tags following it are complete and valid (the fragment is then
//! visible to live readers), and PERSISTED once a separate task has appended it to the
//! segment file and fsynced it (retention > 0 only; fragments that queue up behind an fsync
//! share the next one). Each ack is its own HTTP chunk.
//! While the body is quiet IDLE acks are sent; after `idle_timeout_secs` without data the
//! response ends. A fatal error ends the response after its ERROR ack.
//!
//! A stream has one PutMedia connection: when a newer one opens, this one stops at the next
//! cluster boundary (the fragment in flight is finished and acked) and ends its response.
//! The body is read no faster than `put_media_bytes_per_sec`. A stream whose KMS key is
//! configured in a failing state gets the matching 45xx ERROR on its first fragment.
//! When the stream is deleted during ingest, the fragment being received or stored gets
//! ERROR 4507 `STREAM_DELETED` and a fragment starting afterwards 4008 `STREAM_NOT_ACTIVE`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Response, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use mooring_aws::{AwsRequest, OperationName};
use tokio::sync::mpsc;

use crate::admission::Pacer;
use crate::fragments::{LiveStream, StoredFragment};
use crate::mkv::{self, Document, MkvError, MkvEvent, MkvParser, SimpleTag};
use crate::model::{FragmentMeta, StreamRef, VideoError};
use crate::{api, error_response, VideoState};

const OPERATION: &str = "PutMedia";
const END_OF_FRAGMENT: &str = "AWS_KINESISVIDEO_END_OF_FRAGMENT";
const RESERVED_TAGS: &[&str] = &[
    "AWS_KINESISVIDEO_IMAGE_GENERATION",
    "AWS_KINESISVIDEO_IMAGE_PREFIX",
    "AWS_KINESISVIDEO_NOTIFICATION",
    END_OF_FRAGMENT,
];
/// How long a complete cluster waits for Tags that belong to it.
const TRAILING_TAGS_WAIT: Duration = Duration::from_millis(100);
const MAX_FRAGMENT_DURATION_MS: i64 = 20_000;
/// At most this many fragments, or about this many bytes, share one segment write and fsync.
const PERSIST_BATCH_FRAGMENTS: usize = 32;
const PERSIST_BATCH_BYTES: i64 = 16 << 20;

/// An ERROR ack id and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckError {
    pub id: u32,
    pub code: &'static str,
}

pub const STREAM_READ_ERROR: AckError = AckError {
    id: 4000,
    code: "STREAM_READ_ERROR",
};
pub const MAX_FRAGMENT_SIZE_REACHED: AckError = AckError {
    id: 4001,
    code: "MAX_FRAGMENT_SIZE_REACHED",
};
pub const MAX_FRAGMENT_DURATION_REACHED: AckError = AckError {
    id: 4002,
    code: "MAX_FRAGMENT_DURATION_REACHED",
};
pub const MAX_CONNECTION_DURATION_REACHED: AckError = AckError {
    id: 4003,
    code: "MAX_CONNECTION_DURATION_REACHED",
};
pub const FRAGMENT_TIMECODE_LESSER_THAN_PREVIOUS: AckError = AckError {
    id: 4004,
    code: "FRAGMENT_TIMECODE_LESSER_THAN_PREVIOUS",
};
pub const MORE_THAN_ONE_TRACK_FOUND: AckError = AckError {
    id: 4005,
    code: "MORE_THAN_ONE_TRACK_FOUND",
};
pub const INVALID_MKV_DATA: AckError = AckError {
    id: 4006,
    code: "INVALID_MKV_DATA",
};
pub const INVALID_PRODUCER_TIMESTAMP: AckError = AckError {
    id: 4007,
    code: "INVALID_PRODUCER_TIMESTAMP",
};
pub const STREAM_NOT_ACTIVE: AckError = AckError {
    id: 4008,
    code: "STREAM_NOT_ACTIVE",
};
pub const FRAGMENT_METADATA_LIMIT_REACHED: AckError = AckError {
    id: 4009,
    code: "FRAGMENT_METADATA_LIMIT_REACHED",
};
pub const TRACK_NUMBER_MISMATCH: AckError = AckError {
    id: 4010,
    code: "TRACK_NUMBER_MISMATCH",
};
pub const FRAMES_MISSING_FOR_TRACK: AckError = AckError {
    id: 4011,
    code: "FRAMES_MISSING_FOR_TRACK",
};
pub const INVALID_FRAGMENT_METADATA: AckError = AckError {
    id: 4012,
    code: "INVALID_FRAGMENT_METADATA",
};
pub const MORE_THAN_ALLOWED_TRACKS_FOUND: AckError = AckError {
    id: 4012,
    code: "MORE_THAN_ALLOWED_TRACKS_FOUND",
};
pub const KMS_KEY_ACCESS_DENIED: AckError = AckError {
    id: 4500,
    code: "KMS_KEY_ACCESS_DENIED",
};
pub const KMS_KEY_DISABLED: AckError = AckError {
    id: 4501,
    code: "KMS_KEY_DISABLED",
};
pub const KMS_KEY_VALIDATION_ERROR: AckError = AckError {
    id: 4502,
    code: "KMS_KEY_VALIDATION_ERROR",
};
pub const KMS_KEY_UNAVAILABLE: AckError = AckError {
    id: 4503,
    code: "KMS_KEY_UNAVAILABLE",
};
pub const KMS_KEY_INVALID_USAGE: AckError = AckError {
    id: 4504,
    code: "KMS_KEY_INVALID_USAGE",
};
pub const KMS_KEY_INVALID_STATE: AckError = AckError {
    id: 4505,
    code: "KMS_KEY_INVALID_STATE",
};
pub const KMS_KEY_NOT_FOUND: AckError = AckError {
    id: 4506,
    code: "KMS_KEY_NOT_FOUND",
};

/// The error a KMS key state causes, `Ok(None)` for a usable key; unknown state names are
/// configuration errors.
pub fn kms_state_error(state: &str) -> Result<Option<AckError>, String> {
    Ok(Some(match state {
        "Enabled" => return Ok(None),
        "AccessDenied" => KMS_KEY_ACCESS_DENIED,
        "Disabled" => KMS_KEY_DISABLED,
        "ValidationError" => KMS_KEY_VALIDATION_ERROR,
        "Unavailable" => KMS_KEY_UNAVAILABLE,
        "InvalidUsage" => KMS_KEY_INVALID_USAGE,
        "PendingDeletion" | "InvalidState" => KMS_KEY_INVALID_STATE,
        "NotFound" => KMS_KEY_NOT_FOUND,
        other => {
            return Err(format!(
                "unknown KMS key state {other:?}: use Enabled, AccessDenied, Disabled, ValidationError, Unavailable, InvalidUsage, PendingDeletion, InvalidState or NotFound"
            ))
        }
    }))
}

/// The error the stream's KMS key causes under the `[video] kms_keys` configuration: a
/// configured key matches the stream's KmsKeyId exactly or as its last `:` or `/` part.
pub fn kms_error(config: &crate::VideoConfig, kms_key_id: &str) -> Option<AckError> {
    config.kms_keys.iter().find_map(|(key, state)| {
        let matches = kms_key_id == key
            || kms_key_id.ends_with(&format!(":{key}"))
            || kms_key_id.ends_with(&format!("/{key}"));
        if matches {
            kms_state_error(state).ok().flatten()
        } else {
            None
        }
    })
}

/// The stream was deleted while this fragment was being received or stored: its data went
/// with the stream. (A fragment that starts after the deletion gets 4008.)
pub const STREAM_DELETED: AckError = AckError {
    id: 4507,
    code: "STREAM_DELETED",
};

pub const INTERNAL_ERROR: AckError = AckError {
    id: 5000,
    code: "INTERNAL_ERROR",
};
pub const ARCHIVAL_ERROR: AckError = AckError {
    id: 5001,
    code: "ARCHIVAL_ERROR",
};

/// How cluster timecodes map to producer time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimecodeType {
    Absolute,
    Relative,
}

/// One acknowledgement line.
fn ack_line(
    event: &str,
    timecode: Option<i64>,
    seq: Option<i64>,
    error: Option<AckError>,
) -> Bytes {
    let mut line = format!("{{\"EventType\":\"{event}\"");
    if let Some(tc) = timecode {
        line.push_str(&format!(",\"FragmentTimecode\":{tc}"));
    }
    if let Some(seq) = seq {
        line.push_str(&format!(
            ",\"FragmentNumber\":\"{}\"",
            crate::model::fragment_number(seq)
        ));
    }
    if let Some(e) = error {
        line.push_str(&format!(
            ",\"ErrorId\":{},\"ErrorCode\":\"{}\"",
            e.id, e.code
        ));
    }
    line.push_str("}\n");
    Bytes::from(line)
}

fn header<'a>(request: &'a AwsRequest, name: &str) -> Option<&'a str> {
    request
        .header(name)
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Handles `POST /putMedia`.
pub async fn put_media(state: Arc<VideoState>, request: AwsRequest) -> Response<Body> {
    let stream_ref = match StreamRef::from_parts(
        header(&request, "x-amzn-stream-name").map(str::to_string),
        header(&request, "x-amzn-stream-arn").map(str::to_string),
    ) {
        Ok(r) => r,
        Err(e) => return error_response(&e, OPERATION),
    };
    let timecode_type = match header(&request, "x-amzn-fragment-timecode-type") {
        Some("ABSOLUTE") => TimecodeType::Absolute,
        Some("RELATIVE") => TimecodeType::Relative,
        other => {
            let e = VideoError::invalid(format!(
                "x-amzn-fragment-timecode-type must be ABSOLUTE or RELATIVE, got {other:?}"
            ));
            return error_response(&e, OPERATION);
        }
    };
    let start_ms = match header(&request, "x-amzn-producer-start-timestamp") {
        None if timecode_type == TimecodeType::Relative => {
            let e = VideoError::invalid(
                "x-amzn-producer-start-timestamp is required with RELATIVE timecodes",
            );
            return error_response(&e, OPERATION);
        }
        None => 0,
        Some(v) => match v.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs >= 0.0 => (secs * 1000.0).round() as i64,
            _ => {
                let e = VideoError::invalid(format!(
                    "x-amzn-producer-start-timestamp is not a timestamp: {v}"
                ));
                return error_response(&e, OPERATION);
            }
        },
    };
    let lookup = stream_ref.clone();
    let stream = match state.blocking(move |s| api::find_stream(s, &lookup)).await {
        Ok(s) => s,
        Err(e) => return error_response(&e, OPERATION),
    };
    if stream.status != "ACTIVE" {
        let e = VideoError::new(
            crate::model::ErrorKind::ResourceInUse,
            format!("The stream {} is not ACTIVE", stream.name),
        );
        return error_response(&e, OPERATION);
    }
    let live = state.fragments.live(&stream.arn);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let superseded = state.admission.take_over(&stream.arn);
    let session = Session {
        superseded,
        stopping: false,
        stopped: false,
        kms_error: kms_error(&state.config, &stream.kms_key_id),
        pacer: Pacer::new(state.config.put_media_bytes_per_sec),
        state: state.clone(),
        live,
        retention_hours: stream.retention_hours,
        timecode_type,
        start_ms,
        acks: tx,
        opened: Instant::now(),
        parser: MkvParser::new(),
        open: None,
        pending: None,
        orphan_tags: Vec::new(),
        refused: None,
        last_fragment_ms: None,
        persist: None,
    };
    let body = request.request.into_body();
    state.ctx.shutdown.spawn(session.run(body));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
        .extensions_mut()
        .insert(OperationName(OPERATION.into()));
    response
}

/// A cluster being received.
struct OpenFragment {
    seq: i64,
    server_ms: i64,
    document: Arc<Document>,
    timecode: Option<i64>,
}

/// A complete cluster waiting for the Tags that follow it.
struct PendingFragment {
    open: OpenFragment,
    cluster: mkv::Cluster,
    /// The level-1 elements after the cluster: its Tags, Cues and the like.
    tags: Vec<u8>,
    user_tags: Vec<SimpleTag>,
}

/// A fatal problem: its ERROR ack, for the fragment it concerns.
struct Fatal {
    error: AckError,
    timecode: Option<i64>,
    seq: Option<i64>,
}

struct Session {
    /// Changes when a newer PutMedia connection takes the stream over.
    superseded: tokio::sync::watch::Receiver<u64>,
    /// Taken over: end at the next cluster boundary.
    stopping: bool,
    /// Reached that boundary.
    stopped: bool,
    kms_error: Option<AckError>,
    pacer: Pacer,
    state: Arc<VideoState>,
    live: Arc<LiveStream>,
    retention_hours: i64,
    timecode_type: TimecodeType,
    start_ms: i64,
    acks: mpsc::Sender<Bytes>,
    opened: Instant,
    parser: MkvParser,
    open: Option<OpenFragment>,
    pending: Option<PendingFragment>,
    orphan_tags: Vec<(Bytes, Vec<SimpleTag>)>,
    /// A cluster refused when it started (its stream was deleted, or no fragment number
    /// could be reserved), reported with its Timecode.
    refused: Option<AckError>,
    /// Producer time of the previous fragment (its Cluster Timecode) on this connection.
    last_fragment_ms: Option<i64>,
    persist: Option<(
        mpsc::Sender<Arc<StoredFragment>>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl Session {
    async fn run(mut self, mut body: Body) {
        let config = self.state.config.clone();
        let idle_interval = Duration::from_millis(config.idle_ack_interval_ms.max(10));
        let idle_timeout = Duration::from_secs(config.idle_timeout_secs);
        let max_age = Duration::from_secs(config.max_connection_secs);
        let shutdown = self.state.ctx.shutdown.clone();
        let mut last_data = Instant::now();
        let mut last_idle = Instant::now();
        let outcome: Result<(), Fatal> = loop {
            if self.opened.elapsed() >= max_age {
                break Err(self.fatal(MAX_CONNECTION_DURATION_REACHED));
            }
            let wait = if self.pending.is_some() {
                TRAILING_TAGS_WAIT
            } else {
                idle_interval
            };
            if self.stopping && self.open.is_none() && !self.parser.in_cluster() {
                break self.finish_pending().await;
            }
            let frame = tokio::select! {
                _ = shutdown.triggered() => break self.finish_pending().await,
                changed = self.superseded.changed(), if !self.stopping => {
                    if changed.is_ok() {
                        tracing::debug!("a newer PutMedia connection took the stream over");
                    }
                    self.stopping = true;
                    continue;
                }
                f = tokio::time::timeout(wait, body.frame()) => f,
            };
            match frame {
                Err(_) => {
                    if self.pending.is_some() {
                        if let Err(f) = self.finish_pending().await {
                            break Err(f);
                        }
                        continue;
                    }
                    if last_data.elapsed() >= idle_timeout {
                        break Ok(());
                    }
                    if last_idle.elapsed() >= idle_interval && last_data.elapsed() >= idle_interval
                    {
                        last_idle = Instant::now();
                        if !self.send(ack_line("IDLE", None, None, None)).await {
                            break Ok(());
                        }
                    }
                }
                Ok(None) => break self.end_of_body().await,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "PutMedia body read failed");
                    if self.open.is_some() || self.parser.in_cluster() {
                        break Err(self.fatal(STREAM_READ_ERROR));
                    }
                    break self.finish_pending().await;
                }
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    last_data = Instant::now();
                    self.pacer.pace(data.len()).await;
                    let mut events = Vec::new();
                    let parsed = self.parser.push_into(&data, &mut events);
                    if let Err(f) = self.handle(Ok(events)).await {
                        break Err(f);
                    }
                    self.share_live_edge();
                    if self.stopped {
                        break Ok(());
                    }
                    if let Err(e) = parsed {
                        break Err(self.parse_error(e));
                    }
                }
            }
        };
        if let Err(fatal) = outcome {
            self.send(ack_line(
                "ERROR",
                fatal.timecode,
                fatal.seq,
                Some(fatal.error),
            ))
            .await;
        }
        self.state.live_edges.grow(self.live.arn(), None);
        if let Some((tx, task)) = self.persist.take() {
            drop(tx);
            let _ = task.await;
        }
    }

    /// Shows the frames of the cluster being received to low-latency HLS.
    fn share_live_edge(&self) {
        let update = match (&self.open, self.parser.open_cluster()) {
            (Some(open), Some((tc, body))) => {
                let base = match self.timecode_type {
                    TimecodeType::Absolute => 0,
                    TimecodeType::Relative => self.start_ms,
                };
                let scale = open.document.timecode_scale as i128;
                Some(crate::low_latency::EdgeUpdate {
                    seq: open.seq,
                    timecode: tc,
                    producer_ms: base + (tc as i128 * scale / 1_000_000) as i64,
                    server_ms: open.server_ms,
                    document: &open.document,
                    body,
                })
            }
            _ => None,
        };
        self.state.live_edges.grow(self.live.arn(), update);
    }

    async fn send(&self, line: Bytes) -> bool {
        self.acks.send(line).await.is_ok()
    }

    /// A fatal error for the fragment being received, if any.
    fn fatal(&self, error: AckError) -> Fatal {
        match (&self.open, &self.pending) {
            (Some(o), _) => Fatal {
                error,
                timecode: o.timecode,
                seq: Some(o.seq),
            },
            (None, Some(p)) => Fatal {
                error,
                timecode: Some(p.cluster.timecode),
                seq: Some(p.open.seq),
            },
            (None, None) => Fatal {
                error,
                timecode: None,
                seq: None,
            },
        }
    }

    fn parse_error(&self, e: MkvError) -> Fatal {
        match e {
            MkvError::FragmentTooLarge => self.fatal(MAX_FRAGMENT_SIZE_REACHED),
            MkvError::Invalid(message) => {
                tracing::debug!(%message, "PutMedia body is not valid MKV");
                self.fatal(INVALID_MKV_DATA)
            }
        }
    }

    async fn end_of_body(&mut self) -> Result<(), Fatal> {
        let events = self.parser.finish();
        self.handle(events).await?;
        if let Some(error) = self.refused {
            return Err(self.fatal(error));
        }
        self.finish_pending().await
    }

    async fn handle(&mut self, events: Result<Vec<MkvEvent>, MkvError>) -> Result<(), Fatal> {
        let events = match events {
            Ok(e) => e,
            Err(e) => return Err(self.parse_error(e)),
        };
        for event in events {
            match event {
                MkvEvent::ClusterStart { document } => {
                    self.finish_pending().await?;
                    if self.stopping {
                        // Taken over: the next fragment goes to the newer connection.
                        self.stopped = true;
                        return Ok(());
                    }
                    if self.live.is_deleted() {
                        // No number for it: the stream is gone. The ERROR goes out once
                        // the Timecode is in, which the producer matches it by.
                        self.refused = Some(STREAM_NOT_ACTIVE);
                        continue;
                    }
                    let fragments = self.state.fragments.clone();
                    let live = self.live.clone();
                    let reserved = match fragments.next_reserved_seq(&live) {
                        Some(seq) => Ok(seq),
                        None => {
                            self.state
                                .blocking(move |_| fragments.next_seq(&live))
                                .await
                        }
                    };
                    let seq = match reserved {
                        Ok(seq) => seq,
                        Err(e) => {
                            // No number (the index refused the reservation): like a refused
                            // cluster, the ERROR goes out with the Timecode.
                            tracing::warn!(error = %e, "reserving a fragment number failed");
                            self.refused = Some(INTERNAL_ERROR);
                            continue;
                        }
                    };
                    self.open = Some(OpenFragment {
                        seq,
                        server_ms: self.state.clock().now_millis(),
                        document,
                        timecode: None,
                    });
                }
                MkvEvent::ClusterTimecode(tc) => {
                    if let Some(error) = self.refused {
                        return Err(Fatal {
                            error,
                            timecode: Some(tc),
                            seq: None,
                        });
                    }
                    let Some(open) = self.open.as_mut() else {
                        continue;
                    };
                    open.timecode = Some(tc);
                    let line = ack_line("BUFFERING", Some(tc), Some(open.seq), None);
                    self.send(line).await;
                }
                MkvEvent::ClusterEnd(cluster) => {
                    let Some(open) = self.open.take() else {
                        continue;
                    };
                    let mut pending = PendingFragment {
                        open,
                        cluster,
                        tags: Vec::new(),
                        user_tags: Vec::new(),
                    };
                    for (bytes, tags) in self.orphan_tags.drain(..) {
                        pending.tags.extend_from_slice(&bytes);
                        pending.user_tags.extend(tags);
                    }
                    self.pending = Some(pending);
                }
                MkvEvent::Trailing(bytes) => match self.pending.as_mut() {
                    Some(p) => p.tags.extend_from_slice(&bytes),
                    None => self.orphan_tags.push((bytes, Vec::new())),
                },
                MkvEvent::Tags { bytes, tags } => {
                    if tags.iter().any(|t| mkv::is_service_output_tag(&t.name)) {
                        continue;
                    }
                    let ends = tags.iter().any(|t| t.name == END_OF_FRAGMENT);
                    match self.pending.as_mut() {
                        Some(p) => {
                            p.tags.extend_from_slice(&bytes);
                            p.user_tags.extend(tags);
                        }
                        None => self.orphan_tags.push((bytes, tags)),
                    }
                    if ends {
                        self.finish_pending().await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Validates the pending fragment, makes it visible, acks RECEIVED and queues it for
    /// persistence.
    async fn finish_pending(&mut self) -> Result<(), Fatal> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let fail = |error| Fatal {
            error,
            timecode: Some(p.cluster.timecode),
            seq: Some(p.open.seq),
        };
        if self.live.is_deleted() {
            return Err(fail(STREAM_DELETED));
        }
        let doc = &p.open.document;
        let max_tracks = self.state.config.max_tracks.max(1);
        if doc.tracks.len() > max_tracks {
            return Err(fail(if max_tracks == 1 {
                MORE_THAN_ONE_TRACK_FOUND
            } else {
                MORE_THAN_ALLOWED_TRACKS_FOUND
            }));
        }
        if let Some(error) = self.kms_error {
            return Err(fail(error));
        }
        if p.cluster
            .blocks
            .iter()
            .any(|b| !doc.tracks.iter().any(|t| t.number == b.track))
        {
            return Err(fail(TRACK_NUMBER_MISMATCH));
        }
        if doc
            .tracks
            .iter()
            .any(|t| !p.cluster.blocks.iter().any(|b| b.track == t.number))
        {
            return Err(fail(FRAMES_MISSING_FOR_TRACK));
        }
        let scale = doc.timecode_scale as i128;
        let to_ms = |ticks: i64| (ticks as i128 * scale / 1_000_000) as i64;
        let block_end = |b: &mkv::BlockInfo| {
            let duration = b.duration.map(|d| d as i64).or_else(|| {
                doc.tracks
                    .iter()
                    .find(|t| t.number == b.track)
                    .and_then(|t| t.default_duration_ns)
                    .map(|ns| (ns as i128 / scale) as i64)
            });
            b.timecode + duration.unwrap_or(0)
        };
        let tc = p.cluster.timecode;
        let first = p
            .cluster
            .blocks
            .iter()
            .map(|b| b.timecode)
            .min()
            .unwrap_or(tc);
        let end = p.cluster.blocks.iter().map(block_end).max().unwrap_or(tc);
        let duration_ms = to_ms(end - tc.min(first)).max(0);
        if duration_ms > MAX_FRAGMENT_DURATION_MS {
            return Err(fail(MAX_FRAGMENT_DURATION_REACHED));
        }
        let base = match self.timecode_type {
            TimecodeType::Absolute => 0,
            TimecodeType::Relative => self.start_ms,
        };
        let producer_ms = base + to_ms(tc);
        // 4004 compares fragment (Cluster) timecodes, not frames: B-frames and audio that
        // ffmpeg interleaves by decode time may sit before the previous cluster's last frame.
        if let Some(previous) = self.last_fragment_ms {
            if producer_ms <= previous {
                return Err(fail(FRAGMENT_TIMECODE_LESSER_THAN_PREVIOUS));
            }
        }
        let now = self.state.clock().now_millis();
        let skew = self.state.config.max_producer_clock_skew_secs as i64 * 1000;
        if producer_ms > now + skew {
            return Err(fail(INVALID_PRODUCER_TIMESTAMP));
        }
        if p.user_tags
            .iter()
            .any(|t| t.name.starts_with("AWS_") && !RESERVED_TAGS.contains(&t.name.as_str()))
        {
            return Err(fail(INVALID_FRAGMENT_METADATA));
        }
        // Fragment metadata is what producers write: untargeted SimpleTags. Track or
        // edition tags (with Targets, as ffmpeg writes) are kept but not counted.
        let user: Vec<&SimpleTag> = p
            .user_tags
            .iter()
            .filter(|t| t.name != END_OF_FRAGMENT && !t.targeted)
            .collect();
        if user.len() > 10
            || user
                .iter()
                .any(|t| t.name.len() > 128 || t.value.len() > 256)
        {
            return Err(fail(FRAGMENT_METADATA_LIMIT_REACHED));
        }
        self.last_fragment_ms = Some(producer_ms);
        let cluster = p.cluster.to_element();
        let fragment = Arc::new(StoredFragment {
            meta: FragmentMeta {
                seq: p.open.seq,
                timecode: tc,
                producer_ms,
                server_ms: p.open.server_ms,
                duration_ms,
                size: (cluster.len() + p.tags.len()) as i64,
                tags: user
                    .iter()
                    .map(|t| (t.name.clone(), t.value.clone()))
                    .collect(),
            },
            ebml_header: doc.ebml_header.clone(),
            segment_prefix: doc.segment_prefix.clone(),
            cluster,
            tags: Bytes::from(p.tags),
        });
        self.state
            .fragments
            .publish(&self.live, fragment.clone(), now);
        self.send(ack_line("RECEIVED", Some(tc), Some(p.open.seq), None))
            .await;
        if self.retention_hours > 0 {
            let tx = self.persister();
            if tx.send(fragment).await.is_err() {
                return Err(fail(ARCHIVAL_ERROR));
            }
        }
        Ok(())
    }

    /// The channel to this connection's persistence task, started on first use.
    fn persister(&mut self) -> mpsc::Sender<Arc<StoredFragment>> {
        if let Some((tx, _)) = &self.persist {
            return tx.clone();
        }
        let (tx, mut rx) = mpsc::channel::<Arc<StoredFragment>>(64);
        let state = self.state.clone();
        let live = self.live.clone();
        let acks = self.acks.clone();
        let task = tokio::spawn(async move {
            while let Some(fragment) = rx.recv().await {
                // Whatever queued up while the previous write was being fsynced goes to disk
                // together, under one fsync.
                let mut batch = vec![fragment];
                let mut bytes = batch[0].meta.size;
                while batch.len() < PERSIST_BATCH_FRAGMENTS && bytes < PERSIST_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(f) => {
                            bytes += f.meta.size;
                            batch.push(f);
                        }
                        Err(_) => break,
                    }
                }
                let written = batch.clone();
                let l = live.clone();
                let result = state
                    .blocking(move |s| s.fragments.persist_all(&l, &written))
                    .await;
                let error = match result {
                    Ok(()) => None,
                    Err(e) if live.is_deleted() => {
                        tracing::debug!(error = %e, "stream deleted while persisting");
                        Some(STREAM_DELETED)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "persisting a video fragment failed");
                        Some(ARCHIVAL_ERROR)
                    }
                };
                for fragment in batch {
                    let (tc, seq) = (Some(fragment.meta.timecode), Some(fragment.meta.seq));
                    let line = match error {
                        None => {
                            state
                                .tag_effects
                                .fragment_persisted(live.arn(), &fragment.meta);
                            ack_line("PERSISTED", tc, seq, None)
                        }
                        Some(e) => ack_line("ERROR", tc, seq, Some(e)),
                    };
                    // When the producer is gone, keep persisting what was received.
                    let _ = acks.send(line).await;
                }
            }
        });
        self.persist = Some((tx.clone(), task));
        tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_lines_have_the_flat_kvs_shape() {
        let line = ack_line("PERSISTED", Some(1663277247152), Some(7), None);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["EventType"], "PERSISTED");
        assert_eq!(v["FragmentTimecode"], 1663277247152i64);
        assert_eq!(v["FragmentNumber"], crate::model::fragment_number(7));
        assert!(line.ends_with(b"}\n"));
        let err = ack_line("ERROR", Some(5), Some(1), Some(INVALID_MKV_DATA));
        let v: serde_json::Value = serde_json::from_slice(&err).unwrap();
        assert_eq!(v["ErrorId"], 4006);
        assert_eq!(v["ErrorCode"], "INVALID_MKV_DATA");
        assert!(err.len() < 1024);
    }
}
