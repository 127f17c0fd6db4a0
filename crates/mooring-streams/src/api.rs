//! The SDK operations: decode a request frame, call the model, render the response frame.
//!
//! [`decode_request`] turns an operation code and CBOR payload into a [`Request`] (or the
//! error response that must go back instead); [`execute`] runs one request against the
//! [`StreamManager`] and renders the matching response frame: every request operation has
//! a fixed response operation, errors included, and the `requestId` is echoed verbatim.
//! Unknown operations get an UnknownOperationError frame (op 17, status 18).

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::codec::{decode_value, encode_frame, encode_payload, op, request_id_of, typed_view};
use crate::definition::{validate_name, MessageStreamDefinition, ReadMessagesOptions};
use crate::model::{MessageStreamInfo, StreamManager};
use crate::status::{Status, StreamError};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    request_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DefinitionRequest {
    definition: Option<MessageStreamDefinition>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NameRequest {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppendRequest {
    name: Option<String>,
    payload: Option<serde_bytes::ByteBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadRequestWire {
    stream_name: Option<String>,
    read_messages_options: Option<ReadMessagesOptions>,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Create(MessageStreamDefinition),
    Update(MessageStreamDefinition),
    Delete(String),
    Describe(String),
    Append(String, Vec<u8>),
    Read(String, Option<ReadMessagesOptions>),
    List,
}

/// A request that cannot run: the response frame to send, or `None` to close the connection.
#[derive(Debug)]
pub struct Rejection {
    pub response: Option<Vec<u8>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BasicResponse<'a> {
    request_id: &'a str,
    status: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AppendResponse<'a> {
    request_id: &'a str,
    status: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence_number: Option<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageWire<'a> {
    stream_name: &'a str,
    sequence_number: i64,
    ingest_time: i64,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReadResponse<'a> {
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<MessageWire<'a>>>,
    status: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListResponse<'a> {
    request_id: &'a str,
    status: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    streams: Option<Vec<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescribeResponse<'a> {
    request_id: &'a str,
    status: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_stream_info: Option<MessageStreamInfo>,
}

/// The response operation for a request operation.
pub fn response_operation(operation: i8) -> Option<i8> {
    Some(match operation {
        op::CREATE_MESSAGE_STREAM => op::CREATE_MESSAGE_STREAM_RESPONSE,
        op::DELETE_MESSAGE_STREAM => op::DELETE_MESSAGE_STREAM_RESPONSE,
        op::APPEND_MESSAGE => op::APPEND_MESSAGE_RESPONSE,
        op::READ_MESSAGES => op::READ_MESSAGES_RESPONSE,
        op::LIST_STREAMS => op::LIST_STREAMS_RESPONSE,
        op::DESCRIBE_MESSAGE_STREAM => op::DESCRIBE_MESSAGE_STREAM_RESPONSE,
        op::UPDATE_MESSAGE_STREAM => op::UPDATE_MESSAGE_STREAM_RESPONSE,
        _ => return None,
    })
}

/// An error response frame of the right type for `operation`.
pub fn error_frame(operation: i8, request_id: &str, error: &StreamError) -> Vec<u8> {
    let response_op = response_operation(operation).unwrap_or(op::UNKNOWN_OPERATION_ERROR);
    let body = BasicResponse {
        request_id,
        status: error.status.code(),
        error_message: Some(&error.message),
    };
    encode_frame(response_op, &encode_payload(&body))
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | ',' | '.' | '-'))
}

/// Moves a byte-string field out of a decoded map (other types stay for the typed view).
fn take_bytes(value: &mut ciborium::Value, key: &str) -> Option<Vec<u8>> {
    let entries = value.as_map_mut()?;
    let at = entries
        .iter()
        .position(|(k, v)| k.as_text() == Some(key) && v.is_bytes())?;
    match entries.remove(at).1 {
        ciborium::Value::Bytes(bytes) => Some(bytes),
        _ => None,
    }
}

/// Decodes one request frame.
pub fn decode_request(operation: i8, payload: &[u8]) -> Result<(String, Request), Rejection> {
    let Some(_) = response_operation(operation) else {
        let request_id = request_id_of(payload).unwrap_or_default();
        let error = StreamError::new(
            Status::UnknownOperation,
            format!("operation {operation} is not a request this server knows"),
        );
        return Err(Rejection {
            response: Some(error_frame(operation, &request_id, &error)),
        });
    };
    let reject = |request_id: Option<String>, message: String| -> Rejection {
        Rejection {
            response: request_id.map(|id| {
                error_frame(
                    operation,
                    &id,
                    &StreamError::new(Status::InvalidRequest, message),
                )
            }),
        }
    };
    // Decoded once; every typed view below reads this value (a 64 KiB payload is not copied
    // again per view).
    let mut value = match decode_value(payload) {
        Ok(v) => v,
        Err(message) => return Err(reject(request_id_of(payload), message)),
    };
    let envelope: Envelope = match typed_view(&value) {
        Ok(e) => e,
        Err(message) => return Err(reject(request_id_of(payload), message)),
    };
    let Some(request_id) = envelope.request_id else {
        return Err(reject(Some(String::new()), "requestId is required".into()));
    };
    if !valid_request_id(&request_id) {
        return Err(reject(
            Some(request_id),
            "requestId must be non-empty and match ^[\\w ,.\\-_]*$".into(),
        ));
    }
    let id = Some(request_id.clone());
    let request = match operation {
        op::CREATE_MESSAGE_STREAM | op::UPDATE_MESSAGE_STREAM => {
            let r: DefinitionRequest = typed_view(&value).map_err(|m| reject(id.clone(), m))?;
            let Some(definition) = r.definition else {
                return Err(reject(id, "definition is required".into()));
            };
            if operation == op::CREATE_MESSAGE_STREAM {
                Request::Create(definition)
            } else {
                Request::Update(definition)
            }
        }
        op::DELETE_MESSAGE_STREAM | op::DESCRIBE_MESSAGE_STREAM => {
            let r: NameRequest = typed_view(&value).map_err(|m| reject(id.clone(), m))?;
            let name = validate_name("name", r.name.as_deref())
                .map_err(|e| reject(id.clone(), e.message))?;
            if operation == op::DELETE_MESSAGE_STREAM {
                Request::Delete(name)
            } else {
                Request::Describe(name)
            }
        }
        op::APPEND_MESSAGE => {
            let bytes = take_bytes(&mut value, "payload");
            let r: AppendRequest = typed_view(&value).map_err(|m| reject(id.clone(), m))?;
            let name = validate_name("name", r.name.as_deref())
                .map_err(|e| reject(id.clone(), e.message))?;
            let Some(data) = bytes.or_else(|| r.payload.map(|p| p.into_vec())) else {
                return Err(reject(id, "payload is required".into()));
            };
            Request::Append(name, data)
        }
        op::READ_MESSAGES => {
            let r: ReadRequestWire = typed_view(&value).map_err(|m| reject(id.clone(), m))?;
            let name = validate_name("streamName", r.stream_name.as_deref())
                .map_err(|e| reject(id.clone(), e.message))?;
            Request::Read(name, r.read_messages_options)
        }
        op::LIST_STREAMS => Request::List,
        _ => unreachable!("response_operation covers every request"),
    };
    Ok((request_id, request))
}

fn basic(response_op: i8, request_id: &str, result: Result<(), StreamError>) -> Vec<u8> {
    let body = match &result {
        Ok(()) => BasicResponse {
            request_id,
            status: Status::Success.code(),
            error_message: None,
        },
        Err(e) => BasicResponse {
            request_id,
            status: e.status.code(),
            error_message: Some(&e.message),
        },
    };
    encode_frame(response_op, &encode_payload(&body))
}

/// Runs one request and renders its response frame.
pub async fn execute(manager: &Arc<StreamManager>, request_id: &str, request: Request) -> Vec<u8> {
    match request {
        Request::Create(definition) => basic(
            op::CREATE_MESSAGE_STREAM_RESPONSE,
            request_id,
            manager.create(&definition).await,
        ),
        Request::Update(definition) => basic(
            op::UPDATE_MESSAGE_STREAM_RESPONSE,
            request_id,
            manager.update(&definition).await,
        ),
        Request::Delete(name) => basic(
            op::DELETE_MESSAGE_STREAM_RESPONSE,
            request_id,
            manager.delete(&name).await,
        ),
        Request::Append(name, payload) => {
            let result = manager.append(&name, &payload).await;
            let body = match &result {
                Ok(seq) => AppendResponse {
                    request_id,
                    status: 0,
                    error_message: None,
                    sequence_number: Some(*seq),
                },
                Err(e) => AppendResponse {
                    request_id,
                    status: e.status.code(),
                    error_message: Some(&e.message),
                    sequence_number: None,
                },
            };
            encode_frame(op::APPEND_MESSAGE_RESPONSE, &encode_payload(&body))
        }
        Request::Read(name, options) => {
            let result = match ReadMessagesOptions::validated(options.as_ref()) {
                Ok(read) => manager.read(&name, read).await,
                Err(e) => Err(e),
            };
            let body = match &result {
                Ok(messages) => ReadResponse {
                    request_id,
                    messages: Some(
                        messages
                            .iter()
                            .map(|m| MessageWire {
                                stream_name: &name,
                                sequence_number: m.sequence_number,
                                ingest_time: m.ingest_time,
                                payload: &m.payload,
                            })
                            .collect(),
                    ),
                    status: 0,
                    error_message: None,
                },
                Err(e) => ReadResponse {
                    request_id,
                    messages: None,
                    status: e.status.code(),
                    error_message: Some(&e.message),
                },
            };
            encode_frame(op::READ_MESSAGES_RESPONSE, &encode_payload(&body))
        }
        Request::List => {
            let body = ListResponse {
                request_id,
                status: 0,
                error_message: None,
                streams: Some(manager.list()),
            };
            encode_frame(op::LIST_STREAMS_RESPONSE, &encode_payload(&body))
        }
        Request::Describe(name) => {
            let result = manager.describe(&name);
            let body = match result {
                Ok(info) => DescribeResponse {
                    request_id,
                    status: 0,
                    error_message: None,
                    message_stream_info: Some(info),
                },
                Err(ref e) => DescribeResponse {
                    request_id,
                    status: e.status.code(),
                    error_message: Some(&e.message),
                    message_stream_info: None,
                },
            };
            encode_frame(op::DESCRIBE_MESSAGE_STREAM_RESPONSE, &encode_payload(&body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    #[test]
    fn java_indefinite_length_append_decodes() {
        // Spec §12.2: Java SDK AppendMessage("TestStream", "hello").
        let wire = unhex(
            "0000005104bf69726571756573744964782432616234343730662d633963662d
             343032312d386633622d323633306530353337636161646e616d656a54657374
             53747265616d677061796c6f61644568656c6c6fff",
        );
        assert_eq!(wire.len(), 85);
        let mut buf = bytes::BytesMut::from(&wire[..]);
        let frame = crate::codec::FrameDecoder::default()
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert!(buf.is_empty());
        let (id, request) = decode_request(frame.operation, &frame.payload).unwrap();
        assert_eq!(id, "2ab4470f-c9cf-4021-8f3b-2630e0537caa");
        assert_eq!(
            request,
            Request::Append("TestStream".into(), b"hello".to_vec())
        );
    }

    #[test]
    fn python_and_node_appends_decode() {
        let python = unhex(
            "0000005004a369726571756573744964782430303030303030302d303030302d
             343030302d383030302d303030303030303030303032646e616d656a54657374
             53747265616d677061796c6f61644568656c6c6f",
        );
        let (id, request) = decode_request(python[4] as i8, &python[5..]).unwrap();
        assert_eq!(id, "00000000-0000-4000-8000-000000000002");
        assert_eq!(
            request,
            Request::Append("TestStream".into(), b"hello".to_vec())
        );
        let node = unhex(
            "0000002404a3697265717565737449646120646e616d65627331677061796c6f61644568656c6c6f",
        );
        let (id, request) = decode_request(node[4] as i8, &node[5..]).unwrap();
        assert_eq!(id, " ");
        assert_eq!(request, Request::Append("s1".into(), b"hello".to_vec()));
    }

    #[test]
    fn error_response_matches_the_captured_bytes() {
        // Spec §12.4: ReadMessagesResponse, status 5, errorMessage "stream not found".
        let frame = error_frame(
            op::READ_MESSAGES,
            "00000000-0000-4000-8000-000000000003",
            &StreamError::new(Status::ResourceNotFound, "stream not found"),
        );
        assert_eq!(
            hex::encode(frame),
            "000000580aa369726571756573744964782430303030303030302d303030302d343030302d383030302d30303030303030303030303366737461747573056c6572726f724d6573736167657073747265616d206e6f7420666f756e64"
        );
        let frame = error_frame(
            42,
            "x",
            &StreamError::new(Status::UnknownOperation, "Unknown operation"),
        );
        assert_eq!(
            hex::encode(frame),
            "0000003511a369726571756573744964617866737461747573126c6572726f724d65737361676571556e6b6e6f776e206f7065726174696f6e"
        );
    }

    #[test]
    fn append_response_matches_the_captured_bytes() {
        let body = AppendResponse {
            request_id: "00000000-0000-4000-8000-000000000002",
            status: 0,
            error_message: None,
            sequence_number: Some(0),
        };
        assert_eq!(
            hex::encode(encode_frame(op::APPEND_MESSAGE_RESPONSE, &encode_payload(&body))),
            "0000004a09a369726571756573744964782430303030303030302d303030302d343030302d383030302d30303030303030303030303266737461747573006e73657175656e63654e756d62657200"
        );
    }

    #[test]
    fn java_create_with_indefinite_nested_maps_decodes() {
        // {"requestId": "r", "definition": {"name": "s1", "maxSize": 268435456,
        //  "streamSegmentSize": 16777216, "strategyOnFull": 1, "persistence": 0}} as Jackson
        // writes it: indefinite maps at every level.
        let mut payload = vec![0xbf];
        payload.extend(unhex("69726571756573744964 6172"));
        payload.extend(unhex("6a646566696e6974696f6e bf"));
        payload.extend(unhex("646e616d65 627331"));
        payload.extend(unhex("676d617853697a65 1a10000000"));
        payload.extend(unhex("7173747265616d5365676d656e7453697a65 1a01000000"));
        payload.extend(unhex("6e73747261746567794f6e46756c6c 01"));
        payload.extend(unhex("6b70657273697374656e6365 00"));
        payload.extend([0xff, 0xff]);
        let (id, request) = decode_request(op::CREATE_MESSAGE_STREAM, &payload).unwrap();
        assert_eq!(id, "r");
        let Request::Create(def) = request else {
            panic!("{request:?}")
        };
        let def = def.validated().unwrap();
        assert_eq!(def.name, "s1");
        assert_eq!(def.max_size, 268435456);
        assert_eq!(def.segment_size, 16777216);
        assert!(def.overwrite_oldest());
        assert!(!def.is_memory());
    }

    #[test]
    fn malformed_payloads_get_invalid_request_or_close() {
        // Not CBOR at all and no request id: close.
        let r = decode_request(op::APPEND_MESSAGE, b"\xff\xff").unwrap_err();
        assert!(r.response.is_none());
        // Wrong type for name: InvalidRequest echoing the id.
        let mut payload = Vec::new();
        ciborium::ser::into_writer(
            &ciborium::Value::Map(vec![
                ("requestId".into(), "abc".into()),
                ("name".into(), 5.into()),
            ]),
            &mut payload,
        )
        .unwrap();
        let r = decode_request(op::APPEND_MESSAGE, &payload).unwrap_err();
        let frame = r.response.unwrap();
        assert_eq!(frame[4] as i8, op::APPEND_MESSAGE_RESPONSE);
        let value = crate::codec::decode_value(&frame[5..]).unwrap();
        let map = value.as_map().unwrap();
        assert!(map.contains(&("status".into(), 3.into())));
        assert!(map.contains(&("requestId".into(), "abc".into())));
        // Unknown operation: op 17 with status 18.
        let r = decode_request(0, &payload).unwrap_err();
        assert_eq!(r.response.unwrap()[4] as i8, op::UNKNOWN_OPERATION_ERROR);
    }
}
