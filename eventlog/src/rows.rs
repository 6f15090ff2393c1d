//! Row <-> value mapping shared by the two backends (column lists and decoders).

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use crate::{IdempotencyRecord, LogError, RecordedEvent, StoredSnapshot};

pub(crate) const EVENT_COLUMNS: &str = "global_position, event_id, tenant_id, stream_type, \
     stream_id, version, event_type, schema_version, payload, metadata, recorded_at, prev_hash, hash";

pub(crate) const IDEMPOTENCY_COLUMNS: &str =
    "key, request_hash, status, stream_type, stream_id, version, position, created_at";

/// SQLite stores timestamps as fixed-width RFC 3339 text with microseconds (sortable).
pub(crate) fn ts_to_text(ts: DateTime<Utc>) -> String {
    ts.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

pub(crate) fn text_to_ts(s: &str) -> Result<DateTime<Utc>, LogError> {
    DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| LogError::Database(sqlx::Error::Decode(Box::new(e))))
}

pub(crate) fn status_from_i64(v: i64) -> Result<u16, LogError> {
    u16::try_from(v).map_err(|e| LogError::Database(sqlx::Error::Decode(Box::new(e))))
}

pub(crate) fn sqlite_event(row: &sqlx::sqlite::SqliteRow) -> Result<RecordedEvent, LogError> {
    let event_id: String = row.try_get("event_id")?;
    let payload: String = row.try_get("payload")?;
    let metadata: String = row.try_get("metadata")?;
    let recorded_at: String = row.try_get("recorded_at")?;
    Ok(RecordedEvent {
        position: row.try_get("global_position")?,
        event_id: Uuid::parse_str(&event_id)
            .map_err(|e| LogError::Database(sqlx::Error::Decode(Box::new(e))))?,
        tenant_id: row.try_get("tenant_id")?,
        stream_type: row.try_get("stream_type")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: serde_json::from_str(&payload)?,
        metadata: serde_json::from_str(&metadata)?,
        recorded_at: text_to_ts(&recorded_at)?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

pub(crate) fn pg_event(row: &sqlx::postgres::PgRow) -> Result<RecordedEvent, LogError> {
    Ok(RecordedEvent {
        position: row.try_get("global_position")?,
        event_id: row.try_get("event_id")?,
        tenant_id: row.try_get("tenant_id")?,
        stream_type: row.try_get("stream_type")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        recorded_at: row.try_get("recorded_at")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

pub(crate) fn sqlite_idempotency(
    row: &sqlx::sqlite::SqliteRow,
) -> Result<IdempotencyRecord, LogError> {
    let created_at: String = row.try_get("created_at")?;
    Ok(IdempotencyRecord {
        key: row.try_get("key")?,
        request_hash: row.try_get("request_hash")?,
        status: status_from_i64(row.try_get("status")?)?,
        stream_type: row.try_get("stream_type")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("version")?,
        position: row.try_get("position")?,
        created_at: text_to_ts(&created_at)?,
    })
}

pub(crate) fn pg_idempotency(row: &sqlx::postgres::PgRow) -> Result<IdempotencyRecord, LogError> {
    let status: i32 = row.try_get("status")?;
    Ok(IdempotencyRecord {
        key: row.try_get("key")?,
        request_hash: row.try_get("request_hash")?,
        status: status_from_i64(i64::from(status))?,
        stream_type: row.try_get("stream_type")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("version")?,
        position: row.try_get("position")?,
        created_at: row.try_get("created_at")?,
    })
}

pub(crate) fn sqlite_snapshot(row: &sqlx::sqlite::SqliteRow) -> Result<StoredSnapshot, LogError> {
    let state: String = row.try_get("state")?;
    Ok(StoredSnapshot {
        version: row.try_get("version")?,
        state: serde_json::from_str(&state)?,
        snapshot_no: row.try_get("snapshot_no")?,
    })
}

pub(crate) fn pg_snapshot(row: &sqlx::postgres::PgRow) -> Result<StoredSnapshot, LogError> {
    Ok(StoredSnapshot {
        version: row.try_get("version")?,
        state: row.try_get("state")?,
        snapshot_no: row.try_get("snapshot_no")?,
    })
}
