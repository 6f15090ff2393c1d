//! Runs a command against an aggregate: idempotency, expected version, load
//! (cache, or cache + catch-up from the log), decide, append in one
//! transaction, retry on conflict.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use crm_domain::error::DomainError;
use crm_domain::ValidationErrors;
use crm_eventlog::{
    AppendBatch, AppendOutcome, EventLog, ExpectedVersion, IdempotencyRecord, LogError, NewEvent,
    NewIdempotencyRecord, Snapshot, StreamAppend,
};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::Actor;
use crate::cache::{cache_key, Caches, Loaded, Stream};
use crate::locks::StreamLocks;
use crate::metrics::Verdict;
use crate::problem::Problem;

/// How many times a command is re-run after losing a race with another writer.
const MAX_ATTEMPTS: usize = 8;
/// A snapshot is saved each time a stream crosses a multiple of this many events.
const SNAPSHOT_EVERY: i64 = 100;
/// Events read per query while catching an aggregate up.
const CATCH_UP_PAGE: i64 = 500;

/// Who sent a command, how, and under which preconditions.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub actor: Actor,
    /// `<stream type>.<command>`, e.g. `opportunity.advance`.
    pub command: String,
    pub command_id: Uuid,
    pub now: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub if_match: Option<IfMatch>,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
    pub client: Option<String>,
    /// Fingerprint of the body alone: tells a repeated create from a different one.
    pub body_hash: String,
    /// Fingerprint of method, route and body: tells an idempotent retry from key reuse.
    pub request_hash: String,
}

impl CommandContext {
    fn metadata(&self) -> Value {
        let roles: Vec<&str> = self.actor.roles.iter().map(|role| role.as_str()).collect();
        json!({
            "actor": self.actor.name,
            "roles": roles,
            "command": self.command,
            "command_id": self.command_id,
            "causation_id": self.command_id,
            "correlation_id": self.correlation_id.clone().unwrap_or_else(|| self.command_id.to_string()),
            "idempotency_key": self.idempotency_key,
            "client": self.client,
            "request_id": self.request_id,
            "body_hash": self.body_hash,
        })
    }
}

/// A command that was not applied: the problem to answer, and how the
/// command metrics count it (a business refusal is told apart from bad input
/// here, where it is known, not from the status code).
#[derive(Debug, Clone)]
pub struct CommandError {
    pub problem: Problem,
    pub verdict: Verdict,
}

impl CommandError {
    /// Refused by a business rule on the aggregate's current state.
    pub fn rejected(problem: Problem) -> Self {
        Self {
            problem,
            verdict: Verdict::Rejected,
        }
    }
}

impl CommandError {
    /// Refused for what the request or the record's state is (4xx), as
    /// opposed to failed for what the service or the log could not do (5xx):
    /// only a refusal may depend on a stale view of the record.
    pub fn is_refusal(&self) -> bool {
        self.problem.status().is_client_error()
    }
}

/// A problem counted by its status (see [`Verdict::from_status`]).
impl From<Problem> for CommandError {
    fn from(problem: Problem) -> Self {
        let verdict = Verdict::from_status(problem.status());
        Self { problem, verdict }
    }
}

impl IntoResponse for CommandError {
    fn into_response(self) -> Response {
        let mut response = self.problem.into_response();
        response.extensions_mut().insert(self.verdict);
        response
    }
}

/// Whether a command creates its aggregate or acts on an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Create,
    Update,
}

/// What a command route answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: StatusCode,
    pub stream_type: String,
    pub id: String,
    pub version: i64,
    pub position: i64,
    /// True when this answer repeats an earlier one (idempotent retry or repeated create).
    pub replayed: bool,
}

impl Outcome {
    fn from_record(record: &IdempotencyRecord) -> Self {
        Self {
            status: StatusCode::from_u16(record.status).unwrap_or(StatusCode::OK),
            stream_type: record.stream_type.clone(),
            id: record.stream_id.clone(),
            version: record.version,
            position: record.position,
            replayed: true,
        }
    }
}

/// One stream's share of an append, with what to put in the cache on success.
pub struct Staged {
    pub stream_type: &'static str,
    pub stream_id: String,
    pub expected_version: i64,
    pub events: Vec<NewEvent>,
}

/// Executes commands against the log.
pub struct Executor {
    log: EventLog,
    caches: Caches,
    locks: StreamLocks,
    events_loaded: AtomicU64,
    existence_reads: AtomicU64,
}

