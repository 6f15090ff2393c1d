//! The audit read model: one entry per event of every stream (when, who,
//! with which roles, which command, which stream and version, correlation
//! and causation ids, its field-level changes old -> new), and the names of
//! the fields each event changed in a table of their own, so entries can be
//! filtered by the field they changed.
//! Queries: a filtered, cursor-paginated list and a streaming export
//! (CSV / JSON lines) that never holds more than one page in memory.

use std::borrow::Cow;

use crm_domain::account::AccountEvent;
use crm_domain::case::CaseEvent;
use crm_domain::contact::ContactEvent;
use crm_domain::lead::LeadEvent;
use crm_domain::opportunity::OpportunityEvent;
use crm_domain::FieldChange;
use crm_eventlog::RecordedEvent;
use futures::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;

use crate::lookups::ReadRows;
use crate::projection::{
    apply_as_batch, decode, BatchError, Carried, Projection, ProjectionError, Tables, Tx, KEY_ONLY,
};
use crate::readdb::{timestamp, ReadDb};
use crate::records::paging::{
    decode_position_cursor, encode_cursor, json_text_ref, normalise_time, page_limit, parse_time,
    Binds,
};
pub use crate::records::paging::{Page, QueryError};
use crate::registry::Generation;
use crate::rows::{write_all, Field, Kind, RowSet};

/// Name of the projection (and prefix of its tables).
pub const NAME: &str = "audit";
/// Base name of the table of (field, position) rows since version 2.
const CHANGED_FIELDS: &str = "changed_fields";
const CURSOR_TAG: &str = "a1";
/// Rows fetched per round trip by [`export`].
pub const EXPORT_PAGE: i64 = 1000;

/// The audit projection: tables `entries` (one row per event, keyed by
/// global position, its changes old -> new as JSON) and `changed_fields`
/// (field, position: one row per field an event changed).
#[derive(Debug, Default, Clone, Copy)]
pub struct AuditProjection;

/// The tables one generation of the audit trail serves queries from, as
/// its version laid them out.
#[derive(Debug, Clone)]
pub struct AuditTables {
    tables: Tables,
    /// Base name of the table of (field, position) rows the `field` filter
    /// reads: version 1 kept every change, values included, in `changes`
    /// (the values are in the entry too); version 2 keeps only the names.
    by_field: &'static str,
}

impl AuditTables {
    /// The tables of `generation`, an audit generation of any version.
    pub fn of(generation: &Generation) -> Self {
        Self {
            tables: generation.tables(),
            by_field: if generation.version < 2 {
                "changes"
            } else {
                CHANGED_FIELDS
            },
        }
    }

    /// `tables` laid out by this version of the projection.
    pub fn current(tables: &Tables) -> Self {
        Self {
            tables: tables.clone(),
            by_field: CHANGED_FIELDS,
        }
    }
}

/// One audit entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub position: i64,
    pub event_id: String,
    /// When the log stored the event (server clock).
    pub recorded_at: String,
    /// When it happened in the real world, as the event says.
    pub occurred_at: Option<String>,
    pub actor: Option<String>,
    pub roles: Vec<String>,
    pub command: Option<String>,
    pub command_id: Option<String>,
    pub stream_type: String,
    pub stream_id: String,
    pub version: i64,
    pub event_type: String,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    pub changes: Vec<FieldChange>,
}

/// Filters of `GET /v1/audit` (all optional, combined with AND).
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub stream_type: Option<String>,
    pub stream_id: Option<String>,
    pub actor: Option<String>,
    /// Recorded at or after this RFC 3339 time.
    pub from: Option<String>,
    /// Recorded before this RFC 3339 time (exclusive).
    pub to: Option<String>,
    /// Only entries that changed this field.
    pub field: Option<String>,
    pub event_type: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, default 50, at most 500 (ignored by [`export`]).
    pub limit: Option<i64>,
    /// `csv` or `jsonl`: read by the export route, ignored by the queries.
    pub format: Option<String>,
}

/// A validated [`AuditQuery`] (times normalised, cursor decoded).
#[derive(Debug, Clone)]
struct Filter {
    stream_type: Option<String>,
    stream_id: Option<String>,
    actor: Option<String>,
    from: Option<String>,
    to: Option<String>,
    field: Option<String>,
    event_type: Option<String>,
    after: Option<i64>,
}

