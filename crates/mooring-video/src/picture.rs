//! Still pictures from stored video, for GetImages and image generation: H.264 frames are
//! decoded with OpenH264 and H.265 frames with libde265 (both built from their bundled
//! sources) from the nearest preceding keyframe to the frames asked for, converted to RGB,
//! optionally scaled, and encoded as JPEG or PNG with the `image` crate.
//!
//! Frames are fed in decode order; the decoder hands pictures back in display order, so the
//! n-th picture out is the frame with the n-th smallest presentation time among the frames
//! fed. Anything the decoder refuses (damaged or truncated frames, other codecs) is an error
//! for the frames concerned, never a panic.

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::imageops::FilterType;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use libde265_rs::{Channel, ChromaFormat, DeError, DecodeResult};
use openh264::decoder::{DecodedYUV, Decoder, DecoderConfig, Flush};
use openh264::formats::YUVSource;
use openh264::OpenH264API;

use crate::packaging::{nal_units, Codec, MediaTrack, Sample};

/// A decoded frame in 8-bit RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture(pub RgbImage);

/// Why a frame gave no picture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PictureError(pub String);

fn fail(message: impl Into<String>) -> PictureError {
    PictureError(message.into())
}

/// The encoding of an output image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// JPEG at a quality of 1–100.
    Jpeg {
        quality: u8,
    },
    Png,
}

impl ImageFormat {
    /// The file extension KVS uses for the format.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg { .. } => "jpg",
            ImageFormat::Png => "png",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Jpeg { .. } => "image/jpeg",
            ImageFormat::Png => "image/png",
        }
    }
}

/// The output size for a picture of `width` x `height`: both requested dimensions stretch
/// the picture, one alone keeps the aspect ratio, none keeps the original size.
pub fn output_size(
    width: u32,
    height: u32,
    want_width: Option<u32>,
    want_height: Option<u32>,
) -> (u32, u32) {
    let scaled = |num: u32, from: u32, to: u32| -> u32 {
        let value = (u64::from(num) * u64::from(to) + u64::from(from) / 2) / u64::from(from.max(1));
        value.clamp(1, u64::from(u32::MAX)) as u32
    };
    match (want_width, want_height) {
        (Some(w), Some(h)) => (w, h),
        (Some(w), None) => (w, scaled(height, width, w)),
        (None, Some(h)) => (scaled(width, height, h), h),
        (None, None) => (width, height),
    }
}

/// Scales a picture (when asked) and encodes it.
pub fn encode(
    picture: &Picture,
    format: ImageFormat,
    want_width: Option<u32>,
    want_height: Option<u32>,
) -> Result<Vec<u8>, PictureError> {
    let (width, height) = output_size(
        picture.0.width(),
        picture.0.height(),
        want_width,
        want_height,
    );
    let scaled;
    let image = if (width, height) == picture.0.dimensions() {
        &picture.0
    } else {
        scaled = image::imageops::resize(&picture.0, width, height, FilterType::Triangle);
        &scaled
    };
    let mut out = Vec::new();
    let result = match format {
        ImageFormat::Jpeg { quality } => JpegEncoder::new_with_quality(
            &mut out,
            quality.clamp(1, 100),
        )
        .write_image(image.as_raw(), width, height, ExtendedColorType::Rgb8),
        ImageFormat::Png => PngEncoder::new(&mut out).write_image(
            image.as_raw(),
            width,
            height,
            ExtendedColorType::Rgb8,
        ),
    };
    result.map_err(|e| fail(format!("the picture could not be encoded: {e}")))?;
    Ok(out)
}

/// An Annex-B access unit from a sample's length-prefixed NAL units.
fn annex_b(sample: &Sample, length_size: usize) -> Result<Vec<u8>, PictureError> {
    let units = nal_units(&sample.data, length_size).map_err(|e| fail(e.message))?;
    let mut out = Vec::with_capacity(sample.data.len() + 4);
    for unit in units {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(unit);
    }
    Ok(out)
}

fn to_picture(yuv: &DecodedYUV<'_>) -> Result<Picture, PictureError> {
    let (width, height) = yuv.dimensions();
    if width == 0 || height == 0 {
        return Err(fail("the decoder returned an empty picture"));
    }
    let mut rgb = vec![0u8; width * height * 3];
    yuv.write_rgb8(&mut rgb);
    RgbImage::from_raw(width as u32, height as u32, rgb)
        .map(Picture)
        .ok_or_else(|| fail("the decoded picture has an unexpected size"))
}

