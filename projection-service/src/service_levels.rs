//! Case service levels read model: one row per support case with its SLA due
//! times (first response, resolution) and when they were met; the queries
//! behind "open cases with breaches" and "average response / resolution time
//! by priority and by assignee".
//!
//! Rules:
//! - a due time is breached when it was met after it was due, or is still
//!   not met and `now` (passed by the caller) is past it;
//! - the first response is the first public comment (`first_response` flag of
//!   `CaseCommented`); it is never cleared;
//! - reopening a resolved or closed case clears `resolved_at` / `closed_at`
//!   (the resolution due time stays), so the case counts as unresolved again
//!   until it is resolved anew;
//! - stats cover the cases opened in `[from, to]` (UTC dates); times are
//!   minutes from `opened_at`.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use crm_domain::case::CaseEvent;
use crm_domain::values::CasePriority;
use crm_eventlog::RecordedEvent;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::lookups::{Cell, Kind, Lookups, Table};
use crate::projection::{
    apply_as_batch, decode, BatchError, Placeholders, Projection, ProjectionError, Tables, Tx,
};
use crate::readdb::{timestamp, ReadDb};

/// Base name of the table (one row per case).
pub const CASES: &str = "cases";

/// The case service levels read model (`service_levels`, version 1).
pub struct ServiceLevelsProjection;

#[async_trait::async_trait]
impl Projection for ServiceLevelsProjection {
    fn name(&self) -> &'static str {
        "service_levels"
    }

    fn stream_local(&self) -> bool {
        true // rows are keyed by the case, built from its own events
    }

    fn version(&self) -> i64 {
        1
    }

    fn schema(&self, tables: &Tables) -> Vec<String> {
        let t = tables.t(CASES);
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    id TEXT PRIMARY KEY,
                    account_id TEXT,
                    contact_id TEXT,
                    priority TEXT NOT NULL,
                    status TEXT NOT NULL,
                    assignee TEXT,
                    opened_at TEXT NOT NULL,
                    first_response_due TEXT NOT NULL,
                    resolution_due TEXT NOT NULL,
                    first_responded_at TEXT,
                    resolved_at TEXT,
                    closed_at TEXT,
                    escalation_level BIGINT NOT NULL,
                    reopen_count BIGINT NOT NULL,
                    version BIGINT NOT NULL,
                    position BIGINT NOT NULL,
                    updated_at TEXT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {t}_status_idx ON {t}(status, resolution_due)"),
            format!("CREATE INDEX IF NOT EXISTS {t}_opened_idx ON {t}(opened_at)"),
        ]
    }

    fn table_names(&self) -> Vec<&'static str> {
        vec![CASES]
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        apply_as_batch(self, tx, tables, event).await
    }

    /// Reads the batch's cases in one statement, folds every event into them
    /// in memory (in log order) and writes each changed case once: a
    /// statement per event was the slowest live fold on PostgreSQL, a round
    /// trip each (bench/README.md, cause 4).
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        let mut cases = Lookups::new(tables, Placeholders::of(tx));
        cases
            .read_ahead_streams(tx, &CASE_ROWS, events, "case")
            .await
            .map_err(BatchError::whole_batch)?;
        for (index, event) in events.iter().enumerate() {
            if event.stream_type == "case" {
                fold_case(tx, &mut cases, event)
                    .await
                    .map_err(BatchError::at(index))?;
            }
        }
        cases.write_back(tx).await.map_err(BatchError::whole_batch)
    }
}

/// The cases table as the fold holds its rows.
static CASE_ROWS: Table = Table {
    base: CASES,
    columns: &[
        ("id", Kind::Text),
        ("account_id", Kind::Text),
        ("contact_id", Kind::Text),
        ("priority", Kind::Text),
        ("status", Kind::Text),
        ("assignee", Kind::Text),
        ("opened_at", Kind::Text),
        ("first_response_due", Kind::Text),
        ("resolution_due", Kind::Text),
        ("first_responded_at", Kind::Text),
        ("resolved_at", Kind::Text),
        ("closed_at", Kind::Text),
        ("escalation_level", Kind::Int),
        ("reopen_count", Kind::Int),
        ("version", Kind::Int),
        ("position", Kind::Int),
        ("updated_at", Kind::Text),
    ],
};

