//! Things: one registry record per device, with its attributes, optional thing type and
//! a version that every update increments.
//!
//! [`ThingRegistry`] holds the rules AWS IoT applies (name and attribute syntax, the
//! three-attribute limit for things without a type, `expectedVersion` checks, identical
//! re-creation succeeding) and persists every change in the metadata database before the
//! API answers. Other modules learn of changes through [`ThingRegistry::subscribe`].

use std::collections::BTreeMap;

use mooring_core::store::{StoreError, StoreResult};
use mooring_core::{Arns, Db};
use rusqlite::OptionalExtension;
use tokio::sync::broadcast;

const MIGRATIONS: &[&str] = &["CREATE TABLE iot_things (
        name TEXT PRIMARY KEY,
        thing_id TEXT NOT NULL,
        thing_type TEXT,
        attributes TEXT NOT NULL,
        version INTEGER NOT NULL,
        billing_group TEXT,
        created_ms INTEGER NOT NULL
    )"];

/// Attributes a thing without a thing type may carry.
pub const MAX_ATTRIBUTES_WITHOUT_TYPE: usize = 3;

/// One thing as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Thing {
    pub name: String,
    pub id: String,
    pub arn: String,
    pub thing_type_name: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub billing_group_name: Option<String>,
    pub created_ms: i64,
}

/// What happened to a thing, for modules that follow the registry.
#[derive(Debug, Clone, PartialEq)]
pub enum ThingChange {
    Created(Thing),
    Updated(Thing),
    Deleted(Thing),
}

/// Why a registry operation failed; the API maps each to AWS's exception.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryError {
    InvalidRequest(String),
    NotFound(String),
    AlreadyExists {
        message: String,
        id: String,
        arn: String,
    },
    VersionConflict(String),
    Store(String),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::InvalidRequest(m)
            | RegistryError::NotFound(m)
            | RegistryError::VersionConflict(m)
            | RegistryError::Store(m) => f.write_str(m),
            RegistryError::AlreadyExists { message, .. } => f.write_str(message),
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        RegistryError::Store(e.to_string())
    }
}

pub type RegistryResult<T> = Result<T, RegistryError>;

/// The inputs of CreateThing after parsing.
#[derive(Debug, Clone, Default)]
pub struct NewThing {
    pub thing_type_name: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub billing_group_name: Option<String>,
}

/// The inputs of UpdateThing after parsing.
#[derive(Debug, Clone, Default)]
pub struct ThingUpdate {
    pub thing_type_name: Option<String>,
    pub remove_thing_type: bool,
    pub attributes: Option<BTreeMap<String, String>>,
    pub merge: bool,
    pub expected_version: Option<i64>,
}

/// Filters of ListThings.
#[derive(Debug, Clone, Default)]
pub struct ThingFilter {
    pub attribute_name: Option<String>,
    pub attribute_value: Option<String>,
    pub use_prefix_attribute_value: bool,
    pub thing_type_name: Option<String>,
}

/// A page of ListThings.
#[derive(Debug, Clone)]
pub struct ThingPage {
    pub things: Vec<Thing>,
    pub next_token: Option<String>,
}

/// Checks a thing, thing group or thing type name: `[a-zA-Z0-9:_-]+`, 1 to 128 characters.
pub fn validate_registry_name(field: &str, name: &str) -> RegistryResult<()> {
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(RegistryError::InvalidRequest(format!(
            "1 validation error detected: Value '{name}' at '{field}' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9:_-]+"
        )))
    }
}

/// Checks attribute names (`[a-zA-Z0-9_.,@/:#-]+`, at most 128) and values
/// (`[a-zA-Z0-9_.,@/:#=\[\]-]*`, at most 800).
pub fn validate_attributes(attributes: &BTreeMap<String, String>) -> RegistryResult<()> {
    for (name, value) in attributes {
        let name_ok = (1..=128).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.,@/:#-".contains(&b));
        if !name_ok {
            return Err(RegistryError::InvalidRequest(format!(
                "Attribute name '{name}' must satisfy regular expression pattern: [a-zA-Z0-9_.,@/:#-]+ and be at most 128 characters"
            )));
        }
        let value_ok = value.len() <= 800
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.,@/:#=[]-".contains(&b));
        if !value_ok {
            return Err(RegistryError::InvalidRequest(format!(
                "Attribute value '{value}' must satisfy regular expression pattern: [a-zA-Z0-9_.,@/:#=\\[\\]-]* and be at most 800 characters"
            )));
        }
    }
    Ok(())
}

