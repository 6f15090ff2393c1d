//! What a projection is: a name, a schema version, DDL for its tables and a
//! fold of one event into rows, always inside the batch's transaction.

use crm_eventlog::RecordedEvent;
use sqlx::{Any, AnyConnection, Transaction};

use crate::lookups::{ReadRows, Wanted};
use crate::rows::RowSet;

/// The transaction a batch is folded in (rows + checkpoint commit together).
pub type Tx = Transaction<'static, Any>;

/// What a projection keeps from one rebuild batch to the next
/// ([`Projection::rebuild_rows`]): its own type, boxed.
pub type Carried = Option<Box<dyn std::any::Any + Send>>;

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

    /// Base names of tables that earlier versions made and this one does not:
    /// dropped with an old generation, beside [`Projection::table_names`].
    fn retired_table_names(&self) -> Vec<&'static str> {
        Vec::new()
    }

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

    /// Whether a rebuild on SQLite folds this projection with
    /// [`rebuild_rows`](Self::rebuild_rows) and hands the rows to a writer of
    /// its own ([`crate::rebuild_writer`]), making the next batch's rows
    /// while it writes these.
    fn rebuilds_to_rows(&self) -> bool {
        false
    }

    /// Whether [`rebuild_rows`](Self::rebuild_rows) reads rows back (through
    /// its connection, or with [`rebuild_reads`](Self::rebuild_reads)): a
    /// batch then folds only once the batch before the one before is
    /// committed. One that makes its rows from the events alone lets the fold
    /// run further ahead of the writer, which then never waits for it.
    fn rebuild_reads_back(&self) -> bool {
        true
    }

    /// The lookup rows a rebuild's batch of `events` will ask for, for a
    /// projection that [`rebuilds_to_rows`](Self::rebuilds_to_rows): the
    /// writer reads them while the batch before folds, and
    /// [`rebuild_rows`](Self::rebuild_rows) gets them.
    fn rebuild_reads(&self, _events: &[RecordedEvent]) -> Wanted {
        Vec::new()
    }

    /// A rebuild's batch as the rows to write, for a projection that
    /// [`rebuilds_to_rows`](Self::rebuilds_to_rows). `carried` is what it
    /// kept from the batch before (None at the first): that batch may still
    /// be being written, so rows it changed must be carried; everything
    /// older is committed and readable through `conn`. `read` holds the rows
    /// of its [`rebuild_reads`](Self::rebuild_reads), read after the batch
    /// before the one before was committed: older than what is carried.
    async fn rebuild_rows(
        &self,
        _conn: &mut AnyConnection,
        _tables: &Tables,
        _events: &[RecordedEvent],
        _read: Vec<ReadRows>,
        _carried: &mut Carried,
    ) -> Result<Vec<RowSet>, BatchError> {
        Err(BatchError::whole_batch(ProjectionError::Invalid(format!(
            "{} does not rebuild to rows",
            self.name()
        ))))
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
        Self::of_connection(tx)
    }

    /// The style of the database `connection` is on.
    pub fn of_connection(connection: &AnyConnection) -> Self {
        use sqlx::Database;
        // `Any` passes the SQL text through unchanged.
        if connection.backend_name() == sqlx::Sqlite::NAME {
            Self::InOrder
        } else {
            Self::Numbered
        }
    }
}

/// A projection's `CREATE TABLE` statement as the database `style` names
/// runs it. SQLite keeps every table in a B-tree keyed by its rowid and a
/// primary key that is not the rowid in a second one, so a table keyed by log
/// position wrote each row twice: there `BIGINT PRIMARY KEY` becomes `INTEGER
/// PRIMARY KEY`, the rowid itself (both are 64-bit on SQLite). Rows, keys,
/// conflicts and queries are the same; only the storage differs, so
/// generations made before keep serving. Anything else (other keys, indexes,
/// PostgreSQL, where INTEGER is 32-bit) is unchanged. (`WITHOUT ROWID` for
/// the other keys was tried: records, whose rows are large, rebuilt at half
/// the rate.) A table that ends in [`KEY_ONLY`] becomes `WITHOUT ROWID`
/// there: its rows are its key, so the key's B-tree is the whole table.
pub fn table_layout(style: Placeholders, statement: &str) -> std::borrow::Cow<'_, str> {
    const INT_KEY: &str = "BIGINT PRIMARY KEY";
    let words: Vec<&str> = statement.split_whitespace().take(2).collect();
    let creates_table = matches!(words.as_slice(), [create, table]
        if create.eq_ignore_ascii_case("CREATE") && table.eq_ignore_ascii_case("TABLE"));
    if style != Placeholders::InOrder || !creates_table {
        return statement.into();
    }
    if let Some(table) = statement.strip_suffix(KEY_ONLY) {
        format!("{table} WITHOUT ROWID").into()
    } else if statement.contains(INT_KEY) {
        statement.replacen(INT_KEY, "INTEGER PRIMARY KEY", 1).into()
    } else {
        statement.into()
    }
}

