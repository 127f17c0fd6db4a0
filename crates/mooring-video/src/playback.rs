//! HLS and DASH playback sessions: GetHLSStreamingSessionURL / GetDASHStreamingSessionURL
//! (validate, check that there is media and that its codecs can be packaged, sign a session
//! token) and the unsigned session resources under `/hls/v1/` and `/dash/v1/`.
//!
//! A session's fragments are chosen per request from the live buffer and the index:
//! LIVE the newest N by ingestion, LIVE_REPLAY from the start time growing as the preceding
//! fragments' durations elapse, ON_DEMAND the first N of the range. With producer
//! timestamps, fragments sharing a start time keep only the one with the largest number.
//! Media sequence and discontinuity sequence numbers of live sessions are handed out once
//! per fragment and remembered per session (in memory), so they only ever grow.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use mooring_aws::{json_response, AwsRequest, OperationName, Protocol};
use serde_json::json;

use crate::api::{data_endpoint, find_stream, JsonRequest};
use crate::model::{
    fragment_seq, parse_json_timestamp, ErrorKind, FragmentMeta, VideoError, VideoResult,
};
use crate::packaged_cache::SegmentKey;
use crate::packaging::MediaFragment;
use crate::session::{Container, Discontinuity, PlaybackMode, Session, SessionKeys};
use crate::store::TimeClock;
use crate::{dash, error_response, fmp4, hls, low_latency, mpegts, VideoState};

/// LIVE sessions need a fragment this recent.
const LIVE_RECENT_MS: i64 = 30_000;
/// How far back LIVE looks for its window.
const LIVE_LOOKBACK_MS: i64 = 5 * 60 * 1000;
/// Largest range a session or clip may span.
const MAX_RANGE_MS: i64 = 24 * 3_600_000;
/// A gap or overlap beyond this is a discontinuity (ON_DISCONTINUITY).
const DISCONTINUITY_MS: i64 = 50;

/// A fragment's place in a session's playlists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbered {
    pub media_sequence: u64,
    /// Discontinuity tags before this fragment in the session.
    pub discontinuities_before: u64,
    /// Whether a discontinuity tag precedes it.
    pub discontinuity: bool,
}

#[derive(Default)]
struct SessionNumbers {
    assigned: BTreeMap<i64, Numbered>,
    last: Option<(FragmentMeta, Numbered)>,
    touched_ms: i64,
}

/// In-memory per-session state and the token keys.
pub struct PlaybackState {
    keys: SessionKeys,
    numbers: Mutex<HashMap<String, SessionNumbers>>,
}

impl PlaybackState {
    pub fn new(keys: SessionKeys) -> PlaybackState {
        PlaybackState {
            keys,
            numbers: Mutex::new(HashMap::new()),
        }
    }
}

/// The fragments of a session's playlist at one moment.
pub struct Window {
    pub fragments: Vec<(FragmentMeta, Numbered)>,
    /// No more fragments will be added (ON_DEMAND, or a finished LIVE_REPLAY range).
    pub complete: bool,
}

pub(crate) fn time_on(clock: TimeClock, m: &FragmentMeta) -> i64 {
    match clock {
        TimeClock::Server => m.server_ms,
        TimeClock::Producer => m.producer_ms,
    }
}

impl Session {
    /// The fragment's start on this session's clock.
    pub fn start_of(&self, m: &FragmentMeta) -> i64 {
        time_on(self.clock(), m)
    }
}

pub(crate) fn enum_error(field: &str, value: &str, allowed: &str) -> VideoError {
    VideoError::invalid(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: Member must satisfy enum value set: [{allowed}]"
    ))
}

pub(crate) fn range_error(field: &str, low: i64, high: i64) -> VideoError {
    VideoError::invalid(format!(
        "1 validation error detected: Value at '{field}' failed to satisfy constraint: Member must have value between {low} and {high}"
    ))
}

