//! `crm-query-service`: the read side's HTTP front.
//!
//! Map of the crate (the log-backed part; read-model routes are added beside it):
//! - [`state`]: [`QueryState`] (event log, token verifier, live-feed settings, view caches).
//! - [`views`]: [`views::ViewCache`], boards and timeline pages shared between requests,
//!   with stale-while-computing answers while a read model moves.
//! - [`access`]: [`access::require_read`], the one place that decides who may read.
//! - [`params`]: query-string parsing with field-named problems, `min_position` waits.
//! - [`cloudevent`]: [`cloud_event`], a recorded event in CloudEvents 1.0 JSON form.
//! - [`read`]: routes served from the read models (pipeline, records, customers, audit, status).
//! - [`log`]: routes served straight from the event log: time travel
//!   ([`log::time_travel`]), the global feed ([`log::feed`]) and the live SSE feed
//!   ([`log::live`]); [`log_routes`] mounts them, [`LogApiDoc`] documents them.

pub mod access;
pub mod cloudevent;
pub mod log;
pub mod params;
pub mod read;
pub mod state;
pub mod views;

pub use crm_service_kit::{auth, problem};

use axum::routing::get;
use axum::Router;
use utoipa::OpenApi;

pub use cloudevent::cloud_event;
pub use state::{LiveSettings, QueryState};

/// The log-backed read routes, without state applied (merge them into a bigger
/// router, then call `.with_state(query_state)`):
///
/// - `GET /v1/streams/{stream_type}/{id}/state?at=<RFC 3339>|version=N`
/// - `GET /v1/events?after=P&limit=N`
/// - `GET /v1/events/live` (Server-Sent Events)
pub fn log_routes() -> Router<QueryState> {
    Router::new()
        .route(
            "/v1/streams/{stream_type}/{id}/state",
            get(log::time_travel::state),
        )
        .route("/v1/events", get(log::feed::events))
        .route("/v1/events/live", get(log::live::live))
}

/// Every query route (log-backed and read-model) with `state` applied.
pub fn routes(state: QueryState) -> Router {
    log_routes()
        .merge(read::read_model_routes())
        .with_state(state)
}

/// OpenAPI paths of [`log_routes`] (merge into the service's document).
#[derive(OpenApi)]
#[openapi(
    paths(log::time_travel::state, log::feed::events, log::live::live),
    tags(
        (name = "streams", description = "Raw history and time travel"),
        (name = "events", description = "Global feed and live changes (CloudEvents 1.0)")
    )
)]
pub struct LogApiDoc;
