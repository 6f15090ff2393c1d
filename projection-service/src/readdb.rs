//! The read-model database: SQLite (embedded, its own file beside the log) or
//! PostgreSQL, through sqlx's `Any` driver so each projection's SQL is written
//! once. SQL here uses `$1`-style placeholders (both backends accept them),
//! each placeholder used once, and only portable types: BIGINT, TEXT, DOUBLE
//! PRECISION; timestamps as RFC 3339 UTC text with microseconds (sortable),
//! money amounts as decimal text, JSON as text.

use std::path::{Path, PathBuf};

use sqlx::any::{install_default_drivers, AnyPoolOptions};
use sqlx::AnyPool;

/// Which engine holds the read models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBackend {
    Sqlite,
    Postgres,
}

/// WAL pages (4 KiB each, so 64 MiB) after which a commit copies the WAL back
/// into the read-model file. SQLite's default is 1,000: a rebuild then
/// checkpointed every few batches, copying the B-trees' busiest pages (the
/// rightmost leaves and their parents, rewritten by every batch) again each
/// time and syncing the file for each. Rebuilds took 11-18 % less wall time
/// in three alternated pairs by hand (two of history, one of audit;
/// bench/README.md, cause 4); the WAL file stays up to this size on disk.
pub(crate) const WAL_CHECKPOINT_PAGES: u32 = 16_384;

/// How long a read-model writer waits for another one's write lock (ms).
pub(crate) const BUSY_TIMEOUT_MS: u32 = 10_000;

/// A pool on the read-model database.
#[derive(Clone, Debug)]
pub struct ReadDb {
    pub pool: AnyPool,
    pub backend: ReadBackend,
    /// The URL it was opened with (workers open their lease connection from it).
    pub url: String,
    /// The SQLite file, when the read models are in one (not in memory).
    pub file: Option<PathBuf>,
}

impl ReadDb {
    /// Opens (creating if needed) an SQLite read-model file.
    pub async fn open_sqlite(path: &Path) -> Result<Self, sqlx::Error> {
        Self::connect(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// `sqlite://...` or `postgres://...`.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            ReadBackend::Sqlite
        } else {
            ReadBackend::Postgres
        };
        let max_connections = if backend == ReadBackend::Sqlite {
            4
        } else {
            10
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            // Fail fast (503) when the database is gone instead of queueing for 30 s.
            .acquire_timeout(std::time::Duration::from_secs(5))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == ReadBackend::Sqlite {
                        use sqlx::Executor;
                        connection.execute("PRAGMA journal_mode=WAL").await?;
                        connection.execute("PRAGMA synchronous=NORMAL").await?;
                        connection
                            .execute(format!("PRAGMA busy_timeout={BUSY_TIMEOUT_MS}").as_str())
                            .await?;
                        connection
                            .execute(
                                format!("PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
                                    .as_str(),
                            )
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        Ok(Self {
            pool,
            backend,
            url: url.to_string(),
            file: sqlite_file(url),
        })
    }
}

/// The file an `sqlite:` URL names (None: in memory, or not SQLite).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.contains(":memory:")).then(|| PathBuf::from(path))
}

impl ReadDb {
    /// A transaction that will write. On SQLite it takes the write lock up
    /// front (`BEGIN IMMEDIATE`): a deferred transaction that reads and then
    /// writes fails at once with "database is locked" when another connection
    /// (another worker, `crm rebuild`) wrote in between, instead of waiting.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            ReadBackend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            ReadBackend::Postgres => self.pool.begin().await,
        }
    }

    /// A transaction that folds a batch with its checkpoint. On PostgreSQL
    /// its commit does not wait for the WAL flush (`synchronous_commit` off
    /// for this transaction only): the rows are derived from the log, which
    /// stays durable, and the batch and its checkpoint commit or vanish
    /// together, so a crash can only lose the last few batches, folded again
    /// from the checkpoint left. A commit made visible after the log's
    /// synchronous commits comes after them in the WAL too, so a checkpoint
    /// that survives never points past a lost event. In a statement log of a
    /// paced run a `COMMIT` took 1.4 ms on average against folds of 6-13 ms,
    /// and five folds per batch added their flushes to the commands'
    /// (bench/README.md, cause 4).
    pub async fn begin_fold(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            ReadBackend::Sqlite => self.begin_write().await,
            ReadBackend::Postgres => {
                self.pool
                    .begin_with("BEGIN; SET LOCAL synchronous_commit TO OFF")
                    .await
            }
        }
    }
}

/// Whether a database error is worth retrying as is (lock contention, a lost
/// connection) rather than a sign that the event or the projection is wrong.
pub fn is_transient(error: &sqlx::Error) -> bool {
    if crm_eventlog::LogError::sqlx_is_unavailable(error) {
        return true;
    }
    let sqlx::Error::Database(database) = error else {
        return false;
    };
    let code = database.code().unwrap_or_default();
    // SQLite: BUSY (5), LOCKED (6) and their extended codes; PostgreSQL:
    // serialization failure and deadlock.
    code.parse::<i64>()
        .is_ok_and(|code| matches!(code & 0xff, 5 | 6))
        || matches!(code.as_ref(), "40001" | "40P01")
}

/// Timestamps in the read models: RFC 3339 UTC with microseconds, so text order is time order.
pub fn timestamp(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    #[test]
    fn the_sqlite_file_is_read_off_the_url() {
        use super::sqlite_file;
        assert_eq!(
            sqlite_file("sqlite:///data/read.db?mode=rwc"),
            Some("/data/read.db".into())
        );
        assert_eq!(sqlite_file("sqlite:read.db"), Some("read.db".into()));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("sqlite://:memory:"), None);
        assert_eq!(sqlite_file("postgres://postgres@127.0.0.1/test"), None);
    }

    #[tokio::test]
    async fn sqlite_read_models_checkpoint_their_wal_every_64_mib() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::ReadDb::open_sqlite(&dir.path().join("read.db"))
            .await
            .unwrap();
        let pages: i64 = sqlx::query("PRAGMA wal_autocheckpoint")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(pages, i64::from(super::WAL_CHECKPOINT_PAGES));
        assert_eq!(pages * 4096, 64 << 20);
    }
}
