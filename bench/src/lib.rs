//! `crm-bench`: a load generator for the CRM service and the baselines it is
//! compared with, run side by side on the same machine and PostgreSQL.
//!
//! - [`stats`]: latency histograms and run summaries.
//! - [`plan`]: the stream-length plan shared by our runs and cqrs-es.
//! - [`direct`]: baseline (a), raw event-row inserts.
//! - [`cqrs_baseline`]: baseline (b), plain cqrs-es + postgres-es.

pub mod cqrs_baseline;
pub mod dataset;
pub mod direct;
pub mod machine;
pub mod plan;
pub mod report;
pub mod runs;
pub mod server;
pub mod stats;
pub mod workload;
