//! The broker's in-process API and its TCP listener, driven by a minimal client built on the
//! crate's own codec: publish hooks with origin metadata, channel and callback
//! subscriptions, delivery to exactly one client, core's `BrokerHandle`, persistent sessions
//! across a broker restart, and lifecycle events reaching in-process subscribers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mooring_core::handles::PublishMessage;
use mooring_mqtt::codec::{self, Ack, Connect, Packet, Properties, Publish, Subscribe, V311, V5};
use mooring_mqtt::{Broker, Message, MessageProperties, Origin};
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

#[tokio::test]
async fn takeover_closes_the_old_connection_with_0x8e() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, addr, _ctx) = start(dir.path()).await;
    let (mut first, _) = TestClient::connect(addr, "same", V5, true).await;
    let (_second, _) = TestClient::connect(addr, "same", V5, true).await;
    match first.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x8E),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(first.next().await.is_none());
}
