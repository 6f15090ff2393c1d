//! Group commit for the PostgreSQL backend.
//!
//! Every [`crate::postgres::PgStore`] owns one writer task fed by an mpsc channel. The task takes
//! everything queued (up to [`MAX_GROUP`] requests) and commits it in ONE transaction made of a
//! constant number of set-based statements (array parameters + `UNNEST`), whatever the group
//! size:
//!
//! 1. `BEGIN`;
//! 2. claim the idempotency keys of the group (one `INSERT .. ON CONFLICT DO NOTHING RETURNING`,
//!    keys sorted); a key not returned belongs to a committed append of someone else: that
//!    request is answered `Duplicate` with the stored record (read after the group);
//! 3. lock every stream row of the group, sorted, creating the missing ones as version-0
//!    placeholders, and read the current versions: one upsert (`INSERT .. ON CONFLICT DO
//!    UPDATE SET version = streams.version RETURNING version`);
//! 4. decide each request in memory, in queue order, against the running stream versions: a
//!    failed expected-version check refuses that request only (`LogError::Conflict`, it writes
//!    nothing); a request repeating the idempotency key of an earlier written request of the
//!    same group is answered `Duplicate` of that one;
//! 5. only when some request was refused: one statement removing the claims and one removing
//!    the placeholders that nothing was written to; snapshots of written requests (one
//!    statement each; rare);
//! 6. one statement doing all the other writes: `UPDATE log_head` (positions, row lock held
//!    to commit), the events, the stream versions, the idempotency records, and `pg_notify` of
//!    the new head;
//! 7. `COMMIT` (or `ROLLBACK` when nothing is to be written).
//!
//! So a group costs 5 round trips (4 without idempotency keys) whatever its size. The writer
//! keeps its connection while groups follow each other (the pool would ping it on every
//! acquire), and runs the statements with generic plans (they are shaped by their arrays, not
//! by table statistics).
//!
//! Lock order (deadlock-free across groups and processes): idempotency keys sorted by
//! (tenant, key), then stream rows sorted by (tenant, stream_type, stream_id) (byte order, as
//! Rust sorts strings), then `log_head` last.
//!
//! Failures: the group is one transaction, so when any statement or the commit fails nothing of
//! the group is visible. A transient outage (`LogError::is_unavailable`) fails every request
//! that would have been written (each gets a copy of the error); refusals already decided
//! (conflicts, duplicates of other appends) keep their answers; when the group could not even
//! get a connection within the acquire timeout, what queued meanwhile is failed at once too.
//! Any other failure known to be rolled back (for instance a duplicate event id, or a payload
//! PostgreSQL rejects) is retried one request per transaction, so one bad request cannot fail
//! the requests that happened to share its group.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection, Postgres, Row};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::postgres::{upsert_snapshot, HEAD_CHANNEL};
use crate::rows::{self, IDEMPOTENCY_COLUMNS};
use crate::types::now_micros;
use crate::{
    bump_head, AppendBatch, AppendOutcome, Committed, CommittedStream, IdempotencyRecord, LogError,
    NewIdempotencyRecord, SnapshotWrite,
};

/// Most requests folded into one group transaction.
pub(crate) const MAX_GROUP: usize = 256;
/// Requests waiting for a writer before `append` waits to enqueue.
pub(crate) const QUEUE_DEPTH: usize = 4096;
/// A writer keeps its connection for the next group if that starts within this time.
const KEEP_CONNECTION_FOR: Duration = Duration::from_secs(1);

/// One append waiting for its group.
pub(crate) struct AppendRequest {
    pub batch: AppendBatch,
    pub snapshot: Option<SnapshotWrite>,
    pub reply: oneshot::Sender<Result<AppendOutcome, LogError>>,
}

/// What a writer task needs.
pub(crate) struct Writer {
    pub pool: PgPool,
    pub head: watch::Sender<i64>,
    /// Test hook: max random delay (µs) between writing a group and committing it.
    pub pre_commit_delay_us: Arc<AtomicU64>,
    /// The connection of the last group and when it finished: kept while groups follow each
    /// other closely (an acquire from the pool costs a ping round trip).
    pub held: Option<(PoolConnection<Postgres>, Instant)>,
}

