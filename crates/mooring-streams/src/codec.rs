//! The SDK wire format: length-prefixed frames carrying one CBOR map each.
//!
//! A frame is `i32 big-endian L | i8 operation | L-1 bytes of CBOR`, where `L` counts the
//! operation byte plus the payload and may be at most `1 << 30`. The connection starts with
//! a single version byte in each direction. [`FrameDecoder`] takes frames off a byte buffer
//! that fills up in arbitrary pieces (clients split headers and payloads across writes);
//! [`decode_payload`] turns a payload into a typed request, accepting the definite-length
//! maps Python and Node.js send and the indefinite-length maps Java sends, ignoring unknown
//! keys and treating CBOR null like an absent key. Responses are encoded as definite maps
//! with absent optional fields omitted, written as one buffer per frame.

use bytes::{Buf, Bytes, BytesMut};
use ciborium::Value;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub const CONNECT_VERSION: u8 = 1;
/// Largest allowed value of the length field.
pub const MAX_FRAME_LENGTH: i32 = 1 << 30;

/// Operation codes.
pub mod op {
    pub const CONNECT: i8 = 1;
    pub const CREATE_MESSAGE_STREAM: i8 = 2;
    pub const DELETE_MESSAGE_STREAM: i8 = 3;
    pub const APPEND_MESSAGE: i8 = 4;
    pub const READ_MESSAGES: i8 = 5;
    pub const CONNECT_RESPONSE: i8 = 6;
    pub const CREATE_MESSAGE_STREAM_RESPONSE: i8 = 7;
    pub const DELETE_MESSAGE_STREAM_RESPONSE: i8 = 8;
    pub const APPEND_MESSAGE_RESPONSE: i8 = 9;
    pub const READ_MESSAGES_RESPONSE: i8 = 10;
    pub const LIST_STREAMS: i8 = 11;
    pub const LIST_STREAMS_RESPONSE: i8 = 12;
    pub const DESCRIBE_MESSAGE_STREAM: i8 = 13;
    pub const DESCRIBE_MESSAGE_STREAM_RESPONSE: i8 = 14;
    pub const UPDATE_MESSAGE_STREAM: i8 = 15;
    pub const UPDATE_MESSAGE_STREAM_RESPONSE: i8 = 16;
    pub const UNKNOWN_OPERATION_ERROR: i8 = 17;
}

/// One frame as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub operation: i8,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} is outside 1..=2^30")]
    BadLength(i32),
}

/// Takes frames off the front of a growing buffer.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Largest length accepted; [`MAX_FRAME_LENGTH`] unless configured lower.
    pub max_length: Option<i32>,
}

impl FrameDecoder {
    /// Returns the next complete frame, `None` if more bytes are needed, or an error when
    /// the length field is invalid (the connection must then be closed).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let length = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let max = self.max_length.unwrap_or(MAX_FRAME_LENGTH);
        if length < 1 || length > max {
            return Err(FrameError::BadLength(length));
        }
        let total = 4 + length as usize;
        if buf.len() < total {
            buf.reserve((total - buf.len()).min(1 << 20));
            return Ok(None);
        }
        buf.advance(4);
        let operation = buf.get_i8();
        let payload = buf.split_to(length as usize - 1).freeze();
        Ok(Some(Frame { operation, payload }))
    }
}

/// Encodes one frame into a single buffer.
pub fn encode_frame(operation: i8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&((payload.len() + 1) as i32).to_be_bytes());
    out.push(operation as u8);
    out.extend_from_slice(payload);
    out
}

/// Removes map entries whose value is null, at every depth.
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        Value::Tag(tag, inner) => Value::Tag(tag, Box::new(strip_nulls(*inner))),
        other => other,
    }
}

/// Parses a payload into a CBOR map value.
pub fn decode_value(payload: &[u8]) -> Result<Value, String> {
    let mut reader = payload;
    let value: Value =
        ciborium::de::from_reader(&mut reader).map_err(|e| format!("payload is not CBOR: {e}"))?;
    if !reader.is_empty() {
        return Err(format!(
            "payload has {} bytes after the CBOR item",
            reader.len()
        ));
    }
    if !value.is_map() {
        return Err("payload is not a CBOR map".into());
    }
    Ok(strip_nulls(value))
}

/// Parses a payload into a request type.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    typed_view(&decode_value(payload)?)
}

/// Reads an already decoded payload as a request type.
pub fn typed_view<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    value
        .deserialized()
        .map_err(|e| format!("malformed request: {e}"))
}

/// Best-effort `requestId` of a payload that may not decode as a whole.
pub fn request_id_of(payload: &[u8]) -> Option<String> {
    let Value::Map(entries) = decode_value(payload).ok()? else {
        return None;
    };
    entries.into_iter().find_map(|(k, v)| match (k, v) {
        (Value::Text(k), Value::Text(v)) if k == "requestId" => Some(v),
        _ => None,
    })
}

/// Encodes a response as a definite-length CBOR map.
pub fn encode_payload<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).expect("encoding into a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn frames_split_anywhere_decode_the_same() {
        let frames = [encode_frame(4, b"\xa1\x61a\x01"), encode_frame(11, b"\xa0")];
        let wire: Vec<u8> = frames.concat();
        for split in 0..wire.len() {
            let decoder = FrameDecoder::default();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(piece);
                while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                    out.push(frame);
                }
            }
            assert_eq!(out.len(), 2, "split at {split}");
            assert_eq!(out[0].operation, 4);
            assert_eq!(&out[1].payload[..], b"\xa0");
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let decoder = FrameDecoder::default();
        for length in [0i32, -1, MAX_FRAME_LENGTH + 1, i32::MIN] {
            let mut buf = BytesMut::from(&length.to_be_bytes()[..]);
            assert_eq!(decoder.decode(&mut buf), Err(FrameError::BadLength(length)));
        }
    }

    #[test]
    fn nulls_are_absent_and_unknown_keys_ignored() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(rename_all = "camelCase")]
        struct R {
            request_id: String,
            name: Option<String>,
        }
        let mut payload = Vec::new();
        ciborium::ser::into_writer(
            &Value::Map(vec![
                (Value::Text("requestId".into()), Value::Text("r".into())),
                (Value::Text("name".into()), Value::Null),
                (Value::Text("extra".into()), Value::Integer(5.into())),
            ]),
            &mut payload,
        )
        .unwrap();
        let r: R = decode_payload(&payload).unwrap();
        assert_eq!(r.request_id, "r");
        assert_eq!(r.name, None);
        assert_eq!(request_id_of(&payload).as_deref(), Some("r"));
    }

    /// Deterministic random input: the decoder never panics, never loops, and only ever
    /// consumes whole frames.
    #[test]
    fn random_bytes_never_break_the_decoders() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_f00d);
        for round in 0..20_000 {
            let len = rng.gen_range(0..96);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if round % 2 == 0 && bytes.len() >= 6 {
                // Plausible lengths reach the payload decoders more often.
                let l = (bytes.len() - 4) as i32;
                bytes[..4].copy_from_slice(&l.to_be_bytes());
                if round % 4 == 0 {
                    bytes[5] = 0xa0 | (bytes[5] & 0x1f);
                }
            }
            let decoder = FrameDecoder::default();
            let mut buf = BytesMut::from(&bytes[..]);
            let mut consumed = 0usize;
            loop {
                let before = buf.len();
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        consumed += before - buf.len();
                        let _ = crate::api::decode_request(frame.operation, &frame.payload);
                        let _ = request_id_of(&frame.payload);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            assert!(consumed <= bytes.len());
        }
    }
}
