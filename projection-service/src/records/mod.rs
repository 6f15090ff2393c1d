//! Record views: the current state of every lead, account, contact,
//! opportunity and case as one row each, with the columns lists filter on
//! (owner/assignee, stage, status, account) and the full record as JSON.
//! The row's state is the domain aggregate itself (folded with the
//! aggregate's own `apply`), so the view never drifts from the domain rules.
//! Also home of [`paging`], the query plumbing the read models share.

pub mod paging;
#[cfg(test)]
pub(crate) mod scenario;

use std::collections::HashMap;

use cqrs_es::Aggregate;
use crm_domain::account::Account;
use crm_domain::case::Case;
use crm_domain::contact::Contact;
use crm_domain::lead::Lead;
use crm_domain::opportunity::Opportunity;
use crm_eventlog::RecordedEvent;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{AnyConnection, Row};

use crate::lookups::ReadRows;
use crate::projection::{
    apply_as_batch, decode, BatchError, Carried, Projection, ProjectionError, Tables, Tx,
};
use crate::readdb::{timestamp, ReadDb};
use crate::rows::{Field, Kind, RowSet};
use paging::{decode_position_cursor, encode_cursor, page_limit, parse_time, Binds};
pub use paging::{Page, QueryError};

/// Name of the projection (and prefix of its tables).
pub const NAME: &str = "records";
const CURSOR_TAG: &str = "r1";

/// The record-view projection: one table, `records`, keyed by (kind, id).
#[derive(Debug, Default, Clone, Copy)]
pub struct RecordsProjection;

/// The kinds of records (one per aggregate / stream type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Lead,
    Account,
    Contact,
    Opportunity,
    Case,
}

impl RecordKind {
    pub const ALL: [RecordKind; 5] = [
        Self::Lead,
        Self::Account,
        Self::Contact,
        Self::Opportunity,
        Self::Case,
    ];

    /// The stream type (`lead`, ...), also the `kind` column value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Account => "account",
            Self::Contact => "contact",
            Self::Opportunity => "opportunity",
            Self::Case => "case",
        }
    }

    /// The collection of the HTTP path (`leads`, ...).
    pub fn collection(&self) -> &'static str {
        match self {
            Self::Lead => "leads",
            Self::Account => "accounts",
            Self::Contact => "contacts",
            Self::Opportunity => "opportunities",
            Self::Case => "cases",
        }
    }

    /// `leads` -> Lead, ... (the `/v1/{collection}` path segment).
    pub fn from_collection(collection: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.collection() == collection)
    }

    /// `lead` -> Lead, ... (the log's stream type).
    pub fn from_stream_type(stream_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == stream_type)
    }

    /// Filters this kind supports.
    fn supports(&self, filter: &str) -> bool {
        use RecordKind::*;
        match filter {
            "owner" => matches!(self, Account | Opportunity | Case),
            "assignee" => matches!(self, Case),
            "stage" => matches!(self, Opportunity),
            "status" => !matches!(self, Contact),
            "account_id" => matches!(self, Contact | Opportunity | Case),
            _ => false,
        }
    }

    /// Values the `status` column takes for this kind.
    pub fn statuses(&self) -> &'static [&'static str] {
        match self {
            Self::Lead => &["new", "qualified", "disqualified", "converted"],
            Self::Account => &["active", "archived"],
            Self::Contact => &[],
            Self::Opportunity => &["open", "won", "lost"],
            Self::Case => &["open", "assigned", "resolved", "closed"],
        }
    }
}

/// Filters of `GET /v1/{collection}` (all optional, combined with AND).
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RecordQuery {
    /// Accounts, opportunities; on cases the assignee.
    pub owner: Option<String>,
    /// Cases only (same as `owner`).
    pub assignee: Option<String>,
    /// Opportunities only.
    pub stage: Option<String>,
    /// Leads, accounts (active|archived), opportunities, cases.
    pub status: Option<String>,
    /// Contacts, opportunities, cases.
    pub account_id: Option<String>,
    /// Updated (recorded) at or after this RFC 3339 time.
    pub updated_since: Option<String>,
    pub cursor: Option<String>,
    /// Default 50, at most 500.
    pub limit: Option<i64>,
}

