//! Rule actions: what happens to a message after its rule matched.
//!
//! [`dispatch`] takes matched jobs off the engine's bounded queue and runs each rule
//! execution's actions concurrently (at most `concurrency` executions at a time). Supported
//! actions: `republish` through the broker handle, `http` (POST with templated URL and
//! headers, retried on connection errors, 429 and 5xx), `lambda` as a local function
//! (configured as an HTTP endpoint or a command fed the event on stdin; invoked
//! asynchronously, as AWS invokes Lambda from rules) and `kinesis`, which appends to the
//! local stream-manager stream of that name. When actions fail, the rule's error action
//! (if any) runs once with AWS's error payload listing every failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use mooring_core::handles::{HandleError, PublishMessage, ServiceHandles};
use mooring_core::{ServiceContext, Shutdown};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};

use crate::config::{EngineSettings, IotConfig, LocalFunction, OutboundSettings};
use crate::engine::{ActionLabels, EngineMetrics, Job};
use crate::model::{CompiledAction, CompiledHeaders, SigV4Signing};
use crate::outbound::OutboundClients;
use crate::sql::NoExternalFunctions;

/// Why an action failed, as the error action reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionFailure {
    pub failed_action: &'static str,
    pub failed_resource: String,
    pub error_message: String,
}

/// What actions need from the process.
pub struct ActionRuntime {
    handles: Arc<ServiceHandles>,
    functions: BTreeMap<String, LocalFunction>,
    settings: EngineSettings,
    http: reqwest::Client,
    metrics: EngineMetrics,
    outbound: OutboundClients,
    outbound_settings: OutboundSettings,
}

impl ActionRuntime {
    pub fn new(ctx: &ServiceContext, config: &IotConfig, metrics: EngineMetrics) -> ActionRuntime {
        ActionRuntime::with_handles(ctx.handles.clone(), config, metrics, &ctx.config.region)
    }

    pub fn with_handles(
        handles: Arc<ServiceHandles>,
        config: &IotConfig,
        metrics: EngineMetrics,
        region: &str,
    ) -> ActionRuntime {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.engine.http_timeout_ms.max(1)))
            .build()
            .unwrap_or_default();
        ActionRuntime {
            handles,
            functions: config.functions.clone(),
            settings: config.engine.clone(),
            http,
            metrics,
            outbound: OutboundClients::new(config.outbound.clone(), region.to_string()),
            outbound_settings: config.outbound.clone(),
        }
    }
}

