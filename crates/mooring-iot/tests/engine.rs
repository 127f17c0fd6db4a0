//! The rules engine end to end inside one process: rules created through the model, messages
//! fed to `on_message`, actions observed through a fake broker, a fake stream manager, a
//! local HTTP server and a local function command.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use bytes::Bytes;
use futures::future::BoxFuture;
use mooring_core::handles::{BrokerHandle, HandleError, PublishMessage, StreamsHandle};
use mooring_core::{Config, ServiceContext};
use mooring_iot::model::TopicRulePayload;
use mooring_iot::{InboundMessage, Iot};
use serde_json::{json, Value};

#[derive(Default)]
struct FakeBroker(Mutex<Vec<PublishMessage>>);

impl BrokerHandle for FakeBroker {
    fn publish(&self, message: PublishMessage) -> BoxFuture<'_, Result<(), HandleError>> {
        self.0.lock().unwrap().push(message);
        Box::pin(async { Ok(()) })
    }
}

impl FakeBroker {
    fn take(&self) -> Vec<PublishMessage> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[derive(Default)]
struct FakeStreams(Mutex<Vec<(String, Bytes)>>);

impl StreamsHandle for FakeStreams {
    fn append(&self, stream: &str, data: Bytes) -> BoxFuture<'_, Result<i64, HandleError>> {
        let result = if stream == "telemetry" {
            let mut appended = self.0.lock().unwrap();
            appended.push((stream.to_string(), data));
            Ok(appended.len() as i64 - 1)
        } else {
            Err(HandleError::NotFound(format!("stream {stream}")))
        };
        Box::pin(async move { result })
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    iot: Iot,
    broker: Arc<FakeBroker>,
    streams: Arc<FakeStreams>,
}

fn harness(iot_section: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let section: toml::Value = toml::from_str(iot_section).unwrap();
    let mut config: Config = (*ctx.config).clone();
    config.services.insert("iot".into(), section);
    ctx.config = Arc::new(config);
    let broker = Arc::new(FakeBroker::default());
    let streams = Arc::new(FakeStreams::default());
    ctx.handles.set_broker(broker.clone());
    ctx.handles.set_streams(streams.clone());
    let iot = Iot::start(&ctx).unwrap();
    Harness {
        _dir: dir,
        iot,
        broker,
        streams,
    }
}

impl Harness {
    async fn rule(&self, name: &str, sql: &str, actions: Value, error_action: Option<Value>) {
        let payload = TopicRulePayload {
            sql: Some(sql.into()),
            actions: Some(serde_json::from_value(actions).unwrap()),
            error_action,
            ..Default::default()
        };
        self.iot.rules.create(name, payload, vec![]).await.unwrap();
    }

