//! Pipeline read model: one row per opportunity (current state), its stage
//! history (entered / left per stage, from the events' `occurred_at`) and one
//! close record per win or loss; plus the queries behind `GET /v1/pipeline`
//! (board), `/v1/pipeline/forecast` and `/v1/pipeline/analytics`.
//!
//! Storage choices:
//! - money amounts are decimal TEXT with their currency; every sum, average
//!   and weighting is done in Rust with `rust_decimal` after reading the rows,
//!   and totals are always kept per currency (never mixed);
//! - times are `readdb::timestamp` text, dates `YYYY-MM-DD` text.
//!
//! Analytics are computed from the close records and stage history, not from
//! the current row, so a period's figures do not change when a deal closed in
//! that period is reopened later: a deal counts for `[from, to]` when it was
//! closed (won or lost) inside the range and still closed at the end of the
//! range (a close undone by a reopen inside the range does not count; one
//! reopened after the range does). Each deal counts at most once per range.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use crm_domain::opportunity::OpportunityEvent;
use crm_domain::pipeline::{self as pipedef, CLOSED_LOST, CLOSED_WON, DEFAULT_PIPELINE};
use crm_domain::Money;
use crm_eventlog::RecordedEvent;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::lookups::{Cell, Kind, Lookups, Table};
use crate::projection::{
    apply_as_batch, decode, BatchError, Placeholders, Projection, ProjectionError, Tables, Tx,
};
use crate::readdb::{timestamp, ReadDb};
use crate::rows::{write_all, Field, RowSet};

/// Base name of the current-state table (one row per opportunity).
pub const OPPORTUNITIES: &str = "opportunities";
/// Base name of the stage history table (one row per stage visit).
pub const STAGE_HISTORY: &str = "stage_history";
/// Base name of the close records table (one row per win or loss).
pub const CLOSES: &str = "closes";

/// Probability (percent) from which an open deal is in the forecast's `commit`.
pub const COMMIT_PROBABILITY: i64 = 75;
/// Probability (percent) from which an open deal is in the forecast's `best_case`.
pub const BEST_CASE_PROBABILITY: i64 = 50;

/// The pipeline read model (`pipeline`, version 1).
pub struct PipelineProjection;

#[async_trait::async_trait]
impl Projection for PipelineProjection {
    fn name(&self) -> &'static str {
        "pipeline"
    }

    fn stream_local(&self) -> bool {
        true // rows are keyed by the opportunity, built from its own events
    }

    fn rebuild_by_stream(&self) -> bool {
        true
    }

    fn version(&self) -> i64 {
        1
    }

    fn schema(&self, tables: &Tables) -> Vec<String> {
        let o = tables.t(OPPORTUNITIES);
        let h = tables.t(STAGE_HISTORY);
        let c = tables.t(CLOSES);
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {o} (
                    id TEXT PRIMARY KEY,
                    account_id TEXT NOT NULL,
                    name TEXT NOT NULL,
                    owner TEXT NOT NULL,
                    pipeline TEXT NOT NULL,
                    stage TEXT NOT NULL,
                    status TEXT NOT NULL,
                    amount TEXT NOT NULL,
                    currency TEXT NOT NULL,
                    probability BIGINT NOT NULL,
                    expected_close TEXT NOT NULL,
                    opened_at TEXT NOT NULL,
                    stage_entered_at TEXT NOT NULL,
                    closed_at TEXT,
                    close_amount TEXT,
                    close_currency TEXT,
                    stage_before_close TEXT,
                    lost_reason TEXT,
                    competitor TEXT,
                    version BIGINT NOT NULL,
                    position BIGINT NOT NULL,
                    updated_at TEXT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {o}_status_idx ON {o}(status, owner)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {h} (
                    opportunity_id TEXT NOT NULL,
                    seq BIGINT NOT NULL,
                    stage TEXT NOT NULL,
                    entered_at TEXT NOT NULL,
                    left_at TEXT,
                    PRIMARY KEY (opportunity_id, seq))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {c} (
                    opportunity_id TEXT NOT NULL,
                    seq BIGINT NOT NULL,
                    outcome TEXT NOT NULL,
                    owner TEXT NOT NULL,
                    pipeline TEXT NOT NULL,
                    stage_before_close TEXT NOT NULL,
                    opened_at TEXT NOT NULL,
                    closed_at TEXT NOT NULL,
                    close_amount TEXT,
                    close_currency TEXT,
                    reopened_at TEXT,
                    PRIMARY KEY (opportunity_id, seq))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {c}_closed_idx ON {c}(closed_at)"),
        ]
    }

    fn table_names(&self) -> Vec<&'static str> {
        vec![OPPORTUNITIES, STAGE_HISTORY, CLOSES]
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        apply_as_batch(self, tx, tables, event).await
    }

    /// The batch's opportunities are held in memory and its stage visits and
    /// close records collected, then all written in a few multi-row statements.
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        let mut fold = BatchFold::new(tables, Placeholders::of(tx));
        fold.lookups
            .read_ahead_streams(tx, &OPPORTUNITY_ROWS, events, "opportunity")
            .await
            .map_err(BatchError::whole_batch)?;
        for (index, event) in events.iter().enumerate() {
            if event.stream_type != "opportunity" {
                continue;
            }
            let decoded: OpportunityEvent = decode(event).map_err(BatchError::at(index))?;
            fold.apply(tx, event, decoded)
                .await
                .map_err(BatchError::at(index))?;
        }
        fold.write(tx).await.map_err(BatchError::whole_batch)
    }
}

