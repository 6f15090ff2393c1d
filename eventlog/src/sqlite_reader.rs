//! The SQLite log's bulk reads of events (the whole log in position order or
//! stream by stream, as rebuilds and projection workers read it, and one
//! stream type's events): synchronous connections (rusqlite) on the runtime's
//! blocking threads, at most [`MAX_CONNECTIONS`] at once. (A command's read of
//! its own stream, a few rows, stays on the sqlx pool: moved here too, the
//! SQLite closed loop did not tell the two apart in five runs.)
//!
//! Why not the sqlx pool: sqlx hands every row of a result from its
//! connection's worker thread to the awaiting task over a channel, and copies
//! it into a row value before it is decoded: reading a log of 112,631
//! events that way took 2.0-2.8 s (2.5-3.0 s of CPU), this way 1.2-1.5 s
//! (1.2-1.3 s of CPU). Here one blocking task steps the statement and decodes
//! each row straight from SQLite's buffers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Row};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::rows::{text_to_ts, EVENT_COLUMNS};
use crate::sqlite_writer::{self, database};
use crate::{LogError, RecordedEvent, StreamCursor};

/// Most connections open at once (reads beyond wait their turn), as the
/// sqlx pool these reads used before had; each keeps its own page cache.
const MAX_CONNECTIONS: usize = 8;

/// Opens read connections on the log's file and keeps idle ones for reuse.
#[derive(Clone)]
pub(crate) struct BulkReader {
    inner: Arc<Inner>,
}

struct Inner {
    filename: PathBuf,
    busy_timeout: Duration,
    /// A permit per connection a read may hold.
    permits: Arc<Semaphore>,
    /// None once the log is closed: reads then fail with [`LogError::Closed`].
    idle: Mutex<Option<Vec<Connection>>>,
    /// Bytes of the file each new connection maps (`PRAGMA mmap_size`; 0:
    /// none, pages are copied in with `pread`).
    map_size: AtomicU64,
}

impl BulkReader {
    pub(crate) fn new(filename: &Path, busy_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                filename: filename.to_path_buf(),
                busy_timeout,
                permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
                idle: Mutex::new(Some(Vec::new())),
                map_size: AtomicU64::new(0),
            }),
        }
    }

    /// Makes later reads map up to `bytes` of the log file instead of
    /// copying its pages in: a read stream by stream visits each page many
    /// times, and a `pread` copies it every time. Mapped pages count in the
    /// process's resident memory, so only a process that reads the whole log
    /// and exits (`crm rebuild`) asks for it. Idle connections are closed so
    /// every later read has it.
    pub(crate) fn map_file(&self, bytes: u64) {
        self.inner.map_size.store(bytes, Ordering::Relaxed);
        if let Ok(mut idle) = self.inner.idle.lock() {
            if let Some(idle) = idle.as_mut() {
                idle.clear();
            }
        }
    }

    /// Up to `limit` events after `after_position`, in position order.
    pub(crate) async fn read_all(
        &self,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.run(move |conn| {
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > ?1 \
                 ORDER BY global_position LIMIT ?2"
            );
            collect(conn, &sql, rusqlite::params![after_position, limit.max(0)])
        })
        .await
    }

    /// Up to `limit` events of one tenant's streams of one type after
    /// `after_position`, in position order.
    pub(crate) async fn read_stream_type(
        &self,
        tenant: &str,
        stream_type: &str,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let (tenant, stream_type) = (tenant.to_string(), stream_type.to_string());
        self.run(move |conn| {
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = ?1 AND stream_type = ?2 \
                 AND global_position > ?3 ORDER BY global_position LIMIT ?4"
            );
            collect(
                conn,
                &sql,
                rusqlite::params![tenant, stream_type, after_position, limit.max(0)],
            )
        })
        .await
    }

    /// Up to `limit` events at positions up to `up_to`, ordered by stream
    /// (tenant, type, id) and version, after `after` (from the start: None).
    pub(crate) async fn read_by_stream(
        &self,
        up_to: i64,
        after: Option<&StreamCursor>,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let cursor = after.cloned().unwrap_or_else(StreamCursor::before_all);
        self.run(move |conn| {
            // The row-value comparison walks the (tenant, stream type, stream id,
            // version) unique index from the cursor on; from the start too (a
            // start without it sorts the whole log for the first page).
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM events \
                 WHERE (tenant_id, stream_type, stream_id, version) > (?1, ?2, ?3, ?4) \
                 AND global_position <= ?5 \
                 ORDER BY tenant_id, stream_type, stream_id, version LIMIT ?6"
            );
            collect(
                conn,
                &sql,
                rusqlite::params![
                    cursor.tenant_id,
                    cursor.stream_type,
                    cursor.stream_id,
                    cursor.version,
                    up_to,
                    limit.max(0)
                ],
            )
        })
        .await
    }

    /// Drops the idle connections; later reads fail with [`LogError::Closed`].
    pub(crate) fn close(&self) {
        self.inner.permits.close();
        let idle = self.inner.idle.lock().ok().and_then(|mut idle| idle.take());
        drop(idle);
    }

    /// Runs `read` on a blocking thread with a connection (an idle one, or a
    /// new one), and keeps the connection for the next read if it succeeded.
    async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let inner = Arc::clone(&self.inner);
        let permit = Arc::clone(&inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| LogError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match inner.take_idle()? {
                Some(conn) => conn,
                None => inner.connect()?,
            };
            let result = read(&conn);
            if result.is_ok() {
                inner.put_back(conn);
            }
            result
        })
        .await
        .map_err(|e| LogError::Database(sqlx::Error::Protocol(format!("log read task: {e}"))))?
    }
}

