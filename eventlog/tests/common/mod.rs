//! Backend-independent test cases: every `pub async fn case(&EventLog)` listed in
//! `for_each_case!` runs against SQLite (tests/sqlite.rs) and PostgreSQL (tests/postgres.rs).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, DomainEvent, EventStore};
use crm_eventlog::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

pub const T: &str = "acme";

#[macro_export]
macro_rules! for_each_case {
    ($m:ident) => {
        $m!(
            append_and_read_stream,
            conflict_writes_nothing,
            no_stream_on_existing_stream_conflicts,
            multi_stream_batch_is_atomic,
            multi_stream_batch_commits_all,
            idempotent_retry_returns_duplicate,
            concurrent_idempotent_retries_append_once,
            read_all_positions_contiguous,
            read_by_stream_pages_stream_by_stream_up_to_a_head,
            subscribe_sees_head_move,
            snapshots_newest_wins,
            json_round_trip_unicode,
            recorded_at_is_set,
            empty_append_rejected,
            group_commit_200_concurrent_streams,
            one_stream_50_concurrent_writers_with_retry,
            tenants_are_isolated,
            closed_log_rejects_calls,
            cqrs_event_store_persists,
            cqrs_snapshot_store_persists,
            cqrs_conflict_is_aggregate_conflict,
            cqrs_replay_streams,
        );
    };
}

pub fn ev(event_type: &str, payload: Value) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_string(),
        schema_version: 1,
        payload,
        metadata: json!({"actor": "tester"}),
    }
}

pub fn stream(ty: &str, id: &str, expected: ExpectedVersion, n: usize) -> StreamAppend {
    StreamAppend {
        stream_type: ty.to_string(),
        stream_id: id.to_string(),
        expected_version: expected,
        events: (0..n).map(|i| ev("Happened", json!({ "i": i }))).collect(),
    }
}

pub fn batch(streams: Vec<StreamAppend>) -> AppendBatch {
    AppendBatch {
        tenant_id: T.to_string(),
        streams,
        idempotency: None,
    }
}

pub fn committed(o: AppendOutcome) -> Committed {
    match o {
        AppendOutcome::Committed(c) => c,
        AppendOutcome::Duplicate(d) => panic!("expected Committed, got Duplicate({d:?})"),
    }
}

pub fn duplicate(o: AppendOutcome) -> IdempotencyRecord {
    match o {
        AppendOutcome::Duplicate(d) => d,
        other => panic!("expected Duplicate, got {other:?}"),
    }
}