/// Folds one case event into its row: an opening creates it (once), every
/// later event changes it and stamps its version, position and time (an
/// event of a case without a row changes nothing).
async fn fold_case(
    tx: &mut Tx,
    cases: &mut Lookups,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    let id = event.stream_id.as_str();
    let stamp = [
        ("version", Cell::Int(event.version)),
        ("position", Cell::Int(event.position)),
        ("updated_at", timestamp(&event.recorded_at).into()),
    ];
    // Read ahead with the batch, or made by an earlier event of it; only
    // what the events below read of it is taken, not the whole row.
    let case = cases.get(tx, &CASE_ROWS, id).await?.map(|row| CaseSoFar {
        status: row.text("status").unwrap_or_default(),
        responded: row.text("first_responded_at").is_some(),
        reopens: row.int("reopen_count").unwrap_or(0),
    });
    let mut cells: Vec<(&str, Cell)> = match (decode::<CaseEvent>(event)?, case) {
        (
            CaseEvent::CaseOpened {
                account_id,
                contact_id,
                priority,
                opened_at,
                first_response_due,
                resolution_due,
                ..
            },
            None,
        ) => {
            let mut cells = vec![
                ("account_id", account_id.map(|a| a.to_string()).into()),
                ("contact_id", contact_id.map(|c| c.to_string()).into()),
                ("priority", priority.as_str().into()),
                ("status", "open".into()),
                ("opened_at", timestamp(&opened_at).into()),
                ("first_response_due", timestamp(&first_response_due).into()),
                ("resolution_due", timestamp(&resolution_due).into()),
                ("escalation_level", 0.into()),
                ("reopen_count", 0.into()),
            ];
            cells.extend(stamp);
            cases.upsert(tx, &CASE_ROWS, id, &cells).await?;
            return Ok(());
        }
        (CaseEvent::CaseOpened { .. }, Some(_)) | (_, None) => return Ok(()),
        (CaseEvent::CaseAssigned { to, .. }, Some(case)) => {
            let status = if case.status == "open" {
                "assigned".into()
            } else {
                case.status
            };
            vec![("assignee", to.into()), ("status", status.into())]
        }
        (
            CaseEvent::CaseCommented {
                first_response: true,
                occurred_at,
                ..
            },
            Some(case),
        ) if !case.responded => {
            vec![("first_responded_at", timestamp(&occurred_at).into())]
        }
        (CaseEvent::CaseCommented { .. }, Some(_)) => vec![],
        (CaseEvent::CaseEscalated { level, .. }, Some(_)) => {
            vec![("escalation_level", i64::from(level).into())]
        }
        (CaseEvent::CaseResolved { occurred_at, .. }, Some(_)) => vec![
            ("status", "resolved".into()),
            ("resolved_at", timestamp(&occurred_at).into()),
        ],
        (CaseEvent::CaseClosed { occurred_at }, Some(_)) => vec![
            ("status", "closed".into()),
            ("closed_at", timestamp(&occurred_at).into()),
        ],
        (CaseEvent::CaseReopened { to, .. }, Some(case)) => vec![
            ("status", to.as_str().into()),
            ("resolved_at", Cell::Null),
            ("closed_at", Cell::Null),
            ("reopen_count", (case.reopens + 1).into()),
        ],
    };
    cells.extend(stamp);
    // The row is there (held above): set its cells without looking again.
    cases.upsert(tx, &CASE_ROWS, id, &cells).await?;
    Ok(())
}

/// What a case's later events read of its row.
struct CaseSoFar {
    status: String,
    responded: bool,
    reopens: i64,
}

/// Rejected queries (the HTTP layer answers 422).
#[derive(Debug, thiserror::Error)]
pub enum SlaError {
    #[error("from ({from}) is after to ({to})")]
    InvalidRange { from: NaiveDate, to: NaiveDate },
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
}

struct CaseRow {
    id: String,
    account_id: Option<String>,
    contact_id: Option<String>,
    priority: String,
    status: String,
    assignee: Option<String>,
    opened_at: DateTime<Utc>,
    first_response_due: DateTime<Utc>,
    resolution_due: DateTime<Utc>,
    first_responded_at: Option<DateTime<Utc>>,
    resolved_at: Option<DateTime<Utc>>,
    escalation_level: i64,
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| sqlx::Error::Decode(format!("timestamp {s:?}: {e}").into()))
}

fn opt_time(row: &AnyRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    row.try_get::<Option<String>, _>(column)?
        .map(|s| parse_time(&s))
        .transpose()
}

