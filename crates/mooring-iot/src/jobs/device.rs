//! The device side of Jobs over MQTT: requests on `$aws/things/{thing}/jobs/get`,
//! `…/start-next`, `…/{jobId}/get` (`$next` allowed) and `…/{jobId}/update`, answered on
//! `<request topic>/accepted` or `/rejected` **only to the requesting connection** through
//! the broker's deliver-to-client path (never routed, so rules and other subscribers never
//! see replies).
//!
//! Parsing ([`parse_request`]) and execution ([`execute`]) are shared with the HTTP device
//! API ([`super::data_api`]); this module renders MQTT's shapes (`jobDocument` as an object,
//! epoch seconds, `clientToken` echoed). Requests are applied in batches: one store write
//! covers every request that arrived meanwhile, then the replies go out.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use mooring_mqtt::{Broker, Message, MessageProperties, Origin};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::engine::Jobs;
use super::model::{
    validate_status_details, validate_step_timeout, DeviceUpdate, Execution, ExecutionError,
    ExecutionStatus, JobStatus,
};
use super::state::{secs, JobsState};

/// Requests taken under one lock and one store write.
const BATCH: usize = 512;

/// A device API operation.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceRequest {
    GetPending,
    StartNext {
        details: Option<BTreeMap<String, String>>,
        step_timeout: Option<i64>,
    },
    Describe {
        job: String,
        execution_number: Option<i64>,
        include_document: bool,
    },
    Update {
        job: String,
        execution_number: Option<i64>,
        update: DeviceUpdate,
        include_state: bool,
        include_document: bool,
    },
}

/// What a device request produced.
#[derive(Debug, Clone)]
pub enum DeviceAnswer {
    Pending {
        in_progress: Vec<Execution>,
        queued: Vec<Execution>,
    },
    Execution {
        execution: Option<Execution>,
        include_document: bool,
    },
    Updated {
        execution: Execution,
        include_state: bool,
        include_document: bool,
    },
}

/// A refused device request: the rejected `code`, a message and, for
/// InvalidStateTransition and VersionMismatch, the current execution.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
    pub current: Option<Box<Execution>>,
}

impl Rejection {
    pub fn new(code: &'static str, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
            current: None,
        }
    }

    fn from_execution_error(e: ExecutionError, current: Option<Box<Execution>>) -> Rejection {
        let (code, message, keep) = match e {
            ExecutionError::InvalidRequest(m) => ("InvalidRequest", m, false),
            ExecutionError::InvalidStateTransition(m) => ("InvalidStateTransition", m, true),
            ExecutionError::VersionMismatch(m) => ("VersionMismatch", m, true),
            ExecutionError::ResourceNotFound(m) => ("ResourceNotFound", m, false),
            ExecutionError::TerminalStateReached(m) => ("TerminalStateReached", m, false),
        };
        Rejection {
            code,
            message,
            current: if keep { current } else { None },
        }
    }
}

/// The operation a topic names: `None` for topics that are not requests (replies and
/// notifications), `Some(Err(()))` for topics in the jobs namespace that map to no API.
pub fn parse_topic(topic: &str) -> Option<(String, Result<DeviceOperation, ()>)> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing, rest) = rest.split_once("/jobs")?;
    if thing.is_empty() {
        return None;
    }
    let parts: Vec<&str> = match rest.strip_prefix('/') {
        Some(r) => r.split('/').collect(),
        None if rest.is_empty() => vec![],
        None => return None,
    };
    if matches!(parts.last(), Some(&"accepted") | Some(&"rejected")) && parts.len() >= 2 {
        return None;
    }
    let op = match parts.as_slice() {
        ["get"] => Ok(DeviceOperation::GetPending),
        ["start-next"] => Ok(DeviceOperation::StartNext),
        [job, "get"] if valid_job_id_or_next(job) => Ok(DeviceOperation::Describe(job.to_string())),
        [job, "update"] if valid_job_id(job) => Ok(DeviceOperation::Update(job.to_string())),
        _ => Err(()),
    };
    Some((thing.to_string(), op))
}

/// The operation a request topic names, before its payload is parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceOperation {
    GetPending,
    StartNext,
    Describe(String),
    Update(String),
}

fn valid_job_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_job_id_or_next(id: &str) -> bool {
    id == "$next" || valid_job_id(id)
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::new("InvalidRequest", message)
}

fn field_i64(body: &Map<String, Value>, name: &str) -> Result<Option<i64>, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{name} must be an integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("{name} must be an integer"))),
        Some(_) => Err(invalid(format!("{name} must be an integer"))),
    }
}

fn field_bool(body: &Map<String, Value>, name: &str, default: bool) -> Result<bool, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
        Some(_) => Err(invalid(format!("{name} must be a boolean"))),
    }
}

