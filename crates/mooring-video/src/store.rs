//! Persistence of streams and of the fragment index, behind [`VideoStore`], implemented on
//! core's SQLite [`Db`]. The fragment media itself lives in segment files
//! ([`crate::fragments`]); each index row says where (segment, offset, length). Methods are
//! blocking: callers run them on the blocking pool.

use std::collections::{BTreeMap, HashMap};

use mooring_core::store::StoreResult;
use mooring_core::Db;
use rusqlite::{params, OptionalExtension, Row};

use crate::model::{FragmentMeta, Stream};

const MIGRATIONS: &[&str] = &["
CREATE TABLE video_streams (
    name TEXT PRIMARY KEY,
    arn TEXT NOT NULL UNIQUE,
    device_name TEXT,
    media_type TEXT,
    kms_key_id TEXT NOT NULL,
    retention_hours INTEGER NOT NULL,
    version TEXT NOT NULL,
    status TEXT NOT NULL,
    creation_ms INTEGER NOT NULL,
    storage_tier TEXT NOT NULL,
    tags TEXT NOT NULL
);
CREATE TABLE video_fragments (
    stream_arn TEXT NOT NULL,
    seq INTEGER NOT NULL,
    timecode INTEGER NOT NULL,
    producer_ms INTEGER NOT NULL,
    server_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    tags TEXT NOT NULL,
    segment TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (stream_arn, seq)
);
CREATE INDEX video_fragments_server ON video_fragments (stream_arn, server_ms);
CREATE INDEX video_fragments_producer ON video_fragments (stream_arn, producer_ms);
CREATE TABLE video_sequences (
    stream_arn TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
);
"];

/// Where a fragment's record lies on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLocation {
    pub segment: String,
    pub offset: u64,
    pub length: u64,
}

/// One fragment index row: the fragment of a stream and where its record lies.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRow {
    pub arn: String,
    pub meta: FragmentMeta,
    pub location: RecordLocation,
}

/// Which clock a time-range query uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeClock {
    Server,
    Producer,
}

impl TimeClock {
    fn column(self) -> &'static str {
        match self {
            TimeClock::Server => "server_ms",
            TimeClock::Producer => "producer_ms",
        }
    }
}

/// The persistence the video service needs.
pub trait VideoStore: Send + Sync + 'static {
    /// Inserts a stream; `Ok(false)` when the name is taken.
    fn insert_stream(&self, stream: &Stream) -> StoreResult<bool>;
    fn stream_by_name(&self, name: &str) -> StoreResult<Option<Stream>>;
    fn stream_by_arn(&self, arn: &str) -> StoreResult<Option<Stream>>;
    /// Streams whose name starts with `prefix` and sorts after `after`, at most `limit`.
    fn list_streams(&self, prefix: &str, after: &str, limit: usize) -> StoreResult<Vec<Stream>>;
    fn all_streams(&self) -> StoreResult<Vec<Stream>>;
    /// Replaces a stream's row when its version is still `expected_version`.
    fn update_stream(&self, stream: &Stream, expected_version: &str) -> StoreResult<bool>;
    /// Deletes a stream and its index; returns the segment names it referenced.
    fn delete_stream(&self, arn: &str) -> StoreResult<Vec<String>>;
    /// Reserves `count` fragment sequence numbers of a stream; returns the first.
    fn reserve_seqs(&self, arn: &str, count: i64) -> StoreResult<i64>;
    /// [`reserve_seqs`](Self::reserve_seqs) for several streams (or several times for one)
    /// in one transaction; the firsts in request order.
    fn reserve_seqs_many(&self, requests: &[(String, i64)]) -> StoreResult<Vec<i64>>;
    /// Indexes many fragments in one transaction. Rows already indexed, and rows of streams
    /// that no longer exist, are skipped.
    fn insert_fragments(&self, rows: &[IndexRow]) -> StoreResult<()>;
    fn fragment(&self, arn: &str, seq: i64) -> StoreResult<Option<(FragmentMeta, RecordLocation)>>;
    /// The first fragment with a sequence greater than `after`.
    fn fragment_after(
        &self,
        arn: &str,
        after: i64,
    ) -> StoreResult<Option<(FragmentMeta, RecordLocation)>>;
    fn last_fragment(&self, arn: &str) -> StoreResult<Option<FragmentMeta>>;
    /// The fragment whose span on `clock` contains `at`, else the first starting after it.
    fn fragment_at(&self, arn: &str, clock: TimeClock, at: i64) -> StoreResult<Option<i64>>;
    /// Fragments starting within `[start, end]` on `clock`, by sequence, after `after_seq`.
    fn fragments_in_range(
        &self,
        arn: &str,
        clock: TimeClock,
        start: i64,
        end: i64,
        after_seq: i64,
        limit: usize,
    ) -> StoreResult<Vec<FragmentMeta>>;
    /// Drops index rows with a server timestamp before `before_ms`; returns the segments that
    /// no row references any more.
    fn expire_fragments(&self, arn: &str, before_ms: i64) -> StoreResult<Vec<String>>;
    /// Every segment the index references for a stream.
    fn referenced_segments(&self, arn: &str) -> StoreResult<Vec<String>>;
    /// For each segment the index references for a stream, where its last indexed record
    /// ends.
    fn indexed_segment_ends(&self, arn: &str) -> StoreResult<HashMap<String, u64>>;
}

