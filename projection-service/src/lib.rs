//! The read side's writer: projection workers fold the event log into read
//! models, each with a checkpoint committed with the rows it produced.
//!
//! - [`readdb`]: the read-model database (SQLite or PostgreSQL through sqlx `Any`)
//! - [`projection`]: the `Projection` trait and versioned table names
//! - read models: one module each (pipeline, history, audit, records, service levels)

pub mod fold;
pub mod projection;
pub mod readdb;

pub use projection::{Projection, ProjectionError, Tables};
pub use readdb::ReadDb;