/// The writer task: one group at a time until every sender is gone and the queue is drained.
pub(crate) async fn run_writer(mut writer: Writer, mut rx: mpsc::Receiver<AppendRequest>) {
    let mut queued = Vec::with_capacity(MAX_GROUP);
    loop {
        let mut n = 0;
        if writer.held.is_some() {
            // recv_many is cancel safe.
            match tokio::time::timeout(KEEP_CONNECTION_FOR, rx.recv_many(&mut queued, MAX_GROUP))
                .await
            {
                Ok(0) => return,
                Ok(got) => n = got,
                // Idle: the kept connection goes back to the pool.
                Err(_) => writer.held = None,
            }
        }
        if n == 0 && rx.recv_many(&mut queued, MAX_GROUP).await == 0 {
            return;
        }
        let mut requests = Vec::with_capacity(queued.len());
        let mut replies = Vec::with_capacity(queued.len());
        for r in queued.drain(..) {
            requests.push((r.batch, r.snapshot));
            replies.push(r.reply);
        }
        let (answers, outage) = writer.run_group(&requests).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A requester that went away is not an error: its append was decided anyway.
            drop(reply.send(answer));
        }
        if let Some(error) = outage {
            // The group waited the whole acquire timeout for a connection: the database is
            // unreachable. Fail what queued meanwhile now instead of making it wait as long
            // again (an outage answers fast; callers retry).
            while let Ok(r) = rx.try_recv() {
                drop(r.reply.send(Err(replicate(&error))));
            }
        }
    }
}

type Request = (AppendBatch, Option<SnapshotWrite>);

/// The in-memory verdict on one request of a group.
enum Decision {
    /// Written by the group (positions relative to the group until the head is known).
    Write(Committed),
    /// Refused (expected-version mismatch): writes nothing.
    Refused(LogError),
    /// Its idempotency key was already committed by another append: answer with that record.
    KeyTaken,
    /// Same idempotency key as the written request at this index of the group.
    DuplicateOf(usize),
}

/// Why a group attempt failed; `decisions` when the requests were decided before the failure.
struct Failure {
    error: LogError,
    decisions: Option<Vec<Decision>>,
    stage: Stage,
}

/// Where a group attempt failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Getting a connection or `BEGIN`: nothing was done.
    Begin,
    /// A statement inside the transaction: it is rolled back.
    Body,
    /// `COMMIT`: rolled back if the server answered with an error, else unknown.
    Commit,
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure {
            error: e.into(),
            decisions: None,
            stage: Stage::Body,
        }
    }
}

/// A successful attempt: the decisions and, when something was written, the new head.
struct Attempt {
    decisions: Vec<Decision>,
    last_position: Option<i64>,
}

/// An idempotency key to claim: (tenant, key, index of its first request, record).
type Claim<'a> = (&'a str, &'a str, usize, &'a NewIdempotencyRecord);

/// Keys a stream row: (tenant, stream_type, stream_id).
type StreamKey<'a> = (&'a str, &'a str, &'a str);

impl Writer {
    /// Commits one group; one answer per request, in order, and a copy of the error when the
    /// group could not get a connection within the pool's acquire timeout.
    async fn run_group(
        &mut self,
        requests: &[Request],
    ) -> (Vec<Result<AppendOutcome, LogError>>, Option<LogError>) {
        let attempt = self.attempt(requests).await;
        let outage = match &attempt {
            Err(Failure {
                error: e @ LogError::Database(sqlx::Error::PoolTimedOut),
                ..
            }) => Some(replicate(e)),
            _ => None,
        };
        if let Err(f) = &attempt {
            // Known to be rolled back: a failed statement, or a COMMIT the server refused.
            let rolled_back = match f.stage {
                Stage::Begin | Stage::Body => true,
                Stage::Commit => matches!(f.error, LogError::Database(sqlx::Error::Database(_))),
            };
            if requests.len() > 1 && rolled_back && !f.error.is_unavailable() {
                // Nothing of the group is visible; find the culprit by running each request
                // alone, so only the request that caused the failure gets its error.
                tracing::warn!(error = %f.error, requests = requests.len(),
                    "event log group commit failed; retrying its appends one by one");
                let mut answers = Vec::with_capacity(requests.len());
                for request in requests {
                    let one = std::slice::from_ref(request);
                    let attempt = self.attempt(one).await;
                    answers.extend(self.answer(one, attempt).await);
                }
                return (answers, None);
            }
        }
        (self.answer(requests, attempt).await, outage)
    }