/// Decodes the frames at `targets` (indexes into `samples`, which are one track's frames in
/// decode order) and returns one result per target, in the order of `targets`.
///
/// Decoding starts at the last keyframe at or before the earliest target and runs to the
/// latest target; each target is the picture whose rank in display order among the frames
/// fed equals the rank of its presentation time.
pub fn decode_frames(
    track: &MediaTrack,
    samples: &[Sample],
    targets: &[usize],
) -> Vec<Result<Picture, PictureError>> {
    let all_fail = |e: PictureError| targets.iter().map(|_| Err(e.clone())).collect();
    if !matches!(track.codec, Codec::H264 | Codec::H265) {
        return all_fail(fail(format!(
            "{} video cannot be decoded to a picture",
            track.codec_string
        )));
    }
    let (Some(&first), Some(&last)) = (targets.iter().min(), targets.iter().max()) else {
        return Vec::new();
    };
    if last >= samples.len() {
        return all_fail(fail("the frame does not exist"));
    }
    let Some(start) = (0..=first).rev().find(|&i| samples[i].keyframe) else {
        return all_fail(fail("no keyframe precedes the frame"));
    };
    // Display-order rank of every fed frame; targets by rank.
    let mut display: Vec<usize> = (start..=last).collect();
    display.sort_by_key(|&i| (samples[i].pts, i));
    let mut wanted = Wanted {
        by_rank: vec![Vec::new(); display.len()],
        pts_by_rank: display.iter().map(|&i| samples[i].pts).collect(),
        output: 0,
        results: vec![None; targets.len()],
    };
    for (slot, &target) in targets.iter().enumerate() {
        if let Some(rank) = display.iter().position(|&i| i == target) {
            wanted.by_rank[rank].push(slot);
        }
    }
    let fed = &samples[start..=last];
    let outcome = match track.codec {
        Codec::H265 => decode_h265(track, fed, &mut wanted),
        _ => decode_h264(track, fed, &mut wanted),
    };
    let missing = outcome
        .err()
        .unwrap_or_else(|| fail("the decoder gave no picture for the frame"));
    wanted
        .results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(missing.clone())))
        .collect()
}

/// The frames asked for, by their rank among the pictures a decoder hands out.
struct Wanted {
    /// For each display-order rank, the result slots that want that picture.
    by_rank: Vec<Vec<usize>>,
    /// The presentation time of each display-order rank.
    pts_by_rank: Vec<i64>,
    /// Pictures handed out so far.
    output: usize,
    results: Vec<Option<Result<Picture, PictureError>>>,
}

impl Wanted {
    /// Takes the next picture in display order, converting it only when it is wanted.
    fn next(&mut self, convert: impl FnOnce() -> Result<Picture, PictureError>) {
        self.take(self.output, convert);
        self.output += 1;
    }

    /// Takes the picture of the frame presented at `pts` (a decoder that carries each
    /// frame's time through to its picture), converting it only when it is wanted.
    fn at_pts(&mut self, pts: i64, convert: impl FnOnce() -> Result<Picture, PictureError>) {
        if let Some(rank) = self.pts_by_rank.iter().position(|&p| p == pts) {
            self.take(rank, convert);
        }
    }

    fn take(&mut self, rank: usize, convert: impl FnOnce() -> Result<Picture, PictureError>) {
        if let Some(slots) = self.by_rank.get(rank).filter(|s| !s.is_empty()) {
            let picture = convert();
            for &slot in slots {
                self.results[slot] = Some(picture.clone());
            }
        }
    }
}

