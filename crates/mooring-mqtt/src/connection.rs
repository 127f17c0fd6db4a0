//! One client connection, from CONNECT to the end, over any byte stream (TCP, TLS or the
//! WebSocket bridge).
//!
//! The connection is a single task: it reads and decodes packets, answers them, writes the
//! messages its session has queued, acknowledges QoS 1/2 publishes once the broker says
//! they are durable (in order), watches the keep-alive (1.5 x the negotiated value), and
//! reacts to a takeover or the server's shutdown. What it reads and the messages it sends
//! each stay within the profile's byte rate (AWS: 512 KiB/s per connection, the excess
//! delayed). Every way a connection can end maps to
//! an AWS `disconnectReason`, to whether the will is published, and for MQTT 5 to the
//! reason code of the server's DISCONNECT.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::auth::{ClientInfo, ConnectRequest, Principal, Transport};
use crate::broker::{self, Broker, Kick, Message, OpenRequest, Origin, Session};
use crate::codec::{
    self, reason, Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, SubAck,
    UnsubAck, Will, V5,
};
use crate::lifecycle::{self, DisconnectReason};
use crate::parking::Millis;
use crate::store::MessageProperties;
use crate::topic::{self, TopicError};

/// Time a client has to send CONNECT after opening the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection closed for a protocol error keeps reading (and discarding) after
/// its DISCONNECT, so the client sees the reason code.
const DISCONNECT_LINGER: Duration = Duration::from_millis(500);
/// Smallest and largest read size; the read buffer adapts between them while the
/// connection is busy and is released when it is idle.
const READ_MIN: usize = 512;
const READ_MAX: usize = 64 * 1024;
/// Size of the stack buffer an idle connection reads into (it holds no read buffer).
const STACK_READ: usize = 4096;
/// An output buffer that grew beyond this during a burst is released after the flush.
const OUT_KEEP: usize = 64 * 1024;
/// A flush smaller than this releases the output buffer.
const OUT_RELEASE: usize = 4 * 1024;
/// Longest Message Expiry Interval AWS keeps (7 days).
const AWS_MAX_MESSAGE_EXPIRY: u32 = 604_800;
/// A plain-TCP connection with nothing to do for this long is parked: its task ends and the
/// parking lot ([`crate::parking`]) waits on its socket instead. A new connection parks
/// soon after its CONNACK (most devices then sit idle, and a task that lives on only holds
/// memory); one that was woken from the lot has shown it has traffic, so it waits longer,
/// to spare a chatty client a park and wake-up between every two packets.
const PARK_FIRST_AFTER: Duration = Duration::from_millis(10);
const PARK_AFTER: Duration = Duration::from_secs(1);

/// A byte stream a connection runs over. A plain TCP socket can be parked while idle
/// ([`ConnectionStream::PARKABLE`]); TLS and the WebSocket bridge cannot, because their
/// state lives in the stream, so their idle connections keep their task.
pub trait ConnectionStream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// Whether [`ConnectionStream::into_socket`] gives the socket.
    const PARKABLE: bool = false;

    /// The underlying socket, taken from the runtime's reactor.
    fn into_socket(self) -> std::io::Result<std::net::TcpStream> {
        Err(std::io::Error::other("this stream cannot be parked"))
    }
}

impl ConnectionStream for tokio::net::TcpStream {
    const PARKABLE: bool = true;

    fn into_socket(self) -> std::io::Result<std::net::TcpStream> {
        self.into_std()
    }
}

impl ConnectionStream for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

impl ConnectionStream for tokio::io::DuplexStream {}

/// What the listener knows about the peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub transport: Transport,
    pub remote: Option<SocketAddr>,
    pub principal: Principal,
}

/// Why the main loop returned.
enum Step {
    /// The connection ends.
    Exit(Exit),
    /// The connection is idle and its stream parkable: park it.
    Park,
}

/// How a connection ends.
struct Exit {
    reason: DisconnectReason,
    /// MQTT 5 DISCONNECT reason code to send (none for network loss or client DISCONNECT).
    code: Option<u8>,
    message: Option<&'static str>,
    send_will: bool,
    expiry_override: Option<u32>,
}

impl Exit {
    fn new(reason: DisconnectReason) -> Exit {
        Exit {
            reason,
            code: reason.mqtt5_code(),
            message: None,
            send_will: reason.sends_will(),
            expiry_override: None,
        }
    }

    /// Closed from outside ([`Broker`] kicked it).
    fn kicked(kick: Kick) -> Exit {
        Exit {
            send_will: kick.send_will,
            expiry_override: kick.end_session.then_some(0),
            ..Exit::new(kick.reason)
        }
    }

    fn client_error(code: u8, message: &'static str) -> Exit {
        Exit {
            code: Some(code),
            message: Some(message),
            ..Exit::new(DisconnectReason::ClientError)
        }
    }
}

/// Serves one connection to completion.
///
/// The task's future is what an idle connection costs, so it is kept small: the
/// handshake (CONNECT with its properties, the CONNACK) and the ending (DISCONNECT, will,
/// lifecycle event) run as boxed futures that exist only while they run, and the loop in
/// between holds only [`Connection`] and one timer.
pub async fn serve<S: ConnectionStream>(broker: Broker, stream: S, peer: PeerInfo) {
    let Some(conn) = Box::pin(handshake(broker, stream, peer)).await else {
        return;
    };
    run(conn).await
}

/// Runs an open connection until it ends or parks.
async fn run<S: ConnectionStream>(mut conn: Connection<S>) {
    match conn.main_loop().await {
        Step::Exit(exit) => Box::pin(conn.finish(exit)).await,
        Step::Park => conn.park(),
    }
}

/// Continues a parked connection in a new task (the parking lot's `resume`).
pub(crate) fn resume(
    broker: Broker,
    socket: std::net::TcpStream,
    record: ParkedConnection,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let (kicked, exit) = match broker.relink(record.session(), record.connection_id()) {
            Ok(kicked) => (Some(kicked), None),
            Err(kick) => (None, Some(Exit::kicked(kick))),
        };
        match (tokio::net::TcpStream::from_std(socket), exit) {
            (Ok(stream), None) => run(Connection::unpark(broker, stream, record, kicked)).await,
            (Ok(stream), Some(exit)) => {
                let conn = Connection::unpark(broker, stream, record, kicked);
                Box::pin(conn.finish(exit)).await
            }
            (Err(e), _) => {
                tracing::warn!(error = %e, "resuming a parked connection failed");
                lost_without_stream(broker, record, kicked).await
            }
        }
    })
}

