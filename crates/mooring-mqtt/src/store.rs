//! Persistence of the broker's durable state behind [`BrokerStore`], implemented on core's
//! SQLite [`Db`]: retained messages, persistent sessions (with their subscriptions), the
//! QoS 1/2 messages queued for them, and the ceiling of the lifecycle version numbers handed
//! out (one row in `mqtt_client_versions`, under the empty client id).
//!
//! Writes go through [`Persister`], a group-commit writer on its own thread: every batch of
//! operations submitted while the previous transaction was committing is applied in one
//! transaction (SQLite `synchronous = FULL`), and each submitter waiting for durability is
//! told once its batch is on disk. That is what lets a PUBACK to a QoS 1 publish wait for the
//! disk without one fsync per message.

use std::collections::BTreeMap;

use bytes::Bytes;
use mooring_core::store::{StoreError, StoreResult};
use mooring_core::Db;
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::codec::SubscriptionOptions;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE mqtt_retained (
        topic TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        properties TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        expires_at_ms INTEGER
    );
    CREATE TABLE mqtt_sessions (
        client_id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        protocol_version INTEGER NOT NULL,
        expiry_secs INTEGER NOT NULL,
        disconnected_ms INTEGER,
        subscriptions TEXT NOT NULL
    );
    CREATE TABLE mqtt_session_messages (
        client_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        properties TEXT NOT NULL,
        expires_at_ms INTEGER,
        PRIMARY KEY (client_id, seq)
    );
    CREATE TABLE mqtt_client_versions (
        client_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
"];

/// The MQTT 5 properties that travel with an application message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

/// A stored message: retained, or queued for a persistent session.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: MessageProperties,
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    #[serde(default)]
    pub retain_handling: u8,
    #[serde(default)]
    pub subscription_id: Option<u32>,
}

