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

use sqlx::{AnyConnection, Row as _};

use crate::projection::{values_placeholders, Placeholders, Tables, Tx};
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
        for chunk in wanted.chunks(KEYS_PER_READ) {
            let rows = self.read(conn, table, chunk).await?;
            let held = self.held.entry(table.base).or_default();
            for key in chunk {
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
        Ok(())
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
        for rows in self.changed_rows() {
            rows.write(tx).await?;
        }
        Ok(())
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
}
