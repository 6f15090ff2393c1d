//! Rebuild: replay the whole log into a new generation of a projection's
//! tables while the serving generation keeps answering, then switch.

use crm_eventlog::{EventLog, RecordedEvent, StreamCursor};

use crate::fold::{fold_batch, Advance, FoldFailure};
use crate::projection::{Carried, Projection, Tables};
use crate::readdb::{ReadBackend, ReadDb};
use crate::rebuild_writer::{PendingRead, RebuildWriter, WriteError};
use crate::registry::{self, Generation};

/// Events per transaction during a rebuild.
const REBUILD_BATCH: i64 = 2000;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event log: {0}")]
    Log(#[from] crm_eventlog::LogError),
    #[error("rebuild writer: {0}")]
    Writer(#[from] WriteError),
    #[error("reading the log ahead stopped: {0}")]
    ReadAhead(#[from] tokio::task::JoinError),
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

/// The log's head, then up to a batch of events after `position` (the head
/// first: a batch short of full that reaches it means the log is replayed).
/// `retired`, a batch already folded, is freed first, off the fold's thread.
async fn read_ahead(
    log: EventLog,
    position: i64,
    batch: i64,
    retired: Vec<RecordedEvent>,
) -> Result<(i64, Vec<RecordedEvent>), RebuildError> {
    if !retired.is_empty() {
        tokio::task::spawn_blocking(move || drop(retired)).await?;
    }
    let head = log.head_position().await?;
    let events = log.read_all(position, batch).await?;
    Ok((head, events))
}

/// Replays the log from position 0 into a fresh generation and makes it the
/// serving one once caught up with the head. `progress(position, head)` is
/// called after every batch. Returns the new generation number.
pub async fn rebuild(
    log: &EventLog,
    db: &ReadDb,
    projection: &dyn Projection,
    progress: impl FnMut(i64, i64),
) -> Result<i64, RebuildError> {
    rebuild_in_batches(log, db, projection, REBUILD_BATCH, progress).await
}

/// [`rebuild`] folding `batch` events per transaction.
pub async fn rebuild_in_batches(
    log: &EventLog,
    db: &ReadDb,
    projection: &dyn Projection,
    batch: i64,
    mut progress: impl FnMut(i64, i64),
) -> Result<i64, RebuildError> {
    let batch = batch.max(1);
    registry::ensure(db).await?;
    let generation = registry::create_generation(
        db,
        projection,
        registry::BUILDING,
        registry::Indexes::AfterLoading,
    )
    .await?;
    let mut position = 0;
    if projection.rebuild_by_stream() && projection.stream_local() {
        position = fold_by_stream(log, db, projection, &generation, batch, &mut progress).await?;
    }
    fold_in_log_order(
        log,
        db,
        projection,
        &generation,
        position,
        batch,
        &mut progress,
    )
    .await?;
    registry::create_indexes(db, projection, &generation).await?;
    // The live runner continues from this generation's checkpoint after the switch.
    registry::activate(db, projection.name(), generation.generation).await?;
    Ok(generation.generation)
}

/// Folds the events after `position` in log order until a batch reaches the
/// log's head, moving the generation's checkpoint with every batch.
async fn fold_in_log_order(
    log: &EventLog,
    db: &ReadDb,
    projection: &dyn Projection,
    generation: &Generation,
    position: i64,
    batch: i64,
    progress: &mut impl FnMut(i64, i64),
) -> Result<(), RebuildError> {
    let mut writer = open_writer(db, projection)?;
    let folded = fold_batches(
        log,
        db,
        projection,
        generation,
        writer.as_mut(),
        position,
        batch,
        progress,
    )
    .await;
    let written = finish_writer(writer).await;
    let (position, head) = folded?;
    written?;
    progress(position, head);
    Ok(())
}

/// On SQLite, a projection that rebuilds to rows hands them to a writer of
/// its own.
fn open_writer(
    db: &ReadDb,
    projection: &dyn Projection,
) -> Result<Option<RebuildWriter>, RebuildError> {
    match &db.file {
        Some(file) if db.backend == ReadBackend::Sqlite && projection.rebuilds_to_rows() => Ok(
            Some(RebuildWriter::open(file, projection.rebuild_reads_back())?),
        ),
        _ => Ok(None),
    }
}

/// Waits until every batch handed over to `writer` is committed (or has
/// failed): called whether the fold failed or not, so no write lands after
/// the rebuild stopped.
async fn finish_writer(writer: Option<RebuildWriter>) -> Result<(), WriteError> {
    match writer {
        Some(writer) => writer.finish().await,
        None => Ok(()),
    }
}

/// The loop of [`fold_in_log_order`]: folds (or hands to `writer`) batch
/// after batch; returns the last position and the head it reached.
///
/// The log is read two batches ahead: while batch N folds, batch N+1 is
/// already read, and with a writer its lookup rows are asked for before batch
/// N's rows are handed over, so the writer reads them after writing batch
/// N-1 (what batch N changes, the projection carries) and they are there when
/// N+1 folds.
#[allow(clippy::too_many_arguments)]
async fn fold_batches(
    log: &EventLog,
    db: &ReadDb,
    projection: &dyn Projection,
    generation: &Generation,
    mut writer: Option<&mut RebuildWriter>,
    mut position: i64,
    batch: i64,
    progress: &mut impl FnMut(i64, i64),
) -> Result<(i64, i64), RebuildError> {
    let tables = generation.tables();
    let mut carried = None;
    let (mut head, mut events) = read_ahead(log.clone(), position, batch, Vec::new()).await?;
    let mut reads = match writer.as_deref_mut() {
        Some(writer) => ask_reads(writer, projection, &tables, &events).await?,
        None => None,
    };
    let mut next = tokio::spawn(read_ahead(
        log.clone(),
        last_of(&events, position),
        batch,
        Vec::new(),
    ));
    let mut retired = Vec::new();
    loop {
        let full = events.len() as i64 == batch;
        let last = last_of(&events, position);
        let (next_head, next_events) = next.await??;
        // The batch after the next one is read (and decoded, on another
        // thread) while this one folds, instead of between two folds.
        next = tokio::spawn(read_ahead(
            log.clone(),
            last_of(&next_events, last),
            batch,
            std::mem::take(&mut retired),
        ));
        let advance = (!events.is_empty()).then(|| Advance {
            name: &generation.name,
            generation: generation.generation,
            part: None,
            from: position,
            to: last,
        });
        let folded = match writer.as_deref_mut() {
            Some(writer) => {
                let next_reads = ask_reads(writer, projection, &tables, &next_events).await;
                let batch = Batch {
                    tables: &tables,
                    events: &events,
                    advance,
                };
                let folded =
                    hand_over(db, writer, projection, batch, reads.take(), &mut carried).await;
                folded.and_then(|()| next_reads.map(|next_reads| reads = next_reads))
            }
            None => fold_batch(db, projection, &tables, &events, advance)
                .await
                .map_err(|failure| fold_failed(projection, failure)),
        };
        if let Err(error) = folded {
            next.abort();
            return Err(error);
        }
        position = last;
        if !full && position >= head {
            next.abort();
            return Ok((position, head.max(position)));
        }
        progress(position, head.max(position));
        head = next_head;
        retired = std::mem::replace(&mut events, next_events);
    }
}

/// The last position of `events`, or `position` when there are none.
fn last_of(events: &[RecordedEvent], position: i64) -> i64 {
    events.last().map_or(position, |last| last.position)
}

/// Asks `writer` for the lookup rows `events` will need when they fold, if
/// the projection names any.
async fn ask_reads(
    writer: &mut RebuildWriter,
    projection: &dyn Projection,
    tables: &Tables,
    events: &[RecordedEvent],
) -> Result<Option<PendingRead>, RebuildError> {
    let wanted = projection.rebuild_reads(events);
    if wanted.iter().all(|(_, keys)| keys.is_empty()) {
        return Ok(None);
    }
    Ok(Some(writer.read(tables, wanted).await?))
}

/// One batch of a rebuild: its events, the tables they go to and where the
/// checkpoint moves.
struct Batch<'a> {
    tables: &'a Tables,
    events: &'a [RecordedEvent],
    advance: Option<Advance<'a>>,
}

/// Makes a batch's rows (with the lookup rows read for it) and hands them to
/// `writer` with the checkpoint move.
async fn hand_over(
    db: &ReadDb,
    writer: &mut RebuildWriter,
    projection: &dyn Projection,
    batch: Batch<'_>,
    reads: Option<PendingRead>,
    carried: &mut Carried,
) -> Result<(), RebuildError> {
    let read = match reads {
        Some(reads) => reads.await.map_err(|_| WriteError::Stopped)??,
        None => Vec::new(),
    };
    // What the fold reads must be committed, but for the batch before this
    // one, whose changes the projection carries.
    if projection.rebuild_reads_back() {
        writer.settle().await?;
    }
    let mut conn = db.pool.acquire().await?;
    let rows = projection
        .rebuild_rows(&mut conn, batch.tables, batch.events, read, carried)
        .await;
    drop(conn);
    let rows = match rows {
        Ok(rows) => rows,
        Err(failure) => {
            let event = failure
                .index
                .and_then(|index| batch.events.get(index))
                .cloned();
            let failure = FoldFailure {
                event,
                error: failure.error,
            };
            return Err(fold_failed(projection, failure));
        }
    };
    Ok(writer.write(rows, batch.advance).await?)
}

/// Folds every event up to the log's current head stream by stream (see
/// [`Projection::rebuild_by_stream`]), then moves the generation's checkpoint
/// to that head and returns it. Out of log order across streams, which a
/// stream-local projection allows; the checkpoint moves only at the end, as
/// no position before the head is folded completely until then.
async fn fold_by_stream(
    log: &EventLog,
    db: &ReadDb,
    projection: &dyn Projection,
    generation: &Generation,
    batch: i64,
    progress: &mut impl FnMut(i64, i64),
) -> Result<i64, RebuildError> {
    let tables = generation.tables();
    let up_to = log.head_position().await?;
    let mut writer = open_writer(db, projection)?;
    let folded = fold_streams(
        log,
        db,
        projection,
        &tables,
        writer.as_mut(),
        up_to,
        batch,
        progress,
    )
    .await;
    let written = finish_writer(writer).await;
    folded?;
    written?;
    if up_to > 0 {
        let advance = Advance {
            name: &generation.name,
            generation: generation.generation,
            part: None,
            from: 0,
            to: up_to,
        };
        fold_batch(db, projection, &tables, &[], Some(advance))
            .await
            .map_err(|failure| fold_failed(projection, failure))?;
    }
    Ok(up_to)
}

/// The loop of [`fold_by_stream`]: folds (or hands to `writer`) the events
/// up to `up_to` batch after batch in stream order, the next batch read
/// while one folds.
#[allow(clippy::too_many_arguments)]
async fn fold_streams(
    log: &EventLog,
    db: &ReadDb,
    projection: &dyn Projection,
    tables: &Tables,
    mut writer: Option<&mut RebuildWriter>,
    up_to: i64,
    batch: i64,
    progress: &mut impl FnMut(i64, i64),
) -> Result<(), RebuildError> {
    let read = |after: Option<StreamCursor>| {
        let log = log.clone();
        async move { log.read_by_stream(up_to, after.as_ref(), batch).await }
    };
    let mut carried = None;
    let mut events = read(None).await?;
    let mut folded = 0;
    loop {
        let next = (events.len() as i64 == batch)
            .then(|| tokio::spawn(read(events.last().map(StreamCursor::after))));
        let done = match writer.as_deref_mut() {
            Some(writer) => {
                let batch = Batch {
                    tables,
                    events: &events,
                    advance: None,
                };
                hand_over(db, writer, projection, batch, None, &mut carried).await
            }
            None => fold_batch(db, projection, tables, &events, None)
                .await
                .map_err(|failure| fold_failed(projection, failure)),
        };
        if let Err(error) = done {
            if let Some(next) = next {
                next.abort();
            }
            return Err(error);
        }
        folded += events.len() as i64;
        progress(folded.min(up_to), up_to);
        match next {
            Some(next) => events = next.await??,
            None => return Ok(()),
        }
    }
}

fn fold_failed(projection: &dyn Projection, failure: FoldFailure) -> RebuildError {
    let (event_id, position) = failure
        .event
        .as_ref()
        .map(|event| (event.event_id.to_string(), event.position))
        .unwrap_or_default();
    RebuildError::Fold {
        projection: projection.name().to_string(),
        event_id,
        position,
        error: failure.error.to_string(),
    }
}
