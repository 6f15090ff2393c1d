//! SQLite backend: one writer connection owned by a group-commit writer task, plus a read pool.
//!
//! Group commit: the writer task takes every request queued on its channel (up to
//! [`MAX_GROUP`]), opens ONE `BEGIN IMMEDIATE` transaction, runs each request inside its own
//! `SAVEPOINT` (a conflict or duplicate rolls back only that request), commits once (one WAL
//! fsync for the whole group) and only then answers each requester. If the commit fails, every
//! request of the group gets an error and nothing of the group is visible.
//!
//! Durability: `journal_mode=WAL`, `synchronous=FULL`: an append is acknowledged only after its
//! commit record is fsynced to the WAL, so it survives a process kill and a power loss. Group
//! commit amortises the fsync across concurrent appends.
//!
//! Positions are assigned by the single writer from its in-memory head (reloaded after any
//! failed group), so they are contiguous and strictly commit ordered: readers cannot see gaps.

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
    RecordedEvent, SnapshotWrite, StoredSnapshot,
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

enum Pending {
    Append(
        oneshot::Sender<Result<AppendOutcome, LogError>>,
        Result<AppendOutcome, LogError>,
    ),
    Snapshot(oneshot::Sender<Result<(), LogError>>, Result<(), LogError>),
}

impl Pending {
    fn is_ok(&self) -> bool {
        match self {
            Pending::Append(_, r) => r.is_ok(),
            Pending::Snapshot(_, r) => r.is_ok(),
        }
    }

