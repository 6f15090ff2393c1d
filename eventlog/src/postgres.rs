//! PostgreSQL backend: concurrent appends on a pool, gap-safe global positions.
//!
//! Gap safety: inside each append transaction, after the per-stream version checks, the
//! transaction runs `UPDATE log_head SET position = position + n RETURNING position` on the
//! one-row `log_head` table and takes its batch's positions from that range (no sequence). The
//! row lock is held until the transaction ends, and PostgreSQL makes a commit visible before it
//! releases the transaction's locks, so the next appender only gets higher positions after the
//! previous batch is visible (or rolled back, which also rolls back the head). Positions are
//! therefore contiguous and become visible in position order: `read_all(after)` can never skip
//! an event that commits later with a lower position.
//!
//! Lock order (deadlock-free): idempotency key row first, then stream rows sorted by
//! (stream_type, stream_id), then `log_head` last.
//!
//! Every append does `pg_notify('crm_eventlog_head', <last position>)` in its transaction; a
//! background [`PgListener`] task raises the head watch for commits made by other processes
//! (reconnecting and re-reading the head after connection loss).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Transaction};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rows::{self, EVENT_COLUMNS, IDEMPOTENCY_COLUMNS};
use crate::types::now_micros;
use crate::{
    bump_head, AppendBatch, AppendOutcome, Committed, CommittedStream, ExpectedVersion,
    IdempotencyRecord, LogError, RecordedEvent, SnapshotWrite, StoredSnapshot,
};

/// NOTIFY channel carrying the new head position.
pub const HEAD_CHANNEL: &str = "crm_eventlog_head";
const INSERT_CHUNK: usize = 1000;
/// How long a query waits for a pooled connection. It also bounds how long a request waits
/// while PostgreSQL is down: sqlx retries refused connections until this deadline, then
/// answers `PoolTimedOut` (a [`LogError::is_unavailable`] error, HTTP 503). Kept well under
/// client and load-balancer timeouts so an outage fails fast instead of hanging requests.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct PgStore {
    pub(crate) pool: PgPool,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Test hook: max random delay (µs) between writing a batch and committing it.
    pre_commit_delay_us: AtomicU64,
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
        let listener = tokio::spawn(listen(pool.clone(), head));
        Ok(Self {
            pool,
            listener: Mutex::new(Some(listener)),
            pre_commit_delay_us: AtomicU64::new(0),
        })
    }

    pub(crate) async fn append(
        &self,
        batch: AppendBatch,
        snapshot: Option<SnapshotWrite>,
        head: &watch::Sender<i64>,
    ) -> Result<AppendOutcome, LogError> {
        let mut tx = self.pool.begin().await?;
        match append_in_tx(&mut tx, &batch, snapshot.as_ref()).await? {
            TxOutcome::Committed(c) => {
                let max_delay = self.pre_commit_delay_us.load(Ordering::Relaxed);
                if max_delay > 0 {
                    let us = (uuid::Uuid::new_v4().as_u128() % u128::from(max_delay)) as u64;
                    tokio::time::sleep(Duration::from_micros(us)).await;
                }
                tx.commit().await?;
                bump_head(head, c.last_position);
                Ok(AppendOutcome::Committed(c))
            }
            TxOutcome::KeyTaken(key) => {
                tx.rollback().await?;
                // ON CONFLICT waited for the other transaction, so its record is committed.
                match self.idempotency_record(&batch.tenant_id, &key).await? {
                    Some(rec) => Ok(AppendOutcome::Duplicate(rec)),
                    None => Err(LogError::Database(sqlx::Error::Protocol(format!(
                        "idempotency key {key:?} conflicted but no record is visible"
                    )))),
                }
            }
        }
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
        let listener = self.listener.lock().ok().and_then(|mut l| l.take());
        if let Some(listener) = listener {
            listener.abort();
            drop(listener.await);
        }
        self.pool.close().await;
    }
}

enum TxOutcome {
    Committed(Committed),
    /// The idempotency key exists (possibly committed concurrently): roll back, report Duplicate.
    KeyTaken(String),
}