/// The opportunities table as the fold holds its rows.
static OPPORTUNITY_ROWS: Table = Table {
    base: OPPORTUNITIES,
    columns: &[
        ("id", Kind::Text),
        ("account_id", Kind::Text),
        ("name", Kind::Text),
        ("owner", Kind::Text),
        ("pipeline", Kind::Text),
        ("stage", Kind::Text),
        ("status", Kind::Text),
        ("amount", Kind::Text),
        ("currency", Kind::Text),
        ("probability", Kind::Int),
        ("expected_close", Kind::Text),
        ("opened_at", Kind::Text),
        ("stage_entered_at", Kind::Text),
        ("closed_at", Kind::Text),
        ("close_amount", Kind::Text),
        ("close_currency", Kind::Text),
        ("stage_before_close", Kind::Text),
        ("lost_reason", Kind::Text),
        ("competitor", Kind::Text),
        ("version", Kind::Int),
        ("position", Kind::Int),
        ("updated_at", Kind::Text),
    ],
};

/// A stage visit the batch entered.
struct NewVisit {
    seq: i64,
    stage: String,
    entered_at: String,
    left_at: Option<String>,
}

/// A close record the batch made.
struct Close {
    seq: i64,
    outcome: &'static str,
    owner: String,
    pipeline: String,
    stage_before_close: String,
    opened_at: String,
    closed_at: String,
    close_amount: Option<String>,
    close_currency: Option<String>,
    reopened_at: Option<String>,
}

/// Stage visits and close records per multi-row insert.
const ROWS_PER_INSERT: usize = 50;
/// Opportunities per statement closing the stored open visits or closes.
const IDS_PER_UPDATE: usize = 200;

/// One batch being folded: its opportunities, the visits and closes it adds,
/// and which stored visits and closes it ends. A visit or close stored before
/// the batch can only be open when the batch starts, so the first event
/// ending one is the one that ends it; later ones end those of the batch.
struct BatchFold {
    lookups: Lookups,
    tables: Tables,
    style: Placeholders,
    /// Per opportunity, in the order entered / made.
    visits: BTreeMap<String, Vec<NewVisit>>,
    closes: BTreeMap<String, Vec<Close>>,
    /// Opportunity -> when the batch first left its stored open visit.
    left: BTreeMap<String, String>,
    /// Opportunity -> when the batch first reopened its stored closes.
    reopened: BTreeMap<String, String>,
}

struct CloseArgs {
    outcome: &'static str,
    from: String,
    to: String,
    probability: u8,
    close: Option<(String, String)>,
    lost_reason: Option<String>,
    competitor: Option<String>,
    at: String,
}

impl BatchFold {
    fn new(tables: &Tables, style: Placeholders) -> Self {
        Self {
            lookups: Lookups::new(tables, style),
            tables: tables.clone(),
            style,
            visits: BTreeMap::new(),
            closes: BTreeMap::new(),
            left: BTreeMap::new(),
            reopened: BTreeMap::new(),
        }
    }

    async fn update(
        &mut self,
        tx: &mut Tx,
        id: &str,
        cells: &[(&str, Cell)],
    ) -> Result<(), sqlx::Error> {
        self.lookups.update(tx, &OPPORTUNITY_ROWS, id, cells).await
    }