fn field_details(body: &Map<String, Value>) -> Result<Option<BTreeMap<String, String>>, Rejection> {
    match body.get("statusDetails") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            let mut out = BTreeMap::new();
            for (k, v) in map {
                let Value::String(s) = v else {
                    return Err(invalid("statusDetails values must be strings"));
                };
                out.insert(k.clone(), s.clone());
            }
            validate_status_details(&out).map_err(|e| Rejection::from_execution_error(e, None))?;
            Ok(Some(out))
        }
        Some(_) => Err(invalid("statusDetails must be a map of strings")),
    }
}

/// Parses the body of a request for `operation`.
pub fn parse_request(
    operation: DeviceOperation,
    body: &Map<String, Value>,
) -> Result<DeviceRequest, Rejection> {
    let step_timeout = field_i64(body, "stepTimeoutInMinutes")?;
    if let Some(m) = step_timeout {
        validate_step_timeout(m).map_err(|e| Rejection::from_execution_error(e, None))?;
    }
    Ok(match operation {
        DeviceOperation::GetPending => DeviceRequest::GetPending,
        DeviceOperation::StartNext => DeviceRequest::StartNext {
            details: field_details(body)?,
            step_timeout,
        },
        DeviceOperation::Describe(job) => DeviceRequest::Describe {
            job,
            execution_number: field_i64(body, "executionNumber")?,
            include_document: field_bool(body, "includeJobDocument", true)?,
        },
        DeviceOperation::Update(job) => {
            let status = match body.get("status") {
                Some(Value::String(s)) => ExecutionStatus::parse(s)
                    .ok_or_else(|| invalid(format!("Invalid job execution status {s}")))?,
                Some(_) => return Err(invalid("status must be a string")),
                None => return Err(invalid("status is required")),
            };
            DeviceRequest::Update {
                job,
                execution_number: field_i64(body, "executionNumber")?,
                update: DeviceUpdate {
                    status: Some(status),
                    status_details: field_details(body)?,
                    expected_version: field_i64(body, "expectedVersion")?,
                    step_timeout_minutes: step_timeout,
                },
                include_state: field_bool(body, "includeJobExecutionState", false)?,
                include_document: field_bool(body, "includeJobDocument", false)?,
            }
        }
    })
}

/// Applies a device request for `thing` to the state.
pub fn execute(
    state: &mut JobsState,
    thing: &str,
    request: DeviceRequest,
    now: i64,
) -> Result<DeviceAnswer, Rejection> {
    match request {
        DeviceRequest::GetPending => {
            let pending: Vec<Execution> = state.pending(thing).into_iter().cloned().collect();
            let (in_progress, queued) = pending
                .into_iter()
                .partition(|e| e.status == ExecutionStatus::InProgress);
            Ok(DeviceAnswer::Pending {
                in_progress,
                queued,
            })
        }
        DeviceRequest::StartNext {
            details,
            step_timeout,
        } => Ok(DeviceAnswer::Execution {
            execution: state.start_next(thing, details, step_timeout, now),
            include_document: true,
        }),
        DeviceRequest::Describe {
            job,
            execution_number,
            include_document,
        } => {
            if job == "$next" {
                return Ok(DeviceAnswer::Execution {
                    execution: state.pending(thing).first().map(|e| (*e).clone()),
                    include_document,
                });
            }
            let Some(execution) = state.execution(thing, &job, execution_number).cloned() else {
                return Err(Rejection::new(
                    "ResourceNotFound",
                    format!("Job execution for job {job} on thing {thing} not found"),
                ));
            };
            let job_finished = state
                .jobs
                .get(&job)
                .is_some_and(|j| matches!(j.status, JobStatus::Completed | JobStatus::Canceled));
            if job_finished && execution.status.is_terminal() {
                return Err(Rejection::new(
                    "TerminalStateReached",
                    format!(
                        "Job {job} is {} and its execution on {thing} is {}",
                        state.jobs[&job].status.as_str(),
                        execution.status.as_str()
                    ),
                ));
            }
            Ok(DeviceAnswer::Execution {
                execution: Some(execution),
                include_document,
            })
        }
        DeviceRequest::Update {
            job,
            execution_number,
            update,
            include_state,
            include_document,
        } => state
            .device_update(thing, &job, execution_number, &update, now)
            .map(|execution| DeviceAnswer::Updated {
                execution,
                include_state,
                include_document,
            })
            .map_err(|(e, current)| Rejection::from_execution_error(e, current)),
    }
}