/// [`VideoStore`] on the shared SQLite database.
#[derive(Clone)]
pub struct SqliteVideoStore {
    db: Db,
}

impl SqliteVideoStore {
    pub fn open(db: Db) -> StoreResult<Self> {
        db.migrate("video", MIGRATIONS)?;
        Ok(SqliteVideoStore { db })
    }
}

const STREAM_COLUMNS: &str = "name, arn, device_name, media_type, kms_key_id, retention_hours, version, status, creation_ms, storage_tier, tags";
const FRAGMENT_COLUMNS: &str =
    "seq, timecode, producer_ms, server_ms, duration_ms, size, tags, segment, offset, length";

/// `query_row` through the connection's statement cache: playback reads the same few
/// statements on every request, and preparing them anew was a tenth of its CPU.
fn cached_query_row<T, P: rusqlite::Params>(
    c: &rusqlite::Connection,
    sql: &str,
    params: P,
    row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(params, row)
}

fn stream_row(row: &Row<'_>) -> rusqlite::Result<(Stream, String)> {
    Ok((
        Stream {
            name: row.get(0)?,
            arn: row.get(1)?,
            device_name: row.get(2)?,
            media_type: row.get(3)?,
            kms_key_id: row.get(4)?,
            retention_hours: row.get(5)?,
            version: row.get(6)?,
            status: row.get(7)?,
            creation_ms: row.get(8)?,
            storage_tier: row.get(9)?,
            tags: BTreeMap::new(),
        },
        row.get(10)?,
    ))
}

fn finish_stream((mut stream, tags): (Stream, String)) -> StoreResult<Stream> {
    stream.tags = serde_json::from_str(&tags)?;
    Ok(stream)
}

type RawFragment = (FragmentMeta, String, RecordLocation);

fn fragment_row(row: &Row<'_>) -> rusqlite::Result<RawFragment> {
    Ok((
        FragmentMeta {
            seq: row.get(0)?,
            timecode: row.get(1)?,
            producer_ms: row.get(2)?,
            server_ms: row.get(3)?,
            duration_ms: row.get(4)?,
            size: row.get(5)?,
            tags: Vec::new(),
        },
        row.get(6)?,
        RecordLocation {
            segment: row.get(7)?,
            offset: row.get::<_, i64>(8)? as u64,
            length: row.get::<_, i64>(9)? as u64,
        },
    ))
}

fn finish_fragment(
    (mut meta, tags, location): RawFragment,
) -> StoreResult<(FragmentMeta, RecordLocation)> {
    meta.tags = serde_json::from_str(&tags)?;
    Ok((meta, location))
}