    async fn apply(
        &mut self,
        tx: &mut Tx,
        event: &RecordedEvent,
        decoded: OpportunityEvent,
    ) -> Result<(), ProjectionError> {
        let id = event.stream_id.clone();
        let updated_at = timestamp(&event.recorded_at);
        let stamp = |cells: &mut Vec<(&str, Cell)>| {
            cells.push(("version", event.version.into()));
            cells.push(("position", event.position.into()));
            cells.push(("updated_at", updated_at.clone().into()));
        };
        use OpportunityEvent::*;
        match decoded {
            OpportunityOpened {
                opportunity_id: _,
                account_id,
                name,
                amount,
                expected_close,
                owner,
                pipeline,
                stage,
                probability,
                occurred_at,
            } => {
                let at = timestamp(&occurred_at);
                let mut cells: Vec<(&str, Cell)> = vec![
                    ("account_id", account_id.to_string().into()),
                    ("name", name.into()),
                    ("owner", owner.into()),
                    ("pipeline", pipeline.into()),
                    ("stage", stage.clone().into()),
                    ("status", "open".into()),
                    ("amount", amount.amount().to_string().into()),
                    ("currency", amount.currency().as_str().into()),
                    ("probability", i64::from(probability).into()),
                    ("expected_close", expected_close.to_string().into()),
                    ("opened_at", at.clone().into()),
                    ("stage_entered_at", at.clone().into()),
                ];
                stamp(&mut cells);
                self.lookups
                    .upsert(tx, &OPPORTUNITY_ROWS, &id, &cells)
                    .await?;
                self.enter_stage(&id, event.version, &stage, &at);
            }
            OpportunityStageAdvanced {
                to,
                probability,
                occurred_at,
                ..
            } => {
                let at = timestamp(&occurred_at);
                let mut cells: Vec<(&str, Cell)> = vec![
                    ("stage", to.clone().into()),
                    ("probability", i64::from(probability).into()),
                    ("stage_entered_at", at.clone().into()),
                ];
                stamp(&mut cells);
                self.update(tx, &id, &cells).await?;
                self.leave_stage(&id, &at);
                self.enter_stage(&id, event.version, &to, &at);
            }
            OpportunityUpdated { changes, .. } => {
                let mut cells: Vec<(&str, Cell)> = Vec::new();
                for change in changes {
                    // Unknown fields and undecodable values leave the row as it is.
                    match change.field.as_str() {
                        "amount" => {
                            if let Some(m) = change.new_as::<Money>() {
                                cells.push(("amount", m.amount().to_string().into()));
                                cells.push(("currency", m.currency().as_str().into()));
                            }
                        }
                        "expected_close" => {
                            if let Some(d) = change.new_as::<NaiveDate>() {
                                cells.push(("expected_close", d.to_string().into()));
                            }
                        }
                        "owner" => {
                            if let Some(v) = change.new_as::<String>() {
                                cells.push(("owner", v.into()));
                            }
                        }
                        "name" => {
                            if let Some(v) = change.new_as::<String>() {
                                cells.push(("name", v.into()));
                            }
                        }
                        _ => {}
                    }
                }
                stamp(&mut cells);
                self.update(tx, &id, &cells).await?;
            }
            OpportunityWon {
                from,
                to,
                probability,
                close_value,
                occurred_at,
            } => {
                let close = Some((
                    close_value.amount().to_string(),
                    close_value.currency().as_str().to_string(),
                ));
                let args = CloseArgs {
                    outcome: "won",
                    from,
                    to,
                    probability,
                    close,
                    lost_reason: None,
                    competitor: None,
                    at: timestamp(&occurred_at),
                };
                self.close_opportunity(tx, event, args).await?;
            }
            OpportunityLost {
                from,
                to,
                probability,
                reason,
                competitor,
                occurred_at,
            } => {
                let args = CloseArgs {
                    outcome: "lost",
                    from,
                    to,
                    probability,
                    close: None,
                    lost_reason: Some(reason),
                    competitor,
                    at: timestamp(&occurred_at),
                };
                self.close_opportunity(tx, event, args).await?;
            }
            OpportunityReopened {
                to,
                probability,
                occurred_at,
                ..
            } => {
                let at = timestamp(&occurred_at);
                let mut cells: Vec<(&str, Cell)> = vec![
                    ("status", "open".into()),
                    ("stage", to.clone().into()),
                    ("probability", i64::from(probability).into()),
                    ("stage_entered_at", at.clone().into()),
                    ("closed_at", Cell::Null),
                    ("close_amount", Cell::Null),
                    ("close_currency", Cell::Null),
                    ("stage_before_close", Cell::Null),
                    ("lost_reason", Cell::Null),
                    ("competitor", Cell::Null),
                ];
                stamp(&mut cells);
                self.update(tx, &id, &cells).await?;
                for close in self.closes.entry(id.clone()).or_default() {
                    if close.reopened_at.is_none() {
                        close.reopened_at = Some(at.clone());
                    }
                }
                self.reopened.entry(id.clone()).or_insert(at.clone());
                self.leave_stage(&id, &at);
                self.enter_stage(&id, event.version, &to, &at);
            }
        }
        Ok(())
    }

    async fn close_opportunity(
        &mut self,
        tx: &mut Tx,
        event: &RecordedEvent,
        args: CloseArgs,
    ) -> Result<(), ProjectionError> {
        let id = event.stream_id.clone();
        let row = self
            .lookups
            .get(tx, &OPPORTUNITY_ROWS, &id)
            .await?
            .ok_or_else(|| {
                ProjectionError::Invalid(format!(
                    "opportunity {id} closed at version {} but never opened",
                    event.version
                ))
            })?;
        let column = |name: &str| row.text(name).unwrap_or_default();
        let (owner, pipeline, opened_at) =
            (column("owner"), column("pipeline"), column("opened_at"));
        let (close_amount, close_currency) = match args.close {
            Some((a, c)) => (Some(a), Some(c)),
            None => (None, None),
        };
        let cells: Vec<(&str, Cell)> = vec![
            ("status", args.outcome.into()),
            ("stage", args.to.clone().into()),
            ("probability", i64::from(args.probability).into()),
            ("stage_entered_at", args.at.clone().into()),
            ("closed_at", args.at.clone().into()),
            ("close_amount", close_amount.clone().into()),
            ("close_currency", close_currency.clone().into()),
            ("stage_before_close", args.from.clone().into()),
            ("lost_reason", args.lost_reason.into()),
            ("competitor", args.competitor.into()),
            ("version", event.version.into()),
            ("position", event.position.into()),
            ("updated_at", timestamp(&event.recorded_at).into()),
        ];
        self.update(tx, &id, &cells).await?;
        let closes = self.closes.entry(id.clone()).or_default();
        if !closes.iter().any(|close| close.seq == event.version) {
            closes.push(Close {
                seq: event.version,
                outcome: args.outcome,
                owner,
                pipeline,
                stage_before_close: args.from,
                opened_at,
                closed_at: args.at.clone(),
                close_amount,
                close_currency,
                reopened_at: None,
            });
        }
        self.leave_stage(&id, &args.at);
        self.enter_stage(&id, event.version, &args.to, &args.at);
        Ok(())
    }

    fn leave_stage(&mut self, id: &str, at: &str) {
        for visit in self.visits.entry(id.to_string()).or_default() {
            if visit.left_at.is_none() {
                visit.left_at = Some(at.to_string());
            }
        }
        self.left.entry(id.to_string()).or_insert(at.to_string());
    }

    fn enter_stage(&mut self, id: &str, seq: i64, stage: &str, at: &str) {
        let visits = self.visits.entry(id.to_string()).or_default();
        if !visits.iter().any(|visit| visit.seq == seq) {
            visits.push(NewVisit {
                seq,
                stage: stage.to_string(),
                entered_at: at.to_string(),
                left_at: None,
            });
        }
    }

