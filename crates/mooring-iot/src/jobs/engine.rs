//! [`Jobs`]: owns the jobs state, persists every change before answering, publishes
//! notifications and events through the broker, and runs the background work (timers and
//! rollouts on a tick, CONTINUOUS jobs following thing group membership).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use mooring_core::{Clock, ServiceContext};
use mooring_mqtt::{Broker, Message, MessageProperties, Origin};
use tokio::sync::MutexGuard;

use super::model::{
    AbortConfig, ExecutionError, Job, JobStatus, RetryConfig, RolloutConfig, TimeoutConfig,
    MAX_DOCUMENT_BYTES, MAX_TIMEOUT_MINUTES,
};
use super::state::{JobsState, Outgoing};
use super::store::{JobStore, SqliteJobStore};
use super::JobsConfig;
use crate::registry::groups::{GroupChange, ThingGroupRegistry};
use crate::registry::things::{RegistryError, ThingRegistry};

/// Why a control-plane operation failed; the API maps each to AWS's exception.
#[derive(Debug, Clone, PartialEq)]
pub enum JobsError {
    InvalidRequest(String),
    NotFound(String),
    AlreadyExists(String),
    InvalidStateTransition(String),
    VersionConflict(String),
    LimitExceeded(String),
    Internal(String),
}

impl From<RegistryError> for JobsError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(m) => JobsError::NotFound(m),
            RegistryError::InvalidRequest(m) => JobsError::InvalidRequest(m),
            other => JobsError::Internal(other.to_string()),
        }
    }
}

impl From<ExecutionError> for JobsError {
    fn from(e: ExecutionError) -> Self {
        match e {
            ExecutionError::InvalidRequest(m) => JobsError::InvalidRequest(m),
            ExecutionError::InvalidStateTransition(m) => JobsError::InvalidStateTransition(m),
            ExecutionError::VersionMismatch(m) => JobsError::VersionConflict(m),
            ExecutionError::ResourceNotFound(m) | ExecutionError::TerminalStateReached(m) => {
                JobsError::NotFound(m)
            }
        }
    }
}

/// The inputs of CreateJob after parsing.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub targets: Vec<String>,
    pub document: Option<String>,
    pub document_source: Option<String>,
    pub description: Option<String>,
    pub continuous: bool,
    pub rollout: Option<RolloutConfig>,
    pub abort: Option<AbortConfig>,
    pub timeout: Option<TimeoutConfig>,
    pub retry: Option<RetryConfig>,
    pub presigned_url_config: Option<serde_json::Value>,
    pub tags: Vec<serde_json::Value>,
}

/// The inputs of UpdateJob after parsing.
#[derive(Debug, Clone, Default)]
pub struct JobUpdate {
    pub description: Option<String>,
    pub rollout: Option<RolloutConfig>,
    pub abort: Option<AbortConfig>,
    pub timeout: Option<TimeoutConfig>,
    pub retry: Option<RetryConfig>,
    pub presigned_url_config: Option<serde_json::Value>,
}

/// The jobs service.
pub struct Jobs {
    state: tokio::sync::Mutex<JobsState>,
    store: Arc<dyn JobStore>,
    broker: OnceLock<Broker>,
    pub things: ThingRegistry,
    pub groups: ThingGroupRegistry,
    clock: Arc<dyn Clock>,
    pub config: JobsConfig,
    /// Per-thing request counts in the current second (device API throttling).
    throttle: Mutex<HashMap<String, (i64, u32)>>,
}

pub fn validate_job_id(id: &str) -> Result<(), JobsError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(JobsError::InvalidRequest(format!(
            "1 validation error detected: Value '{id}' at 'jobId' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9_-]+"
        )))
    }
}

fn validate_configs(
    rollout: &Option<RolloutConfig>,
    abort: &Option<AbortConfig>,
    timeout: &Option<TimeoutConfig>,
    retry: &Option<RetryConfig>,
) -> Result<(), JobsError> {
    if let Some(r) = rollout {
        r.validate().map_err(JobsError::InvalidRequest)?;
    }
    if let Some(a) = abort {
        a.validate().map_err(JobsError::InvalidRequest)?;
    }
    if let Some(r) = retry {
        r.validate().map_err(JobsError::InvalidRequest)?;
    }
    if let Some(m) = timeout
        .as_ref()
        .and_then(|t| t.in_progress_timeout_in_minutes)
    {
        if !(1..=MAX_TIMEOUT_MINUTES).contains(&m) {
            return Err(JobsError::InvalidRequest(format!(
                "inProgressTimeoutInMinutes must be between 1 and {MAX_TIMEOUT_MINUTES}"
            )));
        }
    }
    Ok(())
}

