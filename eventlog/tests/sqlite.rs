//! The shared suite on SQLite, plus SQLite-only checks (durability, memory, immutability).

mod common;

use common::{batch, committed, stream, T};
use crm_eventlog::testing::sqlite_temp;
use crm_eventlog::*;

macro_rules! sqlite_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (_dir, url) = sqlite_temp();
                let log = EventLog::connect(&url).await.expect("open sqlite log");
                assert_eq!(log.backend(), Backend::Sqlite);
                common::$case(&log).await;
                log.close().await;
            }
        )*
    };
}

for_each_case!(sqlite_cases);

#[tokio::test]
async fn acknowledged_appends_survive_drop_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let log = EventLog::open_sqlite(&path).await.unwrap();
    let c = committed(
        log.append(batch(vec![stream(
            "lead",
            "crash",
            ExpectedVersion::NoStream,
            3,
        )]))
        .await
        .unwrap(),
    );
    // Simulate a crash: no close(), no destructors (writer thread and connections leak).
    std::mem::forget(log);
    let reopened = EventLog::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let evs = reopened
        .read_stream(T, "lead", "crash", 0, 10)
        .await
        .unwrap();
    assert_eq!(evs.len(), 3);
    assert_eq!(reopened.head_position().await.unwrap(), c.last_position);
    assert_eq!(*reopened.subscribe().borrow(), c.last_position);
    // Appends continue after the recovered head.
    let c2 = committed(
        reopened
            .append(batch(vec![stream(
                "lead",
                "crash",
                ExpectedVersion::Exact(3),
                1,
            )]))
            .await
            .unwrap(),
    );
    assert_eq!(c2.first_position, c.last_position + 1);
    reopened.close().await;
    // And after a graceful close + reopen.
    let again = EventLog::open_sqlite(&path).await.unwrap();
    assert_eq!(again.stream_version(T, "lead", "crash").await.unwrap(), 4);
    again.close().await;
}

#[tokio::test]
async fn in_memory_url_works() {
    let log = EventLog::connect("sqlite::memory:").await.unwrap();
    let c = committed(
        log.append(batch(vec![stream(
            "lead",
            "m",
            ExpectedVersion::NoStream,
            2,
        )]))
        .await
        .unwrap(),
    );
    assert_eq!(log.read_all(0, 10).await.unwrap().len(), 2);
    assert_eq!(log.head_position().await.unwrap(), c.last_position);
    log.close().await;
}

#[tokio::test]
async fn invalid_urls_rejected() {
    for url in ["mysql://x", "", "http://localhost"] {
        assert!(
            matches!(EventLog::connect(url).await, Err(LogError::InvalidUrl(_))),
            "{url}"
        );
    }
}

