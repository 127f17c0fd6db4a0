//! EBML primitives: element ids and sizes (variable-length integers), the unsigned, signed,
//! float and string payloads, a reader over complete child elements, and the writer used to
//! lay out GetMedia chunks.
//!
//! Matroska is EBML. Every element is `id | size | data`, where the id keeps its length
//! marker (1–4 bytes) and the size drops it (1–8 bytes; all value bits set means "unknown
//! size", which producers use for the Segment and for live Clusters). The readers here work on
//! byte slices that may end early: they answer `Ok(None)` when more bytes are needed, so the
//! incremental MKV parser in [`crate::mkv`] can call them on whatever has arrived so far.

use thiserror::Error;

/// A malformed EBML encoding.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid EBML: {0}")]
pub struct EbmlError(pub String);

/// An element header: id, declared size (`None` for unknown) and how many bytes it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementHeader {
    pub id: u32,
    pub size: Option<u64>,
    pub header_len: usize,
}

/// Reads an element id (marker bits kept). `Ok(None)` means more bytes are needed.
pub fn read_id(buf: &[u8]) -> Result<Option<(u32, usize)>, EbmlError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len = first.leading_zeros() as usize + 1;
    if len > 4 {
        return Err(EbmlError(format!(
            "element id starts with byte {first:#04x}"
        )));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let id = buf[..len]
        .iter()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    Ok(Some((id, len)))
}

/// Reads an element size; the value is `None` for the reserved "unknown size" encoding.
pub fn read_size(buf: &[u8]) -> Result<Option<(Option<u64>, usize)>, EbmlError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len = first.leading_zeros() as usize + 1;
    if len > 8 {
        return Err(EbmlError("element size starts with a zero byte".into()));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mask = if len == 8 { 0 } else { 0xFFu8 >> len };
    let mut value = u64::from(first & mask);
    for &b in &buf[1..len] {
        value = (value << 8) | u64::from(b);
    }
    let all_ones = (1u64 << (7 * len)) - 1;
    Ok(Some((
        if value == all_ones { None } else { Some(value) },
        len,
    )))
}

/// Reads a whole element header.
pub fn read_header(buf: &[u8]) -> Result<Option<ElementHeader>, EbmlError> {
    let Some((id, id_len)) = read_id(buf)? else {
        return Ok(None);
    };
    let Some((size, size_len)) = read_size(&buf[id_len..])? else {
        return Ok(None);
    };
    Ok(Some(ElementHeader {
        id,
        size,
        header_len: id_len + size_len,
    }))
}

/// An unsigned integer payload (0–8 bytes, big-endian).
pub fn read_uint(data: &[u8]) -> Result<u64, EbmlError> {
    if data.len() > 8 {
        return Err(EbmlError(format!(
            "unsigned integer of {} bytes",
            data.len()
        )));
    }
    Ok(data.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// A float payload (0, 4 or 8 bytes).
pub fn read_float(data: &[u8]) -> Result<f64, EbmlError> {
    match data.len() {
        0 => Ok(0.0),
        4 => Ok(f64::from(f32::from_be_bytes([
            data[0], data[1], data[2], data[3],
        ]))),
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(data);
            Ok(f64::from_be_bytes(b))
        }
        n => Err(EbmlError(format!("float of {n} bytes"))),
    }
}

/// A string payload; trailing NULs are padding.
pub fn read_string(data: &[u8]) -> String {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// A block's track number: an EBML varint with its marker removed.
pub fn read_vint(buf: &[u8]) -> Result<(u64, usize), EbmlError> {
    match read_size(buf)? {
        Some((Some(v), len)) => Ok((v, len)),
        Some((None, len)) => Ok(((1u64 << (7 * len)) - 1, len)),
        None => Err(EbmlError("truncated varint".into())),
    }
}

/// Iterates the complete child elements of a known-size payload as `(id, data)`.
pub struct Children<'a> {
    rest: &'a [u8],
}

/// The children of `data`, which must be a sequence of complete, known-size elements.
pub fn children(data: &[u8]) -> Children<'_> {
    Children { rest: data }
}

impl<'a> Iterator for Children<'a> {
    type Item = Result<(u32, &'a [u8]), EbmlError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let result = (|| {
            let header = read_header(self.rest)?
                .ok_or_else(|| EbmlError("truncated child element header".into()))?;
            let size = header
                .size
                .ok_or_else(|| EbmlError(format!("child {:#x} has unknown size", header.id)))?;
            let end = (header.header_len as u64)
                .checked_add(size)
                .filter(|&end| end <= self.rest.len() as u64)
                .ok_or_else(|| EbmlError(format!("child {:#x} overruns its parent", header.id)))?
                as usize;
            let data = &self.rest[header.header_len..end];
            self.rest = &self.rest[end..];
            Ok((header.id, data))
        })();
        if result.is_err() {
            self.rest = &[];
        }
        Some(result)
    }
}