/// Ends the `CREATE TABLE` of a table whose every column is in its primary
/// key (an index kept as a table, such as the audit trail's changed fields).
/// SQLite stores it `WITHOUT ROWID` ([`table_layout`]): one B-tree entry per
/// row instead of two (the rowid table's and the key index's); elsewhere the
/// marker is a comment.
pub const KEY_ONLY: &str = " /* key only */";

/// Rows of `columns` values each, numbered `$1..` on PostgreSQL (in row
/// order, as each row's binds are added) or `?` on SQLite: `($1, $2), ($3,
/// $4)`. Run such statements through [`multi_row_query`]: each batch size is
/// a statement of its own, and a connection caching every shape it met (up to
/// 100, some with thousands of parameters) held hundreds of MiB on SQLite.
pub fn values_placeholders(style: Placeholders, rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    push_values_placeholders(&mut sql, style, 1, rows, columns);
    sql
}

/// [`values_placeholders`] onto `sql`, numbered from `$first` (a statement
/// binding other values before these).
pub fn push_values_placeholders(
    sql: &mut String,
    style: Placeholders,
    first: usize,
    rows: usize,
    columns: usize,
) {
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
                    sql.push_str(&(first + row * columns + column).to_string());
                }
                Placeholders::InOrder => sql.push('?'),
            }
        }
        sql.push(')');
    }
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
///
/// Each statement's values are bound while the one before it runs: the
/// database works on its own thread (SQLite: sqlx's worker; PostgreSQL: the
/// server), so binding and executing overlap instead of taking turns.
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
    // Each text once per call, not per chunk: formatting hundreds of
    // placeholders for every 50 rows was a thirtieth of a history rebuild.
    // Only the last chunk can be short. (`OnceLock`: the future holding
    // them must be `Send`.)
    let full_size = std::sync::OnceLock::new();
    let short_size = std::sync::OnceLock::new();
    let text_for = |chunk: &[T]| {
        let text = if chunk.len() == per_statement {
            &full_size
        } else {
            &short_size
        };
        text.get_or_init(|| statement(chunk.len())).as_str()
    };
    let build = |chunk| bound_chunk(text_for(chunk), chunk, per_statement, &bind);
    let mut chunks = rows.chunks(per_statement);
    let Some(first) = chunks.next() else {
        return Ok(());
    };
    let mut running = build(first);
    for chunk in chunks {
        // `join` polls the execution first: its statement is on its way to
        // the database before the next one is bound.
        let (done, next) = tokio::join!(running.execute(&mut **tx), async { build(chunk) });
        done?;
        running = next;
    }
    running.execute(&mut **tx).await?;
    Ok(())
}

