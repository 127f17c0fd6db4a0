//! The MQTT 3.1.1 and 5.0 wire codec, written by hand: fixed header, variable-length
//! integers, properties, and every control packet in both directions.
//!
//! [`decode`] takes bytes from a connection's read buffer and returns one packet once it is
//! complete. It never trusts a length: the remaining length is checked against the
//! connection's maximum packet size before a byte of the body is buffered, every field read
//! is bounds-checked, and every violation becomes a [`DecodeError`] that maps to the MQTT 5
//! reason code the broker sends before closing the connection (0x81 Malformed Packet, 0x82
//! Protocol Error, 0x95 Packet too large, 0x84 Unsupported Protocol Version). Payloads are
//! zero-copy slices of the frozen read buffer. [`encode`] writes packets for either protocol
//! version; properties are only written for version 5.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol level byte of MQTT 3.1 (`MQIsdp`), accepted and served with 3.1.1 semantics.
pub const V31: u8 = 3;
pub const V311: u8 = 4;
pub const V5: u8 = 5;

/// Reason codes of MQTT 5 used by the broker.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS1: u8 = 0x01;
    pub const GRANTED_QOS2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARDS_NOT_SUPPORTED: u8 = 0xA2;
}

/// Why a packet could not be decoded; each maps to the reason code sent before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("invalid topic alias")]
    TopicAlias,
}

impl DecodeError {
    /// The MQTT 5 reason code for this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::TopicAlias => reason::TOPIC_ALIAS_INVALID,
        }
    }
}

type DResult<T> = Result<T, DecodeError>;

/// MQTT 5 properties of any packet. Absent properties are `None`/empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// The last will carried by a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol_version: u8,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// MQTT 5 reason code; for 3.1.1 the return code (0-5).
    pub code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub packet_id: u16,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: u16,
    pub code: u8,
    pub properties: Properties,
}

impl Ack {
    pub fn new(packet_id: u16, code: u8) -> Self {
        Ack {
            packet_id,
            code,
            properties: Properties::default(),
        }
    }
}

/// Subscription options of one SUBSCRIBE entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<(String, SubscriptionOptions)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub properties: Properties,
    pub codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub properties: Properties,
    pub codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// Decodes one packet from the front of `buf`, removing its bytes. Returns `Ok(None)` when