/// `GET /v1/{collection}`: records of `kind` matching `query`, in the order
/// they were last updated (oldest update first, so a record changed while
/// a client pages moves behind it instead of being skipped). Items are the
/// `data` JSON of each record (see [`get`]).
pub async fn list(
    db: &ReadDb,
    tables: &Tables,
    kind: RecordKind,
    query: &RecordQuery,
) -> Result<Page<Value>, QueryError> {
    let limit = page_limit(query.limit)?;
    let mut b = Binds::default();
    let mut sql = format!(
        "SELECT data, updated_position FROM {} WHERE kind = {}",
        tables.t("records"),
        b.text(kind.as_str())
    );
    let given = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let filters = [
        ("owner", "owner", given(&query.owner)),
        ("assignee", "owner", given(&query.assignee)),
        ("stage", "stage", given(&query.stage)),
        ("status", "status", given(&query.status)),
        ("account_id", "account_id", given(&query.account_id)),
    ];
    for (name, column, value) in filters {
        let Some(value) = value else { continue };
        if !kind.supports(name) {
            return Err(QueryError::invalid(
                name,
                format!("is not a filter of {}", kind.collection()),
            ));
        }
        if name == "status" && !kind.statuses().contains(&value.as_str()) {
            return Err(QueryError::invalid(
                "status",
                format!(
                    "unknown status '{value}'; allowed: {}",
                    kind.statuses().join(", ")
                ),
            ));
        }
        sql.push_str(&format!(" AND {column} = {}", b.text(value)));
    }
    if let Some(since) = given(&query.updated_since) {
        let since = parse_time("updated_since", &since)?;
        sql.push_str(&format!(" AND updated_at >= {}", b.text(since)));
    }
    if let Some(cursor) = given(&query.cursor) {
        let after = decode_position_cursor(CURSOR_TAG, &cursor)?;
        sql.push_str(&format!(" AND updated_position > {}", b.int(after)));
    }
    sql.push_str(&format!(
        " ORDER BY updated_position LIMIT {}",
        b.int(limit + 1)
    ));
    let rows = b.apply(&sql).fetch_all(&db.pool).await?;
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows.iter().take(limit as usize) {
        let data: String = row.try_get("data")?;
        items.push(serde_json::from_str(&data).unwrap_or(Value::Null));
        last = Some(row.try_get::<i64, _>("updated_position")?);
    }
    let next_cursor = match last {
        Some(last) if rows.len() as i64 > limit => {
            Some(encode_cursor(CURSOR_TAG, &last.to_string()))
        }
        _ => None,
    };
    Ok(Page { items, next_cursor })
}

/// `GET /v1/{collection}/{id}`: the record's view: every current field of
/// the aggregate plus `id`, `version`, `created_at`, `updated_at` (times
/// the log recorded the first and the latest event) and `position` (global
/// position of the latest event). `None` when there is no such record.
pub async fn get(
    db: &ReadDb,
    tables: &Tables,
    kind: RecordKind,
    id: &str,
) -> Result<Option<Value>, QueryError> {
    let row = sqlx::query(&format!(
        "SELECT data FROM {} WHERE kind = $1 AND id = $2",
        tables.t("records")
    ))
    .bind(kind.as_str())
    .bind(id.trim().to_string())
    .fetch_optional(&db.pool)
    .await?;
    match row {
        Some(row) => {
            let data: String = row.try_get("data")?;
            Ok(Some(serde_json::from_str(&data).unwrap_or(Value::Null)))
        }
        None => Ok(None),
    }
}

// ---------------------------------------------------------------- the fold

/// The filter columns of a record and its view.
struct Columns {
    owner: Option<String>,
    stage: Option<String>,
    status: Option<String>,
    account_id: Option<String>,
    data: Value,
}

/// A record's aggregate while a batch folds into it, typed by its kind: decoded
/// from its stored JSON once per batch and encoded once when written.
enum RecordState {
    Lead(Lead),
    Account(Account),
    Contact(Contact),
    Opportunity(Opportunity),
    Case(Case),
}

impl RecordState {
    /// The stored state `text` of a `kind` record, or a fresh aggregate.
    fn load(kind: RecordKind, text: Option<&str>) -> Result<Self, serde_json::Error> {
        fn load<A: Default + DeserializeOwned>(text: Option<&str>) -> serde_json::Result<A> {
            text.map_or_else(|| Ok(A::default()), serde_json::from_str)
        }
        Ok(match kind {
            RecordKind::Lead => Self::Lead(load(text)?),
            RecordKind::Account => Self::Account(load(text)?),
            RecordKind::Contact => Self::Contact(load(text)?),
            RecordKind::Opportunity => Self::Opportunity(load(text)?),
            RecordKind::Case => Self::Case(load(text)?),
        })
    }

