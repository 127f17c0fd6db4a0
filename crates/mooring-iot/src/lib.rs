//! Mooring's IoT control plane, starting with topic rules.
//!
//! [`sql`] is the AWS IoT SQL engine (parser and evaluator), [`topic`] matches topic filters,
//! [`model`] holds topic rules and their validation, [`store`] persists them in the metadata
//! database, [`api`] and [`service`] serve the `iot` REST API (CreateTopicRule and friends)
//! behind the front door, [`engine`] runs rules against published messages, and [`actions`]
//! carries out what the rules ask for (republish, HTTP, local functions, streams, and S3,
//! SQS and Kinesis through [`outbound`]); [`journal`] keeps matched executions durable
//! until their actions have run.
//! [`registry`] holds things and the other registry resources. [`security`] holds
//! certificates, policies and principals and enforces policies on the broker; [`iot_data`]
//! serves the `iot-data` HTTP API (publish, retained messages); [`shadow`] is the Device
//! Shadow service over MQTT and HTTP.

pub mod actions;
pub mod api;
pub mod broker_bridge;
pub mod config;
pub mod engine;
pub mod external;
pub mod iot_data;
pub mod jobs;
pub mod journal;
pub mod model;
pub mod outbound;
pub mod registry;
pub mod security;
pub mod service;
pub mod shadow;
pub mod sql;
pub mod store;
pub mod topic;

pub use engine::{InboundMessage, RulesEngine};
pub use service::{Iot, IotService};