impl Executor {
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            caches: Caches::default(),
            locks: StreamLocks::default(),
            events_loaded: AtomicU64::new(0),
            existence_reads: AtomicU64::new(0),
        }
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Events read from the log to rebuild aggregates since start (a cost gauge).
    pub fn events_loaded(&self) -> u64 {
        self.events_loaded.load(Ordering::Relaxed)
    }

    /// Whether a stream has events (a command's reference to another
    /// record). One this process holds with events in its cache needs no
    /// read: the log only grows, so a stream once written always exists.
    /// References are read on most create commands, a round trip each on
    /// PostgreSQL (bench/README.md, cause 1).
    pub async fn stream_exists(
        &self,
        tenant: &str,
        stream_type: &str,
        stream_id: &str,
    ) -> Result<bool, LogError> {
        if self
            .caches
            .holds_written(stream_type, &cache_key(tenant, stream_id))
        {
            return Ok(true);
        }
        self.existence_reads.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .log
            .stream_version(tenant, stream_type, stream_id)
            .await?
            > 0)
    }

    /// Reads of the log [`Executor::stream_exists`] made since start (a cost gauge).
    pub fn existence_reads(&self) -> u64 {
        self.existence_reads.load(Ordering::Relaxed)
    }

    /// Answers a retry with the first outcome, or refuses a reused key.
    pub async fn replay(&self, ctx: &CommandContext) -> Result<Option<Outcome>, Problem> {
        let Some(key) = &ctx.idempotency_key else {
            return Ok(None);
        };
        let record = self
            .log
            .idempotency_record(&ctx.actor.tenant, key)
            .await
            .map_err(|error| Problem::from_log(&error))?;
        record.map(|record| replayed(ctx, &record)).transpose()
    }

    /// Runs one command on one aggregate.
    pub async fn execute<A: Stream>(
        &self,
        ctx: &CommandContext,
        stream_id: Uuid,
        command: A::Command,
        mode: Mode,
    ) -> Result<Outcome, CommandError>
    where
        A::Command: Clone,
    {
        self.execute_built::<A>(ctx, stream_id, |_| Ok(command), mode)
            .await
    }

    /// Runs the command `build` makes, built once this request has the
    /// stream's turn, at an instant no earlier than the commands before it:
    /// a command whose time defaults to "now" must not be refused for
    /// predating a concurrent command that took the stream's turn first.
    pub async fn execute_built<A: Stream>(
        &self,
        ctx: &CommandContext,
        stream_id: Uuid,
        build: impl FnOnce(DateTime<Utc>) -> Result<A::Command, ValidationErrors>,
        mode: Mode,
    ) -> Result<Outcome, CommandError>
    where
        A::Command: Clone,
    {
        let stream_id = stream_id.to_string();
        let turn = self.locks.lock(A::TYPE, &stream_id).await;
        let ran = self.run_built::<A>(ctx, &stream_id, build, mode).await;
        drop(turn);
        match ran {
            Ok(Ran::Written(outcome)) => Ok(outcome),
            // The log failed (unavailable, say): answered at once; a retry
            // under the same key finds out what became of the command.
            Err(error) if !error.is_refusal() => Err(error),
            // The idempotency key is looked up only when nothing was written:
            // an append under a used key fails as a duplicate by itself, so
            // the common path spends no round trip on it. A retry of a
            // command that was written is answered as the first time was,
            // whatever the record's state says now.
            unwritten => match self.replay(ctx).await? {
                Some(outcome) => Ok(outcome),
                None => unwritten.map(Ran::into_outcome),
            },
        }
    }

    async fn run_built<A: Stream>(
        &self,
        ctx: &CommandContext,
        stream_id: &str,
        build: impl FnOnce(DateTime<Utc>) -> Result<A::Command, ValidationErrors>,
        mode: Mode,
    ) -> Result<Ran, CommandError>
    where
        A::Command: Clone,
    {
        let now = Utc::now().max(ctx.now);
        let command = build(now).map_err(|errors| Problem::validation(errors.0))?;
        let tenant = &ctx.actor.tenant;
        // The cached aggregate is decided on without reading the log: an
        // append from it carries its version, so if another process wrote
        // the stream meanwhile the append conflicts and the command runs
        // again on the log's state. Anything short of an append (a refusal,
        // a no-op) is only answered from the log's state.
        let mut read_log = false;
        for attempt in 1..=MAX_ATTEMPTS {
            let (loaded, from_log) = match self.cached::<A>(tenant, stream_id) {
                Some(cached) if !read_log => (cached, false),
                // A create is tried on a new stream: if the stream exists,
                // the append conflicts and the log's state judges it.
                None if !read_log && mode == Mode::Create => (Loaded::new_stream(), false),
                _ => (self.load::<A>(tenant, stream_id).await?, true),
            };
            match self
                .decide_and_append::<A>(ctx, stream_id, loaded, command.clone(), mode)
                .await
            {
                Ok(Step::Written(outcome)) => return Ok(Ran::Written(outcome)),
                Ok(Step::Conflict) => {
                    A::cache(&self.caches).invalidate(&cache_key(tenant, stream_id));
                    if let Some(expected) = ctx.expected_version() {
                        return Err(stale(expected, None).into());
                    }
                    if from_log {
                        tracing::debug!(attempt, stream = %stream_id, "version conflict; retrying");
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                    read_log = true;
                }
                // A refusal or a no-op stands only on the log's state.
                Ok(Step::Unwritten(_)) if !from_log => read_log = true,
                Err(error) if !from_log && error.is_refusal() => read_log = true,
                Ok(Step::Unwritten(outcome)) => return Ok(Ran::Unwritten(outcome)),
                Err(error) => return Err(error),
            }
        }
        Err(Problem::conflict(
            "the record is being changed by many writers at once; retry the command",
        )
        .into())
    }

    /// One attempt: the command decided on `loaded` and its events appended.
    async fn decide_and_append<A: Stream>(
        &self,
        ctx: &CommandContext,
        stream_id: &str,
        loaded: Loaded<A>,
        command: A::Command,
        mode: Mode,
    ) -> Result<Step, CommandError> {
        if let Some(outcome) = self.check_existence(ctx, &loaded, stream_id, mode).await? {
            return Ok(Step::Unwritten(outcome));
        }
        check_if_match(ctx, loaded.version)?;
        let events = loaded.state.decide(command).map_err(domain_problem)?;
        if events.is_empty() {
            return Ok(Step::Unwritten(Outcome {
                status: StatusCode::OK,
                stream_type: A::TYPE.to_string(),
                id: stream_id.to_string(),
                version: loaded.version,
                position: loaded.last_position,
                replayed: false,
            }));
        }
        let mut state = loaded.state.clone();
        for event in &events {
            state.apply(event.clone());
        }
        let staged = Staged {
            stream_type: A::TYPE,
            stream_id: stream_id.to_string(),
            expected_version: loaded.version,
            events: new_events(ctx, &events)?,
        };
        let status = if mode == Mode::Create {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(match self.append(ctx, vec![staged], status).await? {
            Appended::Committed(outcome) => {
                self.remember::<A>(
                    &ctx.actor.tenant,
                    stream_id,
                    loaded.version,
                    Loaded {
                        state,
                        version: outcome.version,
                        last_position: outcome.position,
                    },
                );
                Step::Written(outcome)
            }
            Appended::Replayed(outcome) => Step::Written(outcome),
            Appended::Conflict => Step::Conflict,
        })
    }

    /// Appends several streams' events in one transaction; the first stream's
    /// outcome is the answer. Conflicts are reported, not retried, here.
    pub async fn append(
        &self,
        ctx: &CommandContext,
        staged: Vec<Staged>,
        status: StatusCode,
    ) -> Result<Appended, Problem> {
        let streams = staged
            .into_iter()
            .map(|stage| StreamAppend {
                stream_type: stage.stream_type.to_string(),
                stream_id: stage.stream_id,
                expected_version: if stage.expected_version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(stage.expected_version)
                },
                events: stage.events,
            })
            .collect();
        let batch = AppendBatch {
            tenant_id: ctx.actor.tenant.clone(),
            streams,
            idempotency: ctx
                .idempotency_key
                .as_ref()
                .map(|key| NewIdempotencyRecord {
                    key: key.clone(),
                    request_hash: ctx.request_hash.clone(),
                    status: status.as_u16(),
                }),
        };
        match self.log.append(batch).await {
            Ok(AppendOutcome::Committed(committed)) => {
                let first = committed
                    .streams
                    .first()
                    .ok_or_else(|| Problem::internal(&"the log committed no stream"))?;
                Ok(Appended::Committed(Outcome {
                    status,
                    stream_type: first.stream_type.clone(),
                    id: first.stream_id.clone(),
                    version: first.last_version,
                    position: first.last_position,
                    replayed: false,
                }))
            }
            Ok(AppendOutcome::Duplicate(record)) => Ok(Appended::Replayed(replayed(ctx, &record)?)),
            Err(LogError::Conflict { .. }) => Ok(Appended::Conflict),
            Err(error) => Err(Problem::from_log(&error)),
        }
    }

    /// The aggregate as this process last saw it, without reading the log.
    fn cached<A: Stream>(&self, tenant: &str, stream_id: &str) -> Option<Loaded<A>> {
        A::cache(&self.caches)
            .get(&cache_key(tenant, stream_id))
            .map(|cached| Loaded::clone(&cached))
    }

    /// The aggregate as of the log's latest version: from the cache or a
    /// snapshot, plus whatever events came after it.
    pub async fn load<A: Stream>(
        &self,
        tenant: &str,
        stream_id: &str,
    ) -> Result<Loaded<A>, Problem> {
        let key = cache_key(tenant, stream_id);
        let mut loaded = match A::cache(&self.caches).get(&key) {
            Some(cached) => Loaded::clone(&cached),
            None => self.load_snapshot::<A>(tenant, stream_id).await?,
        };
        let start_version = loaded.version;
        loop {
            let events = self
                .log
                .read_stream(tenant, A::TYPE, stream_id, loaded.version, CATCH_UP_PAGE)
                .await
                .map_err(|error| Problem::from_log(&error))?;
            self.events_loaded
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            let page_len = events.len() as i64;
            for recorded in events {
                let event: A::Event =
                    serde_json::from_value(recorded.payload).map_err(|error| {
                        Problem::internal(&format!(
                            "event {} of {} {stream_id} does not decode: {error}",
                            recorded.version,
                            A::TYPE
                        ))
                    })?;
                loaded.state.apply(event);
                loaded.version = recorded.version;
                loaded.last_position = recorded.position;
            }
            if page_len < CATCH_UP_PAGE {
                break;
            }
        }
        if loaded.version != start_version {
            self.remember::<A>(tenant, stream_id, start_version, loaded.clone());
        }
        Ok(loaded)
    }

    async fn load_snapshot<A: Stream>(
        &self,
        tenant: &str,
        stream_id: &str,
    ) -> Result<Loaded<A>, Problem> {
        let snapshot = self
            .log
            .load_snapshot(tenant, A::TYPE, stream_id)
            .await
            .map_err(|error| Problem::from_log(&error))?;
        let decoded = snapshot.and_then(|snapshot| {
            // A snapshot of an older state shape is ignored: the events rebuild it.
            serde_json::from_value::<Loaded<A>>(snapshot.state).ok()
        });
        Ok(decoded.unwrap_or_else(Loaded::new_stream))
    }

    /// Caches the new state, and snapshots it when it crossed a snapshot boundary.
    fn remember<A: Stream>(
        &self,
        tenant: &str,
        stream_id: &str,
        previous_version: i64,
        loaded: Loaded<A>,
    ) {
        let crossed = previous_version / SNAPSHOT_EVERY != loaded.version / SNAPSHOT_EVERY;
        if crossed {
            if let Ok(state) = serde_json::to_value(&loaded) {
                let log = self.log.clone();
                let (tenant, stream_id, version) =
                    (tenant.to_string(), stream_id.to_string(), loaded.version);
                // Snapshots are an optimisation: writing one never delays or fails a command.
                tokio::spawn(async move {
                    let snapshot = Snapshot { version, state };
                    if let Err(error) = log
                        .save_snapshot(&tenant, A::TYPE, &stream_id, snapshot)
                        .await
                    {
                        tracing::warn!(%error, stream = %stream_id, "snapshot not saved");
                    }
                });
            }
        }
        A::cache(&self.caches).insert(cache_key(tenant, stream_id), Arc::new(loaded));
    }

    /// Existence rules: updates need the aggregate, a repeated create with the
    /// same body is answered with the original creation.
    async fn check_existence<A: Stream>(
        &self,
        ctx: &CommandContext,
        loaded: &Loaded<A>,
        stream_id: &str,
        mode: Mode,
    ) -> Result<Option<Outcome>, CommandError> {
        match (mode, loaded.state.exists()) {
            (Mode::Update, false) => Err(CommandError::rejected(Problem::not_found(format!(
                "no {} with id {stream_id}",
                A::TYPE
            )))),
            (Mode::Create, true) => {
                let first = self
                    .log
                    .read_stream(&ctx.actor.tenant, A::TYPE, stream_id, 0, 1)
                    .await
                    .map_err(|error| Problem::from_log(&error))?;
                let creation = first
                    .first()
                    .ok_or_else(|| Problem::internal(&"stream without events"))?;
                if creation.metadata.get("body_hash").and_then(Value::as_str)
                    == Some(ctx.body_hash.as_str())
                {
                    Ok(Some(Outcome {
                        status: StatusCode::OK,
                        stream_type: A::TYPE.to_string(),
                        id: stream_id.to_string(),
                        version: creation.version,
                        position: creation.position,
                        replayed: true,
                    }))
                } else {
                    Err(CommandError::rejected(Problem::conflict(format!(
                        "a {} with id {stream_id} already exists with different content",
                        A::TYPE
                    ))))
                }
            }
            _ => Ok(None),
        }
    }
}

