//! `crm-eventlog`: the CRM system of record. An append-only event log with two
//! interchangeable backends behind one [`EventLog`] handle:
//!
//! * **SQLite** (embedded default): WAL mode, `synchronous=FULL`, one writer connection
//!   (rusqlite) owned by a *group-commit* writer thread, and a separate read pool (sqlx). An append whose caller
//!   stops waiting (future dropped) may still commit; retry with an idempotency key.
//!   Positions are assigned by the single writer, so they are contiguous and commit ordered by
//!   construction.
//! * **PostgreSQL**: a *group-commit* writer task per process commits the queued appends in one
//!   transaction of set-based statements (several processes may write at once); positions are
//!   handed out from a one-row `log_head` table under a row lock held until commit, so positions
//!   become visible strictly in commit order and a reader paging by position never skips a
//!   late-committing event.
//!   Commits `NOTIFY crm_eventlog_head`; a background listener moves [`EventLog::subscribe`].
//!
//! Also: idempotency records written in the same transaction as the events, snapshots, and an
//! implementation of [`cqrs_es::persist::PersistedEventRepository`] (tenant `"default"`).

mod cqrs;
mod error;
mod pg_group;
mod postgres;
pub mod relay;
mod rows;
mod sqlite;
mod sqlite_reader;
mod sqlite_writer;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use cqrs::parse_event_version;
pub use error::LogError;
pub use postgres::HEAD_CHANNEL;
pub use types::*;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Tenant used by the `cqrs_es` repository implementation.
pub const DEFAULT_TENANT: &str = "default";

/// Histogram of append latency (seconds, one sample per append whatever its
/// outcome; label `backend` = `sqlite` | `postgres`), group-commit wait included.
pub const APPEND_SECONDS: &str = "crm_append_duration_seconds";

/// Snapshot write carried inside an append (same transaction as the events).
#[derive(Clone, Debug)]
pub(crate) struct SnapshotWrite {
    pub tenant_id: String,
    pub stream_type: String,
    pub stream_id: String,
    pub version: i64,
    pub state: serde_json::Value,
    /// Explicit snapshot counter (cqrs-es); `None` = previous + 1.
    pub snapshot_no: Option<i64>,
}

/// A snapshot with its cqrs-es snapshot counter.
#[derive(Clone, Debug)]
pub(crate) struct StoredSnapshot {
    pub version: i64,
    pub state: serde_json::Value,
    pub snapshot_no: i64,
}

enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

struct Inner {
    store: Store,
    head: watch::Sender<i64>,
    closed: AtomicBool,
}

/// Handle to the event log. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("backend", &self.backend())
            .field("head", &*self.inner.head.borrow())
            .finish()
    }
}