    async fn publish(&self, message: InboundMessage) {
        self.iot.engine.on_message(&message);
        tokio::time::timeout(Duration::from_secs(20), self.iot.engine.wait_idle())
            .await
            .expect("actions finish");
    }
}

fn message(topic: &str, payload: &str, client: &str) -> InboundMessage {
    InboundMessage {
        topic: topic.into(),
        payload: Bytes::from(payload.to_string()),
        client_id: Some(client.into()),
        timestamp_ms: Some(1_700_000_000_123),
        ..Default::default()
    }
}

const ROLE: &str = "arn:aws:iam::000000000000:role/r";

#[tokio::test]
async fn the_seed_presence_rule_republishes_every_lifecycle_event_unchanged() {
    let h = harness("");
    h.rule(
        "presence",
        "SELECT * FROM '$aws/events/#'",
        json!([{"republish": {"roleArn": ROLE, "topic": "presence/${clientId}/${eventType}"}}]),
        None,
    )
    .await;
    h.rule(
        "everything",
        "SELECT * FROM '#'",
        json!([{"republish": {"roleArn": ROLE, "topic": "all/${topic()}"}}]),
        None,
    )
    .await;

    let connected = r#"{"clientId":"user-7","timestamp":1700000000123,"eventType":"connected","sessionIdentifier":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0","principalIdentifier":"abc","ipAddress":"203.0.113.7","versionNumber":3}"#;
    let subscribed = r#"{"clientId":"user-7","timestamp":1700000000200,"eventType":"subscribed","sessionIdentifier":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0","principalIdentifier":"abc","topics":["app/user-7/chat/42"]}"#;
    let disconnected = r#"{"clientId":"user-7","timestamp":1700000000300,"eventType":"disconnected","sessionIdentifier":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0","principalIdentifier":"abc","clientInitiatedDisconnect":false,"disconnectReason":"CONNECTION_LOST","versionNumber":3}"#;
    for (topic, payload) in [
        ("$aws/events/presence/connected/user-7", connected),
        ("$aws/events/subscriptions/subscribed/user-7", subscribed),
        ("$aws/events/presence/disconnected/user-7", disconnected),
    ] {
        h.publish(message(topic, payload, "iot-broker")).await;
    }
    let published = h.broker.take();
    let seen: Vec<(&str, &[u8])> = published
        .iter()
        .map(|m| (m.topic.as_str(), m.payload.as_ref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("presence/user-7/connected", connected.as_bytes()),
            ("presence/user-7/subscribed", subscribed.as_bytes()),
            ("presence/user-7/disconnected", disconnected.as_bytes()),
        ],
        "'#' must not match $aws topics and SELECT * must keep the payload byte for byte"
    );
    assert!(published.iter().all(|m| m.qos == 0 && !m.retain));

    h.publish(message("app/user-7/chat/42", r#"{"text":"hi"}"#, "user-7"))
        .await;
    let published = h.broker.take();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].topic, "all/app/user-7/chat/42");
}

#[tokio::test]
async fn the_seed_function_runs_as_a_local_command_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let script = "cat >> \"$OUT\"; echo >> \"$OUT\"";
    let h = harness(&format!(
        r#"
        [functions.brokerHandler]
        command = ["sh", "-c", {script:?}]
        env = {{ OUT = {out:?} }}
        "#,
        out = out.display().to_string()
    ));
    h.rule(
        "broker",
        "SELECT clientId, timestamp, eventType, get(topics, 0) AS topic FROM '$aws/events/#'",
        json!([{"lambda": {"functionArn": "arn:aws:lambda:us-east-1:000000000000:function:brokerHandler:live"}}]),
        None,
    )
    .await;
    h.publish(message(
        "$aws/events/subscriptions/subscribed/u1",
        r#"{"clientId":"u1","timestamp":5,"eventType":"subscribed","topics":["app/u1/chat/9"]}"#,
        "svc",
    ))
    .await;
    h.publish(message(
        "$aws/events/presence/disconnected/u1",
        r#"{"clientId":"u1","timestamp":6,"eventType":"disconnected"}"#,
        "svc",
    ))
    .await;
    let written = std::fs::read_to_string(&out).unwrap();
    let events: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events,
        vec![
            json!({"clientId":"u1","timestamp":5,"eventType":"subscribed","topic":"app/u1/chat/9"}),
            json!({"clientId":"u1","timestamp":6,"eventType":"disconnected"}),
        ]
    );
}

