//! Thing groups: named sets of things that may nest (a parent and up to seven levels of
//! children), used above all to target jobs.
//!
//! [`ThingGroupRegistry`] persists groups and memberships in the metadata database before
//! answering and publishes every membership change on a feed ([`GroupChange`]) so that
//! CONTINUOUS jobs can reach things added to a target group later.

use std::collections::{BTreeMap, BTreeSet};

use mooring_core::store::StoreError;
use mooring_core::{Arns, Db};
use rusqlite::OptionalExtension;
use tokio::sync::broadcast;

use super::things::{
    validate_attributes, validate_registry_name, RegistryError, RegistryResult, ThingRegistry,
};

const MIGRATIONS: &[&str] = &["CREATE TABLE iot_thing_groups (
        name TEXT PRIMARY KEY,
        group_id TEXT NOT NULL,
        parent TEXT,
        description TEXT,
        attributes TEXT NOT NULL,
        version INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE iot_thing_group_members (
        group_name TEXT NOT NULL,
        thing_name TEXT NOT NULL,
        PRIMARY KEY (group_name, thing_name)
    );
    CREATE INDEX iot_thing_group_members_by_thing ON iot_thing_group_members (thing_name);"];

/// Depth limit of a group hierarchy (a root and six levels below it).
pub const MAX_DEPTH: usize = 7;
/// Groups a thing may belong to.
pub const MAX_GROUPS_PER_THING: usize = 10;

/// One thing group as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ThingGroup {
    pub name: String,
    pub id: String,
    pub arn: String,
    pub parent: Option<String>,
    pub description: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub created_ms: i64,
}

/// A membership change, for modules that follow groups (CONTINUOUS jobs).
#[derive(Debug, Clone, PartialEq)]
pub enum GroupChange {
    ThingAdded { group: String, thing: String },
    ThingRemoved { group: String, thing: String },
    GroupDeleted { group: String },
}

/// The inputs of CreateThingGroup after parsing.
#[derive(Debug, Clone, Default)]
pub struct NewThingGroup {
    pub parent: Option<String>,
    pub description: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

/// The registry of thing groups and their members.
#[derive(Clone)]
pub struct ThingGroupRegistry {
    db: Db,
    arns: Arns,
    things: ThingRegistry,
    changes: broadcast::Sender<GroupChange>,
}

type GroupRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
);

impl ThingGroupRegistry {
    pub fn open(db: Db, arns: Arns, things: ThingRegistry) -> Result<Self, StoreError> {
        db.migrate("iot_thing_groups", MIGRATIONS)?;
        let (changes, _) = broadcast::channel(4096);
        Ok(ThingGroupRegistry {
            db,
            arns,
            things,
            changes,
        })
    }

    /// The ARN of group `name`.
    pub fn arn(&self, name: &str) -> String {
        self.arns.arn("iot", &format!("thinggroup/{name}"))
    }

