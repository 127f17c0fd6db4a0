//! Rules-engine throughput: messages per second through `RulesEngine::evaluate` (topic
//! matching, JSON parse, WHERE and SELECT; actions excluded) and through the MQTT broker's
//! router with the engine hooked in (`Broker::route`, no subscribers), with 1, 100 and
//! 1,000 rules of distinct topic filters, of which one matches, plus the bare SQL
//! evaluation rate of a simple `SELECT ... WHERE` on an already parsed payload.
//!
//! The peers run in the same process: a naive engine that scans every rule, tests its
//! filter and, for the matching ones, parses the payload and evaluates the SQL on its own
//! (no filter index, no shared parse), a linear scan of the filters alone, and
//! `serde_json` parsing the same payload (the floor any JSON rules engine pays per
//! message). Run with `cargo bench -p mooring-iot --bench rules_engine`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mooring_core::ServiceContext;
use mooring_iot::model::{StoredRule, TopicRulePayload};
use mooring_iot::sql::{self, MessageFacts, NoExternalFunctions, SqlVersion};
use mooring_iot::topic;
use mooring_iot::{broker_bridge, InboundMessage, RulesEngine};

const PAYLOAD: &[u8] =
    br#"{"deviceId":"dev-42","temp":72.5,"humidity":40,"status":"ok","readings":[1,2,3]}"#;
/// The same reading below the matching rule's threshold.
const COLD_PAYLOAD: &[u8] =
    br#"{"deviceId":"dev-42","temp":12.5,"humidity":40,"status":"ok","readings":[1,2,3]}"#;

fn rate(label: &str, mut op: impl FnMut() -> usize) -> f64 {
    // Warm up, then run for about a second.
    let mut n = 0usize;
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        n += op();
    }
    black_box(n);
    let start = Instant::now();
    let mut iterations = 0u64;
    let mut produced = 0usize;
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..1000 {
            produced += op();
        }
        iterations += 1000;
    }
    let per_sec = iterations as f64 / start.elapsed().as_secs_f64();
    black_box(produced);
    println!("{label:<64} {per_sec:>12.0} /s");
    per_sec
}

fn stored(name: &str, sql: &str) -> StoredRule {
    StoredRule {
        name: name.into(),
        arn: format!("arn:aws:iot:us-east-1:000000000000:rule/{name}"),
        payload: TopicRulePayload {
            sql: Some(sql.into()),
            actions: Some(vec![]),
            ..Default::default()
        },
        created_at: 0.0,
        tags: vec![],
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let ctx = ServiceContext::for_tests(dir.path()).unwrap();
    let engine = RulesEngine::start(&ctx, &Default::default());
    let broker = mooring_mqtt::start(&ctx).unwrap();
    broker_bridge::connect(&broker, engine.clone());

    println!("IoT rules engine (one core; actions excluded)");
    let statement = sql::parse(
        "SELECT deviceId, temp FROM 'sensors/+/data' WHERE temp > 50",
        SqlVersion::V2016_03_23,
    )
    .unwrap();
    let facts = MessageFacts::new("sensors/dev-42/data", PAYLOAD.to_vec());
    facts.document(SqlVersion::V2016_03_23);
    let eval_only = rate(
        "SQL evaluation, SELECT ... WHERE, payload pre-parsed",
        || match sql::evaluate(&statement, &facts, &NoExternalFunctions) {
            sql::EvalOutcome::Matched { .. } => 1,
            sql::EvalOutcome::Filtered => 0,
        },
    );
    let parse_floor = rate("peer: serde_json::from_slice of the payload", || {
        black_box(serde_json::from_slice::<serde_json::Value>(PAYLOAD).unwrap());
        1
    });

    let message = InboundMessage {
        topic: "sensors/dev-42/data".into(),
        payload: Bytes::from_static(PAYLOAD),
        client_id: Some("dev-42".into()),
        timestamp_ms: Some(1),
        trace_id: Some("t".into()),
        ..Default::default()
    };
    let mut flat = Vec::new();
    for count in [1usize, 100, 1000] {
        let mut rules = vec![stored(
            "matching",
            "SELECT deviceId, temp FROM 'sensors/+/data' WHERE temp > 50",
        )];
        let mut filters = vec!["sensors/+/data".to_string()];
        for i in 1..count {
            let filter = format!("fleet{}/device{i}/+/data", i % 10);
            rules.push(stored(
                &format!("other_{i}"),
                &format!("SELECT * FROM '{filter}' WHERE temp > {i}"),
            ));
            filters.push(filter);
        }
        engine.replace_all(&rules);
        let per_sec = rate(
            &format!("engine: {count:>4} rules (1 matching), parse+WHERE+SELECT"),
            || engine.evaluate(&message).len(),
        );
        // Through the broker: the same message routed with the engine hooked in; the
        // matching rule's WHERE is false here so no action is queued (queues would fill).
        let routed = mooring_mqtt::Message {
            topic: message.topic.clone(),
            payload: Bytes::from_static(COLD_PAYLOAD),
            qos: 0,
            retain: false,
            properties: Default::default(),
            expires_at_ms: None,
            origin: Default::default(),
        };
        let routed = std::sync::Arc::new(routed);
        rate(
            &format!("broker: route() with {count:>4} rules hooked in (WHERE false)"),
            || broker.route(routed.clone()).len() + 1,
        );
        let compiled: Vec<(String, sql::Statement)> = rules
            .iter()
            .map(|r| {
                let sql_text = r.payload.sql.as_deref().unwrap();
                let statement = sql::parse(sql_text, SqlVersion::V2016_03_23).unwrap();
                (statement.from.clone().unwrap(), statement)
            })
            .collect();
        let naive = rate(
            &format!("peer: naive per-rule scan, {count:>4} rules, parse per rule"),
            || {
                let mut matched = 0;
                for (filter, statement) in &compiled {
                    if topic::matches(filter, &message.topic) {
                        let facts =
                            MessageFacts::new(message.topic.clone(), message.payload.clone());
                        if let sql::EvalOutcome::Matched { .. } =
                            sql::evaluate(statement, &facts, &NoExternalFunctions)
                        {
                            matched += 1;
                        }
                    }
                }
                matched
            },
        );
        println!(
            "    ratio engine / naive per-rule scan: {:.2}",
            per_sec / naive
        );
        let scan = rate(
            &format!("peer: linear filter scan over {count:>4} rules (matching only)"),
            || {
                filters
                    .iter()
                    .filter(|f| topic::matches(f, &message.topic))
                    .count()
            },
        );
        println!(
            "    ratio engine (full evaluation) / linear scan (matching alone): {:.2}",
            per_sec / scan
        );
        flat.push(per_sec);
    }
    println!(
        "evaluation-only rate vs 500,000/s target: {:.2}x; engine per message vs serde_json parse alone: {:.2}",
        eval_only / 500_000.0,
        flat[0] / parse_floor
    );
    println!(
        "cost flatness: 1,000 rules run at {:.0}% of the 1-rule rate",
        100.0 * flat[2] / flat[0]
    );
}
