//! Keyed rows of a projection's lookup tables, held in memory for one batch:
//! read ahead (many keys per statement) or at first use, changed in memory,
//! and written back in multi-row upserts when the batch ends (in a rebuild,
//! read ahead by its writer ([`Lookups::hold`]), handed to it as rows, and
//! the batch's rows carried to the next: [`Lookups::next_batch`]).
//!
//! Why: a fold that read and wrote these rows with a statement or two per
//! event spent most of its time handing statements to the database (on
//! SQLite, a wake-up of sqlx's worker thread per statement; on PostgreSQL a
//! round trip), not in the database.

use std::collections::{BTreeSet, HashMap};

use crm_eventlog::RecordedEvent;
use sqlx::{AnyConnection, Row as _};

use crate::projection::{push_values_placeholders, values_placeholders, Placeholders, Tables, Tx};
pub use crate::rows::Kind;
use crate::rows::{Field, RowSet};

/// One value of a lookup row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    Text(String),
    Int(i64),
}

impl From<Option<String>> for Cell {
    fn from(value: Option<String>) -> Self {
        value.map_or(Cell::Null, Cell::Text)
    }
}

impl From<String> for Cell {
    fn from(value: String) -> Self {
        Cell::Text(value)
    }
}

impl From<&str> for Cell {
    fn from(value: &str) -> Self {
        Cell::Text(value.to_string())
    }
}

impl From<i64> for Cell {
    fn from(value: i64) -> Self {
        Cell::Int(value)
    }
}

impl Cell {
    fn field(&self) -> Field<'_> {
        match self {
            Cell::Null => Field::Null,
            Cell::Text(text) => Field::Text(text),
            Cell::Int(number) => Field::Int(*number),
        }
    }
}

/// A lookup table of a projection: its base name and columns, the key first.
#[derive(Debug)]
pub struct Table {
    pub base: &'static str,
    pub columns: &'static [(&'static str, Kind)],
}

impl Table {
    pub(crate) fn key(&self) -> &'static str {
        self.columns[0].0
    }

    /// Position of `column`; the column names are the projection's own
    /// constants, so an unknown one is a bug in it, not bad input.
    fn index(&self, column: &str) -> usize {
        self.columns
            .iter()
            .position(|(name, _)| *name == column)
            .unwrap_or_else(|| panic!("{} has no column {column}", self.base))
    }
}

/// A row of a lookup table: a cell per column, in the table's order.
#[derive(Debug, Clone)]
pub struct Row {
    table: &'static Table,
    cells: Vec<Cell>,
}

impl Row {
    /// A row of `table` from its cells, in the table's column order.
    pub(crate) fn from_cells(table: &'static Table, cells: Vec<Cell>) -> Self {
        debug_assert_eq!(cells.len(), table.columns.len());
        Self { table, cells }
    }

    fn empty(table: &'static Table, key: &str) -> Self {
        let mut cells = vec![Cell::Null; table.columns.len()];
        cells[0] = Cell::Text(key.to_string());
        Self { table, cells }
    }

    /// A text column (None when NULL).
    pub fn text(&self, column: &str) -> Option<String> {
        match &self.cells[self.table.index(column)] {
            Cell::Text(text) => Some(text.clone()),
            Cell::Int(number) => Some(number.to_string()),
            Cell::Null => None,
        }
    }

    /// An integer column (None when NULL or not an integer).
    pub fn int(&self, column: &str) -> Option<i64> {
        match &self.cells[self.table.index(column)] {
            Cell::Int(number) => Some(*number),
            Cell::Text(_) | Cell::Null => None,
        }
    }

    fn set(&mut self, cells: &[(&str, Cell)]) {
        for (column, cell) in cells {
            let index = self.table.index(column);
            self.cells[index] = cell.clone();
        }
    }
}

/// Keys per read-ahead statement.
const KEYS_PER_READ: usize = 500;
/// Bound parameters per write-back statement (PostgreSQL allows 65,535,
/// SQLite 32,766; smaller statements keep their text short).
const PARAMS_PER_WRITE: usize = 600;

/// A held row (None: known to be absent) and the last batch that asked for
/// it (see [`Lookups::next_batch`]).
struct Entry {
    row: Option<Row>,
    batch: u64,
}

/// The rows of one table seen by the batch.
#[derive(Default)]
struct Held {
    rows: HashMap<String, Entry>,
    changed: BTreeSet<String>,
}

