//! Side-by-side benchmark: the same MQTT scenarios against Mooring's broker (in-process,
//! `aws` profile, on a loopback port) and Debian's mosquitto (started on a loopback
//! ephemeral port with a temporary configuration), in one run. Prints msgs/s, p50/p99
//! end-to-end latency and the Mooring/mosquitto ratios.
//!
//! Run: `cargo bench -p mooring-mqtt --bench broker_vs_mosquitto`. Sizes are bounded
//! (`MOORING_BENCH_SCALE`, default 1) so a run takes about a minute on two cores.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use mooring_mqtt::codec::{self, Ack, Connect, Packet, Properties, Publish, Subscribe, V311};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: BytesMut,
}

impl Conn {
    async fn open(addr: SocketAddr, client_id: &str) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        let mut conn = Conn {
            reader,
            writer,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        conn.send(&Packet::Connect(Box::new(Connect {
            protocol_version: V311,
            clean_start: true,
            keep_alive: 120,
            client_id: client_id.to_string(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })))
        .await;
        match conn.next().await {
            Packet::ConnAck(a) if a.code == 0 => conn,
            other => panic!("bad CONNACK {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(packet, V311, &mut out);
        self.writer.write_all(&out).await.expect("write");
    }

    async fn next(&mut self) -> Packet {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(V311), 1 << 24).expect("decode") {
                return p;
            }
            let n = self.reader.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "broker closed the connection");
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![(
                filter.to_string(),
                codec::SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
        }))
        .await;
        loop {
            if let Packet::SubAck(_) = self.next().await {
                return;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    publishers: usize,
    subscribers: usize,
    /// Each publisher uses its own topic and each subscriber its publisher's (p2p), or all
    /// share one topic.
    pairs: bool,
    messages_per_publisher: usize,
    qos: u8,
    payload: usize,
}

struct Outcome {
    received: usize,
    expected: usize,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn subscriber(
    addr: SocketAddr,
    id: String,
    topic: String,
    qos: u8,
    expected: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> (Vec<u64>, Option<u64>) {
    let mut conn = Conn::open(addr, &id).await;
    conn.subscribe(&topic, qos).await;
    ready.send(()).await.unwrap();
    drop(ready);
    let mut latencies = Vec::with_capacity(expected);
    let mut last = None;
    while latencies.len() < expected {
        let packet = match tokio::time::timeout(Duration::from_secs(3), conn.next()).await {
            Ok(p) => p,
            Err(_) => break,
        };
        if let Packet::Publish(p) = packet {
            let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
            let at = now_ns();
            latencies.push(at.saturating_sub(sent));
            last = Some(at);
            if p.qos == 1 {
                conn.send(&Packet::PubAck(Ack::new(p.packet_id, 0))).await;
            }
        }
    }
    (latencies, last)
}

async fn publisher(addr: SocketAddr, id: String, topic: String, s: Scenario) {
    let conn = Conn::open(addr, &id).await;
    let Conn {
        mut reader,
        mut writer,
        mut buf,
    } = conn;
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let acks = window.clone();
    let ack_task = tokio::spawn(async move {
        if s.qos == 0 {
            return;
        }
        let mut seen = 0;
        while seen < s.messages_per_publisher {
            match codec::decode(&mut buf, Some(V311), 1 << 24).expect("decode") {
                Some(Packet::PubAck(_)) => {
                    seen += 1;
                    acks.add_permits(1);
                }
                Some(_) => {}
                None => {
                    if reader.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
            }
        }
    });
    let filler = vec![0x5Au8; s.payload.saturating_sub(8)];
    let mut out = BytesMut::new();
    for i in 0..s.messages_per_publisher {
        if s.qos == 1 {
            window.acquire().await.unwrap().forget();
        }
        let mut payload = BytesMut::with_capacity(s.payload.max(8));
        payload.put_u64(now_ns());
        payload.put_slice(&filler);
        codec::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: s.qos,
                retain: false,
                topic: topic.clone(),
                packet_id: if s.qos == 1 {
                    (i % 60000 + 1) as u16
                } else {
                    0
                },
                properties: Properties::default(),
                payload: Bytes::from(payload),
            }),
            V311,
            &mut out,
        );
        if s.qos == 1 || out.len() > 16 * 1024 || i + 1 == s.messages_per_publisher {
            writer.write_all(&out).await.expect("write");
            out.clear();
        }
        if s.qos == 0 && i % 64 == 63 {
            // Pace QoS 0 a little so neither broker has to drop.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let _ = ack_task.await;
    let mut bye = BytesMut::new();
    codec::encode(
        &Packet::Disconnect(codec::Disconnect {
            code: 0,
            properties: Properties::default(),
        }),
        V311,
        &mut bye,
    );
    let _ = writer.write_all(&bye).await;
}

async fn run(addr: SocketAddr, s: Scenario, tag: &str) -> Outcome {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(s.subscribers.max(1));
    let per_subscriber = if s.pairs {
        s.messages_per_publisher
    } else {
        s.messages_per_publisher * s.publishers
    };
    let mut subs = Vec::new();
    for i in 0..s.subscribers {
        let topic = if s.pairs {
            format!("bench/{tag}/{i}")
        } else {
            format!("bench/{tag}/all")
        };
        subs.push(tokio::spawn(subscriber(
            addr,
            format!("{tag}-sub-{i}"),
            topic,
            s.qos,
            per_subscriber,
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    for _ in 0..s.subscribers {
        ready_rx.recv().await.expect("subscriber ready");
    }
    let started = now_ns();
    let mut pubs = Vec::new();
    for i in 0..s.publishers {
        let topic = if s.pairs {
            format!("bench/{tag}/{i}")
        } else {
            format!("bench/{tag}/all")
        };
        pubs.push(tokio::spawn(publisher(
            addr,
            format!("{tag}-pub-{i}"),
            topic,
            s,
        )));
    }
    for p in pubs {
        p.await.unwrap();
    }
    let mut all = Vec::new();
    let mut last = started;
    for sub in subs {
        let (lat, end) = sub.await.unwrap();
        all.extend(lat);
        if let Some(end) = end {
            last = last.max(end);
        }
    }
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Outcome {
        received: all.len(),
        expected: per_subscriber * s.subscribers,
        seconds: (last - started) as f64 / 1e9,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mosquitto() -> Option<Mosquitto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let dir = tempfile::tempdir().ok()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\nmax_inflight_messages 100\n"
        ),
    )
    .ok()?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some(Mosquitto {
                child,
                addr,
                _dir: dir,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` runs benches only with `--benches`.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let scale: usize = std::env::var("MOORING_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let ctx = mooring_core::ServiceContext::for_tests(dir.path()).unwrap();
        let broker = mooring_mqtt::start(&ctx).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mooring_addr = listener.local_addr().unwrap();
        tokio::spawn(mooring_mqtt::listener::serve_tcp(broker, listener));
        let Some(mosquitto) = start_mosquitto() else {
            eprintln!("mosquitto is not installed; nothing to compare against");
            return;
        };
        let scenarios = [
            Scenario { name: "p2p 100 pairs", publishers: 100, subscribers: 100, pairs: true, messages_per_publisher: 200 * scale, qos: 0, payload: 64 },
            Scenario { name: "p2p 100 pairs", publishers: 100, subscribers: 100, pairs: true, messages_per_publisher: 200 * scale, qos: 1, payload: 64 },
            Scenario { name: "p2p 100 pairs", publishers: 100, subscribers: 100, pairs: true, messages_per_publisher: 100 * scale, qos: 1, payload: 4096 },
            Scenario { name: "fan-out 1->200", publishers: 1, subscribers: 200, pairs: false, messages_per_publisher: 200 * scale, qos: 0, payload: 64 },
            Scenario { name: "fan-out 1->200", publishers: 1, subscribers: 200, pairs: false, messages_per_publisher: 200 * scale, qos: 1, payload: 64 },
            Scenario { name: "fan-in 200->1", publishers: 200, subscribers: 1, pairs: false, messages_per_publisher: 50 * scale, qos: 1, payload: 64 },
        ];
        println!(
            "{:<16} {:>3} {:>6} | {:>11} {:>9} {:>9} | {:>11} {:>9} {:>9} | {:>6} {:>6}",
            "scenario", "qos", "bytes", "mooring/s", "p50 us", "p99 us", "mosq/s", "p50 us", "p99 us", "x tput", "p99 x"
        );
        for (i, s) in scenarios.iter().enumerate() {
            let ours = run(mooring_addr, *s, &format!("m{i}")).await;
            let theirs = run(mosquitto.addr, *s, &format!("q{i}")).await;
            let rate = |o: &Outcome| o.received as f64 / o.seconds.max(1e-9);
            println!(
                "{:<16} {:>3} {:>6} | {:>11.0} {:>9.0} {:>9.0} | {:>11.0} {:>9.0} {:>9.0} | {:>6.2} {:>6.2}{}",
                s.name, s.qos, s.payload,
                rate(&ours), ours.p50_us, ours.p99_us,
                rate(&theirs), theirs.p50_us, theirs.p99_us,
                rate(&ours) / rate(&theirs).max(1e-9),
                ours.p99_us / theirs.p99_us.max(1e-9),
                if ours.received < ours.expected || theirs.received < theirs.expected {
                    format!("  (received mooring {}/{}, mosquitto {}/{})", ours.received, ours.expected, theirs.received, theirs.expected)
                } else {
                    String::new()
                }
            );
        }
    });
}
