//! Where each projection stands: position, lag behind the log, failure; and
//! waiting (bounded) for a projection to reach a position (read-your-writes).

use std::time::Duration;

use crm_eventlog::EventLog;
use serde::Serialize;

use crate::readdb::ReadDb;
use crate::registry::{self, Generation};

/// One generation's standing, as `/v1/projections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub generation: i64,
    pub version: i64,
    /// `active` (serving), `building` (rebuild in progress).
    pub state: String,
    pub position: i64,
    pub head: i64,
    /// Events the projection is behind the log.
    pub lag: i64,
    pub failed_event_id: Option<String>,
    pub failed_position: Option<i64>,
    pub error: Option<String>,
    pub updated_at: String,
}

/// Every live generation with its lag.
pub async fn status(db: &ReadDb, log: &EventLog) -> Result<Vec<ProjectionStatus>, String> {
    let head = log
        .head_position()
        .await
        .map_err(|error| error.to_string())?;
    let generations = registry::all(db).await.map_err(|error| error.to_string())?;
    Ok(generations
        .into_iter()
        .filter(|generation| generation.state != registry::RETIRED)
        .map(|generation| ProjectionStatus {
            lag: (head - generation.checkpoint).max(0),
            position: generation.checkpoint,
            head,
            name: generation.name,
            generation: generation.generation,
            version: generation.version,
            state: generation.state,
            failed_event_id: generation.failed_event_id,
            failed_position: generation.failed_position,
            error: generation.error,
            updated_at: generation.updated_at,
        })
        .collect())
}

/// Why a read could not wait for its position.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("projection {name} is at position {position}, not yet at {wanted}")]
    TimedOut {
        name: String,
        position: i64,
        wanted: i64,
    },
    #[error("projection {0} is not installed")]
    Missing(String),
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The serving generation of `name` once its checkpoint is at least
/// `min_position` (immediately when `min_position` is None), or TimedOut.
pub async fn serving_at(
    db: &ReadDb,
    name: &str,
    min_position: Option<i64>,
    timeout: Duration,
) -> Result<Generation, WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        let generation = registry::active(db, name)
            .await?
            .ok_or_else(|| WaitError::Missing(name.to_string()))?;
        let wanted = min_position.unwrap_or(0);
        if generation.checkpoint >= wanted {
            return Ok(generation);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(WaitError::TimedOut {
                name: name.to_string(),
                position: generation.checkpoint,
                wanted,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Publishes every serving projection's position and lag behind the log as
/// gauges (`crm_projection_position`, `crm_projection_lag_events`) once a
/// second, until `shutdown`.
pub async fn report_progress(
    db: ReadDb,
    log: EventLog,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    while !*shutdown.borrow() {
        match status(&db, &log).await {
            Ok(standings) => {
                for standing in standings.iter().filter(|s| s.state == registry::ACTIVE) {
                    let name = standing.name.clone();
                    metrics::gauge!("crm_projection_position", "projection" => name.clone())
                        .set(standing.position as f64);
                    metrics::gauge!("crm_projection_lag_events", "projection" => name)
                        .set(standing.lag as f64);
                }
            }
            Err(error) => tracing::debug!(%error, "projection progress unavailable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
    }
}
