//! The projection registry (`rm_projections`): which generation of each
//! projection serves, its checkpoint, and why it stopped if it did.

use serde::Serialize;
use sqlx::Row;

use crate::projection::{table_layout, Placeholders, Projection, Tables};
use crate::readdb::{timestamp, ReadBackend, ReadDb};

/// Lifecycle of a generation: `building` (rebuild in progress), `active`
/// (serving and followed live), `retired` (replaced; its tables are dropped).
pub const BUILDING: &str = "building";
pub const ACTIVE: &str = "active";
pub const RETIRED: &str = "retired";

/// One generation of one projection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Generation {
    pub name: String,
    pub generation: i64,
    pub version: i64,
    pub state: String,
    /// Global position of the last event folded into this generation.
    pub checkpoint: i64,
    pub failed_event_id: Option<String>,
    pub failed_position: Option<i64>,
    pub error: Option<String>,
    pub updated_at: String,
}

impl Generation {
    pub fn tables(&self) -> Tables {
        Tables::new(&self.name, self.generation)
    }

    pub fn is_failed(&self) -> bool {
        self.error.is_some()
    }

    /// Whether a failed generation has waited `after` since it failed (a
    /// failure may be transient; it is retried after that pause).
    pub fn failed_long_enough(&self, after: std::time::Duration) -> bool {
        self.unchanged_for(after)
    }

    /// Whether this row has not changed for `after` (its last failure,
    /// retirement or checkpoint move).
    fn unchanged_for(&self, after: std::time::Duration) -> bool {
        chrono::DateTime::parse_from_rfc3339(&self.updated_at)
            .map(|changed_at| {
                let elapsed = chrono::Utc::now().signed_duration_since(changed_at);
                elapsed.to_std().unwrap_or_default() >= after
            })
            .unwrap_or(true)
    }
}

/// How long a retired generation's tables outlive its retirement: a query
/// that found it serving just before the switch (or in a query service's
/// short-lived view of the registry) still reads whole tables.
pub const RETIRED_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Creates the registry table.
pub async fn ensure(db: &ReadDb) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS rm_projections (
            name TEXT NOT NULL,
            generation BIGINT NOT NULL,
            version BIGINT NOT NULL,
            state TEXT NOT NULL,
            checkpoint BIGINT NOT NULL,
            failed_event_id TEXT,
            failed_position BIGINT,
            error TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (name, generation))",
    )
    .execute(&db.pool)
    .await?;
    crate::partition::ensure(db).await
}

const COLUMNS: &str =
    "name, generation, version, state, checkpoint, failed_event_id, failed_position, error, updated_at";

fn from_row(row: &sqlx::any::AnyRow) -> Result<Generation, sqlx::Error> {
    Ok(Generation {
        name: row.try_get("name")?,
        generation: row.try_get("generation")?,
        version: row.try_get("version")?,
        state: row.try_get("state")?,
        checkpoint: row.try_get("checkpoint")?,
        failed_event_id: row.try_get("failed_event_id")?,
        failed_position: row.try_get("failed_position")?,
        error: row.try_get("error")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Every generation of every projection, by name then generation.
pub async fn all(db: &ReadDb) -> Result<Vec<Generation>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM rm_projections ORDER BY name, generation"
    ))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// The serving generation of `name`, if any.
pub async fn active(db: &ReadDb, name: &str) -> Result<Option<Generation>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM rm_projections WHERE name = $1 AND state = $2"
    ))
    .bind(name.to_string())
    .bind(ACTIVE)
    .fetch_optional(&db.pool)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Whether `generation` is still the serving one (a rebuild may have replaced
/// it, and its tables be dropped, under a running batch).
pub async fn is_serving(db: &ReadDb, generation: &Generation) -> Result<bool, sqlx::Error> {
    Ok(active(db, &generation.name)
        .await?
        .is_some_and(|active| active.generation == generation.generation))
}

/// When a new generation's secondary indexes are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexes {
    /// With its tables.
    Now,
    /// By [`create_indexes`] once its rows are loaded (a rebuild): building
    /// an index over the loaded rows once is cheaper than keeping it up to
    /// date row by row.
    AfterLoading,
}

