//! The relay to NATS JetStream against a real NATS server (127.0.0.1:4222, or
//! `CRM_TEST_NATS_URL`) and both log backends (SQLite temp files, throwaway PostgreSQL
//! databases). Every test uses its own stream `CRM_EVENTS_<uuid>` and subject prefix
//! `crmtest<uuid>` and deletes the stream at the end, so tests run in parallel and leave
//! nothing behind. Without NATS a test skips loudly, or fails when `CI=true`.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::header::{HeaderName, IntoHeaderName, NATS_MESSAGE_ID};
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, Context};
use crm_eventlog::relay::{
    decode_envelope, ensure_stream, load_checkpoint, set_checkpoint, subject, Relay, RelayError,
    RelaySettings, RelayStatus, POSITION_HEADER,
};
use crm_eventlog::testing::{sqlite_temp, PgTestDb};
use crm_eventlog::*;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

fn nats_url() -> String {
    std::env::var("CRM_TEST_NATS_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string())
}

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// NATS with JetStream, or `None` (loud skip) when unreachable outside CI.
async fn nats() -> Option<Context> {
    let url = nats_url();
    let addr = url.trim_start_matches("nats://").to_string();
    let unavailable = |what: String| {
        if in_ci() {
            panic!("NATS at {addr} {what} (CI=true, not skipping)");
        }
        eprintln!(
            "\n!!!!! skipping: NATS at {addr} {what} !!!!!\n\
             !!!!! (set CI=true to make this a failure) !!!!!\n"
        );
    };
    let client = match async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(url.as_str())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            unavailable(format!("is unreachable: {e}"));
            return None;
        }
    };
    let js = jetstream::new(client);
    // JetStream answers "stream not found" for a name that does not exist; without JetStream
    // the request fails (no responders).
    let probe = format!("CRM_PROBE_{}", Uuid::new_v4().simple());
    match js.get_stream(&probe).await {
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(_)) => {}
        Ok(_) => {}
        Err(e) => {
            unavailable(format!("has no JetStream: {e}"));
            return None;
        }
    }
    Some(js)
}

/// One test's own stream and subject prefix; deleted by [`Bus::delete`] (or on drop).
struct Bus {
    js: Context,
    settings: RelaySettings,
    deleted: bool,
}

/// A message read back from the stream.
struct Received {
    subject: String,
    msg_id: String,
    position_header: String,
    sequence: u64,
    event: RecordedEvent,
}

impl Bus {
    fn new(js: Context) -> Bus {
        let id = Uuid::new_v4().simple();
        Bus {
            js,
            settings: RelaySettings {
                nats_url: nats_url(),
                stream: format!("CRM_EVENTS_{id}"),
                subject_prefix: format!("crmtest{id}"),
                batch: 50,
                poll_interval: Duration::from_millis(200),
                lease_retry: Duration::from_millis(200),
                max_backoff: Duration::from_secs(1),
                ..RelaySettings::default()
            },
            deleted: false,
        }
    }

    /// Messages in the stream (0 when it does not exist).
    async fn count(&self) -> u64 {
        match self.js.get_stream(&self.settings.stream).await {
            Ok(s) => s.cached_info().state.messages,
            Err(_) => 0,
        }
    }

