//! The in-memory view of every job and execution, and the operations that change it.
//!
//! [`JobsState`] applies the model's rules to the fleet: queueing executions (with rollout
//! rates), device requests, timers, retries, abort criteria, cancellation, deletion and job
//! completion. Each change marks what must be written and which things were touched;
//! [`JobsState::flush`] turns that into one store batch plus the `notify` / `notify-next`
//! messages and job events to publish once the batch is durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use mooring_core::Arns;
use serde_json::{json, Value};

use super::model::{
    pending_order, should_retry, DeviceUpdate, Execution, ExecutionError, ExecutionStatus, Job,
    JobStatus, ProcessCounts,
};
use super::store::Batch;

/// A message to route through the broker once the batch is durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Value,
}

/// The identity of a pending execution.
type ExecutionKey = (String, i64);

/// What a thing was last told: its pending set and its next execution.
#[derive(Debug, Clone, Default, PartialEq)]
struct Announced {
    pending: BTreeSet<ExecutionKey>,
    next: Option<ExecutionKey>,
}

/// Every job and execution, with the bookkeeping of what changed.
pub struct JobsState {
    pub arns: Arns,
    pub minute_ms: i64,
    pub jobs: BTreeMap<String, Job>,
    /// (thing, job) to every execution of that job on that thing, oldest first.
    pub executions: BTreeMap<(String, String), Vec<Execution>>,
    /// Things with an execution of each job.
    pub things_of_job: HashMap<String, BTreeSet<String>>,
    /// Per-status counts of the latest execution of each thing, per job.
    pub counts: HashMap<String, ProcessCounts>,
    pub event_configurations: BTreeMap<String, bool>,
    seq: u64,
    dirty_jobs: BTreeSet<String>,
    deleted_jobs: BTreeSet<String>,
    dirty_histories: BTreeSet<(String, String)>,
    touched: BTreeSet<String>,
    announced: HashMap<String, Announced>,
    outbox: Vec<Outgoing>,
}

/// Seconds for the device APIs.
pub fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

impl JobsState {
    pub fn new(arns: Arns, minute_ms: i64) -> JobsState {
        JobsState {
            arns,
            minute_ms,
            jobs: BTreeMap::new(),
            executions: BTreeMap::new(),
            things_of_job: HashMap::new(),
            counts: HashMap::new(),
            event_configurations: BTreeMap::new(),
            seq: 0,
            dirty_jobs: BTreeSet::new(),
            deleted_jobs: BTreeSet::new(),
            dirty_histories: BTreeSet::new(),
            touched: BTreeSet::new(),
            announced: HashMap::new(),
            outbox: Vec::new(),
        }
    }

    /// Rebuilds the state from what the store holds; nothing is announced again.
    pub fn load(&mut self, jobs: Vec<Job>, executions: Vec<Execution>) {
        for job in jobs {
            self.jobs.insert(job.job_id.clone(), job);
        }
        for e in executions {
            self.seq = self.seq.max(e.seq + 1);
            let key = (e.thing_name.clone(), e.job_id.clone());
            self.things_of_job
                .entry(e.job_id.clone())
                .or_default()
                .insert(e.thing_name.clone());
            self.executions.entry(key).or_default().push(e);
        }
        for ((_, job), history) in &self.executions {
            if let Some(last) = history.last() {
                self.counts.entry(job.clone()).or_default().add(last.status);
            }
        }
        let things: BTreeSet<String> = self.executions.keys().map(|(t, _)| t.clone()).collect();
        for thing in things {
            let now = self.announcement(&thing);
            self.announced.insert(thing, now);
        }
    }

    pub fn thing_arn(&self, thing: &str) -> String {
        self.arns.arn("iot", &format!("thing/{thing}"))
    }

    fn events_enabled(&self, kind: &str) -> bool {
        self.event_configurations
            .get(kind)
            .copied()
            .unwrap_or(false)
    }

    /// The latest execution of `job` on `thing`.
    pub fn latest(&self, thing: &str, job: &str) -> Option<&Execution> {
        self.executions
            .get(&(thing.to_string(), job.to_string()))
            .and_then(|h| h.last())
    }

    /// A specific execution, or the latest when `number` is None.
    pub fn execution(&self, thing: &str, job: &str, number: Option<i64>) -> Option<&Execution> {
        let history = self.executions.get(&(thing.to_string(), job.to_string()))?;
        match number {
            None => history.last(),
            Some(n) => history.iter().find(|e| e.execution_number == n),
        }
    }

