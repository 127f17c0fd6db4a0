//! What the playback packagers (HLS, DASH, GetClip, GetImages) need from a stored fragment:
//! its tracks with the codec facts players ask for (RFC 6381 codec strings, resolution,
//! sample rate) and its frames as timed samples.
//!
//! Tracks come from the fragment's document header (the producer's Tracks element); the
//! codec private data is checked the way KVS checks it when it packages media: H.264 needs an
//! AVCDecoderConfigurationRecord, H.265 an HEVCDecoderConfigurationRecord, AAC an
//! AudioSpecificConfig. Video samples come out length-prefixed (4-byte lengths), converting
//! Annex-B frames that some producers send. Sample times are in the track's timescale on an
//! absolute clock (the fragment's producer timestamp plus the frame's offset in the cluster),
//! so fragments of one stream line up even when they arrived faster than real time.

use bytes::Bytes;

use crate::ebml;
use crate::fragments::StoredFragment;
use crate::mkv::{
    self, ID_CODEC_ID, ID_CODEC_PRIVATE, ID_DEFAULT_DURATION, ID_INFO, ID_TIMECODE_SCALE,
    ID_TRACKS, ID_TRACK_ENTRY, ID_TRACK_NUMBER, ID_TRACK_TYPE,
};
use crate::model::{ErrorKind, VideoError, VideoResult};

const ID_VIDEO: u32 = 0xE0;
const ID_PIXEL_WIDTH: u32 = 0xB0;
const ID_PIXEL_HEIGHT: u32 = 0xBA;
const ID_AUDIO: u32 = 0xE1;
const ID_SAMPLING_FREQUENCY: u32 = 0xB5;
const ID_CHANNELS: u32 = 0x9F;

/// Video timescale (ticks per second) of packaged tracks.
pub const VIDEO_TIMESCALE: u32 = 90_000;

/// The codecs playback packaging supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    H264,
    H265,
    Aac,
}

impl Codec {
    pub fn is_video(self) -> bool {
        matches!(self, Codec::H264 | Codec::H265)
    }
}

/// A track as the packagers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaTrack {
    pub number: u64,
    pub codec: Codec,
    /// avcC / hvcC / AudioSpecificConfig exactly as the producer sent it.
    pub codec_private: Bytes,
    /// RFC 6381 codec string (`avc1.42c01e`, `hvc1.1.6.L93.B0`, `mp4a.40.2`).
    pub codec_string: String,
    pub width: u32,
    pub height: u32,
    /// Frames per second from the track's DefaultDuration, when declared.
    pub frame_rate: Option<f64>,
    pub sample_rate: u32,
    pub channels: u16,
    /// Ticks per second of this track's sample times.
    pub timescale: u32,
    /// Nanoseconds per frame, when declared.
    pub default_duration_ns: Option<u64>,
    /// H.264 SPS and PPS NAL units (for MPEG-TS, which carries them in band).
    pub parameter_sets: Vec<Bytes>,
    /// NAL length size of the producer's samples (1, 2 or 4).
    pub nal_length_size: usize,
    /// AAC: audio object type, sampling frequency index, channel configuration.
    pub aac: Option<(u8, u8, u8)>,
}

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Decode time in track ticks.
    pub dts: i64,
    /// Presentation time in track ticks.
    pub pts: i64,
    pub duration: u32,
    pub keyframe: bool,
    /// Video: 4-byte length-prefixed NAL units. Audio: one raw AAC frame.
    pub data: Bytes,
}

/// The fragment's document: timecode scale and raw track entries.
struct RawTrack {
    number: u64,
    track_type: u64,
    codec_id: String,
    codec_private: Bytes,
    default_duration_ns: Option<u64>,
    width: u32,
    height: u32,
    sampling_frequency: f64,
    channels: u16,
}

fn codec_error(kind: ErrorKind, message: impl Into<String>) -> VideoError {
    VideoError::new(kind, message)
}

fn corrupt(e: impl std::fmt::Display) -> VideoError {
    VideoError::new(
        ErrorKind::InvalidMediaFrame,
        format!("stored fragment cannot be read: {e}"),
    )
}

