//! SQLite backend: one writer connection owned by a group-commit writer task, plus a read pool.
//!
//! Group commit: the writer task takes every request queued on its channel (up to
//! [`MAX_GROUP`]), opens ONE `BEGIN IMMEDIATE` transaction, reads the idempotency records and
//! stream versions the group touches, decides each request in queue order in memory (a
//! conflict or duplicate refuses that request alone, before anything is written), writes the
//! accepted ones with multi-row statements, commits once (one WAL fsync for the whole group)
//! and only then answers each requester. If a write or the commit fails, every accepted
//! request of the group gets an error and nothing of the group is visible.
//!
//! Durability: `journal_mode=WAL`, `synchronous=FULL`: an append is acknowledged only after its
//! commit record is fsynced to the WAL, so it survives a process kill and a power loss. Group
//! commit amortises the fsync across concurrent appends.
//!
//! Positions are assigned by the single writer from its in-memory head (reloaded after any
//! failed group), so they are contiguous and strictly commit ordered: readers cannot see gaps.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::rows::{self, EVENT_COLUMNS, IDEMPOTENCY_COLUMNS};
use crate::types::now_micros;
use crate::{
    bump_head, AppendBatch, AppendOutcome, Committed, CommittedStream, IdempotencyRecord, LogError,
    RecordedEvent, SnapshotWrite, StoredSnapshot, StreamCursor,
};

/// Most requests folded into one group-commit transaction.
pub(crate) const MAX_GROUP: usize = 512;
const QUEUE_DEPTH: usize = 4096;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn options_from_url(url: &str) -> Result<SqliteConnectOptions, LogError> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| LogError::InvalidUrl(format!("{url}: {e}")))?;
    Ok(tune(opts))
}

pub(crate) fn options_from_path(path: &Path) -> SqliteConnectOptions {
    tune(SqliteConnectOptions::new().filename(path))
}

fn tune(opts: SqliteConnectOptions) -> SqliteConnectOptions {
    opts.create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // A multi-row insert keeps a statement journal (to undo just that statement); in a
        // temporary file it costs a kernel copy of every page the statement touches.
        .pragma("temp_store", "memory")
}

