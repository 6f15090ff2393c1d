//! The read side's writer: projection workers fold the event log into read
//! models, each with a checkpoint committed with the rows it produced.
//!
//! - [`readdb`]: the read-model database (SQLite or PostgreSQL through sqlx `Any`)
//! - [`projection`]: the `Projection` trait and versioned table names
//! - [`fold`]: a batch and its checkpoint in one transaction; [`registry`]:
//!   generations; [`rebuild`]; [`status`]: positions and lag
//! - [`runner`]: one process following the log in order (`crm serve`)
//! - [`worker`]: distributed workers (`crm projection-service`): units per
//!   [`partition`], owned through [`lease`]s, fed by JetStream ([`bus`])
//! - read models: one module each (pipeline, history, audit, records, service levels);
//!   [`lookups`]: a batch's lookup rows held in memory and written back at its end;
//!   [`rows`]: rows a fold writes, as data; [`rebuild_writer`]: a rebuild's own SQLite writer
//!   (its WAL checkpointed in the background by `wal_checkpointer`)

pub mod audit;
pub mod bus;
pub mod fold;
pub mod history;
pub mod lease;
pub mod lookups;
pub mod money;
pub mod partition;
pub mod pipeline;
pub mod projection;
pub mod readdb;
pub mod rebuild;
pub mod rebuild_writer;
pub mod records;
pub mod registry;
pub mod rows;
pub mod runner;
pub mod service_levels;
pub mod status;
mod wal_checkpointer;
pub mod worker;

pub use projection::{Projection, ProjectionError, Tables};
pub use readdb::ReadDb;

/// Every read model, in the order the runner folds them.
pub fn all_projections() -> Vec<std::sync::Arc<dyn Projection>> {
    vec![
        std::sync::Arc::new(pipeline::PipelineProjection),
        std::sync::Arc::new(service_levels::ServiceLevelsProjection),
        std::sync::Arc::new(records::RecordsProjection),
        std::sync::Arc::new(history::HistoryProjection),
        std::sync::Arc::new(audit::AuditProjection),
    ]
}
