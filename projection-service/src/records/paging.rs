//! What the read-model queries of audit, history and records share: the
//! query error (bad input vs. database), page limits, opaque cursors and
//! RFC 3339 filter times.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;

/// Page size when the query gives none.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest accepted page size.
pub const MAX_LIMIT: i64 = 500;

/// Why a read-model query failed: the caller's input (HTTP 422) or the database (HTTP 500).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
}

impl QueryError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Whether the caller is at fault (a 4xx answer).
    pub fn is_invalid(&self) -> bool {
        matches!(self, Self::Invalid { .. })
    }
}

/// One page of a cursor-paginated list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// The page size of a query: default 50, 1..=500.
pub fn page_limit(limit: Option<i64>) -> Result<i64, QueryError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(QueryError::invalid(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        )),
    }
}

/// An opaque cursor: `tag` (which list it belongs to) and the last row's sort key.
pub fn encode_cursor(tag: &str, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{tag}:{key}"))
}

/// The sort key inside a cursor made by [`encode_cursor`] with the same `tag`.
pub fn decode_cursor(tag: &str, cursor: &str) -> Result<String, QueryError> {
    let bad = || QueryError::invalid("cursor", "is not a cursor of this list");
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix(tag)
        .and_then(|rest| rest.strip_prefix(':'))
        .map(str::to_string)
        .ok_or_else(bad)
}

/// A position cursor (the last row's global position).
pub fn decode_position_cursor(tag: &str, cursor: &str) -> Result<i64, QueryError> {
    decode_cursor(tag, cursor)?
        .parse::<i64>()
        .map_err(|_| QueryError::invalid("cursor", "is not a cursor of this list"))
}

/// An RFC 3339 filter time as stored in the read models (see [`crate::readdb::timestamp`]).
pub fn parse_time(field: &str, value: &str) -> Result<String, QueryError> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| crate::readdb::timestamp(&t.with_timezone(&chrono::Utc)))
        .map_err(|_| {
            QueryError::invalid(field, "must be an RFC 3339 time, e.g. 2026-11-20T09:30:00Z")
        })
}

/// A read-model time text (RFC 3339 with any precision) in the sortable stored form.
pub fn normalise_time(value: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| crate::readdb::timestamp(&t.with_timezone(&chrono::Utc)))
}

/// SQL with `$n` placeholders numbered in the order values are pushed.
#[derive(Default, Debug)]
pub struct Binds {
    pub values: Vec<Bind>,
}

/// A value bound to a placeholder.
#[derive(Debug, Clone)]
pub enum Bind {
    Int(i64),
    Text(String),
}

impl Binds {
    /// Adds a text value; returns its placeholder.
    pub fn text(&mut self, value: impl Into<String>) -> String {
        self.values.push(Bind::Text(value.into()));
        format!("${}", self.values.len())
    }

    /// Adds an integer value; returns its placeholder.
    pub fn int(&mut self, value: i64) -> String {
        self.values.push(Bind::Int(value));
        format!("${}", self.values.len())
    }

    /// Binds the values to `sql` in order.
    pub fn apply<'q>(
        &self,
        sql: &'q str,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        let mut query = sqlx::query(sql);
        for value in &self.values {
            query = match value {
                Bind::Int(n) => query.bind(*n),
                Bind::Text(s) => query.bind(s.clone()),
            };
        }
        query
    }
}

/// The value of a metadata/payload key as text (strings as they are, other scalars as JSON).
pub fn json_text(value: Option<&serde_json::Value>) -> Option<String> {
    json_text_ref(value).map(std::borrow::Cow::into_owned)
}

/// [`json_text`] without copying a string value.
pub fn json_text_ref(value: Option<&serde_json::Value>) -> Option<std::borrow::Cow<'_, str>> {
    match value? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        other => Some(std::borrow::Cow::Owned(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_foreign_ones() {
        let c = encode_cursor("a1", "42");
        assert_eq!(decode_position_cursor("a1", &c).unwrap(), 42);
        assert!(decode_cursor("h1", &c).is_err());
        assert!(decode_cursor("a1", "!!!").is_err());
        assert!(decode_position_cursor("a1", &encode_cursor("a1", "x")).is_err());
    }

    #[test]
    fn limits_and_times() {
        assert_eq!(page_limit(None).unwrap(), 50);
        assert_eq!(page_limit(Some(500)).unwrap(), 500);
        assert!(page_limit(Some(0)).unwrap_err().is_invalid());
        assert!(page_limit(Some(501)).is_err());
        assert_eq!(
            parse_time("from", "2026-11-20T10:30:00+01:00").unwrap(),
            "2026-11-20T09:30:00.000000Z"
        );
        assert!(parse_time("from", "yesterday").is_err());
    }
}
