//! Baseline (a), the physical limit: our event rows inserted straight into
//! PostgreSQL, one row per transaction or batched, with no service in between;
//! and the same one-row inserts taking their positions from the log's
//! `log_head` row, as a gap-free log must (the limit with that lock).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use crm_domain::opportunity::OpportunityEvent;
use crm_domain::FieldChange;
use crm_eventlog::testing::PgTestDb;
use crm_eventlog::EventLog;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::stats::{Latencies, RunResult};

const TENANT: &str = "default";
const STREAM_TYPE: &str = "opportunity";
const EVENT_TYPE: &str = "OpportunityUpdated";
const SCHEMA_VERSION: i32 = 1;

const INSERT_ONE: &str = "INSERT INTO events (global_position, event_id, tenant_id, stream_type, \
     stream_id, version, event_type, schema_version, payload, metadata, recorded_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

// The position from `log_head`, as the log hands positions out: the row lock
// is held until the commit, so these transactions commit one at a time.
const INSERT_ONE_AT_HEAD: &str = "WITH head AS (UPDATE log_head SET position = position + 1 \
     WHERE id RETURNING position) \
     INSERT INTO events (global_position, event_id, tenant_id, stream_type, \
     stream_id, version, event_type, schema_version, payload, metadata, recorded_at) \
     SELECT head.position, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM head";

// One statement text for every batch size, so the server plans it once per
// connection and the parameter count does not grow with the batch.
const INSERT_MANY: &str = "INSERT INTO events (global_position, event_id, tenant_id, stream_type, \
     stream_id, version, event_type, schema_version, payload, metadata, recorded_at) \
     SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
     $6::bigint[], $7::text[], $8::int4[], $9::jsonb[], $10::jsonb[], $11::timestamptz[])";

/// Where the inserted rows' global positions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// A counter shared by the clients in memory: no lock in the database.
    Counter,
    /// The log's `log_head` row, moved in the inserting statement (one row
    /// per transaction only): its row lock makes the commits take turns.
    LogHead,
}

/// Inserts event rows from `clients` connections for `duration`, `batch`
/// rows per transaction, into a throwaway database that is dropped afterwards
/// (also when the run fails).
///
/// Each transaction is one autocommit `INSERT` (durable: the server's default
/// `synchronous_commit = on` is left alone). With [`Positions::Counter`] the
/// log's `log_head` row lock is the cost this baseline leaves out; with
/// [`Positions::LogHead`] it is the cost measured.
///
/// The result holds one latency sample per successful transaction, but its
/// `ops` counts ROWS (transactions × `batch`), so rates compare with per-event
/// figures; `errors` counts failed transactions.
pub async fn run(
    clients: usize,
    duration: Duration,
    batch: usize,
    positions: Positions,
) -> anyhow::Result<RunResult> {
    let Some(db) = PgTestDb::create().await else {
        anyhow::bail!(
            "PostgreSQL is unreachable (see the warning above); the direct-insert baseline needs it"
        );
    };
    run_in(db, clients, duration, batch, positions).await
}

/// [`run`] on a database the caller created; always drops it.
async fn run_in(
    db: PgTestDb,
    clients: usize,
    duration: Duration,
    batch: usize,
    positions: Positions,
) -> anyhow::Result<RunResult> {
    let outcome = measure(&db.url, clients, duration, batch, positions).await;
    db.drop_db().await;
    outcome
}

