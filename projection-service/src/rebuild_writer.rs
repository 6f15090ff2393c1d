//! A rebuild's writer on the embedded store: a thread of its own with a
//! synchronous SQLite connection (rusqlite) that writes each batch's rows and
//! moves the new generation's checkpoint in one transaction, while the fold
//! makes the next batch's rows.
//!
//! Why: through sqlx every statement is handed to the connection's worker
//! thread and awaited, so a rebuild's fold and SQLite took turns on about one
//! of the two CPUs (bench/README.md, cause 4). Here the rows of a batch go
//! over in one hand-off, are written with one prepared statement per table,
//! and the fold goes on meanwhile, for projections that rebuild to rows
//! ([`crate::projection::Projection::rebuild_rows`]). A fold that reads rows
//! back reads what is committed: before each batch the writer is
//! [`settle`](RebuildWriter::settle)d to at most the batch before it in flight,
//! whose changes the projection carries itself (a fold that only writes runs
//! up to a few batches ahead). The lookup rows a batch names
//! are read here too ([`RebuildWriter::read`]), queued before the batch ahead
//! of it is handed over, so they are read while that one folds.

use std::collections::VecDeque;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::fold::{Advance, CLAIM_CHECKPOINT};
use crate::lookups::{Cell, Kind, ReadRows, Row, Wanted};
use crate::projection::Tables;
use crate::readdb::{timestamp, BUSY_TIMEOUT_MS, WAL_CHECKPOINT_PAGES};
use crate::rows::{Field, RowSet};
use crate::wal_checkpointer::WalCheckpointer;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("read-model database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("checkpoint of {name} moved away from {expected}: another writer folded this range")]
    CheckpointMoved { name: String, expected: i64 },
    #[error("the rebuild's writer thread stopped")]
    Stopped,
}

/// Where a written batch moves the generation's checkpoint.
struct Checkpoint {
    name: String,
    generation: i64,
    from: i64,
    to: i64,
}

/// What the writer's thread is asked to do, in the order asked.
enum Job {
    Write {
        rows: Vec<RowSet>,
        checkpoint: Option<Checkpoint>,
        done: oneshot::Sender<Written>,
    },
    /// Lookup rows read on the writer's connection: they see every batch
    /// handed over before the read (committed, or failed and rolled back).
    Read {
        tables: Tables,
        wanted: Wanted,
        done: oneshot::Sender<Result<Vec<ReadRows>, WriteError>>,
    },
}

/// Lookup rows asked for with [`RebuildWriter::read`], to come.
pub type PendingRead = oneshot::Receiver<Result<Vec<ReadRows>, WriteError>>;

/// A batch's outcome, and its rows handed back to the fold's thread, which
/// made them, to be freed there: measured with glibc's malloc (`crm` built
/// without jemalloc), which frees a block into the arena of the thread that
/// allocated it, under that arena's lock. A batch's rows are a few buffers
/// since [`RowSet`] holds its text in one.
type Written = (Result<(), WriteError>, Vec<RowSet>);

/// The writer thread and the batches handed to it.
pub struct RebuildWriter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: VecDeque<oneshot::Receiver<Written>>,
    max_in_flight: usize,
}

/// Batches in flight at most for a fold that reads back what the batch
/// before the one before wrote: [`RebuildWriter::settle`] leaves one.
const READING_BACK_IN_FLIGHT: usize = 2;

/// Batches in flight at most for a fold that only writes: a few batches of
/// rows (about 2 MB each for the audit trail's 2,000 events).
const WRITE_ONLY_IN_FLIGHT: usize = 4;

impl RebuildWriter {
    /// Opens a connection on the read-model file and starts the thread.
    /// `reads_back`: the fold reads what earlier batches wrote
    /// ([`crate::projection::Projection::rebuild_reads_back`]), so at most
    /// two batches are in flight (the one being written and the one handed
    /// over after it); otherwise up to [`WRITE_ONLY_IN_FLIGHT`], so the
    /// writer has the next batch at hand whenever one fold runs long.
    pub fn open(file: &Path, reads_back: bool) -> Result<Self, WriteError> {
        Self::start(file, reads_back, i64::from(WAL_CHECKPOINT_PAGES))
    }