    /// Turns an attempt into answers (reading the records of keys taken by other appends).
    async fn answer(
        &self,
        requests: &[Request],
        attempt: Result<Attempt, Failure>,
    ) -> Vec<Result<AppendOutcome, LogError>> {
        let mut answers: Vec<Option<Result<AppendOutcome, LogError>>> =
            (0..requests.len()).map(|_| None).collect();
        let mut taken = Vec::new();
        match attempt {
            Ok(Attempt {
                decisions,
                last_position,
            }) => {
                if let Some(last) = last_position {
                    bump_head(&self.head, last);
                }
                let records: Vec<Option<IdempotencyRecord>> = decisions
                    .iter()
                    .zip(requests)
                    .map(|(d, (batch, _))| match d {
                        Decision::Write(c) => written_record(batch, c),
                        _ => None,
                    })
                    .collect();
                for (i, d) in decisions.into_iter().enumerate() {
                    answers[i] = match d {
                        Decision::Write(c) => Some(Ok(AppendOutcome::Committed(c))),
                        Decision::Refused(e) => Some(Err(e)),
                        Decision::DuplicateOf(w) => Some(match &records[w] {
                            Some(rec) => Ok(AppendOutcome::Duplicate(rec.clone())),
                            None => Err(protocol("group commit: duplicate of a keyless append")),
                        }),
                        Decision::KeyTaken => {
                            taken.push(i);
                            None
                        }
                    };
                }
            }
            Err(Failure {
                error, decisions, ..
            }) => {
                let mut failed = Vec::new();
                match decisions {
                    Some(decisions) => {
                        for (i, d) in decisions.into_iter().enumerate() {
                            match d {
                                Decision::Refused(e) => answers[i] = Some(Err(e)),
                                Decision::KeyTaken => taken.push(i),
                                Decision::Write(_) | Decision::DuplicateOf(_) => failed.push(i),
                            }
                        }
                    }
                    None => failed.extend(0..requests.len()),
                }
                if let Some((&last, rest)) = failed.split_last() {
                    for &i in rest {
                        answers[i] = Some(Err(replicate(&error)));
                    }
                    answers[last] = Some(Err(error));
                }
            }
        }
        if !taken.is_empty() {
            self.answer_taken(requests, &taken, &mut answers).await;
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(protocol("group commit: request left unanswered"))))
            .collect()
    }

    /// Answers the requests whose key another append committed: `Duplicate(stored record)`.
    async fn answer_taken(
        &self,
        requests: &[Request],
        taken: &[usize],
        answers: &mut [Option<Result<AppendOutcome, LogError>>],
    ) {
        let (mut tenants, mut keys) = (Vec::new(), Vec::new());
        for &i in taken {
            let (batch, _) = &requests[i];
            if let Some(idem) = &batch.idempotency {
                tenants.push(batch.tenant_id.as_str());
                keys.push(idem.key.as_str());
            }
        }
        let sql = format!(
            "SELECT tenant_id, {IDEMPOTENCY_COLUMNS} FROM idempotency_records \
             WHERE (tenant_id, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))"
        );
        let found: Result<HashMap<(String, String), IdempotencyRecord>, LogError> = async {
            let rows = sqlx::query(&sql)
                .bind(&tenants)
                .bind(&keys)
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|row| {
                    let tenant: String = row.try_get("tenant_id")?;
                    let rec = rows::pg_idempotency(row)?;
                    Ok(((tenant, rec.key.clone()), rec))
                })
                .collect()
        }
        .await;
        for &i in taken {
            let (batch, _) = &requests[i];
            let key = batch
                .idempotency
                .as_ref()
                .map(|k| k.key.as_str())
                .unwrap_or_default();
            answers[i] = Some(match &found {
                Ok(records) => match records.get(&(batch.tenant_id.clone(), key.to_string())) {
                    Some(rec) => Ok(AppendOutcome::Duplicate(rec.clone())),
                    // ON CONFLICT waited for the other transaction, so its record is committed.
                    None => Err(protocol(&format!(
                        "idempotency key {key:?} conflicted but no record is visible"
                    ))),
                },
                Err(e) => Err(replicate(e)),
            });
        }
    }

    /// Runs the group's transaction on the kept connection or one from the pool. A kept
    /// connection that fails at `BEGIN` (nothing done yet; say the server restarted) is
    /// replaced once, as the pool's ping would have done.
    async fn attempt(&mut self, requests: &[Request]) -> Result<Attempt, Failure> {
        let delay = self.pre_commit_delay_us.load(Ordering::Relaxed);
        let reused = self
            .held
            .as_ref()
            .is_some_and(|(_, done)| done.elapsed() < KEEP_CONNECTION_FOR);
        let mut result = attempt(self.connection().await?, requests, delay).await;
        if let Err(f) = &result {
            self.held = None;
            if reused && f.stage == Stage::Begin && f.error.is_unavailable() {
                result = attempt(self.connection().await?, requests, delay).await;
                if result.is_err() {
                    self.held = None;
                }
            }
        }
        if let Some((_, done)) = &mut self.held {
            *done = Instant::now();
        }
        result
    }

    /// The kept connection if it was used recently, else one from the pool (which pings it).
    async fn connection(&mut self) -> Result<&mut PgConnection, Failure> {
        let conn = match self.held.take() {
            Some((conn, done)) if done.elapsed() < KEEP_CONNECTION_FOR => conn,
            // An idle one goes back to the pool (dropped) before we acquire.
            _ => self.pool.acquire().await.map_err(|e| Failure {
                error: e.into(),
                decisions: None,
                stage: Stage::Begin,
            })?,
        };
        Ok(&mut *self.held.insert((conn, Instant::now())).0)
    }
}

