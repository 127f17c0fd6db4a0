//! The event bus service: [`Events`] (state, storage, background tasks: delivery worker,
//! scheduler, replays, retention) and [`EventsService`], its AWS API behind the front door,
//! which also registers the [`EventsHandle`] other services use to put events.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Response, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::{
    json_response, parse_json_body, AwsError, AwsRequest, AwsService, OperationName, Protocol,
    Route,
};
use mooring_core::handles::{EventsHandle, HandleError, ServiceHandles};
use mooring_core::{Arns, Clock, ServiceContext, Shutdown};
use serde_json::{json, Value};

use crate::delivery::{DeliveryQueue, Failure, InvocationLimiter, TokenCache};
use crate::model::{
    envelope, epoch, route, with_replay_name, Bus, BusState, EventRecord, EventsConfig,
    EventsError, EventsResult, Rule, State,
};
use crate::store::{EventsStore, GroupCommitter, IngestBatch, SqliteEventsStore};
use crate::{api, delivery, model, schedule, store, transform};

/// The event bus: state, storage and the handles it delivers through.
pub struct Events {
    pub(crate) state: Mutex<State>,
    pub(crate) store: Arc<dyn EventsStore>,
    pub(crate) committer: GroupCommitter,
    pub(crate) arns: Arns,
    pub(crate) config: EventsConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) handles: Arc<ServiceHandles>,
    pub(crate) shutdown: Shutdown,
    pub(crate) log_dir: PathBuf,
    pub(crate) queue: DeliveryQueue,
    pub(crate) tokens: TokenCache,
    pub(crate) limiter: InvocationLimiter,
    pub(crate) tls: tokio_rustls::TlsConnector,
}

impl Events {
    /// Opens the store, loads the state (creating the `default` bus) and queues the deliveries
    /// left pending by the previous run. Background tasks are not started.
    pub fn open(ctx: &ServiceContext, config: EventsConfig) -> anyhow::Result<Arc<Events>> {
        let store: Arc<dyn EventsStore> = Arc::new(SqliteEventsStore::open(ctx.db.clone())?);
        let log_dir = ctx.service_dir("events")?.join("logs");
        let tls = delivery::tls_connector(config.tls_ca_file.as_deref())?;
        let events = Arc::new(Events {
            state: Mutex::new(State::default()),
            committer: GroupCommitter::new(store.clone()),
            store,
            arns: ctx.arns.clone(),
            config,
            clock: ctx.clock.clone(),
            handles: ctx.handles.clone(),
            shutdown: ctx.shutdown.clone(),
            log_dir,
            queue: DeliveryQueue::default(),
            tokens: TokenCache::default(),
            limiter: InvocationLimiter::default(),
            tls,
        });
        events.load()?;
        Ok(events)
    }

    fn load(&self) -> anyhow::Result<()> {
        let mut state = self.state.lock().expect("state lock");
        for doc in self.store.load_resources("bus")? {
            let bus: Bus = serde_json::from_value(doc)?;
            state.buses.insert(bus.name.clone(), BusState::new(bus));
        }
        if !state.buses.contains_key("default") {
            let now = epoch(self.clock.now_millis());
            let bus = Bus {
                name: "default".into(),
                arn: self.arns.arn("events", "event-bus/default"),
                description: None,
                kms_key_identifier: None,
                dead_letter_config: None,
                log_config: None,
                policy: None,
                creation_time: now,
                last_modified_time: now,
                tags: Default::default(),
            };
            self.store
                .put_resource("bus", "default", &serde_json::to_value(&bus)?)?;
            state.buses.insert("default".into(), BusState::new(bus));
        }
        for doc in self.store.load_resources("rule")? {
            let rule: Rule = serde_json::from_value(doc)?;
            let Some(bus) = state.buses.get_mut(&rule.bus) else {
                continue;
            };
            if let Some(text) = &rule.event_pattern {
                match model::compile_pattern(text) {
                    Ok(p) => {
                        bus.patterns.insert(rule.name.clone(), p);
                    }
                    Err(e) => {
                        tracing::warn!(rule = %rule.name, error = %e.message, "stored pattern no longer compiles")
                    }
                }
            }
            bus.rules.insert(rule.name.clone(), rule);
        }
        for bus in state.buses.values_mut() {
            bus.recompile();
        }
        for doc in self.store.load_resources("archive")? {
            let archive: model::Archive = serde_json::from_value(doc)?;
            let pattern = archive
                .event_pattern
                .as_deref()
                .and_then(|p| model::compile_pattern(p).ok());
            state
                .archives
                .insert(archive.name.clone(), (archive, pattern));
        }
        for doc in self.store.load_resources("replay")? {
            let replay: model::Replay = serde_json::from_value(doc)?;
            state.replays.insert(replay.name.clone(), replay);
        }
        for doc in self.store.load_resources("connection")? {
            let c: model::Connection = serde_json::from_value(doc)?;
            state.connections.insert(c.name.clone(), c);
        }
        for doc in self.store.load_resources("api-destination")? {
            let d: model::ApiDestination = serde_json::from_value(doc)?;
            state.api_destinations.insert(d.name.clone(), d);
        }
        drop(state);
        for (id, doc) in self.store.load_deliveries()? {
            self.queue.push(id, doc);
        }
        Ok(())
    }

