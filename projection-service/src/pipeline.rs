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
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::projection::{decode, Projection, ProjectionError, Tables, Tx};
use crate::readdb::{timestamp, ReadDb};

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
        if event.stream_type != "opportunity" {
            return Ok(());
        }
        let decoded: OpportunityEvent = decode(event)?;
        apply_event(tx, tables, event, decoded).await
    }
}

async fn apply_event(
    tx: &mut Tx,
    tables: &Tables,
    event: &RecordedEvent,
    decoded: OpportunityEvent,
) -> Result<(), ProjectionError> {
    let o = tables.t(OPPORTUNITIES);
    let id = event.stream_id.clone();
    let updated_at = timestamp(&event.recorded_at);
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
            sqlx::query(&format!(
                "INSERT INTO {o} (id, account_id, name, owner, pipeline, stage, status, amount, currency,
                    probability, expected_close, opened_at, stage_entered_at, version, position, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $8, $9, $10, $11, $12, $13, $14, $15)
                 ON CONFLICT (id) DO UPDATE SET account_id = EXCLUDED.account_id, name = EXCLUDED.name,
                    owner = EXCLUDED.owner, pipeline = EXCLUDED.pipeline, stage = EXCLUDED.stage,
                    status = 'open', amount = EXCLUDED.amount, currency = EXCLUDED.currency,
                    probability = EXCLUDED.probability, expected_close = EXCLUDED.expected_close,
                    opened_at = EXCLUDED.opened_at, stage_entered_at = EXCLUDED.stage_entered_at,
                    version = EXCLUDED.version, position = EXCLUDED.position, updated_at = EXCLUDED.updated_at"
            ))
            .bind(id.clone())
            .bind(account_id.to_string())
            .bind(name)
            .bind(owner)
            .bind(pipeline)
            .bind(stage.clone())
            .bind(amount.amount().to_string())
            .bind(amount.currency().as_str().to_string())
            .bind(i64::from(probability))
            .bind(expected_close.to_string())
            .bind(at.clone())
            .bind(at.clone())
            .bind(event.version)
            .bind(event.position)
            .bind(updated_at)
            .execute(&mut **tx)
            .await?;
            enter_stage(tx, tables, &id, event.version, &stage, &at).await?;
        }
        OpportunityStageAdvanced {
            to,
            probability,
            occurred_at,
            ..
        } => {
            let at = timestamp(&occurred_at);
            sqlx::query(&format!(
                "UPDATE {o} SET stage = $1, probability = $2, stage_entered_at = $3, version = $4,
                    position = $5, updated_at = $6 WHERE id = $7"
            ))
            .bind(to.clone())
            .bind(i64::from(probability))
            .bind(at.clone())
            .bind(event.version)
            .bind(event.position)
            .bind(updated_at)
            .bind(id.clone())
            .execute(&mut **tx)
            .await?;
            leave_stage(tx, tables, &id, &at).await?;
            enter_stage(tx, tables, &id, event.version, &to, &at).await?;
        }
        OpportunityUpdated { changes, .. } => {
            for change in changes {
                // Unknown fields and undecodable values leave the row as it is.
                let column_values: Vec<(&str, String)> = match change.field.as_str() {
                    "amount" => match change.new_as::<Money>() {
                        Some(m) => vec![
                            ("amount", m.amount().to_string()),
                            ("currency", m.currency().as_str().to_string()),
                        ],
                        None => continue,
                    },
                    "expected_close" => match change.new_as::<NaiveDate>() {
                        Some(d) => vec![("expected_close", d.to_string())],
                        None => continue,
                    },
                    "owner" | "name" => match change.new_as::<String>() {
                        Some(v) if change.field == "owner" => vec![("owner", v)],
                        Some(v) => vec![("name", v)],
                        None => continue,
                    },
                    _ => continue,
                };
                let sets: Vec<String> = column_values
                    .iter()
                    .enumerate()
                    .map(|(i, (c, _))| format!("{c} = ${}", i + 1))
                    .collect();
                let n = column_values.len();
                let sql = format!("UPDATE {o} SET {} WHERE id = ${}", sets.join(", "), n + 1);
                let mut q = sqlx::query(&sql);
                for (_, v) in column_values {
                    q = q.bind(v);
                }
                q.bind(id.clone()).execute(&mut **tx).await?;
            }
            touch(tx, tables, &id, event, &updated_at).await?;
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
            close_opportunity(
                tx,
                tables,
                event,
                CloseArgs {
                    outcome: "won",
                    from,
                    to,
                    probability,
                    close,
                    lost_reason: None,
                    competitor: None,
                    at: timestamp(&occurred_at),
                },
            )
            .await?;
        }
        OpportunityLost {
            from,
            to,
            probability,
            reason,
            competitor,
            occurred_at,
        } => {
            close_opportunity(
                tx,
                tables,
                event,
                CloseArgs {
                    outcome: "lost",
                    from,
                    to,
                    probability,
                    close: None,
                    lost_reason: Some(reason),
                    competitor,
                    at: timestamp(&occurred_at),
                },
            )
            .await?;
        }
        OpportunityReopened {
            to,
            probability,
            occurred_at,
            ..
        } => {
            let at = timestamp(&occurred_at);
            sqlx::query(&format!(
                "UPDATE {o} SET status = 'open', stage = $1, probability = $2, stage_entered_at = $3,
                    closed_at = NULL, close_amount = NULL, close_currency = NULL,
                    stage_before_close = NULL, lost_reason = NULL, competitor = NULL,
                    version = $4, position = $5, updated_at = $6 WHERE id = $7"
            ))
            .bind(to.clone())
            .bind(i64::from(probability))
            .bind(at.clone())
            .bind(event.version)
            .bind(event.position)
            .bind(updated_at)
            .bind(id.clone())
            .execute(&mut **tx)
            .await?;
            sqlx::query(&format!(
                "UPDATE {} SET reopened_at = $1 WHERE opportunity_id = $2 AND reopened_at IS NULL",
                tables.t(CLOSES)
            ))
            .bind(at.clone())
            .bind(id.clone())
            .execute(&mut **tx)
            .await?;
            leave_stage(tx, tables, &id, &at).await?;
            enter_stage(tx, tables, &id, event.version, &to, &at).await?;
        }
    }
    Ok(())
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