/// How a command's run ended.
enum Ran {
    /// Its events are in the log (appended now, or under its idempotency key before).
    Written(Outcome),
    /// Nothing to append (a repeated create, a command that changes nothing).
    Unwritten(Outcome),
}

impl Ran {
    fn into_outcome(self) -> Outcome {
        match self {
            Ran::Written(outcome) | Ran::Unwritten(outcome) => outcome,
        }
    }
}

/// How one attempt at a command ended.
enum Step {
    Written(Outcome),
    Unwritten(Outcome),
    /// Another writer appended to the stream first.
    Conflict,
}

/// What became of an append.
pub enum Appended {
    Committed(Outcome),
    Replayed(Outcome),
    Conflict,
}

/// Serialises domain events into log rows carrying the command's metadata.
pub fn new_events<E: DomainEvent>(
    ctx: &CommandContext,
    events: &[E],
) -> Result<Vec<NewEvent>, Problem> {
    let metadata = ctx.metadata();
    events
        .iter()
        .map(|event| {
            Ok(NewEvent {
                event_id: Uuid::now_v7(),
                event_type: event.event_type(),
                schema_version: event.event_version().parse().unwrap_or(1),
                payload: serde_json::to_value(event).map_err(|error| Problem::internal(&error))?,
                metadata: metadata.clone(),
            })
        })
        .collect()
}

