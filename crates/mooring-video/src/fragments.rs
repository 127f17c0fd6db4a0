//! The fragment store: append-only segment files per stream, the index in the metadata store,
//! and the live edge in memory.
//!
//! A fragment is stored as one record: the document's EBML header, its segment-level prefix
//! (Info, Tracks, …), the Cluster element as received and the level-1 elements (Tags, Cues)
//! that followed it. Records are appended
//! to the stream's current segment file, the file is fsynced, and only then is the index row
//! committed (SQLite with `synchronous = FULL`); the PERSISTED ack follows. After a crash, any
//! bytes past the last indexed record are unreferenced and never read; each process start
//! opens a fresh segment file, so no file is ever appended to after a crash.
//!
//! The newest fragments of every stream (the last 5 minutes, at most 200 MB) stay in memory,
//! so live readers never wait on disk and streams with retention 0 are still readable.
//! Retention is enforced by a background sweep; segments nobody references are deleted.
//! Readers get whole fragments by number ([`FragmentStore::read`]) or by time range through
//! the index, which is what the HLS/DASH/clip packagers of the next issue need.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::model::{FragmentMeta, VideoError, VideoResult};
use crate::store::{RecordLocation, VideoStore};

/// How long fragments stay in the in-memory buffer.
pub const LIVE_BUFFER_MS: i64 = 5 * 60 * 1000;
/// Maximum bytes held in memory per stream.
pub const LIVE_BUFFER_BYTES: usize = 200 * 1024 * 1024;
/// A segment file is closed once it exceeds this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const RECORD_MAGIC: &[u8; 4] = b"KVF1";
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

impl StoredFragment {
    fn encode(&self) -> Vec<u8> {
        let parts = [
            &self.ebml_header,
            &self.segment_prefix,
            &self.cluster,
            &self.tags,
        ];
        let mut out = Vec::with_capacity(20 + parts.iter().map(|p| p.len()).sum::<usize>());
        out.extend_from_slice(RECORD_MAGIC);
        for p in parts {
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        }
        for p in parts {
            out.extend_from_slice(p);
        }
        out
    }

    fn decode(meta: FragmentMeta, data: &[u8]) -> VideoResult<StoredFragment> {
        let corrupt = || VideoError::internal("fragment record is corrupt");
        if data.len() < 20 || &data[..4] != RECORD_MAGIC {
            return Err(corrupt());
        }
        let mut lens = [0usize; 4];
        for (i, len) in lens.iter_mut().enumerate() {
            let b = &data[4 + i * 4..8 + i * 4];
            *len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        }
        if 20 + lens.iter().sum::<usize>() != data.len() {
            return Err(corrupt());
        }
        let all = Bytes::copy_from_slice(&data[20..]);
        let mut at = 0;
        let mut take = |n: usize| {
            let b = all.slice(at..at + n);
            at += n;
            b
        };
        Ok(StoredFragment {
            meta,
            ebml_header: take(lens[0]),
            segment_prefix: take(lens[1]),
            cluster: take(lens[2]),
            tags: take(lens[3]),
        })
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
    store: Arc<dyn VideoStore>,
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
    /// Opens the store under `root`, deleting segment files and directories the index does
    /// not reference (left by crashes or deleted streams).
    pub fn open(root: PathBuf, store: Arc<dyn VideoStore>) -> VideoResult<FragmentStore> {
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
                Some(arn) => {
                    let referenced = store.referenced_segments(arn)?;
                    for file in std::fs::read_dir(entry.path()).map_err(io_error)? {
                        let file = file.map_err(io_error)?;
                        let fname = file.file_name().to_string_lossy().into_owned();
                        if !referenced.contains(&fname) {
                            let _ = std::fs::remove_file(file.path());
                        }
                    }
                }
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

    /// Appends a fragment to the stream's segment file, fsyncs, and indexes it (blocking).
    pub fn persist(&self, live: &LiveStream, fragment: &StoredFragment) -> VideoResult<()> {
        if live.is_deleted() {
            return Err(VideoError::not_found("stream was deleted"));
        }
        let record = fragment.encode();
        let location = {
            let mut writer = live.writer.lock().unwrap_or_else(|e| e.into_inner());
            if writer.as_ref().is_none_or(|w| w.len >= SEGMENT_BYTES) {
                std::fs::create_dir_all(&live.dir).map_err(io_error)?;
                let name = format!("{:020}.seg", fragment.meta.seq);
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(live.dir.join(&name))
                    .map_err(io_error)?;
                let len = file.metadata().map_err(io_error)?.len();
                sync_dir(&live.dir).map_err(io_error)?;
                sync_dir(&self.root).map_err(io_error)?;
                *writer = Some(SegmentWriter { name, file, len });
            }
            let w = writer.as_mut().expect("writer opened above");
            let offset = w.len;
            w.file.write_all(&record).map_err(io_error)?;
            w.file.sync_data().map_err(io_error)?;
            w.len += record.len() as u64;
            RecordLocation {
                segment: w.name.clone(),
                offset,
                length: record.len() as u64,
            }
        };
        self.store
            .insert_fragment(&live.arn, &fragment.meta, &location)?;
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
        StoredFragment::decode(meta, &data)
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

fn io_error(e: std::io::Error) -> VideoError {
    VideoError::internal(format!("fragment storage: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Stream;
    use crate::store::SqliteVideoStore;
    use mooring_core::Db;

    const ARN: &str = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam/1700000000000";

    fn setup(dir: &Path) -> (Arc<dyn VideoStore>, FragmentStore) {
        let db = Db::open(&dir.join("meta.db")).unwrap();
        let store: Arc<dyn VideoStore> = Arc::new(SqliteVideoStore::open(db).unwrap());
        if store.stream_by_arn(ARN).unwrap().is_none() {
            store
                .insert_stream(&Stream {
                    name: "cam".into(),
                    arn: ARN.into(),
                    device_name: None,
                    media_type: None,
                    kms_key_id: "k".into(),
                    retention_hours: 1,
                    version: "v1".into(),
                    status: "ACTIVE".into(),
                    creation_ms: 0,
                    storage_tier: "HOT".into(),
                    tags: Default::default(),
                })
                .unwrap();
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
