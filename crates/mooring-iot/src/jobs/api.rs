//! The jobs control plane of the `iot` service: one function per operation (parse, call
//! [`Jobs`](super::Jobs), render AWS's response) and their rows in the routing table.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::{json_response, AwsError, AwsRequest, Protocol};
use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{JobUpdate, JobsError, NewJob};
use super::model::{
    AbortConfig, Execution, ExecutionStatus, Job, RetryConfig, RolloutConfig, TimeoutConfig,
};
use crate::api::{empty_ok, IotState, OperationResult, PathParams, RouteRow};
use crate::registry::api::body_or_default;
use crate::registry::group_api::paginate;

/// The jobs operations' rows of the `iot` routing table.
pub fn routes() -> Vec<RouteRow> {
    vec![
        (Method::GET, "/jobs", "ListJobs", list_jobs),
        (Method::PUT, "/jobs/{jobId}", "CreateJob", create_job),
        (Method::GET, "/jobs/{jobId}", "DescribeJob", describe_job),
        (Method::PATCH, "/jobs/{jobId}", "UpdateJob", update_job),
        (Method::DELETE, "/jobs/{jobId}", "DeleteJob", delete_job),
        (Method::PUT, "/jobs/{jobId}/cancel", "CancelJob", cancel_job),
        (
            Method::GET,
            "/jobs/{jobId}/job-document",
            "GetJobDocument",
            get_job_document,
        ),
        (
            Method::GET,
            "/jobs/{jobId}/things",
            "ListJobExecutionsForJob",
            list_job_executions_for_job,
        ),
        (
            Method::GET,
            "/things/{thingName}/jobs",
            "ListJobExecutionsForThing",
            list_job_executions_for_thing,
        ),
        (
            Method::GET,
            "/things/{thingName}/jobs/{jobId}",
            "DescribeJobExecution",
            describe_job_execution,
        ),
        (
            Method::PUT,
            "/things/{thingName}/jobs/{jobId}/cancel",
            "CancelJobExecution",
            cancel_job_execution,
        ),
        (
            Method::DELETE,
            "/things/{thingName}/jobs/{jobId}/executionNumber/{executionNumber}",
            "DeleteJobExecution",
            delete_job_execution,
        ),
        (
            Method::PATCH,
            "/event-configurations",
            "UpdateEventConfigurations",
            update_event_configurations,
        ),
        (
            Method::GET,
            "/event-configurations",
            "DescribeEventConfigurations",
            describe_event_configurations,
        ),
    ]
}

/// Renders a jobs error as AWS IoT answers it.
pub fn jobs_error(e: JobsError) -> AwsError {
    match e {
        JobsError::InvalidRequest(m) => AwsError::client("InvalidRequestException", m),
        JobsError::NotFound(m) => {
            AwsError::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", m)
        }
        JobsError::AlreadyExists(m) => {
            AwsError::new(StatusCode::CONFLICT, "ResourceAlreadyExistsException", m)
        }
        JobsError::InvalidStateTransition(m) => {
            AwsError::new(StatusCode::CONFLICT, "InvalidStateTransitionException", m)
        }
        JobsError::VersionConflict(m) => {
            AwsError::new(StatusCode::CONFLICT, "VersionConflictException", m)
        }
        JobsError::LimitExceeded(m) => AwsError::new(StatusCode::GONE, "LimitExceededException", m),
        JobsError::Internal(m) => AwsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            m,
        ),
    }
}