pub async fn append_and_read_stream(log: &EventLog) {
    let c = committed(
        log.append(batch(vec![stream(
            "lead",
            "l1",
            ExpectedVersion::NoStream,
            3,
        )]))
        .await
        .unwrap(),
    );
    assert_eq!(c.streams.len(), 1);
    assert_eq!(
        (c.streams[0].first_version, c.streams[0].last_version),
        (1, 3)
    );
    assert_eq!(c.last_position - c.first_position, 2);
    assert_eq!(c.streams[0].last_position, c.last_position);
    let c2 = committed(
        log.append(batch(vec![stream(
            "lead",
            "l1",
            ExpectedVersion::Exact(3),
            2,
        )]))
        .await
        .unwrap(),
    );
    assert_eq!(
        (c2.streams[0].first_version, c2.streams[0].last_version),
        (4, 5)
    );
    assert!(c2.first_position > c.last_position);

    let all = log.read_stream(T, "lead", "l1", 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(all
        .iter()
        .all(|e| e.tenant_id == T && e.stream_type == "lead" && e.stream_id == "l1"));
    assert_eq!(all[0].payload, json!({"i": 0}));
    let tail = log.read_stream(T, "lead", "l1", 3, 100).await.unwrap();
    assert_eq!(
        tail.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![4, 5]
    );
    let limited = log.read_stream(T, "lead", "l1", 0, 2).await.unwrap();
    assert_eq!(limited.len(), 2);
    assert_eq!(log.stream_version(T, "lead", "l1").await.unwrap(), 5);
    assert_eq!(log.stream_version(T, "lead", "nope").await.unwrap(), 0);
    assert!(log
        .read_stream(T, "lead", "nope", 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(log.head_position().await.unwrap(), c2.last_position);
    // Any appends regardless of version.
    let c3 = committed(
        log.append(batch(vec![stream("lead", "l1", ExpectedVersion::Any, 1)]))
            .await
            .unwrap(),
    );
    assert_eq!(c3.streams[0].last_version, 6);
}

pub async fn conflict_writes_nothing(log: &EventLog) {
    log.append(batch(vec![stream(
        "account",
        "a1",
        ExpectedVersion::NoStream,
        2,
    )]))
    .await
    .unwrap();
    let head = log.head_position().await.unwrap();
    let err = log
        .append(batch(vec![stream(
            "account",
            "a1",
            ExpectedVersion::Exact(1),
            3,
        )]))
        .await
        .unwrap_err();
    match err {
        LogError::Conflict {
            stream_type,
            stream_id,
            expected,
            actual,
        } => {
            assert_eq!(
                (stream_type.as_str(), stream_id.as_str()),
                ("account", "a1")
            );
            assert_eq!((expected, actual), (1, 2));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(log.stream_version(T, "account", "a1").await.unwrap(), 2);
    assert_eq!(
        log.read_stream(T, "account", "a1", 0, 100)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(log.head_position().await.unwrap(), head);
    assert_eq!(log.read_all(head, 100).await.unwrap().len(), 0);
    // Exact on a missing stream conflicts with actual 0.
    let err = log
        .append(batch(vec![stream(
            "account",
            "missing",
            ExpectedVersion::Exact(4),
            1,
        )]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogError::Conflict {
                expected: 4,
                actual: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        log.stream_version(T, "account", "missing").await.unwrap(),
        0
    );
    // The next successful append continues right after the old head (no hole).
    let c = committed(
        log.append(batch(vec![stream(
            "account",
            "a1",
            ExpectedVersion::Exact(2),
            1,
        )]))
        .await
        .unwrap(),
    );
    assert_eq!(c.first_position, head + 1);
}

pub async fn no_stream_on_existing_stream_conflicts(log: &EventLog) {
    log.append(batch(vec![stream(
        "contact",
        "c1",
        ExpectedVersion::NoStream,
        1,
    )]))
    .await
    .unwrap();
    let head = log.head_position().await.unwrap();
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(0)] {
        let err = log
            .append(batch(vec![stream("contact", "c1", expected, 1)]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                LogError::Conflict {
                    expected: 0,
                    actual: 1,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(log.stream_version(T, "contact", "c1").await.unwrap(), 1);
    assert_eq!(log.head_position().await.unwrap(), head);
}

pub async fn multi_stream_batch_is_atomic(log: &EventLog) {
    log.append(batch(vec![stream(
        "account",
        "acc",
        ExpectedVersion::NoStream,
        1,
    )]))
    .await
    .unwrap();
    let head = log.head_position().await.unwrap();
    // First stream fine, second conflicts -> nothing written.
    let err = log
        .append(batch(vec![
            stream("lead", "conv", ExpectedVersion::NoStream, 2),
            stream("account", "acc", ExpectedVersion::NoStream, 1),
            stream("contact", "ct", ExpectedVersion::NoStream, 1),
        ]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LogError::Conflict { stream_type, stream_id, expected: 0, actual: 1 }
            if stream_type == "account" && stream_id == "acc"),
        "{err:?}"
    );
    assert_eq!(log.stream_version(T, "lead", "conv").await.unwrap(), 0);
    assert!(log
        .read_stream(T, "lead", "conv", 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(log.stream_version(T, "contact", "ct").await.unwrap(), 0);
    assert_eq!(log.head_position().await.unwrap(), head);
    assert!(log.read_all(head, 10).await.unwrap().is_empty());
}

pub async fn multi_stream_batch_commits_all(log: &EventLog) {
    let c = committed(
        log.append(AppendBatch {
            tenant_id: T.to_string(),
            streams: vec![
                stream("lead", "L", ExpectedVersion::NoStream, 1),
                stream("account", "A", ExpectedVersion::NoStream, 2),
                stream("contact", "C", ExpectedVersion::NoStream, 1),
                stream("opportunity", "O", ExpectedVersion::NoStream, 1),
            ],
            idempotency: Some(NewIdempotencyRecord {
                key: "convert-1".into(),
                request_hash: "h".into(),
                status: 200,
            }),
        })
        .await
        .unwrap(),
    );
    assert_eq!(c.streams.len(), 4);
    assert_eq!(c.last_position - c.first_position + 1, 5);
    let kinds: Vec<_> = c.streams.iter().map(|s| s.stream_type.as_str()).collect();
    assert_eq!(kinds, ["lead", "account", "contact", "opportunity"]);
    assert_eq!(c.streams[0].last_position, c.first_position);
    assert_eq!(c.streams[1].last_position, c.first_position + 2);
    assert_eq!(c.streams[3].last_position, c.last_position);
    let all = log.read_all(c.first_position - 1, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].stream_type, "lead");
    assert_eq!(
        (all[1].stream_type.as_str(), all[1].version),
        ("account", 1)
    );
    assert_eq!(
        (all[2].stream_type.as_str(), all[2].version),
        ("account", 2)
    );
    assert!(all.iter().all(|e| e.recorded_at == c.recorded_at));
    let rec = log
        .idempotency_record(T, "convert-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (rec.stream_type.as_str(), rec.stream_id.as_str()),
        ("lead", "L")
    );
    assert_eq!((rec.version, rec.position), (1, c.first_position));
}

pub async fn idempotent_retry_returns_duplicate(log: &EventLog) {
    let mk = |hash: &str| AppendBatch {
        tenant_id: T.to_string(),
        streams: vec![stream("case", "k1", ExpectedVersion::Any, 2)],
        idempotency: Some(NewIdempotencyRecord {
            key: "key-1".into(),
            request_hash: hash.into(),
            status: 201,
        }),
    };
    let c = committed(log.append(mk("hash-a")).await.unwrap());
    let head = log.head_position().await.unwrap();
    let rec = log
        .idempotency_record(T, "key-1")
        .await
        .unwrap()
        .expect("record stored");
    assert_eq!(rec.key, "key-1");
    assert_eq!(rec.request_hash, "hash-a");
    assert_eq!(rec.status, 201);
    assert_eq!(
        (rec.stream_type.as_str(), rec.stream_id.as_str()),
        ("case", "k1")
    );
    assert_eq!(rec.version, 2);
    assert_eq!(rec.position, c.last_position);
    // Retry (even with a different body hash: the caller compares hashes) writes nothing.
    for hash in ["hash-a", "hash-b"] {
        match log.append(mk(hash)).await.unwrap() {
            AppendOutcome::Duplicate(d) => assert_eq!(d, rec),
            other => panic!("expected Duplicate, got {other:?}"),
        }
    }
    assert_eq!(log.stream_version(T, "case", "k1").await.unwrap(), 2);
    assert_eq!(log.head_position().await.unwrap(), head);
    assert!(log.idempotency_record(T, "other").await.unwrap().is_none());
    assert!(log
        .idempotency_record("other-tenant", "key-1")
        .await
        .unwrap()
        .is_none());
}

pub async fn concurrent_idempotent_retries_append_once(log: &EventLog) {
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(AppendBatch {
                tenant_id: T.to_string(),
                streams: vec![stream("lead", "idem", ExpectedVersion::NoStream, 1)],
                idempotency: Some(NewIdempotencyRecord {
                    key: "same-key".into(),
                    request_hash: "h".into(),
                    status: 201,
                }),
            })
            .await
        }));
    }
    let mut committed_n = 0;
    let mut dups = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            AppendOutcome::Committed(_) => committed_n += 1,
            AppendOutcome::Duplicate(d) => dups.push(d),
        }
    }
    assert_eq!(committed_n, 1);
    assert_eq!(dups.len(), 9);
    assert!(dups.iter().all(|d| d.version == 1 && d.position >= 1));
    assert_eq!(
        log.read_stream(T, "lead", "idem", 0, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(log.stream_version(T, "lead", "idem").await.unwrap(), 1);
}

pub async fn read_all_positions_contiguous(log: &EventLog) {
    let start = log.head_position().await.unwrap();
    let mut expected_total = 0;
    for i in 0..30 {
        let n = 1 + i % 3;
        expected_total += n;
        log.append(batch(vec![stream(
            "opportunity",
            &format!("o{}", i % 4),
            ExpectedVersion::Any,
            n,
        )]))
        .await
        .unwrap();
    }
    // Page through with a small limit.
    let mut after = start;
    let mut seen = Vec::new();
    loop {
        let page = log.read_all(after, 7).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        for e in &page {
            assert_eq!(e.position, after + 1, "positions must be contiguous");
            after = e.position;
        }
        seen.extend(page);
    }
    assert_eq!(seen.len(), expected_total);
    assert_eq!(after, log.head_position().await.unwrap());
    let ids: HashSet<_> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), seen.len());
    // Per-stream versions are contiguous too.
    let mut per: HashMap<&str, i64> = HashMap::new();
    for e in &seen {
        let v = per.entry(e.stream_id.as_str()).or_insert(0);
        assert_eq!(e.version, *v + 1);
        *v = e.version;
    }
    assert!(log.read_all(after, 10).await.unwrap().is_empty());
    assert!(log.read_all(start, 0).await.unwrap().is_empty());
}

pub async fn read_by_stream_pages_stream_by_stream_up_to_a_head(log: &EventLog) {
    let start = log.head_position().await.unwrap();
    // Interleaved in the log: two stream types, three ids, two tenants.
    for i in 0..12 {
        let stream_type = if i % 2 == 0 { "opportunity" } else { "case" };
        let mut b = batch(vec![stream(
            stream_type,
            &format!("s{}", i % 3),
            ExpectedVersion::Any,
            1 + i % 2,
        )]);
        if i % 5 == 4 {
            b.tenant_id = "globex".into();
        }
        log.append(b).await.unwrap();
    }
    let head = log.head_position().await.unwrap();
    // Appended after the head the read is bounded by: not part of it.
    log.append(batch(vec![stream("case", "s0", ExpectedVersion::Any, 2)]))
        .await
        .unwrap();
    let mut cursor = None;
    let mut seen = Vec::new();
    loop {
        let page = log.read_by_stream(head, cursor.as_ref(), 4).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        cursor = Some(StreamCursor::after(last));
        seen.extend(page);
    }
    seen.retain(|e| e.position > start);
    let mut expected = log.read_all(start, 1000).await.unwrap();
    expected.retain(|e| e.position <= head);
    let in_log_order: Vec<i64> = expected.iter().map(|e| e.position).collect();
    expected.sort_by(|a, b| {
        (&a.tenant_id, &a.stream_type, &a.stream_id, a.version).cmp(&(
            &b.tenant_id,
            &b.stream_type,
            &b.stream_id,
            b.version,
        ))
    });
    assert_eq!(
        seen, expected,
        "every event up to the head, stream by stream"
    );
    let read_order: Vec<i64> = seen.iter().map(|e| e.position).collect();
    assert_ne!(read_order, in_log_order, "not the log's order");
    assert_eq!(expected.len(), 18);
}

pub async fn subscribe_sees_head_move(log: &EventLog) {
    let mut rx = log.subscribe();
    let before = *rx.borrow_and_update();
    assert_eq!(before, log.head_position().await.unwrap());
    let c = committed(
        log.append(batch(vec![stream("lead", "sub", ExpectedVersion::Any, 2)]))
            .await
            .unwrap(),
    );
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|h| *h >= c.last_position),
    )
    .await
    .expect("head watch moved")
    .unwrap();
    assert_eq!(*log.subscribe().borrow(), c.last_position);
    // A clone shares the same watch.
    let mut rx2 = log.clone().subscribe();
    rx2.borrow_and_update();
    let c2 = committed(
        log.append(batch(vec![stream("lead", "sub", ExpectedVersion::Any, 1)]))
            .await
            .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(5), rx2.changed())
        .await
        .expect("watch notified")
        .unwrap();
    assert!(*rx2.borrow() >= c2.last_position);
}

pub async fn snapshots_newest_wins(log: &EventLog) {
    assert!(log
        .load_snapshot(T, "account", "s1")
        .await
        .unwrap()
        .is_none());
    let snap = |v: i64| Snapshot {
        version: v,
        state: json!({"v": v, "name": "Ácme"}),
    };
    log.save_snapshot(T, "account", "s1", snap(5))
        .await
        .unwrap();
    assert_eq!(
        log.load_snapshot(T, "account", "s1").await.unwrap(),
        Some(snap(5))
    );
    log.save_snapshot(T, "account", "s1", snap(3))
        .await
        .unwrap();
    assert_eq!(
        log.load_snapshot(T, "account", "s1").await.unwrap(),
        Some(snap(5)),
        "older snapshot must not replace a newer one"
    );
    log.save_snapshot(T, "account", "s1", snap(9))
        .await
        .unwrap();
    assert_eq!(
        log.load_snapshot(T, "account", "s1").await.unwrap(),
        Some(snap(9))
    );
    assert!(log
        .load_snapshot(T, "account", "s2")
        .await
        .unwrap()
        .is_none());
    assert!(log
        .load_snapshot("t2", "account", "s1")
        .await
        .unwrap()
        .is_none());
}

pub async fn json_round_trip_unicode(log: &EventLog) {
    let payload = json!({
        "name": "Trần Văn B — 北京 🚀 \"quoted\" \\ back\nslash",
        "amount": {"amount": "12000.00", "currency": "VND"},
        "nested": [1, 2.5, -3, null, true, {"k": []}],
        "big": 9_007_199_254_740_993_i64,
        "empty": {}
    });
    let metadata = json!({
        "actor": "người dùng", "roles": ["sales", "admin"], "correlation_id": Uuid::now_v7().to_string()
    });
    let event_id = Uuid::now_v7();
    let c = committed(
        log.append(batch(vec![StreamAppend {
            stream_type: "contact".into(),
            stream_id: "ü-1".into(),
            expected_version: ExpectedVersion::NoStream,
            events: vec![NewEvent {
                event_id,
                event_type: "ContactRenamed".into(),
                schema_version: 3,
                payload: payload.clone(),
                metadata: metadata.clone(),
            }],
        }]))
        .await
        .unwrap(),
    );
    for e in [
        log.read_stream(T, "contact", "ü-1", 0, 10)
            .await
            .unwrap()
            .remove(0),
        log.read_all(c.first_position - 1, 1)
            .await
            .unwrap()
            .remove(0),
    ] {
        assert_eq!(e.payload, payload);
        assert_eq!(e.metadata, metadata);
        assert_eq!(e.event_id, event_id);
        assert_eq!(e.event_type, "ContactRenamed");
        assert_eq!(e.schema_version, 3);
        assert_eq!(e.position, c.first_position);
        assert_eq!(e.prev_hash, None);
        assert_eq!(e.hash, None);
        // Serialises without hash fields when absent.
        let v = serde_json::to_value(&e).unwrap();
        assert!(v.get("hash").is_none() && v.get("prev_hash").is_none());
        assert_eq!(v["payload"], payload);
    }
    // Duplicate event ids are rejected and nothing is written.
    let head = log.head_position().await.unwrap();
    let mut dup = ev("X", json!({}));
    dup.event_id = event_id;
    let err = log
        .append(batch(vec![StreamAppend {
            stream_type: "contact".into(),
            stream_id: "other".into(),
            expected_version: ExpectedVersion::Any,
            events: vec![dup],
        }]))
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::Database(_)), "{err:?}");
    assert_eq!(log.head_position().await.unwrap(), head);
    assert_eq!(log.stream_version(T, "contact", "other").await.unwrap(), 0);
}

pub async fn recorded_at_is_set(log: &EventLog) {
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let c = committed(
        log.append(batch(vec![stream("case", "r", ExpectedVersion::Any, 2)]))
            .await
            .unwrap(),
    );
    let after = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert!(c.recorded_at > before && c.recorded_at < after);
    assert_eq!(
        c.recorded_at.timestamp_subsec_nanos() % 1000,
        0,
        "microsecond precision"
    );
    let evs = log.read_stream(T, "case", "r", 0, 10).await.unwrap();
    for e in evs {
        assert_eq!(
            e.recorded_at, c.recorded_at,
            "stored recorded_at round-trips exactly"
        );
    }
}

pub async fn empty_append_rejected(log: &EventLog) {
    let err = log.append(batch(vec![])).await.unwrap_err();
    assert!(matches!(err, LogError::EmptyAppend), "{err:?}");
    let err = log
        .append(batch(vec![stream("lead", "e", ExpectedVersion::Any, 0)]))
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::EmptyAppend), "{err:?}");
    assert_eq!(log.head_position().await.unwrap(), 0);
}

