//! IoT Jobs at fleet scale, end to end over MQTT: the real `mooring` binary, a thing group
//! of `JOBS_FLEET` things (default 10,000), each thing a connected device, and one
//! CreateJob targeting the group. Every device waits for its `notify`, then does what AWS's
//! jobs sample does: `start-next`, then `update` to SUCCEEDED. Printed: the time from
//! CreateJob until the last device has its notify, and p50/p99 round trips of `start-next`
//! and `update` with the whole fleet asking at once.
//!
//! The peer in the same run is mosquitto with the same fleet and the same request/reply
//! pattern, where the "jobs service" is one extra client that answers each request on the
//! reply topic (no state machine, nothing durable): the floor any MQTT-based jobs service
//! can reach. The ratios are Mooring's time over mosquitto's (below 1 means Mooring is
//! faster).
//!
//! Run: `cargo bench -p mooring --bench jobs_fleet`. The Mooring side is the binary of this
//! build profile (`CARGO_BIN_EXE_mooring`), started with `--auth none` on ephemeral ports.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mooring_mqtt::codec::{
    self, Ack, Connect, Packet, Properties, Publish, Subscribe, SubscriptionOptions, V311,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// One fleet run's figures.
struct Fleet {
    notify_all: Duration,
    start_next: Vec<Duration>,
    update: Vec<Duration>,
    total: Duration,
}

/// Topics a device uses; Mooring's are the IoT Jobs topics, mosquitto's a plain imitation.
trait Topics: Send + Sync + 'static {
    fn notify(&self, thing: &str) -> String;
    fn start_next(&self, thing: &str) -> String;
    fn update(&self, thing: &str) -> String;
}

struct JobsTopics;
impl Topics for JobsTopics {
    fn notify(&self, thing: &str) -> String {
        format!("$aws/things/{thing}/jobs/notify")
    }
    fn start_next(&self, thing: &str) -> String {
        format!("$aws/things/{thing}/jobs/start-next")
    }
    fn update(&self, thing: &str) -> String {
        format!("$aws/things/{thing}/jobs/fleet-update/update")
    }
}

struct PlainTopics;
impl Topics for PlainTopics {
    fn notify(&self, thing: &str) -> String {
        format!("fleet/{thing}/notify")
    }
    fn start_next(&self, thing: &str) -> String {
        format!("fleet/{thing}/start-next")
    }
    fn update(&self, thing: &str) -> String {
        format!("fleet/{thing}/update")
    }
}

/// A raw MQTT 3.1.1 connection on the broker's own codec.
struct Link {
    rx: OwnedReadHalf,
    tx: OwnedWriteHalf,
    inbox: BytesMut,
    next_id: u16,
}

impl Link {
    async fn connect(addr: SocketAddr, client_id: &str) -> Link {
        let stream = TcpStream::connect(addr).await.expect("dial broker");
        stream.set_nodelay(true).unwrap();
        let (rx, tx) = stream.into_split();
        let mut link = Link {
            rx,
            tx,
            inbox: BytesMut::with_capacity(4096),
            next_id: 0,
        };
        link.write(Packet::Connect(Box::new(Connect {
            protocol_version: V311,
            clean_start: true,
            keep_alive: 0,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })))
        .await;
        let Packet::ConnAck(ack) = link.read().await else {
            panic!("{client_id}: no CONNACK")
        };
        assert_eq!(ack.code, 0, "{client_id}: CONNACK refused");
        link
    }

    async fn write(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        codec::encode(&packet, V311, &mut out);
        self.tx.write_all(&out).await.expect("write to broker");
    }

    /// The next packet, or `None` once the broker has closed the connection.
    async fn try_read(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = codec::decode(&mut self.inbox, Some(V311), 1 << 20).expect("decode") {
                return Some(p);
            }
            match self.rx.read_buf(&mut self.inbox).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
    }

    async fn read(&mut self) -> Packet {
        self.try_read()
            .await
            .expect("the broker closed a device connection")
    }

    fn packet_id(&mut self) -> u16 {
        self.next_id = self.next_id % u16::MAX + 1;
        self.next_id
    }

    async fn subscribe(&mut self, filters: &[String]) {
        let packet_id = self.packet_id();
        let options = SubscriptionOptions {
            qos: 1,
            ..Default::default()
        };
        self.write(Packet::Subscribe(Subscribe {
            packet_id,
            properties: Properties::default(),
            filters: filters.iter().map(|f| (f.clone(), options)).collect(),
        }))
        .await;
        match self.read().await {
            Packet::SubAck(a) => assert!(
                a.codes.iter().all(|c| *c <= 1),
                "SUBACK refused {filters:?}: {:?}",
                a.codes
            ),
            other => panic!("expected SUBACK, got {}", other.name()),
        }
    }

