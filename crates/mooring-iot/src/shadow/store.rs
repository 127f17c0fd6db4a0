//! Persistence of shadows behind [`ShadowStore`], implemented on core's metadata database.
//! One row per shadow (the classic shadow has the empty name); a deleted shadow keeps its
//! row as a tombstone so that re-creating it continues from its version. Every accepted
//! update and delete is committed here before anyone is answered.

use futures::future::BoxFuture;
use mooring_core::store::StoreError;
use mooring_core::Db;

use super::model::{ShadowKey, StoredShadow};

const MIGRATIONS: &[&str] = &["CREATE TABLE iot_shadows (
        thing_name TEXT NOT NULL,
        shadow_name TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (thing_name, shadow_name)
    );"];

/// Where shadows live.
pub trait ShadowStore: Send + Sync {
    fn get_blocking(&self, key: &ShadowKey) -> Result<Option<StoredShadow>, StoreError>;
    fn get(&self, key: &ShadowKey) -> BoxFuture<'_, Result<Option<StoredShadow>, StoreError>>;
    fn put(&self, key: &ShadowKey, shadow: &StoredShadow) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The names of `thing`'s named shadows that exist (not deleted), sorted.
    fn list_named(&self, thing: &str) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;
}

/// [`ShadowStore`] on the metadata database.
pub struct SqliteShadowStore {
    db: Db,
}

impl SqliteShadowStore {
    pub fn open(db: Db) -> Result<SqliteShadowStore, StoreError> {
        db.migrate("iot_shadows", MIGRATIONS)?;
        Ok(SqliteShadowStore { db })
    }
}

fn columns(key: &ShadowKey) -> (String, String) {
    (key.thing.clone(), key.name.clone().unwrap_or_default())
}

fn select(
    conn: &rusqlite::Connection,
    thing: &str,
    name: &str,
) -> Result<Option<StoredShadow>, StoreError> {
    use rusqlite::OptionalExtension;
    let body: Option<String> = conn
        .query_row(
            "SELECT body FROM iot_shadows WHERE thing_name = ?1 AND shadow_name = ?2",
            [thing, name],
            |row| row.get(0),
        )
        .optional()?;
    Ok(body.and_then(|b| match serde_json::from_str(&b) {
        Ok(shadow) => Some(shadow),
        Err(e) => {
            tracing::error!(thing, shadow = name, error = %e, "unreadable stored shadow");
            None
        }
    }))
}

impl ShadowStore for SqliteShadowStore {
    fn get_blocking(&self, key: &ShadowKey) -> Result<Option<StoredShadow>, StoreError> {
        let (thing, name) = columns(key);
        self.db.read_blocking(|conn| select(conn, &thing, &name))
    }

    fn get(&self, key: &ShadowKey) -> BoxFuture<'_, Result<Option<StoredShadow>, StoreError>> {
        let (thing, name) = columns(key);
        Box::pin(async move { self.db.read(move |conn| select(conn, &thing, &name)).await })
    }

    fn put(&self, key: &ShadowKey, shadow: &StoredShadow) -> BoxFuture<'_, Result<(), StoreError>> {
        let (thing, name) = columns(key);
        let body = serde_json::to_string(shadow).unwrap_or_default();
        Box::pin(async move {
            self.db
                .write(move |tx| {
                    tx.execute(
                        "INSERT OR REPLACE INTO iot_shadows (thing_name, shadow_name, body)
                         VALUES (?1, ?2, ?3)",
                        rusqlite::params![thing, name, body],
                    )?;
                    Ok(())
                })
                .await
        })
    }

    fn list_named(&self, thing: &str) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        let thing = thing.to_string();
        Box::pin(async move {
            self.db
                .read(move |conn| {
                    let mut statement = conn.prepare(
                        "SELECT shadow_name, body FROM iot_shadows
                         WHERE thing_name = ?1 AND shadow_name != '' ORDER BY shadow_name",
                    )?;
                    let rows = statement.query_map([&thing], |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                    })?;
                    let mut names = Vec::new();
                    for row in rows {
                        let (name, body) = row?;
                        let live = serde_json::from_str::<StoredShadow>(&body)
                            .map(|s| s.exists())
                            .unwrap_or(false);
                        if live {
                            names.push(name);
                        }
                    }
                    Ok(names)
                })
                .await
        })
    }
}