    /// Folds `event` in with the aggregate's own `apply`.
    fn apply(&mut self, event: &RecordedEvent) -> Result<(), ProjectionError> {
        fn apply<A: Aggregate>(
            aggregate: &mut A,
            event: &RecordedEvent,
        ) -> Result<(), ProjectionError> {
            aggregate.apply(decode::<A::Event>(event)?);
            Ok(())
        }
        match self {
            Self::Lead(aggregate) => apply(aggregate, event),
            Self::Account(aggregate) => apply(aggregate, event),
            Self::Contact(aggregate) => apply(aggregate, event),
            Self::Opportunity(aggregate) => apply(aggregate, event),
            Self::Case(aggregate) => apply(aggregate, event),
        }
    }

    fn to_value(&self) -> serde_json::Result<Value> {
        match self {
            Self::Lead(aggregate) => serde_json::to_value(aggregate),
            Self::Account(aggregate) => serde_json::to_value(aggregate),
            Self::Contact(aggregate) => serde_json::to_value(aggregate),
            Self::Opportunity(aggregate) => serde_json::to_value(aggregate),
            Self::Case(aggregate) => serde_json::to_value(aggregate),
        }
    }
}

fn text(value: &Value) -> Option<String> {
    value.as_str().map(str::to_string)
}

/// The view of a record and its filter columns; `state` is the aggregate
/// JSON, made into the view's `data`.
fn view(kind: RecordKind, state: Value) -> Columns {
    let mut row = Columns {
        owner: None,
        stage: None,
        status: None,
        account_id: None,
        data: Value::Null,
    };
    let mut data = state;
    match kind {
        RecordKind::Lead => {
            row.status = text(&data["status"]);
        }
        RecordKind::Account => {
            row.owner = text(&data["owner"]);
            let status = if data["archived"] == json!(true) {
                "archived"
            } else {
                "active"
            };
            row.status = Some(status.to_string());
            data["status"] = json!(status);
        }
        RecordKind::Contact => {
            row.account_id = text(&data["account_id"]);
            if let Some(object) = data.as_object_mut() {
                // A duplicate-detection window, not part of the record.
                object.remove("recent_activities");
            }
        }
        RecordKind::Opportunity => {
            row.owner = text(&data["owner"]);
            row.stage = text(&data["stage"]);
            row.status = text(&data["status"]);
            row.account_id = text(&data["account_id"]);
        }
        RecordKind::Case => {
            row.owner = text(&data["assignee"]);
            row.status = text(&data["status"]);
            row.account_id = text(&data["account_id"]);
        }
    }
    row.data = data;
    row
}

#[async_trait::async_trait]
impl Projection for RecordsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn stream_local(&self) -> bool {
        true // a record is folded from its own stream only
    }

    fn rebuild_by_stream(&self) -> bool {
        true // one row per stream, keyed by it
    }

    fn version(&self) -> i64 {
        1
    }

    fn schema(&self, tables: &Tables) -> Vec<String> {
        let records = tables.t("records");
        let mut statements = vec![format!(
            "CREATE TABLE IF NOT EXISTS {records} (
                kind TEXT NOT NULL,
                id TEXT NOT NULL,
                owner TEXT,
                stage TEXT,
                status TEXT,
                account_id TEXT,
                version BIGINT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                updated_position BIGINT NOT NULL,
                state TEXT NOT NULL,
                data TEXT NOT NULL,
                PRIMARY KEY (kind, id))"
        )];
        for column in ["updated_position", "updated_at"] {
            statements.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {records} (kind, {column})",
                tables.t(&format!("records_{column}_ix"))
            ));
        }
        for column in ["owner", "stage", "status", "account_id"] {
            statements.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {records} (kind, {column}, updated_position)",
                tables.t(&format!("records_{column}_ix"))
            ));
        }
        statements
    }

    fn table_names(&self) -> Vec<&'static str> {
        vec!["records"]
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        apply_as_batch(self, tx, tables, event).await
    }

    /// Reads the batch's records in a few statements, folds every event into
    /// them in memory (in log order), and writes each touched record once.
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        let (rows, _) = record_rows(tx, tables, events, Touched::new()).await?;
        rows.write(tx).await.map_err(BatchError::whole_batch)
    }

    fn rebuilds_to_rows(&self) -> bool {
        true
    }

    /// As [`apply_batch`](Self::apply_batch), the records the batch before
    /// folded carried typed (that batch may not be committed yet) and the
    /// rest read through `conn`. Stream by stream, only a stream that spans
    /// two batches is ever carried, and nothing is found to read.
    async fn rebuild_rows(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[RecordedEvent],
        _read: Vec<ReadRows>,
        carried: &mut Carried,
    ) -> Result<Vec<RowSet>, BatchError> {
        let before = match carried.take() {
            None => Touched::new(),
            Some(before) => *before.downcast::<Touched>().map_err(|_| {
                BatchError::whole_batch(ProjectionError::Invalid(
                    "records carried something other than its records".into(),
                ))
            })?,
        };
        let (rows, folded) = record_rows(conn, tables, events, before).await?;
        *carried = Some(Box::new(folded));
        Ok(vec![rows])
    }
}