/// Every fragment of a stream in `[start, end]` on `clock`, from the index and the live
/// buffer, by sequence.
pub fn fragments_between(
    s: &VideoState,
    arn: &str,
    clock: TimeClock,
    start: i64,
    end: i64,
    limit: usize,
) -> VideoResult<Vec<FragmentMeta>> {
    let mut all: BTreeMap<i64, FragmentMeta> = BTreeMap::new();
    for m in s
        .store
        .fragments_in_range(arn, clock, start, end, 0, limit)?
    {
        all.insert(m.seq, m);
    }
    for m in s.fragments.memory_fragments(arn) {
        let t = time_on(clock, &m);
        if t >= start && t <= end {
            all.insert(m.seq, m);
        }
    }
    Ok(all.into_values().collect())
}

/// Producer-timestamp deduplication: of fragments sharing a start, keep the largest number.
fn dedupe_producer(fragments: Vec<FragmentMeta>) -> Vec<FragmentMeta> {
    let mut by_start: BTreeMap<i64, FragmentMeta> = BTreeMap::new();
    for m in fragments {
        match by_start.get(&m.producer_ms) {
            Some(existing) if existing.seq > m.seq => {}
            _ => {
                by_start.insert(m.producer_ms, m);
            }
        }
    }
    by_start.into_values().collect()
}

/// The fragments a session selects right now, oldest first, before the window limit.
fn selected(s: &VideoState, session: &Session, now: i64) -> VideoResult<(Vec<FragmentMeta>, bool)> {
    let arn = &session.stream_arn;
    let clock = session.clock();
    match session.mode {
        PlaybackMode::Live => {
            let mut recent = fragments_between(
                s,
                arn,
                TimeClock::Server,
                now - LIVE_LOOKBACK_MS,
                i64::MAX,
                100_000,
            )?;
            if session.producer_clock {
                let mut deduped = dedupe_producer(recent);
                deduped.sort_by_key(|m| m.seq);
                recent = deduped;
            }
            let skip = recent.len().saturating_sub(session.max_fragments);
            Ok((recent.split_off(skip), false))
        }
        PlaybackMode::OnDemand | PlaybackMode::LiveReplay => {
            let start = session.start_ms.unwrap_or(0);
            let end = session.end_ms.unwrap_or(i64::MAX);
            let mut found = fragments_between(s, arn, clock, start, end, 100_000)?;
            if session.producer_clock {
                found = dedupe_producer(found);
            } else {
                found.sort_by_key(|m| (m.server_ms, m.seq));
            }
            if session.mode == PlaybackMode::OnDemand {
                found.truncate(session.max_fragments);
                return Ok((found, true));
            }
            // LIVE_REPLAY: a fragment appears once the ones before it have played.
            let mut elapsed = session.created_ms;
            let mut visible = Vec::new();
            for m in found.iter() {
                if elapsed > now {
                    break;
                }
                elapsed += m.duration_ms.max(1);
                visible.push(m.clone());
            }
            let complete = session.end_ms.is_some()
                && visible.len() == found.len()
                && session.end_ms.is_some_and(|e| e < now);
            let skip = visible.len().saturating_sub(session.max_fragments);
            Ok((visible.split_off(skip), complete))
        }
    }
}

pub(crate) fn is_discontinuity(
    session: &Session,
    prev: &FragmentMeta,
    next: &FragmentMeta,
) -> bool {
    match session.discontinuity {
        Discontinuity::Always => true,
        Discontinuity::Never => false,
        Discontinuity::OnDiscontinuity => {
            let expected = session.start_of(prev) + prev.duration_ms;
            (session.start_of(next) - expected).abs() > DISCONTINUITY_MS
        }
    }
}