/// more bytes are needed. `version` is the protocol version negotiated by CONNECT (`None`
/// before it: then only CONNECT is accepted); `max_packet_size` bounds the whole packet.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<u8>,
    max_packet_size: usize,
) -> DResult<Option<Packet>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let first = buf[0];
    let mut remaining: usize = 0;
    let mut multiplier: usize = 1;
    let mut header_len = 1;
    loop {
        if header_len > 4 {
            return Err(DecodeError::Malformed(
                "remaining length longer than 4 bytes",
            ));
        }
        let Some(&byte) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining += (byte & 0x7F) as usize * multiplier;
        multiplier *= 128;
        header_len += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(DecodeError::TooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(header_len);
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    if version.is_none() && packet_type != 1 {
        return Err(DecodeError::Protocol("the first packet must be CONNECT"));
    }
    let v = version.unwrap_or(V311);
    let mut r = Reader { buf: frame };
    let packet = match packet_type {
        1 => {
            if version.is_some() {
                return Err(DecodeError::Protocol("second CONNECT"));
            }
            expect_flags(flags, 0)?;
            Packet::Connect(Box::new(decode_connect(&mut r)?))
        }
        2 => {
            expect_flags(flags, 0)?;
            let ack_flags = r.u8()?;
            if ack_flags & 0xFE != 0 {
                return Err(DecodeError::Malformed("CONNACK flags"));
            }
            let code = r.u8()?;
            let properties = if v == V5 {
                r.properties()?
            } else {
                Properties::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: ack_flags & 1 == 1,
                code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(&mut r, flags, v)?),
        4 => {
            expect_flags(flags, 0)?;
            Packet::PubAck(decode_ack(&mut r, v)?)
        }
        5 => {
            expect_flags(flags, 0)?;
            Packet::PubRec(decode_ack(&mut r, v)?)
        }
        6 => {
            expect_flags(flags, 2)?;
            Packet::PubRel(decode_ack(&mut r, v)?)
        }
        7 => {
            expect_flags(flags, 0)?;
            Packet::PubComp(decode_ack(&mut r, v)?)
        }
        8 => {
            expect_flags(flags, 2)?;
            Packet::Subscribe(decode_subscribe(&mut r, v)?)
        }
        9 => {
            expect_flags(flags, 0)?;
            let packet_id = r.packet_id()?;
            let properties = if v == V5 {
                r.properties()?
            } else {
                Properties::default()
            };
            let codes = r.rest().to_vec();
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                codes,
            })
        }
        10 => {
            expect_flags(flags, 2)?;
            let packet_id = r.packet_id()?;
            let properties = if v == V5 {
                r.properties()?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while r.has_remaining() {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        }
        11 => {
            expect_flags(flags, 0)?;
            let packet_id = r.packet_id()?;
            let properties = if v == V5 {
                r.properties()?
            } else {
                Properties::default()
            };
            let codes = if v == V5 { r.rest().to_vec() } else { vec![] };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                codes,
            })
        }
        12 => {
            expect_flags(flags, 0)?;
            Packet::PingReq
        }
        13 => {
            expect_flags(flags, 0)?;
            Packet::PingResp
        }
        14 => {
            expect_flags(flags, 0)?;
            let (code, properties) = if v == V5 && r.has_remaining() {
                let code = r.u8()?;
                let props = if r.has_remaining() {
                    r.properties()?
                } else {
                    Properties::default()
                };
                (code, props)
            } else {
                (0, Properties::default())
            };
            Packet::Disconnect(Disconnect { code, properties })
        }
        15 if v == V5 => {
            expect_flags(flags, 0)?;
            let (code, properties) = if r.has_remaining() {
                let code = r.u8()?;
                let props = if r.has_remaining() {
                    r.properties()?
                } else {
                    Properties::default()
                };
                (code, props)
            } else {
                (0, Properties::default())
            };
            Packet::Auth(Auth { code, properties })
        }
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    };
    if r.has_remaining() {
        return Err(DecodeError::Malformed("trailing bytes after the packet"));
    }
    Ok(Some(packet))
}

fn expect_flags(flags: u8, wanted: u8) -> DResult<()> {
    if flags != wanted {
        return Err(DecodeError::Malformed("invalid fixed header flags"));
    }
    Ok(())
}

