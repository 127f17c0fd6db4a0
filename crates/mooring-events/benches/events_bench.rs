//! Benchmarks of the event bus, printed as a small report.
//!
//! 1. Matcher throughput: one typical event against rule sets of 10, 1,000 and 10,000 rules,
//!    in two workloads: *simple* rules (`{"source":["svc-N"],"detail-type":["reading"]}`, the
//!    issue's "simple match"; all rules share a few detail-types so the index has to pick the
//!    distinguishing field) and *mixed* rules (`source` plus a numeric range on a detail field).
//!    In each set exactly one rule matches the event. The loop is one thread, and the rate is
//!    events routed per second of that thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so the
//!    figure is "matches per second per core" even on a shared machine (an event routed
//!    through the whole rule set and its one matching rule found counts as one match); the
//!    wall-clock rate is printed beside it. Prints the slowdown from 10
//!    to 10,000 rules (target: >= 1,000,000/s per core and < 1.5x), beside moto's matcher on
//!    the same rules and event in the same run (a Python child: `BENCH_PYTHON`, else
//!    `.venv/bin/python`, else `/tmp/venv-probe/bin/python`), with the ratio.
//! 2. PutEvents end to end over loopback HTTP: the `mooring` binary (`BENCH_MOORING_BIN`, else
//!    `target/release/mooring`, else `target/debug/mooring`; started with `--auth none`) and
//!    moto's `moto_server` (`MOTO_SERVER`, else `.venv/bin/moto_server`, else
//!    `/tmp/venv-probe/bin/moto_server`) on ephemeral ports in the same run, the same load
//!    (8 keep-alive connections, 10 entries per request) for a fixed time each; prints
//!    entries/s, p50/p99 latency and the ratio. Run: `cargo bench -p mooring-events`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mooring_events::pattern;
use mooring_events::ruleset::RuleSet;
use serde_json::{json, Value};

/// The two rule workloads of the matcher bench.
#[derive(Clone, Copy)]
enum Workload {
    Simple,
    Mixed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Simple => "simple",
            Workload::Mixed => "mixed",
        }
    }
}

/// The bench's rule set of `rules` patterns: all but one require another `source`.
fn bench_patterns(workload: Workload, rules: usize) -> Vec<String> {
    let detail_types = ["reading", "alarm", "status"];
    let mut patterns: Vec<String> = (0..rules - 1)
        .map(|i| match workload {
            Workload::Simple => format!(
                r#"{{"source":["svc-{i}"],"detail-type":["{}"]}}"#,
                detail_types[i % detail_types.len()]
            ),
            Workload::Mixed => format!(
                r#"{{"source":["svc-{i}"],"detail":{{"temperature":[{{"numeric":[">",{i}]}}]}}}}"#
            ),
        })
        .collect();
    patterns.push(match workload {
        Workload::Simple => r#"{"source":["sensor.hub"],"detail-type":["reading"]}"#.to_string(),
        Workload::Mixed => r#"{"source":["sensor.hub"],"detail":{"room":["lab"]}}"#.to_string(),
    });
    // The matching rule is not always last: file it among the others.
    let last = patterns.len() - 1;
    patterns.swap(last / 2, last);
    patterns
}

fn bench_event() -> Value {
    json!({
        "version": "0", "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718", "detail-type": "reading",
        "source": "sensor.hub", "account": "000000000000", "time": "2026-01-01T00:00:00Z",
        "region": "us-east-1", "resources": [], "detail": {"temperature": 21.5, "room": "lab"}
    })
}

/// moto's matcher (what moto_server routes with): each event is tested against every rule's
/// `EventPattern.matches_event`, as moto does. Prints "<events/s>" for the rule count given.
const MOTO_MATCHER: &str = r#"
import json, sys, time
from moto.events.models import EventPattern
patterns = [EventPattern.load(p) for p in json.loads(sys.stdin.read())]
event = json.loads(sys.argv[1])
seconds = float(sys.argv[2])
n = 0
start = time.perf_counter()
while True:
    hits = sum(1 for p in patterns if p.matches_event(event))
    assert hits == 1, hits
    n += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
        break
print(n / elapsed)
"#;

fn venv_python(repo: &Path) -> Option<PathBuf> {
    std::env::var_os("BENCH_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            first_existing(&[
                repo.join(".venv/bin/python"),
                PathBuf::from("/tmp/venv-probe/bin/python"),
            ])
        })
}

