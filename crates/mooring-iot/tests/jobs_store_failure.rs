//! The jobs device API when the store cannot write: the request is answered `rejected` with
//! `InternalError` (clientToken echoed), the change is not visible afterwards (the state goes
//! back to what is stored), and once the store works again the same request succeeds and
//! survives a reload from disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use mooring_core::store::StoreError;
use mooring_core::{Arns, Db, SystemClock};
use mooring_iot::jobs::device::{answer_batch, Incoming, Reply};
use mooring_iot::jobs::engine::NewJob;
use mooring_iot::jobs::store::{Batch, JobStore, Loaded, SqliteJobStore};
use mooring_iot::jobs::{Jobs, JobsConfig};
use mooring_iot::registry::groups::ThingGroupRegistry;
use mooring_iot::registry::things::{NewThing, ThingRegistry};
use serde_json::{json, Value};

/// The SQLite store, with a switch that makes every write fail.
struct SwitchableStore {
    inner: SqliteJobStore,
    failing: AtomicBool,
}

impl JobStore for SwitchableStore {
    fn write(&self, batch: Batch) -> BoxFuture<'_, Result<(), StoreError>> {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::Task("disk full".into())) });
        }
        self.inner.write(batch)
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        self.inner.load()
    }

    fn set_event_configurations(
        &self,
        values: std::collections::BTreeMap<String, bool>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.set_event_configurations(values)
    }
}

struct Fleet {
    _dir: tempfile::TempDir,
    db: Db,
    arns: Arns,
    things: ThingRegistry,
    groups: ThingGroupRegistry,
}

impl Fleet {
    fn jobs(&self, store: Arc<dyn JobStore>) -> Arc<Jobs> {
        Jobs::with_store(
            store,
            self.arns.clone(),
            Arc::new(SystemClock),
            self.things.clone(),
            self.groups.clone(),
            JobsConfig::default(),
        )
        .unwrap()
    }
}

async fn ask(jobs: &Jobs, suffix: &str, payload: Value) -> Reply {
    let mut replies = answer_batch(
        jobs,
        vec![Incoming {
            client_id: "sensor-1".into(),
            topic: format!("$aws/things/sensor-1/jobs/{suffix}"),
            payload: Bytes::from(payload.to_string()),
            qos: 1,
        }],
    )
    .await;
    assert_eq!(replies.len(), 1);
    replies.remove(0)
}

#[tokio::test]
async fn a_failed_write_is_an_internal_error_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("metadata.db")).unwrap();
    let arns = Arns::new("123456789012", "us-east-1");
    let things = ThingRegistry::open(db.clone(), arns.clone()).unwrap();
    let groups = ThingGroupRegistry::open(db.clone(), arns.clone(), things.clone()).unwrap();
    things
        .create("sensor-1", NewThing::default())
        .await
        .unwrap();
    let fleet = Fleet {
        _dir: dir,
        db,
        arns,
        things,
        groups,
    };
    let store = Arc::new(SwitchableStore {
        inner: SqliteJobStore::open(fleet.db.clone()).unwrap(),
        failing: AtomicBool::new(false),
    });
    let jobs = fleet.jobs(store.clone());
    jobs.create_job(
        "firmware",
        NewJob {
            targets: vec![fleet.arns.arn("iot", "thing/sensor-1")],
            document: Some("{\"version\":2}".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    store.failing.store(true, Ordering::SeqCst);
    let update = json!({"status": "SUCCEEDED", "clientToken": "t-1"});
    let reply = ask(&jobs, "firmware/update", update.clone()).await;
    assert!(!reply.accepted, "{}", reply.payload);
    assert_eq!(
        reply.topic,
        "$aws/things/sensor-1/jobs/firmware/update/rejected"
    );
    assert_eq!(reply.payload["code"], "InternalError");
    assert_eq!(reply.payload["clientToken"], "t-1");
    assert!(reply.payload["timestamp"].is_i64());
    // A create that cannot be stored fails and leaves no job behind.
    let second = NewJob {
        targets: vec![fleet.arns.arn("iot", "thing/sensor-1")],
        document: Some("{}".into()),
        ..Default::default()
    };
    assert!(jobs.create_job("never-stored", second).await.is_err());

    store.failing.store(false, Ordering::SeqCst);
    // The failed update left the execution as it was.
    let get = ask(&jobs, "firmware/get", json!({})).await;
    assert!(get.accepted, "{}", get.payload);
    assert_eq!(get.payload["execution"]["status"], "QUEUED");
    assert_eq!(get.payload["execution"]["versionNumber"], 1);
    let pending = ask(&jobs, "get", json!({})).await;
    let queued: Vec<&str> = pending.payload["queuedJobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["jobId"].as_str().unwrap())
        .collect();
    assert_eq!(queued, ["firmware"], "{}", pending.payload);

    // Now it works, and what was acknowledged is on disk.
    let reply = ask(&jobs, "firmware/update", update).await;
    assert!(reply.accepted, "{}", reply.payload);
    let reopened = fleet.jobs(Arc::new(SqliteJobStore::open(fleet.db.clone()).unwrap()));
    let state = reopened.lock().await;
    let stored = state
        .latest("sensor-1", "firmware")
        .expect("stored execution");
    assert_eq!(stored.status.as_str(), "SUCCEEDED");
    assert_eq!(stored.version_number, 2);
    assert_eq!(state.jobs["firmware"].status.as_str(), "COMPLETED");
    assert!(!state.jobs.contains_key("never-stored"));
}