fn raw_tracks(prefix: &[u8]) -> VideoResult<(u64, Vec<RawTrack>)> {
    let mut scale = 1_000_000;
    let mut tracks = Vec::new();
    for element in ebml::children(prefix) {
        let (id, data) = element.map_err(corrupt)?;
        if id == ID_INFO {
            for child in ebml::children(data) {
                let (cid, cdata) = child.map_err(corrupt)?;
                if cid == ID_TIMECODE_SCALE {
                    scale = ebml::read_uint(cdata).map_err(corrupt)?;
                }
            }
        }
        if id != ID_TRACKS {
            continue;
        }
        for entry in ebml::children(data) {
            let (eid, edata) = entry.map_err(corrupt)?;
            if eid != ID_TRACK_ENTRY {
                continue;
            }
            let mut t = RawTrack {
                number: 0,
                track_type: 0,
                codec_id: String::new(),
                codec_private: Bytes::new(),
                default_duration_ns: None,
                width: 0,
                height: 0,
                sampling_frequency: 0.0,
                channels: 0,
            };
            for field in ebml::children(edata) {
                let (fid, v) = field.map_err(corrupt)?;
                match fid {
                    ID_TRACK_NUMBER => t.number = ebml::read_uint(v).map_err(corrupt)?,
                    ID_TRACK_TYPE => t.track_type = ebml::read_uint(v).map_err(corrupt)?,
                    ID_CODEC_ID => t.codec_id = ebml::read_string(v),
                    ID_CODEC_PRIVATE => t.codec_private = Bytes::copy_from_slice(v),
                    ID_DEFAULT_DURATION => {
                        t.default_duration_ns = Some(ebml::read_uint(v).map_err(corrupt)?)
                    }
                    ID_VIDEO | ID_AUDIO => {
                        for sub in ebml::children(v) {
                            let (sid, sv) = sub.map_err(corrupt)?;
                            match sid {
                                ID_PIXEL_WIDTH => {
                                    t.width = ebml::read_uint(sv).map_err(corrupt)? as u32
                                }
                                ID_PIXEL_HEIGHT => {
                                    t.height = ebml::read_uint(sv).map_err(corrupt)? as u32
                                }
                                ID_SAMPLING_FREQUENCY => {
                                    t.sampling_frequency = ebml::read_float(sv).map_err(corrupt)?
                                }
                                ID_CHANNELS => {
                                    t.channels = ebml::read_uint(sv).map_err(corrupt)? as u16
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            tracks.push(t);
        }
    }
    Ok((scale.max(1), tracks))
}

const AAC_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// Audio object type, frequency index, sample rate and channel configuration of an
/// AudioSpecificConfig.
pub fn parse_audio_specific_config(asc: &[u8]) -> Option<(u8, u8, u32, u8)> {
    let mut bits = BitReader::new(asc);
    let mut aot = bits.read(5)? as u8;
    if aot == 31 {
        aot = 32 + bits.read(6)? as u8;
    }
    let index = bits.read(4)? as u8;
    let rate = if index == 15 {
        bits.read(24)?
    } else {
        *AAC_RATES.get(index as usize)?
    };
    let channels = bits.read(4)? as u8;
    Some((aot, index, rate, channels))
}

/// An MSB-first bit reader.
pub struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        BitReader { data, pos: 0 }
    }

    pub fn read(&mut self, n: usize) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self.data.get(self.pos / 8)?;
            v = (v << 1) | u32::from((byte >> (7 - self.pos % 8)) & 1);
            self.pos += 1;
        }
        Some(v)
    }
}

/// SPS and PPS of an AVCDecoderConfigurationRecord, and its NAL length size.
fn parse_avcc(avcc: &[u8]) -> Option<(usize, Vec<Bytes>)> {
    if avcc.len() < 7 || avcc[0] != 1 {
        return None;
    }
    let length_size = usize::from(avcc[4] & 3) + 1;
    let mut sets = Vec::new();
    let mut at = 5;
    for mask in [0x1Fu8, 0xFF] {
        let count = usize::from(*avcc.get(at)? & mask);
        at += 1;
        for _ in 0..count {
            let len = usize::from(u16::from_be_bytes([*avcc.get(at)?, *avcc.get(at + 1)?]));
            at += 2;
            sets.push(Bytes::copy_from_slice(avcc.get(at..at + len)?));
            at += len;
        }
    }
    (sets.first().is_some_and(|s| s.len() >= 4)).then_some((length_size, sets))
}

/// The RFC 6381 string of an HEVCDecoderConfigurationRecord.
fn hevc_codec_string(hvcc: &[u8]) -> Option<String> {
    if hvcc.len() < 23 || hvcc[0] != 1 {
        return None;
    }
    let space = ["", "A", "B", "C"][usize::from(hvcc[1] >> 6)];
    let tier = if hvcc[1] & 0x20 != 0 { "H" } else { "L" };
    let profile = hvcc[1] & 0x1F;
    let compat = u32::from_be_bytes([hvcc[2], hvcc[3], hvcc[4], hvcc[5]]).reverse_bits();
    let mut s = format!(
        "hvc1.{space}{profile}.{compat:X}.{tier}{}",
        hvcc[12] // general_level_idc
    );
    let constraints = &hvcc[6..12];
    let last = constraints.iter().rposition(|b| *b != 0);
    if let Some(last) = last {
        for b in &constraints[..=last] {
            s.push_str(&format!(".{b:X}"));
        }
    } else {
        s.push_str(".B0");
    }
    Some(s)
}

/// The NAL length size of an hvcC record.
fn hvcc_length_size(hvcc: &[u8]) -> usize {
    usize::from(hvcc[21] & 3) + 1
}

/// The parameter sets (VPS, SPS, PPS, SEI: every NAL unit in its arrays, in order) of an hvcC
/// record; `None` when the arrays run past the record.
fn hvcc_parameter_sets(hvcc: &Bytes) -> Option<Vec<Bytes>> {
    let mut at = 23;
    let arrays = *hvcc.get(22)?;
    let mut sets = Vec::new();
    for _ in 0..arrays {
        let count = u16::from_be_bytes([*hvcc.get(at + 1)?, *hvcc.get(at + 2)?]);
        at += 3;
        for _ in 0..count {
            let len = usize::from(u16::from_be_bytes([*hvcc.get(at)?, *hvcc.get(at + 1)?]));
            at += 2;
            if at + len > hvcc.len() {
                return None;
            }
            sets.push(hvcc.slice(at..at + len));
            at += len;
        }
    }
    Some(sets)
}

fn media_track(raw: RawTrack) -> VideoResult<MediaTrack> {
    let frame_rate = raw
        .default_duration_ns
        .filter(|d| *d > 0)
        .map(|d| 1e9 / d as f64);
    let mut track = MediaTrack {
        number: raw.number,
        codec: Codec::H264,
        codec_private: raw.codec_private.clone(),
        codec_string: String::new(),
        width: raw.width,
        height: raw.height,
        frame_rate,
        sample_rate: 0,
        channels: raw.channels,
        timescale: VIDEO_TIMESCALE,
        default_duration_ns: raw.default_duration_ns,
        parameter_sets: Vec::new(),
        nal_length_size: 4,
        aac: None,
    };
    let missing = || {
        codec_error(
            ErrorKind::MissingCodecPrivateData,
            format!("No codec private data found for track {}", raw.number),
        )
    };
    let invalid = |what: &str| {
        codec_error(
            ErrorKind::InvalidCodecPrivateData,
            format!(
                "The codec private data of track {} is not a valid {what}",
                raw.number
            ),
        )
    };
    match raw.codec_id.as_str() {
        "V_MPEG4/ISO/AVC" | "V_MPEG/ISO/AVC" => {
            if raw.codec_private.is_empty() {
                return Err(missing());
            }
            let (length_size, sets) = parse_avcc(&raw.codec_private)
                .ok_or_else(|| invalid("AVCDecoderConfigurationRecord"))?;
            let sps = &sets[0];
            track.codec_string = format!("avc1.{:02x}{:02x}{:02x}", sps[1], sps[2], sps[3]);
            track.nal_length_size = length_size;
            track.parameter_sets = sets;
        }
        "V_MPEGH/ISO/HEVC" => {
            if raw.codec_private.is_empty() {
                return Err(missing());
            }
            track.codec = Codec::H265;
            track.codec_string = hevc_codec_string(&raw.codec_private)
                .ok_or_else(|| invalid("HEVCDecoderConfigurationRecord"))?;
            track.nal_length_size = hvcc_length_size(&raw.codec_private);
            track.parameter_sets = hvcc_parameter_sets(&raw.codec_private)
                .ok_or_else(|| invalid("HEVCDecoderConfigurationRecord"))?;
        }
        "A_AAC" | "A_AAC/MPEG4/LC" | "A_AAC/MPEG2/LC" => {
            if raw.codec_private.is_empty() {
                return Err(missing());
            }
            let (aot, index, rate, channels) = parse_audio_specific_config(&raw.codec_private)
                .ok_or_else(|| invalid("AudioSpecificConfig"))?;
            track.codec = Codec::Aac;
            track.codec_string = format!("mp4a.40.{aot}");
            track.sample_rate = if rate > 0 {
                rate
            } else {
                raw.sampling_frequency as u32
            };
            track.channels = if channels > 0 {
                u16::from(channels)
            } else {
                raw.channels.max(1)
            };
            track.timescale = track.sample_rate.max(1);
            track.aac = Some((aot, index, channels));
        }
        other => {
            return Err(codec_error(
                ErrorKind::UnsupportedStreamMediaType,
                format!(
                    "Track {} has codec {other}; playback supports V_MPEG4/ISO/AVC, V_MPEGH/ISO/HEVC and A_AAC",
                    raw.number
                ),
            ))
        }
    }
    Ok(track)
}

/// A stored fragment opened for packaging.
pub struct MediaFragment {
    pub tracks: Vec<MediaTrack>,
    /// Nanoseconds per cluster tick.
    pub timecode_scale: u64,
    pub fragment: std::sync::Arc<StoredFragment>,
}

impl MediaFragment {
    /// Opens a fragment, checking its tracks: track 1 video (H.264/H.265) or AAC, at most
    /// one more AAC track.
    pub fn open(fragment: std::sync::Arc<StoredFragment>) -> VideoResult<MediaFragment> {
        let (scale, raw) = raw_tracks(&fragment.segment_prefix)?;
        if raw.is_empty() {
            return Err(codec_error(
                ErrorKind::UnsupportedStreamMediaType,
                "The fragment has no tracks",
            ));
        }
        let unsupported_layout =
            raw.len() > 2 || (raw.len() == 2 && (raw[0].track_type != 1 || raw[1].track_type != 2));
        if unsupported_layout {
            return Err(codec_error(
                ErrorKind::UnsupportedStreamMediaType,
                "Playback supports track 1 video (or audio only) and an optional track 2 audio",
            ));
        }
        let tracks = raw
            .into_iter()
            .map(media_track)
            .collect::<VideoResult<Vec<_>>>()?;
        if tracks.len() == 2 && (!tracks[0].codec.is_video() || tracks[1].codec != Codec::Aac) {
            return Err(codec_error(
                ErrorKind::UnsupportedStreamMediaType,
                "Track 2 must be AAC audio after a video track",
            ));
        }
        Ok(MediaFragment {
            tracks,
            timecode_scale: scale,
            fragment,
        })
    }

    pub fn track(&self, number: u64) -> Option<&MediaTrack> {
        self.tracks.iter().find(|t| t.number == number)
    }

    pub fn video(&self) -> Option<&MediaTrack> {
        self.tracks.iter().find(|t| t.codec.is_video())
    }

    /// The samples of one track, with times on the clock that starts at `start_ms`
    /// (the fragment's server or producer timestamp).
    pub fn samples(&self, track: &MediaTrack, start_ms: i64) -> VideoResult<Vec<Sample>> {
        let cluster = &self.fragment.cluster;
        let header = ebml::read_header(cluster)
            .map_err(corrupt)?
            .ok_or_else(|| corrupt("truncated cluster"))?;
        let body = &cluster[header.header_len..];
        let cluster_tc = self.fragment.meta.timecode;
        let blocks = mkv::cluster_blocks(cluster_tc, body).map_err(corrupt)?;
        let ts = i128::from(track.timescale);
        let base = i128::from(start_ms) * ts / 1000;
        let mut out: Vec<Sample> = Vec::new();
        for block in blocks.iter().filter(|b| b.track == track.number) {
            let flags = body[block.data_offset - 1];
            if flags & 0x06 != 0 {
                return Err(VideoError::new(
                    ErrorKind::InvalidMediaFrame,
                    "laced blocks are not supported for playback",
                ));
            }
            let payload = &body[block.data_offset..block.data_offset + block.data_len];
            let rel_ns = i128::from(block.timecode - cluster_tc) * i128::from(self.timecode_scale);
            let pts = (base + rel_ns * ts / 1_000_000_000) as i64;
            let data = if track.codec.is_video() {
                length_prefixed(payload, track.nal_length_size)?
            } else {
                Bytes::copy_from_slice(payload)
            };
            out.push(Sample {
                dts: pts,
                pts,
                duration: 0,
                keyframe: block.keyframe || !track.codec.is_video(),
                data,
            });
        }
        // MKV stores presentation times; decode times are the sorted presentation times
        // in decode (block) order.
        let mut sorted: Vec<i64> = out.iter().map(|s| s.pts).collect();
        sorted.sort_unstable();
        for (s, dts) in out.iter_mut().zip(&sorted) {
            s.dts = *dts;
        }
        let default = match (track.default_duration_ns, track.codec) {
            (_, Codec::Aac) => 1024,
            (Some(ns), _) if ns > 0 => (i128::from(ns) * ts / 1_000_000_000) as i64,
            _ => i64::from(track.timescale) / 25,
        };
        let n = out.len();
        for i in 0..n {
            let d = if i + 1 < n {
                out[i + 1].dts - out[i].dts
            } else if n > 1 {
                (out[n - 1].dts - out[0].dts) / (n as i64 - 1)
            } else {
                default
            };
            out[i].duration = d.clamp(1, u32::MAX as i64) as u32;
        }
        Ok(out)
    }
}

/// A video frame as 4-byte length-prefixed NAL units, from length-prefixed samples of any
/// length size or from Annex-B.
pub fn length_prefixed(payload: &[u8], length_size: usize) -> VideoResult<Bytes> {
    let nals = nal_units(payload, length_size)?;
    let mut out = Vec::with_capacity(payload.len() + nals.len() * 4);
    for nal in nals {
        out.extend_from_slice(&(nal.len() as u32).to_be_bytes());
        out.extend_from_slice(nal);
    }
    Ok(Bytes::from(out))
}

fn is_annex_b(payload: &[u8]) -> bool {
    payload.starts_with(&[0, 0, 0, 1]) || payload.starts_with(&[0, 0, 1])
}

/// The NAL units of a frame: length-prefixed when that parse consumes the frame exactly,
/// else Annex-B (a 4-byte length below 512 also starts with `00 00 01`, so the start code
/// alone does not decide).
pub fn nal_units(payload: &[u8], length_size: usize) -> VideoResult<Vec<&[u8]>> {
    if let Some(nals) = length_prefixed_units(payload, length_size) {
        return Ok(nals);
    }
    if is_annex_b(payload) {
        return Ok(annex_b_units(payload));
    }
    Err(VideoError::new(
        ErrorKind::InvalidMediaFrame,
        "malformed video frame",
    ))
}

fn length_prefixed_units(payload: &[u8], length_size: usize) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let mut len = 0usize;
        for b in payload.get(at..at + length_size)? {
            len = (len << 8) | usize::from(*b);
        }
        at += length_size;
        if len == 0 || at + len > payload.len() {
            return None;
        }
        out.push(&payload[at..at + len]);
        at += len;
    }
    Some(out)
}