pub async fn group_commit_200_concurrent_streams(log: &EventLog) {
    let start = log.head_position().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(batch(vec![stream(
                "lead",
                &format!("g{i}"),
                ExpectedVersion::NoStream,
                1,
            )]))
            .await
        }));
    }
    let mut positions = HashSet::new();
    for t in tasks {
        let c = committed(t.await.unwrap().unwrap());
        assert_eq!(c.first_position, c.last_position);
        assert!(
            positions.insert(c.last_position),
            "positions must be distinct"
        );
    }
    assert_eq!(positions.len(), 200);
    assert_eq!(log.head_position().await.unwrap(), start + 200);
    let expected: HashSet<i64> = (start + 1..=start + 200).collect();
    assert_eq!(positions, expected);
    let all = log.read_all(start, 1000).await.unwrap();
    assert_eq!(all.len(), 200);
    for i in 0..200 {
        assert_eq!(
            log.stream_version(T, "lead", &format!("g{i}"))
                .await
                .unwrap(),
            1
        );
    }
}

pub async fn one_stream_50_concurrent_writers_with_retry(log: &EventLog) {
    let mut tasks = Vec::new();
    for w in 0..50 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0;
            loop {
                attempts += 1;
                assert!(attempts < 10_000, "writer {w} starved");
                let v = log.stream_version(T, "opportunity", "hot").await.unwrap();
                let mut s = stream("opportunity", "hot", ExpectedVersion::Exact(v), 1);
                s.events[0].payload = json!({ "writer": w });
                match log.append(batch(vec![s])).await {
                    Ok(o) => return committed(o).streams[0].last_version,
                    Err(LogError::Conflict { .. }) => tokio::task::yield_now().await,
                    Err(e) => panic!("writer {w}: {e}"),
                }
            }
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=50).collect::<Vec<i64>>());
    let evs = log
        .read_stream(T, "opportunity", "hot", 0, 1000)
        .await
        .unwrap();
    assert_eq!(
        evs.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<i64>>()
    );
    let writers: HashSet<i64> = evs
        .iter()
        .map(|e| e.payload["writer"].as_i64().unwrap())
        .collect();
    assert_eq!(
        writers.len(),
        50,
        "every writer's event is present exactly once"
    );
}

