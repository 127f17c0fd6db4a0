//! The broker's in-process API and its TCP listener, driven by a minimal client built on the
//! crate's own codec: publish hooks with origin metadata, channel and callback
//! subscriptions, delivery to exactly one client, core's `BrokerHandle`, persistent sessions
//! across a broker restart, and lifecycle events reaching in-process subscribers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mooring_core::handles::PublishMessage;
use mooring_mqtt::codec::{self, Ack, Connect, Packet, Properties, Publish, Subscribe, V311, V5};
use mooring_mqtt::{Broker, InternalSubscription, Message, MessageProperties, Origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct TestClient {
    stream: TcpStream,
    buf: BytesMut,
    version: u8,
}

impl TestClient {
    async fn connect(
        addr: std::net::SocketAddr,
        id: &str,
        version: u8,
        clean: bool,
    ) -> (Self, bool) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut c = TestClient {
            stream,
            buf: BytesMut::new(),
            version,
        };
        let properties = if version == V5 && !clean {
            Properties {
                session_expiry_interval: Some(600),
                ..Default::default()
            }
        } else {
            Properties::default()
        };
        c.send(Packet::Connect(Box::new(Connect {
            protocol_version: version,
            clean_start: clean,
            keep_alive: 60,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
            properties,
        })))
        .await;
        match c.next().await {
            Some(Packet::ConnAck(a)) => {
                assert_eq!(a.code, 0);
                (c, a.session_present)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        codec::encode(&p, self.version, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn next(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(self.version), 1 << 20).unwrap() {
                return Some(p);
            }
            let read =
                tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.buf))
                    .await
                    .ok()?
                    .ok()?;
            if read == 0 {
                return None;
            }
        }
    }

    async fn next_publish(&mut self) -> Publish {
        loop {
            match self.next().await {
                Some(Packet::Publish(p)) => {
                    if p.qos == 1 {
                        self.send(Packet::PubAck(Ack::new(p.packet_id, 0))).await;
                    }
                    return p;
                }
                Some(_) => continue,
                None => panic!("connection ended without a PUBLISH"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: 9,
            properties: Properties::default(),
            filters: vec![(
                filter.into(),
                codec::SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
        }))
        .await;
        loop {
            if let Some(Packet::SubAck(s)) = self.next().await {
                assert!(s.codes[0] < 0x80);
                return;
            }
        }
    }

    async fn publish(&mut self, topic: &str, payload: &'static [u8], qos: u8) {
        self.send(Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: if qos > 0 { 1 } else { 0 },
            properties: Properties::default(),
            payload: Bytes::from_static(payload),
        }))
        .await;
        if qos == 1 {
            loop {
                if let Some(Packet::PubAck(a)) = self.next().await {
                    assert_eq!(a.packet_id, 1);
                    return;
                }
            }
        }
    }
}

async fn start(
    dir: &std::path::Path,
) -> (Broker, std::net::SocketAddr, mooring_core::ServiceContext) {
    let ctx = mooring_core::ServiceContext::for_tests(dir).unwrap();
    let broker = mooring_mqtt::start(&ctx).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mooring_mqtt::listener::serve_tcp(broker.clone(), listener));
    (broker, addr, ctx)
}

/// Topic, origin client id and origin IP as a publish hook saw them.
type HookRecord = (String, Option<String>, Option<String>);

fn message(topic: &str, payload: &'static [u8], qos: u8) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: MessageProperties::default(),
        expires_at_ms: None,
        origin: Origin::default(),
    }
}