fn decode_connect(r: &mut Reader) -> DResult<Connect> {
    let name = r.string()?;
    let level = r.u8()?;
    match (name.as_str(), level) {
        ("MQTT", V311) | ("MQTT", V5) | ("MQIsdp", V31) => {}
        ("MQTT", other) | ("MQIsdp", other) => return Err(DecodeError::UnsupportedVersion(other)),
        _ => return Err(DecodeError::Protocol("unknown protocol name")),
    }
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(DecodeError::Malformed("will QoS 3"));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed("will QoS or retain without a will"));
    }
    if level != V5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = r.u16()?;
    let properties = if level == V5 {
        r.properties()?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if level == V5 {
            r.properties()?
        } else {
            Properties::default()
        };
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol_version: if level == V31 { V311 } else { level },
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_publish(r: &mut Reader, flags: u8, v: u8) -> DResult<Publish> {
    let dup = flags & 0x08 != 0;
    let qos = (flags >> 1) & 0x03;
    let retain = flags & 0x01 != 0;
    if qos == 3 {
        return Err(DecodeError::Malformed("PUBLISH with QoS 3"));
    }
    if qos == 0 && dup {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.string()?;
    let packet_id = if qos > 0 { r.packet_id()? } else { 0 };
    let properties = if v == V5 {
        r.properties()?
    } else {
        Properties::default()
    };
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn decode_ack(r: &mut Reader, v: u8) -> DResult<Ack> {
    let packet_id = r.packet_id()?;
    let mut code = 0;
    let mut properties = Properties::default();
    if v == V5 && r.has_remaining() {
        code = r.u8()?;
        if r.has_remaining() {
            properties = r.properties()?;
        }
    }
    Ok(Ack {
        packet_id,
        code,
        properties,
    })
}

fn decode_subscribe(r: &mut Reader, v: u8) -> DResult<Subscribe> {
    let packet_id = r.packet_id()?;
    let properties = if v == V5 {
        r.properties()?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while r.has_remaining() {
        let filter = r.string()?;
        let options = r.u8()?;
        let qos = options & 0x03;
        if qos == 3 {
            return Err(DecodeError::Malformed("subscription QoS 3"));
        }
        let opts = if v == V5 {
            if options & 0xC0 != 0 {
                return Err(DecodeError::Malformed("reserved subscription option bits"));
            }
            let retain_handling = (options >> 4) & 0x03;
            if retain_handling == 3 {
                return Err(DecodeError::Protocol("retain handling 3"));
            }
            SubscriptionOptions {
                qos,
                no_local: options & 0x04 != 0,
                retain_as_published: options & 0x08 != 0,
                retain_handling,
            }
        } else {
            if options & 0xFC != 0 {
                return Err(DecodeError::Malformed("reserved subscription option bits"));
            }
            SubscriptionOptions {
                qos,
                ..Default::default()
            }
        };
        filters.push((filter, opts));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

/// A bounds-checked cursor over one packet's body.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn has_remaining(&self) -> bool {
        !self.buf.is_empty()
    }

    fn need(&self, n: usize) -> DResult<()> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed("packet shorter than its fields"));
        }
        Ok(())
    }

    fn u8(&mut self) -> DResult<u8> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> DResult<u16> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> DResult<u32> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn packet_id(&mut self) -> DResult<u16> {
        let id = self.u16()?;
        if id == 0 {
            return Err(DecodeError::Protocol("packet identifier 0"));
        }
        Ok(id)
    }

    fn varint(&mut self) -> DResult<u32> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= ((byte & 0x7F) as u32) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    fn binary(&mut self) -> DResult<Bytes> {
        let len = self.u16()? as usize;
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }

    fn string(&mut self) -> DResult<String> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
        if s.chars().any(|c| c == '\0') {
            return Err(DecodeError::Malformed("NUL character in a string"));
        }
        Ok(s.to_string())
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn properties(&mut self) -> DResult<Properties> {
        let len = self.varint()? as usize;
        self.need(len)?;
        let mut r = Reader {
            buf: self.buf.split_to(len),
        };
        let mut p = Properties::default();
        fn set<T>(slot: &mut Option<T>, value: T) -> DResult<()> {
            if slot.is_some() {
                return Err(DecodeError::Protocol("property included twice"));
            }
            *slot = Some(value);
            Ok(())
        }
        while r.has_remaining() {
            let id = r.varint()?;
            match id {
                0x01 => {
                    let v = r.u8()?;
                    if v > 1 {
                        return Err(DecodeError::Protocol("payload format indicator"));
                    }
                    set(&mut p.payload_format_indicator, v)?
                }
                0x02 => set(&mut p.message_expiry_interval, r.u32()?)?,
                0x03 => set(&mut p.content_type, r.string()?)?,
                0x08 => set(&mut p.response_topic, r.string()?)?,
                0x09 => set(&mut p.correlation_data, r.binary()?)?,
                0x0B => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("subscription identifier 0"));
                    }
                    p.subscription_identifiers.push(v)
                }
                0x11 => set(&mut p.session_expiry_interval, r.u32()?)?,
                0x12 => set(&mut p.assigned_client_identifier, r.string()?)?,
                0x13 => set(&mut p.server_keep_alive, r.u16()?)?,
                0x15 => set(&mut p.authentication_method, r.string()?)?,
                0x16 => set(&mut p.authentication_data, r.binary()?)?,
                0x17 => {
                    let v = r.u8()?;
                    if v > 1 {
                        return Err(DecodeError::Protocol("request problem information"));
                    }
                    set(&mut p.request_problem_information, v)?
                }
                0x18 => set(&mut p.will_delay_interval, r.u32()?)?,
                0x19 => {
                    let v = r.u8()?;
                    if v > 1 {
                        return Err(DecodeError::Protocol("request response information"));
                    }
                    set(&mut p.request_response_information, v)?
                }
                0x1A => set(&mut p.response_information, r.string()?)?,
                0x1C => set(&mut p.server_reference, r.string()?)?,
                0x1F => set(&mut p.reason_string, r.string()?)?,
                0x21 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("receive maximum 0"));
                    }
                    set(&mut p.receive_maximum, v)?
                }
                0x22 => set(&mut p.topic_alias_maximum, r.u16()?)?,
                0x23 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::TopicAlias);
                    }
                    set(&mut p.topic_alias, v)?
                }
                0x24 => set(&mut p.maximum_qos, r.u8()?)?,
                0x25 => set(&mut p.retain_available, r.u8()?)?,
                0x26 => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v))
                }
                0x27 => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("maximum packet size 0"));
                    }
                    set(&mut p.maximum_packet_size, v)?
                }
                0x28 => set(&mut p.wildcard_subscription_available, r.u8()?)?,
                0x29 => set(&mut p.subscription_identifier_available, r.u8()?)?,
                0x2A => set(&mut p.shared_subscription_available, r.u8()?)?,
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            }
        }
        Ok(p)
    }
}