    /// [`open`](Self::open), the WAL started over once it holds
    /// `restart_wal_at_pages` ([`WalCheckpointer`]).
    fn start(file: &Path, reads_back: bool, restart_wal_at_pages: i64) -> Result<Self, WriteError> {
        // The writer's commits never checkpoint: the checkpointer's thread does.
        let connection = connect(file, 0)?;
        let checkpointer = WalCheckpointer::start(connect(file, 0)?, restart_wal_at_pages)
            .map_err(|_| WriteError::Stopped)?;
        let max_in_flight = if reads_back {
            READING_BACK_IN_FLIGHT
        } else {
            WRITE_ONLY_IN_FLIGHT
        };
        // Room for the batches in flight and two reads.
        let (jobs, mut queue) = mpsc::channel::<Job>(max_in_flight + 2);
        let thread = std::thread::Builder::new()
            .name("crm-rebuild-writer".into())
            .spawn(move || {
                let mut connection = connection;
                while let Some(job) = queue.blocking_recv() {
                    match job {
                        Job::Write {
                            rows,
                            checkpoint,
                            done,
                        } => {
                            let written = write(&mut connection, &rows, checkpoint.as_ref());
                            if written.is_ok() {
                                checkpointer.committed(&connection);
                            }
                            let _ = done.send((written, rows));
                        }
                        Job::Read {
                            tables,
                            wanted,
                            done,
                        } => {
                            let _ = done.send(read(&mut connection, &tables, wanted));
                        }
                    }
                }
            })
            .map_err(|_| WriteError::Stopped)?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            in_flight: VecDeque::new(),
            max_in_flight,
        })
    }

    /// Waits until every batch handed over but the last is committed; a
    /// failure of one is returned here or by [`finish`](Self::finish) (later
    /// batches then fail too: their checkpoint claims find it unmoved).
    pub async fn settle(&mut self) -> Result<(), WriteError> {
        while self.in_flight.len() > 1 {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    /// Hands over a batch's rows and the checkpoint move they complete, once
    /// fewer than the writer's most batches are in flight.
    pub async fn write(
        &mut self,
        rows: Vec<RowSet>,
        advance: Option<Advance<'_>>,
    ) -> Result<(), WriteError> {
        while self.in_flight.len() >= self.max_in_flight {
            self.wait_oldest().await?;
        }
        let (done, written) = oneshot::channel();
        let job = Job::Write {
            rows,
            checkpoint: advance.map(|advance| Checkpoint {
                name: advance.name.to_string(),
                generation: advance.generation,
                from: advance.from,
                to: advance.to,
            }),
            done,
        };
        let jobs = self.jobs.as_ref().ok_or(WriteError::Stopped)?;
        jobs.send(job).await.map_err(|_| WriteError::Stopped)?;
        self.in_flight.push_back(written);
        Ok(())
    }

    /// Reads the lookup rows `wanted` from `tables` once every batch handed
    /// over so far is written (or has failed: its failure is reported by
    /// [`settle`](Self::settle) or [`finish`](Self::finish)).
    pub async fn read(
        &mut self,
        tables: &Tables,
        wanted: Wanted,
    ) -> Result<PendingRead, WriteError> {
        let (done, read) = oneshot::channel();
        let job = Job::Read {
            tables: tables.clone(),
            wanted,
            done,
        };
        let jobs = self.jobs.as_ref().ok_or(WriteError::Stopped)?;
        jobs.send(job).await.map_err(|_| WriteError::Stopped)?;
        Ok(read)
    }

    async fn wait_oldest(&mut self) -> Result<(), WriteError> {
        match self.in_flight.pop_front() {
            Some(written) => written.await.map_err(|_| WriteError::Stopped)?.0,
            None => Ok(()),
        }
    }

    /// Waits until every batch handed over is committed, then stops the thread.
    pub async fn finish(mut self) -> Result<(), WriteError> {
        while !self.in_flight.is_empty() {
            self.wait_oldest().await?;
        }
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|_| WriteError::Stopped)?
                .map_err(|_| WriteError::Stopped)?;
        }
        Ok(())
    }
}