#[tokio::test]
async fn hooks_internal_subscribers_and_direct_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, addr, ctx) = start(dir.path()).await;
    let seen: Arc<Mutex<Vec<HookRecord>>> = Arc::default();
    let record = seen.clone();
    broker.add_publish_hook(Arc::new(move |m: &Arc<Message>| {
        record.lock().unwrap().push((
            m.topic.clone(),
            m.origin.client_id.clone(),
            m.origin.source_ip.map(|i| i.to_string()),
        ));
    }));
    let mut channel = broker.subscribe_channel("dev/+/temp", 16).unwrap();
    let events = broker
        .subscribe_channel("$aws/events/presence/+/+", 16)
        .unwrap();
    let calls = Arc::new(Mutex::new(0));
    let counter = calls.clone();
    let callback = broker
        .subscribe_callback("dev/#", Arc::new(move |_| *counter.lock().unwrap() += 1))
        .unwrap();

    let (mut device, _) = TestClient::connect(addr, "dev-1", V5, true).await;
    device.publish("dev/1/temp", b"21.5", 1).await;
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        channel.receiver.as_mut().unwrap().recv(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got.payload, Bytes::from_static(b"21.5"));
    assert_eq!(got.origin.client_id.as_deref(), Some("dev-1"));
    assert_eq!(got.origin.protocol_version, Some(V5));
    assert_eq!(*calls.lock().unwrap(), 1);
    assert!(seen.lock().unwrap().contains(&(
        "dev/1/temp".into(),
        Some("dev-1".into()),
        Some("127.0.0.1".into())
    )));
    // The connected event reached the in-process subscriber.
    let mut events = events;
    let connected = events.receiver.as_mut().unwrap().recv().await.unwrap();
    assert_eq!(connected.topic, "$aws/events/presence/connected/dev-1");

    // Direct delivery: only dev-1 receives it, although nobody subscribed.
    let (mut other, _) = TestClient::connect(addr, "dev-2", V311, true).await;
    other.subscribe("$aws/things/dev-1/jobs/#", 1).await;
    broker
        .deliver_to_client(
            "dev-1",
            message("$aws/things/dev-1/jobs/get/accepted", b"{}", 1),
        )
        .await
        .unwrap();
    let p = device.next_publish().await;
    assert_eq!(p.topic, "$aws/things/dev-1/jobs/get/accepted");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.next())
            .await
            .is_err()
    );
    assert!(broker
        .deliver_to_client("nobody", message("x", b"", 0))
        .await
        .is_err());

    // Core's handle publishes like any client.
    ctx.handles
        .broker()
        .unwrap()
        .publish(PublishMessage {
            topic: "dev/9/temp".into(),
            payload: Bytes::from_static(b"from a rule"),
            qos: 1,
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        })
        .await
        .unwrap();
    let got = channel.receiver.as_mut().unwrap().recv().await.unwrap();
    assert_eq!(got.payload, Bytes::from_static(b"from a rule"));
    assert_eq!(
        got.properties.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );

    // The callback saw both dev/ messages; dropping it unsubscribes.
    assert_eq!(*calls.lock().unwrap(), 2);
    drop(callback);
    broker
        .publish(message("dev/2/temp", b"x", 0))
        .await
        .unwrap();
    assert_eq!(*calls.lock().unwrap(), 2);
}

#[tokio::test]
async fn persistent_session_survives_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (broker, addr, ctx) = start(dir.path()).await;
        let (mut sub, present) = TestClient::connect(addr, "keeper", V311, false).await;
        assert!(!present);
        sub.subscribe("keep/#", 1).await;
        drop(sub);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut publisher, _) = TestClient::connect(addr, "pusher", V311, true).await;
        publisher.publish("keep/a", b"one", 1).await;
        publisher.publish("keep/b", b"two", 1).await;
        ctx.shutdown.trigger();
        drop(broker);
    }
    let (_broker, addr, _ctx) = start(dir.path()).await;
    let (mut sub, present) = TestClient::connect(addr, "keeper", V311, false).await;
    assert!(present);
    assert_eq!(sub.next_publish().await.payload, Bytes::from_static(b"one"));
    assert_eq!(sub.next_publish().await.payload, Bytes::from_static(b"two"));
}

/// The `versionNumber` of `client_id`'s next connection.
async fn connected_version(broker: &Broker, addr: std::net::SocketAddr, client_id: &str) -> u64 {
    let mut events = broker
        .subscribe_channel(&format!("$aws/events/presence/connected/{client_id}"), 4)
        .unwrap();
    let mut receiver = events.receiver.take().unwrap();
    let (client, _) = TestClient::connect(addr, client_id, V311, true).await;
    let event = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
        .await
        .unwrap()
        .unwrap();
    drop(client);
    let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    body["versionNumber"].as_u64().unwrap()
}

