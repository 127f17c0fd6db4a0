//! Persistence of certificates, policies and attachments behind [`SecurityStore`], with the
//! implementation on core's metadata database. Every change is committed before the API
//! answers; the whole state is read once at start-up into the in-memory index the broker's
//! authorizer consults.

use mooring_core::store::StoreError;
use mooring_core::Db;
use rusqlite::params;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE iot_certificates (
        certificate_id TEXT PRIMARY KEY,
        certificate_pem TEXT NOT NULL,
        ca_certificate_id TEXT,
        status TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        modified_ms INTEGER NOT NULL,
        customer_version INTEGER NOT NULL,
        generation_id TEXT NOT NULL
    );
    CREATE TABLE iot_policies (
        name TEXT PRIMARY KEY,
        document TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        modified_ms INTEGER NOT NULL,
        generation_id TEXT NOT NULL
    );
    CREATE TABLE iot_policy_targets (
        policy TEXT NOT NULL,
        target TEXT NOT NULL,
        PRIMARY KEY (policy, target)
    );
    CREATE TABLE iot_thing_principals (
        thing TEXT NOT NULL,
        principal TEXT NOT NULL,
        principal_type TEXT NOT NULL,
        PRIMARY KEY (thing, principal)
    )",
    // Policy versions: every version's document (iot_policies.document stays the default
    // one's), the default version's id and the highest id handed out (ids are never reused).
    "CREATE TABLE iot_policy_versions (
        policy TEXT NOT NULL,
        version_id INTEGER NOT NULL,
        document TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (policy, version_id)
    );
    ALTER TABLE iot_policies ADD COLUMN default_version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE iot_policies ADD COLUMN last_version INTEGER NOT NULL DEFAULT 1;
    INSERT INTO iot_policy_versions (policy, version_id, document, created_ms)
        SELECT name, 1, document, created_ms FROM iot_policies",
];

/// A certificate row.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateRow {
    pub id: String,
    pub pem: String,
    pub ca_certificate_id: Option<String>,
    pub status: String,
    pub created_ms: i64,
    pub modified_ms: i64,
    pub customer_version: i64,
    pub generation_id: String,
}

/// A policy row, with its versions.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRow {
    pub name: String,
    /// The default version's document.
    pub document: String,
    pub created_ms: i64,
    pub modified_ms: i64,
    pub generation_id: String,
    pub default_version: i64,
    /// The highest version id handed out.
    pub last_version: i64,
    pub versions: Vec<PolicyVersionRow>,
}

/// One version of a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVersionRow {
    pub id: i64,
    pub document: String,
    pub created_ms: i64,
}

/// Everything stored, as read at start-up.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub certificates: Vec<CertificateRow>,
    pub policies: Vec<PolicyRow>,
    /// (policy, target)
    pub policy_targets: Vec<(String, String)>,
    /// (thing, principal, type)
    pub thing_principals: Vec<(String, String, String)>,
}

/// One change to the stored security state.
#[derive(Debug, Clone)]
pub enum SecurityOp {
    PutCertificate(CertificateRow),
    DeleteCertificate(String),
    /// Writes the policy and replaces its versions.
    PutPolicy(PolicyRow),
    DeletePolicy(String),
    Attach {
        policy: String,
        target: String,
    },
    Detach {
        policy: String,
        target: String,
    },
    AttachThing {
        thing: String,
        principal: String,
        kind: String,
    },
    DetachThing {
        thing: String,
        principal: String,
    },
    DetachAllFromThing(String),
}

/// Where the security state lives.
pub trait SecurityStore: Send + Sync + 'static {
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Applies `ops` atomically.
    fn apply(&self, ops: &[SecurityOp]) -> Result<(), StoreError>;
}

/// [`SecurityStore`] on the metadata database.
#[derive(Clone)]
pub struct SqliteSecurityStore {
    db: Db,
}

impl SqliteSecurityStore {
    pub fn open(db: Db) -> Result<SqliteSecurityStore, StoreError> {
        db.migrate("iot_security", MIGRATIONS)?;
        Ok(SqliteSecurityStore { db })
    }
}

