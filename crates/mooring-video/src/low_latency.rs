//! Low-Latency HLS, a Mooring option beyond KVS: partial segments published as frames arrive,
//! so a browser plays about a second behind the camera instead of KVS's three to five.
//!
//! **How a client asks for it.** Append `&LowLatency=ON` to the session URL that
//! GetHLSStreamingSessionURL returned (LIVE, FRAGMENTED_MP4); the master playlist carries the
//! parameter into its media playlist URLs. Setting `low_latency_hls = true` in the `[video]`
//! configuration makes every LIVE fMP4 HLS session low-latency without it. A low-latency
//! media playlist adds to the KVS one:
//! `#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=…`, `#EXT-X-PART-INF`, the
//! `#EXT-X-PART`s of the newest fragments (fMP4 `moof`+`mdat` pieces served by
//! `getMP4MediaPart.mp4?FragmentNumber=…&PartNumber=…`), the completed parts of the fragment
//! still being ingested, and an `#EXT-X-PRELOAD-HINT` for its next part. A playlist request
//! with `_HLS_msn` (and `_HLS_part`) is held until that segment (part) exists; a part request
//! is held until the part is complete, each for at most three target durations. Low-latency
//! playlists are timed on the producer timeline and tag only its gaps (DiscontinuityMode
//! ALWAYS acts as ON_DISCONTINUITY; NEVER stays), see [`adjust`].
//!
//! **Where the frames come from.** PutMedia reports the open cluster of every stream after
//! each body chunk ([`LiveEdges::grow`]); the frames received so far are kept here until the
//! fragment is complete and published in the fragment store. Parts split a fragment's
//! samples every [`PART_SPLIT_MS`] from the start of the part, so the parts of the growing
//! fragment and those of the finished one are the same bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::fragments::StoredFragment;
use crate::hls::{self, GrowingFragment, PartialSegments};
use crate::mkv::Document;
use crate::model::{FragmentMeta, VideoError, VideoResult};
use crate::packaging::{MediaFragment, MediaTrack, Sample};
use crate::playback::{self, fragment_param, is_discontinuity, query_number, Resource};
use crate::session::{Container, Discontinuity, PlaybackMode, Session};
use crate::{fmp4, VideoState};

/// A new part starts at the first frame this long after the start of the current one.
pub const PART_SPLIT_MS: i64 = 200;
/// `PART-TARGET`: at least every part's duration (the split plus one frame at 20 fps).
pub const PART_TARGET_MS: i64 = 250;
/// `PART-HOLD-BACK`: three part targets, as the HLS specification recommends.
pub const PART_HOLD_BACK_MS: i64 = 3 * PART_TARGET_MS;
/// Complete fragments whose parts are listed, newest last.
pub const FRAGMENTS_WITH_PARTS: usize = 3;
/// The query parameter a client adds to the session URL.
pub const QUERY_PARAMETER: &str = "LowLatency";

/// The frames of a stream's fragment that is still being received.
struct Edge {
    meta: FragmentMeta,
    document: Arc<Document>,
    /// The cluster's children received so far (whole elements only).
    body: Vec<u8>,
}

/// What PutMedia reports about the cluster it is receiving.
pub struct EdgeUpdate<'a> {
    pub seq: i64,
    /// Cluster timecode in ticks.
    pub timecode: i64,
    pub producer_ms: i64,
    pub server_ms: i64,
    pub document: &'a Arc<Document>,
    /// The cluster's children so far; only ever grows while the cluster is open.
    pub body: &'a [u8],
}

struct StreamEdge {
    edge: Mutex<Option<Edge>>,
    /// Bumped on every change; blocked requests wait on it.
    changed: tokio::sync::watch::Sender<u64>,
}

/// The growing fragments of all streams.
#[derive(Default)]
pub struct LiveEdges {
    streams: Mutex<HashMap<String, Arc<StreamEdge>>>,
}