/// The session's playlist window with sequence numbers.
pub fn window(s: &VideoState, session: &Session, now: i64) -> VideoResult<Window> {
    let (fragments, complete) = selected(s, session, now)?;
    if session.mode == PlaybackMode::OnDemand {
        let mut out = Vec::with_capacity(fragments.len());
        let mut disc = 0;
        for (i, m) in fragments.iter().enumerate() {
            let d = i > 0 && is_discontinuity(session, &fragments[i - 1], m);
            if d {
                disc += 1;
            }
            out.push((
                m.clone(),
                Numbered {
                    media_sequence: i as u64,
                    discontinuities_before: disc,
                    discontinuity: d,
                },
            ));
        }
        return Ok(Window {
            fragments: out,
            complete,
        });
    }
    let mut all = s.playback.numbers.lock().unwrap_or_else(|e| e.into_inner());
    // Forget sessions nobody asked about for ten minutes.
    all.retain(|_, n| now - n.touched_ms < 600_000);
    let numbers = all.entry(session.id.clone()).or_default();
    numbers.touched_ms = now;
    let mut out = Vec::with_capacity(fragments.len());
    for m in fragments {
        let numbered =
            match numbers.assigned.get(&m.seq) {
                Some(n) => *n,
                None => {
                    // Late fragments older than the last numbered one are not back-filled.
                    if numbers.last.as_ref().is_some_and(|(last, _)| {
                        session.mode == PlaybackMode::Live && m.seq < last.seq
                    }) {
                        continue;
                    }
                    let n = match &numbers.last {
                        None => Numbered {
                            media_sequence: 0,
                            discontinuities_before: 0,
                            discontinuity: false,
                        },
                        Some((prev, pn)) => {
                            let d = is_discontinuity(session, prev, &m);
                            Numbered {
                                media_sequence: pn.media_sequence + 1,
                                discontinuities_before: pn.discontinuities_before + u64::from(d),
                                discontinuity: d,
                            }
                        }
                    };
                    numbers.assigned.insert(m.seq, n);
                    numbers.last = Some((m.clone(), n));
                    n
                }
            };
        out.push((m, numbered));
    }
    if let Some((first, _)) = out.first() {
        let first = first.seq;
        numbers.assigned.retain(|seq, _| *seq >= first);
    }
    Ok(Window {
        fragments: out,
        complete,
    })
}

