//! PostgreSQL backend: group-committed appends, gap-safe global positions.
//!
//! Appends are group-committed (see [`crate::pg_group`]): `append` queues its batch for this
//! store's writer task, which commits everything queued in ONE transaction of a constant
//! number of set-based statements, each request still all-or-nothing (a refused request writes
//! nothing). Reads and snapshot-only writes run on the pool.
//!
//! Gap safety: inside each group transaction, after the per-stream version checks, the
//! transaction runs `UPDATE log_head SET position = position + n RETURNING position` on the
//! one-row `log_head` table and takes its group's positions from that range (no sequence). The
//! row lock is held until the transaction ends, and PostgreSQL makes a commit visible before it
//! releases the transaction's locks, so the next appender (another group, or another process)
//! only gets higher positions after the previous group is visible (or rolled back, which also
//! rolls back the head). Positions are therefore contiguous and become visible in position
//! order: `read_all(after)` can never skip an event that commits later with a lower position.
//!
//! Lock order (deadlock-free): idempotency key rows first (sorted by tenant, key), then stream
//! rows sorted by (tenant, stream_type, stream_id), then `log_head` last.
//!
//! Every group does `pg_notify('crm_eventlog_head', <last position>)` in its transaction; a
//! background [`PgListener`] task raises the head watch for commits made by other processes
//! (reconnecting and re-reading the head after connection loss).

use std::sync::atomic::AtomicU64;
#[cfg(feature = "testing")]
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::pg_group::{self, AppendRequest};
use crate::rows::{self, EVENT_COLUMNS, IDEMPOTENCY_COLUMNS};
use crate::{
    bump_head, AppendBatch, AppendOutcome, IdempotencyRecord, LogError, RecordedEvent,
    SnapshotWrite, StoredSnapshot, StreamCursor,
};

/// NOTIFY channel carrying the new head position.
pub const HEAD_CHANNEL: &str = "crm_eventlog_head";
/// How long a query waits for a pooled connection. It also bounds how long a request waits
/// while PostgreSQL is down: sqlx retries refused connections until this deadline, then
/// answers `PoolTimedOut` (a [`LogError::is_unavailable`] error, HTTP 503). Kept well under
/// client and load-balancer timeouts so an outage fails fast instead of hanging requests.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct PgStore {
    pub(crate) pool: PgPool,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Queue of the group-commit writer task; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    /// Test hook: max random delay (µs) between writing a group and committing it.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pre_commit_delay_us: Arc<AtomicU64>,
}

