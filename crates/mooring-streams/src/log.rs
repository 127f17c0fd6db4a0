//! The segment log: where a stream's messages live, on disk or in memory.
//!
//! A stream is an ordered list of segments. Each segment holds consecutive messages and is
//! named by the sequence number of its first message (`00000000000000000042.seg`, 20 digits so
//! names sort). A record is framed as
//!
//! ```text
//! u32 payload length | u32 CRC32C(seq, ingest time, payload) | i64 seq | i64 ingest ms | payload
//! ```
//!
//! all big-endian. Appends go to the last segment; when it would grow past
//! `streamSegmentSize` a new segment starts (a single larger message gets a segment of its
//! own). Retention (`maxSize` with OverwriteOldestData, `timeToLiveMillis`) deletes whole
//! segments from the front. Sequence numbers are never reused: when every segment has been
//! deleted an empty segment named by the next sequence number keeps the counter.
//!
//! Durability: an append returns once its record is in the segment file, in the page cache,
//! where it survives a crash of the process: written in place at its offset with one
//! `pwritev` (header and payload, no copy), or copied into a mapped spare segment (below).
//! With `flushOnWrite` the caller then awaits [`StreamLog::sync_through`], a group commit:
//! one waiter at a time fsyncs the active segment on behalf of everyone who has written so
//! far and then wakes every waiter at once, so appenders acknowledged together write their
//! next records together and the next fsync covers them all. A new segment's directory entry
//! is fsynced only for streams that promise durability (`flushOnWrite`, or when it is
//! switched on).
//!
//! Segments of `flushOnWrite` streams are preallocated: the file is filled with zeros a
//! chunk ahead of the write position, so the group commit's `fdatasync` only flushes data.
//! Growing the file on every record instead makes each fsync also commit the inode's new
//! size to the filesystem journal, which on the disks measured here doubles its cost.
//!
//! A busy stream without `flushOnWrite` gets spare segments: while one segment fills, a
//! background thread writes the next files full of zeros (two ahead), maps each and faults
//! its pages in for writing; when a segment is full the next spare is renamed into place and
//! records are copied into its mapping, one copy into the page cache per record with no
//! system call. Growing a file with a `write` per record pays a system call, new pages, the
//! file's growth and the filesystem's block reservation for every record: 64 KiB appends were
//! 0.74-0.77x of a buffered writer growing its file in 1 MiB writes, and spares faulted in
//! over a hole (`fallocate`) only 0.77-0.83x, since the kernel zero-fills such pages one fault
//! at a time. The thread's zeros go in as ordinary writes, which the page cache takes about as
//! fast as the buffered writer's data, on the other core: appends now match the buffered
//! writer (0.99-1.00x), and 512 B ones run at about 2.2 million a second.
//!
//! Either way the zeros after the last record read as an invalid record (sequence number 0
//! where another is expected), so recovery treats them exactly like a torn tail; a segment
//! is cut to its records' length when the next one starts.
//!
//! Recovery ([`StreamLog::open`]) scans every segment, checks each record's length, CRC and
//! sequence number, and truncates the file at the first bad record (a torn tail after a
//! crash). Damage inside an older segment (not something a crash produces) leaves a gap in
//! the sequence rather than renumbering anything, since sequence numbers are never reused.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};

/// Bytes of framing in front of every payload.
pub const RECORD_HEADER: usize = 24;
const SEGMENT_SUFFIX: &str = ".seg";

/// A message as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub sequence_number: i64,
    pub ingest_time: i64,
    pub payload: Bytes,
}

/// The retention and durability settings a log enforces; changed by UpdateMessageStream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    pub max_size: i64,
    pub segment_size: i64,
    pub ttl_millis: Option<i64>,
    pub overwrite_oldest: bool,
    pub flush_on_write: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the stream is full (maxSize {max_size} bytes, {stored} stored) and its strategy is RejectNewData")]
    Full { max_size: i64, stored: i64 },
    #[error("a message of {size} bytes can never fit in a stream of maxSize {max_size}")]
    TooLarge { size: i64, max_size: i64 },
    #[error("the stream has been deleted")]
    Closed,
    #[error("stored record {sequence_number} is corrupt: {reason}")]
    Corrupt {
        sequence_number: i64,
        reason: String,
    },
    #[error("segment I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy)]
struct RecordIndex {
    offset: u64,
    payload_len: u32,
    ingest_time: i64,
}

enum SegmentData {
    File {
        file: Arc<File>,
        path: PathBuf,
        /// The file's bytes up to here exist (records, or zeros); records are written in
        /// place at their offsets and past it extend the file.
        zeroed_end: u64,
        /// The file mapped for writing (a spare segment): records inside it are copied in.
        map: Option<WritableMap>,
    },
    Memory {
        payloads: Vec<Bytes>,
    },
}

/// The next segments of a busy stream without `flushOnWrite`, prepared in the background
/// by one thread at a time, up to [`SPARE_DEPTH`] ahead.
#[derive(Default)]
struct Spares {
    /// Prepared spares, in the order they are used.
    ready: VecDeque<PreparedSpare>,
    /// A thread is preparing more.
    preparing: bool,
    /// Preparing one failed, or the log was deleted: no more spares for this log.
    off: bool,
    /// Number in the next spare's file name.
    next_id: u64,
}

impl Spares {
    fn off() -> Spares {
        Spares {
            off: true,
            ..Spares::default()
        }
    }
}

/// A spare segment file (`next-{n}.spare` in the stream's directory), full of zeros, mapped
/// and faulted in.
struct PreparedSpare {
    file: File,
    map: WritableMap,
    path: PathBuf,
}

