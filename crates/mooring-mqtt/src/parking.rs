//! The parking lot: where idle plain-TCP connections wait without a task.
//!
//! Most of what an idle connection costs is its task: the future with its timer, its
//! select and the stream's registration with tokio's reactor. A connection that has had
//! nothing to do for a while hands its socket and a compact record of its state to the lot,
//! and its task ends. One thread waits on every parked socket through one epoll instance
//! (mio) and resumes a connection, handing its socket and record to the `resume` callback
//! (which spawns a new task), when:
//! - its socket becomes readable or closes;
//! - the broker wakes it with [`ParkingLot::wake`] (a message was queued for it, or it is
//!   kicked);
//! - its deadline (the keep-alive's) passes; deadlines are checked at most every
//!   [`SWEEP_EVERY`], by a sweep over the parked records;
//! - the lot closes ([`ParkingLot::close`], at shutdown), which resumes everything.
//!
//! A parked connection is addressed by a [`ParkToken`]: its slot and the slot's
//! generation, so a stale token (the connection was resumed and the slot reused) wakes
//! nothing.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};

/// Shortest time between two sweeps for passed deadlines.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Slots are allocated this many at a time, so the lot holds about as much as is parked.
const CHUNK: usize = 256;
const WAKER: Token = Token(usize::MAX);

/// An instant as milliseconds since the process's [`epoch`]: how parked records keep their
/// instants (8 bytes where an `Instant` takes 16). Instants before the epoch read as it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Millis(u64);

/// The instant [`Millis`] count from; fixed by the first call (the broker makes it at
/// start-up, before any connection).
pub(crate) fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Millis {
    pub(crate) fn of(instant: Instant) -> Millis {
        Millis(instant.saturating_duration_since(epoch()).as_millis() as u64)
    }

    /// Rounded up, so a deadline kept as `Millis` is never earlier than the original.
    fn of_deadline(instant: Instant) -> Millis {
        let since = instant.saturating_duration_since(epoch());
        Millis(since.as_nanos().div_ceil(1_000_000) as u64)
    }

    pub(crate) fn instant(self) -> Instant {
        epoch() + Duration::from_millis(self.0)
    }
}

/// Addresses one parked connection (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ParkToken(usize);

impl ParkToken {
    fn new(index: usize, generation: u32) -> ParkToken {
        ParkToken(((generation as usize) << 32) | index)
    }

    fn index(self) -> usize {
        self.0 & 0xffff_ffff
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

type Resume<T> = Box<dyn Fn(std::net::TcpStream, T) + Send + Sync>;

/// See the module documentation. Dropping the lot closes it.
pub(crate) struct ParkingLot<T: Send + 'static> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    registry: Registry,
    /// Connections parked now, for `/metrics`.
    gauge: prometheus_client::metrics::gauge::Gauge,
    waker: Waker,
    slots: Mutex<Slots<T>>,
    /// Tokens the broker woke, for the thread to resume.
    woken: Mutex<Vec<ParkToken>>,
    resume: Resume<T>,
}

struct Slots<T> {
    chunks: Vec<Box<[Slot<T>]>>,
    free: Vec<u32>,
    parked: usize,
    /// The earliest deadline of a parked record (or earlier: it is recomputed by sweeps).
    earliest: Option<Millis>,
    closed: bool,
}

struct Slot<T> {
    generation: u32,
    parked: Option<Parked<T>>,
}

struct Parked<T> {
    socket: std::net::TcpStream,
    deadline: Option<Millis>,
    record: T,
}

impl<T> Slots<T> {
    fn slot(&mut self, index: usize) -> &mut Slot<T> {
        &mut self.chunks[index / CHUNK][index % CHUNK]
    }

    /// Takes the parked connection `token` names, if it is still parked.
    fn take(
        &mut self,
        registry: &Registry,
        gauge: &prometheus_client::metrics::gauge::Gauge,
        token: ParkToken,
    ) -> Option<Parked<T>> {
        if token.index() >= self.chunks.len() * CHUNK {
            return None;
        }
        let slot = self.slot(token.index());
        if slot.generation != token.generation() {
            return None;
        }
        let parked = slot.parked.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(token.index() as u32);
        self.parked -= 1;
        gauge.dec();
        let _ = registry.deregister(&mut SourceFd(&parked.socket.as_raw_fd()));
        Some(parked)
    }