/// One transaction for the whole group.
async fn attempt(
    conn: &mut PgConnection,
    requests: &[Request],
    max_delay_us: u64,
) -> Result<Attempt, Failure> {
    // Generic plans: the statements are shaped by their arrays, not by table statistics, and
    // re-planning them for every group (custom plans) costs more than running them.
    let mut tx = match conn
        .begin_with("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan")
        .await
    {
        Ok(tx) => tx,
        Err(e) => {
            return Err(Failure {
                error: e.into(),
                decisions: None,
                stage: Stage::Begin,
            })
        }
    };

    // 1. Claim the idempotency keys, sorted (first request of each key in queue order).
    let mut claims: Vec<Claim<'_>> = requests
        .iter()
        .enumerate()
        .filter_map(|(i, (b, _))| {
            b.idempotency
                .as_ref()
                .map(|k| (b.tenant_id.as_str(), k.key.as_str(), i, k))
        })
        .collect();
    claims.sort_unstable_by_key(|&(tenant, key, i, _)| (tenant, key, i));
    claims.dedup_by(|later, first| (later.0, later.1) == (first.0, first.1));
    // claimed[c]: claims[c] was inserted by this transaction.
    let mut claimed = vec![false; claims.len()];
    if !claims.is_empty() {
        let mut cols = ClaimColumns::default();
        for &(tenant, key, i, idem) in &claims {
            let (b, _) = &requests[i];
            cols.tenant.push(tenant);
            cols.key.push(key);
            cols.hash.push(idem.request_hash.as_str());
            cols.status.push(i32::from(idem.status));
            cols.stream_type.push(b.streams[0].stream_type.as_str());
            cols.stream_id.push(b.streams[0].stream_id.as_str());
        }
        let rows = sqlx::query(
            "INSERT INTO idempotency_records (tenant_id, key, request_hash, status, \
             stream_type, stream_id, version, position, created_at) \
             SELECT t.tenant_id, t.key, t.request_hash, t.status, t.stream_type, t.stream_id, \
             0, 0, now() FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], \
             $5::text[], $6::text[]) WITH ORDINALITY \
             AS t(tenant_id, key, request_hash, status, stream_type, stream_id, ord) \
             ORDER BY t.ord \
             ON CONFLICT (tenant_id, key) DO NOTHING RETURNING tenant_id, key",
        )
        .bind(&cols.tenant)
        .bind(&cols.key)
        .bind(&cols.hash)
        .bind(&cols.status)
        .bind(&cols.stream_type)
        .bind(&cols.stream_id)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let (tenant, key): (String, String) = (row.try_get("tenant_id")?, row.try_get("key")?);
            if let Ok(c) = claims
                .binary_search_by(|probe| (probe.0, probe.1).cmp(&(tenant.as_str(), key.as_str())))
            {
                claimed[c] = true;
            }
        }
    }
    let key_taken = |b: &AppendBatch| {
        b.idempotency.as_ref().is_some_and(|k| {
            claims
                .binary_search_by(|probe| {
                    (probe.0, probe.1).cmp(&(b.tenant_id.as_str(), k.key.as_str()))
                })
                .map_or(true, |c| !claimed[c])
        })
    };

    // 2. Lock every stream row of the group (requests whose key is taken excepted), sorted.
    let mut keys: Vec<StreamKey<'_>> = requests
        .iter()
        .filter(|(b, _)| !key_taken(b))
        .flat_map(|(b, _)| {
            b.streams.iter().map(|s| {
                (
                    b.tenant_id.as_str(),
                    s.stream_type.as_str(),
                    s.stream_id.as_str(),
                )
            })
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut versions = vec![0i64; keys.len()];
    let mut created = vec![false; keys.len()];
    if !keys.is_empty() {
        // One upsert creates the missing rows (version 0 placeholders) and locks the
        // existing ones (a no-op update), in sorted order, returning the current versions
        // (the latest committed ones: an upsert waits for and re-reads a locked row).
        // Stored streams have version >= 1, so version 0 marks a row created here.
        let tenants: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let types: Vec<&str> = keys.iter().map(|k| k.1).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.2).collect();
        let rows = sqlx::query(
            "INSERT INTO streams (tenant_id, stream_type, stream_id, version) \
             SELECT t.tenant_id, t.stream_type, t.stream_id, 0 \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) WITH ORDINALITY \
             AS t(tenant_id, stream_type, stream_id, ord) ORDER BY t.ord \
             ON CONFLICT (tenant_id, stream_type, stream_id) \
             DO UPDATE SET version = streams.version \
             RETURNING tenant_id, stream_type, stream_id, version",
        )
        .bind(&tenants)
        .bind(&types)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut locked = 0;
        for row in rows {
            let (t, ty, id): (String, String, String) = (
                row.try_get("tenant_id")?,
                row.try_get("stream_type")?,
                row.try_get("stream_id")?,
            );
            if let Ok(slot) = keys.binary_search(&(t.as_str(), ty.as_str(), id.as_str())) {
                versions[slot] = row.try_get("version")?;
                created[slot] = versions[slot] == 0;
                locked += 1;
            }
        }
        if locked != keys.len() {
            return Err(Failure {
                error: protocol("group commit: not every stream row was locked"),
                decisions: None,
                stage: Stage::Body,
            });
        }
    }

    // 3. Decide each request in queue order against the running versions.
    let slot_of = |k: StreamKey<'_>| keys.binary_search(&k).ok();
    let mut written = vec![false; keys.len()];
    let mut key_writer: HashMap<(&str, &str), usize> = HashMap::new();
    let mut decisions = Vec::with_capacity(requests.len());
    let mut total: i64 = 0;
    let recorded_at = now_micros();
    for (i, (b, _)) in requests.iter().enumerate() {
        if key_taken(b) {
            decisions.push(Decision::KeyTaken);
            continue;
        }
        let idem_key = b
            .idempotency
            .as_ref()
            .map(|k| (b.tenant_id.as_str(), k.key.as_str()));
        if let Some(w) = idem_key.and_then(|k| key_writer.get(&k)) {
            decisions.push(Decision::DuplicateOf(*w));
            continue;
        }
        match decide(b, &slot_of, &versions, total, recorded_at) {
            Ok((committed, new_versions)) => {
                for (slot, v) in new_versions {
                    versions[slot] = v;
                    written[slot] = true;
                }
                total = committed.last_position;
                if let Some(k) = idem_key {
                    key_writer.insert(k, i);
                }
                decisions.push(Decision::Write(committed));
            }
            Err(e) => decisions.push(Decision::Refused(e)),
        }
    }

    if total == 0 {
        // Nothing to write: drop the claims and placeholders of refused requests.
        if let Err(e) = tx.rollback().await {
            tracing::debug!(error = %e, "event log group commit: rollback failed");
        }
        return Ok(Attempt {
            decisions,
            last_position: None,
        });
    }

    // From here on a failure fails every request that would have been written.
    let written_stage = write(
        &mut tx,
        requests,
        &decisions,
        &claims,
        &claimed,
        &key_writer,
        &keys,
        &versions,
        &written,
        &created,
        total,
        recorded_at,
    )
    .await;
    let last_position = match written_stage {
        Ok(p) => p,
        Err(error) => {
            return Err(Failure {
                error,
                decisions: Some(decisions),
                stage: Stage::Body,
            })
        }
    };
    if max_delay_us > 0 {
        let us = (Uuid::new_v4().as_u128() % u128::from(max_delay_us)) as u64;
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
    if let Err(e) = tx.commit().await {
        return Err(Failure {
            error: e.into(),
            decisions: Some(decisions),
            stage: Stage::Commit,
        });
    }
    // Relative positions (1..=total) become absolute.
    let base = last_position - total;
    for d in &mut decisions {
        if let Decision::Write(c) = d {
            c.first_position += base;
            c.last_position += base;
            for s in &mut c.streams {
                s.last_position += base;
            }
        }
    }
    Ok(Attempt {
        decisions,
        last_position: Some(last_position),
    })
}

/// Snapshots, then one statement for every other write of the group. Returns the new head.
#[allow(clippy::too_many_arguments)]
async fn write(
    tx: &mut PgConnection,
    requests: &[Request],
    decisions: &[Decision],
    claims: &[Claim<'_>],
    claimed: &[bool],
    key_writer: &HashMap<(&str, &str), usize>,
    keys: &[StreamKey<'_>],
    versions: &[i64],
    written: &[bool],
    created: &[bool],
    total: i64,
    recorded_at: DateTime<Utc>,
) -> Result<i64, LogError> {
    let mut ev = EventColumns::default();
    let mut idem = IdemColumns::default();
    for ((b, snapshot), d) in requests.iter().zip(decisions) {
        let Decision::Write(c) = d else { continue };
        if let Some(snap) = snapshot {
            upsert_snapshot(tx, snap).await?;
        }
        let mut rel = c.first_position;
        for (s, cs) in b.streams.iter().zip(&c.streams) {
            for (k, e) in s.events.iter().enumerate() {
                ev.rel.push(rel);
                ev.event_id.push(e.event_id);
                ev.tenant.push(b.tenant_id.as_str());
                ev.stream_type.push(s.stream_type.as_str());
                ev.stream_id.push(s.stream_id.as_str());
                ev.version.push(cs.first_version + k as i64);
                ev.event_type.push(e.event_type.as_str());
                ev.schema_version.push(e.schema_version);
                ev.payload.push(&e.payload);
                ev.metadata.push(&e.metadata);
                rel += 1;
            }
        }
        if let Some(k) = &b.idempotency {
            let first = &c.streams[0];
            idem.tenant.push(b.tenant_id.as_str());
            idem.key.push(k.key.as_str());
            idem.hash.push(k.request_hash.as_str());
            idem.status.push(i32::from(k.status));
            idem.stream_type.push(first.stream_type.as_str());
            idem.stream_id.push(first.stream_id.as_str());
            idem.version.push(first.last_version);
            idem.rel.push(first.last_position);
        }
    }
    // Claims this transaction made that no written request uses (its requests were refused)
    // are removed. A key it did not claim is another append's committed record: kept.
    let (mut drop_tenant, mut drop_key) = (Vec::new(), Vec::new());
    for (&(tenant, key, _, _), _) in claims.iter().zip(claimed).filter(|(_, &mine)| mine) {
        if !key_writer.contains_key(&(tenant, key)) {
            drop_tenant.push(tenant);
            drop_key.push(key);
        }
    }
    // Stream rows: new versions of written ones; placeholders nobody wrote are removed.
    let mut st = StreamColumns::default();
    let mut gone = StreamColumns::default();
    for (slot, &(tenant, ty, id)) in keys.iter().enumerate() {
        let cols = if written[slot] {
            &mut st
        } else if created[slot] {
            &mut gone
        } else {
            continue;
        };
        cols.tenant.push(tenant);
        cols.stream_type.push(ty);
        cols.stream_id.push(id);
        cols.version.push(versions[slot]);
    }
    // Rare: claims and placeholders of refused requests. Before `log_head` (lock order);
    // these rows are this transaction's own, so nothing waits here.
    if !drop_key.is_empty() {
        sqlx::query(
            "DELETE FROM idempotency_records WHERE (tenant_id, key) IN \
             (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .bind(&drop_tenant)
        .bind(&drop_key)
        .execute(&mut *tx)
        .await?;
    }
    if !gone.tenant.is_empty() {
        sqlx::query(
            "DELETE FROM streams WHERE version = 0 AND (tenant_id, stream_type, stream_id) IN \
             (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]))",
        )
        .bind(&gone.tenant)
        .bind(&gone.stream_type)
        .bind(&gone.stream_id)
        .execute(&mut *tx)
        .await?;
    }
    // Every sub-statement is driven by the arrays (inserts and upserts on unique indexes),
    // so the plan does not depend on table statistics.
    let last: i64 = sqlx::query_scalar(
        "WITH head AS ( \
           UPDATE log_head SET position = position + $1 WHERE id RETURNING position \
         ), ev AS ( \
           INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
             version, event_type, schema_version, payload, metadata, recorded_at) \
           SELECT head.position - $1 + e.rel, e.event_id, e.tenant_id, e.stream_type, \
             e.stream_id, e.version, e.event_type, e.schema_version, e.payload, e.metadata, $2 \
           FROM head, UNNEST($3::int8[], $4::uuid[], $5::text[], $6::text[], $7::text[], \
             $8::int8[], $9::text[], $10::int4[], $11::jsonb[], $12::jsonb[]) WITH ORDINALITY \
             AS e(rel, event_id, tenant_id, stream_type, stream_id, version, event_type, \
             schema_version, payload, metadata, ord) \
           ORDER BY e.ord \
         ), st AS ( \
           INSERT INTO streams (tenant_id, stream_type, stream_id, version) \
           SELECT * FROM UNNEST($13::text[], $14::text[], $15::text[], $16::int8[]) \
           ON CONFLICT (tenant_id, stream_type, stream_id) \
           DO UPDATE SET version = EXCLUDED.version \
         ), idem AS ( \
           INSERT INTO idempotency_records (tenant_id, key, request_hash, status, \
             stream_type, stream_id, version, position, created_at) \
           SELECT i.tenant_id, i.key, i.request_hash, i.status, i.stream_type, i.stream_id, \
             i.version, head.position - $1 + i.rel, $2 \
           FROM head, UNNEST($17::text[], $18::text[], $19::text[], $20::int4[], \
             $21::text[], $22::text[], $23::int8[], $24::int8[]) \
             AS i(tenant_id, key, request_hash, status, stream_type, stream_id, version, rel) \
           ON CONFLICT (tenant_id, key) DO UPDATE SET \
             request_hash = EXCLUDED.request_hash, status = EXCLUDED.status, \
             stream_type = EXCLUDED.stream_type, stream_id = EXCLUDED.stream_id, \
             version = EXCLUDED.version, position = EXCLUDED.position, \
             created_at = EXCLUDED.created_at \
         ) \
         SELECT head.position FROM head, pg_notify($25, head.position::text)",
    )
    .bind(total)
    .bind(recorded_at)
    .bind(&ev.rel)
    .bind(&ev.event_id)
    .bind(&ev.tenant)
    .bind(&ev.stream_type)
    .bind(&ev.stream_id)
    .bind(&ev.version)
    .bind(&ev.event_type)
    .bind(&ev.schema_version)
    .bind(&ev.payload)
    .bind(&ev.metadata)
    .bind(&st.tenant)
    .bind(&st.stream_type)
    .bind(&st.stream_id)
    .bind(&st.version)
    .bind(&idem.tenant)
    .bind(&idem.key)
    .bind(&idem.hash)
    .bind(&idem.status)
    .bind(&idem.stream_type)
    .bind(&idem.stream_id)
    .bind(&idem.version)
    .bind(&idem.rel)
    .bind(HEAD_CHANNEL)
    .fetch_one(&mut *tx)
    .await?;
    Ok(last)
}

/// Checks one request's expected versions against the running `versions` and, when they hold,
/// returns its outcome (positions after `after`, relative to the group) and the new versions.
fn decide<'a>(
    b: &'a AppendBatch,
    slot_of: &impl Fn(StreamKey<'a>) -> Option<usize>,
    versions: &[i64],
    after: i64,
    recorded_at: DateTime<Utc>,
) -> Result<(Committed, Vec<(usize, i64)>), LogError> {
    // Streams are bumped in sorted order (stable: a stream listed twice is bumped in batch
    // order), so the first conflict reported is the first in that order, as before.
    let mut order: Vec<usize> = (0..b.streams.len()).collect();
    order.sort_by(|&x, &y| {
        let (sx, sy) = (&b.streams[x], &b.streams[y]);
        (&sx.stream_type, &sx.stream_id).cmp(&(&sy.stream_type, &sy.stream_id))
    });
    let mut running: Vec<(usize, i64)> = Vec::with_capacity(b.streams.len());
    let mut last_versions = vec![0i64; b.streams.len()];
    for j in order {
        let s = &b.streams[j];
        let slot = slot_of((&b.tenant_id, &s.stream_type, &s.stream_id))
            .ok_or_else(|| protocol("group commit: stream of a request was not locked"))?;
        let current = running
            .iter()
            .rev()
            .find(|(sl, _)| *sl == slot)
            .map_or(versions[slot], |(_, v)| *v);
        s.check_version(current)?;
        let new = current + s.events.len() as i64;
        running.push((slot, new));
        last_versions[j] = new;
    }
    let mut pos = after;
    let mut streams = Vec::with_capacity(b.streams.len());
    for (j, s) in b.streams.iter().enumerate() {
        let n = s.events.len() as i64;
        pos += n;
        streams.push(CommittedStream {
            stream_type: s.stream_type.clone(),
            stream_id: s.stream_id.clone(),
            first_version: last_versions[j] - n + 1,
            last_version: last_versions[j],
            last_position: pos,
        });
    }
    Ok((
        Committed {
            streams,
            first_position: after + 1,
            last_position: pos,
            recorded_at,
        },
        running,
    ))
}

/// The idempotency record a written request stored (what a later same-key request gets).
fn written_record(b: &AppendBatch, c: &Committed) -> Option<IdempotencyRecord> {
    let k = b.idempotency.as_ref()?;
    let first = c.streams.first()?;
    Some(IdempotencyRecord {
        key: k.key.clone(),
        request_hash: k.request_hash.clone(),
        status: k.status,
        stream_type: first.stream_type.clone(),
        stream_id: first.stream_id.clone(),
        version: first.last_version,
        position: first.last_position,
        created_at: c.recorded_at,
    })
}

#[derive(Default)]
struct ClaimColumns<'a> {
    tenant: Vec<&'a str>,
    key: Vec<&'a str>,
    hash: Vec<&'a str>,
    status: Vec<i32>,
    stream_type: Vec<&'a str>,
    stream_id: Vec<&'a str>,
}

#[derive(Default)]
struct EventColumns<'a> {
    rel: Vec<i64>,
    event_id: Vec<Uuid>,
    tenant: Vec<&'a str>,
    stream_type: Vec<&'a str>,
    stream_id: Vec<&'a str>,
    version: Vec<i64>,
    event_type: Vec<&'a str>,
    schema_version: Vec<i32>,
    payload: Vec<&'a Value>,
    metadata: Vec<&'a Value>,
}