/// `executionState` of replies.
pub fn execution_state(e: &Execution) -> Value {
    let mut s = json!({ "status": e.status.as_str(), "versionNumber": e.version_number });
    if !e.status_details.is_empty() {
        s["statusDetails"] = json!(e.status_details);
    }
    s
}

/// The accepted payload over MQTT.
pub fn render_accepted(state: &JobsState, answer: &DeviceAnswer, now: i64) -> Value {
    let mut out = match answer {
        DeviceAnswer::Pending {
            in_progress,
            queued,
        } => json!({
            "inProgressJobs": in_progress.iter().map(JobsState::summary).collect::<Vec<_>>(),
            "queuedJobs": queued.iter().map(JobsState::summary).collect::<Vec<_>>(),
        }),
        DeviceAnswer::Execution {
            execution,
            include_document,
        } => match execution {
            Some(e) => json!({ "execution": state.device_execution(e, *include_document) }),
            None => json!({}),
        },
        DeviceAnswer::Updated {
            execution,
            include_state,
            include_document,
        } => {
            let mut out = json!({});
            if *include_state {
                out["executionState"] = execution_state(execution);
            }
            if *include_document {
                out["jobDocument"] = state.document_value(&execution.job_id);
            }
            out
        }
    };
    out["timestamp"] = json!(secs(now));
    out
}

/// The rejected payload over MQTT.
pub fn render_rejected(rejection: &Rejection, now: i64) -> Value {
    let mut out = json!({
        "code": rejection.code,
        "message": rejection.message,
        "timestamp": secs(now),
    });
    if let Some(e) = &rejection.current {
        out["executionState"] = execution_state(e);
    }
    out
}

/// One request as it arrived from the broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub client_id: String,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
}

/// One reply to send to one client.
#[derive(Debug, Clone)]
pub struct Reply {
    pub client_id: String,
    pub topic: String,
    pub payload: Value,
    pub qos: u8,
    pub accepted: bool,
}

/// Subscribes in-process to `$aws/things/+/jobs/#` and answers device requests.
pub fn attach(jobs: Arc<Jobs>, broker: &Broker) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel::<Incoming>();
    let subscription = broker
        .subscribe_callback(
            "$aws/things/+/jobs/#",
            Arc::new(move |m: &Arc<Message>| {
                // Only device publishes are requests; the service's own notifications have
                // no client id.
                let Some(client_id) = &m.origin.client_id else {
                    return;
                };
                let _ = tx.send(Incoming {
                    client_id: client_id.clone(),
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                    qos: m.qos,
                });
            }),
        )
        .map_err(|e| anyhow::anyhow!("subscribing to the jobs device topics: {e}"))?;
    let broker = broker.clone();
    tokio::spawn(async move {
        let _subscription = subscription;
        serve(jobs, broker, rx).await;
    });
    Ok(())
}

async fn serve(jobs: Arc<Jobs>, broker: Broker, mut rx: mpsc::UnboundedReceiver<Incoming>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let replies = answer_batch(&jobs, batch).await;
        let deliveries = replies.into_iter().map(|r| {
            let broker = broker.clone();
            async move {
                let message = Message {
                    topic: r.topic,
                    payload: Bytes::from(r.payload.to_string()),
                    qos: r.qos,
                    retain: false,
                    properties: MessageProperties::default(),
                    expires_at_ms: None,
                    origin: Origin::default(),
                };
                if let Err(e) = broker.deliver_to_client(&r.client_id, message).await {
                    tracing::debug!(client = %r.client_id, error = %e, "jobs reply not delivered");
                }
            }
        });
        futures::future::join_all(deliveries).await;
    }
}

