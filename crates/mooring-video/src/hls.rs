//! HLS playlists of a session, in the shape KVS serves them: a master playlist with the
//! codecs string taken from the codec private data (`avc1.PPCCLL` from the SPS bytes),
//! resolution, frame rate, bandwidth and, for fMP4, an audio rendition on track 2; media
//! playlists (`#EXT-X-VERSION:7` for fMP4, 3 for MPEG-TS) with `#EXT-X-MAP`, discontinuity
//! tags per the session's DiscontinuityMode, `#EXT-X-PROGRAM-DATE-TIME` when asked, and
//! `#EXT-X-PLAYLIST-TYPE:VOD` / `#EXT-X-ENDLIST` for ON_DEMAND. Low-latency media playlists
//! (a Mooring option, see [`crate::low_latency`]) add partial segments to the same layout.

use std::fmt::Write;

use crate::low_latency::{self, Part};
use crate::packaging::{Codec, MediaFragment};
use crate::playback::Window;
use crate::session::{Container, PlaybackMode, Session};

/// ISO-8601 UTC with milliseconds (`2023-05-17T13:48:35.994Z`).
pub fn iso_millis(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Peak bits per second over the window's fragments (a fixed guess when empty).
pub fn bandwidth(window: &Window) -> u64 {
    window
        .fragments
        .iter()
        .map(|(m, _)| (m.size.max(0) as u64) * 8 * 1000 / (m.duration_ms.max(1) as u64))
        .max()
        .unwrap_or(1_000_000)
        .max(1)
}

/// The master playlist.
pub fn master_playlist(
    session: &Session,
    token: &str,
    media: &MediaFragment,
    window: &Window,
    low_latency: bool,
) -> String {
    let ll = if low_latency {
        format!("&{}=ON", low_latency::QUERY_PARAMETER)
    } else {
        String::new()
    };
    let mut out = String::from("#EXTM3U\n");
    let fmp4 = session.container == Container::FragmentedMp4;
    let _ = writeln!(out, "#EXT-X-VERSION:{}", if fmp4 { 7 } else { 3 });
    out.push_str("#EXT-X-INDEPENDENT-SEGMENTS\n");
    let codecs: Vec<&str> = media
        .tracks
        .iter()
        .map(|t| t.codec_string.as_str())
        .collect();
    let video = media.video();
    let audio_rendition = fmp4 && video.is_some() && media.tracks.len() > 1;
    if audio_rendition {
        if let Some(audio) = media.tracks.iter().find(|t| t.codec == Codec::Aac) {
            let _ = writeln!(
                out,
                "#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"audio\",NAME=\"Audio\",DEFAULT=YES,AUTOSELECT=YES,URI=\"getHLSMediaPlaylist.m3u8?SessionToken={token}&TrackNumber={}{ll}\"",
                audio.number
            );
        }
    }
    let mut inf = format!(
        "#EXT-X-STREAM-INF:BANDWIDTH={},CODECS=\"{}\"",
        bandwidth(window),
        codecs.join(",")
    );
    if let Some(v) = video {
        if v.width > 0 && v.height > 0 {
            let _ = write!(inf, ",RESOLUTION={}x{}", v.width, v.height);
        }
        if let Some(rate) = v.frame_rate {
            let _ = write!(inf, ",FRAME-RATE={rate:.3}");
        }
    }
    if audio_rendition {
        inf.push_str(",AUDIO=\"audio\"");
    }
    out.push_str(&inf);
    out.push('\n');
    let first_track = media.tracks.first().map_or(1, |t| t.number);
    if fmp4 {
        let _ = writeln!(
            out,
            "getHLSMediaPlaylist.m3u8?SessionToken={token}&TrackNumber={first_track}{ll}"
        );
    } else {
        let _ = writeln!(out, "getHLSMediaPlaylist.m3u8?SessionToken={token}{ll}");
    }
    out
}

/// The partial segments of a low-latency media playlist.
#[derive(Debug, Clone, Default)]
pub struct PartialSegments {
    /// Parts of the window's newest complete fragments, by fragment sequence.
    pub complete: Vec<(i64, Vec<Part>)>,
    /// The fragment still being received, after the window's last.
    pub growing: Option<GrowingFragment>,
}

/// The fragment still being received, as a low-latency playlist lists it.
#[derive(Debug, Clone)]
pub struct GrowingFragment {
    pub seq: i64,
    pub media_sequence: u64,
    pub discontinuity: bool,
    /// Its start on the session's clock.
    pub start_ms: i64,
    /// Its complete parts so far.
    pub parts: Vec<Part>,
}

/// `#EXT-X-TARGETDURATION` of a window: its longest fragment rounded to the nearest whole
/// second (RFC 8216 section 4.3.3.1), so 1 s GOPs whose fragments run a few milliseconds
/// over (B-frames, interleaved audio) keep a target of 1 and players their 3 s hold-back.
pub fn target_duration(window: &Window) -> i64 {
    window
        .fragments
        .iter()
        .map(|(m, _)| (m.duration_ms.max(1) + 500) / 1000)
        .max()
        .unwrap_or(1)
        .max(1)
}

fn part_line(out: &mut String, token: &str, track: u64, seq: i64, index: usize, part: &Part) {
    let _ = writeln!(
        out,
        "#EXT-X-PART:DURATION={:.5},URI=\"getMP4MediaPart.mp4?FragmentNumber={}&PartNumber={index}&SessionToken={token}&TrackNumber={track}\"{}",
        part.duration_ms / 1000.0,
        crate::model::fragment_number(seq),
        if part.independent { ",INDEPENDENT=YES" } else { "" }
    );
}

/// A media playlist: one track of fMP4, or the muxed MPEG-TS playlist.
pub fn media_playlist(session: &Session, token: &str, track: u64, window: &Window) -> String {
    render_media_playlist(session, token, track, window, None)
}

/// A low-latency media playlist (LIVE fMP4): the media playlist with partial segments.
pub fn low_latency_playlist(
    session: &Session,
    token: &str,
    track: u64,
    window: &Window,
    parts: &PartialSegments,
) -> String {
    render_media_playlist(session, token, track, window, Some(parts))
}

fn render_media_playlist(
    session: &Session,
    token: &str,
    track: u64,
    window: &Window,
    parts: Option<&PartialSegments>,
) -> String {
    let fmp4 = session.container == Container::FragmentedMp4;
    let mut out = String::from("#EXTM3U\n");
    let version = match (parts.is_some(), fmp4) {
        (true, _) => 9,
        (false, true) => 7,
        (false, false) => 3,
    };
    let _ = writeln!(out, "#EXT-X-VERSION:{version}");
    let target = target_duration(window);
    let _ = writeln!(out, "#EXT-X-TARGETDURATION:{target}");
    if parts.is_none() && session.mode == PlaybackMode::Live {
        // Beyond KVS: a LIVE playlist may be reloaded with `_HLS_msn` (blocking reload), so
        // a player learns of each new fragment when it is persisted instead of at its next
        // poll, up to a target duration later. Players without LL-HLS support ignore it.
        out.push_str("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES\n");
    }
    if parts.is_some() {
        let _ = writeln!(
            out,
            "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={:.3}",
            low_latency::PART_HOLD_BACK_MS as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "#EXT-X-PART-INF:PART-TARGET={:.3}",
            low_latency::PART_TARGET_MS as f64 / 1000.0
        );
    }
    let (first_sequence, first_disc) = window.fragments.first().map_or((0, 0), |(_, n)| {
        (n.media_sequence, n.discontinuities_before)
    });
    let _ = writeln!(out, "#EXT-X-MEDIA-SEQUENCE:{first_sequence}");
    if first_disc > 0 {
        let _ = writeln!(out, "#EXT-X-DISCONTINUITY-SEQUENCE:{first_disc}");
    }
    out.push_str("#EXT-X-INDEPENDENT-SEGMENTS\n");
    if session.mode == PlaybackMode::OnDemand {
        out.push_str("#EXT-X-PLAYLIST-TYPE:VOD\n");
    }
    if fmp4 {
        let _ = writeln!(
            out,
            "#EXT-X-MAP:URI=\"getMP4InitFragment.mp4?SessionToken={token}&TrackNumber={track}\""
        );
    }
    for (i, (m, n)) in window.fragments.iter().enumerate() {
        if i > 0 && n.discontinuity {
            out.push_str("#EXT-X-DISCONTINUITY\n");
        }
        if session.display_timestamp {
            let _ = writeln!(
                out,
                "#EXT-X-PROGRAM-DATE-TIME:{}",
                iso_millis(session.start_of(m))
            );
        }
        if let Some(listed) = parts.and_then(|p| p.complete.iter().find(|(seq, _)| *seq == m.seq)) {
            for (index, part) in listed.1.iter().enumerate() {
                part_line(&mut out, token, track, m.seq, index, part);
            }
        }
        let _ = writeln!(out, "#EXTINF:{:.3},", m.duration_ms as f64 / 1000.0);
        if fmp4 {
            let _ = writeln!(
                out,
                "getMP4MediaFragment.mp4?FragmentNumber={}&SessionToken={token}&TrackNumber={track}",
                m.number()
            );
        } else {
            let _ = writeln!(
                out,
                "getTSFragment.ts?FragmentNumber={}&SessionToken={token}",
                m.number()
            );
        }
    }
    let hint = |out: &mut String, seq: i64, part: usize| {
        let _ = writeln!(
            out,
            "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"getMP4MediaPart.mp4?FragmentNumber={}&PartNumber={part}&SessionToken={token}&TrackNumber={track}\"",
            crate::model::fragment_number(seq),
        );
    };
    if let Some(growing) = parts.and_then(|p| p.growing.as_ref()) {
        if growing.discontinuity && !window.fragments.is_empty() {
            out.push_str("#EXT-X-DISCONTINUITY\n");
        }
        if session.display_timestamp {
            let _ = writeln!(
                out,
                "#EXT-X-PROGRAM-DATE-TIME:{}",
                iso_millis(growing.start_ms)
            );
        }
        for (index, part) in growing.parts.iter().enumerate() {
            part_line(&mut out, token, track, growing.seq, index, part);
        }
        hint(&mut out, growing.seq, growing.parts.len());
    } else if let (Some(_), Some((last, _))) = (parts, window.fragments.last()) {
        // Between fragments: the next one's first part (numbers usually follow on). A
        // low-latency playlist always ends with a hint; hls.js reads one that ends with a
        // segment as if that segment were still growing.
        hint(&mut out, last.seq + 1, 0);
    }
    if window.complete {
        out.push_str("#EXT-X-ENDLIST\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(seq: i64) -> crate::model::FragmentMeta {
        crate::model::FragmentMeta {
            seq,
            timecode: seq * 1000,
            producer_ms: seq * 1000,
            server_ms: seq * 1000,
            duration_ms: 1000,
            size: 1000,
            tags: Vec::new(),
        }
    }

    fn part(independent: bool) -> Part {
        Part {
            samples: 0..5,
            duration_ms: 200.0,
            independent,
        }
    }

    #[test]
    fn low_latency_playlists_list_parts_before_their_segment_and_hint_the_next() {
        let session = Session {
            id: "s".into(),
            kind: "hls".into(),
            stream_arn: "arn".into(),
            mode: PlaybackMode::Live,
            producer_clock: false,
            start_ms: None,
            end_ms: None,
            container: Container::FragmentedMp4,
            discontinuity: crate::session::Discontinuity::Never,
            display_timestamp: false,
            display_fragment_number: false,
            max_fragments: 5,
            created_ms: 0,
            expires_ms: 1,
            low_latency: false,
        };
        let numbered = |n| crate::playback::Numbered {
            media_sequence: n,
            discontinuities_before: 0,
            discontinuity: false,
        };
        let window = Window {
            fragments: vec![(meta(7), numbered(3)), (meta(8), numbered(4))],
            complete: false,
        };
        let parts = PartialSegments {
            complete: vec![(8, vec![part(true), part(false)])],
            growing: Some(GrowingFragment {
                seq: 9,
                media_sequence: 5,
                discontinuity: false,
                start_ms: 9000,
                parts: vec![part(true)],
            }),
        };
        let text = low_latency_playlist(&session, "T", 1, &window, &parts);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "#EXT-X-VERSION:9");
        assert!(lines.contains(&"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.750"));
        assert!(lines.contains(&"#EXT-X-PART-INF:PART-TARGET=0.250"));
        assert!(lines.contains(&"#EXT-X-MEDIA-SEQUENCE:3"));
        let uri = |seq: i64, part: usize| {
            format!(
                "getMP4MediaPart.mp4?FragmentNumber={}&PartNumber={part}&SessionToken=T&TrackNumber=1",
                crate::model::fragment_number(seq)
            )
        };
        let at = lines
            .iter()
            .position(|l| {
                l.starts_with("getMP4MediaFragment.mp4?FragmentNumber=")
                    && l.contains(&crate::model::fragment_number(8))
            })
            .unwrap();
        assert_eq!(
            &lines[at - 3..at],
            &[
                format!(
                    "#EXT-X-PART:DURATION=0.20000,URI=\"{}\",INDEPENDENT=YES",
                    uri(8, 0)
                )
                .as_str(),
                format!("#EXT-X-PART:DURATION=0.20000,URI=\"{}\"", uri(8, 1)).as_str(),
                "#EXTINF:1.000,",
            ]
        );
        assert_eq!(
            &lines[at + 1..],
            &[
                format!(
                    "#EXT-X-PART:DURATION=0.20000,URI=\"{}\",INDEPENDENT=YES",
                    uri(9, 0)
                )
                .as_str(),
                format!("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{}\"", uri(9, 1)).as_str(),
            ]
        );
        // Between fragments the playlist still ends with a hint: the next fragment's first part.
        let between = PartialSegments {
            complete: parts.complete.clone(),
            growing: None,
        };
        let text_between = low_latency_playlist(&session, "T", 1, &window, &between);
        assert_eq!(
            text_between.lines().last().unwrap(),
            format!("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{}\"", uri(9, 0))
        );
        // The fragment before the newest ones keeps its plain listing.
        assert_eq!(text.matches("#EXT-X-PART:").count(), 3);
        // A plain playlist of the same window has none of it.
        let plain = media_playlist(&session, "T", 1, &window);
        assert!(
            !plain.contains("EXT-X-PART")
                && !plain.contains("PRELOAD")
                && plain.contains("#EXT-X-VERSION:7")
        );
    }

    #[test]
    fn program_date_time_has_milliseconds() {
        assert_eq!(iso_millis(1_684_331_315_994), "2023-05-17T13:48:35.994Z");
    }
}
