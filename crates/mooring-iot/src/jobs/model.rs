//! The jobs model: jobs, their executions on things, the execution state machine and the
//! rules around it (version numbers, step and in-progress timers, retries, abort criteria,
//! rollout rates, job completion). No I/O here: [`super::engine`] applies these rules under
//! its lock and persists the result.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The status of a job execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionStatus {
    Queued,
    InProgress,
    Succeeded,
    Failed,
    TimedOut,
    Rejected,
    Removed,
    Canceled,
}

impl ExecutionStatus {
    pub const ALL: [ExecutionStatus; 8] = [
        ExecutionStatus::Queued,
        ExecutionStatus::InProgress,
        ExecutionStatus::Succeeded,
        ExecutionStatus::Failed,
        ExecutionStatus::TimedOut,
        ExecutionStatus::Rejected,
        ExecutionStatus::Removed,
        ExecutionStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Queued => "QUEUED",
            ExecutionStatus::InProgress => "IN_PROGRESS",
            ExecutionStatus::Succeeded => "SUCCEEDED",
            ExecutionStatus::Failed => "FAILED",
            ExecutionStatus::TimedOut => "TIMED_OUT",
            ExecutionStatus::Rejected => "REJECTED",
            ExecutionStatus::Removed => "REMOVED",
            ExecutionStatus::Canceled => "CANCELED",
        }
    }

    pub fn parse(s: &str) -> Option<ExecutionStatus> {
        ExecutionStatus::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Everything but QUEUED and IN_PROGRESS.
    pub fn is_terminal(self) -> bool {
        !matches!(self, ExecutionStatus::Queued | ExecutionStatus::InProgress)
    }

    /// The statuses a device may report.
    pub fn settable_by_device(self) -> bool {
        matches!(
            self,
            ExecutionStatus::InProgress
                | ExecutionStatus::Succeeded
                | ExecutionStatus::Failed
                | ExecutionStatus::Rejected
        )
    }

    /// The lower-case operation name of the execution event for this status.
    pub fn event_operation(self) -> &'static str {
        match self {
            ExecutionStatus::Queued => "queued",
            ExecutionStatus::InProgress => "in_progress",
            ExecutionStatus::Succeeded => "succeeded",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::TimedOut => "timed_out",
            ExecutionStatus::Rejected => "rejected",
            ExecutionStatus::Removed => "removed",
            ExecutionStatus::Canceled => "canceled",
        }
    }
}

/// The status of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    InProgress,
    Completed,
    Canceled,
    DeletionInProgress,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Canceled => "CANCELED",
            JobStatus::DeletionInProgress => "DELETION_IN_PROGRESS",
        }
    }
}

/// `jobExecutionsRolloutConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exponential_rate: Option<ExponentialRate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExponentialRate {
    pub base_rate_per_minute: u32,
    pub increment_factor: f64,
    pub rate_increase_criteria: RateIncreaseCriteria,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateIncreaseCriteria {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_notified_things: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_succeeded_things: Option<u64>,
}

/// `abortConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortConfig {
    pub criteria_list: Vec<AbortCriterion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortCriterion {
    pub failure_type: String,
    pub action: String,
    pub threshold_percentage: f64,
    pub min_number_of_executed_things: u64,
}

/// `timeoutConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_progress_timeout_in_minutes: Option<i64>,
}

/// `jobExecutionsRetryConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    pub criteria_list: Vec<RetryCriterion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryCriterion {
    pub failure_type: String,
    pub number_of_retries: u32,
}

/// Most retries a thing gets in one job, across failure types.
pub const MAX_RETRIES: u32 = 10;
/// Longest in-progress or step timer, minutes.
pub const MAX_TIMEOUT_MINUTES: i64 = 10_080;
/// Largest job document, bytes.
pub const MAX_DOCUMENT_BYTES: usize = 32 * 1024;
/// Fastest rollout, executions per minute.
pub const MAX_RATE_PER_MINUTE: u32 = 1000;

