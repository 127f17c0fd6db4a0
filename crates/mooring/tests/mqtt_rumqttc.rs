//! The MQTT broker driven by the rumqttc client library (MQTT 3.1.1 and 5) against the real
//! `mooring` binary on ephemeral ports with a temporary data directory: QoS 1 pub/sub with
//! wildcards, retained delivery, lifecycle events, MQTT 5 properties, and a persistent
//! session whose queued QoS 1 message survives a SIGKILL and restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// One `mooring serve` process.
struct Server {
    child: Child,
    data_dir: PathBuf,
    mqtt: (String, u16),
}

impl Server {
    fn start(data_dir: &Path) -> Server {
        let endpoints = data_dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let child = Command::new(env!("CARGO_BIN_EXE_mooring"))
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--mqtts-listen",
                "",
                "--stream-manager-listen",
                "",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting mooring");
        // Owned by `Server` from here on, so a failed start still kills and reaps it.
        let mut server = Server {
            child,
            data_dir: data_dir.to_path_buf(),
            mqtt: (String::new(), 0),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&endpoints) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let addr = v["mqtt"].as_str().expect("mqtt endpoint");
                    let (host, port) = addr.rsplit_once(':').unwrap();
                    server.mqtt = (host.to_string(), port.parse().unwrap());
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "mooring did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.data_dir.clone()
    }

    fn options(&self, client_id: &str, clean: bool) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.mqtt.0.clone(), self.mqtt.1);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(clean);
        o
    }

    /// A connected 3.1.1 client; returns it with its event loop and CONNACK's session present.
    async fn connect(&self, client_id: &str, clean: bool) -> (AsyncClient, EventLoop, bool) {
        let (client, mut events) = AsyncClient::new(self.options(client_id, clean), 64);
        loop {
            match poll(&mut events).await {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
                    return (client, events, ack.session_present);
                }
                _ => continue,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn poll(events: &mut EventLoop) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.poll())
        .await
        .expect("no MQTT event within 10 s")
        .expect("MQTT connection failed")
}

/// Polls until a SUBACK arrives; returns its return codes.
async fn suback(events: &mut EventLoop) -> Vec<rumqttc::SubscribeReasonCode> {
    loop {
        if let Event::Incoming(Packet::SubAck(s)) = poll(events).await {
            return s.return_codes;
        }
    }
}

async fn next_publish(events: &mut EventLoop) -> rumqttc::Publish {
    loop {
        if let Event::Incoming(Packet::Publish(p)) = poll(events).await {
            return p;
        }
    }
}