    /// `UPDATE <table> SET <column> = <when, per opportunity> WHERE <column>
    /// IS NULL`: ends the stored open visits (or closes) the batch ended.
    async fn end_stored(
        &self,
        tx: &mut Tx,
        table: &str,
        column: &str,
        ended: &BTreeMap<String, String>,
    ) -> Result<(), sqlx::Error> {
        let ended: Vec<(&String, &String)> = ended.iter().collect();
        for chunk in ended.chunks(IDS_PER_UPDATE) {
            let mut n = 0;
            let mut next = || {
                n += 1;
                match self.style {
                    Placeholders::Numbered => format!("${n}"),
                    Placeholders::InOrder => "?".to_string(),
                }
            };
            let whens: Vec<String> = chunk
                .iter()
                .map(|_| format!("WHEN {} THEN {}", next(), next()))
                .collect();
            let ids: Vec<String> = chunk.iter().map(|_| next()).collect();
            let sql = format!(
                "UPDATE {} SET {column} = CASE opportunity_id {} END
                 WHERE {column} IS NULL AND opportunity_id IN ({})",
                self.tables.t(table),
                whens.join(" "),
                ids.join(", ")
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for (id, at) in chunk {
                query = query.bind((*id).clone()).bind((*at).clone());
            }
            for (id, _) in chunk {
                query = query.bind((*id).clone());
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Writes the batch: stored visits and closes it ended first (the ones
    /// it adds are not stored yet), then its opportunities, visits and closes
    /// (on PostgreSQL in one statement, [`write_all`]).
    async fn write(mut self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        self.end_stored(tx, STAGE_HISTORY, "left_at", &self.left)
            .await?;
        self.end_stored(tx, CLOSES, "reopened_at", &self.reopened)
            .await?;
        let mut rows = self.lookups.changed_rows();
        let mut visits = RowSet::new(
            self.tables.t(STAGE_HISTORY),
            &VISIT_ROW,
            "ON CONFLICT (opportunity_id, seq) DO NOTHING".into(),
            ROWS_PER_INSERT,
        );
        for (id, visit) in self
            .visits
            .iter()
            .flat_map(|(id, visits)| visits.iter().map(move |visit| (id, visit)))
        {
            visits.push([
                Field::Text(id),
                Field::Int(visit.seq),
                Field::Text(&visit.stage),
                Field::Text(&visit.entered_at),
                visit.left_at.as_deref().into(),
            ]);
        }
        let mut closes = RowSet::new(
            self.tables.t(CLOSES),
            &CLOSE_ROW,
            "ON CONFLICT (opportunity_id, seq) DO NOTHING".into(),
            ROWS_PER_INSERT,
        );
        for (id, close) in self
            .closes
            .iter()
            .flat_map(|(id, closes)| closes.iter().map(move |close| (id, close)))
        {
            closes.push([
                Field::Text(id),
                Field::Int(close.seq),
                Field::Text(close.outcome),
                Field::Text(&close.owner),
                Field::Text(&close.pipeline),
                Field::Text(&close.stage_before_close),
                Field::Text(&close.opened_at),
                Field::Text(&close.closed_at),
                close.close_amount.as_deref().into(),
                close.close_currency.as_deref().into(),
                close.reopened_at.as_deref().into(),
            ]);
        }
        rows.extend([visits, closes]);
        write_all(tx, &rows).await
    }
}

/// A stage visit's row in the stage history.
static VISIT_ROW: [(&str, Kind); 5] = [
    ("opportunity_id", Kind::Text),
    ("seq", Kind::Int),
    ("stage", Kind::Text),
    ("entered_at", Kind::Text),
    ("left_at", Kind::Text),
];

/// A close record's row.
static CLOSE_ROW: [(&str, Kind); 11] = [
    ("opportunity_id", Kind::Text),
    ("seq", Kind::Int),
    ("outcome", Kind::Text),
    ("owner", Kind::Text),
    ("pipeline", Kind::Text),
    ("stage_before_close", Kind::Text),
    ("opened_at", Kind::Text),
    ("closed_at", Kind::Text),
    ("close_amount", Kind::Text),
    ("close_currency", Kind::Text),
    ("reopened_at", Kind::Text),
];

pub use crate::money::MoneyView;
use crate::money::Totals;

fn parse_amount(s: &str) -> Result<Decimal, sqlx::Error> {
    Decimal::from_str(s).map_err(|e| sqlx::Error::Decode(format!("amount {s:?}: {e}").into()))
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| sqlx::Error::Decode(format!("timestamp {s:?}: {e}").into()))
}

fn weighted(amount: Decimal, probability: i64) -> Decimal {
    amount * Decimal::from(probability) / Decimal::from(100)
}

fn days_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 86_400_000_000.0
}

/// Open stages in pipeline order: those of the given pipelines' definitions
/// (default pipeline first), then any other stage seen, alphabetically.
fn stage_order<'a>(
    pipelines: impl IntoIterator<Item = &'a str>,
    seen: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut names: Vec<&str> = vec![DEFAULT_PIPELINE];
    names.extend(pipelines);
    for name in names {
        if let Some(def) = pipedef::find(name) {
            for s in def.open_stages() {
                if !order.contains(&s.key) {
                    order.push(s.key.clone());
                }
            }
        }
    }
    let extra: BTreeSet<&str> = seen
        .into_iter()
        .filter(|s| *s != CLOSED_WON && *s != CLOSED_LOST && !order.iter().any(|o| o == s))
        .collect();
    order.extend(extra.into_iter().map(str::to_string));
    order
}

/// `WHERE` builder: each placeholder used once, values bound as text.
#[derive(Default)]
struct Filter {
    conditions: Vec<String>,
    values: Vec<String>,
}

impl Filter {
    fn push(&mut self, condition_with_placeholder: impl Fn(usize) -> String, value: String) {
        self.values.push(value);
        self.conditions
            .push(condition_with_placeholder(self.values.len()));
    }

    fn raw(&mut self, condition: &str) {
        self.conditions.push(condition.to_string());
    }

    fn sql(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.conditions.join(" AND "))
        }
    }