/// Parses the request of GetHLSStreamingSessionURL or GetDASHStreamingSessionURL.
fn session_request(
    s: &VideoState,
    req: &JsonRequest,
    dash: bool,
    now: i64,
) -> VideoResult<(Session, crate::model::Stream)> {
    let stream_ref = req.stream_ref()?;
    let mode = match req.string("PlaybackMode")?.as_deref() {
        None | Some("LIVE") => PlaybackMode::Live,
        Some("LIVE_REPLAY") => PlaybackMode::LiveReplay,
        Some("ON_DEMAND") => PlaybackMode::OnDemand,
        Some(other) => {
            return Err(enum_error(
                "PlaybackMode",
                other,
                "LIVE, LIVE_REPLAY, ON_DEMAND",
            ))
        }
    };
    let selector_field = if dash {
        "DASHFragmentSelector"
    } else {
        "HLSFragmentSelector"
    };
    let selector = req.object(selector_field)?;
    let mut producer_clock = false;
    let mut start_ms = None;
    let mut end_ms = None;
    if let Some(sel) = &selector {
        producer_clock = match sel.string("FragmentSelectorType")?.as_deref() {
            None | Some("SERVER_TIMESTAMP") => false,
            Some("PRODUCER_TIMESTAMP") => true,
            Some(other) => {
                return Err(enum_error(
                    &format!("{selector_field}.FragmentSelectorType"),
                    other,
                    "PRODUCER_TIMESTAMP, SERVER_TIMESTAMP",
                ))
            }
        };
        if let Some(range) = sel.object("TimestampRange")? {
            start_ms = range
                .value("StartTimestamp")
                .map(|v| parse_json_timestamp(v, "StartTimestamp"))
                .transpose()?;
            end_ms = range
                .value("EndTimestamp")
                .map(|v| parse_json_timestamp(v, "EndTimestamp"))
                .transpose()?;
            if start_ms.is_none() {
                return Err(VideoError::invalid(
                    "StartTimestamp is required when a TimestampRange is given",
                ));
            }
        }
    }
    match mode {
        PlaybackMode::Live if start_ms.is_some() || end_ms.is_some() => {
            return Err(VideoError::invalid(
                "TimestampRange must not be set when PlaybackMode is LIVE",
            ))
        }
        PlaybackMode::OnDemand if start_ms.is_none() || end_ms.is_none() => {
            return Err(VideoError::invalid(
                "StartTimestamp and EndTimestamp are required when PlaybackMode is ON_DEMAND",
            ))
        }
        PlaybackMode::LiveReplay if start_ms.is_none() => {
            return Err(VideoError::invalid(
                "StartTimestamp is required when PlaybackMode is LIVE_REPLAY",
            ))
        }
        _ => {}
    }
    if let (Some(start), Some(end)) = (start_ms, end_ms) {
        if end <= start {
            return Err(VideoError::invalid(
                "EndTimestamp must be later than StartTimestamp",
            ));
        }
        if end - start > MAX_RANGE_MS {
            return Err(VideoError::invalid(
                "EndTimestamp must be within 24 hours of StartTimestamp",
            ));
        }
        if !producer_clock && end > now {
            return Err(VideoError::invalid(
                "EndTimestamp must be in the past for SERVER_TIMESTAMP selectors",
            ));
        }
    }
    let container = if dash {
        Container::FragmentedMp4
    } else {
        match req.string("ContainerFormat")?.as_deref() {
            None | Some("FRAGMENTED_MP4") => Container::FragmentedMp4,
            Some("MPEG_TS") => Container::MpegTs,
            Some(other) => {
                return Err(enum_error(
                    "ContainerFormat",
                    other,
                    "FRAGMENTED_MP4, MPEG_TS",
                ))
            }
        }
    };
    let discontinuity = match req.string("DiscontinuityMode")?.as_deref() {
        _ if dash => Discontinuity::Never,
        None if producer_clock => Discontinuity::Never,
        None | Some("ALWAYS") => Discontinuity::Always,
        Some("NEVER") => Discontinuity::Never,
        Some("ON_DISCONTINUITY") => Discontinuity::OnDiscontinuity,
        Some(other) => {
            return Err(enum_error(
                "DiscontinuityMode",
                other,
                "ALWAYS, NEVER, ON_DISCONTINUITY",
            ))
        }
    };
    let always_never = |field: &str| -> VideoResult<bool> {
        match req.string(field)?.as_deref() {
            None | Some("NEVER") => Ok(false),
            Some("ALWAYS") => Ok(true),
            Some(other) => Err(enum_error(field, other, "ALWAYS, NEVER")),
        }
    };
    let display_timestamp = always_never("DisplayFragmentTimestamp")?;
    let display_fragment_number = dash && always_never("DisplayFragmentNumber")?;
    let expires = req.integer("Expires")?.unwrap_or(300);
    if !(300..=43_200).contains(&expires) {
        return Err(range_error("Expires", 300, 43_200));
    }
    let max_field = if dash {
        "MaxManifestFragmentResults"
    } else {
        "MaxMediaPlaylistFragmentResults"
    };
    let default_max = if mode == PlaybackMode::OnDemand {
        1000
    } else {
        5
    };
    let max_fragments = req.integer(max_field)?.unwrap_or(default_max);
    if !(1..=5000).contains(&max_fragments) {
        return Err(range_error(max_field, 1, 5000));
    }
    let stream = find_stream(s, &stream_ref)?;
    if stream.retention_hours == 0 {
        return Err(VideoError::new(
            ErrorKind::NoDataRetention,
            format!(
                "The stream {} has no data retention; archived playback needs DataRetentionInHours > 0",
                stream.name
            ),
        ));
    }
    let session = Session {
        id: uuid::Uuid::new_v4().simple().to_string(),
        kind: if dash { "dash" } else { "hls" }.into(),
        stream_arn: stream.arn.clone(),
        mode,
        producer_clock,
        start_ms,
        end_ms,
        container,
        discontinuity,
        display_timestamp,
        display_fragment_number,
        max_fragments: max_fragments as usize,
        created_ms: now,
        expires_ms: now + expires * 1000,
        low_latency: false,
    };
    Ok((session, stream))
}

