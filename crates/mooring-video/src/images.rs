//! GetImages: still images of a stream at a sampling interval over a time range of at most
//! 300 s, as base64 JPEG or PNG, optionally scaled, 25 (or `MaxResults`, if smaller) per
//! page with a `NextToken` for the rest.
//!
//! Sampling instants are `StartTimestamp + k * SamplingInterval` before `EndTimestamp`
//! (only `StartTimestamp` when the range is shorter than the interval). The image at an
//! instant is the frame on display then: of the fragment starting last at or before the
//! instant (on the selector's clock), the frame with the latest presentation time not after
//! the instant. An instant past the end of that fragment's last frame, or before every
//! fragment, has `NO_MEDIA`; media that cannot give a picture (audio on track 1, codecs the
//! decoder lacks, damaged frames or fragments) has `MEDIA_ERROR`. [`pictures_at`] is shared
//! with image generation.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Response;
use base64::Engine;
use mooring_aws::{json_response, AwsRequest, OperationName, Protocol};
use serde_json::{json, Value};

use crate::admission::stream_scope;
use crate::api::{find_stream, JsonRequest};
use crate::model::{
    json_timestamp, parse_json_timestamp, ErrorKind, FragmentMeta, VideoError, VideoResult,
};
use crate::packaging::MediaFragment;
use crate::picture::{decode_frames, encode, ImageFormat, Picture};
use crate::playback::{enum_error, fragments_between, range_error, time_on};
use crate::store::TimeClock;
use crate::{error_response, VideoState};

/// Longest range between StartTimestamp and EndTimestamp.
pub const MAX_RANGE_MS: i64 = 300_000;
/// Shortest sampling interval (5 images per second).
pub const MIN_SAMPLING_INTERVAL_MS: i64 = 200;
/// The interval when the request has none (the current model makes it optional).
const DEFAULT_SAMPLING_INTERVAL_MS: i64 = 1_000;
/// Images per page, whatever larger `MaxResults` asks for.
const PAGE_SIZE: i64 = 25;
/// Largest response.
const MAX_RESPONSE_BYTES: usize = 100 * 1024 * 1024;
/// Largest `ImageContent` (base64 characters).
const MAX_IMAGE_CONTENT: usize = 6_291_456;
/// A fragment lasts at most 20 s (spec 6.2): one that starts longer before an instant
/// cannot cover it.
const FRAGMENT_REACH_MS: i64 = 21_000;
const TOKEN_PREFIX: &str = "images1";

/// Why an instant has no image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageError {
    NoMedia,
    MediaError,
}

impl ImageError {
    pub fn code(self) -> &'static str {
        match self {
            ImageError::NoMedia => "NO_MEDIA",
            ImageError::MediaError => "MEDIA_ERROR",
        }
    }
}

/// A GetImages request after validation.
struct ImagesRequest {
    clock: TimeClock,
    start: i64,
    end: i64,
    interval: i64,
    format: ImageFormat,
    width: Option<u32>,
    height: Option<u32>,
    page_size: i64,
    next_token: Option<String>,
}

impl ImagesRequest {
    /// How many sampling instants the range has.
    fn instants(&self) -> i64 {
        if self.end <= self.start {
            1
        } else {
            (self.end - self.start + self.interval - 1) / self.interval
        }
    }

    fn clock_name(&self) -> &'static str {
        match self.clock {
            TimeClock::Server => "SERVER_TIMESTAMP",
            TimeClock::Producer => "PRODUCER_TIMESTAMP",
        }
    }

    /// What a page token says about the request, before the instant index.
    fn token_head(&self, arn: &str) -> String {
        format!(
            "{TOKEN_PREFIX}|{arn}|{}|{}|{}|{}",
            self.clock_name(),
            self.start,
            self.end,
            self.interval
        )
    }

    /// The opaque token of the page starting at instant `index`.
    fn token(&self, arn: &str, index: i64) -> String {
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}|{index}", self.token_head(arn)))
    }

    /// The first instant of this page: 0, or the one the `NextToken` names (a token of the
    /// same stream, clock, range and interval).
    fn first_instant(&self, arn: &str) -> VideoResult<i64> {
        let Some(token) = &self.next_token else {
            return Ok(0);
        };
        let text = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        text.rsplit_once('|')
            .filter(|(head, _)| *head == self.token_head(arn))
            .and_then(|(_, index)| index.parse::<i64>().ok())
            .filter(|index| (1..self.instants()).contains(index))
            .ok_or_else(|| VideoError::invalid("The NextToken is not valid for this request"))
    }
}

