//! The protocol's `ResponseStatusCode` values and the error type that carries one.
//!
//! Every failure the stream manager reports to a client is a [`StreamError`]: a status code
//! from the SDKs' enum (only 0..=18 may ever go on the wire) and a message that the SDKs turn
//! into the exception text, so it names the field or the stream involved.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Success = 0,
    UnknownFailure = 1,
    Unauthorized = 2,
    InvalidRequest = 3,
    RequestPayloadTooLarge = 4,
    ResourceNotFound = 5,
    ServerTimeout = 6,
    ResponsePayloadTooLarge = 7,
    UnsupportedConnectVersion = 8,
    UnexpectedOperation = 9,
    UnsupportedProtocolVersion = 10,
    InvalidProtocolVersion = 11,
    FailedToConnect = 12,
    NotEnoughMessages = 13,
    MessageStoreReadError = 14,
    OutOfMemoryError = 15,
    UpdateFailed = 16,
    UpdateNotAllowed = 17,
    UnknownOperation = 18,
}

impl Status {
    pub fn code(self) -> i64 {
        self as u8 as i64
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status:?}: {message}")]
pub struct StreamError {
    pub status: Status,
    pub message: String,
}

impl StreamError {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        StreamError {
            status,
            message: message.into(),
        }
    }

    pub fn not_found(stream: &str) -> Self {
        StreamError::new(
            Status::ResourceNotFound,
            format!("message stream {stream:?} does not exist"),
        )
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        StreamError::new(Status::UnknownFailure, message.to_string())
    }
}