/// Suffix of spare segment files in a stream's directory.
const SPARE_SUFFIX: &str = ".spare";
/// How many spares a busy stream keeps ready. A record is copied into a mapped spare several
/// times faster than the thread prepares the next one, so with one spare the thread sat idle
/// while the writer grew a whole segment with `pwrite`; two keep it busy.
const SPARE_DEPTH: usize = 2;
/// A spare is faulted in this much at a time, so the writer's own `mmap`/`munmap` (which
/// wait for the thread's hold on the process's address space) never waits for a whole one.
const SPARE_POPULATE_CHUNK: usize = 2 << 20;

/// A stream without `flushOnWrite` whose segment filled halfway (or whole) within this long
/// is busy enough to get spares: files of the segment size, written full of zeros, mapped and
/// faulted in for writing in the background, each renamed into place when the active segment
/// is full. Writing a record into one is then one copy into the page cache (where it survives
/// the process, as a `write` would), with no system call, page allocation or file growth (the
/// copy alone runs at ~29 GB/s on the machine measured; overall, a busy stream is bound by how
/// fast the thread prepares spares, see the module documentation).
const SPARE_IF_FILLED_WITHIN: Duration = Duration::from_secs(10);
/// Segments larger than this get no spare (each spare holds that much of the page cache).
const SPARE_MAX_SIZE: i64 = 64 << 20;

/// A segment file mapped shared and writable, its pages faulted in ahead of use
/// (`MADV_POPULATE_WRITE`). Only the log's writer touches it, under the log's lock; the file
/// is never cut shorter than the mapping while it exists (segments drop the map before they
/// are truncated or deleted).
struct WritableMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only written through
// `&mut self`.
unsafe impl Send for WritableMap {}

impl WritableMap {
    fn new(file: &File, len: usize) -> std::io::Result<WritableMap> {
        // SAFETY: a fresh shared mapping of `len` bytes of a file at least that long.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let map = WritableMap {
            ptr: std::ptr::NonNull::new(ptr.cast()).expect("mmap returned a null mapping"),
            len,
        };
        for start in (0..len).step_by(SPARE_POPULATE_CHUNK) {
            let chunk = SPARE_POPULATE_CHUNK.min(len - start);
            // SAFETY: advice on a range of the mapping just made. Without it (kernels before
            // 5.14) the pages fault in as they are first written, which is slower but the same.
            unsafe {
                libc::madvise(
                    ptr.cast::<u8>().add(start).cast(),
                    chunk,
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
        Ok(map)
    }

    /// Copies header and payload to `offset` when they fit; false (nothing written) when not.
    fn write(&mut self, offset: u64, header: &[u8], payload: &[u8]) -> bool {
        let start = offset as usize;
        let end = start + header.len() + payload.len();
        if end > self.len {
            return false;
        }
        // SAFETY: `start..end` lies inside the mapping, which this value owns exclusively.
        let target =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), end - start) };
        target[..header.len()].copy_from_slice(header);
        target[header.len()..].copy_from_slice(payload);
        true
    }
}

impl Drop for WritableMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// How far ahead of the write position a preallocated segment is zero-filled.
const PREALLOCATION_CHUNK: u64 = 4 << 20;

/// Records at least this large are not worth zero-filling for: their fsyncs are bound by the
/// bytes written, not by the journal commit, and zeros written first would double those bytes.
/// They extend the file as an append would.
const ZERO_FILL_BELOW: usize = 16 * 1024;

struct Segment {
    first_seq: i64,
    records: Vec<RecordIndex>,
    /// Bytes stored in this segment, framing included.
    bytes: i64,
    data: SegmentData,
    started: std::time::Instant,
}

impl Segment {
    fn next_seq(&self) -> i64 {
        self.first_seq + self.records.len() as i64
    }

    fn newest_ingest(&self) -> Option<i64> {
        self.records.last().map(|r| r.ingest_time)
    }

    fn remove_file(&self) {
        if let SegmentData::File { path, .. } = &self.data {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a segment");
            }
        }
    }
}

struct LogState {
    dir: Option<PathBuf>,
    segments: VecDeque<Segment>,
    next_seq: i64,
    total_bytes: i64,
    limits: LogLimits,
    closed: bool,
    spares: Arc<Mutex<Spares>>,
}

/// The storage figures DescribeMessageStream reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageStatus {
    pub oldest_sequence_number: i64,
    pub newest_sequence_number: i64,
    pub total_bytes: i64,
}

/// What a read found.
#[derive(Debug)]
pub enum ReadOutcome {
    Messages(Vec<StoredMessage>),
    /// Fewer than the minimum are available at or after the start.
    NotEnough {
        available: i64,
    },
    /// The first `min` messages alone exceed the response cap.
    TooLarge,
}

/// One stream's log.
pub struct StreamLog {
    state: Mutex<LogState>,
    /// Highest sequence number known to be fsynced.
    durable: AtomicI64,
    /// Set while one waiter runs the group's fsync.
    syncing: AtomicBool,
    /// Woken (all at once) whenever an fsync finishes.
    synced: Notify,
    /// Records the previous fsync covered, and how long it took: the next leader waits (at
    /// most that long) for as many records before it syncs.
    last_group: AtomicI64,
    last_sync_micros: AtomicI64,
    /// Publishes the newest sequence number (and wakes readers on deletion).
    newest: watch::Sender<i64>,
}