impl RolloutConfig {
    pub fn validate(&self) -> Result<(), String> {
        match (self.maximum_per_minute, &self.exponential_rate) {
            (Some(_), Some(_)) => {
                Err("Only one of maximumPerMinute and exponentialRate may be given".into())
            }
            (Some(m), None) if !(1..=MAX_RATE_PER_MINUTE).contains(&m) => Err(format!(
                "maximumPerMinute must be between 1 and {MAX_RATE_PER_MINUTE}"
            )),
            (None, Some(e)) => {
                if !(1..=MAX_RATE_PER_MINUTE).contains(&e.base_rate_per_minute) {
                    return Err(format!(
                        "baseRatePerMinute must be between 1 and {MAX_RATE_PER_MINUTE}"
                    ));
                }
                if !(1.1..=5.0).contains(&e.increment_factor) {
                    return Err("incrementFactor must be between 1.1 and 5".into());
                }
                let c = &e.rate_increase_criteria;
                match (c.number_of_notified_things, c.number_of_succeeded_things) {
                    (Some(n), None) | (None, Some(n)) if n >= 1 => Ok(()),
                    _ => Err("rateIncreaseCriteria needs exactly one of numberOfNotifiedThings and numberOfSucceededThings (>= 1)".into()),
                }
            }
            _ => Ok(()),
        }
    }

    /// The rate in force after `notified` executions were queued and `succeeded` succeeded.
    pub fn rate_per_minute(&self, notified: u64, succeeded: u64) -> Option<u32> {
        if let Some(m) = self.maximum_per_minute {
            return Some(m);
        }
        let e = self.exponential_rate.as_ref()?;
        let c = &e.rate_increase_criteria;
        let steps = match (c.number_of_notified_things, c.number_of_succeeded_things) {
            (Some(n), _) => notified / n.max(1),
            (_, Some(n)) => succeeded / n.max(1),
            _ => 0,
        };
        let rate = e.base_rate_per_minute as f64 * e.increment_factor.powi(steps.min(64) as i32);
        Some(rate.min(MAX_RATE_PER_MINUTE as f64).floor() as u32)
    }
}

impl AbortConfig {
    pub fn validate(&self) -> Result<(), String> {
        for c in &self.criteria_list {
            if !matches!(
                c.failure_type.as_str(),
                "FAILED" | "REJECTED" | "TIMED_OUT" | "ALL"
            ) {
                return Err(format!("Invalid failureType {}", c.failure_type));
            }
            if c.action != "CANCEL" {
                return Err(format!("Invalid abort action {}", c.action));
            }
            if !(0.0..=100.0).contains(&c.threshold_percentage) {
                return Err("thresholdPercentage must be at most 100".into());
            }
            if c.min_number_of_executed_things < 1 {
                return Err("minNumberOfExecutedThings must be at least 1".into());
            }
        }
        Ok(())
    }
}

impl RetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        let mut total = 0;
        for c in &self.criteria_list {
            if !matches!(c.failure_type.as_str(), "FAILED" | "TIMED_OUT" | "ALL") {
                return Err(format!("Invalid retry failureType {}", c.failure_type));
            }
            if c.number_of_retries > MAX_RETRIES {
                return Err(format!(
                    "numberOfRetries must be between 0 and {MAX_RETRIES}"
                ));
            }
            total += c.number_of_retries;
        }
        if total > MAX_RETRIES {
            return Err(format!(
                "The total number of retries cannot exceed {MAX_RETRIES}"
            ));
        }
        Ok(())
    }

    /// Retries allowed after a failure of `status` (FAILED or TIMED_OUT).
    pub fn allowed_for(&self, status: ExecutionStatus) -> u32 {
        let wanted = status.as_str();
        let specific = self
            .criteria_list
            .iter()
            .find(|c| c.failure_type == wanted)
            .map(|c| c.number_of_retries);
        let all = self
            .criteria_list
            .iter()
            .find(|c| c.failure_type == "ALL")
            .map(|c| c.number_of_retries);
        specific.or(all).unwrap_or(0)
    }
}

/// One execution (attempt) of a job on a thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub job_id: String,
    pub thing_name: String,
    pub execution_number: i64,
    pub status: ExecutionStatus,
    pub status_details: BTreeMap<String, String>,
    pub queued_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub last_updated_at_ms: i64,
    pub version_number: i64,
    /// Absolute deadline of the step timer.
    pub step_deadline_ms: Option<i64>,
    /// Absolute deadline of the in-progress timer.
    pub in_progress_deadline_ms: Option<i64>,
    pub retry_attempt: u32,
    pub force_canceled: bool,
    /// Queue order among executions queued in the same millisecond.
    pub seq: u64,
}