pub async fn tenants_are_isolated(log: &EventLog) {
    log.append(batch(vec![stream(
        "lead",
        "same",
        ExpectedVersion::NoStream,
        1,
    )]))
    .await
    .unwrap();
    let mut b = batch(vec![stream("lead", "same", ExpectedVersion::NoStream, 1)]);
    b.tenant_id = "globex".into();
    log.append(b).await.unwrap();
    assert_eq!(log.stream_version(T, "lead", "same").await.unwrap(), 1);
    assert_eq!(
        log.stream_version("globex", "lead", "same").await.unwrap(),
        1
    );
    let g = log
        .read_stream("globex", "lead", "same", 0, 10)
        .await
        .unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].tenant_id, "globex");
}

pub async fn closed_log_rejects_calls(log: &EventLog) {
    log.append(batch(vec![stream("lead", "x", ExpectedVersion::Any, 1)]))
        .await
        .unwrap();
    let other = log.clone();
    log.close().await;
    assert!(matches!(
        other
            .append(batch(vec![stream("lead", "x", ExpectedVersion::Any, 1)]))
            .await,
        Err(LogError::Closed)
    ));
    assert!(matches!(other.read_all(0, 10).await, Err(LogError::Closed)));
    log.close().await; // idempotent
}

// ---------------------------------------------------------------- cqrs-es

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counter {
    pub value: i64,
}