/// Starts a new generation in `state` with its tables, numbered after every earlier one.
pub async fn create_generation(
    db: &ReadDb,
    projection: &dyn Projection,
    state: &str,
    indexes: Indexes,
) -> Result<Generation, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let next: i64 = sqlx::query(
        "SELECT COALESCE(MAX(generation), 0) + 1 AS next FROM rm_projections WHERE name = $1",
    )
    .bind(projection.name().to_string())
    .fetch_one(&mut *tx)
    .await?
    .try_get("next")?;
    let generation = Generation {
        name: projection.name().to_string(),
        generation: next,
        version: projection.version(),
        state: state.to_string(),
        checkpoint: 0,
        failed_event_id: None,
        failed_position: None,
        error: None,
        updated_at: timestamp(&chrono::Utc::now()),
    };
    sqlx::query(
        "INSERT INTO rm_projections (name, generation, version, state, checkpoint, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(generation.name.clone())
    .bind(generation.generation)
    .bind(generation.version)
    .bind(generation.state.clone())
    .bind(0_i64)
    .bind(generation.updated_at.clone())
    .execute(&mut *tx)
    .await?;
    let style = Placeholders::of(&tx);
    for statement in projection.schema(&generation.tables()) {
        if indexes == Indexes::AfterLoading && is_secondary_index(&statement) {
            continue;
        }
        sqlx::query(&table_layout(style, &statement))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(generation)
}

/// Makes the secondary indexes of a generation created with
/// [`Indexes::AfterLoading`] (idempotent: `IF NOT EXISTS` DDL).
pub async fn create_indexes(
    db: &ReadDb,
    projection: &dyn Projection,
    generation: &Generation,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    // SQLite sorts each index's keys on the connection's thread alone unless
    // asked for helper threads, while a rebuild has nothing else to do.
    let sorting_threads = |threads: usize| format!("PRAGMA threads = {threads}");
    if db.backend == ReadBackend::Sqlite {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        sqlx::query(&sorting_threads(threads))
            .execute(&mut *tx)
            .await?;
    }
    for statement in projection.schema(&generation.tables()) {
        if is_secondary_index(&statement) {
            sqlx::query(&statement).execute(&mut *tx).await?;
        }
    }
    if db.backend == ReadBackend::Sqlite {
        sqlx::query(&sorting_threads(0)).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// A plain `CREATE INDEX`: a lookup path, no constraint. Unique indexes stay
/// with the tables, since folds rely on them (`ON CONFLICT`).
fn is_secondary_index(statement: &str) -> bool {
    let words: Vec<&str> = statement.split_whitespace().take(2).collect();
    matches!(words.as_slice(), [create, index]
        if create.eq_ignore_ascii_case("CREATE") && index.eq_ignore_ascii_case("INDEX"))
}

/// Makes `generation` the serving one and retires the previous, atomically.
pub async fn activate(db: &ReadDb, name: &str, generation: i64) -> Result<(), sqlx::Error> {
    let now = timestamp(&chrono::Utc::now());
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "UPDATE rm_projections SET state = $1, updated_at = $2 WHERE name = $3 AND state = $4",
    )
    .bind(RETIRED)
    .bind(now.clone())
    .bind(name.to_string())
    .bind(ACTIVE)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE rm_projections SET state = $1, updated_at = $2 WHERE name = $3 AND generation = $4",
    )
    .bind(ACTIVE)
    .bind(now)
    .bind(name.to_string())
    .bind(generation)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Records that `generation` stopped at an event it could not fold.
pub async fn record_failure(
    db: &ReadDb,
    name: &str,
    generation: i64,
    event: Option<(&str, i64)>,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rm_projections SET failed_event_id = $1, failed_position = $2, error = $3, updated_at = $4
         WHERE name = $5 AND generation = $6",
    )
    .bind(event.map(|(id, _)| id.to_string()))
    .bind(event.map(|(_, position)| position))
    .bind(error.to_string())
    .bind(timestamp(&chrono::Utc::now()))
    .bind(name.to_string())
    .bind(generation)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Clears a recorded failure so the generation is retried.
pub async fn clear_failure(db: &ReadDb, name: &str, generation: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rm_projections SET failed_event_id = NULL, failed_position = NULL, error = NULL
         WHERE name = $1 AND generation = $2",
    )
    .bind(name.to_string())
    .bind(generation)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Drops the tables of generations retired at least [`RETIRED_GRACE`] ago
/// and forgets them; building generations abandoned by a crashed rebuild are
/// dropped too when `abandoned`.
pub async fn collect_garbage(
    db: &ReadDb,
    projection: &dyn Projection,
    abandoned: bool,
) -> Result<(), sqlx::Error> {
    for generation in all(db)
        .await?
        .into_iter()
        .filter(|g| g.name == projection.name())
    {
        let drop = (generation.state == RETIRED && generation.unchanged_for(RETIRED_GRACE))
            || (abandoned && generation.state == BUILDING);
        if !drop {
            continue;
        }
        crate::fold::drop_tables(db, projection, &generation.tables()).await?;
        sqlx::query("DELETE FROM rm_projections WHERE name = $1 AND generation = $2")
            .bind(generation.name.clone())
            .bind(generation.generation)
            .execute(&db.pool)
            .await?;
        crate::partition::forget(db, &generation.name, generation.generation).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_secondary_index;

    #[test]
    fn only_plain_create_index_waits_for_the_rows() {
        assert!(is_secondary_index(
            "CREATE INDEX IF NOT EXISTS a_ix ON a (b)"
        ));
        assert!(is_secondary_index("\n    create index a_ix ON a (b)"));
        assert!(!is_secondary_index("CREATE UNIQUE INDEX a_ix ON a (b)"));
        assert!(!is_secondary_index("CREATE TABLE IF NOT EXISTS a (b TEXT)"));
    }
}
