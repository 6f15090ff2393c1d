//! SQLite backend: a read pool (sqlx), the bulk reads of
//! [`crate::sqlite_reader`], and one writer, the group commit of
//! [`crate::sqlite_writer`], on a thread of its own.
//!
//! Durability: `journal_mode=WAL`, `synchronous=FULL`: an append is acknowledged only after its
//! commit record is fsynced to the WAL, so it survives a process kill and a power loss. Group
//! commit amortises the fsync across concurrent appends.

use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{mpsc, oneshot, watch};

use crate::rows::{self, EVENT_COLUMNS, IDEMPOTENCY_COLUMNS};
use crate::sqlite_reader::BulkReader;
use crate::sqlite_writer::{self, WriteOp};
use crate::{
    bump_head, AppendBatch, AppendOutcome, IdempotencyRecord, LogError, RecordedEvent,
    SnapshotWrite, StoredSnapshot, StreamCursor,
};

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

pub(crate) struct SqliteStore {
    pub(crate) read: SqlitePool,
    bulk: BulkReader,
    writer: Mutex<Option<mpsc::Sender<WriteOp>>>,
    /// Told when the writer thread has answered everything and closed its connection.
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
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
        // Opened before the migration connection closes: an in-memory database lives only
        // while a connection holds it.
        let writer = sqlite_writer::connect(opts.get_filename(), BUSY_TIMEOUT)?;
        let read = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .connect_with(opts.clone().create_if_missing(false))
            .await?;
        conn.close().await?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (done, writer_done) = oneshot::channel();
        sqlite_writer::spawn(writer, rx, head, start, done).map_err(|e| {
            LogError::Database(sqlx::Error::Protocol(format!(
                "starting the event log writer: {e}"
            )))
        })?;
        Ok(Self {
            read,
            bulk: BulkReader::new(opts.get_filename(), BUSY_TIMEOUT),
            writer: Mutex::new(Some(tx)),
            writer_done: Mutex::new(Some(writer_done)),
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
        self.bulk.read_all(after_position, limit).await
    }

    pub(crate) fn map_file_for_bulk_reads(&self, bytes: u64) {
        self.bulk.map_file(bytes);
    }

    pub(crate) async fn read_by_stream(
        &self,
        up_to: i64,
        after: Option<&StreamCursor>,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.bulk.read_by_stream(up_to, after, limit).await
    }

    pub(crate) async fn read_stream_type(
        &self,
        tenant: &str,
        stream_type: &str,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.bulk
            .read_stream_type(tenant, stream_type, after_position, limit)
            .await
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
        let done = self.writer_done.lock().ok().and_then(|mut d| d.take());
        if let Some(done) = done {
            if done.await.is_err() {
                tracing::error!("event log writer thread ended without closing");
            }
        }
        self.bulk.close();
        self.read.close().await;
    }
}