#[tokio::test]
async fn version_numbers_grow_per_client_id_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = {
        let (broker, addr, ctx) = start_with(
            dir.path(),
            &[("broker.connects_per_second_per_client", "0")],
        )
        .await;
        let first = connected_version(&broker, addr, "counted").await;
        let other = connected_version(&broker, addr, "other").await;
        let second = connected_version(&broker, addr, "counted").await;
        assert!(first >= 1 && second > first && other != first && other != second);
        ctx.shutdown.trigger();
        (first, second)
    };
    let (broker, addr, _ctx) = start(dir.path()).await;
    let third = connected_version(&broker, addr, "counted").await;
    assert!(
        third > second,
        "{first}, {second}, then {third} after the restart"
    );
}

#[tokio::test]
async fn takeover_closes_the_old_connection_with_0x8e() {
    let dir = tempfile::tempdir().unwrap();
    // Without the aws profile's one CONNECT per second per client id.
    let (_broker, addr, _ctx) = start_with(
        dir.path(),
        &[("broker.connects_per_second_per_client", "0")],
    )
    .await;
    let (mut first, _) = TestClient::connect(addr, "same", V5, true).await;
    let (_second, _) = TestClient::connect(addr, "same", V5, true).await;
    match first.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x8E),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(first.next().await.is_none());
}

#[tokio::test]
async fn a_second_connect_within_a_second_is_refused_in_the_aws_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, addr, _ctx) = start(dir.path()).await;
    let (mut first, _) = TestClient::connect(addr, "eager", V5, true).await;
    let mut second = TestClient {
        stream: TcpStream::connect(addr).await.unwrap(),
        buf: BytesMut::new(),
        version: V5,
    };
    second
        .send(Packet::Connect(Box::new(Connect {
            protocol_version: V5,
            clean_start: true,
            keep_alive: 60,
            client_id: "eager".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })))
        .await;
    match second.next().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, 0x9F, "connection rate exceeded"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(
        second.next().await.is_none(),
        "the refused connection closes"
    );
    // The first connection is untouched.
    first.send(Packet::PingReq).await;
    assert_eq!(first.next().await, Some(Packet::PingResp));
}

#[tokio::test]
async fn api_initiated_disconnect_and_principal_disconnect() {
    use mooring_mqtt::lifecycle::DisconnectReason;
    use mooring_mqtt::Kick;
    let dir = tempfile::tempdir().unwrap();
    let (broker, addr, _ctx, _events, mut receiver) = start_watching_disconnects(
        dir.path(),
        &[("broker.connects_per_second_per_client", "0")],
    )
    .await;
    let (mut victim, _) = TestClient::connect(addr, "victim", V5, false).await;
    victim.subscribe("kept/or/not", 1).await;
    assert!(!broker.disconnect_client(
        "nobody",
        Kick::new(DisconnectReason::ApiInitiatedDisconnect)
    ));
    // DeleteConnection with cleanSession=true and preventWillMessage=true.
    assert!(broker.disconnect_client(
        "victim",
        Kick {
            reason: DisconnectReason::ApiInitiatedDisconnect,
            send_will: false,
            end_session: true,
        }
    ));
    match victim.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x98),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(victim.next().await.is_none());
    let event = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
        .await
        .unwrap()
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(body["disconnectReason"], "API_INITIATED_DISCONNECT");
    assert_eq!(body["clientInitiatedDisconnect"], false);
    // The session ended with the connection.
    let (_again, present) = TestClient::connect(addr, "victim", V5, false).await;
    assert!(!present);

    // Closing by principal (as a revoked certificate would): every anonymous connection.
    let (mut other, _) = TestClient::connect(addr, "other", V311, true).await;
    let closed = broker.disconnect_principal("anonymous", Kick::new(DisconnectReason::AuthError));
    assert_eq!(closed, 2);
    assert!(other.next().await.is_none());
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .unwrap()
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        reasons.push(body["disconnectReason"].as_str().unwrap().to_string());
    }
    assert_eq!(reasons, ["AUTH_ERROR", "AUTH_ERROR"]);
}