/// The keys of a JSON object in the order the broker wrote them (serde_json's `Map` sorts
/// its keys, so the order is read from the text).
fn keys_in_wire_order(payload: &[u8]) -> Vec<String> {
    let body: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    let text = std::str::from_utf8(payload).unwrap();
    let mut keys: Vec<(usize, String)> = body
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(|k| (text.find(&format!("\"{k}\":")).unwrap(), k.clone()))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

/// Drives a publisher's event loop until its QoS 1 PUBACK arrives.
async fn puback(events: &mut EventLoop) {
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = poll(events).await {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v311_pubsub_retained_and_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());

    let (watcher, mut watcher_events, _) = server.connect("rq-watcher", true).await;
    watcher
        .subscribe("$aws/events/presence/connected/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut watcher_events).await;

    let (sub, mut sub_events, present) = server.connect("rq-sub", true).await;
    assert!(!present);
    sub.subscribe("rq/+/temp", QoS::AtLeastOnce).await.unwrap();
    assert_eq!(
        suback(&mut sub_events).await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let (publisher, mut pub_events, _) = server.connect("rq-pub", true).await;
    publisher
        .publish("rq/kitchen/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    puback(&mut pub_events).await;
    let got = next_publish(&mut sub_events).await;
    assert_eq!(got.topic, "rq/kitchen/temp");
    assert_eq!(got.payload, Bytes::from_static(b"21.5"));
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert!(!got.retain);

    // Lifecycle: the connected event of rq-sub, exact fields, milliseconds timestamp.
    let event = loop {
        let p = next_publish(&mut watcher_events).await;
        if p.topic == "$aws/events/presence/connected/rq-sub" {
            break p;
        }
    };
    let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(
        keys_in_wire_order(&event.payload),
        [
            "clientId",
            "timestamp",
            "eventType",
            "sessionIdentifier",
            "principalIdentifier",
            "ipAddress",
            "versionNumber"
        ]
    );
    assert_eq!(body["clientId"], "rq-sub");
    assert_eq!(body["eventType"], "connected");
    assert_eq!(body["ipAddress"], "127.0.0.1");
    assert!(body["timestamp"].as_i64().unwrap() > 1_600_000_000_000);

    // Retained: delivered with RETAIN=1 to an exact-match subscriber that comes later.
    publisher
        .publish("rq/retained", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    puback(&mut pub_events).await;
    let (late, mut late_events, _) = server.connect("rq-late", true).await;
    late.subscribe("rq/retained", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = next_publish(&mut late_events).await;
    assert_eq!(got.payload, Bytes::from_static(b"kept"));
    assert!(got.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_persistent_session_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (sub, mut sub_events, _) = server.connect("rq-durable", false).await;
    sub.subscribe("rq/durable", QoS::AtLeastOnce).await.unwrap();
    suback(&mut sub_events).await;
    sub.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while sub_events.poll().await.is_ok() {}
    })
    .await;
    drop(sub_events);

    let (publisher, mut pub_events, _) = server.connect("rq-writer", true).await;
    publisher
        .publish("rq/durable", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    puback(&mut pub_events).await;
    // Acknowledged, then the process dies without any chance to flush.
    let data_dir = server.kill();

    let server = Server::start(&data_dir);
    let (_sub, mut sub_events, present) = server.connect("rq-durable", false).await;
    assert!(present, "the persistent session survived the restart");
    let got = next_publish(&mut sub_events).await;
    assert_eq!(got.topic, "rq/durable");
    assert_eq!(got.payload, Bytes::from_static(b"while away"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_properties_and_limits() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as Client5, Event as E5, MqttOptions as Options5};

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let connect5 = |id: &str| {
        let mut o = Options5::new(id, server.mqtt.0.clone(), server.mqtt.1);
        o.set_keep_alive(Duration::from_secs(5));
        Client5::new(o, 64)
    };
    async fn next5(events: &mut rumqttc::v5::EventLoop) -> P5 {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
                .await
                .expect("no MQTT 5 event within 10 s")
                .expect("MQTT 5 connection failed");
            if let E5::Incoming(p) = event {
                return p;
            }
        }
    }

    let (sub, mut sub_events) = connect5("rq5-sub");
    match next5(&mut sub_events).await {
        P5::ConnAck(ack) => {
            let props = ack.properties.expect("CONNACK properties");
            // The aws profile: QoS 1 at most, 8 topic aliases, keep-alive 5 raised to 30.
            assert_eq!(props.max_qos, Some(1));
            assert_eq!(props.topic_alias_max, Some(8));
            assert_eq!(props.server_keep_alive, Some(30));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    sub.subscribe("rq5/req", Q5::AtLeastOnce).await.unwrap();
    loop {
        if let P5::SubAck(_) = next5(&mut sub_events).await {
            break;
        }
    }
    let (publisher, mut pub_events) = connect5("rq5-pub");
    let properties = PublishProperties {
        response_topic: Some("rq5/reply".into()),
        correlation_data: Some(Bytes::from_static(b"id-7")),
        user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    publisher
        .publish_with_properties("rq5/req", Q5::AtLeastOnce, false, "ping", properties)
        .await
        .unwrap();
    // A topic one level too deep (8 slashes) is refused with PUBACK 0x90.
    publisher
        .publish("a/b/c/d/e/f/g/h/i", Q5::AtLeastOnce, false, "deep")
        .await
        .unwrap();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        if let P5::PubAck(a) = next5(&mut pub_events).await {
            acks.push(a.reason);
        }
    }
    assert_eq!(acks[0], rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    assert_eq!(
        acks[1],
        rumqttc::v5::mqttbytes::v5::PubAckReason::TopicNameInvalid
    );
    let got = loop {
        if let P5::Publish(p) = next5(&mut sub_events).await {
            break p;
        }
    };
    assert_eq!(got.payload, Bytes::from_static(b"ping"));
    let props = got.properties.expect("PUBLISH properties");
    assert_eq!(props.response_topic.as_deref(), Some("rq5/reply"));
    assert_eq!(props.correlation_data, Some(Bytes::from_static(b"id-7")));
    assert_eq!(
        props.user_properties,
        vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string())
        ]
    );
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
}