impl EventLog {
    /// Connects to `sqlite://<path>` (file created if missing), `sqlite::memory:`, or
    /// `postgres://...` / `postgresql://...`, and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, LogError> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            let (head_tx, _) = watch::channel(0);
            let store = postgres::PgStore::connect(url, head_tx.clone()).await?;
            Ok(Self::from_store(Store::Postgres(store), head_tx))
        } else if lower.starts_with("sqlite:") {
            let opts = sqlite::options_from_url(url)?;
            Self::open_sqlite_with(opts).await
        } else {
            Err(LogError::InvalidUrl(url.to_string()))
        }
    }

    /// Opens (creating if missing) an SQLite event log file and runs the migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Self, LogError> {
        Self::open_sqlite_with(sqlite::options_from_path(path)).await
    }

    async fn open_sqlite_with(opts: sqlx::sqlite::SqliteConnectOptions) -> Result<Self, LogError> {
        let (head_tx, _) = watch::channel(0);
        let store = sqlite::SqliteStore::open(opts, head_tx.clone()).await?;
        Ok(Self::from_store(Store::Sqlite(store), head_tx))
    }

    fn from_store(store: Store, head: watch::Sender<i64>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                head,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// On the embedded log, makes the bulk reads (`read_all`,
    /// `read_by_stream`, ...) map up to `bytes` of the file rather than copy
    /// its pages in, for a process that replays the whole log and exits:
    /// mapped pages count in its resident memory. PostgreSQL: nothing.
    pub fn map_file_for_bulk_reads(&self, bytes: u64) {
        if let Store::Sqlite(store) = &self.inner.store {
            store.map_file_for_bulk_reads(bytes);
        }
    }

    /// Which database backs this log.
    pub fn backend(&self) -> Backend {
        match self.inner.store {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    fn check_open(&self) -> Result<(), LogError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(LogError::Closed)
        } else {
            Ok(())
        }
    }

    /// Appends one batch atomically (one transaction across all its streams).
    pub async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, LogError> {
        self.append_with_snapshot(batch, None).await
    }

    pub(crate) async fn append_with_snapshot(
        &self,
        batch: AppendBatch,
        snapshot: Option<SnapshotWrite>,
    ) -> Result<AppendOutcome, LogError> {
        self.check_open()?;
        if batch.streams.is_empty() || batch.streams.iter().any(|s| s.events.is_empty()) {
            return Err(LogError::EmptyAppend);
        }
        let started = std::time::Instant::now();
        let outcome = match &self.inner.store {
            Store::Sqlite(s) => s.append(batch, snapshot).await,
            Store::Postgres(s) => s.append(batch, snapshot, &self.inner.head).await,
        };
        let backend = match self.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        metrics::histogram!(APPEND_SECONDS, "backend" => backend)
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    /// Events of one stream with `version > after_version`, ascending, at most `limit`.
    pub async fn read_stream(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => {
                s.read_stream(tenant, stream_type, stream_id, after_version, limit)
                    .await
            }
            Store::Postgres(s) => {
                s.read_stream(tenant, stream_type, stream_id, after_version, limit)
                    .await
            }
        }
    }

    /// Current version of a stream; 0 when the stream does not exist.
    pub async fn stream_version(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
    ) -> Result<i64, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => s.stream_version(tenant, stream_type, stream_id).await,
            Store::Postgres(s) => s.stream_version(tenant, stream_type, stream_id).await,
        }
    }

    /// Global feed: events with `position > after_position`, ascending, at most `limit`.
    /// Gap-free: an event never becomes visible after an event with a higher position was seen.
    pub async fn read_all(
        &self,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => s.read_all(after_position, limit).await,
            Store::Postgres(s) => s.read_all(after_position, limit).await,
        }
    }

    /// Events at positions up to `up_to`, stream by stream: ordered by tenant,
    /// stream type, stream id and version, starting after `after` (from the
    /// first stream when None), at most `limit`. For rebuilding read models
    /// keyed by stream, which then write each stream's rows together and in
    /// key order. `up_to` should be a head this log reported: every position
    /// up to it is committed, so the pages together hold exactly those events.
    pub async fn read_by_stream(
        &self,
        up_to: i64,
        after: Option<&StreamCursor>,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => s.read_by_stream(up_to, after, limit).await,
            Store::Postgres(s) => s.read_by_stream(up_to, after, limit).await,
        }
    }

    /// Events of one stream type of a tenant (all stream ids) with `position > after_position`,
    /// ascending by position, at most `limit`.
    pub async fn read_stream_type(
        &self,
        tenant: &str,
        stream_type: &str,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => {
                s.read_stream_type(tenant, stream_type, after_position, limit)
                    .await
            }
            Store::Postgres(s) => {
                s.read_stream_type(tenant, stream_type, after_position, limit)
                    .await
            }
        }
    }

    /// Position of the last committed event (0 = empty log).
    pub async fn head_position(&self) -> Result<i64, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => s.head_position().await,
            Store::Postgres(s) => s.head_position().await,
        }
    }

    /// Watch of the latest committed head position. Moves after every commit by this process
    /// and, on PostgreSQL, after commits by other processes (LISTEN/NOTIFY).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.inner.head.subscribe()
    }

    /// Waits until the head has reached `position` (a client reading its own
    /// write through another replica), at most `timeout`. `Err(head)` when it
    /// has not: the caller answers "not yet" with the current position.
    pub async fn wait_for_position(
        &self,
        position: i64,
        timeout: std::time::Duration,
    ) -> Result<(), LogError> {
        let mut head_watch = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let head = self.head_position().await?;
            if head >= position {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(LogError::NotYet {
                    head,
                    wanted: position,
                });
            }
            // Wake on the next commit, and re-read at least every 100 ms
            // (another process's commit may not move this watch).
            let nap = (deadline - now).min(std::time::Duration::from_millis(100));
            if let Ok(Err(_)) = tokio::time::timeout(nap, head_watch.changed()).await {
                tokio::time::sleep(nap).await;
            }
        }
    }

    /// The stored idempotency record for `key`, if any.
    pub async fn idempotency_record(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => s.idempotency_record(tenant, key).await,
            Store::Postgres(s) => s.idempotency_record(tenant, key).await,
        }
    }

    /// The stored snapshot of a stream, if any.
    pub async fn load_snapshot(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
    ) -> Result<Option<Snapshot>, LogError> {
        Ok(self
            .load_stored_snapshot(tenant, stream_type, stream_id)
            .await?
            .map(|s| Snapshot {
                version: s.version,
                state: s.state,
            }))
    }

    pub(crate) async fn load_stored_snapshot(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
    ) -> Result<Option<StoredSnapshot>, LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => s.load_snapshot(tenant, stream_type, stream_id).await,
            Store::Postgres(s) => s.load_snapshot(tenant, stream_type, stream_id).await,
        }
    }

    /// Stores a snapshot. Only the newest is kept: a snapshot with a lower version than the
    /// stored one is ignored.
    pub async fn save_snapshot(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
        snapshot: Snapshot,
    ) -> Result<(), LogError> {
        self.save_stored_snapshot(SnapshotWrite {
            tenant_id: tenant.to_string(),
            stream_type: stream_type.to_string(),
            stream_id: stream_id.to_string(),
            version: snapshot.version,
            state: snapshot.state,
            snapshot_no: None,
        })
        .await
    }

    pub(crate) async fn save_stored_snapshot(&self, snap: SnapshotWrite) -> Result<(), LogError> {
        self.check_open()?;
        match &self.inner.store {
            Store::Sqlite(s) => s.save_snapshot(snap).await,
            Store::Postgres(s) => s.save_snapshot(snap).await,
        }
    }

    /// Test hook (feature `testing`): on PostgreSQL, sleep a random time up to `max` after a
    /// group is written and before it commits (while holding the position lock), to widen
    /// commit races in concurrency tests. No effect on SQLite.
    #[cfg(feature = "testing")]
    pub fn set_pre_commit_delay(&self, max: std::time::Duration) {
        if let Store::Postgres(s) = &self.inner.store {
            s.set_pre_commit_delay(max);
        }
    }

    /// Graceful shutdown: waits for queued appends to commit, then closes all connections.
    /// Later calls on any clone return [`LogError::Closed`]. Idempotent.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        match &self.inner.store {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(s) => s.close().await,
        }
    }
}