    /// Starts the delivery worker, the scheduler, unfinished replays and housekeeping.
    pub fn start_background(self: &Arc<Self>) {
        self.shutdown.spawn(delivery::run_worker(self.clone()));
        self.shutdown.spawn(run_scheduler(self.clone()));
        self.shutdown.spawn(run_housekeeping(self.clone()));
        let active: Vec<String> = {
            let state = self.state.lock().expect("state lock");
            state
                .replays
                .values()
                .filter(|r| r.active())
                .map(|r| r.name.clone())
                .collect()
        };
        for name in active {
            self.spawn_replay(name);
        }
        let authorizing: Vec<String> = {
            let state = self.state.lock().expect("state lock");
            state
                .connections
                .values()
                .filter(|c| c.state == "AUTHORIZING")
                .map(|c| c.name.clone())
                .collect()
        };
        for name in authorizing {
            self.spawn_authorization(name);
        }
    }

    /// Authorizes an OAuth connection in the background: fetches a client-credentials token
    /// (retrying unreachable endpoints a few times), then moves the connection from
    /// `AUTHORIZING` to `AUTHORIZED`, or to `DEAUTHORIZED` with the failure as `StateReason`.
    pub(crate) fn spawn_authorization(self: &Arc<Self>, name: String) {
        let events = self.clone();
        self.shutdown.spawn(async move {
            let connection = {
                let state = events.state.lock().expect("state lock");
                state.connections.get(&name).cloned()
            };
            let Some(connection) = connection else { return };
            let mut outcome = delivery::oauth_token(&events, &connection, true).await;
            for _ in 0..3 {
                match &outcome {
                    Err(f) if f.retryable => {
                        tokio::select! {
                            _ = events.shutdown.triggered() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        outcome = delivery::oauth_token(&events, &connection, true).await;
                    }
                    _ => break,
                }
            }
            let now = epoch(events.clock.now_millis());
            let events2 = events.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut state = events2.state.lock().expect("state lock");
                let Some(c) = state.connections.get_mut(&name) else {
                    return;
                };
                if c.arn != connection.arn || c.state != "AUTHORIZING" {
                    return;
                }
                let mut updated = c.clone();
                match outcome {
                    Ok(_) => {
                        updated.state = "AUTHORIZED".into();
                        updated.state_reason = None;
                        updated.last_authorized_time = Some(now);
                    }
                    Err(f) => {
                        updated.state = "DEAUTHORIZED".into();
                        updated.state_reason =
                            Some(format!("Failed to obtain an OAuth token: {}", f.message));
                    }
                }
                updated.last_modified_time = now;
                match serde_json::to_value(&updated)
                    .map_err(|e| e.to_string())
                    .and_then(|doc| {
                        events2
                            .store
                            .put_resource("connection", &name, &doc)
                            .map_err(|e| store::describe(&e))
                    }) {
                    Ok(()) => *c = updated,
                    Err(e) => tracing::error!(connection = %name, error = %e, "could not record the authorization"),
                }
            })
            .await;
        });
    }

    /// Runs one API operation (blocking: call from the blocking pool).
    pub fn call_blocking(self: &Arc<Self>, op: &str, input: &Value) -> EventsResult<Value> {
        api::dispatch(self, op, input)
    }

    /// Deliveries stored as pending (not yet delivered or dead-lettered); reads the store.
    pub fn pending_deliveries(&self) -> usize {
        self.store.load_deliveries().map_or(0, |d| d.len())
    }

    /// Writes `batch` durably, then queues its deliveries.
    pub(crate) fn commit_blocking(&self, batch: IngestBatch) -> EventsResult<()> {
        let (ids, batch) = self
            .committer
            .commit(batch)
            .map_err(EventsError::internal)?;
        for (id, doc) in ids.into_iter().zip(batch.deliveries) {
            self.queue.push(id, doc);
        }
        Ok(())
    }

    pub(crate) async fn commit_and_queue(self: &Arc<Self>, batch: IngestBatch) {
        let events = self.clone();
        match tokio::task::spawn_blocking(move || events.commit_blocking(batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e.message, "could not record deliveries"),
            Err(e) => tracing::error!(error = %e, "delivery bookkeeping task failed"),
        }
    }

    pub(crate) fn tokens_forget(&self, connection_arn: &str) {
        self.tokens
            .0
            .lock()
            .expect("token lock")
            .remove(connection_arn);
    }

    /// Puts an event forwarded by a bus target onto `bus` (blocking); `hops` is the number of
    /// forwards including this one. Past `max_event_hops` the bus does not route the event (it
    /// is looping) but hands it to the bus's dead-letter destination; without one the forward
    /// fails for good, so the forwarding target's own dead-letter destination gets it.
    pub(crate) fn ingest_forwarded(
        &self,
        bus: &str,
        payload: &str,
        hops: u32,
    ) -> Result<(), Failure> {
        let value: Value = serde_json::from_str(payload)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| Failure {
                retryable: false,
                code: "INVALID_PARAMETER",
                message: "the event forwarded to a bus must be a JSON object".into(),
                retry_after_ms: None,
            })?;
        let now = self.clock.now_millis();
        let time_ms = value["time"]
            .as_str()
            .and_then(model::parse_rfc3339)
            .unwrap_or(now);
        let record = EventRecord {
            text: value.to_string(),
            value,
            time_ms,
        };
        let mut batch = IngestBatch::default();
        let looping = self.config.max_event_hops > 0 && hops > self.config.max_event_hops;
        {
            let state = self.state.lock().expect("state lock");
            let Some(bus_state) = state.buses.get(bus) else {
                return Err(Failure {
                    retryable: false,
                    code: "NO_RESOURCE",
                    message: format!("event bus {bus} does not exist"),
                    retry_after_ms: None,
                });
            };
            if looping {
                let message = format!(
                    "the event was forwarded {hops} times between event buses (limit {}); it is not routed on {bus}",
                    self.config.max_event_hops
                );
                let Some(dlq) = bus_state
                    .bus
                    .dead_letter_config
                    .as_ref()
                    .and_then(|c| c["Arn"].as_str())
                else {
                    tracing::warn!(
                        bus,
                        hops,
                        "event loop stopped; the bus has no dead-letter destination"
                    );
                    return Err(Failure {
                        retryable: false,
                        code: "EVENT_LOOP_DETECTED",
                        message,
                        retry_after_ms: None,
                    });
                };
                tracing::warn!(
                    bus,
                    hops,
                    "event loop stopped; sent to the bus's dead-letter destination"
                );
                let attributes = json!({
                    "EVENT_BUS_ARN": bus_state.bus.arn,
                    "ERROR_CODE": "EVENT_LOOP_DETECTED",
                    "ERROR_MESSAGE": message,
                    "HOPS": hops,
                });
                batch.deliveries.push(delivery::dead_letter_document(
                    dlq,
                    None,
                    attributes,
                    &record.text,
                    now,
                    hops,
                ));
            } else {
                route(&state, bus, &record, None, now, hops, &mut batch);
                batch.log.push((bus.to_string(), now, record.text.clone()));
            }
        }
        self.commit_blocking(batch).map_err(|e| Failure {
            retryable: true,
            code: "INTERNAL",
            message: e.message,
            retry_after_ms: None,
        })
    }

    pub(crate) fn spawn_replay(self: &Arc<Self>, name: String) {
        let events = self.clone();
        self.shutdown.spawn(async move {
            loop {
                if events.shutdown.is_triggered() {
                    return;
                }
                let worker = events.clone();
                let replay = name.clone();
                match tokio::task::spawn_blocking(move || worker.replay_step(&replay)).await {
                    Ok(true) => tokio::task::yield_now().await,
                    _ => return,
                }
            }
        });
    }

    /// Replays the next batch of archived events; `false` once the replay has ended.
    fn replay_step(&self, name: &str) -> bool {
        let now = self.clock.now_millis();
        let finish = |state: &mut State, final_state: &str, reason: Option<String>| {
            if let Some(r) = state.replays.get_mut(name) {
                r.state = final_state.into();
                r.state_reason = reason;
                r.replay_end_time = Some(epoch(now));
                let _ = self.store.put_resource(
                    "replay",
                    name,
                    &serde_json::to_value(&*r).unwrap_or_default(),
                );
            }
        };
        let (archive, bus, start_ms, end_ms, after, filter) = {
            let mut state = self.state.lock().expect("state lock");
            let Some(replay) = state.replays.get_mut(name) else {
                return false;
            };
            match replay.state.as_str() {
                "CANCELLING" => {
                    finish(&mut state, "CANCELLED", None);
                    return false;
                }
                "STARTING" => {
                    replay.state = "RUNNING".into();
                    let _ = self.store.put_resource(
                        "replay",
                        name,
                        &serde_json::to_value(&*replay).unwrap_or_default(),
                    );
                }
                "RUNNING" => {}
                _ => return false,
            }
            let filter: Vec<String> = replay.destination["FilterArns"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let bus = model::bus_name_from(replay.destination["Arn"].as_str().unwrap_or_default())
                .unwrap_or_default();
            (
                replay.archive.clone(),
                bus,
                (replay.event_start_time * 1000.0) as i64,
                (replay.event_end_time * 1000.0) as i64,
                replay.last_seq,
                filter,
            )
        };
        let rows = match self
            .store
            .archived_events(&archive, start_ms, end_ms, after, 100)
        {
            Ok(rows) => rows,
            Err(e) => {
                let mut state = self.state.lock().expect("state lock");
                finish(&mut state, "FAILED", Some(store::describe(&e)));
                return false;
            }
        };
        if rows.is_empty() {
            let mut state = self.state.lock().expect("state lock");
            finish(&mut state, "COMPLETED", None);
            return false;
        }
        let mut batch = IngestBatch::default();
        let mut last_seq = after;
        let mut last_time = None;
        {
            let state = self.state.lock().expect("state lock");
            for (seq, time_ms, text) in &rows {
                last_seq = *seq;
                last_time = Some(last_time.map_or(*time_ms, |t: i64| t.max(*time_ms)));
                if let Some(record) = with_replay_name(text, name) {
                    route(&state, &bus, &record, Some(&filter), now, 0, &mut batch);
                }
            }
        }
        if self.commit_blocking(batch).is_err() {
            return true;
        }
        let mut state = self.state.lock().expect("state lock");
        if let Some(r) = state.replays.get_mut(name) {
            r.last_seq = last_seq;
            r.event_last_replayed_time = last_time.map(epoch);
            let _ = self.store.put_resource(
                "replay",
                name,
                &serde_json::to_value(&*r).unwrap_or_default(),
            );
        }
        true
    }

    /// The deliveries of one scheduled firing of `rule`.
    fn scheduled_batch(&self, rule: &Rule, now: i64) -> IngestBatch {
        let record = envelope(
            &uuid::Uuid::new_v4().to_string(),
            "Scheduled Event",
            "aws.events",
            &self.arns.account_id,
            now,
            &self.arns.region,
            std::slice::from_ref(&rule.arn),
            &json!({}),
            None,
        );
        let mut batch = IngestBatch::default();
        for target in &rule.targets {
            let payload = transform::shape(target, &record.value, &record.text, rule, now);
            batch.deliveries.push(model::delivery_document(
                rule,
                target,
                payload,
                &record.text,
                now,
                0,
            ));
        }
        batch
    }
}