impl Inner {
    fn take_idle(&self) -> Result<Option<Connection>, LogError> {
        let mut idle = self.idle.lock().map_err(|_| LogError::Closed)?;
        Ok(idle.as_mut().ok_or(LogError::Closed)?.pop())
    }

    fn put_back(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            if let Some(idle) = idle.as_mut() {
                idle.push(conn);
            }
        }
    }

    fn connect(&self) -> Result<Connection, LogError> {
        let conn = sqlite_writer::open(&self.filename, self.busy_timeout)?;
        // A reader never writes: SQLite refuses it if a bug ever tried.
        conn.execute_batch("PRAGMA query_only = ON")
            .map_err(database)?;
        let map_size = self.map_size.load(Ordering::Relaxed);
        if map_size > 0 {
            conn.execute_batch(&format!("PRAGMA mmap_size = {map_size}"))
                .map_err(database)?;
        }
        Ok(conn)
    }
}

fn collect(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RecordedEvent>, LogError> {
    let mut statement = conn.prepare_cached(sql).map_err(database)?;
    let mut rows = statement.query(params).map_err(database)?;
    let mut events = Vec::new();
    while let Some(row) = rows.next().map_err(database)? {
        events.push(event(row)?);
    }
    Ok(events)
}

/// One row of [`EVENT_COLUMNS`], decoded from SQLite's own buffers (payload
/// and metadata parsed from their bytes, not copied into a `String` first).
fn event(row: &Row<'_>) -> Result<RecordedEvent, LogError> {
    fn get<T: rusqlite::types::FromSql>(row: &Row<'_>, index: usize) -> Result<T, LogError> {
        row.get(index).map_err(database)
    }
    let text = |index: usize| -> Result<&str, LogError> {
        row.get_ref(index)
            .and_then(|value| value.as_str().map_err(Into::into))
            .map_err(database)
    };
    let json = |index: usize| -> Result<serde_json::Value, LogError> {
        let bytes = row
            .get_ref(index)
            .and_then(|value| value.as_bytes().map_err(Into::into))
            .map_err(database)?;
        Ok(serde_json::from_slice(bytes)?)
    };
    Ok(RecordedEvent {
        position: get(row, 0)?,
        event_id: Uuid::parse_str(text(1)?)
            .map_err(|e| LogError::Database(sqlx::Error::Decode(Box::new(e))))?,
        tenant_id: get(row, 2)?,
        stream_type: get(row, 3)?,
        stream_id: get(row, 4)?,
        version: get(row, 5)?,
        event_type: get(row, 6)?,
        schema_version: get(row, 7)?,
        payload: json(8)?,
        metadata: json(9)?,
        recorded_at: text_to_ts(text(10)?)?,
        prev_hash: get(row, 11)?,
        hash: get(row, 12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader on a new, empty log file in `dir`.
    async fn reader_on_a_new_log(dir: &tempfile::TempDir) -> BulkReader {
        let path = dir.path().join("events.db");
        // Creates the file with the log's tables.
        crate::EventLog::open_sqlite(&path)
            .await
            .unwrap()
            .close()
            .await;
        BulkReader::new(&path, Duration::from_secs(1))
    }

    /// The log refuses reads after `close` before they reach the reader; this
    /// checks the reader's own refusal, and that a read waiting for a
    /// connection is refused too instead of waiting forever.
    #[tokio::test]
    async fn a_closed_reader_refuses_reads_and_wakes_the_waiting_ones() {
        let dir = tempfile::tempdir().unwrap();
        let reader = reader_on_a_new_log(&dir).await;
        assert!(reader.read_all(0, 10).await.unwrap().is_empty());
        let held = Arc::clone(&reader.inner.permits)
            .acquire_many_owned(MAX_CONNECTIONS as u32)
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let reader = reader.clone();
            async move { reader.read_all(0, 10).await }
        });
        tokio::task::yield_now().await;
        reader.close();
        let woken = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a read waiting for a connection is woken by close");
        assert!(matches!(woken.unwrap(), Err(LogError::Closed)));
        drop(held);
        assert!(matches!(
            reader.read_all(0, 10).await,
            Err(LogError::Closed)
        ));
        assert!(matches!(
            reader.read_by_stream(i64::MAX, None, 10).await,
            Err(LogError::Closed)
        ));
    }

    /// Once asked to map the file, every later read's connection maps it,
    /// the idle ones made before included (they are closed), and reads still
    /// answer.
    #[tokio::test]
    async fn a_mapped_reader_maps_the_file_on_every_later_read() {
        let dir = tempfile::tempdir().unwrap();
        let reader = reader_on_a_new_log(&dir).await;
        let mapped = || {
            reader.run(|conn| {
                conn.query_row("PRAGMA mmap_size", [], |row| row.get::<_, i64>(0))
                    .map_err(database)
            })
        };
        assert_eq!(mapped().await.unwrap(), 0, "not mapped unless asked");
        reader.map_file(1 << 20);
        assert_eq!(mapped().await.unwrap(), 1 << 20);
        assert!(reader.read_all(0, 10).await.unwrap().is_empty());
    }
}