impl StoredSubscription {
    pub fn options(&self) -> SubscriptionOptions {
        SubscriptionOptions {
            qos: self.qos,
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: self.retain_handling,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    pub client_id: String,
    pub session_id: String,
    pub protocol_version: u8,
    pub expiry_secs: u32,
    pub disconnected_ms: Option<i64>,
    pub subscriptions: BTreeMap<String, StoredSubscription>,
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum StoreOp {
    PutRetained(StoredMessage, i64),
    DeleteRetained(String),
    PutSession(StoredSession),
    DeleteSession(String),
    PutMessage {
        client_id: String,
        seq: u64,
        message: StoredMessage,
    },
    DeleteMessage {
        client_id: String,
        seq: u64,
    },
    /// Raises the ceiling below which lifecycle version numbers have been handed out (see
    /// the broker's `VersionClock`).
    PutVersionCeiling(u64),
}

/// Everything loaded at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub retained: Vec<(StoredMessage, i64)>,
    pub sessions: Vec<StoredSession>,
    /// Queued messages per client, in sequence order.
    pub messages: BTreeMap<String, Vec<(u64, StoredMessage)>>,
    /// The highest lifecycle version number that may have been handed out.
    pub version_ceiling: u64,
}

/// Durable storage of the broker's state.
pub trait BrokerStore: Send + Sync + 'static {
    fn load(&self) -> StoreResult<Loaded>;
    /// Applies `ops` atomically and durably.
    fn apply(&self, ops: &[StoreOp]) -> StoreResult<()>;
}

/// [`BrokerStore`] on the shared SQLite metadata store.
pub struct SqliteBrokerStore {
    db: Db,
}

impl SqliteBrokerStore {
    pub fn new(db: Db) -> StoreResult<Self> {
        db.migrate("mqtt", MIGRATIONS)?;
        Ok(SqliteBrokerStore { db })
    }
}

fn props_json(p: &MessageProperties) -> StoreResult<String> {
    Ok(serde_json::to_string(p)?)
}

impl BrokerStore for SqliteBrokerStore {
    fn load(&self) -> StoreResult<Loaded> {
        self.db.read_blocking(|conn| {
            let mut loaded = Loaded::default();
            let mut stmt = conn.prepare(
                "SELECT topic, payload, qos, properties, updated_ms, expires_at_ms FROM mqtt_retained",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, u8>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })?;
            for row in rows {
                let (topic, payload, qos, props, updated, expires) = row?;
                loaded.retained.push((
                    StoredMessage {
                        topic,
                        payload: Bytes::from(payload),
                        qos,
                        retain: true,
                        properties: serde_json::from_str(&props)?,
                        expires_at_ms: expires,
                    },
                    updated,
                ));
            }
            let mut stmt = conn.prepare(
                "SELECT client_id, session_id, protocol_version, expiry_secs, disconnected_ms, subscriptions FROM mqtt_sessions",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u8>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?;
            for row in rows {
                let (client_id, session_id, protocol_version, expiry_secs, disconnected_ms, subs) =
                    row?;
                loaded.sessions.push(StoredSession {
                    client_id,
                    session_id,
                    protocol_version,
                    expiry_secs,
                    disconnected_ms,
                    subscriptions: serde_json::from_str(&subs)?,
                });
            }
            let mut stmt = conn.prepare(
                "SELECT client_id, seq, topic, payload, qos, retain, properties, expires_at_ms
                 FROM mqtt_session_messages ORDER BY client_id, seq",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, u8>(4)?,
                    r.get::<_, bool>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                ))
            })?;
            for row in rows {
                let (client_id, seq, topic, payload, qos, retain, props, expires) = row?;
                loaded.messages.entry(client_id).or_default().push((
                    seq as u64,
                    StoredMessage {
                        topic,
                        payload: Bytes::from(payload),
                        qos,
                        retain,
                        properties: serde_json::from_str(&props)?,
                        expires_at_ms: expires,
                    },
                ));
            }
            // (Rows of other client ids are from releases that numbered per client id; the
            // ceiling covers them.)
            let ceiling: i64 = conn.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM mqtt_client_versions",
                [],
                |r| r.get(0),
            )?;
            loaded.version_ceiling = ceiling as u64;
            Ok(loaded)
        })
    }

    fn apply(&self, ops: &[StoreOp]) -> StoreResult<()> {
        self.db.write_blocking(|tx| {
            for op in ops {
                match op {
                    StoreOp::PutRetained(m, updated) => {
                        tx.execute(
                            "INSERT OR REPLACE INTO mqtt_retained (topic, payload, qos, properties, updated_ms, expires_at_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            rusqlite::params![
                                m.topic,
                                &m.payload[..],
                                m.qos,
                                props_json(&m.properties)?,
                                updated,
                                m.expires_at_ms
                            ],
                        )?;
                    }
                    StoreOp::DeleteRetained(topic) => {
                        tx.execute("DELETE FROM mqtt_retained WHERE topic = ?1", [topic])?;
                    }
                    StoreOp::PutSession(s) => {
                        tx.execute(
                            "INSERT OR REPLACE INTO mqtt_sessions (client_id, session_id, protocol_version, expiry_secs, disconnected_ms, subscriptions)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            rusqlite::params![
                                s.client_id,
                                s.session_id,
                                s.protocol_version,
                                s.expiry_secs,
                                s.disconnected_ms,
                                serde_json::to_string(&s.subscriptions)?
                            ],
                        )?;
                    }
                    StoreOp::DeleteSession(client_id) => {
                        tx.execute("DELETE FROM mqtt_sessions WHERE client_id = ?1", [client_id])?;
                        tx.execute(
                            "DELETE FROM mqtt_session_messages WHERE client_id = ?1",
                            [client_id],
                        )?;
                    }
                    StoreOp::PutMessage {
                        client_id,
                        seq,
                        message: m,
                    } => {
                        tx.execute(
                            "INSERT OR REPLACE INTO mqtt_session_messages (client_id, seq, topic, payload, qos, retain, properties, expires_at_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                            rusqlite::params![
                                client_id,
                                *seq as i64,
                                m.topic,
                                &m.payload[..],
                                m.qos,
                                m.retain,
                                props_json(&m.properties)?,
                                m.expires_at_ms
                            ],
                        )?;
                    }
                    StoreOp::DeleteMessage { client_id, seq } => {
                        tx.execute(
                            "DELETE FROM mqtt_session_messages WHERE client_id = ?1 AND seq = ?2",
                            rusqlite::params![client_id, *seq as i64],
                        )?;
                    }
                    StoreOp::PutVersionCeiling(ceiling) => {
                        // One row, under the empty client id (no client has it).
                        tx.execute("DELETE FROM mqtt_client_versions WHERE client_id <> ''", [])?;
                        tx.execute(
                            "INSERT OR REPLACE INTO mqtt_client_versions (client_id, version) VALUES ('', ?1)",
                            rusqlite::params![*ceiling as i64],
                        )?;
                    }
                }
            }
            Ok(())
        })
    }
}

/// Reads the highest message sequence number in use, so new ones never collide.
pub fn max_sequence(loaded: &Loaded) -> u64 {
    loaded
        .messages
        .values()
        .flat_map(|v| v.iter().map(|(s, _)| *s))
        .max()
        .unwrap_or(0)
}