/// Records a batch folded, by kind and id.
type Touched = HashMap<(RecordKind, String), Folded>;

static RECORD_ROW: [(&str, Kind); 12] = [
    ("kind", Kind::Text),
    ("id", Kind::Text),
    ("owner", Kind::Text),
    ("stage", Kind::Text),
    ("status", Kind::Text),
    ("account_id", Kind::Text),
    ("version", Kind::Int),
    ("created_at", Kind::Text),
    ("updated_at", Kind::Text),
    ("updated_position", Kind::Int),
    ("state", Kind::Text),
    ("data", Kind::Text),
];

const UPSERT: &str = "ON CONFLICT (kind, id) DO UPDATE SET owner = EXCLUDED.owner, \
    stage = EXCLUDED.stage, status = EXCLUDED.status, account_id = EXCLUDED.account_id, \
    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, \
    updated_position = EXCLUDED.updated_position, state = EXCLUDED.state, data = EXCLUDED.data";

/// Folds `events` into their records, each taken from `carried` (folded by
/// the batch before) or read through `conn` (the stored row, if any), and
/// returns the rows of the records the batch changed, with the records as
/// folded.
async fn record_rows(
    conn: &mut AnyConnection,
    tables: &Tables,
    events: &[RecordedEvent],
    mut carried: Touched,
) -> Result<(RowSet, Touched), BatchError> {
    let whole_batch = BatchError::whole_batch;
    let records = tables.t("records");
    let mut order: Vec<(RecordKind, String)> = Vec::new();
    let mut touched = Touched::new();
    for event in events {
        if let Some(kind) = RecordKind::from_stream_type(&event.stream_type) {
            let key = (kind, event.stream_id.clone());
            if let std::collections::hash_map::Entry::Vacant(slot) = touched.entry(key) {
                let folded = carried.remove(slot.key()).unwrap_or_default();
                order.push(slot.key().clone());
                slot.insert(folded);
            }
        }
    }
    let unread: Vec<&(RecordKind, String)> = order
        .iter()
        .filter(|key| {
            touched
                .get(*key)
                .is_some_and(|folded| folded.state.is_none())
        })
        .collect();
    for chunk in unread.chunks(KEYS_PER_READ) {
        let wanted: Vec<String> = (0..chunk.len())
            .map(|n| format!("(kind = ${} AND id = ${})", 2 * n + 1, 2 * n + 2))
            .collect();
        let sql = format!(
            "SELECT kind, id, state, created_at, updated_position FROM {records} WHERE {}",
            wanted.join(" OR ")
        );
        let mut query = sqlx::query(&sql).persistent(false);
        for (kind, id) in chunk {
            query = query.bind(kind.as_str()).bind(id.as_str());
        }
        for row in query.fetch_all(&mut *conn).await.map_err(whole_batch)? {
            let kind: String = row.try_get("kind").map_err(whole_batch)?;
            let id: String = row.try_get("id").map_err(whole_batch)?;
            let Some(kind) = RecordKind::from_stream_type(&kind) else {
                continue;
            };
            if let Some(folded) = touched.get_mut(&(kind, id)) {
                folded.stored = Some(row.try_get("state").map_err(whole_batch)?);
                folded.created_at = Some(row.try_get("created_at").map_err(whole_batch)?);
                folded.updated_position = row.try_get("updated_position").map_err(whole_batch)?;
            }
        }
    }
    for (index, event) in events.iter().enumerate() {
        let Some(kind) = RecordKind::from_stream_type(&event.stream_type) else {
            continue;
        };
        let Some(folded) = touched.get_mut(&(kind, event.stream_id.clone())) else {
            continue;
        };
        folded.fold(kind, event).map_err(BatchError::at(index))?;
    }
    let mut rows = RowSet::new(records, &RECORD_ROW, UPSERT.into(), ROWS_PER_UPSERT);
    for key in &order {
        if let Some(folded) = touched.get_mut(key) {
            let (kind, id) = key;
            folded
                .push_row(&mut rows, *kind, id)
                .map_err(BatchError::whole_batch)?;
        }
    }
    Ok((rows, touched))
}