// ---------------------------------------------------------------------------------------
// Encoding

/// Appends the encoding of `packet` for protocol `version` to `out`.
pub fn encode(packet: &Packet, version: u8, out: &mut BytesMut) {
    let v5 = version == V5;
    let mut body = BytesMut::new();
    let first: u8 = match packet {
        Packet::Connect(c) => {
            put_str(
                &mut body,
                if c.protocol_version == V31 {
                    "MQIsdp"
                } else {
                    "MQTT"
                },
            );
            body.put_u8(c.protocol_version);
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | (w.qos << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            body.put_u8(flags);
            body.put_u16(c.keep_alive);
            let cv5 = c.protocol_version == V5;
            if cv5 {
                put_properties(&mut body, &c.properties);
            }
            put_str(&mut body, &c.client_id);
            if let Some(w) = &c.will {
                if cv5 {
                    put_properties(&mut body, &w.properties);
                }
                put_str(&mut body, &w.topic);
                put_bin(&mut body, &w.payload);
            }
            if let Some(u) = &c.username {
                put_str(&mut body, u);
            }
            if let Some(p) = &c.password {
                put_bin(&mut body, p);
            }
            0x10
        }
        Packet::ConnAck(c) => {
            body.put_u8(c.session_present as u8);
            body.put_u8(c.code);
            if v5 {
                put_properties(&mut body, &c.properties);
            }
            0x20
        }
        Packet::Publish(p) => {
            return encode_publish(
                PublishHeader {
                    dup: p.dup,
                    qos: p.qos,
                    retain: p.retain,
                    topic: &p.topic,
                    packet_id: p.packet_id,
                },
                v5.then_some(&p.properties),
                &p.payload,
                out,
            );
        }
        Packet::PubAck(a) => {
            put_ack(&mut body, a, v5);
            0x40
        }
        Packet::PubRec(a) => {
            put_ack(&mut body, a, v5);
            0x50
        }
        Packet::PubRel(a) => {
            put_ack(&mut body, a, v5);
            0x62
        }
        Packet::PubComp(a) => {
            put_ack(&mut body, a, v5);
            0x70
        }
        Packet::Subscribe(s) => {
            body.put_u16(s.packet_id);
            if v5 {
                put_properties(&mut body, &s.properties);
            }
            for (filter, o) in &s.filters {
                put_str(&mut body, filter);
                let mut b = o.qos;
                if v5 {
                    b |= (o.no_local as u8) << 2
                        | (o.retain_as_published as u8) << 3
                        | o.retain_handling << 4;
                }
                body.put_u8(b);
            }
            0x82
        }
        Packet::SubAck(s) => {
            body.put_u16(s.packet_id);
            if v5 {
                put_properties(&mut body, &s.properties);
            }
            body.put_slice(&s.codes);
            0x90
        }
        Packet::Unsubscribe(u) => {
            body.put_u16(u.packet_id);
            if v5 {
                put_properties(&mut body, &u.properties);
            }
            for f in &u.filters {
                put_str(&mut body, f);
            }
            0xA2
        }
        Packet::UnsubAck(u) => {
            body.put_u16(u.packet_id);
            if v5 {
                put_properties(&mut body, &u.properties);
                body.put_slice(&u.codes);
            }
            0xB0
        }
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(d) => {
            if v5 && (d.code != 0 || !d.properties.is_empty()) {
                body.put_u8(d.code);
                if !d.properties.is_empty() {
                    put_properties(&mut body, &d.properties);
                }
            }
            0xE0
        }
        Packet::Auth(a) => {
            if a.code != 0 || !a.properties.is_empty() {
                body.put_u8(a.code);
                put_properties(&mut body, &a.properties);
            }
            0xF0
        }
    };
    out.reserve(body.len() + 5);
    out.put_u8(first);
    put_varint(out, body.len() as u32);
    out.put_slice(&body);
}

/// The fixed part of a PUBLISH, borrowed (see [`encode_publish`]).
#[derive(Debug, Clone, Copy)]
pub struct PublishHeader<'a> {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: &'a str,
    pub packet_id: u16,
}