impl VideoStore for SqliteVideoStore {
    fn insert_stream(&self, s: &Stream) -> StoreResult<bool> {
        let tags = serde_json::to_string(&s.tags)?;
        let s = s.clone();
        self.db.write_blocking(move |tx| {
            let exists: bool = tx
                .query_row(
                    "SELECT 1 FROM video_streams WHERE name = ?1",
                    [&s.name],
                    |_| Ok(true),
                )
                .optional()?
                .unwrap_or(false);
            if exists {
                return Ok(false);
            }
            tx.execute(
                &format!("INSERT INTO video_streams ({STREAM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![s.name, s.arn, s.device_name, s.media_type, s.kms_key_id, s.retention_hours, s.version, s.status, s.creation_ms, s.storage_tier, tags],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO video_sequences (stream_arn, next_seq) VALUES (?1, 1)",
                [&s.arn],
            )?;
            Ok(true)
        })
    }

    fn stream_by_name(&self, name: &str) -> StoreResult<Option<Stream>> {
        let raw = self.db.read_blocking(|c| {
            Ok(cached_query_row(
                c,
                &format!("SELECT {STREAM_COLUMNS} FROM video_streams WHERE name = ?1"),
                [name],
                stream_row,
            )
            .optional()?)
        })?;
        raw.map(finish_stream).transpose()
    }

    fn stream_by_arn(&self, arn: &str) -> StoreResult<Option<Stream>> {
        let raw = self.db.read_blocking(|c| {
            Ok(cached_query_row(
                c,
                &format!("SELECT {STREAM_COLUMNS} FROM video_streams WHERE arn = ?1"),
                [arn],
                stream_row,
            )
            .optional()?)
        })?;
        raw.map(finish_stream).transpose()
    }

    fn list_streams(&self, prefix: &str, after: &str, limit: usize) -> StoreResult<Vec<Stream>> {
        let raws = self.db.read_blocking(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {STREAM_COLUMNS} FROM video_streams WHERE name > ?1 AND substr(name, 1, ?2) = ?3 ORDER BY name LIMIT ?4"
            ))?;
            let rows = stmt
                .query_map(
                    params![after, prefix.len() as i64, prefix, limit as i64],
                    stream_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        raws.into_iter().map(finish_stream).collect()
    }

    fn all_streams(&self) -> StoreResult<Vec<Stream>> {
        self.list_streams("", "", usize::MAX >> 2)
    }

    fn update_stream(&self, s: &Stream, expected_version: &str) -> StoreResult<bool> {
        let tags = serde_json::to_string(&s.tags)?;
        let s = s.clone();
        let expected = expected_version.to_string();
        self.db.write_blocking(move |tx| {
            let changed = tx.execute(
                "UPDATE video_streams SET device_name = ?1, media_type = ?2, kms_key_id = ?3, retention_hours = ?4, version = ?5, status = ?6, storage_tier = ?7, tags = ?8 WHERE arn = ?9 AND version = ?10",
                params![s.device_name, s.media_type, s.kms_key_id, s.retention_hours, s.version, s.status, s.storage_tier, tags, s.arn, expected],
            )?;
            Ok(changed == 1)
        })
    }

    fn delete_stream(&self, arn: &str) -> StoreResult<Vec<String>> {
        self.db.write_blocking(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT DISTINCT segment FROM video_fragments WHERE stream_arn = ?1",
            )?;
            let segments = stmt
                .query_map([arn], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            drop(stmt);
            tx.execute("DELETE FROM video_fragments WHERE stream_arn = ?1", [arn])?;
            tx.execute("DELETE FROM video_sequences WHERE stream_arn = ?1", [arn])?;
            tx.execute("DELETE FROM video_streams WHERE arn = ?1", [arn])?;
            Ok(segments)
        })
    }

    fn reserve_seqs(&self, arn: &str, count: i64) -> StoreResult<i64> {
        let firsts = self.reserve_seqs_many(&[(arn.to_string(), count)])?;
        Ok(firsts[0])
    }

    fn reserve_seqs_many(&self, requests: &[(String, i64)]) -> StoreResult<Vec<i64>> {
        self.db.write_blocking(|tx| {
            let mut firsts = Vec::with_capacity(requests.len());
            for (arn, count) in requests {
                let seq: i64 = tx
                    .query_row(
                        "SELECT next_seq FROM video_sequences WHERE stream_arn = ?1",
                        [arn],
                        |r| r.get(0),
                    )
                    .optional()?
                    .unwrap_or(1);
                tx.execute(
                    "INSERT OR REPLACE INTO video_sequences (stream_arn, next_seq) VALUES (?1, ?2)",
                    params![arn, seq + count],
                )?;
                firsts.push(seq);
            }
            Ok(firsts)
        })
    }

