//! The SQL functions that read Mooring's own services: `get_registry_data`, `aws_lambda`
//! and `get_thing_shadow`.
//!
//! - `get_registry_data('DescribeThing', thing, roleArn)` answers the DescribeThing shape of
//!   the thing from the registry (Undefined when there is no such thing). Other registry
//!   APIs answer Undefined.
//! - `aws_lambda(functionArn, input)` calls the local function configured for the ARN
//!   (`[iot.functions]`, as the `lambda` action does) synchronously, within AWS's 2,000 ms
//!   bound: a URL function is POSTed the input and its response body is the result, a
//!   command function gets the input on stdin and its stdout is the result. A result that
//!   is JSON becomes an addressable value, anything else a string; failures, timeouts and
//!   unknown functions give Undefined. The call runs on the evaluating thread (the broker's
//!   connection task), so a slow function slows that publisher down, as on AWS where the
//!   rule waits for it.
//! - `get_thing_shadow(thing[, shadowName], roleArn)` answers the shadow's GET document
//!   (state with delta, metadata, version, timestamp) from the shadow store; Undefined when
//!   the shadow does not exist.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::actions::find_function;
use crate::config::LocalFunction;
use crate::registry::api::render_thing;
use crate::registry::things::ThingRegistry;
use crate::shadow::model::ShadowKey;
use crate::shadow::Shadows;
use crate::sql::{ExternalFunctions, Value};

/// AWS's bound on an `aws_lambda` call from SQL.
pub const AWS_LAMBDA_TIMEOUT: Duration = Duration::from_millis(2_000);

/// [`ExternalFunctions`] over the thing registry and the local functions.
pub struct MooringFunctions {
    things: ThingRegistry,
    shadows: Arc<Shadows>,
    functions: Arc<BTreeMap<String, LocalFunction>>,
    http: reqwest::Client,
}

impl MooringFunctions {
    pub fn new(
        things: ThingRegistry,
        shadows: Arc<Shadows>,
        functions: BTreeMap<String, LocalFunction>,
    ) -> Self {
        MooringFunctions {
            things,
            shadows,
            functions: Arc::new(functions),
            http: reqwest::Client::builder()
                .timeout(AWS_LAMBDA_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }
}

/// Runs `future` to completion from synchronous code inside a multi-threaded Tokio runtime;
/// `None` elsewhere (a current-thread runtime cannot be blocked).
fn block_on<F: std::future::Future>(future: F) -> Option<F::Output> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return None;
    }
    Some(tokio::task::block_in_place(|| handle.block_on(future)))
}

/// A function's answer as a SQL value: JSON when it parses, else the text.
fn result_value(bytes: &[u8]) -> Value {
    Value::from_json_bytes(bytes)
        .unwrap_or_else(|| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

async fn call_function(
    http: &reqwest::Client,
    function: &LocalFunction,
    name: &str,
    input: Vec<u8>,
) -> Result<Vec<u8>, String> {
    if let Some(url) = &function.url {
        let response = http
            .post(url)
            .header("content-type", "application/json")
            .body(input)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status().as_u16()));
        }
        return Ok(response.bytes().await.map_err(|e| e.to_string())?.to_vec());
    }
    let command = function
        .command
        .as_ref()
        .filter(|c| !c.is_empty())
        .ok_or("no url or command")?;
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .envs(&function.env)
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&input).await.map_err(|e| e.to_string())?;
    }
    let mut output = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_end(&mut output)
            .await
            .map_err(|e| e.to_string())?;
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(output)
    } else {
        Err(format!("exited with {status}"))
    }
}

impl ExternalFunctions for MooringFunctions {
    fn aws_lambda(&self, function_arn: &str, input: &Value) -> Value {
        let Some(function) = find_function(&self.functions, function_arn) else {
            tracing::warn!(
                function = function_arn,
                "aws_lambda: no local function is configured"
            );
            return Value::Undefined;
        };
        let name = function_arn.rsplit(':').next().unwrap_or(function_arn);
        let input = input.to_payload().to_vec();
        // The timer is created inside the runtime, when the call is first polled.
        let call = async {
            tokio::time::timeout(
                AWS_LAMBDA_TIMEOUT,
                call_function(&self.http, function, name, input),
            )
            .await
        };
        match block_on(call) {
            Some(Ok(Ok(output))) => result_value(&output),
            Some(Ok(Err(e))) => {
                tracing::warn!(function = function_arn, error = %e, "aws_lambda failed");
                Value::Undefined
            }
            Some(Err(_)) => {
                tracing::warn!(
                    function = function_arn,
                    "aws_lambda timed out after 2000 ms"
                );
                Value::Undefined
            }
            None => Value::Undefined,
        }
    }

    fn get_thing_shadow(&self, thing_name: &str, shadow_name: Option<&str>) -> Value {
        let Ok(key) = ShadowKey::new(thing_name, shadow_name) else {
            return Value::Undefined;
        };
        let read = || self.shadows.get_blocking(&key);
        let shadow = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(read)
            }
            _ => read(),
        };
        match shadow {
            Some(shadow) => Value::from_serde(&shadow.render(self.shadows.now(), None)),
            None => Value::Undefined,
        }
    }

    fn get_registry_data(&self, api: &str, thing_name: &str) -> Value {
        if api != "DescribeThing" {
            return Value::Undefined;
        }
        let read = || self.things.get_blocking(thing_name);
        let thing = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(read)
            }
            _ => read(),
        };
        match thing {
            Ok(Some(thing)) => Value::from_serde(&render_thing(&thing)),
            Ok(None) => Value::Undefined,
            Err(e) => {
                tracing::warn!(thing = thing_name, error = %e, "get_registry_data failed");
                Value::Undefined
            }
        }
    }
}
