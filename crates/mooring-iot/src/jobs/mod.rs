//! IoT Jobs: the control plane (`aws iot` CreateJob and friends), the device API over MQTT
//! (`$aws/things/{thing}/jobs/…`) and over HTTP (`iot-jobs-data`), timers, rollouts and job
//! events.
//!
//! [`model`] holds the rules (the execution state machine, timers, retries, abort criteria,
//! rollout rates), [`state`] applies them to every job and execution in memory, [`store`]
//! persists each change before anyone is answered, [`engine`] owns the state and runs the
//! timers and the CONTINUOUS targeting, [`device`] answers the MQTT device API, [`api`] the
//! control plane and [`data_api`] the HTTP device API.

pub mod api;
pub mod data_api;
pub mod device;
pub mod engine;
pub mod model;
pub mod report;
pub mod state;
pub mod store;

pub use engine::Jobs;

use serde::Deserialize;

/// The `[iot.jobs]` configuration section.
///
/// ```toml
/// [iot.jobs]
/// minute_ms = 60000                 # length of a "minute" for timeouts and rollout rates
/// device_requests_per_second = 100  # per thing; more get RequestThrottled (0: no limit)
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    pub minute_ms: i64,
    pub device_requests_per_second: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            minute_ms: 60_000,
            device_requests_per_second: 100,
        }
    }
}