#[derive(Default)]
struct StreamColumns<'a> {
    tenant: Vec<&'a str>,
    stream_type: Vec<&'a str>,
    stream_id: Vec<&'a str>,
    version: Vec<i64>,
}

#[derive(Default)]
struct IdemColumns<'a> {
    tenant: Vec<&'a str>,
    key: Vec<&'a str>,
    hash: Vec<&'a str>,
    status: Vec<i32>,
    stream_type: Vec<&'a str>,
    stream_id: Vec<&'a str>,
    version: Vec<i64>,
    rel: Vec<i64>,
}

fn protocol(msg: &str) -> LogError {
    LogError::Database(sqlx::Error::Protocol(msg.to_string()))
}

/// A copy of `e` for another request of the same failed group: same variant, and for database
/// errors the same SQLSTATE, kind and message, so `is_unavailable` and callers' checks (unique
/// violation, ...) answer the same.
pub(crate) fn replicate(e: &LogError) -> LogError {
    match e {
        LogError::Database(e) => LogError::Database(replicate_sqlx(e)),
        LogError::Conflict {
            stream_type,
            stream_id,
            expected,
            actual,
        } => LogError::Conflict {
            stream_type: stream_type.clone(),
            stream_id: stream_id.clone(),
            expected: *expected,
            actual: *actual,
        },
        LogError::EmptyAppend => LogError::EmptyAppend,
        LogError::InvalidUrl(u) => LogError::InvalidUrl(u.clone()),
        LogError::Closed => LogError::Closed,
        LogError::NotYet { head, wanted } => LogError::NotYet {
            head: *head,
            wanted: *wanted,
        },
        other => protocol(&other.to_string()),
    }
}