impl CaseRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            contact_id: r.try_get("contact_id")?,
            priority: r.try_get("priority")?,
            status: r.try_get("status")?,
            assignee: r.try_get("assignee")?,
            opened_at: parse_time(&r.try_get::<String, _>("opened_at")?)?,
            first_response_due: parse_time(&r.try_get::<String, _>("first_response_due")?)?,
            resolution_due: parse_time(&r.try_get::<String, _>("resolution_due")?)?,
            first_responded_at: opt_time(r, "first_responded_at")?,
            resolved_at: opt_time(r, "resolved_at")?,
            escalation_level: r.try_get("escalation_level")?,
        })
    }

    fn first_response_breached(&self, now: DateTime<Utc>) -> bool {
        breached(self.first_responded_at, self.first_response_due, now)
    }

    fn resolution_breached(&self, now: DateTime<Utc>) -> bool {
        breached(self.resolved_at, self.resolution_due, now)
    }
}

fn breached(done: Option<DateTime<Utc>>, due: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    match done {
        Some(at) => at > due,
        None => now > due,
    }
}

const COLUMNS: &str = "id, account_id, contact_id, priority, status, assignee, opened_at,
    first_response_due, resolution_due, first_responded_at, resolved_at, escalation_level";

async fn fetch(db: &ReadDb, sql: &str, values: Vec<String>) -> Result<Vec<CaseRow>, sqlx::Error> {
    let mut q = sqlx::query(sql);
    for v in values {
        q = q.bind(v);
    }
    q.fetch_all(&db.pool)
        .await?
        .iter()
        .map(CaseRow::from_row)
        .collect()
}

// ------------------------------------------------------------- open cases

fn now_default() -> DateTime<Utc> {
    Utc::now()
}

/// Open (open or assigned) cases, optionally of one assignee / priority.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct OpenCasesQuery {
    pub assignee: Option<String>,
    /// low | normal | high | urgent.
    pub priority: Option<String>,
    /// The instant breaches are judged at (the clock of the caller; defaults
    /// to the current time when deserialized without it).
    #[serde(default = "now_default")]
    pub now: DateTime<Utc>,
}

#[derive(Serialize, Debug)]
pub struct OpenCasesView {
    pub now: DateTime<Utc>,
    /// Most urgent first: by resolution due time, then opened time, then id.
    pub cases: Vec<OpenCase>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct OpenCase {
    pub id: String,
    pub account_id: Option<String>,
    pub contact_id: Option<String>,
    pub priority: String,
    pub status: String,
    pub assignee: Option<String>,
    pub escalation_level: i64,
    pub opened_at: DateTime<Utc>,
    pub first_response_due: DateTime<Utc>,
    pub first_responded_at: Option<DateTime<Utc>>,
    pub first_response_breached: bool,
    pub resolution_due: DateTime<Utc>,
    pub resolution_breached: bool,
}

/// Open cases with their due times and whether each is breached at `now`.
pub async fn open_cases(
    db: &ReadDb,
    tables: &Tables,
    query: &OpenCasesQuery,
) -> Result<OpenCasesView, sqlx::Error> {
    let mut conditions = vec!["status IN ('open', 'assigned')".to_string()];
    let mut values = Vec::new();
    if let Some(assignee) = &query.assignee {
        values.push(assignee.clone());
        conditions.push(format!("assignee = ${}", values.len()));
    }
    if let Some(priority) = &query.priority {
        values.push(priority.clone());
        conditions.push(format!("priority = ${}", values.len()));
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE {} ORDER BY resolution_due, opened_at, id",
        tables.t(CASES),
        conditions.join(" AND ")
    );
    let now = query.now;
    let cases = fetch(db, &sql, values)
        .await?
        .into_iter()
        .map(|c| OpenCase {
            first_response_breached: c.first_response_breached(now),
            resolution_breached: c.resolution_breached(now),
            id: c.id,
            account_id: c.account_id,
            contact_id: c.contact_id,
            priority: c.priority,
            status: c.status,
            assignee: c.assignee,
            escalation_level: c.escalation_level,
            opened_at: c.opened_at,
            first_response_due: c.first_response_due,
            first_responded_at: c.first_responded_at,
            resolution_due: c.resolution_due,
        })
        .collect();
    Ok(OpenCasesView { now, cases })
}

// ------------------------------------------------------------------ stats

/// SLA statistics over the cases opened in `[from, to]`.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct SlaStatsQuery {
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    /// The instant unmet due times are judged at; defaults to the current time.
    pub now: Option<DateTime<Utc>>,
}