fn required_timestamp(req: &JsonRequest, field: &str) -> VideoResult<i64> {
    let value = req.value(field).ok_or_else(|| {
        VideoError::invalid(format!(
            "1 validation error detected: Value null at '{field}' failed to satisfy constraint: Member must not be null"
        ))
    })?;
    parse_json_timestamp(value, field)
}

fn bounded(req: &JsonRequest, field: &str, low: i64, high: i64) -> VideoResult<Option<i64>> {
    match req.integer(field)? {
        Some(v) if !(low..=high).contains(&v) => Err(range_error(field, low, high)),
        other => Ok(other),
    }
}

fn parse(req: &JsonRequest) -> VideoResult<ImagesRequest> {
    let clock = match req.required_string("ImageSelectorType")?.as_str() {
        "PRODUCER_TIMESTAMP" => TimeClock::Producer,
        "SERVER_TIMESTAMP" => TimeClock::Server,
        other => {
            return Err(enum_error(
                "ImageSelectorType",
                other,
                "PRODUCER_TIMESTAMP, SERVER_TIMESTAMP",
            ))
        }
    };
    let start = required_timestamp(req, "StartTimestamp")?;
    let end = required_timestamp(req, "EndTimestamp")?;
    if end < start {
        return Err(VideoError::invalid(
            "EndTimestamp must not be earlier than StartTimestamp",
        ));
    }
    if end - start > MAX_RANGE_MS {
        return Err(VideoError::invalid(
            "The time range between StartTimestamp and EndTimestamp must not exceed 300 seconds",
        ));
    }
    let interval = req
        .integer("SamplingInterval")?
        .unwrap_or(DEFAULT_SAMPLING_INTERVAL_MS);
    if interval < MIN_SAMPLING_INTERVAL_MS {
        return Err(VideoError::invalid(format!(
            "SamplingInterval must be at least {MIN_SAMPLING_INTERVAL_MS} milliseconds"
        )));
    }
    let quality = match req.tag_map("FormatConfig")? {
        None => 80,
        Some(config) => {
            if config.len() != 1 {
                return Err(VideoError::invalid(
                    "1 validation error detected: Value at 'FormatConfig' failed to satisfy constraint: Member must have length between 1 and 1",
                ));
            }
            let (key, value) = config.into_iter().next().unwrap_or_default();
            if key != "JPEGQuality" {
                return Err(enum_error("FormatConfig.key", &key, "JPEGQuality"));
            }
            match value.parse::<u8>() {
                Ok(q) if (1..=100).contains(&q) => q,
                _ => {
                    return Err(VideoError::invalid(format!(
                        "The JPEGQuality value '{value}' must be an integer between 1 and 100"
                    )))
                }
            }
        }
    };
    let format = match req.required_string("Format")?.as_str() {
        "JPEG" => ImageFormat::Jpeg { quality },
        "PNG" => ImageFormat::Png,
        other => return Err(enum_error("Format", other, "JPEG, PNG")),
    };
    let width = bounded(req, "WidthPixels", 1, 3840)?.map(|v| v as u32);
    let height = bounded(req, "HeightPixels", 1, 2160)?.map(|v| v as u32);
    let page_size = bounded(req, "MaxResults", 1, 100)?
        .unwrap_or(PAGE_SIZE)
        .min(PAGE_SIZE);
    let next_token = req.string("NextToken")?;
    if let Some(token) = &next_token {
        let well_formed = (1..=4096).contains(&token.len())
            && token.trim_end_matches('=').len() + 2 >= token.len()
            && !token.trim_end_matches('=').is_empty()
            && token
                .trim_end_matches('=')
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
        if !well_formed {
            return Err(VideoError::invalid(
                "1 validation error detected: Value at 'NextToken' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9+/]+={0,2}",
            ));
        }
    }
    Ok(ImagesRequest {
        clock,
        start,
        end,
        interval,
        format,
        width,
        height,
        page_size,
        next_token,
    })
}