fn replicate_sqlx(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        sqlx::Error::RowNotFound => sqlx::Error::RowNotFound,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        sqlx::Error::Tls(t) => sqlx::Error::Tls(t.to_string().into()),
        sqlx::Error::Protocol(m) => sqlx::Error::Protocol(m.clone()),
        sqlx::Error::Database(db) => sqlx::Error::Database(Box::new(CopiedDbError {
            message: db.message().to_string(),
            code: db.code().map(Cow::into_owned),
            constraint: db.constraint().map(str::to_string),
            table: db.table().map(str::to_string),
            kind: match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => sqlx::error::ErrorKind::UniqueViolation,
                sqlx::error::ErrorKind::ForeignKeyViolation => {
                    sqlx::error::ErrorKind::ForeignKeyViolation
                }
                sqlx::error::ErrorKind::NotNullViolation => {
                    sqlx::error::ErrorKind::NotNullViolation
                }
                sqlx::error::ErrorKind::CheckViolation => sqlx::error::ErrorKind::CheckViolation,
                _ => sqlx::error::ErrorKind::Other,
            },
        })),
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// A database error copied from another (sqlx errors are not `Clone`).
#[derive(Debug)]
struct CopiedDbError {
    message: String,
    code: Option<String>,
    constraint: Option<String>,
    table: Option<String>,
    kind: sqlx::error::ErrorKind,
}

