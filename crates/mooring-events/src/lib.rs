//! Mooring's EventBridge-compatible event bus.
//!
//! The service speaks awsJson 1.1 (`X-Amz-Target: AWSEvents.<Operation>`, signing name
//! `events`). [`pattern`] and [`ruleset`] are the event-pattern engine; [`model`] holds the
//! buses, rules, targets, archives, replays, connections and API destinations; [`api`] has one
//! function per operation; [`store`] persists everything in the metadata database;
//! [`delivery`] sends events to targets at least once with retries and dead-lettering;
//! [`transform`] shapes target input; [`schedule`] parses `rate(...)`/`cron(...)`; [`tail`]
//! prints a bus's events for `mooring events tail`. Background
//! tasks (delivery worker, scheduler, replays, retention) run on the shared shutdown tracker.
//! Other services put events through [`mooring_core::handles::EventsHandle`].

//!
//! Without the default `service` feature only the pattern engine is built (it needs nothing
//! but serde_json), which is what the fuzz target uses.

#[cfg(feature = "service")]
pub mod api;
#[cfg(feature = "service")]
mod bus;
#[cfg(feature = "service")]
pub mod delivery;
#[cfg(feature = "service")]
pub mod model;
pub mod pattern;
pub mod ruleset;
#[cfg(feature = "service")]
pub mod schedule;
#[cfg(feature = "service")]
pub mod store;
#[cfg(feature = "service")]
pub mod tail;
#[cfg(feature = "service")]
pub mod transform;

#[cfg(feature = "service")]
pub use bus::{Events, EventsService};