    /// Every execution history of `thing`, by job id.
    pub fn histories_of_thing<'a>(
        &'a self,
        thing: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Vec<Execution>)> + 'a {
        self.executions
            .range((thing.to_string(), String::new())..)
            .take_while(move |((t, _), _)| t == thing)
            .map(|((_, j), h)| (j, h))
    }

    /// The pending (QUEUED or IN_PROGRESS) executions of `thing`, in the order devices see.
    pub fn pending<'a>(&'a self, thing: &'a str) -> Vec<&'a Execution> {
        let mut out: Vec<&Execution> = self
            .histories_of_thing(thing)
            .filter_map(|(_, h)| h.last())
            .filter(|e| !e.status.is_terminal())
            .collect();
        out.sort_by_key(|e| pending_order(e));
        out
    }

    fn announcement(&self, thing: &str) -> Announced {
        let pending = self.pending(thing);
        Announced {
            next: pending
                .first()
                .map(|e| (e.job_id.clone(), e.execution_number)),
            pending: pending
                .iter()
                .map(|e| (e.job_id.clone(), e.execution_number))
                .collect(),
        }
    }

    /// Runs `f` on the history of `job` on `thing`, keeping counts and dirty marks right.
    fn with_history<R>(
        &mut self,
        thing: &str,
        job: &str,
        f: impl FnOnce(&mut Vec<Execution>) -> R,
    ) -> R {
        let key = (thing.to_string(), job.to_string());
        let history = self.executions.entry(key.clone()).or_default();
        let before = history.last().map(|e| e.status);
        let result = f(history);
        let after = history.last().map(|e| e.status);
        let empty = history.is_empty();
        if empty {
            self.executions.remove(&key);
            if let Some(set) = self.things_of_job.get_mut(job) {
                set.remove(thing);
            }
        } else {
            self.things_of_job
                .entry(job.to_string())
                .or_default()
                .insert(thing.to_string());
        }
        let counts = self.counts.entry(job.to_string()).or_default();
        if let Some(b) = before {
            if let Some(n) = counts.by_status.get_mut(&b) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(a) = after {
            counts.add(a);
        }
        self.dirty_histories.insert(key);
        self.touched.insert(thing.to_string());
        result
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn mark_job(&mut self, job: &str) {
        self.dirty_jobs.insert(job.to_string());
    }

    /// Marks `job` as changed so the next flush writes it.
    pub fn touch_job(&mut self, job: &str) {
        self.mark_job(job);
    }

    /// Queues a new execution of `job` on `thing` (the next execution number).
    pub fn queue_execution(&mut self, job: &str, thing: &str, retry_attempt: u32, now: i64) {
        let seq = self.next_seq();
        self.with_history(thing, job, |h| {
            let number = h.last().map(|e| e.execution_number + 1).unwrap_or(1);
            let mut e = Execution::queued(job, thing, number, now, seq);
            e.retry_attempt = retry_attempt;
            h.push(e);
        });
        if let Some(j) = self.jobs.get_mut(job) {
            j.notified += 1;
            j.last_updated_ms = now;
        }
        self.mark_job(job);
    }

    /// Queues what the rollout rate allows from `job`'s backlog.
    pub fn release_backlog(&mut self, job_id: &str, now: i64) {
        let succeeded = self
            .counts
            .get(job_id)
            .map(|c| c.get(ExecutionStatus::Succeeded))
            .unwrap_or(0);
        let minute_ms = self.minute_ms;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.status != JobStatus::InProgress || job.backlog.is_empty() {
            return;
        }
        let allowance = job.rollout_allowance(now, minute_ms, succeeded);
        let take = allowance.min(job.backlog.len());
        if take == 0 {
            return;
        }
        let released: Vec<String> = job.backlog.drain(..take).collect();
        job.released_in_window += take as u32;
        self.mark_job(job_id);
        for thing in released {
            self.queue_execution(job_id, &thing, 0, now);
        }
        self.check_completion(job_id, now);
    }

    /// Called after the latest execution of `job` on `thing` reached a terminal status:
    /// event, retry, abort criteria, completion.
    fn after_terminal(&mut self, thing: &str, job_id: &str, now: i64) {
        let Some(last) = self.latest(thing, job_id).cloned() else {
            return;
        };
        self.execution_event(&last, now);
        let retry = self.jobs.get(job_id).and_then(|j| j.retry.clone());
        let job_running = self
            .jobs
            .get(job_id)
            .is_some_and(|j| j.status == JobStatus::InProgress);
        if job_running {
            let history = self
                .executions
                .get(&(thing.to_string(), job_id.to_string()))
                .cloned()
                .unwrap_or_default();
            if should_retry(retry.as_ref(), &history) {
                self.queue_execution(job_id, thing, last.retry_attempt + 1, now);
            }
        }
        self.check_abort(job_id, now);
        self.check_completion(job_id, now);
    }

    fn check_abort(&mut self, job_id: &str, now: i64) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        if job.status != JobStatus::InProgress {
            return;
        }
        let Some(abort) = job.abort.clone() else {
            return;
        };
        let counts = self.counts.get(job_id).cloned().unwrap_or_default();
        if let Some(c) = abort.criteria_list.iter().find(|c| counts.abort_met(c)) {
            let comment = format!(
                "Job aborted: {}% of executed things reported {} (threshold {}%)",
                (match c.failure_type.as_str() {
                    "FAILED" => counts.get(ExecutionStatus::Failed),
                    "REJECTED" => counts.get(ExecutionStatus::Rejected),
                    "TIMED_OUT" => counts.get(ExecutionStatus::TimedOut),
                    _ =>
                        counts.get(ExecutionStatus::Failed)
                            + counts.get(ExecutionStatus::Rejected)
                            + counts.get(ExecutionStatus::TimedOut),
                } * 100)
                    / counts.executed().max(1),
                c.failure_type,
                c.threshold_percentage
            );
            self.cancel_job(job_id, false, Some("ABORTED".into()), Some(comment), now);
        }
    }

    fn check_completion(&mut self, job_id: &str, now: i64) {
        let counts = self.counts.get(job_id).cloned().unwrap_or_default();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.status != JobStatus::InProgress || job.continuous || !job.backlog.is_empty() {
            return;
        }
        if counts.get(ExecutionStatus::Queued) + counts.get(ExecutionStatus::InProgress) > 0 {
            return;
        }
        job.status = JobStatus::Completed;
        job.completed_ms = Some(now);
        job.last_updated_ms = now;
        self.mark_job(job_id);
        self.job_event(job_id, "completed", now);
    }

    /// CancelJob (and abort): the job becomes CANCELED, its backlog is dropped, QUEUED
    /// executions are canceled, IN_PROGRESS ones too when `force`.
    pub fn cancel_job(
        &mut self,
        job_id: &str,
        force: bool,
        reason_code: Option<String>,
        comment: Option<String>,
        now: i64,
    ) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.status = JobStatus::Canceled;
        job.force_canceled |= force;
        if reason_code.is_some() {
            job.reason_code = reason_code;
        }
        if comment.is_some() {
            job.comment = comment;
        }
        job.backlog.clear();
        job.last_updated_ms = now;
        self.mark_job(job_id);
        self.job_event(job_id, "cancellation_in_progress", now);
        let things: Vec<String> = self
            .things_of_job
            .get(job_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for thing in things {
            let status = self.latest(&thing, job_id).map(|e| e.status);
            let cancel = match status {
                Some(ExecutionStatus::Queued) => true,
                Some(ExecutionStatus::InProgress) => force,
                _ => false,
            };
            if cancel {
                self.with_history(&thing, job_id, |h| {
                    if let Some(e) = h.last_mut() {
                        e.force_canceled = e.status == ExecutionStatus::InProgress;
                        e.finish_by_service(ExecutionStatus::Canceled, now);
                    }
                });
                if let Some(e) = self.latest(&thing, job_id).cloned() {
                    self.execution_event(&e, now);
                }
            }
        }
        self.job_event(job_id, "canceled", now);
    }

    /// DeleteJob: the job and every execution go.
    pub fn delete_job(&mut self, job_id: &str, now: i64) {
        self.job_event(job_id, "deletion_in_progress", now);
        let things: Vec<String> = self
            .things_of_job
            .remove(job_id)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        for thing in things {
            let key = (thing.clone(), job_id.to_string());
            if let Some(history) = self.executions.remove(&key) {
                if let Some(last) = history.last() {
                    self.execution_event_named(last, "deleted", now);
                }
            }
            self.dirty_histories.remove(&key);
            self.touched.insert(thing);
        }
        self.job_event(job_id, "deleted", now);
        self.counts.remove(job_id);
        self.jobs.remove(job_id);
        self.dirty_jobs.remove(job_id);
        self.deleted_jobs.insert(job_id.to_string());
    }

    /// CancelJobExecution.
    pub fn cancel_execution(
        &mut self,
        thing: &str,
        job_id: &str,
        force: bool,
        expected_version: Option<i64>,
        details: Option<BTreeMap<String, String>>,
        now: i64,
    ) -> Result<(), ExecutionError> {
        let Some(e) = self.latest(thing, job_id) else {
            return Err(ExecutionError::ResourceNotFound(format!(
                "Job execution for job {job_id} on thing {thing} not found"
            )));
        };
        if e.status.is_terminal() {
            return Err(ExecutionError::InvalidStateTransition(format!(
                "Job execution is already in terminal state {}",
                e.status.as_str()
            )));
        }
        if e.status == ExecutionStatus::InProgress && !force {
            return Err(ExecutionError::InvalidStateTransition(
                "Cannot cancel an IN_PROGRESS job execution without force".into(),
            ));
        }
        if let Some(v) = expected_version {
            if v != e.version_number {
                return Err(ExecutionError::VersionMismatch(format!(
                    "The expected version {v} does not match the current version {}",
                    e.version_number
                )));
            }
        }
        self.with_history(thing, job_id, |h| {
            if let Some(e) = h.last_mut() {
                e.force_canceled = e.status == ExecutionStatus::InProgress;
                if let Some(d) = details {
                    e.status_details = d;
                }
                e.finish_by_service(ExecutionStatus::Canceled, now);
            }
        });
        self.after_terminal(thing, job_id, now);
        Ok(())
    }

    /// DeleteJobExecution of one execution number.
    pub fn delete_execution(
        &mut self,
        thing: &str,
        job_id: &str,
        number: i64,
        force: bool,
        now: i64,
    ) -> Result<(), ExecutionError> {
        let Some(e) = self.execution(thing, job_id, Some(number)).cloned() else {
            return Err(ExecutionError::ResourceNotFound(format!(
                "Job execution {number} of job {job_id} on thing {thing} not found"
            )));
        };
        if !(e.status.is_terminal() || force && e.status == ExecutionStatus::InProgress) {
            return Err(ExecutionError::InvalidStateTransition(format!(
                "Cannot delete a job execution in state {} without force",
                e.status.as_str()
            )));
        }
        self.with_history(thing, job_id, |h| {
            h.retain(|x| x.execution_number != number)
        });
        self.execution_event_named(&e, "deleted", now);
        self.check_completion(job_id, now);
        Ok(())
    }

    /// A thing left every target group of a CONTINUOUS job: its pending execution is REMOVED.
    pub fn remove_thing_from_job(&mut self, thing: &str, job_id: &str, now: i64) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            let before = job.backlog.len();
            job.backlog.retain(|t| t != thing);
            if job.backlog.len() != before {
                self.mark_job(job_id);
            }
        }
        if self
            .latest(thing, job_id)
            .is_some_and(|e| !e.status.is_terminal())
        {
            self.with_history(thing, job_id, |h| {
                if let Some(e) = h.last_mut() {
                    e.finish_by_service(ExecutionStatus::Removed, now);
                }
            });
            self.after_terminal(thing, job_id, now);
        }
    }

    /// A thing joined a target group of a CONTINUOUS job: it gets an execution unless it has
    /// a pending one or is already waiting in the backlog.
    pub fn add_thing_to_job(&mut self, thing: &str, job_id: &str, now: i64) {
        let has_pending = self
            .latest(thing, job_id)
            .is_some_and(|e| !e.status.is_terminal());
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.status != JobStatus::InProgress
            || has_pending
            || job.backlog.iter().any(|t| t == thing)
        {
            return;
        }
        job.backlog.push_back(thing.to_string());
        self.mark_job(job_id);
        self.release_backlog(job_id, now);
    }

    /// Timers and rollouts: times out expired executions and releases backlogs.
    pub fn tick(&mut self, now: i64) {
        let expired: Vec<(String, String)> = self
            .executions
            .iter()
            .filter(|(_, h)| {
                h.last()
                    .and_then(|e| e.deadline_ms())
                    .is_some_and(|d| d <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (thing, job) in expired {
            self.with_history(&thing, &job, |h| {
                if let Some(e) = h.last_mut() {
                    e.expire(now);
                }
            });
            self.after_terminal(&thing, &job, now);
        }
        let rolling: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::InProgress && !j.backlog.is_empty())
            .map(|j| j.job_id.clone())
            .collect();
        for job in rolling {
            self.release_backlog(&job, now);
        }
    }

    /// StartNextPendingJobExecution: the next pending execution, started if it was QUEUED.
    pub fn start_next(
        &mut self,
        thing: &str,
        details: Option<BTreeMap<String, String>>,
        step_timeout: Option<i64>,
        now: i64,
    ) -> Option<Execution> {
        let next = self.pending(thing).first().map(|e| e.job_id.clone())?;
        let timeout = self
            .jobs
            .get(&next)
            .and_then(|j| j.in_progress_timeout_minutes());
        let minute_ms = self.minute_ms;
        let changed = self
            .latest(thing, &next)
            .cloned()
            .map(|mut e| e.start(details.clone(), step_timeout, timeout, now, minute_ms))
            .unwrap_or(false);
        if changed {
            self.with_history(thing, &next, |h| {
                if let Some(e) = h.last_mut() {
                    e.start(details, step_timeout, timeout, now, minute_ms);
                }
            });
        }
        self.latest(thing, &next).cloned()
    }

    /// UpdateJobExecution from a device. Returns the execution after the update.
    pub fn device_update(
        &mut self,
        thing: &str,
        job_id: &str,
        execution_number: Option<i64>,
        update: &DeviceUpdate,
        now: i64,
    ) -> Result<Execution, (ExecutionError, Option<Box<Execution>>)> {
        let Some(current) = self.execution(thing, job_id, execution_number).cloned() else {
            return Err((
                ExecutionError::ResourceNotFound(format!(
                    "Job execution for job {job_id} on thing {thing} not found"
                )),
                None,
            ));
        };
        let latest_number = self.latest(thing, job_id).map(|e| e.execution_number);
        if latest_number != Some(current.execution_number) {
            return Err((
                ExecutionError::InvalidStateTransition(format!(
                    "Execution {} is not the latest execution of job {job_id}",
                    current.execution_number
                )),
                Some(Box::new(current)),
            ));
        }
        let timeout = self
            .jobs
            .get(job_id)
            .and_then(|j| j.in_progress_timeout_minutes());
        let mut next = current.clone();
        next.apply_device_update(update, timeout, now, self.minute_ms)
            .map_err(|e| (e, Some(Box::new(current.clone()))))?;
        let terminal = next.status.is_terminal();
        let stored = next.clone();
        self.with_history(thing, job_id, |h| {
            if let Some(e) = h.last_mut() {
                *e = stored;
            }
        });
        if terminal {
            self.after_terminal(thing, job_id, now);
        }
        Ok(next)
    }

    fn job_event(&mut self, job_id: &str, operation: &str, now: i64) {
        if !self.events_enabled("JOB") {
            return;
        }
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let counts = self.counts.get(job_id).cloned().unwrap_or_default();
        let status = match operation {
            "completed" => "COMPLETED",
            "canceled" => "CANCELED",
            "deleted" => "DELETED",
            "cancellation_in_progress" => "CANCELLATION_IN_PROGRESS",
            _ => "DELETION_IN_PROGRESS",
        };
        let mut payload = json!({
            "eventType": "JOB",
            "eventId": uuid::Uuid::new_v4().to_string(),
            "timestamp": secs(now),
            "operation": operation,
            "jobId": job.job_id,
            "status": status,
            "targetSelection": if job.continuous { "CONTINUOUS" } else { "SNAPSHOT" },
            "targets": job.targets,
            "createdAt": job.created_ms,
            "lastUpdatedAt": now,
        });
        if let Some(d) = &job.description {
            payload["description"] = json!(d);
        }
        if operation == "completed" {
            payload["completedAt"] = json!(now);
            payload["jobProcessDetails"] = json!({
                "numberOfCanceledThings": counts.get(ExecutionStatus::Canceled),
                "numberOfRejectedThings": counts.get(ExecutionStatus::Rejected),
                "numberOfFailedThings": counts.get(ExecutionStatus::Failed),
                "numberOfRemovedThings": counts.get(ExecutionStatus::Removed),
                "numberOfSucceededThings": counts.get(ExecutionStatus::Succeeded),
                "numberOfTimedOutThings": counts.get(ExecutionStatus::TimedOut),
            });
        } else if let Some(c) = &job.comment {
            payload["comment"] = json!(c);
        }
        self.outbox.push(Outgoing {
            topic: format!("$aws/events/job/{job_id}/{operation}"),
            payload,
        });
    }

    fn execution_event(&mut self, e: &Execution, now: i64) {
        self.execution_event_named(e, e.status.event_operation(), now);
    }

    fn execution_event_named(&mut self, e: &Execution, operation: &str, now: i64) {
        if !self.events_enabled("JOB_EXECUTION") {
            return;
        }
        let status = if operation == "deleted" {
            "DELETED"
        } else {
            e.status.as_str()
        };
        self.outbox.push(Outgoing {
            topic: format!("$aws/events/jobExecution/{}/{operation}", e.job_id),
            payload: json!({
                "eventType": "JOB_EXECUTION",
                "eventId": uuid::Uuid::new_v4().to_string(),
                "timestamp": secs(now),
                "operation": operation,
                "jobId": e.job_id,
                "thingArn": self.thing_arn(&e.thing_name),
                "status": status,
                "statusDetails": e.status_details,
            }),
        });
    }

    /// The `jobDocument` of `job` as a JSON value (MQTT shape).
    pub fn document_value(&self, job_id: &str) -> Value {
        self.jobs
            .get(job_id)
            .and_then(|j| j.document.as_deref())
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| json!({}))
    }

    /// JobExecutionSummary of the device APIs.
    pub fn summary(e: &Execution) -> Value {
        let mut s = json!({
            "jobId": e.job_id,
            "queuedAt": secs(e.queued_at_ms),
            "lastUpdatedAt": secs(e.last_updated_at_ms),
            "versionNumber": e.version_number,
            "executionNumber": e.execution_number,
        });
        if let Some(t) = e.started_at_ms {
            s["startedAt"] = json!(secs(t));
        }
        s
    }

    /// JobExecution of the MQTT device API (`jobDocument` as an object).
    pub fn device_execution(&self, e: &Execution, include_document: bool) -> Value {
        let mut out = json!({
            "jobId": e.job_id,
            "thingName": e.thing_name,
            "status": e.status.as_str(),
            "queuedAt": secs(e.queued_at_ms),
            "lastUpdatedAt": secs(e.last_updated_at_ms),
            "versionNumber": e.version_number,
            "executionNumber": e.execution_number,
        });
        if !e.status_details.is_empty() {
            out["statusDetails"] = json!(e.status_details);
        }
        if let Some(t) = e.started_at_ms {
            out["startedAt"] = json!(secs(t));
        }
        if include_document {
            out["jobDocument"] = self.document_value(&e.job_id);
        }
        out
    }

    /// The `notify` payload for `thing`.
    fn notify_payload(&self, thing: &str, now: i64) -> Value {
        let pending = self.pending(thing);
        let mut jobs = serde_json::Map::new();
        let in_progress: Vec<Value> = pending
            .iter()
            .filter(|e| e.status == ExecutionStatus::InProgress)
            .take(10)
            .map(|e| Self::summary(e))
            .collect();
        let room = 10 - in_progress.len();
        let queued: Vec<Value> = pending
            .iter()
            .filter(|e| e.status == ExecutionStatus::Queued)
            .take(room)
            .map(|e| Self::summary(e))
            .collect();
        if !in_progress.is_empty() {
            jobs.insert("IN_PROGRESS".into(), Value::Array(in_progress));
        }
        if !queued.is_empty() {
            jobs.insert("QUEUED".into(), Value::Array(queued));
        }
        json!({ "timestamp": secs(now), "jobs": jobs })
    }

    /// Takes what changed: the store batch, then the messages to publish once it is durable
    /// (`notify` when a thing's pending set changed, `notify-next` when its next execution
    /// changed, job events).
    pub fn flush(&mut self, now: i64) -> (Batch, Vec<Outgoing>) {
        let mut batch = Batch::default();
        for id in std::mem::take(&mut self.dirty_jobs) {
            if let Some(job) = self.jobs.get(&id) {
                batch.jobs.push(job.clone());
            }
        }
        batch.deleted_jobs = std::mem::take(&mut self.deleted_jobs).into_iter().collect();
        for (thing, job) in std::mem::take(&mut self.dirty_histories) {
            let history = self
                .executions
                .get(&(thing.clone(), job.clone()))
                .cloned()
                .unwrap_or_default();
            batch.histories.push((job, thing, history));
        }
        let mut out = std::mem::take(&mut self.outbox);
        for thing in std::mem::take(&mut self.touched) {
            let now_state = self.announcement(&thing);
            let before = self.announced.get(&thing).cloned().unwrap_or_default();
            if now_state.pending != before.pending {
                out.push(Outgoing {
                    topic: format!("$aws/things/{thing}/jobs/notify"),
                    payload: self.notify_payload(&thing, now),
                });
            }
            if now_state.next != before.next {
                let mut payload = json!({ "timestamp": secs(now) });
                if let Some(first) = self.pending(&thing).first() {
                    payload["execution"] = self.device_execution(first, true);
                }
                out.push(Outgoing {
                    topic: format!("$aws/things/{thing}/jobs/notify-next"),
                    payload,
                });
            }
            if now_state.pending.is_empty() {
                self.announced.remove(&thing);
            } else {
                self.announced.insert(thing, now_state);
            }
        }
        (batch, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{
        AbortConfig, AbortCriterion, RetryConfig, RetryCriterion, RolloutConfig,
    };
    use std::collections::VecDeque;

    const MINUTE: i64 = 60_000;

    fn job(id: &str, things: &[&str]) -> Job {
        Job {
            job_id: id.into(),
            arn: format!("arn:aws:iot:us-east-1:123456789012:job/{id}"),
            description: None,
            document: Some("{\"op\":\"x\"}".into()),
            document_source: None,
            targets: vec![],
            continuous: false,
            status: JobStatus::InProgress,
            force_canceled: false,
            reason_code: None,
            comment: None,
            created_ms: 0,
            last_updated_ms: 0,
            completed_ms: None,
            rollout: None,
            abort: None,
            timeout: None,
            retry: None,
            presigned_url_config: None,
            tags: vec![],
            backlog: things
                .iter()
                .map(|s| s.to_string())
                .collect::<VecDeque<_>>(),
            window_start_ms: 0,
            released_in_window: 0,
            window_rate: 0,
            notified: 0,
        }
    }

    fn state() -> JobsState {
        let mut s = JobsState::new(Arns::new("123456789012", "us-east-1"), MINUTE);
        s.event_configurations.insert("JOB".into(), true);
        s.event_configurations.insert("JOB_EXECUTION".into(), true);
        s
    }

    fn add(s: &mut JobsState, j: Job, now: i64) {
        let id = j.job_id.clone();
        s.jobs.insert(id.clone(), j);
        s.release_backlog(&id, now);
    }

    fn topics(out: &[Outgoing]) -> Vec<String> {
        out.iter().map(|o| o.topic.clone()).collect()
    }

    fn done(status: ExecutionStatus) -> DeviceUpdate {
        DeviceUpdate {
            status: Some(status),
            ..Default::default()
        }
    }

    #[test]
    fn notify_and_notify_next_follow_the_pending_set() {
        let mut s = state();
        add(&mut s, job("j1", &["t"]), 1000);
        let (_, out) = s.flush(1000);
        assert_eq!(
            topics(&out),
            vec![
                "$aws/things/t/jobs/notify",
                "$aws/things/t/jobs/notify-next"
            ]
        );
        add(&mut s, job("j2", &["t"]), 2000);
        let (_, out) = s.flush(2000);
        // The next execution is still j1: notify only.
        assert_eq!(topics(&out), vec!["$aws/things/t/jobs/notify"]);
        assert_eq!(
            out[0].payload["jobs"]["QUEUED"].as_array().unwrap().len(),
            2
        );
        // Starting j1 changes neither the set nor the next one.
        let e = s.start_next("t", None, None, 3000).unwrap();
        assert_eq!(e.job_id, "j1");
        let (batch, out) = s.flush(3000);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(batch.histories.len(), 1);
        // Finishing j1: the set shrinks and the next becomes j2.
        s.device_update("t", "j1", None, &done(ExecutionStatus::Succeeded), 4000)
            .unwrap();
        let (_, out) = s.flush(4000);
        assert_eq!(
            topics(&out),
            vec![
                "$aws/events/jobExecution/j1/succeeded",
                "$aws/events/job/j1/completed",
                "$aws/things/t/jobs/notify",
                "$aws/things/t/jobs/notify-next"
            ]
        );
        assert_eq!(out[3].payload["execution"]["jobId"], "j2");
        assert_eq!(s.jobs["j1"].status, JobStatus::Completed);
        // Moving a later QUEUED entry to IN_PROGRESS makes it first.
        add(&mut s, job("j3", &["t"]), 5000);
        s.flush(5000);
        s.device_update("t", "j3", None, &done(ExecutionStatus::InProgress), 6000)
            .unwrap();
        let (_, out) = s.flush(6000);
        assert_eq!(topics(&out), vec!["$aws/things/t/jobs/notify-next"]);
        assert_eq!(out[0].payload["execution"]["jobId"], "j3");
        // Emptying the queue sends an empty notify and a bare notify-next.
        s.cancel_job("j2", false, None, None, 7000);
        s.cancel_job("j3", true, None, None, 7000);
        let (_, out) = s.flush(7000);
        let notify = out.iter().find(|o| o.topic.ends_with("/notify")).unwrap();
        assert_eq!(notify.payload["jobs"], json!({}));
        let next = out
            .iter()
            .find(|o| o.topic.ends_with("/notify-next"))
            .unwrap();
        assert!(next.payload.get("execution").is_none());
    }

    #[test]
    fn rollout_rate_limits_per_minute() {
        let mut s = state();
        let mut j = job("j", &["a", "b", "c", "d", "e"]);
        j.rollout = Some(RolloutConfig {
            maximum_per_minute: Some(2),
            exponential_rate: None,
        });
        add(&mut s, j, 0);
        assert_eq!(s.jobs["j"].notified, 2);
        s.tick(MINUTE - 1);
        assert_eq!(s.jobs["j"].notified, 2);
        s.tick(MINUTE);
        assert_eq!(s.jobs["j"].notified, 4);
        s.tick(2 * MINUTE);
        assert_eq!(s.jobs["j"].notified, 5);
        assert!(s.jobs["j"].backlog.is_empty());
    }

    #[test]
    fn timeouts_retries_and_abort() {
        let mut s = state();
        let mut j = job("j", &["a", "b", "c"]);
        j.retry = Some(RetryConfig {
            criteria_list: vec![RetryCriterion {
                failure_type: "TIMED_OUT".into(),
                number_of_retries: 1,
            }],
        });
        j.abort = Some(AbortConfig {
            criteria_list: vec![AbortCriterion {
                failure_type: "FAILED".into(),
                action: "CANCEL".into(),
                threshold_percentage: 50.0,
                min_number_of_executed_things: 2,
            }],
        });
        add(&mut s, j, 0);
        s.start_next("a", None, Some(1), 0).unwrap();
        s.tick(MINUTE);
        // a timed out and was retried as execution 2.
        let a = s.latest("a", "j").unwrap();
        assert_eq!(
            (a.execution_number, a.status, a.retry_attempt),
            (2, ExecutionStatus::Queued, 1)
        );
        s.device_update("b", "j", None, &done(ExecutionStatus::Failed), MINUTE)
            .unwrap();
        s.device_update("c", "j", None, &done(ExecutionStatus::Failed), MINUTE)
            .unwrap();
        // 2 of 2 executed things failed: the job is canceled, the queued retry too.
        assert_eq!(s.jobs["j"].status, JobStatus::Canceled);
        assert_eq!(
            s.latest("a", "j").unwrap().status,
            ExecutionStatus::Canceled
        );
    }

    #[test]
    fn version_mismatch_returns_current_state() {
        let mut s = state();
        add(&mut s, job("j", &["t"]), 0);
        let mut u = done(ExecutionStatus::InProgress);
        u.expected_version = Some(5);
        let (err, current) = s.device_update("t", "j", None, &u, 1).unwrap_err();
        assert!(matches!(err, ExecutionError::VersionMismatch(_)));
        assert_eq!(current.unwrap().version_number, 1);
        assert!(matches!(
            s.device_update("t", "nope", None, &u, 1).unwrap_err().0,
            ExecutionError::ResourceNotFound(_)
        ));
    }

    #[test]
    fn continuous_jobs_add_and_remove_things() {
        let mut s = state();
        let mut j = job("c", &[]);
        j.continuous = true;
        add(&mut s, j, 0);
        s.add_thing_to_job("t", "c", 10);
        assert_eq!(s.latest("t", "c").unwrap().status, ExecutionStatus::Queued);
        s.remove_thing_from_job("t", "c", 20);
        assert_eq!(s.latest("t", "c").unwrap().status, ExecutionStatus::Removed);
        assert_eq!(s.jobs["c"].status, JobStatus::InProgress);
        s.add_thing_to_job("t", "c", 30);
        assert_eq!(s.latest("t", "c").unwrap().execution_number, 2);
    }
}