async fn close_opportunity(
    tx: &mut Tx,
    tables: &Tables,
    event: &RecordedEvent,
    args: CloseArgs,
) -> Result<(), ProjectionError> {
    let o = tables.t(OPPORTUNITIES);
    let id = event.stream_id.clone();
    let row = sqlx::query(&format!(
        "SELECT owner, pipeline, opened_at FROM {o} WHERE id = $1"
    ))
    .bind(id.clone())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| {
        ProjectionError::Invalid(format!(
            "opportunity {id} closed at version {} but never opened",
            event.version
        ))
    })?;
    let owner: String = row.try_get("owner")?;
    let pipeline: String = row.try_get("pipeline")?;
    let opened_at: String = row.try_get("opened_at")?;
    let (close_amount, close_currency) = match args.close {
        Some((a, c)) => (Some(a), Some(c)),
        None => (None, None),
    };
    sqlx::query(&format!(
        "UPDATE {o} SET status = $1, stage = $2, probability = $3, stage_entered_at = $4, closed_at = $5,
            close_amount = $6, close_currency = $7, stage_before_close = $8, lost_reason = $9,
            competitor = $10, version = $11, position = $12, updated_at = $13 WHERE id = $14"
    ))
    .bind(args.outcome.to_string())
    .bind(args.to.clone())
    .bind(i64::from(args.probability))
    .bind(args.at.clone())
    .bind(args.at.clone())
    .bind(close_amount.clone())
    .bind(close_currency.clone())
    .bind(args.from.clone())
    .bind(args.lost_reason)
    .bind(args.competitor)
    .bind(event.version)
    .bind(event.position)
    .bind(timestamp(&event.recorded_at))
    .bind(id.clone())
    .execute(&mut **tx)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO {} (opportunity_id, seq, outcome, owner, pipeline, stage_before_close, opened_at,
            closed_at, close_amount, close_currency)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (opportunity_id, seq) DO NOTHING",
        tables.t(CLOSES)
    ))
    .bind(id.clone())
    .bind(event.version)
    .bind(args.outcome.to_string())
    .bind(owner)
    .bind(pipeline)
    .bind(args.from)
    .bind(opened_at)
    .bind(args.at.clone())
    .bind(close_amount)
    .bind(close_currency)
    .execute(&mut **tx)
    .await?;
    leave_stage(tx, tables, &id, &args.at).await?;
    enter_stage(tx, tables, &id, event.version, &args.to, &args.at).await?;
    Ok(())
}