/// Keys per read of a batch's records (two parameters each).
const KEYS_PER_READ: usize = 100;
/// Records per multi-row upsert (12 parameters each).
const ROWS_PER_UPSERT: usize = 50;

/// One record while a batch folds into it: its stored state (JSON) and
/// position, then the aggregate the batch's events made of it.
#[derive(Default)]
struct Folded {
    stored: Option<String>,
    created_at: Option<String>,
    updated_position: i64,
    state: Option<RecordState>,
    last: Option<LastFold>,
}

/// What the last folded event says of the record.
struct LastFold {
    version: i64,
    updated_at: String,
}

impl Folded {
    fn fold(&mut self, kind: RecordKind, event: &RecordedEvent) -> Result<(), ProjectionError> {
        let stored = self.stored.is_some() || self.state.is_some();
        if stored && self.updated_position >= event.position {
            return Ok(()); // already folded
        }
        let state = match &mut self.state {
            Some(state) => state,
            None => {
                self.state.insert(
                    RecordState::load(kind, self.stored.as_deref()).map_err(|e| {
                        ProjectionError::Invalid(format!(
                            "stored {} state {} does not decode: {e}",
                            event.stream_type, event.stream_id
                        ))
                    })?,
                )
            }
        };
        state.apply(event)?;
        self.created_at
            .get_or_insert_with(|| timestamp(&event.recorded_at));
        self.updated_position = event.position;
        self.last = Some(LastFold {
            version: event.version,
            updated_at: timestamp(&event.recorded_at),
        });
        Ok(())
    }

