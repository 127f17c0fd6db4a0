//! Persistence of stream definitions and export checkpoints in the metadata store.
//!
//! Message data lives in the segment log ([`crate::log`]); what is kept here is small and
//! changes rarely: each stream's definition (as the wire JSON, defaults filled in) and, per
//! export configuration, its checkpoint and counters. [`StreamCatalog`] is the trait the
//! manager uses; [`DbCatalog`] implements it on core's SQLite [`Db`], whose commits are
//! synchronous, so a definition is durable before CreateMessageStream answers.

use mooring_core::store::{StoreError, StoreResult};
use mooring_core::Db;
use rusqlite::OptionalExtension;

use crate::definition::MessageStreamDefinition;

const MIGRATIONS: &[&str] = &["CREATE TABLE streams_definitions (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL
    );
    CREATE TABLE streams_export_progress (
        stream TEXT NOT NULL,
        identifier TEXT NOT NULL,
        start_sequence_number INTEGER NOT NULL,
        last_exported_sequence_number INTEGER NOT NULL,
        last_export_time INTEGER NOT NULL,
        error_message TEXT,
        exported_bytes INTEGER NOT NULL,
        exported_messages INTEGER NOT NULL,
        PRIMARY KEY (stream, identifier)
    );"];

/// An export's position and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportProgress {
    /// The `startSequenceNumber` the checkpoint was taken under; a changed start resets it.
    pub start_sequence_number: i64,
    pub last_exported_sequence_number: i64,
    pub last_export_time: i64,
    pub error_message: Option<String>,
    pub exported_bytes: i64,
    pub exported_messages: i64,
}

pub trait StreamCatalog: Send + Sync {
    fn load_definitions(&self) -> StoreResult<Vec<MessageStreamDefinition>>;
    fn put_definition(&self, definition: &MessageStreamDefinition) -> StoreResult<()>;
    /// Removes the stream's definition and every export checkpoint.
    fn delete_stream(&self, name: &str) -> StoreResult<()>;
    fn load_progress(&self, stream: &str, identifier: &str) -> StoreResult<Option<ExportProgress>>;
    fn put_progress(
        &self,
        stream: &str,
        identifier: &str,
        progress: &ExportProgress,
    ) -> StoreResult<()>;
    fn delete_progress(&self, stream: &str, identifier: &str) -> StoreResult<()>;
}

/// [`StreamCatalog`] on the shared SQLite database.
#[derive(Clone)]
pub struct DbCatalog {
    db: Db,
}

impl DbCatalog {
    pub fn new(db: Db) -> StoreResult<DbCatalog> {
        db.migrate("streams", MIGRATIONS)?;
        Ok(DbCatalog { db })
    }
}

impl StreamCatalog for DbCatalog {
    fn load_definitions(&self) -> StoreResult<Vec<MessageStreamDefinition>> {
        self.db.read_blocking(|conn| {
            let mut stmt =
                conn.prepare("SELECT definition FROM streams_definitions ORDER BY name")?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?)?);
            }
            Ok(out)
        })
    }

    fn put_definition(&self, definition: &MessageStreamDefinition) -> StoreResult<()> {
        let name = definition
            .name
            .clone()
            .ok_or_else(|| StoreError::Corrupt("definition without a name".into()))?;
        let json = serde_json::to_string(definition)?;
        self.db.write_blocking(|tx| {
            tx.execute(
                "INSERT INTO streams_definitions (name, definition) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET definition = excluded.definition",
                rusqlite::params![name, json],
            )?;
            Ok(())
        })
    }

    fn delete_stream(&self, name: &str) -> StoreResult<()> {
        self.db.write_blocking(|tx| {
            tx.execute("DELETE FROM streams_definitions WHERE name = ?1", [name])?;
            tx.execute(
                "DELETE FROM streams_export_progress WHERE stream = ?1",
                [name],
            )?;
            Ok(())
        })
    }

    fn load_progress(&self, stream: &str, identifier: &str) -> StoreResult<Option<ExportProgress>> {
        self.db.read_blocking(|conn| {
            Ok(conn
                .query_row(
                    "SELECT start_sequence_number, last_exported_sequence_number, last_export_time,
                            error_message, exported_bytes, exported_messages
                     FROM streams_export_progress WHERE stream = ?1 AND identifier = ?2",
                    [stream, identifier],
                    |r| {
                        Ok(ExportProgress {
                            start_sequence_number: r.get(0)?,
                            last_exported_sequence_number: r.get(1)?,
                            last_export_time: r.get(2)?,
                            error_message: r.get(3)?,
                            exported_bytes: r.get(4)?,
                            exported_messages: r.get(5)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    fn put_progress(&self, stream: &str, identifier: &str, p: &ExportProgress) -> StoreResult<()> {
        let (stream, identifier, p) = (stream.to_string(), identifier.to_string(), p.clone());
        self.db.write_blocking(move |tx| {
            tx.execute(
                "INSERT INTO streams_export_progress (stream, identifier, start_sequence_number,
                    last_exported_sequence_number, last_export_time, error_message,
                    exported_bytes, exported_messages)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(stream, identifier) DO UPDATE SET
                    start_sequence_number = excluded.start_sequence_number,
                    last_exported_sequence_number = excluded.last_exported_sequence_number,
                    last_export_time = excluded.last_export_time,
                    error_message = excluded.error_message,
                    exported_bytes = excluded.exported_bytes,
                    exported_messages = excluded.exported_messages",
                rusqlite::params![
                    stream,
                    identifier,
                    p.start_sequence_number,
                    p.last_exported_sequence_number,
                    p.last_export_time,
                    p.error_message,
                    p.exported_bytes,
                    p.exported_messages
                ],
            )?;
            Ok(())
        })
    }

    fn delete_progress(&self, stream: &str, identifier: &str) -> StoreResult<()> {
        self.db.write_blocking(|tx| {
            tx.execute(
                "DELETE FROM streams_export_progress WHERE stream = ?1 AND identifier = ?2",
                [stream, identifier],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_and_progress_round_trip() {
        let catalog = DbCatalog::new(Db::open_in_memory().unwrap()).unwrap();
        let def = MessageStreamDefinition {
            name: Some("a b".into()),
            strategy_on_full: Some(1),
            max_size: Some(4096),
            ..Default::default()
        };
        catalog.put_definition(&def).unwrap();
        catalog.put_definition(&def).unwrap();
        assert_eq!(catalog.load_definitions().unwrap(), vec![def]);
        let p = ExportProgress {
            last_exported_sequence_number: 7,
            exported_bytes: 70,
            exported_messages: 8,
            error_message: Some("boom".into()),
            ..Default::default()
        };
        catalog.put_progress("a b", "k", &p).unwrap();
        assert_eq!(catalog.load_progress("a b", "k").unwrap(), Some(p));
        catalog.delete_stream("a b").unwrap();
        assert!(catalog.load_definitions().unwrap().is_empty());
        assert_eq!(catalog.load_progress("a b", "k").unwrap(), None);
    }
}