enum WriteOp {
    Append {
        batch: AppendBatch,
        snapshot: Option<SnapshotWrite>,
        reply: oneshot::Sender<Result<AppendOutcome, LogError>>,
    },
    Snapshot {
        snapshot: SnapshotWrite,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

pub(crate) struct SqliteStore {
    pub(crate) read: SqlitePool,
    writer: Mutex<Option<mpsc::Sender<WriteOp>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SqliteStore {
    pub(crate) async fn open(
        opts: SqliteConnectOptions,
        head: watch::Sender<i64>,
    ) -> Result<Self, LogError> {
        let mut conn = opts.connect().await?;
        let mut migrator = sqlx::migrate!("migrations/sqlite");
        migrator.set_ignore_missing(true);
        migrator.run_direct(&mut conn).await?;
        let start: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) FROM events")
            .fetch_one(&mut conn)
            .await?;
        bump_head(&head, start);
        let read = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .connect_with(opts.create_if_missing(false))
            .await?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(run_writer(conn, rx, head, start));
        Ok(Self {
            read,
            writer: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<WriteOp>, LogError> {
        self.writer
            .lock()
            .map_err(|_| LogError::Closed)?
            .clone()
            .ok_or(LogError::Closed)
    }

    pub(crate) async fn append(
        &self,
        batch: AppendBatch,
        snapshot: Option<SnapshotWrite>,
    ) -> Result<AppendOutcome, LogError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteOp::Append {
                batch,
                snapshot,
                reply,
            })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    pub(crate) async fn save_snapshot(&self, snapshot: SnapshotWrite) -> Result<(), LogError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteOp::Snapshot { snapshot, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    pub(crate) async fn read_stream(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = ? AND stream_type = ? \
             AND stream_id = ? AND version > ? ORDER BY version LIMIT ?"
        );
        sqlx::query(&sql)
            .bind(tenant)
            .bind(stream_type)
            .bind(stream_id)
            .bind(after_version)
            .bind(limit.max(0))
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(rows::sqlite_event)
            .collect()
    }

    pub(crate) async fn read_all(
        &self,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > ? \
             ORDER BY global_position LIMIT ?"
        );
        sqlx::query(&sql)
            .bind(after_position)
            .bind(limit.max(0))
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(rows::sqlite_event)
            .collect()
    }

    pub(crate) async fn read_by_stream(
        &self,
        up_to: i64,
        after: Option<&StreamCursor>,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        // The row-value comparison walks the (tenant, stream type, stream id,
        // version) unique index from the cursor on; from the start too (a
        // start without it sorts the whole log for the first page).
        let start = StreamCursor::before_all();
        let cursor = after.unwrap_or(&start);
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE (tenant_id, stream_type, stream_id, version) > (?, ?, ?, ?) AND global_position <= ? ORDER BY tenant_id, stream_type, stream_id, version LIMIT ?"
        );
        let query = sqlx::query(&sql)
            .bind(&cursor.tenant_id)
            .bind(&cursor.stream_type)
            .bind(&cursor.stream_id)
            .bind(cursor.version)
            .bind(up_to)
            .bind(limit.max(0));
        query
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(rows::sqlite_event)
            .collect()
    }

    pub(crate) async fn read_stream_type(
        &self,
        tenant: &str,
        stream_type: &str,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = ? AND stream_type = ? \
             AND global_position > ? ORDER BY global_position LIMIT ?"
        );
        sqlx::query(&sql)
            .bind(tenant)
            .bind(stream_type)
            .bind(after_position)
            .bind(limit.max(0))
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(rows::sqlite_event)
            .collect()
    }

    pub(crate) async fn stream_version(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
    ) -> Result<i64, LogError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM streams WHERE tenant_id = ? AND stream_type = ? AND stream_id = ?",
        )
        .bind(tenant)
        .bind(stream_type)
        .bind(stream_id)
        .fetch_optional(&self.read)
        .await?;
        Ok(v.unwrap_or(0))
    }

    pub(crate) async fn head_position(&self) -> Result<i64, LogError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) FROM events")
                .fetch_one(&self.read)
                .await?,
        )
    }

    pub(crate) async fn idempotency_record(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, LogError> {
        let sql = format!(
            "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_records WHERE tenant_id = ? AND key = ?"
        );
        sqlx::query(&sql)
            .bind(tenant)
            .bind(key)
            .fetch_optional(&self.read)
            .await?
            .as_ref()
            .map(rows::sqlite_idempotency)
            .transpose()
    }

    pub(crate) async fn load_snapshot(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
    ) -> Result<Option<StoredSnapshot>, LogError> {
        sqlx::query(
            "SELECT version, state, snapshot_no FROM snapshots \
             WHERE tenant_id = ? AND stream_type = ? AND stream_id = ?",
        )
        .bind(tenant)
        .bind(stream_type)
        .bind(stream_id)
        .fetch_optional(&self.read)
        .await?
        .as_ref()
        .map(rows::sqlite_snapshot)
        .transpose()
    }

    pub(crate) async fn close(&self) {
        // Dropping our sender lets the writer drain the queue and exit once every in-flight
        // append (which holds its own sender clone) has been answered.
        let sender = self.writer.lock().ok().and_then(|mut w| w.take());
        drop(sender);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "event log writer task failed");
            }
        }
        self.read.close().await;
    }
}

async fn run_writer(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<WriteOp>,
    head: watch::Sender<i64>,
    mut last_pos: i64,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let ops = std::mem::take(&mut group);
        last_pos = commit_group(&mut conn, ops, last_pos).await;
        bump_head(&head, last_pos);
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing event log writer connection");
    }
}

async fn exec(conn: &mut SqliteConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(&mut *conn).await.map(|_| ())
}

/// A request of a group and the answer it will get once the group ends.
enum Answer {
    Append(
        oneshot::Sender<Result<AppendOutcome, LogError>>,
        Result<AppendOutcome, LogError>,
    ),
    Snapshot(oneshot::Sender<Result<(), LogError>>, Result<(), LogError>),
}

impl Answer {
    /// Sends the answer; a requester that gave up (dropped its future) is not an error.
    fn send(self) {
        match self {
            Answer::Append(tx, r) => drop(tx.send(r)),
            Answer::Snapshot(tx, r) => drop(tx.send(r)),
        }
    }

