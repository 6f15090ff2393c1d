//! The runner and rebuild over a real log and read DB (SQLite and PostgreSQL):
//! every event folded exactly once, a failing projection stops at its event
//! while the others go on, and a rebuild switches generations.

use std::sync::Arc;
use std::time::Duration;

use crm_eventlog::testing::PgTestDb;
use crm_eventlog::{AppendBatch, EventLog, ExpectedVersion, NewEvent, RecordedEvent, StreamAppend};
use crm_projection_service::lookups::ReadRows;
use crm_projection_service::projection::{
    apply_as_batch, BatchError, Carried, Projection, ProjectionError, Tables, Tx,
};
use crm_projection_service::readdb::{ReadBackend, ReadDb};
use crm_projection_service::registry;
use crm_projection_service::rows::{Field, Kind, RowSet};
use crm_projection_service::runner::{Runner, RunnerSettings};
use serde_json::json;
use sqlx::Row;

/// Inserts one row per event, numbered in the order it was folded; the
/// primary key makes a double fold an error.
#[derive(Default)]
struct Tally {
    name: &'static str,
    refuse_poison: bool,
    /// Claims to be keyed by stream (a rebuild then reads stream by stream).
    by_stream: bool,
    folds: std::sync::atomic::AtomicI64,
}

#[async_trait::async_trait]
impl Projection for Tally {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> i64 {
        1
    }
    fn schema(&self, tables: &Tables) -> Vec<String> {
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (position BIGINT PRIMARY KEY, stream_id TEXT NOT NULL, \
                 fold BIGINT NOT NULL)",
                tables.t("seen")
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {} (stream_id)",
                tables.t("seen_stream_ix"),
                tables.t("seen")
            ),
        ]
    }
    fn table_names(&self) -> Vec<&'static str> {
        vec!["seen"]
    }
    fn stream_local(&self) -> bool {
        self.by_stream
    }
    fn rebuild_by_stream(&self) -> bool {
        self.by_stream
    }
    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        if self.refuse_poison && event.payload["poison"] == json!(true) {
            return Err(ProjectionError::Invalid("poisoned event".into()));
        }
        let fold = self
            .folds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        sqlx::query(&format!(
            "INSERT INTO {} (position, stream_id, fold) VALUES ($1, $2, $3)",
            tables.t("seen")
        ))
        .bind(event.position)
        .bind(event.stream_id.clone())
        .bind(fold)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

async fn append(log: &EventLog, stream: &str, payload: serde_json::Value) -> i64 {
    let batch = AppendBatch {
        tenant_id: "default".into(),
        streams: vec![StreamAppend {
            stream_type: "account".into(),
            stream_id: stream.into(),
            expected_version: ExpectedVersion::Any,
            events: vec![NewEvent {
                event_id: uuid::Uuid::now_v7(),
                event_type: "Test".into(),
                schema_version: 1,
                payload,
                metadata: json!({}),
            }],
        }],
        idempotency: None,
    };
    match log.append(batch).await.unwrap() {
        crm_eventlog::AppendOutcome::Committed(committed) => committed.last_position,
        other => panic!("{other:?}"),
    }
}

