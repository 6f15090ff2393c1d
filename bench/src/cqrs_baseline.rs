//! Baseline (b), the framework: our opportunity aggregate driven through plain
//! cqrs-es 0.5 + postgres-es on its default path (whole stream loaded per
//! command, no snapshots).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateContext, DomainEvent, EventStore};
use crm_domain::aggregate::execute;
use crm_domain::opportunity::{Opportunity, OpportunityCommand, OpportunityEvent};
use crm_domain::pipeline::DEFAULT_PIPELINE;
use crm_domain::{AccountId, Money, OpportunityId};
use crm_eventlog::testing::PgTestDb;
use postgres_es::{postgres_cqrs, PostgresCqrs, PostgresEventRepository};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::plan::{update_command, StreamPlan};
use crate::stats::{Latencies, RunResult};

/// postgres-es's `db/init.sql` table for events. Its `snapshots` table is
/// only read by the snapshot and aggregate stores, which this baseline
/// deliberately does not use, so it is not created.
const EVENTS_DDL: &str = "
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
)";

/// postgres-es binds payloads as `jsonb` into `json` columns, so the stored
/// text is jsonb's normalised rendering; going through `::jsonb` here makes
/// the seeded rows byte-identical to the ones the framework writes. The
/// metadata is what `execute` (no metadata) serialises: an empty map.
const SEED_INSERT: &str = "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT $1, $2, s, t, v, p::jsonb::json, '{}'::jsonb::json
  FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[]) AS r(s, t, v, p)";

/// Rows per seeding statement: large enough that a 10,000-event stream
/// takes a handful of round trips, small enough to keep statements modest.
const SEED_CHUNK: usize = 1000;

/// The amount the opportunity opens with; it must differ from
/// `update_amount(0)`, or the first update would be a no-op without event.
const OPEN_AMOUNT: &str = "100000.00 USD";

/// Runs `plan` through `postgres_es::postgres_cqrs`.
pub async fn run(plan: StreamPlan) -> anyhow::Result<RunResult> {
    let Some(db) = PgTestDb::create().await else {
        anyhow::bail!("cqrs-es baseline needs PostgreSQL, which is unreachable");
    };
    Ok(run_counted(db, plan).await?.0)
}

/// One opportunity stream of a client during the timed phase.
struct Stream {
    id: String,
    /// Events in the stream, which also picks the next update's amount.
    len: usize,
}

/// Runs `plan` in `db`, dropped afterwards whatever happened, and also
/// returns per client and stream (in plan order) how many events each stream
/// holds at the end.
async fn run_counted(db: PgTestDb, plan: StreamPlan) -> anyhow::Result<(RunResult, Vec<Vec<i64>>)> {
    let outcome = run_in(&db.url, plan).await;
    db.drop_db().await;
    outcome
}

async fn run_in(url: &str, plan: StreamPlan) -> anyhow::Result<(RunResult, Vec<Vec<i64>>)> {
    anyhow::ensure!(
        plan.stream_len >= 1,
        "a stream holds at least its open event"
    );
    anyhow::ensure!(plan.clients >= 1, "the plan needs at least one client");
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(plan.clients + 2).unwrap_or(u32::MAX))
        .connect(url)
        .await
        .context("connecting to the cqrs-es baseline database")?;
    let outcome = seed_and_measure(&pool, plan).await;
    pool.close().await;
    outcome
}

