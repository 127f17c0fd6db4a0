//! The fragment store: append-only segment files per stream, the index in the metadata store,
//! and the live edge in memory.
//!
//! A fragment is stored as one self-describing record: its index entry, the document's EBML
//! header, its segment-level prefix (Info, Tracks, …), the Cluster element as received and
//! the level-1 elements (Tags, Cues) that followed it, under a CRC-32C of all of it. Records
//! are appended to the stream's current segment file (one vectored write, no copy of the
//! media), the file is fsynced, and the PERSISTED ack follows: that one fsync makes the
//! fragment durable. Its index row goes to the write-behind index ([`crate::index`]), which
//! commits rows in batches. After a crash, [`FragmentStore::open`] reads each segment past
//! its last indexed record and indexes every complete record whose checksum holds; a short
//! or failing last record is a torn tail (written but never acked) and stays unindexed.
//! Each process start opens a fresh segment file, so no file is ever appended to after a
//! crash. Reads verify the checksum too, so damaged media is reported, not served.
//!
//! The newest fragments of every stream (the last 5 minutes, at most 200 MB) stay in memory,
//! so live readers never wait on disk and streams with retention 0 are still readable.
//! Retention is enforced by a background sweep; segments nobody references are deleted.
//! Readers get whole fragments by number ([`FragmentStore::read`]) or by time range through
//! the index, which is what the HLS/DASH/clip packagers of the next issue need.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::index::WriteBehindIndex;
use crate::model::{FragmentMeta, VideoError, VideoResult};
use crate::store::{IndexRow, RecordLocation, VideoStore};

/// How long fragments stay in the in-memory buffer.
pub const LIVE_BUFFER_MS: i64 = 5 * 60 * 1000;
/// Maximum bytes held in memory per stream.
pub const LIVE_BUFFER_BYTES: usize = 200 * 1024 * 1024;
/// A segment file is closed once it exceeds this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Records written before the index entry and checksum were added (still readable).
const RECORD_MAGIC_V1: &[u8; 4] = b"KVF1";
const RECORD_MAGIC: &[u8; 4] = b"KVF2";
/// Magic, index entry length, the four part lengths, CRC-32C.
const RECORD_HEADER: usize = 28;
/// Bounds a record header must respect to be believed.
const MAX_ENTRY_BYTES: usize = 1 << 20;
const MAX_RECORD_BYTES: usize = 256 << 20;
const SEQ_BLOCK: i64 = 1000;

/// A fragment with everything needed to lay out its chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFragment {
    pub meta: FragmentMeta,
    pub ebml_header: Bytes,
    pub segment_prefix: Bytes,
    /// The Cluster element (known size).
    pub cluster: Bytes,
    /// The level-1 elements that followed the cluster (its Tags; Cues and the like).
    pub tags: Bytes,
}

/// Why a stored record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Shorter than its header says, or not a record at all.
    Truncated,
    /// Complete, but its bytes are not the ones written (checksum mismatch, bad entry).
    Damaged,
}

/// A record's header, parsed.
struct RecordHeader {
    entry_len: usize,
    lens: [usize; 4],
    crc: u32,
}

impl RecordHeader {
    fn parse(data: &[u8]) -> Result<RecordHeader, RecordError> {
        if data.len() < RECORD_HEADER || &data[..4] != RECORD_MAGIC {
            return Err(RecordError::Truncated);
        }
        let word = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        let header = RecordHeader {
            entry_len: word(4) as usize,
            lens: [
                word(8) as usize,
                word(12) as usize,
                word(16) as usize,
                word(20) as usize,
            ],
            crc: word(24),
        };
        if header.entry_len > MAX_ENTRY_BYTES || header.total() > MAX_RECORD_BYTES {
            return Err(RecordError::Truncated);
        }
        Ok(header)
    }

    fn total(&self) -> usize {
        RECORD_HEADER + self.entry_len + self.lens.iter().sum::<usize>()
    }
}

impl StoredFragment {
    fn parts(&self) -> [&Bytes; 4] {
        [
            &self.ebml_header,
            &self.segment_prefix,
            &self.cluster,
            &self.tags,
        ]
    }