fn segment_path(dir: &Path, first_seq: i64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

fn record_crc(seq: i64, ingest: i64, payload: &[u8]) -> u32 {
    mooring_core::checksum::crc32c(&[&seq.to_be_bytes(), &ingest.to_be_bytes(), payload])
}

/// The framing in front of one record's payload.
fn record_header(seq: i64, ingest: i64, payload: &[u8]) -> [u8; RECORD_HEADER] {
    let mut header = [0u8; RECORD_HEADER];
    header[0..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    header[4..8].copy_from_slice(&record_crc(seq, ingest, payload).to_be_bytes());
    header[8..16].copy_from_slice(&seq.to_be_bytes());
    header[16..24].copy_from_slice(&ingest.to_be_bytes());
    header
}

/// Writes one record at `offset` of a segment file; with `zero_fill` (flushOnWrite) first
/// zero-fills the next chunk when a small record would pass the zeroed end. Returns the new
/// end of the file's written (zeroed or recorded) bytes.
fn write_record_in_place(
    file: &File,
    offset: u64,
    zeroed_end: u64,
    zero_fill: bool,
    header: &[u8],
    payload: &[u8],
) -> std::io::Result<u64> {
    let end = offset + (header.len() + payload.len()) as u64;
    let mut zeroed = zeroed_end;
    if zero_fill && end > zeroed && payload.len() < ZERO_FILL_BELOW {
        let target = end.div_ceil(PREALLOCATION_CHUNK) * PREALLOCATION_CHUNK;
        let zeros = vec![0u8; (target - zeroed).min(1 << 20) as usize];
        while zeroed < target {
            let n = (target - zeroed).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], zeroed)?;
            zeroed += n as u64;
        }
    }
    write_all_vectored_at(file, header, payload, offset)?;
    Ok(zeroed.max(end))
}

