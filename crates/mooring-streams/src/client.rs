//! A small native client of the stream manager protocol, for `mooring streams`: it connects
//! to a running server's stream manager port exactly as the SDKs do (version byte, Connect
//! with the auth token), then sends one request at a time and waits for its response.
//! Responses come back as JSON values with the SDK's field names, so the operator tools
//! print what an SDK user would see.

use bytes::BytesMut;
use ciborium::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::codec::{decode_value, encode_frame, encode_payload, op, FrameDecoder, CONNECT_VERSION};
use crate::server::PROTOCOL_VERSION;
use crate::status::Status;

/// A connected client.
pub struct Client {
    socket: TcpStream,
    buffer: BytesMut,
    decoder: FrameDecoder,
    next_id: u64,
}

/// One message read back.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadMessage {
    pub sequence_number: i64,
    pub ingest_time: i64,
    pub payload: Vec<u8>,
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
}

fn integer(value: Option<&Value>) -> Option<i64> {
    value?.as_integer().and_then(|i| i64::try_from(i).ok())
}

/// CBOR to JSON for printing; byte strings become base64.
pub fn to_json(value: &Value) -> serde_json::Value {
    use base64::Engine as _;
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Integer(i) => i64::try_from(*i)
            .map(Into::into)
            .unwrap_or_else(|_| serde_json::Value::String(i128::from(*i).to_string())),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::Text(t) => t.clone().into(),
        Value::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
        Value::Array(items) => items.iter().map(to_json).collect(),
        Value::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = k
                        .as_text()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{k:?}"));
                    (key, to_json(v))
                })
                .collect(),
        ),
        Value::Tag(_, inner) => to_json(inner),
        _ => serde_json::Value::Null,
    }
}

impl Client {
    /// Connects and performs the handshake; `auth_token` is what the SDKs read from
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
    pub async fn connect(address: &str, auth_token: Option<&str>) -> anyhow::Result<Client> {
        let socket = TcpStream::connect(address)
            .await
            .map_err(|e| anyhow::anyhow!("no stream manager answering at {address}: {e}"))?;
        socket.set_nodelay(true)?;
        let mut client = Client {
            socket,
            buffer: BytesMut::new(),
            decoder: FrameDecoder::default(),
            next_id: 0,
        };
        let mut connect = vec![
            (text("requestId"), text("mooring-cli-connect")),
            (text("protocolVersion"), text(PROTOCOL_VERSION)),
            (text("sdkVersion"), text(env!("CARGO_PKG_VERSION"))),
        ];
        if let Some(token) = auth_token {
            connect.push((text("authToken"), text(token)));
        }
        let mut hello = vec![CONNECT_VERSION];
        hello.extend(encode_frame(
            op::CONNECT,
            &encode_payload(&Value::Map(connect)),
        ));
        client.socket.write_all(&hello).await?;
        let version = client.socket.read_u8().await?;
        if version != CONNECT_VERSION {
            anyhow::bail!("the server speaks protocol byte {version}, not {CONNECT_VERSION}");
        }
        let (_, response) = client.next_frame().await?;
        check(&response)?;
        Ok(client)
    }