    /// The record's header and index entry; the media parts follow it unchanged.
    fn record_head(&self) -> Vec<u8> {
        let entry = serde_json::to_vec(&self.meta).expect("fragment metadata serializes");
        let mut head = Vec::with_capacity(RECORD_HEADER + entry.len());
        head.extend_from_slice(RECORD_MAGIC);
        head.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        for p in self.parts() {
            head.extend_from_slice(&(p.len() as u32).to_be_bytes());
        }
        let mut covered: Vec<&[u8]> = vec![&head, &entry];
        covered.extend(self.parts().into_iter().map(|p| &p[..]));
        let crc = mooring_core::checksum::crc32c(&covered);
        head.extend_from_slice(&crc.to_be_bytes());
        head.extend_from_slice(&entry);
        head
    }

    /// A record read back whole; its index entry, unless `meta` is given.
    fn decode(meta: Option<FragmentMeta>, data: Bytes) -> Result<StoredFragment, RecordError> {
        if data.len() >= 4 && &data[..4] == RECORD_MAGIC_V1 {
            return Self::decode_v1(meta.ok_or(RecordError::Damaged)?, data);
        }
        let header = RecordHeader::parse(&data)?;
        if header.total() != data.len() {
            return Err(RecordError::Truncated);
        }
        let crc = mooring_core::checksum::crc32c(&[&data[..24], &data[RECORD_HEADER..]]);
        if crc != header.crc {
            return Err(RecordError::Damaged);
        }
        let entry = &data[RECORD_HEADER..RECORD_HEADER + header.entry_len];
        let meta = match meta {
            Some(m) => m,
            None => serde_json::from_slice(entry).map_err(|_| RecordError::Damaged)?,
        };
        Ok(Self::split(
            meta,
            &data,
            RECORD_HEADER + header.entry_len,
            header.lens,
        ))
    }

    fn decode_v1(meta: FragmentMeta, data: Bytes) -> Result<StoredFragment, RecordError> {
        if data.len() < 20 {
            return Err(RecordError::Truncated);
        }
        let mut lens = [0usize; 4];
        for (i, len) in lens.iter_mut().enumerate() {
            let b = &data[4 + i * 4..8 + i * 4];
            *len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        }
        if 20 + lens.iter().sum::<usize>() != data.len() {
            return Err(RecordError::Truncated);
        }
        Ok(Self::split(meta, &data, 20, lens))
    }

    fn split(meta: FragmentMeta, data: &Bytes, mut at: usize, lens: [usize; 4]) -> StoredFragment {
        let mut take = |n: usize| {
            let b = data.slice(at..at + n);
            at += n;
            b
        };
        StoredFragment {
            meta,
            ebml_header: take(lens[0]),
            segment_prefix: take(lens[1]),
            cluster: take(lens[2]),
            tags: take(lens[3]),
        }
    }

    fn memory_size(&self) -> usize {
        self.ebml_header.len() + self.segment_prefix.len() + self.cluster.len() + self.tags.len()
    }
}

struct SegmentWriter {
    name: String,
    file: File,
    len: u64,
}

#[derive(Default)]
struct LiveBuffer {
    fragments: VecDeque<Arc<StoredFragment>>,
    bytes: usize,
}

struct SeqBlock {
    next: i64,
    end: i64,
}

/// Per-stream live state.
pub struct LiveStream {
    arn: String,
    dir: PathBuf,
    buffer: Mutex<LiveBuffer>,
    writer: Mutex<Option<SegmentWriter>>,
    seqs: Mutex<SeqBlock>,
    /// Latest fragment sequence made visible; readers wait on it.
    latest: tokio::sync::watch::Sender<i64>,
    deleted: AtomicBool,
    readers: AtomicUsize,
}

/// Holds one of a stream's GetMedia connection slots; released on drop.
pub struct ReaderSlot(Arc<LiveStream>);

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LiveStream {
    /// Takes a reader slot unless `limit` readers are already connected.
    pub fn try_reader(self: &Arc<Self>, limit: usize) -> Option<ReaderSlot> {
        let taken = self
            .readers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            });
        taken.ok().map(|_| ReaderSlot(self.clone()))
    }

    /// The stream's ARN.
    pub fn arn(&self) -> &str {
        &self.arn
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    /// A receiver that changes whenever a fragment becomes visible.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.latest.subscribe()
    }
}