    /// The group was not written: what would have been written fails with `msg`; refusals
    /// (conflicts, duplicates found before writing) keep their own answer.
    fn fail(self, msg: &str) {
        let err = || LogError::Database(sqlx::Error::Protocol(msg.to_string()));
        match self {
            Answer::Append(tx, Ok(AppendOutcome::Committed(_))) => drop(tx.send(Err(err()))),
            Answer::Snapshot(tx, Ok(())) => drop(tx.send(Err(err()))),
            other => other.send(),
        }
    }
}

/// Runs one group in one transaction; returns the new committed head.
///
/// The group is decided in memory first: the stored idempotency records and stream versions
/// it touches are read in a few statements, each request is checked against them in queue
/// order (a conflict or duplicate refuses that request alone, before anything is written),
/// and what the accepted requests append is then written with multi-row statements. The
/// number of statements per group does not grow with the group (except snapshots), which is
/// what makes a group cheaper than its requests one by one.
async fn commit_group(conn: &mut SqliteConnection, ops: Vec<WriteOp>, committed: i64) -> i64 {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE").await {
        let msg = format!("group commit: begin failed: {e}");
        for op in ops {
            op.refuse(&msg);
        }
        return committed;
    }
    let plan = match GroupPlan::decide(conn, ops, committed).await {
        Ok(plan) => plan,
        Err((ops, e)) => {
            drop(exec(conn, "ROLLBACK").await);
            let msg = format!("group commit: reading the group's streams failed: {e}");
            for op in ops {
                op.refuse(&msg);
            }
            return reload_head(conn, committed).await;
        }
    };
    let msg = match plan.write(conn).await {
        Ok(()) => match exec(conn, "COMMIT").await {
            Ok(()) => {
                for answer in plan.answers {
                    answer.send();
                }
                return plan.last_position;
            }
            Err(e) => {
                tracing::error!(error = %e, "event log group commit failed");
                format!("group commit failed: {e}")
            }
        },
        Err(e) => format!("group commit: write failed: {e}"),
    };
    drop(exec(conn, "ROLLBACK").await);
    for answer in plan.answers {
        answer.fail(&msg);
    }
    reload_head(conn, committed).await
}

impl WriteOp {
    fn refuse(self, msg: &str) {
        let err = || LogError::Database(sqlx::Error::Protocol(msg.to_string()));
        match self {
            WriteOp::Append { reply, .. } => drop(reply.send(Err(err()))),
            WriteOp::Snapshot { reply, .. } => drop(reply.send(Err(err()))),
        }
    }
}

type StreamKey = (String, String, String);
type KeyOf = (String, String);

/// What one group appends, decided before anything is written.
struct GroupPlan {
    answers: Vec<Answer>,
    last_position: i64,
    events: Vec<EventRow>,
    /// Final version of every stream the group appends to.
    versions: Vec<(StreamKey, i64)>,
    records: Vec<(String, IdempotencyRecord)>,
    snapshots: Vec<SnapshotWrite>,
}

struct EventRow {
    position: i64,
    event_id: String,
    tenant: String,
    stream_type: String,
    stream_id: String,
    version: i64,
    event_type: String,
    schema_version: i32,
    payload: String,
    metadata: String,
    recorded_at: String,
}

/// Rows (or keys) per multi-row statement: a fixed few sizes, so that each statement is
/// prepared once per connection and then cached (parsing a fresh statement for every group
/// was a tenth of the writer's time), largest first. 64 event rows bind 704 parameters, well
/// under SQLite's limit.
const STATEMENT_ROWS: [usize; 4] = [64, 16, 4, 1];

/// Splits `rows` into chunks whose lengths are among [`STATEMENT_ROWS`], largest first.
fn fixed_chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let size = STATEMENT_ROWS
            .into_iter()
            .find(|&size| size <= rows.len())?;
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}

/// Splits `keys` into chunks of a size among [`STATEMENT_ROWS`], the last one padded by
/// repeating its last key (a lookup may name a key twice).
fn padded_chunks<T>(keys: &[T]) -> impl Iterator<Item = (&[T], usize)> {
    keys.chunks(STATEMENT_ROWS[0]).map(|chunk| {
        let size = STATEMENT_ROWS
            .into_iter()
            .rev()
            .find(|&size| size >= chunk.len())
            .unwrap_or(STATEMENT_ROWS[0]);
        (chunk, size)
    })
}

/// `chunk`'s keys, then its last key again up to `size` keys.
fn padded<T>(chunk: &[T], size: usize) -> impl Iterator<Item = &T> {
    let padding = chunk
        .last()
        .into_iter()
        .cycle()
        .take(size.saturating_sub(chunk.len()));
    chunk.iter().chain(padding)
}

