//! Persistence of topic rules behind [`RuleStore`], implemented on core's SQLite [`Db`].
//!
//! One row per rule: name, ARN, the payload as JSON, creation time and tags. Writes commit
//! with `synchronous = FULL` before the API answers, so an acknowledged rule survives a
//! crash.

use mooring_core::store::StoreResult;
use mooring_core::Db;
use rusqlite::OptionalExtension;

use crate::model::StoredRule;

/// Where topic rules live.
pub trait RuleStore: Send + Sync {
    /// Inserts a new rule; `false` when one with that name exists.
    fn insert(&self, rule: &StoredRule) -> StoreResult<bool>;
    /// Replaces an existing rule; `false` when there is none.
    fn update(&self, rule: &StoredRule) -> StoreResult<bool>;
    fn get(&self, name: &str) -> StoreResult<Option<StoredRule>>;
    fn list(&self) -> StoreResult<Vec<StoredRule>>;
    /// Deletes a rule; `false` when there was none.
    fn delete(&self, name: &str) -> StoreResult<bool>;
}

const MIGRATIONS: &[&str] = &["CREATE TABLE iot_topic_rules (
        name TEXT PRIMARY KEY,
        arn TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]'
    )"];

/// [`RuleStore`] on the shared metadata database.
#[derive(Clone, Debug)]
pub struct SqliteRuleStore {
    db: Db,
}

impl SqliteRuleStore {
    pub fn open(db: Db) -> StoreResult<SqliteRuleStore> {
        db.migrate("iot_rules", MIGRATIONS)?;
        Ok(SqliteRuleStore { db })
    }
}

fn row_to_rule(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, f64, String)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn decode(raw: (String, String, String, f64, String)) -> StoreResult<StoredRule> {
    let (name, arn, payload, created_at, tags) = raw;
    Ok(StoredRule {
        name,
        arn,
        payload: serde_json::from_str(&payload)?,
        created_at,
        tags: serde_json::from_str(&tags)?,
    })
}

impl RuleStore for SqliteRuleStore {
    fn insert(&self, rule: &StoredRule) -> StoreResult<bool> {
        let payload = serde_json::to_string(&rule.payload)?;
        let tags = serde_json::to_string(&rule.tags)?;
        self.db.write_blocking(|tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO iot_topic_rules (name, arn, payload, created_at, tags)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![rule.name, rule.arn, payload, rule.created_at, tags],
            )?;
            Ok(n == 1)
        })
    }

    fn update(&self, rule: &StoredRule) -> StoreResult<bool> {
        let payload = serde_json::to_string(&rule.payload)?;
        let tags = serde_json::to_string(&rule.tags)?;
        self.db.write_blocking(|tx| {
            let n = tx.execute(
                "UPDATE iot_topic_rules SET arn = ?2, payload = ?3, created_at = ?4, tags = ?5
                 WHERE name = ?1",
                rusqlite::params![rule.name, rule.arn, payload, rule.created_at, tags],
            )?;
            Ok(n == 1)
        })
    }

    fn get(&self, name: &str) -> StoreResult<Option<StoredRule>> {
        let raw = self.db.read_blocking(|conn| {
            Ok(conn
                .query_row(
                    "SELECT name, arn, payload, created_at, tags FROM iot_topic_rules WHERE name = ?1",
                    [name],
                    row_to_rule,
                )
                .optional()?)
        })?;
        raw.map(decode).transpose()
    }

    fn list(&self) -> StoreResult<Vec<StoredRule>> {
        let raws = self.db.read_blocking(|conn| {
            let mut stmt = conn.prepare(
                "SELECT name, arn, payload, created_at, tags FROM iot_topic_rules ORDER BY name",
            )?;
            let rows = stmt
                .query_map([], row_to_rule)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        raws.into_iter().map(decode).collect()
    }

    fn delete(&self, name: &str) -> StoreResult<bool> {
        self.db.write_blocking(|tx| {
            let n = tx.execute("DELETE FROM iot_topic_rules WHERE name = ?1", [name])?;
            Ok(n == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TopicRulePayload;

    #[test]
    fn rules_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let rule = StoredRule {
            name: "r1".into(),
            arn: "arn:aws:iot:us-east-1:1:rule/r1".into(),
            payload: TopicRulePayload {
                sql: Some("SELECT * FROM 'a'".into()),
                actions: Some(vec![]),
                ..Default::default()
            },
            created_at: 1.5,
            tags: vec![("k".into(), "v".into())],
        };
        {
            let store = SqliteRuleStore::open(Db::open(&path).unwrap()).unwrap();
            assert!(store.insert(&rule).unwrap());
            assert!(!store.insert(&rule).unwrap());
        }
        let store = SqliteRuleStore::open(Db::open(&path).unwrap()).unwrap();
        assert_eq!(store.get("r1").unwrap(), Some(rule.clone()));
        let mut changed = rule.clone();
        changed.payload.rule_disabled = Some(true);
        assert!(store.update(&changed).unwrap());
        assert_eq!(store.list().unwrap(), vec![changed]);
        assert!(store.delete("r1").unwrap());
        assert!(!store.delete("r1").unwrap());
        assert_eq!(store.get("r1").unwrap(), None);
    }
}
