//! Stream partitions of the distributed workers: which partition an event's
//! stream falls in, and the per-partition checkpoints (`rm_partitions`) of a
//! partitioned generation, whose minimum is the generation's serving position.

use crm_eventlog::RecordedEvent;
use sqlx::Row;

use crate::readdb::{timestamp, ReadDb};

/// Creates the partition checkpoint table (a companion of `rm_projections`).
pub async fn ensure(db: &ReadDb) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS rm_partitions (
            name TEXT NOT NULL,
            generation BIGINT NOT NULL,
            part BIGINT NOT NULL,
            parts BIGINT NOT NULL,
            checkpoint BIGINT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (name, generation, part))",
    )
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// The partition (0..parts) of the event's stream: FNV-1a of tenant, stream
/// type and stream id, finalised. Stable across versions and processes, so every worker
/// agrees and a stream's events always land in the same partition.
pub fn partition_of(event: &RecordedEvent, parts: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for field in [&event.tenant_id, &event.stream_type, &event.stream_id] {
        for byte in field.bytes().chain(std::iter::once(0x1f)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // FNV's low bits follow the last byte; fold the high bits in (murmur3's finaliser step).
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    (hash % u64::from(parts.max(1))) as u32
}

/// One partition's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionCheckpoint {
    pub part: i64,
    pub parts: i64,
    pub checkpoint: i64,
}

/// The partition checkpoints of one generation (empty: never partitioned).
pub async fn checkpoints(
    db: &ReadDb,
    name: &str,
    generation: i64,
) -> Result<Vec<PartitionCheckpoint>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT part, parts, checkpoint FROM rm_partitions WHERE name = $1 AND generation = $2 ORDER BY part",
    )
    .bind(name.to_string())
    .bind(generation)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PartitionCheckpoint {
                part: row.try_get("part")?,
                parts: row.try_get("parts")?,
                checkpoint: row.try_get("checkpoint")?,
            })
        })
        .collect()
}

/// Splits a generation into `parts` partitions, each starting at `from` (the
/// generation's checkpoint). Safe to race: existing rows are kept.
pub async fn split(
    db: &ReadDb,
    name: &str,
    generation: i64,
    parts: u32,
    from: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let now = timestamp(&chrono::Utc::now());
    for part in 0..i64::from(parts) {
        sqlx::query(
            "INSERT INTO rm_partitions (name, generation, part, parts, checkpoint, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name, generation, part) DO NOTHING",
        )
        .bind(name.to_string())
        .bind(generation)
        .bind(part)
        .bind(i64::from(parts))
        .bind(from)
        .bind(now.clone())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Moves partition `part` from `from` to `to` (compare-and-set) inside the
/// batch's transaction; false when the partition was not at `from`. Call
/// [`level_serving`] in the same transaction once the rows are written.
pub async fn claim(
    tx: &mut crate::projection::Tx,
    name: &str,
    generation: i64,
    part: i64,
    from: i64,
    to: i64,
) -> Result<bool, sqlx::Error> {
    let now = timestamp(&chrono::Utc::now());
    let moved = sqlx::query(
        "UPDATE rm_partitions SET checkpoint = $1, updated_at = $2
         WHERE name = $3 AND generation = $4 AND part = $5 AND checkpoint = $6",
    )
    .bind(to)
    .bind(now)
    .bind(name.to_string())
    .bind(generation)
    .bind(part)
    .bind(from)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(moved == 1)
}

/// Sets the generation's checkpoint to the lowest of its partitions'. Another
/// partition committing at the same moment may leave it a little low (never
/// high); workers call [`refresh_serving`] when idle to settle it.
pub async fn level_serving<'c, E>(
    executor: E,
    name: &str,
    generation: i64,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(
        "UPDATE rm_projections SET checkpoint =
            (SELECT MIN(checkpoint) FROM rm_partitions WHERE name = $1 AND generation = $2),
            updated_at = $3
         WHERE name = $4 AND generation = $5
           AND EXISTS (SELECT 1 FROM rm_partitions WHERE name = $6 AND generation = $7)",
    )
    .bind(name.to_string())
    .bind(generation)
    .bind(timestamp(&chrono::Utc::now()))
    .bind(name.to_string())
    .bind(generation)
    .bind(name.to_string())
    .bind(generation)
    .execute(executor)
    .await?;
    Ok(())
}

/// [`level_serving`] outside a batch (an idle worker settles the position).
pub async fn refresh_serving(db: &ReadDb, name: &str, generation: i64) -> Result<(), sqlx::Error> {
    level_serving(&db.pool, name, generation).await
}

/// Forgets the partition rows of a dropped generation.
pub async fn forget(db: &ReadDb, name: &str, generation: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM rm_partitions WHERE name = $1 AND generation = $2")
        .bind(name.to_string())
        .bind(generation)
        .execute(&db.pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_of(stream_id: &str) -> RecordedEvent {
        RecordedEvent {
            position: 1,
            event_id: uuid::Uuid::now_v7(),
            tenant_id: "default".into(),
            stream_type: "account".into(),
            stream_id: stream_id.into(),
            version: 1,
            event_type: "AccountRegistered".into(),
            schema_version: 1,
            payload: serde_json::json!({}),
            metadata: serde_json::json!({}),
            recorded_at: chrono::Utc::now(),
            prev_hash: None,
            hash: None,
        }
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        let mut counts = [0usize; 4];
        for n in 0..4000 {
            let event = event_of(&format!("acc-{n}"));
            let part = partition_of(&event, 4);
            assert_eq!(part, partition_of(&event, 4), "same stream, same partition");
            counts[part as usize] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "uneven split: {counts:?}");
        }
        assert_eq!(partition_of(&event_of("acc-1"), 1), 0);
        // Pinned: changing the hash would move streams between the partitions
        // of a running deployment.
        assert_eq!(
            (0..8)
                .map(|n| partition_of(&event_of(&format!("acc-{n}")), 4))
                .collect::<Vec<_>>(),
            PINNED
        );
    }

    const PINNED: [u32; 8] = [3, 3, 1, 2, 0, 0, 2, 1];
}
