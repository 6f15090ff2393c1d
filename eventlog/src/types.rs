//! Public value types of the event log: what callers append and what they read back.

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

/// Which database the log runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One command's worth of events: one transaction, all-or-nothing across all streams.
#[derive(Clone, Debug, PartialEq)]
pub struct AppendBatch {
    pub tenant_id: String,
    pub streams: Vec<StreamAppend>,
    pub idempotency: Option<NewIdempotencyRecord>,
}

/// Events for one stream inside an [`AppendBatch`].
#[derive(Clone, Debug, PartialEq)]
pub struct StreamAppend {
    pub stream_type: String,
    pub stream_id: String,
    pub expected_version: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

impl StreamAppend {
    /// The optimistic concurrency check against the stream's `actual`
    /// version before this append: a `Conflict` naming the stream when the
    /// expectation pins another version.
    pub(crate) fn check_version(&self, actual: i64) -> Result<(), crate::LogError> {
        match self.expected_version.pinned() {
            Some(expected) if expected != actual => Err(crate::LogError::Conflict {
                stream_type: self.stream_type.clone(),
                stream_id: self.stream_id.clone(),
                expected,
                actual,
            }),
            _ => Ok(()),
        }
    }
}

/// Optimistic concurrency check for a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet (same as `Exact(0)`).
    NoStream,
    /// The stream must be at exactly this version (0 = no stream).
    Exact(i64),
}

impl ExpectedVersion {
    /// The version this expectation pins, if any (`NoStream` pins 0).
    pub fn pinned(self) -> Option<i64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        }
    }
}

/// An event to append. `event_id` should be a UUID v7.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Value,
    pub metadata: Value,
}

/// Idempotency record to store with the batch (same transaction).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewIdempotencyRecord {
    pub key: String,
    pub request_hash: String,
    pub status: u16,
}

/// What an append did.
#[derive(Clone, Debug, PartialEq)]
pub enum AppendOutcome {
    /// The batch was written.
    Committed(Committed),
    /// The idempotency key was already used; nothing was written.
    Duplicate(IdempotencyRecord),
}

/// Positions and versions of a committed batch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Committed {
    /// One entry per [`StreamAppend`], in batch order.
    pub streams: Vec<CommittedStream>,
    pub first_position: i64,
    pub last_position: i64,
    pub recorded_at: DateTime<Utc>,
}

/// Versions written to one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CommittedStream {
    pub stream_type: String,
    pub stream_id: String,
    pub first_version: i64,
    pub last_version: i64,
    pub last_position: i64,
}

/// A stored idempotency record: the outcome of the FIRST stream of the original batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdempotencyRecord {
    pub key: String,
    pub request_hash: String,
    pub status: u16,
    pub stream_type: String,
    pub stream_id: String,
    pub version: i64,
    pub position: i64,
    pub created_at: DateTime<Utc>,
}

/// Where a stream-by-stream read of the log stopped: the stream and version of
/// the last event it returned (see [`crate::EventLog::read_by_stream`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCursor {
    pub tenant_id: String,
    pub stream_type: String,
    pub stream_id: String,
    pub version: i64,
}

impl StreamCursor {
    /// A cursor before every event (no stream has an empty id and version 0).
    pub fn before_all() -> Self {
        Self {
            tenant_id: String::new(),
            stream_type: String::new(),
            stream_id: String::new(),
            version: i64::MIN,
        }
    }

    /// The cursor just past `event`.
    pub fn after(event: &RecordedEvent) -> Self {
        Self {
            tenant_id: event.tenant_id.clone(),
            stream_type: event.stream_type.clone(),
            stream_id: event.stream_id.clone(),
            version: event.version,
        }
    }
}

/// An event as stored in the log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordedEvent {
    pub position: i64,
    pub event_id: Uuid,
    pub tenant_id: String,
    pub stream_type: String,
    pub stream_id: String,
    pub version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_hex"
    )]
    pub prev_hash: Option<Vec<u8>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_hex"
    )]
    pub hash: Option<Vec<u8>>,
}

fn serialize_hex<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(b) => s.serialize_str(&hex::encode(b)),
        None => s.serialize_none(),
    }
}

/// Aggregate state at a stream version.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub version: i64,
    pub state: Value,
}

/// Microsecond-truncated UTC now (both backends store microseconds).
pub(crate) fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    let micros = now.timestamp_micros();
    DateTime::from_timestamp_micros(micros).unwrap_or(now)
}
