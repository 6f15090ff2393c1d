//! What a projection is: a name, a schema version, DDL for its tables and a
//! fold of one event into rows, always inside the batch's transaction.

use crm_eventlog::RecordedEvent;
use sqlx::{Any, Transaction};

/// The transaction a batch is folded in (rows + checkpoint commit together).
pub type Tx = Transaction<'static, Any>;

/// Table names of one generation of one projection: rebuilds fill a new
/// generation while the previous one keeps serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    prefix: String,
}

impl Tables {
    pub fn new(projection: &str, generation: i64) -> Self {
        Self {
            prefix: format!("rm_{projection}_g{generation}_"),
        }
    }

    /// The full name of table `base` in this generation.
    pub fn t(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("event {event_id} ({event_type}) does not decode: {message}")]
    Decode {
        event_id: String,
        event_type: String,
        message: String,
    },
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
    /// The checkpoint was no longer where this batch started: another worker
    /// folded the range meanwhile, so this batch was rolled back whole.
    #[error("checkpoint of {name} moved away from {expected}: another worker folded this range")]
    CheckpointMoved { name: String, expected: i64 },
}

/// A read model fed by the log.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name, e.g. `pipeline`; also the prefix of its tables.
    fn name(&self) -> &'static str;

    /// Version of the table layout and fold; bumping it means "rebuild me".
    fn version(&self) -> i64;

    /// Statements creating this generation's tables and indexes.
    fn schema(&self, tables: &Tables) -> Vec<String>;

    /// Base names of the tables `schema` creates (dropped with their generation).
    fn table_names(&self) -> Vec<&'static str>;

    /// True when every row this projection writes for an event depends only on
    /// that event's own stream (no lookups of rows other streams wrote): its
    /// work may then be split by stream partition and folded out of global
    /// order across streams (per-stream order still holds).
    fn stream_local(&self) -> bool {
        false
    }

    /// True when this projection's rows are keyed by stream and it is
    /// [`stream_local`](Self::stream_local): a rebuild then reads the log
    /// stream by stream, so a stream's rows are folded together and written
    /// once, in key order, instead of once per batch its events fall in.
    /// (A projection keyed by log position, like the audit trail, is written
    /// in key order by the log's own order.)
    fn rebuild_by_stream(&self) -> bool {
        false
    }

    /// Folds one event into the rows. Events of every stream type arrive, in
    /// log order; ignore the ones this read model does not use.
    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError>;

    /// Folds `events` in log order. By default one by one; a projection that
    /// only inserts rows overrides it to write the batch in a few multi-row
    /// statements (each statement costs a round trip, which dominates a fold).
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        for (index, event) in events.iter().enumerate() {
            self.apply(tx, tables, event)
                .await
                .map_err(BatchError::at(index))?;
        }
        Ok(())
    }
}

/// Why a batch did not fold: the index of the event at fault, when the
/// failure belongs to one event (None: a multi-row statement failed).
#[derive(Debug)]
pub struct BatchError {
    pub index: Option<usize>,
    pub error: ProjectionError,
}

impl BatchError {
    /// The event at `index` of the batch could not be folded.
    pub fn at<E: Into<ProjectionError>>(index: usize) -> impl FnOnce(E) -> BatchError {
        move |error| BatchError {
            index: Some(index),
            error: error.into(),
        }
    }

    /// A statement writing rows of several events failed.
    pub fn whole_batch<E: Into<ProjectionError>>(error: E) -> BatchError {
        BatchError {
            index: None,
            error: error.into(),
        }
    }
}

/// [`Projection::apply`] for a projection whose real fold is its
/// [`Projection::apply_batch`]: a batch of one.
pub async fn apply_as_batch<P: Projection + ?Sized>(
    projection: &P,
    tx: &mut Tx,
    tables: &Tables,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    projection
        .apply_batch(tx, tables, std::slice::from_ref(event))
        .await
        .map_err(|failure| failure.error)
}

/// How a multi-row statement writes its bound parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholders {
    /// `$1, $2, ..` (PostgreSQL).
    Numbered,
    /// `?, ?, ..` bound in order (SQLite). SQLite takes `$1` for a *named*
    /// parameter and looks every one up by name, in the parser and again at
    /// each bind: a 50-row insert of 850 parameters spent 45 % of a rebuild in
    /// those lookups.
    InOrder,
}

impl Placeholders {
    /// The style of the database `tx` runs on.
    pub fn of(tx: &Tx) -> Self {
        use sqlx::Database;
        // `Any` passes the SQL text through unchanged.
        let connection: &sqlx::AnyConnection = tx;
        if connection.backend_name() == sqlx::Sqlite::NAME {
            Self::InOrder
        } else {
            Self::Numbered
        }
    }
}

