//! Heap held by the broker per idle connection, counted exactly by a global allocator that
//! tracks live bytes and live allocations.
//!
//! The clients are plain blocking sockets on their own thread (no heap of their own beyond
//! one vector), so the live-heap growth after they have connected is the broker's. Idle
//! connections are parked (their tasks end), so that is the session, the client record,
//! the parked record and the map entries. The bound asserted is generous (the figure is
//! printed); it catches a regression such as a connection that no longer parks, a task
//! kept alive by a stored waker, or an eagerly allocated queue, not noise. `cargo bench`
//! measures the process RSS against mosquitto's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mooring_mqtt::codec::{self, Connect, Packet, Properties, V311};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_BLOCKS: AtomicIsize = AtomicIsize::new(0);
/// Live allocations by size (sizes below `SIZES`), to show what an idle connection holds.
const SIZES: usize = 16 * 1024;
static BY_SIZE: [AtomicIsize; SIZES] = [const { AtomicIsize::new(0) }; SIZES];

fn count_size(size: usize, delta: isize) {
    if size < SIZES {
        BY_SIZE[size].fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are
// updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
            count_size(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        count_size(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
            count_size(layout.size(), -1);
            count_size(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Connections opened per round (two rounds, each socket counted at both ends), fewer when
/// the file-descriptor limit is lower.
const CONNECTIONS: usize = 2000;

/// Raises the soft file-descriptor limit to the hard one; returns how many connections
/// per round fit.
fn connections_that_fit() -> usize {
    // SAFETY: plain getrlimit/setrlimit calls on a local struct.
    let hard = unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        limit.rlim_max as usize
    };
    CONNECTIONS.min(hard.saturating_sub(200) / 4)
}

fn connect_packet(client_id: String) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode(
        &Packet::Connect(Box::new(Connect {
            protocol_version: V311,
            clean_start: true,
            keep_alive: 60,
            client_id,
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })),
        V311,
        &mut out,
    );
    out.to_vec()
}

/// Opens `count` connections, each sending CONNECT and reading its 4-byte CONNACK.
fn open_idle(addr: std::net::SocketAddr, count: usize, tag: &str) -> Vec<std::net::TcpStream> {
    let packets: Vec<Vec<u8>> = (0..count)
        .map(|i| connect_packet(format!("{tag}-idle-client-{i:05}")))
        .collect();
    let mut streams = Vec::with_capacity(count);
    for packet in &packets {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(packet).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
        streams.push(s);
    }
    streams
}

fn live() -> (isize, isize) {
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE_BLOCKS.load(Ordering::Relaxed),
    )
}

#[test]
fn an_idle_connection_holds_little_heap() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ctx = mooring_core::ServiceContext::for_tests(dir.path()).unwrap();
    let (addr, broker) = runtime.block_on(async {
        let broker = mooring_mqtt::start(&ctx).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(mooring_mqtt::listener::serve_tcp(broker.clone(), listener));
        (addr, broker)
    });
    // Warm up: first connections allocate broker-wide structures (maps, slabs, the
    // persister's statements) that later ones reuse.
    let connections = connections_that_fit();
    assert!(
        connections >= 200,
        "file-descriptor limit too low for the test"
    );
    let warm = open_idle(addr, connections, "warm");
    // An idle connection is parked after a second without activity.
    std::thread::sleep(Duration::from_millis(1500));
    let (bytes_before, blocks_before) = live();
    let sizes_before: Vec<isize> = BY_SIZE.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let held = open_idle(addr, connections, "held");
    std::thread::sleep(Duration::from_millis(1500));
    let (bytes_after, blocks_after) = live();
    assert_eq!(
        broker.parked_connections(),
        2 * connections,
        "every idle connection is parked"
    );
    let per_connection = (bytes_after - bytes_before) as f64 / connections as f64;
    let blocks = (blocks_after - blocks_before) as f64 / connections as f64;
    println!(
        "heap per idle connection: {per_connection:.0} B in {blocks:.1} allocations \
         ({connections} connections)"
    );
    for (size, before) in sizes_before.iter().enumerate() {
        let grown = BY_SIZE[size].load(Ordering::Relaxed) - before;
        if grown >= connections as isize / 8 {
            println!(
                "  {size:>5} B x {:.2} per connection",
                grown as f64 / connections as f64
            );
        }
    }
    drop(held);
    drop(warm);
    assert!(
        per_connection < 1024.0,
        "an idle connection holds {per_connection:.0} B of heap"
    );
    let _ = Arc::new(ctx);
    runtime.shutdown_timeout(Duration::from_secs(1));
}