async fn seen(db: &ReadDb, tables: &Tables) -> Vec<i64> {
    sqlx::query(&format!(
        "SELECT position FROM {} ORDER BY position",
        tables.t("seen")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .iter()
    .map(|row| row.get::<i64, _>("position"))
    .collect()
}

/// The rows of a query of a text and a number column.
async fn text_number_rows(db: &ReadDb, sql: &str) -> Vec<(String, i64)> {
    sqlx::query(sql)
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Whether the read-model database has an index of that name.
async fn index_exists(db: &ReadDb, name: &str) -> bool {
    let sql = match db.backend {
        ReadBackend::Sqlite => {
            "SELECT 1 AS found FROM sqlite_master WHERE type = 'index' AND name = $1"
        }
        ReadBackend::Postgres => "SELECT 1 AS found FROM pg_indexes WHERE indexname = $1",
    };
    sqlx::query(sql)
        .bind(name.to_string())
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .is_some()
}

async fn wait_for_checkpoint(db: &ReadDb, name: &str, position: i64) -> registry::Generation {
    for _ in 0..500 {
        if let Some(generation) = registry::active(db, name).await.unwrap() {
            if generation.checkpoint >= position || generation.is_failed() {
                return generation;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} never reached {position}");
}

async fn scenario(log: EventLog, db: ReadDb) {
    let healthy: Arc<dyn Projection> = Arc::new(Tally {
        name: "tally",
        refuse_poison: false,
        ..Tally::default()
    });
    let picky: Arc<dyn Projection> = Arc::new(Tally {
        name: "picky",
        refuse_poison: true,
        ..Tally::default()
    });
    let settings = RunnerSettings {
        batch_size: 7,
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let runner = Runner::new(
        log.clone(),
        db.clone(),
        vec![healthy.clone(), picky.clone()],
        settings,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    runner.install().await.unwrap();
    let task = tokio::spawn(runner.run(stopped));

    let mut positions = Vec::new();
    for i in 0..40 {
        positions.push(append(&log, &format!("s{}", i % 5), json!({"n": i})).await);
    }
    let poison = append(&log, "s-bad", json!({"poison": true})).await;
    for i in 0..10 {
        positions.push(append(&log, "after", json!({"n": i})).await);
    }
    let head = log.head_position().await.unwrap();

    let tally = wait_for_checkpoint(&db, "tally", head).await;
    assert!(!tally.is_failed());
    let mut all = positions.clone();
    all.push(poison);
    all.sort();
    assert_eq!(
        seen(&db, &tally.tables()).await,
        all,
        "every event exactly once, in order"
    );

    let picky_state = wait_for_checkpoint(&db, "picky", head).await;
    assert!(picky_state.is_failed(), "{picky_state:?}");
    assert_eq!(picky_state.failed_position, Some(poison));
    assert_eq!(
        picky_state.checkpoint,
        poison - 1,
        "stopped right before the bad event"
    );
    assert!(picky_state.error.as_deref().unwrap().contains("poisoned"));
    let before_poison: Vec<i64> = positions.iter().copied().filter(|p| *p < poison).collect();
    assert_eq!(seen(&db, &picky_state.tables()).await, before_poison);

    // A rebuild of the healthy projection lands in a new generation with the same rows.
    let old = tally.tables();
    let generation =
        crm_projection_service::rebuild::rebuild(&log, &db, healthy.as_ref(), |_, _| {})
            .await
            .unwrap();
    let rebuilt = registry::active(&db, "tally").await.unwrap().unwrap();
    assert_eq!(rebuilt.generation, generation);
    assert!(generation > tally.generation);
    assert_eq!(seen(&db, &rebuilt.tables()).await, all);
    // Its secondary indexes are made after the rows are loaded, before the switch.
    assert!(index_exists(&db, &tally.tables().t("seen_stream_ix")).await);
    assert!(index_exists(&db, &rebuilt.tables().t("seen_stream_ix")).await);
    // In batches smaller than the log: each batch folds while the next is read.
    let mut reported = Vec::new();
    let in_batches = crm_projection_service::rebuild::rebuild_in_batches(
        &log,
        &db,
        healthy.as_ref(),
        7,
        |position, _| reported.push(position),
    )
    .await
    .unwrap();
    assert!(in_batches > generation);
    let rebuilt = registry::active(&db, "tally").await.unwrap().unwrap();
    assert_eq!(rebuilt.generation, in_batches);
    assert_eq!(rebuilt.checkpoint, head);
    assert_eq!(seen(&db, &rebuilt.tables()).await, all);
    assert_eq!(reported.len(), all.len().div_ceil(7), "{reported:?}");
    assert!(reported.is_sorted() && reported.last() == Some(&head));
    let generation = in_batches;
    let extra = append(&log, "later", json!({"n": 99})).await;
    let followed = wait_for_checkpoint(&db, "tally", extra).await;
    assert_eq!(
        followed.generation, generation,
        "the runner follows the new generation"
    );
    assert_eq!(seen(&db, &followed.tables()).await.last(), Some(&extra));
    // The retired generation's tables outlive the switch by a grace period
    // (queries that found it serving still read it), then the runner drops them.
    sqlx::query(&format!("SELECT COUNT(*) AS n FROM {}", old.t("seen")))
        .fetch_one(&db.pool)
        .await
        .expect("a just-retired generation keeps its tables");
    let retired_long_ago = crm_projection_service::readdb::timestamp(
        &(chrono::Utc::now()
            - chrono::Duration::from_std(registry::RETIRED_GRACE).unwrap()
            - chrono::Duration::seconds(1)),
    );
    sqlx::query("UPDATE rm_projections SET updated_at = $1 WHERE name = $2 AND generation = $3")
        .bind(retired_long_ago)
        .bind("tally")
        .bind(tally.generation)
        .execute(&db.pool)
        .await
        .unwrap();
    for _ in 0..100 {
        if sqlx::query(&format!("SELECT COUNT(*) AS n FROM {}", old.t("seen")))
            .fetch_one(&db.pool)
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sqlx::query(&format!("SELECT COUNT(*) AS n FROM {}", old.t("seen")))
            .fetch_one(&db.pool)
            .await
            .is_err()
    );

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}

/// Runs `body` on a log and a read-model database in SQLite files.
async fn on_sqlite<F, Fut>(body: F)
where
    F: FnOnce(EventLog, ReadDb) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
        .await
        .unwrap();
    body(log, db).await;
}

/// Runs `body` on a log and read models in a fresh PostgreSQL database.
async fn on_postgres<F, Fut>(body: F)
where
    F: FnOnce(EventLog, ReadDb) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(pg) = PgTestDb::create().await else {
        return;
    };
    let log = EventLog::connect(&pg.url).await.unwrap();
    let db = ReadDb::connect(&pg.url).await.unwrap();
    body(log.clone(), db.clone()).await;
    db.pool.close().await;
    log.close().await;
    pg.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_on_sqlite() {
    on_sqlite(scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_on_postgres() {
    on_postgres(scenario).await;
}

/// Two workers that both believe they own a range: the second commit finds
/// the checkpoint moved and writes nothing (generation and partition
/// checkpoints alike), so a handover can never fold a range twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_checkpoint_commits_nothing() {
    use crm_projection_service::fold::{fold_batch, Advance, FoldFailure};
    use crm_projection_service::partition;

    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
        .await
        .unwrap();
    for n in 0..4 {
        append(&log, &format!("s{n}"), json!({"n": n})).await;
    }
    let events = log.read_all(0, 10).await.unwrap();
    let tally = Tally {
        name: "tally",
        ..Tally::default()
    };
    registry::ensure(&db).await.unwrap();
    let generation =
        registry::create_generation(&db, &tally, registry::ACTIVE, registry::Indexes::Now)
            .await
            .unwrap();
    let tables = generation.tables();
    let advance = |part, from, to| Advance {
        name: "tally",
        generation: generation.generation,
        part,
        from,
        to,
    };
    let stale = |result: Result<(), FoldFailure>| {
        matches!(
            result,
            Err(FoldFailure {
                error: ProjectionError::CheckpointMoved { expected: 0, .. },
                ..
            })
        )
    };

    fold_batch(
        &db,
        &tally,
        &tables,
        &events[..2],
        Some(advance(None, 0, 2)),
    )
    .await
    .unwrap();
    // The same range again, by a worker that read the checkpoint before: refused.
    let again = fold_batch(
        &db,
        &tally,
        &tables,
        &events[..2],
        Some(advance(None, 0, 2)),
    )
    .await;
    assert!(stale(again), "a second commit of 0..2 is refused");
    assert_eq!(seen(&db, &tables).await, [1, 2]);
    assert_eq!(
        registry::active(&db, "tally")
            .await
            .unwrap()
            .unwrap()
            .checkpoint,
        2
    );

    // Partitions: each partition's checkpoint is compared, and the
    // generation serves the lowest of them.
    partition::split(&db, "tally", generation.generation, 2, 2)
        .await
        .unwrap();
    fold_batch(
        &db,
        &tally,
        &tables,
        &events[2..3],
        Some(advance(Some(0), 2, 4)),
    )
    .await
    .unwrap();
    let again = fold_batch(
        &db,
        &tally,
        &tables,
        &events[2..3],
        Some(advance(Some(0), 2, 4)),
    )
    .await;
    assert!(
        matches!(
            &again,
            Err(FoldFailure {
                error: ProjectionError::CheckpointMoved { expected: 2, .. },
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(seen(&db, &tables).await, [1, 2, 3]);
    let serving = registry::active(&db, "tally").await.unwrap().unwrap();
    assert_eq!(serving.checkpoint, 2, "partition 1 is still at 2");
    fold_batch(
        &db,
        &tally,
        &tables,
        &events[3..4],
        Some(advance(Some(1), 2, 4)),
    )
    .await
    .unwrap();
    let serving = registry::active(&db, "tally").await.unwrap().unwrap();
    assert_eq!(serving.checkpoint, 4, "both partitions at 4");
    assert_eq!(seen(&db, &tables).await, [1, 2, 3, 4]);
}

/// A projection keyed by stream is rebuilt from the log read stream by stream:
/// each stream's events folded together, every event once, the checkpoint at
/// the head it read up to.
async fn rebuild_by_stream(log: EventLog, db: ReadDb) {
    for n in 0..9 {
        append(&log, &format!("s{}", n % 3), json!({"n": n})).await;
    }
    let head = log.head_position().await.unwrap();
    let tally = Tally {
        name: "by_stream",
        by_stream: true,
        ..Tally::default()
    };
    let mut reported = Vec::new();
    let generation = crm_projection_service::rebuild::rebuild_in_batches(
        &log,
        &db,
        &tally,
        2,
        |position, head| reported.push((position, head)),
    )
    .await
    .unwrap();
    let rebuilt = registry::active(&db, "by_stream").await.unwrap().unwrap();
    assert_eq!(rebuilt.generation, generation);
    assert_eq!(rebuilt.checkpoint, head);
    assert_eq!(
        seen(&db, &rebuilt.tables()).await,
        (1..=head).collect::<Vec<_>>()
    );
    let folded = text_number_rows(
        &db,
        &format!(
            "SELECT stream_id, position FROM {} ORDER BY fold",
            rebuilt.tables().t("seen")
        ),
    )
    .await;
    let mut by_stream = folded.clone();
    by_stream.sort();
    assert_eq!(
        folded, by_stream,
        "each stream's events folded together, in order"
    );
    assert_eq!(reported.last(), Some(&(head, head)));
    assert!(index_exists(&db, &rebuilt.tables().t("seen_stream_ix")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_by_stream_on_sqlite() {
    on_sqlite(rebuild_by_stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_by_stream_on_postgres() {
    on_postgres(rebuild_by_stream).await;
}

/// Inserts a row per event made from the event alone
/// ([`Projection::rebuild_rows`]), its `note` NULL unless the payload has one.
/// With `rows_only` its own fold through sqlx refuses every batch: a rebuild
/// that succeeds then went through the rebuild writer.
struct Noted {
    rows_only: bool,
}

static NOTED_ROW: [(&str, Kind); 3] = [
    ("position", Kind::Int),
    ("stream_id", Kind::Text),
    ("note", Kind::Text),
];

impl Noted {
    fn rows(&self, tables: &Tables, events: &[RecordedEvent]) -> Result<Vec<RowSet>, BatchError> {
        let mut rows = RowSet::new(
            tables.t("seen"),
            &NOTED_ROW,
            "ON CONFLICT (position) DO NOTHING".into(),
            50,
        );
        for (index, event) in events.iter().enumerate() {
            if event.payload["poison"] == json!(true) {
                return Err(BatchError::at(index)(ProjectionError::Invalid(
                    "poisoned event".into(),
                )));
            }
            rows.push([
                Field::Int(event.position),
                Field::Text(&event.stream_id),
                event.payload["note"].as_str().into(),
            ]);
        }
        Ok(vec![rows])
    }
}

#[async_trait::async_trait]
impl Projection for Noted {
    fn name(&self) -> &'static str {
        "noted"
    }
    fn version(&self) -> i64 {
        1
    }
    fn schema(&self, tables: &Tables) -> Vec<String> {
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (position BIGINT PRIMARY KEY, stream_id TEXT NOT NULL, note TEXT)",
                tables.t("seen")
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {} (stream_id)",
                tables.t("seen_stream_ix"),
                tables.t("seen")
            ),
        ]
    }
    fn table_names(&self) -> Vec<&'static str> {
        vec!["seen"]
    }
    fn rebuilds_to_rows(&self) -> bool {
        true
    }
    async fn rebuild_rows(
        &self,
        _conn: &mut sqlx::AnyConnection,
        tables: &Tables,
        events: &[RecordedEvent],
        _read: Vec<ReadRows>,
        _carried: &mut Carried,
    ) -> Result<Vec<RowSet>, BatchError> {
        self.rows(tables, events)
    }
    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        apply_as_batch(self, tx, tables, event).await
    }
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        if self.rows_only {
            return Err(BatchError::whole_batch(ProjectionError::Invalid(
                "folded through sqlx".into(),
            )));
        }
        for rows in self.rows(tables, events)? {
            rows.write(tx).await.map_err(BatchError::whole_batch)?;
        }
        Ok(())
    }
}

/// A projection whose rows are made from the events alone is rebuilt
/// through the rebuild writer on SQLite (through its own fold on
/// PostgreSQL): every event once, NULLs kept, the checkpoint at the head,
/// the indexes made; an event it cannot fold stops the rebuild there with
/// the batches before it committed and nothing after.
async fn rebuild_through_rows(log: EventLog, db: ReadDb) {
    let noted = Noted {
        rows_only: db.backend == ReadBackend::Sqlite,
    };
    for n in 0..9 {
        let payload = match n % 3 {
            0 => json!({"n": n, "note": format!("note {n}")}),
            _ => json!({"n": n}),
        };
        append(&log, &format!("s{}", n % 2), payload).await;
    }
    let head = log.head_position().await.unwrap();
    let mut reported = Vec::new();
    let generation = crm_projection_service::rebuild::rebuild_in_batches(
        &log,
        &db,
        &noted,
        2,
        |position, head| reported.push((position, head)),
    )
    .await
    .unwrap();
    let rebuilt = registry::active(&db, "noted").await.unwrap().unwrap();
    assert_eq!(rebuilt.generation, generation);
    assert_eq!(rebuilt.checkpoint, head);
    let tables = rebuilt.tables();
    assert_eq!(seen(&db, &tables).await, (1..=head).collect::<Vec<_>>());
    let notes: Vec<Option<String>> = sqlx::query(&format!(
        "SELECT note FROM {} ORDER BY position",
        tables.t("seen")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .iter()
    .map(|row| row.get("note"))
    .collect();
    let expected: Vec<Option<String>> = (0..9)
        .map(|n| (n % 3 == 0).then(|| format!("note {n}")))
        .collect();
    assert_eq!(notes, expected);
    assert_eq!(reported.last(), Some(&(head, head)));
    assert!(index_exists(&db, &tables.t("seen_stream_ix")).await);

    // Positions head+1 .. head+3 fine, head+4 poisoned, in batches of two.
    for n in 0..5 {
        append(&log, "s9", json!({"poison": n == 3})).await;
    }
    let failed =
        crm_projection_service::rebuild::rebuild_in_batches(&log, &db, &noted, 2, |_, _| {})
            .await
            .unwrap_err();
    match &failed {
        crm_projection_service::rebuild::RebuildError::Fold { position, .. } => {
            assert_eq!(*position, head + 4, "{failed}")
        }
        other => panic!("{other}"),
    }
    let building = registry::all(&db)
        .await
        .unwrap()
        .into_iter()
        .filter(|g| g.name == "noted")
        .max_by_key(|g| g.generation)
        .unwrap();
    assert_eq!(building.state, registry::BUILDING);
    // Batches of two from position 1: the poisoned event's batch is not
    // written, the ones before it are.
    let committed = (head + 4 - 1) / 2 * 2;
    assert_eq!(building.checkpoint, committed);
    assert_eq!(
        seen(&db, &building.tables()).await,
        (1..=committed).collect::<Vec<_>>()
    );
    assert_eq!(
        registry::active(&db, "noted")
            .await
            .unwrap()
            .unwrap()
            .generation,
        generation
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_through_rows_on_sqlite() {
    on_sqlite(rebuild_through_rows).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_through_rows_on_postgres() {
    on_postgres(rebuild_through_rows).await;
}

/// Notes, per folded event, the commit mode and server process of the
/// transaction folding it.
struct CommitMode;

#[async_trait::async_trait]
impl Projection for CommitMode {
    fn name(&self) -> &'static str {
        "commit_mode"
    }
    fn version(&self) -> i64 {
        1
    }
    fn schema(&self, tables: &Tables) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} (position BIGINT PRIMARY KEY, mode TEXT NOT NULL, \
             backend BIGINT NOT NULL)",
            tables.t("modes")
        )]
    }
    fn table_names(&self) -> Vec<&'static str> {
        vec!["modes"]
    }
    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        sqlx::query(&format!(
            "INSERT INTO {} (position, mode, backend) \
             SELECT $1, current_setting('synchronous_commit'), pg_backend_pid()",
            tables.t("modes")
        ))
        .bind(event.position)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Folds on PostgreSQL commit without waiting for the WAL flush, and only
/// they: the connection's later transactions (registry changes) wait again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folds_on_postgres_commit_without_waiting_for_the_flush() {
    use crm_projection_service::fold::{fold_batch, Advance};
    on_postgres(|log, db| async move {
        // One connection: the check after the fold runs on the fold's own
        // (a pool returns a connection on a task of its own, so a larger one
        // could hand out another).
        let db = ReadDb {
            pool: sqlx::any::AnyPoolOptions::new()
                .max_connections(1)
                .connect(&db.url)
                .await
                .unwrap(),
            ..db
        };
        for n in 0..3 {
            append(&log, &format!("s{n}"), json!({"n": n})).await;
        }
        let events = log.read_all(0, 10).await.unwrap();
        registry::ensure(&db).await.unwrap();
        let generation =
            registry::create_generation(&db, &CommitMode, registry::ACTIVE, registry::Indexes::Now)
                .await
                .unwrap();
        let advance = Advance {
            name: "commit_mode",
            generation: generation.generation,
            part: None,
            from: 0,
            to: events.last().unwrap().position,
        };
        fold_batch(
            &db,
            &CommitMode,
            &generation.tables(),
            &events,
            Some(advance),
        )
        .await
        .unwrap_or_else(|failure| panic!("fold failed: {:?}", failure.error));
        let folded = text_number_rows(
            &db,
            &format!(
                "SELECT mode, backend FROM {} ORDER BY position",
                generation.tables().t("modes")
            ),
        )
        .await;
        assert_eq!(folded.len(), 3);
        assert!(folded.iter().all(|(mode, _)| mode == "off"), "{folded:?}");
        // The same connection is back to waiting for the flush.
        let mut tx = db.begin_write().await.unwrap();
        let (mode, backend): (String, i64) = sqlx::query_as(
            "SELECT current_setting('synchronous_commit'), CAST(pg_backend_pid() AS BIGINT)",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(backend, folded[0].1, "the fold's connection");
        assert_eq!(mode, "on");
        db.pool.close().await;
    })
    .await;
}
