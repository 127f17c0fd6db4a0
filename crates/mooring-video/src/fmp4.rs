//! ISO BMFF writing: fragmented MP4 (CMAF-style init segments and `moof`+`mdat` media
//! segments, one track each, as HLS and DASH sessions serve them) and the progressive MP4 of
//! GetClip (`ftyp`, `moov` with complete sample tables, `mdat`).
//!
//! The box writer is written here rather than taken from a crate: the sample entries must
//! carry the producer's codec private data byte for byte (avcC, hvcC, the AudioSpecificConfig
//! inside esds), while the maintained encoders (`mp4`, `mp4-atom`) model those records as
//! parsed structures and re-encode them from fields, which loses extension data they do not
//! model; `mp4` also writes no fragments. The boxes needed are few and fixed.

use crate::packaging::{Codec, MediaTrack, Sample};

/// Appends a box: size, type, then what `body` writes.
fn boxed(out: &mut Vec<u8>, kind: &[u8; 4], body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(kind);
    body(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// A full box: version and flags first.
fn full(
    out: &mut Vec<u8>,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    boxed(out, kind, |b| {
        b.push(version);
        b.extend_from_slice(&flags.to_be_bytes()[1..]);
        body(b)
    });
}

fn u16be(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn u32be(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn u64be(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

const MATRIX: [u32; 9] = [0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x4000_0000];

fn ftyp(out: &mut Vec<u8>, major: &[u8; 4], compatible: &[&[u8; 4]]) {
    boxed(out, b"ftyp", |b| {
        b.extend_from_slice(major);
        u32be(b, 0x200);
        for c in compatible {
            b.extend_from_slice(*c);
        }
    });
}

fn mvhd(out: &mut Vec<u8>, duration_ms: u64, next_track: u32) {
    full(out, b"mvhd", 1, 0, |b| {
        u64be(b, 0);
        u64be(b, 0);
        u32be(b, 1000);
        u64be(b, duration_ms);
        u32be(b, 0x10000); // rate 1.0
        u16be(b, 0x100); // volume 1.0
        b.extend_from_slice(&[0; 10]);
        for m in MATRIX {
            u32be(b, m);
        }
        b.extend_from_slice(&[0; 24]);
        u32be(b, next_track);
    });
}

fn tkhd(out: &mut Vec<u8>, track: &MediaTrack, duration_ms: u64) {
    full(out, b"tkhd", 1, 7, |b| {
        u64be(b, 0);
        u64be(b, 0);
        u32be(b, track.number as u32);
        u32be(b, 0);
        u64be(b, duration_ms);
        b.extend_from_slice(&[0; 8]);
        u16be(b, 0); // layer
        u16be(b, u16::from(!track.codec.is_video())); // alternate group
        u16be(b, if track.codec.is_video() { 0 } else { 0x100 });
        u16be(b, 0);
        for m in MATRIX {
            u32be(b, m);
        }
        u32be(b, track.width << 16);
        u32be(b, track.height << 16);
    });
}

fn mdhd(out: &mut Vec<u8>, track: &MediaTrack, duration: u64) {
    full(out, b"mdhd", 1, 0, |b| {
        u64be(b, 0);
        u64be(b, 0);
        u32be(b, track.timescale);
        u64be(b, duration);
        u16be(b, 0x55C4); // "und"
        u16be(b, 0);
    });
}

fn hdlr(out: &mut Vec<u8>, video: bool) {
    full(out, b"hdlr", 0, 0, |b| {
        u32be(b, 0);
        b.extend_from_slice(if video { b"vide" } else { b"soun" });
        b.extend_from_slice(&[0; 12]);
        b.extend_from_slice(if video {
            b"VideoHandler\0"
        } else {
            b"SoundHandler\0"
        });
    });
}

/// The length field of an MPEG-4 descriptor (4-byte form).
fn descriptor(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    let n = body.len() as u32;
    out.extend_from_slice(&[
        0x80 | ((n >> 21) & 0x7F) as u8,
        0x80 | ((n >> 14) & 0x7F) as u8,
        0x80 | ((n >> 7) & 0x7F) as u8,
        (n & 0x7F) as u8,
    ]);
    out.extend_from_slice(body);
}

fn esds(out: &mut Vec<u8>, track: &MediaTrack) {
    full(out, b"esds", 0, 0, |b| {
        let mut dsi = Vec::new();
        descriptor(&mut dsi, 0x05, &track.codec_private);
        let mut dcd = vec![0x40, 0x15, 0, 0, 0];
        dcd.extend_from_slice(&0u32.to_be_bytes());
        dcd.extend_from_slice(&0u32.to_be_bytes());
        dcd.extend_from_slice(&dsi);
        let mut es = vec![0, track.number as u8, 0];
        descriptor(&mut es, 0x04, &dcd);
        descriptor(&mut es, 0x06, &[0x02]);
        descriptor(b, 0x03, &es);
    });
}

fn sample_entry(out: &mut Vec<u8>, track: &MediaTrack) {
    match track.codec {
        Codec::H264 | Codec::H265 => {
            let (kind, config) = if track.codec == Codec::H264 {
                (b"avc1", b"avcC")
            } else {
                (b"hvc1", b"hvcC")
            };
            boxed(out, kind, |b| {
                b.extend_from_slice(&[0; 6]);
                u16be(b, 1); // data reference index
                b.extend_from_slice(&[0; 16]);
                u16be(b, track.width as u16);
                u16be(b, track.height as u16);
                u32be(b, 0x0048_0000);
                u32be(b, 0x0048_0000);
                u32be(b, 0);
                u16be(b, 1); // frame count
                b.extend_from_slice(&[0; 32]); // compressor name
                u16be(b, 0x18);
                u16be(b, 0xFFFF);
                boxed(b, config, |c| c.extend_from_slice(&track.codec_private));
            });
        }
        Codec::Aac => {
            boxed(out, b"mp4a", |b| {
                b.extend_from_slice(&[0; 6]);
                u16be(b, 1);
                b.extend_from_slice(&[0; 8]);
                u16be(b, track.channels);
                u16be(b, 16);
                u32be(b, 0);
                u32be(b, track.sample_rate.min(0xFFFF) << 16);
                esds(b, track);
            });
        }
    }
}

/// Sample tables of a progressive file; empty for an init segment.
#[derive(Default)]
struct SampleTables<'a> {
    samples: &'a [Sample],
    offsets: Vec<u64>,
}

fn stbl(out: &mut Vec<u8>, track: &MediaTrack, tables: &SampleTables<'_>) {
    let samples = tables.samples;
    boxed(out, b"stbl", |b| {
        full(b, b"stsd", 0, 0, |d| {
            u32be(d, 1);
            sample_entry(d, track);
        });
        // stts: run-length durations.
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for s in samples {
            match runs.last_mut() {
                Some((count, d)) if *d == s.duration => *count += 1,
                _ => runs.push((1, s.duration)),
            }
        }
        full(b, b"stts", 0, 0, |d| {
            u32be(d, runs.len() as u32);
            for (count, dur) in &runs {
                u32be(d, *count);
                u32be(d, *dur);
            }
        });
        if samples.iter().any(|s| s.pts != s.dts) {
            full(b, b"ctts", 1, 0, |d| {
                u32be(d, samples.len() as u32);
                for s in samples {
                    u32be(d, 1);
                    u32be(d, (s.pts - s.dts) as i32 as u32);
                }
            });
        }
        if track.codec.is_video() && !samples.is_empty() {
            let sync: Vec<u32> = samples
                .iter()
                .enumerate()
                .filter(|(_, s)| s.keyframe)
                .map(|(i, _)| i as u32 + 1)
                .collect();
            full(b, b"stss", 0, 0, |d| {
                u32be(d, sync.len() as u32);
                for i in sync {
                    u32be(d, i);
                }
            });
        }
        full(b, b"stsc", 0, 0, |d| {
            if samples.is_empty() {
                u32be(d, 0);
            } else {
                u32be(d, 1);
                u32be(d, 1);
                u32be(d, 1);
                u32be(d, 1);
            }
        });
        full(b, b"stsz", 0, 0, |d| {
            u32be(d, 0);
            u32be(d, samples.len() as u32);
            for s in samples {
                u32be(d, s.data.len() as u32);
            }
        });
        full(b, b"co64", 0, 0, |d| {
            u32be(d, tables.offsets.len() as u32);
            for o in &tables.offsets {
                u64be(d, *o);
            }
        });
    });
}

fn trak(out: &mut Vec<u8>, track: &MediaTrack, tables: &SampleTables<'_>) {
    let duration: u64 = tables.samples.iter().map(|s| u64::from(s.duration)).sum();
    let duration_ms = duration * 1000 / u64::from(track.timescale.max(1));
    boxed(out, b"trak", |b| {
        tkhd(b, track, duration_ms);
        boxed(b, b"mdia", |m| {
            mdhd(m, track, duration);
            hdlr(m, track.codec.is_video());
            boxed(m, b"minf", |i| {
                if track.codec.is_video() {
                    full(i, b"vmhd", 0, 1, |v| v.extend_from_slice(&[0; 8]));
                } else {
                    full(i, b"smhd", 0, 0, |v| v.extend_from_slice(&[0; 4]));
                }
                boxed(i, b"dinf", |d| {
                    full(d, b"dref", 0, 0, |r| {
                        u32be(r, 1);
                        full(r, b"url ", 0, 1, |_| {});
                    });
                });
                stbl(i, track, tables);
            });
        });
    });
}

/// The init segment (`ftyp` + `moov` with `mvex`) of one track.
pub fn init_segment(track: &MediaTrack) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    ftyp(&mut out, b"iso6", &[b"iso6", b"cmfc", b"mp41"]);
    boxed(&mut out, b"moov", |b| {
        mvhd(b, 0, track.number as u32 + 1);
        trak(b, track, &SampleTables::default());
        boxed(b, b"mvex", |x| {
            full(x, b"trex", 0, 0, |t| {
                u32be(t, track.number as u32);
                u32be(t, 1);
                u32be(t, 0);
                u32be(t, 0);
                u32be(t, 0);
            });
        });
    });
    out
}

const SYNC_FLAGS: u32 = 0x0200_0000;
const NON_SYNC_FLAGS: u32 = 0x0101_0000;

/// A media segment (`moof` + `mdat`) of one track; `sequence` goes into `mfhd`.
pub fn media_segment(track: &MediaTrack, sequence: u32, samples: &[Sample]) -> Vec<u8> {
    let payload: usize = samples.iter().map(|s| s.data.len()).sum();
    let mut out = Vec::with_capacity(payload + 64 + samples.len() * 16);
    let first_dts = samples.first().map_or(0, |s| s.dts);
    let mut data_offset_at = 0;
    boxed(&mut out, b"moof", |m| {
        full(m, b"mfhd", 0, 0, |h| u32be(h, sequence));
        boxed(m, b"traf", |t| {
            full(t, b"tfhd", 0, 0x02_0000, |h| u32be(h, track.number as u32));
            full(t, b"tfdt", 1, 0, |h| u64be(h, first_dts.max(0) as u64));
            full(t, b"trun", 1, 0x000F01, |r| {
                u32be(r, samples.len() as u32);
                data_offset_at = r.len();
                u32be(r, 0);
                for s in samples {
                    u32be(r, s.duration);
                    u32be(r, s.data.len() as u32);
                    u32be(
                        r,
                        if s.keyframe {
                            SYNC_FLAGS
                        } else {
                            NON_SYNC_FLAGS
                        },
                    );
                    u32be(r, (s.pts - s.dts) as i32 as u32);
                }
            });
        });
    });
    let moof_len = out.len();
    let data_offset = (moof_len + 8) as u32;
    out[data_offset_at..data_offset_at + 4].copy_from_slice(&data_offset.to_be_bytes());
    u32be(&mut out, (payload + 8) as u32);
    out.extend_from_slice(b"mdat");
    for s in samples {
        out.extend_from_slice(&s.data);
    }
    out
}

/// A progressive MP4 of whole tracks: `ftyp`, `moov`, then one `mdat` with every sample
/// (one sample per chunk, 64-bit chunk offsets).
pub fn progressive_file(tracks: &[(MediaTrack, Vec<Sample>)]) -> Vec<u8> {
    let mut head = Vec::new();
    ftyp(&mut head, b"isom", &[b"isom", b"iso2", b"avc1", b"mp41"]);
    let build_moov = |offsets: &[Vec<u64>]| {
        let mut moov = Vec::new();
        let duration_ms = tracks
            .iter()
            .map(|(t, s)| {
                s.iter().map(|x| u64::from(x.duration)).sum::<u64>() * 1000
                    / u64::from(t.timescale.max(1))
            })
            .max()
            .unwrap_or(0);
        let next = tracks.iter().map(|(t, _)| t.number).max().unwrap_or(0) as u32 + 1;
        boxed(&mut moov, b"moov", |b| {
            mvhd(b, duration_ms, next);
            for ((track, samples), offs) in tracks.iter().zip(offsets) {
                trak(
                    b,
                    track,
                    &SampleTables {
                        samples,
                        offsets: offs.clone(),
                    },
                );
            }
        });
        moov
    };
    // The moov's size does not depend on the offset values (co64), so lay out once with
    // zeros, then with the real offsets.
    let zero: Vec<Vec<u64>> = tracks.iter().map(|(_, s)| vec![0; s.len()]).collect();
    let moov_len = build_moov(&zero).len();
    let payload: usize = tracks
        .iter()
        .map(|(_, s)| s.iter().map(|x| x.data.len()).sum::<usize>())
        .sum();
    let mdat_header = if payload + 8 > u32::MAX as usize {
        16
    } else {
        8
    };
    let mut at = (head.len() + moov_len + mdat_header) as u64;
    let mut offsets = Vec::new();
    for (_, samples) in tracks {
        let mut offs = Vec::with_capacity(samples.len());
        for s in samples {
            offs.push(at);
            at += s.data.len() as u64;
        }
        offsets.push(offs);
    }
    let moov = build_moov(&offsets);
    let mut out = head;
    out.extend_from_slice(&moov);
    if mdat_header == 16 {
        u32be(&mut out, 1);
        out.extend_from_slice(b"mdat");
        u64be(&mut out, (payload + 16) as u64);
    } else {
        u32be(&mut out, (payload + 8) as u32);
        out.extend_from_slice(b"mdat");
    }
    for (_, samples) in tracks {
        for s in samples {
            out.extend_from_slice(&s.data);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn video_track() -> MediaTrack {
        MediaTrack {
            number: 1,
            codec: Codec::H264,
            codec_private: Bytes::from_static(&[1, 0x42, 0xc0, 0x1e, 0xff, 0xe0, 0]),
            codec_string: "avc1.42c01e".into(),
            width: 320,
            height: 240,
            frame_rate: Some(25.0),
            sample_rate: 0,
            channels: 0,
            timescale: 90_000,
            default_duration_ns: Some(40_000_000),
            parameter_sets: vec![],
            nal_length_size: 4,
            aac: None,
        }
    }

    /// Walks top-level boxes: (type, size).
    fn boxes(data: &[u8]) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 8 <= data.len() {
            let size = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            out.push((
                String::from_utf8_lossy(&data[at + 4..at + 8]).into_owned(),
                size,
            ));
            assert!(size >= 8);
            at += size;
        }
        assert_eq!(at, data.len());
        out
    }

    #[test]
    fn segments_have_consistent_box_sizes_and_data_offset() {
        let track = video_track();
        let init = init_segment(&track);
        let kinds: Vec<_> = boxes(&init).into_iter().map(|b| b.0).collect();
        assert_eq!(kinds, ["ftyp", "moov"]);
        let samples = vec![
            Sample {
                dts: 90_000,
                pts: 90_000,
                duration: 3600,
                keyframe: true,
                data: Bytes::from_static(b"abcd"),
            },
            Sample {
                dts: 93_600,
                pts: 93_600,
                duration: 3600,
                keyframe: false,
                data: Bytes::from_static(b"ef"),
            },
        ];
        let seg = media_segment(&track, 7, &samples);
        let top = boxes(&seg);
        assert_eq!(top[0].0, "moof");
        assert_eq!(top[1], ("mdat".to_string(), 14));
        // trun's data offset points at the first sample byte.
        let pos = seg.windows(4).position(|w| w == b"trun").unwrap();
        let offset = u32::from_be_bytes(seg[pos + 12..pos + 16].try_into().unwrap()) as usize;
        assert_eq!(&seg[offset..offset + 4], b"abcd");
        let file = progressive_file(&[(track, samples)]);
        let kinds: Vec<_> = boxes(&file).into_iter().map(|b| b.0).collect();
        assert_eq!(kinds, ["ftyp", "moov", "mdat"]);
        let co64 = file.windows(4).position(|w| w == b"co64").unwrap();
        let first = u64::from_be_bytes(file[co64 + 12..co64 + 20].try_into().unwrap()) as usize;
        assert_eq!(&file[first..first + 6], b"abcdef");
    }
}