impl GroupPlan {
    async fn decide(
        conn: &mut SqliteConnection,
        ops: Vec<WriteOp>,
        committed: i64,
    ) -> Result<GroupPlan, (Vec<WriteOp>, LogError)> {
        let mut keys: Vec<KeyOf> = Vec::new();
        let mut streams: Vec<StreamKey> = Vec::new();
        for op in &ops {
            if let WriteOp::Append { batch, .. } = op {
                if let Some(idem) = &batch.idempotency {
                    keys.push((batch.tenant_id.clone(), idem.key.clone()));
                }
                for s in &batch.streams {
                    streams.push((
                        batch.tenant_id.clone(),
                        s.stream_type.clone(),
                        s.stream_id.clone(),
                    ));
                }
            }
        }
        keys.sort();
        keys.dedup();
        streams.sort();
        streams.dedup();
        let stored = match read_state(conn, &keys, &streams).await {
            Ok(stored) => stored,
            Err(e) => return Err((ops, e)),
        };
        let (mut records, mut current) = stored;
        let mut plan = GroupPlan {
            answers: Vec::with_capacity(ops.len()),
            last_position: committed,
            events: Vec::new(),
            versions: Vec::new(),
            records: Vec::new(),
            snapshots: Vec::new(),
        };
        let mut touched: Vec<StreamKey> = Vec::new();
        for op in ops {
            match op {
                WriteOp::Append {
                    batch,
                    snapshot,
                    reply,
                } => {
                    let result =
                        plan.append(&batch, snapshot, &mut records, &mut current, &mut touched);
                    plan.answers.push(Answer::Append(reply, result));
                }
                WriteOp::Snapshot { snapshot, reply } => {
                    plan.snapshots.push(snapshot);
                    plan.answers.push(Answer::Snapshot(reply, Ok(())));
                }
            }
        }
        touched.sort();
        touched.dedup();
        plan.versions = touched
            .into_iter()
            .map(|key| {
                let version = current.get(&key).copied().unwrap_or(0);
                (key, version)
            })
            .collect();
        Ok(plan)
    }

    /// Decides one append against the running state; on success its rows join the plan.
    fn append(
        &mut self,
        batch: &AppendBatch,
        snapshot: Option<SnapshotWrite>,
        records: &mut HashMap<KeyOf, IdempotencyRecord>,
        current: &mut HashMap<StreamKey, i64>,
        touched: &mut Vec<StreamKey>,
    ) -> Result<AppendOutcome, LogError> {
        let tenant = batch.tenant_id.as_str();
        if let Some(idem) = &batch.idempotency {
            if let Some(existing) = records.get(&(tenant.to_string(), idem.key.clone())) {
                return Ok(AppendOutcome::Duplicate(existing.clone()));
            }
        }
        let mut bases: Vec<(StreamKey, i64)> = Vec::with_capacity(batch.streams.len());
        for s in &batch.streams {
            let key = (
                tenant.to_string(),
                s.stream_type.clone(),
                s.stream_id.clone(),
            );
            // A stream named twice in one batch continues after its earlier share.
            let version = bases
                .iter()
                .zip(&batch.streams)
                .filter(|((earlier, _), _)| *earlier == key)
                .map(|((_, base), share)| base + share.events.len() as i64)
                .next_back()
                .unwrap_or_else(|| current.get(&key).copied().unwrap_or(0));
            if let Some(expected) = s.expected_version.pinned() {
                if expected != version {
                    return Err(LogError::Conflict {
                        stream_type: s.stream_type.clone(),
                        stream_id: s.stream_id.clone(),
                        expected,
                        actual: version,
                    });
                }
            }
            bases.push((key, version));
        }
        let recorded_at = now_micros();
        let recorded_text = rows::ts_to_text(recorded_at);
        let mut rows = Vec::new();
        let mut next = self.last_position;
        let mut committed_streams = Vec::with_capacity(batch.streams.len());
        for (s, (_, base)) in batch.streams.iter().zip(&bases) {
            for (i, e) in s.events.iter().enumerate() {
                next += 1;
                rows.push(EventRow {
                    position: next,
                    event_id: e.event_id.hyphenated().to_string(),
                    tenant: tenant.to_string(),
                    stream_type: s.stream_type.clone(),
                    stream_id: s.stream_id.clone(),
                    version: base + 1 + i as i64,
                    event_type: e.event_type.clone(),
                    schema_version: e.schema_version,
                    payload: serde_json::to_string(&e.payload)?,
                    metadata: serde_json::to_string(&e.metadata)?,
                    recorded_at: recorded_text.clone(),
                });
            }
            committed_streams.push(CommittedStream {
                stream_type: s.stream_type.clone(),
                stream_id: s.stream_id.clone(),
                first_version: base + 1,
                last_version: base + s.events.len() as i64,
                last_position: next,
            });
        }
        // Accepted: from here on nothing can refuse it.
        for ((key, base), s) in bases.into_iter().zip(&batch.streams) {
            current.insert(key.clone(), base + s.events.len() as i64);
            touched.push(key);
        }
        if let (Some(idem), Some(first)) = (&batch.idempotency, committed_streams.first()) {
            let record = IdempotencyRecord {
                key: idem.key.clone(),
                request_hash: idem.request_hash.clone(),
                status: idem.status,
                stream_type: first.stream_type.clone(),
                stream_id: first.stream_id.clone(),
                version: first.last_version,
                position: first.last_position,
                created_at: recorded_at,
            };
            records.insert((tenant.to_string(), idem.key.clone()), record.clone());
            self.records.push((tenant.to_string(), record));
        }
        self.snapshots.extend(snapshot);
        let first_position = self.last_position + 1;
        self.events.extend(rows);
        self.last_position = next;
        Ok(AppendOutcome::Committed(Committed {
            streams: committed_streams,
            first_position,
            last_position: next,
            recorded_at,
        }))
    }

