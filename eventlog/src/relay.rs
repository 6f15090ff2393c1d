//! Relay from the event log to NATS JetStream: owns the copy of every committed event, in
//! global order, onto the JetStream stream `CRM_EVENTS`, and the relay's durable checkpoint.
//!
//! * **Wire format**: each message body is the protobuf `crm.v1.EventEnvelope` of the
//!   `crm-proto` crate (this crate depends on `crm-proto`, which depends on nothing of ours, so
//!   there is no cycle). Protobuf rather than the JSON of [`RecordedEvent`] because it is the
//!   bus contract that non-Rust consumers and the gRPC API share; `payload` and `metadata` still
//!   travel as their JSON text (fields `payload_json`, `metadata_json`) so the event body is
//!   readable as-is. [`envelope`] encodes, [`decode_envelope`] decodes. The envelope has no
//!   hash-chain fields: `prev_hash`/`hash` are not carried (auditors verify against the log).
//! * **Subjects**: `<prefix>.<tenant>.<stream_type>.<stream_id>` (see [`subject`]); each token
//!   is percent-encoded where NATS would misread it, so the mapping is injective.
//! * **Headers**: `Nats-Msg-Id: <event_id>` (JetStream drops a re-publish of the same id within
//!   the stream's duplicate window), `Nats-Expected-Stream: <stream>` (a subject captured by the
//!   wrong stream is rejected instead of silently stored elsewhere) and `Crm-Position: <global
//!   position>`.
//! * **Order**: events are read with [`EventLog::read_all`] (gap-free) and published one at a
//!   time; the relay awaits each publish ack before sending the next. So at most one event is
//!   ever in flight, and the stream holds events in global order (hence in per-stream order).
//! * **Checkpoint**: table `relay_checkpoints(name, position)` in the event-log database (see
//!   the `*_relay_checkpoints.sql` migrations), one row per relay named
//!   [`RelaySettings::checkpoint_name`] (`nats:<stream>`). It is the position of the last
//!   acknowledged event and is saved after every acknowledged batch (and when stopping
//!   mid-batch); it only moves forward.
//! * **Failures**: on any NATS or database error the relay gives up its lease, backs off
//!   (exponentially, up to [`RelaySettings::max_backoff`]) and resumes from the durable
//!   checkpoint. Events acknowledged but not yet checkpointed are published again; JetStream
//!   drops them as duplicates by `Nats-Msg-Id` as long as they are within the duplicate window
//!   (2 minutes by default). If the stream was deleted it is re-created; it then only receives
//!   events after the checkpoint (consumers catch up from the log, which stays the system of
//!   record).
//! * **One publisher (lease)**: every command-service replica may run a relay. On PostgreSQL a
//!   relay publishes only while it holds the session advisory lock
//!   `pg_try_advisory_lock(lease_key(name))` on a dedicated connection (application name
//!   `crm-relay`); the others retry every [`RelaySettings::lease_retry`]. If the leader dies, or
//!   its connection drops, PostgreSQL releases the lock; the next relay to take it starts from
//!   the durable checkpoint, and whatever the dead leader had published after its last saved
//!   checkpoint is dropped by JetStream as a duplicate (`Nats-Msg-Id`). The leader checks its
//!   lease connection before every batch and saves the checkpoint through it, so a leader that
//!   lost its connection stops within one batch; even then, ordering holds (each publisher only
//!   sends event `n+1` after event `n` was stored) and the overlap is deduplicated. On SQLite
//!   (embedded, one process) there is no lease: run a single relay per log.
//! * **Metrics** (`metrics` crate, label `stream`): counter `crm_relay_events_total` (events
//!   newly stored in the stream), counter `crm_relay_duplicates_total` (re-publishes JetStream
//!   dropped), gauge `crm_relay_position` (checkpoint), gauge `crm_relay_leader` (1 while this
//!   relay holds the lease).
//!
//! Accessing the database: the relay reuses the log's own pools (the SQLite read pool, which
//! can also write the small checkpoint table, and the PostgreSQL pool for the lease connection's
//! options). For that the pool fields of the two backends are `pub(crate)`.

use std::time::Duration;

use async_nats::jetstream::context::Publish;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use crm_proto::v1::EventEnvelope;
use prost::Message as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::sqlite::SqlitePool;
use sqlx::Connection;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{EventLog, LogError, RecordedEvent, Store};