/// The registry of things on the shared metadata database.
#[derive(Clone)]
pub struct ThingRegistry {
    db: Db,
    arns: Arns,
    changes: broadcast::Sender<ThingChange>,
}

impl ThingRegistry {
    pub fn open(db: Db, arns: Arns) -> Result<ThingRegistry, StoreError> {
        db.migrate("iot_things", MIGRATIONS)?;
        let (changes, _) = broadcast::channel(1024);
        Ok(ThingRegistry { db, arns, changes })
    }

    /// The ARN of thing `name`.
    pub fn arn(&self, name: &str) -> String {
        self.arns.arn("iot", &format!("thing/{name}"))
    }

    /// Every change committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ThingChange> {
        self.changes.subscribe()
    }

    fn row_to_thing(&self, row: &rusqlite::Row<'_>) -> rusqlite::Result<Thing> {
        let name: String = row.get(0)?;
        let attributes: String = row.get(3)?;
        Ok(Thing {
            arn: self.arn(&name),
            name,
            id: row.get(1)?,
            thing_type_name: row.get(2)?,
            attributes: serde_json::from_str(&attributes).unwrap_or_default(),
            version: row.get(4)?,
            billing_group_name: row.get(5)?,
            created_ms: row.get(6)?,
        })
    }

    fn select_thing(&self, conn: &rusqlite::Connection, name: &str) -> StoreResult<Option<Thing>> {
        conn.query_row(
            "SELECT name, thing_id, thing_type, attributes, version, billing_group, created_ms
             FROM iot_things WHERE name = ?1",
            [name],
            |row| self.row_to_thing(row),
        )
        .optional()
        .map_err(Into::into)
    }

    /// The thing called `name`, if any.
    pub async fn get(&self, name: &str) -> RegistryResult<Option<Thing>> {
        let this = self.clone();
        let name = name.to_string();
        Ok(self
            .db
            .read(move |conn| this.select_thing(conn, &name))
            .await?)
    }

    /// [`ThingRegistry::get`] on the calling thread, for the rules engine's synchronous SQL
    /// functions (`get_registry_data`).
    pub fn get_blocking(&self, name: &str) -> RegistryResult<Option<Thing>> {
        Ok(self
            .db
            .read_blocking(|conn| self.select_thing(conn, name))?)
    }

    /// DescribeThing: the thing or ResourceNotFound.
    pub async fn describe(&self, name: &str) -> RegistryResult<Thing> {
        self.get(name)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("Thing {name} cannot be found.")))
    }

    /// CreateThing. Creating a thing again with the same configuration returns it.
    pub async fn create(&self, name: &str, new: NewThing) -> RegistryResult<Thing> {
        validate_registry_name("thingName", name)?;
        validate_attributes(&new.attributes)?;
        if let Some(t) = &new.thing_type_name {
            return Err(RegistryError::NotFound(format!(
                "Thing type {t} cannot be found."
            )));
        }
        if new.attributes.len() > MAX_ATTRIBUTES_WITHOUT_TYPE {
            return Err(RegistryError::InvalidRequest(format!(
                "A thing without a thing type can have at most {MAX_ATTRIBUTES_WITHOUT_TYPE} attributes"
            )));
        }
        if let Some(existing) = self.get(name).await? {
            if existing.thing_type_name == new.thing_type_name
                && existing.attributes == new.attributes
                && existing.billing_group_name == new.billing_group_name
            {
                return Ok(existing);
            }
            return Err(RegistryError::AlreadyExists {
                message: format!(
                    "Thing {name} already exists in account with different attributes"
                ),
                id: existing.id,
                arn: existing.arn,
            });
        }
        let thing = Thing {
            name: name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            arn: self.arn(name),
            thing_type_name: new.thing_type_name,
            attributes: new.attributes,
            version: 1,
            billing_group_name: new.billing_group_name,
            created_ms: chrono_ms(),
        };
        let row = thing.clone();
        let inserted = self
            .db
            .write(move |conn| {
                Ok(conn.execute(
                    "INSERT OR IGNORE INTO iot_things
                     (name, thing_id, thing_type, attributes, version, billing_group, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    rusqlite::params![
                        row.name,
                        row.id,
                        row.thing_type_name,
                        serde_json::to_string(&row.attributes).unwrap_or_default(),
                        row.version,
                        row.billing_group_name,
                        row.created_ms
                    ],
                )?)
            })
            .await?;
        if inserted == 0 {
            // A concurrent CreateThing won the race; answer as if it came first.
            return Box::pin(self.create(
                name,
                NewThing {
                    thing_type_name: thing.thing_type_name,
                    attributes: thing.attributes,
                    billing_group_name: thing.billing_group_name,
                },
            ))
            .await;
        }
        let _ = self.changes.send(ThingChange::Created(thing.clone()));
        Ok(thing)
    }

    /// UpdateThing.
    pub async fn update(&self, name: &str, update: ThingUpdate) -> RegistryResult<Thing> {
        let mut thing = self.describe(name).await?;
        if let Some(expected) = update.expected_version {
            if expected != thing.version {
                return Err(RegistryError::VersionConflict(format!(
                    "The version of thing {name} with Id {} does not match the expected version.",
                    thing.id
                )));
            }
        }
        if let Some(t) = &update.thing_type_name {
            return Err(RegistryError::NotFound(format!(
                "Thing type {t} cannot be found."
            )));
        }
        if update.remove_thing_type {
            thing.thing_type_name = None;
        }
        if let Some(attributes) = update.attributes {
            if update.merge {
                for (k, v) in attributes {
                    if v.is_empty() {
                        thing.attributes.remove(&k);
                    } else {
                        thing.attributes.insert(k, v);
                    }
                }
            } else {
                thing.attributes = attributes
                    .into_iter()
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
            }
        }
        validate_attributes(&thing.attributes)?;
        if thing.thing_type_name.is_none() && thing.attributes.len() > MAX_ATTRIBUTES_WITHOUT_TYPE {
            return Err(RegistryError::InvalidRequest(format!(
                "A thing without a thing type can have at most {MAX_ATTRIBUTES_WITHOUT_TYPE} attributes"
            )));
        }
        let previous = thing.version;
        thing.version += 1;
        let row = thing.clone();
        let changed = self
            .db
            .write(move |conn| {
                Ok(conn.execute(
                    "UPDATE iot_things SET thing_type = ?2, attributes = ?3, version = ?4
                     WHERE name = ?1 AND version = ?5",
                    rusqlite::params![
                        row.name,
                        row.thing_type_name,
                        serde_json::to_string(&row.attributes).unwrap_or_default(),
                        row.version,
                        previous
                    ],
                )?)
            })
            .await?;
        if changed == 0 {
            return Err(RegistryError::VersionConflict(format!(
                "The version of thing {name} changed during the update; retry."
            )));
        }
        let _ = self.changes.send(ThingChange::Updated(thing.clone()));
        Ok(thing)
    }

    /// DeleteThing. Deleting a thing that does not exist succeeds.
    pub async fn delete(&self, name: &str, expected_version: Option<i64>) -> RegistryResult<()> {
        let Some(thing) = self.get(name).await? else {
            return Ok(());
        };
        if let Some(expected) = expected_version {
            if expected != thing.version {
                return Err(RegistryError::VersionConflict(format!(
                    "The version of thing {name} with Id {} does not match the expected version.",
                    thing.id
                )));
            }
        }
        let key = thing.name.clone();
        self.db
            .write(move |conn| Ok(conn.execute("DELETE FROM iot_things WHERE name = ?1", [key])?))
            .await?;
        let _ = self.changes.send(ThingChange::Deleted(thing));
        Ok(())
    }

    /// ListThings: things in name order after `next_token`, filtered.
    pub async fn list(
        &self,
        filter: ThingFilter,
        max_results: usize,
        next_token: Option<String>,
    ) -> RegistryResult<ThingPage> {
        let this = self.clone();
        let after = next_token.unwrap_or_default();
        let rows: Vec<Thing> = self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT name, thing_id, thing_type, attributes, version, billing_group, created_ms
                     FROM iot_things WHERE name > ?1 ORDER BY name",
                )?;
                let things = stmt
                    .query_map([&after], |row| this.row_to_thing(row))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(things)
            })
            .await?;
        let mut things = Vec::new();
        let mut next_token = None;
        for thing in rows.into_iter().filter(|t| filter.admits(t)) {
            if things.len() == max_results {
                next_token = things.last().map(|t: &Thing| t.name.clone());
                break;
            }
            things.push(thing);
        }
        Ok(ThingPage { things, next_token })
    }
}