/// Appends an element id (marker bits included in `id`).
pub fn write_id(out: &mut Vec<u8>, id: u32) {
    let bytes = id.to_be_bytes();
    let skip = bytes.iter().position(|&b| b != 0).unwrap_or(3);
    out.extend_from_slice(&bytes[skip..]);
}

/// Appends a size using exactly `width` bytes (1–8).
pub fn write_size_width(out: &mut Vec<u8>, size: u64, width: usize) {
    let marker = 1u64 << (7 * width);
    let encoded = marker | size;
    let bytes = encoded.to_be_bytes();
    out.extend_from_slice(&bytes[8 - width..]);
}

/// Appends a size in the shortest encoding.
pub fn write_size(out: &mut Vec<u8>, size: u64) {
    let mut width = 1;
    while width < 8 && size >= (1u64 << (7 * width)) - 1 {
        width += 1;
    }
    write_size_width(out, size, width);
}

/// Appends a complete element with a shortest-form size.
pub fn write_element(out: &mut Vec<u8>, id: u32, data: &[u8]) {
    write_id(out, id);
    write_size(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// Appends an unknown-size element header (8-byte form, as KVS writes the Segment).
pub fn write_unknown_size_header(out: &mut Vec<u8>, id: u32) {
    write_id(out, id);
    out.extend_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_marker() {
        assert_eq!(
            read_id(&[0x1A, 0x45, 0xDF, 0xA3]).unwrap(),
            Some((0x1A45DFA3, 4))
        );
        assert_eq!(read_id(&[0xA3]).unwrap(), Some((0xA3, 1)));
        assert_eq!(read_id(&[0x1A, 0x45]).unwrap(), None);
        assert!(read_id(&[0x00]).is_err());
        assert!(read_id(&[0x08]).is_err());
    }

    #[test]
    fn sizes_decode_known_and_unknown() {
        assert_eq!(read_size(&[0x81]).unwrap(), Some((Some(1), 1)));
        assert_eq!(read_size(&[0x40, 0x02]).unwrap(), Some((Some(2), 2)));
        assert_eq!(read_size(&[0xFF]).unwrap(), Some((None, 1)));
        assert_eq!(
            read_size(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]).unwrap(),
            Some((None, 8))
        );
        assert_eq!(
            read_size(&[0x01, 0, 0, 0, 0, 0x08, 0x57, 0x17]).unwrap(),
            Some((Some(0x085717), 8))
        );
        assert_eq!(read_size(&[0x01, 0, 0]).unwrap(), None);
        assert!(read_size(&[0x00]).is_err());
    }

    #[test]
    fn sizes_round_trip_through_the_writer() {
        for size in [0u64, 1, 126, 127, 128, 16382, 16383, 1 << 20, (1 << 56) - 2] {
            let mut out = Vec::new();
            write_size(&mut out, size);
            assert_eq!(read_size(&out).unwrap(), Some((Some(size), out.len())));
        }
        let mut out = Vec::new();
        write_size_width(&mut out, 300, 8);
        assert_eq!(out.len(), 8);
        assert_eq!(read_size(&out).unwrap(), Some((Some(300), 8)));
    }

    #[test]
    fn children_reject_overruns_and_unknown_sizes() {
        let mut data = Vec::new();
        write_element(&mut data, 0xD7, &[1]);
        write_element(&mut data, 0x86, b"V_MPEG4/ISO/AVC");
        let parsed: Vec<_> = children(&data).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(read_string(parsed[1].1), "V_MPEG4/ISO/AVC");
        assert!(children(&[0xD7, 0x85, 1]).any(|c| c.is_err()));
        assert!(children(&[0xD7, 0xFF]).any(|c| c.is_err()));
    }

    #[test]
    fn payload_readers() {
        assert_eq!(read_uint(&[0x0F, 0x42, 0x40]).unwrap(), 1_000_000);
        assert!(read_uint(&[0; 9]).is_err());
        assert_eq!(read_float(&1.5f32.to_be_bytes()).unwrap(), 1.5);
        assert_eq!(read_string(b"abc\0\0"), "abc");
    }
}