    async fn publish(&mut self, topic: String, payload: &'static str) {
        let packet_id = self.packet_id();
        self.write(Packet::Publish(Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic,
            packet_id,
            properties: Properties::default(),
            payload: Bytes::from_static(payload.as_bytes()),
        }))
        .await;
    }

    /// The next PUBLISH (acknowledging QoS 1), skipping acks of our own publishes.
    async fn message(&mut self) -> Publish {
        loop {
            match self.read().await {
                Packet::Publish(p) => {
                    if p.qos == 1 {
                        self.write(Packet::PubAck(Ack::new(p.packet_id, 0))).await;
                    }
                    return p;
                }
                Packet::PubAck(_) => {}
                other => panic!("unexpected {}", other.name()),
            }
        }
    }

    /// Sends a request and waits for `{topic}/accepted`.
    async fn request(&mut self, topic: String, payload: &'static str) -> Duration {
        let started = Instant::now();
        let reply = format!("{topic}/accepted");
        self.publish(topic, payload).await;
        loop {
            let p = self.message().await;
            if p.topic == reply {
                return started.elapsed();
            }
            assert!(
                !p.topic.ends_with("/rejected"),
                "{}: {:?}",
                p.topic,
                p.payload
            );
        }
    }
}

/// Connects every device (subscribed to its notify and reply topics); returns the
/// connected links.
async fn connect_fleet(addr: SocketAddr, things: &[String], topics: &dyn Topics) -> Vec<Link> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(things.len());
    for thing in things {
        let filters = vec![
            topics.notify(thing),
            format!("{}/+", topics.start_next(thing)),
            format!("{}/+", topics.update(thing)),
        ];
        let thing = thing.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let mut link = Link::connect(addr, &thing).await;
            link.subscribe(&filters).await;
            link
        }));
    }
    let mut links = Vec::with_capacity(tasks.len());
    for t in tasks {
        links.push(t.await.unwrap());
    }
    links
}

/// Runs the fleet: `trigger` is the "CreateJob"; returns when every device is done.
async fn run_fleet<F>(
    links: Vec<Link>,
    things: &[String],
    topics: Arc<dyn Topics>,
    trigger: F,
) -> Fleet
where
    F: std::future::Future<Output = ()>,
{
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    for (mut link, thing) in links.into_iter().zip(things.iter().cloned()) {
        let done = done_tx.clone();
        let topics = topics.clone();
        tokio::spawn(async move {
            let notify_topic = topics.notify(&thing);
            while link.message().await.topic != notify_topic {}
            let notified = started.elapsed();
            let start_next = link.request(topics.start_next(&thing), "{}").await;
            let update = link
                .request(topics.update(&thing), "{\"status\":\"SUCCEEDED\"}")
                .await;
            // The link goes back with the figures: connections stay open until the whole
            // fleet is done.
            let _ = done.send((notified, start_next, update, link));
        });
    }
    drop(done_tx);
    trigger.await;
    let mut fleet = Fleet {
        notify_all: Duration::ZERO,
        start_next: Vec::with_capacity(things.len()),
        update: Vec::with_capacity(things.len()),
        total: Duration::ZERO,
    };
    let mut finished = Vec::with_capacity(things.len());
    for _ in 0..things.len() {
        let (notified, start_next, update, link) =
            tokio::time::timeout(Duration::from_secs(300), done_rx.recv())
                .await
                .expect("the fleet stalled")
                .expect("a device task failed");
        fleet.notify_all = fleet.notify_all.max(notified);
        fleet.start_next.push(start_next);
        fleet.update.push(update);
        finished.push(link);
    }
    fleet.total = started.elapsed();
    drop(finished);
    fleet.start_next.sort();
    fleet.update.sort();
    fleet
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A server process of the run, killed and reaped when dropped, with its data directory.
struct ServerProcess {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Mooring process and its endpoints.
struct MooringProcess {
    _process: ServerProcess,
    http: String,
    mqtt: SocketAddr,
}

fn start_mooring() -> MooringProcess {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mooring"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--mqtts-listen",
            "",
            "--stream-manager-listen",
            "",
            "--auth",
            "none",
        ])
        .args(["--log-level", "warn"])
        .args(["--set", "iot.jobs.device_requests_per_second=0"])
        .stdout(Stdio::null())
        .spawn()
        .expect("starting mooring");
    let endpoints_file = dir.path().join("endpoints.json");
    let process = ServerProcess { child, _dir: dir };
    let endpoints = wait_for_endpoints(&endpoints_file);
    MooringProcess {
        _process: process,
        http: endpoints["http_url"].as_str().unwrap().to_string(),
        mqtt: endpoints["mqtt"].as_str().unwrap().parse().unwrap(),
    }
}

fn wait_for_endpoints(path: &Path) -> serde_json::Value {
    for _ in 0..600 {
        if let Some(v) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("mooring did not write {}", path.display());
}

/// The control plane, unsigned (`--auth none`).
#[derive(Clone)]
struct ControlPlane {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: String,
}

impl ControlPlane {
    async fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self.client.request(request).await.expect("control plane");
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert!(status.is_success(), "{method} {path}: {status} {bytes:?}");
        serde_json::from_slice(&bytes).unwrap_or_default()
    }
}