struct Batch {
    ops: Vec<StoreOp>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The group-commit writer in front of a [`BrokerStore`].
#[derive(Clone)]
pub struct Persister {
    tx: mpsc::UnboundedSender<Batch>,
}

impl Persister {
    /// Starts the writer thread.
    pub fn start(store: std::sync::Arc<dyn BrokerStore>) -> Persister {
        let (tx, mut rx) = mpsc::unbounded_channel::<Batch>();
        std::thread::Builder::new()
            .name("mqtt-persister".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batches = vec![first];
                    while batches.len() < 512 {
                        match rx.try_recv() {
                            Ok(b) => batches.push(b),
                            Err(_) => break,
                        }
                    }
                    let ops: Vec<StoreOp> =
                        batches.iter_mut().flat_map(|b| b.ops.drain(..)).collect();
                    let result = store.apply(&ops).map_err(|e| e.to_string());
                    if let Err(e) = &result {
                        tracing::error!(error = %e, ops = ops.len(), "persisting MQTT state failed");
                    }
                    for b in batches {
                        if let Some(done) = b.done {
                            let _ = done.send(result.clone());
                        }
                    }
                }
            })
            .expect("spawning the MQTT persister thread");
        Persister { tx }
    }

    /// Queues `ops` without waiting.
    pub fn submit(&self, ops: Vec<StoreOp>) {
        if ops.is_empty() {
            return;
        }
        let _ = self.tx.send(Batch { ops, done: None });
    }

    /// Queues `ops`; the receiver resolves once they are on disk.
    pub fn submit_durable(&self, ops: Vec<StoreOp>) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(Batch {
                ops,
                done: Some(done),
            })
            .is_err()
        {
            let (done, rx) = oneshot::channel();
            let _ = done.send(Err("the persister has stopped".into()));
            return rx;
        }
        rx
    }
}

/// Checks a loaded session row exists (used by tests).
pub fn session_exists(db: &Db, client_id: &str) -> StoreResult<bool> {
    let client_id = client_id.to_string();
    db.read_blocking(move |conn| {
        Ok(conn
            .query_row(
                "SELECT 1 FROM mqtt_sessions WHERE client_id = ?1",
                [client_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    })
}

impl From<StoreError> for crate::BrokerError {
    fn from(e: StoreError) -> Self {
        crate::BrokerError::Store(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn state_survives_reopen_and_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let message = StoredMessage {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: 1,
            retain: false,
            properties: MessageProperties {
                user_properties: vec![("k".into(), "v".into())],
                correlation_data: Some(vec![0, 1, 2]),
                ..Default::default()
            },
            expires_at_ms: Some(5),
        };
        {
            let store = Arc::new(SqliteBrokerStore::new(Db::open(&path).unwrap()).unwrap());
            let persister = Persister::start(store);
            let mut waits = Vec::new();
            for seq in 1..=20u64 {
                waits.push(persister.submit_durable(vec![StoreOp::PutMessage {
                    client_id: "c".into(),
                    seq,
                    message: message.clone(),
                }]));
            }
            persister.submit(vec![StoreOp::DeleteMessage {
                client_id: "c".into(),
                seq: 20,
            }]);
            let mut subs = BTreeMap::new();
            subs.insert(
                "x/#".to_string(),
                StoredSubscription {
                    qos: 1,
                    no_local: false,
                    retain_as_published: true,
                    retain_handling: 0,
                    subscription_id: None,
                },
            );
            waits.push(persister.submit_durable(vec![
                StoreOp::PutSession(StoredSession {
                    client_id: "c".into(),
                    session_id: "s".into(),
                    protocol_version: 4,
                    expiry_secs: 3600,
                    disconnected_ms: None,
                    subscriptions: subs,
                }),
                StoreOp::PutRetained(
                    StoredMessage {
                        retain: true,
                        ..message.clone()
                    },
                    7,
                ),
                StoreOp::PutVersionCeiling(3),
            ]));
            for w in waits {
                w.await.unwrap().unwrap();
            }
        }
        let store = SqliteBrokerStore::new(Db::open(&path).unwrap()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.messages["c"].len(), 19);
        assert_eq!(loaded.messages["c"][0].1, message);
        assert_eq!(max_sequence(&loaded), 19);
        assert_eq!(loaded.sessions[0].subscriptions["x/#"].qos, 1);
        assert_eq!(loaded.retained[0].0.payload, Bytes::from_static(b"hello"));
        assert_eq!(loaded.version_ceiling, 3);
        store.apply(&[StoreOp::DeleteSession("c".into())]).unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.sessions.is_empty() && loaded.messages.is_empty());
    }
}