/// Control-plane timestamps: epoch seconds with a fraction.
fn ts(ms: i64) -> Value {
    json!(ms as f64 / 1000.0)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CreateJobRequest {
    #[serde(default)]
    targets: Vec<String>,
    document: Option<String>,
    document_source: Option<String>,
    description: Option<String>,
    presigned_url_config: Option<Value>,
    target_selection: Option<String>,
    job_executions_rollout_config: Option<RolloutConfig>,
    abort_config: Option<AbortConfig>,
    timeout_config: Option<TimeoutConfig>,
    job_executions_retry_config: Option<RetryConfig>,
    #[serde(default)]
    tags: Vec<Value>,
    namespace_id: Option<String>,
    job_template_arn: Option<String>,
    scheduling_config: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UpdateJobRequest {
    description: Option<String>,
    presigned_url_config: Option<Value>,
    job_executions_rollout_config: Option<RolloutConfig>,
    abort_config: Option<AbortConfig>,
    timeout_config: Option<TimeoutConfig>,
    job_executions_retry_config: Option<RetryConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CancelJobRequest {
    reason_code: Option<String>,
    comment: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CancelJobExecutionRequest {
    expected_version: Option<i64>,
    status_details: Option<BTreeMap<String, String>>,
}

fn unsupported(what: &str) -> AwsError {
    AwsError::client(
        "InvalidRequestException",
        format!("{what} is not supported by this server"),
    )
}

fn query_bool(request: &AwsRequest, name: &str) -> Result<bool, AwsError> {
    match request.query_param(name).as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(AwsError::client(
            "InvalidRequestException",
            format!("{name} must be true or false, not '{other}'"),
        )),
    }
}

fn create_job(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: CreateJobRequest = body_or_default(&request)?;
        if body.namespace_id.is_some() {
            return Err(unsupported("namespaceId"));
        }
        if body.job_template_arn.is_some() {
            return Err(unsupported("jobTemplateArn"));
        }
        if body.scheduling_config.is_some() {
            return Err(unsupported("schedulingConfig"));
        }
        let continuous = match body.target_selection.as_deref() {
            None | Some("SNAPSHOT") => false,
            Some("CONTINUOUS") => true,
            Some(other) => {
                return Err(AwsError::client(
                    "InvalidRequestException",
                    format!("1 validation error detected: Value '{other}' at 'targetSelection' failed to satisfy constraint: Member must satisfy enum value set: [SNAPSHOT, CONTINUOUS]"),
                ))
            }
        };
        let job = state
            .jobs
            .create_job(
                params.get("jobId"),
                NewJob {
                    targets: body.targets,
                    document: body.document,
                    document_source: body.document_source,
                    description: body.description,
                    continuous,
                    rollout: body.job_executions_rollout_config,
                    abort: body.abort_config,
                    timeout: body.timeout_config,
                    retry: body.job_executions_retry_config,
                    presigned_url_config: body.presigned_url_config,
                    tags: body.tags,
                },
            )
            .await
            .map_err(jobs_error)?;
        Ok(json_response(Protocol::RestJson1, &job_header(&job)))
    })
}

fn job_header(job: &Job) -> Value {
    let mut out = json!({ "jobArn": job.arn, "jobId": job.job_id });
    if let Some(d) = &job.description {
        out["description"] = json!(d);
    }
    out
}

/// The `Job` shape of DescribeJob.
pub fn render_job(job: &Job, counts: &super::model::ProcessCounts) -> Value {
    let mut out = json!({
        "jobArn": job.arn,
        "jobId": job.job_id,
        "targetSelection": if job.continuous { "CONTINUOUS" } else { "SNAPSHOT" },
        "status": job.status.as_str(),
        "forceCanceled": job.force_canceled,
        "targets": job.targets,
        "createdAt": ts(job.created_ms),
        "lastUpdatedAt": ts(job.last_updated_ms),
        "isConcurrent": !job.backlog.is_empty(),
        "jobProcessDetails": {
            "processingTargets": [],
            "numberOfCanceledThings": counts.get(ExecutionStatus::Canceled),
            "numberOfSucceededThings": counts.get(ExecutionStatus::Succeeded),
            "numberOfFailedThings": counts.get(ExecutionStatus::Failed),
            "numberOfRejectedThings": counts.get(ExecutionStatus::Rejected),
            "numberOfQueuedThings": counts.get(ExecutionStatus::Queued),
            "numberOfInProgressThings": counts.get(ExecutionStatus::InProgress),
            "numberOfRemovedThings": counts.get(ExecutionStatus::Removed),
            "numberOfTimedOutThings": counts.get(ExecutionStatus::TimedOut),
        },
    });
    let optional = [
        ("description", job.description.clone().map(Value::from)),
        ("reasonCode", job.reason_code.clone().map(Value::from)),
        ("comment", job.comment.clone().map(Value::from)),
        ("completedAt", job.completed_ms.map(ts)),
        ("presignedUrlConfig", job.presigned_url_config.clone()),
        (
            "jobExecutionsRolloutConfig",
            job.rollout.as_ref().map(|r| json!(r)),
        ),
        ("abortConfig", job.abort.as_ref().map(|a| json!(a))),
        ("timeoutConfig", job.timeout.as_ref().map(|t| json!(t))),
        (
            "jobExecutionsRetryConfig",
            job.retry.as_ref().map(|r| json!(r)),
        ),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            out[k] = v;
        }
    }
    out
}