#[derive(Debug)]
pub enum CounterCommand {
    Add(i64),
    AddTwice(i64),
    /// Appends a foreign event to this counter's stream behind cqrs-es's back, then adds.
    RaceThenAdd(String, i64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    Added { by: i64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        "Added".into()
    }
    fn event_version(&self) -> String {
        "2.0".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("counter error")]
pub struct CounterError;

pub struct CounterServices {
    pub log: EventLog,
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;
    type Services = CounterServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            CounterCommand::Add(by) => sink.write(CounterEvent::Added { by }, self).await,
            CounterCommand::AddTwice(by) => {
                sink.write(CounterEvent::Added { by }, self).await;
                sink.write(CounterEvent::Added { by }, self).await;
            }
            CounterCommand::RaceThenAdd(id, by) => {
                let payload = serde_json::to_value(CounterEvent::Added { by: 100 }).unwrap();
                services
                    .log
                    .append(AppendBatch {
                        tenant_id: DEFAULT_TENANT.into(),
                        streams: vec![StreamAppend {
                            stream_type: "counter".into(),
                            stream_id: id,
                            expected_version: ExpectedVersion::Any,
                            events: vec![ev("Added", payload)],
                        }],
                        idempotency: None,
                    })
                    .await
                    .map_err(|_| CounterError)?;
                sink.write(CounterEvent::Added { by }, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            CounterEvent::Added { by } => self.value += by,
        }
    }
}

fn services(log: &EventLog) -> CounterServices {
    CounterServices { log: log.clone() }
}

pub async fn cqrs_event_store_persists(log: &EventLog) {
    let store = PersistedEventStore::<EventLog, Counter>::new_event_store(log.clone());
    let cqrs = CqrsFramework::new(store, vec![], services(log));
    cqrs.execute("c1", CounterCommand::Add(5)).await.unwrap();
    let meta = HashMap::from([("actor".to_string(), "alice".to_string())]);
    cqrs.execute_with_metadata("c1", CounterCommand::AddTwice(2), meta)
        .await
        .unwrap();
    let evs = log
        .read_stream(DEFAULT_TENANT, "counter", "c1", 0, 100)
        .await
        .unwrap();
    assert_eq!(
        evs.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(evs
        .iter()
        .all(|e| e.event_type == "Added" && e.schema_version == 2));
    assert_eq!(evs[0].payload, json!({"Added": {"by": 5}}));
    assert_eq!(evs[1].metadata, json!({"actor": "alice"}));
    assert!(evs.iter().all(|e| e.event_id.get_version_num() == 7));

    let store = PersistedEventStore::<EventLog, Counter>::new_event_store(log.clone());
    let ctx = store.load_aggregate("c1").await.unwrap();
    assert_eq!(ctx.aggregate.value, 9);
    assert_eq!(ctx.current_sequence, 3);
    let envs = store.load_events("c1").await.unwrap();
    assert_eq!(envs.len(), 3);
    assert_eq!(envs[2].sequence, 3);
}

pub async fn cqrs_snapshot_store_persists(log: &EventLog) {
    use cqrs_es::persist::{PersistedEventRepository, SerializedEvent};
    let mk = || PersistedEventStore::<EventLog, Counter>::new_snapshot_store(log.clone(), 2);
    let cqrs = CqrsFramework::new(mk(), vec![], services(log));
    for _ in 0..5 {
        cqrs.execute("s1", CounterCommand::Add(1)).await.unwrap();
    }
    // cqrs-es snapshots after sequences 2 and 4 (snapshot size 2).
    // NOTE: cqrs-es 0.5 computes the snapshot state by applying the new events to an aggregate
    // that `EventSink::write` already applied them to, so the *state* it hands us is upstream's
    // business; we check what the repository owns: where and when the snapshot is stored.
    let snap = log
        .load_snapshot(DEFAULT_TENANT, "counter", "s1")
        .await
        .unwrap()
        .expect("snapshot written");
    assert_eq!(snap.version, 4);
    assert!(snap.state.get("value").is_some());
    assert_eq!(
        log.read_stream(DEFAULT_TENANT, "counter", "s1", 0, 100)
            .await
            .unwrap()
            .len(),
        5
    );
    let ctx = mk().load_aggregate("s1").await.unwrap();
    assert_eq!(ctx.current_sequence, 5);
    assert_eq!(ctx.current_snapshot, Some(2));

    // Repository level: events + snapshot in one append; snapshot version = last sequence.
    let events: Vec<SerializedEvent> = (1..=3)
        .map(|seq| SerializedEvent {
            aggregate_id: "s2".into(),
            sequence: seq,
            aggregate_type: "counter".into(),
            event_type: "Added".into(),
            event_version: "1.0".into(),
            payload: json!({"Added": {"by": 1}}),
            metadata: json!({}),
        })
        .collect();
    log.persist::<Counter>(&events, Some(("s2".into(), json!({"value": 3}), 1)))
        .await
        .unwrap();
    let got = log.get_snapshot::<Counter>("s2").await.unwrap().unwrap();
    assert_eq!((got.current_sequence, got.current_snapshot), (3, 1));
    assert_eq!(got.aggregate, json!({"value": 3}));
    let ctx = mk().load_aggregate("s2").await.unwrap();
    assert_eq!((ctx.aggregate.value, ctx.current_sequence), (3, 3));
    // A conflicting persist writes neither events nor the snapshot.
    let err = log
        .persist::<Counter>(&events[2..], Some(("s2".into(), json!({"value": 99}), 2)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, cqrs_es::persist::PersistenceError::OptimisticLockError),
        "{err:?}"
    );
    let got = log.get_snapshot::<Counter>("s2").await.unwrap().unwrap();
    assert_eq!((got.current_sequence, got.current_snapshot), (3, 1));
    // Next commit on top: events 4..=5 plus snapshot 2 at version 5.
    let more: Vec<SerializedEvent> = (4..=5)
        .map(|seq| SerializedEvent {
            sequence: seq,
            ..events[0].clone()
        })
        .collect();
    log.persist::<Counter>(&more, Some(("s2".into(), json!({"value": 5}), 2)))
        .await
        .unwrap();
    let ctx = mk().load_aggregate("s2").await.unwrap();
    assert_eq!(
        (
            ctx.aggregate.value,
            ctx.current_sequence,
            ctx.current_snapshot
        ),
        (5, 5, Some(2))
    );
    let evs = log
        .read_stream(DEFAULT_TENANT, "counter", "s2", 0, 10)
        .await
        .unwrap();
    assert_eq!(evs.len(), 5);
    assert!(evs.iter().all(|e| e.schema_version == 1));
}

pub async fn cqrs_conflict_is_aggregate_conflict(log: &EventLog) {
    let store = PersistedEventStore::<EventLog, Counter>::new_event_store(log.clone());
    let cqrs = CqrsFramework::new(store, vec![], services(log));
    cqrs.execute("r1", CounterCommand::Add(1)).await.unwrap();
    let err = cqrs
        .execute("r1", CounterCommand::RaceThenAdd("r1".into(), 1))
        .await
        .unwrap_err();
    assert!(matches!(err, AggregateError::AggregateConflict), "{err:?}");
    // Only the racing event landed; the command's event did not.
    assert_eq!(
        log.stream_version(DEFAULT_TENANT, "counter", "r1")
            .await
            .unwrap(),
        2
    );
    // Retrying succeeds on top of the new version.
    cqrs.execute("r1", CounterCommand::Add(1)).await.unwrap();
    let store = PersistedEventStore::<EventLog, Counter>::new_event_store(log.clone());
    assert_eq!(
        store.load_aggregate("r1").await.unwrap().aggregate.value,
        102
    );

    // Same through EventStore::commit with a stale context.
    let a = store.load_aggregate("r1").await.unwrap();
    let b = store.load_aggregate("r1").await.unwrap();
    store
        .commit(vec![CounterEvent::Added { by: 1 }], a, HashMap::new())
        .await
        .unwrap();
    let err = store
        .commit(vec![CounterEvent::Added { by: 1 }], b, HashMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, AggregateError::AggregateConflict), "{err:?}");
}

pub async fn cqrs_replay_streams(log: &EventLog) {
    use cqrs_es::persist::PersistedEventRepository;
    let store = PersistedEventStore::<EventLog, Counter>::new_event_store(log.clone());
    let cqrs = CqrsFramework::new(store, vec![], services(log));
    for id in ["x1", "x2"] {
        cqrs.execute(id, CounterCommand::AddTwice(3)).await.unwrap();
    }
    let mut s = log.stream_events::<Counter>("x1").await.unwrap();
    let mut seqs = Vec::new();
    while let Some(e) = s.next::<Counter>(&[]).await {
        seqs.push(e.unwrap().sequence);
    }
    assert_eq!(seqs, vec![1, 2]);
    let mut s = log.stream_all_events::<Counter>().await.unwrap();
    let mut n = 0;
    while let Some(e) = s.next::<Counter>(&[]).await {
        let e = e.unwrap();
        assert_eq!(e.payload, CounterEvent::Added { by: 3 });
        n += 1;
    }
    assert_eq!(n, 4);
    let last = log.get_last_events::<Counter>("x2", 1).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!((last[0].sequence, last[0].event_version.as_str()), (2, "2"));
}