/// Writes header and payload at `offset` with as few `pwritev` calls as the kernel allows
/// (one, in practice), without copying them together.
fn write_all_vectored_at(
    file: &File,
    header: &[u8],
    payload: &[u8],
    mut offset: u64,
) -> std::io::Result<()> {
    let mut slices = [IoSlice::new(header), IoSlice::new(payload)];
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` and the slices outlive the call.
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                remaining.as_ptr().cast::<libc::iovec>(),
                remaining.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        match written {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n if n > 0 => {
                IoSlice::advance_slices(&mut remaining, n as usize);
                offset += n as u64;
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Creates the spare segment file at `path`: `size` bytes of zeros, written, then mapped and
/// faulted in for writing.
fn prepare_spare(path: &Path, size: u64) -> std::io::Result<(File, WritableMap)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // Zeros written, not a hole: the filesystem reserves the blocks now, so a full disk is an
    // error here and never a SIGBUS when a record is copied into the mapping, and the faults
    // then find the pages cached. In 64 KiB writes: the page cache keeps pages in folios of
    // the size they were written in, and a small `write` into a 1 MiB folio walks all of its
    // blocks (measured: 512 B writes over 1 MiB-written zeros ran at half the speed of growing
    // a file, over 64 KiB-written ones at 1.4x it), for a record that does not fit the mapping.
    let zeros = vec![0u8; (64 * 1024).min(size as usize)];
    let mut written = 0u64;
    while written < size {
        let n = (size - written).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], written)?;
        written += n as u64;
    }
    let map = WritableMap::new(&file, size as usize)?;
    Ok((file, map))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Result of scanning one segment file during recovery.
struct ScannedSegment {
    records: Vec<RecordIndex>,
    valid_len: u64,
    file_len: u64,
}

fn scan_segment(path: &Path, first_seq: i64) -> std::io::Result<ScannedSegment> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut records = Vec::new();
    let mut offset = 0u64;
    let mut header = [0u8; RECORD_HEADER];
    let mut payload = Vec::new();
    loop {
        if file_len - offset < RECORD_HEADER as u64 {
            break;
        }
        reader.read_exact(&mut header)?;
        let len = u32::from_be_bytes(header[0..4].try_into().unwrap());
        let crc = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let seq = i64::from_be_bytes(header[8..16].try_into().unwrap());
        let ingest = i64::from_be_bytes(header[16..24].try_into().unwrap());
        let expected_seq = first_seq + records.len() as i64;
        if seq != expected_seq || (len as u64) > file_len - offset - RECORD_HEADER as u64 {
            break;
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload)?;
        if record_crc(seq, ingest, &payload) != crc {
            break;
        }
        records.push(RecordIndex {
            offset,
            payload_len: len,
            ingest_time: ingest,
        });
        offset += RECORD_HEADER as u64 + len as u64;
    }
    Ok(ScannedSegment {
        records,
        valid_len: offset,
        file_len,
    })
}

/// The running group-commit fsync; when it ends (or its future is dropped) another waiter
/// may start the next one.
struct SyncLeader<'a>(&'a StreamLog);

impl Drop for SyncLeader<'_> {
    fn drop(&mut self) {
        self.0.syncing.store(false, Ordering::Release);
        self.0.synced.notify_waiters();
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        // A spare still being prepared is removed by its thread; ready ones at the next open.
        lock(&lock(&self.state).spares).off = true;
    }
}

impl StreamLog {
    /// A log that lives only in memory.
    pub fn in_memory(limits: LogLimits) -> StreamLog {
        let segment = Segment {
            first_seq: 0,
            records: Vec::new(),
            bytes: 0,
            data: SegmentData::Memory {
                payloads: Vec::new(),
            },
            started: std::time::Instant::now(),
        };
        StreamLog::from_state(LogState {
            dir: None,
            segments: VecDeque::from([segment]),
            next_seq: 0,
            total_bytes: 0,
            limits,
            closed: false,
            spares: Arc::new(Mutex::new(Spares::off())),
        })
    }

    fn from_state(state: LogState) -> StreamLog {
        let newest = state.next_seq - 1;
        StreamLog {
            state: Mutex::new(state),
            durable: AtomicI64::new(newest),
            syncing: AtomicBool::new(false),
            synced: Notify::new(),
            last_group: AtomicI64::new(1),
            last_sync_micros: AtomicI64::new(0),
            newest: watch::channel(newest).0,
        }
    }

    /// Opens (creating if needed) the file-backed log in `dir`, recovering from a crash:
    /// torn or corrupt tails are truncated away.
    pub fn open(dir: &Path, limits: LogLimits) -> Result<StreamLog, LogError> {
        std::fs::create_dir_all(dir)?;
        let mut names: Vec<(i64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let file_name = entry.file_name();
            if file_name
                .to_str()
                .is_some_and(|n| n.ends_with(SPARE_SUFFIX))
            {
                // A spare prepared before a restart is not known to be complete.
                std::fs::remove_file(entry.path())?;
                continue;
            }
            let Some(stem) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            else {
                continue;
            };
            if let Ok(first) = stem.parse::<i64>() {
                names.push((first, entry.path()));
            }
        }
        names.sort();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut total_bytes = 0i64;
        for (first_seq, path) in names {
            if let Some(previous) = segments.back() {
                if first_seq < previous.next_seq() {
                    tracing::warn!(path = %path.display(), "removing an overlapping segment");
                    std::fs::remove_file(&path)?;
                    continue;
                }
            }
            let scanned = scan_segment(&path, first_seq)?;
            // Records are written in place; only the last segment is ever written again,
            // from the truncated end.
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            if scanned.valid_len < scanned.file_len {
                tracing::warn!(
                    path = %path.display(),
                    valid = scanned.valid_len,
                    length = scanned.file_len,
                    "truncating a torn or corrupt segment tail"
                );
                file.set_len(scanned.valid_len)?;
                file.sync_all()?;
            }
            let bytes = scanned.valid_len as i64;
            total_bytes += bytes;
            segments.push_back(Segment {
                first_seq,
                records: scanned.records,
                bytes,
                data: SegmentData::File {
                    file: Arc::new(file),
                    path,
                    zeroed_end: scanned.valid_len,
                    map: None,
                },
                started: std::time::Instant::now(),
            });
        }
        let next_seq = segments.back().map(Segment::next_seq).unwrap_or(0);
        let mut state = LogState {
            dir: Some(dir.to_path_buf()),
            segments,
            next_seq,
            total_bytes,
            limits,
            closed: false,
            spares: Arc::new(Mutex::new(Spares::default())),
        };
        if state.segments.is_empty() {
            state.start_segment()?;
        }
        Ok(StreamLog::from_state(state))
    }

    pub fn limits(&self) -> LogLimits {
        lock(&self.state).limits
    }

    /// Applies new limits; retention is enforced at once.
    pub fn set_limits(&self, limits: LogLimits, now_millis: i64) -> Result<(), LogError> {
        let mut state = lock(&self.state);
        if limits.flush_on_write && !state.limits.flush_on_write {
            // Segments started without the promise: make their directory entries durable.
            if let Some(dir) = &state.dir {
                sync_dir(dir)?;
            }
        }
        state.limits = limits;
        if limits.overwrite_oldest {
            while state.total_bytes > limits.max_size && state.drop_oldest()? {}
        }
        state.expire(now_millis)?;
        Ok(())
    }

    /// Appends one message; returns its sequence number. With `flushOnWrite` the caller must
    /// also await [`StreamLog::sync_through`] before acknowledging.
    pub fn append(&self, payload: &[u8], now_millis: i64) -> Result<i64, LogError> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(LogError::Closed);
        }
        let record_len = (RECORD_HEADER + payload.len()) as i64;
        let limits = state.limits;
        if record_len > limits.max_size {
            return Err(LogError::TooLarge {
                size: record_len,
                max_size: limits.max_size,
            });
        }
        while state.total_bytes + record_len > limits.max_size {
            if !limits.overwrite_oldest {
                return Err(LogError::Full {
                    max_size: limits.max_size,
                    stored: state.total_bytes,
                });
            }
            if !state.drop_oldest()? {
                break;
            }
        }
        let active = state
            .segments
            .back_mut()
            .expect("a log always has a segment");
        if active.bytes > 0 && active.bytes + record_len > limits.segment_size {
            if let SegmentData::File {
                file,
                zeroed_end,
                map,
                ..
            } = &mut active.data
            {
                // Unmapped before the file is cut (touching a mapping past the end of its
                // file faults).
                *map = None;
                if *zeroed_end > active.bytes as u64 {
                    // The zeros past the last record are not kept in a finished segment.
                    file.set_len(active.bytes as u64)?;
                }
                if limits.flush_on_write {
                    file.sync_data()?;
                }
            }
            let busy = active.started.elapsed() < SPARE_IF_FILLED_WITHIN;
            state.start_segment()?;
            if busy {
                state.prepare_spare();
            }
        }
        let seq = state.next_seq;
        let active = state
            .segments
            .back_mut()
            .expect("a log always has a segment");
        let offset = active.bytes as u64;
        match &mut active.data {
            SegmentData::File {
                file,
                zeroed_end,
                map,
                ..
            } => {
                // A failed write leaves at most a torn record past the last good one, which
                // the next append overwrites at the same offset.
                let header = record_header(seq, now_millis, payload);
                let mapped = map
                    .as_mut()
                    .is_some_and(|map| map.write(offset, &header, payload));
                // (A record copied into a spare needs nothing more: its whole length exists.)
                if !mapped {
                    *zeroed_end = write_record_in_place(
                        file,
                        offset,
                        *zeroed_end,
                        limits.flush_on_write,
                        &header,
                        payload,
                    )?;
                }
            }
            SegmentData::Memory { payloads } => payloads.push(Bytes::copy_from_slice(payload)),
        }
        active.records.push(RecordIndex {
            offset,
            payload_len: payload.len() as u32,
            ingest_time: now_millis,
        });
        active.bytes += record_len;
        let half_full_soon = active.bytes * 2 > limits.segment_size
            && active.bytes * 2 - record_len * 2 <= limits.segment_size
            && active.started.elapsed() < SPARE_IF_FILLED_WITHIN;
        state.total_bytes += record_len;
        state.next_seq += 1;
        if half_full_soon {
            state.prepare_spare();
        }
        if state.dir.is_none() {
            self.durable.store(seq, Ordering::Release);
        }
        drop(state);
        self.newest.send_replace(seq);
        Ok(seq)
    }

    /// Waits until every record up to `seq` is fsynced, sharing one fsync among all
    /// concurrent callers (group commit): whoever finds no fsync running runs one for
    /// everything written so far, and its end wakes every waiter at once.
    pub async fn sync_through(&self, seq: i64) -> Result<(), LogError> {
        loop {
            if self.durable.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            let finished = self.synced.notified();
            tokio::pin!(finished);
            // Registered before the checks below, so an fsync ending in between still wakes us.
            finished.as_mut().enable();
            if self.durable.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            if self
                .syncing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // Hands the role on even if this future is dropped mid-fsync.
                let _leader = SyncLeader(self);
                self.sync_written().await?;
            } else {
                finished.await;
            }
        }
    }

    /// Before an fsync: appenders acknowledged by the previous one are likely sending their
    /// next records right now (over a socket that takes a round trip). Waits until as many
    /// records are pending as the previous fsync covered, for at most as long as it took,
    /// so a steady group is not split into a lone leader and everyone else.
    async fn gather(&self) {
        tokio::task::yield_now().await;
        let expected = self.last_group.load(Ordering::Relaxed);
        let patience = self
            .last_sync_micros
            .load(Ordering::Relaxed)
            .clamp(0, 2_000);
        let deadline = tokio::time::Instant::now() + Duration::from_micros(patience as u64);
        let mut newest = self.newest.subscribe();
        loop {
            let pending = *newest.borrow_and_update() - self.durable.load(Ordering::Acquire);
            if pending >= expected || self.is_closed() {
                return;
            }
            match tokio::time::timeout_at(deadline, newest.changed()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    /// One group-commit fsync: everything written before it starts becomes durable.
    async fn sync_written(&self) -> Result<(), LogError> {
        self.gather().await;
        let (file, target) = {
            let state = lock(&self.state);
            let file = match state.segments.back().map(|s| &s.data) {
                Some(SegmentData::File { file, .. }) => Some(file.clone()),
                _ => None,
            };
            (file, state.next_seq - 1)
        };
        let started = std::time::Instant::now();
        if let Some(file) = file {
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
        }
        let covered = target - self.durable.fetch_max(target, Ordering::AcqRel);
        self.last_group.store(covered.max(1), Ordering::Relaxed);
        self.last_sync_micros
            .store(started.elapsed().as_micros() as i64, Ordering::Relaxed);
        Ok(())
    }

    /// Fsyncs the active segment (clean shutdown, tests).
    pub fn sync_all(&self) -> Result<(), LogError> {
        let state = lock(&self.state);
        if let Some(SegmentData::File { file, .. }) = state.segments.back().map(|s| &s.data) {
            file.sync_data()?;
        }
        Ok(())
    }

    pub fn storage_status(&self) -> StorageStatus {
        let state = lock(&self.state);
        state.storage_status()
    }

    /// A receiver that changes whenever a message is appended or the log is closed.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.newest.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Deletes segments whose newest message is older than the TTL.
    pub fn expire(&self, now_millis: i64) -> Result<(), LogError> {
        lock(&self.state).expire(now_millis)
    }

    /// Marks the log deleted, removes its files and wakes every blocked reader.
    pub fn close_and_delete(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.segments.clear();
        // A spare being prepared is removed by its thread, ready ones with the directory.
        lock(&state.spares).off = true;
        if let Some(dir) = &state.dir {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not delete stream data");
            }
        }
        drop(state);
        self.newest.send_modify(|_| {});
    }

    /// Reads up to `max` messages starting at `start` (clamped to the oldest retained
    /// message), provided at least `min` are available, keeping the payload total under
    /// `byte_cap` unless fewer than `min` would remain.
    pub fn read(
        &self,
        start: i64,
        min: i64,
        max: i64,
        byte_cap: usize,
    ) -> Result<ReadOutcome, LogError> {
        enum Source {
            File(Arc<File>, u64, u32),
            Memory(Bytes),
        }
        let mut plan: Vec<(i64, i64, Source)> = Vec::new();
        {
            let state = lock(&self.state);
            if state.closed {
                return Err(LogError::Closed);
            }
            let status = state.storage_status();
            let start = start.max(status.oldest_sequence_number);
            let available: i64 = state
                .segments
                .iter()
                .map(|s| (s.next_seq() - start.max(s.first_seq)).max(0))
                .sum();
            if available < min {
                return Ok(ReadOutcome::NotEnough { available });
            }
            let mut bytes = 0usize;
            'segments: for segment in &state.segments {
                if segment.next_seq() <= start {
                    continue;
                }
                let from = (start.max(segment.first_seq) - segment.first_seq) as usize;
                for (i, record) in segment.records.iter().enumerate().skip(from) {
                    if plan.len() as i64 >= max {
                        break 'segments;
                    }
                    let len = record.payload_len as usize;
                    if bytes + len > byte_cap {
                        if (plan.len() as i64) < min {
                            return Ok(ReadOutcome::TooLarge);
                        }
                        break 'segments;
                    }
                    bytes += len;
                    let seq = segment.first_seq + i as i64;
                    let source = match &segment.data {
                        SegmentData::File { file, .. } => {
                            Source::File(file.clone(), record.offset, record.payload_len)
                        }
                        SegmentData::Memory { payloads } => Source::Memory(payloads[i].clone()),
                    };
                    plan.push((seq, record.ingest_time, source));
                }
            }
        }
        let mut messages = Vec::with_capacity(plan.len());
        for (seq, ingest, source) in plan {
            let payload = match source {
                Source::Memory(payload) => payload,
                Source::File(file, offset, len) => {
                    let mut buf = vec![0u8; RECORD_HEADER + len as usize];
                    file.read_exact_at(&mut buf, offset)?;
                    let crc = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                    let stored_seq = i64::from_be_bytes(buf[8..16].try_into().unwrap());
                    let payload = &buf[RECORD_HEADER..];
                    if stored_seq != seq || record_crc(seq, ingest, payload) != crc {
                        return Err(LogError::Corrupt {
                            sequence_number: seq,
                            reason: "checksum mismatch".into(),
                        });
                    }
                    Bytes::copy_from_slice(payload)
                }
            };
            messages.push(StoredMessage {
                sequence_number: seq,
                ingest_time: ingest,
                payload,
            });
        }
        Ok(ReadOutcome::Messages(messages))
    }
}

impl LogState {
    fn storage_status(&self) -> StorageStatus {
        let oldest = self
            .segments
            .iter()
            .find(|s| !s.records.is_empty())
            .map(|s| s.first_seq)
            .unwrap_or(self.next_seq);
        StorageStatus {
            oldest_sequence_number: oldest,
            newest_sequence_number: self.next_seq - 1,
            total_bytes: self.total_bytes,
        }
    }

    /// Starts a new, empty segment at `next_seq`.
    fn start_segment(&mut self) -> Result<(), LogError> {
        let data = match &self.dir {
            Some(dir) => {
                let path = segment_path(dir, self.next_seq);
                let (file, zeroed_end, map) = match self.take_spare(&path) {
                    Some((file, map)) => {
                        let length = map.len as u64;
                        (file, length, Some(map))
                    }
                    None => {
                        let file = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .open(&path)?;
                        (file, 0, None)
                    }
                };
                if self.limits.flush_on_write {
                    sync_dir(dir)?;
                }
                SegmentData::File {
                    file: Arc::new(file),
                    path,
                    zeroed_end,
                    map,
                }
            }
            None => SegmentData::Memory {
                payloads: Vec::new(),
            },
        };
        self.segments.push_back(Segment {
            first_seq: self.next_seq,
            records: Vec::new(),
            bytes: 0,
            data,
            started: std::time::Instant::now(),
        });
        Ok(())
    }

    /// The oldest ready spare, renamed to `path`; `None` when there is none (or it is not for this
    /// stream: flushOnWrite segments are zero-filled and written with `pwrite`).
    fn take_spare(&self, path: &Path) -> Option<(File, WritableMap)> {
        if self.limits.flush_on_write {
            return None;
        }
        let spare = lock(&self.spares).ready.pop_front()?;
        match std::fs::rename(&spare.path, path) {
            Ok(()) => Some((spare.file, spare.map)),
            Err(e) => {
                tracing::warn!(error = %e, "could not use the spare segment");
                None
            }
        }
    }

    /// Starts a thread preparing spare segments in the background until [`SPARE_DEPTH`] are
    /// ready, unless one is already at it, enough are ready, or spares are off for this log.
    fn prepare_spare(&mut self) {
        let (Some(dir), false) = (&self.dir, self.limits.flush_on_write) else {
            return;
        };
        if self.limits.segment_size > SPARE_MAX_SIZE {
            return;
        }
        let mut slot = lock(&self.spares);
        if slot.off || slot.preparing || slot.ready.len() >= SPARE_DEPTH {
            return;
        }
        slot.preparing = true;
        drop(slot);
        let (spares, dir) = (self.spares.clone(), dir.clone());
        let size = self.limits.segment_size as u64;
        let started = std::thread::Builder::new()
            .name("stream-spare".into())
            .spawn(move || loop {
                let path = {
                    let mut slot = lock(&spares);
                    if slot.off || slot.ready.len() >= SPARE_DEPTH {
                        slot.preparing = false;
                        return;
                    }
                    slot.next_id += 1;
                    dir.join(format!("next-{}{SPARE_SUFFIX}", slot.next_id))
                };
                let prepared = prepare_spare(&path, size);
                let mut slot = lock(&spares);
                match prepared {
                    Ok((file, map)) if !slot.off => {
                        slot.ready.push_back(PreparedSpare { file, map, path })
                    }
                    Ok(_) => {
                        // The log was deleted or closed meanwhile.
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => {
                        if !slot.off {
                            tracing::warn!(path = %path.display(), error = %e, "could not prepare a spare segment; writing without");
                        }
                        let _ = std::fs::remove_file(&path);
                        slot.off = true;
                    }
                }
            });
        if started.is_err() {
            let mut slot = lock(&self.spares);
            slot.off = true;
            slot.preparing = false;
        }
    }

    /// Deletes the oldest segment holding data; returns false when nothing is left to drop.
    fn drop_oldest(&mut self) -> Result<bool, LogError> {
        let Some(front) = self.segments.front() else {
            return Ok(false);
        };
        if front.records.is_empty() && self.segments.len() == 1 {
            return Ok(false);
        }
        if self.segments.len() == 1 {
            // The only segment is also the active one: start afresh after it.
            self.start_segment()?;
        }
        let dropped = self.segments.pop_front().expect("checked above");
        self.total_bytes -= dropped.bytes;
        dropped.remove_file();
        Ok(true)
    }

    fn expire(&mut self, now_millis: i64) -> Result<(), LogError> {
        let Some(ttl) = self.limits.ttl_millis else {
            return Ok(());
        };
        while let Some(front) = self.segments.front() {
            match front.newest_ingest() {
                Some(newest) if newest + ttl < now_millis => {
                    self.drop_oldest()?;
                }
                _ => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LogLimits {
        LogLimits {
            max_size: 1 << 20,
            segment_size: 1024,
            ttl_millis: None,
            overwrite_oldest: false,
            flush_on_write: false,
        }
    }

    fn read_all(log: &StreamLog) -> Vec<StoredMessage> {
        match log.read(0, 0, i64::MAX, usize::MAX).unwrap() {
            ReadOutcome::Messages(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn appends_survive_reopen_and_roll_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = StreamLog::open(dir.path(), limits()).unwrap();
            for i in 0..100u32 {
                assert_eq!(
                    log.append(format!("message {i}").as_bytes(), 1000 + i as i64)
                        .unwrap(),
                    i as i64
                );
            }
        }
        let segments = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(segments > 1, "expected several segments, got {segments}");
        assert!(dir.path().join("00000000000000000000.seg").exists());
        let log = StreamLog::open(dir.path(), limits()).unwrap();
        let all = read_all(&log);
        assert_eq!(all.len(), 100);
        for (i, m) in all.iter().enumerate() {
            assert_eq!(m.sequence_number, i as i64);
            assert_eq!(m.ingest_time, 1000 + i as i64);
            assert_eq!(m.payload, format!("message {i}").as_bytes());
        }
        assert_eq!(log.append(b"next", 5).unwrap(), 100);
    }

    #[test]
    fn torn_tail_is_truncated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = StreamLog::open(dir.path(), limits()).unwrap();
            for i in 0..5 {
                log.append(&[i as u8; 100], 1).unwrap();
            }
        }
        let path = dir.path().join("00000000000000000000.seg");
        let len = std::fs::metadata(&path).unwrap().len();
        // Cut the last record in half.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 60).unwrap();
        drop(file);
        let log = StreamLog::open(dir.path(), limits()).unwrap();
        let all = read_all(&log);
        assert_eq!(all.len(), 4);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 * (RECORD_HEADER as u64 + 100)
        );
        assert_eq!(log.append(b"after", 1).unwrap(), 4);
        drop(log);
        let log = StreamLog::open(dir.path(), limits()).unwrap();
        assert_eq!(read_all(&log).last().unwrap().payload, &b"after"[..]);
    }

    #[test]
    fn flush_on_write_segments_are_preallocated_and_recover_like_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits();
        l.flush_on_write = true;
        l.segment_size = 64 * 1024;
        let record = RECORD_HEADER as u64 + 100;
        let path = dir.path().join("00000000000000000000.seg");
        {
            let log = StreamLog::open(dir.path(), l).unwrap();
            for i in 0..5 {
                log.append(&[i as u8; 100], 1).unwrap();
            }
            // Zero-filled ahead of the records, written in place.
            assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOCATION_CHUNK);
            // A torn sixth record past the fifth (a crash mid-write).
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.write_all_at(&[0xee; 40], 5 * record).unwrap();
        }
        let log = StreamLog::open(dir.path(), l).unwrap();
        let all = read_all(&log);
        assert_eq!(all.len(), 5);
        assert_eq!(all[4].payload, &[4u8; 100][..]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5 * record);
        // Writing resumes in place after the last good record, through a new zero chunk.
        assert_eq!(log.append(b"after", 2).unwrap(), 5);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOCATION_CHUNK);
        // Rolling to a new segment cuts the finished one to its records.
        let mut appended = 6;
        while std::fs::read_dir(dir.path()).unwrap().count() < 2 {
            log.append(&[9u8; 1000], 3).unwrap();
            appended += 1;
        }
        let first = log.storage_status();
        let finished_len = std::fs::metadata(&path).unwrap().len();
        assert!(finished_len < 64 * 1024 + 1024, "{finished_len}");
        drop(log);
        let log = StreamLog::open(dir.path(), l).unwrap();
        assert_eq!(log.storage_status(), first);
        let all = read_all(&log);
        assert_eq!(all.len(), appended);
        assert_eq!(all[5].payload, &b"after"[..]);
        // A stream switched to flushOnWrite=false keeps reading and writing the same files.
        drop(log);
        let log = StreamLog::open(dir.path(), limits()).unwrap();
        assert_eq!(log.append(b"appended", 4).unwrap(), appended as i64);
        assert_eq!(read_all(&log).len(), appended + 1);
    }

    #[test]
    fn a_busy_stream_writes_into_spare_segments_prepared_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits();
        l.segment_size = 64 * 1024;
        l.max_size = 1 << 30;
        let log = StreamLog::open(dir.path(), l).unwrap();
        let spares = |log: &StreamLog| lock(&lock(&log.state).spares).ready.len();
        let spare_files = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension() == Some("spare".as_ref()))
                .count()
        };
        let segment_files = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(SEGMENT_SUFFIX))
                .collect();
            names.sort();
            names
        };
        // Filling the first segment halfway starts spares of the segment size, two ahead.
        let mut appended = 0u8;
        while spares(&log) < SPARE_DEPTH {
            if appended < 20 {
                log.append(&[appended; 2000], 1).unwrap();
                appended += 1;
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(appended >= 16, "{appended}");
        let first_spare = lock(&lock(&log.state).spares).ready[0].path.clone();
        assert_eq!(std::fs::metadata(&first_spare).unwrap().len(), 64 * 1024);
        assert_eq!(spare_files(), SPARE_DEPTH);
        // The next segment is the spare, renamed; records go into it in place.
        while segment_files().len() < 2 {
            log.append(&[appended; 2000], 1).unwrap();
            appended += 1;
        }
        let files = segment_files();
        let second = dir.path().join(&files[1]);
        assert!(!first_spare.exists());
        assert_eq!(std::fs::metadata(&second).unwrap().len(), 64 * 1024);
        let first_len = std::fs::metadata(dir.path().join(&files[0])).unwrap().len();
        assert_eq!(first_len % (RECORD_HEADER as u64 + 2000), 0);
        let all = read_all(&log);
        assert_eq!(all.len(), appended as usize);
        assert!(all
            .iter()
            .enumerate()
            .all(|(i, m)| m.payload[..] == [i as u8; 2000]));
        // After a crash, the spare is discarded and the zeros past the last record read as a
        // torn tail; nothing written is lost and writing resumes after it.
        let status = log.storage_status();
        // (Taking the first spare started topping them up again.)
        while lock(&lock(&log.state).spares).preparing {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(spare_files(), SPARE_DEPTH);
        drop(log);
        let log = StreamLog::open(dir.path(), l).unwrap();
        assert_eq!(spare_files(), 0);
        assert_eq!(log.storage_status(), status);
        assert_eq!(
            std::fs::metadata(&second).unwrap().len(),
            (RECORD_HEADER as u64 + 2000) * (appended as u64 - first_len / 2024)
        );
        assert_eq!(log.append(b"after", 2).unwrap(), appended as i64);
        let all = read_all(&log);
        assert_eq!(all.len(), appended as usize + 1);
        assert_eq!(all.last().unwrap().payload, &b"after"[..]);
        // Deleting the stream removes its spare with everything else.
        log.close_and_delete();
        assert!(!dir.path().exists());
    }

    #[test]
    fn large_flush_on_write_records_extend_the_file_without_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits();
        l.flush_on_write = true;
        l.max_size = 64 << 20;
        l.segment_size = 16 << 20;
        let path = dir.path().join("00000000000000000000.seg");
        let log = StreamLog::open(dir.path(), l).unwrap();
        let big = vec![3u8; ZERO_FILL_BELOW];
        log.append(&big, 1).unwrap();
        let big_end = (RECORD_HEADER + big.len()) as u64;
        assert_eq!(std::fs::metadata(&path).unwrap().len(), big_end);
        log.append(b"small", 2).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOCATION_CHUNK);
        drop(log);
        let log = StreamLog::open(dir.path(), l).unwrap();
        let all = read_all(&log);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].payload, &big[..]);
        assert_eq!(all[1].payload, &b"small"[..]);
    }

    #[test]
    fn corrupt_record_truncates_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = StreamLog::open(dir.path(), limits()).unwrap();
            for _ in 0..3 {
                log.append(&[7u8; 50], 1).unwrap();
            }
        }
        let path = dir.path().join("00000000000000000000.seg");
        let mut bytes = std::fs::read(&path).unwrap();
        let second_payload = RECORD_HEADER * 2 + 50 + 10;
        bytes[second_payload] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let log = StreamLog::open(dir.path(), limits()).unwrap();
        assert_eq!(read_all(&log).len(), 1);
        assert_eq!(log.storage_status().newest_sequence_number, 0);
    }

    #[test]
    fn reject_new_data_when_full_and_overwrite_drops_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits();
        l.max_size = 2048;
        l.segment_size = 1024;
        let log = StreamLog::open(dir.path(), l).unwrap();
        let mut accepted = 0i64;
        loop {
            match log.append(&[1u8; 100], 1) {
                Ok(_) => accepted += 1,
                Err(LogError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(accepted, (2048 / (RECORD_HEADER + 100)) as i64);
        assert!(matches!(
            log.append(&[0u8; 4000], 1),
            Err(LogError::TooLarge { .. })
        ));
        l.overwrite_oldest = true;
        log.set_limits(l, 1).unwrap();
        let seq = log.append(&[2u8; 100], 1).unwrap();
        assert_eq!(seq, accepted);
        let status = log.storage_status();
        assert!(status.oldest_sequence_number > 0);
        assert!(status.total_bytes <= 2048);
        assert_eq!(status.newest_sequence_number, accepted);
        // Segment files on disk match what is retained.
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files <= 3, "{files}");
        drop(log);
        let log = StreamLog::open(dir.path(), l).unwrap();
        assert_eq!(log.storage_status(), status);
    }

    #[test]
    fn sequence_numbers_survive_losing_every_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits();
        l.ttl_millis = Some(60_000);
        {
            let log = StreamLog::open(dir.path(), l).unwrap();
            for _ in 0..10 {
                log.append(b"x", 0).unwrap();
            }
            log.expire(120_000).unwrap();
            assert_eq!(
                log.storage_status(),
                StorageStatus {
                    oldest_sequence_number: 10,
                    newest_sequence_number: 9,
                    total_bytes: 0
                }
            );
        }
        let log = StreamLog::open(dir.path(), l).unwrap();
        assert_eq!(log.append(b"y", 130_000).unwrap(), 10);
    }

    #[test]
    fn reads_clamp_to_oldest_and_honour_min_max_and_cap() {
        let log = StreamLog::in_memory(limits());
        for i in 0..10u8 {
            log.append(&[i; 10], 1).unwrap();
        }
        match log.read(3, 2, 4, usize::MAX).unwrap() {
            ReadOutcome::Messages(m) => {
                assert_eq!(
                    m.iter().map(|m| m.sequence_number).collect::<Vec<_>>(),
                    vec![3, 4, 5, 6]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            log.read(8, 3, 5, usize::MAX).unwrap(),
            ReadOutcome::NotEnough { available: 2 }
        ));
        assert!(matches!(
            log.read(0, 2, 5, 15).unwrap(),
            ReadOutcome::TooLarge
        ));
        match log.read(0, 1, 5, 25).unwrap() {
            ReadOutcome::Messages(m) => assert_eq!(m.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_dropped_group_commit_leader_hands_the_role_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits();
        l.flush_on_write = true;
        let log = StreamLog::open(dir.path(), l).unwrap();
        let seq = log.append(b"first", 1).unwrap();
        {
            let leader = log.sync_through(seq);
            tokio::pin!(leader);
            // The first poll takes the leader role and stops before its fsync.
            assert!(futures::poll!(leader.as_mut()).is_pending());
            assert!(log.syncing.load(Ordering::Acquire));
        }
        assert!(!log.syncing.load(Ordering::Acquire));
        tokio::time::timeout(std::time::Duration::from_secs(10), log.sync_through(seq))
            .await
            .expect("a later caller runs the fsync")
            .unwrap();
        assert!(log.durable.load(Ordering::Acquire) >= seq);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_commit_makes_concurrent_appends_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = limits();
        l.flush_on_write = true;
        l.segment_size = 1 << 20;
        let log = Arc::new(StreamLog::open(dir.path(), l).unwrap());
        let mut tasks = Vec::new();
        for t in 0..16 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..50 {
                    let seq = log.append(format!("{t}-{i}").as_bytes(), 1).unwrap();
                    log.sync_through(seq).await.unwrap();
                    seqs.push(seq);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        assert_eq!(all, (0..800).collect::<Vec<_>>());
        assert!(log.durable.load(Ordering::Acquire) >= 799);
    }
}