#[derive(Serialize, Debug)]
pub struct SlaStatsView {
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub now: DateTime<Utc>,
    pub total: SlaFigures,
    /// urgent, high, normal, low (all four, even when empty).
    pub by_priority: Vec<PriorityStats>,
    /// By assignee name ascending; unassigned cases last (`assignee: null`).
    pub by_assignee: Vec<AssigneeStats>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct PriorityStats {
    pub priority: String,
    #[serde(flatten)]
    pub figures: SlaFigures,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct AssigneeStats {
    pub assignee: Option<String>,
    #[serde(flatten)]
    pub figures: SlaFigures,
}

#[derive(Serialize, Debug, PartialEq, Default)]
pub struct SlaFigures {
    /// Cases opened in the range.
    pub cases: i64,
    /// Cases with a first response.
    pub responded: i64,
    pub avg_first_response_minutes: Option<f64>,
    pub first_response_breaches: i64,
    /// Cases currently resolved (or closed after resolving).
    pub resolved: i64,
    pub avg_resolution_minutes: Option<f64>,
    pub resolution_breaches: i64,
}

#[derive(Default)]
struct Acc {
    cases: i64,
    response_minutes: Vec<f64>,
    response_breaches: i64,
    resolution_minutes: Vec<f64>,
    resolution_breaches: i64,
}

fn minutes(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 60_000_000.0
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

impl Acc {
    fn add(&mut self, c: &CaseRow, now: DateTime<Utc>) {
        self.cases += 1;
        if let Some(at) = c.first_responded_at {
            self.response_minutes.push(minutes(c.opened_at, at));
        }
        if let Some(at) = c.resolved_at {
            self.resolution_minutes.push(minutes(c.opened_at, at));
        }
        self.response_breaches += i64::from(c.first_response_breached(now));
        self.resolution_breaches += i64::from(c.resolution_breached(now));
    }

    fn figures(&self) -> SlaFigures {
        SlaFigures {
            cases: self.cases,
            responded: self.response_minutes.len() as i64,
            avg_first_response_minutes: mean(&self.response_minutes),
            first_response_breaches: self.response_breaches,
            resolved: self.resolution_minutes.len() as i64,
            avg_resolution_minutes: mean(&self.resolution_minutes),
            resolution_breaches: self.resolution_breaches,
        }
    }
}

/// Average first-response and resolution minutes, with counts and breach
/// counts, overall, by priority and by assignee.
pub async fn stats(
    db: &ReadDb,
    tables: &Tables,
    query: &SlaStatsQuery,
) -> Result<SlaStatsView, SlaError> {
    if let (Some(from), Some(to)) = (query.from, query.to) {
        if from > to {
            return Err(SlaError::InvalidRange { from, to });
        }
    }
    let now = query.now.unwrap_or_else(Utc::now);
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    if let Some(from) = query.from {
        values.push(from.to_string());
        conditions.push(format!("opened_at >= ${}", values.len()));
    }
    if let Some(end) = query.to.and_then(|t| t.succ_opt()) {
        values.push(end.to_string());
        conditions.push(format!("opened_at < ${}", values.len()));
    }
    let where_sql = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let sql = format!("SELECT {COLUMNS} FROM {}{where_sql}", tables.t(CASES));
    let rows = fetch(db, &sql, values).await?;
    let mut total = Acc::default();
    let mut by_priority: BTreeMap<String, Acc> = BTreeMap::new();
    let mut by_assignee: BTreeMap<(bool, String), (Option<String>, Acc)> = BTreeMap::new();
    for c in &rows {
        total.add(c, now);
        by_priority
            .entry(c.priority.clone())
            .or_default()
            .add(c, now);
        let key = (c.assignee.is_none(), c.assignee.clone().unwrap_or_default());
        by_assignee
            .entry(key)
            .or_insert_with(|| (c.assignee.clone(), Acc::default()))
            .1
            .add(c, now);
    }
    let mut priorities: Vec<String> = [
        CasePriority::Urgent,
        CasePriority::High,
        CasePriority::Normal,
        CasePriority::Low,
    ]
    .iter()
    .map(|p| p.as_str().to_string())
    .collect();
    priorities.extend(
        by_priority
            .keys()
            .filter(|k| !priorities.contains(k))
            .cloned()
            .collect::<Vec<_>>(),
    );
    Ok(SlaStatsView {
        from: query.from,
        to: query.to,
        now,
        total: total.figures(),
        by_priority: priorities
            .into_iter()
            .map(|p| PriorityStats {
                figures: by_priority.get(&p).map(Acc::figures).unwrap_or_default(),
                priority: p,
            })
            .collect(),
        by_assignee: by_assignee
            .into_values()
            .map(|(assignee, acc)| AssigneeStats {
                assignee,
                figures: acc.figures(),
            })
            .collect(),
    })
}