#[tokio::test]
async fn events_are_immutable_on_sqlite() {
    use sqlx::Connection;
    let (dir, url) = sqlite_temp();
    let log = EventLog::connect(&url).await.unwrap();
    log.append(batch(vec![stream(
        "lead",
        "imm",
        ExpectedVersion::NoStream,
        1,
    )]))
    .await
    .unwrap();
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let err = sqlx::query("UPDATE events SET event_type = 'Tampered'")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");
    let err = sqlx::query("DELETE FROM events")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");
    conn.close().await.unwrap();
    assert_eq!(log.read_all(0, 10).await.unwrap()[0].event_type, "Happened");
    log.close().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_isolates_failures_within_a_group() {
    // Many concurrent requests land in the same group: conflicts and duplicates must not
    // affect the others.
    let (_dir, url) = sqlite_temp();
    let log = EventLog::connect(&url).await.unwrap();
    log.append(batch(vec![stream(
        "lead",
        "exists",
        ExpectedVersion::NoStream,
        1,
    )]))
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let s = if i % 3 == 0 {
                stream("lead", "exists", ExpectedVersion::NoStream, 1) // always conflicts
            } else {
                stream("lead", &format!("n{i}"), ExpectedVersion::NoStream, 2)
            };
            (i, log.append(batch(vec![s])).await)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if i % 3 == 0 {
            assert!(matches!(r, Err(LogError::Conflict { .. })), "{r:?}");
        } else {
            committed(r.unwrap());
            ok += 1;
        }
    }
    assert_eq!(ok, 200);
    let all = log.read_all(0, 10_000).await.unwrap();
    assert_eq!(all.len(), 1 + 400);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position, i as i64 + 1);
    }
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_request_leaves_its_key_free_and_a_stream_named_twice_continues() {
    use crm_eventlog::{AppendBatch, NewIdempotencyRecord};
    let (_dir, url) = sqlite_temp();
    let log = EventLog::connect(&url).await.unwrap();
    let keyed = |streams, key: &str| AppendBatch {
        tenant_id: T.to_string(),
        streams,
        idempotency: Some(NewIdempotencyRecord {
            key: key.to_string(),
            request_hash: "h".into(),
            status: 200,
        }),
    };
    // In one group: a request that conflicts (stream "a" does not exist at version 5) and one
    // that names stream "b" twice.
    let (refused, twice) = tokio::join!(
        log.append(keyed(
            vec![stream("lead", "a", ExpectedVersion::Exact(5), 1)],
            "k1"
        )),
        log.append(batch(vec![
            stream("lead", "b", ExpectedVersion::NoStream, 2),
            stream("lead", "b", ExpectedVersion::Any, 1),
        ])),
    );
    assert!(
        matches!(refused, Err(LogError::Conflict { .. })),
        "{refused:?}"
    );
    let twice = committed(twice.unwrap());
    assert_eq!(twice.streams[0].first_version, 1);
    assert_eq!(twice.streams[1].first_version, 3);
    assert_eq!(log.stream_version(T, "lead", "b").await.unwrap(), 3);
    let versions: Vec<i64> = log
        .read_stream(T, "lead", "b", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3]);
    // The refused request's key was not claimed: its retry with the right version commits.
    assert!(log.idempotency_record(T, "k1").await.unwrap().is_none());
    let retried = log
        .append(keyed(
            vec![stream("lead", "a", ExpectedVersion::NoStream, 1)],
            "k1",
        ))
        .await
        .unwrap();
    committed(retried);
    assert_eq!(
        log.idempotency_record(T, "k1")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    log.close().await;
}

#[tokio::test]
async fn reads_of_events_after_close_are_refused() {
    let (_dir, url) = sqlite_temp();
    let log = EventLog::connect(&url).await.unwrap();
    log.append(batch(vec![stream(
        "lead",
        "closing",
        ExpectedVersion::NoStream,
        2,
    )]))
    .await
    .unwrap();
    assert_eq!(log.read_all(0, 10).await.unwrap().len(), 2);
    log.close().await;
    assert!(matches!(log.read_all(0, 10).await, Err(LogError::Closed)));
    assert!(matches!(
        log.read_stream(T, "lead", "closing", 0, 10).await,
        Err(LogError::Closed)
    ));
    assert!(matches!(
        log.read_by_stream(i64::MAX, None, 10).await,
        Err(LogError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_concurrent_reads_than_connections_all_finish() {
    let (_dir, url) = sqlite_temp();
    let log = EventLog::connect(&url).await.unwrap();
    for n in 0..4 {
        log.append(batch(vec![stream(
            "lead",
            &format!("busy-{n}"),
            ExpectedVersion::NoStream,
            3,
        )]))
        .await
        .unwrap();
    }
    // Four times as many reads as the reader keeps connections: the rest wait their turn.
    let reads = (0..32).map(|n| {
        let log = log.clone();
        tokio::spawn(async move {
            let events = log
                .read_stream(T, "lead", &format!("busy-{}", n % 4), 0, 10)
                .await
                .unwrap();
            let all = log.read_all(0, 100).await.unwrap();
            (events.len(), all.len())
        })
    });
    for read in futures::future::join_all(reads).await {
        assert_eq!(read.unwrap(), (3, 12));
    }
    log.close().await;
}