async fn run_scheduler(events: Arc<Events>) {
    let mut next_fire: HashMap<(String, String, String), i64> = HashMap::new();
    loop {
        tokio::select! {
            _ = events.shutdown.triggered() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let now = events.clock.now_millis();
        let mut due = Vec::new();
        {
            let state = events.state.lock().expect("state lock");
            let mut seen = Vec::new();
            for bus in state.buses.values() {
                for rule in bus.rules.values().filter(|r| r.enabled()) {
                    let Some(expr) = &rule.schedule_expression else {
                        continue;
                    };
                    let Ok(schedule) = schedule::parse(expr) else {
                        continue;
                    };
                    let key = (rule.bus.clone(), rule.name.clone(), expr.clone());
                    let next = next_fire.entry(key.clone()).or_insert_with(|| {
                        schedule
                            .next_after(rule.created_ms, now)
                            .unwrap_or(i64::MAX)
                    });
                    if *next <= now {
                        due.push((rule.clone(), *next));
                        *next = schedule
                            .next_after(rule.created_ms, now)
                            .unwrap_or(i64::MAX);
                    }
                    seen.push(key);
                }
            }
            next_fire.retain(|k, _| seen.contains(k));
        }
        for (rule, fire_at) in due {
            let batch = events.scheduled_batch(&rule, fire_at);
            events.commit_and_queue(batch).await;
        }
    }
}

async fn run_housekeeping(events: Arc<Events>) {
    loop {
        let now = events.clock.now_millis();
        let archives: Vec<(String, i64)> = {
            let state = events.state.lock().expect("state lock");
            state
                .archives
                .values()
                .filter(|(a, _)| a.retention_days > 0)
                .map(|(a, _)| (a.name.clone(), a.retention_days))
                .collect()
        };
        let store = events.store.clone();
        let keep = events.config.tail_keep;
        let _ = tokio::task::spawn_blocking(move || {
            for (name, days) in archives {
                if let Err(e) = store.purge_archive(&name, Some(now - days * 86_400_000)) {
                    tracing::warn!(archive = %name, error = %e, "archive retention failed");
                }
            }
            if let Err(e) = store.trim_log(keep) {
                tracing::warn!(error = %e, "trimming the event log failed");
            }
        })
        .await;
        tokio::select! {
            _ = events.shutdown.triggered() => return,
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
        }
    }
}

/// The AWS API of the event bus, for the front door.
pub struct EventsService {
    events: Arc<Events>,
}

impl EventsService {
    /// Builds the service from the `[events]` configuration section, starts its background
    /// tasks and registers the [`EventsHandle`].
    pub fn start(ctx: &ServiceContext) -> anyhow::Result<Arc<EventsService>> {
        let config: EventsConfig = ctx.config.section("events")?;
        let events = Events::open(ctx, config)?;
        events.start_background();
        ctx.handles.set_events(Arc::new(BusHandle(events.clone())));
        Ok(Arc::new(EventsService { events }))
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }
}

fn to_aws_error(e: EventsError) -> AwsError {
    let status = if e.code == "InternalException" {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::BAD_REQUEST
    };
    AwsError::new(status, e.code, e.message)
}

impl AwsService for EventsService {
    fn name(&self) -> &'static str {
        "events"
    }

    fn signing_names(&self) -> &'static [&'static str] {
        &["events"]
    }

    fn protocol(&self) -> Protocol {
        Protocol::AwsJson1_1
    }

    fn matches(&self, route: &Route<'_>) -> bool {
        route.target.is_some_and(|t| t.starts_with("AWSEvents."))
    }

    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>> {
        let events = self.events.clone();
        let op = request.target_operation().unwrap_or_default().to_string();
        let body = request.body.clone();
        Box::pin(async move {
            let protocol = Protocol::AwsJson1_1;
            let result = match parse_json_body::<Value>(&body) {
                Err(e) => Err(e),
                Ok(input) if !input.is_object() => Err(AwsError::serialization(
                    "Malformed JSON request body: expected an object",
                )),
                Ok(input) => {
                    let operation = op.clone();
                    match tokio::task::spawn_blocking(move || {
                        events.call_blocking(&operation, &input)
                    })
                    .await
                    {
                        Ok(result) => result.map_err(to_aws_error),
                        Err(e) => Err(AwsError::internal(e.to_string())),
                    }
                }
            };
            let mut response = match result {
                Ok(value) => json_response(protocol, &value),
                Err(e) => e.into_response(protocol),
            };
            response.extensions_mut().insert(OperationName(op));
            response
        })
    }
}

/// [`EventsHandle`] for other services: PutEvents entries in, per-entry results out.
struct BusHandle(Arc<Events>);

impl EventsHandle for BusHandle {
    fn put_events(&self, entries: Vec<Value>) -> BoxFuture<'_, Result<Vec<Value>, HandleError>> {
        let events = self.0.clone();
        Box::pin(async move {
            let input = json!({"Entries": entries});
            let out = tokio::task::spawn_blocking(move || api::put_events(&events, &input))
                .await
                .map_err(|e| HandleError::Internal(e.to_string()))?
                .map_err(|e| match e.code {
                    "InternalException" => HandleError::Internal(e.message),
                    _ => HandleError::Rejected(e.message),
                })?;
            Ok(out["Entries"].as_array().cloned().unwrap_or_default())
        })
    }
}