fn non_blank(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

impl Filter {
    fn parse(query: &AuditQuery) -> Result<Self, QueryError> {
        let from = non_blank(&query.from)
            .map(|v| parse_time("from", &v))
            .transpose()?;
        let to = non_blank(&query.to)
            .map(|v| parse_time("to", &v))
            .transpose()?;
        if let (Some(from), Some(to)) = (&from, &to) {
            if from > to {
                return Err(QueryError::invalid("to", "must not be before from"));
            }
        }
        let after = non_blank(&query.cursor)
            .map(|c| decode_position_cursor(CURSOR_TAG, &c))
            .transpose()?;
        Ok(Self {
            stream_type: non_blank(&query.stream_type),
            stream_id: non_blank(&query.stream_id),
            actor: non_blank(&query.actor),
            from,
            to,
            field: non_blank(&query.field),
            event_type: non_blank(&query.event_type),
            after,
        })
    }

    /// The page query after `after`, `limit` rows.
    fn sql(&self, tables: &AuditTables, after: Option<i64>, limit: i64) -> (String, Binds) {
        let mut b = Binds::default();
        let mut sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM {} e WHERE 1 = 1",
            tables.tables.t("entries")
        );
        let mut eq = |sql: &mut String, column: &str, value: &Option<String>, op: &str| {
            if let Some(v) = value {
                sql.push_str(&format!(" AND e.{column} {op} {}", b.text(v.clone())));
            }
        };
        eq(&mut sql, "stream_type", &self.stream_type, "=");
        eq(&mut sql, "stream_id", &self.stream_id, "=");
        eq(&mut sql, "actor", &self.actor, "=");
        eq(&mut sql, "recorded_at", &self.from, ">=");
        eq(&mut sql, "recorded_at", &self.to, "<");
        eq(&mut sql, "event_type", &self.event_type, "=");
        if let Some(field) = &self.field {
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM {} c WHERE c.position = e.position AND c.field = {})",
                tables.tables.t(tables.by_field),
                b.text(field.clone())
            ));
        }
        if let Some(after) = after {
            sql.push_str(&format!(" AND e.position > {}", b.int(after)));
        }
        sql.push_str(&format!(" ORDER BY e.position LIMIT {}", b.int(limit)));
        (sql, b)
    }
}

const ENTRY_COLUMNS: &str = "e.position, e.event_id, e.recorded_at, e.occurred_at, e.actor, e.roles, e.command, e.command_id, e.stream_type, e.stream_id, e.version, e.event_type, e.correlation_id, e.causation_id, e.request_id, e.client, e.changes";

fn entry_from_row(row: &sqlx::any::AnyRow) -> Result<AuditEntry, QueryError> {
    let roles: String = row.try_get("roles")?;
    let changes: String = row.try_get("changes")?;
    Ok(AuditEntry {
        position: row.try_get("position")?,
        event_id: row.try_get("event_id")?,
        recorded_at: row.try_get("recorded_at")?,
        occurred_at: row.try_get("occurred_at")?,
        actor: row.try_get("actor")?,
        roles: serde_json::from_str(&roles).unwrap_or_default(),
        command: row.try_get("command")?,
        command_id: row.try_get("command_id")?,
        stream_type: row.try_get("stream_type")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("version")?,
        event_type: row.try_get("event_type")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        request_id: row.try_get("request_id")?,
        client: row.try_get("client")?,
        changes: serde_json::from_str(&changes).unwrap_or_default(),
    })
}

async fn fetch(
    db: &ReadDb,
    tables: &AuditTables,
    filter: &Filter,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEntry>, QueryError> {
    let (sql, binds) = filter.sql(tables, after, limit);
    let rows = binds.apply(&sql).fetch_all(&db.pool).await?;
    rows.iter().map(entry_from_row).collect()
}

/// `GET /v1/audit`: entries matching `query`, by global position ascending.
pub async fn list(
    db: &ReadDb,
    tables: &AuditTables,
    query: &AuditQuery,
) -> Result<Page<AuditEntry>, QueryError> {
    let filter = Filter::parse(query)?;
    let limit = page_limit(query.limit)?;
    let mut items = fetch(db, tables, &filter, filter.after, limit + 1).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items
            .last()
            .map(|e| encode_cursor(CURSOR_TAG, &e.position.to_string()))
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

/// `GET /v1/audit/export`: every entry matching `query` (its `cursor` is
/// honoured, its `limit` ignored) in position order, fetched in pages of
/// [`EXPORT_PAGE`] so memory stays flat however many rows match. Bad input
/// is reported before anything streams; a database error ends the stream
/// with an `Err` item.
pub fn export(
    db: &ReadDb,
    tables: &AuditTables,
    query: &AuditQuery,
) -> Result<impl Stream<Item = Result<AuditEntry, QueryError>> + Send + 'static, QueryError> {
    let filter = Filter::parse(query)?;
    let (db, tables) = (db.clone(), tables.clone());
    // State: Some(after) while more pages may follow; after = None means "from the start".
    let start = Some(filter.after);
    let pages = futures::stream::try_unfold(start, move |state| {
        let (db, tables, filter) = (db.clone(), tables.clone(), filter.clone());
        async move {
            let Some(after) = state else {
                return Ok::<_, QueryError>(None);
            };
            let page = fetch(&db, &tables, &filter, after, EXPORT_PAGE).await?;
            if page.is_empty() {
                return Ok(None);
            }
            let next = if (page.len() as i64) < EXPORT_PAGE {
                None
            } else {
                page.last().map(|e| Some(e.position))
            };
            Ok(Some((page, next)))
        }
    });
    Ok(pages
        .map_ok(|page| futures::stream::iter(page.into_iter().map(Ok)))
        .try_flatten()
        .boxed())
}

/// Format of `GET /v1/audit/export?format=csv|jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Csv,
    Jsonl,
}

impl ExportFormat {
    /// `csv` (the default when absent) or `jsonl`.
    pub fn parse(format: Option<&str>) -> Result<Self, QueryError> {
        match format.map(str::trim) {
            None | Some("") | Some("csv") => Ok(Self::Csv),
            Some("jsonl") | Some("ndjson") => Ok(Self::Jsonl),
            Some(_) => Err(QueryError::invalid("format", "must be csv or jsonl")),
        }
    }

