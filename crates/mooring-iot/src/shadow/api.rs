//! The shadow operations of the `iot-data` HTTP API (signing name `iotdata`):
//! GetThingShadow, UpdateThingShadow and DeleteThingShadow on `/things/{thing}/shadow`
//! (`?name=` for a named shadow) and ListNamedShadowsForThing on
//! `/api/things/shadow/ListNamedShadowsForThing/{thing}`. Errors carry the iot-data exception
//! name and the shadow error body `{code, message, timestamp}`. An HTTP update also publishes
//! the `/update/accepted`, `/update/delta` and `/update/documents` messages, and an HTTP
//! delete `/delete/accepted`, as the MQTT path does.
//!
//! Requests are signed with the account's credentials, which carry no IoT principal, so IoT
//! policies (`iot:GetThingShadow` and friends) are not evaluated here, as for iot-data
//! Publish.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Response, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::{
    json_response, AwsError, AwsRequest, AwsService, OperationName, Protocol, Route,
};
use serde_json::{json, Value};

use super::model::{ShadowError, ShadowKey};
use super::Shadows;

/// The shadow part of `iot-data`.
pub struct ShadowDataService {
    shadows: Arc<Shadows>,
}

impl ShadowDataService {
    pub fn new(shadows: Arc<Shadows>) -> Arc<ShadowDataService> {
        Arc::new(ShadowDataService { shadows })
    }
}

/// The operation a method and path name, with the percent-decoded thing name.
fn operation(method: &Method, path: &str) -> Option<(&'static str, String)> {
    let decode = |raw: &str| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned()
    };
    if let Some(raw) = path.strip_prefix("/api/things/shadow/ListNamedShadowsForThing/") {
        return (!raw.is_empty() && !raw.contains('/'))
            .then(|| ("ListNamedShadowsForThing", decode(raw)));
    }
    let raw = path.strip_prefix("/things/")?.strip_suffix("/shadow")?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    let op = match *method {
        Method::GET => "GetThingShadow",
        Method::POST => "UpdateThingShadow",
        Method::DELETE => "DeleteThingShadow",
        _ => "MethodNotAllowed",
    };
    Some((op, decode(raw)))
}

fn error_response(e: &ShadowError, now: i64) -> Response<Body> {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    AwsError::new(status, e.exception(), e.message.clone())
        .with("code", e.code)
        .with("timestamp", now)
        .into_response(Protocol::RestJson1)
}

impl AwsService for ShadowDataService {
    fn name(&self) -> &'static str {
        "iot-data"
    }

    fn signing_names(&self) -> &'static [&'static str] {
        &["iotdata", "iotdevicegateway"]
    }

    fn protocol(&self) -> Protocol {
        Protocol::RestJson1
    }

    fn matches(&self, route: &Route<'_>) -> bool {
        route.target.is_none()
            && route
                .signing_name
                .is_some_and(|n| self.signing_names().contains(&n))
            && operation(route.method, route.path).is_some()
    }

    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>> {
        let shadows = self.shadows.clone();
        let path = request.request.uri().path().to_string();
        let found = operation(request.request.method(), &path);
        let request = ShadowRequest {
            shadow_name: request.query_param("name"),
            page_size: request.query_param("pageSize"),
            next_token: request.query_param("nextToken"),
            body: request.body,
        };
        Box::pin(async move {
            let Some((op, thing)) = found else {
                return AwsError::unknown_operation(&path).into_response(Protocol::RestJson1);
            };
            let now = shadows.now();
            let mut response = match handle(&shadows, op, &thing, &request).await {
                Ok(body) => json_response(Protocol::RestJson1, &body),
                Err(e) => error_response(&e, now),
            };
            response
                .extensions_mut()
                .insert(OperationName(op.to_string()));
            response
        })
    }
}

/// What the operations read from a request.
struct ShadowRequest {
    shadow_name: Option<String>,
    page_size: Option<String>,
    next_token: Option<String>,
    body: bytes::Bytes,
}

async fn handle(
    shadows: &Shadows,
    op: &str,
    thing: &str,
    request: &ShadowRequest,
) -> Result<Value, ShadowError> {
    if op == "MethodNotAllowed" {
        return Err(ShadowError::new(405, "Method not allowed"));
    }
    if op == "ListNamedShadowsForThing" {
        return list_named(shadows, thing, request).await;
    }
    let key = ShadowKey::new(thing, request.shadow_name.as_deref())?;
    match op {
        "GetThingShadow" => Ok(shadows.get(&key).await?.render(shadows.now(), None)),
        "UpdateThingShadow" => {
            let applied = shadows.update(&key, &request.body).await?;
            shadows.publish_update(&key, &applied, 1).await;
            Ok(applied.accepted)
        }
        _ => {
            let body = shadows.delete(&key, None).await?;
            shadows
                .publish(format!("{}/delete/accepted", key.topic_prefix()), &body, 1)
                .await;
            Ok(body)
        }
    }
}

async fn list_named(
    shadows: &Shadows,
    thing: &str,
    request: &ShadowRequest,
) -> Result<Value, ShadowError> {
    ShadowKey::new(thing, None)?;
    let page_size = match &request.page_size {
        None => 100,
        Some(p) => match p.parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => {
                return Err(ShadowError::new(
                    400,
                    format!("1 validation error detected: Value '{p}' at 'pageSize' failed to satisfy constraint: Member must have value between 1 and 100"),
                ))
            }
        },
    };
    let names = shadows.list_named(thing).await?;
    // The token is the last name of the previous page: stable while shadows come and go.
    let start = match &request.next_token {
        None => 0,
        Some(after) => names.partition_point(|n| n.as_str() <= after.as_str()),
    };
    let page: Vec<&String> = names.iter().skip(start).take(page_size).collect();
    let mut body = json!({ "results": page, "timestamp": shadows.now() });
    if start + page.len() < names.len() {
        if let Some(last) = page.last() {
            body["nextToken"] = json!(last);
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_operations() {
        assert_eq!(
            operation(&Method::GET, "/things/t%3A1/shadow"),
            Some(("GetThingShadow", "t:1".into()))
        );
        assert_eq!(
            operation(&Method::POST, "/things/t1/shadow"),
            Some(("UpdateThingShadow", "t1".into()))
        );
        assert_eq!(
            operation(&Method::DELETE, "/things/t1/shadow"),
            Some(("DeleteThingShadow", "t1".into()))
        );
        assert_eq!(
            operation(
                &Method::GET,
                "/api/things/shadow/ListNamedShadowsForThing/t1"
            ),
            Some(("ListNamedShadowsForThing", "t1".into()))
        );
        assert_eq!(operation(&Method::GET, "/things/t1"), None);
        assert_eq!(operation(&Method::GET, "/things/t1/jobs"), None);
        assert_eq!(operation(&Method::GET, "/things/a/b/shadow"), None);
    }
}
