//! GetClip: a progressive MP4 of the fragments that start within a time range, at most the
//! first 200 fragments or 100 MB of media, with track 1 H.264/H.265 and optional AAC on
//! track 2. Every fragment of the clip must have the first fragment's track layout.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Response;
use mooring_aws::AwsRequest;

use crate::api::{find_stream, JsonRequest};
use crate::model::{parse_json_timestamp, ErrorKind, VideoError, VideoResult};
use crate::packaging::{MediaTrack, Sample};
use crate::playback::{fragments_between, open_fragment, resource_response, Resource};
use crate::store::TimeClock;
use crate::{error_response, fmp4, VideoState};

/// Most fragments in one clip.
pub const MAX_CLIP_FRAGMENTS: usize = 200;
/// Most media bytes in one clip.
pub const MAX_CLIP_BYTES: usize = 100 * 1024 * 1024;

fn clip_blocking(s: &VideoState, req: &JsonRequest) -> VideoResult<Vec<u8>> {
    let stream_ref = req.stream_ref()?;
    let selector = req
        .object("ClipFragmentSelector")?
        .ok_or_else(|| VideoError::invalid("ClipFragmentSelector is required"))?;
    let clock = match selector.required_string("FragmentSelectorType")?.as_str() {
        "SERVER_TIMESTAMP" => TimeClock::Server,
        "PRODUCER_TIMESTAMP" => TimeClock::Producer,
        other => {
            return Err(VideoError::invalid(format!(
                "1 validation error detected: Value '{other}' at 'ClipFragmentSelector.FragmentSelectorType' failed to satisfy constraint: Member must satisfy enum value set: [PRODUCER_TIMESTAMP, SERVER_TIMESTAMP]"
            )))
        }
    };
    let range = selector
        .object("TimestampRange")?
        .ok_or_else(|| VideoError::invalid("TimestampRange is required"))?;
    let start = parse_json_timestamp(
        range
            .value("StartTimestamp")
            .ok_or_else(|| VideoError::invalid("StartTimestamp is required"))?,
        "StartTimestamp",
    )?;
    let end = parse_json_timestamp(
        range
            .value("EndTimestamp")
            .ok_or_else(|| VideoError::invalid("EndTimestamp is required"))?,
        "EndTimestamp",
    )?;
    if end <= start {
        return Err(VideoError::invalid(
            "EndTimestamp must be later than StartTimestamp",
        ));
    }
    if end - start > 24 * 3_600_000 {
        return Err(VideoError::invalid(
            "EndTimestamp must be within 24 hours of StartTimestamp",
        ));
    }
    if clock == TimeClock::Server && end > s.clock().now_millis() {
        return Err(VideoError::invalid(
            "EndTimestamp must be in the past for SERVER_TIMESTAMP selectors",
        ));
    }
    let stream = find_stream(s, &stream_ref)?;
    if stream.retention_hours == 0 {
        return Err(VideoError::new(
            ErrorKind::NoDataRetention,
            format!("The stream {} has no data retention", stream.name),
        ));
    }
    let mut fragments = fragments_between(s, &stream.arn, clock, start, end, 10_000)?;
    if clock == TimeClock::Producer {
        // Duplicate producer timestamps: the oldest-ingested fragment wins.
        fragments.sort_by_key(|m| (m.producer_ms, m.seq));
        fragments.dedup_by_key(|m| m.producer_ms);
    } else {
        fragments.sort_by_key(|m| (m.server_ms, m.seq));
    }
    if fragments.is_empty() {
        return Err(VideoError::not_found(
            "No fragments found in the stream for the given timestamp range",
        ));
    }
    fragments.truncate(MAX_CLIP_FRAGMENTS);
    s.admission.clip_points(&stream.arn, fragments.len())?;
    let mut tracks: Vec<(MediaTrack, Vec<Sample>)> = Vec::new();
    let mut bytes = 0usize;
    for meta in &fragments {
        let media = open_fragment(s, &stream.arn, meta.seq)?;
        if media
            .video()
            .is_none_or(|v| v.number != media.tracks[0].number)
        {
            return Err(VideoError::new(
                ErrorKind::UnsupportedStreamMediaType,
                "GetClip needs H.264 or H.265 video on track 1",
            ));
        }
        if tracks.is_empty() {
            tracks = media
                .tracks
                .iter()
                .map(|t| (t.clone(), Vec::new()))
                .collect();
        } else if media.tracks.len() != tracks.len()
            || media
                .tracks
                .iter()
                .zip(&tracks)
                .any(|(a, (b, _))| a.codec != b.codec || a.number != b.number)
        {
            return Err(VideoError::new(
                ErrorKind::UnsupportedStreamMediaType,
                "The track layout changes within the clip",
            ));
        }
        // Media is timed on the producer's clock, the one that is continuous.
        let start_ms = meta.producer_ms;
        let mut fragment_samples = Vec::new();
        let mut fragment_bytes = 0;
        for track in &media.tracks {
            let samples = media.samples(track, start_ms)?;
            fragment_bytes += samples.iter().map(|x| x.data.len()).sum::<usize>();
            fragment_samples.push(samples);
        }
        if bytes + fragment_bytes > MAX_CLIP_BYTES {
            break;
        }
        bytes += fragment_bytes;
        for ((_, all), samples) in tracks.iter_mut().zip(fragment_samples) {
            all.extend(samples);
        }
    }
    // Durations across fragment boundaries: each sample lasts until the next one.
    for (_, samples) in tracks.iter_mut() {
        for i in 0..samples.len().saturating_sub(1) {
            let d = samples[i + 1].dts - samples[i].dts;
            if d > 0 {
                samples[i].duration = d.min(u32::MAX as i64) as u32;
            }
        }
    }
    Ok(fmp4::progressive_file(&tracks))
}

/// Handles `POST /getClip`.
pub async fn get_clip(state: Arc<VideoState>, request: AwsRequest) -> Response<Body> {
    const OP: &str = "GetClip";
    let result = match JsonRequest::parse(&request.body) {
        Ok(req) => state.blocking(move |s| clip_blocking(s, &req)).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => resource_response(
            Resource {
                content_type: "video/mp4",
                body: body.into(),
            },
            OP,
        ),
        Err(e) => error_response(&e, OP),
    }
}