    pub fn content_type(&self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Jsonl => "application/x-ndjson",
        }
    }

    /// What the body starts with (the CSV header line; nothing for JSON lines).
    pub fn preamble(&self) -> &'static str {
        match self {
            Self::Csv => CSV_HEADER,
            Self::Jsonl => "",
        }
    }

    /// One entry as a line of this format.
    pub fn line(&self, entry: &AuditEntry) -> String {
        match self {
            Self::Csv => to_csv_row(entry),
            Self::Jsonl => to_jsonl_line(entry),
        }
    }
}

/// Columns of the CSV export, header line included (`\r\n`-terminated).
pub const CSV_HEADER: &str = "position,event_id,recorded_at,occurred_at,actor,roles,command,command_id,stream_type,stream_id,version,event_type,correlation_id,causation_id,request_id,client,changes\r\n";

/// One CSV record (RFC 4180 quoting, `\r\n`-terminated); `roles` and
/// `changes` are JSON text.
pub fn to_csv_row(entry: &AuditEntry) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let cells = [
        entry.position.to_string(),
        entry.event_id.clone(),
        entry.recorded_at.clone(),
        opt(&entry.occurred_at),
        opt(&entry.actor),
        serde_json::to_string(&entry.roles).unwrap_or_default(),
        opt(&entry.command),
        opt(&entry.command_id),
        entry.stream_type.clone(),
        entry.stream_id.clone(),
        entry.version.to_string(),
        entry.event_type.clone(),
        opt(&entry.correlation_id),
        opt(&entry.causation_id),
        opt(&entry.request_id),
        opt(&entry.client),
        serde_json::to_string(&entry.changes).unwrap_or_default(),
    ];
    let mut line = cells
        .iter()
        .map(|c| csv_cell(c))
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

/// RFC 4180: quote a cell holding a comma, quote, CR or LF (or edge
/// spaces), doubling inner quotes.
pub fn csv_cell(value: &str) -> String {
    let needs_quotes =
        value.contains([',', '"', '\r', '\n']) || value.starts_with(' ') || value.ends_with(' ');
    if needs_quotes {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// One JSON-lines record (`\n`-terminated).
pub fn to_jsonl_line(entry: &AuditEntry) -> String {
    let mut line = serde_json::to_string(entry).unwrap_or_default();
    line.push('\n');
    line
}

// ---------------------------------------------------------------- the fold

#[async_trait::async_trait]
impl Projection for AuditProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn stream_local(&self) -> bool {
        true // an entry is built from its event alone
    }

    /// 2: the changed fields' names in `changed_fields` (field, position)
    /// instead of every change with its values in `changes`.
    fn version(&self) -> i64 {
        2
    }

    fn schema(&self, tables: &Tables) -> Vec<String> {
        let entries = tables.t("entries");
        let changed_fields = tables.t(CHANGED_FIELDS);
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {entries} (
                    position BIGINT PRIMARY KEY,
                    event_id TEXT NOT NULL,
                    recorded_at TEXT NOT NULL,
                    occurred_at TEXT,
                    actor TEXT,
                    roles TEXT NOT NULL,
                    command TEXT,
                    command_id TEXT,
                    stream_type TEXT NOT NULL,
                    stream_id TEXT NOT NULL,
                    version BIGINT NOT NULL,
                    event_type TEXT NOT NULL,
                    correlation_id TEXT,
                    causation_id TEXT,
                    request_id TEXT,
                    client TEXT,
                    changes TEXT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {changed_fields} (
                    field TEXT NOT NULL,
                    position BIGINT NOT NULL,
                    PRIMARY KEY (field, position)){KEY_ONLY}"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {entries} (stream_type, stream_id, position)",
                tables.t("entries_stream_ix")
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {entries} (actor, position)",
                tables.t("entries_actor_ix")
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {entries} (recorded_at, position)",
                tables.t("entries_time_ix")
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {entries} (event_type, position)",
                tables.t("entries_type_ix")
            ),
        ]
    }

    fn table_names(&self) -> Vec<&'static str> {
        vec!["entries", CHANGED_FIELDS]
    }

    fn retired_table_names(&self) -> Vec<&'static str> {
        vec!["changes"]
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        apply_as_batch(self, tx, tables, event).await
    }

    /// Entries and changes of the whole batch in multi-row inserts.
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        write_all(tx, &audit_rows(tables, events)?)
            .await
            .map_err(BatchError::whole_batch)
    }

    fn rebuilds_to_rows(&self) -> bool {
        true
    }

    fn rebuild_reads_back(&self) -> bool {
        false // see rebuild_rows
    }

    /// The rows are made from the events alone: nothing read, nothing carried.
    async fn rebuild_rows(
        &self,
        _conn: &mut sqlx::AnyConnection,
        tables: &Tables,
        events: &[RecordedEvent],
        _read: Vec<ReadRows>,
        _carried: &mut Carried,
    ) -> Result<Vec<RowSet>, BatchError> {
        audit_rows(tables, events)
    }
}

/// Rows per multi-row insert: well under SQLite's and PostgreSQL's bound
/// parameter limits (17 columns x 50 = 850).
const ROWS_PER_INSERT: usize = 50;

/// Room reserved up front for a batch's rows: changed fields per event
/// (4.6 on the benchmark's store) and bytes of text per entry and per field.
const CHANGES_PER_EVENT: usize = 5;
const ENTRY_TEXT: usize = 600;
const FIELD_TEXT: usize = 16;

