//! Persistence of the event bus behind the [`EventsStore`] trait, implemented on core's
//! SQLite [`Db`].
//!
//! Resources (buses with their rules and targets, archives, replays, connections, API
//! destinations) are kept as JSON documents keyed by kind and name: they change rarely and are
//! loaded whole at start. The hot path is [`EventsStore::commit_ingest`]: the pending
//! deliveries and archive records produced by one PutEvents call are written in a single
//! transaction before the call is answered, so an acknowledged event is never lost. Pending
//! deliveries are deleted when delivered and rewritten when retried.

use mooring_core::store::{StoreError, StoreResult};
use mooring_core::Db;
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

const MIGRATIONS: &[&str] = &["CREATE TABLE events_resources (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TABLE events_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        body TEXT NOT NULL
    );
    CREATE TABLE events_archive (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        archive TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        event TEXT NOT NULL
    );
    CREATE INDEX events_archive_by_time ON events_archive (archive, time_ms);
    CREATE TABLE events_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        bus TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        event TEXT NOT NULL
    );"];

/// One archived event to write.
#[derive(Debug, Clone)]
pub struct ArchiveRecord {
    pub archive: String,
    pub time_ms: i64,
    pub received_ms: i64,
    pub event: String,
}

/// Everything one ingestion writes at once.
#[derive(Debug, Default)]
pub struct IngestBatch {
    /// Pending deliveries (JSON documents); their ids are returned in order.
    pub deliveries: Vec<Value>,
    pub archive: Vec<ArchiveRecord>,
    /// (bus, received_ms, event) for the recent-events log behind `mooring events tail`.
    pub log: Vec<(String, i64, String)>,
    /// A delivery finished by this batch (a dead-lettered delivery is replaced by its DLQ send).
    pub remove_delivery: Option<i64>,
}

impl IngestBatch {
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
            && self.archive.is_empty()
            && self.log.is_empty()
            && self.remove_delivery.is_none()
    }
}

/// Storage for the event bus.
pub trait EventsStore: Send + Sync {
    fn load_resources(&self, kind: &str) -> StoreResult<Vec<Value>>;
    fn put_resource(&self, kind: &str, name: &str, body: &Value) -> StoreResult<()>;
    fn delete_resource(&self, kind: &str, name: &str) -> StoreResult<()>;
    /// Writes several batches in one transaction (group commit: one fsync for all of them);
    /// returns, per batch, the ids given to its new deliveries.
    fn commit_ingest_many(&self, batches: &[&IngestBatch]) -> StoreResult<Vec<Vec<i64>>>;
    /// Writes one batch atomically; returns the ids given to the new deliveries.
    fn commit_ingest(&self, batch: &IngestBatch) -> StoreResult<Vec<i64>> {
        Ok(self.commit_ingest_many(&[batch])?.pop().unwrap_or_default())
    }
    fn load_deliveries(&self) -> StoreResult<Vec<(i64, Value)>>;
    fn update_delivery(&self, id: i64, body: &Value) -> StoreResult<()>;
    fn delete_delivery(&self, id: i64) -> StoreResult<()>;
    /// Archived events with `start_ms <= time < end_ms`, oldest first, after `after_seq`.
    fn archived_events(
        &self,
        archive: &str,
        start_ms: i64,
        end_ms: i64,
        after_seq: i64,
        limit: usize,
    ) -> StoreResult<Vec<(i64, i64, String)>>;
    /// (event count, total bytes) of an archive.
    fn archive_stats(&self, archive: &str) -> StoreResult<(i64, i64)>;
    /// Removes an archive's events received before `before_ms` (all when `None`).
    fn purge_archive(&self, archive: &str, before_ms: Option<i64>) -> StoreResult<usize>;
    /// Events logged after `after_seq` for `bus`.
    fn log_after(&self, bus: &str, after_seq: i64, limit: usize)
        -> StoreResult<Vec<(i64, String)>>;
    /// Keeps only the newest `keep` logged events.
    fn trim_log(&self, keep: i64) -> StoreResult<()>;
}

/// [`EventsStore`] on the shared metadata database.
pub struct SqliteEventsStore {
    db: Db,
}

