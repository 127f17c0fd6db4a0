//! The jobs device API over HTTP: the `iot-jobs-data` service (GetPendingJobExecutions,
//! StartNextPendingJobExecution, DescribeJobExecution, UpdateJobExecution), signing name
//! `iot-jobs-data`, restJson1. Requests go through the same parsing and state machine as
//! the MQTT device API ([`super::device`]); only the shapes differ (`jobDocument` is a
//! string here, executions carry `approximateSecondsBeforeTimedOut`, errors are
//! exceptions).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Response, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::{
    json_response, AwsError, AwsRequest, AwsService, OperationName, Protocol, Route,
};
use serde_json::{json, Map, Value};

use super::device::{
    execute, execution_state, parse_request, DeviceAnswer, DeviceOperation, Rejection,
};
use super::model::Execution;
use super::state::JobsState;
use crate::api::{IotState, OperationResult, PathParams, RouteRow, Router};

/// The `iot-jobs-data` service.
pub struct JobsDataService {
    router: Router,
    state: Arc<IotState>,
}

impl JobsDataService {
    pub fn new(state: Arc<IotState>) -> JobsDataService {
        JobsDataService {
            router: Router::new(routes()),
            state,
        }
    }
}

fn routes() -> Vec<RouteRow> {
    vec![
        (
            Method::GET,
            "/things/{thingName}/jobs",
            "GetPendingJobExecutions",
            get_pending,
        ),
        (
            Method::PUT,
            "/things/{thingName}/jobs/$next",
            "StartNextPendingJobExecution",
            start_next,
        ),
        (
            Method::GET,
            "/things/{thingName}/jobs/{jobId}",
            "DescribeJobExecution",
            describe,
        ),
        (
            Method::POST,
            "/things/{thingName}/jobs/{jobId}",
            "UpdateJobExecution",
            update,
        ),
    ]
}

impl AwsService for JobsDataService {
    fn name(&self) -> &'static str {
        "iot-jobs-data"
    }

    fn signing_names(&self) -> &'static [&'static str] {
        &["iot-jobs-data"]
    }

    fn protocol(&self) -> Protocol {
        Protocol::RestJson1
    }

    fn matches(&self, route: &Route<'_>) -> bool {
        route.target.is_none()
            && route.signing_name == Some("iot-jobs-data")
            && self.router.find(route.method, route.path).is_some()
    }

    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>> {
        let found = self
            .router
            .find(request.request.method(), request.request.uri().path())
            .map(|(route, params)| (route.handler, route.operation, params));
        let state = self.state.clone();
        Box::pin(async move {
            let Some((handler, operation, params)) = found else {
                let what = format!(
                    "{} {}",
                    request.request.method(),
                    request.request.uri().path()
                );
                return AwsError::unknown_operation(&what).into_response(Protocol::RestJson1);
            };
            let mut response = match handler(state, request, params).await {
                Ok(response) => response,
                Err(e) => e.into_response(Protocol::RestJson1),
            };
            response
                .extensions_mut()
                .insert(OperationName(operation.to_string()));
            response
        })
    }
}

/// A rejection as the HTTP API's exception.
fn rejection_error(r: Rejection) -> AwsError {
    let (status, name) = match r.code {
        "ResourceNotFound" => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
        "InvalidStateTransition" => (StatusCode::CONFLICT, "InvalidStateTransitionException"),
        "VersionMismatch" => (StatusCode::CONFLICT, "VersionConflictException"),
        "TerminalStateReached" => (StatusCode::GONE, "TerminalStateException"),
        "RequestThrottled" => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
        "InternalError" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
        ),
        _ => (StatusCode::BAD_REQUEST, "InvalidRequestException"),
    };
    let mut e = AwsError::new(status, name, r.message);
    if let Some(current) = &r.current {
        e = e.with("executionState", execution_state(current));
    }
    e
}

/// JobExecution of the HTTP API (`jobDocument` as a string).
fn http_execution(state: &JobsState, e: &Execution, include_document: bool, now: i64) -> Value {
    let mut out = state.device_execution(e, false);
    out["approximateSecondsBeforeTimedOut"] =
        json!(e.approximate_seconds_before_timed_out(now).unwrap_or(0));
    if include_document {
        if let Some(doc) = state.jobs.get(&e.job_id).and_then(|j| j.document.clone()) {
            out["jobDocument"] = json!(doc);
        }
    }
    out
}

/// Parses, executes and commits one request; renders the accepted answer.
async fn run(
    state: Arc<IotState>,
    thing: &str,
    operation: DeviceOperation,
    body: Map<String, Value>,
) -> OperationResult {
    let jobs = &state.jobs;
    if !jobs.admit_device_request(thing) {
        return Err(rejection_error(Rejection::new(
            "RequestThrottled",
            format!("Too many job requests for thing {thing}"),
        )));
    }
    let request = parse_request(operation, &body).map_err(rejection_error)?;
    let now = jobs.now();
    let mut s = jobs.lock().await;
    let answer = execute(&mut s, thing, request, now).map_err(rejection_error)?;
    jobs.commit(&mut s).await.map_err(|_| {
        rejection_error(Rejection::new(
            "InternalError",
            "The change could not be stored",
        ))
    })?;
    let body = match &answer {
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
            Some(e) => json!({ "execution": http_execution(&s, e, *include_document, now) }),
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
                if let Some(doc) = s
                    .jobs
                    .get(&execution.job_id)
                    .and_then(|j| j.document.clone())
                {
                    out["jobDocument"] = json!(doc);
                }
            }
            out
        }
    };
    Ok(json_response(Protocol::RestJson1, &body))
}

fn json_body(request: &AwsRequest) -> Result<Map<String, Value>, AwsError> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&request.body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(AwsError::client(
            "InvalidRequestException",
            "The request body is not a JSON object",
        )),
    }
}

fn get_pending(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let thing = params.get("thingName").to_string();
        run(state, &thing, DeviceOperation::GetPending, Map::new()).await
    })
}

fn start_next(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let thing = params.get("thingName").to_string();
        let body = json_body(&request)?;
        run(state, &thing, DeviceOperation::StartNext, body).await
    })
}

fn describe(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let thing = params.get("thingName").to_string();
        let mut body = Map::new();
        for name in ["includeJobDocument", "executionNumber"] {
            if let Some(v) = request.query_param(name) {
                body.insert(name.to_string(), Value::String(v));
            }
        }
        let operation = DeviceOperation::Describe(params.get("jobId").to_string());
        run(state, &thing, operation, body).await
    })
}

fn update(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let thing = params.get("thingName").to_string();
        let body = json_body(&request)?;
        let operation = DeviceOperation::Update(params.get("jobId").to_string());
        run(state, &thing, operation, body).await
    })
}
