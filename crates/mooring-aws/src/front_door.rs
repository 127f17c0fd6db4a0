//! The front door: one HTTP entry point for every AWS API Mooring serves.
//!
//! Each service implements [`AwsService`] and is registered at wiring time. For every request
//! the front door assigns a request id, finds the SigV4 signature (header or query), picks the
//! service by the signing name of the credential scope and then by `X-Amz-Target` or method
//! and path (unsigned requests by target and path alone), verifies the signature unless the
//! configuration says `auth = "none"`, buffers the body for ordinary operations or hands the
//! stream through for streaming uploads, calls the service and records the request's
//! metrics. Requests no service claims are answered as AWS answers unknown operations.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use mooring_core::clock::Clock;
use mooring_core::config::AuthMode;
use mooring_core::credentials::Credentials;
use mooring_core::metrics::Metrics;

use crate::protocol::{AwsError, OperationName, Protocol};
use crate::sigv4::{self, AuthFailure, ParsedSignature, RequestParts, EMPTY_SHA256};

/// What routing sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    /// The `X-Amz-Target` header of awsJson requests.
    pub target: Option<&'a str>,
    /// The service name of the SigV4 credential scope, when signed.
    pub signing_name: Option<&'a str>,
}

/// How a route's body reaches the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Read whole (up to the configured limit) and checked against the signed payload hash.
    Buffered,
    /// Passed through as a stream (PutMedia); the signature covers the declared payload hash.
    Streaming,
}

/// Who authenticates a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication {
    /// The front door verifies SigV4.
    SigV4,
    /// The service authorizes the request itself (HLS session tokens, MQTT over WebSocket);
    /// a signature, if present, is still verified.
    Service,
}

/// Who made a request, as far as the front door could tell.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub request_id: String,
    /// Region from the credential scope, else the configured region.
    pub region: String,
    /// Signing name from the credential scope, when signed.
    pub signing_name: Option<String>,
    /// Access key id of a verified (or, with `auth = "none"`, claimed) signature.
    pub access_key_id: Option<String>,
    /// Whether the signature was verified by the front door.
    pub authenticated: bool,
}

/// A request on its way to a service. For buffered routes `body` holds the bytes and the
/// request's own body is empty; for streaming routes the request's body is the stream.
pub struct AwsRequest {
    pub request: Request<Body>,
    pub body: Bytes,
    pub context: RequestContext,
}

impl AwsRequest {
    /// The operation of an awsJson request: `X-Amz-Target` after its last dot.
    pub fn target_operation(&self) -> Option<&str> {
        self.request
            .headers()
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .map(|t| t.rsplit('.').next().unwrap_or(t))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
    }