/// An `If-Match` precondition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: the record exists, at whatever version.
    Exists,
    /// `"N"`: the record is at version N.
    Version(i64),
}

impl CommandContext {
    /// The version `If-Match` names, if it names one: a write that loses a
    /// race against it is stale (412), not retried.
    pub fn expected_version(&self) -> Option<i64> {
        match self.if_match {
            Some(IfMatch::Version(expected)) => Some(expected),
            _ => None,
        }
    }
}

/// `version` 0: the record has no events, so it does not exist.
pub fn check_if_match(ctx: &CommandContext, version: i64) -> Result<(), Problem> {
    match ctx.if_match {
        Some(IfMatch::Version(expected)) if expected != version => {
            Err(stale(expected, Some(version)))
        }
        Some(IfMatch::Exists) if version == 0 => Err(Problem::precondition_failed(
            "If-Match: * requires the record to exist, and it does not",
        )),
        _ => Ok(()),
    }
}

fn stale(expected: i64, actual: Option<i64>) -> Problem {
    let detail = match actual {
        Some(actual) => {
            format!("If-Match expected version {expected}, but the record is at version {actual}")
        }
        None => format!("If-Match expected version {expected}, but the record changed meanwhile"),
    };
    Problem::precondition_failed(detail)
}

fn replayed(ctx: &CommandContext, record: &IdempotencyRecord) -> Result<Outcome, Problem> {
    if record.request_hash != ctx.request_hash {
        let mut problem = Problem::validation(vec![crm_domain::error::FieldError {
            field: "Idempotency-Key".to_string(),
            message: "this key was already used for a different request".to_string(),
        }]);
        problem.detail = "Idempotency-Key reused with a different request".to_string();
        return Err(problem);
    }
    Ok(Outcome::from_record(record))
}

/// An aggregate's refusal of a command (`decide`): a business rule, whatever
/// the status (a field the current state rejects is 422 too).
pub fn domain_problem(error: DomainError) -> CommandError {
    CommandError::rejected(match error {
        DomainError::Validation(errors) => Problem::validation(errors.0),
        DomainError::NotFound => Problem::not_found("the record does not exist"),
        DomainError::AlreadyExists => Problem::conflict("the record already exists"),
        DomainError::IllegalTransition(message) => Problem::conflict(message),
    })
}

fn backoff(attempt: usize) -> std::time::Duration {
    let jitter: u64 = rand::random::<u64>() % 5;
    std::time::Duration::from_millis((attempt as u64) * 2 + jitter)
}