/// Answers a batch of requests under one lock and one store write.
pub async fn answer_batch(jobs: &Jobs, batch: Vec<Incoming>) -> Vec<Reply> {
    let mut state = jobs.lock().await;
    let now = jobs.now();
    let mut replies = Vec::with_capacity(batch.len());
    for m in batch {
        let Some((thing, operation)) = parse_topic(&m.topic) else {
            continue;
        };
        let qos = m.qos.min(1);
        let body: Result<Map<String, Value>, Rejection> = if m.payload.is_empty() {
            Ok(Map::new())
        } else {
            match serde_json::from_slice::<Value>(&m.payload) {
                Ok(Value::Object(map)) => Ok(map),
                _ => Err(Rejection::new(
                    "InvalidJson",
                    "The request payload is not a UTF-8 JSON object",
                )),
            }
        };
        let client_token = body
            .as_ref()
            .ok()
            .and_then(|b| b.get("clientToken"))
            .cloned();
        let result = body.and_then(|body| {
            let operation = operation.map_err(|_| {
                Rejection::new(
                    "InvalidTopic",
                    format!("Topic {} does not name a jobs API", m.topic),
                )
            })?;
            if let Some(t) = body.get("clientToken") {
                if !t.is_string() {
                    return Err(invalid("clientToken must be a string"));
                }
            }
            if !jobs.admit_device_request(&thing) {
                return Err(Rejection::new(
                    "RequestThrottled",
                    format!("Too many job requests for thing {thing}"),
                ));
            }
            let request = parse_request(operation, &body)?;
            execute(&mut state, &thing, request, now)
        });
        let (accepted, mut payload) = match &result {
            Ok(answer) => (true, render_accepted(&state, answer, now)),
            Err(rejection) => (false, render_rejected(rejection, now)),
        };
        if let Some(token) = client_token.filter(Value::is_string) {
            payload["clientToken"] = token;
        }
        replies.push(Reply {
            topic: format!(
                "{}/{}",
                m.topic,
                if accepted { "accepted" } else { "rejected" }
            ),
            client_id: m.client_id,
            payload,
            qos,
            accepted,
        });
    }
    if let Err(e) = jobs.commit(&mut state).await {
        tracing::error!(error = ?e, "persisting job executions failed");
        for r in replies.iter_mut().filter(|r| r.accepted) {
            let token = r.payload.get("clientToken").cloned();
            r.payload = render_rejected(
                &Rejection::new("InternalError", "The change could not be stored"),
                now,
            );
            if let Some(t) = token {
                r.payload["clientToken"] = t;
            }
            if let Some(base) = r.topic.strip_suffix("/accepted") {
                r.topic = format!("{base}/rejected");
            }
            r.accepted = false;
        }
    }
    replies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_operations() {
        let op = |t: &str| parse_topic(t);
        assert_eq!(
            op("$aws/things/t1/jobs/get"),
            Some(("t1".into(), Ok(DeviceOperation::GetPending)))
        );
        assert_eq!(
            op("$aws/things/t1/jobs/start-next"),
            Some(("t1".into(), Ok(DeviceOperation::StartNext)))
        );
        assert_eq!(
            op("$aws/things/t1/jobs/$next/get"),
            Some(("t1".into(), Ok(DeviceOperation::Describe("$next".into()))))
        );
        assert_eq!(
            op("$aws/things/t1/jobs/j-1/update"),
            Some(("t1".into(), Ok(DeviceOperation::Update("j-1".into()))))
        );
        assert_eq!(op("$aws/things/t1/jobs/get/accepted"), None);
        assert_eq!(op("$aws/things/t1/jobs/j/update/rejected"), None);
        assert_eq!(op("$aws/things/t1/shadow/update"), None);
        assert_eq!(
            op("$aws/things/t1/jobs/notify"),
            Some(("t1".into(), Err(())))
        );
        assert_eq!(
            op("$aws/things/t1/jobs/$next/update"),
            Some(("t1".into(), Err(())))
        );
        assert_eq!(
            op("$aws/things/t1/jobs/a/b/c"),
            Some(("t1".into(), Err(())))
        );
    }

    #[test]
    fn request_fields_are_checked() {
        let body = |v: Value| v.as_object().unwrap().clone();
        let update = DeviceOperation::Update("j".into());
        assert!(parse_request(update.clone(), &body(json!({}))).is_err());
        assert_eq!(
            parse_request(update.clone(), &body(json!({"status": "DONE"})))
                .unwrap_err()
                .code,
            "InvalidRequest"
        );
        assert_eq!(
            parse_request(
                update.clone(),
                &body(json!({"status": "IN_PROGRESS", "statusDetails": {"k": 1}}))
            )
            .unwrap_err()
            .code,
            "InvalidRequest"
        );
        assert_eq!(
            parse_request(
                DeviceOperation::StartNext,
                &body(json!({"stepTimeoutInMinutes": 0}))
            )
            .unwrap_err()
            .code,
            "InvalidRequest"
        );
        let parsed = parse_request(
            update,
            &body(json!({"status": "SUCCEEDED", "expectedVersion": 2, "includeJobExecutionState": true})),
        )
        .unwrap();
        match parsed {
            DeviceRequest::Update {
                update,
                include_state,
                ..
            } => {
                assert_eq!(update.expected_version, Some(2));
                assert!(include_state);
            }
            other => panic!("{other:?}"),
        }
    }

    /// Random bytes as payloads never panic the parser and always give a code.
    #[test]
    fn random_payloads_are_rejected_cleanly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..2000 {
            let len = rng.gen_range(0..64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&bytes) {
                let _ = parse_request(DeviceOperation::Update("j".into()), &map);
            }
            let topic = format!(
                "$aws/things/t/jobs/{}",
                String::from_utf8_lossy(&bytes).replace('\0', "")
            );
            let _ = parse_topic(&topic);
        }
    }
}