impl std::fmt::Display for CopiedDbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CopiedDbError {}

impl sqlx::error::DatabaseError for CopiedDbError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        self.code.as_deref().map(Cow::Borrowed)
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn constraint(&self) -> Option<&str> {
        self.constraint.as_deref()
    }

    fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        match self.kind {
            sqlx::error::ErrorKind::UniqueViolation => sqlx::error::ErrorKind::UniqueViolation,
            sqlx::error::ErrorKind::ForeignKeyViolation => {
                sqlx::error::ErrorKind::ForeignKeyViolation
            }
            sqlx::error::ErrorKind::NotNullViolation => sqlx::error::ErrorKind::NotNullViolation,
            sqlx::error::ErrorKind::CheckViolation => sqlx::error::ErrorKind::CheckViolation,
            _ => sqlx::error::ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_errors_keep_their_class() {
        let io = LogError::Database(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(replicate(&io).is_unavailable());
        assert!(replicate(&LogError::Database(sqlx::Error::PoolTimedOut)).is_unavailable());
        let shutdown = sqlx::Error::Database(Box::new(CopiedDbError {
            message: "terminating connection due to administrator command".into(),
            code: Some("57P01".into()),
            constraint: None,
            table: None,
            kind: sqlx::error::ErrorKind::Other,
        }));
        let copy = replicate(&LogError::Database(shutdown));
        assert!(copy.is_unavailable());
        assert!(copy.to_string().contains("administrator command"), "{copy}");
        let unique = sqlx::Error::Database(Box::new(CopiedDbError {
            message: "duplicate key".into(),
            code: Some("23505".into()),
            constraint: Some("events_event_id_key".into()),
            table: Some("events".into()),
            kind: sqlx::error::ErrorKind::UniqueViolation,
        }));
        match replicate(&LogError::Database(unique)) {
            LogError::Database(sqlx::Error::Database(db)) => {
                assert!(db.is_unique_violation());
                assert_eq!(db.code().as_deref(), Some("23505"));
                assert_eq!(db.constraint(), Some("events_event_id_key"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!replicate(&LogError::Database(sqlx::Error::RowNotFound)).is_unavailable());
    }
}