impl LiveEdges {
    fn stream(&self, arn: &str) -> Arc<StreamEdge> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .entry(arn.to_string())
            .or_insert_with(|| {
                Arc::new(StreamEdge {
                    edge: Mutex::new(None),
                    changed: tokio::sync::watch::channel(0).0,
                })
            })
            .clone()
    }

    /// Records the open cluster of a stream (`None`: no cluster is open) and wakes waiters.
    /// Called by PutMedia after every chunk of body it parsed.
    pub fn grow(&self, arn: &str, update: Option<EdgeUpdate<'_>>) {
        let stream = self.stream(arn);
        {
            let mut edge = stream.edge.lock().unwrap_or_else(|e| e.into_inner());
            match update {
                None => *edge = None,
                Some(u) => {
                    let same = edge.as_ref().is_some_and(|e| e.meta.seq == u.seq);
                    if !same {
                        *edge = Some(Edge {
                            meta: FragmentMeta {
                                seq: u.seq,
                                timecode: u.timecode,
                                producer_ms: u.producer_ms,
                                server_ms: u.server_ms,
                                duration_ms: 0,
                                size: 0,
                                tags: Vec::new(),
                            },
                            document: u.document.clone(),
                            body: Vec::new(),
                        });
                    }
                    let e = edge.as_mut().expect("set above");
                    if u.body.len() > e.body.len() {
                        e.body.extend_from_slice(&u.body[e.body.len()..]);
                    }
                }
            }
        }
        stream.changed.send_modify(|v| *v += 1);
    }

    /// The growing fragment of a stream as a stored fragment holding the frames so far.
    pub fn snapshot(&self, arn: &str) -> Option<Arc<StoredFragment>> {
        let stream = self.stream(arn);
        let edge = stream.edge.lock().unwrap_or_else(|e| e.into_inner());
        let e = edge.as_ref()?;
        let mut cluster = Vec::with_capacity(12 + e.body.len());
        cluster.extend_from_slice(&[0x1F, 0x43, 0xB6, 0x75]);
        cluster.extend_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        cluster.extend_from_slice(&e.body);
        let mut meta = e.meta.clone();
        meta.size = e.body.len() as i64;
        Some(Arc::new(StoredFragment {
            meta,
            ebml_header: e.document.ebml_header.clone(),
            segment_prefix: e.document.segment_prefix.clone(),
            cluster: Bytes::from(cluster),
            tags: Bytes::new(),
        }))
    }

    /// A receiver that changes whenever a stream's edge does.
    pub fn subscribe(&self, arn: &str) -> tokio::sync::watch::Receiver<u64> {
        self.stream(arn).changed.subscribe()
    }
}

/// One part of a fragment's track.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// First and one-past-last sample index.
    pub samples: std::ops::Range<usize>,
    pub duration_ms: f64,
    pub independent: bool,
}

/// Splits a track's samples into parts. With `complete` false the fragment is still growing:
/// its last part is only returned once a later frame has started the next one.
pub fn split_parts(samples: &[Sample], timescale: u32, complete: bool) -> Vec<Part> {
    let split = i64::from(timescale) * PART_SPLIT_MS / 1000;
    let mut parts = Vec::new();
    let mut start = 0;
    for i in 1..=samples.len() {
        let boundary = i == samples.len() || samples[i].dts - samples[start].dts >= split;
        if !boundary {
            continue;
        }
        if i == samples.len() && !complete {
            break;
        }
        let ticks: i64 = samples[start..i]
            .iter()
            .map(|s| i64::from(s.duration))
            .sum();
        parts.push(Part {
            samples: start..i,
            duration_ms: ticks as f64 * 1000.0 / f64::from(timescale),
            independent: samples[start].keyframe,
        });
        start = i;
    }
    parts
}

/// The samples and parts of one track of a fragment (complete or growing).
pub fn track_parts(
    fragment: Arc<StoredFragment>,
    track: u64,
    complete: bool,
) -> VideoResult<(MediaTrack, Vec<Sample>, Vec<Part>)> {
    let start = fragment.meta.producer_ms;
    let media = MediaFragment::open(fragment)?;
    let t = media
        .track(track)
        .ok_or_else(|| VideoError::not_found(format!("Track {track} does not exist")))?
        .clone();
    let samples = media.samples(&t, start)?;
    let parts = split_parts(&samples, t.timescale, complete);
    Ok((t, samples, parts))
}

/// How long a blocked request may wait: three target durations.
pub fn hold_limit(target_duration_s: i64) -> Duration {
    Duration::from_millis((3 * target_duration_s.max(1) * 1000) as u64)
}

/// Whether a session's playlists are low-latency: asked for by the query parameter or the
/// configuration, and possible (LIVE, fMP4).
pub fn requested(s: &VideoState, session: &Session, query: &[(String, String)]) -> bool {
    let asked = session.low_latency
        || s.config.low_latency_hls
        || query.iter().any(|(k, v)| {
            k == QUERY_PARAMETER && matches!(v.to_ascii_uppercase().as_str(), "ON" | "1" | "TRUE")
        });
    asked && session.mode == PlaybackMode::Live && session.container == Container::FragmentedMp4
}

