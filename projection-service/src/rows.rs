//! Rows a fold writes, held as data: made without touching the database,
//! then written either inside a batch's sqlx transaction ([`RowSet::write`],
//! multi-row statements) or by a rebuild's own SQLite writer
//! ([`crate::rebuild_writer`], one prepared statement per table).

use crate::projection::{insert_rows, push_values_placeholders, AnyQuery, Placeholders, Tx};

/// Type of a column, so a NULL is bound as the column's type (PostgreSQL
/// refuses a text NULL for a BIGINT column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
}

/// `value` as JSON text in `buffer`, reused from value to value (a
/// `Value`'s `to_string` goes through `fmt` and allocates a string each).
pub fn json_into(buffer: &mut String, value: &impl serde::Serialize) {
    buffer.clear();
    let mut bytes = std::mem::take(buffer).into_bytes();
    // Into a Vec, serializing fails only for a map with non-string keys,
    // which a JSON value cannot have: the text is then just cut short.
    let _ = serde_json::to_writer(&mut bytes, value);
    *buffer = String::from_utf8(bytes).unwrap_or_default();
}

/// A value handed to [`RowSet::push`]; text is copied into the set's own
/// buffer, so a batch's rows are a few large allocations, not one per value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    Null,
    Text(&'a str),
    Int(i64),
}

impl<'a> From<&'a str> for Field<'a> {
    fn from(value: &'a str) -> Self {
        Field::Text(value)
    }
}

impl<'a> From<Option<&'a str>> for Field<'a> {
    fn from(value: Option<&'a str>) -> Self {
        value.map_or(Field::Null, Field::Text)
    }
}

impl From<i64> for Field<'_> {
    fn from(value: i64) -> Self {
        Field::Int(value)
    }
}

impl<'a> Field<'a> {
    /// Binds this value to a sqlx query as a value of `kind`.
    pub fn bind<'q>(self, query: AnyQuery<'q>, kind: Kind) -> AnyQuery<'q>
    where
        'a: 'q,
    {
        match (self, kind) {
            (Field::Text(text), _) => query.bind(text),
            (Field::Int(number), _) => query.bind(number),
            (Field::Null, Kind::Text) => query.bind(None::<String>),
            (Field::Null, Kind::Int) => query.bind(None::<i64>),
        }
    }
}

/// A value as held: text as a range of the set's buffer.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Null,
    Text { start: usize, end: usize },
    Int(i64),
}

/// Rows for one table: `INSERT INTO {table} ({columns}) VALUES .. {tail}`.
#[derive(Debug, Clone)]
pub struct RowSet {
    table: String,
    columns: &'static [(&'static str, Kind)],
    tail: String,
    /// Rows per statement through sqlx (bound parameters well under
    /// PostgreSQL's 65,535 and SQLite's 32,766).
    per_statement: usize,
    /// Row after row, a slot per column.
    slots: Vec<Slot>,
    /// The text of every slot.
    text: String,
}