async fn register_fleet(plane: &ControlPlane, things: &[String]) -> String {
    let group = plane
        .call("POST", "/thing-groups/fleet", serde_json::json!({}))
        .await["thingGroupArn"]
        .as_str()
        .expect("thingGroupArn")
        .to_string();
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for thing in things {
        let (plane, gate, thing) = (plane.clone(), gate.clone(), thing.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            plane
                .call("POST", &format!("/things/{thing}"), serde_json::json!({}))
                .await;
            plane
                .call(
                    "PUT",
                    "/thing-groups/addThingToThingGroup",
                    serde_json::json!({"thingGroupName": "fleet", "thingName": thing}),
                )
                .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    group
}

async fn mooring_fleet(things: &[String]) -> Fleet {
    let server = start_mooring();
    let plane = ControlPlane {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: server.http.clone(),
    };
    let group = register_fleet(&plane, things).await;
    let links = connect_fleet(server.mqtt, things, &JobsTopics).await;
    let create = plane.call(
        "PUT",
        "/jobs/fleet-update",
        serde_json::json!({"targets": [group], "document": "{\"operation\":\"update\"}"}),
    );
    let fleet = run_fleet(links, things, Arc::new(JobsTopics), async {
        create.await;
    })
    .await;
    let job = plane
        .call("GET", "/jobs/fleet-update", serde_json::json!({}))
        .await;
    let succeeded = job["job"]["jobProcessDetails"]["numberOfSucceededThings"].as_u64();
    assert_eq!(succeeded, Some(things.len() as u64), "{job}");
    fleet
}

/// mosquitto on an ephemeral port, without persistence.
struct Mosquitto {
    _process: ServerProcess,
    addr: SocketAddr,
}

fn start_mosquitto() -> Mosquitto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("fleet.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_connections -1\nmax_queued_messages 100000\nmax_inflight_messages 0\n"
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto is needed as the peer (apt-get install mosquitto)");
    // Owned from the start, so that a failed start still kills and reaps the process.
    let broker = Mosquitto {
        _process: ServerProcess { child, _dir: dir },
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(broker.addr).is_ok() {
            return broker;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("mosquitto did not start");
}

/// The peer's "jobs service": answers every request on `{topic}/accepted`.
async fn responder(addr: SocketAddr) {
    let mut link = Link::connect(addr, "jobs-service").await;
    link.subscribe(&["fleet/+/start-next".into(), "fleet/+/update".into()])
        .await;
    tokio::spawn(async move {
        while let Some(packet) = link.try_read().await {
            if let Packet::Publish(request) = packet {
                link.write(Packet::PubAck(Ack::new(request.packet_id, 0)))
                    .await;
                link.publish(format!("{}/accepted", request.topic), "{}")
                    .await;
            }
        }
    });
}

async fn mosquitto_fleet(things: &[String]) -> Fleet {
    let broker = start_mosquitto();
    responder(broker.addr).await;
    let links = connect_fleet(broker.addr, things, &PlainTopics).await;
    let mut publisher = Link::connect(broker.addr, "create-job").await;
    let notifies: Vec<String> = things.iter().map(|t| PlainTopics.notify(t)).collect();
    let fleet = run_fleet(links, things, Arc::new(PlainTopics), async move {
        for topic in notifies {
            publisher.publish(topic, "{}").await;
        }
        tokio::spawn(async move { while publisher.try_read().await.is_some() {} });
    })
    .await;
    drop(broker);
    fleet
}

fn report(name: &str, f: &Fleet) {
    println!(
        "  {name:<9} notify all {:>9.1?}  start-next p50 {:>9.1?} p99 {:>9.1?}  update p50 {:>9.1?} p99 {:>9.1?}  whole fleet {:>9.1?}",
        f.notify_all,
        percentile(&f.start_next, 0.5),
        percentile(&f.start_next, 0.99),
        percentile(&f.update, 0.5),
        percentile(&f.update, 0.99),
        f.total
    );
}

fn main() {
    let n: usize = std::env::var("JOBS_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let things: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mooring = mooring_fleet(&things).await;
        let peer = mosquitto_fleet(&things).await;
        println!("jobs fleet bench: {n} connected devices, one CreateJob on their thing group");
        report("mooring", &mooring);
        report("mosquitto", &peer);
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        println!(
            "  ratios mooring/mosquitto: notify all {:.2}x  start-next p99 {:.2}x  update p99 {:.2}x  whole fleet {:.2}x",
            ratio(mooring.notify_all, peer.notify_all),
            ratio(percentile(&mooring.start_next, 0.99), percentile(&peer.start_next, 0.99)),
            ratio(percentile(&mooring.update, 0.99), percentile(&peer.update, 0.99)),
            ratio(mooring.total, peer.total)
        );
    });
}