/// Default JetStream stream name.
pub const DEFAULT_STREAM: &str = "CRM_EVENTS";
/// Default subject prefix: subjects are `crm.<tenant>.<stream_type>.<stream_id>`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "crm";
/// Default NATS server.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Header carrying the event's global position (decimal).
pub const POSITION_HEADER: &str = "Crm-Position";
/// High 32 bits of every relay lease key ("CRMR"); the low 32 bits hash the checkpoint name.
pub const LEASE_KEY_CLASS: i64 = 0x4352_4D52;

/// Timeout for each statement on the PostgreSQL lease connection.
const LEASE_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// First back-off delay after an error.
const MIN_BACKOFF: Duration = Duration::from_millis(250);

/// Relay configuration. [`Default`] gives production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySettings {
    /// NATS server URL(s), comma separated (default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// JetStream stream name (default `CRM_EVENTS`).
    pub stream: String,
    /// Subject prefix (default `crm`): subjects `<prefix>.<tenant>.<stream_type>.<stream_id>`.
    /// May contain dots (`crm.prod`), never wildcards or whitespace.
    pub subject_prefix: String,
    /// Events read from the log and published per batch; the checkpoint is saved after each
    /// batch (default 500).
    pub batch: i64,
    /// Polling fallback when no head change is signalled (default 1 s).
    pub poll_interval: Duration,
    /// JetStream duplicate window for streams this relay creates (default 2 min): a re-publish
    /// of an event within this window is dropped by `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Retention of streams this relay creates (default 7 days; older messages are discarded,
    /// the log keeps everything).
    pub max_age: Duration,
    /// How often a relay without the lease tries to take it (PostgreSQL; default 3 s).
    pub lease_retry: Duration,
    /// Upper bound of the exponential back-off after errors (default 30 s).
    pub max_backoff: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.to_string(),
            stream: DEFAULT_STREAM.to_string(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_string(),
            batch: 500,
            poll_interval: Duration::from_secs(1),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            lease_retry: Duration::from_secs(3),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RelaySettings {
    /// Name of this relay's row in `relay_checkpoints`: `nats:<stream>`.
    pub fn checkpoint_name(&self) -> String {
        format!("nats:{}", self.stream)
    }

    /// Checks the settings: a valid stream name, a subject prefix of valid literal tokens, a
    /// positive batch and non-zero durations.
    pub fn validate(&self) -> Result<(), RelayError> {
        let bad = |m: String| Err(RelayError::InvalidSettings(m));
        if self.stream.is_empty()
            || self
                .stream
                .chars()
                .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace())
        {
            return bad(format!("invalid stream name {:?}", self.stream));
        }
        if self.subject_prefix.split('.').any(|t| {
            t.is_empty()
                || t.chars()
                    .any(|c| matches!(c, '*' | '>') || c.is_whitespace() || c.is_control())
        }) {
            return bad(format!(
                "invalid subject prefix {:?} (dot-separated literal tokens)",
                self.subject_prefix
            ));
        }
        if self.batch < 1 {
            return bad(format!("batch must be at least 1, got {}", self.batch));
        }
        for (name, d) in [
            ("poll_interval", self.poll_interval),
            ("duplicate_window", self.duplicate_window),
            ("max_age", self.max_age),
            ("lease_retry", self.lease_retry),
            ("max_backoff", self.max_backoff),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must not be zero"));
            }
        }
        if self.duplicate_window > self.max_age {
            return bad("duplicate_window must not exceed max_age".to_string());
        }
        Ok(())
    }

    /// The stream configuration [`ensure_stream`] creates: subjects `<prefix>.>`, file storage,
    /// limits retention, discard old, `max_age`, `duplicate_window`, one replica.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            description: Some("CRM event log, relayed in global order by crm-eventlog".into()),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            max_age: self.max_age,
            duplicate_window: self.duplicate_window,
            max_messages: -1,
            max_bytes: -1,
            num_replicas: 1,
            ..Default::default()
        }
    }
}