/// The fragment whose document defines a session's tracks: the newest for LIVE, else the
/// first of the selection.
fn reference_fragment(s: &VideoState, session: &Session, now: i64) -> VideoResult<FragmentMeta> {
    let (fragments, _) = selected(s, session, now.max(session.created_ms))?;
    let found = match session.mode {
        PlaybackMode::Live => fragments.last().cloned(),
        _ => fragments.first().cloned(),
    };
    found.ok_or_else(|| VideoError::not_found("No fragments found in the stream for the session"))
}

/// Opens a fragment of a session's stream for packaging.
pub fn open_fragment(s: &VideoState, arn: &str, seq: i64) -> VideoResult<MediaFragment> {
    let fragment = s
        .fragments
        .read(arn, seq)?
        .ok_or_else(|| VideoError::not_found("The requested fragment does not exist"))?;
    MediaFragment::open(fragment)
}

fn create_session(
    s: &VideoState,
    req: &JsonRequest,
    dash: bool,
    host: Option<&str>,
) -> VideoResult<serde_json::Value> {
    let now = s.clock().now_millis();
    let (session, _stream) = session_request(s, req, dash, now)?;
    if session.mode == PlaybackMode::Live {
        let newest = s.fragments.latest(&session.stream_arn)?;
        if newest.is_none_or(|m| m.server_ms < now - LIVE_RECENT_MS) {
            return Err(VideoError::not_found(
                "No fragments found in the stream in the last 30 seconds",
            ));
        }
    }
    let reference = reference_fragment(s, &session, now).map_err(|e| {
        if e.kind == ErrorKind::ResourceNotFound {
            VideoError::not_found("No fragments found in the stream for the given timestamp range")
        } else {
            e
        }
    })?;
    let media = open_fragment(s, &session.stream_arn, reference.seq)?;
    if session.container == Container::MpegTs && !media.tracks.iter().all(mpegts::supports) {
        return Err(VideoError::new(
            ErrorKind::UnsupportedStreamMediaType,
            "MPEG_TS supports H.264 video and AAC audio; use FRAGMENTED_MP4 for H.265",
        ));
    }
    let token = s.playback.keys.sign(&session);
    let base = data_endpoint(s, host);
    Ok(if dash {
        json!({ "DASHStreamingSessionURL": format!("{base}/dash/v1/getDASHManifest.mpd?SessionToken={token}") })
    } else {
        json!({ "HLSStreamingSessionURL": format!("{base}/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken={token}") })
    })
}

