//! The shared foundation every Mooring service stands on.
//!
//! Nothing in this crate knows about a particular AWS service. It holds the configuration
//! model (file, environment and flags merged in that order), ARN construction, a clock that
//! tests can steer, the SQLite metadata store with per-service migrations, Mooring's own
//! certificate authority, the handle traits through which services call each other, the
//! shutdown signal shared by every task, and the metrics registry behind `/metrics`.

pub mod arn;
pub mod checksum;
pub mod clock;
pub mod config;
pub mod context;
pub mod credentials;
pub mod handles;
pub mod metrics;
pub mod pki;
pub mod shutdown;
pub mod store;

pub use arn::Arns;
pub use clock::{Clock, SystemClock};
pub use config::Config;
pub use context::ServiceContext;
pub use shutdown::Shutdown;
pub use store::Db;