async fn append_in_tx(
    tx: &mut Transaction<'static, Postgres>,
    batch: &AppendBatch,
    snapshot: Option<&SnapshotWrite>,
) -> Result<TxOutcome, LogError> {
    let tenant = batch.tenant_id.as_str();
    // 1. Claim the idempotency key first: a concurrent same-key append blocks here on the
    //    unique index until we commit, then sees the conflict and reports Duplicate.
    if let Some(idem) = &batch.idempotency {
        let first = &batch.streams[0];
        let claimed = sqlx::query(
            "INSERT INTO idempotency_records (tenant_id, key, request_hash, status, stream_type, \
             stream_id, version, position, created_at) VALUES ($1, $2, $3, $4, $5, $6, 0, 0, now()) \
             ON CONFLICT (tenant_id, key) DO NOTHING",
        )
        .bind(tenant)
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(i32::from(idem.status))
        .bind(&first.stream_type)
        .bind(&first.stream_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            return Ok(TxOutcome::KeyTaken(idem.key.clone()));
        }
    }

    // 2. Bump stream versions in a global order (deadlock-free across multi-stream batches).
    let mut order: Vec<usize> = (0..batch.streams.len()).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (&batch.streams[a], &batch.streams[b]);
        (&sa.stream_type, &sa.stream_id).cmp(&(&sb.stream_type, &sb.stream_id))
    });
    let mut last_versions = vec![0i64; batch.streams.len()];
    for i in order {
        let s = &batch.streams[i];
        let n = s.events.len() as i64;
        let bumped: Option<i64> = match s.expected_version {
            ExpectedVersion::Any => Some(
                sqlx::query_scalar(
                    "INSERT INTO streams (tenant_id, stream_type, stream_id, version) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, stream_type, stream_id) \
                     DO UPDATE SET version = streams.version + EXCLUDED.version RETURNING version",
                )
                .bind(tenant)
                .bind(&s.stream_type)
                .bind(&s.stream_id)
                .bind(n)
                .fetch_one(&mut **tx)
                .await?,
            ),
            ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => {
                sqlx::query_scalar(
                    "INSERT INTO streams (tenant_id, stream_type, stream_id, version) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, stream_type, stream_id) \
                     DO NOTHING RETURNING version",
                )
                .bind(tenant)
                .bind(&s.stream_type)
                .bind(&s.stream_id)
                .bind(n)
                .fetch_optional(&mut **tx)
                .await?
            }
            ExpectedVersion::Exact(v) => {
                sqlx::query_scalar(
                    "UPDATE streams SET version = version + $5 WHERE tenant_id = $1 \
                     AND stream_type = $2 AND stream_id = $3 AND version = $4 RETURNING version",
                )
                .bind(tenant)
                .bind(&s.stream_type)
                .bind(&s.stream_id)
                .bind(v)
                .bind(n)
                .fetch_optional(&mut **tx)
                .await?
            }
        };
        match bumped {
            Some(v) => last_versions[i] = v,
            None => {
                let actual: Option<i64> = sqlx::query_scalar(
                    "SELECT version FROM streams WHERE tenant_id = $1 AND stream_type = $2 \
                     AND stream_id = $3",
                )
                .bind(tenant)
                .bind(&s.stream_type)
                .bind(&s.stream_id)
                .fetch_optional(&mut **tx)
                .await?;
                return Err(LogError::Conflict {
                    stream_type: s.stream_type.clone(),
                    stream_id: s.stream_id.clone(),
                    expected: s.expected_version.pinned().unwrap_or(0),
                    actual: actual.unwrap_or(0),
                });
            }
        }
    }

    // 3. Positions from the locked head row (held until commit => commit-ordered positions).
    let total: i64 = batch.streams.iter().map(|s| s.events.len() as i64).sum();
    let last_position: i64 = sqlx::query_scalar(
        "UPDATE log_head SET position = position + $1 WHERE id RETURNING position",
    )
    .bind(total)
    .fetch_one(&mut **tx)
    .await?;
    let first_position = last_position - total + 1;
    let recorded_at = now_micros();

    // 4. Insert the events (multi-row inserts), positions in batch order.
    let mut rows_to_insert = Vec::with_capacity(total as usize);
    let mut pos = first_position;
    let mut streams = Vec::with_capacity(batch.streams.len());
    for (i, s) in batch.streams.iter().enumerate() {
        let n = s.events.len() as i64;
        let first_version = last_versions[i] - n + 1;
        for (k, e) in s.events.iter().enumerate() {
            rows_to_insert.push((pos, s, first_version + k as i64, e));
            pos += 1;
        }
        streams.push(CommittedStream {
            stream_type: s.stream_type.clone(),
            stream_id: s.stream_id.clone(),
            first_version,
            last_version: last_versions[i],
            last_position: pos - 1,
        });
    }
    for chunk in rows_to_insert.chunks(INSERT_CHUNK) {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
             version, event_type, schema_version, payload, metadata, recorded_at) ",
        );
        qb.push_values(chunk, |mut b, (pos, s, version, e)| {
            b.push_bind(*pos)
                .push_bind(e.event_id)
                .push_bind(tenant)
                .push_bind(&s.stream_type)
                .push_bind(&s.stream_id)
                .push_bind(*version)
                .push_bind(&e.event_type)
                .push_bind(e.schema_version)
                .push_bind(&e.payload)
                .push_bind(&e.metadata)
                .push_bind(recorded_at);
        });
        qb.build().execute(&mut **tx).await?;
    }

    // 5. Finish the idempotency record with the first stream's outcome.
    if let Some(idem) = &batch.idempotency {
        let first = &streams[0];
        sqlx::query(
            "UPDATE idempotency_records SET version = $3, position = $4, created_at = $5 \
             WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant)
        .bind(&idem.key)
        .bind(first.last_version)
        .bind(first.last_position)
        .bind(recorded_at)
        .execute(&mut **tx)
        .await?;
    }
    if let Some(snap) = snapshot {
        upsert_snapshot(tx, snap).await?;
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(HEAD_CHANNEL)
        .bind(last_position.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(TxOutcome::Committed(Committed {
        streams,
        first_position,
        last_position,
        recorded_at,
    }))
}

async fn upsert_snapshot(conn: &mut sqlx::PgConnection, s: &SnapshotWrite) -> Result<(), LogError> {
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
