//! Jobs under fleet load, in process: a 10,000-thing group, one CreateJob, then every device
//! asks `start-next` and reports `SUCCEEDED` through the MQTT device API's request path
//! ([`answer_batch`]: parse, state machine, one durable store write per batch).
//!
//! Prints the time until every device's `notify` is produced (the commit that makes the job
//! durable emits them), and the p50/p99 latency of `start-next` and `update` with all devices
//! asking at once. The peer in the same run is the same request path without group commit
//! (one store write per request, on a 500-device sample); the ratio is the throughput gain.
//!
//! `cargo bench -p mooring-iot --bench jobs` (`JOBS_BENCH_THINGS` overrides 10,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mooring_core::{Arns, Db, SystemClock};
use mooring_iot::jobs::device::{answer_batch, Incoming};
use mooring_iot::jobs::engine::NewJob;
use mooring_iot::jobs::{Jobs, JobsConfig};
use mooring_iot::registry::groups::{NewThingGroup, ThingGroupRegistry};
use mooring_iot::registry::things::{NewThing, ThingRegistry};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Sends one request per thing, all at once, in batches of `batch`; returns each latency.
async fn burst(
    jobs: &Jobs,
    things: &[String],
    suffix: &str,
    payload: &str,
    batch: usize,
) -> Vec<Duration> {
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(things.len());
    for chunk in things.chunks(batch) {
        let requests = chunk
            .iter()
            .map(|t| Incoming {
                client_id: t.clone(),
                topic: format!("$aws/things/{t}/jobs/{}", suffix.replace("{thing}", t)),
                payload: Bytes::from(payload.to_string()),
                qos: 1,
            })
            .collect();
        let replies = answer_batch(jobs, requests).await;
        assert!(
            replies.iter().all(|r| r.accepted),
            "{:?}",
            replies.iter().find(|r| !r.accepted)
        );
        let done = start.elapsed();
        latencies.extend(std::iter::repeat_n(done, chunk.len()));
    }
    latencies.sort();
    latencies
}

fn main() {
    let n: usize = std::env::var("JOBS_BENCH_THINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("metadata.db")).unwrap();
        let arns = Arns::new("123456789012", "us-east-1");
        let things = ThingRegistry::open(db.clone(), arns.clone()).unwrap();
        let groups = ThingGroupRegistry::open(db.clone(), arns.clone(), things.clone()).unwrap();
        groups.create("fleet", NewThingGroup::default()).await.unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
        for name in &names {
            things.create(name, NewThing::default()).await.unwrap();
            groups.add_thing("fleet", name).await.unwrap();
        }
        let store = Arc::new(mooring_iot::jobs::store::SqliteJobStore::open(db.clone()).unwrap());
        let jobs = Jobs::with_store(
            store,
            arns.clone(),
            Arc::new(SystemClock),
            things,
            groups,
            JobsConfig { device_requests_per_second: 0, ..Default::default() },
        )
        .unwrap();

        let started = Instant::now();
        jobs.create_job(
            "fleet-update",
            NewJob {
                targets: vec![arns.arn("iot", "thinggroup/fleet")],
                document: Some("{\"operation\":\"update\"}".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let notify_all = started.elapsed();

        let start_next = burst(&jobs, &names, "start-next", "{}", 512).await;
        let update = burst(&jobs, &names, "fleet-update/update", "{\"status\":\"SUCCEEDED\"}", 512).await;

        // The peer: the same path with one store write per request, on a sample.
        let sample = &names[..names.len().min(500)];
        for id in ["sample-a", "sample-b"] {
            jobs.create_job(
                id,
                NewJob {
                    targets: sample
                        .iter()
                        .map(|t| arns.arn("iot", &format!("thing/{t}")))
                        .collect(),
                    document: Some("{}".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let done = "{\"status\":\"SUCCEEDED\"}";
        let t = Instant::now();
        burst(&jobs, sample, "sample-a/update", done, 1).await;
        let unbatched = sample.len() as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        burst(&jobs, sample, "sample-b/update", done, 512).await;
        let batched_sample = sample.len() as f64 / t.elapsed().as_secs_f64();
        println!("jobs bench: {n} things in one group, one CreateJob (in process, durable SQLite)");
        println!("  CreateJob until every notify is produced: {:?}", notify_all);
        println!(
            "  start-next, all {n} at once: p50 {:?}  p99 {:?}  ({:.0} req/s)",
            percentile(&start_next, 0.5),
            percentile(&start_next, 0.99),
            n as f64 / start_next.last().unwrap().as_secs_f64()
        );
        println!(
            "  update SUCCEEDED, all {n} at once: p50 {:?}  p99 {:?}  ({:.0} req/s)",
            percentile(&update, 0.5),
            percentile(&update, 0.99),
            n as f64 / update.last().unwrap().as_secs_f64()
        );
        println!(
            "  update, group commit vs one write per request ({} things): {:.0} vs {:.0} req/s, ratio {:.1}x",
            sample.len(),
            batched_sample,
            unbatched,
            batched_sample / unbatched
        );
    });
}
