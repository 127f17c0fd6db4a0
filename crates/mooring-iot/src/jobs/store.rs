//! Persistence of jobs, executions and event configurations behind [`JobStore`], implemented
//! on core's metadata database. Every change is written (one transaction per batch) before
//! the API or the device answers; timers are absolute deadlines inside the stored
//! executions, so they survive a restart.

use std::collections::BTreeMap;

use mooring_core::store::StoreError;
use mooring_core::Db;

use super::model::{Execution, Job};

const MIGRATIONS: &[&str] = &["CREATE TABLE iot_jobs (
        job_id TEXT PRIMARY KEY,
        body TEXT NOT NULL
    );
    CREATE TABLE iot_job_executions (
        job_id TEXT NOT NULL,
        thing_name TEXT NOT NULL,
        execution_number INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, thing_name, execution_number)
    );
    CREATE TABLE iot_event_configurations (
        event_type TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL
    );"];

/// One batch of changes, written in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub jobs: Vec<Job>,
    pub deleted_jobs: Vec<String>,
    /// The whole history of one job on one thing, replacing what is stored.
    pub histories: Vec<(String, String, Vec<Execution>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.deleted_jobs.is_empty() && self.histories.is_empty()
    }
}

/// Everything stored, as loaded at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub jobs: Vec<Job>,
    pub executions: Vec<Execution>,
    pub event_configurations: BTreeMap<String, bool>,
}

/// Where jobs live.
pub trait JobStore: Send + Sync {
    fn write(&self, batch: Batch) -> futures::future::BoxFuture<'_, Result<(), StoreError>>;
    fn load(&self) -> Result<Loaded, StoreError>;
    fn set_event_configurations(
        &self,
        values: BTreeMap<String, bool>,
    ) -> futures::future::BoxFuture<'_, Result<(), StoreError>>;
}

/// [`JobStore`] on the metadata database.
pub struct SqliteJobStore {
    db: Db,
}

impl SqliteJobStore {
    pub fn open(db: Db) -> Result<SqliteJobStore, StoreError> {
        db.migrate("iot_jobs", MIGRATIONS)?;
        Ok(SqliteJobStore { db })
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl JobStore for SqliteJobStore {
    fn write(&self, batch: Batch) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            self.db
                .write(move |tx| {
                    for job in &batch.jobs {
                        tx.execute(
                            "INSERT OR REPLACE INTO iot_jobs (job_id, body) VALUES (?1, ?2)",
                            rusqlite::params![job.job_id, to_json(job)],
                        )?;
                    }
                    for id in &batch.deleted_jobs {
                        tx.execute("DELETE FROM iot_jobs WHERE job_id = ?1", [id])?;
                        tx.execute("DELETE FROM iot_job_executions WHERE job_id = ?1", [id])?;
                    }
                    let mut insert = tx.prepare_cached(
                        "INSERT INTO iot_job_executions (job_id, thing_name, execution_number, body)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    let mut delete = tx.prepare_cached(
                        "DELETE FROM iot_job_executions WHERE job_id = ?1 AND thing_name = ?2",
                    )?;
                    for (job, thing, history) in &batch.histories {
                        delete.execute([job, thing])?;
                        for e in history {
                            insert.execute(rusqlite::params![
                                e.job_id,
                                e.thing_name,
                                e.execution_number,
                                to_json(e)
                            ])?;
                        }
                    }
                    Ok(())
                })
                .await
        })
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        self.db.read_blocking(|conn| {
            let mut loaded = Loaded::default();
            let mut stmt = conn.prepare("SELECT body FROM iot_jobs ORDER BY job_id")?;
            for body in stmt.query_map([], |r| r.get::<_, String>(0))? {
                match serde_json::from_str(&body?) {
                    Ok(job) => loaded.jobs.push(job),
                    Err(e) => tracing::error!(error = %e, "skipping an unreadable stored job"),
                }
            }
            let mut stmt = conn.prepare(
                "SELECT body FROM iot_job_executions ORDER BY job_id, thing_name, execution_number",
            )?;
            for body in stmt.query_map([], |r| r.get::<_, String>(0))? {
                match serde_json::from_str(&body?) {
                    Ok(e) => loaded.executions.push(e),
                    Err(e) => {
                        tracing::error!(error = %e, "skipping an unreadable stored job execution")
                    }
                }
            }
            let mut stmt =
                conn.prepare("SELECT event_type, enabled FROM iot_event_configurations")?;
            for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (k, v) = row?;
                loaded.event_configurations.insert(k, v != 0);
            }
            Ok(loaded)
        })
    }

    fn set_event_configurations(
        &self,
        values: BTreeMap<String, bool>,
    ) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.db
                .write(move |tx| {
                    for (k, v) in &values {
                        tx.execute(
                            "INSERT OR REPLACE INTO iot_event_configurations (event_type, enabled)
                             VALUES (?1, ?2)",
                            rusqlite::params![k, *v as i64],
                        )?;
                    }
                    Ok(())
                })
                .await
        })
    }
}
