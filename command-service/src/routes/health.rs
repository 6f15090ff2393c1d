//! Liveness and readiness probes (no auth).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::app::App;
use crate::problem::Problem;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The event log answers.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, description = "ready"), (status = 503, description = "the event log does not answer")))]
pub async fn readyz(State(app): State<App>) -> Result<(StatusCode, Json<Value>), Problem> {
    let head = app
        .executor
        .log()
        .head_position()
        .await
        .map_err(|error| Problem::unavailable(format!("event log unavailable: {error}")))?;
    Ok((
        StatusCode::OK,
        Json(json!({"status": "ready", "head_position": head})),
    ))
}