/// The state as stored: jobs, executions and event configurations.
fn stored_state(
    store: &dyn JobStore,
    arns: mooring_core::Arns,
    minute_ms: i64,
) -> anyhow::Result<JobsState> {
    let loaded = store.load()?;
    let mut state = JobsState::new(arns, minute_ms.max(1));
    state.event_configurations = loaded.event_configurations;
    state.load(loaded.jobs, loaded.executions);
    Ok(state)
}

impl Jobs {
    /// Opens the store and loads every job; background work starts with [`Jobs::run`].
    pub fn open(
        ctx: &ServiceContext,
        things: ThingRegistry,
        groups: ThingGroupRegistry,
        config: JobsConfig,
    ) -> anyhow::Result<Arc<Jobs>> {
        let store = SqliteJobStore::open(ctx.db.clone())?;
        Self::with_store(
            Arc::new(store),
            ctx.arns.clone(),
            ctx.clock.clone(),
            things,
            groups,
            config,
        )
    }

    pub fn with_store(
        store: Arc<dyn JobStore>,
        arns: mooring_core::Arns,
        clock: Arc<dyn Clock>,
        things: ThingRegistry,
        groups: ThingGroupRegistry,
        config: JobsConfig,
    ) -> anyhow::Result<Arc<Jobs>> {
        let state = stored_state(store.as_ref(), arns, config.minute_ms)?;
        tracing::info!(jobs = state.jobs.len(), "jobs loaded");
        Ok(Arc::new(Jobs {
            state: tokio::sync::Mutex::new(state),
            store,
            broker: OnceLock::new(),
            things,
            groups,
            clock,
            config,
            throttle: Mutex::new(HashMap::new()),
        }))
    }

    pub fn now(&self) -> i64 {
        self.clock.now_millis()
    }

