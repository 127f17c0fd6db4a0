//! Side-by-side benchmark: the same MQTT scenarios against Mooring's broker and Debian's
//! mosquitto, in one run, each broker in its own process on a loopback ephemeral port, and
//! the Mooring/mosquitto ratios printed.
//!
//! Mooring runs as this same executable re-started with `--serve-broker` (the broker, its
//! SQLite store and the TCP listener, `strict` profile so both brokers follow plain MQTT);
//! mosquitto gets a temporary configuration
//! without persistence. The load generator is a raw client on the crate's codec (no
//! client-library overhead), spreading its connections over source addresses
//! 127.0.0.2-201 so ephemeral ports never run out.
//!
//! Scenarios: p2p with 1,000 pairs, fan-in 1,000 -> 1, fan-out 1 -> 1,000, each at QoS 0
//! and 1 with 64 B and 4 KB payloads: msgs/s delivered, p50/p99 end-to-end latency. Then
//! memory per idle connection: the RSS delta of each broker process after opening
//! `BENCH_IDLE` (default 20,000) connections, capped by the file-descriptor hard limit.
//!
//! Run: `cargo bench -p mooring-mqtt --bench broker_vs_mosquitto`. `BENCH_MESSAGES`
//! (default 50) is the number of messages each p2p/fan-in publisher sends and the fan-out
//! publisher sends. `BENCH_ONLY` (comma-separated) runs only the scenarios whose name
//! contains one of the words (`p2p`, `fan-in`, `fan-out`, `idle` for the memory
//! measurement), e.g. `BENCH_ONLY=idle`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use mooring_mqtt::codec::{self, Ack, Connect, Packet, Properties, Publish, Subscribe, V311};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// The broker process this bench starts (`--serve-broker`) uses the `mooring` binary's
/// allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

static EPOCH: OnceLock<Instant> = OnceLock::new();
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);
/// Concurrent connection attempts (keeps both brokers' accept backlogs from overflowing).
const CONNECT_CONCURRENCY: usize = 64;
/// QoS 1 messages a publisher keeps unacknowledged.
const PUBLISH_WINDOW: usize = 64;

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A TCP connection from the next source address in 127.0.0.2-201.
async fn dial(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % 200;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n as u8)),
        0,
    ))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn encode(packet: &Packet) -> BytesMut {
    let mut out = BytesMut::new();
    codec::encode(packet, V311, &mut out);
    out
}

struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: BytesMut,
}