impl RowSet {
    /// An empty set of rows for `table` (its full name), `tail` what follows
    /// the values (`ON CONFLICT ..`).
    pub fn new(
        table: String,
        columns: &'static [(&'static str, Kind)],
        tail: String,
        per_statement: usize,
    ) -> Self {
        Self {
            table,
            columns,
            tail,
            per_statement: per_statement.max(1),
            slots: Vec::new(),
            text: String::new(),
        }
    }

    /// Room for `rows` more rows of about `text_per_row` bytes of text each
    /// without growing: a batch's values are many thousands, and each growth
    /// copied them all.
    pub fn reserve(&mut self, rows: usize, text_per_row: usize) {
        self.slots.reserve(rows * self.columns.len());
        self.text.reserve(rows * text_per_row);
    }

    /// Adds a row: one value per column, in the columns' order. The columns
    /// are the projection's own constants, so a row of another width is a
    /// bug in it, not bad input.
    pub fn push<'a>(&mut self, row: impl IntoIterator<Item = Field<'a>>) {
        let before = self.slots.len();
        for field in row {
            let slot = match field {
                Field::Null => Slot::Null,
                Field::Int(number) => Slot::Int(number),
                Field::Text(text) => {
                    let start = self.text.len();
                    self.text.push_str(text);
                    Slot::Text {
                        start,
                        end: self.text.len(),
                    }
                }
            };
            self.slots.push(slot);
        }
        assert_eq!(
            self.slots.len() - before,
            self.columns.len(),
            "a row of {} has one value per column",
            self.table
        );
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.slots.len() / self.columns.len().max(1)
    }

    /// `{table} ({columns})`.
    pub fn target(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
        format!("{} ({})", self.table, names.join(", "))
    }

    pub fn tail(&self) -> &str {
        &self.tail
    }

    pub fn columns(&self) -> &'static [(&'static str, Kind)] {
        self.columns
    }

    fn field(&self, slot: Slot) -> Field<'_> {
        match slot {
            Slot::Null => Field::Null,
            Slot::Int(number) => Field::Int(number),
            Slot::Text { start, end } => Field::Text(&self.text[start..end]),
        }
    }

    /// The rows, each its values in the columns' order.
    pub fn rows(&self) -> impl Iterator<Item = impl Iterator<Item = Field<'_>>> {
        self.slots
            .chunks_exact(self.columns.len().max(1))
            .map(|row| row.iter().map(|slot| self.field(*slot)))
    }

    /// Writes the rows in multi-row statements inside `tx`.
    pub async fn write(&self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        let rows: Vec<&[Slot]> = self.slots.chunks_exact(self.columns.len().max(1)).collect();
        let columns = self.columns;
        insert_rows(
            tx,
            &self.target(),
            &self.tail,
            columns.len(),
            self.per_statement,
            &rows,
            |query, row| {
                row.iter()
                    .zip(columns)
                    .fold(query, |query, (slot, (_, kind))| {
                        self.field(*slot).bind(query, *kind)
                    })
            },
        )
        .await
    }
}

/// Most values [`write_all`] writes in one statement: a live batch's rows
/// (some hundreds); a catch-up's or rebuild's batches keep their prepared
/// full-size statements, whose round trips are few per row.
const ONE_STATEMENT_VALUES: usize = 2_000;

