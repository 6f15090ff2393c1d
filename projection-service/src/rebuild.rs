//! Rebuild: replay the whole log into a new generation of a projection's
//! tables while the serving generation keeps answering, then switch.

use crm_eventlog::EventLog;

use crate::fold::{fold_batch, Advance};
use crate::projection::Projection;
use crate::readdb::ReadDb;
use crate::registry;

/// Events per transaction during a rebuild.
const REBUILD_BATCH: i64 = 2000;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event log: {0}")]
    Log(#[from] crm_eventlog::LogError),
    #[error(
        "projection {projection} cannot fold event {event_id} at position {position}: {error}"
    )]
    Fold {
        projection: String,
        event_id: String,
        position: i64,
        error: String,
    },
}

/// Replays the log from position 0 into a fresh generation and makes it the
/// serving one once caught up with the head. `progress(position, head)` is
/// called after every batch. Returns the new generation number.
pub async fn rebuild(
    log: &EventLog,
    db: &ReadDb,
    projection: &dyn Projection,
    mut progress: impl FnMut(i64, i64),
) -> Result<i64, RebuildError> {
    registry::ensure(db).await?;
    let generation = registry::create_generation(db, projection, registry::BUILDING).await?;
    let tables = generation.tables();
    let mut position = 0;
    loop {
        let head = log.head_position().await?;
        let events = log.read_all(position, REBUILD_BATCH).await?;
        let advance = events.last().map(|last| Advance {
            name: &generation.name,
            generation: generation.generation,
            part: None,
            from: position,
            to: last.position,
        });
        if let Err(failure) = fold_batch(db, projection, &tables, &events, advance).await {
            let (event_id, at) = failure
                .event
                .as_ref()
                .map(|event| (event.event_id.to_string(), event.position))
                .unwrap_or_default();
            return Err(RebuildError::Fold {
                projection: projection.name().to_string(),
                event_id,
                position: at,
                error: failure.error.to_string(),
            });
        }
        if let Some(last) = events.last() {
            position = last.position;
        }
        progress(position, head.max(position));
        if (events.len() as i64) < REBUILD_BATCH && position >= head {
            break;
        }
    }
    // The live runner continues from this generation's checkpoint after the switch.
    registry::activate(db, projection.name(), generation.generation).await?;
    Ok(generation.generation)
}
