//! Delivery through the late-bound handles: MQTT publishes and stream appends wait (retrying)
//! while the broker or stream manager is not wired, are delivered once it is, and pending
//! deliveries survive reopening the store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use mooring_core::handles::{BrokerHandle, HandleError, PublishMessage, StreamsHandle};
use mooring_core::ServiceContext;
use mooring_events::model::EventsConfig;
use mooring_events::Events;
use serde_json::{json, Value};

#[derive(Default)]
struct FakeBroker {
    published: Mutex<Vec<PublishMessage>>,
    fail_first: Mutex<u32>,
}

impl BrokerHandle for FakeBroker {
    fn publish(&self, message: PublishMessage) -> BoxFuture<'_, Result<(), HandleError>> {
        let mut fail = self.fail_first.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return Box::pin(async { Err(HandleError::Internal("broker busy".into())) });
        }
        self.published.lock().unwrap().push(message);
        Box::pin(async { Ok(()) })
    }
}

#[derive(Default)]
struct FakeStreams(Mutex<Vec<(String, Bytes)>>);

impl StreamsHandle for FakeStreams {
    fn append(&self, stream: &str, data: Bytes) -> BoxFuture<'_, Result<i64, HandleError>> {
        if stream == "missing" {
            return Box::pin(async { Err(HandleError::NotFound("stream missing".into())) });
        }
        let mut all = self.0.lock().unwrap();
        all.push((stream.to_string(), data));
        let n = all.len() as i64;
        Box::pin(async move { Ok(n) })
    }
}

fn fast() -> EventsConfig {
    EventsConfig {
        retry_base_ms: 20,
        retry_max_ms: 50,
        ..EventsConfig::default()
    }
}

fn call(events: &Arc<Events>, op: &str, input: Value) -> Value {
    events
        .call_blocking(op, &input)
        .unwrap_or_else(|e| panic!("{op}: {} {}", e.code, e.message))
}

async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met in 3 s");
}

fn setup_rule(events: &Arc<Events>, ctx: &ServiceContext, targets: Value) {
    call(
        events,
        "PutRule",
        json!({"Name": "r", "EventPattern": "{\"source\":[\"dev\"]}"}),
    );
    let out = call(
        events,
        "PutTargets",
        json!({"Rule": "r", "Targets": targets}),
    );
    assert_eq!(out["FailedEntryCount"], 0, "{out}");
    let _ = ctx;
}