impl SqliteEventsStore {
    pub fn open(db: Db) -> StoreResult<Self> {
        db.migrate("events", MIGRATIONS)?;
        Ok(SqliteEventsStore { db })
    }
}

impl EventsStore for SqliteEventsStore {
    fn load_resources(&self, kind: &str) -> StoreResult<Vec<Value>> {
        let kind = kind.to_string();
        self.db.read_blocking(move |conn| {
            let mut stmt =
                conn.prepare("SELECT body FROM events_resources WHERE kind = ?1 ORDER BY name")?;
            let rows = stmt.query_map([kind], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?)?);
            }
            Ok(out)
        })
    }

    fn put_resource(&self, kind: &str, name: &str, body: &Value) -> StoreResult<()> {
        let text = serde_json::to_string(body)?;
        self.db.write_blocking(|tx| {
            tx.execute(
                "INSERT INTO events_resources (kind, name, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body",
                params![kind, name, text],
            )?;
            Ok(())
        })
    }

    fn delete_resource(&self, kind: &str, name: &str) -> StoreResult<()> {
        self.db.write_blocking(|tx| {
            tx.execute(
                "DELETE FROM events_resources WHERE kind = ?1 AND name = ?2",
                params![kind, name],
            )?;
            Ok(())
        })
    }

    fn commit_ingest_many(&self, batches: &[&IngestBatch]) -> StoreResult<Vec<Vec<i64>>> {
        if batches.iter().all(|b| b.is_empty()) {
            return Ok(batches.iter().map(|_| Vec::new()).collect());
        }
        self.db.write_blocking(|tx| {
            let mut all = Vec::with_capacity(batches.len());
            let mut insert = tx.prepare_cached("INSERT INTO events_deliveries (body) VALUES (?1)")?;
            let mut archive = tx.prepare_cached(
                "INSERT INTO events_archive (archive, time_ms, received_ms, event) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut log = tx.prepare_cached(
                "INSERT INTO events_log (bus, received_ms, event) VALUES (?1, ?2, ?3)",
            )?;
            let mut remove = tx.prepare_cached("DELETE FROM events_deliveries WHERE id = ?1")?;
            for batch in batches {
                let mut ids = Vec::with_capacity(batch.deliveries.len());
                for d in &batch.deliveries {
                    insert.execute([serde_json::to_string(d)?])?;
                    ids.push(tx.last_insert_rowid());
                }
                for a in &batch.archive {
                    archive.execute(params![a.archive, a.time_ms, a.received_ms, a.event])?;
                }
                for (bus, at, event) in &batch.log {
                    log.execute(params![bus, at, event])?;
                }
                if let Some(id) = batch.remove_delivery {
                    remove.execute([id])?;
                }
                all.push(ids);
            }
            Ok(all)
        })
    }

    fn load_deliveries(&self) -> StoreResult<Vec<(i64, Value)>> {
        self.db.read_blocking(|conn| {
            let mut stmt = conn.prepare("SELECT id, body FROM events_deliveries ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, body) = row?;
                out.push((id, serde_json::from_str(&body)?));
            }
            Ok(out)
        })
    }

    fn update_delivery(&self, id: i64, body: &Value) -> StoreResult<()> {
        let text = serde_json::to_string(body)?;
        self.db.write_blocking(|tx| {
            tx.execute(
                "UPDATE events_deliveries SET body = ?2 WHERE id = ?1",
                params![id, text],
            )?;
            Ok(())
        })
    }

    fn delete_delivery(&self, id: i64) -> StoreResult<()> {
        self.db.write_blocking(|tx| {
            tx.execute("DELETE FROM events_deliveries WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    fn archived_events(
        &self,
        archive: &str,
        start_ms: i64,
        end_ms: i64,
        after_seq: i64,
        limit: usize,
    ) -> StoreResult<Vec<(i64, i64, String)>> {
        let archive = archive.to_string();
        self.db.read_blocking(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, time_ms, event FROM events_archive
                 WHERE archive = ?1 AND time_ms >= ?2 AND time_ms < ?3 AND seq > ?4
                 ORDER BY seq LIMIT ?5",
            )?;
            let rows = stmt.query_map(
                params![archive, start_ms, end_ms, after_seq, limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn archive_stats(&self, archive: &str) -> StoreResult<(i64, i64)> {
        let archive = archive.to_string();
        self.db.read_blocking(move |conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(event AS BLOB))), 0) FROM events_archive WHERE archive = ?1",
                [archive],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
    }

    fn purge_archive(&self, archive: &str, before_ms: Option<i64>) -> StoreResult<usize> {
        self.db.write_blocking(|tx| {
            Ok(tx.execute(
                "DELETE FROM events_archive WHERE archive = ?1 AND received_ms < ?2",
                params![archive, before_ms.unwrap_or(i64::MAX)],
            )?)
        })
    }

    fn log_after(
        &self,
        bus: &str,
        after_seq: i64,
        limit: usize,
    ) -> StoreResult<Vec<(i64, String)>> {
        let bus = bus.to_string();
        self.db.read_blocking(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, event FROM events_log WHERE bus = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![bus, after_seq, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn trim_log(&self, keep: i64) -> StoreResult<()> {
        self.db.write_blocking(|tx| {
            let max: Option<i64> = tx
                .query_row("SELECT MAX(seq) FROM events_log", [], |r| r.get(0))
                .optional()?
                .flatten();
            if let Some(max) = max {
                tx.execute("DELETE FROM events_log WHERE seq <= ?1", [max - keep])?;
            }
            Ok(())
        })
    }
}

/// Converts a store failure for callers that report it as an internal error.
pub fn describe(e: &StoreError) -> String {
    format!("storage failure: {e}")
}

type CommitReply = std::sync::mpsc::Sender<Result<(Vec<i64>, IngestBatch), String>>;

struct CommitShared {
    store: std::sync::Arc<dyn EventsStore>,
    pending: std::sync::Mutex<Vec<(IngestBatch, CommitReply)>>,
    ready: std::sync::Condvar,
    closed: std::sync::atomic::AtomicBool,
}

/// Group commit: concurrent ingestions hand their batches to one committer thread, which
/// writes everything waiting in a single transaction (one fsync) and then answers each caller.
/// Under load many PutEvents calls share one disk flush; alone, a call waits for its own.
pub struct GroupCommitter {
    shared: std::sync::Arc<CommitShared>,
}

impl GroupCommitter {
    pub fn new(store: std::sync::Arc<dyn EventsStore>) -> Self {
        let shared = std::sync::Arc::new(CommitShared {
            store,
            pending: std::sync::Mutex::new(Vec::new()),
            ready: std::sync::Condvar::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("events-commit".into())
            .spawn(move || run_committer(&worker))
            .expect("spawning the events commit thread");
        GroupCommitter { shared }
    }

    /// Writes `batch` durably (possibly together with others); returns the new delivery ids
    /// and the batch back.
    pub fn commit(&self, batch: IngestBatch) -> Result<(Vec<i64>, IngestBatch), String> {
        if batch.is_empty() {
            return Ok((Vec::new(), batch));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared
            .pending
            .lock()
            .map_err(|_| "commit queue poisoned".to_string())?
            .push((batch, tx));
        self.shared.ready.notify_one();
        rx.recv()
            .map_err(|_| "the commit thread stopped".to_string())?
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.ready.notify_all();
    }
}

fn run_committer(shared: &CommitShared) {
    loop {
        let items = {
            let Ok(mut pending) = shared.pending.lock() else {
                return;
            };
            while pending.is_empty() {
                if shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                pending = match shared
                    .ready
                    .wait_timeout(pending, std::time::Duration::from_millis(200))
                {
                    Ok((guard, _)) => guard,
                    Err(_) => return,
                };
            }
            std::mem::take(&mut *pending)
        };
        let refs: Vec<&IngestBatch> = items.iter().map(|(b, _)| b).collect();
        match shared.store.commit_ingest_many(&refs) {
            Ok(ids) => {
                for ((batch, reply), ids) in items.into_iter().zip(ids) {
                    let _ = reply.send(Ok((ids, batch)));
                }
            }
            Err(e) => {
                let message = describe(&e);
                for (_, reply) in items {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
}
