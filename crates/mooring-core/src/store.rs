//! The metadata store: SQLite in WAL mode, with versioned migrations per service.
//!
//! Every service keeps its metadata (things, rules, jobs, stream definitions, buses, …)
//! behind a store trait of its own, defined in the service crate. The SQLite implementations
//! of those traits share one [`Db`]: a single writer connection (SQLite serializes writers
//! anyway) and a small pool of reader connections, so reads never wait behind a write in WAL
//! mode. Commits use `synchronous = FULL`, so a write that returned is on disk: services may
//! acknowledge it to clients. Each service registers its schema as an ordered list of
//! migration steps under its own component name; [`Db::migrate`] applies the ones not yet
//! recorded in `mooring_migrations`. A PostgreSQL implementation of a service's store trait
//! can follow without touching the service: the services see only their traits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

/// Errors of the metadata store, shared by every service's store implementation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("storage task failed: {0}")]
    Task(String),
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A handle on the metadata database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    path: Option<PathBuf>,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .finish()
    }
}

const MAX_IDLE_READERS: usize = 8;

impl Db {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: &Path) -> StoreResult<Db> {
        let writer = Connection::open(path)?;
        configure(&writer)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        Ok(Db {
            inner: Arc::new(Inner {
                path: Some(path.to_path_buf()),
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// A private in-memory database, for tests; reads go through the writer connection.
    pub fn open_in_memory() -> StoreResult<Db> {
        let writer = Connection::open_in_memory()?;
        configure(&writer)?;
        Ok(Db {
            inner: Arc::new(Inner {
                path: None,
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Applies, in order, the steps of `component`'s schema that have not been applied yet.
    /// Step `i` of the slice is version `i + 1`; steps must never be edited once released,
    /// only appended.
    pub fn migrate(&self, component: &str, steps: &[&str]) -> StoreResult<()> {
        let mut conn = self.inner.writer.lock().map_err(poisoned)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS mooring_migrations (
                component TEXT NOT NULL,
                version INTEGER NOT NULL,
                applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
                PRIMARY KEY (component, version)
            )",
        )?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let applied: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM mooring_migrations WHERE component = ?1",
            [component],
            |row| row.get(0),
        )?;
        for (index, step) in steps.iter().enumerate() {
            let version = index as i64 + 1;
            if version <= applied {
                continue;
            }
            tx.execute_batch(step)?;
            tx.execute(
                "INSERT INTO mooring_migrations (component, version) VALUES (?1, ?2)",
                rusqlite::params![component, version],
            )?;
            tracing::debug!(component, version, "applied migration");
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs `f` in an immediate transaction on the writer connection and commits it.
    pub fn write_blocking<R>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> StoreResult<R>,
    ) -> StoreResult<R> {
        let mut conn = self.inner.writer.lock().map_err(poisoned)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = f(&tx)?;
        tx.commit()?;
        Ok(result)
    }

    /// Runs `f` against a reader connection (the writer for in-memory databases).
    pub fn read_blocking<R>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<R>,
    ) -> StoreResult<R> {
        let Some(path) = &self.inner.path else {
            let conn = self.inner.writer.lock().map_err(poisoned)?;
            return f(&conn);
        };
        let pooled = self.inner.readers.lock().map_err(poisoned)?.pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                configure(&conn)?;
                conn
            }
        };
        let result = f(&conn);
        let mut readers = self.inner.readers.lock().map_err(poisoned)?;
        if readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
        result
    }

    /// [`Db::write_blocking`] on the blocking thread pool.
    pub async fn write<R, F>(&self, f: F) -> StoreResult<R>
    where
        F: FnOnce(&Transaction<'_>) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.write_blocking(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// [`Db::read_blocking`] on the blocking thread pool.
    pub async fn read<R, F>(&self, f: F) -> StoreResult<R>
    where
        F: FnOnce(&Connection) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.read_blocking(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn configure(conn: &Connection) -> StoreResult<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> StoreError {
    StoreError::Task("a database connection lock was poisoned by a panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: &[&str] = &[
        "CREATE TABLE things (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
        "ALTER TABLE things ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}'",
    ];

    #[tokio::test]
    async fn migrations_apply_once_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            let db = Db::open(&path).unwrap();
            db.migrate("iot", &STEPS[..1]).unwrap();
            db.migrate("iot", STEPS).unwrap();
            db.migrate("iot", STEPS).unwrap();
            db.write(|tx| {
                tx.execute(
                    "INSERT INTO things (name, version, attributes) VALUES ('a', 1, '{\"k\":1}')",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        db.migrate("iot", STEPS).unwrap();
        let (name, attributes): (String, String) = db
            .read(|conn| {
                Ok(
                    conn.query_row("SELECT name, attributes FROM things", [], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?,
                )
            })
            .await
            .unwrap();
        assert_eq!(name, "a");
        assert_eq!(attributes, "{\"k\":1}");
        let versions: i64 = db
            .read(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM mooring_migrations WHERE component='iot'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(versions, 2);
    }

    #[test]
    fn a_failed_write_rolls_back() {
        let db = Db::open_in_memory().unwrap();
        db.migrate("t", STEPS).unwrap();
        let result: StoreResult<()> = db.write_blocking(|tx| {
            tx.execute("INSERT INTO things (name, version) VALUES ('x', 1)", [])?;
            tx.execute("INSERT INTO things (name, version) VALUES ('x', 2)", [])?;
            Ok(())
        });
        assert!(result.is_err());
        let count: i64 = db
            .read_blocking(|c| Ok(c.query_row("SELECT COUNT(*) FROM things", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(count, 0);
    }
}