/// The pictures of one fragment at `instants` (ms on `clock`).
fn fragment_pictures(
    s: &VideoState,
    arn: &str,
    meta: &FragmentMeta,
    clock: TimeClock,
    instants: &[i64],
) -> Vec<Result<Picture, ImageError>> {
    let start_ms = time_on(clock, meta);
    // A fragment that cannot be read has MEDIA_ERROR within its own duration; past it,
    // nothing is known to have been there.
    let all = |e: ImageError| {
        instants
            .iter()
            .map(|&t| match e {
                ImageError::MediaError if t >= start_ms + meta.duration_ms.max(1) => {
                    Err(ImageError::NoMedia)
                }
                e => Err(e),
            })
            .collect::<Vec<_>>()
    };
    let fragment = match s.fragments.read(arn, meta.seq) {
        Ok(Some(f)) => f,
        Ok(None) => return all(ImageError::NoMedia),
        Err(e) => {
            tracing::warn!(error = %e, "GetImages could not read a fragment");
            return all(ImageError::MediaError);
        }
    };
    let Ok(media) = MediaFragment::open(fragment) else {
        return all(ImageError::MediaError);
    };
    let Some(track) = media.tracks.first().filter(|t| t.codec.is_video()) else {
        return all(ImageError::MediaError);
    };
    let samples = match media.samples(track, start_ms) {
        Ok(samples) if !samples.is_empty() => samples,
        _ => return all(ImageError::MediaError),
    };
    let ticks = |ms: i64| (i128::from(ms) * i128::from(track.timescale) / 1000) as i64;
    let first_pts = samples.iter().map(|x| x.pts).min().unwrap_or(0);
    let last_pts = samples.iter().map(|x| x.pts).max().unwrap_or(0);
    let frame_ticks = if samples.len() > 1 {
        (last_pts - first_pts) / (samples.len() as i64 - 1)
    } else {
        track
            .default_duration_ns
            .map(|ns| (i128::from(ns) * i128::from(track.timescale) / 1_000_000_000) as i64)
            .unwrap_or(i64::from(track.timescale) / 25)
    };
    // The video ends one frame after its last frame (the fragment's own duration may run
    // on with audio).
    let end = last_pts + frame_ticks.max(1);
    // Targets by the keyframe that starts their GOP: each GOP decodes on its own, so damage
    // in one does not spread to the next.
    let mut by_gop: BTreeMap<usize, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
    let mut results: Vec<Result<Picture, ImageError>> =
        instants.iter().map(|_| Err(ImageError::NoMedia)).collect();
    for (slot, &instant) in instants.iter().enumerate() {
        let at = ticks(instant);
        if at >= end {
            continue;
        }
        let shown = samples
            .iter()
            .enumerate()
            .filter(|(_, x)| x.pts <= at)
            .max_by_key(|(i, x)| (x.pts, *i))
            .or_else(|| samples.iter().enumerate().min_by_key(|(i, x)| (x.pts, *i)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let gop = (0..=shown)
            .rev()
            .find(|&i| samples[i].keyframe)
            .unwrap_or(0);
        let (slots, targets) = by_gop.entry(gop).or_default();
        slots.push(slot);
        targets.push(shown);
    }
    for (slots, targets) in by_gop.into_values() {
        for (slot, picture) in slots
            .into_iter()
            .zip(decode_frames(track, &samples, &targets))
        {
            results[slot] = picture.map_err(|e| {
                tracing::debug!(error = %e, fragment = meta.seq, "no picture for GetImages");
                ImageError::MediaError
            });
        }
    }
    results
}

/// The pictures of a stream at `instants` (ms on `clock`), one result per instant.
pub fn pictures_at(
    s: &VideoState,
    arn: &str,
    clock: TimeClock,
    instants: &[i64],
) -> VideoResult<Vec<Result<Picture, ImageError>>> {
    let (Some(&low), Some(&high)) = (instants.iter().min(), instants.iter().max()) else {
        return Ok(Vec::new());
    };
    let mut fragments = fragments_between(s, arn, clock, low - FRAGMENT_REACH_MS, high, 100_000)?;
    // With equal starts (producer timestamps sent twice), the newest fragment wins.
    fragments.sort_by_key(|m| (time_on(clock, m), m.seq));
    let mut by_fragment: BTreeMap<i64, (usize, Vec<usize>)> = BTreeMap::new();
    let mut results: Vec<Result<Picture, ImageError>> =
        instants.iter().map(|_| Err(ImageError::NoMedia)).collect();
    for (slot, &instant) in instants.iter().enumerate() {
        let after = fragments.partition_point(|m| time_on(clock, m) <= instant);
        if after == 0 {
            continue;
        }
        let meta = &fragments[after - 1];
        if instant - time_on(clock, meta) >= FRAGMENT_REACH_MS {
            continue;
        }
        by_fragment
            .entry(meta.seq)
            .or_insert_with(|| (after - 1, Vec::new()))
            .1
            .push(slot);
    }
    for (index, slots) in by_fragment.into_values() {
        let wanted: Vec<i64> = slots.iter().map(|&slot| instants[slot]).collect();
        let pictures = fragment_pictures(s, arn, &fragments[index], clock, &wanted);
        for (slot, picture) in slots.into_iter().zip(pictures) {
            results[slot] = picture;
        }
    }
    Ok(results)
}

fn get_images_blocking(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let stream_ref = req.stream_ref()?;
    let request = parse(req)?;
    let stream = find_stream(s, &stream_ref)?;
    if stream.retention_hours == 0 {
        return Err(VideoError::new(
            ErrorKind::NoDataRetention,
            format!(
                "The stream {} has no data retention; GetImages needs DataRetentionInHours > 0",
                stream.name
            ),
        ));
    }
    let first = request.first_instant(&stream.arn)?;
    let count = request.instants();
    let last = (first + request.page_size).min(count);
    let scope = stream_scope(None, Some(&stream.arn)).unwrap_or_default();
    s.admission
        .metadata_points(&scope, 400.0 + request.page_size as f64)?;
    s.admission.media_points(&scope, request.page_size as f64)?;
    let instants: Vec<i64> = (first..last)
        .map(|k| request.start + k * request.interval)
        .collect();
    let pictures = pictures_at(s, &stream.arn, request.clock, &instants)?;
    let mut images = Vec::with_capacity(instants.len());
    let mut bytes = 0usize;
    let mut next = if last < count { Some(last) } else { None };
    for (k, (instant, picture)) in instants.iter().zip(pictures).enumerate() {
        let content = picture.and_then(|p| {
            encode(&p, request.format, request.width, request.height)
                .map(|data| base64::engine::general_purpose::STANDARD.encode(data))
                .ok()
                .filter(|b64| b64.len() <= MAX_IMAGE_CONTENT)
                .ok_or(ImageError::MediaError)
        });
        let entry = match content {
            Ok(b64) => {
                if k > 0 && bytes + b64.len() > MAX_RESPONSE_BYTES {
                    next = Some(first + k as i64);
                    break;
                }
                bytes += b64.len();
                json!({ "TimeStamp": json_timestamp(*instant), "ImageContent": b64 })
            }
            Err(e) => json!({ "TimeStamp": json_timestamp(*instant), "Error": e.code() }),
        };
        images.push(entry);
    }
    let mut body = json!({ "Images": images });
    if let Some(index) = next {
        body["NextToken"] = json!(request.token(&stream.arn, index));
    }
    Ok(body)
}

/// Handles `POST /getImages`.
pub async fn get_images(state: Arc<VideoState>, request: AwsRequest) -> Response<Body> {
    const OP: &str = "GetImages";
    let result = match JsonRequest::parse(&request.body) {
        Ok(req) => state.blocking(move |s| get_images_blocking(s, &req)).await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebml::write_element;
    use crate::fragments::StoredFragment;
    use crate::mkv::{
        ID_CLUSTER, ID_CODEC_ID, ID_CODEC_PRIVATE, ID_INFO, ID_SIMPLE_BLOCK, ID_TIMECODE,
        ID_TIMECODE_SCALE, ID_TRACKS, ID_TRACK_ENTRY, ID_TRACK_NUMBER, ID_TRACK_TYPE,
    };
    use crate::model::Stream;
    use crate::packaging::Sample;
    use crate::picture::tests::encoded;
    use bytes::Bytes;
    use mooring_core::ServiceContext;

    const ARN: &str = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam/1700000000000";
    const GREEN: [u8; 3] = [20, 200, 20];

    fn segment_prefix(codec_private: &[u8]) -> Bytes {
        let mut out = Vec::new();
        let mut info = Vec::new();
        write_element(&mut info, ID_TIMECODE_SCALE, &[0x0F, 0x42, 0x40]);
        write_element(&mut out, ID_INFO, &info);
        let mut entry = Vec::new();
        write_element(&mut entry, ID_TRACK_NUMBER, &[1]);
        write_element(&mut entry, ID_TRACK_TYPE, &[1]);
        write_element(&mut entry, ID_CODEC_ID, b"V_MPEG4/ISO/AVC");
        write_element(&mut entry, ID_CODEC_PRIVATE, codec_private);
        let mut entries = Vec::new();
        write_element(&mut entries, ID_TRACK_ENTRY, &entry);
        write_element(&mut out, ID_TRACKS, &entries);
        Bytes::from(out)
    }

    /// A known-size cluster at timecode 0 with the samples as SimpleBlocks (ms timecodes).
    fn cluster(samples: &[Sample]) -> Vec<u8> {
        let mut body = Vec::new();
        write_element(&mut body, ID_TIMECODE, &[0]);
        for sample in samples {
            let mut block = vec![0x81];
            block.extend_from_slice(&((sample.pts / 90) as i16).to_be_bytes());
            block.push(if sample.keyframe { 0x80 } else { 0 });
            block.extend_from_slice(&sample.data);
            write_element(&mut body, ID_SIMPLE_BLOCK, &block);
        }
        let mut out = Vec::new();
        write_element(&mut out, ID_CLUSTER, &body);
        out
    }

    fn fragment(seq: i64, at_ms: i64, prefix: Bytes, cluster: Vec<u8>) -> StoredFragment {
        StoredFragment {
            meta: FragmentMeta {
                seq,
                timecode: 0,
                producer_ms: at_ms,
                server_ms: at_ms,
                duration_ms: 1000,
                size: cluster.len() as i64,
                tags: Vec::new(),
            },
            ebml_header: Bytes::from_static(b"header"),
            segment_prefix: prefix,
            cluster: Bytes::from(cluster),
            tags: Bytes::new(),
        }
    }

    /// Fragments damaged in every way a stored fragment can be still give one entry per
    /// instant: MEDIA_ERROR within them, NO_MEDIA outside, pictures from the intact one.
    #[tokio::test]
    async fn damaged_fragments_give_media_error_entries() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ServiceContext::for_tests(dir.path()).unwrap();
        let service = crate::VideoService::new(&ctx).unwrap();
        let s = service.state().clone();
        s.store
            .insert_stream(&Stream::for_tests("cam", ARN))
            .unwrap();
        let (track, samples) = encoded(64, 48, &[GREEN; 25], 25);
        let prefix = segment_prefix(&track.codec_private);
        let good = cluster(&samples);
        // H.264 damage: the keyframe's slice is garbage.
        let mut bad_frames = samples.clone();
        let mut garbage = vec![0, 0, 0, 40, 0x65];
        garbage.extend_from_slice(&[0xA5; 39]);
        bad_frames[0].data = Bytes::from(garbage);
        // Matroska damage: the cluster claims more bytes than it has.
        let mut truncated = good.clone();
        truncated.truncate(good.len() / 2);
        let (_, long) = encoded(64, 48, &[GREEN; 50], 25);
        let mut long_damaged = long.clone();
        long_damaged[0].data = bad_frames[0].data.clone();
        let mut two_gops = fragment(0, 16_000, prefix.clone(), cluster(&long_damaged));
        two_gops.meta.duration_ms = 2000;
        let live = s.fragments.live(ARN);
        let fragments = [
            fragment(0, 10_000, prefix.clone(), good),
            fragment(0, 11_000, prefix.clone(), cluster(&bad_frames)),
            fragment(0, 12_000, prefix, truncated),
            // Codec private data that is no AVCDecoderConfigurationRecord.
            fragment(0, 13_000, segment_prefix(&[9, 9, 9]), cluster(&samples)),
            // Two GOPs, the first damaged: the second still decodes.
            two_gops,
        ];
        for mut f in fragments {
            f.meta.seq = s.fragments.next_seq(&live).unwrap();
            s.fragments.persist(&live, &f).unwrap();
        }
        let request = serde_json::json!({
            "StreamARN": ARN,
            "ImageSelectorType": "PRODUCER_TIMESTAMP",
            "StartTimestamp": 9.5,
            "EndTimestamp": 18.0,
            "SamplingInterval": 500,
            "Format": "PNG",
        });
        let req = JsonRequest::parse(request.to_string().as_bytes()).unwrap();
        let body = get_images_blocking(&s, &req).unwrap();
        let images = body["Images"].as_array().unwrap();
        let errors: Vec<&str> = images
            .iter()
            .map(|i| i["Error"].as_str().unwrap_or("image"))
            .collect();
        let expected = [
            "NO_MEDIA",
            "image",
            "image",
            "MEDIA_ERROR",
            "MEDIA_ERROR",
            "MEDIA_ERROR",
            "MEDIA_ERROR",
            "MEDIA_ERROR",
            "MEDIA_ERROR",
            "NO_MEDIA",
            "NO_MEDIA",
            "NO_MEDIA",
            "NO_MEDIA",
            "MEDIA_ERROR",
            "MEDIA_ERROR",
            "image",
            "image",
        ];
        assert_eq!(errors, expected);
        assert_eq!(images[3]["TimeStamp"], serde_json::json!(11.0));
        let png = base64::engine::general_purpose::STANDARD
            .decode(images[2]["ImageContent"].as_str().unwrap())
            .unwrap();
        let picture = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(picture.dimensions(), (64, 48));
        let centre = picture.get_pixel(32, 24).0;
        assert!(
            centre.iter().zip(GREEN).all(|(a, b)| a.abs_diff(b) <= 24),
            "{centre:?}"
        );
        assert!(body.get("NextToken").is_none());
    }
}