    /// Every parked record with its token.
    fn parked_records(&self) -> impl Iterator<Item = (ParkToken, &Parked<T>)> {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk.iter().enumerate().filter_map(move |(i, slot)| {
                let parked = slot.parked.as_ref()?;
                Some((ParkToken::new(c * CHUNK + i, slot.generation), parked))
            })
        })
    }

    /// Tokens of the records whose deadline is at or before `now`; recomputes `earliest`.
    fn expired(&mut self, now: Millis) -> Vec<ParkToken> {
        let mut expired = Vec::new();
        let mut earliest: Option<Millis> = None;
        for (token, parked) in self.parked_records() {
            match parked.deadline {
                Some(deadline) if deadline <= now => expired.push(token),
                Some(deadline) => earliest = Some(earliest.map_or(deadline, |e| e.min(deadline))),
                None => {}
            }
        }
        self.earliest = earliest;
        expired
    }
}

impl<T: Send + 'static> ParkingLot<T> {
    /// Starts the lot's thread. `resume` runs on that thread (inside `runtime`'s context, so
    /// it may spawn tasks), or in [`ParkingLot::close`]'s caller.
    /// `gauge` follows the number of parked connections.
    pub(crate) fn start(
        runtime: tokio::runtime::Handle,
        gauge: prometheus_client::metrics::gauge::Gauge,
        resume: impl Fn(std::net::TcpStream, T) + Send + Sync + 'static,
    ) -> std::io::Result<ParkingLot<T>> {
        let poll = Poll::new()?;
        let shared = Arc::new(Shared {
            registry: poll.registry().try_clone()?,
            gauge,
            waker: Waker::new(poll.registry(), WAKER)?,
            slots: Mutex::new(Slots {
                chunks: Vec::new(),
                free: Vec::new(),
                parked: 0,
                earliest: None,
                closed: false,
            }),
            woken: Mutex::new(Vec::new()),
            resume: Box::new(resume),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("mqtt-parking".into())
            .spawn(move || {
                let _context = runtime.enter();
                thread_shared.run(poll);
            })?;
        Ok(ParkingLot { shared })
    }

    /// Parks `socket` with `record` until one of the module's wake-ups. Gives both back
    /// when the lot is closed or the socket cannot be registered.
    pub(crate) fn park(
        &self,
        socket: std::net::TcpStream,
        deadline: Option<Instant>,
        record: T,
    ) -> Result<ParkToken, (std::net::TcpStream, T)> {
        let shared = &*self.shared;
        let mut slots = shared.lock_slots();
        if slots.closed {
            return Err((socket, record));
        }
        let index = match slots.free.pop() {
            Some(i) => i as usize,
            None => {
                let index = slots.chunks.len() * CHUNK;
                let chunk: Box<[Slot<T>]> = (0..CHUNK)
                    .map(|_| Slot {
                        generation: 0,
                        parked: None,
                    })
                    .collect();
                slots.chunks.push(chunk);
                slots
                    .free
                    .extend((index as u32 + 1..(index + CHUNK) as u32).rev());
                index
            }
        };
        let token = ParkToken::new(index, slots.slot(index).generation);
        if let Err(e) = shared.registry.register(
            &mut SourceFd(&socket.as_raw_fd()),
            Token(token.0),
            Interest::READABLE,
        ) {
            tracing::warn!(error = %e, "parking a connection failed");
            slots.free.push(index as u32);
            return Err((socket, record));
        }
        let deadline = deadline.map(Millis::of_deadline);
        slots.slot(index).parked = Some(Parked {
            socket,
            deadline,
            record,
        });
        slots.parked += 1;
        shared.gauge.inc();
        if let Some(deadline) = deadline {
            if slots.earliest.is_none_or(|e| deadline < e) {
                slots.earliest = Some(deadline);
                drop(slots);
                // The thread may be sleeping towards a later deadline.
                let _ = shared.waker.wake();
            }
        }
        Ok(token)
    }

    /// Resumes the connection `token` names, if it is still parked (from any thread).
    pub(crate) fn wake(&self, token: ParkToken) {
        self.shared
            .woken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(token);
        let _ = self.shared.waker.wake();
    }

    /// Closes the lot: resumes every parked connection before returning (so a caller that
    /// the shutdown waits for covers their new tasks too) and refuses further parking.
    pub(crate) fn close(&self) {
        let shared = &*self.shared;
        let resumed = {
            let mut slots = shared.lock_slots();
            slots.closed = true;
            let tokens: Vec<ParkToken> = slots.parked_records().map(|(t, _)| t).collect();
            tokens
                .into_iter()
                .filter_map(|t| slots.take(&shared.registry, &shared.gauge, t))
                .collect::<Vec<_>>()
        };
        for parked in resumed {
            (shared.resume)(parked.socket, parked.record);
        }
        let _ = shared.waker.wake();
    }

    /// Connections parked now.
    pub(crate) fn parked(&self) -> usize {
        self.shared.lock_slots().parked
    }
}

impl<T: Send + 'static> Drop for ParkingLot<T> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<T> Shared<T> {
    fn lock_slots(&self) -> MutexGuard<'_, Slots<T>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, mut poll: Poll) {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        loop {
            let timeout = {
                let slots = self.lock_slots();
                if slots.closed && slots.parked == 0 {
                    return;
                }
                slots.earliest.map(|e| {
                    e.instant()
                        .max(last_sweep + SWEEP_EVERY)
                        .saturating_duration_since(Instant::now())
                })
            };
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "the parking lot's poll failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let mut tokens: Vec<ParkToken> = events
                .iter()
                .filter(|e| e.token() != WAKER)
                .map(|e| ParkToken(e.token().0))
                .collect();
            tokens.append(&mut self.woken.lock().unwrap_or_else(|e| e.into_inner()));
            let resumed = {
                let mut slots = self.lock_slots();
                let now = Instant::now();
                if slots.earliest.is_some_and(|e| e.instant() <= now)
                    && now >= last_sweep + SWEEP_EVERY
                {
                    last_sweep = now;
                    tokens.extend(slots.expired(Millis::of(now)));
                }
                tokens
                    .into_iter()
                    .filter_map(|t| slots.take(&self.registry, &self.gauge, t))
                    .collect::<Vec<_>>()
            };
            for parked in resumed {
                (self.resume)(parked.socket, parked.record);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    fn lot() -> (
        ParkingLot<u32>,
        mpsc::Receiver<u32>,
        tokio::runtime::Runtime,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let lot = ParkingLot::start(runtime.handle().clone(), gauge, move |_socket, record| {
            let _ = tx.lock().unwrap().send(record);
        })
        .unwrap();
        (lot, rx, runtime)
    }

    const WAIT: Duration = Duration::from_secs(5);
    const QUIET: Duration = Duration::from_millis(300);

    #[test]
    fn a_parked_connection_resumes_when_its_socket_is_readable() {
        let (lot, resumed, _rt) = lot();
        let (mut client, server) = pair();
        lot.park(server, None, 7).unwrap();
        assert_eq!(lot.parked(), 1);
        assert!(resumed.recv_timeout(QUIET).is_err(), "nothing to read yet");
        client.write_all(b"x").unwrap();
        assert_eq!(resumed.recv_timeout(WAIT), Ok(7));
        assert_eq!(lot.parked(), 0);
    }

    #[test]
    fn a_parked_connection_resumes_when_its_peer_closes() {
        let (lot, resumed, _rt) = lot();
        let (client, server) = pair();
        lot.park(server, None, 8).unwrap();
        drop(client);
        assert_eq!(resumed.recv_timeout(WAIT), Ok(8));
    }

    #[test]
    fn a_wake_resumes_once_and_a_stale_token_wakes_nothing() {
        let (lot, resumed, _rt) = lot();
        let (_c1, s1) = pair();
        let (_c2, s2) = pair();
        let first = lot.park(s1, None, 1).unwrap();
        lot.wake(first);
        assert_eq!(resumed.recv_timeout(WAIT), Ok(1));
        // The slot is reused for the next park, under a new generation.
        let second = lot.park(s2, None, 2).unwrap();
        assert_eq!(second.index(), first.index());
        assert_ne!(second, first);
        lot.wake(first);
        assert!(
            resumed.recv_timeout(QUIET).is_err(),
            "stale token woke a record"
        );
        lot.wake(second);
        assert_eq!(resumed.recv_timeout(WAIT), Ok(2));
    }

    #[test]
    fn a_passed_deadline_resumes_the_connection() {
        let (lot, resumed, _rt) = lot();
        let (_c1, s1) = pair();
        let (_c2, s2) = pair();
        let start = Instant::now();
        lot.park(s1, Some(start + Duration::from_secs(60)), 1)
            .unwrap();
        lot.park(s2, Some(start + Duration::from_millis(400)), 2)
            .unwrap();
        assert_eq!(resumed.recv_timeout(WAIT), Ok(2));
        assert!(start.elapsed() >= Duration::from_millis(400));
        assert!(resumed.recv_timeout(QUIET).is_err(), "the later one waits");
        assert_eq!(lot.parked(), 1);
    }

    #[test]
    fn closing_resumes_everything_and_refuses_more() {
        let (lot, resumed, _rt) = lot();
        let mut clients = Vec::new();
        for i in 0..(CHUNK as u32 + 10) {
            let (c, s) = pair();
            clients.push(c);
            lot.park(s, None, i).unwrap();
        }
        lot.close();
        let mut got: Vec<u32> = resumed.try_iter().collect();
        got.sort();
        assert_eq!(got, (0..CHUNK as u32 + 10).collect::<Vec<_>>());
        let (_c, s) = pair();
        assert!(lot.park(s, None, 99).is_err());
    }
}
