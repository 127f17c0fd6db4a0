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
//! Durability: an append returns after one `writev` (header and payload, no copy) into the
//! segment file (the page cache survives a crash of the process). With `flushOnWrite` the
//! caller then awaits [`StreamLog::sync_through`], a group commit: one waiter at a time
//! fsyncs the active segment on behalf of everyone who has written so far and then wakes
//! every waiter at once, so appenders acknowledged together write their next records
//! together and the next fsync covers them all. A new segment's directory entry is fsynced
//! only for streams that promise durability (`flushOnWrite`, or when it is switched on).
//!
//! Segments of `flushOnWrite` streams are preallocated: the file is filled with zeros a
//! chunk ahead of the write position and records are written in place (`pwrite`), so the
//! group commit's `fdatasync` only flushes data. Appending instead grows the file on every
//! record and makes each fsync also commit the inode's new size to the filesystem journal,
//! which on the disks measured here doubles its cost. The zeros after the last record read
//! as an invalid record (sequence number 0 where another is expected), so recovery treats them
//! exactly like a torn tail; a segment is cut to its records' length when the next one starts.
//!
//! Recovery ([`StreamLog::open`]) scans every segment, checks each record's length, CRC and
//! sequence number, and truncates the file at the first bad record (a torn tail after a
//! crash). Damage inside an older segment (not something a crash produces) leaves a gap in
//! the sequence rather than renumbering anything, since sequence numbers are never reused.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, IoSlice, Read, Write};
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
        writes: SegmentWrites,
    },
    Memory {
        payloads: Vec<Bytes>,
    },
}

/// How records reach a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentWrites {
    /// Opened `O_APPEND`: one `writev` per record, the file grows with it.
    Appending,
    /// Zero-filled up to `zeroed_end`; records are written in place at their offsets.
    Preallocated { zeroed_end: u64 },
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

/// Writes one record at `offset` of a preallocated segment, first zero-filling the next
/// chunk when a small record would pass the zeroed end; returns the new end of the file's
/// written (zeroed or recorded) bytes.
fn write_record_in_place(
    file: &File,
    offset: u64,
    zeroed_end: u64,
    header: &[u8],
    payload: &[u8],
) -> std::io::Result<u64> {
    let end = offset + (header.len() + payload.len()) as u64;
    let mut zeroed = zeroed_end;
    if end > zeroed && payload.len() < ZERO_FILL_BELOW {
        let target = end.div_ceil(PREALLOCATION_CHUNK) * PREALLOCATION_CHUNK;
        let zeros = vec![0u8; (target - zeroed).min(1 << 20) as usize];
        while zeroed < target {
            let n = (target - zeroed).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], zeroed)?;
            zeroed += n as u64;
        }
    }
    // Small records go down in one write; large ones as header then payload rather than
    // copying the payload (a torn pair fails its CRC like any torn record).
    if payload.len() <= 16 * 1024 {
        let mut record = Vec::with_capacity(header.len() + payload.len());
        record.extend_from_slice(header);
        record.extend_from_slice(payload);
        file.write_all_at(&record, offset)?;
    } else {
        file.write_all_at(header, offset)?;
        file.write_all_at(payload, offset + header.len() as u64)?;
    }
    Ok(zeroed.max(end))
}

/// Appends header and payload to a segment opened for appending, with as few `writev`
/// calls as the kernel allows (one, in practice).
fn append_record(mut file: &File, header: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let mut slices = [IoSlice::new(header), IoSlice::new(payload)];
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        match file.write_vectored(remaining) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut remaining, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn lock(state: &Mutex<LogState>) -> MutexGuard<'_, LogState> {
    state
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
        };
        StreamLog::from_state(LogState {
            dir: None,
            segments: VecDeque::from([segment]),
            next_seq: 0,
            total_bytes: 0,
            limits,
            closed: false,
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
            // Appending (O_APPEND) lands every record at the end, wherever recovery truncated
            // it; a flushOnWrite stream's segments are written in place instead (only the last
            // one is ever written again, from the truncated end).
            let writes = if limits.flush_on_write {
                SegmentWrites::Preallocated {
                    zeroed_end: scanned.valid_len,
                }
            } else {
                SegmentWrites::Appending
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .append(writes == SegmentWrites::Appending)
                .open(&path)?;
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
                    writes,
                },
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
        let active = state.segments.back().expect("a log always has a segment");
        if active.bytes > 0 && active.bytes + record_len > limits.segment_size {
            if let SegmentData::File { file, writes, .. } = &active.data {
                if matches!(writes, SegmentWrites::Preallocated { .. }) {
                    // The zeros past the last record are not kept in a finished segment.
                    file.set_len(active.bytes as u64)?;
                }
                if limits.flush_on_write {
                    file.sync_data()?;
                }
            }
            state.start_segment()?;
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
                writes: SegmentWrites::Appending,
                ..
            } => {
                let header = record_header(seq, now_millis, payload);
                if let Err(e) = append_record(file, &header, payload) {
                    // Leave no partial record behind for the next append to follow.
                    let _ = file.set_len(offset);
                    return Err(e.into());
                }
            }
            SegmentData::File {
                file,
                writes: SegmentWrites::Preallocated { zeroed_end },
                ..
            } => {
                // A failed write leaves at most a torn record past the last good one, which
                // the next append overwrites at the same offset.
                let header = record_header(seq, now_millis, payload);
                *zeroed_end = write_record_in_place(file, offset, *zeroed_end, &header, payload)?;
            }
            SegmentData::Memory { payloads } => payloads.push(Bytes::copy_from_slice(payload)),
        }
        active.records.push(RecordIndex {
            offset,
            payload_len: payload.len() as u32,
            ingest_time: now_millis,
        });
        active.bytes += record_len;
        state.total_bytes += record_len;
        state.next_seq += 1;
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
                let writes = if self.limits.flush_on_write {
                    SegmentWrites::Preallocated { zeroed_end: 0 }
                } else {
                    SegmentWrites::Appending
                };
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .append(writes == SegmentWrites::Appending)
                    .create(true)
                    .open(&path)?;
                // A leftover file of that name holds nothing this log still indexes.
                file.set_len(0)?;
                if self.limits.flush_on_write {
                    sync_dir(dir)?;
                }
                SegmentData::File {
                    file: Arc::new(file),
                    path,
                    writes,
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
        });
        Ok(())
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
        // A stream switched to appending mode keeps reading and writing the same files.
        drop(log);
        let log = StreamLog::open(dir.path(), limits()).unwrap();
        assert_eq!(log.append(b"appended", 4).unwrap(), appended as i64);
        assert_eq!(read_all(&log).len(), appended + 1);
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