    /// Decoded query parameters.
    pub fn query(&self) -> Vec<(String, String)> {
        sigv4::query_pairs(self.request.uri().query().unwrap_or(""))
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// One AWS service behind the front door.
pub trait AwsService: Send + Sync + 'static {
    /// Short name for logs and metrics (`events`, `kinesisvideo`, `iot`, …).
    fn name(&self) -> &'static str;
    /// The SigV4 signing names this service answers to.
    fn signing_names(&self) -> &'static [&'static str];
    fn protocol(&self) -> Protocol;
    /// Whether this service handles the route (by target prefix or method and path).
    fn matches(&self, route: &Route<'_>) -> bool;
    fn body_mode(&self, _route: &Route<'_>) -> BodyMode {
        BodyMode::Buffered
    }
    fn authentication(&self, _route: &Route<'_>) -> Authentication {
        Authentication::SigV4
    }
    /// The error this service answers for an authentication failure.
    fn auth_error(&self, failure: &AuthFailure) -> AwsError {
        default_auth_error(failure)
    }
    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>>;
}

/// AWS JSON services' answers to authentication failures.
pub fn default_auth_error(failure: &AuthFailure) -> AwsError {
    match failure {
        AuthFailure::Missing => AwsError::new(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ),
        AuthFailure::Incomplete(m) => AwsError::client("IncompleteSignatureException", m.clone()),
        AuthFailure::UnknownAccessKey | AuthFailure::InvalidToken => AwsError::new(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ),
        AuthFailure::SignatureMismatch(m) => AwsError::new(
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            m.clone(),
        ),
        AuthFailure::Expired(m) if m.starts_with("Request has expired") => {
            AwsError::new(StatusCode::FORBIDDEN, "RequestExpired", m.clone())
        }
        AuthFailure::Expired(m) => AwsError::new(
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            m.clone(),
        ),
    }
}

/// The front door's settings.
#[derive(Clone)]
pub struct FrontDoorConfig {
    pub auth: AuthMode,
    pub credentials: Credentials,
    pub region: String,
    pub max_body_bytes: usize,
}

/// Dispatches AWS requests to registered services.
#[derive(Clone)]
pub struct FrontDoor {
    inner: Arc<FrontDoorInner>,
}

struct FrontDoorInner {
    config: FrontDoorConfig,
    services: Vec<Arc<dyn AwsService>>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
}

impl FrontDoor {
    pub fn new(
        config: FrontDoorConfig,
        services: Vec<Arc<dyn AwsService>>,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> Self {
        FrontDoor {
            inner: Arc::new(FrontDoorInner {
                config,
                services,
                metrics,
                clock,
            }),
        }
    }

    /// Handles one request end to end.
    pub async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let started = Instant::now();
        let request_id = uuid::Uuid::new_v4().to_string();
        let (service_name, mut response) = self.dispatch(request, &request_id).await;
        let operation = response
            .extensions()
            .get::<OperationName>()
            .map(|o| o.0.clone())
            .unwrap_or_else(|| "unknown".into());
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-amzn-RequestId", v);
        }
        let status = response.status().as_u16();
        tracing::debug!(%request_id, service = service_name, %operation, status, "aws request");
        self.inner
            .metrics
            .observe_request(service_name, &operation, status, started.elapsed());
        response
    }

    fn find_service(&self, route: &Route<'_>) -> Option<&Arc<dyn AwsService>> {
        let services = &self.inner.services;
        if let Some(name) = route.signing_name {
            if let Some(s) = services
                .iter()
                .find(|s| s.signing_names().contains(&name) && s.matches(route))
            {
                return Some(s);
            }
        }
        services.iter().find(|s| s.matches(route))
    }