    fn answer(self) {
        // A requester that gave up (dropped its future) is not an error.
        match self {
            Pending::Append(tx, r) => drop(tx.send(r)),
            Pending::Snapshot(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, msg: &str) {
        let err = || LogError::Database(sqlx::Error::Protocol(msg.to_string()));
        match self {
            Pending::Append(tx, Ok(_)) => drop(tx.send(Err(err()))),
            Pending::Snapshot(tx, Ok(_)) => drop(tx.send(Err(err()))),
            other => other.answer(),
        }
    }
}

async fn exec(conn: &mut SqliteConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(&mut *conn).await.map(|_| ())
}

/// Runs one group in one transaction; returns the new committed head.
async fn commit_group(conn: &mut SqliteConnection, ops: Vec<WriteOp>, committed: i64) -> i64 {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE").await {
        let msg = format!("group commit: begin failed: {e}");
        for op in ops {
            match op {
                WriteOp::Append { reply, .. } => {
                    drop(reply.send(Err(LogError::Database(sqlx::Error::Protocol(msg.clone())))))
                }
                WriteOp::Snapshot { reply, .. } => {
                    drop(reply.send(Err(LogError::Database(sqlx::Error::Protocol(msg.clone())))))
                }
            }
        }
        return committed;
    }
    let mut last_pos = committed;
    let mut pending = Vec::with_capacity(ops.len());
    let mut broken: Option<String> = None;
    for op in ops {
        if broken.is_some() {
            // Transaction is unusable; answer the rest with the group error below.
            pending.push(match op {
                WriteOp::Append { reply, .. } => Pending::Append(reply, Err(LogError::Closed)),
                WriteOp::Snapshot { reply, .. } => Pending::Snapshot(reply, Err(LogError::Closed)),
            });
            continue;
        }
        if let Err(e) = exec(conn, "SAVEPOINT op").await {
            broken = Some(format!("group commit: savepoint failed: {e}"));
            pending.push(match op {
                WriteOp::Append { reply, .. } => Pending::Append(reply, Err(LogError::Closed)),
                WriteOp::Snapshot { reply, .. } => Pending::Snapshot(reply, Err(LogError::Closed)),
            });
            continue;
        }
        let result = match op {
            WriteOp::Append {
                batch,
                snapshot,
                reply,
            } => {
                let mut pos = last_pos;
                let r = apply_append(conn, &batch, snapshot.as_ref(), &mut pos).await;
                if r.is_ok() {
                    last_pos = pos;
                }
                Pending::Append(reply, r)
            }
            WriteOp::Snapshot { snapshot, reply } => {
                Pending::Snapshot(reply, upsert_snapshot(conn, &snapshot).await)
            }
        };
        let end = if result.is_ok() {
            exec(conn, "RELEASE op").await
        } else {
            match exec(conn, "ROLLBACK TO op").await {
                Ok(()) => exec(conn, "RELEASE op").await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = end {
            broken = Some(format!("group commit: savepoint end failed: {e}"));
        }
        pending.push(result);
    }
    // Group errors replace the placeholder `Closed` answers and any `Ok` answers.
    if let Some(msg) = broken {
        drop(exec(conn, "ROLLBACK").await);
        fail_all(pending, &msg);
        return reload_head(conn, committed).await;
    }
    if let Err(e) = exec(conn, "COMMIT").await {
        let msg = format!("group commit failed: {e}");
        tracing::error!(error = %e, "event log group commit failed");
        drop(exec(conn, "ROLLBACK").await);
        fail_all(pending, &msg);
        return reload_head(conn, committed).await;
    }
    for p in pending {
        p.answer();
    }
    last_pos
}

fn fail_all(pending: Vec<Pending>, msg: &str) {
    for p in pending {
        match p {
            Pending::Append(tx, Err(LogError::Closed)) => drop(tx.send(Err(LogError::Database(
                sqlx::Error::Protocol(msg.to_string()),
            )))),
            Pending::Snapshot(tx, Err(LogError::Closed)) => drop(tx.send(Err(LogError::Database(
                sqlx::Error::Protocol(msg.to_string()),
            )))),
            p if p.is_ok() => p.fail(msg),
            p => p.answer(),
        }
    }
}

async fn reload_head(conn: &mut SqliteConnection, fallback: i64) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) FROM events")
        .fetch_one(&mut *conn)
        .await
        .unwrap_or(fallback)
}

async fn find_idempotency(
    conn: &mut SqliteConnection,
    tenant: &str,
    key: &str,
) -> Result<Option<IdempotencyRecord>, LogError> {
    let sql = format!(
        "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_records WHERE tenant_id = ? AND key = ?"
    );
    sqlx::query(&sql)
        .bind(tenant)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(rows::sqlite_idempotency)
        .transpose()
}

/// One request inside the group transaction (its own savepoint). `pos` is the last assigned
/// position; advanced only by the caller on success.
async fn apply_append(
    conn: &mut SqliteConnection,
    batch: &AppendBatch,
    snapshot: Option<&SnapshotWrite>,
    pos: &mut i64,
) -> Result<AppendOutcome, LogError> {
    let tenant = batch.tenant_id.as_str();
    if let Some(idem) = &batch.idempotency {
        if let Some(existing) = find_idempotency(conn, tenant, &idem.key).await? {
            return Ok(AppendOutcome::Duplicate(existing));
        }
    }
    let recorded_at = now_micros();
    let recorded_text = rows::ts_to_text(recorded_at);
    let first_position = *pos + 1;
    let mut next = *pos;
    let mut streams = Vec::with_capacity(batch.streams.len());
    for s in &batch.streams {
        let current: i64 = sqlx::query_scalar(
            "SELECT version FROM streams WHERE tenant_id = ? AND stream_type = ? AND stream_id = ?",
        )
        .bind(tenant)
        .bind(&s.stream_type)
        .bind(&s.stream_id)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0);
        if let Some(expected) = s.expected_version.pinned() {
            if expected != current {
                return Err(LogError::Conflict {
                    stream_type: s.stream_type.clone(),
                    stream_id: s.stream_id.clone(),
                    expected,
                    actual: current,
                });
            }
        }
        let last_version = current + s.events.len() as i64;
        sqlx::query(
            "INSERT INTO streams (tenant_id, stream_type, stream_id, version) VALUES (?, ?, ?, ?) \
             ON CONFLICT (tenant_id, stream_type, stream_id) DO UPDATE SET version = excluded.version",
        )
        .bind(tenant)
        .bind(&s.stream_type)
        .bind(&s.stream_id)
        .bind(last_version)
        .execute(&mut *conn)
        .await?;
        for (i, e) in s.events.iter().enumerate() {
            next += 1;
            sqlx::query(
                "INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
                 version, event_type, schema_version, payload, metadata, recorded_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(next)
            .bind(e.event_id.hyphenated().to_string())
            .bind(tenant)
            .bind(&s.stream_type)
            .bind(&s.stream_id)
            .bind(current + 1 + i as i64)
            .bind(&e.event_type)
            .bind(e.schema_version)
            .bind(serde_json::to_string(&e.payload)?)
            .bind(serde_json::to_string(&e.metadata)?)
            .bind(&recorded_text)
            .execute(&mut *conn)
            .await?;
        }
        streams.push(CommittedStream {
            stream_type: s.stream_type.clone(),
            stream_id: s.stream_id.clone(),
            first_version: current + 1,
            last_version,
            last_position: next,
        });
    }
    if let Some(idem) = &batch.idempotency {
        let first = &streams[0];
        sqlx::query(
            "INSERT INTO idempotency_records (tenant_id, key, request_hash, status, stream_type, \
             stream_id, version, position, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(tenant)
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(i64::from(idem.status))
        .bind(&first.stream_type)
        .bind(&first.stream_id)
        .bind(first.last_version)
        .bind(first.last_position)
        .bind(&recorded_text)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(snap) = snapshot {
        upsert_snapshot(conn, snap).await?;
    }
    *pos = next;
    Ok(AppendOutcome::Committed(Committed {
        streams,
        first_position,
        last_position: next,
        recorded_at,
    }))
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