fn put(events: &Arc<Events>) -> String {
    let out = call(
        events,
        "PutEvents",
        json!({"Entries": [{"Source": "dev", "DetailType": "reading", "Detail": "{\"t\": 21.5}"}]}),
    );
    out["Entries"][0]["EventId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_delivery_waits_for_the_broker_then_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let events = Events::open(&ctx, fast()).unwrap();
    events.start_background();
    setup_rule(
        &events,
        &ctx,
        json!([{"Id": "mqtt", "Arn": "arn:aws:iot:us-east-1:000000000000:topic/sensors/t1", "InputPath": "$.detail"}]),
    );
    let id = put(&events);
    assert!(!id.is_empty());
    // No broker wired: the delivery stays pending and keeps being retried.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events.pending_deliveries(), 1);
    let broker = Arc::new(FakeBroker::default());
    *broker.fail_first.lock().unwrap() = 2;
    ctx.handles.set_broker(broker.clone());
    eventually(|| broker.published.lock().unwrap().len() == 1).await;
    let message = broker.published.lock().unwrap()[0].clone();
    assert_eq!(message.topic, "sensors/t1");
    assert_eq!(message.qos, 1);
    assert_eq!(
        serde_json::from_slice::<Value>(&message.payload).unwrap(),
        json!({"t": 21.5})
    );
    eventually(|| events.pending_deliveries() == 0).await;
    ctx.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_delivery_appends_the_event_and_dead_letters_missing_streams() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let streams = Arc::new(FakeStreams::default());
    ctx.handles.set_streams(streams.clone());
    let events = Events::open(&ctx, fast()).unwrap();
    events.start_background();
    setup_rule(
        &events,
        &ctx,
        json!([
            {"Id": "s", "Arn": "arn:aws:greengrass:us-east-1:000000000000:stream/telemetry"},
            {"Id": "m", "Arn": "arn:aws:greengrass:us-east-1:000000000000:stream/missing",
             "DeadLetterConfig": {"Arn": "arn:aws:greengrass:us-east-1:000000000000:stream/dlq"}}
        ]),
    );
    let id = put(&events);
    eventually(|| streams.0.lock().unwrap().len() == 2).await;
    let all = streams.0.lock().unwrap().clone();
    let telemetry = all.iter().find(|(s, _)| s == "telemetry").unwrap();
    let event: Value = serde_json::from_slice(&telemetry.1).unwrap();
    assert_eq!(event["id"], id);
    assert_eq!(event["detail-type"], "reading");
    let dlq = all.iter().find(|(s, _)| s == "dlq").unwrap();
    let dead: Value = serde_json::from_slice(&dlq.1).unwrap();
    assert_eq!(dead["body"]["id"], id);
    assert_eq!(dead["attributes"]["ERROR_CODE"], "NO_RESOURCE");
    assert_eq!(dead["attributes"]["RETRY_ATTEMPTS"], 0);
    eventually(|| events.pending_deliveries() == 0).await;
    ctx.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ctx = ServiceContext::for_tests(dir.path()).unwrap();
        let events = Events::open(&ctx, fast()).unwrap();
        setup_rule(
            &events,
            &ctx,
            json!([{"Id": "mqtt", "Arn": "arn:aws:iot:us-east-1:000000000000:topic/a"}]),
        );
        put(&events);
        put(&events);
        assert_eq!(events.pending_deliveries(), 2);
        // Dropped without running the worker: as after a crash.
    }
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let broker = Arc::new(FakeBroker::default());
    ctx.handles.set_broker(broker.clone());
    let events = Events::open(&ctx, fast()).unwrap();
    assert_eq!(events.pending_deliveries(), 2);
    events.start_background();
    eventually(|| broker.published.lock().unwrap().len() == 2).await;
    eventually(|| events.pending_deliveries() == 0).await;
    ctx.shutdown.trigger();
    drop(events);
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    assert_eq!(Events::open(&ctx, fast()).unwrap().pending_deliveries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_handle_puts_events_for_other_services() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let broker = Arc::new(FakeBroker::default());
    ctx.handles.set_broker(broker.clone());
    let service = mooring_events::EventsService::start(&ctx).unwrap();
    setup_rule(
        service.events(),
        &ctx,
        json!([{"Id": "mqtt", "Arn": "arn:aws:iot:us-east-1:000000000000:topic/h"}]),
    );
    let handle = ctx.handles.events().unwrap().clone();
    let results = handle
        .put_events(vec![
            json!({"Source": "dev", "DetailType": "x", "Detail": "{}"}),
            json!({"Source": "dev", "DetailType": "x", "Detail": "nope"}),
        ])
        .await
        .unwrap();
    assert!(results[0]["EventId"].is_string());
    assert_eq!(results[1]["ErrorCode"], "MalformedDetail");
    eventually(|| broker.published.lock().unwrap().len() == 1).await;
    ctx.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rules_fire_on_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let clock = mooring_core::clock::ManualClock::at(1_700_000_000_000);
    ctx.clock = Arc::new(clock.clone());
    let broker = Arc::new(FakeBroker::default());
    ctx.handles.set_broker(broker.clone());
    let events = Events::open(&ctx, fast()).unwrap();
    events.start_background();
    let arn = call(
        &events,
        "PutRule",
        json!({"Name": "tick", "ScheduleExpression": "rate(1 minute)"}),
    )["RuleArn"]
        .as_str()
        .unwrap()
        .to_string();
    call(
        &events,
        "PutTargets",
        json!({"Rule": "tick", "Targets": [{"Id": "m", "Arn": "arn:aws:iot:us-east-1:000000000000:topic/tick"}]}),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        broker.published.lock().unwrap().is_empty(),
        "fired before its time"
    );
    clock.advance(61_000);
    eventually(|| broker.published.lock().unwrap().len() == 1).await;
    let event: Value =
        serde_json::from_slice(&broker.published.lock().unwrap()[0].payload).unwrap();
    assert_eq!(event["source"], "aws.events");
    assert_eq!(event["detail-type"], "Scheduled Event");
    assert_eq!(event["resources"], json!([arn]));
    assert_eq!(event["detail"], json!({}));
    assert_eq!(event["time"], "2023-11-14T22:14:20Z");
    // Disabled rules do not fire.
    call(&events, "DisableRule", json!({"Name": "tick"}));
    clock.advance(120_000);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(broker.published.lock().unwrap().len(), 1);
    ctx.shutdown.trigger();
}