    /// The rows of `sql` with the values bound, as they arrive: the callers
    /// fold them, so a board or forecast over every open deal holds a few
    /// rows at a time, not all of them (on a million-event store, board
    /// computations held 60 MB of rows at the heap's peak).
    fn rows<'a>(
        &'a self,
        db: &'a ReadDb,
        sql: &'a str,
    ) -> BoxStream<'a, Result<AnyRow, sqlx::Error>> {
        let mut q = sqlx::query(sql);
        for v in &self.values {
            q = q.bind(v.clone());
        }
        q.fetch(&db.pool)
    }
}

struct OpenRow {
    owner: String,
    stage: String,
    probability: i64,
    amount: Decimal,
    currency: String,
    expected_close: String,
}

/// Hands every open opportunity `filter` selects to `each`, one at a time.
async fn for_each_open_row(
    db: &ReadDb,
    tables: &Tables,
    filter: Filter,
    mut each: impl FnMut(OpenRow),
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "SELECT owner, stage, probability, amount, currency, expected_close FROM {}{}",
        tables.t(OPPORTUNITIES),
        filter.sql()
    );
    let mut rows = filter.rows(db, &sql);
    while let Some(r) = rows.try_next().await? {
        each(OpenRow {
            owner: r.try_get("owner")?,
            stage: r.try_get("stage")?,
            probability: r.try_get("probability")?,
            amount: parse_amount(&r.try_get::<String, _>("amount")?)?,
            currency: r.try_get("currency")?,
            expected_close: r.try_get("expected_close")?,
        });
    }
    Ok(())
}

// ------------------------------------------------------------------ board

/// `GET /v1/pipeline?owner=&pipeline=`.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct BoardQuery {
    pub owner: Option<String>,
    /// Defaults to the `default` pipeline.
    pub pipeline: Option<String>,
}

/// Open opportunities per stage of one pipeline.
#[derive(Serialize, Debug, Clone)]
pub struct BoardView {
    pub pipeline: String,
    pub owner: Option<String>,
    /// Every open stage in pipeline order (empty stages included).
    pub stages: Vec<BoardStage>,
    pub count: i64,
    pub total: Vec<MoneyView>,
    pub weighted: Vec<MoneyView>,
}

#[derive(Serialize, Debug, Clone)]
pub struct BoardStage {
    pub stage: String,
    /// Win probability of the stage in percent.
    pub probability: i64,
    pub count: i64,
    /// Sum of amounts, per currency.
    pub total: Vec<MoneyView>,
    /// Sum of amount * probability / 100, per currency.
    pub weighted: Vec<MoneyView>,
}

/// The board: open opportunities per open stage (pipeline order), with
/// count, total and probability-weighted amount per currency.
pub async fn board(
    db: &ReadDb,
    tables: &Tables,
    query: &BoardQuery,
) -> Result<BoardView, sqlx::Error> {
    let pipeline = query
        .pipeline
        .clone()
        .unwrap_or_else(|| DEFAULT_PIPELINE.to_string());
    let mut filter = Filter::default();
    filter.raw("status = 'open'");
    filter.push(|n| format!("pipeline = ${n}"), pipeline.clone());
    if let Some(owner) = &query.owner {
        filter.push(|n| format!("owner = ${n}"), owner.clone());
    }
    let (mut total, mut weight, mut count) = (Totals::default(), Totals::default(), 0);
    let mut by_stage: HashMap<String, StageAcc> = HashMap::new();
    for_each_open_row(db, tables, filter, |r| {
        count += 1;
        total.add(&r.currency, r.amount);
        weight.add(&r.currency, weighted(r.amount, r.probability));
        by_stage
            .entry(r.stage.clone())
            .or_insert_with(|| StageAcc::first_seen(r.probability))
            .add(&r);
    })
    .await?;
    // The pipeline's open stages in order (empty ones too), then any other
    // stage found on open rows, alphabetically.
    let def = pipedef::find(&pipeline);
    let mut order: Vec<String> = def
        .map(|d| d.open_stages().map(|s| s.key.clone()).collect())
        .unwrap_or_default();
    let extra: BTreeSet<String> = by_stage
        .keys()
        .filter(|stage| !order.contains(stage))
        .cloned()
        .collect();
    order.extend(extra);
    let stages = order
        .into_iter()
        .map(|stage| {
            let acc = by_stage.remove(&stage).unwrap_or_default();
            // The pipeline's own probability; else the first deal's found in the stage.
            let probability = def
                .and_then(|d| d.probability(&stage))
                .map(i64::from)
                .or(acc.first_probability)
                .unwrap_or(0);
            BoardStage {
                stage,
                probability,
                count: acc.count,
                total: acc.total.views(),
                weighted: acc.weighted.views(),
            }
        })
        .collect();
    Ok(BoardView {
        pipeline,
        owner: query.owner.clone(),
        stages,
        count,
        total: total.views(),
        weighted: weight.views(),
    })
}

// --------------------------------------------------------------- forecast

/// `GET /v1/pipeline/forecast?owner=&from=&to=` (range on expected close).
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct ForecastQuery {
    pub owner: Option<String>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
}