static ENTRY_ROW: [(&str, Kind); 17] = [
    ("position", Kind::Int),
    ("event_id", Kind::Text),
    ("recorded_at", Kind::Text),
    ("occurred_at", Kind::Text),
    ("actor", Kind::Text),
    ("roles", Kind::Text),
    ("command", Kind::Text),
    ("command_id", Kind::Text),
    ("stream_type", Kind::Text),
    ("stream_id", Kind::Text),
    ("version", Kind::Int),
    ("event_type", Kind::Text),
    ("correlation_id", Kind::Text),
    ("causation_id", Kind::Text),
    ("request_id", Kind::Text),
    ("client", Kind::Text),
    ("changes", Kind::Text),
];

static CHANGED_FIELD_ROW: [(&str, Kind); 2] = [("field", Kind::Text), ("position", Kind::Int)];

/// The audit rows of `events`: an entry each and a row per field it
/// changed, made from the events alone.
pub(crate) fn audit_rows(
    tables: &Tables,
    events: &[RecordedEvent],
) -> Result<Vec<RowSet>, BatchError> {
    let mut entries = RowSet::new(
        tables.t("entries"),
        &ENTRY_ROW,
        "ON CONFLICT (position) DO NOTHING".into(),
        ROWS_PER_INSERT,
    );
    let mut changed_fields = RowSet::new(
        tables.t(CHANGED_FIELDS),
        &CHANGED_FIELD_ROW,
        "ON CONFLICT (field, position) DO NOTHING".into(),
        ROWS_PER_INSERT,
    );
    entries.reserve(events.len(), ENTRY_TEXT);
    changed_fields.reserve(events.len() * CHANGES_PER_EVENT, FIELD_TEXT);
    for (index, event) in events.iter().enumerate() {
        let event_changes = changes_of(event).map_err(BatchError::at(index))?;
        push_entry(&mut entries, event, &event_changes);
        // A field the event names twice is one row: the conflict clause.
        for change in &event_changes {
            changed_fields.push([Field::Text(&change.field), Field::Int(event.position)]);
        }
    }
    Ok(vec![entries, changed_fields])
}

/// Adds the audit entry of `event`, in [`ENTRY_ROW`] order.
fn push_entry(entries: &mut RowSet, event: &RecordedEvent, changes: &[FieldChange]) {
    let meta = &event.metadata;
    let [actor, command, command_id, correlation_id, causation_id, request_id, client] = [
        "actor",
        "command",
        "command_id",
        "correlation_id",
        "causation_id",
        "request_id",
        "client",
    ]
    .map(|key| json_text_ref(meta.get(key)));
    let roles: Vec<Cow<'_, str>> = match meta.get("roles") {
        Some(Value::Array(roles)) => roles
            .iter()
            .filter_map(|r| json_text_ref(Some(r)))
            .collect(),
        _ => Vec::new(),
    };
    let occurred_at = ["occurred_at", "opened_at"]
        .iter()
        .find_map(|k| event.payload.get(*k).and_then(Value::as_str))
        .and_then(normalise_time);
    let roles = serde_json::to_string(&roles).unwrap_or_else(|_| "[]".into());
    let changes = serde_json::to_string(changes).unwrap_or_else(|_| "[]".into());
    let event_id = event.event_id.to_string();
    let recorded_at = timestamp(&event.recorded_at);
    entries.push([
        Field::Int(event.position),
        Field::Text(&event_id),
        Field::Text(&recorded_at),
        occurred_at.as_deref().into(),
        actor.as_deref().into(),
        Field::Text(&roles),
        command.as_deref().into(),
        command_id.as_deref().into(),
        Field::Text(&event.stream_type),
        Field::Text(&event.stream_id),
        Field::Int(event.version),
        Field::Text(&event.event_type),
        correlation_id.as_deref().into(),
        causation_id.as_deref().into(),
        request_id.as_deref().into(),
        client.as_deref().into(),
        Field::Text(&changes),
    ]);
}

// ------------------------------------------------------- field-level changes

fn change(field: &str, old: Value, new: Value) -> FieldChange {
    FieldChange {
        field: field.to_string(),
        old,
        new,
    }
}

/// Creation: every non-null payload field (except `type` / `occurred_at`)
/// goes from null to its value, named `prefix + key`.
fn created(payload: &Value, prefix: &str) -> Vec<FieldChange> {
    let Some(object) = payload.as_object() else {
        return Vec::new();
    };
    object
        .iter()
        .filter(|(key, value)| !value.is_null() && *key != "type" && *key != "occurred_at")
        .map(|(key, value)| change(&format!("{prefix}{key}"), Value::Null, value.clone()))
        .collect()
}

fn set(field: &str, new: Value) -> Option<FieldChange> {
    (!new.is_null()).then(|| change(field, Value::Null, new))
}