/// Rows of `columns` values each, numbered `$1..` on PostgreSQL (in row
/// order, as each row's binds are added) or `?` on SQLite: `($1, $2), ($3,
/// $4)`. Run such statements through [`multi_row_query`]: each batch size is
/// a statement of its own, and a connection caching every shape it met (up to
/// 100, some with thousands of parameters) held hundreds of MiB on SQLite.
pub fn values_placeholders(style: Placeholders, rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            match style {
                Placeholders::Numbered => {
                    sql.push('$');
                    sql.push_str(&(row * columns + column + 1).to_string());
                }
                Placeholders::InOrder => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

/// A query on the read-model database with its bound values.
pub type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// A multi-row statement of `rows` rows where `full_chunk` rows is the most
/// one holds: prepared once and cached when full (one shape per table, the
/// one a long fold repeats: parsing it for every statement cost an audit
/// rebuild a sixth of its CPU), run unprepared when shorter (a shape per
/// batch tail, not worth a cache entry).
pub fn multi_row_query(sql: &str, rows: usize, full_chunk: usize) -> AnyQuery<'_> {
    sqlx::query(sql).persistent(rows == full_chunk)
}

/// Writes `rows` as `INSERT INTO {into} VALUES (..), (..) {tail}`, up to
/// `per_statement` rows per statement, `bind` binding each row's `columns`
/// values in order (placeholders as [`values_placeholders`] makes them).
/// `bind` may bind borrowed text (`row.name.as_str()`): binding an owned
/// `String` copies it twice more (the clone, then the `Any` driver's own copy
/// at bind) before SQLite copies it again.
pub async fn insert_rows<T>(
    tx: &mut Tx,
    into: &str,
    tail: &str,
    columns: usize,
    per_statement: usize,
    rows: &[T],
    bind: impl for<'q> Fn(AnyQuery<'q>, &'q T) -> AnyQuery<'q>,
) -> Result<(), sqlx::Error> {
    let style = Placeholders::of(tx);
    let per_statement = per_statement.max(1);
    let statement = |rows: usize| {
        format!(
            "INSERT INTO {into} VALUES {} {tail}",
            values_placeholders(style, rows, columns)
        )
    };
    // The full-size text once per call, not per chunk: formatting hundreds of
    // placeholders for every 50 rows was a thirtieth of a history rebuild.
    let mut full_size: Option<String> = None;
    for chunk in rows.chunks(per_statement) {
        let tail_size;
        let sql = if chunk.len() == per_statement {
            full_size.get_or_insert_with(|| statement(per_statement))
        } else {
            tail_size = statement(chunk.len());
            &tail_size
        };
        let mut query = multi_row_query(sql, chunk.len(), per_statement);
        for row in chunk {
            query = bind(query, row);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Decodes an event's payload into a domain event type.
pub fn decode<E: serde::de::DeserializeOwned>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    // From the borrowed tree: no copy of the payload per decode.
    E::deserialize(&event.payload).map_err(|error| ProjectionError::Decode {
        event_id: event.event_id.to_string(),
        event_type: event.event_type.clone(),
        message: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::{insert_rows, values_placeholders, Placeholders};
    use crate::readdb::ReadDb;
    use sqlx::Row;

    #[test]
    fn placeholders_number_rows_then_columns() {
        assert_eq!(
            values_placeholders(Placeholders::Numbered, 2, 2),
            "($1, $2), ($3, $4)"
        );
        assert_eq!(
            values_placeholders(Placeholders::Numbered, 1, 3),
            "($1, $2, $3)"
        );
    }

    #[test]
    fn in_order_placeholders_carry_no_names() {
        assert_eq!(
            values_placeholders(Placeholders::InOrder, 2, 2),
            "(?, ?), (?, ?)"
        );
    }

    /// 120 rows at 50 per statement: two full-size statements (one text,
    /// formatted once) and a tail of 20, binding borrowed text.
    #[tokio::test]
    async fn insert_rows_writes_full_statements_and_the_tail_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
            .await
            .unwrap();
        let rows: Vec<(i64, String)> = (1..=120).map(|n| (n, format!("row {n}"))).collect();
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("CREATE TABLE numbers (n BIGINT PRIMARY KEY, label TEXT NOT NULL)")
            .execute(&mut *tx)
            .await
            .unwrap();
        insert_rows(
            &mut tx,
            "numbers (n, label)",
            "ON CONFLICT (n) DO NOTHING",
            2,
            50,
            &rows,
            |query, (n, label)| query.bind(*n).bind(label.as_str()),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let stored: Vec<(i64, String)> = sqlx::query("SELECT n, label FROM numbers ORDER BY n")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(stored, rows);
    }
}
