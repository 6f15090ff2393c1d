//! Rows a fold writes, held as data: made without touching the database,
//! then written either inside a batch's sqlx transaction ([`RowSet::write`],
//! multi-row statements) or by a rebuild's own SQLite writer
//! ([`crate::rebuild_writer`], one prepared statement per table).

use crate::projection::{insert_rows, AnyQuery, Tx};

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
    #[should_panic(expected = "one value per column")]
    fn a_row_of_the_wrong_width_is_refused() {
        RowSet::new("t".into(), &PAIRS, String::new(), 10).push([Field::Int(1)]);
    }
}
