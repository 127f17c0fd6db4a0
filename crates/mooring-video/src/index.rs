//! The fragment index, written behind: a [`VideoStore`] in front of the SQLite store that
//! takes new index rows into memory and commits them in batches.
//!
//! A fragment is durable once its segment record is fsynced: the record carries the
//! fragment's index entry and a checksum, so [`crate::fragments::FragmentStore::open`]
//! re-indexes every complete record the index lacks after a crash. Index rows therefore stay
//! off the PERSISTED path: [`WriteBehindIndex::queue`] only adds the row to memory, where
//! every query sees it at once, and a background thread commits whatever has accumulated at
//! most every [`COMMIT_INTERVAL`] in one transaction (one database fsync for all the streams'
//! fragments of that interval instead of one per fragment). Queries read the queued rows
//! before the database, so a row committed and dropped from memory in between is still
//! found. A failed commit keeps the rows queued and is retried; shutdown commits what is left
//! ([`WriteBehindIndex::flush`]).
//!
//! Fragment-number reservations (a block of numbers per stream, durable before any is used)
//! are group-committed too: callers that arrive while one reservation commits are served
//! together by the next, so many streams starting at once wait for a few database fsyncs,
//! not one each in turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mooring_core::store::{StoreError, StoreResult};

use crate::model::{FragmentMeta, Stream};
use crate::store::{IndexRow, RecordLocation, TimeClock, VideoStore};

/// How often queued rows are committed.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// The wait before retrying a failed commit.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Queue {
    /// Rows not committed yet, each with its ticket, oldest first.
    rows: VecDeque<(u64, IndexRow)>,
    next_ticket: u64,
    closed: bool,
}

/// Fragment-number reservations waiting for their commit, and the outcomes of committed ones.
#[derive(Default)]
struct Reservations {
    waiting: Vec<(u64, String, i64)>,
    done: HashMap<u64, Result<i64, String>>,
    next_id: u64,
    /// A caller is committing a batch.
    committing: bool,
}