/// Starts a broker whose configuration is the defaults plus `--set`-style overrides.
async fn start_with(
    dir: &std::path::Path,
    settings: &[(&str, &str)],
) -> (Broker, std::net::SocketAddr, mooring_core::ServiceContext) {
    let mut ctx = mooring_core::ServiceContext::for_tests(dir).unwrap();
    let flags: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut config = mooring_core::Config::load(None, Vec::new(), &flags).unwrap();
    config.data_dir = dir.to_path_buf();
    ctx.config = Arc::new(config);
    let broker = mooring_mqtt::start(&ctx).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mooring_mqtt::listener::serve_tcp(broker.clone(), listener));
    (broker, addr, ctx)
}

/// [`start_with`], plus the broker's `disconnected` events (while the subscription lives).
async fn start_watching_disconnects(
    dir: &std::path::Path,
    settings: &[(&str, &str)],
) -> (
    Broker,
    std::net::SocketAddr,
    mooring_core::ServiceContext,
    InternalSubscription,
    tokio::sync::mpsc::Receiver<Arc<Message>>,
) {
    let (broker, addr, ctx) = start_with(dir, settings).await;
    let mut events = broker
        .subscribe_channel("$aws/events/presence/disconnected/+", 16)
        .unwrap();
    let receiver = events.receiver.take().unwrap();
    (broker, addr, ctx, events, receiver)
}

/// Sends a CONNECT and returns the CONNACK (or `None` when the server just closed).
async fn raw_connect(
    addr: std::net::SocketAddr,
    connect: Connect,
) -> (TestClient, Option<codec::ConnAck>) {
    let mut c = TestClient {
        stream: TcpStream::connect(addr).await.unwrap(),
        buf: BytesMut::new(),
        version: connect.protocol_version,
    };
    c.send(Packet::Connect(Box::new(connect))).await;
    let ack = match c.next().await {
        Some(Packet::ConnAck(a)) => Some(a),
        _ => None,
    };
    (c, ack)
}

fn connect_packet(id: &str, version: u8, keep_alive: u16, properties: Properties) -> Connect {
    Connect {
        protocol_version: version,
        clean_start: true,
        keep_alive,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties,
    }
}

fn publish_packet(topic: &str, qos: u8, packet_id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::from_static(b"x"),
    })
}