    /// Writes the accepted appends: events, stream versions, idempotency records, snapshots.
    async fn write(&self, conn: &mut SqliteConnection) -> Result<(), LogError> {
        for chunk in fixed_chunks(&self.events) {
            let sql = format!(
                "INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
                 version, event_type, schema_version, payload, metadata, recorded_at) VALUES {}",
                placeholders(chunk.len(), 11)
            );
            let mut query = sqlx::query(&sql);
            for e in chunk {
                query = query
                    .bind(e.position)
                    .bind(&e.event_id)
                    .bind(&e.tenant)
                    .bind(&e.stream_type)
                    .bind(&e.stream_id)
                    .bind(e.version)
                    .bind(&e.event_type)
                    .bind(e.schema_version)
                    .bind(&e.payload)
                    .bind(&e.metadata)
                    .bind(&e.recorded_at);
            }
            query.execute(&mut *conn).await?;
        }
        for chunk in fixed_chunks(&self.versions) {
            let sql = format!(
                "INSERT INTO streams (tenant_id, stream_type, stream_id, version) VALUES {} \
                 ON CONFLICT (tenant_id, stream_type, stream_id) DO UPDATE SET version = excluded.version",
                placeholders(chunk.len(), 4)
            );
            let mut query = sqlx::query(&sql);
            for ((tenant, stream_type, stream_id), version) in chunk {
                query = query
                    .bind(tenant)
                    .bind(stream_type)
                    .bind(stream_id)
                    .bind(*version);
            }
            query.execute(&mut *conn).await?;
        }
        for chunk in fixed_chunks(&self.records) {
            let sql = format!(
                "INSERT INTO idempotency_records (tenant_id, key, request_hash, status, stream_type, \
                 stream_id, version, position, created_at) VALUES {}",
                placeholders(chunk.len(), 9)
            );
            let mut query = sqlx::query(&sql);
            for (tenant, r) in chunk {
                query = query
                    .bind(tenant)
                    .bind(&r.key)
                    .bind(&r.request_hash)
                    .bind(i64::from(r.status))
                    .bind(&r.stream_type)
                    .bind(&r.stream_id)
                    .bind(r.version)
                    .bind(r.position)
                    .bind(rows::ts_to_text(r.created_at));
            }
            query.execute(&mut *conn).await?;
        }
        for snapshot in &self.snapshots {
            upsert_snapshot(conn, snapshot).await?;
        }
        Ok(())
    }
}

/// `(?, ?), (?, ?)`: `rows` rows of `columns` parameters.
fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