/// Events per second moto's matcher sustains against `patterns`, or None without moto.
fn moto_matcher_rate(python: &Path, patterns: &[String], seconds: f64) -> Option<f64> {
    use std::io::Write;
    let mut child = Command::new(python)
        .args([
            "-c",
            MOTO_MATCHER,
            &bench_event().to_string(),
            &seconds.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()?
        .write_all(serde_json::to_string(patterns).ok()?.as_bytes())
        .ok()?;
    let out = child.wait_with_output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// CPU time consumed by the calling thread so far, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

fn matcher_bench(workload: Workload) {
    let event = bench_event();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = venv_python(&repo);
    let label = workload.name();
    let mut rates = Vec::new();
    for rules in [10usize, 1_000, 10_000] {
        let mut set = RuleSet::new();
        for (i, p) in bench_patterns(workload, rules).iter().enumerate() {
            set.insert(i, Arc::new(pattern::parse(p).unwrap()));
        }
        // Warm up, then run batches of 1,000 events for at least two seconds.
        for _ in 0..1_000 {
            set.for_each_match(std::hint::black_box(&event), |_| {});
        }
        let start = Instant::now();
        let cpu_start = thread_cpu_seconds();
        let mut hits = 0usize;
        let mut iterations = 0usize;
        while start.elapsed() < Duration::from_secs(2) {
            for _ in 0..1_000 {
                set.for_each_match(std::hint::black_box(&event), |_| hits += 1);
            }
            iterations += 1_000;
        }
        let elapsed = start.elapsed();
        let cpu = thread_cpu_seconds() - cpu_start;
        assert_eq!(hits, iterations);
        // Per core: matches per second of CPU time this thread got (the machine may be shared,
        // so wall-clock time would also count time spent waiting for a core).
        let rate = iterations as f64 / cpu;
        let wall_rate = iterations as f64 / elapsed.as_secs_f64();
        let peer = python
            .as_deref()
            .and_then(|py| moto_matcher_rate(py, &bench_patterns(workload, rules), 2.0));
        let versus = match peer {
            Some(moto) => format!(
                "moto's matcher {moto:>9.0} events/s, ratio {:.0}x",
                rate / moto
            ),
            None => "moto's matcher: not available (set BENCH_PYTHON)".to_string(),
        };
        println!(
            "matcher {label}: {rules:>6} rules: {rate:>10.0} matches/s per core ({:.0} ns CPU/event, one thread; wall {wall_rate:.0}/s); {versus}",
            cpu * 1e9 / iterations as f64
        );
        rates.push(rate);
    }
    println!(
        "matcher {label}: slowdown from 10 to 10,000 rules: {:.2}x (target < 1.5x); lowest rate / 1,000,000 per core target: {:.2}",
        rates[0] / rates[2],
        rates.iter().cloned().fold(f64::INFINITY, f64::min) / 1_000_000.0
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn first_existing(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.exists()).cloned()
}

struct Server {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn start_mooring(repo: &Path, data: &Path) -> Option<Server> {
    let bin = std::env::var_os("BENCH_MOORING_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            first_existing(&[
                repo.join("target/release/mooring"),
                repo.join("target/debug/mooring"),
            ])
        })?;
    println!("put_events: mooring binary {}", bin.display());
    let port = free_port();
    let child = Command::new(&bin)
        .args([
            "serve",
            "--auth",
            "none",
            "--http-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--mqtt-listen",
            "",
            "--mqtts-listen",
            "",
            "--stream-manager-listen",
            "",
        ])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server {
        name: "mooring",
        child,
        port,
    };
    wait_ready(port).then_some(server)
}

fn start_moto(repo: &Path) -> Option<Server> {
    let bin = std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .or_else(|| {
            first_existing(&[
                repo.join(".venv/bin/moto_server"),
                PathBuf::from("/tmp/venv-probe/bin/moto_server"),
            ])
        })?;
    let port = free_port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server {
        name: "moto",
        child,
        port,
    };
    wait_ready(port).then_some(server)
}

const CREDENTIAL: &str = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/events/aws4_request, SignedHeaders=host;x-amz-date;x-amz-target, Signature=0000000000000000000000000000000000000000000000000000000000000000";

async fn connection(port: u16) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn call(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    port: u16,
    target: &str,
    body: &Value,
    signed: bool,
) -> (u16, Value) {
    let mut request = http::Request::builder()
        .method("POST")
        .uri("/")
        .header("host", format!("127.0.0.1:{port}"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", target)
        .header("x-amz-date", "20260101T000000Z");
    if signed {
        request = request.header("authorization", CREDENTIAL);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    if sender.ready().await.is_err() {
        // The peer closed the connection (moto's development server does not keep alive).
        *sender = connection(port).await;
    }
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Runs the PutEvents load against one server; returns (entries/s, p50 ms, p99 ms).
async fn put_events_load(server: &Server, seconds: f64) -> (f64, f64, f64) {
    let port = server.port;
    let signed = server.name == "moto";
    let mut setup = connection(port).await;
    let rule = json!({"Name": "bench", "EventPattern": "{\"source\":[\"bench.nomatch\"]}"});
    let (status, _) = call(&mut setup, port, "AWSEvents.PutRule", &rule, signed).await;
    assert_eq!(status, 200, "{} PutRule", server.name);
    let entries: Vec<Value> = (0..10)
        .map(|i| json!({"Source": "bench.app", "DetailType": "reading", "Detail": format!("{{\"i\":{i},\"temperature\":21.5}}")}))
        .collect();
    let body = Arc::new(json!({"Entries": entries}));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connection(port).await;
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                let (status, out) =
                    call(&mut sender, port, "AWSEvents.PutEvents", &body, signed).await;
                assert_eq!(status, 200, "{out}");
                assert_eq!(out["FailedEntryCount"], 0, "{out}");
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    ((all.len() * 10) as f64 / elapsed, pct(0.50), pct(0.99))
}

fn put_events_bench() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = tempfile::tempdir().unwrap();
    let Some(mooring) = start_mooring(&repo, data.path()) else {
        println!("put_events: no mooring binary (build it or set BENCH_MOORING_BIN); skipped");
        return;
    };
    let Some(moto) = start_moto(&repo) else {
        println!("put_events: no moto_server (set MOTO_SERVER); skipped");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seconds = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let mut results = Vec::new();
    for server in [&mooring, &moto] {
        let (rate, p50, p99) = runtime.block_on(put_events_load(server, seconds));
        println!(
            "put_events: {:>8}: {rate:>9.0} entries/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  (8 connections, 10 entries/request, {seconds}s)",
            server.name
        );
        results.push(rate);
    }
    println!(
        "put_events: mooring/moto throughput ratio: {:.2}x",
        results[0] / results[1]
    );
}

fn main() {
    // `cargo test --benches` passes `--bench`-less args; only run the report under `cargo bench`.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    matcher_bench(Workload::Simple);
    matcher_bench(Workload::Mixed);
    if std::env::var_os("BENCH_SKIP_PUT_EVENTS").is_none() {
        put_events_bench();
    }
}