    async fn dispatch(
        &self,
        request: Request<Body>,
        request_id: &str,
    ) -> (&'static str, Response<Body>) {
        let (parts, body) = request.into_parts();
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let raw_path = parts.uri.path().to_string();
        let raw_query = parts.uri.query().unwrap_or("").to_string();
        let mut sig_parts = RequestParts {
            method: parts.method.as_str(),
            raw_path: &raw_path,
            raw_query: &raw_query,
            headers,
        };
        if !sig_parts
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            if let Some(authority) = parts.uri.authority() {
                sig_parts
                    .headers
                    .push(("host".into(), authority.as_str().to_string()));
            }
        }
        let target = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok());
        let parsed = sigv4::parse(&sig_parts);
        let signing_name = parsed
            .as_ref()
            .ok()
            .and_then(|p| p.as_ref())
            .map(|p| p.service.clone());
        let route = Route {
            method: &parts.method,
            path: &raw_path,
            query: &raw_query,
            target,
            signing_name: signing_name.as_deref(),
        };
        let service = self.find_service(&route).cloned();
        let protocol = service
            .as_ref()
            .map(|s| s.protocol())
            .unwrap_or(if target.is_some() {
                Protocol::AwsJson1_1
            } else {
                Protocol::RestJson1
            });
        let name = service.as_ref().map(|s| s.name()).unwrap_or("unknown");
        let body_mode = service
            .as_ref()
            .map(|s| s.body_mode(&route))
            .unwrap_or(BodyMode::Buffered);
        let authentication = service
            .as_ref()
            .map(|s| s.authentication(&route))
            .unwrap_or(Authentication::SigV4);
        let auth_error = |failure: AuthFailure| -> Response<Body> {
            let err = match &service {
                Some(s) => s.auth_error(&failure),
                None => default_auth_error(&failure),
            };
            err.into_response(protocol)
        };

        let (body_bytes, stream_body) = match body_mode {
            BodyMode::Streaming => (Bytes::new(), body),
            BodyMode::Buffered => {
                let limited = http_body_util::Limited::new(body, self.inner.config.max_body_bytes);
                match limited.collect().await {
                    Ok(collected) => (collected.to_bytes(), Body::empty()),
                    Err(e) => {
                        let err = if e.is::<http_body_util::LengthLimitError>() {
                            AwsError::new(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "RequestEntityTooLargeException",
                                format!(
                                    "Request body is larger than {} bytes",
                                    self.inner.config.max_body_bytes
                                ),
                            )
                        } else {
                            AwsError::client("IncompleteBody", format!("Request body: {e}"))
                        };
                        return (name, err.into_response(protocol));
                    }
                }
            }
        };

        let mut context = RequestContext {
            request_id: request_id.to_string(),
            region: self.inner.config.region.clone(),
            ..Default::default()
        };
        let signature = match parsed {
            Ok(sig) => sig,
            Err(failure) if self.inner.config.auth == AuthMode::Sigv4 => {
                return (name, auth_error(failure))
            }
            Err(_) => None,
        };
        if let Some(sig) = &signature {
            context.region = sig.region.clone();
            context.signing_name = Some(sig.service.clone());
            context.access_key_id = Some(sig.access_key_id.clone());
        }
        if self.inner.config.auth == AuthMode::Sigv4 {
            match &signature {
                None if authentication == Authentication::SigV4 => {
                    return (name, auth_error(AuthFailure::Missing))
                }
                None => {}
                Some(sig) => {
                    if let Err(failure) = self.verify(&sig_parts, sig, &body_bytes, body_mode) {
                        return (name, auth_error(failure));
                    }
                    context.authenticated = true;
                }
            }
        }

        let Some(service) = service else {
            let what = match target {
                Some(t) => t.to_string(),
                None => format!("{} {}", parts.method, raw_path),
            };
            let mut err = AwsError::unknown_operation(&what);
            if target.is_none() {
                err.status = StatusCode::NOT_FOUND;
            }
            return (name, err.into_response(protocol));
        };
        let request = Request::from_parts(parts, stream_body);
        let response = service
            .call(AwsRequest {
                request,
                body: body_bytes,
                context,
            })
            .await;
        (name, response)
    }

    fn verify(
        &self,
        parts: &RequestParts<'_>,
        sig: &ParsedSignature,
        body: &Bytes,
        body_mode: BodyMode,
    ) -> Result<(), AuthFailure> {
        let creds = &self.inner.config.credentials;
        if sig.access_key_id != creds.access_key_id {
            return Err(AuthFailure::UnknownAccessKey);
        }
        if let Some(required) = &creds.session_token {
            if sig.session_token.as_deref() != Some(required.as_str()) {
                return Err(AuthFailure::InvalidToken);
            }
        }
        let body_hash = sigv4::sha256_hex(body);
        let candidates: Vec<&str> = match body_mode {
            BodyMode::Streaming => vec![EMPTY_SHA256, sigv4::UNSIGNED_PAYLOAD],
            BodyMode::Buffered if sig.location == sigv4::SignatureLocation::Query => {
                vec![&body_hash, sigv4::UNSIGNED_PAYLOAD]
            }
            BodyMode::Buffered => vec![&body_hash],
        };
        let now = time::OffsetDateTime::from_unix_timestamp_nanos(
            self.inner.clock.now_millis() as i128 * 1_000_000,
        )
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        sigv4::verify(parts, sig, &creds.secret_access_key, &candidates, now)?;
        if body_mode == BodyMode::Buffered {
            if let Some(declared) = sigv4::declared_payload_hash(parts) {
                let is_hex_hash =
                    declared.len() == 64 && declared.bytes().all(|b| b.is_ascii_hexdigit());
                if is_hex_hash && !declared.eq_ignore_ascii_case(&body_hash) {
                    return Err(AuthFailure::SignatureMismatch(
                        "The provided 'x-amz-content-sha256' header does not match what was computed."
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }
}