/// Writes a batch's sets of rows inside `tx`. On PostgreSQL, when every set
/// is of another table and all their values fit one statement, they go in
/// one: a data-modifying `WITH` per set but the last, one round trip. A live
/// batch writes a few rows to each of several tables, and its statements'
/// round trips, not the database's work, were most of its time (history's
/// six writes; bench/README.md, cause 4). Otherwise (SQLite, which has no
/// data-modifying `WITH` and no round trips; a table named twice; more than
/// [`ONE_STATEMENT_VALUES`]) each set is written as [`RowSet::write`] writes it.
pub async fn write_all(tx: &mut Tx, sets: &[RowSet]) -> Result<(), sqlx::Error> {
    let sets: Vec<&RowSet> = sets.iter().filter(|set| !set.is_empty()).collect();
    let values: usize = sets.iter().map(|set| set.slots.len()).sum();
    let mut tables: Vec<&str> = sets.iter().map(|set| set.table.as_str()).collect();
    tables.sort_unstable();
    tables.dedup();
    let one_statement = sets.len() > 1
        && tables.len() == sets.len()
        && values <= ONE_STATEMENT_VALUES
        && Placeholders::of(tx) == Placeholders::Numbered;
    if !one_statement {
        for set in sets {
            set.write(tx).await?;
        }
        return Ok(());
    }
    let sql = one_statement_for(&sets);
    // Unprepared: each batch's row counts make a text of their own.
    let mut query = sqlx::query(&sql).persistent(false);
    for set in &sets {
        for row in set.rows() {
            for (field, (_, kind)) in row.zip(set.columns) {
                query = field.bind(query, *kind);
            }
        }
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// `WITH w0 AS (INSERT ..), w1 AS (INSERT ..) INSERT ..`: every set's rows,
/// its values numbered on from the set before's.
fn one_statement_for(sets: &[&RowSet]) -> String {
    let mut sql = String::new();
    let mut first = 1;
    for (index, set) in sets.iter().enumerate() {
        let last = index + 1 == sets.len();
        sql.push_str(match (index, last) {
            (0, false) => "WITH ",
            (_, true) => " ",
            _ => ", ",
        });
        if !last {
            sql.push_str(&format!("w{index} AS ("));
        }
        sql.push_str(&format!("INSERT INTO {} VALUES ", set.target()));
        let columns = set.columns.len();
        push_values_placeholders(&mut sql, Placeholders::Numbered, first, set.len(), columns);
        sql.push(' ');
        sql.push_str(&set.tail);
        if !last {
            sql.push(')');
        }
        first += set.slots.len();
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    static PAIRS: [(&str, Kind); 2] = [("n", Kind::Int), ("label", Kind::Text)];

    #[test]
    fn rows_are_held_in_order_a_value_per_column() {
        let mut set = RowSet::new("t".into(), &PAIRS, String::new(), 10);
        assert!(set.is_empty());
        set.push([Field::Int(1), "one".into()]);
        set.push([Field::Int(2), Field::Null]);
        set.push([Field::Int(3), "".into()]);
        assert_eq!(set.len(), 3);
        assert_eq!(set.target(), "t (n, label)");
        let rows: Vec<Vec<Field>> = set.rows().map(Iterator::collect).collect();
        assert_eq!(
            rows,
            vec![
                vec![Field::Int(1), Field::Text("one")],
                vec![Field::Int(2), Field::Null],
                vec![Field::Int(3), Field::Text("")],
            ]
        );
    }

    #[test]
    fn json_text_reuses_its_buffer() {
        let mut buffer = String::from("left over");
        json_into(&mut buffer, &serde_json::json!({"a": [1, "two"]}));
        assert_eq!(buffer, r#"{"a":[1,"two"]}"#);
        json_into(&mut buffer, &serde_json::Value::Null);
        assert_eq!(buffer, "null");
    }

    #[test]
    fn sets_of_several_tables_make_one_statement_numbered_on() {
        let mut pairs = RowSet::new("p".into(), &PAIRS, "ON CONFLICT (n) DO NOTHING".into(), 1);
        pairs.push([Field::Int(1), "one".into()]);
        pairs.push([Field::Int(2), Field::Null]);
        let mut more = RowSet::new("q".into(), &PAIRS, String::new(), 1);
        more.push([Field::Int(3), "three".into()]);
        let mut last = RowSet::new("r".into(), &PAIRS, "ON CONFLICT DO NOTHING".into(), 1);
        last.push([Field::Int(4), "four".into()]);
        assert_eq!(
            one_statement_for(&[&pairs, &more, &last]),
            "WITH w0 AS (INSERT INTO p (n, label) VALUES ($1, $2), ($3, $4) ON CONFLICT (n) DO \
             NOTHING), w1 AS (INSERT INTO q (n, label) VALUES ($5, $6) ) INSERT INTO r (n, \
             label) VALUES ($7, $8) ON CONFLICT DO NOTHING"
        );
    }

    #[test]
    #[should_panic(expected = "one value per column")]
    fn a_row_of_the_wrong_width_is_refused() {
        RowSet::new("t".into(), &PAIRS, String::new(), 10).push([Field::Int(1)]);
    }

    use crate::readdb::{ReadBackend, ReadDb};
    use crate::records::scenario::on_both_backends;
    use sqlx::Row as _;

    /// The rows of table `t` as (n, label).
    async fn pairs_in(db: &ReadDb, t: &str) -> Vec<(i64, Option<String>)> {
        sqlx::query(&format!("SELECT n, label FROM {t} ORDER BY n"))
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get("n"), row.get("label")))
            .collect()
    }

    async fn write_all_body(db: ReadDb) {
        for t in ["wa_p", "wa_q"] {
            sqlx::query(&format!(
                "CREATE TABLE {t} (n BIGINT PRIMARY KEY, label TEXT)"
            ))
            .execute(&db.pool)
            .await
            .unwrap();
        }
        let postgres = db.backend == ReadBackend::Postgres;
        if postgres {
            // Which statement wrote each table: statement_timestamp() is the
            // client statement's, shared by the parts of one `WITH`.
            sqlx::raw_sql(
                "CREATE TABLE wa_writes (t TEXT NOT NULL, at TEXT NOT NULL);
                 CREATE FUNCTION wa_note() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN INSERT INTO wa_writes VALUES (TG_TABLE_NAME, statement_timestamp()::text);
                 RETURN NULL; END $$;
                 CREATE TRIGGER wa_p_note AFTER INSERT ON wa_p FOR EACH STATEMENT EXECUTE FUNCTION wa_note();
                 CREATE TRIGGER wa_q_note AFTER INSERT ON wa_q FOR EACH STATEMENT EXECUTE FUNCTION wa_note();",
            )
            .execute(&db.pool)
            .await
            .unwrap();
        }
        let mut p = RowSet::new(
            "wa_p".into(),
            &PAIRS,
            "ON CONFLICT (n) DO UPDATE SET label = EXCLUDED.label".into(),
            2,
        );
        for n in 1..=5 {
            p.push([Field::Int(n), Field::Text(&format!("p{n}"))]);
        }
        let mut q = RowSet::new("wa_q".into(), &PAIRS, String::new(), 2);
        q.push([Field::Int(7), Field::Null]);
        q.push([Field::Int(8), "eight".into()]);
        let empty = RowSet::new("wa_r".into(), &PAIRS, String::new(), 2);
        let mut tx = db.begin_write().await.unwrap();
        write_all(&mut tx, &[p.clone(), empty, q]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            pairs_in(&db, "wa_p").await,
            (1..=5)
                .map(|n| (n, Some(format!("p{n}"))))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            pairs_in(&db, "wa_q").await,
            vec![(7, None), (8, Some("eight".into()))]
        );
        if postgres {
            let statements: Vec<(String, i64)> = sqlx::query(
                "SELECT string_agg(t, ',' ORDER BY t) AS ts, COUNT(*) AS n FROM wa_writes GROUP BY at",
            )
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get("ts"), row.get("n")))
            .collect();
            assert_eq!(
                statements,
                vec![("wa_p,wa_q".to_string(), 2)],
                "one statement"
            );
        }

        // More values than one statement takes: a statement per set (or chunk).
        let mut big = RowSet::new(
            "wa_p".into(),
            &PAIRS,
            "ON CONFLICT (n) DO NOTHING".into(),
            600,
        );
        for n in 100..(100 + ONE_STATEMENT_VALUES as i64 / 2) {
            big.push([Field::Int(n), Field::Null]);
        }
        let mut small = RowSet::new("wa_q".into(), &PAIRS, String::new(), 2);
        small.push([Field::Int(9), "nine".into()]);
        let mut tx = db.begin_write().await.unwrap();
        write_all(&mut tx, &[big, small]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            pairs_in(&db, "wa_p").await.len(),
            5 + ONE_STATEMENT_VALUES / 2
        );
        assert_eq!(pairs_in(&db, "wa_q").await.len(), 3);
        if postgres {
            let statements: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT at) FROM wa_writes")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            assert_eq!(
                statements,
                1 + 2 + 1,
                "the first write's, big's two chunks, small's"
            );
        }

        // A table named twice: each set by itself, in order (the later row wins).
        let mut again = RowSet::new(
            "wa_p".into(),
            &PAIRS,
            "ON CONFLICT (n) DO UPDATE SET label = EXCLUDED.label".into(),
            2,
        );
        again.push([Field::Int(1), "again".into()]);
        let mut tx = db.begin_write().await.unwrap();
        write_all(&mut tx, &[p, again]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(pairs_in(&db, "wa_p").await[0], (1, Some("again".into())));
    }

    on_both_backends!(
        write_all_writes_every_set_on_sqlite,
        write_all_writes_every_set_in_one_statement_on_postgres,
        write_all_body
    );
}
