//! Creating a generation's tables and folding a batch of events into them
//! together with the projection's checkpoint, in one transaction.

use crm_eventlog::RecordedEvent;

use crate::projection::{Projection, ProjectionError, Tables};
use crate::readdb::ReadDb;

/// Creates the tables of one generation (idempotent: `IF NOT EXISTS` DDL).
pub async fn create_tables(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    for statement in projection.schema(tables) {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Drops the tables of one generation.
pub async fn drop_tables(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    for base in projection.table_names() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", tables.t(base)))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// A batch that could not be folded: nothing of it was written.
#[derive(Debug)]
pub struct FoldFailure {
    /// The event the projection stopped at (None: the batch failed as a whole, e.g. at commit).
    pub event: Option<RecordedEvent>,
    pub error: ProjectionError,
}

/// Folds `events` and runs `finish` (e.g. the checkpoint update) in the same
/// transaction; all or nothing.
pub async fn fold_batch(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
    events: &[RecordedEvent],
    checkpoint: Option<(&str, i64)>,
) -> Result<(), FoldFailure> {
    fold_batch_paced(db, projection, tables, events, checkpoint, None).await
}

/// [`fold_batch`] with an optional pause after each event (a test knob that
/// makes a crash land inside a batch).
pub async fn fold_batch_paced(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
    events: &[RecordedEvent],
    checkpoint: Option<(&str, i64)>,
    pause: Option<std::time::Duration>,
) -> Result<(), FoldFailure> {
    let whole = |error: sqlx::Error| FoldFailure {
        event: None,
        error: error.into(),
    };
    let mut tx = db.begin_write().await.map_err(whole)?;
    for event in events {
        if let Err(error) = projection.apply(&mut tx, tables, event).await {
            return Err(FoldFailure {
                event: Some(event.clone()),
                error,
            });
        }
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    write_checkpoint(&mut tx, checkpoint, events)
        .await
        .map_err(whole)?;
    tx.commit().await.map_err(whole)
}

/// Moves the checkpoint of `(projection, generation)` to the last event's position.
pub async fn write_checkpoint(
    tx: &mut crate::projection::Tx,
    checkpoint: Option<(&str, i64)>,
    events: &[RecordedEvent],
) -> Result<(), sqlx::Error> {
    if let (Some((name, generation)), Some(last)) = (checkpoint, events.last()) {
        sqlx::query("UPDATE rm_projections SET checkpoint = $1, updated_at = $2 WHERE name = $3 AND generation = $4")
            .bind(last.position)
            .bind(crate::readdb::timestamp(&chrono::Utc::now()))
            .bind(name.to_string())
            .bind(generation)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Where a batch moves a checkpoint. `from` must still be the stored value
/// (compare-and-set): two workers can never both commit the same range.
#[derive(Debug, Clone, Copy)]
pub struct Advance<'a> {
    pub name: &'a str,
    pub generation: i64,
    /// None: the generation's own checkpoint; Some(part): that partition's.
    pub part: Option<i64>,
    pub from: i64,
    /// The last position of the window the batch covers (its events may be
    /// fewer: a partition folds only its own streams' events).
    pub to: i64,
}

/// Folds `events` and moves the checkpoint as `advance` says, in one
/// transaction; nothing is written when the checkpoint had moved meanwhile.
pub async fn fold_and_advance(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
    events: &[RecordedEvent],
    advance: Advance<'_>,
    pause: Option<std::time::Duration>,
) -> Result<(), FoldFailure> {
    let whole = |error: sqlx::Error| FoldFailure {
        event: None,
        error: error.into(),
    };
    let mut tx = db.begin_write().await.map_err(whole)?;
    for event in events {
        if let Err(error) = projection.apply(&mut tx, tables, event).await {
            return Err(FoldFailure {
                event: Some(event.clone()),
                error,
            });
        }
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    let moved = match advance.part {
        Some(part) => crate::partition::advance(
            &mut tx,
            advance.name,
            advance.generation,
            part,
            advance.from,
            advance.to,
        )
        .await
        .map_err(whole)?,
        None => {
            sqlx::query(
                "UPDATE rm_projections SET checkpoint = $1, updated_at = $2
                 WHERE name = $3 AND generation = $4 AND checkpoint = $5",
            )
            .bind(advance.to)
            .bind(crate::readdb::timestamp(&chrono::Utc::now()))
            .bind(advance.name.to_string())
            .bind(advance.generation)
            .bind(advance.from)
            .execute(&mut *tx)
            .await
            .map_err(whole)?
            .rows_affected()
                == 1
        }
    };
    if !moved {
        return Err(FoldFailure {
            event: None,
            error: ProjectionError::CheckpointMoved {
                name: advance.name.to_string(),
                expected: advance.from,
            },
        });
    }
    tx.commit().await.map_err(whole)
}

/// Helpers for read-model tests: events as the log would hold them.
pub mod testkit {
    use chrono::{DateTime, Utc};
    use cqrs_es::DomainEvent;
    use crm_eventlog::RecordedEvent;
    use serde::Serialize;
    use serde_json::json;

    /// A recorded event of `stream_type`/`stream_id` at `version` and global `position`.
    pub fn recorded<E: Serialize + DomainEvent>(
        stream_type: &str,
        stream_id: &str,
        version: i64,
        position: i64,
        event: &E,
        actor: &str,
        recorded_at: DateTime<Utc>,
    ) -> RecordedEvent {
        RecordedEvent {
            position,
            event_id: uuid::Uuid::now_v7(),
            tenant_id: "default".into(),
            stream_type: stream_type.into(),
            stream_id: stream_id.into(),
            version,
            event_type: event.event_type(),
            schema_version: 1,
            payload: serde_json::to_value(event).expect("event serialises"),
            metadata: json!({"actor": actor, "roles": ["admin"], "command": format!("{stream_type}.test"),
                             "command_id": uuid::Uuid::now_v7(), "correlation_id": "corr-1", "causation_id": "cause-1"}),
            recorded_at,
            prev_hash: None,
            hash: None,
        }
    }
}
