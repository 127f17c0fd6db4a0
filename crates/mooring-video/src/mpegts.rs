//! MPEG-TS segments for HLS sessions with `ContainerFormat=MPEG_TS`: each segment is
//! self-contained (PAT, PMT, then the fragment's frames as PES packets interleaved by decode
//! time), H.264 in Annex-B with an access unit delimiter and SPS/PPS before every key frame,
//! AAC as ADTS frames built from the AudioSpecificConfig. The first packet of each PID sets the
//! discontinuity indicator, since continuity counters restart in every segment.
//!
//! Written here: the `mpeg2ts` crate writes packets but leaves PES framing, PCR and ADTS to
//! the caller, which is most of this module; H.265 is not carried over TS (KVS refuses it too).

use crate::packaging::{nal_units, Codec, MediaTrack, Sample};

const PACKET: usize = 188;
const PMT_PID: u16 = 0x1000;
const VIDEO_PID: u16 = 0x100;
const AUDIO_PID: u16 = 0x101;

fn crc32_mpeg(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

struct Writer {
    out: Vec<u8>,
    counters: [(u16, u8); 4],
}

impl Writer {
    fn counter(&mut self, pid: u16) -> (u8, bool) {
        for slot in self.counters.iter_mut() {
            if slot.0 == pid {
                let c = slot.1;
                slot.1 = (c + 1) & 0x0F;
                return (c, false);
            }
        }
        for slot in self.counters.iter_mut() {
            if slot.0 == 0xFFFF {
                *slot = (pid, 1);
                return (0, true);
            }
        }
        (0, false)
    }

    /// Writes `payload` as TS packets of `pid`; `pcr` (27 MHz) goes in the first packet.
    fn packets(&mut self, pid: u16, payload: &[u8], pcr: Option<u64>) {
        let mut at = 0;
        let mut first = true;
        while first || at < payload.len() {
            let (cc, discontinuity) = self.counter(pid);
            let mut adaptation: Vec<u8> = Vec::new();
            let mut flags = 0u8;
            if discontinuity {
                flags |= 0x80;
            }
            if first && pcr.is_some() {
                flags |= 0x10;
            }
            if flags != 0 {
                adaptation.push(flags);
                if let (true, Some(pcr)) = (first, pcr) {
                    let base = (pcr / 300) & 0x1_FFFF_FFFF;
                    let ext = (pcr % 300) as u16;
                    adaptation.extend_from_slice(&[
                        (base >> 25) as u8,
                        (base >> 17) as u8,
                        (base >> 9) as u8,
                        (base >> 1) as u8,
                        (((base & 1) << 7) as u8) | 0x7E | ((ext >> 8) as u8 & 1),
                        ext as u8,
                    ]);
                }
            }
            let header_len = 4 + if adaptation.is_empty() {
                0
            } else {
                1 + adaptation.len()
            };
            let room = PACKET - header_len;
            let remaining = payload.len() - at;
            let take = remaining.min(room);
            let mut stuffing = room - take;
            if stuffing > 0 && adaptation.is_empty() {
                // Need an adaptation field to pad; its length byte takes one byte.
                stuffing -= 1;
                if stuffing > 0 {
                    adaptation.push(0);
                    stuffing -= 1;
                }
                adaptation.extend(std::iter::repeat_n(0xFF, stuffing));
                self.write_header(pid, first, cc, Some(&adaptation));
            } else {
                adaptation.extend(std::iter::repeat_n(0xFF, stuffing));
                self.write_header(
                    pid,
                    first,
                    cc,
                    (!adaptation.is_empty()).then_some(&adaptation[..]),
                );
            }
            self.out.extend_from_slice(&payload[at..at + take]);
            at += take;
            first = false;
        }
    }

    fn write_header(&mut self, pid: u16, start: bool, cc: u8, adaptation: Option<&[u8]>) {
        self.out.push(0x47);
        self.out
            .push(((pid >> 8) as u8 & 0x1F) | if start { 0x40 } else { 0 });
        self.out.push(pid as u8);
        let control = if adaptation.is_some() { 0x30 } else { 0x10 };
        self.out.push(control | cc);
        if let Some(a) = adaptation {
            self.out.push(a.len() as u8);
            self.out.extend_from_slice(a);
        }
    }

    fn section(&mut self, pid: u16, table_id: u8, body: &[u8]) {
        let mut section = vec![table_id];
        let len = body.len() + 5 + 4;
        section.push(0xB0 | ((len >> 8) as u8 & 0x0F));
        section.push(len as u8);
        section.extend_from_slice(&[0x00, 0x01, 0xC1, 0x00, 0x00]);
        section.extend_from_slice(body);
        let crc = crc32_mpeg(&section);
        section.extend_from_slice(&crc.to_be_bytes());
        let mut payload = vec![0u8]; // pointer field
        payload.extend_from_slice(&section);
        self.packets(pid, &payload, None);
    }
}

fn timestamp(marker: u8, t: u64) -> [u8; 5] {
    let t = t & 0x1_FFFF_FFFF;
    [
        (marker << 4) | (((t >> 30) as u8 & 0x07) << 1) | 1,
        (t >> 22) as u8,
        (((t >> 15) as u8 & 0x7F) << 1) | 1,
        (t >> 7) as u8,
        ((t as u8 & 0x7F) << 1) | 1,
    ]
}

fn pes(stream_id: u8, pts: u64, dts: Option<u64>, data: &[u8], bounded: bool) -> Vec<u8> {
    let mut header = Vec::with_capacity(19);
    match dts {
        Some(d) if d != pts => {
            header.extend_from_slice(&[0x80, 0xC0, 10]);
            header.extend_from_slice(&timestamp(3, pts));
            header.extend_from_slice(&timestamp(1, d));
        }
        _ => {
            header.extend_from_slice(&[0x80, 0x80, 5]);
            header.extend_from_slice(&timestamp(2, pts));
        }
    }
    let len = header.len() + data.len();
    let mut out = vec![0, 0, 1, stream_id];
    let field = if bounded && len <= 0xFFFF {
        len as u16
    } else {
        0
    };
    out.extend_from_slice(&field.to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out
}

fn ticks_90k(t: i64, timescale: u32) -> u64 {
    (i128::from(t) * 90_000 / i128::from(timescale.max(1))).max(0) as u64
}

fn annex_b_access_unit(track: &MediaTrack, sample: &Sample) -> Vec<u8> {
    let mut out = Vec::with_capacity(sample.data.len() + 64);
    out.extend_from_slice(&[0, 0, 0, 1, 0x09, 0xF0]);
    let nals = nal_units(&sample.data, 4).unwrap_or_default();
    let has_sps = nals
        .iter()
        .any(|n| n.first().is_some_and(|b| b & 0x1F == 7));
    if sample.keyframe && !has_sps {
        for set in &track.parameter_sets {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(set);
        }
    }
    for nal in nals {
        if nal.first().is_some_and(|b| b & 0x1F == 9) {
            continue;
        }
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
    }
    out
}

fn adts_frame(track: &MediaTrack, frame: &[u8]) -> Vec<u8> {
    let (aot, index, channels) = track.aac.unwrap_or((2, 4, 2));
    let len = frame.len() + 7;
    let profile = aot.saturating_sub(1) & 3;
    let mut out = vec![
        0xFF,
        0xF1,
        (profile << 6) | ((index & 0x0F) << 2) | ((channels >> 2) & 1),
        ((channels & 3) << 6) | ((len >> 11) as u8 & 3),
        (len >> 3) as u8,
        (((len & 7) as u8) << 5) | 0x1F,
        0xFC,
    ];
    out.extend_from_slice(frame);
    out
}

/// Whether a track can be carried in MPEG-TS.
pub fn supports(track: &MediaTrack) -> bool {
    matches!(track.codec, Codec::H264 | Codec::Aac)
}

/// One TS segment of the given tracks and their samples.
pub fn segment(tracks: &[(MediaTrack, Vec<Sample>)]) -> Vec<u8> {
    let mut w = Writer {
        out: Vec::with_capacity(
            tracks
                .iter()
                .map(|(_, s)| s.iter().map(|x| x.data.len()).sum::<usize>())
                .sum::<usize>()
                * 11
                / 10
                + 4 * PACKET,
        ),
        counters: [(0xFFFF, 0); 4],
    };
    let pid_of = |t: &MediaTrack| {
        if t.codec.is_video() {
            VIDEO_PID
        } else {
            AUDIO_PID
        }
    };
    let pcr_pid = tracks
        .iter()
        .map(|(t, _)| pid_of(t))
        .min()
        .unwrap_or(VIDEO_PID);
    // PAT
    let mut pat = Vec::new();
    pat.extend_from_slice(&[0x00, 0x01]);
    pat.extend_from_slice(&(0xE000 | PMT_PID).to_be_bytes());
    w.section(0, 0x00, &pat);
    // PMT
    let mut pmt = Vec::new();
    pmt.extend_from_slice(&(0xE000 | pcr_pid).to_be_bytes());
    pmt.extend_from_slice(&[0xF0, 0x00]);
    for (t, _) in tracks {
        let stream_type = if t.codec.is_video() { 0x1B } else { 0x0F };
        pmt.push(stream_type);
        pmt.extend_from_slice(&(0xE000 | pid_of(t)).to_be_bytes());
        pmt.extend_from_slice(&[0xF0, 0x00]);
    }
    w.section(PMT_PID, 0x02, &pmt);
    // Frames of all tracks by decode time.
    let mut order: Vec<(u64, usize, usize)> = Vec::new();
    for (ti, (t, samples)) in tracks.iter().enumerate() {
        for (si, s) in samples.iter().enumerate() {
            order.push((ticks_90k(s.dts, t.timescale), ti, si));
        }
    }
    order.sort();
    for (dts, ti, si) in order {
        let (track, samples) = &tracks[ti];
        let sample = &samples[si];
        let pid = pid_of(track);
        let pts = ticks_90k(sample.pts, track.timescale);
        if track.codec.is_video() {
            let au = annex_b_access_unit(track, sample);
            let packet = pes(0xE0, pts, Some(dts), &au, false);
            let pcr = (pid == pcr_pid).then(|| dts.saturating_sub(9000) * 300);
            w.packets(pid, &packet, pcr);
        } else {
            let frame = adts_frame(track, &sample.data);
            let packet = pes(0xC0, pts, None, &frame, true);
            let pcr = (pid == pcr_pid).then(|| pts.saturating_sub(9000) * 300);
            w.packets(pid, &packet, pcr);
        }
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn packets_are_188_bytes_with_sync_bytes() {
        let track = MediaTrack {
            number: 1,
            codec: Codec::H264,
            codec_private: Bytes::new(),
            codec_string: String::new(),
            width: 16,
            height: 16,
            frame_rate: None,
            sample_rate: 0,
            channels: 0,
            timescale: 90_000,
            default_duration_ns: None,
            parameter_sets: vec![Bytes::from_static(&[0x67, 1, 2, 3])],
            nal_length_size: 4,
            aac: None,
        };
        let mut data = vec![0, 0, 1, 44, 0x65];
        data.extend(std::iter::repeat_n(7u8, 299));
        let samples = vec![Sample {
            dts: 900_000,
            pts: 903_600,
            duration: 3600,
            keyframe: true,
            data: Bytes::from(data),
        }];
        let ts = segment(&[(track, samples)]);
        assert_eq!(ts.len() % PACKET, 0);
        assert!(ts.chunks(PACKET).all(|p| p[0] == 0x47));
        assert_eq!(crc32_mpeg(b"123456789"), 0x0376_E6E7);
    }
}