#[derive(Serialize, Debug)]
pub struct ForecastView {
    pub owner: Option<String>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    /// Keyed by expected-close month `YYYY-MM`, ascending.
    pub by_month: Vec<ForecastBucket>,
    /// Keyed by owner, ascending.
    pub by_owner: Vec<ForecastBucket>,
    /// Everything selected (key `"total"`).
    pub total: ForecastBucket,
}

/// Per-currency forecast figures of a group of open opportunities.
#[derive(Serialize, Debug)]
pub struct ForecastBucket {
    pub key: String,
    pub count: i64,
    /// Stages with probability >= 75.
    pub commit: Vec<MoneyView>,
    /// Stages with probability >= 50 (includes commit).
    pub best_case: Vec<MoneyView>,
    /// All open opportunities.
    pub pipeline: Vec<MoneyView>,
    /// Probability-weighted amount of all open opportunities.
    pub weighted: Vec<MoneyView>,
}

/// The open deals of one board stage, summed as they are read.
#[derive(Default)]
struct StageAcc {
    count: i64,
    total: Totals,
    weighted: Totals,
    /// The probability of the first deal read in this stage (used when the
    /// pipeline does not define the stage).
    first_probability: Option<i64>,
}

impl StageAcc {
    fn first_seen(probability: i64) -> Self {
        Self {
            first_probability: Some(probability),
            ..Self::default()
        }
    }

    fn add(&mut self, r: &OpenRow) {
        self.count += 1;
        self.total.add(&r.currency, r.amount);
        self.weighted
            .add(&r.currency, weighted(r.amount, r.probability));
    }
}

#[derive(Default)]
struct ForecastAcc {
    count: i64,
    commit: Totals,
    best_case: Totals,
    pipeline: Totals,
    weighted: Totals,
}

impl ForecastAcc {
    fn add(&mut self, r: &OpenRow) {
        self.count += 1;
        if r.probability >= COMMIT_PROBABILITY {
            self.commit.add(&r.currency, r.amount);
        }
        if r.probability >= BEST_CASE_PROBABILITY {
            self.best_case.add(&r.currency, r.amount);
        }
        self.pipeline.add(&r.currency, r.amount);
        self.weighted
            .add(&r.currency, weighted(r.amount, r.probability));
    }

    fn bucket(&self, key: String) -> ForecastBucket {
        ForecastBucket {
            key,
            count: self.count,
            commit: self.commit.views(),
            best_case: self.best_case.views(),
            pipeline: self.pipeline.views(),
            weighted: self.weighted.views(),
        }
    }
}

/// Forecast of open opportunities by expected-close month and by owner.
/// `from`/`to` bound the expected close date (inclusive); `from > to`
/// selects nothing.
pub async fn forecast(
    db: &ReadDb,
    tables: &Tables,
    query: &ForecastQuery,
) -> Result<ForecastView, sqlx::Error> {
    let mut filter = Filter::default();
    filter.raw("status = 'open'");
    if let Some(owner) = &query.owner {
        filter.push(|n| format!("owner = ${n}"), owner.clone());
    }
    if let Some(from) = query.from {
        filter.push(|n| format!("expected_close >= ${n}"), from.to_string());
    }
    if let Some(to) = query.to {
        filter.push(|n| format!("expected_close <= ${n}"), to.to_string());
    }
    let mut by_month: BTreeMap<String, ForecastAcc> = BTreeMap::new();
    let mut by_owner: BTreeMap<String, ForecastAcc> = BTreeMap::new();
    let mut total = ForecastAcc::default();
    for_each_open_row(db, tables, filter, |r| {
        let month = r.expected_close.get(..7).unwrap_or(&r.expected_close);
        by_month.entry(month.to_string()).or_default().add(&r);
        by_owner.entry(r.owner.clone()).or_default().add(&r);
        total.add(&r);
    })
    .await?;
    Ok(ForecastView {
        owner: query.owner.clone(),
        from: query.from,
        to: query.to,
        by_month: by_month.into_iter().map(|(k, a)| a.bucket(k)).collect(),
        by_owner: by_owner.into_iter().map(|(k, a)| a.bucket(k)).collect(),
        total: total.bucket("total".to_string()),
    })
}

// -------------------------------------------------------------- analytics

/// `GET /v1/pipeline/analytics?from=&to=&owner=&group_by=owner|stage|month`.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsQuery {
    /// First close date included (closed_at's UTC date).
    pub from: Option<NaiveDate>,
    /// Last close date included.
    pub to: Option<NaiveDate>,
    /// Owner at the time of the close.
    pub owner: Option<String>,
    /// `owner` (owner at close), `stage` (the open stage the deal was in when
    /// it was won or lost) or `month` (close month `YYYY-MM`).
    pub group_by: Option<String>,
}

/// Rejected analytics queries (the HTTP layer answers 422).
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("group_by must be one of owner, stage, month (got '{0}')")]
    InvalidGroupBy(String),
    #[error("from ({from}) is after to ({to})")]
    InvalidRange { from: NaiveDate, to: NaiveDate },
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(Serialize, Debug)]
pub struct AnalyticsView {
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub owner: Option<String>,
    pub group_by: Option<String>,
    #[serde(flatten)]
    pub figures: AnalyticsFigures,
    /// Present with `group_by`, ordered by key (stages in pipeline order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<AnalyticsGroup>>,
}

#[derive(Serialize, Debug)]
pub struct AnalyticsGroup {
    pub key: String,
    #[serde(flatten)]
    pub figures: AnalyticsFigures,
}