fn describe_job(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let id = params.get("jobId");
        let s = state.jobs.lock().await;
        let job = s
            .jobs
            .get(id)
            .ok_or_else(|| jobs_error(JobsError::NotFound(format!("Job {id} cannot be found."))))?;
        let counts = s.counts.get(id).cloned().unwrap_or_default();
        let mut body = json!({ "job": render_job(job, &counts) });
        if let Some(src) = &job.document_source {
            body["documentSource"] = json!(src);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}

fn list_jobs(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let status = request.query_param("status");
        let selection = request.query_param("targetSelection");
        let group_arn = request
            .query_param("thingGroupName")
            .map(|g| state.groups.arn(&g));
        let jobs: Vec<Job> = state
            .jobs
            .lock()
            .await
            .jobs
            .values()
            .filter(|j| status.as_deref().is_none_or(|s| j.status.as_str() == s))
            .filter(|j| {
                selection
                    .as_deref()
                    .is_none_or(|s| (s == "CONTINUOUS") == j.continuous)
            })
            .filter(|j| group_arn.as_ref().is_none_or(|g| j.targets.contains(g)))
            .cloned()
            .collect();
        let (page, next) = paginate(&request, &jobs, |j| j.job_id.clone())?;
        let items: Vec<Value> = page
            .iter()
            .map(|j| {
                let mut item = json!({
                    "jobArn": j.arn,
                    "jobId": j.job_id,
                    "targetSelection": if j.continuous { "CONTINUOUS" } else { "SNAPSHOT" },
                    "status": j.status.as_str(),
                    "createdAt": ts(j.created_ms),
                    "lastUpdatedAt": ts(j.last_updated_ms),
                    "isConcurrent": !j.backlog.is_empty(),
                });
                if let Some(c) = j.completed_ms {
                    item["completedAt"] = ts(c);
                }
                item
            })
            .collect();
        let mut body = json!({ "jobs": items });
        if let Some(token) = next {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}

fn update_job(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: UpdateJobRequest = body_or_default(&request)?;
        state
            .jobs
            .update_job(
                params.get("jobId"),
                JobUpdate {
                    description: body.description,
                    rollout: body.job_executions_rollout_config,
                    abort: body.abort_config,
                    timeout: body.timeout_config,
                    retry: body.job_executions_retry_config,
                    presigned_url_config: body.presigned_url_config,
                },
            )
            .await
            .map_err(jobs_error)?;
        empty_ok()
    })
}

fn cancel_job(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: CancelJobRequest = body_or_default(&request)?;
        let force = query_bool(&request, "force")?;
        let job = state
            .jobs
            .cancel_job(params.get("jobId"), force, body.reason_code, body.comment)
            .await
            .map_err(jobs_error)?;
        Ok(json_response(Protocol::RestJson1, &job_header(&job)))
    })
}

fn delete_job(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let force = query_bool(&request, "force")?;
        state
            .jobs
            .delete_job(params.get("jobId"), force)
            .await
            .map_err(jobs_error)?;
        empty_ok()
    })
}

fn get_job_document(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let job = state
            .jobs
            .job(params.get("jobId"))
            .await
            .map_err(jobs_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "document": job.document.unwrap_or_default() }),
        ))
    })
}

/// The control plane's `JobExecutionSummary`.
fn execution_summary(e: &Execution) -> Value {
    let mut s = json!({
        "status": e.status.as_str(),
        "queuedAt": ts(e.queued_at_ms),
        "lastUpdatedAt": ts(e.last_updated_at_ms),
        "executionNumber": e.execution_number,
        "retryAttempt": e.retry_attempt,
    });
    if let Some(t) = e.started_at_ms {
        s["startedAt"] = ts(t);
    }
    s
}

fn parse_status_filter(request: &AwsRequest) -> Result<Option<ExecutionStatus>, AwsError> {
    match request.query_param("status") {
        None => Ok(None),
        Some(s) => ExecutionStatus::parse(&s).map(Some).ok_or_else(|| {
            AwsError::client(
                "InvalidRequestException",
                format!("1 validation error detected: Value '{s}' at 'status' failed to satisfy constraint: Member must satisfy enum value set: [QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, TIMED_OUT, REJECTED, REMOVED, CANCELED]"),
            )
        }),
    }
}

fn list_job_executions_for_job(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let id = params.get("jobId").to_string();
        let status = parse_status_filter(&request)?;
        let s = state.jobs.lock().await;
        if !s.jobs.contains_key(&id) {
            return Err(jobs_error(JobsError::NotFound(format!(
                "Job {id} cannot be found."
            ))));
        }
        let executions: Vec<Execution> = s
            .things_of_job
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|t| s.latest(t, &id))
            .filter(|e| status.is_none_or(|st| e.status == st))
            .cloned()
            .collect();
        drop(s);
        let (page, next) = paginate(&request, &executions, |e| e.thing_name.clone())?;
        let items: Vec<Value> = page
            .iter()
            .map(|e| {
                json!({
                    "thingArn": state.things.arn(&e.thing_name),
                    "jobExecutionSummary": execution_summary(e),
                })
            })
            .collect();
        let mut body = json!({ "executionSummaries": items });
        if let Some(token) = next {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}