    async fn next_frame(&mut self) -> anyhow::Result<(i8, Value)> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer)? {
                let value = decode_value(&frame.payload).map_err(|e| anyhow::anyhow!(e))?;
                return Ok((frame.operation, value));
            }
            if self.socket.read_buf(&mut self.buffer).await? == 0 {
                anyhow::bail!("the stream manager closed the connection");
            }
        }
    }

    /// Sends one request and returns its response map once the status is Success.
    pub async fn call(
        &mut self,
        operation: i8,
        mut fields: Vec<(Value, Value)>,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        fields.insert(
            0,
            (text("requestId"), text(&format!("cli-{}", self.next_id))),
        );
        let frame = encode_frame(operation, &encode_payload(&Value::Map(fields)));
        self.socket.write_all(&frame).await?;
        let (_, response) = self.next_frame().await?;
        check(&response)?;
        Ok(response)
    }

    pub async fn list(&mut self) -> anyhow::Result<Vec<String>> {
        let response = self.call(op::LIST_STREAMS, vec![]).await?;
        let streams = field(&response, "streams")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_text().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(streams)
    }

    /// DescribeMessageStream's `messageStreamInfo`.
    pub async fn describe(&mut self, name: &str) -> anyhow::Result<serde_json::Value> {
        let response = self
            .call(
                op::DESCRIBE_MESSAGE_STREAM,
                vec![(text("name"), text(name))],
            )
            .await?;
        Ok(field(&response, "messageStreamInfo")
            .map(to_json)
            .unwrap_or(serde_json::Value::Null))
    }

    /// Reads up to `max` messages from `from`, waiting at most `timeout_millis` for at least
    /// one; an empty result when none arrives in time.
    pub async fn read(
        &mut self,
        name: &str,
        from: i64,
        max: i64,
        timeout_millis: i64,
    ) -> anyhow::Result<Vec<ReadMessage>> {
        let options = Value::Map(vec![
            (text("desiredStartSequenceNumber"), from.into()),
            (text("minMessageCount"), 1.into()),
            (text("maxMessageCount"), max.into()),
            (text("readTimeoutMillis"), timeout_millis.into()),
        ]);
        let result = self
            .call(
                op::READ_MESSAGES,
                vec![
                    (text("streamName"), text(name)),
                    (text("readMessagesOptions"), options),
                ],
            )
            .await;
        let response = match result {
            Ok(r) => r,
            Err(e) if e.to_string().starts_with("NotEnoughMessages") => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let messages = field(&response, "messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(messages
            .iter()
            .map(|m| ReadMessage {
                sequence_number: integer(field(m, "sequenceNumber")).unwrap_or(-1),
                ingest_time: integer(field(m, "ingestTime")).unwrap_or(0),
                payload: field(m, "payload")
                    .and_then(Value::as_bytes)
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// Appends one message and returns its sequence number.
    pub async fn append(&mut self, name: &str, payload: Vec<u8>) -> anyhow::Result<i64> {
        let response = self
            .call(
                op::APPEND_MESSAGE,
                vec![
                    (text("name"), text(name)),
                    (text("payload"), Value::Bytes(payload)),
                ],
            )
            .await?;
        integer(field(&response, "sequenceNumber"))
            .ok_or_else(|| anyhow::anyhow!("the append response has no sequenceNumber"))
    }
}

/// `ResponseStatusCode` names by code, as the SDKs spell them.
const STATUS_NAMES: [&str; 19] = [
    "Success",
    "UnknownFailure",
    "Unauthorized",
    "InvalidRequest",
    "RequestPayloadTooLarge",
    "ResourceNotFound",
    "ServerTimeout",
    "ResponsePayloadTooLarge",
    "UnsupportedConnectVersion",
    "UnexpectedOperation",
    "UnsupportedProtocolVersion",
    "InvalidProtocolVersion",
    "FailedToConnect",
    "NotEnoughMessages",
    "MessageStoreReadError",
    "OutOfMemoryError",
    "UpdateFailed",
    "UpdateNotAllowed",
    "UnknownOperation",
];

/// Turns a non-success response into an error "<Status>: <errorMessage>".
fn check(response: &Value) -> anyhow::Result<()> {
    let status = integer(field(response, "status")).unwrap_or(-1);
    if status == Status::Success.code() {
        return Ok(());
    }
    let name = usize::try_from(status)
        .ok()
        .and_then(|i| STATUS_NAMES.get(i))
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("status {status}"));
    let message = field(response, "errorMessage")
        .and_then(Value::as_text)
        .unwrap_or_default();
    anyhow::bail!("{name}: {message}")
}
