//! The MPEG-DASH manifest of a session: one AdaptationSet per track, each a SegmentList
//! with a SegmentTimeline (one `S` per fragment, with `kvs:fn` / `kvs:ts` when the session
//! asked for DisplayFragmentNumber / DisplayFragmentTimestamp) and a SegmentURL per fragment
//! pointing at `getMP4MediaFragment.mp4`, plus the init segment. Media times are producer
//! time since the epoch (as in the fragments themselves), so a live (`dynamic`) manifest's availabilityStartTime is the epoch
//! and an ON_DEMAND (`static`) one uses presentationTimeOffset to start at zero.

use std::fmt::Write;

use crate::hls::{bandwidth, iso_millis};
use crate::model::seconds_text;
use crate::packaging::MediaFragment;
use crate::playback::Window;
use crate::session::Session;

/// The namespace of the `kvs:` attributes.
pub const KVS_NAMESPACE: &str = "https://kinesisvideo.amazonaws.com/dash";

/// Each fragment's duration on the manifest's timeline: up to where the next fragment starts
/// when the two overlap. A fragment's own duration runs to the end of its last frame, which
/// with B-frames (frames stored in decode order, and audio interleaved by decode time) can
/// pass the next fragment's start; a SegmentTimeline whose `t + d` overlaps the next `t`
/// makes players mis-place segments. A gap between fragments stays a gap.
fn timeline_durations(window: &Window) -> Vec<i64> {
    let fragments = &window.fragments;
    fragments
        .iter()
        .enumerate()
        .map(|(i, (m, _))| {
            let own = m.duration_ms.max(1);
            match fragments.get(i + 1) {
                Some((next, _)) if next.producer_ms > m.producer_ms => {
                    own.min(next.producer_ms - m.producer_ms)
                }
                _ => own,
            }
        })
        .collect()
}

fn duration_text(ms: i64) -> String {
    format!("PT{}.{:03}S", ms / 1000, ms % 1000)
}

/// The manifest's `BaseURL`: Mooring's base URL and the session resources' directory,
/// padded with `./` segments, which URL resolution removes (RFC 3986 section 5.2.4). The
/// padding is for ffmpeg's DASH demuxer, which sizes the buffer for segment URLs from the
/// manifest URL plus the BaseURL lengths: without a BaseURL a SegmentURL (~80 characters
/// longer than the manifest URL, for its FragmentNumber) is truncated for about a quarter
/// of token lengths, depending on the rounding of that size to 64.
fn base_url(endpoint: &str) -> String {
    format!(
        "{}/dash/v1/{}",
        endpoint.trim_end_matches('/'),
        "./".repeat(48)
    )
}

/// The manifest; `endpoint` is Mooring's base URL as the client reached it.
pub fn manifest(
    session: &Session,
    token: &str,
    media: &MediaFragment,
    window: &Window,
    now_ms: i64,
    endpoint: &str,
) -> String {
    let dynamic = !window.complete;
    let durations = timeline_durations(window);
    let total_ms: i64 = durations.iter().sum();
    let max_ms = durations.iter().copied().max().unwrap_or(1000).max(1);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = write!(
        out,
        "<MPD xmlns=\"urn:mpeg:dash:schema:mpd:2011\" xmlns:kvs=\"{KVS_NAMESPACE}\" profiles=\"urn:mpeg:dash:profile:isoff-live:2011\" minBufferTime=\"{}\" maxSegmentDuration=\"{}\"",
        duration_text(max_ms.max(2000)),
        duration_text(max_ms)
    );
    if dynamic {
        let _ = writeln!(
            out,
            " type=\"dynamic\" availabilityStartTime=\"1970-01-01T00:00:00Z\" publishTime=\"{}\" minimumUpdatePeriod=\"PT1S\" timeShiftBufferDepth=\"{}\" suggestedPresentationDelay=\"{}\">",
            iso_millis(now_ms),
            duration_text((total_ms + 1000).max(max_ms * 2)),
            duration_text(max_ms * 2)
        );
    } else {
        let _ = writeln!(
            out,
            " type=\"static\" mediaPresentationDuration=\"{}\">",
            duration_text(total_ms.max(1))
        );
    }
    let _ = writeln!(out, "  <BaseURL>{}</BaseURL>", base_url(endpoint));
    out.push_str("  <Period id=\"0\" start=\"PT0S\">\n");
    let bandwidth = bandwidth(window);
    for track in &media.tracks {
        let ts = i64::from(track.timescale);
        let to_ticks = |ms: i64| (i128::from(ms) * i128::from(ts) / 1000) as i64;
        let (kind, mime) = if track.codec.is_video() {
            ("video", "video/mp4")
        } else {
            ("audio", "audio/mp4")
        };
        let _ = writeln!(
            out,
            "    <AdaptationSet id=\"{}\" contentType=\"{kind}\" mimeType=\"{mime}\" segmentAlignment=\"true\" startWithSAP=\"1\">",
            track.number
        );
        let mut rep = format!(
            "      <Representation id=\"{}\" codecs=\"{}\" bandwidth=\"{}\"",
            track.number, track.codec_string, bandwidth
        );
        if track.codec.is_video() {
            if track.width > 0 {
                let _ = write!(
                    rep,
                    " width=\"{}\" height=\"{}\"",
                    track.width, track.height
                );
            }
            if let Some(rate) = track.frame_rate {
                let _ = write!(rep, " frameRate=\"{}\"", rate.round() as i64);
            }
        } else {
            let _ = write!(rep, " audioSamplingRate=\"{}\"", track.sample_rate);
        }
        rep.push_str(">\n");
        out.push_str(&rep);
        if !track.codec.is_video() {
            let _ = writeln!(
                out,
                "        <AudioChannelConfiguration schemeIdUri=\"urn:mpeg:dash:23003:3:audio_channel_configuration:2011\" value=\"{}\"/>",
                track.channels
            );
        }
        let offset = if dynamic {
            0
        } else {
            window
                .fragments
                .first()
                .map_or(0, |(m, _)| to_ticks(m.producer_ms))
        };
        let _ = writeln!(
            out,
            "        <SegmentList timescale=\"{ts}\" presentationTimeOffset=\"{offset}\">"
        );
        let _ = writeln!(
            out,
            "          <Initialization sourceURL=\"getMP4InitFragment.mp4?SessionToken={token}&amp;TrackNumber={}\"/>",
            track.number
        );
        out.push_str("          <SegmentTimeline>\n");
        for ((m, _), duration_ms) in window.fragments.iter().zip(&durations) {
            let start = session.start_of(m);
            let _ = write!(
                out,
                "            <S t=\"{}\" d=\"{}\"",
                to_ticks(m.producer_ms),
                // End minus start in ticks, so `t + d` is exactly the next `t`.
                to_ticks(m.producer_ms + duration_ms) - to_ticks(m.producer_ms)
            );
            if session.display_fragment_number {
                let _ = write!(out, " kvs:fn=\"{}\"", m.number());
            }
            if session.display_timestamp {
                let _ = write!(out, " kvs:ts=\"{}\"", seconds_text(start));
            }
            out.push_str("/>\n");
        }
        out.push_str("          </SegmentTimeline>\n");
        for (m, _) in &window.fragments {
            let _ = writeln!(
                out,
                "          <SegmentURL media=\"getMP4MediaFragment.mp4?FragmentNumber={}&amp;SessionToken={token}&amp;TrackNumber={}\"/>",
                m.number(),
                track.number
            );
        }
        out.push_str("        </SegmentList>\n      </Representation>\n    </AdaptationSet>\n");
    }
    out.push_str("  </Period>\n</MPD>\n");
    out
}