/// The session as low-latency resources see it: on the producer timeline, the one the
/// packaged media uses, for `#EXT-X-PROGRAM-DATE-TIME` and discontinuities; and unless it
/// asked for NEVER, discontinuity tags only where that timeline has a gap. hls.js places
/// partial segments by their program date-times, which server timestamps (arrival times)
/// would make jitter by hundreds of milliseconds; and it gives the partial segment at a
/// playlist's end the discontinuity sequence of the tags before it, so a tag before every
/// fragment would renumber it from one reload to the next.
pub fn adjust(s: &VideoState, mut session: Session, query: &[(String, String)]) -> Session {
    if requested(s, &session, query) {
        session.producer_clock = true;
        if session.discontinuity != Discontinuity::Never {
            session.discontinuity = Discontinuity::OnDiscontinuity;
        }
    }
    session
}

/// Whether a session resource request is served here: parts, and media playlists of
/// low-latency sessions (or with blocking-reload parameters).
pub fn handles(s: &VideoState, path: &str, query: &[(String, String)]) -> bool {
    match path.rsplit('/').next().unwrap_or("") {
        "getMP4MediaPart.mp4" => path.starts_with("/hls/"),
        "getHLSMediaPlaylist.m3u8" => {
            s.config.low_latency_hls
                || query
                    .iter()
                    .any(|(k, _)| k == QUERY_PARAMETER || k == "_HLS_msn")
        }
        _ => false,
    }
}

/// One attempt at a held request: the resource, or not yet (with what to send when the hold
/// ends).
enum Attempt {
    Ready(Resource),
    NotYet {
        arn: String,
        hold: Duration,
        fallback: VideoResult<Resource>,
    },
}

fn blocking_reload(query: &[(String, String)]) -> VideoResult<Option<(u64, Option<usize>)>> {
    let msn = query_number(query, "_HLS_msn")?;
    let part = query_number(query, "_HLS_part")?;
    match (msn, part) {
        (None, Some(_)) => Err(VideoError::invalid("_HLS_part requires _HLS_msn")),
        (None, None) => Ok(None),
        (Some(m), p) => Ok(Some((m, p.map(|p| p as usize)))),
    }
}

/// Builds the low-latency playlist and says whether it satisfies the blocking request.
fn playlist_attempt(
    s: &VideoState,
    session: &Session,
    token: &str,
    query: &[(String, String)],
    now: i64,
) -> VideoResult<Attempt> {
    let track = query_number(query, "TrackNumber")?.unwrap_or(1);
    let wanted = blocking_reload(query)?;
    // The edge first, then the window: a fragment completing in between is then in the
    // window and the stale edge is dropped below, never listed under the wrong number.
    let edge = s.live_edges.snapshot(&session.stream_arn);
    let window = playback::window(s, session, now)?;
    if !requested(s, session, query) {
        // A plain session gets the KVS playlist; a LIVE one is held, like a low-latency
        // one, until it lists the segment `_HLS_msn` asks for (see `hls::media_playlist`).
        let resource = playlist_resource(hls::media_playlist(session, token, track, &window));
        let listed = |msn: u64| {
            window
                .fragments
                .last()
                .is_some_and(|(_, n)| n.media_sequence >= msn)
        };
        return Ok(match wanted {
            Some((msn, _)) if session.mode == PlaybackMode::Live && !listed(msn) => {
                Attempt::NotYet {
                    arn: session.stream_arn.clone(),
                    hold: hold_limit(hls::target_duration(&window)),
                    fallback: Ok(resource),
                }
            }
            _ => Attempt::Ready(resource),
        });
    }
    let arn = &session.stream_arn;
    let mut parts = PartialSegments::default();
    for (m, _) in window
        .fragments
        .iter()
        .rev()
        .take(FRAGMENTS_WITH_PARTS)
        .rev()
    {
        if let Some(fragment) = s.fragments.read(arn, m.seq)? {
            let (_, _, listed) = track_parts(fragment, track, true)?;
            parts.complete.push((m.seq, listed));
        }
    }
    let last = window.fragments.last();
    if let Some(edge) = edge {
        if last.is_none_or(|(m, _)| edge.meta.seq > m.seq) {
            let meta = edge.meta.clone();
            let listed = track_parts(edge, track, false)
                .map(|(_, _, p)| p)
                .unwrap_or_default();
            parts.growing = Some(GrowingFragment {
                seq: meta.seq,
                media_sequence: last.map_or(0, |(_, n)| n.media_sequence + 1),
                discontinuity: last.is_some_and(|(m, _)| is_discontinuity(session, m, &meta)),
                start_ms: session.start_of(&meta),
                parts: listed,
            });
        }
    }
    let satisfied = match wanted {
        None => true,
        Some((msn, part)) => {
            let complete = last.is_some_and(|(_, n)| n.media_sequence >= msn);
            let growing = parts.growing.as_ref().is_some_and(|g| {
                g.media_sequence > msn
                    || (g.media_sequence == msn && part.is_some_and(|p| g.parts.len() > p))
            });
            complete || growing
        }
    };
    let resource = playlist_resource(hls::low_latency_playlist(
        session, token, track, &window, &parts,
    ));
    Ok(if satisfied {
        Attempt::Ready(resource)
    } else {
        Attempt::NotYet {
            arn: arn.clone(),
            hold: hold_limit(hls::target_duration(&window)),
            fallback: Ok(resource),
        }
    })
}

