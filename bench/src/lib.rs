//! `crm-bench`: a load generator for the CRM service and the baselines it is
//! compared with, run side by side on the same machine and PostgreSQL.
//!
//! - [`dataset`]: the Maven CRM sample the load draws from.
//! - [`workload`]: the CRM command mix, one client's records and life cycles.
//! - [`server`]: a real `crm serve` process under test.
//! - [`runs`]: closed-loop and paced load, lag, stream-length runs, queries, rebuilds.
//! - [`plan`]: the stream-length plan shared by our runs and cqrs-es.
//! - [`direct`]: baseline (a), raw event-row inserts.
//! - [`cqrs_baseline`]: baseline (b), plain cqrs-es + postgres-es.
//! - [`stats`], [`report`], [`machine`]: latency histograms, the printed report, the machine.

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