/// Why a device's request on an execution was refused; the device APIs map each variant to
/// their rejected code or exception.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutionError {
    InvalidRequest(String),
    InvalidStateTransition(String),
    VersionMismatch(String),
    ResourceNotFound(String),
    TerminalStateReached(String),
}

/// A device's UpdateJobExecution, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceUpdate {
    pub status: Option<ExecutionStatus>,
    pub status_details: Option<BTreeMap<String, String>>,
    pub expected_version: Option<i64>,
    pub step_timeout_minutes: Option<i64>,
}

/// Checks a `statusDetails` map: keys `[a-zA-Z0-9:_-]+` up to 128, values without control
/// characters up to 1024.
pub fn validate_status_details(details: &BTreeMap<String, String>) -> Result<(), ExecutionError> {
    for (k, v) in details {
        let key_ok = (1..=128).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
        if !key_ok {
            return Err(ExecutionError::InvalidRequest(format!(
                "statusDetails key '{k}' must match [a-zA-Z0-9:_-]+ and be at most 128 characters"
            )));
        }
        if v.is_empty() || v.chars().count() > 1024 || v.chars().any(char::is_control) {
            return Err(ExecutionError::InvalidRequest(format!(
                "statusDetails value for '{k}' must be 1 to 1024 characters without control characters"
            )));
        }
    }
    Ok(())
}

/// Checks a `stepTimeoutInMinutes`: 1 to 10080, or -1 to cancel the current step timer.
pub fn validate_step_timeout(minutes: i64) -> Result<(), ExecutionError> {
    if minutes == -1 || (1..=MAX_TIMEOUT_MINUTES).contains(&minutes) {
        Ok(())
    } else {
        Err(ExecutionError::InvalidRequest(format!(
            "stepTimeoutInMinutes must be between 1 and {MAX_TIMEOUT_MINUTES} (or -1), not {minutes}"
        )))
    }
}

impl Execution {
    /// A freshly queued execution.
    pub fn queued(job_id: &str, thing: &str, number: i64, now_ms: i64, seq: u64) -> Execution {
        Execution {
            job_id: job_id.to_string(),
            thing_name: thing.to_string(),
            execution_number: number,
            status: ExecutionStatus::Queued,
            status_details: BTreeMap::new(),
            queued_at_ms: now_ms,
            started_at_ms: None,
            last_updated_at_ms: now_ms,
            version_number: 1,
            step_deadline_ms: None,
            in_progress_deadline_ms: None,
            retry_attempt: 0,
            force_canceled: false,
            seq,
        }
    }