    /// Adds the record's row to `rows`, if an event of the batch changed it,
    /// and clears what the batch changed: carried into the next batch, the
    /// record starts unchanged.
    fn push_row(
        &mut self,
        rows: &mut RowSet,
        kind: RecordKind,
        id: &str,
    ) -> Result<(), ProjectionError> {
        let (Some(state), Some(last)) = (&self.state, self.last.take()) else {
            return Ok(());
        };
        let state = state
            .to_value()
            .map_err(|e| ProjectionError::Invalid(format!("record state does not encode: {e}")))?;
        let state_text = state.to_string();
        let created_at = self.created_at.clone().unwrap_or_default();
        let mut columns = view(kind, state);
        if let Some(object) = columns.data.as_object_mut() {
            object.insert("id".into(), json!(id));
            object.insert("version".into(), json!(last.version));
            object.insert("created_at".into(), json!(created_at));
            object.insert("updated_at".into(), json!(last.updated_at));
            object.insert("position".into(), json!(self.updated_position));
        }
        let data = columns.data.to_string();
        rows.push([
            Field::Text(kind.as_str()),
            Field::Text(id),
            columns.owner.as_deref().into(),
            columns.stage.as_deref().into(),
            columns.status.as_deref().into(),
            columns.account_id.as_deref().into(),
            Field::Int(last.version),
            Field::Text(&created_at),
            Field::Text(&last.updated_at),
            Field::Int(self.updated_position),
            Field::Text(&state_text),
            Field::Text(&data),
        ]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scenario::{
        fold_all, id, on_both_backends, ts, A1, A2, A3, C1, C2, C4, K1, K2, K3, L1, O1, O2, O3, O4,
        T3,
    };

    fn q() -> RecordQuery {
        RecordQuery::default()
    }

    async fn ids(
        db: &ReadDb,
        tables: &Tables,
        kind: RecordKind,
        query: RecordQuery,
    ) -> Vec<String> {
        let page = list(db, tables, kind, &query).await.unwrap();
        assert!(page.next_cursor.is_none());
        page.items
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn all(ns: &[u128]) -> Vec<String> {
        ns.iter().map(|n| id(*n)).collect()
    }

    async fn scenario_body(db: ReadDb) {
        let events = scenario::scenario();
        let tables = fold_all(&db, &RecordsProjection, &events).await;
        use RecordKind::*;

        // Get one: the full current record.
        let o1 = get(&db, &tables, Opportunity, &id(O1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o1["id"], json!(id(O1)));
        assert_eq!(o1["name"], json!("Acme renewal"));
        assert_eq!(o1["stage"], json!("qualification"));
        assert_eq!(o1["probability"], json!(25));
        assert_eq!(o1["owner"], json!("bob"));
        assert_eq!(o1["status"], json!("open"));
        assert_eq!(o1["account_id"], json!(id(A1)));
        assert_eq!(
            o1["amount"],
            json!({"amount": "15000.00", "currency": "USD"})
        );
        assert_eq!(o1["expected_close"], json!("2026-12-31"));
        assert_eq!(o1["version"], json!(3));
        assert_eq!(o1["position"], json!(8));
        assert_eq!(o1["created_at"], json!(ts(5)));
        assert_eq!(o1["updated_at"], json!(ts(7)));
        let o4 = get(&db, &tables, Opportunity, &id(O4))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o4["status"], json!("won"));
        assert_eq!(
            o4["close_value"],
            json!({"amount": "1999.50", "currency": "USD"})
        );
        let c1 = get(&db, &tables, Contact, &id(C1)).await.unwrap().unwrap();
        assert_eq!(c1["name"], json!("Jane Doe"));
        assert_eq!(c1["activity_count"], json!(3));
        assert_eq!(c1["open_tasks"], json!([id(T3)]));
        assert!(c1.get("recent_activities").is_none());
        assert_eq!(c1["version"], json!(5));
        let l1 = get(&db, &tables, Lead, &id(L1)).await.unwrap().unwrap();
        assert_eq!(l1["status"], json!("converted"));
        assert_eq!(l1["converted_to"]["account_id"], json!(id(A3)));
        let a1 = get(&db, &tables, Account, &id(A1)).await.unwrap().unwrap();
        assert_eq!(a1["industry"], json!("technology"));
        assert_eq!(a1["status"], json!("active"));
        let k1 = get(&db, &tables, Case, &id(K1)).await.unwrap().unwrap();
        assert_eq!(k1["status"], json!("resolved"));
        assert_eq!(k1["assignee"], json!("dave"));
        assert_eq!(k1["comment_count"], json!(1));
        assert!(
            get(&db, &tables, Case, &id(O1)).await.unwrap().is_none(),
            "kinds are separate"
        );
        assert!(get(&db, &tables, Lead, "not-an-id")
            .await
            .unwrap()
            .is_none());

        // Lists, in order of last update, with filters.
        assert_eq!(
            ids(&db, &tables, Opportunity, q()).await,
            all(&[O1, O2, O3, O4])
        );
        let owner = |o: &str| RecordQuery {
            owner: Some(o.into()),
            ..q()
        };
        assert_eq!(
            ids(&db, &tables, Opportunity, owner("bob")).await,
            all(&[O1])
        );
        assert_eq!(
            ids(&db, &tables, Opportunity, owner("alice")).await,
            all(&[O2, O3, O4])
        );
        let status = |s: &str| RecordQuery {
            status: Some(s.into()),
            ..q()
        };
        assert_eq!(
            ids(&db, &tables, Opportunity, status("won")).await,
            all(&[O3, O4])
        );
        assert_eq!(
            ids(&db, &tables, Opportunity, status("open")).await,
            all(&[O1, O2])
        );
        let stage = RecordQuery {
            stage: Some("qualification".into()),
            ..q()
        };
        assert_eq!(ids(&db, &tables, Opportunity, stage).await, all(&[O1]));
        let acme = RecordQuery {
            account_id: Some(id(A1)),
            ..q()
        };
        assert_eq!(
            ids(&db, &tables, Opportunity, acme).await,
            all(&[O1, O2, O4])
        );
        let since = RecordQuery {
            updated_since: Some("2026-11-20T09:09:00Z".into()),
            ..q()
        };
        assert_eq!(ids(&db, &tables, Opportunity, since).await, all(&[O3, O4]));
        let combined = RecordQuery {
            owner: Some("alice".into()),
            account_id: Some(id(A1)),
            status: Some("open".into()),
            ..q()
        };
        assert_eq!(ids(&db, &tables, Opportunity, combined).await, all(&[O2]));

        assert_eq!(ids(&db, &tables, Account, q()).await, all(&[A2, A1, A3]));
        assert_eq!(ids(&db, &tables, Account, owner("alice")).await, all(&[A1]));
        assert_eq!(
            ids(&db, &tables, Account, status("archived")).await,
            Vec::<String>::new()
        );
        let contacts_of_acme = RecordQuery {
            account_id: Some(id(A1)),
            ..q()
        };
        assert_eq!(
            ids(&db, &tables, Contact, contacts_of_acme).await,
            all(&[C2, C1])
        );
        assert_eq!(ids(&db, &tables, Contact, q()).await.len(), 4);
        assert_eq!(ids(&db, &tables, Case, owner("dave")).await, all(&[K1]));
        let assignee = RecordQuery {
            assignee: Some("dave".into()),
            ..q()
        };
        assert_eq!(ids(&db, &tables, Case, assignee).await, all(&[K1]));
        assert_eq!(
            ids(&db, &tables, Case, status("open")).await,
            all(&[K2, K3])
        );
        assert_eq!(
            ids(&db, &tables, Lead, status("converted")).await,
            all(&[L1])
        );
        let c4 = get(&db, &tables, Contact, &id(C4)).await.unwrap().unwrap();
        assert_eq!(c4["account_id"], json!(id(A3)));

        // Pages cover everything exactly once.
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = list(
                &db,
                &tables,
                Opportunity,
                &RecordQuery {
                    limit: Some(3),
                    cursor: cursor.clone(),
                    ..q()
                },
            )
            .await
            .unwrap();
            pages += 1;
            seen.extend(
                page.items
                    .iter()
                    .map(|r| r["id"].as_str().unwrap().to_string()),
            );
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 2);
        assert_eq!(seen, all(&[O1, O2, O3, O4]));

        // Unsupported filters and bad input.
        for (kind, bad) in [
            (
                Lead,
                RecordQuery {
                    stage: Some("x".into()),
                    ..q()
                },
            ),
            (Lead, owner("alice")),
            (Contact, owner("alice")),
            (Contact, status("open")),
            (
                Account,
                RecordQuery {
                    account_id: Some(id(A2)),
                    ..q()
                },
            ),
            (
                Opportunity,
                RecordQuery {
                    assignee: Some("dave".into()),
                    ..q()
                },
            ),
            (Opportunity, status("resolved")),
            (
                Opportunity,
                RecordQuery {
                    updated_since: Some("2026-13-01".into()),
                    ..q()
                },
            ),
            (
                Opportunity,
                RecordQuery {
                    cursor: Some("zzz".into()),
                    ..q()
                },
            ),
            (
                Opportunity,
                RecordQuery {
                    limit: Some(1000),
                    ..q()
                },
            ),
        ] {
            assert!(
                matches!(
                    list(&db, &tables, kind, &bad).await,
                    Err(QueryError::Invalid { .. })
                ),
                "{kind:?} {bad:?}"
            );
        }
    }

    on_both_backends!(
        records_scenario_on_sqlite,
        records_scenario_on_postgres,
        scenario_body
    );

    async fn stream_order_body(db: ReadDb) {
        let events = scenario::scenario();
        crate::fold::testkit::assert_stream_order_folds_the_same(&db, &RecordsProjection, &events)
            .await;
    }

    on_both_backends!(
        folded_stream_by_stream_records_are_the_same_on_sqlite,
        folded_stream_by_stream_records_are_the_same_on_postgres,
        stream_order_body
    );

    #[test]
    fn kinds_from_paths_and_streams() {
        assert_eq!(RecordKind::from_collection("leads"), Some(RecordKind::Lead));
        assert_eq!(
            RecordKind::from_collection("opportunities"),
            Some(RecordKind::Opportunity)
        );
        assert_eq!(RecordKind::from_collection("cases"), Some(RecordKind::Case));
        assert_eq!(RecordKind::from_collection("lead"), None);
        assert_eq!(
            RecordKind::from_stream_type("contact"),
            Some(RecordKind::Contact)
        );
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::from_collection(kind.collection()), Some(kind));
        }
    }
}
