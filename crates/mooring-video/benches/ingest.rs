//! Ingest benchmark: PutMedia throughput and PERSISTED latency against the raw disk.
//!
//! In one run, on the same file system, each Mooring case beside a raw peer doing the same
//! writes straight to files with an fsync after each fragment: (1) one stream ingesting
//! fragments as fast as it can, against one raw writer; (2) 100 concurrent streams at 2 Mbps
//! (one 250 KB fragment a second each), against 100 raw writer threads on the same pacing;
//! (3) the same 100 streams unpaced (capacity), against 100 unpaced raw writers. It prints
//! MB/s for each, the ratio to its raw peer, and the latency from a fragment's last byte to
//! its PERSISTED ack (p50/p99). The per-stream PutMedia bandwidth quota (`[video]
//! put_media_bytes_per_sec`, KVS's 12.5 MB/s) is switched off: this measures what the ingest
//! path and the disk can take, not the configured quota. Run with
//! `BENCH_DIR=target BENCH_FRAGMENTS=100 cargo bench -p mooring-video --bench ingest`
//! (`BENCH_STREAM_FRAGMENTS`, default 5, sets the fragments per stream of the 100-stream
//! cases: more gives steadier figures on a busy machine).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use http_body_util::BodyExt;
use mooring_aws::{AwsRequest, AwsService, RequestContext};
use mooring_core::ServiceContext;
use mooring_video::VideoService;
use tokio::sync::mpsc;

const FRAMES_PER_FRAGMENT: usize = 25;
/// 2 Mbps for one second.
const FRAGMENT_BYTES: usize = 250_000;

fn element(id: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = id.to_vec();
    out.push(0x01);
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes()[1..]);
    out.extend_from_slice(payload);
    out
}

