//! The TCP server the stream manager SDKs connect to.
//!
//! Per connection: the version byte and Connect handshake (protocol version and auth token
//! checks, answered with `0x01` plus a ConnectResponse), then a read loop that takes frames
//! off a buffer and runs every request as its own task, so a long-polling ReadMessages never
//! holds up an AppendMessage on the same socket. Responses go through one writer task that
//! writes each frame as a single buffer, so frames never interleave and the Python SDK's
//! single `read(4)` always sees a whole header. In-flight requests per connection are
//! bounded; beyond that the reader stops reading (backpressure) rather than queueing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::codec::{
    decode_payload, encode_frame, encode_payload, op, FrameDecoder, CONNECT_VERSION,
};
use crate::model::StreamManager;
use crate::status::Status;

pub const PROTOCOL_VERSION: &str = "1.1.0";
pub const SUPPORTED_PROTOCOL_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];
pub const SERVER_VERSION: &str = "1.1.0";
/// How long a client may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection may have running at once.
const MAX_IN_FLIGHT: usize = 1024;

/// Who may connect.
#[derive(Debug, Clone, Default)]
pub struct AuthPolicy {
    /// When set, clients must present exactly this token.
    pub required_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectRequest {
    request_id: Option<String>,
    protocol_version: Option<String>,
    #[serde(default)]
    other_supported_protocol_versions: Vec<String>,
    auth_token: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    status: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
    protocol_version: &'a str,
    supported_protocol_versions: [&'a str; 2],
    server_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_identifier: Option<&'a str>,
}

fn connect_response(
    request_id: Option<&str>,
    status: Status,
    error: Option<&str>,
    client: Option<&str>,
) -> Vec<u8> {
    let body = ConnectResponse {
        request_id,
        status: status.code(),
        error_message: error,
        protocol_version: PROTOCOL_VERSION,
        supported_protocol_versions: SUPPORTED_PROTOCOL_VERSIONS,
        server_version: SERVER_VERSION,
        client_identifier: client,
    };
    let mut out = vec![CONNECT_VERSION];
    out.extend(encode_frame(op::CONNECT_RESPONSE, &encode_payload(&body)));
    out
}

fn well_formed_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a ConnectRequest; `Err` carries the status and message to refuse with.
fn check_connect(request: &ConnectRequest, auth: &AuthPolicy) -> Result<(), (Status, String)> {
    let version = request.protocol_version.as_deref().unwrap_or_default();
    if !well_formed_version(version) {
        return Err((
            Status::InvalidProtocolVersion,
            format!("protocolVersion {version:?} is not of the form N.N.N"),
        ));
    }
    let supported = |v: &str| SUPPORTED_PROTOCOL_VERSIONS.contains(&v);
    if !supported(version)
        && !request
            .other_supported_protocol_versions
            .iter()
            .any(|v| supported(v))
    {
        return Err((
            Status::UnsupportedProtocolVersion,
            format!(
                "protocol version {version} is not supported; this server speaks {}",
                SUPPORTED_PROTOCOL_VERSIONS.join(", ")
            ),
        ));
    }
    if let Some(required) = &auth.required_token {
        let presented = request.auth_token.as_deref().unwrap_or_default();
        if presented.is_empty() || presented != required {
            return Err((
                Status::Unauthorized,
                "the auth token (AWS_CONTAINER_AUTHORIZATION_TOKEN) is missing or not valid".into(),
            ));
        }
    }
    Ok(())
}

/// Accepts connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<StreamManager>,
    auth: AuthPolicy,
    shutdown: CancellationToken,
) {
    let auth = Arc::new(auth);
    let ids = AtomicU64::new(0);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    let id = format!("mooring-{}", ids.fetch_add(1, Ordering::Relaxed) + 1);
                    let manager = manager.clone();
                    let auth = auth.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(socket, manager, auth, id.clone(), shutdown).await {
                            tracing::debug!(%peer, client = %id, error = %e, "stream manager connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stream manager accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn read_frame(
    socket: &mut TcpStream,
    buf: &mut BytesMut,
    decoder: &FrameDecoder,
) -> std::io::Result<Option<crate::codec::Frame>> {
    loop {
        match decoder.decode(buf) {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            }
        }
        if buf.capacity() - buf.len() < 8192 {
            buf.reserve(64 * 1024);
        }
        if socket.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn connection(
    mut socket: TcpStream,
    manager: Arc<StreamManager>,
    auth: Arc<AuthPolicy>,
    client_id: String,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let decoder = FrameDecoder::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // Handshake.
    let handshake = async {
        let version = socket.read_u8().await?;
        if version != CONNECT_VERSION {
            return Ok::<_, std::io::Error>(Err((
                None,
                Status::UnsupportedConnectVersion,
                format!("connect version {version} is not supported; expected {CONNECT_VERSION}"),
            )));
        }
        let Some(frame) = read_frame(&mut socket, &mut buf, &decoder).await? else {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        };
        let request_id = crate::codec::request_id_of(&frame.payload);
        if frame.operation != op::CONNECT {
            return Ok(Err((
                request_id,
                Status::UnexpectedOperation,
                format!("expected Connect, got operation {}", frame.operation),
            )));
        }
        let request: ConnectRequest = match decode_payload(&frame.payload) {
            Ok(r) => r,
            Err(message) => return Ok(Err((request_id, Status::InvalidRequest, message))),
        };
        match check_connect(&request, &auth) {
            Ok(()) => Ok(Ok(request.request_id)),
            Err((status, message)) => Ok(Err((request.request_id, status, message))),
        }
    };
    let outcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(result) => result?,
        Err(_) => return Ok(()),
    };
    let request_id = match outcome {
        Ok(request_id) => request_id,
        Err((request_id, status, message)) => {
            tracing::info!(client = %client_id, ?status, %message, "refused a stream manager client");
            socket
                .write_all(&connect_response(
                    request_id.as_deref(),
                    status,
                    Some(&message),
                    None,
                ))
                .await?;
            let _ = socket.shutdown().await;
            return Ok(());
        }
    };
    socket
        .write_all(&connect_response(
            request_id.as_deref(),
            Status::Success,
            None,
            Some(&client_id),
        ))
        .await?;

    let (mut reader, mut writer) = socket.into_split();
    let (frames_tx, mut frames_rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let writer_task = tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(frame) = frames_rx.recv().await {
            batch.clear();
            batch.extend_from_slice(&frame);
            // Coalesce whatever else is ready into the same write.
            while batch.len() < 256 * 1024 {
                match frames_rx.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if writer.write_all(&batch).await.is_err() {
                return;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = loop {
        let frame = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => break Some(frame),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(client = %client_id, error = %e, "closing on a bad frame");
                    break None;
                }
            }
            if buf.capacity() - buf.len() < 8192 {
                buf.reserve(64 * 1024);
            }
            let read = tokio::select! {
                _ = shutdown.cancelled() => Ok(0),
                read = reader.read_buf(&mut buf) => read,
            };
            match read {
                Ok(0) | Err(_) => break None,
                Ok(_) => {}
            }
        };
        let Some(frame) = frame else {
            break Ok(());
        };
        match api::decode_request(frame.operation, &frame.payload) {
            Err(rejection) => match rejection.response {
                Some(response) => {
                    if frames_tx.send(response).await.is_err() {
                        break Ok(());
                    }
                }
                None => break Ok(()),
            },
            Ok((request_id, request)) => {
                let permit = in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let manager = manager.clone();
                let frames_tx = frames_tx.clone();
                tokio::spawn(async move {
                    let response = api::execute(&manager, &request_id, request).await;
                    let _ = frames_tx.send(response).await;
                    drop(permit);
                });
            }
        }
    };
    drop(frames_tx);
    let _ = writer_task.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(version: &str, others: &[&str], token: Option<&str>) -> ConnectRequest {
        ConnectRequest {
            request_id: Some("r".into()),
            protocol_version: Some(version.into()),
            other_supported_protocol_versions: others.iter().map(|s| s.to_string()).collect(),
            auth_token: token.map(str::to_string),
        }
    }

    #[test]
    fn connect_checks_versions_and_tokens() {
        let open = AuthPolicy::default();
        assert!(check_connect(&connect("1.1.0", &["1.0.0"], None), &open).is_ok());
        assert_eq!(
            check_connect(&connect("1.x", &[], None), &open)
                .unwrap_err()
                .0,
            Status::InvalidProtocolVersion
        );
        assert_eq!(
            check_connect(&connect("9.0.0", &[], None), &open)
                .unwrap_err()
                .0,
            Status::UnsupportedProtocolVersion
        );
        assert!(check_connect(&connect("9.0.0", &["1.0.0"], None), &open).is_ok());
        let locked = AuthPolicy {
            required_token: Some("tok".into()),
        };
        for token in [None, Some(""), Some("nope")] {
            assert_eq!(
                check_connect(&connect("1.1.0", &[], token), &locked)
                    .unwrap_err()
                    .0,
                Status::Unauthorized
            );
        }
        assert!(check_connect(&connect("1.1.0", &[], Some("tok")), &locked).is_ok());
    }

    #[test]
    fn connect_response_matches_the_captured_bytes() {
        // Spec §12.4.
        let bytes = connect_response(
            Some("00000000-0000-4000-8000-000000000001"),
            Status::Success,
            None,
            Some("c1"),
        );
        assert_eq!(
            hex::encode(bytes),
            "01000000a006a669726571756573744964782430303030303030302d303030302d343030302d383030302d30303030303030303030303166737461747573006f70726f746f636f6c56657273696f6e65312e312e307819737570706f7274656450726f746f636f6c56657273696f6e738265312e302e3065312e312e306d73657276657256657273696f6e65312e312e3070636c69656e744964656e746966696572626331"
        );
    }
}