impl ThingFilter {
    fn admits(&self, thing: &Thing) -> bool {
        if let Some(t) = &self.thing_type_name {
            if thing.thing_type_name.as_ref() != Some(t) {
                return false;
            }
        }
        match (&self.attribute_name, &self.attribute_value) {
            (Some(name), value) => match thing.attributes.get(name) {
                None => false,
                Some(v) => match value {
                    None => true,
                    Some(want) if self.use_prefix_attribute_value => v.starts_with(want.as_str()),
                    Some(want) => v == want,
                },
            },
            (None, Some(want)) => thing.attributes.values().any(|v| {
                if self.use_prefix_attribute_value {
                    v.starts_with(want.as_str())
                } else {
                    v == want
                }
            }),
            (None, None) => true,
        }
    }
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> ThingRegistry {
        ThingRegistry::open(
            Db::open_in_memory().unwrap(),
            Arns::new("123456789012", "us-east-1"),
        )
        .unwrap()
    }

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn create_describe_update_delete() {
        let r = registry();
        let mut changes = r.subscribe();
        let t = r
            .create(
                "dev-1",
                NewThing {
                    attributes: attrs(&[("color", "red")]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(t.arn, "arn:aws:iot:us-east-1:123456789012:thing/dev-1");
        assert_eq!(t.version, 1);
        assert!(matches!(
            changes.recv().await.unwrap(),
            ThingChange::Created(_)
        ));
        // identical repeat succeeds with the same id; a different one conflicts
        let again = r
            .create(
                "dev-1",
                NewThing {
                    attributes: attrs(&[("color", "red")]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(again.id, t.id);
        let err = r.create("dev-1", NewThing::default()).await.unwrap_err();
        assert!(matches!(err, RegistryError::AlreadyExists { .. }));

        let updated = r
            .update(
                "dev-1",
                ThingUpdate {
                    attributes: Some(attrs(&[("color", ""), ("size", "xl")])),
                    merge: true,
                    expected_version: Some(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(updated.attributes, attrs(&[("size", "xl")]));
        assert_eq!(updated.version, 2);
        let conflict = r
            .update(
                "dev-1",
                ThingUpdate {
                    expected_version: Some(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(conflict, RegistryError::VersionConflict(_)));
        assert!(matches!(
            r.delete("dev-1", Some(7)).await.unwrap_err(),
            RegistryError::VersionConflict(_)
        ));
        r.delete("dev-1", Some(2)).await.unwrap();
        r.delete("dev-1", None).await.unwrap();
        assert!(matches!(
            r.describe("dev-1").await.unwrap_err(),
            RegistryError::NotFound(_)
        ));
    }

    #[tokio::test]
    async fn validation_and_listing() {
        let r = registry();
        assert!(r.create("bad name", NewThing::default()).await.is_err());
        assert!(r
            .create(
                "four",
                NewThing {
                    attributes: attrs(&[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")]),
                    ..Default::default()
                }
            )
            .await
            .is_err());
        for (name, floor) in [("a", "1"), ("b", "2"), ("c", "10")] {
            r.create(
                name,
                NewThing {
                    attributes: attrs(&[("floor", floor)]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let page = r.list(ThingFilter::default(), 2, None).await.unwrap();
        assert_eq!(
            page.things
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        let rest = r
            .list(ThingFilter::default(), 2, page.next_token)
            .await
            .unwrap();
        assert_eq!(rest.things.len(), 1);
        assert!(rest.next_token.is_none());
        let prefixed = r
            .list(
                ThingFilter {
                    attribute_name: Some("floor".into()),
                    attribute_value: Some("1".into()),
                    use_prefix_attribute_value: true,
                    ..Default::default()
                },
                100,
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            prefixed
                .things
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
    }
}