/// The fragment store of all streams.
pub struct FragmentStore {
    root: PathBuf,
    store: Arc<WriteBehindIndex>,
    streams: Mutex<HashMap<String, Arc<LiveStream>>>,
}

fn stream_dir_name(arn: &str) -> String {
    match crate::model::parse_stream_arn(arn) {
        Some((name, suffix)) => format!("{name}-{suffix}"),
        None => arn.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FragmentStore {
    /// Opens the store under `root`: indexes the complete records of each segment that the
    /// index lacks (durable fragments whose rows were not committed before a crash), cuts
    /// off torn tails, and deletes segment files and directories nothing references (left by
    /// crashes or deleted streams).
    pub fn open(root: PathBuf, store: Arc<WriteBehindIndex>) -> VideoResult<FragmentStore> {
        std::fs::create_dir_all(&root).map_err(io_error)?;
        let streams = store.all_streams()?;
        let known: HashMap<String, String> = streams
            .iter()
            .map(|s| (stream_dir_name(&s.arn), s.arn.clone()))
            .collect();
        for entry in std::fs::read_dir(&root).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match known.get(&name) {
                None => {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
                Some(arn) if entry.path().is_dir() => {
                    let ends = store.indexed_segment_ends(arn)?;
                    let mut recovered = Vec::new();
                    for file in std::fs::read_dir(entry.path()).map_err(io_error)? {
                        let file = file.map_err(io_error)?;
                        let segment = file.file_name().to_string_lossy().into_owned();
                        let indexed_end = ends.get(&segment).copied();
                        let found =
                            recover_segment(&file.path(), arn, &segment, indexed_end.unwrap_or(0))
                                .map_err(io_error)?;
                        if indexed_end.is_none() && found.is_empty() {
                            let _ = std::fs::remove_file(file.path());
                        }
                        recovered.extend(found);
                    }
                    if !recovered.is_empty() {
                        tracing::info!(
                            stream = %arn,
                            fragments = recovered.len(),
                            "indexed fragments recovered from segment files"
                        );
                        store.insert_fragments(&recovered)?;
                    }
                }
                Some(_) => {}
            }
        }
        Ok(FragmentStore {
            root,
            store,
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// The live state of a stream, created on first use.
    pub fn live(&self, arn: &str) -> Arc<LiveStream> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .entry(arn.to_string())
            .or_insert_with(|| {
                Arc::new(LiveStream {
                    arn: arn.to_string(),
                    dir: self.root.join(stream_dir_name(arn)),
                    buffer: Mutex::new(LiveBuffer::default()),
                    writer: Mutex::new(None),
                    seqs: Mutex::new(SeqBlock { next: 0, end: 0 }),
                    latest: tokio::sync::watch::channel(0).0,
                    deleted: AtomicBool::new(false),
                    readers: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// The next fragment sequence number when one is reserved already (never blocks);
    /// `None` when [`next_seq`](Self::next_seq) must reserve a new block.
    pub fn next_reserved_seq(&self, live: &LiveStream) -> Option<i64> {
        let mut seqs = live.seqs.lock().unwrap_or_else(|e| e.into_inner());
        (seqs.next < seqs.end).then(|| {
            seqs.next += 1;
            seqs.next - 1
        })
    }

    /// Reserves the next fragment sequence number (blocking: may touch the database).
    pub fn next_seq(&self, live: &LiveStream) -> VideoResult<i64> {
        let mut seqs = live.seqs.lock().unwrap_or_else(|e| e.into_inner());
        if seqs.next >= seqs.end {
            let start = self.store.reserve_seqs(&live.arn, SEQ_BLOCK)?;
            seqs.next = start;
            seqs.end = start + SEQ_BLOCK;
        }
        let seq = seqs.next;
        seqs.next += 1;
        Ok(seq)
    }

    /// Makes a received fragment visible to live readers. The buffer stays in sequence
    /// order: a fragment numbered before the newest one (finished by an older PutMedia
    /// connection after a newer one took the stream over) goes into its place.
    pub fn publish(&self, live: &LiveStream, fragment: Arc<StoredFragment>, now_ms: i64) {
        let seq = fragment.meta.seq;
        {
            let mut buffer = live.buffer.lock().unwrap_or_else(|e| e.into_inner());
            buffer.bytes += fragment.memory_size();
            let at = buffer
                .fragments
                .iter()
                .rposition(|f| f.meta.seq < seq)
                .map_or(0, |i| i + 1);
            buffer.fragments.insert(at, fragment);
            while let Some(front) = buffer.fragments.front() {
                let too_old = front.meta.server_ms < now_ms - LIVE_BUFFER_MS;
                if (too_old || buffer.bytes > LIVE_BUFFER_BYTES) && buffer.fragments.len() > 1 {
                    buffer.bytes -= front.memory_size();
                    buffer.fragments.pop_front();
                } else {
                    break;
                }
            }
        }
        live.latest
            .send_modify(|latest| *latest = (*latest).max(seq));
    }

    /// Appends a fragment's record to the stream's segment file and fsyncs it: from then on
    /// it is durable. Its index row is queued on the write-behind index (blocking).
    pub fn persist(&self, live: &LiveStream, fragment: &StoredFragment) -> VideoResult<()> {
        self.persist_all(live, std::slice::from_ref(fragment))
    }

    /// [`persist`](Self::persist) for several fragments of a stream, in order, with one
    /// write and one fsync for all of them (a group commit): all are durable, or none is
    /// acknowledged.
    pub fn persist_all<F: Borrow<StoredFragment>>(
        &self,
        live: &LiveStream,
        fragments: &[F],
    ) -> VideoResult<()> {
        if live.is_deleted() {
            return Err(VideoError::not_found("stream was deleted"));
        }
        let Some(first) = fragments.first() else {
            return Ok(());
        };
        let heads: Vec<Vec<u8>> = fragments.iter().map(|f| f.borrow().record_head()).collect();
        let mut slices = Vec::with_capacity(fragments.len() * 5);
        let mut lengths = Vec::with_capacity(fragments.len());
        for (fragment, head) in fragments.iter().zip(&heads) {
            let parts = fragment.borrow().parts();
            lengths.push((head.len() + parts.iter().map(|p| p.len()).sum::<usize>()) as u64);
            slices.push(IoSlice::new(head));
            slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        }
        let mut writer = live.writer.lock().unwrap_or_else(|e| e.into_inner());
        // A new segment file: its directory entry (and the stream directory's, when that is
        // new too) must be durable before anything in it is acknowledged.
        let mut directories_to_sync: Vec<&Path> = Vec::new();
        if writer.as_ref().is_none_or(|w| w.len >= SEGMENT_BYTES) {
            match std::fs::create_dir(&live.dir) {
                Ok(()) => directories_to_sync.push(&self.root),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(e)),
            }
            let name = format!("{:020}.seg", first.borrow().meta.seq);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(live.dir.join(&name))
                .map_err(io_error)?;
            let len = file.metadata().map_err(io_error)?.len();
            directories_to_sync.push(&live.dir);
            *writer = Some(SegmentWriter { name, file, len });
        }
        let w = writer.as_mut().expect("writer opened above");
        // The directory fsyncs run beside the data write and its fsync, so the file system
        // can commit them together rather than one after the other.
        let written = std::thread::scope(|scope| {
            let directories = (!directories_to_sync.is_empty())
                .then(|| scope.spawn(|| directories_to_sync.iter().try_for_each(|d| sync_dir(d))));
            let data =
                write_all_vectored(&mut w.file, &mut slices).and_then(|()| w.file.sync_data());
            let directories = match directories {
                Some(sync) => sync
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("directory fsync panicked"))),
                None => Ok(()),
            };
            data.and(directories)
        });
        if let Err(e) = written {
            // What reached the file is unknown: start a fresh segment for the next record
            // rather than append after a partial one.
            *writer = None;
            return Err(io_error(e));
        }
        for (fragment, length) in fragments.iter().zip(lengths) {
            self.store.queue(IndexRow {
                arn: live.arn.clone(),
                meta: fragment.borrow().meta.clone(),
                location: RecordLocation {
                    segment: w.name.clone(),
                    offset: w.len,
                    length,
                },
            });
            w.len += length;
        }
        Ok(())
    }

    /// A fragment by sequence, from memory or disk (blocking).
    pub fn read(&self, arn: &str, seq: i64) -> VideoResult<Option<Arc<StoredFragment>>> {
        let live = self.live(arn);
        if let Some(f) = self.find_in_memory(&live, |f| f.meta.seq == seq) {
            return Ok(Some(f));
        }
        match self.store.fragment(arn, seq)? {
            Some((meta, location)) => Ok(Some(Arc::new(self.load(&live, meta, &location)?))),
            None => Ok(None),
        }
    }

    /// The first fragment after `after`, from memory or disk (blocking).
    pub fn next_after(&self, arn: &str, after: i64) -> VideoResult<Option<Arc<StoredFragment>>> {
        let live = self.live(arn);
        let memory = self.find_in_memory(&live, |f| f.meta.seq > after);
        let oldest_in_memory = {
            let buffer = live.buffer.lock().unwrap_or_else(|e| e.into_inner());
            buffer.fragments.front().map(|f| f.meta.seq)
        };
        if oldest_in_memory.is_some_and(|oldest| oldest <= after + 1) {
            return Ok(memory);
        }
        if let Some((meta, location)) = self.store.fragment_after(arn, after)? {
            if memory.as_ref().is_none_or(|m| meta.seq < m.meta.seq) {
                return Ok(Some(Arc::new(self.load(&live, meta, &location)?)));
            }
        }
        Ok(memory)
    }

    /// The newest fragment available (memory first).
    pub fn latest(&self, arn: &str) -> VideoResult<Option<FragmentMeta>> {
        let live = self.live(arn);
        {
            let buffer = live.buffer.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = buffer.fragments.back() {
                return Ok(Some(f.meta.clone()));
            }
        }
        Ok(self.store.last_fragment(arn)?)
    }

    /// The fragments in memory, oldest first (for timestamp selectors at retention 0).
    pub fn memory_fragments(&self, arn: &str) -> Vec<FragmentMeta> {
        let live = self.live(arn);
        let buffer = live.buffer.lock().unwrap_or_else(|e| e.into_inner());
        buffer.fragments.iter().map(|f| f.meta.clone()).collect()
    }

    fn find_in_memory(
        &self,
        live: &LiveStream,
        pred: impl Fn(&StoredFragment) -> bool,
    ) -> Option<Arc<StoredFragment>> {
        let buffer = live.buffer.lock().unwrap_or_else(|e| e.into_inner());
        buffer.fragments.iter().find(|f| pred(f)).cloned()
    }

    fn load(
        &self,
        live: &LiveStream,
        meta: FragmentMeta,
        location: &RecordLocation,
    ) -> VideoResult<StoredFragment> {
        let mut file = File::open(live.dir.join(&location.segment)).map_err(io_error)?;
        file.seek(SeekFrom::Start(location.offset))
            .map_err(io_error)?;
        let mut data = vec![0u8; location.length as usize];
        file.read_exact(&mut data).map_err(io_error)?;
        StoredFragment::decode(Some(meta), Bytes::from(data)).map_err(|e| match e {
            RecordError::Damaged => VideoError::internal(DAMAGED_MEDIA),
            RecordError::Truncated => VideoError::internal("fragment record is corrupt"),
        })
    }

    /// Drops fragments older than the stream's retention (blocking).
    pub fn enforce_retention(
        &self,
        arn: &str,
        retention_hours: i64,
        now_ms: i64,
    ) -> VideoResult<()> {
        if retention_hours <= 0 {
            return Ok(());
        }
        let before = now_ms - retention_hours * 3_600_000;
        let unreferenced = self.store.expire_fragments(arn, before)?;
        let live = self.live(arn);
        let open = live
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|w| w.name.clone());
        for segment in unreferenced {
            if Some(&segment) != open.as_ref() {
                let _ = std::fs::remove_file(live.dir.join(segment));
            }
        }
        Ok(())
    }

    /// Forgets a deleted stream: live state, segment files (blocking).
    pub fn drop_stream(&self, arn: &str) {
        let live = {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            streams.remove(arn)
        };
        if let Some(live) = live {
            live.deleted.store(true, Ordering::SeqCst);
            *live.writer.lock().unwrap_or_else(|e| e.into_inner()) = None;
            live.latest.send_replace(i64::MAX);
        }
        let _ = std::fs::remove_dir_all(self.root.join(stream_dir_name(arn)));
    }
}

/// `write_all` over several buffers: one `writev` for the whole record in the usual case.
fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a segment from `from` (where its indexed records end) and returns the index rows of
/// the complete, intact records found there. A complete record whose checksum fails is
/// skipped; scanning stops at a record that is short or has no valid header. Either is a
/// torn tail when it is the last thing in the file (a record is only written after the one
/// before it was fsynced, so only the last can be torn): written, never acknowledged, and
/// left unindexed. The file is not changed (no process appends to it again).
fn recover_segment(
    path: &Path,
    arn: &str,
    segment: &str,
    from: u64,
) -> std::io::Result<Vec<IndexRow>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut rows = Vec::new();
    let mut at = from;
    if at >= len {
        return Ok(rows);
    }
    file.seek(SeekFrom::Start(at))?;
    let mut reader = std::io::BufReader::new(&mut file);
    loop {
        let mut head = [0u8; RECORD_HEADER];
        if len - at < RECORD_HEADER as u64 || reader.read_exact(&mut head).is_err() {
            break;
        }
        let Ok(header) = RecordHeader::parse(&head) else {
            break;
        };
        let total = header.total() as u64;
        if len - at < total {
            break;
        }
        let mut data = vec![0u8; header.total()];
        data[..RECORD_HEADER].copy_from_slice(&head);
        if reader.read_exact(&mut data[RECORD_HEADER..]).is_err() {
            break;
        }
        match StoredFragment::decode(None, Bytes::from(data)) {
            Ok(fragment) => rows.push(IndexRow {
                arn: arn.to_string(),
                meta: fragment.meta,
                location: RecordLocation {
                    segment: segment.to_string(),
                    offset: at,
                    length: total,
                },
            }),
            Err(_) => tracing::warn!(
                segment = %path.display(),
                offset = at,
                "skipping a video segment record that fails its checksum"
            ),
        }
        at += total;
    }
    if at < len {
        tracing::warn!(
            segment = %path.display(),
            offset = at,
            bytes = len - at,
            "a video segment ends in a torn record; it stays unindexed"
        );
    }
    Ok(rows)
}

/// The message of the error a read gives for a record whose bytes are not the ones written.
const DAMAGED_MEDIA: &str = "fragment media is damaged: its checksum does not match";

/// Whether a read failed because the fragment's stored bytes are damaged (rather than gone).
pub fn is_damaged_media(e: &VideoError) -> bool {
    e.message == DAMAGED_MEDIA
}

fn io_error(e: std::io::Error) -> VideoError {
    VideoError::internal(format!("fragment storage: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Stream;
    use crate::store::{SqliteVideoStore, TimeClock};
    use mooring_core::Db;

    const ARN: &str = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam/1700000000000";

    fn setup(dir: &Path) -> (Arc<WriteBehindIndex>, FragmentStore) {
        setup_committing_every(dir, crate::index::COMMIT_INTERVAL)
    }

    /// A store whose index commits queued rows every `interval` (or on flush); dropping it
    /// without a flush is a crash after the segment fsyncs.
    fn setup_committing_every(
        dir: &Path,
        interval: std::time::Duration,
    ) -> (Arc<WriteBehindIndex>, FragmentStore) {
        let db = Db::open(&dir.join("meta.db")).unwrap();
        let store = Arc::new(
            WriteBehindIndex::with_interval(
                Arc::new(SqliteVideoStore::open(db).unwrap()),
                interval,
            )
            .unwrap(),
        );
        if store.stream_by_arn(ARN).unwrap().is_none() {
            store.insert_stream(&Stream::for_tests("cam", ARN)).unwrap();
        }
        let fragments = FragmentStore::open(dir.join("video"), store.clone()).unwrap();
        (store, fragments)
    }

    fn fragment(seq: i64, server_ms: i64) -> StoredFragment {
        StoredFragment {
            meta: FragmentMeta {
                seq,
                timecode: seq * 1000,
                producer_ms: seq * 1000,
                server_ms,
                duration_ms: 1000,
                size: 10,
                tags: vec![("k".into(), "v".into())],
            },
            ebml_header: Bytes::from_static(b"header"),
            segment_prefix: Bytes::from_static(b"prefix"),
            cluster: Bytes::from(vec![seq as u8; 100]),
            tags: Bytes::from_static(b"tags"),
        }
    }

    #[test]
    fn persisted_fragments_read_back_after_reopen_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let now = 10 * 3_600_000;
        {
            let (_, fragments) = setup(dir.path());
            let live = fragments.live(ARN);
            let first = fragments.next_seq(&live).unwrap();
            let second = fragments.next_seq(&live).unwrap();
            assert!(second > first);
            fragments
                .persist(&live, &fragment(first, now - 2 * 3_600_000))
                .unwrap();
            let recent = fragment(second, now);
            fragments.persist(&live, &recent).unwrap();
            fragments.publish(&live, Arc::new(recent), now);
        }
        // A new process: nothing in memory, everything from the segment file and the index.
        let (store, fragments) = setup(dir.path());
        let live = fragments.live(ARN);
        assert!(fragments.next_seq(&live).unwrap() > 2);
        let a = fragments.read(ARN, 1).unwrap().unwrap();
        assert_eq!(*a, fragment(1, now - 2 * 3_600_000));
        let b = fragments.next_after(ARN, 1).unwrap().unwrap();
        assert_eq!(b.meta.seq, 2);
        assert!(fragments.next_after(ARN, 2).unwrap().is_none());
        // Retention of one hour drops the first fragment; its segment stays while the second
        // fragment in it is still referenced.
        fragments.enforce_retention(ARN, 1, now).unwrap();
        assert!(fragments.read(ARN, 1).unwrap().is_none());
        assert_eq!(fragments.read(ARN, 2).unwrap().unwrap().meta.seq, 2);
        assert_eq!(store.referenced_segments(ARN).unwrap().len(), 1);
    }

    #[test]
    fn persisted_fragments_survive_a_crash_before_their_index_rows_commit() {
        let dir = tempfile::tempdir().unwrap();
        let never = std::time::Duration::from_secs(3600);
        let stream_dir = dir.path().join("video").join("cam-1700000000000");
        let segment = stream_dir.join("00000000000000000001.seg");
        let (store, fragments) = setup_committing_every(dir.path(), never);
        let live = fragments.live(ARN);
        let seqs: Vec<i64> = (0..4).map(|_| fragments.next_seq(&live).unwrap()).collect();
        fragments.persist(&live, &fragment(seqs[0], 1000)).unwrap();
        store.flush().unwrap();
        let indexed_end = std::fs::metadata(&segment).unwrap().len();
        for &seq in &seqs[1..] {
            fragments.persist(&live, &fragment(seq, 1000)).unwrap();
        }
        // Queued rows answer queries before they are committed.
        assert_eq!(store.queued_len(), 3);
        assert_eq!(store.last_fragment(ARN).unwrap().unwrap().seq, seqs[3]);
        let listed = store
            .fragments_in_range(ARN, TimeClock::Server, 0, 5000, 0, 10)
            .unwrap();
        assert_eq!(listed.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs);
        drop((store, fragments));
        // The crash: the second record is damaged on disk, and a fifth record was half
        // written (never acked) when the process died.
        let mut bytes = std::fs::read(&segment).unwrap();
        let damaged = indexed_end as usize + 100;
        bytes[damaged] ^= 0xFF;
        let torn = fragment(seqs[3] + 1, 1000).record_head();
        bytes.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&segment, &bytes).unwrap();

        let (store, fragments) = setup_committing_every(dir.path(), never);
        assert_eq!(
            store.queued_len(),
            0,
            "recovered rows are committed at open"
        );
        for &seq in &[seqs[0], seqs[2], seqs[3]] {
            assert_eq!(
                *fragments.read(ARN, seq).unwrap().unwrap(),
                fragment(seq, 1000)
            );
        }
        assert!(fragments.read(ARN, seqs[1]).unwrap().is_none());
        assert!(fragments.read(ARN, seqs[3] + 1).unwrap().is_none());
        assert_eq!(store.last_fragment(ARN).unwrap().unwrap().seq, seqs[3]);
        let live = fragments.live(ARN);
        assert!(fragments.next_seq(&live).unwrap() > seqs[3] + 1);
        // Opening again finds nothing more to index and leaves the file as it is.
        drop((store, fragments));
        let (store, _fragments) = setup_committing_every(dir.path(), never);
        assert_eq!(std::fs::read(&segment).unwrap(), bytes);
        assert_eq!(
            store
                .fragments_in_range(ARN, TimeClock::Server, 0, 5000, 0, 10)
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn a_group_commit_writes_every_record_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let never = std::time::Duration::from_secs(3600);
        let (_, fragments) = setup_committing_every(dir.path(), never);
        let live = fragments.live(ARN);
        let batch: Vec<Arc<StoredFragment>> =
            (1..=3).map(|seq| Arc::new(fragment(seq, 1000))).collect();
        fragments.persist_all(&live, &batch).unwrap();
        fragments.persist(&live, &fragment(4, 1000)).unwrap();
        drop(fragments);
        let (_, fragments) = setup_committing_every(dir.path(), never);
        for seq in 1..=4 {
            assert_eq!(
                *fragments.read(ARN, seq).unwrap().unwrap(),
                fragment(seq, 1000)
            );
        }
    }

    #[test]
    fn a_damaged_record_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let (store, fragments) = setup(dir.path());
        let live = fragments.live(ARN);
        fragments.persist(&live, &fragment(1, 1000)).unwrap();
        store.flush().unwrap();
        let segment = dir
            .path()
            .join("video/cam-1700000000000/00000000000000000001.seg");
        let mut bytes = std::fs::read(&segment).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&segment, &bytes).unwrap();
        // Not in memory (never published): read from disk, where the checksum fails.
        assert!(is_damaged_media(&fragments.read(ARN, 1).unwrap_err()));
        // Gone rather than damaged: a different error.
        std::fs::write(&segment, b"").unwrap();
        assert!(!is_damaged_media(&fragments.read(ARN, 1).unwrap_err()));
    }

    #[test]
    fn unreferenced_segments_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (_, fragments) = setup(dir.path());
        let live = fragments.live(ARN);
        fragments.persist(&live, &fragment(1, 0)).unwrap();
        let stream_dir = dir.path().join("video").join("cam-1700000000000");
        std::fs::write(stream_dir.join("00000000000000000099.seg"), b"torn write").unwrap();
        std::fs::create_dir_all(dir.path().join("video").join("gone-1")).unwrap();
        drop(fragments);
        let (_, fragments) = setup(dir.path());
        let names: Vec<_> = std::fs::read_dir(&stream_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["00000000000000000001.seg".to_string()]);
        assert!(!dir.path().join("video").join("gone-1").exists());
        assert!(fragments.read(ARN, 1).unwrap().is_some());
    }

    #[test]
    fn live_buffer_keeps_recent_fragments_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (_, fragments) = setup(dir.path());
        let live = fragments.live(ARN);
        let now = LIVE_BUFFER_MS * 3;
        fragments.publish(&live, Arc::new(fragment(1, now - LIVE_BUFFER_MS - 1)), now);
        fragments.publish(&live, Arc::new(fragment(2, now)), now);
        // Not persisted (retention 0 path): readable from memory only, the stale one evicted.
        assert_eq!(
            fragments
                .memory_fragments(ARN)
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(fragments.next_after(ARN, 0).unwrap().unwrap().meta.seq, 2);
        assert_eq!(fragments.latest(ARN).unwrap().unwrap().seq, 2);
    }

    #[test]
    fn a_fragment_finished_late_takes_its_place_in_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let (_, fragments) = setup(dir.path());
        let live = fragments.live(ARN);
        let changes = live.subscribe();
        // Fragment 2 belongs to an older connection that finished it after the newer
        // connection's fragment 3 was published.
        for seq in [1, 3, 2] {
            fragments.publish(&live, Arc::new(fragment(seq, 1000)), 1000);
        }
        let order: Vec<i64> = fragments
            .memory_fragments(ARN)
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(order, vec![1, 2, 3]);
        assert_eq!(fragments.next_after(ARN, 1).unwrap().unwrap().meta.seq, 2);
        assert_eq!(fragments.latest(ARN).unwrap().unwrap().seq, 3);
        assert_eq!(*changes.borrow(), 3);
    }
}