fn list_job_executions_for_thing(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let thing = params.get("thingName").to_string();
        let status = parse_status_filter(&request)?;
        let job_filter = request.query_param("jobId");
        let s = state.jobs.lock().await;
        let executions: Vec<Execution> = s
            .histories_of_thing(&thing)
            .filter(|(j, _)| job_filter.as_ref().is_none_or(|f| f == *j))
            .filter_map(|(_, h)| h.last())
            .filter(|e| status.is_none_or(|st| e.status == st))
            .cloned()
            .collect();
        drop(s);
        let (page, next) = paginate(&request, &executions, |e| e.job_id.clone())?;
        let items: Vec<Value> = page
            .iter()
            .map(|e| json!({ "jobId": e.job_id, "jobExecutionSummary": execution_summary(e) }))
            .collect();
        let mut body = json!({ "executionSummaries": items });
        if let Some(token) = next {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}

fn parse_execution_number(raw: Option<String>) -> Result<Option<i64>, AwsError> {
    match raw {
        None => Ok(None),
        Some(n) => n.parse().map(Some).map_err(|_| {
            AwsError::client(
                "InvalidRequestException",
                format!("executionNumber must be a number, not '{n}'"),
            )
        }),
    }
}

fn describe_job_execution(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let (thing, id) = (params.get("thingName"), params.get("jobId"));
        let number = parse_execution_number(request.query_param("executionNumber"))?;
        let now = state.jobs.now();
        let s = state.jobs.lock().await;
        let e = s.execution(thing, id, number).ok_or_else(|| {
            jobs_error(JobsError::NotFound(format!(
                "Job execution for job {id} on thing {thing} cannot be found."
            )))
        })?;
        let mut execution = json!({
            "jobId": e.job_id,
            "status": e.status.as_str(),
            "forceCanceled": e.force_canceled,
            "statusDetails": { "detailsMap": e.status_details },
            "thingArn": state.things.arn(thing),
            "queuedAt": ts(e.queued_at_ms),
            "lastUpdatedAt": ts(e.last_updated_at_ms),
            "executionNumber": e.execution_number,
            "versionNumber": e.version_number,
            "approximateSecondsBeforeTimedOut": e.approximate_seconds_before_timed_out(now).unwrap_or(0),
        });
        if let Some(t) = e.started_at_ms {
            execution["startedAt"] = ts(t);
        }
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "execution": execution }),
        ))
    })
}

fn cancel_job_execution(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: CancelJobExecutionRequest = body_or_default(&request)?;
        let force = query_bool(&request, "force")?;
        state
            .jobs
            .cancel_execution(
                params.get("thingName"),
                params.get("jobId"),
                force,
                body.expected_version,
                body.status_details,
            )
            .await
            .map_err(jobs_error)?;
        empty_ok()
    })
}

fn delete_job_execution(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let force = query_bool(&request, "force")?;
        let number = parse_execution_number(Some(params.get("executionNumber").to_string()))?
            .unwrap_or_default();
        state
            .jobs
            .delete_execution(params.get("thingName"), params.get("jobId"), number, force)
            .await
            .map_err(jobs_error)?;
        empty_ok()
    })
}

/// The event types UpdateEventConfigurations accepts.
const EVENT_TYPES: &[&str] = &[
    "THING",
    "THING_GROUP",
    "THING_TYPE",
    "THING_GROUP_MEMBERSHIP",
    "THING_GROUP_HIERARCHY",
    "THING_TYPE_ASSOCIATION",
    "JOB",
    "JOB_EXECUTION",
    "POLICY",
    "CERTIFICATE",
    "CA_CERTIFICATE",
];

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UpdateEventConfigurationsRequest {
    #[serde(default)]
    event_configurations: BTreeMap<String, EventConfiguration>,
}

#[derive(Deserialize, Default)]
struct EventConfiguration {
    #[serde(rename = "Enabled", default)]
    enabled: bool,
}

fn update_event_configurations(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: UpdateEventConfigurationsRequest = body_or_default(&request)?;
        let mut values = BTreeMap::new();
        for (k, v) in body.event_configurations {
            if !EVENT_TYPES.contains(&k.as_str()) {
                return Err(AwsError::client(
                    "InvalidRequestException",
                    format!("Invalid event type {k}"),
                ));
            }
            values.insert(k, v.enabled);
        }
        state
            .jobs
            .set_event_configurations(values)
            .await
            .map_err(jobs_error)?;
        empty_ok()
    })
}

fn describe_event_configurations(
    state: Arc<IotState>,
    _request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let stored = state.jobs.event_configurations().await;
        let configs: serde_json::Map<String, Value> = EVENT_TYPES
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    json!({ "Enabled": stored.get(*k).copied().unwrap_or(false) }),
                )
            })
            .collect();
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "eventConfigurations": configs }),
        ))
    })
}
