//! The IoT registry: the records that describe a fleet (things today; thing groups,
//! certificates and policies join here) and the `iot` operations that manage them.
//!
//! Other parts of the crate (jobs, policy variables, principals) read the registry through
//! [`things::ThingRegistry`], never through its tables.

pub mod api;
pub mod group_api;
pub mod groups;
pub mod things;