async fn seed_and_measure(
    pool: &PgPool,
    plan: StreamPlan,
) -> anyhow::Result<(RunResult, Vec<Vec<i64>>)> {
    sqlx::query(EVENTS_DDL)
        .execute(pool)
        .await
        .context("creating postgres-es's events table")?;
    let cqrs = Arc::new(postgres_cqrs::<Opportunity>(pool.clone(), vec![], ()));

    let mut clients = Vec::with_capacity(plan.clients);
    let mut first_stream = None;
    for _ in 0..plan.clients {
        let mut streams = Vec::with_capacity(plan.streams_per_client());
        for _ in 0..plan.streams_per_client() {
            let (stream, state) = seed_stream(&cqrs, pool, plan.stream_len).await?;
            first_stream.get_or_insert_with(|| (stream.id.clone(), state));
            streams.push(stream);
        }
        clients.push(streams);
    }
    check_seeded(pool, &clients, plan.stream_len).await?;
    if let Some((id, expected)) = first_stream {
        check_replay(pool, &id, &expected).await?;
    }
    // As for our side: fresh planner statistics before the clock starts.
    sqlx::query("ANALYZE")
        .execute(pool)
        .await
        .context("ANALYZE before the cqrs-es run")?;

    let barrier = Arc::new(Barrier::new(plan.clients + 1));
    let reported = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(plan.clients);
    for streams in clients {
        let (cqrs, barrier, reported) = (cqrs.clone(), barrier.clone(), reported.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            drive_client(&cqrs, streams, plan, &reported).await
        }));
    }
    barrier.wait().await;
    let start = Instant::now();

    let mut latencies = Latencies::default();
    let mut errors = 0;
    let mut finished = start;
    let mut clients = Vec::with_capacity(tasks.len());
    for task in tasks {
        let client = task.await.context("a cqrs-es client task failed")?;
        latencies.merge(&client.latencies);
        errors += client.errors;
        finished = finished.max(client.finished);
        clients.push(client.streams);
    }
    let elapsed = finished.duration_since(start);

    let counts = stream_counts(pool, &clients).await?;
    let name = format!("cqrs-es + postgres-es, {} events/stream", plan.stream_len);
    Ok((RunResult::new(name, elapsed, latencies, errors), counts))
}

/// Opens one opportunity through the framework, so the first event is the
/// framework's own, then appends `stream_len - 1` updates with plain SQL in
/// postgres-es's row format: going through `execute` would reload the whole
/// stream per event, i.e. quadratic seeding. Returns the stream and the state
/// the framework should replay from it.
async fn seed_stream(
    cqrs: &PostgresCqrs<Opportunity>,
    pool: &PgPool,
    stream_len: usize,
) -> anyhow::Result<(Stream, Opportunity)> {
    let uuid = Uuid::new_v4();
    let id = uuid.to_string();
    let opened_at = Utc::now();
    let open = open_command(uuid, opened_at)?;
    let mut state = Opportunity::default();
    execute(&mut state, open.clone()).context("deciding the open command")?;
    cqrs.execute(&id, open)
        .await
        .with_context(|| format!("opening opportunity {id} through cqrs-es"))?;

    // Any instant not before the open satisfies the no-backdating rule.
    let updated_at = opened_at + chrono::Duration::milliseconds(1);
    let mut next_sequence: i64 = 2;
    let mut remaining = stream_len - 1;
    let mut n = 0;
    while remaining > 0 {
        let chunk = remaining.min(SEED_CHUNK);
        let mut sequences = Vec::with_capacity(chunk);
        let mut types = Vec::with_capacity(chunk);
        let mut versions = Vec::with_capacity(chunk);
        let mut payloads = Vec::with_capacity(chunk);
        for _ in 0..chunk {
            let event = single_event(&mut state, update_command(n, updated_at))?;
            sequences.push(next_sequence);
            types.push(event.event_type());
            versions.push(event.event_version());
            payloads.push(serde_json::to_string(&event).context("serialising a seed event")?);
            next_sequence += 1;
            n += 1;
        }
        sqlx::query(SEED_INSERT)
            .bind(Opportunity::TYPE)
            .bind(&id)
            .bind(&sequences)
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .execute(pool)
            .await
            .with_context(|| format!("seeding events of opportunity {id}"))?;
        remaining -= chunk;
    }
    let stream = Stream {
        id,
        len: stream_len,
    };
    Ok((stream, state))
}

fn open_command(id: Uuid, occurred_at: DateTime<Utc>) -> anyhow::Result<OpportunityCommand> {
    Ok(OpportunityCommand::OpenOpportunity {
        id: OpportunityId::new(id),
        account_id: AccountId::new(Uuid::new_v4()),
        name: "Benchmark deal".to_string(),
        amount: Money::parse(OPEN_AMOUNT).map_err(anyhow::Error::msg)?,
        expected_close: NaiveDate::from_ymd_opt(2030, 12, 31).context("a valid close date")?,
        owner: "bench".to_string(),
        pipeline: DEFAULT_PIPELINE.to_string(),
        stage: "prospecting".to_string(),
        occurred_at,
    })
}

/// Decides and applies `command`, insisting on the one event the plan
/// promises per update (a second event or none would skew stream lengths).
fn single_event(
    state: &mut Opportunity,
    command: OpportunityCommand,
) -> anyhow::Result<OpportunityEvent> {
    let mut events = execute(state, command).context("deciding a seed update")?;
    match (events.pop(), events.is_empty()) {
        (Some(event), true) => Ok(event),
        _ => anyhow::bail!("a seed update must yield exactly one event"),
    }
}