#[tokio::test]
async fn republish_renders_topic_and_mqtt5_header_templates() {
    let h = harness("");
    h.rule(
        "alerts",
        "SET @limit = 50 SELECT temp, temp - @limit AS over, topic(2) AS device FROM 'sensors/+/data' WHERE temp > @limit",
        json!([{"republish": {
            "roleArn": ROLE,
            "topic": "$$aws/things/${topic(2)}/alerts",
            "qos": 1,
            "headers": {
                "contentType": "application/json",
                "responseTopic": "replies/${clientid()}",
                "correlationData": "${encode(topic(2), 'base64')}",
                "messageExpiry": "${@limit * 2}",
                "userProperties": [{"key": "device", "value": "${topic(2)}"}, {"key": "limit", "value": "${@limit}"}]
            }
        }}]),
        None,
    )
    .await;
    h.publish(message("sensors/dev1/data", r#"{"temp": 20}"#, "dev1"))
        .await;
    assert!(h.broker.take().is_empty(), "WHERE false: no action");
    h.publish(message(
        "sensors/dev1/data",
        r#"{"temp": 72.5, "hum": 3}"#,
        "dev1",
    ))
    .await;
    let published = h.broker.take();
    assert_eq!(published.len(), 1);
    let m = &published[0];
    assert_eq!(m.topic, "$aws/things/dev1/alerts");
    assert_eq!(m.qos, 1);
    assert_eq!(
        serde_json::from_slice::<Value>(&m.payload).unwrap(),
        json!({"temp": 72.5, "over": 22.5, "device": "dev1"})
    );
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.response_topic.as_deref(), Some("replies/dev1"));
    assert_eq!(m.correlation_data.as_deref(), Some(&b"dev1"[..]));
    assert_eq!(m.message_expiry_interval, Some(100));
    assert_eq!(
        m.user_properties,
        vec![
            ("device".into(), "dev1".into()),
            ("limit".into(), "50".into())
        ]
    );
}

#[derive(Clone, Default)]
struct Recorded {
    requests: Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>,
    failures_left: Arc<Mutex<u32>>,
}

async fn record(
    State(state): State<Recorded>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    state
        .requests
        .lock()
        .unwrap()
        .push((uri.to_string(), headers, body));
    let mut left = state.failures_left.lock().unwrap();
    if *left > 0 {
        *left -= 1;
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn http_server(failures: u32) -> (String, Recorded) {
    let state = Recorded::default();
    *state.failures_left.lock().unwrap() = failures;
    let app = axum::Router::new()
        .fallback(record)
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

#[tokio::test]
async fn http_action_substitutes_url_and_headers_and_retries_server_errors() {
    let h = harness("[engine]\nhttp_backoff_ms = 10\n");
    let (base, server) = http_server(2).await;
    h.rule(
        "to_http",
        "SELECT VALUE temp FROM 'sensors/+/data'",
        json!([{"http": {
            "url": format!("{base}/devices/${{topic(2)}}?client=${{clientid()}}"),
            "headers": [{"key": "x-device", "value": "${topic(2)}"}, {"key": "content-type", "value": "text/plain"}]
        }}]),
        None,
    )
    .await;
    h.publish(message("sensors/d9/data", r#"{"temp": 21}"#, "c9"))
        .await;
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "two 503 answers, then success");
    let (uri, headers, body) = &requests[2];
    assert_eq!(uri, "/devices/d9?client=c9");
    assert_eq!(headers["x-device"], "d9");
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(body.as_ref(), b"21");
}

#[tokio::test]
async fn failed_actions_fire_the_error_action_once_with_every_failure() {
    // Outbound Kinesis (for the stream that is not local) goes to a closed port.
    let h = harness(
        "[engine]\nhttp_backoff_ms = 1\nhttp_attempts = 2\n[outbound]\nendpoint_url = \"http://127.0.0.1:9\"\naccess_key_id = \"a\"\nsecret_access_key = \"b\"\n",
    );
    let (base, server) = http_server(u32::MAX).await;
    h.rule(
        "failing",
        "SELECT * FROM 'in/#'",
        json!([
            {"http": {"url": format!("{base}/hook")}},
            {"kinesis": {"roleArn": ROLE, "streamName": "missing_stream"}},
            {"lambda": {"functionArn": "arn:aws:lambda:us-east-1:000000000000:function:nobody"}},
            {"republish": {"roleArn": ROLE, "topic": "ok/${topic(2)}"}}
        ]),
        Some(json!({"republish": {"roleArn": ROLE, "topic": "errors/${topic(2)}"}})),
    )
    .await;
    h.publish(message("in/x", "raw \u{1} bytes", "pub-1")).await;
    assert_eq!(server.requests.lock().unwrap().len(), 2);
    let mut published = h.broker.take();
    published.sort_by(|a, b| a.topic.cmp(&b.topic));
    let topics: Vec<&str> = published.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, vec!["errors/x", "ok/x"]);
    assert_eq!(published[1].payload.as_ref(), "raw \u{1} bytes".as_bytes());
    let error: Value = serde_json::from_slice(&published[0].payload).unwrap();
    assert_eq!(error["ruleName"], "failing");
    assert_eq!(error["topic"], "in/x");
    assert_eq!(error["clientId"], "pub-1");
    assert_eq!(error["base64OriginalPayload"], "cmF3IAEgYnl0ZXM=");
    assert!(error["cloudwatchTraceId"].as_str().unwrap().len() == 36);
    let failures = error["failures"].as_array().unwrap();
    let actions: Vec<&str> = failures
        .iter()
        .map(|f| f["failedAction"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["HttpAction", "KinesisAction", "LambdaAction"]);
    assert_eq!(failures[0]["failedResource"], format!("{base}/hook"));
    assert!(failures[0]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("HTTP 503"));
    assert_eq!(failures[1]["failedResource"], "missing_stream");
    assert!(failures[2]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("no local function"));
}

#[tokio::test]
async fn kinesis_appends_to_an_existing_local_stream() {
    let h = harness("");
    h.rule(
        "to_stream",
        "SELECT deviceId, reading * 2 AS doubled FROM 'telemetry/#'",
        json!([{"kinesis": {"roleArn": ROLE, "streamName": "telemetry", "partitionKey": "${deviceId}"}}]),
        None,
    )
    .await;
    h.publish(message(
        "telemetry/a",
        r#"{"deviceId":"a","reading":4}"#,
        "a",
    ))
    .await;
    let appended = h.streams.0.lock().unwrap().clone();
    assert_eq!(appended.len(), 1);
    assert_eq!(appended[0].0, "telemetry");
    assert_eq!(appended[0].1.as_ref(), br#"{"deviceId":"a","doubled":8}"#);
}

#[tokio::test]
async fn basic_ingest_reaches_only_the_named_rule_with_the_prefix_removed() {
    let h = harness("");
    h.rule(
        "ingest",
        "SELECT topic() AS t, topic(1) AS first, clientid() AS c FROM 'ignored/for/ingest'",
        json!([{"republish": {"roleArn": ROLE, "topic": "ingested"}}]),
        None,
    )
    .await;
    h.rule(
        "wildcard",
        "SELECT * FROM '#'",
        json!([{"republish": {"roleArn": ROLE, "topic": "wild"}}]),
        None,
    )
    .await;
    h.publish(message("$aws/rules/ingest/dev/1", "{}", "d1"))
        .await;
    h.publish(message("$aws/rules/unknown_rule/dev/1", "{}", "d1"))
        .await;
    let published = h.broker.take();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].topic, "ingested");
    assert_eq!(
        serde_json::from_slice::<Value>(&published[0].payload).unwrap(),
        json!({"t": "dev/1", "first": "dev", "c": "d1"})
    );
    assert_eq!(h.iot.engine.metrics.rule_not_found.get(), 1);
}

#[tokio::test]
async fn disabled_rules_do_not_run_until_enabled() {
    let h = harness("");
    h.rule(
        "toggle",
        "SELECT * FROM 'x'",
        json!([{"republish": {"roleArn": ROLE, "topic": "y"}}]),
        None,
    )
    .await;
    h.iot.rules.set_disabled("toggle", true).await.unwrap();
    h.publish(message("x", "{}", "c")).await;
    assert!(h.broker.take().is_empty());
    h.iot.rules.set_disabled("toggle", false).await.unwrap();
    h.publish(message("x", "{}", "c")).await;
    assert_eq!(h.broker.take().len(), 1);
    h.iot.rules.delete("toggle").await.unwrap();
    h.publish(message("x", "{}", "c")).await;
    assert!(h.broker.take().is_empty());
}

#[tokio::test]
async fn binary_payloads_pass_through_select_star_and_encode() {
    let h = harness("");
    h.rule(
        "raw",
        "SELECT * FROM 'bin/raw'",
        json!([{"republish": {"roleArn": ROLE, "topic": "out/raw"}}]),
        None,
    )
    .await;
    h.rule(
        "b64",
        "SELECT encode(*, 'base64') AS data, missing AS gone FROM 'bin/raw'",
        json!([{"republish": {"roleArn": ROLE, "topic": "out/b64"}}]),
        None,
    )
    .await;
    let bytes = Bytes::from_static(&[0xff, 0x00, 0x10, 0x80]);
    h.publish(InboundMessage {
        topic: "bin/raw".into(),
        payload: bytes.clone(),
        ..Default::default()
    })
    .await;
    let mut published = h.broker.take();
    published.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(published[0].topic, "out/b64");
    assert_eq!(published[0].payload.as_ref(), br#"{"data":"/wAQgA=="}"#);
    assert_eq!(published[1].payload, bytes);
}

#[tokio::test]
async fn rules_are_reloaded_from_the_store_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ctx = ServiceContext::for_tests(dir.path()).unwrap();
        let iot = Iot::start(&ctx).unwrap();
        iot.rules
            .create(
                "kept",
                TopicRulePayload {
                    sql: Some("SELECT * FROM 'k'".into()),
                    actions: Some(vec![json!({"republish": {"roleArn": ROLE, "topic": "k2"}})]),
                    ..Default::default()
                },
                vec![],
            )
            .await
            .unwrap();
    }
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let broker = Arc::new(FakeBroker::default());
    ctx.handles.set_broker(broker.clone());
    let iot = Iot::start(&ctx).unwrap();
    assert_eq!(iot.engine.rule_count(), 1);
    iot.engine.on_message(&message("k", "{}", "c"));
    iot.engine.wait_idle().await;
    assert_eq!(broker.take()[0].topic, "k2");
}

/// A broker whose publishes never finish: the state of a process killed mid-action.
struct StuckBroker;

impl BrokerHandle for StuckBroker {
    fn publish(&self, _message: PublishMessage) -> BoxFuture<'_, Result<(), HandleError>> {
        Box::pin(futures::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_executions_run_after_a_restart_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let republish = TopicRulePayload {
        sql: Some("SELECT n, topic() AS t FROM 'durable/+' WHERE n > 1".into()),
        actions: Some(vec![
            json!({"republish": {"roleArn": ROLE, "topic": "out/${n}"}}),
        ]),
        ..Default::default()
    };
    {
        let ctx = ServiceContext::for_tests(dir.path()).unwrap();
        ctx.handles.set_broker(Arc::new(StuckBroker));
        let iot = Iot::start(&ctx).unwrap();
        iot.rules.create("keep", republish, vec![]).await.unwrap();
        for n in 0..4 {
            let durable = iot.engine.on_message_durable(&message(
                "durable/a",
                &format!("{{\"n\":{n}}}"),
                "c",
            ));
            match durable {
                Some(receiver) => receiver.await.unwrap().unwrap(),
                None => assert!(n <= 1, "a matched message must be journaled"),
            }
        }
        // The actions hang as if the process had died; nothing reaches a broker.
    }
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let broker = Arc::new(FakeBroker::default());
    ctx.handles.set_broker(broker.clone());
    let iot = Iot::start(&ctx).unwrap();
    tokio::time::timeout(Duration::from_secs(20), iot.engine.wait_idle())
        .await
        .unwrap();
    let mut topics: Vec<String> = broker.take().into_iter().map(|m| m.topic).collect();
    topics.sort();
    assert_eq!(topics, vec!["out/2", "out/3"]);
    // Finished executions were removed: a third start replays nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let again = Arc::new(FakeBroker::default());
    ctx.handles.set_broker(again.clone());
    let iot = Iot::start(&ctx).unwrap();
    assert_eq!(iot.engine.replay_pending(), 0);
    iot.engine.wait_idle().await;
    assert!(again.take().is_empty());
}