    fn insert_fragments(&self, rows: &[IndexRow]) -> StoreResult<()> {
        let tags = rows
            .iter()
            .map(|r| serde_json::to_string(&r.meta.tags))
            .collect::<Result<Vec<_>, _>>()?;
        self.db.write_blocking(|tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO video_fragments (stream_arn, {FRAGMENT_COLUMNS}) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 WHERE EXISTS (SELECT 1 FROM video_streams WHERE arn = ?1)"
            ))?;
            for (r, tags) in rows.iter().zip(&tags) {
                let (m, loc) = (&r.meta, &r.location);
                stmt.execute(params![r.arn, m.seq, m.timecode, m.producer_ms, m.server_ms, m.duration_ms, m.size, tags, loc.segment, loc.offset as i64, loc.length as i64])?;
            }
            Ok(())
        })
    }

    fn fragment(&self, arn: &str, seq: i64) -> StoreResult<Option<(FragmentMeta, RecordLocation)>> {
        let raw = self.db.read_blocking(|c| {
            Ok(cached_query_row(c,
                &format!("SELECT {FRAGMENT_COLUMNS} FROM video_fragments WHERE stream_arn = ?1 AND seq = ?2"),
                params![arn, seq],
                fragment_row,
            )
            .optional()?)
        })?;
        raw.map(finish_fragment).transpose()
    }

    fn fragment_after(
        &self,
        arn: &str,
        after: i64,
    ) -> StoreResult<Option<(FragmentMeta, RecordLocation)>> {
        let raw = self.db.read_blocking(|c| {
            Ok(cached_query_row(c,
                &format!("SELECT {FRAGMENT_COLUMNS} FROM video_fragments WHERE stream_arn = ?1 AND seq > ?2 ORDER BY seq LIMIT 1"),
                params![arn, after],
                fragment_row,
            )
            .optional()?)
        })?;
        raw.map(finish_fragment).transpose()
    }

    fn last_fragment(&self, arn: &str) -> StoreResult<Option<FragmentMeta>> {
        let raw = self.db.read_blocking(|c| {
            Ok(cached_query_row(c,
                &format!("SELECT {FRAGMENT_COLUMNS} FROM video_fragments WHERE stream_arn = ?1 ORDER BY seq DESC LIMIT 1"),
                params![arn],
                fragment_row,
            )
            .optional()?)
        })?;
        Ok(raw.map(finish_fragment).transpose()?.map(|(m, _)| m))
    }

    fn fragment_at(&self, arn: &str, clock: TimeClock, at: i64) -> StoreResult<Option<i64>> {
        let col = clock.column();
        self.db.read_blocking(|c| {
            let containing: Option<i64> = c
                .query_row(
                    &format!("SELECT seq FROM video_fragments WHERE stream_arn = ?1 AND {col} <= ?2 AND {col} + duration_ms > ?2 ORDER BY seq LIMIT 1"),
                    params![arn, at],
                    |r| r.get(0),
                )
                .optional()?;
            if containing.is_some() {
                return Ok(containing);
            }
            Ok(cached_query_row(c,
                &format!("SELECT seq FROM video_fragments WHERE stream_arn = ?1 AND {col} >= ?2 ORDER BY seq LIMIT 1"),
                params![arn, at],
                |r| r.get(0),
            )
            .optional()?)
        })
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
        let col = clock.column();
        let raws = self.db.read_blocking(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {FRAGMENT_COLUMNS} FROM video_fragments WHERE stream_arn = ?1 AND {col} >= ?2 AND {col} <= ?3 AND seq > ?4 ORDER BY seq LIMIT ?5"
            ))?;
            let rows = stmt
                .query_map(params![arn, start, end, after_seq, limit as i64], fragment_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        raws.into_iter()
            .map(|r| finish_fragment(r).map(|(m, _)| m))
            .collect()
    }

    fn expire_fragments(&self, arn: &str, before_ms: i64) -> StoreResult<Vec<String>> {
        self.db.write_blocking(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT DISTINCT segment FROM video_fragments WHERE stream_arn = ?1 AND server_ms < ?2",
            )?;
            let candidates = stmt
                .query_map(params![arn, before_ms], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            drop(stmt);
            tx.execute(
                "DELETE FROM video_fragments WHERE stream_arn = ?1 AND server_ms < ?2",
                params![arn, before_ms],
            )?;
            let mut unreferenced = Vec::new();
            for segment in candidates {
                let still: Option<i64> = tx
                    .query_row(
                        "SELECT 1 FROM video_fragments WHERE stream_arn = ?1 AND segment = ?2 LIMIT 1",
                        params![arn, segment],
                        |r| r.get(0),
                    )
                    .optional()?;
                if still.is_none() {
                    unreferenced.push(segment);
                }
            }
            Ok(unreferenced)
        })
    }

    fn referenced_segments(&self, arn: &str) -> StoreResult<Vec<String>> {
        self.db.read_blocking(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT segment FROM video_fragments WHERE stream_arn = ?1",
            )?;
            let rows = stmt
                .query_map([arn], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn indexed_segment_ends(&self, arn: &str) -> StoreResult<HashMap<String, u64>> {
        self.db.read_blocking(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT segment, MAX(offset + length) FROM video_fragments WHERE stream_arn = ?1 GROUP BY segment",
            )?;
            let rows = stmt
                .query_map([arn], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<Result<HashMap<_, _>, _>>()?;
            Ok(rows)
        })
    }
}
