//! `/healthz` (the process is up) and `/readyz` (each dependency answers) for
//! the services that have no command routes to carry them.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use crm_eventlog::EventLog;
use crm_projection_service::ReadDb;
use crm_service_kit::problem::Problem;
use serde_json::json;

/// What a service depends on.
#[derive(Clone)]
pub struct Dependencies {
    pub log: EventLog,
    pub read: Option<ReadDb>,
}

/// Health routes checking `dependencies` on every `/readyz`.
pub fn routes(dependencies: Dependencies) -> Router {
    let dependencies = Arc::new(dependencies);
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(move || {
                let dependencies = dependencies.clone();
                async move { ready(&dependencies).await }
            }),
        )
}

/// How long each dependency may take to answer a readiness probe: a database
/// that is down must give a prompt 503, not a probe that hangs until the
/// prober's own timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

async fn ready(
    dependencies: &Dependencies,
) -> Result<(StatusCode, Json<serde_json::Value>), Problem> {
    let head = tokio::time::timeout(PROBE_TIMEOUT, dependencies.log.head_position())
        .await
        .map_err(|_| {
            Problem::unavailable(format!(
                "event log unavailable: no answer within {PROBE_TIMEOUT:?}"
            ))
        })?
        .map_err(|error| Problem::unavailable(format!("event log unavailable: {error}")))?;
    if let Some(read) = &dependencies.read {
        tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&read.pool))
            .await
            .map_err(|_| {
                Problem::unavailable(format!(
                    "read-model database unavailable: no answer within {PROBE_TIMEOUT:?}"
                ))
            })?
            .map_err(|error| {
                Problem::unavailable(format!("read-model database unavailable: {error}"))
            })?;
    }
    Ok((
        StatusCode::OK,
        Json(json!({"status": "ready", "head_position": head})),
    ))
}
