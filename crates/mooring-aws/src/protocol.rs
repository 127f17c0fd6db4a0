//! AWS wire protocols as the services answer in them: success bodies and error shapes.
//!
//! awsJson 1.0/1.1 services put the error code in the body's `__type`; restJson1 services
//! put it in the `x-amzn-ErrorType` header (botocore reads both). Every response also
//! carries `x-amzn-RequestId`, added by the front door.

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The protocol a service speaks, which decides how errors and bodies are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    AwsJson1_0,
    AwsJson1_1,
    RestJson1,
}

impl Protocol {
    pub fn content_type(self) -> &'static str {
        match self {
            Protocol::AwsJson1_0 => "application/x-amz-json-1.0",
            Protocol::AwsJson1_1 => "application/x-amz-json-1.1",
            Protocol::RestJson1 => "application/json",
        }
    }
}

/// The operation a response answered, attached by services for metrics and logs.
#[derive(Debug, Clone)]
pub struct OperationName(pub String);

/// An error in AWS's shape: HTTP status, error code, message and any extra members that the
/// error shape defines (for example `resourceId` on IoT's `ResourceAlreadyExistsException`).
#[derive(Debug, Clone, PartialEq)]
pub struct AwsError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl AwsError {
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        AwsError {
            status,
            code: code.into(),
            message: message.into(),
            extra: serde_json::Map::new(),
        }
    }

    /// A 400 error with the given code.
    pub fn client(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::client("ValidationException", message)
    }

    pub fn serialization(message: impl Into<String>) -> Self {
        Self::client("SerializationException", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
            message,
        )
    }

    pub fn unknown_operation(what: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "UnknownOperationException",
            format!("Unknown operation {what}"),
        )
    }

    /// Adds a member to the error body.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// Renders the error in `protocol`'s shape.
    pub fn into_response(self, protocol: Protocol) -> Response<Body> {
        let mut body = serde_json::Map::new();
        if matches!(protocol, Protocol::AwsJson1_0 | Protocol::AwsJson1_1) {
            body.insert("__type".into(), self.code.clone().into());
        }
        body.insert("message".into(), self.message.clone().into());
        for (k, v) in self.extra {
            body.insert(k, v);
        }
        let mut response = Response::new(Body::from(
            serde_json::to_vec(&serde_json::Value::Object(body)).unwrap_or_default(),
        ));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(protocol.content_type()),
        );
        if let Ok(v) = HeaderValue::from_str(&self.code) {
            headers.insert("x-amzn-ErrorType", v);
        }
        response
    }
}

impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for AwsError {}

/// A 200 response with `value` as the JSON body.
pub fn json_response<T: Serialize>(protocol: Protocol, value: &T) -> Response<Body> {
    json_response_with_status(protocol, StatusCode::OK, value)
}

pub fn json_response_with_status<T: Serialize>(
    protocol: Protocol,
    status: StatusCode,
    value: &T,
) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(protocol.content_type()),
            );
            response
        }
        Err(e) => AwsError::internal(e.to_string()).into_response(protocol),
    }
}

/// Parses a JSON request body; an empty body reads as `{}`. Malformed JSON is a
/// `SerializationException`, as AWS answers.
pub fn parse_json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, AwsError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            AwsError::serialization(format!("Invalid request body: {e}"))
        } else {
            AwsError::serialization(format!("Malformed JSON request body: {e}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn aws_json_errors_carry_type_in_body_and_header() {
        let response = AwsError::client("ResourceNotFoundException", "no bus")
            .into_response(Protocol::AwsJson1_1);
        assert_eq!(response.status(), 400);
        assert_eq!(
            response.headers()["x-amzn-ErrorType"],
            "ResourceNotFoundException"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/x-amz-json-1.1"
        );
        let body = body_json(response).await;
        assert_eq!(body["__type"], "ResourceNotFoundException");
        assert_eq!(body["message"], "no bus");
    }

    #[tokio::test]
    async fn rest_json_errors_carry_type_in_header_and_extra_members() {
        let response = AwsError::new(StatusCode::CONFLICT, "ResourceAlreadyExistsException", "x")
            .with("resourceId", "t1")
            .into_response(Protocol::RestJson1);
        assert_eq!(response.status(), 409);
        assert_eq!(
            response.headers()["x-amzn-ErrorType"],
            "ResourceAlreadyExistsException"
        );
        let body = body_json(response).await;
        assert!(body.get("__type").is_none());
        assert_eq!(body["resourceId"], "t1");
    }

    #[test]
    fn empty_bodies_parse_as_empty_objects_and_bad_json_is_a_serialization_error() {
        let v: serde_json::Value = parse_json_body(b"").unwrap();
        assert_eq!(v, serde_json::json!({}));
        let err = parse_json_body::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(err.code, "SerializationException");
    }
}