/// The `disconnectReason` of the next disconnected event on `receiver`.
async fn next_disconnect_reason(
    receiver: &mut tokio::sync::mpsc::Receiver<Arc<Message>>,
) -> String {
    let event = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
        .await
        .expect("no disconnected event")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    body["disconnectReason"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn aws_limits_throttling_forbidden_topics_and_enhanced_auth() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, addr, _ctx) = start(dir.path()).await;
    let mut events = broker
        .subscribe_channel("$aws/events/presence/disconnected/+", 64)
        .unwrap();
    let mut receiver = events.receiver.take().unwrap();

    // MQTT 5: beyond 100 publishes within a second, QoS 1 gets PUBACK 0x97 Quota exceeded.
    let (mut fast, _) = TestClient::connect(addr, "rate-v5", V5, true).await;
    let mut burst = BytesMut::new();
    for id in 1..=130u16 {
        codec::encode(&publish_packet("rate/v5", 1, id), V5, &mut burst);
    }
    fast.stream.write_all(&burst).await.unwrap();
    let mut codes = Vec::new();
    while codes.len() < 130 {
        match fast.next().await {
            Some(Packet::PubAck(a)) => codes.push(a.code),
            Some(_) => {}
            None => panic!("connection closed after {} acks", codes.len()),
        }
    }
    assert!(codes[..100].iter().all(|&c| c == 0), "{codes:?}");
    assert!(codes[100..].iter().all(|&c| c == 0x97), "{codes:?}");

    // MQTT 3.1.1 cannot be told: the connection closes as THROTTLED.
    let (mut slow, _) = TestClient::connect(addr, "rate-v3", V311, true).await;
    let mut burst = BytesMut::new();
    for _ in 0..150 {
        codec::encode(&publish_packet("rate/v3", 0, 0), V311, &mut burst);
    }
    slow.stream.write_all(&burst).await.unwrap();
    assert!(slow.next().await.is_none());
    assert_eq!(next_disconnect_reason(&mut receiver).await, "THROTTLED");

    // MQTT 3.1.1 publishing to a reserved topic it may not use: FORBIDDEN_ACCESS.
    let (mut nosy, _) = TestClient::connect(addr, "nosy-v3", V311, true).await;
    nosy.send(publish_packet("$aws/events/presence/connected/x", 0, 0))
        .await;
    assert!(nosy.next().await.is_none());
    assert_eq!(
        next_disconnect_reason(&mut receiver).await,
        "FORBIDDEN_ACCESS"
    );

    // Enhanced authentication is not supported: an Authentication Method at CONNECT gets
    // CONNACK 0x8C, an AUTH packet on a connection gets DISCONNECT 0x82.
    let properties = Properties {
        authentication_method: Some("SCRAM-SHA-1".into()),
        ..Default::default()
    };
    let (_, ack) = raw_connect(addr, connect_packet("scram", V5, 60, properties)).await;
    assert_eq!(ack.unwrap().code, 0x8C);
    let (mut auth, _) = TestClient::connect(addr, "auth-v5", V5, true).await;
    auth.send(Packet::Auth(codec::Auth {
        code: 0x18,
        properties: Properties::default(),
    }))
    .await;
    match auth.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x82),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert_eq!(next_disconnect_reason(&mut receiver).await, "CLIENT_ERROR");

    // Client ids over 128 bytes: CONNACK 0x85 (MQTT 5) / return code 2 (3.1.1).
    let long = "i".repeat(129);
    let (_, ack) = raw_connect(addr, connect_packet(&long, V5, 60, Properties::default())).await;
    assert_eq!(ack.unwrap().code, 0x85);
    let (_, ack) = raw_connect(addr, connect_packet(&long, V311, 60, Properties::default())).await;
    assert_eq!(ack.unwrap().code, 2);
    let (_c, ack) = raw_connect(
        addr,
        connect_packet(&long[..128], V5, 60, Properties::default()),
    )
    .await;
    assert_eq!(ack.unwrap().code, 0);

    // At most 8 filters per SUBSCRIBE.
    let (mut many, _) = TestClient::connect(addr, "many-filters", V5, true).await;
    many.send(Packet::Subscribe(Subscribe {
        packet_id: 3,
        properties: Properties::default(),
        filters: (0..9)
            .map(|i| {
                (
                    format!("lim/{i}"),
                    codec::SubscriptionOptions {
                        qos: 1,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    }))
    .await;
    loop {
        if let Some(Packet::SubAck(s)) = many.next().await {
            assert_eq!(s.codes, [1, 1, 1, 1, 1, 1, 1, 1, 0x97]);
            break;
        }
    }
}

#[tokio::test]
async fn broker_section_caps_keep_alive_refuses_filters_and_lifts_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, addr, _ctx) = start_with(
        dir.path(),
        &[
            ("mqtt.profile", "\"strict\""),
            ("broker.max_keep_alive", "60"),
            ("broker.refused_subscriptions", "[\"test/nosubscribe\"]"),
            ("broker.publishes_per_second", "0"),
        ],
    )
    .await;
    let (mut c, ack) =
        raw_connect(addr, connect_packet("ka", V5, 120, Properties::default())).await;
    let ack = ack.unwrap();
    assert_eq!(ack.code, 0);
    assert_eq!(ack.properties.server_keep_alive, Some(60));
    c.send(Packet::Subscribe(Subscribe {
        packet_id: 4,
        properties: Properties::default(),
        filters: ["test/nosubscribe", "test/ok"]
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    codec::SubscriptionOptions {
                        qos: 2,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    }))
    .await;
    loop {
        if let Some(Packet::SubAck(s)) = c.next().await {
            assert_eq!(s.codes, [0x80, 2]);
            break;
        }
    }
    // MQTT 3.1.1 keeps its own keep-alive (it cannot be told otherwise).
    let (_c3, ack) = raw_connect(
        addr,
        connect_packet("ka3", V311, 120, Properties::default()),
    )
    .await;
    assert_eq!(ack.unwrap().code, 0);
    // No rate limit: 300 QoS 0 publishes in one burst all arrive.
    let (mut sub, _) = TestClient::connect(addr, "unlimited-sub", V311, true).await;
    sub.subscribe("unlimited", 0).await;
    let (mut fast, _) = TestClient::connect(addr, "unlimited-pub", V311, true).await;
    let mut burst = BytesMut::new();
    for _ in 0..300 {
        codec::encode(&publish_packet("unlimited", 0, 0), V311, &mut burst);
    }
    fast.stream.write_all(&burst).await.unwrap();
    for _ in 0..300 {
        assert_eq!(sub.next_publish().await.topic, "unlimited");
    }
}

/// Encodes `count` QoS 0 publishes of `size` bytes to `topic` and writes them as fast as the
/// broker reads them; then proves the connection is still served (PINGREQ, PINGRESP).
async fn blast(mut client: TestClient, topic: &'static str, count: usize, size: usize) {
    let mut out = BytesMut::new();
    for i in 0..count {
        let mut payload = vec![0x5au8; size];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        codec::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: 0,
                retain: false,
                topic: topic.into(),
                packet_id: 0,
                properties: Properties::default(),
                payload: Bytes::from(payload),
            }),
            client.version,
            &mut out,
        );
    }
    client.stream.write_all(&out).await.unwrap();
    client.send(Packet::PingReq).await;
    loop {
        match client.next().await {
            Some(Packet::PingResp) => return,
            Some(_) => continue,
            None => panic!("the publisher's connection ended or went quiet"),
        }
    }
}

