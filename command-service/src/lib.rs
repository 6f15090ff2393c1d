//! The command side of the CRM: HTTP front for commands (auth, idempotency,
//! expected version, problem+json errors) over the event log.
//!
//! - [`app`]: shared state and the command context read from headers
//! - [`auth`], [`problem`]: bearer tokens and roles, RFC 9457 errors (from `crm-service-kit`)
//! - [`body`]: the JSON body extractor (limits, field-precise errors)
//! - [`executor`]: load, decide, append, retry
//! - [`cache`], [`locks`]: aggregate cache and per-stream serialisation
//! - [`metrics`]: commands by type and outcome, command latency
//! - [`routes`]: one module per aggregate; [`openapi`]: the API document

pub mod app;
pub use crm_service_kit::{auth, problem};
pub mod body;
pub mod cache;
pub mod executor;
pub mod grpc;
pub mod locks;
pub mod metrics;
pub mod openapi;
pub mod routes;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use utoipa::OpenApi;

pub use app::App;
pub use auth::{Role, Tokens};
pub use executor::Executor;
use routes::{accounts, cases, contacts, health, leads, opportunities, streams};

/// All command routes, raw history, health and the OpenAPI document, with
/// their state but without the outer HTTP stack (so they can be merged).
pub fn routes(app: App) -> Router {
    use metrics::metered;
    Router::new()
        .route(
            "/v1/leads",
            metered("lead", "capture", post(leads::capture)),
        )
        .route(
            "/v1/leads/{id}/qualify",
            metered("lead", "qualify", post(leads::qualify)),
        )
        .route(
            "/v1/leads/{id}/disqualify",
            metered("lead", "disqualify", post(leads::disqualify)),
        )
        .route(
            "/v1/leads/{id}/convert",
            metered("lead", "convert", post(leads::convert)),
        )
        .route(
            "/v1/accounts",
            metered("account", "register", post(accounts::register)),
        )
        .route(
            "/v1/accounts/{id}",
            metered("account", "update", patch(accounts::update)),
        )
        .route(
            "/v1/contacts",
            metered("contact", "create", post(contacts::create)),
        )
        .route(
            "/v1/contacts/{id}",
            metered("contact", "update", patch(contacts::update)),
        )
        .route(
            "/v1/contacts/{id}/activities",
            metered("contact", "log_activity", post(contacts::log_activity)),
        )
        .route(
            "/v1/contacts/{id}/tasks/complete",
            metered("contact", "complete_task", post(contacts::complete_task)),
        )
        .route(
            "/v1/opportunities",
            metered("opportunity", "open", post(opportunities::open)),
        )
        .route(
            "/v1/opportunities/{id}",
            metered("opportunity", "update", patch(opportunities::update)),
        )
        .route(
            "/v1/opportunities/{id}/advance",
            metered("opportunity", "advance", post(opportunities::advance)),
        )
        .route(
            "/v1/opportunities/{id}/win",
            metered("opportunity", "win", post(opportunities::win)),
        )
        .route(
            "/v1/opportunities/{id}/lose",
            metered("opportunity", "lose", post(opportunities::lose)),
        )
        .route(
            "/v1/opportunities/{id}/reopen",
            metered("opportunity", "reopen", post(opportunities::reopen)),
        )
        .route("/v1/cases", metered("case", "open", post(cases::open)))
        .route(
            "/v1/cases/{id}/assign",
            metered("case", "assign", post(cases::assign)),
        )
        .route(
            "/v1/cases/{id}/comment",
            metered("case", "comment", post(cases::comment)),
        )
        .route(
            "/v1/cases/{id}/escalate",
            metered("case", "escalate", post(cases::escalate)),
        )
        .route(
            "/v1/cases/{id}/resolve",
            metered("case", "resolve", post(cases::resolve)),
        )
        .route(
            "/v1/cases/{id}/close",
            metered("case", "close", post(cases::close)),
        )
        .route(
            "/v1/cases/{id}/reopen",
            metered("case", "reopen", post(cases::reopen)),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .with_state(app.clone())
        .merge(history_routes(app))
}

/// Raw history of one stream (`GET /v1/streams/{stream_type}/{id}/events`)
/// alone, with its state: for a process that serves reads but not commands.
pub fn history_routes(app: App) -> Router {
    Router::new()
        .route(
            "/v1/streams/{stream_type}/{id}/events",
            get(streams::events),
        )
        .with_state(app)
}

/// The command service on its own: [`routes`] and its OpenAPI document
/// inside the shared HTTP stack.
pub fn router(app: App) -> Router {
    let document = openapi::ApiDoc::openapi();
    let docs = Router::new().route("/openapi.json", get(move || async move { Json(document) }));
    crm_service_kit::http::stack(routes(app).merge(docs))
}
