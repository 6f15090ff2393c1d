//! The log's error type.

/// Errors returned by [`crate::EventLog`].
#[derive(thiserror::Error, Debug)]
pub enum LogError {
    /// Expected-version check failed; nothing was written.
    #[error("version conflict on {stream_type}/{stream_id}: expected version {expected}, actual {actual}")]
    Conflict {
        stream_type: String,
        stream_id: String,
        expected: i64,
        actual: i64,
    },
    /// The batch had no streams, or a stream had no events.
    #[error("append batch contains no events (every stream needs at least one)")]
    EmptyAppend,
    /// The connection URL is not a supported sqlite/postgres URL.
    #[error("invalid event log url: {0}")]
    InvalidUrl(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("serialization error: {0}")]
    Serialization(#[from] serde_json::Error),
    /// The log was closed.
    #[error("event log is closed")]
    Closed,
    /// `wait_for_position` timed out: the head is still below the wanted position.
    #[error("the event log is at position {head}, below {wanted}")]
    NotYet { head: i64, wanted: i64 },
}