    async fn wait_count(&self, n: u64) {
        let start = Instant::now();
        loop {
            let c = self.count().await;
            assert!(
                c <= n,
                "stream holds {c} messages, more than the {n} events"
            );
            if c == n {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "stream holds {c} of {n} events after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every message of the stream in stream order, through an ordered (ephemeral) consumer.
    async fn read_back(&self) -> Vec<Received> {
        let stream = self
            .js
            .get_stream(&self.settings.stream)
            .await
            .expect("stream exists");
        let n = stream.cached_info().state.messages;
        let consumer = stream
            .create_consumer(OrderedConfig::default())
            .await
            .expect("create ordered consumer");
        let mut messages = consumer.messages().await.expect("consume");
        let mut out = Vec::new();
        while (out.len() as u64) < n {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("next message in time")
                .expect("message stream open")
                .expect("message");
            let header = |name: HeaderName| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            out.push(Received {
                subject: m.subject.to_string(),
                msg_id: header(NATS_MESSAGE_ID),
                position_header: header(POSITION_HEADER.into_header_name()),
                sequence: m.info().expect("jetstream message info").stream_sequence,
                event: decode_envelope(&m.payload).expect("decode envelope"),
            });
        }
        out
    }

    /// The stream holds exactly the log's events after `after`, once each, in global order.
    async fn assert_matches_log(&self, log: &EventLog, after: i64) {
        let expected = log.read_all(after, 1_000_000).await.unwrap();
        let got = self.read_back().await;
        assert_eq!(
            got.len(),
            expected.len(),
            "the stream must hold every event exactly once"
        );
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.event.event_id, e.event_id,
                "message {i} (stream seq {}) is out of global order",
                g.sequence
            );
            assert_eq!(g.msg_id, e.event_id.to_string());
            assert_eq!(g.position_header, e.position.to_string());
            assert_eq!(g.subject, subject(&self.settings.subject_prefix, e));
            let mut e = e.clone();
            (e.prev_hash, e.hash) = (None, None);
            assert_eq!(g.event, e, "envelope round trip");
        }
    }

    async fn delete(mut self) {
        self.deleted = true;
        drop(self.js.delete_stream(&self.settings.stream).await);
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // A panicking test: delete the stream on a runtime of our own.
        let (url, stream) = (self.settings.nats_url.clone(), self.settings.stream.clone());
        let cleanup = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    if let Ok(client) = async_nats::connect(url.as_str()).await {
                        drop(jetstream::new(client).delete_stream(&stream).await);
                    }
                });
            }
        });
        let _ = cleanup.join();
    }
}

/// A relay running on its own task.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), RelayError>>,
    status: watch::Receiver<RelayStatus>,
}

impl Running {
    async fn start(log: &EventLog, settings: &RelaySettings) -> Running {
        let relay = Relay::connect(log.clone(), settings.clone())
            .await
            .expect("relay connects");
        let status = relay.status();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(relay.run(rx));
        Running { stop, task, status }
    }

    fn status(&self) -> RelayStatus {
        self.status.borrow().clone()
    }

    /// Graceful stop; returns the final status.
    async fn stop(self) -> RelayStatus {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("relay stops in time")
            .expect("relay task")
            .expect("relay ends cleanly");
        self.status.borrow().clone()
    }