/// A connection with the read-model pool's settings (WAL, `NORMAL` sync, the
/// same busy timeout) but its own automatic checkpoint interval (0: never).
fn connect(file: &Path, autocheckpoint_pages: u32) -> Result<Connection, WriteError> {
    let connection = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
         PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA wal_autocheckpoint = {autocheckpoint_pages};"
    ))?;
    Ok(connection)
}

/// The rows of the keys `wanted`, one cached statement per table, each key
/// looked up once, in key order, all in one read transaction (a statement
/// outside one takes and drops the file's locks by itself).
fn read(
    connection: &mut Connection,
    tables: &Tables,
    wanted: Wanted,
) -> Result<Vec<ReadRows>, WriteError> {
    let connection = connection.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let mut read = Vec::with_capacity(wanted.len());
    for (table, mut keys) in wanted {
        keys.sort_unstable();
        keys.dedup();
        let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let mut select = connection.prepare_cached(&format!(
            "SELECT {} FROM {} WHERE {} = ?",
            columns.join(", "),
            tables.t(table.base),
            table.key()
        ))?;
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let row = select
                .query_row([&key], |row| {
                    let mut cells = Vec::with_capacity(table.columns.len());
                    for (index, (_, kind)) in table.columns.iter().enumerate() {
                        cells.push(match kind {
                            Kind::Text => Cell::from(row.get::<_, Option<String>>(index)?),
                            Kind::Int => row
                                .get::<_, Option<i64>>(index)?
                                .map_or(Cell::Null, Cell::Int),
                        });
                    }
                    Ok(Row::from_cells(table, cells))
                })
                .optional()?;
            found.push((key, row));
        }
        read.push(ReadRows { table, found });
    }
    connection.commit()?;
    Ok(read)
}