    /// The timer that fires first, if the execution is in progress.
    pub fn deadline_ms(&self) -> Option<i64> {
        if self.status != ExecutionStatus::InProgress {
            return None;
        }
        match (self.step_deadline_ms, self.in_progress_deadline_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Seconds left before the execution times out (0 when none is set).
    pub fn approximate_seconds_before_timed_out(&self, now_ms: i64) -> Option<i64> {
        self.deadline_ms()
            .map(|d| ((d - now_ms).max(0) + 999) / 1000)
    }

    fn set_step_timer(&mut self, minutes: i64, now_ms: i64, minute_ms: i64) {
        if minutes == -1 {
            self.step_deadline_ms = None;
            return;
        }
        let mut deadline = now_ms + minutes * minute_ms;
        if let Some(limit) = self.in_progress_deadline_ms {
            deadline = deadline.min(limit);
        }
        self.step_deadline_ms = Some(deadline);
    }

    /// Moves a QUEUED execution to IN_PROGRESS (StartNextPendingJobExecution), starting the
    /// in-progress timer and the step timer; an IN_PROGRESS one keeps its details and only
    /// gets a new step timer. Returns whether anything changed.
    pub fn start(
        &mut self,
        details: Option<BTreeMap<String, String>>,
        step_timeout_minutes: Option<i64>,
        in_progress_timeout_minutes: Option<i64>,
        now_ms: i64,
        minute_ms: i64,
    ) -> bool {
        match self.status {
            ExecutionStatus::Queued => {
                self.status = ExecutionStatus::InProgress;
                self.started_at_ms = Some(now_ms);
                self.in_progress_deadline_ms =
                    in_progress_timeout_minutes.map(|m| now_ms + m * minute_ms);
                if let Some(d) = details {
                    self.status_details = d;
                }
                if let Some(m) = step_timeout_minutes {
                    self.set_step_timer(m, now_ms, minute_ms);
                }
            }
            ExecutionStatus::InProgress => match step_timeout_minutes {
                Some(m) => self.set_step_timer(m, now_ms, minute_ms),
                None => return false,
            },
            _ => return false,
        }
        self.version_number += 1;
        self.last_updated_at_ms = now_ms;
        true
    }

    /// Applies a device's UpdateJobExecution.
    pub fn apply_device_update(
        &mut self,
        update: &DeviceUpdate,
        in_progress_timeout_minutes: Option<i64>,
        now_ms: i64,
        minute_ms: i64,
    ) -> Result<(), ExecutionError> {
        let Some(status) = update.status else {
            return Err(ExecutionError::InvalidRequest(
                "status is required".to_string(),
            ));
        };
        if !status.settable_by_device() {
            return Err(ExecutionError::InvalidRequest(format!(
                "A device cannot set status {}; valid statuses are IN_PROGRESS, SUCCEEDED, FAILED and REJECTED",
                status.as_str()
            )));
        }
        if let Some(d) = &update.status_details {
            validate_status_details(d)?;
        }
        if let Some(m) = update.step_timeout_minutes {
            validate_step_timeout(m)?;
        }
        if self.status.is_terminal() {
            return Err(ExecutionError::InvalidStateTransition(format!(
                "Job execution {} of job {} on thing {} is already in terminal state {}",
                self.execution_number,
                self.job_id,
                self.thing_name,
                self.status.as_str()
            )));
        }
        if let Some(expected) = update.expected_version {
            if expected != self.version_number {
                return Err(ExecutionError::VersionMismatch(format!(
                    "The expected version {expected} does not match the current version {}",
                    self.version_number
                )));
            }
        }
        if status == ExecutionStatus::InProgress {
            if self.status == ExecutionStatus::Queued {
                self.started_at_ms = Some(now_ms);
                self.in_progress_deadline_ms =
                    in_progress_timeout_minutes.map(|m| now_ms + m * minute_ms);
            }
            if let Some(m) = update.step_timeout_minutes {
                self.set_step_timer(m, now_ms, minute_ms);
            }
        } else {
            self.step_deadline_ms = None;
            self.in_progress_deadline_ms = None;
        }
        self.status = status;
        if let Some(d) = &update.status_details {
            self.status_details = d.clone();
        }
        self.version_number += 1;
        self.last_updated_at_ms = now_ms;
        Ok(())
    }

    /// Ends the execution by the service's hand (CANCELED, REMOVED, TIMED_OUT).
    pub fn finish_by_service(&mut self, status: ExecutionStatus, now_ms: i64) {
        self.status = status;
        self.step_deadline_ms = None;
        self.in_progress_deadline_ms = None;
        self.version_number += 1;
        self.last_updated_at_ms = now_ms;
    }

    /// Times the execution out if one of its timers has passed. Returns whether it did.
    pub fn expire(&mut self, now_ms: i64) -> bool {
        match self.deadline_ms() {
            Some(d) if d <= now_ms => {
                self.finish_by_service(ExecutionStatus::TimedOut, now_ms);
                true
            }
            _ => false,
        }
    }
}

/// How the pending executions of a thing are ordered: IN_PROGRESS first, then QUEUED, each
/// in queue order.
pub fn pending_order(e: &Execution) -> (u8, i64, u64) {
    let rank = if e.status == ExecutionStatus::InProgress {
        0
    } else {
        1
    };
    (rank, e.queued_at_ms, e.seq)
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    pub arn: String,
    pub description: Option<String>,
    pub document: Option<String>,
    pub document_source: Option<String>,
    pub targets: Vec<String>,
    pub continuous: bool,
    pub status: JobStatus,
    pub force_canceled: bool,
    pub reason_code: Option<String>,
    pub comment: Option<String>,
    pub created_ms: i64,
    pub last_updated_ms: i64,
    pub completed_ms: Option<i64>,
    pub rollout: Option<RolloutConfig>,
    pub abort: Option<AbortConfig>,
    pub timeout: Option<TimeoutConfig>,
    pub retry: Option<RetryConfig>,
    pub presigned_url_config: Option<serde_json::Value>,
    pub tags: Vec<serde_json::Value>,
    /// Things targeted but not yet given an execution (rollout backlog).
    pub backlog: VecDeque<String>,
    /// Start of the current rollout minute and executions released in it.
    pub window_start_ms: i64,
    pub released_in_window: u32,
    /// The rate fixed at the start of the current rollout minute (0: not fixed yet).
    #[serde(default)]
    pub window_rate: u32,
    /// Executions queued so far (rollout's "notified things").
    pub notified: u64,
}

impl Job {
    pub fn in_progress_timeout_minutes(&self) -> Option<i64> {
        self.timeout
            .as_ref()
            .and_then(|t| t.in_progress_timeout_in_minutes)
    }

    /// How many backlog entries may be queued now, given `succeeded` executions so far.
    /// Advances the rollout window.
    pub fn rollout_allowance(&mut self, now_ms: i64, minute_ms: i64, succeeded: u64) -> usize {
        let Some(rate) = self
            .rollout
            .as_ref()
            .and_then(|r| r.rate_per_minute(self.notified, succeeded))
        else {
            return self.backlog.len();
        };
        // The rate in force is fixed for a whole minute, so an exponential rollout speeds up
        // minute by minute, not within one.
        if now_ms - self.window_start_ms >= minute_ms {
            self.window_start_ms = now_ms;
            self.released_in_window = 0;
            self.window_rate = rate;
        } else if self.window_rate == 0 {
            self.window_rate = rate;
        }
        self.window_rate.saturating_sub(self.released_in_window) as usize
    }
}

/// Per-status counts of the latest execution of each thing, as `jobProcessDetails` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessCounts {
    pub by_status: BTreeMap<ExecutionStatus, u64>,
}

impl ProcessCounts {
    pub fn get(&self, s: ExecutionStatus) -> u64 {
        self.by_status.get(&s).copied().unwrap_or(0)
    }