/// The engine's background loop.
pub async fn dispatch(
    runtime: Arc<ActionRuntime>,
    mut queue: mpsc::Receiver<Job>,
    in_flight: Arc<AtomicUsize>,
    concurrency: usize,
    finished: mpsc::UnboundedSender<i64>,
    shutdown: Shutdown,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    loop {
        let job = tokio::select! {
            _ = shutdown.triggered() => return,
            job = queue.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let runtime = runtime.clone();
        let in_flight = in_flight.clone();
        let finished = finished.clone();
        shutdown.spawn(async move {
            run_job(&runtime, &job).await;
            if let Some(id) = job.journal_id {
                let _ = finished.send(id);
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
        });
    }
}

/// Runs every action of one rule execution, then the error action if any failed.
/// Answers the failures.
pub async fn run_job(runtime: &ActionRuntime, job: &Job) -> Vec<ActionFailure> {
    let payload = job.output.to_payload();
    let results = futures::future::join_all(
        job.rule
            .actions
            .iter()
            .map(|action| execute(runtime, action, payload.clone(), job)),
    )
    .await;
    let mut failures = Vec::new();
    for (action, result) in job.rule.actions.iter().zip(results) {
        let outcome = if result.is_ok() { "success" } else { "failure" };
        runtime
            .metrics
            .actions
            .get_or_create(&ActionLabels {
                rule: job.rule.name.clone(),
                action: action.kind().to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Err(failure) = result {
            tracing::warn!(rule = %job.rule.name, action = failure.failed_action, resource = %failure.failed_resource, error = %failure.error_message, "rule action failed");
            failures.push(failure);
        }
    }
    if !failures.is_empty() {
        if let Some(error_action) = &job.rule.error_action {
            let error_payload = error_payload(job, &failures);
            let result = execute(runtime, error_action, error_payload, job).await;
            runtime
                .metrics
                .actions
                .get_or_create(&ActionLabels {
                    rule: job.rule.name.clone(),
                    action: format!("errorAction:{}", error_action.kind()),
                    outcome: if result.is_ok() { "success" } else { "failure" }.to_string(),
                })
                .inc();
            if let Err(e) = result {
                tracing::error!(rule = %job.rule.name, error = %e.error_message, "error action failed too");
            }
        }
    }
    failures
}

/// AWS's error-action message: rule, topic, trace id, publisher, original payload and the
/// list of failed actions.
pub fn error_payload(job: &Job, failures: &[ActionFailure]) -> Bytes {
    let body = serde_json::json!({
        "ruleName": job.rule.name,
        "topic": job.facts.topic,
        "cloudwatchTraceId": job.facts.trace_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        "clientId": job.facts.client_id.clone().unwrap_or_else(|| "n/a".into()),
        "base64OriginalPayload": base64::engine::general_purpose::STANDARD.encode(&job.facts.payload),
        "failures": failures.iter().map(|f| serde_json::json!({
            "failedAction": f.failed_action,
            "failedResource": f.failed_resource,
            "errorMessage": f.error_message,
        })).collect::<Vec<_>>(),
    });
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

fn render(template: &crate::sql::template::Template, job: &Job) -> String {
    template.render(&job.facts, &job.variables, &NoExternalFunctions)
}

async fn execute(
    runtime: &ActionRuntime,
    action: &CompiledAction,
    payload: Bytes,
    job: &Job,
) -> Result<(), ActionFailure> {
    let fail = |resource: String, message: String| ActionFailure {
        failed_action: action.failed_action_name(),
        failed_resource: resource,
        error_message: message,
    };
    match action {
        CompiledAction::Republish {
            topic,
            qos,
            headers,
        } => {
            let topic = render(topic, job);
            if topic.is_empty() || topic.contains('+') || topic.contains('#') {
                return Err(fail(
                    topic.clone(),
                    format!("invalid republish topic '{topic}'"),
                ));
            }
            let message = republish_message(topic.clone(), payload, *qos, headers, job);
            let broker = runtime
                .handles
                .broker()
                .map_err(|e| fail(topic.clone(), e.to_string()))?;
            broker
                .publish(message)
                .await
                .map_err(|e| fail(topic, e.to_string()))
        }
        CompiledAction::Http {
            url,
            headers,
            sigv4,
        } => {
            let url = render(url, job);
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.clone(), render(v, job)))
                .collect();
            post_with_retries(runtime, &url, &headers, payload, sigv4.as_ref())
                .await
                .map_err(|e| fail(url, e))
        }
        CompiledAction::Lambda { function_arn } => {
            invoke_local_function(runtime, function_arn, payload)
                .await
                .map_err(|e| fail(function_arn.clone(), e))
        }
        CompiledAction::Kinesis {
            stream_name,
            partition_key,
        } => {
            // A local stream-manager stream of that name takes the record; otherwise it
            // goes to Kinesis Data Streams through the outbound client.
            if let Ok(streams) = runtime.handles.streams() {
                match streams.append(stream_name, payload.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(HandleError::NotFound(_)) => {}
                    Err(e) => return Err(fail(stream_name.clone(), e.to_string())),
                }
            }
            let key = partition_key
                .as_ref()
                .map(|t| render(t, job))
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            runtime
                .outbound
                .put_record(stream_name, &key, payload)
                .await
                .map_err(|e| fail(stream_name.clone(), e))
        }
        CompiledAction::S3 {
            bucket_name,
            key,
            canned_acl,
        } => {
            let bucket = render(bucket_name, job);
            let key = render(key, job);
            runtime
                .outbound
                .put_object(&bucket, &key, canned_acl.as_deref(), payload)
                .await
                .map_err(|e| fail(bucket.clone(), e))
        }
        CompiledAction::Sqs {
            queue_url,
            use_base64,
        } => {
            let url = render(queue_url, job);
            let body = if *use_base64 {
                base64::engine::general_purpose::STANDARD.encode(&payload)
            } else {
                String::from_utf8_lossy(&payload).into_owned()
            };
            runtime
                .outbound
                .send_message(&url, body)
                .await
                .map_err(|e| fail(url.clone(), e))
        }
    }
}

fn republish_message(
    topic: String,
    payload: Bytes,
    qos: u8,
    headers: &CompiledHeaders,
    job: &Job,
) -> PublishMessage {
    let text = |t: &Option<crate::sql::template::Template>| {
        t.as_ref().map(|t| render(t, job)).filter(|s| !s.is_empty())
    };
    let correlation_data = text(&headers.correlation_data).map(|c| {
        base64::engine::general_purpose::STANDARD
            .decode(c.as_bytes())
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from(c.into_bytes()))
    });
    PublishMessage {
        topic,
        payload,
        qos,
        retain: false,
        user_properties: headers
            .user_properties
            .iter()
            .map(|(k, v)| (render(k, job), render(v, job)))
            .collect(),
        content_type: text(&headers.content_type),
        response_topic: text(&headers.response_topic),
        correlation_data,
        message_expiry_interval: text(&headers.message_expiry).and_then(|m| m.trim().parse().ok()),
    }
}

/// POSTs `body` to `url`, retrying on connection errors, timeouts, 429 and 5xx.
async fn post_with_retries(
    runtime: &ActionRuntime,
    url: &str,
    headers: &[(String, String)],
    body: Bytes,
    sigv4: Option<&SigV4Signing>,
) -> Result<(), String> {
    let attempts = runtime.settings.http_attempts.max(1);
    let mut backoff = Duration::from_millis(runtime.settings.http_backoff_ms);
    let mut last_error = String::new();
    let mut headers = headers.to_vec();
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type".into(), "application/json".into()));
    }
    for attempt in 1..=attempts {
        let mut request = runtime.http.post(url).body(body.clone());
        for (k, v) in &headers {
            request = request.header(k.as_str(), v.as_str());
        }
        if let Some(signing) = sigv4 {
            for (k, v) in sign_request(&runtime.outbound_settings, signing, url, &headers, &body)? {
                request = request.header(k, v);
            }
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                last_error = format!("HTTP {} from {url}", status.as_u16());
                if !(status.is_server_error() || status.as_u16() == 429) {
                    return Err(last_error);
                }
            }
            Err(e) => last_error = format!("request to {url} failed: {e}"),
        }
        if attempt < attempts {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    Err(format!("{last_error} (after {attempts} attempts)"))
}

/// The headers that sign a POST of `body` to `url` with SigV4 (`auth.sigv4` of an `http`
/// action), using the `[iot.outbound]` credentials.
pub fn sign_request(
    outbound: &OutboundSettings,
    signing: &SigV4Signing,
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Vec<(String, String)>, String> {
    #[cfg(not(feature = "aws"))]
    {
        let _ = (outbound, signing, url, headers, body);
        Err("auth.sigv4 needs Mooring built with the aws feature".into())
    }
    #[cfg(feature = "aws")]
    {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        if outbound.access_key_id.is_empty() {
            return Err(
            "auth.sigv4 needs credentials: set [iot.outbound] access_key_id and secret_access_key"
                .into(),
        );
        }
        let identity = aws_credential_types::Credentials::new(
            outbound.access_key_id.clone(),
            outbound.secret_access_key.clone(),
            (!outbound.session_token.is_empty()).then(|| outbound.session_token.clone()),
            None,
            "mooring-iot-outbound",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&signing.signing_region)
            .name(&signing.service_name)
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("SigV4 signing parameters: {e}"))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(body),
        )
        .map_err(|e| format!("SigV4 signing {url}: {e}"))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| format!("SigV4 signing {url}: {e}"))?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// Finds the local function configured for `function_arn`: by the full ARN, by the ARN
/// without its version/alias qualifier, or by the bare function name.
pub fn find_function<'a>(
    functions: &'a BTreeMap<String, LocalFunction>,
    function_arn: &str,
) -> Option<&'a LocalFunction> {
    if let Some(f) = functions.get(function_arn) {
        return Some(f);
    }
    let parts: Vec<&str> = function_arn.split(':').collect();
    if parts.len() >= 7 && parts[0] == "arn" && parts[5] == "function" {
        let unqualified = parts[..7].join(":");
        return functions
            .get(&unqualified)
            .or_else(|| functions.get(parts[6]));
    }
    None
}

async fn invoke_local_function(
    runtime: &ActionRuntime,
    function_arn: &str,
    event: Bytes,
) -> Result<(), String> {
    let function = find_function(&runtime.functions, function_arn).ok_or_else(|| {
        format!("no local function is configured for {function_arn} (add [iot.functions.\"<name or ARN>\"])")
    })?;
    let timeout = Duration::from_millis(function.timeout_ms.unwrap_or(30_000));
    if let Some(url) = &function.url {
        return post_with_retries(runtime, url, &[], event, None).await;
    }
    let Some(command) = function.command.as_ref().filter(|c| !c.is_empty()) else {
        return Err(format!(
            "local function for {function_arn} has neither url nor command"
        ));
    };
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .envs(&function.env)
        .env(
            "AWS_LAMBDA_FUNCTION_NAME",
            function_arn.rsplit(':').next().unwrap_or(function_arn),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", command[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&event)
            .await
            .map_err(|e| format!("writing the event: {e}"))?;
        drop(stdin);
    }
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("{function_arn} timed out after {} ms", timeout.as_millis()))?
        .map_err(|e| format!("waiting for {}: {e}", command[0]))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{function_arn} exited with {}: {}",
            output.status,
            stderr.trim()
        ))
    }
}
