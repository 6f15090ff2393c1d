//! Creating a generation's tables and folding a batch of events into them
//! together with the projection's checkpoint, in one transaction; and what
//! happens when a projection cannot fold an event ([`fold_or_stop`]).

use crm_eventlog::RecordedEvent;

use crate::projection::{
    table_layout, BatchError, Placeholders, Projection, ProjectionError, Tables, Tx,
};
use crate::readdb::{is_transient, ReadDb};
use crate::registry::{self, Generation};

/// Creates the tables of one generation (idempotent: `IF NOT EXISTS` DDL).
pub async fn create_tables(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let style = Placeholders::of(&tx);
    for statement in projection.schema(tables) {
        sqlx::query(&table_layout(style, &statement))
            .execute(&mut *tx)
            .await?;
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
    let bases = projection.table_names().into_iter();
    for base in bases.chain(projection.retired_table_names()) {
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

/// Folds `events` and, when given, moves the checkpoint as `advance` says,
/// in one transaction: all or nothing, and nothing when the checkpoint had
/// moved meanwhile.
pub async fn fold_batch(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
    events: &[RecordedEvent],
    advance: Option<Advance<'_>>,
) -> Result<(), FoldFailure> {
    fold_batch_paced(db, projection, tables, events, advance, None).await
}

/// [`fold_batch`] with an optional pause after each event (a test knob that
/// makes a crash land inside a batch).
pub async fn fold_batch_paced(
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
    events: &[RecordedEvent],
    advance: Option<Advance<'_>>,
    pause: Option<std::time::Duration>,
) -> Result<(), FoldFailure> {
    let mut tx = db.begin_fold().await?;
    // The checkpoint is claimed before any row is written: a worker holding a
    // stale view stops here (on PostgreSQL it waits for the row lock of the
    // one that moved it, then finds it moved) instead of folding the range a
    // second time.
    if let Some(advance) = advance {
        if !claim(&mut tx, advance).await? {
            return Err(FoldFailure {
                event: None,
                error: ProjectionError::CheckpointMoved {
                    name: advance.name.to_string(),
                    expected: advance.from,
                },
            });
        }
    }
    match pause {
        // Paced (tests): one event at a time, so a crash can land mid-batch.
        Some(pause) => {
            for event in events {
                if let Err(error) = projection.apply(&mut tx, tables, event).await {
                    return Err(FoldFailure {
                        event: Some(event.clone()),
                        error,
                    });
                }
                tokio::time::sleep(pause).await;
            }
        }
        None => {
            if let Err(BatchError { index, error }) =
                projection.apply_batch(&mut tx, tables, events).await
            {
                return Err(FoldFailure {
                    event: index.and_then(|index| events.get(index)).cloned(),
                    error,
                });
            }
        }
    }
    if let Some(Advance {
        name,
        generation,
        part: Some(_),
        ..
    }) = advance
    {
        // Last, so partitions folding in parallel hold the generation's row only briefly.
        crate::partition::level_serving(&mut *tx, name, generation).await?;
    }
    Ok(tx.commit().await?)
}

/// Moves a generation's checkpoint to `$1` (at `$2`) if it is still at `$5`:
/// `$3` name, `$4` generation. One row changed, or none when it had moved.
pub(crate) const CLAIM_CHECKPOINT: &str =
    "UPDATE rm_projections SET checkpoint = $1, updated_at = $2
     WHERE name = $3 AND generation = $4 AND checkpoint = $5";

/// Compare-and-set of the checkpoint `advance` names; false when it was not at `from`.
async fn claim(tx: &mut Tx, advance: Advance<'_>) -> Result<bool, sqlx::Error> {
    let Advance {
        name,
        generation,
        part,
        from,
        to,
    } = advance;
    if let Some(part) = part {
        return crate::partition::claim(tx, name, generation, part, from, to).await;
    }
    let moved = sqlx::query(CLAIM_CHECKPOINT)
        .bind(to)
        .bind(crate::readdb::timestamp(&chrono::Utc::now()))
        .bind(name.to_string())
        .bind(generation)
        .bind(from)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok(moved == 1)
}

impl From<sqlx::Error> for FoldFailure {
    /// A failure of the batch as a whole (begin, checkpoint, commit).
    fn from(error: sqlx::Error) -> Self {
        FoldFailure {
            event: None,
            error: error.into(),
        }
    }
}

/// Folds a batch into a serving generation. An event the projection cannot
/// fold stops it there: everything before it is kept and the failure is
/// recorded on the generation (which is retried later). Returns how many
/// events were folded. Failures that say nothing about the events (a lost
/// connection, contention, the checkpoint moved, the generation replaced by a
/// rebuild meanwhile) are returned for the caller to retry.
pub async fn fold_or_stop(
    db: &ReadDb,
    projection: &dyn Projection,
    generation: &Generation,
    events: &[RecordedEvent],
    advance: Advance<'_>,
    pause: Option<std::time::Duration>,
) -> Result<usize, FoldFailure> {
    let tables = generation.tables();
    let name = projection.name();
    let failure =
        match fold_batch_paced(db, projection, &tables, events, Some(advance), pause).await {
            Ok(()) => {
                record_folded(name, events);
                return Ok(events.len());
            }
            Err(failure) => failure,
        };
    let bad = match &failure {
        FoldFailure {
            event: Some(bad),
            error,
        } if !matches!(error, ProjectionError::Database(e) if is_transient(e)) => bad.clone(),
        _ => return Err(failure),
    };
    if !registry::is_serving(db, generation).await? {
        return Err(failure);
    }
    let good = &events[..events
        .iter()
        .take_while(|e| e.position < bad.position)
        .count()];
    let kept = Advance {
        to: bad.position - 1,
        ..advance
    };
    fold_batch(db, projection, &tables, good, Some(kept)).await?;
    record_folded(name, good);
    tracing::error!(projection = name, event_id = %bad.event_id, position = bad.position,
        error = %failure.error, "projection stopped at an event it cannot fold");
    metrics::counter!("crm_projection_failures_total", "projection" => name).increment(1);
    let event_id = bad.event_id.to_string();
    registry::record_failure(
        db,
        &generation.name,
        generation.generation,
        Some((event_id.as_str(), bad.position)),
        &failure.error.to_string(),
    )
    .await?;
    Ok(good.len())
}

/// Counts folded events and how long after their commit they were folded.
fn record_folded(projection: &'static str, events: &[RecordedEvent]) {
    metrics::counter!("crm_projection_events_total", "projection" => projection)
        .increment(events.len() as u64);
    let now = chrono::Utc::now();
    let delay = metrics::histogram!("crm_projection_delay_seconds", "projection" => projection);
    for event in events {
        let since_commit = now.signed_duration_since(event.recorded_at);
        delay.record(since_commit.to_std().unwrap_or_default().as_secs_f64());
    }
}

/// Helpers for read-model tests: events as the log would hold them.
pub mod testkit {
    use chrono::{DateTime, Utc};

    use super::{create_tables, fold_batch};
    use crate::projection::{Projection, Tables};
    use crate::readdb::ReadDb;
    use cqrs_es::DomainEvent;
    use crm_eventlog::RecordedEvent;
    use serde::Serialize;
    use serde_json::json;

    /// Folds `events` (in log order) into generation 1 of `projection`'s tables
    /// and, sorted stream by stream as a rebuild of a
    /// [`Projection::rebuild_by_stream`] projection reads the log, into
    /// generation 2, both in batches of 7; asserts that every table of the two
    /// holds the same rows.
    pub async fn assert_stream_order_folds_the_same(
        db: &ReadDb,
        projection: &dyn Projection,
        events: &[RecordedEvent],
    ) {
        assert!(projection.stream_local() && projection.rebuild_by_stream());
        let mut by_stream = events.to_vec();
        by_stream.sort_by(|a, b| {
            (&a.tenant_id, &a.stream_type, &a.stream_id, a.version).cmp(&(
                &b.tenant_id,
                &b.stream_type,
                &b.stream_id,
                b.version,
            ))
        });
        let positions = |events: &[RecordedEvent]| -> Vec<i64> {
            events.iter().map(|event| event.position).collect()
        };
        assert_ne!(
            positions(&by_stream),
            positions(events),
            "the events interleave their streams"
        );
        let mut generations = Vec::new();
        for (generation, events) in [(1, events), (2, &by_stream[..])] {
            let tables = Tables::new(projection.name(), generation);
            create_tables(db, projection, &tables).await.unwrap();
            for batch in events.chunks(7) {
                fold_batch(db, projection, &tables, batch, None)
                    .await
                    .unwrap_or_else(|f| panic!("fold failed: {:?}", f.error));
            }
            generations.push(tables);
        }
        let count = |sql: String| async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&db.pool)
                .await
                .unwrap()
        };
        for base in projection.table_names() {
            let (in_log_order, by_stream) = (generations[0].t(base), generations[1].t(base));
            let rows = count(format!("SELECT COUNT(*) FROM {in_log_order}")).await;
            assert!(rows > 0, "{base} has rows");
            for (a, b) in [(&in_log_order, &by_stream), (&by_stream, &in_log_order)] {
                let missing = count(format!(
                    "SELECT COUNT(*) FROM (SELECT * FROM {a} EXCEPT SELECT * FROM {b}) AS d"
                ))
                .await;
                assert_eq!(missing, 0, "rows of {a} not in {b}");
            }
        }
    }

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