/// Fails unless every seeded stream holds exactly `stream_len` rows.
async fn check_seeded(
    pool: &PgPool,
    clients: &[Vec<Stream>],
    stream_len: usize,
) -> anyhow::Result<()> {
    let counts = stream_counts(pool, clients).await?;
    for (streams, counts) in clients.iter().zip(&counts) {
        for (stream, &count) in streams.iter().zip(counts) {
            anyhow::ensure!(
                usize::try_from(count).ok() == Some(stream_len),
                "stream {} was seeded with {count} events instead of {stream_len}",
                stream.id
            );
        }
    }
    Ok(())
}

/// Replays one seeded stream through postgres-es's own loader: the timed
/// run would only show a broken row format as a wall of command errors.
async fn check_replay(pool: &PgPool, id: &str, expected: &Opportunity) -> anyhow::Result<()> {
    let store = PersistedEventStore::<_, Opportunity>::new_event_store(
        PostgresEventRepository::new(pool.clone()),
    );
    let mut context = store
        .load_aggregate(id)
        .await
        .with_context(|| format!("replaying seeded stream {id} through postgres-es"))?;
    anyhow::ensure!(
        context.aggregate() == expected,
        "postgres-es replays seeded stream {id} to a different state than was seeded"
    );
    Ok(())
}

/// Event counts of `clients`' streams, in the same nesting and order.
async fn stream_counts(pool: &PgPool, clients: &[Vec<Stream>]) -> anyhow::Result<Vec<Vec<i64>>> {
    let ids: Vec<&str> = clients.iter().flatten().map(|s| s.id.as_str()).collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, count(*) FROM events
          WHERE aggregate_type = $1 AND aggregate_id = ANY($2)
          GROUP BY aggregate_id",
    )
    .bind(Opportunity::TYPE)
    .bind(&ids)
    .fetch_all(pool)
    .await
    .context("counting events per stream")?;
    let counts: std::collections::HashMap<String, i64> = rows.into_iter().collect();
    Ok(clients
        .iter()
        .map(|streams| {
            streams
                .iter()
                .map(|s| counts.get(&s.id).copied().unwrap_or(0))
                .collect()
        })
        .collect())
}

struct ClientOutcome {
    latencies: Latencies,
    errors: u64,
    finished: Instant,
    streams: Vec<Stream>,
}

async fn drive_client(
    cqrs: &PostgresCqrs<Opportunity>,
    mut streams: Vec<Stream>,
    plan: StreamPlan,
    reported: &AtomicBool,
) -> ClientOutcome {
    let mut latencies = Latencies::default();
    let mut errors = 0;
    let per_stream = plan.per_stream();
    for i in 0..plan.commands_per_client {
        let Some(stream) = streams.get_mut(i / per_stream) else {
            break;
        };
        // Update n sits at sequence n + 2, so continuing from the stream's
        // length keeps the amounts alternating and every command an event.
        let command = update_command(stream.len - 1, Utc::now());
        let sent = Instant::now();
        match cqrs.execute(&stream.id, command).await {
            Ok(()) => {
                latencies.record(sent.elapsed());
                stream.len += 1;
            }
            Err(e) => {
                errors += 1;
                if !reported.swap(true, Ordering::Relaxed) {
                    eprintln!("cqrs-es baseline: command on {} failed: {e}", stream.id);
                }
            }
        }
    }
    ClientOutcome {
        latencies,
        errors,
        finished: Instant::now(),
        streams,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn check(stream_len: usize) {
        let plan = StreamPlan {
            stream_len,
            clients: 2,
            commands_per_client: 20,
        };
        // Without CI, an unreachable PostgreSQL skips (loudly); in CI it panics.
        let Some(db) = PgTestDb::create().await else {
            return;
        };
        let (result, counts) = run_counted(db, plan)
            .await
            .expect("the cqrs-es baseline runs");
        assert_eq!(result.errors, 0);
        assert_eq!(result.ops, 40);
        assert!(result.elapsed > Duration::ZERO);
        assert_eq!(counts.len(), plan.clients);
        for streams in &counts {
            assert_eq!(streams.len(), plan.streams_per_client());
            for (j, &count) in streams.iter().enumerate() {
                let received = plan
                    .per_stream()
                    .min(plan.commands_per_client - j * plan.per_stream());
                assert_eq!(
                    count,
                    (stream_len + received) as i64,
                    "stream {j}: {counts:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn commands_land_on_streams_of_the_planned_length() {
        check(10).await;
        check(200).await;
    }
}