/// Encodes a PUBLISH from borrowed parts straight into `out`: the payload is copied once
/// and nothing else is allocated unless MQTT 5 properties are present. `properties` is
/// `Some` for MQTT 5 (empty properties are written as one zero byte).
pub fn encode_publish(
    header: PublishHeader<'_>,
    properties: Option<&Properties>,
    payload: &[u8],
    out: &mut BytesMut,
) {
    let encoded_properties = match properties {
        Some(p) if !p.is_empty() => {
            let mut b = BytesMut::new();
            put_properties(&mut b, p);
            Some(b)
        }
        _ => None,
    };
    let properties_len = match (&encoded_properties, properties) {
        (Some(b), _) => b.len(),
        (None, Some(_)) => 1,
        (None, None) => 0,
    };
    let topic = &header.topic.as_bytes()[..header.topic.len().min(u16::MAX as usize)];
    let remaining =
        2 + topic.len() + if header.qos > 0 { 2 } else { 0 } + properties_len + payload.len();
    out.reserve(remaining + 5);
    out.put_u8(0x30 | ((header.dup as u8) << 3) | (header.qos << 1) | header.retain as u8);
    put_varint(out, remaining as u32);
    put_bin(out, topic);
    if header.qos > 0 {
        out.put_u16(header.packet_id);
    }
    match (&encoded_properties, properties) {
        (Some(b), _) => out.put_slice(b),
        (None, Some(_)) => out.put_u8(0),
        (None, None) => {}
    }
    out.put_slice(payload);
}

/// The encoded size of `packet`, for checking a client's Maximum Packet Size.
pub fn encoded_len(packet: &Packet, version: u8) -> usize {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf);
    buf.len()
}

