//! HLS playlists of a session, in the shape KVS serves them: a master playlist with the
//! codecs string taken from the codec private data (`avc1.PPCCLL` from the SPS bytes),
//! resolution, frame rate, bandwidth and, for fMP4, an audio rendition on track 2; media
//! playlists (`#EXT-X-VERSION:7` for fMP4, 3 for MPEG-TS) with `#EXT-X-MAP`, discontinuity
//! tags per the session's DiscontinuityMode, `#EXT-X-PROGRAM-DATE-TIME` when asked, and
//! `#EXT-X-PLAYLIST-TYPE:VOD` / `#EXT-X-ENDLIST` for ON_DEMAND.

use std::fmt::Write;

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
) -> String {
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
                "#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"audio\",NAME=\"Audio\",DEFAULT=YES,AUTOSELECT=YES,URI=\"getHLSMediaPlaylist.m3u8?SessionToken={token}&TrackNumber={}\"",
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
            "getHLSMediaPlaylist.m3u8?SessionToken={token}&TrackNumber={first_track}"
        );
    } else {
        let _ = writeln!(out, "getHLSMediaPlaylist.m3u8?SessionToken={token}");
    }
    out
}

/// A media playlist: one track of fMP4, or the muxed MPEG-TS playlist.
pub fn media_playlist(session: &Session, token: &str, track: u64, window: &Window) -> String {
    let fmp4 = session.container == Container::FragmentedMp4;
    let mut out = String::from("#EXTM3U\n");
    let _ = writeln!(out, "#EXT-X-VERSION:{}", if fmp4 { 7 } else { 3 });
    let target = window
        .fragments
        .iter()
        .map(|(m, _)| (m.duration_ms.max(1) + 999) / 1000)
        .max()
        .unwrap_or(1)
        .max(1);
    let _ = writeln!(out, "#EXT-X-TARGETDURATION:{target}");
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
    if window.complete {
        out.push_str("#EXT-X-ENDLIST\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_date_time_has_milliseconds() {
        assert_eq!(iso_millis(1_684_331_315_994), "2023-05-17T13:48:35.994Z");
    }
}