fn playlist_resource(text: String) -> Resource {
    Resource {
        content_type: "application/vnd.apple.mpegurl",
        body: text.into(),
    }
}

/// A part of a complete or growing fragment; held while it is not complete yet.
fn part_attempt(
    s: &VideoState,
    session: &Session,
    query: &[(String, String)],
) -> VideoResult<Attempt> {
    if session.container != Container::FragmentedMp4 {
        return Err(VideoError::not_found(
            "Parts are served for FRAGMENTED_MP4 sessions",
        ));
    }
    let track = query_number(query, "TrackNumber")?.unwrap_or(1);
    let seq = fragment_param(query)?;
    let index = query_number(query, "PartNumber")?
        .ok_or_else(|| VideoError::invalid("PartNumber is required"))? as usize;
    let arn = &session.stream_arn;
    let missing = || VideoError::not_found(format!("Part {index} of the fragment does not exist"));
    // The edge first, then the store: a fragment completing in between is found there.
    let edge = s.live_edges.snapshot(arn);
    let part = |fragment: Arc<StoredFragment>, complete: bool| -> VideoResult<Option<Resource>> {
        let (t, samples, parts) = track_parts(fragment, track, complete)?;
        Ok(parts.get(index).map(|p| Resource {
            content_type: "video/mp4",
            body: fmp4::media_segment(&t, seq as u32, &samples[p.samples.clone()]).into(),
        }))
    };
    if let Some(fragment) = s.fragments.read(arn, seq)? {
        return part(fragment, true)?
            .map(Attempt::Ready)
            .ok_or_else(missing);
    }
    let not_yet = Attempt::NotYet {
        arn: arn.clone(),
        hold: hold_limit(1),
        fallback: Err(missing()),
    };
    match edge {
        Some(e) if e.meta.seq == seq => Ok(match part(e, false)? {
            Some(resource) => Attempt::Ready(resource),
            None => not_yet,
        }),
        // The next fragment has not started yet (a preload hint's part).
        Some(e) if e.meta.seq < seq && seq - e.meta.seq <= 1 => Ok(not_yet),
        Some(_) => Err(missing()),
        None => match s.fragments.latest(arn)? {
            Some(latest) if latest.seq + 1 == seq => Ok(not_yet),
            _ => Err(missing()),
        },
    }
}

fn attempt(s: &VideoState, path: &str, query: &[(String, String)]) -> VideoResult<Attempt> {
    let now = s.clock().now_millis();
    let (session, token) = playback::authorize(s, path, query, now)?;
    let session = adjust(s, session, query);
    match path.rsplit('/').next().unwrap_or("") {
        "getMP4MediaPart.mp4" => part_attempt(s, &session, query),
        _ => playlist_attempt(s, &session, token, query, now),
    }
}

