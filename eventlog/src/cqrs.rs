//! `cqrs_es::persist::PersistedEventRepository` for [`EventLog`]: tenant `"default"`,
//! aggregate type = stream type, sequence = version, event_version = schema_version.
//!
//! Snapshots (`new_snapshot_store` / `new_aggregate_store`) are written in the same transaction
//! as the events. The stored snapshot version is the sequence of the last event of the commit;
//! this is exact whenever cqrs-es snapshots at the end of a commit (always for the aggregate
//! store, and for the snapshot store unless a single command's events run past a snapshot
//! boundary, which cqrs-es does not report to the repository).

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use serde_json::Value;

use crate::{
    AppendBatch, AppendOutcome, EventLog, ExpectedVersion, LogError, NewEvent, RecordedEvent,
    SnapshotWrite, StreamAppend, DEFAULT_TENANT,
};

const PAGE: i64 = 1000;
const REPLAY_QUEUE: usize = 256;

/// Leading integer of a cqrs-es event version ("1", "1.0", "2.3.1" -> 1, 1, 2; unparsable -> 1).
pub fn parse_event_version(v: &str) -> i32 {
    let digits: String = v
        .trim()
        .trim_start_matches(['v', 'V'])
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().unwrap_or(1)
}

fn to_serialized(e: RecordedEvent) -> SerializedEvent {
    SerializedEvent {
        aggregate_id: e.stream_id,
        sequence: e.version.max(0) as usize,
        aggregate_type: e.stream_type,
        event_type: e.event_type,
        event_version: e.schema_version.to_string(),
        payload: e.payload,
        metadata: e.metadata,
    }
}

impl From<LogError> for PersistenceError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Conflict { .. } => PersistenceError::OptimisticLockError,
            LogError::Serialization(e) => PersistenceError::DeserializationError(Box::new(e)),
            LogError::Database(
                e @ (sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)),
            ) => PersistenceError::ConnectionError(Box::new(e)),
            LogError::Database(sqlx::Error::Database(db))
                if db.kind() == sqlx::error::ErrorKind::UniqueViolation =>
            {
                // A racing writer took the same stream version.
                PersistenceError::OptimisticLockError
            }
            LogError::Closed => PersistenceError::ConnectionError(Box::new(LogError::Closed)),
            other => PersistenceError::UnknownError(Box::new(other)),
        }
    }
}

impl EventLog {
    async fn all_stream_events(
        &self,
        stream_type: &str,
        stream_id: &str,
        mut after: i64,
    ) -> Result<Vec<SerializedEvent>, LogError> {
        let mut out = Vec::new();
        loop {
            let page = self
                .read_stream(DEFAULT_TENANT, stream_type, stream_id, after, PAGE)
                .await?;
            let n = page.len() as i64;
            if let Some(last) = page.last() {
                after = last.version;
            }
            out.extend(page.into_iter().map(to_serialized));
            if n < PAGE {
                return Ok(out);
            }
        }
    }
}

impl PersistedEventRepository for EventLog {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        Ok(self.all_stream_events(A::TYPE, aggregate_id, 0).await?)
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let after = i64::try_from(last_sequence).unwrap_or(i64::MAX);
        Ok(self.all_stream_events(A::TYPE, aggregate_id, after).await?)
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        let snap = self
            .load_stored_snapshot(DEFAULT_TENANT, A::TYPE, aggregate_id)
            .await?;
        Ok(snap.map(|s| SerializedSnapshot {
            aggregate_id: aggregate_id.to_string(),
            aggregate: s.state,
            current_sequence: s.version.max(0) as usize,
            current_snapshot: s.snapshot_no.max(0) as usize,
        }))
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        let Some(first) = events.first() else {
            if let Some((aggregate_id, state, snapshot_no)) = snapshot_update {
                let version = self
                    .stream_version(DEFAULT_TENANT, A::TYPE, &aggregate_id)
                    .await?;
                self.save_stored_snapshot(SnapshotWrite {
                    tenant_id: DEFAULT_TENANT.to_string(),
                    stream_type: A::TYPE.to_string(),
                    stream_id: aggregate_id,
                    version,
                    state,
                    snapshot_no: Some(snapshot_no as i64),
                })
                .await?;
            }
            return Ok(());
        };
        let last_sequence = events.last().map_or(first.sequence, |e| e.sequence) as i64;
        let stream_type = if first.aggregate_type.is_empty() {
            A::TYPE.to_string()
        } else {
            first.aggregate_type.clone()
        };
        let snapshot = snapshot_update.map(|(aggregate_id, state, snapshot_no)| SnapshotWrite {
            tenant_id: DEFAULT_TENANT.to_string(),
            stream_type: stream_type.clone(),
            stream_id: aggregate_id,
            version: last_sequence,
            state,
            snapshot_no: Some(snapshot_no as i64),
        });
        let batch = AppendBatch {
            tenant_id: DEFAULT_TENANT.to_string(),
            streams: vec![StreamAppend {
                stream_type,
                stream_id: first.aggregate_id.clone(),
                expected_version: ExpectedVersion::Exact(first.sequence as i64 - 1),
                events: events
                    .iter()
                    .map(|e| NewEvent {
                        event_id: uuid::Uuid::now_v7(),
                        event_type: e.event_type.clone(),
                        schema_version: parse_event_version(&e.event_version),
                        payload: e.payload.clone(),
                        metadata: e.metadata.clone(),
                    })
                    .collect(),
            }],
            idempotency: None,
        };
        match self.append_with_snapshot(batch, snapshot).await? {
            AppendOutcome::Committed(_) => Ok(()),
            AppendOutcome::Duplicate(_) => Ok(()),
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        let (mut feed, stream) = ReplayStream::new(REPLAY_QUEUE);
        let log = self.clone();
        let id = aggregate_id.to_string();
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                let page = match log
                    .read_stream(DEFAULT_TENANT, A::TYPE, &id, after, PAGE)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        drop(feed.push(Err(e.into())).await);
                        return;
                    }
                };
                let n = page.len() as i64;
                for e in page {
                    after = e.version;
                    if feed.push(Ok(to_serialized(e))).await.is_err() {
                        return;
                    }
                }
                if n < PAGE {
                    return;
                }
            }
        });
        Ok(stream)
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let (mut feed, stream) = ReplayStream::new(REPLAY_QUEUE);
        let log = self.clone();
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                let page = match log
                    .read_stream_type(DEFAULT_TENANT, A::TYPE, after, PAGE)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        drop(feed.push(Err(e.into())).await);
                        return;
                    }
                };
                let n = page.len() as i64;
                for e in page {
                    after = e.position;
                    if feed.push(Ok(to_serialized(e))).await.is_err() {
                        return;
                    }
                }
                if n < PAGE {
                    return;
                }
            }
        });
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_event_version;

    #[test]
    fn event_version_leading_integer() {
        assert_eq!(parse_event_version("1"), 1);
        assert_eq!(parse_event_version("1.0"), 1);
        assert_eq!(parse_event_version("2.3.1"), 2);
        assert_eq!(parse_event_version("v3"), 3);
        assert_eq!(parse_event_version(""), 1);
        assert_eq!(parse_event_version("x"), 1);
    }
}