fn annex_b_units(payload: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= payload.len() {
        if payload[i] == 0 && payload[i + 1] == 0 && payload[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    for (k, &(_, data_start)) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(payload.len(), |s| s.0);
        while end > data_start && payload[end - 1] == 0 {
            end -= 1;
        }
        if end > data_start {
            out.push(&payload[data_start..end]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_specific_config_and_codec_strings() {
        // AAC LC, 44.1 kHz, stereo.
        assert_eq!(
            parse_audio_specific_config(&[0x12, 0x10]),
            Some((2, 4, 44100, 2))
        );
        let avcc = [
            1, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x64, 0, 0x1f, 1, 0, 2, 0x68, 0xee,
        ];
        let (len, sets) = parse_avcc(&avcc).unwrap();
        assert_eq!(len, 4);
        assert_eq!(sets.len(), 2);
        assert!(parse_avcc(&[1, 2, 3]).is_none());
    }

    #[test]
    fn annex_b_and_length_prefixed_frames_normalise() {
        let annex_b = [0, 0, 0, 1, 0x65, 1, 2, 0, 0, 1, 0x41, 3];
        let out = length_prefixed(&annex_b, 4).unwrap();
        assert_eq!(&out[..], &[0, 0, 0, 3, 0x65, 1, 2, 0, 0, 0, 2, 0x41, 3]);
        // A 4-byte length of 0x1xx begins like a start code; it is still length-prefixed.
        let mut long = vec![0, 0, 1, 0];
        long.extend(std::iter::repeat_n(0x41u8, 256));
        assert_eq!(length_prefixed(&long, 4).unwrap().len(), 260);
        let two_byte = [0, 2, 0x65, 9];
        assert_eq!(
            &length_prefixed(&two_byte, 2).unwrap()[..],
            &[0, 0, 0, 2, 0x65, 9]
        );
        assert!(length_prefixed(&[0, 9, 1], 2).is_err());
    }

    #[test]
    fn random_frames_never_panic() {
        let mut seed = 0x1234_5678u64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                data.push((seed >> 33) as u8);
            }
            let _ = length_prefixed(&data, 1 + (seed % 4) as usize);
            let _ = parse_audio_specific_config(&data);
            let _ = parse_avcc(&data);
            let _ = hevc_codec_string(&data);
            let _ = raw_tracks(&data);
        }
    }
}