/// A LIVE HLS session URL with default parameters, for the console's player page.
pub fn session_url_for_console(
    s: &VideoState,
    req: &JsonRequest,
    host: Option<&str>,
) -> VideoResult<String> {
    let body = create_session(s, req, false, host)?;
    Ok(body["HLSStreamingSessionURL"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Handles `POST /getHLSStreamingSessionURL` and `POST /getDASHStreamingSessionURL`.
pub async fn get_session_url(
    state: Arc<VideoState>,
    request: AwsRequest,
    dash: bool,
) -> Response<Body> {
    let op = if dash {
        "GetDASHStreamingSessionURL"
    } else {
        "GetHLSStreamingSessionURL"
    };
    let host = request.header("host").map(str::to_string);
    let result = match JsonRequest::parse(&request.body) {
        Ok(req) => {
            state
                .blocking(move |s| create_session(s, &req, dash, host.as_deref()))
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => {
            let mut response = json_response(Protocol::RestJson1, &body);
            response.extensions_mut().insert(OperationName(op.into()));
            response
        }
        Err(e) => error_response(&e, op),
    }
}

/// A session resource's response body and content type.
pub struct Resource {
    pub content_type: &'static str,
    pub body: Bytes,
}

pub(crate) fn query_number(query: &[(String, String)], name: &str) -> VideoResult<Option<u64>> {
    match query.iter().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| VideoError::invalid(format!("{name} must be a number"))),
    }
}

pub(crate) fn fragment_param(query: &[(String, String)]) -> VideoResult<i64> {
    let number = query
        .iter()
        .find(|(k, _)| k == "FragmentNumber")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| VideoError::invalid("FragmentNumber is required"))?;
    fragment_seq(&number)
        .ok_or_else(|| VideoError::not_found(format!("Fragment {number} does not exist")))
}

/// The init segment of a session track.
fn init_fragment(s: &VideoState, session: &Session, track: u64, now: i64) -> VideoResult<Resource> {
    let reference = reference_fragment(s, session, now)?;
    let media = open_fragment(s, &session.stream_arn, reference.seq)?;
    let track = media
        .track(track)
        .ok_or_else(|| VideoError::not_found(format!("Track {track} does not exist")))?;
    Ok(Resource {
        content_type: "video/mp4",
        body: fmp4::init_segment(track).into(),
    })
}

/// A media fragment of one session track.
pub fn media_fragment(
    s: &VideoState,
    session: &Session,
    seq: i64,
    track: u64,
) -> VideoResult<Resource> {
    let key = SegmentKey {
        stream_arn: session.stream_arn.clone(),
        seq,
        track,
    };
    if let Some(body) = s.packaged.get(&key) {
        return Ok(Resource {
            content_type: "video/mp4",
            body,
        });
    }
    let media = open_fragment(s, &session.stream_arn, seq)?;
    let t = media
        .track(track)
        .ok_or_else(|| VideoError::not_found(format!("Track {track} does not exist")))?;
    let samples = media.samples(t, media.fragment.meta.producer_ms)?;
    let body = Bytes::from(fmp4::media_segment(t, seq as u32, &samples));
    s.packaged.insert(key, body.clone());
    Ok(Resource {
        content_type: "video/mp4",
        body,
    })
}

fn ts_fragment(s: &VideoState, session: &Session, seq: i64) -> VideoResult<Resource> {
    let media = open_fragment(s, &session.stream_arn, seq)?;
    let start = media.fragment.meta.producer_ms;
    let tracks = media
        .tracks
        .iter()
        .map(|t| Ok((t.clone(), media.samples(t, start)?)))
        .collect::<VideoResult<Vec<_>>>()?;
    Ok(Resource {
        content_type: "video/MP2T",
        body: mpegts::segment(&tracks).into(),
    })
}

/// Checks a session resource request's token, kind and stream; returns the session and its
/// token (blocking).
pub(crate) fn authorize<'q>(
    s: &VideoState,
    path: &str,
    query: &'q [(String, String)],
    now: i64,
) -> VideoResult<(Session, &'q str)> {
    let token = query
        .iter()
        .find(|(k, _)| k == "SessionToken")
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| VideoError::new(ErrorKind::NotAuthorized, "SessionToken is required"))?;
    let session = s.playback.keys.verify(token, now)?;
    let expected_kind = if path.starts_with("/hls/") {
        "hls"
    } else {
        "dash"
    };
    if session.kind != expected_kind {
        return Err(VideoError::new(
            ErrorKind::NotAuthorized,
            "The session token belongs to another kind of session",
        ));
    }
    if s.store.stream_by_arn(&session.stream_arn)?.is_none() {
        return Err(VideoError::not_found(
            "The session's stream no longer exists",
        ));
    }
    Ok((session, token))
}

