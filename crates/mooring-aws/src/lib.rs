//! The AWS front door shared by every Mooring service.
//!
//! [`sigv4`] verifies AWS Signature Version 4 (header and presigned forms, streaming
//! payloads); [`protocol`] renders successes and errors in the awsJson and restJson shapes
//! botocore and the other SDKs parse; [`front_door`] routes each request to the service that
//! owns it and records its metrics; [`outbound`] (feature `outbound`) builds the SDK
//! configuration for Mooring's own calls to AWS. No service is known here: services implement
//! [`front_door::AwsService`] and are registered by the binary.

pub mod front_door;
#[cfg(feature = "outbound")]
pub mod outbound;
pub mod protocol;
pub mod sigv4;

pub use front_door::{
    Authentication, AwsRequest, AwsService, BodyMode, FrontDoor, FrontDoorConfig, RequestContext,
    Route,
};
pub use protocol::{json_response, parse_json_body, AwsError, OperationName, Protocol};