fn put_ack(body: &mut BytesMut, a: &Ack, v5: bool) {
    body.put_u16(a.packet_id);
    if v5 && (a.code != 0 || !a.properties.is_empty()) {
        body.put_u8(a.code);
        if !a.properties.is_empty() {
            put_properties(body, &a.properties);
        }
    }
}

fn put_varint(out: &mut BytesMut, mut value: u32) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bin(out, s.as_bytes());
}

fn put_bin(out: &mut BytesMut, b: &[u8]) {
    let len = b.len().min(u16::MAX as usize);
    out.put_u16(len as u16);
    out.put_slice(&b[..len]);
}

fn put_properties(out: &mut BytesMut, p: &Properties) {
    let mut b = BytesMut::new();
    if let Some(v) = p.payload_format_indicator {
        b.put_u8(0x01);
        b.put_u8(v);
    }
    if let Some(v) = p.message_expiry_interval {
        b.put_u8(0x02);
        b.put_u32(v);
    }
    if let Some(v) = &p.content_type {
        b.put_u8(0x03);
        put_str(&mut b, v);
    }
    if let Some(v) = &p.response_topic {
        b.put_u8(0x08);
        put_str(&mut b, v);
    }
    if let Some(v) = &p.correlation_data {
        b.put_u8(0x09);
        put_bin(&mut b, v);
    }
    for id in &p.subscription_identifiers {
        b.put_u8(0x0B);
        put_varint(&mut b, *id);
    }
    if let Some(v) = p.session_expiry_interval {
        b.put_u8(0x11);
        b.put_u32(v);
    }
    if let Some(v) = &p.assigned_client_identifier {
        b.put_u8(0x12);
        put_str(&mut b, v);
    }
    if let Some(v) = p.server_keep_alive {
        b.put_u8(0x13);
        b.put_u16(v);
    }
    if let Some(v) = &p.authentication_method {
        b.put_u8(0x15);
        put_str(&mut b, v);
    }
    if let Some(v) = &p.authentication_data {
        b.put_u8(0x16);
        put_bin(&mut b, v);
    }
    if let Some(v) = p.request_problem_information {
        b.put_u8(0x17);
        b.put_u8(v);
    }
    if let Some(v) = p.will_delay_interval {
        b.put_u8(0x18);
        b.put_u32(v);
    }
    if let Some(v) = p.request_response_information {
        b.put_u8(0x19);
        b.put_u8(v);
    }
    if let Some(v) = &p.response_information {
        b.put_u8(0x1A);
        put_str(&mut b, v);
    }
    if let Some(v) = &p.server_reference {
        b.put_u8(0x1C);
        put_str(&mut b, v);
    }
    if let Some(v) = &p.reason_string {
        b.put_u8(0x1F);
        put_str(&mut b, v);
    }
    if let Some(v) = p.receive_maximum {
        b.put_u8(0x21);
        b.put_u16(v);
    }
    if let Some(v) = p.topic_alias_maximum {
        b.put_u8(0x22);
        b.put_u16(v);
    }
    if let Some(v) = p.topic_alias {
        b.put_u8(0x23);
        b.put_u16(v);
    }
    if let Some(v) = p.maximum_qos {
        b.put_u8(0x24);
        b.put_u8(v);
    }
    if let Some(v) = p.retain_available {
        b.put_u8(0x25);
        b.put_u8(v);
    }
    for (k, v) in &p.user_properties {
        b.put_u8(0x26);
        put_str(&mut b, k);
        put_str(&mut b, v);
    }
    if let Some(v) = p.maximum_packet_size {
        b.put_u8(0x27);
        b.put_u32(v);
    }
    if let Some(v) = p.wildcard_subscription_available {
        b.put_u8(0x28);
        b.put_u8(v);
    }
    if let Some(v) = p.subscription_identifier_available {
        b.put_u8(0x29);
        b.put_u8(v);
    }
    if let Some(v) = p.shared_subscription_available {
        b.put_u8(0x2A);
        b.put_u8(v);
    }
    put_varint(out, b.len() as u32);
    out.put_slice(&b);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(packet: Packet, version: u8) {
        let mut buf = BytesMut::new();
        encode(&packet, version, &mut buf);
        let len = buf.len();
        let ctx = match packet {
            Packet::Connect(_) => None,
            _ => Some(version),
        };
        // Every proper prefix is incomplete, never an error.
        for cut in 0..len {
            let mut partial = BytesMut::from(&buf[..cut]);
            assert_eq!(decode(&mut partial, ctx, 1 << 20), Ok(None), "prefix {cut}");
        }
        let decoded = decode(&mut buf, ctx, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(decoded, packet);
    }

    fn rich_properties() -> Properties {
        Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some("reply/to".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            user_properties: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
            topic_alias: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn every_packet_round_trips_in_both_versions() {
        for v in [V311, V5] {
            let props = if v == V5 {
                rich_properties()
            } else {
                Properties::default()
            };
            round_trip(
                Packet::Connect(Box::new(Connect {
                    protocol_version: v,
                    clean_start: true,
                    keep_alive: 30,
                    client_id: "dev-1".into(),
                    will: Some(Will {
                        topic: "will/t".into(),
                        payload: Bytes::from_static(b"gone"),
                        qos: 1,
                        retain: true,
                        properties: if v == V5 {
                            Properties {
                                will_delay_interval: Some(5),
                                ..Default::default()
                            }
                        } else {
                            Properties::default()
                        },
                    }),
                    username: Some("user".into()),
                    password: Some(Bytes::from_static(b"pw")),
                    properties: if v == V5 {
                        Properties {
                            session_expiry_interval: Some(3600),
                            receive_maximum: Some(10),
                            maximum_packet_size: Some(1000),
                            topic_alias_maximum: Some(4),
                            ..Default::default()
                        }
                    } else {
                        Properties::default()
                    },
                })),
                v,
            );
            round_trip(
                Packet::ConnAck(ConnAck {
                    session_present: true,
                    code: 0,
                    properties: if v == V5 {
                        Properties {
                            maximum_qos: Some(1),
                            assigned_client_identifier: Some("x".into()),
                            ..Default::default()
                        }
                    } else {
                        Properties::default()
                    },
                }),
                v,
            );
            for qos in 0..3 {
                round_trip(
                    Packet::Publish(Publish {
                        dup: qos > 0,
                        qos,
                        retain: true,
                        topic: "a/b/c".into(),
                        packet_id: if qos > 0 { 7 } else { 0 },
                        properties: props.clone(),
                        payload: Bytes::from(vec![9u8; 300]),
                    }),
                    v,
                );
            }
            let ack_code = if v == V5 { 0x87 } else { 0 };
            let ack_props = if v == V5 {
                Properties {
                    reason_string: Some("nope".into()),
                    ..Default::default()
                }
            } else {
                Properties::default()
            };
            for make in [
                Packet::PubAck,
                Packet::PubRec,
                Packet::PubRel,
                Packet::PubComp,
            ] {
                round_trip(
                    make(Ack {
                        packet_id: 65535,
                        code: ack_code,
                        properties: ack_props.clone(),
                    }),
                    v,
                );
                round_trip(make(Ack::new(1, 0)), v);
            }
            round_trip(
                Packet::Subscribe(Subscribe {
                    packet_id: 2,
                    properties: if v == V5 {
                        Properties {
                            subscription_identifiers: vec![268_435_455],
                            ..Default::default()
                        }
                    } else {
                        Properties::default()
                    },
                    filters: vec![
                        (
                            "a/+/c".into(),
                            SubscriptionOptions {
                                qos: 1,
                                ..Default::default()
                            },
                        ),
                        (
                            "$share/g/x/#".into(),
                            SubscriptionOptions {
                                qos: 2,
                                no_local: v == V5,
                                retain_as_published: v == V5,
                                retain_handling: if v == V5 { 2 } else { 0 },
                            },
                        ),
                    ],
                }),
                v,
            );
            round_trip(
                Packet::SubAck(SubAck {
                    packet_id: 2,
                    properties: Properties::default(),
                    codes: vec![0, 1, 0x80],
                }),
                v,
            );
            round_trip(
                Packet::Unsubscribe(Unsubscribe {
                    packet_id: 3,
                    properties: Properties::default(),
                    filters: vec!["a/#".into(), "b".into()],
                }),
                v,
            );
            round_trip(
                Packet::UnsubAck(UnsubAck {
                    packet_id: 3,
                    properties: Properties::default(),
                    codes: if v == V5 { vec![0, 0x11] } else { vec![] },
                }),
                v,
            );
            round_trip(Packet::PingReq, v);
            round_trip(Packet::PingResp, v);
            round_trip(
                Packet::Disconnect(Disconnect {
                    code: if v == V5 { 0x8E } else { 0 },
                    properties: Properties::default(),
                }),
                v,
            );
        }
        round_trip(
            Packet::Auth(Auth {
                code: 0x18,
                properties: Properties {
                    authentication_method: Some("SCRAM".into()),
                    ..Default::default()
                },
            }),
            V5,
        );
    }

    #[test]
    fn oversized_packets_are_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        let err = decode(&mut buf, Some(V311), 1024).unwrap_err();
        assert_eq!(err.reason_code(), reason::PACKET_TOO_LARGE);
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        let err = decode(&mut buf, Some(V311), usize::MAX).unwrap_err();
        assert_eq!(err.reason_code(), reason::MALFORMED_PACKET);
    }

    #[test]
    fn protocol_violations_have_reason_codes() {
        // PUBLISH before CONNECT.
        let mut buf = BytesMut::from(&[0x30u8, 0x03, 0x00, 0x01, b'a'][..]);
        assert_eq!(
            decode(&mut buf, None, 1024).unwrap_err().reason_code(),
            reason::PROTOCOL_ERROR
        );
        // QoS 3 publish.
        let mut buf = BytesMut::from(&[0x36u8, 0x03, 0x00, 0x01, b'a'][..]);
        assert_eq!(
            decode(&mut buf, Some(V311), 1024)
                .unwrap_err()
                .reason_code(),
            reason::MALFORMED_PACKET
        );
        // Unknown protocol level.
        let mut buf = BytesMut::from(&[0x10u8, 10, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 0][..]);
        assert_eq!(
            decode(&mut buf, None, 1024).unwrap_err().reason_code(),
            reason::UNSUPPORTED_PROTOCOL_VERSION
        );
        // Duplicate property.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x30, 12, 0, 1, b'a', 10, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 1]);
        buf[1] = (buf.len() - 2) as u8;
        assert_eq!(
            decode(&mut buf, Some(V5), 1024).unwrap_err().reason_code(),
            reason::PROTOCOL_ERROR
        );
        // Invalid UTF-8 in a topic.
        let mut buf = BytesMut::from(&[0x30u8, 0x04, 0x00, 0x02, 0xC3, 0x28][..]);
        assert_eq!(
            decode(&mut buf, Some(V311), 1024)
                .unwrap_err()
                .reason_code(),
            reason::MALFORMED_PACKET
        );
    }

    /// Deterministic random input: the decoder must never panic and must always either
    /// consume a packet, ask for more, or fail cleanly.
    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && !bytes.is_empty() {
                // Bias towards plausible headers so bodies get parsed.
                bytes[0] = (bytes[0] & 0xF0) | [0, 2, 0][round % 3];
                if bytes.len() > 1 {
                    bytes[1] = (len.saturating_sub(2)) as u8 & 0x7F;
                }
            }
            let version = [None, Some(V311), Some(V5)][round % 3];
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf, version, 256) {}
        }
    }
}