fn header() -> Vec<u8> {
    let mut out = element(
        &[0x1A, 0x45, 0xDF, 0xA3],
        &element(&[0x42, 0x82], b"matroska"),
    );
    out.extend_from_slice(&[
        0x18, 0x53, 0x80, 0x67, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    out.extend(element(
        &[0x15, 0x49, 0xA9, 0x66],
        &element(&[0x2A, 0xD7, 0xB1], &[0x0F, 0x42, 0x40]),
    ));
    let mut entry = element(&[0xD7], &[1]);
    entry.extend(element(&[0x83], &[1]));
    entry.extend(element(&[0x86], b"V_MPEG4/ISO/AVC"));
    entry.extend(element(&[0x23, 0xE3, 0x83], &40_000_000u32.to_be_bytes()));
    out.extend(element(
        &[0x16, 0x54, 0xAE, 0x6B],
        &element(&[0xAE], &entry),
    ));
    out
}

fn cluster(index: u64) -> Vec<u8> {
    let mut body = element(&[0xE7], &(index * 1000).to_be_bytes());
    let frame = vec![(index % 251) as u8; FRAGMENT_BYTES / FRAMES_PER_FRAGMENT];
    for f in 0..FRAMES_PER_FRAGMENT {
        let mut block = vec![0x81];
        block.extend_from_slice(&((f * 40) as i16).to_be_bytes());
        block.push(if f == 0 { 0x80 } else { 0 });
        block.extend_from_slice(&frame);
        body.extend(element(&[0xA3], &block));
    }
    element(&[0x1F, 0x43, 0xB6, 0x75], &body)
}

/// Streams `fragments` clusters into `stream`; returns per-fragment PERSISTED latencies.
async fn ingest(
    service: Arc<VideoService>,
    stream: String,
    fragments: u64,
    pace: Option<Duration>,
) -> Vec<Duration> {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    let request = Request::builder()
        .method("POST")
        .uri("/putMedia")
        .header("x-amzn-stream-name", &stream)
        .header("x-amzn-fragment-timecode-type", "ABSOLUTE")
        .header("x-amzn-producer-start-timestamp", "0")
        .body(body)
        .unwrap();
    let response = service
        .call(AwsRequest {
            request,
            body: Bytes::new(),
            context: RequestContext::default(),
        })
        .await;
    assert_eq!(response.status(), 200);
    let sent = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let sent_by_writer = sent.clone();
    let writer = tokio::spawn(async move {
        tx.send(Bytes::from(header())).await.unwrap();
        for i in 0..fragments {
            let data = Bytes::from(cluster(i));
            tx.send(data).await.unwrap();
            sent_by_writer.lock().unwrap().push(Instant::now());
            if let Some(p) = pace {
                tokio::time::sleep(p).await;
            }
        }
    });
    let mut body = response.into_body();
    let mut latencies = Vec::new();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let ack: serde_json::Value = serde_json::from_slice(&line).unwrap();
            match ack["EventType"].as_str() {
                Some("PERSISTED") => {
                    let index = (ack["FragmentTimecode"].as_i64().unwrap() / 1000) as usize;
                    let at = sent.lock().unwrap()[index];
                    latencies.push(at.elapsed());
                    if latencies.len() as u64 == fragments {
                        writer.abort();
                        return latencies;
                    }
                }
                Some("ERROR") => panic!("ingest error: {ack}"),
                _ => {}
            }
        }
    }
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The raw peer: `writers` threads, each appending `per_writer` fragments to its own file
/// with an fsync after each (optionally `pace` apart); returns the elapsed seconds.
fn raw_writers(
    dir: &std::path::Path,
    writers: usize,
    per_writer: u64,
    pace: Option<Duration>,
) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let path = dir.join(format!("raw-{w}.bin"));
            std::thread::spawn(move || {
                let mut file = std::fs::File::create(&path).unwrap();
                for i in 0..per_writer {
                    file.write_all(&cluster(i)).unwrap();
                    file.sync_data().unwrap();
                    // No pause after the last one: the Mooring side stops its clock at the
                    // last PERSISTED ack.
                    if let (Some(p), true) = (pace, i + 1 < per_writer) {
                        std::thread::sleep(p);
                    }
                }
                drop(file);
                std::fs::remove_file(&path).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// `streams` concurrent PutMedia streams named `{prefix}-{n}`, each sending `per_stream`
/// fragments; returns the elapsed seconds and every PERSISTED latency, sorted.
async fn ingest_many(
    service: &Arc<VideoService>,
    prefix: &str,
    streams: usize,
    per_stream: u64,
    pace: Option<Duration>,
) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|s| {
            tokio::spawn(ingest(
                service.clone(),
                format!("{prefix}-{s}"),
                per_stream,
                pace,
            ))
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort();
    (secs, latencies)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // BENCH_DIR (default: the workspace's target/) picks the file system; a relative path
    // is taken from the workspace root, since cargo runs benches in the crate directory.
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bench_dir = workspace.join(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target".into()));
    std::fs::create_dir_all(&bench_dir).unwrap();
    let dir = tempfile::tempdir_in(&bench_dir).unwrap();
    let fragments: u64 = std::env::var("BENCH_FRAGMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let sample = cluster(0);
    let mb = |n: u64| n as f64 * sample.len() as f64 / 1e6;

    // Raw peer: the same bytes, fsync per fragment.
    let raw_path = dir.path().join("raw.bin");
    let mut raw = std::fs::File::create(&raw_path).unwrap();
    let started = Instant::now();
    for i in 0..fragments {
        raw.write_all(&cluster(i)).unwrap();
        raw.sync_data().unwrap();
    }
    let raw_secs = started.elapsed().as_secs_f64();
    let raw_rate = mb(fragments) / raw_secs;

    runtime.block_on(async {
        let mut ctx = ServiceContext::for_tests(dir.path()).unwrap();
        let mut config = (*ctx.config).clone();
        config.services.insert(
            "video".into(),
            toml::from_str("put_media_bytes_per_sec = 0").unwrap(),
        );
        ctx.config = std::sync::Arc::new(config);
        let service = VideoService::new(&ctx).unwrap();
        let kv = |name: &str, retention: i64| {
            let body = serde_json::json!({"StreamName": name, "DataRetentionInHours": retention});
            Request::builder()
                .method("POST")
                .uri("/createStream")
                .body(Body::empty())
                .map(|request| AwsRequest {
                    request,
                    body: Bytes::from(body.to_string()),
                    context: RequestContext { region: "us-east-1".into(), ..Default::default() },
                })
                .unwrap()
        };
        assert_eq!(service.call(kv("bench-one", 1)).await.status(), 200);
        let started = Instant::now();
        let mut one = ingest(service.clone(), "bench-one".into(), fragments, None).await;
        let one_secs = started.elapsed().as_secs_f64();
        one.sort();
        let one_rate = mb(fragments) / one_secs;

        let streams = 100;
        let per_stream: u64 = std::env::var("BENCH_STREAM_FRAGMENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        for prefix in ["paced", "unpaced"] {
            for s in 0..streams {
                let created = service.call(kv(&format!("{prefix}-{s}"), 1)).await;
                assert_eq!(created.status(), 200);
            }
        }
        let second = Some(Duration::from_secs(1));
        let (paced_secs, paced) = ingest_many(&service, "paced", streams, per_stream, second).await;
        let raw_paced_secs = raw_writers(dir.path(), streams, per_stream, second);
        let (unpaced_secs, unpaced) = ingest_many(&service, "unpaced", streams, per_stream, None).await;
        let raw_unpaced_secs = raw_writers(dir.path(), streams, per_stream, None);
        let total = mb(streams as u64 * per_stream);

        println!("fragment size: {} bytes (2 Mbps x 1 s), {} fragments", sample.len(), fragments);
        println!("raw disk, 1 writer, fsync per fragment:  {raw_rate:8.1} MB/s");
        println!(
            "PutMedia, 1 stream:                      {one_rate:8.1} MB/s  ratio to raw {:.2}  PERSISTED latency p50 {:?} p99 {:?}",
            one_rate / raw_rate,
            percentile(&one, 0.5),
            percentile(&one, 0.99)
        );
        let all = |l: &[Duration]| l.len() == streams * per_stream as usize;
        println!(
            "{streams} streams x 2 Mbps, {per_stream} fragments each 1 s apart (offered {:.1} MB/s):",
            streams as f64 * sample.len() as f64 / 1e6
        );
        println!(
            "  raw disk, {streams} writers, same pacing:  {:8.1} MB/s",
            total / raw_paced_secs
        );
        println!(
            "  PutMedia:                              {:8.1} MB/s  ratio to raw {:.2}  all persisted: {}  PERSISTED latency p50 {:?} p99 {:?}",
            total / paced_secs,
            raw_paced_secs / paced_secs,
            all(&paced),
            percentile(&paced, 0.5),
            percentile(&paced, 0.99)
        );
        println!("{streams} streams unpaced (capacity), {per_stream} fragments each:");
        println!(
            "  raw disk, {streams} writers:               {:8.1} MB/s",
            total / raw_unpaced_secs
        );
        println!(
            "  PutMedia:                              {:8.1} MB/s  ratio to raw {:.2}  all persisted: {}  PERSISTED latency p50 {:?} p99 {:?}",
            total / unpaced_secs,
            raw_unpaced_secs / unpaced_secs,
            all(&unpaced),
            percentile(&unpaced, 0.5),
            percentile(&unpaced, 0.99)
        );
        ctx.shutdown.trigger();
    });
}