/// Figures over a set of closed opportunities.
#[derive(Serialize, Debug, PartialEq)]
pub struct AnalyticsFigures {
    pub won_count: i64,
    pub lost_count: i64,
    /// won / (won + lost), null when nothing closed.
    pub win_rate: Option<f64>,
    /// Sum of close values of won deals, per currency.
    pub won_value: Vec<MoneyView>,
    /// Average close value of won deals, per currency.
    pub avg_won_deal: Vec<MoneyView>,
    /// Days from opened to closed (won and lost).
    pub avg_cycle_days: Option<f64>,
    pub median_cycle_days: Option<f64>,
    /// Per open stage in pipeline order.
    pub stage_conversion: Vec<StageConversion>,
    /// Per open stage in pipeline order, from stage visits that ended.
    pub avg_days_in_stage: Vec<StageDuration>,
}

/// How many of the deals ever entered `stage`, and how many of those went on
/// to a later stage or were won.
#[derive(Serialize, Debug, PartialEq)]
pub struct StageConversion {
    pub stage: String,
    pub entered: i64,
    pub advanced: i64,
    /// advanced / entered, null when none entered.
    pub rate: Option<f64>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct StageDuration {
    pub stage: String,
    /// Number of finished visits of the stage measured.
    pub visits: i64,
    pub avg_days: Option<f64>,
}

struct ClosedDeal {
    id: String,
    won: bool,
    owner: String,
    pipeline: String,
    stage_before_close: String,
    opened_at: DateTime<Utc>,
    closed_at: DateTime<Utc>,
    closed_at_text: String,
    close: Option<(Decimal, String)>,
}

struct Visit {
    stage: String,
    days: Option<f64>,
}

/// Win rate, value, cycle length, conversion and time in stage over the
/// opportunities closed in `[from, to]` (see the module docs for which
/// closes count), optionally per group.
pub async fn analytics(
    db: &ReadDb,
    tables: &Tables,
    query: &AnalyticsQuery,
) -> Result<AnalyticsView, AnalyticsError> {
    let group_by = match query.group_by.as_deref() {
        None => None,
        Some(g @ ("owner" | "stage" | "month")) => Some(g.to_string()),
        Some(other) => return Err(AnalyticsError::InvalidGroupBy(other.to_string())),
    };
    if let (Some(from), Some(to)) = (query.from, query.to) {
        if from > to {
            return Err(AnalyticsError::InvalidRange { from, to });
        }
    }
    let mut filter = Filter::default();
    if let Some(from) = query.from {
        filter.push(|n| format!("c.closed_at >= ${n}"), from.to_string());
    }
    match query.to.and_then(|to| to.succ_opt()) {
        Some(end) => {
            let end = end.to_string();
            filter.push(|n| format!("c.closed_at < ${n}"), end.clone());
            filter.push(
                |n| format!("(c.reopened_at IS NULL OR c.reopened_at >= ${n})"),
                end,
            );
        }
        None => filter.raw("c.reopened_at IS NULL"),
    }
    if let Some(owner) = &query.owner {
        filter.push(|n| format!("c.owner = ${n}"), owner.clone());
    }
    let c = tables.t(CLOSES);
    let h = tables.t(STAGE_HISTORY);
    let where_sql = filter.sql();
    let closes_sql = format!(
        "SELECT c.opportunity_id, c.seq, c.outcome, c.owner, c.pipeline, c.stage_before_close,
            c.opened_at, c.closed_at, c.close_amount, c.close_currency FROM {c} c{where_sql}"
    );
    let mut deals: BTreeMap<String, (i64, ClosedDeal)> = BTreeMap::new();
    let mut rows = filter.rows(db, &closes_sql);
    while let Some(r) = rows.try_next().await? {
        let seq: i64 = r.try_get("seq")?;
        let close_amount: Option<String> = r.try_get("close_amount")?;
        let close_currency: Option<String> = r.try_get("close_currency")?;
        let closed_at_text: String = r.try_get("closed_at")?;
        let deal = ClosedDeal {
            id: r.try_get("opportunity_id")?,
            won: r.try_get::<String, _>("outcome")? == "won",
            owner: r.try_get("owner")?,
            pipeline: r.try_get("pipeline")?,
            stage_before_close: r.try_get("stage_before_close")?,
            opened_at: parse_time(&r.try_get::<String, _>("opened_at")?)?,
            closed_at: parse_time(&closed_at_text)?,
            closed_at_text,
            close: match (close_amount, close_currency) {
                (Some(a), Some(c)) => Some((parse_amount(&a)?, c)),
                _ => None,
            },
        };
        // At most one close per deal qualifies; keep the latest defensively.
        match deals.get(&deal.id) {
            Some((s, _)) if *s >= seq => {}
            _ => {
                deals.insert(deal.id.clone(), (seq, deal));
            }
        }
    }
    let history_sql = format!(
        "SELECT h.opportunity_id, h.seq, h.stage, h.entered_at, h.left_at, c.seq AS close_seq
         FROM {h} h JOIN {c} c ON c.opportunity_id = h.opportunity_id{where_sql}
         ORDER BY h.opportunity_id, h.seq"
    );
    let mut visits: HashMap<String, Vec<Visit>> = HashMap::new();
    drop(rows);
    let mut rows = filter.rows(db, &history_sql);
    while let Some(r) = rows.try_next().await? {
        let id: String = r.try_get("opportunity_id")?;
        let seq: i64 = r.try_get("seq")?;
        let close_seq: i64 = r.try_get("close_seq")?;
        // Only the visits before the counted close.
        if deals.get(&id).map(|(s, _)| *s) != Some(close_seq) || seq >= close_seq {
            continue;
        }
        let entered = parse_time(&r.try_get::<String, _>("entered_at")?)?;
        let left: Option<String> = r.try_get("left_at")?;
        let days = match left {
            Some(l) => Some(days_between(entered, parse_time(&l)?)),
            None => None,
        };
        visits.entry(id).or_default().push(Visit {
            stage: r.try_get("stage")?,
            days,
        });
    }
    let deals: Vec<ClosedDeal> = deals.into_values().map(|(_, d)| d).collect();
    let order = stage_order(
        deals.iter().map(|d| d.pipeline.as_str()),
        visits
            .values()
            .flatten()
            .map(|v| v.stage.as_str())
            .chain(deals.iter().map(|d| d.stage_before_close.as_str())),
    );
    let all: Vec<&ClosedDeal> = deals.iter().collect();
    let figures = figures_of(&all, &visits, &order);
    let groups = group_by.as_deref().map(|g| {
        let mut groups: BTreeMap<String, Vec<&ClosedDeal>> = BTreeMap::new();
        for d in &deals {
            let key = match g {
                "owner" => d.owner.clone(),
                "stage" => d.stage_before_close.clone(),
                _ => d.closed_at_text.get(..7).unwrap_or_default().to_string(),
            };
            groups.entry(key).or_default().push(d);
        }
        let mut groups: Vec<(String, Vec<&ClosedDeal>)> = groups.into_iter().collect();
        if g == "stage" {
            let rank = |s: &str| order.iter().position(|o| o == s).unwrap_or(usize::MAX);
            groups.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
        }
        groups
            .into_iter()
            .map(|(key, ds)| AnalyticsGroup {
                figures: figures_of(&ds, &visits, &order),
                key,
            })
            .collect()
    });
    Ok(AnalyticsView {
        from: query.from,
        to: query.to,
        owner: query.owner.clone(),
        group_by,
        figures,
        groups,
    })
}

fn figures_of(
    deals: &[&ClosedDeal],
    visits: &HashMap<String, Vec<Visit>>,
    order: &[String],
) -> AnalyticsFigures {
    let won: Vec<&&ClosedDeal> = deals.iter().filter(|d| d.won).collect();
    let won_count = won.len() as i64;
    let lost_count = deals.len() as i64 - won_count;
    let mut won_value = Totals::default();
    let mut won_per_currency: BTreeMap<String, i64> = BTreeMap::new();
    for d in &won {
        if let Some((amount, currency)) = &d.close {
            won_value.add(currency, *amount);
            *won_per_currency.entry(currency.clone()).or_default() += 1;
        }
    }
    let avg_won_deal = won_value.averaged_by(&won_per_currency);
    let mut cycles: Vec<f64> = deals
        .iter()
        .map(|d| days_between(d.opened_at, d.closed_at))
        .collect();
    cycles.sort_by(f64::total_cmp);
    let avg_cycle_days = mean(&cycles);
    let median_cycle_days = match cycles.len() {
        0 => None,
        n if n % 2 == 1 => Some(cycles[n / 2]),
        n => Some((cycles[n / 2 - 1] + cycles[n / 2]) / 2.0),
    };
    let rank = |s: &str| order.iter().position(|o| o == s);
    let no_visits = Vec::new();
    let mut stage_conversion = Vec::new();
    let mut avg_days_in_stage = Vec::new();
    for (i, stage) in order.iter().enumerate() {
        let (mut entered, mut advanced) = (0, 0);
        let mut durations = Vec::new();
        for d in deals {
            let vs = visits.get(&d.id).unwrap_or(&no_visits);
            if vs.iter().any(|v| &v.stage == stage) {
                entered += 1;
                let later = vs.iter().any(|v| rank(&v.stage).is_some_and(|r| r > i));
                if d.won || later {
                    advanced += 1;
                }
            }
            durations.extend(
                vs.iter()
                    .filter(|v| &v.stage == stage)
                    .filter_map(|v| v.days),
            );
        }
        stage_conversion.push(StageConversion {
            stage: stage.clone(),
            entered,
            advanced,
            rate: (entered > 0).then(|| advanced as f64 / entered as f64),
        });
        avg_days_in_stage.push(StageDuration {
            stage: stage.clone(),
            visits: durations.len() as i64,
            avg_days: mean(&durations),
        });
    }
    AnalyticsFigures {
        won_count,
        lost_count,
        win_rate: (!deals.is_empty()).then(|| won_count as f64 / deals.len() as f64),
        won_value: won_value.views(),
        avg_won_deal: avg_won_deal.views(),
        avg_cycle_days,
        median_cycle_days,
        stage_conversion,
        avg_days_in_stage,
    }
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

// ---------------------------------------------------------- stage history

/// One visit of a stage by an opportunity.
#[derive(Serialize, Debug, PartialEq)]
pub struct StageVisit {
    pub stage: String,
    pub entered_at: String,
    /// Null while the opportunity is still in the stage.
    pub left_at: Option<String>,
    /// Days between entered and left; null while in the stage.
    pub days: Option<f64>,
}

/// The stage history of one opportunity, oldest first.
pub async fn stage_history(
    db: &ReadDb,
    tables: &Tables,
    opportunity_id: &str,
) -> Result<Vec<StageVisit>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT stage, entered_at, left_at FROM {} WHERE opportunity_id = $1 ORDER BY seq",
        tables.t(STAGE_HISTORY)
    ))
    .bind(opportunity_id.to_string())
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            let entered_at: String = r.try_get("entered_at")?;
            let left_at: Option<String> = r.try_get("left_at")?;
            let days = match &left_at {
                Some(l) => Some(days_between(parse_time(&entered_at)?, parse_time(l)?)),
                None => None,
            };
            Ok(StageVisit {
                stage: r.try_get("stage")?,
                entered_at,
                left_at,
                days,
            })
        })
        .collect()
}