async fn measure(
    url: &str,
    clients: usize,
    duration: Duration,
    batch: usize,
    positions: Positions,
) -> anyhow::Result<RunResult> {
    anyhow::ensure!(clients > 0, "direct insert: need at least one client");
    anyhow::ensure!(batch > 0, "direct insert: batch must be at least one row");
    anyhow::ensure!(
        batch == 1 || positions == Positions::Counter,
        "direct insert: positions from log_head are one row per transaction"
    );

    // The real log's migrations, so the table, constraints, index and
    // triggers the rows meet are exactly the service's.
    let log = EventLog::connect(url)
        .await
        .context("creating the event log schema")?;
    log.close().await;

    let connections = futures::future::try_join_all((0..clients).map(|_| async move {
        PgConnection::connect(url)
            .await
            .context("direct insert: connecting a client")
    }))
    .await?;

    let counter = Arc::new(AtomicI64::new(1));
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|conn| {
            let client = Client::new(url.to_string(), conn, counter.clone(), batch, positions);
            tokio::spawn(client.run_until(deadline))
        })
        .collect();

    // Every client is awaited before any error is returned, so none is still
    // writing when the caller drops the database.
    let mut latencies = Latencies::default();
    let (mut rows, mut errors) = (0_u64, 0_u64);
    let mut stopped = start;
    let mut failure = None;
    for joined in futures::future::join_all(tasks).await {
        match joined.context("direct insert: client task panicked") {
            Ok(Ok(done)) => {
                latencies.merge(&done.latencies);
                rows += done.rows;
                errors += done.errors;
                stopped = stopped.max(done.stopped);
            }
            Ok(Err(e)) | Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = stopped.duration_since(start);

    // A figure is only worth reporting if the rows it counts are really there.
    let mut conn = PgConnection::connect(url)
        .await
        .context("direct insert: connecting to count rows")?;
    let (landed, highest, head): (i64, Option<i64>, i64) = sqlx::query_as(
        "SELECT count(*), max(global_position), (SELECT position FROM log_head) FROM events",
    )
    .fetch_one(&mut conn)
    .await
    .context("direct insert: counting rows")?;
    drop(conn.close().await);
    anyhow::ensure!(
        u64::try_from(landed).ok() == Some(rows),
        "direct insert: clients counted {rows} rows but the table holds {landed}"
    );
    // From log_head, the head moved once per row and the positions are
    // 1..=rows with no gap (a failed insert rolled its move back).
    anyhow::ensure!(
        positions == Positions::Counter || (head == landed && highest.unwrap_or(0) == landed),
        "direct insert: log_head at {head}, positions up to {highest:?}, for {landed} rows"
    );

    let name = match (batch, positions) {
        (1, Positions::Counter) => "direct insert, 1 row/tx".to_string(),
        (1, Positions::LogHead) => "direct insert, 1 row/tx, position from log_head".to_string(),
        (batch, _) => format!("direct insert, {batch} rows/tx"),
    };
    let mut result = RunResult::new(name, elapsed, latencies, errors);
    result.ops = rows;
    Ok(result)
}

/// What one client did.
struct Done {
    latencies: Latencies,
    rows: u64,
    errors: u64,
    stopped: Instant,
}

/// One connection writing to its own opportunity stream.
struct Client {
    url: String,
    conn: PgConnection,
    counter: Arc<AtomicI64>,
    batch: usize,
    positions: Positions,
    stream_id: String,
    next_version: i64,
}

impl Client {
    fn new(
        url: String,
        conn: PgConnection,
        counter: Arc<AtomicI64>,
        batch: usize,
        positions: Positions,
    ) -> Self {
        Self {
            url,
            conn,
            counter,
            batch,
            positions,
            stream_id: Uuid::new_v4().to_string(),
            next_version: 1,
        }
    }

    async fn run_until(mut self, deadline: Instant) -> anyhow::Result<Done> {
        let mut latencies = Latencies::default();
        let (mut rows, mut errors) = (0_u64, 0_u64);
        let batch = i64::try_from(self.batch).context("batch size")?;
        while Instant::now() < deadline {
            // Rows are built before the clock starts: the baseline times the
            // database, not JSON building in the load generator.
            // Taken from the counter either way; unused when log_head hands them out.
            let first_position = self.counter.fetch_add(batch, Ordering::Relaxed);
            let columns = Columns::build(
                first_position,
                &self.stream_id,
                self.next_version,
                self.batch,
            )?;
            let began = Instant::now();
            let inserted = columns.insert(&mut self.conn, self.positions).await;
            let took = began.elapsed();
            match inserted {
                Ok(()) => {
                    latencies.record(took);
                    rows += self.batch as u64;
                    // A failed insert did not take its versions, so only a
                    // success moves the stream on.
                    self.next_version += batch;
                }
                Err(sqlx::Error::Database(_)) => errors += 1,
                Err(_) => {
                    // The connection itself failed: count it and reopen, rather
                    // than spinning on a dead socket until the deadline.
                    errors += 1;
                    self.conn = PgConnection::connect(&self.url)
                        .await
                        .context("direct insert: reconnecting a client after a failed insert")?;
                }
            }
        }
        Ok(Done {
            latencies,
            rows,
            errors,
            stopped: Instant::now(),
        })
    }
}

/// One transaction's rows, column by column (the shape `UNNEST` binds).
struct Columns {
    positions: Vec<i64>,
    event_ids: Vec<Uuid>,
    tenants: Vec<String>,
    stream_types: Vec<String>,
    stream_ids: Vec<String>,
    versions: Vec<i64>,
    event_types: Vec<String>,
    schema_versions: Vec<i32>,
    payloads: Vec<Value>,
    metadata: Vec<Value>,
    recorded_at: Vec<DateTime<Utc>>,
}

impl Columns {
    fn build(
        first_position: i64,
        stream_id: &str,
        first_version: i64,
        rows: usize,
    ) -> anyhow::Result<Self> {
        let now = Utc::now();
        let mut columns = Columns {
            positions: Vec::with_capacity(rows),
            event_ids: Vec::with_capacity(rows),
            tenants: Vec::with_capacity(rows),
            stream_types: Vec::with_capacity(rows),
            stream_ids: Vec::with_capacity(rows),
            versions: Vec::with_capacity(rows),
            event_types: Vec::with_capacity(rows),
            schema_versions: Vec::with_capacity(rows),
            payloads: Vec::with_capacity(rows),
            metadata: Vec::with_capacity(rows),
            recorded_at: Vec::with_capacity(rows),
        };
        for (offset, version) in (first_version..).take(rows).enumerate() {
            let offset = i64::try_from(offset).context("batch size")?;
            columns.positions.push(first_position + offset);
            // v7, as the service mints event ids.
            columns.event_ids.push(Uuid::now_v7());
            columns.tenants.push(TENANT.to_string());
            columns.stream_types.push(STREAM_TYPE.to_string());
            columns.stream_ids.push(stream_id.to_string());
            columns.versions.push(version);
            columns.event_types.push(EVENT_TYPE.to_string());
            columns.schema_versions.push(SCHEMA_VERSION);
            columns.payloads.push(payload(version, now)?);
            columns.metadata.push(metadata());
            columns.recorded_at.push(now);
        }
        Ok(columns)
    }

    async fn insert(
        self,
        conn: &mut PgConnection,
        positions: Positions,
    ) -> Result<(), sqlx::Error> {
        if self.positions.len() == 1 {
            // The position is INSERT_ONE's first parameter; log_head hands it
            // out in INSERT_ONE_AT_HEAD, whose parameters are the rest.
            let query = match positions {
                Positions::Counter => sqlx::query(INSERT_ONE).bind(self.positions[0]),
                Positions::LogHead => sqlx::query(INSERT_ONE_AT_HEAD),
            };
            query
                .bind(self.event_ids[0])
                .bind(TENANT)
                .bind(STREAM_TYPE)
                .bind(&self.stream_ids[0])
                .bind(self.versions[0])
                .bind(EVENT_TYPE)
                .bind(SCHEMA_VERSION)
                .bind(&self.payloads[0])
                .bind(&self.metadata[0])
                .bind(self.recorded_at[0])
                .execute(conn)
                .await?;
        } else {
            sqlx::query(INSERT_MANY)
                .bind(self.positions)
                .bind(self.event_ids)
                .bind(self.tenants)
                .bind(self.stream_types)
                .bind(self.stream_ids)
                .bind(self.versions)
                .bind(self.event_types)
                .bind(self.schema_versions)
                .bind(self.payloads)
                .bind(self.metadata)
                .bind(self.recorded_at)
                .execute(conn)
                .await?;
        }
        Ok(())
    }
}

/// The payload the service stores for an amount update: the domain event
/// itself, serialized the same way.
fn payload(version: i64, occurred_at: DateTime<Utc>) -> anyhow::Result<Value> {
    let money = |amount: i64| json!({ "amount": format!("{amount}.00"), "currency": "USD" });
    let event = OpportunityEvent::OpportunityUpdated {
        changes: vec![FieldChange {
            field: "amount".to_string(),
            old: money(125_000 + 500 * (version - 1)),
            new: money(125_000 + 500 * version),
        }],
        occurred_at,
    };
    serde_json::to_value(&event).context("serializing an opportunity event")
}

/// Metadata with the keys and value shapes of the service's
/// `CommandContext::metadata`, as if every row were its own command.
fn metadata() -> Value {
    let command_id = Uuid::now_v7();
    // Hex of a SHA-256 in the service; same length here.
    let body_hash = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    json!({
        "actor": "bench",
        "roles": ["sales"],
        "command": "opportunity.update",
        "command_id": command_id,
        "causation_id": command_id,
        "correlation_id": command_id.to_string(),
        "idempotency_key": Uuid::new_v4().to_string(),
        "client": "crm-bench",
        "request_id": Uuid::new_v4().to_string(),
        "body_hash": body_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rows_land_and_the_database_is_dropped() -> anyhow::Result<()> {
        for (batch, positions) in [
            (1, Positions::Counter),
            (50, Positions::Counter),
            (1, Positions::LogHead),
        ] {
            // Panics naming PostgreSQL when CI=true; elsewhere it warns and
            // gives None.
            let Some(db) = PgTestDb::create().await else {
                return Ok(());
            };
            let name = db.name.clone();
            // `run` minus creating the database, so the test knows its name;
            // `run_in` also checks the table holds exactly `ops` rows.
            let result = run_in(db, 2, Duration::from_millis(300), batch, positions).await?;
            assert!(result.ops > 0, "batch {batch}: no rows inserted");
            assert_eq!(result.errors, 0, "batch {batch}");
            assert_eq!(
                result.ops % batch as u64,
                0,
                "batch {batch}: {}",
                result.ops
            );
            assert_eq!(result.ops, result.latencies.count() * batch as u64);

            let mut admin = PgConnection::connect(&crm_eventlog::testing::admin_url()).await?;
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
                    .bind(&name)
                    .fetch_one(&mut admin)
                    .await?;
            drop(admin.close().await);
            assert_eq!(left, 0, "database {name} was not dropped");
        }
        Ok(())
    }
}