    /// The state, locked.
    pub async fn lock(&self) -> MutexGuard<'_, JobsState> {
        self.state.lock().await
    }

    /// Writes what changed and publishes the resulting notifications and events.
    ///
    /// When the write fails nothing of the change is durable, so the state goes back to what
    /// the store holds (what a restart would load): no reader sees the change, nothing is
    /// announced, and the caller answers with an internal error.
    pub async fn commit(&self, state: &mut JobsState) -> Result<(), JobsError> {
        let (batch, outgoing) = state.flush(self.now());
        if let Err(e) = self.store.write(batch).await {
            match stored_state(
                self.store.as_ref(),
                state.arns.clone(),
                self.config.minute_ms,
            ) {
                Ok(stored) => *state = stored,
                Err(reload) => {
                    tracing::error!(error = ?reload, "reloading jobs after a failed write failed")
                }
            }
            return Err(JobsError::Internal(e.to_string()));
        }
        self.publish(outgoing);
        Ok(())
    }

    fn publish(&self, outgoing: Vec<Outgoing>) {
        let Some(broker) = self.broker.get() else {
            return;
        };
        for o in outgoing {
            let message = Message {
                topic: o.topic,
                payload: Bytes::from(o.payload.to_string()),
                qos: 1,
                retain: false,
                properties: MessageProperties::default(),
                expires_at_ms: None,
                origin: Origin::default(),
            };
            let ops = broker.route(Arc::new(message));
            broker.persist_background(ops);
        }
    }

    /// The broker replies and notifications go through, once attached.
    pub fn broker(&self) -> Option<&Broker> {
        self.broker.get()
    }

    /// Attaches the broker: device requests on `$aws/things/+/jobs/#` reach [`super::device`].
    pub fn attach_broker(self: &Arc<Self>, broker: &Broker) -> anyhow::Result<()> {
        let _ = self.broker.set(broker.clone());
        super::device::attach(self.clone(), broker)
    }

    /// Whether `thing` may make another device request this second.
    pub fn admit_device_request(&self, thing: &str) -> bool {
        let limit = self.config.device_requests_per_second;
        if limit == 0 {
            return true;
        }
        let second = self.now().div_euclid(1000);
        let mut throttle = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        if throttle.len() > 100_000 {
            throttle.retain(|_, (s, _)| *s == second);
        }
        let entry = throttle.entry(thing.to_string()).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        entry.1 += 1;
        entry.1 <= limit
    }

    /// Starts the timer tick and the CONTINUOUS targeting on the shutdown's task set.
    pub fn run(self: &Arc<Self>, shutdown: &mooring_core::Shutdown) {
        let tick = Duration::from_millis((self.config.minute_ms / 20).clamp(20, 1000) as u64);
        let jobs = self.clone();
        let token = shutdown.token();
        shutdown.spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = interval.tick() => {}
                }
                let mut state = jobs.lock().await;
                state.tick(jobs.now());
                if let Err(e) = jobs.commit(&mut state).await {
                    tracing::error!(error = ?e, "persisting job timers failed");
                }
            }
        });
        let jobs = self.clone();
        let mut feed = self.groups.subscribe();
        let token = shutdown.token();
        shutdown.spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = token.cancelled() => break,
                    change = feed.recv() => change,
                };
                match change {
                    Ok(change) => jobs.follow_membership(change).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "jobs missed thing group changes")
                    }
                    Err(_) => break,
                }
            }
        });
        let jobs = self.clone();
        let mut thing_feed = self.things.subscribe();
        let token = shutdown.token();
        shutdown.spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = token.cancelled() => break,
                    change = thing_feed.recv() => change,
                };
                match change {
                    Ok(crate::registry::things::ThingChange::Deleted(thing)) => {
                        if let Err(e) = jobs.groups.forget_thing(&thing.name).await {
                            tracing::warn!(error = %e, "dropping group memberships failed");
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        });
    }

    /// The CONTINUOUS jobs that target `group` directly or through an ancestor.
    async fn continuous_jobs_over(&self, group: &str) -> Vec<(String, Vec<String>)> {
        let mut lineage: BTreeSet<String> = self
            .groups
            .ancestors(group)
            .await
            .map(|a| a.into_iter().map(|g| g.name).collect())
            .unwrap_or_default();
        lineage.insert(group.to_string());
        let state = self.lock().await;
        state
            .jobs
            .values()
            .filter(|j| j.continuous && j.status == JobStatus::InProgress)
            .filter_map(|j| {
                let targets = target_groups(j);
                targets
                    .iter()
                    .any(|g| lineage.contains(g))
                    .then(|| (j.job_id.clone(), targets))
            })
            .collect()
    }

    async fn follow_membership(&self, change: GroupChange) {
        let now = self.now();
        match change {
            GroupChange::ThingAdded { group, thing } => {
                let jobs = self.continuous_jobs_over(&group).await;
                if jobs.is_empty() {
                    return;
                }
                let mut state = self.lock().await;
                for (job, _) in jobs {
                    state.add_thing_to_job(&thing, &job, now);
                }
                if let Err(e) = self.commit(&mut state).await {
                    tracing::error!(error = ?e, "persisting a CONTINUOUS job failed");
                }
            }
            GroupChange::ThingRemoved { group, thing } => {
                let jobs = self.continuous_jobs_over(&group).await;
                let mut leaving = Vec::new();
                for (job, targets) in jobs {
                    let mut still = false;
                    for target in &targets {
                        if self.groups.contains(target, &thing).await.unwrap_or(false) {
                            still = true;
                        }
                    }
                    if !still {
                        leaving.push(job);
                    }
                }
                if leaving.is_empty() {
                    return;
                }
                let mut state = self.lock().await;
                for job in leaving {
                    state.remove_thing_from_job(&thing, &job, now);
                }
                if let Err(e) = self.commit(&mut state).await {
                    tracing::error!(error = ?e, "persisting a CONTINUOUS job failed");
                }
            }
            GroupChange::GroupDeleted { .. } => {}
        }
    }

    /// Things named by `targets` (thing ARNs and thing group ARNs, groups recursively),
    /// deduplicated in order.
    async fn resolve_targets(&self, targets: &[String]) -> Result<Vec<String>, JobsError> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for target in targets {
            if let Some((_, group)) = target.split_once(":thinggroup/") {
                for thing in self.groups.things_in(group, true).await? {
                    if seen.insert(thing.clone()) {
                        out.push(thing);
                    }
                }
            } else if let Some((_, thing)) = target.split_once(":thing/") {
                self.things.describe(thing).await?;
                if seen.insert(thing.to_string()) {
                    out.push(thing.to_string());
                }
            } else {
                return Err(JobsError::InvalidRequest(format!(
                    "Target {target} is not a thing or thing group ARN"
                )));
            }
        }
        Ok(out)
    }

    /// CreateJob.
    pub async fn create_job(&self, job_id: &str, new: NewJob) -> Result<Job, JobsError> {
        validate_job_id(job_id)?;
        if new.targets.is_empty() {
            return Err(JobsError::InvalidRequest(
                "1 validation error detected: Value null at 'targets' failed to satisfy constraint: Member must not be null".into(),
            ));
        }
        match (&new.document, &new.document_source) {
            (None, None) => {
                return Err(JobsError::InvalidRequest(
                    "Either document or documentSource must be specified".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(JobsError::InvalidRequest(
                    "Only one of document and documentSource may be specified".into(),
                ))
            }
            _ => {}
        }
        if let Some(d) = &new.document {
            if d.len() > MAX_DOCUMENT_BYTES {
                return Err(JobsError::InvalidRequest(format!(
                    "The job document exceeds the maximum size of {MAX_DOCUMENT_BYTES} bytes"
                )));
            }
            if serde_json::from_str::<serde_json::Value>(d)
                .map(|v| !v.is_object())
                .unwrap_or(true)
            {
                return Err(JobsError::InvalidRequest(
                    "The job document must be a JSON object".into(),
                ));
            }
        }
        validate_configs(&new.rollout, &new.abort, &new.timeout, &new.retry)?;
        let things = self.resolve_targets(&new.targets).await?;
        let now = self.now();
        let mut state = self.lock().await;
        if state.jobs.contains_key(job_id) {
            return Err(JobsError::AlreadyExists(format!(
                "Job with id {job_id} already exists"
            )));
        }
        let job = Job {
            job_id: job_id.to_string(),
            arn: state.arns.arn("iot", &format!("job/{job_id}")),
            description: new.description,
            document: new.document,
            document_source: new.document_source,
            targets: new.targets,
            continuous: new.continuous,
            status: JobStatus::InProgress,
            force_canceled: false,
            reason_code: None,
            comment: None,
            created_ms: now,
            last_updated_ms: now,
            completed_ms: None,
            rollout: new.rollout,
            abort: new.abort,
            timeout: new.timeout,
            retry: new.retry,
            presigned_url_config: new.presigned_url_config,
            tags: new.tags,
            backlog: things.into_iter().collect::<VecDeque<_>>(),
            window_start_ms: now,
            released_in_window: 0,
            window_rate: 0,
            notified: 0,
        };
        state.jobs.insert(job_id.to_string(), job);
        state.release_backlog(job_id, now);
        let created = state.jobs.get(job_id).cloned();
        let dirty_job = job_id.to_string();
        // A job whose targets are empty (an empty group) is still stored.
        state.touch_job(&dirty_job);
        self.commit(&mut state).await?;
        created.ok_or_else(|| JobsError::Internal("the job vanished".into()))
    }

    /// The job called `job_id`.
    pub async fn job(&self, job_id: &str) -> Result<Job, JobsError> {
        self.lock()
            .await
            .jobs
            .get(job_id)
            .cloned()
            .ok_or_else(|| JobsError::NotFound(format!("Job {job_id} cannot be found.")))
    }

    /// UpdateJob.
    pub async fn update_job(&self, job_id: &str, update: JobUpdate) -> Result<(), JobsError> {
        validate_configs(
            &update.rollout,
            &update.abort,
            &update.timeout,
            &update.retry,
        )?;
        let now = self.now();
        let mut state = self.lock().await;
        let started = state
            .things_of_job
            .get(job_id)
            .map(|t| !t.is_empty())
            .unwrap_or(false);
        let job = state
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| JobsError::NotFound(format!("Job {job_id} cannot be found.")))?;
        if update.timeout.is_some() && started && update.timeout != job.timeout {
            return Err(JobsError::InvalidRequest(
                "timeoutConfig cannot be changed once job executions have started".into(),
            ));
        }
        if let Some(d) = update.description {
            job.description = Some(d);
        }
        if update.rollout.is_some() {
            job.rollout = update.rollout;
        }
        if update.abort.is_some() {
            job.abort = update.abort;
        }
        if update.timeout.is_some() {
            job.timeout = update.timeout;
        }
        if update.retry.is_some() {
            job.retry = update.retry;
        }
        if update.presigned_url_config.is_some() {
            job.presigned_url_config = update.presigned_url_config;
        }
        job.last_updated_ms = now;
        state.touch_job(job_id);
        self.commit(&mut state).await
    }

    /// CancelJob.
    pub async fn cancel_job(
        &self,
        job_id: &str,
        force: bool,
        reason_code: Option<String>,
        comment: Option<String>,
    ) -> Result<Job, JobsError> {
        let now = self.now();
        let mut state = self.lock().await;
        let job = state
            .jobs
            .get(job_id)
            .ok_or_else(|| JobsError::NotFound(format!("Job {job_id} cannot be found.")))?;
        match job.status {
            JobStatus::Completed => {
                return Err(JobsError::InvalidStateTransition(format!(
                    "Job {job_id} is COMPLETED and cannot be canceled"
                )))
            }
            JobStatus::Canceled if !force => return Ok(job.clone()),
            _ => {}
        }
        state.cancel_job(job_id, force, reason_code, comment, now);
        self.commit(&mut state).await?;
        Ok(state.jobs.get(job_id).cloned().expect("job exists"))
    }

    /// DeleteJob.
    pub async fn delete_job(&self, job_id: &str, force: bool) -> Result<(), JobsError> {
        let now = self.now();
        let mut state = self.lock().await;
        let job = state
            .jobs
            .get(job_id)
            .ok_or_else(|| JobsError::NotFound(format!("Job {job_id} cannot be found.")))?;
        if job.status == JobStatus::InProgress && !force {
            return Err(JobsError::InvalidStateTransition(format!(
                "Job {job_id} is IN_PROGRESS; use force to delete it"
            )));
        }
        state.delete_job(job_id, now);
        self.commit(&mut state).await
    }

    /// CancelJobExecution.
    pub async fn cancel_execution(
        &self,
        thing: &str,
        job_id: &str,
        force: bool,
        expected_version: Option<i64>,
        details: Option<BTreeMap<String, String>>,
    ) -> Result<(), JobsError> {
        if let Some(d) = &details {
            super::model::validate_status_details(d)?;
        }
        let now = self.now();
        let mut state = self.lock().await;
        state.cancel_execution(thing, job_id, force, expected_version, details, now)?;
        self.commit(&mut state).await
    }

    /// DeleteJobExecution.
    pub async fn delete_execution(
        &self,
        thing: &str,
        job_id: &str,
        number: i64,
        force: bool,
    ) -> Result<(), JobsError> {
        let now = self.now();
        let mut state = self.lock().await;
        state.delete_execution(thing, job_id, number, force, now)?;
        self.commit(&mut state).await
    }

    /// UpdateEventConfigurations.
    pub async fn set_event_configurations(
        &self,
        values: BTreeMap<String, bool>,
    ) -> Result<(), JobsError> {
        let mut state = self.lock().await;
        self.store
            .set_event_configurations(values.clone())
            .await
            .map_err(|e| JobsError::Internal(e.to_string()))?;
        state.event_configurations.extend(values);
        Ok(())
    }

    /// DescribeEventConfigurations.
    pub async fn event_configurations(&self) -> BTreeMap<String, bool> {
        self.lock().await.event_configurations.clone()
    }
}

/// The thing group names a job targets.
pub fn target_groups(job: &Job) -> Vec<String> {
    job.targets
        .iter()
        .filter_map(|t| t.split_once(":thinggroup/").map(|(_, g)| g.to_string()))
        .collect()
}