/// The stored idempotency records and stream versions a group touches.
async fn read_state(
    conn: &mut SqliteConnection,
    keys: &[KeyOf],
    streams: &[StreamKey],
) -> Result<(HashMap<KeyOf, IdempotencyRecord>, HashMap<StreamKey, i64>), LogError> {
    let mut records = HashMap::new();
    for (chunk, size) in padded_chunks(keys) {
        let wanted = vec!["(tenant_id = ? AND key = ?)"; size].join(" OR ");
        let sql = format!(
            "SELECT tenant_id, {IDEMPOTENCY_COLUMNS} FROM idempotency_records WHERE {wanted}"
        );
        let mut query = sqlx::query(&sql);
        for (tenant, key) in padded(chunk, size) {
            query = query.bind(tenant).bind(key);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let tenant: String = sqlx::Row::try_get(&row, "tenant_id")?;
            let record = rows::sqlite_idempotency(&row)?;
            records.insert((tenant, record.key.clone()), record);
        }
    }
    let mut versions = HashMap::new();
    for (chunk, size) in padded_chunks(streams) {
        let wanted =
            vec!["(tenant_id = ? AND stream_type = ? AND stream_id = ?)"; size].join(" OR ");
        let sql = format!(
            "SELECT tenant_id, stream_type, stream_id, version FROM streams WHERE {wanted}"
        );
        let mut query = sqlx::query_as::<_, (String, String, String, i64)>(&sql);
        for (tenant, stream_type, stream_id) in padded(chunk, size) {
            query = query.bind(tenant).bind(stream_type).bind(stream_id);
        }
        for (tenant, stream_type, stream_id, version) in query.fetch_all(&mut *conn).await? {
            versions.insert((tenant, stream_type, stream_id), version);
        }
    }
    Ok((records, versions))
}

async fn reload_head(conn: &mut SqliteConnection, fallback: i64) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) FROM events")
        .fetch_one(&mut *conn)
        .await
        .unwrap_or(fallback)
}

async fn upsert_snapshot(conn: &mut SqliteConnection, s: &SnapshotWrite) -> Result<(), LogError> {
    sqlx::query(
        "INSERT INTO snapshots (tenant_id, stream_type, stream_id, version, state, snapshot_no, updated_at) \
         VALUES (?, ?, ?, ?, ?, COALESCE(?, 1), ?) \
         ON CONFLICT (tenant_id, stream_type, stream_id) DO UPDATE SET \
           version = excluded.version, state = excluded.state, \
           snapshot_no = COALESCE(?, snapshots.snapshot_no + 1), updated_at = excluded.updated_at \
         WHERE excluded.version >= snapshots.version",
    )
    .bind(&s.tenant_id)
    .bind(&s.stream_type)
    .bind(&s.stream_id)
    .bind(s.version)
    .bind(serde_json::to_string(&s.state)?)
    .bind(s.snapshot_no)
    .bind(rows::ts_to_text(now_micros()))
    .bind(s.snapshot_no)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_chunks_cover_the_rows_in_order_with_cached_sizes_only() {
        for n in 0..300usize {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = fixed_chunks(&rows).collect();
            assert!(
                chunks.iter().all(|c| STATEMENT_ROWS.contains(&c.len())),
                "{n}"
            );
            let joined: Vec<usize> = chunks.concat();
            assert_eq!(joined, rows, "{n}");
        }
        // Largest first: 64 + 64 + 16 + 4 + 1 + 1 rows.
        let rows = vec![0u8; 150];
        let sizes: Vec<usize> = fixed_chunks(&rows).map(<[u8]>::len).collect();
        assert_eq!(sizes, [64, 64, 16, 4, 1, 1]);
    }

    #[test]
    fn padded_chunks_take_the_smallest_cached_size_that_holds_them() {
        let keys: Vec<usize> = (0..70).collect();
        let chunks: Vec<(&[usize], usize)> = padded_chunks(&keys).collect();
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[0].0.len(), chunks[0].1), (64, 64));
        assert_eq!((chunks[1].0.len(), chunks[1].1), (6, 16));
        for n in 1..=64usize {
            let keys: Vec<usize> = (0..n).collect();
            let (chunk, size) = padded_chunks(&keys).next().expect("one chunk");
            assert_eq!(chunk.len(), n);
            assert!(STATEMENT_ROWS.contains(&size) && size >= n, "{n} -> {size}");
        }
        let padded_keys: Vec<u8> = padded(&[1, 2, 3], 4).copied().collect();
        assert_eq!(padded_keys, [1, 2, 3, 3]);
    }
}