struct Shared {
    inner: Arc<dyn VideoStore>,
    reservations: Mutex<Reservations>,
    reserved: Condvar,
    queue: Mutex<Queue>,
    queued: Condvar,
    /// Held while a batch is committed, and by the deletions that must not interleave with
    /// one (a batch taken before a stream's rows were deleted would bring them back).
    commit: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn queued_rows(&self, arn: &str) -> Vec<IndexRow> {
        lock(&self.queue)
            .rows
            .iter()
            .filter(|(_, r)| r.arn == arn)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Commits every queued row in one transaction.
    fn commit_queued(&self) -> StoreResult<()> {
        let _commit = lock(&self.commit);
        let (batch, last) = {
            let queue = lock(&self.queue);
            let Some((last, _)) = queue.rows.back() else {
                return Ok(());
            };
            let batch: Vec<IndexRow> = queue.rows.iter().map(|(_, r)| r.clone()).collect();
            (batch, *last)
        };
        self.inner.insert_fragments(&batch)?;
        let mut queue = lock(&self.queue);
        while queue.rows.front().is_some_and(|(t, _)| *t <= last) {
            queue.rows.pop_front();
        }
        Ok(())
    }

    fn run(&self, interval: Duration) {
        let mut last_commit = Instant::now();
        loop {
            {
                let mut queue = lock(&self.queue);
                while queue.rows.is_empty() && !queue.closed {
                    queue = self.queued.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                // Let rows accumulate for the rest of the interval.
                while !queue.closed {
                    let waited = last_commit.elapsed();
                    if waited >= interval {
                        break;
                    }
                    queue = self
                        .queued
                        .wait_timeout(queue, interval - waited)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if queue.closed {
                    return;
                }
            }
            last_commit = Instant::now();
            if let Err(e) = self.commit_queued() {
                tracing::warn!(error = %e, "committing video fragment index rows failed; retrying");
                let queue = lock(&self.queue);
                let _ = self
                    .queued
                    .wait_timeout_while(queue, RETRY_AFTER, |q| !q.closed);
            }
        }
    }
}

/// The write-behind index (see the module documentation).
pub struct WriteBehindIndex {
    shared: Arc<Shared>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl WriteBehindIndex {
    /// Puts the write-behind queue in front of `inner` and starts its committer thread.
    pub fn new(inner: Arc<dyn VideoStore>) -> std::io::Result<WriteBehindIndex> {
        Self::with_interval(inner, COMMIT_INTERVAL)
    }

    /// [`new`](Self::new) committing every `interval` (tests use a long one to hold rows).
    pub fn with_interval(
        inner: Arc<dyn VideoStore>,
        interval: Duration,
    ) -> std::io::Result<WriteBehindIndex> {
        let shared = Arc::new(Shared {
            inner,
            reservations: Mutex::new(Reservations::default()),
            reserved: Condvar::new(),
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            commit: Mutex::new(()),
        });
        let runner = shared.clone();
        let committer = std::thread::Builder::new()
            .name("video-index".into())
            .spawn(move || runner.run(interval))?;
        Ok(WriteBehindIndex {
            shared,
            committer: Some(committer),
        })
    }

    /// Adds a row for a fragment whose record is durable; visible to queries at once,
    /// committed with the next batch.
    pub fn queue(&self, row: IndexRow) {
        let mut queue = lock(&self.shared.queue);
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.rows.push_back((ticket, row));
        self.shared.queued.notify_all();
    }

    /// Commits every queued row now (blocking).
    pub fn flush(&self) -> StoreResult<()> {
        self.shared.commit_queued()
    }

    /// Rows queued and not committed yet.
    pub fn queued_len(&self) -> usize {
        lock(&self.shared.queue).rows.len()
    }

    fn queued_rows(&self, arn: &str) -> Vec<IndexRow> {
        self.shared.queued_rows(arn)
    }

    fn inner(&self) -> &dyn VideoStore {
        self.shared.inner.as_ref()
    }
}

impl Drop for WriteBehindIndex {
    /// Stops the committer without committing: whatever is queued is recovered from the
    /// segment files by the next open (callers that stop cleanly [`flush`](Self::flush)).
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.queued.notify_all();
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

fn time_on(clock: TimeClock, m: &FragmentMeta) -> i64 {
    match clock {
        TimeClock::Server => m.server_ms,
        TimeClock::Producer => m.producer_ms,
    }
}

fn contains(clock: TimeClock, m: &FragmentMeta, at: i64) -> bool {
    time_on(clock, m) <= at && at < time_on(clock, m) + m.duration_ms
}

impl VideoStore for WriteBehindIndex {
    fn insert_stream(&self, stream: &Stream) -> StoreResult<bool> {
        self.inner().insert_stream(stream)
    }

    fn stream_by_name(&self, name: &str) -> StoreResult<Option<Stream>> {
        self.inner().stream_by_name(name)
    }

    fn stream_by_arn(&self, arn: &str) -> StoreResult<Option<Stream>> {
        self.inner().stream_by_arn(arn)
    }

    fn list_streams(&self, prefix: &str, after: &str, limit: usize) -> StoreResult<Vec<Stream>> {
        self.inner().list_streams(prefix, after, limit)
    }

    fn all_streams(&self) -> StoreResult<Vec<Stream>> {
        self.inner().all_streams()
    }

    fn update_stream(&self, stream: &Stream, expected_version: &str) -> StoreResult<bool> {
        self.inner().update_stream(stream, expected_version)
    }

    fn delete_stream(&self, arn: &str) -> StoreResult<Vec<String>> {
        let _commit = lock(&self.shared.commit);
        let mut segments: Vec<String> = {
            let mut queue = lock(&self.shared.queue);
            let mut gone = Vec::new();
            queue.rows.retain(|(_, r)| {
                let keep = r.arn != arn;
                if !keep {
                    gone.push(r.location.segment.clone());
                }
                keep
            });
            gone
        };
        segments.extend(self.inner().delete_stream(arn)?);
        segments.sort();
        segments.dedup();
        Ok(segments)
    }

    /// Joins the next reservation batch; the first caller to find no batch committing
    /// commits everything waiting, itself included.
    fn reserve_seqs(&self, arn: &str, count: i64) -> StoreResult<i64> {
        let shared = &self.shared;
        let mut r = lock(&shared.reservations);
        let id = r.next_id;
        r.next_id += 1;
        r.waiting.push((id, arn.to_string(), count));
        loop {
            if let Some(outcome) = r.done.remove(&id) {
                return outcome.map_err(StoreError::Task);
            }
            if r.committing {
                r = shared.reserved.wait(r).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            r.committing = true;
            let batch = std::mem::take(&mut r.waiting);
            drop(r);
            let requests: Vec<(String, i64)> =
                batch.iter().map(|(_, a, c)| (a.clone(), *c)).collect();
            let outcome = self.inner().reserve_seqs_many(&requests);
            r = lock(&shared.reservations);
            r.committing = false;
            match outcome {
                Ok(firsts) => {
                    for ((id, _, _), first) in batch.iter().zip(firsts) {
                        r.done.insert(*id, Ok(first));
                    }
                }
                Err(e) => {
                    for (id, _, _) in &batch {
                        r.done.insert(*id, Err(e.to_string()));
                    }
                }
            }
            shared.reserved.notify_all();
        }
    }

    fn reserve_seqs_many(&self, requests: &[(String, i64)]) -> StoreResult<Vec<i64>> {
        self.inner().reserve_seqs_many(requests)
    }

    /// Commits at once, past the queue (for recovery at open).
    fn insert_fragments(&self, rows: &[IndexRow]) -> StoreResult<()> {
        self.inner().insert_fragments(rows)
    }

    fn fragment(&self, arn: &str, seq: i64) -> StoreResult<Option<(FragmentMeta, RecordLocation)>> {
        let queued = self.queued_rows(arn);
        if let Some(r) = queued.into_iter().find(|r| r.meta.seq == seq) {
            return Ok(Some((r.meta, r.location)));
        }
        self.inner().fragment(arn, seq)
    }

    fn fragment_after(
        &self,
        arn: &str,
        after: i64,
    ) -> StoreResult<Option<(FragmentMeta, RecordLocation)>> {
        let queued = self
            .queued_rows(arn)
            .into_iter()
            .filter(|r| r.meta.seq > after)
            .min_by_key(|r| r.meta.seq);
        let stored = self.inner().fragment_after(arn, after)?;
        Ok(match (queued, stored) {
            (Some(q), Some(s)) if s.0.seq < q.meta.seq => Some(s),
            (Some(q), _) => Some((q.meta, q.location)),
            (None, s) => s,
        })
    }

    fn last_fragment(&self, arn: &str) -> StoreResult<Option<FragmentMeta>> {
        let queued = self
            .queued_rows(arn)
            .into_iter()
            .map(|r| r.meta)
            .max_by_key(|m| m.seq);
        let stored = self.inner().last_fragment(arn)?;
        Ok(match (queued, stored) {
            (Some(q), Some(s)) if s.seq > q.seq => Some(s),
            (Some(q), _) => Some(q),
            (None, s) => s,
        })
    }

    fn fragment_at(&self, arn: &str, clock: TimeClock, at: i64) -> StoreResult<Option<i64>> {
        let queued = self.queued_rows(arn);
        let queued_containing = queued
            .iter()
            .filter(|r| contains(clock, &r.meta, at))
            .map(|r| r.meta.seq)
            .min();
        let queued_after = queued
            .iter()
            .filter(|r| time_on(clock, &r.meta) >= at)
            .map(|r| r.meta.seq)
            .min();
        let Some(stored) = self.inner().fragment_at(arn, clock, at)? else {
            return Ok(queued_containing.or(queued_after));
        };
        let stored_contains = match self.inner().fragment(arn, stored)? {
            Some((m, _)) => contains(clock, &m, at),
            None => false,
        };
        Ok(Some(match (stored_contains, queued_containing) {
            (true, Some(q)) => stored.min(q),
            (true, None) => stored,
            (false, Some(q)) => q,
            (false, None) => queued_after.map_or(stored, |q| stored.min(q)),
        }))
    }

    fn fragments_in_range(
        &self,
        arn: &str,
        clock: TimeClock,
        start: i64,
        end: i64,
        after_seq: i64,
        limit: usize,
    ) -> StoreResult<Vec<FragmentMeta>> {
        let queued: Vec<FragmentMeta> = self
            .queued_rows(arn)
            .into_iter()
            .map(|r| r.meta)
            .filter(|m| {
                let t = time_on(clock, m);
                t >= start && t <= end && m.seq > after_seq
            })
            .collect();
        let mut all = self
            .inner()
            .fragments_in_range(arn, clock, start, end, after_seq, limit)?;
        if queued.is_empty() {
            return Ok(all);
        }
        all.extend(queued);
        all.sort_by_key(|m| m.seq);
        all.dedup_by_key(|m| m.seq);
        all.truncate(limit);
        Ok(all)
    }

    fn expire_fragments(&self, arn: &str, before_ms: i64) -> StoreResult<Vec<String>> {
        let _commit = lock(&self.shared.commit);
        let still_queued: Vec<String> = {
            let mut queue = lock(&self.shared.queue);
            queue
                .rows
                .retain(|(_, r)| r.arn != arn || r.meta.server_ms >= before_ms);
            queue
                .rows
                .iter()
                .filter(|(_, r)| r.arn == arn)
                .map(|(_, r)| r.location.segment.clone())
                .collect()
        };
        let mut unreferenced = self.inner().expire_fragments(arn, before_ms)?;
        unreferenced.retain(|s| !still_queued.contains(s));
        Ok(unreferenced)
    }

    fn referenced_segments(&self, arn: &str) -> StoreResult<Vec<String>> {
        let mut segments: Vec<String> = self
            .queued_rows(arn)
            .into_iter()
            .map(|r| r.location.segment)
            .collect();
        segments.extend(self.inner().referenced_segments(arn)?);
        segments.sort();
        segments.dedup();
        Ok(segments)
    }

    fn indexed_segment_ends(&self, arn: &str) -> StoreResult<HashMap<String, u64>> {
        let mut ends = self.inner().indexed_segment_ends(arn)?;
        for r in self.queued_rows(arn) {
            let end = r.location.offset + r.location.length;
            let e = ends.entry(r.location.segment).or_insert(0);
            *e = (*e).max(end);
        }
        Ok(ends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteVideoStore;
    use mooring_core::Db;

    const ARN: &str = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam/1700000000000";

    fn index(interval: Duration) -> WriteBehindIndex {
        let inner = SqliteVideoStore::open(Db::open_in_memory().unwrap()).unwrap();
        inner.insert_stream(&Stream::for_tests("cam", ARN)).unwrap();
        WriteBehindIndex::with_interval(Arc::new(inner), interval).unwrap()
    }

    /// Fragment `seq` spans `[seq * 1000, seq * 1000 + 1000)` on both clocks.
    fn row(seq: i64) -> IndexRow {
        IndexRow {
            arn: ARN.into(),
            meta: FragmentMeta {
                seq,
                timecode: seq * 1000,
                producer_ms: seq * 1000,
                server_ms: seq * 1000,
                duration_ms: 1000,
                size: 10,
                tags: vec![],
            },
            location: RecordLocation {
                segment: "s".into(),
                offset: seq as u64 * 100,
                length: 100,
            },
        }
    }

    fn seqs(metas: &[FragmentMeta]) -> Vec<i64> {
        metas.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn queued_and_committed_rows_answer_queries_together() {
        let index = index(Duration::from_secs(3600));
        for seq in [1, 2, 3] {
            index.queue(row(seq));
        }
        index.flush().unwrap();
        for seq in [4, 5] {
            index.queue(row(seq));
        }
        assert_eq!(index.queued_len(), 2);
        let all = index
            .fragments_in_range(ARN, TimeClock::Producer, 0, 10_000, 0, 100)
            .unwrap();
        assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
        let page = index
            .fragments_in_range(ARN, TimeClock::Server, 2000, 10_000, 2, 2)
            .unwrap();
        assert_eq!(seqs(&page), vec![3, 4]);
        assert_eq!(index.fragment(ARN, 4).unwrap().unwrap().0.seq, 4);
        assert_eq!(index.fragment(ARN, 2).unwrap().unwrap().1.offset, 200);
        assert_eq!(index.fragment_after(ARN, 2).unwrap().unwrap().0.seq, 3);
        assert_eq!(index.fragment_after(ARN, 3).unwrap().unwrap().0.seq, 4);
        assert!(index.fragment_after(ARN, 5).unwrap().is_none());
        assert_eq!(index.last_fragment(ARN).unwrap().unwrap().seq, 5);
        // Containing fragment first, from either side; else the first starting after.
        assert_eq!(
            index.fragment_at(ARN, TimeClock::Server, 2500).unwrap(),
            Some(2)
        );
        assert_eq!(
            index.fragment_at(ARN, TimeClock::Server, 4500).unwrap(),
            Some(4)
        );
        assert_eq!(
            index.fragment_at(ARN, TimeClock::Server, 0).unwrap(),
            Some(1)
        );
        assert_eq!(
            index.fragment_at(ARN, TimeClock::Server, 9000).unwrap(),
            None
        );
        assert_eq!(
            index.indexed_segment_ends(ARN).unwrap().get("s"),
            Some(&600)
        );
        index.flush().unwrap();
        assert_eq!(index.queued_len(), 0);
        let all = index
            .fragments_in_range(ARN, TimeClock::Producer, 0, 10_000, 0, 100)
            .unwrap();
        assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_committer_commits_queued_rows_on_its_own() {
        let index = index(Duration::from_millis(10));
        index.queue(row(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        while index.queued_len() > 0 {
            assert!(Instant::now() < deadline, "the row was never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(index.inner().last_fragment(ARN).unwrap().unwrap().seq, 1);
    }

    #[test]
    fn concurrent_reservations_get_disjoint_blocks() {
        let index = Arc::new(index(Duration::from_secs(3600)));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let index = index.clone();
                std::thread::spawn(move || {
                    (0..5)
                        .map(|_| index.reserve_seqs(ARN, 10).unwrap())
                        .collect::<Vec<i64>>()
                })
            })
            .collect();
        let mut firsts: Vec<i64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        firsts.sort();
        assert_eq!(firsts, (0..80).map(|i| 1 + i * 10).collect::<Vec<_>>());
    }

    #[test]
    fn deleting_a_stream_drops_its_queued_rows() {
        let index = index(Duration::from_secs(3600));
        index.queue(row(1));
        index.flush().unwrap();
        index.queue(row(2));
        assert_eq!(index.delete_stream(ARN).unwrap(), vec!["s".to_string()]);
        assert_eq!(index.queued_len(), 0);
        // A row queued after the deletion (a persist that raced it) is not committed.
        index.queue(row(3));
        index.flush().unwrap();
        assert!(index.inner().last_fragment(ARN).unwrap().is_none());
    }

    #[test]
    fn expiry_drops_old_queued_rows_and_keeps_their_segments_while_queued() {
        let index = index(Duration::from_secs(3600));
        index.queue(row(1));
        index.flush().unwrap();
        index.queue(row(2));
        index.queue(row(5));
        // Rows 1 (committed) and 2 (queued) expire; 5 still references segment "s".
        assert!(index.expire_fragments(ARN, 3000).unwrap().is_empty());
        assert_eq!(index.queued_len(), 1);
        let left = index
            .fragments_in_range(ARN, TimeClock::Server, 0, 10_000, 0, 100)
            .unwrap();
        assert_eq!(seqs(&left), vec![5]);
    }
}