/// Raises the watched head to `pos` if it is higher (never moves backwards).
pub(crate) fn bump_head(head: &watch::Sender<i64>, pos: i64) {
    head.send_if_modified(|h| {
        if pos > *h {
            *h = pos;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod send_tests {
    //! Every public future must be `Send` so callers can `tokio::spawn` them / use them in axum.
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[allow(dead_code, clippy::diverging_sub_expression)]
    fn futures_are_send(log: EventLog, batch: AppendBatch) {
        let f = EventLog::connect("sqlite::memory:");
        assert_send(&f);
        let f = EventLog::open_sqlite(Path::new("x"));
        assert_send(&f);
        let f = log.append(batch);
        assert_send(&f);
        let f = log.read_stream("t", "s", "i", 0, 1);
        assert_send(&f);
        let f = log.read_all(0, 1);
        assert_send(&f);
        let f = log.head_position();
        assert_send(&f);
        let f = log.stream_version("t", "s", "i");
        assert_send(&f);
        let f = log.idempotency_record("t", "k");
        assert_send(&f);
        let f = log.load_snapshot("t", "s", "i");
        assert_send(&f);
        let f = log.save_snapshot(
            "t",
            "s",
            "i",
            Snapshot {
                version: 1,
                state: serde_json::Value::Null,
            },
        );
        assert_send(&f);
        let f = log.close();
        assert_send(&f);
        fn spawnable<F: std::future::Future + Send + 'static>(_: F) {}
        let l = log.clone();
        spawnable(async move {
            let _ = EventLog::connect("sqlite::memory:").await;
            let _ = l.read_all(0, 1).await;
            l.close().await;
        });
    }
}