    /// Every membership change committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<GroupChange> {
        self.changes.subscribe()
    }

    fn group_from_row(&self, r: GroupRow) -> ThingGroup {
        ThingGroup {
            arn: self.arn(&r.0),
            name: r.0,
            id: r.1,
            parent: r.2,
            description: r.3,
            attributes: serde_json::from_str(&r.4).unwrap_or_default(),
            version: r.5,
            created_ms: r.6,
        }
    }

    /// The group called `name`, if any.
    pub async fn get(&self, name: &str) -> RegistryResult<Option<ThingGroup>> {
        let name = name.to_string();
        let row = self
            .db
            .read(move |conn| {
                conn.query_row(
                    "SELECT name, group_id, parent, description, attributes, version, created_ms
                     FROM iot_thing_groups WHERE name = ?1",
                    [&name],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    },
                )
                .optional()
                .map_err(Into::into)
            })
            .await?;
        Ok(row.map(|r| self.group_from_row(r)))
    }

    /// DescribeThingGroup: the group or ResourceNotFound.
    pub async fn describe(&self, name: &str) -> RegistryResult<ThingGroup> {
        self.get(name)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("Thing group {name} cannot be found.")))
    }

    /// The chain from the root down to `name`'s parent.
    pub async fn ancestors(&self, name: &str) -> RegistryResult<Vec<ThingGroup>> {
        let mut chain = Vec::new();
        let mut current = self.describe(name).await?.parent;
        while let Some(parent) = current {
            let group = self.describe(&parent).await?;
            current = group.parent.clone();
            chain.push(group);
            if chain.len() > MAX_DEPTH {
                break;
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// CreateThingGroup. Creating a group again with the same configuration returns it.
    pub async fn create(&self, name: &str, new: NewThingGroup) -> RegistryResult<ThingGroup> {
        validate_registry_name("thingGroupName", name)?;
        validate_attributes(&new.attributes)?;
        if let Some(existing) = self.get(name).await? {
            if existing.parent == new.parent
                && existing.description == new.description
                && existing.attributes == new.attributes
            {
                return Ok(existing);
            }
            return Err(RegistryError::AlreadyExists {
                message: format!("Thing Group {name} already exists with different properties"),
                id: existing.id,
                arn: existing.arn,
            });
        }
        if let Some(parent) = &new.parent {
            self.describe(parent).await?;
            if self.ancestors(parent).await?.len() + 2 > MAX_DEPTH {
                return Err(RegistryError::InvalidRequest(format!(
                    "Thing group hierarchy cannot be deeper than {MAX_DEPTH} levels"
                )));
            }
        }
        let group = ThingGroup {
            name: name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            arn: self.arn(name),
            parent: new.parent,
            description: new.description,
            attributes: new.attributes,
            version: 1,
            created_ms: now_ms(),
        };
        let row = group.clone();
        self.db
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO iot_thing_groups
                     (name, group_id, parent, description, attributes, version, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    rusqlite::params![
                        row.name,
                        row.id,
                        row.parent,
                        row.description,
                        serde_json::to_string(&row.attributes).unwrap_or_default(),
                        row.version,
                        row.created_ms
                    ],
                )?;
                Ok(())
            })
            .await?;
        Ok(group)
    }

    /// DeleteThingGroup: missing groups succeed; a group with child groups cannot go.
    pub async fn delete(&self, name: &str, expected_version: Option<i64>) -> RegistryResult<()> {
        let Some(group) = self.get(name).await? else {
            return Ok(());
        };
        if let Some(expected) = expected_version {
            if expected != group.version {
                return Err(RegistryError::VersionConflict(format!(
                    "The version of thing group {name} does not match the expected version."
                )));
            }
        }
        if !self.children(name).await?.is_empty() {
            return Err(RegistryError::InvalidRequest(format!(
                "Cannot delete thing group {name}: it has child groups"
            )));
        }
        let members = self.direct_members(name).await?;
        let key = name.to_string();
        self.db
            .write(move |conn| {
                conn.execute(
                    "DELETE FROM iot_thing_group_members WHERE group_name = ?1",
                    [&key],
                )?;
                conn.execute("DELETE FROM iot_thing_groups WHERE name = ?1", [&key])?;
                Ok(())
            })
            .await?;
        for thing in members {
            let _ = self.changes.send(GroupChange::ThingRemoved {
                group: name.to_string(),
                thing,
            });
        }
        let _ = self.changes.send(GroupChange::GroupDeleted {
            group: name.to_string(),
        });
        Ok(())
    }

    /// Direct children of `name`.
    pub async fn children(&self, name: &str) -> RegistryResult<Vec<String>> {
        let name = name.to_string();
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn
                    .prepare("SELECT name FROM iot_thing_groups WHERE parent = ?1 ORDER BY name")?;
                let rows = stmt
                    .query_map([&name], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// `name` and every group below it.
    pub async fn subtree(&self, name: &str) -> RegistryResult<Vec<String>> {
        let mut out = vec![name.to_string()];
        let mut index = 0;
        while index < out.len() {
            let children = self.children(&out[index]).await?;
            out.extend(children);
            index += 1;
        }
        Ok(out)
    }

    /// ListThingGroups: groups in name order, optionally children of `parent` (recursively
    /// with `recursive`) or names starting with `prefix`.
    pub async fn list(
        &self,
        parent: Option<String>,
        prefix: Option<String>,
        recursive: bool,
    ) -> RegistryResult<Vec<ThingGroup>> {
        let rows: Vec<GroupRow> = self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT name, group_id, parent, description, attributes, version, created_ms
                     FROM iot_thing_groups ORDER BY name",
                )?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await?;
        let all: Vec<ThingGroup> = rows.into_iter().map(|r| self.group_from_row(r)).collect();
        let allowed: Option<BTreeSet<String>> = match &parent {
            None => None,
            Some(p) => {
                self.describe(p).await?;
                let mut set: BTreeSet<String> = if recursive {
                    self.subtree(p).await?.into_iter().collect()
                } else {
                    self.children(p).await?.into_iter().collect()
                };
                set.remove(p);
                Some(set)
            }
        };
        Ok(all
            .into_iter()
            .filter(|g| allowed.as_ref().is_none_or(|a| a.contains(&g.name)))
            .filter(|g| prefix.as_deref().is_none_or(|p| g.name.starts_with(p)))
            .collect())
    }

    /// AddThingToThingGroup.
    pub async fn add_thing(&self, group: &str, thing: &str) -> RegistryResult<()> {
        self.describe(group).await?;
        self.things.describe(thing).await?;
        let groups = self.groups_of_thing(thing).await?;
        if groups.iter().any(|g| g == group) {
            return Ok(());
        }
        if groups.len() >= MAX_GROUPS_PER_THING {
            return Err(RegistryError::InvalidRequest(format!(
                "Thing {thing} cannot be in more than {MAX_GROUPS_PER_THING} thing groups"
            )));
        }
        let (g, t) = (group.to_string(), thing.to_string());
        self.db
            .write(move |conn| {
                conn.execute(
                    "INSERT OR IGNORE INTO iot_thing_group_members (group_name, thing_name)
                     VALUES (?1, ?2)",
                    [&g, &t],
                )?;
                Ok(())
            })
            .await?;
        let _ = self.changes.send(GroupChange::ThingAdded {
            group: group.to_string(),
            thing: thing.to_string(),
        });
        Ok(())
    }

    /// RemoveThingFromThingGroup.
    pub async fn remove_thing(&self, group: &str, thing: &str) -> RegistryResult<()> {
        self.describe(group).await?;
        self.things.describe(thing).await?;
        let (g, t) = (group.to_string(), thing.to_string());
        let removed = self
            .db
            .write(move |conn| {
                Ok(conn.execute(
                    "DELETE FROM iot_thing_group_members WHERE group_name = ?1 AND thing_name = ?2",
                    [&g, &t],
                )?)
            })
            .await?;
        if removed > 0 {
            let _ = self.changes.send(GroupChange::ThingRemoved {
                group: group.to_string(),
                thing: thing.to_string(),
            });
        }
        Ok(())
    }

    /// Drops every membership of a deleted thing.
    pub async fn forget_thing(&self, thing: &str) -> RegistryResult<()> {
        for group in self.groups_of_thing(thing).await? {
            let (g, t) = (group.clone(), thing.to_string());
            self.db
                .write(move |conn| {
                    conn.execute(
                        "DELETE FROM iot_thing_group_members WHERE group_name = ?1 AND thing_name = ?2",
                        [&g, &t],
                    )?;
                    Ok(())
                })
                .await?;
            let _ = self.changes.send(GroupChange::ThingRemoved {
                group,
                thing: thing.to_string(),
            });
        }
        Ok(())
    }

    /// The groups `thing` belongs to directly, in name order.
    pub async fn groups_of_thing(&self, thing: &str) -> RegistryResult<Vec<String>> {
        let thing = thing.to_string();
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT group_name FROM iot_thing_group_members WHERE thing_name = ?1
                     ORDER BY group_name",
                )?;
                let rows = stmt
                    .query_map([&thing], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// The things directly in `group`, in name order.
    pub async fn direct_members(&self, group: &str) -> RegistryResult<Vec<String>> {
        let group = group.to_string();
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT thing_name FROM iot_thing_group_members WHERE group_name = ?1
                     ORDER BY thing_name",
                )?;
                let rows = stmt
                    .query_map([&group], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// ListThingsInThingGroup: things in `group` (and its descendants with `recursive`),
    /// deduplicated, in name order.
    pub async fn things_in(&self, group: &str, recursive: bool) -> RegistryResult<Vec<String>> {
        self.describe(group).await?;
        let groups = if recursive {
            self.subtree(group).await?
        } else {
            vec![group.to_string()]
        };
        let mut things = BTreeSet::new();
        for g in groups {
            things.extend(self.direct_members(&g).await?);
        }
        Ok(things.into_iter().collect())
    }

    /// Whether `thing` is in `group` or one of its descendants.
    pub async fn contains(&self, group: &str, thing: &str) -> RegistryResult<bool> {
        let mine: BTreeSet<String> = self.groups_of_thing(thing).await?.into_iter().collect();
        if mine.is_empty() || self.get(group).await?.is_none() {
            return Ok(false);
        }
        Ok(self.subtree(group).await?.iter().any(|g| mine.contains(g)))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::things::NewThing;

    async fn registries() -> (ThingRegistry, ThingGroupRegistry) {
        let db = Db::open_in_memory().unwrap();
        let arns = Arns::new("123456789012", "us-east-1");
        let things = ThingRegistry::open(db.clone(), arns.clone()).unwrap();
        let groups = ThingGroupRegistry::open(db, arns, things.clone()).unwrap();
        (things, groups)
    }

    #[tokio::test]
    async fn nested_groups_membership_and_feed() {
        let (things, groups) = registries().await;
        for t in ["a", "b", "c"] {
            things.create(t, NewThing::default()).await.unwrap();
        }
        groups
            .create("root", NewThingGroup::default())
            .await
            .unwrap();
        groups
            .create(
                "child",
                NewThingGroup {
                    parent: Some("root".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut feed = groups.subscribe();
        groups.add_thing("root", "a").await.unwrap();
        groups.add_thing("child", "b").await.unwrap();
        groups.add_thing("child", "b").await.unwrap();
        assert_eq!(
            feed.recv().await.unwrap(),
            GroupChange::ThingAdded {
                group: "root".into(),
                thing: "a".into()
            }
        );
        assert_eq!(groups.things_in("root", false).await.unwrap(), vec!["a"]);
        assert_eq!(
            groups.things_in("root", true).await.unwrap(),
            vec!["a", "b"]
        );
        assert!(groups.contains("root", "b").await.unwrap());
        assert!(!groups.contains("child", "a").await.unwrap());
        assert_eq!(groups.ancestors("child").await.unwrap()[0].name, "root");
        assert!(matches!(
            groups.delete("root", None).await,
            Err(RegistryError::InvalidRequest(_))
        ));
        groups.remove_thing("child", "b").await.unwrap();
        assert!(!groups.contains("root", "b").await.unwrap());
        assert!(matches!(
            groups.add_thing("nope", "a").await,
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            groups.add_thing("root", "zz").await,
            Err(RegistryError::NotFound(_))
        ));
        let listed = groups.list(Some("root".into()), None, false).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "child");
    }
}