/// One chunk's statement with its rows bound.
fn bound_chunk<'q, T>(
    sql: &'q str,
    chunk: &'q [T],
    per_statement: usize,
    bind: &impl for<'a> Fn(AnyQuery<'a>, &'a T) -> AnyQuery<'a>,
) -> AnyQuery<'q> {
    chunk
        .iter()
        .fold(multi_row_query(sql, chunk.len(), per_statement), bind)
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
    use super::{
        insert_rows, table_layout, values_placeholders, Placeholders, Projection, Tables, KEY_ONLY,
    };
    use crate::readdb::ReadDb;
    use crate::records::scenario::on_both_backends;
    use sqlx::Row;

    #[test]
    fn sqlite_tables_keyed_by_position_are_keyed_by_rowid() {
        let sqlite = |sql| table_layout(Placeholders::InOrder, sql).into_owned();
        assert_eq!(
            sqlite("CREATE TABLE IF NOT EXISTS e (position BIGINT PRIMARY KEY, x TEXT)"),
            "CREATE TABLE IF NOT EXISTS e (position INTEGER PRIMARY KEY, x TEXT)"
        );
        for unchanged in [
            "CREATE TABLE c (a BIGINT NOT NULL, b TEXT, PRIMARY KEY (a, b))",
            "CREATE TABLE l (id TEXT PRIMARY KEY, n BIGINT)",
            "CREATE INDEX IF NOT EXISTS ix ON e (x, position)",
        ] {
            assert_eq!(sqlite(unchanged), unchanged);
        }
        let postgres = "CREATE TABLE e (position BIGINT PRIMARY KEY, x TEXT)";
        assert_eq!(table_layout(Placeholders::Numbered, postgres), postgres);
    }

    #[test]
    fn key_only_tables_are_without_rowid_on_sqlite() {
        let key_only = format!("CREATE TABLE f (a TEXT, b BIGINT, PRIMARY KEY (a, b)){KEY_ONLY}");
        assert_eq!(
            table_layout(Placeholders::InOrder, &key_only),
            "CREATE TABLE f (a TEXT, b BIGINT, PRIMARY KEY (a, b)) WITHOUT ROWID"
        );
        assert_eq!(table_layout(Placeholders::Numbered, &key_only), key_only);
    }

    /// The timeline's and the audit trail's entries, as a generation makes
    /// them on SQLite: the position is the rowid (no second B-tree); the
    /// audit trail's changed fields are a key-only table (one B-tree).
    #[tokio::test]
    async fn entries_on_sqlite_are_keyed_by_rowid() {
        let dir = tempfile::tempdir().unwrap();
        let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
            .await
            .unwrap();
        let projections: [&dyn Projection; 2] = [
            &crate::history::HistoryProjection,
            &crate::audit::AuditProjection,
        ];
        for projection in projections {
            let tables = Tables::new(projection.name(), 1);
            crate::fold::create_tables(&db, projection, &tables)
                .await
                .unwrap();
            // A rowid table keyed otherwise has an automatic index for its key.
            let automatic: Vec<String> = sqlx::query(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND name LIKE 'sqlite_autoindex%'",
            )
            .bind(tables.t("entries"))
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
            assert_eq!(automatic, Vec::<String>::new(), "{}", projection.name());
        }
        let without_rowid: i64 =
            sqlx::query_scalar("SELECT wr FROM pragma_table_list WHERE name = ?")
                .bind(Tables::new("audit", 1).t("changed_fields"))
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            without_rowid, 1,
            "the audit trail's changed fields are key only"
        );
    }

    /// Writes `rows` into a new table `numbers (n, label)` keyed by `n`
    /// (`DO NOTHING` on a key met before), `per_statement` rows per
    /// statement, and reads the table back in key order.
    async fn write_numbers(
        db: &ReadDb,
        rows: &[(i64, String)],
        per_statement: usize,
    ) -> Vec<(i64, String)> {
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query(&table_layout(
            Placeholders::of(&tx),
            "CREATE TABLE numbers (n BIGINT PRIMARY KEY, label TEXT NOT NULL)",
        ))
        .execute(&mut *tx)
        .await
        .unwrap();
        insert_rows(
            &mut tx,
            "numbers (n, label)",
            "ON CONFLICT (n) DO NOTHING",
            2,
            per_statement,
            rows,
            |query, (n, label)| query.bind(*n).bind(label.as_str()),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        sqlx::query("SELECT n, label FROM numbers ORDER BY n")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// Statements run in the order of their rows even though each is bound
    /// while the one before runs: with keys repeating across statements,
    /// `DO NOTHING` keeps each key's first row.
    async fn statements_run_in_row_order_body(db: ReadDb) {
        let rows: Vec<(i64, String)> = (0..130).map(|n| (n % 60, format!("row {n}"))).collect();
        assert_eq!(write_numbers(&db, &rows, 25).await, rows[..60].to_vec());
    }

    on_both_backends!(
        insert_rows_runs_its_statements_in_row_order_sqlite,
        insert_rows_runs_its_statements_in_row_order_postgres,
        statements_run_in_row_order_body
    );

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
        assert_eq!(write_numbers(&db, &rows, 50).await, rows);
    }
}