async fn touch(
    tx: &mut Tx,
    tables: &Tables,
    id: &str,
    event: &RecordedEvent,
    updated_at: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE {} SET version = $1, position = $2, updated_at = $3 WHERE id = $4",
        tables.t(OPPORTUNITIES)
    ))
    .bind(event.version)
    .bind(event.position)
    .bind(updated_at.to_string())
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn leave_stage(tx: &mut Tx, tables: &Tables, id: &str, at: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE {} SET left_at = $1 WHERE opportunity_id = $2 AND left_at IS NULL",
        tables.t(STAGE_HISTORY)
    ))
    .bind(at.to_string())
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn enter_stage(
    tx: &mut Tx,
    tables: &Tables,
    id: &str,
    seq: i64,
    stage: &str,
    at: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {} (opportunity_id, seq, stage, entered_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (opportunity_id, seq) DO NOTHING",
        tables.t(STAGE_HISTORY)
    ))
    .bind(id.to_string())
    .bind(seq)
    .bind(stage.to_string())
    .bind(at.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

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

    async fn fetch(&self, db: &ReadDb, sql: &str) -> Result<Vec<AnyRow>, sqlx::Error> {
        let mut q = sqlx::query(sql);
        for v in &self.values {
            q = q.bind(v.clone());
        }
        q.fetch_all(&db.pool).await
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

async fn open_rows(
    db: &ReadDb,
    tables: &Tables,
    filter: Filter,
) -> Result<Vec<OpenRow>, sqlx::Error> {
    let sql = format!(
        "SELECT owner, stage, probability, amount, currency, expected_close FROM {}{}",
        tables.t(OPPORTUNITIES),
        filter.sql()
    );
    filter
        .fetch(db, &sql)
        .await?
        .iter()
        .map(|r| {
            Ok(OpenRow {
                owner: r.try_get("owner")?,
                stage: r.try_get("stage")?,
                probability: r.try_get("probability")?,
                amount: parse_amount(&r.try_get::<String, _>("amount")?)?,
                currency: r.try_get("currency")?,
                expected_close: r.try_get("expected_close")?,
            })
        })
        .collect()
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
    let rows = open_rows(db, tables, filter).await?;
    // The pipeline's open stages in order (empty ones too), then any other
    // stage found on open rows, alphabetically.
    let def = pipedef::find(&pipeline);
    let mut order: Vec<String> = def
        .map(|d| d.open_stages().map(|s| s.key.clone()).collect())
        .unwrap_or_default();
    let extra: BTreeSet<String> = rows
        .iter()
        .filter(|r| !order.contains(&r.stage))
        .map(|r| r.stage.clone())
        .collect();
    order.extend(extra);
    let mut stages = Vec::new();
    let (mut total, mut weight) = (Totals::default(), Totals::default());
    for stage in order {
        let (mut t, mut w, mut count) = (Totals::default(), Totals::default(), 0);
        let mut probability = def.and_then(|d| d.probability(&stage)).map(i64::from);
        for r in rows.iter().filter(|r| r.stage == stage) {
            count += 1;
            t.add(&r.currency, r.amount);
            w.add(&r.currency, weighted(r.amount, r.probability));
            total.add(&r.currency, r.amount);
            weight.add(&r.currency, weighted(r.amount, r.probability));
            probability.get_or_insert(r.probability);
        }
        stages.push(BoardStage {
            stage,
            probability: probability.unwrap_or(0),
            count,
            total: t.views(),
            weighted: w.views(),
        });
    }
    Ok(BoardView {
        pipeline,
        owner: query.owner.clone(),
        stages,
        count: rows.len() as i64,
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
    let rows = open_rows(db, tables, filter).await?;
    let mut by_month: BTreeMap<String, ForecastAcc> = BTreeMap::new();
    let mut by_owner: BTreeMap<String, ForecastAcc> = BTreeMap::new();
    let mut total = ForecastAcc::default();
    for r in &rows {
        let month = r.expected_close.get(..7).unwrap_or(&r.expected_close);
        by_month.entry(month.to_string()).or_default().add(r);
        by_owner.entry(r.owner.clone()).or_default().add(r);
        total.add(r);
    }
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
    for r in filter.fetch(db, &closes_sql).await? {
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
    for r in filter.fetch(db, &history_sql).await? {
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