/// Feeds `samples` (from a keyframe, decode order) to OpenH264; an error ends decoding.
fn decode_h264(
    track: &MediaTrack,
    samples: &[Sample],
    wanted: &mut Wanted,
) -> Result<(), PictureError> {
    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| fail(format!("the H.264 decoder did not start: {e}")))?;
    let mut parameter_sets = Vec::new();
    for set in &track.parameter_sets {
        parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
        parameter_sets.extend_from_slice(set);
    }
    if !parameter_sets.is_empty() {
        decoder
            .decode(&parameter_sets)
            .map_err(|e| fail(format!("the parameter sets do not decode: {e}")))?;
    }
    for sample in samples {
        let access_unit = annex_b(sample, track.nal_length_size)?;
        match decoder.decode(&access_unit) {
            Ok(Some(yuv)) => wanted.next(|| to_picture(&yuv)),
            Ok(None) => {}
            Err(e) => return Err(fail(format!("the frame does not decode: {e}"))),
        }
    }
    let pictures = decoder
        .flush_remaining()
        .map_err(|e| fail(format!("the decoder could not finish: {e}")))?;
    for yuv in &pictures {
        wanted.next(|| to_picture(yuv));
    }
    Ok(())
}

/// Feeds `samples` (from a keyframe, decode order) to libde265, NAL unit by NAL unit after
/// the hvcC's parameter sets, each frame's units with its presentation time, which its
/// picture carries out; an error ends decoding.
fn decode_h265(
    track: &MediaTrack,
    samples: &[Sample],
    wanted: &mut Wanted,
) -> Result<(), PictureError> {
    let (mut input, mut output) = libde265_rs::new_decoder()
        .map_err(|e| fail(format!("the H.265 decoder did not start: {e}")))?;
    let refused = |e: DeError| fail(format!("the frame does not decode: {e}"));
    for set in &track.parameter_sets {
        input.push_nal(set, 0, 0).map_err(refused)?;
    }
    for sample in samples {
        let units = nal_units(&sample.data, track.nal_length_size).map_err(|e| fail(e.message))?;
        for unit in units {
            input.push_nal(unit, sample.pts, 0).map_err(refused)?;
        }
        input.push_end_of_frame();
        run_h265(&mut input, &mut output, wanted)?;
    }
    input.flush_data().map_err(refused)?;
    run_h265(&mut input, &mut output, wanted)
}

/// Decodes what libde265 has been given, handing out the pictures it completes.
fn run_h265(
    input: &mut libde265_rs::DecoderInput,
    output: &mut libde265_rs::DecoderOutput,
    wanted: &mut Wanted,
) -> Result<(), PictureError> {
    // Each step decodes at least a slice; a bound keeps a decoder that claims more work
    // forever from spinning.
    for _ in 0..100_000 {
        let step = input.decode();
        while let Some(image) = output.next_picture() {
            wanted.at_pts(image.pts(), || hevc_picture(&image));
        }
        match step {
            Ok(DecodeResult::CallAgain)
            | Err(DeError::ErrorImageBufferFull)
            | Err(DeError::ErrorCannotProcessSei) => {}
            Ok(DecodeResult::Done) | Err(DeError::ErrorWaitingForInputData) => return Ok(()),
            Err(e) => return Err(fail(format!("the frame does not decode: {e}"))),
        }
    }
    Err(fail("the H.265 decoder did not finish"))
}