    /// Simulated crash: the task is dropped mid-flight (no checkpoint save, no unlock).
    async fn crash(self) -> RelayStatus {
        self.task.abort();
        let _ = self.task.await;
        self.status.borrow().clone()
    }
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the relay's checkpoint reached the log head.
async fn wait_caught_up(log: &EventLog, relay: &Running) {
    let head = log.head_position().await.unwrap();
    wait_until("the relay checkpoint to reach the head", || async {
        relay.status().checkpoint >= head
    })
    .await;
}

const TENANTS: [&str; 2] = ["acme", "globex.eu"];
const TYPES: [&str; 3] = ["lead", "opportunity", "case"];

/// Appends `writers * per_writer` events from concurrent writers over several tenants, stream
/// types and streams (one or two events per batch).
async fn append_concurrently(logs: &[EventLog], writers: usize, per_writer: usize, tag: &str) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = logs[w % logs.len()].clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while i < per_writer {
                let n = if i % 3 == 0 && i + 1 < per_writer {
                    2
                } else {
                    1
                };
                let events = (0..n)
                    .map(|k| NewEvent {
                        event_id: Uuid::now_v7(),
                        event_type: "Tested".into(),
                        schema_version: 1,
                        payload: json!({"writer": w, "i": i + k, "text": "ünï ✓"}),
                        metadata: json!({"actor": "relay-test"}),
                    })
                    .collect();
                let batch = AppendBatch {
                    tenant_id: TENANTS[w % TENANTS.len()].to_string(),
                    streams: vec![StreamAppend {
                        stream_type: TYPES[w % TYPES.len()].to_string(),
                        stream_id: format!("{tag}-{w}-{}", i % 3),
                        expected_version: ExpectedVersion::Any,
                        events,
                    }],
                    idempotency: None,
                };
                log.append(batch).await.expect("append");
                i += n;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
}

async fn sqlite_log() -> (tempfile::TempDir, String, EventLog) {
    let (dir, url) = sqlite_temp();
    let log = EventLog::connect(&url).await.expect("open sqlite log");
    (dir, url, log)
}

async fn pg_log() -> Option<(PgTestDb, EventLog)> {
    let db = PgTestDb::create().await?;
    let log = EventLog::connect(&db.url).await.expect("open postgres log");
    Some((db, log))
}

// ---------------------------------------------------------------------------------------------
// Every event exactly once, in global order.

async fn every_event_once_in_global_order(bus: &Bus, log: &EventLog) {
    append_concurrently(std::slice::from_ref(log), 4, 25, "before").await;
    let relay = Running::start(log, &bus.settings).await;
    append_concurrently(std::slice::from_ref(log), 8, 25, "during").await;
    assert_eq!(log.head_position().await.unwrap(), 300);
    bus.wait_count(300).await;
    wait_caught_up(log, &relay).await;
    bus.assert_matches_log(log, 0).await;
    let status = relay.stop().await;
    assert_eq!(status.published, 300, "{status:?}");
    assert_eq!(status.duplicates, 0, "{status:?}");
    assert_eq!(status.checkpoint, 300);
    assert!(!status.leader, "a stopped relay gives up the lease");
    let name = bus.settings.checkpoint_name();
    assert_eq!(load_checkpoint(log, &name).await.unwrap(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_every_event_once_in_global_order() {
    let Some(js) = nats().await else { return };
    let bus = Bus::new(js);
    let (_dir, _url, log) = sqlite_log().await;
    every_event_once_in_global_order(&bus, &log).await;
    log.close().await;
    bus.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_every_event_once_in_global_order() {
    let Some(js) = nats().await else { return };
    let Some((db, log)) = pg_log().await else {
        return;
    };
    let bus = Bus::new(js);
    // Widen commit races: the relay must still see (and publish) in position order.
    log.set_pre_commit_delay(Duration::from_millis(3));
    every_event_once_in_global_order(&bus, &log).await;
    log.close().await;
    bus.delete().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// Restarts: a crash mid-publishing and a graceful restart neither duplicate nor reorder.

async fn restart_without_duplicates(bus: &Bus, log: &EventLog) {
    let logs = std::slice::from_ref(log);
    append_concurrently(logs, 6, 40, "first").await;
    let first = Running::start(log, &bus.settings).await;
    wait_until("part of the events to be published", || async {
        bus.count().await >= 60
    })
    .await;
    let crashed = first.crash().await;
    let stored = load_checkpoint(log, &bus.settings.checkpoint_name())
        .await
        .unwrap();
    let at_crash = bus.count().await;
    assert!(
        at_crash < 240,
        "the crash came mid-publishing ({at_crash} of 240)"
    );

    let second = Running::start(log, &bus.settings).await;
    append_concurrently(logs, 6, 10, "second").await;
    bus.wait_count(300).await;
    wait_caught_up(log, &second).await;
    bus.assert_matches_log(log, 0).await;
    let after = second.stop().await;
    // The restarted relay resumed at the stored checkpoint; whatever the crashed relay had
    // published beyond it came again and was dropped by Nats-Msg-Id.
    // (On PostgreSQL the crashed relay's last checkpoint write may still commit after the
    // crash, before its session ends and frees the lease: the stored value can only rise.)
    assert!(stored >= crashed.checkpoint, "{stored} {crashed:?}");
    assert!(after.resumed_from >= stored, "{stored} {after:?}");
    assert_eq!(
        after.published + after.duplicates,
        (300 - after.resumed_from) as u64,
        "crashed {crashed:?}, restarted {after:?}"
    );
    assert!(crashed.published + after.published <= 300);

    // A graceful restart resumes exactly at its checkpoint: no re-publish at all.
    let third = Running::start(log, &bus.settings).await;
    append_concurrently(logs, 2, 10, "third").await;
    bus.wait_count(320).await;
    wait_caught_up(log, &third).await;
    let status = third.stop().await;
    assert_eq!((status.published, status.duplicates), (20, 0), "{status:?}");
    bus.assert_matches_log(log, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_restart_after_partial_publish_keeps_order_without_duplicates() {
    let Some(js) = nats().await else { return };
    let bus = Bus::new(js);
    let (_dir, _url, log) = sqlite_log().await;
    restart_without_duplicates(&bus, &log).await;
    log.close().await;
    bus.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_after_partial_publish_keeps_order_without_duplicates() {
    let Some(js) = nats().await else { return };
    let Some((db, log)) = pg_log().await else {
        return;
    };
    let bus = Bus::new(js);
    restart_without_duplicates(&bus, &log).await;
    log.close().await;
    bus.delete().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// Two replicas on one PostgreSQL log: one publisher at a time (lease), takeover on stop and
// on crash.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_relays_publish_each_event_once_in_order() {
    let Some(js) = nats().await else { return };
    let Some((db, log_a)) = pg_log().await else {
        return;
    };
    let bus = Bus::new(js);
    // Two "replicas": separate log handles (pools, listeners) on the same database.
    let log_b = EventLog::connect(&db.url).await.expect("second replica");
    let logs = [log_a.clone(), log_b.clone()];
    let a = Running::start(&log_a, &bus.settings).await;
    let b = Running::start(&log_b, &bus.settings).await;
    append_concurrently(&logs, 10, 30, "both").await;
    bus.wait_count(300).await;
    wait_until("one relay to reach the head", || async {
        a.status().checkpoint >= 300 || b.status().checkpoint >= 300
    })
    .await;
    bus.assert_matches_log(&log_a, 0).await;
    let (sa, sb) = (a.status(), b.status());
    assert!(sa.leader ^ sb.leader, "exactly one leader: {sa:?} {sb:?}");
    let (leader, follower, follower_log) = if sa.leader {
        (a, b, &log_b)
    } else {
        (b, a, &log_a)
    };
    assert_eq!(
        (follower.status().published, follower.status().duplicates),
        (0, 0),
        "the follower published nothing"
    );
    assert_eq!(leader.status().published, 300);

    // Graceful stop of the leader: the follower takes over from the saved checkpoint.
    let old = leader.stop().await;
    assert_eq!((old.published, old.duplicates), (300, 0));
    wait_until("the follower to take the lease", || async {
        follower.status().leader
    })
    .await;
    append_concurrently(&logs, 4, 25, "takeover").await;
    bus.wait_count(400).await;
    wait_caught_up(follower_log, &follower).await;
    assert_eq!(
        (follower.status().published, follower.status().duplicates),
        (100, 0)
    );

    // Crash of the new leader while another replica waits: the lock dies with its session.
    let standby_log = if std::ptr::eq(follower_log, &log_a) {
        &log_b
    } else {
        &log_a
    };
    let standby = Running::start(standby_log, &bus.settings).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!standby.status().leader, "the lease is taken");
    let crashed = follower.crash().await;
    append_concurrently(&logs, 2, 25, "crash").await;
    wait_until("the standby to take over", || async {
        standby.status().leader
    })
    .await;
    bus.wait_count(450).await;
    wait_caught_up(standby_log, &standby).await;
    bus.assert_matches_log(&log_a, 0).await;
    let last = standby.stop().await;
    assert_eq!(last.published, 50, "{crashed:?} {last:?}");

    log_b.close().await;
    log_a.close().await;
    bus.delete().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// The checkpoint is durable: a reopened log resumes where the relay stopped; moving it back
// re-publishes, and JetStream drops those as duplicates.

async fn checkpoint_persists(
    bus: &Bus,
    reopen: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = EventLog>>>,
) {
    let name = bus.settings.checkpoint_name();
    let log = reopen().await;
    assert_eq!(load_checkpoint(&log, &name).await.unwrap(), 0);
    append_concurrently(std::slice::from_ref(&log), 4, 30, "persist").await;
    let relay = Running::start(&log, &bus.settings).await;
    bus.wait_count(120).await;
    wait_caught_up(&log, &relay).await;
    relay.stop().await;
    log.close().await;

    let log = reopen().await;
    assert_eq!(load_checkpoint(&log, &name).await.unwrap(), 120);
    let relay = Running::start(&log, &bus.settings).await;
    wait_until("the relay to load its checkpoint", || async {
        relay.status().checkpoint == 120
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a few poll intervals
    let status = relay.stop().await;
    assert_eq!((status.published, status.duplicates), (0, 0), "{status:?}");
    assert_eq!(bus.count().await, 120);

    // As after a crash between the acks and the checkpoint save.
    set_checkpoint(&log, &name, 60).await.unwrap();
    assert_eq!(load_checkpoint(&log, &name).await.unwrap(), 60);
    let relay = Running::start(&log, &bus.settings).await;
    wait_caught_up(&log, &relay).await;
    let status = relay.stop().await;
    assert_eq!((status.published, status.duplicates), (0, 60), "{status:?}");
    bus.assert_matches_log(&log, 0).await;
    assert_eq!(load_checkpoint(&log, &name).await.unwrap(), 120);
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_checkpoint_persists_across_restarts() {
    let Some(js) = nats().await else { return };
    let bus = Bus::new(js);
    let (_dir, url) = sqlite_temp();
    checkpoint_persists(&bus, || {
        let url = url.clone();
        Box::pin(async move { EventLog::connect(&url).await.expect("open sqlite log") })
    })
    .await;
    bus.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_checkpoint_persists_across_restarts() {
    let Some(js) = nats().await else { return };
    let Some(db) = PgTestDb::create().await else {
        return;
    };
    let bus = Bus::new(js);
    checkpoint_persists(&bus, || {
        let url = db.url.clone();
        Box::pin(async move { EventLog::connect(&url).await.expect("open postgres log") })
    })
    .await;
    bus.delete().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// Stream management and NATS failures.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ensure_stream_is_idempotent() {
    let Some(js) = nats().await else { return };
    let bus = Bus::new(js.clone());
    let s = &bus.settings;
    let first = ensure_stream(&js, s).await.expect("create");
    let again = ensure_stream(&js, s).await.expect("exists");
    assert_eq!(first.created, again.created, "not re-created");
    let concurrent = futures::future::join_all((0..4).map(|_| ensure_stream(&js, s))).await;
    for r in concurrent {
        assert_eq!(r.expect("concurrent ensure").created, first.created);
    }
    let c = &again.config;
    assert_eq!(c.subjects, vec![format!("{}.>", s.subject_prefix)]);
    assert_eq!(c.duplicate_window, s.duplicate_window);
    assert_eq!(c.max_age, s.max_age);
    assert_eq!(c.storage, jetstream::stream::StorageType::File);
    assert_eq!(c.discard, jetstream::stream::DiscardPolicy::Old);
    assert_eq!(bus.count().await, 0);

    // An existing stream that does not capture the prefix is refused, not used.
    let other = Bus::new(js.clone());
    js.create_stream(jetstream::stream::Config {
        name: other.settings.stream.clone(),
        subjects: vec![format!("{}.elsewhere", other.settings.subject_prefix)],
        ..Default::default()
    })
    .await
    .expect("create foreign stream");
    let err = ensure_stream(&js, &other.settings).await.unwrap_err();
    assert!(matches!(err, RelayError::InvalidSettings(_)), "{err}");
    other.delete().await;
    bus.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_recovers_when_the_stream_disappears() {
    let Some(js) = nats().await else { return };
    let bus = Bus::new(js.clone());
    let (_dir, _url, log) = sqlite_log().await;
    let relay = Running::start(&log, &bus.settings).await;
    append_concurrently(std::slice::from_ref(&log), 3, 10, "before").await;
    bus.wait_count(30).await;
    wait_caught_up(&log, &relay).await;
    js.delete_stream(&bus.settings.stream)
        .await
        .expect("delete stream");
    append_concurrently(std::slice::from_ref(&log), 3, 10, "after").await;
    // Publishing fails, the relay backs off, re-creates the stream and resumes from its
    // checkpoint: the new stream holds the events after it.
    bus.wait_count(30).await;
    wait_caught_up(&log, &relay).await;
    bus.assert_matches_log(&log, 30).await;
    let status = relay.stop().await;
    assert_eq!(status.published, 60);
    log.close().await;
    bus.delete().await;
}

#[tokio::test]
async fn connect_fails_fast_and_new_retries_when_nats_is_unreachable() {
    let (_dir, _url, log) = sqlite_log().await;
    let settings = RelaySettings {
        nats_url: "nats://127.0.0.1:1".into(),
        max_backoff: Duration::from_millis(300),
        ..RelaySettings::default()
    };
    let err = Relay::connect(log.clone(), settings.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, RelayError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");

    // `new` starts without NATS; `run` keeps retrying and still stops on request.
    let relay = Relay::new(log.clone(), settings).expect("valid settings");
    let mut status = relay.status();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(relay.run(rx));
    tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("an error is reported")
        .expect("status");
    assert!(!status.borrow().leader);
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops while retrying")
        .expect("task")
        .expect("clean stop");
    log.close().await;
}

#[tokio::test]
async fn invalid_settings_are_refused() {
    let (_dir, _url, log) = sqlite_log().await;
    let err = Relay::new(
        log.clone(),
        RelaySettings {
            subject_prefix: "crm.>".into(),
            ..RelaySettings::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, RelayError::InvalidSettings(_)), "{err}");
    log.close().await;
}