impl PgStore {
    pub(crate) async fn connect(url: &str, head: watch::Sender<i64>) -> Result<Self, LogError> {
        let opts: PgConnectOptions = url
            .parse()
            .map_err(|e| LogError::InvalidUrl(format!("{url}: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await?;
        {
            // run_direct on a concrete connection keeps this future `Send` in generic contexts.
            let mut migrator = sqlx::migrate!("migrations/postgres");
            migrator.set_ignore_missing(true);
            let mut conn = pool.acquire().await?;
            migrator.run_direct(&mut *conn).await?;
        }
        let start: i64 = sqlx::query_scalar("SELECT position FROM log_head")
            .fetch_one(&pool)
            .await?;
        bump_head(&head, start);
        let listener = tokio::spawn(listen(pool.clone(), head.clone()));
        let pre_commit_delay_us = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel(pg_group::QUEUE_DEPTH);
        let writer = pg_group::Writer {
            pool: pool.clone(),
            head,
            pre_commit_delay_us: pre_commit_delay_us.clone(),
            held: None,
        };
        let writer_task = tokio::spawn(pg_group::run_writer(writer, rx));
        Ok(Self {
            pool,
            listener: Mutex::new(Some(listener)),
            writer: Mutex::new(Some(tx)),
            writer_task: Mutex::new(Some(writer_task)),
            pre_commit_delay_us,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<AppendRequest>, LogError> {
        self.writer
            .lock()
            .map_err(|_| LogError::Closed)?
            .clone()
            .ok_or(LogError::Closed)
    }

    /// Queues the batch for the next group commit and waits for its answer. If the caller
    /// stops waiting, the append is still committed or refused with its group.
    pub(crate) async fn append(
        &self,
        batch: AppendBatch,
        snapshot: Option<SnapshotWrite>,
        _head: &watch::Sender<i64>,
    ) -> Result<AppendOutcome, LogError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(AppendRequest {
                batch,
                snapshot,
                reply,
            })
            .await
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    #[cfg(feature = "testing")]
    pub(crate) fn set_pre_commit_delay(&self, max: Duration) {
        let us = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        self.pre_commit_delay_us.store(us, Ordering::Relaxed);
    }

    pub(crate) async fn save_snapshot(&self, snap: SnapshotWrite) -> Result<(), LogError> {
        let mut conn = self.pool.acquire().await?;
        upsert_snapshot(&mut conn, &snap).await
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
            "SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = $1 AND stream_type = $2 \
             AND stream_id = $3 AND version > $4 ORDER BY version LIMIT $5"
        );
        sqlx::query(&sql)
            .bind(tenant)
            .bind(stream_type)
            .bind(stream_id)
            .bind(after_version)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::pg_event)
            .collect()
    }

    pub(crate) async fn read_all(
        &self,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > $1 \
             ORDER BY global_position LIMIT $2"
        );
        sqlx::query(&sql)
            .bind(after_position)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::pg_event)
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
            "SELECT {EVENT_COLUMNS} FROM events WHERE (tenant_id, stream_type, stream_id, version) > ($1, $2, $3, $4) AND global_position <= $5 ORDER BY tenant_id, stream_type, stream_id, version LIMIT $6"
        );
        let query = sqlx::query(&sql)
            .bind(&cursor.tenant_id)
            .bind(&cursor.stream_type)
            .bind(&cursor.stream_id)
            .bind(cursor.version)
            .bind(up_to)
            .bind(limit.max(0));
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::pg_event)
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
            "SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = $1 AND stream_type = $2 \
             AND global_position > $3 ORDER BY global_position LIMIT $4"
        );
        sqlx::query(&sql)
            .bind(tenant)
            .bind(stream_type)
            .bind(after_position)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::pg_event)
            .collect()
    }

    pub(crate) async fn stream_version(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
    ) -> Result<i64, LogError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM streams WHERE tenant_id = $1 AND stream_type = $2 AND stream_id = $3",
        )
        .bind(tenant)
        .bind(stream_type)
        .bind(stream_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(v.unwrap_or(0))
    }

    pub(crate) async fn head_position(&self) -> Result<i64, LogError> {
        Ok(sqlx::query_scalar("SELECT position FROM log_head")
            .fetch_one(&self.pool)
            .await?)
    }

    pub(crate) async fn idempotency_record(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, LogError> {
        let sql = format!(
            "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_records WHERE tenant_id = $1 AND key = $2"
        );
        sqlx::query(&sql)
            .bind(tenant)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(rows::pg_idempotency)
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
             WHERE tenant_id = $1 AND stream_type = $2 AND stream_id = $3",
        )
        .bind(tenant)
        .bind(stream_type)
        .bind(stream_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(rows::pg_snapshot)
        .transpose()
    }

    pub(crate) async fn close(&self) {
        // Dropping our sender lets the writer drain the queue and exit once every in-flight
        // append (which holds its own sender clone while enqueueing) has been answered.
        let sender = self.writer.lock().ok().and_then(|mut w| w.take());
        drop(sender);
        let task = self.writer_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "event log writer task failed");
            }
        }
        let listener = self.listener.lock().ok().and_then(|mut l| l.take());
        if let Some(listener) = listener {
            listener.abort();
            drop(listener.await);
        }
        self.pool.close().await;
    }
}

pub(crate) async fn upsert_snapshot(
    conn: &mut sqlx::PgConnection,
    s: &SnapshotWrite,
) -> Result<(), LogError> {
    sqlx::query(
        "INSERT INTO snapshots (tenant_id, stream_type, stream_id, version, state, snapshot_no, updated_at) \
         VALUES ($1, $2, $3, $4, $5, COALESCE($6::BIGINT, 1), now()) \
         ON CONFLICT (tenant_id, stream_type, stream_id) DO UPDATE SET \
           version = EXCLUDED.version, state = EXCLUDED.state, \
           snapshot_no = COALESCE($6::BIGINT, snapshots.snapshot_no + 1), updated_at = now() \
         WHERE EXCLUDED.version >= snapshots.version",
    )
    .bind(&s.tenant_id)
    .bind(&s.stream_type)
    .bind(&s.stream_id)
    .bind(s.version)
    .bind(&s.state)
    .bind(s.snapshot_no)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Background task: raises the head watch on NOTIFY from any process.
async fn listen(pool: PgPool, head: watch::Sender<i64>) {
    loop {
        if pool.is_closed() {
            return;
        }
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(error = %e, "event log listener: connect failed, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(HEAD_CHANNEL).await {
            tracing::warn!(error = %e, "event log listener: LISTEN failed, retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        catch_up(&pool, &head).await;
        loop {
            match listener.recv().await {
                Ok(n) => match n.payload().parse::<i64>() {
                    Ok(pos) => bump_head(&head, pos),
                    Err(_) => catch_up(&pool, &head).await,
                },
                Err(e) => {
                    if pool.is_closed() {
                        return;
                    }
                    // PgListener reconnects on the next recv(); notifications sent while
                    // disconnected are lost, so re-read the head.
                    tracing::warn!(error = %e, "event log listener: connection lost, reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    catch_up(&pool, &head).await;
                }
            }
        }
    }
}

async fn catch_up(pool: &PgPool, head: &watch::Sender<i64>) {
    match sqlx::query_scalar::<_, i64>("SELECT position FROM log_head")
        .fetch_one(pool)
        .await
    {
        Ok(pos) => bump_head(head, pos),
        Err(e) => tracing::debug!(error = %e, "event log listener: head catch-up failed"),
    }
}