/// The field-level changes of an event: the `changes` of update events,
/// and changes derived from the payload for creations and transitions.
/// Events of unknown stream types have none.
pub fn changes_of(event: &RecordedEvent) -> Result<Vec<FieldChange>, ProjectionError> {
    let p = &event.payload;
    let status = |old: Value, new: &str| change("status", old, json!(new));
    let mut out = match event.stream_type.as_str() {
        "lead" => match decode::<LeadEvent>(event)? {
            LeadEvent::LeadCaptured { .. } => {
                let mut c = created(p, "");
                c.push(status(Value::Null, "new"));
                c
            }
            LeadEvent::LeadQualified { from, .. } => vec![status(json!(from), "qualified")],
            LeadEvent::LeadDisqualified { from, reason, .. } => {
                vec![
                    status(json!(from), "disqualified"),
                    change("disqualified_reason", Value::Null, json!(reason)),
                ]
            }
            LeadEvent::LeadConverted {
                from,
                account_id,
                contact_id,
                opportunity_id,
                ..
            } => vec![
                status(json!(from), "converted"),
                change(
                    "converted_to",
                    Value::Null,
                    json!({"account_id": account_id, "contact_id": contact_id, "opportunity_id": opportunity_id}),
                ),
            ],
        },
        "account" => match decode::<AccountEvent>(event)? {
            AccountEvent::AccountRegistered { .. } => {
                let mut c = created(p, "");
                c.push(status(Value::Null, "active"));
                c
            }
            AccountEvent::AccountDetailsUpdated { changes, .. } => changes,
            AccountEvent::AccountOwnerAssigned { from, to, .. } => {
                vec![change("owner", json!(from), json!(to))]
            }
            AccountEvent::AccountArchived { reason, .. } => {
                let mut c = vec![status(json!("active"), "archived")];
                c.extend(set("archive_reason", json!(reason)));
                c
            }
            AccountEvent::AccountRestored { .. } => vec![status(json!("archived"), "active")],
        },
        "contact" => match decode::<ContactEvent>(event)? {
            ContactEvent::ContactCreated { .. } => created(p, ""),
            ContactEvent::ContactUpdated { changes, .. } => changes,
            ContactEvent::ActivityLogged { .. } => created(p, "activity."),
            ContactEvent::TaskCompleted { outcome, .. } => {
                let mut c = vec![change("activity.status", json!("open"), json!("completed"))];
                c.extend(set("activity.outcome", json!(outcome)));
                c
            }
        },
        "opportunity" => match decode::<OpportunityEvent>(event)? {
            OpportunityEvent::OpportunityOpened { .. } => {
                let mut c = created(p, "");
                c.push(status(Value::Null, "open"));
                c
            }
            OpportunityEvent::OpportunityStageAdvanced { from, to, .. } => {
                vec![change("stage", json!(from), json!(to))]
            }
            OpportunityEvent::OpportunityUpdated { changes, .. } => changes,
            OpportunityEvent::OpportunityWon {
                from,
                to,
                close_value,
                ..
            } => vec![
                change("stage", json!(from), json!(to)),
                status(json!("open"), "won"),
                change("close_value", Value::Null, json!(close_value)),
            ],
            OpportunityEvent::OpportunityLost {
                from,
                to,
                reason,
                competitor,
                ..
            } => {
                let mut c = vec![
                    change("stage", json!(from), json!(to)),
                    status(json!("open"), "lost"),
                    change("lost_reason", Value::Null, json!(reason)),
                ];
                c.extend(set("competitor", json!(competitor)));
                c
            }
            OpportunityEvent::OpportunityReopened {
                previous_status,
                from,
                to,
                ..
            } => vec![
                status(json!(previous_status), "open"),
                change("stage", json!(from), json!(to)),
            ],
        },
        "case" => match decode::<CaseEvent>(event)? {
            CaseEvent::CaseOpened { .. } => {
                let mut c = created(p, "");
                c.push(status(Value::Null, "open"));
                c
            }
            CaseEvent::CaseAssigned { from, to, .. } => {
                vec![change("assignee", json!(from), json!(to))]
            }
            CaseEvent::CaseCommented { .. } => created(p, "comment."),
            CaseEvent::CaseEscalated {
                from_level,
                level,
                reason,
                ..
            } => vec![
                change("escalation_level", json!(from_level), json!(level)),
                change("escalation_reason", Value::Null, json!(reason)),
            ],
            CaseEvent::CaseResolved {
                from, resolution, ..
            } => vec![
                status(json!(from), "resolved"),
                change("resolution", Value::Null, json!(resolution)),
            ],
            CaseEvent::CaseClosed { .. } => vec![status(json!("resolved"), "closed")],
            CaseEvent::CaseReopened { from, to, .. } => vec![status(json!(from), to.as_str())],
        },
        _ => Vec::new(),
    };
    out.retain(|c| c.old != c.new);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::scenario::{self, fold_all, id, on_both_backends, ts, C1, O1};
    use futures::StreamExt;

    /// Metadata values that are not strings are kept as their JSON text (a
    /// number stays a number's digits), nulls and absent keys as NULL.
    #[test]
    fn entry_metadata_is_text_as_given() {
        let mut event = scenario::scenario().remove(0);
        event.metadata = json!({
            "actor": "ann",
            "roles": ["admin", 7],
            "request_id": 42,
            "client": {"app": "web"},
            "command": null,
        });
        let rows = audit_rows(&Tables::new(NAME, 1), &[event]).unwrap();
        let entry: Vec<Field> = rows[0].rows().next().unwrap().collect();
        let column = |name: &str| entry[ENTRY_ROW.iter().position(|(c, _)| *c == name).unwrap()];
        assert_eq!(column("actor"), Field::Text("ann"));
        assert_eq!(column("roles"), Field::Text(r#"["admin","7"]"#));
        assert_eq!(column("request_id"), Field::Text("42"));
        assert_eq!(column("client"), Field::Text(r#"{"app":"web"}"#));
        assert_eq!(column("command"), Field::Null);
        assert_eq!(column("causation_id"), Field::Null);
    }

    fn q() -> AuditQuery {
        AuditQuery::default()
    }

    async fn positions(db: &ReadDb, tables: &AuditTables, query: AuditQuery) -> Vec<i64> {
        let page = list(
            db,
            tables,
            &AuditQuery {
                limit: Some(500),
                ..query
            },
        )
        .await
        .unwrap();
        assert!(page.next_cursor.is_none());
        page.items.iter().map(|e| e.position).collect()
    }

    async fn scenario_body(db: ReadDb) {
        let events = scenario::scenario();
        let tables = AuditTables::current(&fold_all(&db, &AuditProjection, &events).await);

        // One entry per event, in log order.
        let all = positions(&db, &tables, q()).await;
        assert_eq!(all, (1..=30).collect::<Vec<_>>());

        // The opportunity update: field-level old -> new, with its metadata.
        let page = list(
            &db,
            &tables,
            &AuditQuery {
                stream_id: Some(id(O1)),
                ..q()
            },
        )
        .await
        .unwrap();
        let update = &page.items[2];
        assert_eq!(update.position, 8);
        assert_eq!(update.event_type, "OpportunityUpdated");
        assert_eq!(update.stream_type, "opportunity");
        assert_eq!(update.version, 3);
        assert_eq!(update.actor.as_deref(), Some("bob"));
        assert_eq!(update.roles, vec!["admin".to_string()]);
        assert_eq!(update.command.as_deref(), Some("opportunity.test"));
        assert_eq!(update.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(update.causation_id.as_deref(), Some("cause-1"));
        assert_eq!(update.recorded_at, ts(7));
        assert_eq!(update.occurred_at.as_deref(), Some(ts(7).as_str()));
        assert_eq!(update.event_id, events[7].event_id.to_string());
        assert_eq!(
            update.changes,
            vec![
                change(
                    "amount",
                    json!({"amount": "12500.00", "currency": "USD"}),
                    json!({"amount": "15000.00", "currency": "USD"})
                ),
                change("owner", json!("alice"), json!("bob")),
            ]
        );
        // The stage move.
        let advance = &page.items[1];
        assert_eq!(advance.event_type, "OpportunityStageAdvanced");
        assert_eq!(
            advance.changes,
            vec![change(
                "stage",
                json!("prospecting"),
                json!("qualification")
            )]
        );
        // A creation: every given field from null; a win: stage + status + close value.
        let opened = &page.items[0];
        assert!(opened
            .changes
            .contains(&change("name", Value::Null, json!("Acme renewal"))));
        assert!(opened
            .changes
            .contains(&change("status", Value::Null, json!("open"))));
        assert!(!opened
            .changes
            .iter()
            .any(|c| c.field == "occurred_at" || c.field == "type"));
        let won = list(
            &db,
            &tables,
            &AuditQuery {
                event_type: Some("OpportunityWon".into()),
                ..q()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            won.items.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![11, 28]
        );
        assert!(won.items[1]
            .changes
            .contains(&change("status", json!("open"), json!("won"))));
        assert!(won.items[1].changes.contains(&change(
            "stage",
            json!("prospecting"),
            json!("closed_won")
        )));

        // Filters.
        let by = |actor: &str| AuditQuery {
            actor: Some(actor.into()),
            ..q()
        };
        assert_eq!(
            positions(&db, &tables, by("bob")).await,
            vec![4, 5, 8, 11, 14, 15]
        );
        assert_eq!(
            positions(&db, &tables, by("carol")).await,
            vec![16, 17, 22, 29]
        );
        assert_eq!(
            positions(&db, &tables, by("nobody")).await,
            Vec::<i64>::new()
        );
        let stream = AuditQuery {
            stream_type: Some("opportunity".into()),
            stream_id: Some(id(O1)),
            ..q()
        };
        assert_eq!(positions(&db, &tables, stream).await, vec![6, 7, 8]);
        let contacts = AuditQuery {
            stream_type: Some("contact".into()),
            stream_id: Some(id(C1)),
            ..q()
        };
        assert_eq!(
            positions(&db, &tables, contacts).await,
            vec![3, 12, 13, 21, 30]
        );
        let window = AuditQuery {
            from: Some("2026-11-20T09:10:00Z".into()),
            to: Some("2026-11-20T10:14:00+01:00".into()),
            ..q()
        };
        assert_eq!(positions(&db, &tables, window).await, vec![11, 12, 13, 14]);
        let field = |f: &str| AuditQuery {
            field: Some(f.into()),
            ..q()
        };
        assert_eq!(
            positions(&db, &tables, field("stage")).await,
            vec![6, 7, 9, 10, 11, 27, 28]
        );
        assert_eq!(
            positions(&db, &tables, field("amount")).await,
            vec![6, 8, 9, 10, 27]
        );
        assert_eq!(positions(&db, &tables, field("industry")).await, vec![20]);
        assert_eq!(positions(&db, &tables, field("assignee")).await, vec![17]);
        let case_status = AuditQuery {
            stream_type: Some("case".into()),
            field: Some("status".into()),
            ..q()
        };
        assert_eq!(
            positions(&db, &tables, case_status).await,
            vec![16, 19, 22, 29]
        );
        let opened = AuditQuery {
            event_type: Some("CaseOpened".into()),
            actor: Some("carol".into()),
            ..q()
        };
        assert_eq!(positions(&db, &tables, opened).await, vec![16, 22, 29]);

        // Cursor pages cover everything exactly once, in order.
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = list(
                &db,
                &tables,
                &AuditQuery {
                    limit: Some(7),
                    cursor: cursor.clone(),
                    ..q()
                },
            )
            .await
            .unwrap();
            pages += 1;
            assert!(page.items.len() <= 7);
            seen.extend(page.items.iter().map(|e| e.position));
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 5);
        assert_eq!(seen, (1..=30).collect::<Vec<_>>());
        // Filters apply across pages too.
        let first = list(
            &db,
            &tables,
            &AuditQuery {
                limit: Some(2),
                ..by("bob")
            },
        )
        .await
        .unwrap();
        let second = list(
            &db,
            &tables,
            &AuditQuery {
                limit: Some(2),
                cursor: first.next_cursor,
                ..by("bob")
            },
        )
        .await
        .unwrap();
        assert_eq!(
            second.items.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![8, 11]
        );

        // Bad input.
        for bad in [
            AuditQuery {
                cursor: Some("garbage".into()),
                ..q()
            },
            AuditQuery {
                from: Some("yesterday".into()),
                ..q()
            },
            AuditQuery {
                from: Some("2026-11-21T00:00:00Z".into()),
                to: Some("2026-11-20T00:00:00Z".into()),
                ..q()
            },
            AuditQuery {
                limit: Some(0),
                ..q()
            },
            AuditQuery {
                limit: Some(501),
                ..q()
            },
        ] {
            assert!(
                matches!(
                    list(&db, &tables, &bad).await,
                    Err(QueryError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(export(
            &db,
            &tables,
            &AuditQuery {
                to: Some("x".into()),
                ..q()
            }
        )
        .is_err());

        // The export honours filters.
        let exported: Vec<AuditEntry> = export(&db, &tables, &by("carol"))
            .unwrap()
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert_eq!(
            exported.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![16, 17, 22, 29]
        );
    }

    on_both_backends!(
        audit_scenario_on_sqlite,
        audit_scenario_on_postgres,
        scenario_body
    );

    /// Account `stream` registered as `name`, owned by alice, at minute `at`.
    fn registered(stream: u128, name: String, at: i64) -> AccountEvent {
        AccountEvent::AccountRegistered {
            account_id: crm_domain::AccountId::new(scenario::uuid(stream)),
            name,
            kind: crm_domain::values::AccountKind::Customer,
            industry: None,
            segment: None,
            employees: None,
            address: None,
            website: None,
            owner: Some("alice".into()),
            occurred_at: scenario::at(at),
        }
    }

    /// 5000 entries stream out in order, in pages, without a gap or a repeat.
    async fn export_body(db: ReadDb) {
        let n = 5000_i64;
        let mut script = scenario::Script::default();
        for i in 0..n {
            let stream = 0x1000 + (i % 50) as u128;
            let event = if i < 50 {
                registered(stream, format!("Account \"{i}\", Ltd"), i)
            } else {
                AccountEvent::AccountOwnerAssigned {
                    from: Some(format!("owner{}", i - 50)),
                    to: format!("owner{i}"),
                    occurred_at: scenario::at(i),
                }
            };
            let actor = if i % 2 == 0 { "even" } else { "odd" };
            script.record("account", stream, &event, actor, i);
        }
        let tables = Tables::new(NAME, 1);
        crate::fold::create_tables(&db, &AuditProjection, &tables)
            .await
            .unwrap();
        for batch in script.events.chunks(500) {
            crate::fold::fold_batch(&db, &AuditProjection, &tables, batch, None)
                .await
                .unwrap();
        }

        let tables = AuditTables::current(&tables);
        let mut stream = export(&db, &tables, &q()).unwrap();
        let mut expected = 1;
        let mut csv = String::from(CSV_HEADER);
        while let Some(entry) = stream.next().await {
            let entry = entry.unwrap();
            assert_eq!(entry.position, expected, "in order, no gap, no repeat");
            csv.push_str(&to_csv_row(&entry));
            expected += 1;
        }
        assert_eq!(expected - 1, n);
        assert_eq!(
            csv.matches("\r\n").count() as i64,
            n + 1,
            "header + one line per entry"
        );
        // Quoting round-trips: the first data record parses back to its cells.
        let first_record = &csv[CSV_HEADER.len()..];
        let cells = parse_csv_record(first_record);
        assert_eq!(cells.len(), CSV_HEADER.split(',').count());
        assert_eq!(cells[0], "1");
        let changes: Vec<FieldChange> = serde_json::from_str(&cells[16]).unwrap();
        assert!(changes.contains(&change("name", Value::Null, json!("Account \"0\", Ltd"))));

        let odd: Vec<i64> = export(
            &db,
            &tables,
            &AuditQuery {
                actor: Some("odd".into()),
                ..q()
            },
        )
        .unwrap()
        .map(|e| e.unwrap().position)
        .collect()
        .await;
        assert_eq!(odd, (1..=n).filter(|p| p % 2 == 0).collect::<Vec<_>>());
        // Resumes after a cursor.
        let page = list(
            &db,
            &tables,
            &AuditQuery {
                limit: Some(500),
                ..q()
            },
        )
        .await
        .unwrap();
        let rest = export(
            &db,
            &tables,
            &AuditQuery {
                cursor: page.next_cursor,
                ..q()
            },
        )
        .unwrap()
        .count()
        .await;
        assert_eq!(rest as i64, n - 500);
        // JSON lines decode back.
        let line = to_jsonl_line(&page.items[0]);
        assert!(line.ends_with('\n'));
        assert_eq!(
            serde_json::from_str::<AuditEntry>(line.trim()).unwrap(),
            page.items[0]
        );
    }

    on_both_backends!(
        audit_export_on_sqlite,
        audit_export_on_postgres,
        export_body
    );

    /// A version 1 generation (every change in `changes`, values included)
    /// still answers the `field` filter until its rebuild replaces it, and
    /// its `changes` table goes when the generation is dropped.
    async fn version_1_body(db: ReadDb) {
        let tables = fold_all(&db, &AuditProjection, &scenario::scenario()).await;
        let exec = |sql: String| {
            let pool = db.pool.clone();
            async move { sqlx::query(&sql).execute(&pool).await.map(|_| ()) }
        };
        let (changes, changed_fields) = (tables.t("changes"), tables.t("changed_fields"));
        exec(format!(
            "CREATE TABLE {changes} (position BIGINT NOT NULL, seq BIGINT NOT NULL, \
             field TEXT NOT NULL, old_value TEXT NOT NULL, new_value TEXT NOT NULL, \
             PRIMARY KEY (position, seq))"
        ))
        .await
        .unwrap();
        exec(format!(
            "INSERT INTO {changes} SELECT position, (SELECT COUNT(*) FROM {changed_fields} b \
             WHERE b.position = a.position AND b.field < a.field), field, 'old', 'new' \
             FROM {changed_fields} a"
        ))
        .await
        .unwrap();
        exec(format!("DELETE FROM {changed_fields}")).await.unwrap();
        let generation = Generation {
            name: NAME.into(),
            generation: 1,
            version: 1,
            state: crate::registry::ACTIVE.into(),
            checkpoint: 30,
            failed_event_id: None,
            failed_position: None,
            error: None,
            updated_at: ts(30),
        };
        let field = |name: &str| AuditQuery {
            field: Some(name.into()),
            ..q()
        };
        let old = AuditTables::of(&generation);
        assert_eq!(positions(&db, &old, field("industry")).await, vec![20]);
        assert_eq!(positions(&db, &old, field("assignee")).await, vec![17]);
        let current = AuditTables::current(&tables);
        assert_eq!(
            positions(&db, &current, field("industry")).await,
            Vec::<i64>::new()
        );

        crate::fold::drop_tables(&db, &AuditProjection, &tables)
            .await
            .unwrap();
        for table in [changes, changed_fields, tables.t("entries")] {
            assert!(
                exec(format!("SELECT 1 FROM {table}")).await.is_err(),
                "{table} dropped"
            );
        }
    }

    /// An event that names a field twice changed it once: one row, one entry.
    async fn field_named_twice_body(db: ReadDb) {
        let stream = 0x2000;
        let mut script = scenario::Script::default();
        script.record(
            "account",
            stream,
            &registered(stream, "Acme".into(), 0),
            "ann",
            0,
        );
        let renamed = AccountEvent::AccountDetailsUpdated {
            changes: vec![
                change("name", json!("Acme"), json!("Acme 2")),
                change("name", json!("Acme 2"), json!("Acme 3")),
            ],
            occurred_at: scenario::at(1),
        };
        script.record("account", stream, &renamed, "ann", 1);
        let tables = fold_all(&db, &AuditProjection, &script.events).await;
        let rows: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {} WHERE field = 'name' AND position = 2",
            tables.t(CHANGED_FIELDS)
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(rows, 1);
        let name = AuditQuery {
            field: Some("name".into()),
            ..q()
        };
        let tables = AuditTables::current(&tables);
        assert_eq!(positions(&db, &tables, name).await, vec![1, 2]);
    }

    on_both_backends!(
        audit_field_named_twice_on_sqlite,
        audit_field_named_twice_on_postgres,
        field_named_twice_body
    );

    on_both_backends!(
        audit_version_1_on_sqlite,
        audit_version_1_on_postgres,
        version_1_body
    );

    /// Parses the first RFC 4180 record of `text` (test oracle).
    fn parse_csv_record(text: &str) -> Vec<String> {
        let mut cells = vec![String::new()];
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    chars.next();
                    cells.last_mut().unwrap().push('"');
                }
                ('"', _) => quoted = !quoted,
                (',', false) => cells.push(String::new()),
                ('\r', false) => break,
                (c, _) => cells.last_mut().unwrap().push(c),
            }
        }
        cells
    }

    #[test]
    fn export_formats() {
        assert_eq!(ExportFormat::parse(None).unwrap(), ExportFormat::Csv);
        assert_eq!(
            ExportFormat::parse(Some("jsonl")).unwrap(),
            ExportFormat::Jsonl
        );
        assert!(ExportFormat::parse(Some("xml")).unwrap_err().is_invalid());
        assert!(ExportFormat::Csv.preamble().starts_with("position,"));
    }

    #[test]
    fn csv_cells_are_quoted() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_cell(""), "");
    }
}
