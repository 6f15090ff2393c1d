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
    /// A database failure. Displayed as `database unavailable: ...` when the
    /// database could not be reached (see [`LogError::is_unavailable`]), else
    /// `database error: ...`.
    #[error("database {kind}: {0}", kind = if LogError::sqlx_is_unavailable(.0) { "unavailable" } else { "error" })]
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

impl LogError {
    /// True when the database could not be reached or dropped the connection
    /// (down, restarting, unreachable, out of connections): a transient
    /// condition to answer with 503 and to retry, not a bug.
    pub fn is_unavailable(&self) -> bool {
        match self {
            LogError::Database(error) => Self::sqlx_is_unavailable(error),
            LogError::Closed => true,
            _ => false,
        }
    }

    /// [`LogError::is_unavailable`] for a bare `sqlx::Error` (e.g. of a
    /// read-model pool): pool timeouts, a closed pool, I/O and TLS failures,
    /// and the PostgreSQL SQLSTATEs of class 08 (connection exception),
    /// 57P01..57P03 (admin/crash shutdown, cannot connect now) and 53300
    /// (too many connections).
    pub fn sqlx_is_unavailable(error: &sqlx::Error) -> bool {
        match error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(database) => database.code().is_some_and(|code| {
                code.starts_with("08")
                    || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
            }),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogError;

    #[test]
    fn connection_failures_are_unavailable_and_say_so() {
        let down = LogError::Database(sqlx::Error::PoolTimedOut);
        assert!(down.is_unavailable());
        assert!(
            down.to_string().starts_with("database unavailable: "),
            "{down}"
        );
        let refused = LogError::Database(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(refused.is_unavailable());
        let bug = LogError::Database(sqlx::Error::RowNotFound);
        assert!(!bug.is_unavailable());
        assert!(bug.to_string().starts_with("database error: "), "{bug}");
        assert!(!LogError::EmptyAppend.is_unavailable());
    }
}