/// Rows of one table read for a batch before it folds (a rebuild's read on
/// its writer's connection, [`Lookups::hold`]): each key asked for, with its
/// row or None when the table has none.
pub struct ReadRows {
    pub table: &'static Table,
    pub found: Vec<(String, Option<Row>)>,
}

/// The keys of rows a batch will ask for, by table.
pub type Wanted = Vec<(&'static Table, Vec<String>)>;

/// The lookup rows one batch reads and writes.
pub struct Lookups {
    tables: Tables,
    style: Placeholders,
    held: HashMap<&'static str, Held>,
    /// Batches started by [`Lookups::next_batch`].
    batch: u64,
}

impl Lookups {
    pub fn new(tables: &Tables, style: Placeholders) -> Self {
        Self {
            tables: tables.clone(),
            style,
            held: HashMap::new(),
            batch: 0,
        }
    }

    /// Holds rows read for this batch elsewhere, for every key not held
    /// already: a held row is the batch before's (carried, maybe changed),
    /// newer than what was read.
    pub fn hold(&mut self, read: Vec<ReadRows>) {
        let batch = self.batch;
        for ReadRows { table, found } in read {
            let held = self.held.entry(table.base).or_default();
            for (key, row) in found {
                held.rows.entry(key).or_insert(Entry { row, batch });
            }
        }
    }

    /// Reads the rows of `keys` not yet held, a few hundred keys per statement.
    pub async fn read_ahead(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static Table,
        keys: impl IntoIterator<Item = String>,
    ) -> Result<(), sqlx::Error> {
        let wanted = self.not_held(table, keys);
        self.read_held(conn, table, &wanted).await
    }

    /// Reads `keys` of `table` (none held yet), a few hundred per statement,
    /// and holds what was found.
    async fn read_held(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static Table,
        keys: &[String],
    ) -> Result<(), sqlx::Error> {
        for chunk in keys.chunks(KEYS_PER_READ) {
            let rows = self.read(conn, table, chunk).await?;
            self.hold_read(table, chunk, rows);
        }
        Ok(())
    }

    /// Reads ahead the rows of `table` keyed by the stream ids of the
    /// `events` of `stream_type` (a read model with a row per stream).
    pub async fn read_ahead_streams(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static Table,
        events: &[RecordedEvent],
        stream_type: &str,
    ) -> Result<(), sqlx::Error> {
        let ids = events
            .iter()
            .filter(|event| event.stream_type == stream_type)
            .map(|event| event.stream_id.clone());
        self.read_ahead(conn, table, ids).await
    }

    /// [`Lookups::read_ahead`] for several tables. On PostgreSQL, when they
    /// are a few keys in all, in one statement ([`together_sql`]): a live
    /// batch asks a handful of keys of each table, and history's five reads
    /// were five round trips (bench/README.md, cause 4).
    pub async fn read_ahead_all(
        &mut self,
        conn: &mut AnyConnection,
        wanted: Wanted,
    ) -> Result<(), sqlx::Error> {
        let mut missing = Vec::new();
        for (table, keys) in wanted {
            let keys = self.not_held(table, keys);
            if !keys.is_empty() {
                missing.push((table, keys));
            }
        }
        let keys: usize = missing.iter().map(|(_, keys)| keys.len()).sum();
        if self.style != Placeholders::Numbered || missing.len() < 2 || keys > KEYS_PER_READ {
            for (table, keys) in missing {
                self.read_held(conn, table, &keys).await?;
            }
            return Ok(());
        }
        let sql = together_sql(&self.tables, &missing);
        let mut query = sqlx::query(&sql).persistent(false);
        for (_, keys) in &missing {
            for key in keys {
                query = query.bind(key.as_str());
            }
        }
        let mut found: Vec<Vec<Row>> = missing.iter().map(|_| Vec::new()).collect();
        for row in query.fetch_all(&mut *conn).await? {
            let part: i64 = row.try_get(0)?;
            let index = usize::try_from(part)
                .ok()
                .filter(|index| *index < missing.len())
                .ok_or_else(|| sqlx::Error::Decode(format!("no lookup part {part}").into()))?;
            let table = missing[index].0;
            let cells = cells_from_json(table, &row.try_get::<String, _>(1)?)?;
            found[index].push(Row { table, cells });
        }
        for ((table, keys), rows) in missing.iter().zip(found) {
            self.hold_read(table, keys, rows);
        }
        Ok(())
    }

    /// `keys` of `table` not held yet, sorted, once each; the held ones are
    /// marked as asked for by this batch.
    fn not_held(
        &mut self,
        table: &'static Table,
        keys: impl IntoIterator<Item = String>,
    ) -> Vec<String> {
        let batch = self.batch;
        let held = self.held.entry(table.base).or_default();
        let mut wanted = Vec::new();
        for key in keys {
            match held.rows.get_mut(&key) {
                Some(entry) => entry.batch = batch,
                None => wanted.push(key),
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        wanted
    }

    /// Holds what a read of `keys` found: its rows, None for the rest.
    fn hold_read(&mut self, table: &'static Table, keys: &[String], rows: Vec<Row>) {
        let batch = self.batch;
        let held = self.held.entry(table.base).or_default();
        for key in keys {
            held.rows.insert(key.clone(), Entry { row: None, batch });
        }
        for row in rows {
            if let Cell::Text(key) = &row.cells[0] {
                let key = key.clone();
                held.rows.insert(
                    key,
                    Entry {
                        row: Some(row),
                        batch,
                    },
                );
            }
        }
    }

    async fn read(
        &self,
        conn: &mut AnyConnection,
        table: &'static Table,
        keys: &[String],
    ) -> Result<Vec<Row>, sqlx::Error> {
        let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let list = values_placeholders(self.style, 1, keys.len());
        let sql = format!(
            "SELECT {} FROM {} WHERE {} IN {list}",
            columns.join(", "),
            self.tables.t(table.base),
            table.key()
        );
        let mut query = sqlx::query(&sql).persistent(false);
        for key in keys {
            query = query.bind(key.as_str());
        }
        let mut rows = Vec::new();
        for found in query.fetch_all(&mut *conn).await? {
            let mut cells = Vec::with_capacity(table.columns.len());
            for (index, (_, kind)) in table.columns.iter().enumerate() {
                cells.push(match kind {
                    Kind::Text => found.try_get::<Option<String>, _>(index)?.into(),
                    Kind::Int => found
                        .try_get::<Option<i64>, _>(index)?
                        .map_or(Cell::Null, Cell::Int),
                });
            }
            rows.push(Row { table, cells });
        }
        Ok(rows)
    }

    /// The row of `key` (read from the table the first time the batch asks).
    pub async fn get(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static Table,
        key: &str,
    ) -> Result<Option<&Row>, sqlx::Error> {
        let batch = self.batch;
        let entry = self
            .held
            .get_mut(table.base)
            .and_then(|held| held.rows.get_mut(key));
        match entry {
            Some(entry) => entry.batch = batch,
            None => self.read_ahead(conn, table, [key.to_string()]).await?,
        }
        Ok(self
            .held
            .get(table.base)
            .and_then(|held| held.rows.get(key))
            .and_then(|entry| entry.row.as_ref()))
    }

    /// `INSERT .. ON CONFLICT (key) DO UPDATE SET` these cells: the row gets
    /// them, created (other columns NULL) if absent.
    pub async fn upsert(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static Table,
        key: &str,
        cells: &[(&str, Cell)],
    ) -> Result<(), sqlx::Error> {
        self.get(conn, table, key).await?;
        let batch = self.batch;
        let held = self.held.entry(table.base).or_default();
        let entry = held
            .rows
            .entry(key.to_string())
            .or_insert(Entry { row: None, batch });
        entry
            .row
            .get_or_insert_with(|| Row::empty(table, key))
            .set(cells);
        held.changed.insert(key.to_string());
        Ok(())
    }

    /// `INSERT .. ON CONFLICT (key) DO NOTHING`.
    pub async fn insert_if_absent(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static Table,
        key: &str,
        cells: &[(&str, Cell)],
    ) -> Result<(), sqlx::Error> {
        if self.get(conn, table, key).await?.is_none() {
            self.upsert(conn, table, key, cells).await?;
        }
        Ok(())
    }

    /// `UPDATE .. SET` these cells `WHERE key = ..`: nothing when absent.
    pub async fn update(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static Table,
        key: &str,
        cells: &[(&str, Cell)],
    ) -> Result<(), sqlx::Error> {
        if self.get(conn, table, key).await?.is_some() {
            self.upsert(conn, table, key, cells).await?;
        }
        Ok(())
    }

    /// Writes every row the batch changed, whole, in multi-row upserts.
    pub async fn write_back(&mut self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        crate::rows::write_all(tx, &self.changed_rows()).await
    }

    /// Every row the batch changed, whole, as upserts (a set per table);
    /// they count as unchanged afterwards.
    pub fn changed_rows(&mut self) -> Vec<RowSet> {
        let mut sets = Vec::new();
        for held in self.held.values_mut() {
            let changed: Vec<&Row> = std::mem::take(&mut held.changed)
                .iter()
                .filter_map(|key| held.rows.get(key).and_then(|entry| entry.row.as_ref()))
                .collect();
            let Some(table) = changed.first().map(|row| row.table) else {
                continue;
            };
            let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
            let updates: Vec<String> = columns[1..]
                .iter()
                .map(|column| format!("{column} = EXCLUDED.{column}"))
                .collect();
            let mut rows = RowSet::new(
                self.tables.t(table.base),
                table.columns,
                format!(
                    "ON CONFLICT ({}) DO UPDATE SET {}",
                    table.key(),
                    updates.join(", ")
                ),
                PARAMS_PER_WRITE / table.columns.len(),
            );
            for row in changed {
                rows.push(row.cells.iter().map(Cell::field));
            }
            sets.push(rows);
        }
        sets
    }

    /// Starts the next batch of a fold that keeps these rows from batch to
    /// batch (a rebuild's, [`crate::projection::Projection::rebuild_rows`]):
    /// the rows this batch asked for stay held, so the next one reads none of
    /// them (they may not be committed yet); the rest are dropped, to be read
    /// again, committed, if asked for. Call after the changes are taken.
    pub fn next_batch(&mut self) {
        for held in self.held.values_mut() {
            debug_assert!(
                held.changed.is_empty(),
                "changes taken before the next batch"
            );
            held.rows.retain(|_, entry| entry.batch == self.batch);
        }
        self.batch += 1;
    }
}

/// One PostgreSQL statement reading the rows of several tables' keys: per
/// table its part number and the row's cells as a JSON array (the tables'
/// columns differ; JSON keeps text and integers exact), keys numbered on.
fn together_sql(tables: &Tables, parts: &[(&'static Table, Vec<String>)]) -> String {
    let mut sql = String::new();
    let mut first = 1;
    for (part, (table, keys)) in parts.iter().enumerate() {
        if part > 0 {
            sql.push_str(" UNION ALL ");
        }
        let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        sql.push_str(&format!(
            "SELECT CAST({part} AS BIGINT), CAST(json_build_array({}) AS TEXT) FROM {} WHERE {} IN ",
            columns.join(", "),
            tables.t(table.base),
            table.key()
        ));
        push_values_placeholders(&mut sql, Placeholders::Numbered, first, 1, keys.len());
        first += keys.len();
    }
    sql
}

/// A row's cells from the JSON array [`together_sql`] reads.
fn cells_from_json(table: &'static Table, json: &str) -> Result<Vec<Cell>, sqlx::Error> {
    let malformed = |what: &str| {
        sqlx::Error::Decode(format!("a row of {} read as JSON: {what}: {json}", table.base).into())
    };
    let values: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|error| malformed(&error.to_string()))?;
    if values.len() != table.columns.len() {
        return Err(malformed("not a value per column"));
    }
    values
        .into_iter()
        .zip(table.columns)
        .map(|(value, (column, kind))| match (value, kind) {
            (serde_json::Value::Null, _) => Ok(Cell::Null),
            (serde_json::Value::String(text), Kind::Text) => Ok(Cell::Text(text)),
            (serde_json::Value::Number(number), Kind::Int) => number
                .as_i64()
                .map(Cell::Int)
                .ok_or_else(|| malformed(column)),
            _ => Err(malformed(column)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readdb::ReadDb;
    use crate::records::scenario::on_both_backends;

    static THINGS: Table = Table {
        base: "things",
        columns: &[
            ("id", Kind::Text),
            ("name", Kind::Text),
            ("note", Kind::Text),
            ("count", Kind::Int),
        ],
    };

    async fn contents(db: &ReadDb, tables: &Tables) -> Vec<(String, String, Option<String>, i64)> {
        sqlx::query(&format!(
            "SELECT id, name, note, count FROM {} ORDER BY id",
            tables.t("things")
        ))
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|row| {
            (
                row.get("id"),
                row.get("name"),
                row.get("note"),
                row.get("count"),
            )
        })
        .collect()
    }

    async fn sql(tx: &mut Tx, statement: String) {
        sqlx::query(&statement).execute(&mut **tx).await.unwrap();
    }

    async fn batch_semantics_body(db: ReadDb) {
        let tables = Tables::new("lookups_test", 1);
        let things = tables.t("things");
        let mut tx = db.begin_write().await.unwrap();
        sql(
            &mut tx,
            format!("CREATE TABLE {things} (id TEXT PRIMARY KEY, name TEXT NOT NULL, note TEXT, count BIGINT NOT NULL)"),
        )
        .await;
        sql(
            &mut tx,
            format!("INSERT INTO {things} VALUES ('a', 'A', 'kept', 1)"),
        )
        .await;
        tx.commit().await.unwrap();

        let mut tx = db.begin_write().await.unwrap();
        let mut lookups = Lookups::new(&tables, Placeholders::of(&tx));
        lookups
            .read_ahead(&mut tx, &THINGS, ["a".to_string(), "b".to_string()])
            .await
            .unwrap();
        // Written after the read-ahead, outside it: found when first asked for.
        sql(
            &mut tx,
            format!("INSERT INTO {things} VALUES ('c', 'C', NULL, 3)"),
        )
        .await;
        lookups
            .update(&mut tx, &THINGS, "b", &[("name", "B".into())])
            .await
            .unwrap();
        lookups
            .upsert(&mut tx, &THINGS, "a", &[("name", "A2".into())])
            .await
            .unwrap();
        lookups
            .insert_if_absent(
                &mut tx,
                &THINGS,
                "a",
                &[("name", "no".into()), ("count", 9.into())],
            )
            .await
            .unwrap();
        lookups
            .update(&mut tx, &THINGS, "c", &[("count", 5.into())])
            .await
            .unwrap();
        lookups
            .insert_if_absent(
                &mut tx,
                &THINGS,
                "d",
                &[("name", "D".into()), ("count", 4.into())],
            )
            .await
            .unwrap();
        // Later events of the batch see its earlier changes before the write-back.
        let a = lookups.get(&mut tx, &THINGS, "a").await.unwrap().cloned();
        assert_eq!(a.and_then(|row| row.text("name")).as_deref(), Some("A2"));
        assert!(lookups.get(&mut tx, &THINGS, "b").await.unwrap().is_none());
        lookups.write_back(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        let row = |id: &str, name: &str, note: Option<&str>, count| {
            (
                id.to_string(),
                name.to_string(),
                note.map(str::to_string),
                count,
            )
        };
        assert_eq!(
            contents(&db, &tables).await,
            vec![
                row("a", "A2", Some("kept"), 1),
                row("c", "C", None, 5),
                row("d", "D", None, 4),
            ]
        );

        // More keys than one read and more rows than one write statement takes.
        let keys: Vec<String> = (0..1_234).map(|n| format!("k{n:04}")).collect();
        let mut tx = db.begin_write().await.unwrap();
        let mut lookups = Lookups::new(&tables, Placeholders::of(&tx));
        for (n, key) in keys.iter().enumerate() {
            lookups
                .upsert(
                    &mut tx,
                    &THINGS,
                    key,
                    &[("name", key.as_str().into()), ("count", (n as i64).into())],
                )
                .await
                .unwrap();
        }
        lookups.write_back(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = db.begin_write().await.unwrap();
        let mut lookups = Lookups::new(&tables, Placeholders::of(&tx));
        lookups
            .read_ahead(
                &mut tx,
                &THINGS,
                keys.iter().cloned().chain(["a".to_string()]),
            )
            .await
            .unwrap();
        for (n, key) in keys.iter().enumerate() {
            let count = lookups
                .get(&mut tx, &THINGS, key)
                .await
                .unwrap()
                .and_then(|row| row.text("count"));
            assert_eq!(count, Some(n.to_string()), "{key}");
        }
        tx.rollback().await.unwrap();
        assert_eq!(contents(&db, &tables).await.len(), 3 + keys.len());
    }

    on_both_backends!(
        a_batch_reads_changes_and_writes_back_rows_sqlite,
        a_batch_reads_changes_and_writes_back_rows_postgres,
        batch_semantics_body
    );

    static TAGS: Table = Table {
        base: "tags",
        columns: &[("tag", Kind::Text), ("weight", Kind::Int)],
    };

    #[test]
    fn several_tables_are_read_in_one_statement_numbered_on() {
        let tables = Tables::new("lookups_test", 3);
        let parts = vec![
            (&THINGS, vec!["a".to_string(), "b".to_string()]),
            (&TAGS, vec!["t".to_string()]),
        ];
        assert_eq!(
            together_sql(&tables, &parts),
            format!(
                "SELECT CAST(0 AS BIGINT), CAST(json_build_array(id, name, note, count) AS TEXT) \
                 FROM {} WHERE id IN ($1, $2) UNION ALL SELECT CAST(1 AS BIGINT), \
                 CAST(json_build_array(tag, weight) AS TEXT) FROM {} WHERE tag IN ($3)",
                tables.t("things"),
                tables.t("tags")
            )
        );
    }

    #[test]
    fn cells_read_as_json_keep_their_kinds_and_refuse_others() {
        let cells =
            cells_from_json(&THINGS, r#"["a","{\"x\": 1} é",null,9007199254740993]"#).unwrap();
        assert_eq!(
            cells,
            vec![
                Cell::Text("a".into()),
                Cell::Text("{\"x\": 1} é".into()),
                Cell::Null,
                Cell::Int(9_007_199_254_740_993),
            ]
        );
        for bad in [
            r#"["a","b",null]"#,
            r#"["a",1,null,2]"#,
            r#"["a","b",null,"2"]"#,
            "nope",
        ] {
            let error = cells_from_json(&THINGS, bad).unwrap_err().to_string();
            assert!(error.contains("things"), "{error}");
        }
    }

    async fn read_ahead_all_body(db: ReadDb) {
        let tables = Tables::new("lookups_test", 2);
        let (things, tags) = (tables.t("things"), tables.t("tags"));
        let mut tx = db.begin_write().await.unwrap();
        sql(&mut tx, format!("CREATE TABLE {things} (id TEXT PRIMARY KEY, name TEXT NOT NULL, note TEXT, count BIGINT NOT NULL)")).await;
        sql(
            &mut tx,
            format!("CREATE TABLE {tags} (tag TEXT PRIMARY KEY, weight BIGINT)"),
        )
        .await;
        sql(&mut tx, format!("INSERT INTO {things} VALUES ('a', 'A \"quoted\" é', NULL, -7), ('b', 'B', '{{\"j\": [1]}}', 9007199254740993)")).await;
        sql(
            &mut tx,
            format!("INSERT INTO {tags} VALUES ('t', NULL), ('u', 3)"),
        )
        .await;
        tx.commit().await.unwrap();

        let mut tx = db.begin_write().await.unwrap();
        let mut lookups = Lookups::new(&tables, Placeholders::of(&tx));
        let keys = |keys: &[&str]| keys.iter().map(|key| key.to_string()).collect::<Vec<_>>();
        lookups
            .read_ahead_all(
                &mut tx,
                vec![
                    (&THINGS, keys(&["b", "a", "zz", "a"])),
                    (&TAGS, keys(&["t", "u", "v"])),
                ],
            )
            .await
            .unwrap();
        // Every key asked for is held (None: absent), so `get` reads nothing more.
        let cells = |table: &'static Table, key: &str| {
            let held = lookups
                .held
                .get(table.base)
                .and_then(|held| held.rows.get(key))
                .map(|entry| entry.row.as_ref().map(|row| row.cells.clone()));
            held.expect("held")
        };
        assert_eq!(
            cells(&THINGS, "a"),
            Some(vec![
                Cell::Text("a".into()),
                Cell::Text("A \"quoted\" é".into()),
                Cell::Null,
                Cell::Int(-7),
            ])
        );
        assert_eq!(
            cells(&THINGS, "b"),
            Some(vec![
                Cell::Text("b".into()),
                Cell::Text("B".into()),
                Cell::Text("{\"j\": [1]}".into()),
                Cell::Int(9_007_199_254_740_993),
            ])
        );
        assert_eq!(cells(&THINGS, "zz"), None);
        assert_eq!(
            cells(&TAGS, "t"),
            Some(vec![Cell::Text("t".into()), Cell::Null])
        );
        assert_eq!(
            cells(&TAGS, "u"),
            Some(vec![Cell::Text("u".into()), Cell::Int(3)])
        );
        assert_eq!(cells(&TAGS, "v"), None);
        tx.rollback().await.unwrap();
    }

    on_both_backends!(
        read_ahead_all_holds_every_table_s_rows_sqlite,
        read_ahead_all_holds_every_table_s_rows_postgres,
        read_ahead_all_body
    );
}