impl SecurityStore for SqliteSecurityStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        self.db.read_blocking(|conn| {
            let mut loaded = Loaded::default();
            let mut stmt = conn.prepare(
                "SELECT certificate_id, certificate_pem, ca_certificate_id, status, created_ms,
                        modified_ms, customer_version, generation_id FROM iot_certificates",
            )?;
            loaded.certificates = stmt
                .query_map([], |r| {
                    Ok(CertificateRow {
                        id: r.get(0)?,
                        pem: r.get(1)?,
                        ca_certificate_id: r.get(2)?,
                        status: r.get(3)?,
                        created_ms: r.get(4)?,
                        modified_ms: r.get(5)?,
                        customer_version: r.get(6)?,
                        generation_id: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut stmt = conn.prepare(
                "SELECT name, document, created_ms, modified_ms, generation_id, default_version,
                        last_version FROM iot_policies",
            )?;
            loaded.policies = stmt
                .query_map([], |r| {
                    Ok(PolicyRow {
                        name: r.get(0)?,
                        document: r.get(1)?,
                        created_ms: r.get(2)?,
                        modified_ms: r.get(3)?,
                        generation_id: r.get(4)?,
                        default_version: r.get(5)?,
                        last_version: r.get(6)?,
                        versions: Vec::new(),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut stmt = conn.prepare(
                "SELECT policy, version_id, document, created_ms FROM iot_policy_versions
                 ORDER BY policy, version_id",
            )?;
            let versions = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        PolicyVersionRow {
                            id: r.get(1)?,
                            document: r.get(2)?,
                            created_ms: r.get(3)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut by_policy: std::collections::HashMap<String, Vec<PolicyVersionRow>> =
                std::collections::HashMap::new();
            for (policy, version) in versions {
                by_policy.entry(policy).or_default().push(version);
            }
            for policy in &mut loaded.policies {
                policy.versions = by_policy.remove(&policy.name).unwrap_or_default();
            }
            let mut stmt = conn.prepare("SELECT policy, target FROM iot_policy_targets")?;
            loaded.policy_targets = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut stmt =
                conn.prepare("SELECT thing, principal, principal_type FROM iot_thing_principals")?;
            loaded.thing_principals = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(loaded)
        })
    }

    fn apply(&self, ops: &[SecurityOp]) -> Result<(), StoreError> {
        self.db.write_blocking(|tx| {
            for op in ops {
                match op {
                    SecurityOp::PutCertificate(c) => {
                        tx.execute(
                            "INSERT OR REPLACE INTO iot_certificates (certificate_id, certificate_pem,
                             ca_certificate_id, status, created_ms, modified_ms, customer_version,
                             generation_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                            params![
                                c.id,
                                c.pem,
                                c.ca_certificate_id,
                                c.status,
                                c.created_ms,
                                c.modified_ms,
                                c.customer_version,
                                c.generation_id
                            ],
                        )?;
                    }
                    SecurityOp::DeleteCertificate(id) => {
                        tx.execute(
                            "DELETE FROM iot_certificates WHERE certificate_id = ?1",
                            [id],
                        )?;
                    }
                    SecurityOp::PutPolicy(p) => {
                        tx.execute(
                            "INSERT OR REPLACE INTO iot_policies (name, document, created_ms,
                             modified_ms, generation_id, default_version, last_version)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            params![
                                p.name,
                                p.document,
                                p.created_ms,
                                p.modified_ms,
                                p.generation_id,
                                p.default_version,
                                p.last_version
                            ],
                        )?;
                        tx.execute("DELETE FROM iot_policy_versions WHERE policy = ?1", [&p.name])?;
                        for v in &p.versions {
                            tx.execute(
                                "INSERT INTO iot_policy_versions (policy, version_id, document,
                                 created_ms) VALUES (?1, ?2, ?3, ?4)",
                                params![p.name, v.id, v.document, v.created_ms],
                            )?;
                        }
                    }
                    SecurityOp::DeletePolicy(name) => {
                        tx.execute("DELETE FROM iot_policies WHERE name = ?1", [name])?;
                        tx.execute("DELETE FROM iot_policy_versions WHERE policy = ?1", [name])?;
                    }
                    SecurityOp::Attach { policy, target } => {
                        tx.execute(
                            "INSERT OR IGNORE INTO iot_policy_targets (policy, target) VALUES (?1, ?2)",
                            [policy, target],
                        )?;
                    }
                    SecurityOp::Detach { policy, target } => {
                        tx.execute(
                            "DELETE FROM iot_policy_targets WHERE policy = ?1 AND target = ?2",
                            [policy, target],
                        )?;
                    }
                    SecurityOp::AttachThing {
                        thing,
                        principal,
                        kind,
                    } => {
                        tx.execute(
                            "INSERT OR REPLACE INTO iot_thing_principals (thing, principal, principal_type)
                             VALUES (?1, ?2, ?3)",
                            [thing, principal, kind],
                        )?;
                    }
                    SecurityOp::DetachThing { thing, principal } => {
                        tx.execute(
                            "DELETE FROM iot_thing_principals WHERE thing = ?1 AND principal = ?2",
                            [thing, principal],
                        )?;
                    }
                    SecurityOp::DetachAllFromThing(thing) => {
                        tx.execute("DELETE FROM iot_thing_principals WHERE thing = ?1", [thing])?;
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_stored_before_versions_existed_become_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            // The schema as the first migration left it, with one policy.
            let db = Db::open(&path).unwrap();
            db.migrate("iot_security", &MIGRATIONS[..1]).unwrap();
            db.write_blocking(|tx| {
                tx.execute(
                    "INSERT INTO iot_policies (name, document, created_ms, modified_ms,
                     generation_id) VALUES ('old', '{\"doc\":1}', 5, 6, 'g')",
                    [],
                )?;
                Ok(())
            })
            .unwrap();
        }
        let store = SqliteSecurityStore::open(Db::open(&path).unwrap()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded.policies,
            vec![PolicyRow {
                name: "old".into(),
                document: "{\"doc\":1}".into(),
                created_ms: 5,
                modified_ms: 6,
                generation_id: "g".into(),
                default_version: 1,
                last_version: 1,
                versions: vec![PolicyVersionRow {
                    id: 1,
                    document: "{\"doc\":1}".into(),
                    created_ms: 5,
                }],
            }]
        );
    }
}