/// Serves a low-latency resource, holding the request until it can be answered.
pub async fn serve(
    state: Arc<VideoState>,
    path: String,
    query: Vec<(String, String)>,
) -> VideoResult<Resource> {
    let query = Arc::new(query);
    let path = Arc::new(path);
    let mut waiting: Option<(Instant, WatchPair)> = None;
    loop {
        let (p, q) = (path.clone(), query.clone());
        let outcome = state.blocking(move |s| attempt(s, &p, &q)).await?;
        let (arn, hold, fallback) = match outcome {
            Attempt::Ready(resource) => return Ok(resource),
            Attempt::NotYet {
                arn,
                hold,
                fallback,
            } => (arn, hold, fallback),
        };
        match waiting.as_mut() {
            None => {
                // Subscribe, then look again: a change between the two is not missed.
                let edges = state.live_edges.subscribe(&arn);
                let published = state.fragments.live(&arn).subscribe();
                waiting = Some((Instant::now() + hold, (edges, published)));
            }
            Some((deadline, (edges, published))) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return fallback;
                }
                let changed = tokio::time::timeout(left, async {
                    tokio::select! {
                        r = edges.changed() => r.is_ok(),
                        r = published.changed() => r.is_ok(),
                    }
                })
                .await;
                match changed {
                    Err(_) => return fallback,
                    // The stream's state went away: answer with what there is.
                    Ok(false) => return fallback,
                    Ok(true) => {}
                }
            }
        }
    }
}

type WatchPair = (
    tokio::sync::watch::Receiver<u64>,
    tokio::sync::watch::Receiver<i64>,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(n: usize, step: i64, keyframe_every: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                dts: i as i64 * step,
                pts: i as i64 * step,
                duration: step as u32,
                keyframe: i % keyframe_every == 0,
                data: Bytes::new(),
            })
            .collect()
    }

    #[test]
    fn the_edge_grows_with_the_open_cluster_and_resets_per_fragment() {
        let edges = LiveEdges::default();
        let document = Arc::new(Document {
            ebml_header: Bytes::from_static(b"H"),
            segment_prefix: Bytes::from_static(b"P"),
            timecode_scale: 1_000_000,
            tracks: Vec::new(),
        });
        let mut changes = edges.subscribe("arn");
        assert!(edges.snapshot("arn").is_none());
        let update = |seq, body: &'static [u8]| EdgeUpdate {
            seq,
            timecode: 5,
            producer_ms: 5,
            server_ms: 6,
            document: &document,
            body,
        };
        edges.grow("arn", Some(update(1, b"ab")));
        edges.grow("arn", Some(update(1, b"abcd")));
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        let snap = edges.snapshot("arn").unwrap();
        assert_eq!(snap.meta.seq, 1);
        assert_eq!((snap.meta.producer_ms, snap.meta.server_ms), (5, 6));
        assert_eq!(&snap.cluster[..4], &[0x1F, 0x43, 0xB6, 0x75]);
        assert_eq!(&snap.cluster[12..], b"abcd");
        assert_eq!(&snap.segment_prefix[..], b"P");
        // The next fragment starts afresh; no open cluster clears the edge.
        edges.grow("arn", Some(update(2, b"x")));
        assert_eq!(&edges.snapshot("arn").unwrap().cluster[12..], b"x");
        edges.grow("arn", None);
        assert!(edges.snapshot("arn").is_none());
        assert!(changes.has_changed().unwrap());
        assert!(edges.snapshot("other").is_none());
    }

    #[test]
    fn parts_split_every_200_ms_and_a_growing_fragment_hides_its_last_part() {
        // 25 fps on a 90 kHz clock: 3600 ticks a frame, a part every 5 frames.
        let all = samples(25, 3600, 25);
        let parts = split_parts(&all, 90_000, true);
        assert_eq!(parts.len(), 5);
        assert!(parts.iter().all(|p| p.samples.len() == 5));
        assert!((parts[0].duration_ms - 200.0).abs() < 1e-9);
        assert!(parts[0].independent && !parts[1].independent);
        // Growing: 12 frames so far make two complete parts; the third is still open.
        let growing = split_parts(&all[..12], 90_000, false);
        assert_eq!(growing, parts[..2].to_vec());
        // Exactly at a boundary the open part is not yet known to be complete.
        assert_eq!(split_parts(&all[..10], 90_000, false).len(), 1);
        assert_eq!(split_parts(&all[..11], 90_000, false).len(), 2);
        // Parts never exceed the declared target, even at 24 fps.
        let film = samples(24, 3750, 24);
        assert!(split_parts(&film, 90_000, true)
            .iter()
            .all(|p| p.duration_ms <= PART_TARGET_MS as f64));
        assert!(split_parts(&[], 90_000, true).is_empty());
    }
}