impl Conn {
    async fn open(addr: SocketAddr, client_id: &str, gate: &Semaphore) -> Conn {
        let _permit = gate.acquire().await.unwrap();
        let stream = dial(addr).await.expect("connect");
        let (reader, writer) = stream.into_split();
        let mut conn = Conn {
            reader,
            writer,
            buf: BytesMut::with_capacity(16 * 1024),
        };
        conn.send(&Packet::Connect(Box::new(Connect {
            protocol_version: V311,
            clean_start: true,
            keep_alive: 0,
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
        self.writer.write_all(&encode(packet)).await.expect("write");
    }

    async fn next(&mut self) -> Packet {
        loop {
            if let Some(p) = self.decoded() {
                return p;
            }
            let n = self.reader.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "broker closed the connection");
        }
    }

    fn decoded(&mut self) -> Option<Packet> {
        codec::decode(&mut self.buf, Some(V311), 1 << 24).expect("decode")
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
    /// Publisher i talks to subscriber i on its own topic (p2p), or all share one topic.
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

impl Outcome {
    fn rate(&self) -> f64 {
        self.received as f64 / self.seconds.max(1e-9)
    }
}

/// Receives until `expected` messages arrived or the broker stays quiet for 5 s; returns
/// the latencies and the time of the last arrival.
async fn receive(mut conn: Conn, expected: usize) -> (Vec<u64>, Option<u64>) {
    let mut latencies = Vec::with_capacity(expected);
    let mut last = None;
    let mut acks = BytesMut::new();
    while latencies.len() < expected {
        while let Some(packet) = conn.decoded() {
            if let Packet::Publish(p) = packet {
                let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                let at = now_ns();
                latencies.push(at.saturating_sub(sent));
                last = Some(at);
                if p.qos == 1 {
                    codec::encode(&Packet::PubAck(Ack::new(p.packet_id, 0)), V311, &mut acks);
                }
            }
        }
        if !acks.is_empty() {
            conn.writer.write_all(&acks).await.expect("write");
            acks.clear();
        }
        if latencies.len() >= expected {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(5), conn.reader.read_buf(&mut conn.buf))
            .await
        {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    (latencies, last)
}

async fn publish(conn: Conn, topic: String, s: Scenario) {
    let Conn {
        mut reader,
        mut writer,
        mut buf,
    } = conn;
    let window = Arc::new(Semaphore::new(PUBLISH_WINDOW));
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
        writer.write_all(&out).await.expect("write");
        out.clear();
    }
    let _ = ack_task.await;
    let _ = writer
        .write_all(&encode(&Packet::Disconnect(codec::Disconnect {
            code: 0,
            properties: Properties::default(),
        })))
        .await;
}

async fn run(addr: SocketAddr, s: Scenario, tag: &str) -> Outcome {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let topic_of = |i: usize| {
        if s.pairs {
            format!("bench/{tag}/{i}")
        } else {
            format!("bench/{tag}/all")
        }
    };
    let per_subscriber = if s.pairs {
        s.messages_per_publisher
    } else {
        s.messages_per_publisher * s.publishers
    };
    // Connect and subscribe everyone, connect every publisher, then start all at once.
    let mut opening = Vec::new();
    for i in 0..s.subscribers {
        let (gate, topic) = (gate.clone(), topic_of(i));
        let id = format!("{tag}-sub-{i}");
        opening.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr, &id, &gate).await;
            conn.subscribe(&topic, s.qos).await;
            conn
        }));
    }
    let mut subscribers = Vec::new();
    for o in opening {
        subscribers.push(o.await.unwrap());
    }
    let mut opening = Vec::new();
    for i in 0..s.publishers {
        let gate = gate.clone();
        let id = format!("{tag}-pub-{i}");
        opening.push(tokio::spawn(
            async move { Conn::open(addr, &id, &gate).await },
        ));
    }
    let mut publishers = Vec::new();
    for o in opening {
        publishers.push(o.await.unwrap());
    }
    let started = now_ns();
    let receivers: Vec<_> = subscribers
        .into_iter()
        .map(|c| tokio::spawn(receive(c, per_subscriber)))
        .collect();
    let senders: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(publish(c, topic_of(i), s)))
        .collect();
    for p in senders {
        p.await.unwrap();
    }
    let mut all = Vec::new();
    let mut last = started;
    for r in receivers {
        let (lat, end) = r.await.unwrap();
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
    // Let both brokers finish tearing the connections down before the next scenario.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Outcome {
        received: all.len(),
        expected: per_subscriber * s.subscribers,
        seconds: (last - started) as f64 / 1e9,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// A broker process under test.
struct BrokerProcess {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BrokerProcess {
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Mooring: this executable again, serving only the broker.
    fn mooring() -> BrokerProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--serve-broker")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the Mooring broker process");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line.trim().parse().expect("broker address");
        BrokerProcess {
            child,
            addr,
            _dir: dir,
        }
    }

    fn mosquitto() -> Option<BrokerProcess> {
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
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 10000\nmax_inflight_messages 100\nmax_connections -1\n\
                 set_tcp_nodelay true\n"
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
                return Some(BrokerProcess {
                    child,
                    addr,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Raises the soft file-descriptor limit to the hard one (inherited by both brokers);
/// returns the limit now in force.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let wanted = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return wanted.rlim_cur;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// Opens `count` idle connections and returns the broker's RSS growth per connection, bytes.
async fn idle_memory(broker: &BrokerProcess, count: usize, tag: &str) -> (f64, usize) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = broker.rss_kib();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY * 4));
    let opening: Vec<_> = (0..count)
        .map(|i| {
            let gate = gate.clone();
            let id = format!("{tag}-idle-{i}");
            let addr = broker.addr;
            tokio::spawn(async move { Conn::open(addr, &id, &gate).await })
        })
        .collect();
    let mut held = Vec::with_capacity(count);
    for o in opening {
        held.push(o.await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = broker.rss_kib();
    let opened = held.len();
    drop(held);
    (
        (after.saturating_sub(before) * 1024) as f64 / opened as f64,
        opened,
    )
}

/// `--serve-broker DIR [KEY=VALUE...]`: the Mooring side of the benchmark (the settings as
/// `mooring serve --set` takes them; `mqtt.profile` defaults to `strict` here). Prints the
/// listener address, serves until stdin closes. Also handy for running other test suites
/// against the broker alone.
fn serve_broker(dir: &str, settings: &[String]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut ctx = mooring_core::ServiceContext::for_tests(std::path::Path::new(dir)).unwrap();
        let mut flags = vec![("mqtt.profile".to_string(), "\"strict\"".to_string())];
        for setting in settings {
            let (key, value) = setting.split_once('=').expect("KEY=VALUE");
            flags.push((key.to_string(), value.to_string()));
        }
        let mut config = mooring_core::Config::load(None, Vec::new(), &flags).unwrap();
        config.data_dir = ctx.data_dir.clone();
        ctx.config = Arc::new(config);
        let broker = mooring_mqtt::start(&ctx).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        tokio::spawn(mooring_mqtt::listener::serve_tcp(broker, listener));
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)
        })
        .await;
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-broker") {
        return serve_broker(&args[i + 1], &args[i + 2..]);
    }
    // `cargo test --benches` lists benches; nothing to run then.
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let fd_limit = raise_fd_limit();
    let messages = env_usize("BENCH_MESSAGES", 50);
    let idle_wanted = env_usize("BENCH_IDLE", 20_000);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let selected = move |name: &str| {
        only.is_empty()
            || only
                .split(',')
                .any(|w| !w.trim().is_empty() && name.contains(w.trim()))
    };
    // Each side holds one descriptor per connection; keep room for everything else.
    let idle = idle_wanted.min(fd_limit.saturating_sub(300) as usize);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        if BrokerProcess::mosquitto().is_none() {
            eprintln!("mosquitto is not installed; nothing to compare against");
            return;
        }
        let scenarios = [
            ("p2p 1000 pairs", 1000, 1000, true),
            ("fan-in 1000->1", 1000, 1, false),
            ("fan-out 1->1000", 1, 1000, false),
        ];
        println!(
            "{:<16} {:>3} {:>5} | {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>6} {:>6}",
            "scenario", "qos", "bytes", "mooring/s", "p50 us", "p99 us", "mosq/s", "p50 us",
            "p99 us", "x tput", "x p99"
        );
        let mooring = BrokerProcess::mooring();
        let mosquitto = BrokerProcess::mosquitto().unwrap();
        let mut n = 0;
        for (name, publishers, subscribers, pairs) in scenarios {
            if !selected(name) {
                continue;
            }
            for qos in [0u8, 1] {
                for payload in [64usize, 4096] {
                    let s = Scenario {
                        name,
                        publishers,
                        subscribers,
                        pairs,
                        messages_per_publisher: messages,
                        qos,
                        payload,
                    };
                    n += 1;
                    let ours = run(mooring.addr, s, &format!("m{n}")).await;
                    let theirs = run(mosquitto.addr, s, &format!("q{n}")).await;
                    println!(
                        "{:<16} {:>3} {:>5} | {:>10.0} {:>8.0} {:>8.0} | {:>10.0} {:>8.0} {:>8.0} | {:>6.2} {:>6.2}{}",
                        s.name, s.qos, s.payload,
                        ours.rate(), ours.p50_us, ours.p99_us,
                        theirs.rate(), theirs.p50_us, theirs.p99_us,
                        ours.rate() / theirs.rate().max(1e-9),
                        ours.p99_us / theirs.p99_us.max(1e-9),
                        if ours.received < ours.expected || theirs.received < theirs.expected {
                            format!("  (delivered: mooring {}/{}, mosquitto {}/{})", ours.received, ours.expected, theirs.received, theirs.expected)
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        drop(mooring);
        drop(mosquitto);
        if !selected("idle") {
            return;
        }
        if idle < idle_wanted {
            println!(
                "idle connections capped at {idle} (file-descriptor hard limit {fd_limit})"
            );
        }
        let mooring = BrokerProcess::mooring();
        let (ours, opened_ours) = idle_memory(&mooring, idle, "m").await;
        drop(mooring);
        let mosquitto = BrokerProcess::mosquitto().unwrap();
        let (theirs, opened_theirs) = idle_memory(&mosquitto, idle, "q").await;
        drop(mosquitto);
        println!(
            "memory per idle connection: mooring {ours:.0} B ({opened_ours} connections), mosquitto {theirs:.0} B ({opened_theirs}), ratio {:.2}",
            ours / theirs.max(1e-9)
        );
    });
}