/// Serves one session resource (blocking); `host` is the request's Host header.
fn serve(
    s: &VideoState,
    path: &str,
    query: &[(String, String)],
    host: Option<&str>,
) -> VideoResult<Resource> {
    let now = s.clock().now_millis();
    let (session, token) = authorize(s, path, query, now)?;
    let session = low_latency::adjust(s, session, query);
    let expected_kind = session.kind.as_str();
    let track = query_number(query, "TrackNumber")?.unwrap_or(1);
    let resource = path.rsplit('/').next().unwrap_or("");
    s.admission.admit_session_resource(
        &session.id,
        &session.stream_arn,
        resource,
        session.max_fragments,
    )?;
    match (expected_kind, resource) {
        ("hls", "getHLSMasterPlaylist.m3u8") => {
            let reference = reference_fragment(s, &session, now)?;
            let media = open_fragment(s, &session.stream_arn, reference.seq)?;
            let window = window(s, &session, now)?;
            Ok(Resource {
                content_type: "application/vnd.apple.mpegurl",
                body: hls::master_playlist(
                    &session,
                    token,
                    &media,
                    &window,
                    low_latency::requested(s, &session, query),
                )
                .into(),
            })
        }
        ("hls", "getHLSMediaPlaylist.m3u8") => {
            let window = window(s, &session, now)?;
            Ok(Resource {
                content_type: "application/vnd.apple.mpegurl",
                body: hls::media_playlist(&session, token, track, &window).into(),
            })
        }
        ("hls" | "dash", "getMP4InitFragment.mp4")
            if session.container == Container::FragmentedMp4 =>
        {
            init_fragment(s, &session, track, now)
        }
        ("hls" | "dash", "getMP4MediaFragment.mp4")
            if session.container == Container::FragmentedMp4 =>
        {
            media_fragment(s, &session, fragment_param(query)?, track)
        }
        ("hls", "getTSFragment.ts") if session.container == Container::MpegTs => {
            ts_fragment(s, &session, fragment_param(query)?)
        }
        ("dash", "getDASHManifest.mpd") => {
            let reference = reference_fragment(s, &session, now)?;
            let media = open_fragment(s, &session.stream_arn, reference.seq)?;
            let window = window(s, &session, now)?;
            Ok(Resource {
                content_type: "application/dash+xml",
                body: dash::manifest(
                    &session,
                    token,
                    &media,
                    &window,
                    now,
                    &data_endpoint(s, host),
                )
                .into(),
            })
        }
        _ => Err(VideoError::not_found(format!(
            "No such session resource: {path}"
        ))),
    }
}

/// The operation name of a session resource path (for metrics).
fn resource_operation(path: &str) -> &'static str {
    match path.rsplit('/').next().unwrap_or("") {
        "getHLSMasterPlaylist.m3u8" => "GetHLSMasterPlaylist",
        "getHLSMediaPlaylist.m3u8" => "GetHLSMediaPlaylist",
        "getMP4InitFragment.mp4" => "GetMP4InitFragment",
        "getMP4MediaFragment.mp4" => "GetMP4MediaFragment",
        "getTSFragment.ts" => "GetTSFragment",
        "getDASHManifest.mpd" => "GetDASHManifest",
        "getMP4MediaPart.mp4" => "GetMP4MediaPart",
        _ => "SessionResource",
    }
}

/// Handles a `GET /hls/v1/…` or `/dash/v1/…` request.
pub async fn session_resource(state: Arc<VideoState>, request: AwsRequest) -> Response<Body> {
    let path = request.request.uri().path().to_string();
    let query = request.query();
    let op = resource_operation(&path);
    let p = path.clone();
    let host = request.header("host").map(str::to_string);
    let result = if low_latency::handles(&state, &path, &query) {
        low_latency::serve(state.clone(), path.clone(), query).await
    } else {
        state
            .blocking(move |s| serve(s, &p, &query, host.as_deref()))
            .await
    };
    match result {
        Ok(resource) => resource_response(resource, op),
        Err(e) => {
            let mut response = error_response(&e, op);
            response
                .headers_mut()
                .insert("access-control-allow-origin", HeaderValue::from_static("*"));
            response
        }
    }
}

pub fn resource_response(resource: Resource, op: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(resource.body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(resource.content_type),
    );
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
        .extensions_mut()
        .insert(OperationName(op.to_string()));
    response
}
