//! The durable queue of pending rule executions.
//!
//! A rule whose WHERE clause matched a message becomes a row here (the rule's name and the
//! message as the rule saw it) before its actions start, and the row is deleted once every
//! action and, on failure, the error action has run. Rows are written in group commits on
//! the metadata database (`synchronous = FULL`), so a crash loses no execution that reached
//! the journal: at start-up [`crate::engine::RulesEngine::replay_pending`] evaluates each
//! surviving row's rule again and runs its actions. Delivery is therefore at least once, as
//! on AWS: an action that ran just before a crash runs again after the restart.

use base64::Engine as _;
use bytes::Bytes;
use mooring_core::store::StoreResult;
use mooring_core::Db;
use serde::{Deserialize, Serialize};

use crate::sql::MessageFacts;

const MIGRATIONS: &[&str] = &["CREATE TABLE iot_rule_pending (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT NOT NULL,
        facts TEXT NOT NULL,
        payload BLOB NOT NULL
    )"];

/// The message facts a rule evaluates, minus the payload (kept as a BLOB).
#[derive(Serialize, Deserialize)]
struct StoredFacts {
    topic: String,
    client_id: Option<String>,
    principal: Option<String>,
    source_ip: Option<String>,
    trace_id: Option<String>,
    timestamp_ms: i64,
    account_id: String,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
    response_topic: Option<String>,
    /// Base64.
    correlation_data: Option<String>,
    payload_format_indicator: Option<u8>,
}

impl StoredFacts {
    fn from_facts(facts: &MessageFacts) -> StoredFacts {
        StoredFacts {
            topic: facts.topic.clone(),
            client_id: facts.client_id.clone(),
            principal: facts.principal.clone(),
            source_ip: facts.source_ip.clone(),
            trace_id: facts.trace_id.clone(),
            timestamp_ms: facts.timestamp_ms,
            account_id: facts.account_id.clone(),
            user_properties: facts.user_properties.clone(),
            content_type: facts.content_type.clone(),
            response_topic: facts.response_topic.clone(),
            correlation_data: facts
                .correlation_data
                .as_ref()
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
            payload_format_indicator: facts.payload_format_indicator,
        }
    }

    fn into_facts(self, payload: Vec<u8>) -> MessageFacts {
        let mut facts = MessageFacts::new(self.topic, Bytes::from(payload));
        facts.client_id = self.client_id;
        facts.principal = self.principal;
        facts.source_ip = self.source_ip;
        facts.trace_id = self.trace_id;
        facts.timestamp_ms = self.timestamp_ms;
        facts.account_id = self.account_id;
        facts.user_properties = self.user_properties;
        facts.content_type = self.content_type;
        facts.response_topic = self.response_topic;
        facts.correlation_data = self.correlation_data.and_then(|c| {
            base64::engine::general_purpose::STANDARD
                .decode(c)
                .ok()
                .map(Bytes::from)
        });
        facts.payload_format_indicator = self.payload_format_indicator;
        facts
    }
}

/// A rule execution that survived in the journal.
pub struct PendingExecution {
    pub id: i64,
    pub rule: String,
    pub facts: MessageFacts,
}

/// The journal on the metadata database.
#[derive(Clone, Debug)]
pub struct Journal {
    db: Db,
}

impl Journal {
    pub fn open(db: Db) -> StoreResult<Journal> {
        db.migrate("iot_rule_pending", MIGRATIONS)?;
        Ok(Journal { db })
    }

    /// Appends executions (rule name, message) in one durable transaction; answers their ids
    /// in order.
    pub fn append(&self, executions: &[(&str, &MessageFacts)]) -> StoreResult<Vec<i64>> {
        let rows = executions
            .iter()
            .map(|(rule, facts)| -> StoreResult<(String, String, Bytes)> {
                Ok((
                    rule.to_string(),
                    serde_json::to_string(&StoredFacts::from_facts(facts))?,
                    facts.payload.clone(),
                ))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        self.db.write_blocking(move |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO iot_rule_pending (rule, facts, payload) VALUES (?1, ?2, ?3)",
            )?;
            let mut ids = Vec::with_capacity(rows.len());
            for (rule, facts, payload) in &rows {
                insert.execute(rusqlite::params![rule, facts, &payload[..]])?;
                ids.push(tx.last_insert_rowid());
            }
            Ok(ids)
        })
    }

    /// Deletes finished executions.
    pub fn remove(&self, ids: &[i64]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        self.db.write_blocking(move |tx| {
            let mut delete = tx.prepare_cached("DELETE FROM iot_rule_pending WHERE id = ?1")?;
            for id in &ids {
                delete.execute([id])?;
            }
            Ok(())
        })
    }

    /// Every execution still pending, oldest first.
    pub fn pending(&self) -> StoreResult<Vec<PendingExecution>> {
        let rows = self.db.read_blocking(|conn| {
            let mut stmt =
                conn.prepare("SELECT id, rule, facts, payload FROM iot_rule_pending ORDER BY id")?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, Vec<u8>>(3)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(id, rule, facts, payload)| {
                let stored: StoredFacts = serde_json::from_str(&facts)?;
                Ok(PendingExecution {
                    id,
                    rule,
                    facts: stored.into_facts(payload),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executions_survive_reopening_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let mut facts = MessageFacts::new("a/b", Bytes::from_static(b"{\"x\":1}"));
        facts.client_id = Some("dev".into());
        facts.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
        facts.timestamp_ms = 42;
        let ids = {
            let journal = Journal::open(Db::open(&path).unwrap()).unwrap();
            journal.append(&[("r1", &facts), ("r2", &facts)]).unwrap()
        };
        assert_eq!(ids.len(), 2);
        let journal = Journal::open(Db::open(&path).unwrap()).unwrap();
        let pending = journal.pending().unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].rule, "r1");
        assert_eq!(pending[1].facts.topic, "a/b");
        assert_eq!(&pending[1].facts.payload[..], b"{\"x\":1}");
        assert_eq!(pending[1].facts.client_id.as_deref(), Some("dev"));
        assert_eq!(pending[1].facts.timestamp_ms, 42);
        assert_eq!(
            pending[1].facts.correlation_data.as_deref(),
            Some(&b"\x00\x01"[..])
        );
        journal.remove(&ids[..1]).unwrap();
        let left = journal.pending().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, ids[1]);
    }
}