/// One batch in one transaction: the checkpoint claimed first (as
/// [`crate::fold::fold_batch`] does), then every row; all or nothing.
fn write(
    connection: &mut Connection,
    rows: &[RowSet],
    checkpoint: Option<&Checkpoint>,
) -> Result<(), WriteError> {
    let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(checkpoint) = checkpoint {
        let moved = tx.execute(
            CLAIM_CHECKPOINT,
            rusqlite::params![
                checkpoint.to,
                timestamp(&chrono::Utc::now()),
                checkpoint.name,
                checkpoint.generation,
                checkpoint.from,
            ],
        )?;
        if moved != 1 {
            return Err(WriteError::CheckpointMoved {
                name: checkpoint.name.clone(),
                expected: checkpoint.from,
            });
        }
    }
    for set in rows.iter().filter(|set| !set.is_empty()) {
        let placeholders = vec!["?"; set.columns().len()].join(", ");
        let mut insert = tx.prepare_cached(&format!(
            "INSERT INTO {} VALUES ({placeholders}) {}",
            set.target(),
            set.tail()
        ))?;
        for row in set.rows() {
            for (index, field) in row.enumerate() {
                match field {
                    Field::Null => insert.raw_bind_parameter(index + 1, rusqlite::types::Null)?,
                    Field::Text(text) => insert.raw_bind_parameter(index + 1, text)?,
                    Field::Int(number) => insert.raw_bind_parameter(index + 1, number)?,
                }
            }
            insert.raw_execute()?;
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{audit_rows, AuditProjection};
    use crate::fold::fold_batch;
    use crate::projection::Tables;
    use crate::readdb::ReadDb;
    use crate::records::scenario;
    use crate::registry;
    use sqlx::Row as _;

    async fn count(db: &ReadDb, sql: String) -> i64 {
        sqlx::query(&sql).fetch_one(&db.pool).await.unwrap().get(0)
    }

    /// Rows of `table` in one generation and not the other, both ways.
    async fn differing(db: &ReadDb, one: &Tables, other: &Tables, table: &str) -> i64 {
        let (a, b) = (one.t(table), other.t(table));
        count(
            db,
            format!(
                "SELECT (SELECT COUNT(*) FROM (SELECT * FROM {a} EXCEPT SELECT * FROM {b}))
                      + (SELECT COUNT(*) FROM (SELECT * FROM {b} EXCEPT SELECT * FROM {a}))"
            ),
        )
        .await
    }

    /// The writer writes exactly the rows the projection's own fold writes
    /// (NULLs, numbers, JSON text, `ON CONFLICT` tails), moves the checkpoint
    /// with them, and a batch whose claim finds the checkpoint elsewhere
    /// writes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_writes_what_the_fold_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
            .await
            .unwrap();
        registry::ensure(&db).await.unwrap();
        let audit = AuditProjection;
        let events = scenario::scenario();
        let (in_db, of_audit) = (&db, &audit);
        let building = move || {
            registry::create_generation(
                in_db,
                of_audit,
                registry::BUILDING,
                registry::Indexes::AfterLoading,
            )
        };
        let folded = building().await.unwrap();
        fold_batch(&db, &audit, &folded.tables(), &events, None)
            .await
            .unwrap_or_else(|failure| panic!("{:?}", failure.error));

        let written = building().await.unwrap();
        let tables = written.tables();
        let mut writer = RebuildWriter::open(db.file.as_ref().unwrap(), false).unwrap();
        let (first, rest) = events.split_at(events.len() / 2);
        let mut from = 0;
        // The third batch repeats the first one's rows (`DO NOTHING`) and
        // moves no checkpoint.
        for (batch, moves) in [(first, true), (rest, true), (first, false)] {
            let to = batch.last().unwrap().position;
            let rows = audit_rows(&tables, batch).unwrap();
            let advance = moves.then(|| Advance {
                name: &written.name,
                generation: written.generation,
                part: None,
                from,
                to,
            });
            writer.write(rows, advance).await.unwrap();
            from = to;
        }
        writer.finish().await.unwrap();
        for table in ["entries", "changed_fields"] {
            assert_eq!(differing(&db, &folded.tables(), &tables, table).await, 0);
            let rows = count(&db, format!("SELECT COUNT(*) FROM {}", tables.t(table))).await;
            assert!(rows >= events.len() as i64, "{table}: {rows} rows");
        }
        let checkpoint = format!(
            "SELECT checkpoint FROM rm_projections WHERE name = 'audit' AND generation = {}",
            written.generation
        );
        let head = events.last().unwrap().position;
        assert_eq!(count(&db, checkpoint.clone()).await, head);

        // A stale claim: the batch fails whole, its rows are not written.
        let mut writer = RebuildWriter::open(db.file.as_ref().unwrap(), false).unwrap();
        let mut later = events[..1].to_vec();
        later[0].position = head + 1;
        let stale = Advance {
            name: &written.name,
            generation: written.generation,
            part: None,
            from: head - 1,
            to: head + 1,
        };
        writer
            .write(audit_rows(&tables, &later).unwrap(), Some(stale))
            .await
            .unwrap();
        let failed = writer.finish().await.unwrap_err();
        assert!(
            matches!(&failed, WriteError::CheckpointMoved { expected, .. } if *expected == head - 1),
            "{failed}"
        );
        assert_eq!(count(&db, checkpoint.clone()).await, head);
        let entries = tables.t("entries");
        assert_eq!(
            count(
                &db,
                format!("SELECT COUNT(*) FROM {entries} WHERE position > {head}")
            )
            .await,
            0
        );
    }

    /// Each projection that rebuilds to rows, rebuilt through the writer in
    /// batches of two (each batch folded while the one before is written,
    /// its lookup rows read by the writer before that, the rows the batch
    /// before asked for carried), has exactly the rows its own fold makes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rebuilt_rows_equal_the_folded_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
            .await
            .unwrap();
        let events = scenario::scenario();
        for projection in crate::all_projections() {
            if !projection.rebuilds_to_rows() {
                continue;
            }
            let folded = scenario::fold_all(&db, projection.as_ref(), &events).await;
            let rebuilt = Tables::new(projection.name(), 2);
            crate::fold::create_tables(&db, projection.as_ref(), &rebuilt)
                .await
                .unwrap();
            let reads_back = projection.rebuild_reads_back();
            let mut writer = RebuildWriter::open(db.file.as_ref().unwrap(), reads_back).unwrap();
            let mut carried = None;
            let batches: Vec<&[crm_eventlog::RecordedEvent]> = events.chunks(2).collect();
            let mut reads = Some(
                writer
                    .read(&rebuilt, projection.rebuild_reads(batches[0]))
                    .await
                    .unwrap(),
            );
            for (index, batch) in batches.iter().enumerate() {
                // As a rebuild asks: the next batch's reads before this
                // batch's rows are handed over.
                let next_reads = match batches.get(index + 1) {
                    Some(next) => Some(
                        writer
                            .read(&rebuilt, projection.rebuild_reads(next))
                            .await
                            .unwrap(),
                    ),
                    None => None,
                };
                let read = reads.take().unwrap().await.unwrap().unwrap();
                if reads_back {
                    writer.settle().await.unwrap();
                }
                let mut conn = db.pool.acquire().await.unwrap();
                let rows = projection
                    .rebuild_rows(&mut conn, &rebuilt, batch, read, &mut carried)
                    .await
                    .unwrap_or_else(|failure| panic!("{:?}", failure.error));
                drop(conn);
                writer.write(rows, None).await.unwrap();
                reads = next_reads;
            }
            writer.finish().await.unwrap();
            for table in projection.table_names() {
                let rows = count(&db, format!("SELECT COUNT(*) FROM {}", folded.t(table))).await;
                assert!(rows > 0, "{}: {table} has rows", projection.name());
                assert_eq!(
                    differing(&db, &folded, &rebuilt, table).await,
                    0,
                    "{}: {table}",
                    projection.name()
                );
            }
        }
    }

    /// Records rebuilt stream by stream in batches of two through the writer
    /// (a stream spanning batches carried from one to the next: a contact's
    /// five events span three) are the records folded in log order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_rebuilt_stream_by_stream_equal_the_folded_ones() {
        use crm_eventlog::{AppendBatch, EventLog, ExpectedVersion, NewEvent, StreamAppend};
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_sqlite(&dir.path().join("log.db"))
            .await
            .unwrap();
        let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
            .await
            .unwrap();
        for event in scenario::scenario() {
            let batch = AppendBatch {
                tenant_id: event.tenant_id,
                streams: vec![StreamAppend {
                    stream_type: event.stream_type,
                    stream_id: event.stream_id,
                    expected_version: ExpectedVersion::Any,
                    events: vec![NewEvent {
                        event_id: event.event_id,
                        event_type: event.event_type,
                        schema_version: event.schema_version,
                        payload: event.payload,
                        metadata: event.metadata,
                    }],
                }],
                idempotency: None,
            };
            log.append(batch).await.unwrap();
        }
        // As the log holds them (its own times).
        let events = log.read_all(0, 1000).await.unwrap();
        let records = crate::records::RecordsProjection;
        let folded = Tables::new("records", 99);
        crate::fold::create_tables(&db, &records, &folded)
            .await
            .unwrap();
        fold_batch(&db, &records, &folded, &events, None)
            .await
            .unwrap_or_else(|failure| panic!("{:?}", failure.error));

        let generation = crate::rebuild::rebuild_in_batches(&log, &db, &records, 2, |_, _| {})
            .await
            .unwrap();
        let rebuilt = Tables::new("records", generation);
        let rows = count(
            &db,
            format!("SELECT COUNT(*) FROM {}", rebuilt.t("records")),
        )
        .await;
        assert!(rows >= 10, "{rows} records");
        assert_eq!(differing(&db, &folded, &rebuilt, "records").await, 0);
        log.close().await;
    }

    /// A record whose stream spans two batches is folded on from the state
    /// the batch before carried, not from the table, where that batch's row
    /// is not committed yet: here another connection holds the write lock
    /// until the next batch is folded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_carry_a_stream_the_batch_before_has_not_committed() {
        use crate::projection::Projection as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("read.db");
        let db = ReadDb::open_sqlite(&file).await.unwrap();
        let records = crate::records::RecordsProjection;
        let mut events = scenario::scenario();
        let folded = scenario::fold_all(&db, &records, &events).await;
        events.sort_by(|a, b| {
            (&a.stream_type, &a.stream_id, a.version).cmp(&(
                &b.stream_type,
                &b.stream_id,
                b.version,
            ))
        });
        let batches: Vec<&[crm_eventlog::RecordedEvent]> = events.chunks(2).collect();
        let spanning = (0..batches.len() - 1)
            .find(|&k| batches[k][1].stream_id == batches[k + 1][0].stream_id)
            .expect("a stream spanning two batches");
        let rebuilt = Tables::new("records", 2);
        crate::fold::create_tables(&db, &records, &rebuilt)
            .await
            .unwrap();
        let mut writer = RebuildWriter::open(&file, true).unwrap();
        let mut carried = None;
        let mut blocker = None;
        for (k, batch) in batches.iter().enumerate() {
            writer.settle().await.unwrap();
            let mut conn = db.pool.acquire().await.unwrap();
            let rows = records
                .rebuild_rows(&mut conn, &rebuilt, batch, Vec::new(), &mut carried)
                .await
                .unwrap_or_else(|failure| panic!("{:?}", failure.error));
            drop(conn);
            if k == spanning {
                // The batches handed over so far committed first (a read
                // runs after them): one the blocker held up would be waited
                // for by the next settle, before the blocker lets go.
                writer
                    .read(&rebuilt, Vec::new())
                    .await
                    .unwrap()
                    .await
                    .unwrap()
                    .unwrap();
                let held = Connection::open(&file).unwrap();
                held.execute_batch("BEGIN IMMEDIATE").unwrap();
                blocker = Some(held);
            }
            writer.write(rows, None).await.unwrap();
            if k == spanning + 1 {
                let held: Connection = blocker.take().unwrap();
                held.execute_batch("ROLLBACK").unwrap();
            }
        }
        writer.finish().await.unwrap();
        assert_eq!(differing(&db, &folded, &rebuilt, "records").await, 0);
    }

    /// The writer's WAL is checkpointed behind it and started over once it
    /// holds the given size: after batches adding up to many times that
    /// size, the WAL file stays far below what was written (without the
    /// checkpoints it holds all of it) and every row is in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_checkpointed_behind_the_writer_and_stays_bounded() {
        static COLUMNS: [(&str, Kind); 2] = [("n", Kind::Int), ("text", Kind::Text)];
        let dir = tempfile::tempdir().unwrap();
        let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE filler (n INTEGER PRIMARY KEY, text TEXT NOT NULL)")
            .execute(&db.pool)
            .await
            .unwrap();
        let file = db.file.clone().unwrap();
        const RESTART_AT_PAGES: i64 = 64;
        const PAGE: u64 = 4096;
        let mut writer = RebuildWriter::start(&file, false, RESTART_AT_PAGES).unwrap();
        // 400 batches of about 16 pages each: 100 times the restart size.
        let (batches, rows_per_batch) = (400, 64);
        let text = "x".repeat(1000);
        for batch in 0..batches {
            let mut rows = RowSet::new("filler".into(), &COLUMNS, String::new(), 100);
            for row in 0..rows_per_batch {
                rows.push([Field::Int(batch * rows_per_batch + row), Field::Text(&text)]);
            }
            writer.write(vec![rows], None).await.unwrap();
        }
        writer.finish().await.unwrap();
        let written = u64::try_from(batches * rows_per_batch).unwrap() * 1000;
        let wal = std::fs::metadata(file.with_extension("db-wal"))
            .map(|meta| meta.len())
            .unwrap_or(0);
        assert!(
            wal < written / 2,
            "the WAL grew to {wal} bytes for {written} bytes written (restart at {} bytes)",
            RESTART_AT_PAGES as u64 * PAGE
        );
        let sql = "SELECT COUNT(*), SUM(LENGTH(text)) FROM filler".to_string();
        let row = sqlx::query(&sql).fetch_one(&db.pool).await.unwrap();
        assert_eq!(row.get::<i64, _>(0), batches * rows_per_batch);
        assert_eq!(row.get::<i64, _>(1) as u64, written);
    }
}