/// Counts the PUBLISHes `client` receives until `expected` arrived or none came for 5 s.
async fn count_publishes(client: &mut TestClient, expected: usize) -> usize {
    let mut received = 0;
    while received < expected {
        match client.next().await {
            Some(Packet::Publish(_)) => received += 1,
            Some(_) => continue,
            None => break,
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_wait_for_a_backlogged_subscriber_but_not_for_a_stalled_one() {
    let dir = tempfile::tempdir().unwrap();
    // The strict profile: AWS's publish rate limits would close these publishers.
    let (_broker, addr, _ctx) = start_with(dir.path(), &[("mqtt.profile", "\"strict\"")]).await;

    // Fan-in: 20 publishers send 20,000 QoS 0 messages of 4 KB, twice the per-client queue
    // bound, to one subscriber that starts reading late. Publishers are held back while its
    // backlog drains instead of the excess being dropped.
    let (mut sink, _) = TestClient::connect(addr, "fan-in-sink", V311, true).await;
    sink.subscribe("fan/in", 0).await;
    let mut publishers = Vec::new();
    for i in 0..20 {
        let (client, _) = TestClient::connect(addr, &format!("fan-in-{i}"), V311, true).await;
        publishers.push(tokio::spawn(blast(client, "fan/in", 1_000, 4096)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_publishes(&mut sink, 20_000).await, 20_000);
    for p in publishers {
        p.await.unwrap();
    }

    // A subscriber that never reads is slow: after at most the stall interval its publisher is
    // read again, and the other subscriber of the topic receives every message.
    let (mut stalled, _) = TestClient::connect(addr, "stalled", V311, true).await;
    stalled.subscribe("fan/stall", 0).await;
    let (mut reader, _) = TestClient::connect(addr, "reader", V311, true).await;
    reader.subscribe("fan/stall", 0).await;
    let (publisher, _) = TestClient::connect(addr, "stall-publisher", V311, true).await;
    let publisher = tokio::spawn(blast(publisher, "fan/stall", 15_000, 1024));
    assert_eq!(count_publishes(&mut reader, 15_000).await, 15_000);
    tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publisher was held by a stalled subscriber")
        .unwrap();
    drop(stalled);
}

/// Waits until `count` connections are parked (idle plain-TCP connections wait in the
/// parking lot, without a task).
async fn until_parked(broker: &Broker, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.parked_connections() != count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections parked, expected {count}",
            broker.parked_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_wake_for_messages_packets_kicks_takeovers_and_shutdown() {
    use mooring_mqtt::lifecycle::DisconnectReason;
    use mooring_mqtt::Kick;
    let dir = tempfile::tempdir().unwrap();
    let (broker, addr, _ctx, _events, mut receiver) = start_watching_disconnects(
        dir.path(),
        &[("broker.connects_per_second_per_client", "0")],
    )
    .await;

    // A message queued for a parked subscriber wakes it (QoS 0 and 1).
    let (mut sub, _) = TestClient::connect(addr, "parked-sub", V5, true).await;
    sub.subscribe("parked/topic", 1).await;
    until_parked(&broker, 1).await;
    broker
        .publish(message("parked/topic", b"zero", 0))
        .await
        .unwrap();
    assert_eq!(
        sub.next_publish().await.payload,
        Bytes::from_static(b"zero")
    );
    until_parked(&broker, 1).await;
    broker
        .publish(message("parked/topic", b"one", 1))
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.payload, Bytes::from_static(b"one"));

    // A packet from the client wakes it.
    until_parked(&broker, 1).await;
    sub.send(Packet::PingReq).await;
    assert_eq!(sub.next().await, Some(Packet::PingResp));

    // A kick reaches a parked connection (DeleteConnection).
    until_parked(&broker, 1).await;
    assert!(broker.disconnect_client(
        "parked-sub",
        Kick::new(DisconnectReason::ApiInitiatedDisconnect)
    ));
    match sub.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x98),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(sub.next().await.is_none());
    assert_eq!(
        next_disconnect_reason(&mut receiver).await,
        "API_INITIATED_DISCONNECT"
    );

    // A takeover closes the parked connection with 0x8E.
    let (mut first, _) = TestClient::connect(addr, "parked-twice", V5, true).await;
    until_parked(&broker, 1).await;
    let (mut second, _) = TestClient::connect(addr, "parked-twice", V5, true).await;
    match first.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x8E),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert_eq!(
        next_disconnect_reason(&mut receiver).await,
        "DUPLICATE_CLIENTID"
    );
    // The new connection works, parked or not.
    until_parked(&broker, 1).await;
    second.send(Packet::PingReq).await;
    assert_eq!(second.next().await, Some(Packet::PingResp));

    // A client closing its socket while parked is a lost connection.
    until_parked(&broker, 1).await;
    drop(second);
    assert_eq!(
        next_disconnect_reason(&mut receiver).await,
        "CONNECTION_LOST"
    );

    // The shutdown resumes parked connections and closes them with 0x8B.
    let (mut last, _) = TestClient::connect(addr, "parked-at-shutdown", V5, true).await;
    until_parked(&broker, 1).await;
    broker.shutdown().trigger();
    match last.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x8B),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert_eq!(
        next_disconnect_reason(&mut receiver).await,
        "SERVER_INITIATED_DISCONNECT"
    );
    assert_eq!(broker.parked_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_still_times_out_on_its_keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, addr, _ctx, _events, mut receiver) =
        start_watching_disconnects(dir.path(), &[("mqtt.profile", "strict")]).await;
    let (mut quiet, ack) =
        raw_connect(addr, connect_packet("quiet", V5, 1, Properties::default())).await;
    assert_eq!(ack.unwrap().code, 0);
    let started = tokio::time::Instant::now();
    until_parked(&broker, 1).await;
    // 1.5 x the keep-alive of 1 s, checked by the lot's sweeps (every 250 ms).
    match quiet.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x8D),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
    assert_eq!(
        next_disconnect_reason(&mut receiver).await,
        "MQTT_KEEP_ALIVE_TIMEOUT"
    );
}