/// An 8-bit 4:2:0 libde265 picture in RGB (BT.601, limited or full range as signalled).
fn hevc_picture(image: &libde265_rs::Image<'_>) -> Result<Picture, PictureError> {
    if image.chroma_format() != ChromaFormat::C420
        || [Channel::Y, Channel::Cb, Channel::Cr]
            .iter()
            .any(|&c| image.bits_per_pixel(c) != 8)
    {
        return Err(fail(
            "only 8-bit 4:2:0 H.265 pictures are converted to images",
        ));
    }
    let (width, height) = (image.width(Channel::Y), image.height(Channel::Y));
    if width == 0 || height == 0 {
        return Err(fail("the decoder returned an empty picture"));
    }
    let (y, y_stride) = image.plane(Channel::Y);
    let (cb, cb_stride) = image.plane(Channel::Cb);
    let (cr, cr_stride) = image.plane(Channel::Cr);
    let full = image.full_range();
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for row in 0..height as usize {
        for col in 0..width as usize {
            let sample = |plane: &[u8], stride: usize, r: usize, c: usize| -> Option<f32> {
                plane.get(r * stride + c).map(|&v| f32::from(v))
            };
            let (Some(luma), Some(blue), Some(red)) = (
                sample(y, y_stride, row, col),
                sample(cb, cb_stride, row / 2, col / 2),
                sample(cr, cr_stride, row / 2, col / 2),
            ) else {
                return Err(fail("the decoded picture has an unexpected size"));
            };
            let (luma, blue, red) = if full {
                (luma, blue - 128.0, red - 128.0)
            } else {
                (
                    (luma - 16.0) * 255.0 / 219.0,
                    (blue - 128.0) * 255.0 / 224.0,
                    (red - 128.0) * 255.0 / 224.0,
                )
            };
            let clamp = |v: f32| v.round().clamp(0.0, 255.0) as u8;
            rgb.push(clamp(luma + 1.402 * red));
            rgb.push(clamp(luma - 0.344_136 * blue - 0.714_136 * red));
            rgb.push(clamp(luma + 1.772 * blue));
        }
    }
    RgbImage::from_raw(width, height, rgb)
        .map(Picture)
        .ok_or_else(|| fail("the decoded picture has an unexpected size"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
    use openh264::encoder::Encoder;
    use openh264::formats::{RgbSliceU8, YUVBuffer};

    /// A test track: H.264 frames of `width` x `height` whose whole picture is `colours[i]`,
    /// with a keyframe every `gop` frames, 25 fps. Returns the track (with its parameter
    /// sets and avcC) and the samples in decode order.
    pub fn encoded(
        width: usize,
        height: usize,
        colours: &[[u8; 3]],
        gop: usize,
    ) -> (MediaTrack, Vec<Sample>) {
        let mut encoder = Encoder::new().unwrap();
        let mut sets: Vec<Bytes> = Vec::new();
        let mut samples = Vec::new();
        for (i, colour) in colours.iter().enumerate() {
            let rgb: Vec<u8> = colour
                .iter()
                .copied()
                .cycle()
                .take(width * height * 3)
                .collect();
            let yuv = YUVBuffer::from_rgb8_source(RgbSliceU8::new(&rgb, (width, height)));
            if i % gop == 0 {
                encoder.force_intra_frame();
            }
            let mut bits = Vec::new();
            encoder.encode(&yuv).unwrap().write_vec(&mut bits);
            let mut frame = Vec::new();
            let mut keyframe = false;
            for unit in nal_units(&bits, 4).unwrap() {
                match unit[0] & 0x1F {
                    7 | 8 => {
                        if !sets.iter().any(|s| s[..] == unit[..]) {
                            sets.push(Bytes::copy_from_slice(unit));
                        }
                    }
                    kind => {
                        keyframe |= kind == 5;
                        frame.extend_from_slice(&(unit.len() as u32).to_be_bytes());
                        frame.extend_from_slice(unit);
                    }
                }
            }
            let pts = i as i64 * 3600;
            samples.push(Sample {
                dts: pts,
                pts,
                duration: 3600,
                keyframe,
                data: Bytes::from(frame),
            });
        }
        let sps = sets.iter().find(|s| s[0] & 0x1F == 7).unwrap().clone();
        let pps = sets.iter().find(|s| s[0] & 0x1F == 8).unwrap().clone();
        let mut avcc = vec![1, sps[1], sps[2], sps[3], 0xFF, 0xE1];
        avcc.extend_from_slice(&(sps.len() as u16).to_be_bytes());
        avcc.extend_from_slice(&sps);
        avcc.push(1);
        avcc.extend_from_slice(&(pps.len() as u16).to_be_bytes());
        avcc.extend_from_slice(&pps);
        let track = MediaTrack {
            number: 1,
            codec: Codec::H264,
            codec_private: Bytes::from(avcc),
            codec_string: format!("avc1.{:02x}{:02x}{:02x}", sps[1], sps[2], sps[3]),
            width: width as u32,
            height: height as u32,
            frame_rate: Some(25.0),
            sample_rate: 0,
            channels: 0,
            timescale: 90_000,
            default_duration_ns: Some(40_000_000),
            parameter_sets: vec![sps, pps],
            nal_length_size: 4,
            aac: None,
        };
        (track, samples)
    }

    fn close(a: [u8; 3], b: [u8; 3]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 24)
    }

    fn centre(p: &Picture) -> [u8; 3] {
        p.0.get_pixel(p.0.width() / 2, p.0.height() / 2).0
    }

    const RED: [u8; 3] = [220, 20, 20];
    const GREEN: [u8; 3] = [20, 200, 20];
    const BLUE: [u8; 3] = [20, 20, 220];

    #[test]
    fn the_frames_asked_for_decode_to_their_colours() {
        let colours = [RED, GREEN, BLUE, RED, GREEN, BLUE];
        let (track, samples) = encoded(64, 48, &colours, 3);
        assert!(samples[0].keyframe && samples[3].keyframe && !samples[4].keyframe);
        let results = decode_frames(&track, &samples, &[4, 0, 2, 4]);
        let got: Vec<[u8; 3]> = results
            .iter()
            .map(|r| centre(r.as_ref().unwrap()))
            .collect();
        assert!(close(got[0], GREEN), "{got:?}");
        assert!(close(got[1], RED), "{got:?}");
        assert!(close(got[2], BLUE), "{got:?}");
        assert!(close(got[3], GREEN), "{got:?}");
        assert_eq!(results[0].as_ref().unwrap().0.dimensions(), (64, 48));
    }

    #[test]
    fn damaged_and_undecodable_frames_are_errors() {
        let (track, mut samples) = encoded(64, 48, &[RED, GREEN, BLUE], 3);
        // A keyframe whose slice data is garbage.
        let mut bad = vec![0, 0, 0, 9, 0x65];
        bad.extend_from_slice(&[0xFF; 8]);
        samples[0].data = Bytes::from(bad);
        let results = decode_frames(&track, &samples, &[0, 2]);
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        // No keyframe before the frame.
        let (track, mut samples) = encoded(64, 48, &[RED, GREEN], 5);
        samples[0].keyframe = false;
        assert!(decode_frames(&track, &samples, &[1])[0].is_err());
        // A frame that is not NAL units at all.
        let (track, mut samples) = encoded(64, 48, &[RED], 1);
        samples[0].data = Bytes::from_static(&[0, 0, 0, 200, 1]);
        assert!(decode_frames(&track, &samples, &[0])[0].is_err());
        // H.265 is not decodable here.
        let mut hevc = track.clone();
        hevc.codec = Codec::H265;
        assert!(decode_frames(&hevc, &samples, &[0])[0].is_err());
    }

    #[test]
    fn random_frames_never_panic() {
        let (track, good) = encoded(32, 32, &[RED, GREEN], 2);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let mut samples = good.clone();
            let victim = (next() % 2) as usize;
            let mut data = samples[victim].data.to_vec();
            if round % 3 == 0 {
                // Random bytes after a keyframe NAL header.
                let len = 5 + (next() % 64) as usize;
                data = vec![0, 0, 0, (len - 4) as u8, 0x65];
                data.extend((5..len).map(|_| next() as u8));
            } else {
                // Flip bytes of the real frame.
                for _ in 0..1 + next() % 8 {
                    let at = (next() as usize) % data.len();
                    data[at] = next() as u8;
                }
            }
            samples[victim].data = Bytes::from(data);
            for picture in decode_frames(&track, &samples, &[0, 1])
                .into_iter()
                .flatten()
            {
                assert_eq!(picture.0.dimensions(), (32, 32));
            }
        }
    }

    #[test]
    fn scaling_keeps_or_stretches_the_aspect_ratio_and_both_formats_encode() {
        assert_eq!(output_size(320, 240, None, None), (320, 240));
        assert_eq!(output_size(320, 240, Some(160), None), (160, 120));
        assert_eq!(output_size(320, 240, None, Some(60)), (80, 60));
        assert_eq!(output_size(320, 240, Some(100), Some(50)), (100, 50));
        assert_eq!(output_size(3840, 2, Some(1), None), (1, 1));
        let picture = Picture(RgbImage::from_pixel(40, 30, image::Rgb(GREEN)));
        let png = encode(&picture, ImageFormat::Png, Some(20), None).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (20, 15));
        assert_eq!(decoded.get_pixel(10, 7).0, GREEN);
        let low = encode(&picture, ImageFormat::Jpeg { quality: 5 }, None, None).unwrap();
        let high = encode(&picture, ImageFormat::Jpeg { quality: 100 }, None, None).unwrap();
        assert!(low.starts_with(&[0xFF, 0xD8]) && high.starts_with(&[0xFF, 0xD8]));
        assert!(low.len() < high.len());
        let decoded = image::load_from_memory(&high).unwrap().to_rgb8();
        assert!(close(decoded.get_pixel(20, 15).0, GREEN));
    }
}