/// Errors of the relay.
#[derive(thiserror::Error, Debug)]
pub enum RelayError {
    /// The [`RelaySettings`] are unusable, or the existing stream does not fit them.
    #[error("invalid relay settings: {0}")]
    InvalidSettings(String),
    /// Could not connect to NATS.
    #[error("NATS at {url} is unreachable: {message}")]
    Connect { url: String, message: String },
    /// A JetStream request (stream management, publish, ack) failed.
    #[error("JetStream: {0}")]
    JetStream(String),
    /// Reading the event log failed.
    #[error("event log: {0}")]
    Log(#[from] LogError),
    /// Reading or writing the checkpoint, or the lease connection, failed.
    #[error("relay checkpoint database: {0}")]
    Database(#[from] sqlx::Error),
    /// The lease connection stopped answering in time.
    #[error("relay lease connection timed out")]
    LeaseTimeout,
}

fn js_err(what: &str, e: impl std::fmt::Display) -> RelayError {
    RelayError::JetStream(format!("{what}: {e}"))
}

/// Errors decoding a bus message with [`decode_envelope`].
#[derive(thiserror::Error, Debug)]
pub enum EnvelopeError {
    #[error("not a crm.v1.EventEnvelope: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("envelope event_id is not a UUID: {0}")]
    EventId(#[from] uuid::Error),
    #[error("envelope {field} is not JSON: {source}")]
    Json {
        field: &'static str,
        source: serde_json::Error,
    },
    #[error("envelope recorded_at is not RFC 3339: {0}")]
    RecordedAt(#[from] chrono::ParseError),
}

/// Subject of an event: `<prefix>.<tenant>.<stream_type>.<stream_id>`. Each of the three ids
/// becomes one subject token: `.`, `*`, `>`, `%`, whitespace and control characters are
/// percent-encoded (`acme.eu` -> `acme%2Eeu`), an empty id becomes a lone `%` (which no
/// encoding makes: it writes `%` only before two hex digits; `%00` is the NUL character's).
/// UUIDs and plain names pass unchanged, and distinct ids always give distinct subjects.
pub fn subject(prefix: &str, event: &RecordedEvent) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        subject_token(&event.tenant_id),
        subject_token(&event.stream_type),
        subject_token(&event.stream_id)
    )
}

/// One NATS subject token for an arbitrary id (see [`subject`]).
pub fn subject_token(id: &str) -> String {
    if id.is_empty() {
        return "%".to_string();
    }
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        if matches!(c, '.' | '*' | '>' | '%') || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The bus message body of an event: protobuf `crm.v1.EventEnvelope` (see the module header).
pub fn envelope(event: &RecordedEvent) -> Bytes {
    to_envelope(event).encode_to_vec().into()
}

/// The protobuf envelope of an event, before encoding.
pub fn to_envelope(event: &RecordedEvent) -> EventEnvelope {
    EventEnvelope {
        global_position: event.position,
        event_id: event.event_id.to_string(),
        tenant_id: event.tenant_id.clone(),
        stream_type: event.stream_type.clone(),
        stream_id: event.stream_id.clone(),
        version: event.version,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        payload_json: event.payload.to_string(),
        metadata_json: event.metadata.to_string(),
        recorded_at: event
            .recorded_at
            .to_rfc3339_opts(SecondsFormat::Micros, true),
    }
}

/// Decodes a bus message body made by [`envelope`] back into a [`RecordedEvent`] (for
/// consumers). `prev_hash` and `hash` are `None`: the envelope does not carry them.
pub fn decode_envelope(bytes: &[u8]) -> Result<RecordedEvent, EnvelopeError> {
    let env = EventEnvelope::decode(bytes)?;
    let json = |field: &'static str, text: &str| {
        serde_json::from_str(text).map_err(|source| EnvelopeError::Json { field, source })
    };
    Ok(RecordedEvent {
        position: env.global_position,
        event_id: Uuid::parse_str(&env.event_id)?,
        payload: json("payload_json", &env.payload_json)?,
        metadata: json("metadata_json", &env.metadata_json)?,
        recorded_at: DateTime::parse_from_rfc3339(&env.recorded_at)?.with_timezone(&Utc),
        tenant_id: env.tenant_id,
        stream_type: env.stream_type,
        stream_id: env.stream_id,
        version: env.version,
        event_type: env.event_type,
        schema_version: env.schema_version,
        prev_hash: None,
        hash: None,
    })
}

/// Whether NATS subject `pattern` (with `*` / `>` wildcards) matches the literal `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pat = pattern.split('.');
    let mut sub = subject.split('.');
    loop {
        match (pat.next(), sub.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Creates the relay's stream if it is missing ([`RelaySettings::stream_config`]); an existing
/// stream is left as it is (operators own its limits) but must capture `<prefix>.>`.
/// Idempotent and safe to call concurrently. Returns the stream's info.
pub async fn ensure_stream(
    js: &Context,
    settings: &RelaySettings,
) -> Result<stream::Info, RelayError> {
    settings.validate()?;
    let stream = js
        .get_or_create_stream(settings.stream_config())
        .await
        .map_err(|e| js_err(&format!("creating stream {}", settings.stream), e))?;
    let info = stream.cached_info().clone();
    let probe = format!("{}.t.s.i", settings.subject_prefix);
    if !info
        .config
        .subjects
        .iter()
        .any(|p| subject_matches(p, &probe))
    {
        return Err(RelayError::InvalidSettings(format!(
            "stream {} exists with subjects {:?}, which do not capture {}.>",
            settings.stream, info.config.subjects, settings.subject_prefix
        )));
    }
    if info.config.duplicate_window < settings.duplicate_window {
        tracing::warn!(
            stream = %settings.stream,
            existing = ?info.config.duplicate_window,
            wanted = ?settings.duplicate_window,
            "existing JetStream stream has a shorter duplicate window than configured"
        );
    }
    Ok(info)
}

/// Advisory-lock key of the relay lease named `name` on PostgreSQL:
/// `LEASE_KEY_CLASS << 32 | fnv1a32(name)` (stable across versions and processes).
pub fn lease_key(name: &str) -> i64 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (LEASE_KEY_CLASS << 32) | i64::from(h)
}

/// The stored checkpoint of relay `name` (0 when it never saved one).
pub async fn load_checkpoint(log: &EventLog, name: &str) -> Result<i64, RelayError> {
    log.check_open()?;
    match Db::of(log) {
        Db::Sqlite(pool) => sqlite_load(&pool, name).await,
        Db::Postgres(pool) => {
            let mut conn = pool.acquire().await?;
            pg_load(&mut conn, name).await
        }
    }
}

/// Sets the checkpoint of relay `name` to exactly `position`, also backwards (an admin
/// operation, e.g. to re-publish after the stream lost data). Run it while no relay runs:
/// a running leader keeps its in-memory position and only ever raises the stored one.
pub async fn set_checkpoint(log: &EventLog, name: &str, position: i64) -> Result<(), RelayError> {
    log.check_open()?;
    match Db::of(log) {
        Db::Sqlite(pool) => sqlite_save(&pool, name, position, false).await,
        Db::Postgres(pool) => {
            let mut conn = pool.acquire().await?;
            pg_save(&mut conn, name, position, false).await
        }
    }
}

/// What a relay is doing, for health checks and tests (see [`Relay::status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// Holds the lease and publishes (always true on SQLite while running).
    pub leader: bool,
    /// Last saved checkpoint seen by this relay.
    pub checkpoint: i64,
    /// The checkpoint this relay resumed from when it last took the lease.
    pub resumed_from: i64,
    /// Events this relay got stored in the stream (acks that were not duplicates).
    pub published: u64,
    /// Re-publishes JetStream dropped as duplicates.
    pub duplicates: u64,
    /// The last error, cleared after the next successful batch.
    pub last_error: Option<String>,
}

/// The relay: tails the log from its checkpoint and publishes to JetStream (module header).
pub struct Relay {
    log: EventLog,
    settings: RelaySettings,
    client: Option<async_nats::Client>,
    status: watch::Sender<RelayStatus>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("settings", &self.settings)
            .field("connected", &self.client.is_some())
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Relay {
    /// Validates the settings, connects to NATS and ensures the stream exists. Fails fast when
    /// NATS is unreachable or has no JetStream (see [`Relay::new`] to start without NATS).
    pub async fn connect(log: EventLog, settings: RelaySettings) -> Result<Relay, RelayError> {
        let mut relay = Relay::new(log, settings)?;
        let client = connect_nats(&relay.settings).await?;
        ensure_stream(&async_nats::jetstream::new(client.clone()), &relay.settings).await?;
        relay.client = Some(client);
        Ok(relay)
    }

    /// Validates the settings without connecting: [`Relay::run`] connects to NATS, retrying
    /// with back-off, so a service can start while NATS is down.
    pub fn new(log: EventLog, settings: RelaySettings) -> Result<Relay, RelayError> {
        settings.validate()?;
        let (status, _) = watch::channel(RelayStatus::default());
        Ok(Relay {
            log,
            settings,
            client: None,
            status,
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    /// A watch of the relay's [`RelayStatus`]; stays readable after `run` returns.
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` becomes `true` (or its sender is dropped): takes the lease
    /// (PostgreSQL), publishes from the checkpoint, wakes on [`EventLog::subscribe`] or every
    /// `poll_interval`, and on errors backs off and resumes from the checkpoint. On shutdown it
    /// saves the checkpoint of what was acknowledged and releases the lease. Returns an error
    /// only when the log was closed.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), RelayError> {
        let db = Db::of(&self.log);
        let name = self.settings.checkpoint_name();
        let key = lease_key(&name);
        let labels = [("stream", self.settings.stream.clone())];
        let mut backoff = Backoff::new(self.settings.max_backoff);
        while !stopping(&shutdown) {
            let js = match self.jetstream().await {
                Ok(js) => js,
                Err(e) => {
                    self.failed(&e);
                    sleep_or_stop(backoff.next(), &mut shutdown).await;
                    continue;
                }
            };
            let mut lease = match Lease::acquire(&db, key).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    sleep_or_stop(self.settings.lease_retry, &mut shutdown).await;
                    continue;
                }
                Err(e) => {
                    self.failed(&e);
                    sleep_or_stop(backoff.next(), &mut shutdown).await;
                    continue;
                }
            };
            tracing::info!(relay = %name, "relay lease taken: publishing to JetStream");
            self.status.send_modify(|s| s.leader = true);
            metrics::gauge!("crm_relay_leader", &labels).set(1.0);
            let result = self
                .lead(&js, &mut lease, &name, &mut shutdown, &mut backoff)
                .await;
            lease.release().await;
            self.status.send_modify(|s| s.leader = false);
            metrics::gauge!("crm_relay_leader", &labels).set(0.0);
            match result {
                Ok(()) => {}
                Err(RelayError::Log(LogError::Closed)) => {
                    tracing::info!(relay = %name, "event log closed: relay stops");
                    return Err(RelayError::Log(LogError::Closed));
                }
                Err(e) => {
                    self.failed(&e);
                    tracing::info!(relay = %name, "relay lease released after error");
                    sleep_or_stop(backoff.next(), &mut shutdown).await;
                }
            }
        }
        tracing::info!(relay = %name, "relay stopped");
        Ok(())
    }

    async fn jetstream(&mut self) -> Result<Context, RelayError> {
        if self.client.is_none() {
            self.client = Some(connect_nats(&self.settings).await?);
        }
        match &self.client {
            Some(client) => Ok(async_nats::jetstream::new(client.clone())),
            None => Err(RelayError::JetStream("no NATS client".into())),
        }
    }

    fn failed(&self, e: &RelayError) {
        tracing::warn!(relay = %self.settings.checkpoint_name(), error = %e, "relay error; backing off");
        let msg = e.to_string();
        self.status.send_modify(|s| s.last_error = Some(msg));
    }

    /// The leader's loop; returns `Ok` on shutdown.
    async fn lead(
        &self,
        js: &Context,
        lease: &mut Lease,
        name: &str,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<(), RelayError> {
        let labels = [("stream", self.settings.stream.clone())];
        ensure_stream(js, &self.settings).await?;
        let mut checkpoint = lease.load(name).await?;
        tracing::info!(relay = %name, checkpoint, "relay resumes from its checkpoint");
        self.status.send_modify(|s| {
            s.checkpoint = checkpoint;
            s.resumed_from = checkpoint;
        });
        metrics::gauge!("crm_relay_position", &labels).set(checkpoint as f64);
        let mut head = self.log.subscribe();
        loop {
            if stopping(shutdown) {
                return Ok(());
            }
            // Mark the head as seen BEFORE reading, so a commit racing the read wakes us.
            head.borrow_and_update();
            let events = self.log.read_all(checkpoint, self.settings.batch).await?;
            if events.is_empty() {
                tokio::select! {
                    _ = head.changed() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            lease.check().await?;
            let mut acked = checkpoint;
            let mut outcome = Ok(());
            let (mut new, mut dups) = (0u64, 0u64);
            for event in &events {
                if stopping(shutdown) {
                    break;
                }
                match self.publish(js, event).await {
                    Ok(duplicate) => {
                        acked = event.position;
                        if duplicate {
                            dups += 1;
                        } else {
                            new += 1;
                        }
                    }
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            metrics::counter!("crm_relay_events_total", &labels).increment(new);
            metrics::counter!("crm_relay_duplicates_total", &labels).increment(dups);
            self.status.send_modify(|s| {
                s.published += new;
                s.duplicates += dups;
            });
            if acked > checkpoint {
                lease.save(name, acked).await?;
                checkpoint = acked;
                metrics::gauge!("crm_relay_position", &labels).set(checkpoint as f64);
                self.status.send_modify(|s| s.checkpoint = checkpoint);
            }
            outcome?;
            backoff.reset();
            if self.status.borrow().last_error.is_some() {
                self.status.send_modify(|s| s.last_error = None);
            }
        }
    }

    /// Publishes one event and waits for its ack; `Ok(true)` when JetStream reported it as a
    /// duplicate (already stored).
    async fn publish(&self, js: &Context, event: &RecordedEvent) -> Result<bool, RelayError> {
        let publish = Publish::build()
            .payload(envelope(event))
            .message_id(event.event_id.to_string())
            .expected_stream(&self.settings.stream)
            .header(POSITION_HEADER, event.position.to_string());
        let ack = js
            .send_publish(subject(&self.settings.subject_prefix, event), publish)
            .await
            .map_err(|e| js_err(&format!("publishing position {}", event.position), e))?
            .await
            .map_err(|e| js_err(&format!("ack of position {}", event.position), e))?;
        Ok(ack.duplicate)
    }
}

async fn connect_nats(settings: &RelaySettings) -> Result<async_nats::Client, RelayError> {
    async_nats::ConnectOptions::new()
        .name("crm-relay")
        .connection_timeout(Duration::from_secs(5))
        .connect(settings.nats_url.as_str())
        .await
        .map_err(|e| RelayError::Connect {
            url: settings.nats_url.clone(),
            message: e.to_string(),
        })
}

/// True once shutdown was requested or its sender is gone.
fn stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

async fn sleep_or_stop(delay: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.changed() => {}
    }
}

/// Exponential back-off with jitter, from [`MIN_BACKOFF`] up to a cap.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            next: MIN_BACKOFF.min(max),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to 25 % jitter so replicas do not retry in lockstep.
        let jitter_us = (Uuid::new_v4().as_u128() % (base.as_micros() / 4 + 1)) as u64;
        base + Duration::from_micros(jitter_us)
    }

    fn reset(&mut self) {
        self.next = MIN_BACKOFF.min(self.max);
    }
}

/// The database behind the log, as seen by the relay.
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Db {
    fn of(log: &EventLog) -> Db {
        match &log.inner.store {
            Store::Sqlite(s) => Db::Sqlite(s.read.clone()),
            Store::Postgres(s) => Db::Postgres(s.pool.clone()),
        }
    }
}

/// The right to publish. SQLite: always granted (one process). PostgreSQL: a session advisory
/// lock held on a dedicated connection, which also carries the checkpoint reads and writes.
enum Lease {
    Sqlite(SqlitePool),
    Postgres { conn: PgConnection, key: i64 },
}

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, RelayError> {
    match tokio::time::timeout(LEASE_IO_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RelayError::LeaseTimeout),
    }
}

impl Lease {
    async fn acquire(db: &Db, key: i64) -> Result<Option<Lease>, RelayError> {
        match db {
            Db::Sqlite(pool) => Ok(Some(Lease::Sqlite(pool.clone()))),
            Db::Postgres(pool) => {
                let opts: PgConnectOptions = (*pool.connect_options())
                    .clone()
                    .application_name("crm-relay");
                let mut conn = timed(PgConnection::connect_with(&opts)).await?;
                let got: bool = timed(
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(key)
                        .fetch_one(&mut conn),
                )
                .await?;
                if got {
                    Ok(Some(Lease::Postgres { conn, key }))
                } else {
                    drop(conn.close().await);
                    Ok(None)
                }
            }
        }
    }

    async fn load(&mut self, name: &str) -> Result<i64, RelayError> {
        match self {
            Lease::Sqlite(pool) => sqlite_load(pool, name).await,
            Lease::Postgres { conn, .. } => pg_load(conn, name).await,
        }
    }

    async fn save(&mut self, name: &str, position: i64) -> Result<(), RelayError> {
        match self {
            Lease::Sqlite(pool) => sqlite_save(pool, name, position, true).await,
            Lease::Postgres { conn, .. } => pg_save(conn, name, position, true).await,
        }
    }

    /// Fails when the lease connection is gone (PostgreSQL then released the lock).
    async fn check(&mut self) -> Result<(), RelayError> {
        match self {
            Lease::Sqlite(_) => Ok(()),
            Lease::Postgres { conn, .. } => timed(conn.ping()).await,
        }
    }

    async fn release(self) {
        if let Lease::Postgres { mut conn, key } = self {
            let unlock = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .fetch_one(&mut conn);
            if let Err(e) = timed(unlock).await {
                tracing::debug!(error = %e, "relay lease unlock (the session end releases it)");
            }
            // Closing the session releases the lock in any case.
            drop(tokio::time::timeout(LEASE_IO_TIMEOUT, conn.close()).await);
        }
    }
}

async fn sqlite_load(pool: &SqlitePool, name: &str) -> Result<i64, RelayError> {
    let pos: Option<i64> =
        sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE name = ?")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(pos.unwrap_or(0))
}

async fn sqlite_save(
    pool: &SqlitePool,
    name: &str,
    position: i64,
    forward_only: bool,
) -> Result<(), RelayError> {
    let sql = if forward_only {
        "INSERT INTO relay_checkpoints (name, position, updated_at) VALUES (?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET \
         position = MAX(relay_checkpoints.position, excluded.position), \
         updated_at = excluded.updated_at"
    } else {
        "INSERT INTO relay_checkpoints (name, position, updated_at) VALUES (?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, \
         updated_at = excluded.updated_at"
    };
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    sqlx::query(sql)
        .bind(name)
        .bind(position)
        .bind(now)
        .execute(pool)
        .await?;
    Ok(())
}

async fn pg_load(conn: &mut PgConnection, name: &str) -> Result<i64, RelayError> {
    let pos: Option<i64> = timed(
        sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *conn),
    )
    .await?;
    Ok(pos.unwrap_or(0))
}

async fn pg_save(
    conn: &mut PgConnection,
    name: &str,
    position: i64,
    forward_only: bool,
) -> Result<(), RelayError> {
    let sql = if forward_only {
        "INSERT INTO relay_checkpoints (name, position, updated_at) VALUES ($1, $2, now()) \
         ON CONFLICT (name) DO UPDATE SET \
         position = GREATEST(relay_checkpoints.position, EXCLUDED.position), updated_at = now()"
    } else {
        "INSERT INTO relay_checkpoints (name, position, updated_at) VALUES ($1, $2, now()) \
         ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now()"
    };
    timed(
        sqlx::query(sql)
            .bind(name)
            .bind(position)
            .execute(&mut *conn),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn event(tenant: &str, ty: &str, id: &str) -> RecordedEvent {
        RecordedEvent {
            position: 42,
            event_id: Uuid::now_v7(),
            tenant_id: tenant.into(),
            stream_type: ty.into(),
            stream_id: id.into(),
            version: 3,
            event_type: "OpportunityWon".into(),
            schema_version: 2,
            payload: json!({"amount": {"amount": "12.50", "currency": "EUR"}, "note": "ünï ✓"}),
            metadata: json!({"actor": "alice", "correlation_id": "c-1"}),
            recorded_at: DateTime::from_timestamp_micros(1_767_312_245_123_456).unwrap(),
            prev_hash: None,
            hash: None,
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = RelaySettings::default();
        assert_eq!(s.stream, "CRM_EVENTS");
        assert_eq!(s.subject_prefix, "crm");
        assert_eq!(s.duplicate_window, Duration::from_secs(120));
        assert_eq!(s.checkpoint_name(), "nats:CRM_EVENTS");
        s.validate().unwrap();
        let c = s.stream_config();
        assert_eq!(c.subjects, vec!["crm.>".to_string()]);
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.discard, DiscardPolicy::Old);
    }

    #[test]
    fn bad_settings_are_rejected() {
        let base = RelaySettings::default();
        for bad in [
            RelaySettings {
                stream: "A.B".into(),
                ..base.clone()
            },
            RelaySettings {
                stream: String::new(),
                ..base.clone()
            },
            RelaySettings {
                subject_prefix: "crm.*".into(),
                ..base.clone()
            },
            RelaySettings {
                subject_prefix: "crm..x".into(),
                ..base.clone()
            },
            RelaySettings {
                subject_prefix: "cr m".into(),
                ..base.clone()
            },
            RelaySettings {
                batch: 0,
                ..base.clone()
            },
            RelaySettings {
                poll_interval: Duration::ZERO,
                ..base.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(RelayError::InvalidSettings(_))),
                "{bad:?}"
            );
        }
        RelaySettings {
            subject_prefix: "crm.prod".into(),
            ..base
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn subjects_are_prefix_tenant_type_id() {
        let id = Uuid::now_v7().to_string();
        let e = event("default", "opportunity", &id);
        assert_eq!(subject("crm", &e), format!("crm.default.opportunity.{id}"));
        let e = event("acme.eu", "case", "a b*c>d%e\tf");
        assert_eq!(
            subject("crm", &e),
            "crm.acme%2Eeu.case.a%20b%2Ac%3Ed%25e%09f"
        );
        assert_eq!(subject("p", &event("", "x", "y")), "p.%.x.y");
        assert_eq!(subject("p", &event("\0", "x", "y")), "p.%00.x.y");
    }

    #[test]
    fn subject_patterns_match_like_nats() {
        assert!(subject_matches("crm.>", "crm.a.b.c"));
        assert!(subject_matches(">", "crm.a"));
        assert!(subject_matches("crm.*.*.*", "crm.a.b.c"));
        assert!(!subject_matches("crm.>", "crm"));
        assert!(!subject_matches("crm.*", "crm.a.b"));
        assert!(!subject_matches("other.>", "crm.a"));
    }

    #[test]
    fn envelope_round_trips() {
        let e = event("acme", "opportunity", "o-1");
        let back = decode_envelope(&envelope(&e)).unwrap();
        assert_eq!(back, e);
        let env = to_envelope(&e);
        assert_eq!(env.recorded_at, "2026-01-02T00:04:05.123456Z");
        assert_eq!(env.global_position, 42);
    }

    #[test]
    fn hashes_are_not_carried() {
        let mut e = event("acme", "lead", "l");
        e.prev_hash = Some(vec![1; 32]);
        e.hash = Some(vec![2; 32]);
        let back = decode_envelope(&envelope(&e)).unwrap();
        assert_eq!((back.prev_hash, back.hash), (None, None));
    }

    #[test]
    fn bad_envelopes_are_errors() {
        assert!(matches!(
            decode_envelope(&[0xff, 0xff, 0xff]),
            Err(EnvelopeError::Protobuf(_))
        ));
        let mut env = to_envelope(&event("a", "b", "c"));
        env.event_id = "nope".into();
        assert!(matches!(
            decode_envelope(&env.encode_to_vec()),
            Err(EnvelopeError::EventId(_))
        ));
        let mut env = to_envelope(&event("a", "b", "c"));
        env.payload_json = "{".into();
        assert!(matches!(
            decode_envelope(&env.encode_to_vec()),
            Err(EnvelopeError::Json {
                field: "payload_json",
                ..
            })
        ));
        let mut env = to_envelope(&event("a", "b", "c"));
        env.recorded_at = "yesterday".into();
        assert!(matches!(
            decode_envelope(&env.encode_to_vec()),
            Err(EnvelopeError::RecordedAt(_))
        ));
    }

    #[test]
    fn lease_keys_are_stable_and_distinct() {
        assert_eq!(lease_key("nats:CRM_EVENTS"), lease_key("nats:CRM_EVENTS"));
        assert_ne!(lease_key("nats:CRM_EVENTS"), lease_key("nats:OTHER"));
        assert_eq!(lease_key("x") >> 32, LEASE_KEY_CLASS);
        // Pinned: replicas of different builds must agree on the key.
        assert_eq!(lease_key(""), (LEASE_KEY_CLASS << 32) | 0x811c_9dc5);
    }

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let first = b.next();
        assert!(first >= MIN_BACKOFF && first <= MIN_BACKOFF * 5 / 4);
        for _ in 0..10 {
            b.next();
        }
        let capped = b.next();
        assert!(capped >= Duration::from_secs(2) && capped <= Duration::from_millis(2500));
        b.reset();
        assert!(b.next() <= MIN_BACKOFF * 5 / 4);
    }

    proptest! {
        #[test]
        fn subject_tokens_are_valid_and_injective(a in ".{0,12}", b in ".{0,12}") {
            for t in [subject_token(&a), subject_token(&b)] {
                prop_assert!(!t.is_empty());
                prop_assert!(!t.chars().any(|c| matches!(c, '.' | '*' | '>')
                    || c.is_whitespace() || c.is_control()));
            }
            if a != b {
                prop_assert_ne!(subject_token(&a), subject_token(&b));
            }
        }

        #[test]
        fn envelopes_round_trip(
            tenant in "[a-z.]{1,8}", id in ".{1,16}", ty in "[a-z]{1,8}",
            text in ".{0,32}", n in any::<i64>(), pos in 1i64..i64::MAX, version in 1i64..1_000_000,
        ) {
            let mut e = event(&tenant, &ty, &id);
            e.position = pos;
            e.version = version;
            e.payload = json!({"text": text, "n": n});
            prop_assert_eq!(decode_envelope(&envelope(&e)).unwrap(), e);
        }
    }
}