    pub fn add(&mut self, s: ExecutionStatus) {
        *self.by_status.entry(s).or_default() += 1;
    }

    /// Things whose execution finished (any terminal status).
    pub fn executed(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum()
    }

    /// Whether an abort criterion is met.
    pub fn abort_met(&self, c: &AbortCriterion) -> bool {
        let executed = self.executed();
        if executed < c.min_number_of_executed_things || executed == 0 {
            return false;
        }
        let failed = match c.failure_type.as_str() {
            "FAILED" => self.get(ExecutionStatus::Failed),
            "REJECTED" => self.get(ExecutionStatus::Rejected),
            "TIMED_OUT" => self.get(ExecutionStatus::TimedOut),
            _ => {
                self.get(ExecutionStatus::Failed)
                    + self.get(ExecutionStatus::Rejected)
                    + self.get(ExecutionStatus::TimedOut)
            }
        };
        failed as f64 * 100.0 / executed as f64 >= c.threshold_percentage
    }
}

/// Whether an execution that just ended with `history`'s last status gets a retry, given the
/// earlier attempts in `history`.
pub fn should_retry(retry: Option<&RetryConfig>, history: &[Execution]) -> bool {
    let (Some(retry), Some(last)) = (retry, history.last()) else {
        return false;
    };
    if !matches!(
        last.status,
        ExecutionStatus::Failed | ExecutionStatus::TimedOut
    ) {
        return false;
    }
    let used_total = last.retry_attempt;
    if used_total >= MAX_RETRIES {
        return false;
    }
    let allowed = retry.allowed_for(last.status);
    let specific = retry
        .criteria_list
        .iter()
        .any(|c| c.failure_type == last.status.as_str());
    let used = history
        .iter()
        .take(history.len() - 1)
        .filter(|e| !specific || e.status == last.status)
        .filter(|e| {
            matches!(
                e.status,
                ExecutionStatus::Failed | ExecutionStatus::TimedOut
            )
        })
        .count() as u32;
    used < allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    fn update(status: ExecutionStatus) -> DeviceUpdate {
        DeviceUpdate {
            status: Some(status),
            ..Default::default()
        }
    }

    #[test]
    fn queued_to_in_progress_to_succeeded_bumps_versions() {
        let mut e = Execution::queued("j", "t", 1, 1_000, 0);
        assert_eq!(e.version_number, 1);
        assert!(e.start(None, None, None, 2_000, MINUTE));
        assert_eq!(e.status, ExecutionStatus::InProgress);
        assert_eq!(e.started_at_ms, Some(2_000));
        assert_eq!(e.version_number, 2);
        e.apply_device_update(&update(ExecutionStatus::Succeeded), None, 3_000, MINUTE)
            .unwrap();
        assert_eq!(e.version_number, 3);
        assert_eq!(e.last_updated_at_ms, 3_000);
        assert!(e.status.is_terminal());
    }

    #[test]
    fn terminal_states_refuse_every_change() {
        for end in [
            ExecutionStatus::Succeeded,
            ExecutionStatus::Failed,
            ExecutionStatus::Rejected,
        ] {
            let mut e = Execution::queued("j", "t", 1, 0, 0);
            e.apply_device_update(&update(end), None, 1, MINUTE)
                .unwrap();
            for next in [
                ExecutionStatus::InProgress,
                ExecutionStatus::Succeeded,
                ExecutionStatus::Failed,
                ExecutionStatus::Rejected,
            ] {
                assert!(matches!(
                    e.apply_device_update(&update(next), None, 2, MINUTE),
                    Err(ExecutionError::InvalidStateTransition(_))
                ));
            }
        }
    }

    #[test]
    fn service_only_statuses_are_invalid_requests() {
        let mut e = Execution::queued("j", "t", 1, 0, 0);
        for s in [
            ExecutionStatus::Queued,
            ExecutionStatus::Canceled,
            ExecutionStatus::TimedOut,
            ExecutionStatus::Removed,
        ] {
            assert!(matches!(
                e.apply_device_update(&update(s), None, 1, MINUTE),
                Err(ExecutionError::InvalidRequest(_))
            ));
        }
        assert_eq!(e.version_number, 1);
        assert!(matches!(
            e.apply_device_update(&DeviceUpdate::default(), None, 1, MINUTE),
            Err(ExecutionError::InvalidRequest(_))
        ));
    }

    #[test]
    fn expected_version_mismatch_leaves_state_alone() {
        let mut e = Execution::queued("j", "t", 1, 0, 0);
        let mut u = update(ExecutionStatus::InProgress);
        u.expected_version = Some(7);
        assert!(matches!(
            e.apply_device_update(&u, None, 1, MINUTE),
            Err(ExecutionError::VersionMismatch(_))
        ));
        assert_eq!(e.status, ExecutionStatus::Queued);
        u.expected_version = Some(1);
        e.apply_device_update(&u, None, 1, MINUTE).unwrap();
        assert_eq!(e.version_number, 2);
    }

    #[test]
    fn in_progress_and_step_timers() {
        let mut e = Execution::queued("j", "t", 1, 0, 0);
        e.start(None, Some(5), Some(3), 0, MINUTE);
        // The step timer cannot outlive the in-progress timer.
        assert_eq!(e.step_deadline_ms, Some(3 * MINUTE));
        assert_eq!(e.deadline_ms(), Some(3 * MINUTE));
        let mut u = update(ExecutionStatus::InProgress);
        u.step_timeout_minutes = Some(1);
        e.apply_device_update(&u, Some(3), MINUTE, MINUTE).unwrap();
        assert_eq!(e.deadline_ms(), Some(2 * MINUTE));
        assert_eq!(e.approximate_seconds_before_timed_out(MINUTE), Some(60));
        assert!(!e.expire(2 * MINUTE - 1));
        assert!(e.expire(2 * MINUTE));
        assert_eq!(e.status, ExecutionStatus::TimedOut);
        assert_eq!(e.deadline_ms(), None);
        // -1 cancels a step timer.
        let mut e = Execution::queued("j", "t", 1, 0, 0);
        e.start(None, Some(1), None, 0, MINUTE);
        u.step_timeout_minutes = Some(-1);
        e.apply_device_update(&u, None, 1, MINUTE).unwrap();
        assert_eq!(e.deadline_ms(), None);
        u.step_timeout_minutes = Some(0);
        assert!(matches!(
            e.apply_device_update(&u, None, 1, MINUTE),
            Err(ExecutionError::InvalidRequest(_))
        ));
    }

    #[test]
    fn start_next_keeps_details_of_an_execution_in_progress() {
        let mut e = Execution::queued("j", "t", 1, 0, 0);
        let details: BTreeMap<_, _> = [("step".to_string(), "1".to_string())].into();
        e.start(Some(details.clone()), None, None, 0, MINUTE);
        assert!(!e.start(
            Some([("step".to_string(), "2".to_string())].into()),
            None,
            None,
            1,
            MINUTE
        ));
        assert_eq!(e.status_details, details);
    }

    #[test]
    fn status_details_are_checked() {
        let bad_key: BTreeMap<_, _> = [("a b".to_string(), "v".to_string())].into();
        assert!(validate_status_details(&bad_key).is_err());
        let long: BTreeMap<_, _> = [("k".to_string(), "x".repeat(1025))].into();
        assert!(validate_status_details(&long).is_err());
        let ok: BTreeMap<_, _> = [("k:1_-".to_string(), "ünïcode ok".to_string())].into();
        assert!(validate_status_details(&ok).is_ok());
    }

    #[test]
    fn exponential_rollout_rates() {
        let r = RolloutConfig {
            maximum_per_minute: None,
            exponential_rate: Some(ExponentialRate {
                base_rate_per_minute: 50,
                increment_factor: 2.0,
                rate_increase_criteria: RateIncreaseCriteria {
                    number_of_notified_things: Some(1000),
                    number_of_succeeded_things: None,
                },
            }),
        };
        assert!(r.validate().is_ok());
        assert_eq!(r.rate_per_minute(0, 0), Some(50));
        assert_eq!(r.rate_per_minute(1000, 0), Some(100));
        assert_eq!(r.rate_per_minute(3500, 0), Some(400));
        assert_eq!(r.rate_per_minute(100_000, 0), Some(1000));
        let bad = RolloutConfig {
            maximum_per_minute: Some(0),
            exponential_rate: None,
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn abort_criteria_and_retries() {
        let mut counts = ProcessCounts::default();
        let c = AbortCriterion {
            failure_type: "FAILED".into(),
            action: "CANCEL".into(),
            threshold_percentage: 50.0,
            min_number_of_executed_things: 2,
        };
        counts.add(ExecutionStatus::Failed);
        assert!(!counts.abort_met(&c), "below the minimum executed");
        counts.add(ExecutionStatus::Succeeded);
        assert!(counts.abort_met(&c));
        counts.add(ExecutionStatus::Succeeded);
        assert!(!counts.abort_met(&c));

        let retry = RetryConfig {
            criteria_list: vec![RetryCriterion {
                failure_type: "FAILED".into(),
                number_of_retries: 1,
            }],
        };
        assert!(retry.validate().is_ok());
        let mut first = Execution::queued("j", "t", 1, 0, 0);
        first.status = ExecutionStatus::Failed;
        assert!(should_retry(Some(&retry), std::slice::from_ref(&first)));
        let mut second = Execution::queued("j", "t", 2, 0, 1);
        second.status = ExecutionStatus::Failed;
        second.retry_attempt = 1;
        assert!(!should_retry(Some(&retry), &[first.clone(), second]));
        let mut timed_out = first.clone();
        timed_out.status = ExecutionStatus::TimedOut;
        assert!(!should_retry(Some(&retry), &[timed_out]));
        let too_many = RetryConfig {
            criteria_list: vec![
                RetryCriterion {
                    failure_type: "FAILED".into(),
                    number_of_retries: 6,
                },
                RetryCriterion {
                    failure_type: "TIMED_OUT".into(),
                    number_of_retries: 5,
                },
            ],
        };
        assert!(too_many.validate().is_err());
    }

    #[test]
    fn pending_order_puts_in_progress_first() {
        let a = Execution::queued("a", "t", 1, 10, 0);
        let mut b = Execution::queued("b", "t", 1, 20, 1);
        b.status = ExecutionStatus::InProgress;
        let mut v = [a, b];
        v.sort_by_key(pending_order);
        assert_eq!(v[0].job_id, "b");
    }
}