/// Ends a connection whose socket could not be moved to or from the parking lot as lost
/// (will, `disconnected` event), over a stand-in stream.
async fn lost_without_stream(
    broker: Broker,
    record: ParkedConnection,
    kicked: Option<tokio::sync::oneshot::Receiver<Kick>>,
) {
    let (stand_in, _) = tokio::io::duplex(1);
    let conn = Connection::unpark(broker, stand_in, record, kicked);
    Box::pin(conn.finish(Exit::new(DisconnectReason::ConnectionLost))).await
}

/// Reads CONNECT and opens the session; `None` when the connection ended there.
async fn handshake<S: ConnectionStream>(
    broker: Broker,
    mut stream: S,
    peer: PeerInfo,
) -> Option<Connection<S>> {
    let max_packet = broker.profile().max_packet_size;
    let mut inbuf = BytesMut::with_capacity(READ_MIN);
    let connect = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_connect(&mut stream, &mut inbuf, max_packet),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(Some(DecodeError::UnsupportedVersion(v)))) => {
            tracing::debug!(version = v, "unsupported protocol version");
            // Return code 1 "unacceptable protocol version" in the 3.1.1 format.
            let mut out = BytesMut::new();
            codec::encode(
                &Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: 1,
                    properties: Properties::default(),
                }),
                codec::V311,
                &mut out,
            );
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = ?e, "connection closed before a valid CONNECT");
            let _ = stream.shutdown().await;
            return None;
        }
        Err(_) => {
            let _ = stream.shutdown().await;
            return None;
        }
    };
    Connection::open(broker, stream, peer, connect, inbuf).await
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    inbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<Box<Connect>, Option<DecodeError>> {
    loop {
        match codec::decode(inbuf, None, max_packet) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(Some(DecodeError::Protocol("first packet not CONNECT"))),
            Ok(None) => {}
            Err(e) => return Err(Some(e)),
        }
        match stream.read_buf(inbuf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// Acks owed to the client, in publish order; `None` means the message could not be made
/// durable. Created on the first ack that has to wait, so a connection that never
/// publishes at QoS 1/2 holds none of it.
#[derive(Default)]
struct AckQueue(Option<Box<FuturesOrdered<BoxFuture<'static, Option<OwedAck>>>>>);

impl AckQueue {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    fn push_back(&mut self, ack: BoxFuture<'static, Option<OwedAck>>) {
        self.0.get_or_insert_with(Default::default).push_back(ack)
    }

    async fn next(&mut self) -> Option<Option<OwedAck>> {
        match &mut self.0 {
            Some(queue) => queue.next().await,
            None => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // named after the packets
enum AckKind {
    PubAck,
    PubRec,
    PubComp,
}

/// An acknowledgement owed to the client (small, so the queue of owed acks is too).
#[derive(Debug, Clone, Copy)]
struct OwedAck {
    kind: AckKind,
    packet_id: u16,
    code: u8,
}

impl OwedAck {
    fn new(kind: AckKind, packet_id: u16, code: u8) -> OwedAck {
        OwedAck {
            kind,
            packet_id,
            code,
        }
    }

    fn packet(self) -> Packet {
        let ack = Ack::new(self.packet_id, self.code);
        match self.kind {
            AckKind::PubAck => Packet::PubAck(ack),
            AckKind::PubRec => Packet::PubRec(ack),
            AckKind::PubComp => Packet::PubComp(ack),
        }
    }
}

/// Per-connection state most connections never use (QoS 2 publishes, topic aliases),
/// allocated on first use.
#[derive(Default)]
struct RareState {
    inbound_qos2: HashSet<u16>,
    aliases: HashMap<u16, String>,
}

struct Connection<S> {
    broker: Broker,
    stream: S,
    version: u8,
    client: Arc<ClientInfo>,
    session: Arc<Session>,
    connection_id: u64,
    expiry_secs: u32,
    /// Bytes received and not yet decoded; released while the connection is idle.
    inbuf: BytesMut,
    /// Read size while the connection is busy (adapts between `READ_MIN` and `READ_MAX`).
    read_size: usize,
    out: BytesMut,
    pending_acks: AckQueue,
    /// QoS 1 publishes whose PUBACK waits in `pending_acks` (QoS 2 ones are in
    /// `inbound_qos2` until PUBREL).
    pending_qos1: usize,
    rare: Option<Box<RareState>>,
    problem_information: bool,
    /// Start of the current one-second window of the inbound publish rate limit.
    rate_window: Instant,
    rate_count: u32,
    keep_alive: u16,
    /// End of a WebSocket connection's life.
    ttl_deadline: Option<Instant>,
    kicked: Option<tokio::sync::oneshot::Receiver<Kick>>,
    will: Option<Box<Will>>,
    /// The lifecycle version number of this connection (for the disconnected event).
    version_number: u64,
    /// When the client last sent something (the keep-alive counts from it).
    last_read: Instant,
    /// Whether the connection was parked before (see [`PARK_AFTER`]).
    resumed: bool,
    /// Bytes the client may still send now under `bytes_per_second_per_connection`.
    inbound_budget: ByteBudget,
    /// The same limit on the messages the broker sends the client, and while it is overspent,
    /// the wait before more are taken from the session's queue (AWS: "excess delayed").
    /// Allocated when the connection is first sent a message.
    outbound: Option<Box<OutboundThrottle>>,
    /// While set, nothing more is decoded or read until it resolves: the client sent faster
    /// than its byte rate, or subscribers it published to are backlogged
    /// ([`Broker::wait_for_room`]).
    read_gate: Option<BoxFuture<'static, ()>>,
}

/// What a parked connection keeps (see [`crate::parking`]): [`Connection`] without its
/// stream, buffers and pending work (a connection parks only when it has none).
pub(crate) struct ParkedConnection {
    version: u8,
    problem_information: bool,
    keep_alive: u16,
    expiry_secs: u32,
    rate_count: u32,
    client: Arc<ClientInfo>,
    session: Arc<Session>,
    connection_id: u64,
    version_number: u64,
    rare: Option<Box<RareState>>,
    will: Option<Box<Will>>,
    rate_window: Millis,
    last_read: Millis,
    inbound_budget: ParkedBudget,
    outbound_budget: Option<ParkedBudget>,
}

/// A [`ByteBudget`] in a parked record.
struct ParkedBudget {
    left: i64,
    at: Millis,
}

impl ByteBudget {
    fn park(self) -> ParkedBudget {
        ParkedBudget {
            left: self.left,
            at: Millis::of(self.at.into_std()),
        }
    }

    fn unpark(parked: ParkedBudget) -> ByteBudget {
        ByteBudget {
            left: parked.left,
            at: Instant::from_std(parked.at.instant()),
        }
    }
}

impl ParkedConnection {
    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub(crate) fn connection_id(&self) -> u64 {
        self.connection_id
    }
}

/// A byte rate's budget: bytes that may pass now (negative: owed), as of `at`. It refills at
/// the rate, up to one second's worth.
struct ByteBudget {
    left: i64,
    at: Instant,
}

impl ByteBudget {
    fn full(rate: Option<u64>) -> ByteBudget {
        ByteBudget {
            left: rate.map_or(0, |rate| rate as i64),
            at: Instant::now(),
        }
    }

    /// Charges `n` bytes at `now`; returns how long to pause when that overspends.
    fn spend(&mut self, rate: u64, n: usize, now: Instant) -> Option<Duration> {
        let rate = rate as i64;
        let earned = (now.duration_since(self.at).as_secs_f64() * rate as f64) as i64;
        self.at = now;
        self.left = (self.left.saturating_add(earned)).min(rate) - n as i64;
        (self.left < 0).then(|| Duration::from_secs_f64(-self.left as f64 / rate as f64))
    }
}

/// See [`Connection::outbound`].
struct OutboundThrottle {
    budget: ByteBudget,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

fn connack(code: u8, session_present: bool, properties: Properties) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code,
        properties,
    })
}

impl<S: ConnectionStream> Connection<S> {
    async fn refuse(stream: &mut S, version: u8, v5_code: u8, v3_code: Option<u8>) {
        let mut out = BytesMut::new();
        if version == V5 {
            codec::encode(
                &connack(v5_code, false, Properties::default()),
                V5,
                &mut out,
            );
        } else if let Some(code) = v3_code {
            codec::encode(
                &connack(code, false, Properties::default()),
                version,
                &mut out,
            );
        }
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
    }

    /// Validates CONNECT, opens the session, answers CONNACK and emits `connected`.
    async fn open(
        broker: Broker,
        mut stream: S,
        peer: PeerInfo,
        mut connect: Box<Connect>,
        inbuf: BytesMut,
    ) -> Option<Connection<S>> {
        let profile = broker.profile();
        let version = connect.protocol_version;
        let v5 = version == V5;
        let mut client_id = std::mem::take(&mut connect.client_id);
        let mut assigned = None;
        if client_id.is_empty() {
            if v5 || connect.clean_start {
                client_id = format!("mooring-{}", uuid::Uuid::new_v4().simple());
                assigned = Some(client_id.clone());
            } else {
                Self::refuse(&mut stream, version, reason::CLIENT_ID_NOT_VALID, Some(2)).await;
                return None;
            }
        }
        if profile
            .max_client_id_bytes
            .is_some_and(|max| client_id.len() > max)
        {
            Self::refuse(&mut stream, version, reason::CLIENT_ID_NOT_VALID, Some(2)).await;
            return None;
        }
        if connect.properties.authentication_method.is_some() {
            Self::refuse(
                &mut stream,
                version,
                reason::BAD_AUTHENTICATION_METHOD,
                Some(4),
            )
            .await;
            return None;
        }
        let account = &broker.settings().account_id;
        let client = Arc::new(ClientInfo {
            client_id: Arc::from(client_id),
            principal_identifier: match (&peer.principal, &connect.username) {
                (Principal::Anonymous, Some(user)) if !user.is_empty() => Arc::from(user.as_str()),
                (p, _) => p.identifier(account),
            },
            principal: peer.principal.clone(),
            source_ip: peer.remote.map(|a| a.ip()),
            transport: peer.transport,
            protocol_version: version,
        });
        if let Some(will) = &connect.will {
            let refusal = if will.qos > profile.maximum_qos {
                Some(reason::QOS_NOT_SUPPORTED)
            } else if topic::validate_publish_topic(&will.topic, will.retain, profile).is_err() {
                Some(reason::TOPIC_NAME_INVALID)
            } else if profile.max_payload.is_some_and(|m| will.payload.len() > m) {
                Some(reason::PACKET_TOO_LARGE)
            } else {
                None
            };
            if let Some(code) = refusal {
                Self::refuse(&mut stream, version, code, None).await;
                return None;
            }
        }
        // Session expiry: 3.1.1 persistent sessions get the default; MQTT 5 asks.
        let requested_expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            profile.default_session_expiry
        };
        let expiry_secs = requested_expiry.min(profile.max_session_expiry);
        let anonymous_refused =
            peer.principal == Principal::Anonymous && !broker.settings().allow_anonymous;
        let authorized = !anonymous_refused
            && broker.authorizer().connect(&ConnectRequest {
                client: &client,
                password: connect.password.as_deref(),
                persistent: expiry_secs > 0,
                will_topic: connect.will.as_ref().map(|w| w.topic.as_str()),
            });
        if !authorized {
            broker.emit_connect_failed(&client);
            Self::refuse(&mut stream, version, reason::NOT_AUTHORIZED, Some(5)).await;
            return None;
        }
        if !broker.admit_connect(&client.client_id) {
            // Not an authorization failure, so no `connect_failed` (AWS emits it only for
            // those).
            tracing::debug!(client_id = %client.client_id, "CONNECT rate exceeded");
            Self::refuse(
                &mut stream,
                version,
                reason::CONNECTION_RATE_EXCEEDED,
                Some(3),
            )
            .await;
            return None;
        }
        let keep_alive = profile.keep_alive(connect.keep_alive, version);
        let (opened, ops) = broker.open_session(OpenRequest {
            client: client.clone(),
            clean_start: connect.clean_start,
            expiry_secs,
            client_receive_maximum: connect.properties.receive_maximum.unwrap_or(u16::MAX),
            client_topic_alias_maximum: connect.properties.topic_alias_maximum.unwrap_or(0),
            client_max_packet_size: connect
                .properties
                .maximum_packet_size
                .map(|m| m as usize)
                .unwrap_or(usize::MAX),
        });
        if let Err(e) = broker.persist(ops).await {
            tracing::error!(error = %e, "persisting the session failed");
            broker.close_connection(&opened.session, opened.connection_id, None);
            Self::refuse(&mut stream, version, reason::SERVER_UNAVAILABLE, Some(3)).await;
            return None;
        }
        let mut properties = Properties::default();
        if v5 {
            if expiry_secs != requested_expiry {
                properties.session_expiry_interval = Some(expiry_secs);
            }
            properties.receive_maximum = Some(broker::SERVER_RECEIVE_MAXIMUM);
            if profile.maximum_qos < 2 {
                properties.maximum_qos = Some(profile.maximum_qos);
            }
            properties.retain_available = Some(1);
            properties.maximum_packet_size = Some(profile.max_packet_size as u32);
            properties.assigned_client_identifier = assigned;
            properties.topic_alias_maximum = Some(profile.topic_alias_maximum);
            properties.wildcard_subscription_available = Some(1);
            if !profile.subscription_identifiers {
                properties.subscription_identifier_available = Some(0);
            }
            properties.shared_subscription_available = Some(1);
            if keep_alive != connect.keep_alive {
                properties.server_keep_alive = Some(keep_alive);
            }
        }
        let ttl = match peer.transport {
            Transport::WebSocket => profile.websocket_ttl_secs.map(Duration::from_secs),
            _ => None,
        };
        let mut conn = Connection {
            broker: broker.clone(),
            stream,
            version,
            client: client.clone(),
            session: opened.session.clone(),
            connection_id: opened.connection_id,
            expiry_secs,
            inbuf,
            read_size: READ_MIN,
            out: BytesMut::new(),
            pending_acks: AckQueue::default(),
            pending_qos1: 0,
            rare: None,
            problem_information: connect.properties.request_problem_information != Some(0),
            rate_window: Instant::now(),
            rate_count: 0,
            keep_alive,
            ttl_deadline: ttl.map(|t| Instant::now() + t),
            kicked: Some(opened.kicked),
            will: connect.will.take().map(Box::new),
            version_number: opened.version_number,
            last_read: Instant::now(),
            resumed: false,
            inbound_budget: ByteBudget::full(profile.bytes_per_second_per_connection),
            outbound: None,
            read_gate: None,
        };
        drop(connect);
        codec::encode(
            &connack(reason::SUCCESS, opened.session_present, properties),
            version,
            &mut conn.out,
        );
        if conn.flush().await.is_err() {
            broker.close_connection(&opened.session, opened.connection_id, None);
            return None;
        }
        if lifecycle::emits_events(&client.client_id) {
            let identity = broker.event_identity(&client, opened.session.session_identifier());
            let ip = client.source_ip.map(|i| i.to_string()).unwrap_or_default();
            let (topic, payload) =
                lifecycle::connected(&identity, broker.now(), &ip, opened.version_number);
            broker.publish_event(topic, payload);
        }
        Some(conn)
    }

    /// Ends the connection: tells an MQTT 5 client why, closes, publishes the will and
    /// emits `disconnected`.
    async fn finish(mut self, exit: Exit) {
        let broker = self.broker.clone();
        let v5 = self.version == V5;
        if v5 {
            if let Some(code) = exit.code {
                let properties = Properties {
                    reason_string: exit
                        .message
                        .filter(|_| self.problem_information)
                        .map(str::to_string),
                    ..Default::default()
                };
                codec::encode(
                    &Packet::Disconnect(Disconnect { code, properties }),
                    V5,
                    &mut self.out,
                );
                let _ = self.flush().await;
                if exit.reason == DisconnectReason::ClientError {
                    // Let the client read the DISCONNECT before the socket closes under
                    // packets it is still sending (which would reset the connection).
                    let mut sink = BytesMut::with_capacity(4096);
                    let _ = tokio::time::timeout(DISCONNECT_LINGER, async {
                        while matches!(self.stream.read_buf(&mut sink).await, Ok(n) if n > 0) {
                            sink.clear();
                        }
                    })
                    .await;
                }
            }
        }
        let _ = self.stream.shutdown().await;
        broker.close_connection(&self.session, self.connection_id, exit.expiry_override);
        if exit.send_will {
            if let Some(will) = self.will.take() {
                let will = *will;
                let now = broker.now();
                let delay = if v5 {
                    broker::will_delay(
                        &will.properties,
                        exit.expiry_override.unwrap_or(self.expiry_secs),
                    )
                } else {
                    0
                };
                let message = Message {
                    properties: message_properties(&will.properties),
                    expires_at_ms: message_expiry(&will.properties, broker.profile())
                        .map(|s| now + delay as i64 * 1000 + s as i64 * 1000),
                    topic: will.topic,
                    payload: will.payload,
                    qos: will.qos,
                    retain: will.retain,
                    origin: Origin {
                        client_id: Some(self.client.client_id.to_string()),
                        principal: Some(self.client.principal_identifier.to_string()),
                        source_ip: self.client.source_ip,
                        protocol_version: Some(self.version),
                    },
                };
                broker.schedule_will(self.session.clone(), message, delay);
            }
        }
        if lifecycle::emits_events(&self.client.client_id) {
            let identity = broker.event_identity(&self.client, self.session.session_identifier());
            let (topic, payload) =
                lifecycle::disconnected(&identity, broker.now(), self.version_number, exit.reason);
            broker.publish_event(topic, payload);
        }
    }

    /// Silence after which the connection is closed: 1.5 x the keep-alive.
    fn keep_alive_timeout(&self) -> Duration {
        Duration::from_millis(self.keep_alive as u64 * 1500)
    }

    /// Nothing pending in either direction: no bytes buffered, no acks owed, no gate, no
    /// outbound pause, and the server is not shutting down.
    fn is_idle(&self) -> bool {
        self.inbuf.is_empty()
            && self.out.is_empty()
            && self.pending_acks.is_empty()
            && self.read_gate.is_none()
            && !self.outbound_paused()
            && !self.broker.shutdown().is_triggered()
    }

    /// Hands the idle connection to the parking lot and ends its task. When the session got
    /// work in the meantime (or the lot is closed), it carries on in a new task instead.
    fn park(self) {
        let broker = self.broker.clone();
        let deadline =
            (self.keep_alive > 0).then(|| (self.last_read + self.keep_alive_timeout()).into_std());
        let (stream, record, kicked) = self.into_parked();
        let socket = match stream.into_socket() {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(error = %e, "parking a connection failed");
                broker
                    .shutdown()
                    .spawn(lost_without_stream(broker.clone(), record, kicked));
                return;
            }
        };
        if let Err((socket, record)) = broker.park(socket, deadline, record, kicked) {
            broker
                .shutdown()
                .spawn(resume(broker.clone(), socket, record));
        }
    }

    fn into_parked(
        self,
    ) -> (
        S,
        ParkedConnection,
        Option<tokio::sync::oneshot::Receiver<Kick>>,
    ) {
        let record = ParkedConnection {
            version: self.version,
            problem_information: self.problem_information,
            keep_alive: self.keep_alive,
            expiry_secs: self.expiry_secs,
            rate_count: self.rate_count,
            client: self.client,
            session: self.session,
            connection_id: self.connection_id,
            version_number: self.version_number,
            rare: self.rare,
            will: self.will,
            rate_window: Millis::of(self.rate_window.into_std()),
            last_read: Millis::of(self.last_read.into_std()),
            inbound_budget: self.inbound_budget.park(),
            outbound_budget: self.outbound.map(|t| t.budget.park()),
        };
        (self.stream, record, self.kicked)
    }

    /// The connection of a parked record, over `stream`, listening to `kicked`.
    fn unpark(
        broker: Broker,
        stream: S,
        record: ParkedConnection,
        kicked: Option<tokio::sync::oneshot::Receiver<Kick>>,
    ) -> Connection<S> {
        Connection {
            broker,
            stream,
            version: record.version,
            client: record.client,
            session: record.session,
            connection_id: record.connection_id,
            expiry_secs: record.expiry_secs,
            inbuf: BytesMut::new(),
            read_size: READ_MIN,
            out: BytesMut::new(),
            pending_acks: AckQueue::default(),
            pending_qos1: 0,
            rare: record.rare,
            problem_information: record.problem_information,
            rate_window: Instant::from_std(record.rate_window.instant()),
            rate_count: record.rate_count,
            keep_alive: record.keep_alive,
            ttl_deadline: None,
            kicked,
            will: record.will,
            version_number: record.version_number,
            last_read: Instant::from_std(record.last_read.instant()),
            resumed: true,
            inbound_budget: ByteBudget::unpark(record.inbound_budget),
            outbound: record.outbound_budget.map(|budget| {
                Box::new(OutboundThrottle {
                    budget: ByteBudget::unpark(budget),
                    pause: None,
                })
            }),
            read_gate: None,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await?;
        if self.out.len() < OUT_RELEASE || self.out.capacity() > OUT_KEEP {
            // Small writes (an idle connection's ping, an ack) keep no buffer; bursts keep
            // theirs for the next one, up to a bound.
            self.out = BytesMut::new();
        } else {
            self.out.clear();
        }
        Ok(())
    }

    async fn main_loop(&mut self) -> Step {
        let max_packet = self.broker.profile().max_packet_size;
        // Under a byte rate, reads stay small so the rate holds over short bursts too.
        let limited = self
            .broker
            .profile()
            .bytes_per_second_per_connection
            .is_some();
        let timeout = self.keep_alive_timeout();
        let mut last_read = self.last_read;
        // When the connection last did something (read, wrote), and when to check next
        // whether it has been idle for `park_after`.
        let mut active = Instant::now();
        let parkable = S::PARKABLE && self.ttl_deadline.is_none();
        let park_after = if self.resumed {
            PARK_AFTER
        } else {
            PARK_FIRST_AFTER
        };
        let mut park_check = active + park_after;
        // One timer serves the keep-alive, a WebSocket's life and parking: it fires at the
        // earliest of the three, and the keep-alive and activity are checked then (so reads
        // do not touch the timer).
        let next_deadline =
            |last_read: Instant, park_check: Instant, keep_alive: u16, ttl: Option<Instant>| {
                let keep = (keep_alive > 0).then(|| last_read + timeout);
                let park = parkable.then_some(park_check);
                [keep, ttl, park].into_iter().flatten().min()
            };
        let mut armed = next_deadline(last_read, park_check, self.keep_alive, self.ttl_deadline);
        let timer = tokio::time::sleep_until(armed.unwrap_or_else(Instant::now));
        tokio::pin!(timer);
        let broker = self.broker.clone();
        let stop = broker.shutdown().triggered();
        tokio::pin!(stop);
        let session = self.session.clone();
        let notified = session.notified();
        tokio::pin!(notified);
        // (No receiver: the kick's sender is gone, so no kick can come.)
        let (mut kicked, mut kicked_open) = match self.kicked.take() {
            Some(k) => (k, true),
            None => (tokio::sync::oneshot::channel().1, false),
        };
        // Packets that arrived together with CONNECT (or before a read gate).
        if let Err(exit) = Box::pin(self.decode_buffered(max_packet)).await {
            return Step::Exit(exit);
        }
        loop {
            if !self.outbound_paused() {
                let before = self.out.len();
                let ops = self.broker.fill_outgoing(
                    &self.session,
                    self.connection_id,
                    self.version,
                    &mut self.out,
                );
                self.broker.persist_background(ops);
                let sent = self.out.len() - before;
                if sent > 0 {
                    self.spend_outbound_budget(sent);
                    active = Instant::now();
                }
            }
            let paused = self.outbound_paused();
            if self.flush().await.is_err() {
                return Step::Exit(Exit::new(DisconnectReason::ConnectionLost));
            }
            tokio::select! {
                biased;
                r = &mut kicked, if kicked_open => {
                    kicked_open = false;
                    match r {
                        Ok(kick) => return Step::Exit(Exit::kicked(kick)),
                        Err(_) => continue,
                    }
                }
                _ = &mut timer, if armed.is_some() => {
                    let now = Instant::now();
                    if self.ttl_deadline.is_some_and(|t| t <= now) {
                        return Step::Exit(Exit::new(DisconnectReason::WebsocketTtlExpiration));
                    }
                    if self.read_gate.is_some() {
                        // Not reading is the broker's doing, not the client's silence.
                        last_read = now;
                    }
                    if self.keep_alive > 0 && now >= last_read + timeout {
                        return Step::Exit(Exit::new(DisconnectReason::MqttKeepAliveTimeout));
                    }
                    if parkable && now >= active + park_after && self.is_idle() {
                        // Polled once more with a no-op waker, so the channel lets go of this
                        // task's waker (which would keep the ended task's memory alive).
                        let mut noop = Context::from_waker(std::task::Waker::noop());
                        match std::future::Future::poll(Pin::new(&mut kicked), &mut noop) {
                            Poll::Ready(Ok(kick)) => return Step::Exit(Exit::kicked(kick)),
                            Poll::Ready(Err(_)) => kicked_open = false,
                            Poll::Pending => {}
                        }
                        self.last_read = last_read;
                        self.kicked = kicked_open.then_some(kicked);
                        return Step::Park;
                    }
                    if now >= park_check {
                        // Busy, or not idle long enough: look again later (never at a
                        // passed instant, which would spin the timer).
                        park_check = active.max(now) + park_after;
                    }
                    armed = next_deadline(last_read, park_check, self.keep_alive, self.ttl_deadline);
                    if let Some(at) = armed {
                        timer.as_mut().reset(at);
                    }
                }
                _ = &mut stop => {
                    return Step::Exit(Exit::new(DisconnectReason::ServerInitiatedDisconnect));
                }
                Some(ack) = self.pending_acks.next(), if !self.pending_acks.is_empty() => {
                    let Some(ack) = ack else {
                        return Step::Exit(Exit::new(DisconnectReason::ServerError));
                    };
                    if ack.kind == AckKind::PubAck {
                        self.pending_qos1 = self.pending_qos1.saturating_sub(1);
                    }
                    codec::encode(&ack.packet(), self.version, &mut self.out);
                    active = Instant::now();
                }
                _ = &mut notified => {
                    notified.set(session.notified());
                }
                _ = std::future::poll_fn(|cx| match self.outbound.as_mut().and_then(|t| t.pause.as_mut()) {
                    Some(pause) => std::future::Future::poll(pause.as_mut(), cx),
                    None => Poll::Pending,
                }), if paused => {
                    if let Some(throttle) = &mut self.outbound {
                        throttle.pause = None;
                    }
                }
                _ = std::future::poll_fn(|cx| match &mut self.read_gate {
                    Some(gate) => gate.as_mut().poll(cx),
                    None => Poll::Pending,
                }), if self.read_gate.is_some() => {
                    self.read_gate = None;
                    // Decode what was read before the wait.
                    if let Err(exit) = Box::pin(self.decode_buffered(max_packet)).await {
                        return Step::Exit(exit);
                    }
                }
                read = std::future::poll_fn(|cx| poll_read_input(&mut self.stream, &mut self.inbuf, &mut self.read_size, limited, cx)), if self.read_gate.is_none() => {
                    match read {
                        Ok(0) | Err(_) => return Step::Exit(Exit::new(DisconnectReason::ConnectionLost)),
                        Ok(n) => {
                            last_read = Instant::now();
                            active = last_read;
                            self.spend_byte_budget(n, last_read);
                            if let Err(exit) = Box::pin(self.decode_all(max_packet)).await {
                                return Step::Exit(exit);
                            }
                            if self.inbuf.is_empty() && n < STACK_READ {
                                // Nothing pending and no burst: give the buffer back.
                                self.inbuf = BytesMut::new();
                                self.read_size = READ_MIN;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Decodes packets already buffered (sent with CONNECT, or read before a read gate) and
    /// gives the buffer back once it is empty.
    async fn decode_buffered(&mut self, max_packet: usize) -> Result<(), Exit> {
        Box::pin(self.decode_all(max_packet)).await?;
        if self.inbuf.is_empty() {
            self.inbuf = BytesMut::new();
        }
        Ok(())
    }

    async fn decode_all(&mut self, max_packet: usize) -> Result<(), Exit> {
        loop {
            if self.read_gate.is_some() {
                // The rest waits for the gate.
                return Ok(());
            }
            match codec::decode(&mut self.inbuf, Some(self.version), max_packet) {
                Ok(Some(packet)) => self.handle(packet).await?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::debug!(client_id = %self.client.client_id, error = %e, "closing on a bad packet");
                    let message = match e {
                        DecodeError::Malformed(m) | DecodeError::Protocol(m) => m,
                        DecodeError::TooLarge { .. } => "packet too large",
                        DecodeError::UnsupportedVersion(_) => "unsupported protocol version",
                        DecodeError::TopicAlias => "invalid topic alias",
                    };
                    return Err(Exit::client_error(e.reason_code(), message));
                }
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), Exit> {
        let v5 = self.version == V5;
        match packet {
            Packet::Publish(p) => self.handle_publish(p)?,
            Packet::PubRel(a) => {
                let code = if self.rare().inbound_qos2.remove(&a.packet_id) {
                    reason::SUCCESS
                } else {
                    reason::PACKET_ID_NOT_FOUND
                };
                let comp = OwedAck::new(AckKind::PubComp, a.packet_id, if v5 { code } else { 0 });
                self.push_ack_ready(comp);
            }
            ack @ (Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)) => {
                let (reply, ops) = self.broker.acknowledge(&self.session, &ack);
                self.broker.persist_background(ops);
                if let Some(reply) = reply {
                    codec::encode(&reply, self.version, &mut self.out);
                }
            }
            Packet::Subscribe(s) => {
                if !self.broker.profile().subscription_identifiers
                    && !s.properties.subscription_identifiers.is_empty()
                {
                    return Err(Exit::client_error(
                        reason::SUBSCRIPTION_IDS_NOT_SUPPORTED,
                        "subscription identifiers are not supported",
                    ));
                }
                let sub_id = s.properties.subscription_identifiers.first().copied();
                let (codes, accepted, ops) =
                    self.broker
                        .subscribe(&self.session, &s.filters, sub_id, &self.client);
                if let Err(e) = self.broker.persist(ops).await {
                    tracing::error!(error = %e, "persisting subscriptions failed");
                    return Err(Exit::new(DisconnectReason::ServerError));
                }
                // Acks owed for earlier publishes go first, then the SUBACK.
                self.drain_pending_acks().await?;
                codec::encode(
                    &Packet::SubAck(SubAck {
                        packet_id: s.packet_id,
                        properties: Properties::default(),
                        codes,
                    }),
                    self.version,
                    &mut self.out,
                );
                self.subscription_event(true, &accepted);
            }
            Packet::Unsubscribe(u) => {
                let (codes, removed, ops) = self.broker.unsubscribe(&self.session, &u.filters);
                if let Err(e) = self.broker.persist(ops).await {
                    tracing::error!(error = %e, "persisting subscriptions failed");
                    return Err(Exit::new(DisconnectReason::ServerError));
                }
                self.drain_pending_acks().await?;
                codec::encode(
                    &Packet::UnsubAck(UnsubAck {
                        packet_id: u.packet_id,
                        properties: Properties::default(),
                        codes: if v5 { codes } else { Vec::new() },
                    }),
                    self.version,
                    &mut self.out,
                );
                self.subscription_event(false, &removed);
            }
            Packet::PingReq => codec::encode(&Packet::PingResp, self.version, &mut self.out),
            Packet::Disconnect(d) => {
                let mut exit = Exit::new(DisconnectReason::ClientInitiatedDisconnect);
                exit.code = None;
                exit.send_will = d.code == reason::DISCONNECT_WITH_WILL;
                if let Some(expiry) = d.properties.session_expiry_interval {
                    if self.expiry_secs == 0 && expiry > 0 {
                        return Err(Exit::client_error(
                            reason::PROTOCOL_ERROR,
                            "session expiry cannot be set on DISCONNECT after 0 at CONNECT",
                        ));
                    }
                    exit.expiry_override =
                        Some(expiry.min(self.broker.profile().max_session_expiry));
                }
                return Err(exit);
            }
            Packet::Auth(_) => {
                return Err(Exit::client_error(
                    reason::PROTOCOL_ERROR,
                    "enhanced authentication is not supported",
                ))
            }
            other => {
                tracing::debug!(packet = other.name(), "unexpected packet from a client");
                return Err(Exit::client_error(
                    reason::PROTOCOL_ERROR,
                    "packet type not allowed from a client",
                ));
            }
        }
        Ok(())
    }

    /// Charges `n` bytes read against the connection's byte rate; when it is exceeded,
    /// reading pauses until the budget is paid back.
    fn spend_byte_budget(&mut self, n: usize, now: Instant) {
        let Some(rate) = self.broker.profile().bytes_per_second_per_connection else {
            return;
        };
        if let Some(wait) = self.inbound_budget.spend(rate, n, now) {
            self.read_gate = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }

    /// Charges `n` bytes of messages sent to the client against the connection's byte
    /// rate; when it is exceeded, no more are taken from the session until it is paid back.
    fn spend_outbound_budget(&mut self, n: usize) {
        let Some(rate) = self.broker.profile().bytes_per_second_per_connection else {
            return;
        };
        let throttle = self.outbound.get_or_insert_with(|| {
            Box::new(OutboundThrottle {
                budget: ByteBudget::full(Some(rate)),
                pause: None,
            })
        });
        if let Some(wait) = throttle.budget.spend(rate, n, Instant::now()) {
            throttle.pause = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }

    /// Whether sending messages is paused by the outbound byte rate.
    fn outbound_paused(&self) -> bool {
        self.outbound.as_ref().is_some_and(|t| t.pause.is_some())
    }

    fn rare(&mut self) -> &mut RareState {
        self.rare.get_or_insert_with(Default::default)
    }

    fn inbound_qos2_len(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.inbound_qos2.len())
    }

    /// Waits for every owed publish ack and queues them (before a SUBACK or UNSUBACK).
    async fn drain_pending_acks(&mut self) -> Result<(), Exit> {
        while let Some(ack) = self.pending_acks.next().await {
            let Some(ack) = ack else {
                return Err(Exit::new(DisconnectReason::ServerError));
            };
            codec::encode(&ack.packet(), self.version, &mut self.out);
        }
        self.pending_qos1 = 0;
        Ok(())
    }

    /// Counts an inbound PUBLISH against the per-connection rate limit; true when over it.
    fn over_publish_rate(&mut self) -> bool {
        let Some(limit) = self.broker.profile().publishes_per_second else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(self.rate_window) >= Duration::from_secs(1) {
            self.rate_window = now;
            self.rate_count = 0;
        }
        self.rate_count += 1;
        self.rate_count > limit
    }

    fn push_ack_ready(&mut self, ack: OwedAck) {
        if self.pending_acks.is_empty() {
            codec::encode(&ack.packet(), self.version, &mut self.out);
        } else {
            if ack.kind == AckKind::PubAck {
                self.pending_qos1 += 1;
            }
            self.pending_acks
                .push_back(Box::pin(futures::future::ready(Some(ack))));
        }
    }

    fn subscription_event(&self, subscribed: bool, filters: &[String]) {
        if filters.is_empty() || !lifecycle::emits_events(&self.client.client_id) {
            return;
        }
        let identity = self
            .broker
            .event_identity(&self.client, self.session.session_identifier());
        let (topic, payload) =
            lifecycle::subscriptions(&identity, self.broker.now(), subscribed, filters);
        self.broker.publish_event(topic, payload);
    }

    fn handle_publish(&mut self, p: codec::Publish) -> Result<(), Exit> {
        let broker = self.broker.clone();
        let profile = broker.profile();
        let v5 = self.version == V5;
        if p.qos > profile.maximum_qos {
            return Err(Exit::client_error(
                reason::QOS_NOT_SUPPORTED,
                "QoS 2 is not supported",
            ));
        }
        if self.over_publish_rate() {
            if !v5 {
                return Err(Exit::new(DisconnectReason::Throttled));
            }
            match p.qos {
                1 => self.push_ack_ready(OwedAck::new(
                    AckKind::PubAck,
                    p.packet_id,
                    reason::QUOTA_EXCEEDED,
                )),
                2 => self.push_ack_ready(OwedAck::new(
                    AckKind::PubRec,
                    p.packet_id,
                    reason::QUOTA_EXCEEDED,
                )),
                _ => {}
            }
            return Ok(());
        }
        let mut topic_name = p.topic;
        if let Some(alias) = p.properties.topic_alias {
            if !v5 || alias > profile.topic_alias_maximum {
                return Err(Exit::client_error(
                    reason::TOPIC_ALIAS_INVALID,
                    "topic alias above the maximum",
                ));
            }
            if topic_name.is_empty() {
                match self.rare().aliases.get(&alias) {
                    Some(t) => topic_name = t.clone(),
                    None => {
                        return Err(Exit::client_error(
                            reason::PROTOCOL_ERROR,
                            "unknown topic alias",
                        ))
                    }
                }
            } else {
                self.rare().aliases.insert(alias, topic_name.clone());
            }
        } else if topic_name.is_empty() {
            return Err(Exit::client_error(
                reason::TOPIC_NAME_INVALID,
                "empty topic name",
            ));
        }
        if profile.max_payload.is_some_and(|max| p.payload.len() > max) {
            return Err(Exit::client_error(
                reason::PACKET_TOO_LARGE,
                "payload larger than 128 KB",
            ));
        }
        let qos_ack = |code: u8| -> Option<OwedAck> {
            match p.qos {
                1 => Some(OwedAck::new(AckKind::PubAck, p.packet_id, code)),
                2 => Some(OwedAck::new(AckKind::PubRec, p.packet_id, code)),
                _ => None,
            }
        };
        if let Err(e) = topic::validate_publish_topic(&topic_name, p.retain, profile) {
            if !v5 {
                // A 3.1.1 client cannot be told; AWS closes the connection.
                return Err(match e {
                    TopicError::Invalid(_) => {
                        Exit::client_error(reason::TOPIC_NAME_INVALID, "invalid topic")
                    }
                    TopicError::Reserved(_) => Exit::new(DisconnectReason::ForbiddenAccess),
                });
            }
            let code = match e {
                TopicError::Invalid(_) => reason::TOPIC_NAME_INVALID,
                TopicError::Reserved(_) => reason::NOT_AUTHORIZED,
            };
            if let Some(ack) = qos_ack(code) {
                self.push_ack_ready(ack);
            }
            return Ok(());
        }
        if !self
            .broker
            .authorizer()
            .publish(&self.client, &topic_name, p.retain)
        {
            if !v5 {
                return Err(Exit {
                    code: None,
                    ..Exit::new(DisconnectReason::AuthError)
                });
            }
            if let Some(ack) = qos_ack(reason::NOT_AUTHORIZED) {
                self.push_ack_ready(ack);
            }
            return Ok(());
        }
        if p.qos > 0 {
            if self.pending_qos1 + self.inbound_qos2_len()
                >= broker::SERVER_RECEIVE_MAXIMUM as usize
                && v5
            {
                return Err(Exit::client_error(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "receive maximum exceeded",
                ));
            }
            if p.qos == 2
                && self
                    .rare
                    .as_ref()
                    .is_some_and(|r| r.inbound_qos2.contains(&p.packet_id))
            {
                // A retransmission of a message already accepted.
                if let Some(ack) = qos_ack(reason::SUCCESS) {
                    self.push_ack_ready(ack);
                }
                return Ok(());
            }
        }
        let now = self.broker.now();
        let message = Message {
            topic: topic_name,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: message_properties(&p.properties),
            expires_at_ms: message_expiry(&p.properties, profile).map(|s| now + s as i64 * 1000),
            origin: Origin {
                client_id: Some(self.client.client_id.to_string()),
                principal: Some(self.client.principal_identifier.to_string()),
                source_ip: self.client.source_ip,
                protocol_version: Some(self.version),
            },
        };
        let broker::Routed {
            ops,
            barriers,
            backlogged,
        } = self.broker.route_from_client(Arc::new(message), p.qos > 0);
        if !backlogged.is_empty() {
            let broker = self.broker.clone();
            // (Packets are only decoded while no gate is set, so none is replaced here.)
            self.read_gate = Some(Box::pin(
                async move { broker.wait_for_room(backlogged).await },
            ));
        }
        match p.qos {
            0 => self.broker.persist_background(ops),
            qos => {
                if qos == 2 {
                    self.rare().inbound_qos2.insert(p.packet_id);
                }
                let pid = p.packet_id;
                let make = move |code: u8| {
                    if qos == 1 {
                        OwedAck::new(AckKind::PubAck, pid, code)
                    } else {
                        OwedAck::new(AckKind::PubRec, pid, code)
                    }
                };
                if ops.is_empty() && barriers.is_empty() {
                    self.push_ack_ready(make(reason::SUCCESS));
                } else {
                    if qos == 1 {
                        self.pending_qos1 += 1;
                    }
                    let durable = (!ops.is_empty()).then(|| self.broker.persist_later(ops));
                    let v5 = self.version == V5;
                    // An MQTT 5 client is told the publish failed; a 3.1.1 client cannot be,
                    // so its connection closes (SERVER_ERROR) without the ack.
                    self.pending_acks.push_back(Box::pin(async move {
                        let mut stored = true;
                        for receiver in durable.into_iter().chain(barriers) {
                            stored &= matches!(receiver.await, Ok(Ok(())));
                        }
                        if stored {
                            Some(make(reason::SUCCESS))
                        } else if v5 {
                            Some(make(reason::UNSPECIFIED_ERROR))
                        } else {
                            None
                        }
                    }));
                }
            }
        }
        Ok(())
    }
}

/// Reads what the client sent: into `inbuf` while the connection is busy, else through a
/// stack buffer, so an idle connection holds no read buffer. A `limited` connection (one
/// under a byte rate) always reads through the stack buffer, at most `STACK_READ` bytes
/// at a time.
fn poll_read_input<S: AsyncRead + Unpin>(
    stream: &mut S,
    inbuf: &mut BytesMut,
    read_size: &mut usize,
    limited: bool,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    let spare = inbuf.capacity() - inbuf.len();
    if spare >= READ_MIN && !limited {
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(stream), cx, inbuf))?;
        // Grow the read size while reads fill the buffer, shrink it while they are small.
        if n >= spare {
            *read_size = (*read_size * 2).min(READ_MAX);
        } else if n < *read_size / 8 {
            *read_size = (*read_size / 2).max(READ_MIN);
        }
        if inbuf.capacity() - inbuf.len() < *read_size / 2 {
            inbuf.reserve(*read_size);
        }
        return Poll::Ready(Ok(n));
    }
    let mut stack = [0u8; STACK_READ];
    let mut buf = ReadBuf::new(&mut stack);
    ready!(Pin::new(stream).poll_read(cx, &mut buf))?;
    let n = buf.filled().len();
    if n == STACK_READ && !limited {
        // A busy connection: read straight into the buffer from now on.
        *read_size = (STACK_READ * 4).min(READ_MAX);
        inbuf.reserve(n + *read_size);
    }
    inbuf.extend_from_slice(buf.filled());
    Poll::Ready(Ok(n))
}

fn message_properties(p: &Properties) -> MessageProperties {
    MessageProperties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.as_ref().map(|b: &Bytes| b.to_vec()),
        user_properties: p.user_properties.clone(),
    }
}

/// The Message Expiry Interval to apply, seconds; AWS turns 0 into 1 and clamps to 7 days.
fn message_expiry(p: &Properties, profile: &crate::profile::Profile) -> Option<u32> {
    let requested = p.message_expiry_interval?;
    if profile.name == "aws" {
        Some(requested.clamp(1, AWS_MAX_MESSAGE_EXPIRY))
    } else {
        Some(requested)
    }
}
