//! PostgreSQL group commit: appends made in one burst share one transaction, and each append
//! is still decided on its own (conflicts, idempotency keys, bad data).
//!
//! The tests run on a current-thread runtime: the bursts (`join_all`) enqueue every append
//! before the writer task can run, so a burst lands in one group.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use common::{batch, committed, duplicate, ev, stream, T};
use crm_eventlog::testing::PgTestDb;
use crm_eventlog::*;
use futures::future::join_all;
use futures::FutureExt;
use serde_json::json;
use sqlx::Connection;

/// Runs `f` on a fresh database; the database is dropped even if `f` panics.
async fn with_pg<F, Fut>(f: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(db) = PgTestDb::create().await else {
        return;
    };
    let result = tokio::spawn(f(db.url.clone())).await;
    db.drop_db().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn keyed(streams: Vec<StreamAppend>, key: &str, hash: &str) -> AppendBatch {
    AppendBatch {
        idempotency: Some(NewIdempotencyRecord {
            key: key.into(),
            request_hash: hash.into(),
            status: 201,
        }),
        ..batch(streams)
    }
}

/// Transactions that wrote the events (distinct `xmin`).
async fn writing_transactions(url: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n
}

#[tokio::test]
async fn burst_of_50_appends_commits_contiguously_in_fewer_transactions() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let outcomes = join_all((0..50).map(|i| {
            log.append(batch(vec![stream(
                "lead",
                &format!("b{i}"),
                ExpectedVersion::NoStream,
                1,
            )]))
        }))
        .await;
        let mut positions = Vec::new();
        for (i, o) in outcomes.into_iter().enumerate() {
            let c = committed(o.unwrap());
            assert_eq!(c.first_position, c.last_position);
            assert_eq!(c.streams[0].stream_id, format!("b{i}"));
            assert_eq!(
                (c.streams[0].first_version, c.streams[0].last_version),
                (1, 1)
            );
            positions.push(c.last_position);
        }
        // Positions follow queue order inside a group.
        assert_eq!(positions, (1..=50).collect::<Vec<i64>>());
        assert_eq!(log.head_position().await.unwrap(), 50);
        let all = log.read_all(0, 100).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.position).collect::<Vec<_>>(),
            (1..=50).collect::<Vec<i64>>()
        );
        for i in 0..50 {
            assert_eq!(
                log.stream_version(T, "lead", &format!("b{i}"))
                    .await
                    .unwrap(),
                1
            );
        }
        let txs = writing_transactions(&url).await;
        assert!(txs < 50, "50 appends in one burst took {txs} transactions");
        // A later append continues after the group.
        let c = committed(
            log.append(batch(vec![stream(
                "lead",
                "b0",
                ExpectedVersion::Exact(1),
                2,
            )]))
            .await
            .unwrap(),
        );
        assert_eq!((c.first_position, c.last_position), (51, 52));
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn same_expected_version_in_one_burst_one_wins() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        log.append(batch(vec![stream(
            "deal",
            "d1",
            ExpectedVersion::NoStream,
            1,
        )]))
        .await
        .unwrap();
        let mk = |who: &str| {
            let mut s = stream("deal", "d1", ExpectedVersion::Exact(1), 2);
            for e in &mut s.events {
                e.payload = json!({ "who": who });
            }
            batch(vec![s])
        };
        let (a, b) = (mk("a"), mk("b"));
        let ids: Vec<_> = [&a, &b]
            .iter()
            .map(|b| {
                b.streams[0]
                    .events
                    .iter()
                    .map(|e| e.event_id)
                    .collect::<HashSet<_>>()
            })
            .collect();
        let (ra, rb) = tokio::join!(log.append(a), log.append(b));
        let (winner, loser, err) = match (ra, rb) {
            (Ok(o), Err(e)) => (committed(o), 1, e),
            (Err(e), Ok(o)) => (committed(o), 0, e),
            other => panic!("exactly one must commit: {other:?}"),
        };
        assert!(
            matches!(
                &err,
                LogError::Conflict { stream_type, stream_id, expected: 1, actual: 3 }
                    if stream_type == "deal" && stream_id == "d1"
            ),
            "{err:?}"
        );
        assert_eq!(
            (
                winner.streams[0].first_version,
                winner.streams[0].last_version
            ),
            (2, 3)
        );
        assert_eq!((winner.first_position, winner.last_position), (2, 3));
        let evs = log.read_stream(T, "deal", "d1", 0, 10).await.unwrap();
        assert_eq!(evs.len(), 3);
        let all = log.read_all(0, 10).await.unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|e| !ids[loser].contains(&e.event_id)));
        assert!(all[1..]
            .iter()
            .all(|e| ids[1 - loser].contains(&e.event_id)));
        assert_eq!(log.stream_version(T, "deal", "d1").await.unwrap(), 3);
        assert_eq!(log.head_position().await.unwrap(), 3);
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn same_idempotency_key_in_one_burst_is_written_once() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let (ra, rb) = tokio::join!(
            log.append(keyed(
                vec![stream("case", "c1", ExpectedVersion::NoStream, 2)],
                "k",
                "h1"
            )),
            log.append(keyed(
                vec![stream("case", "c2", ExpectedVersion::NoStream, 1)],
                "k",
                "h2"
            )),
        );
        let outcomes = [ra.unwrap(), rb.unwrap()];
        let winners: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                AppendOutcome::Committed(c) => Some(c.clone()),
                AppendOutcome::Duplicate(_) => None,
            })
            .collect();
        let dups: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                AppendOutcome::Duplicate(d) => Some(d.clone()),
                AppendOutcome::Committed(_) => None,
            })
            .collect();
        assert_eq!((winners.len(), dups.len()), (1, 1), "{outcomes:?}");
        let (w, d) = (&winners[0], &dups[0]);
        assert_eq!(d.position, w.streams[0].last_position);
        assert_eq!(d.version, w.streams[0].last_version);
        assert_eq!(
            (d.stream_type.as_str(), d.stream_id.as_str()),
            (
                w.streams[0].stream_type.as_str(),
                w.streams[0].stream_id.as_str()
            )
        );
        let stored = log.idempotency_record(T, "k").await.unwrap().unwrap();
        assert_eq!(&stored, d, "the duplicate answer is the stored record");
        // Only the winner's events exist.
        let all = log.read_all(0, 10).await.unwrap();
        assert_eq!(all.len() as i64, w.last_position);
        assert!(all.iter().all(|e| e.stream_id == w.streams[0].stream_id));
        let loser_stream = if w.streams[0].stream_id == "c1" {
            "c2"
        } else {
            "c1"
        };
        assert_eq!(
            log.stream_version(T, "case", loser_stream).await.unwrap(),
            0
        );
        // A later retry is a duplicate too.
        match log
            .append(keyed(
                vec![stream("case", "c3", ExpectedVersion::Any, 1)],
                "k",
                "h3",
            ))
            .await
            .unwrap()
        {
            AppendOutcome::Duplicate(again) => assert_eq!(&again, d),
            other => panic!("expected Duplicate, got {other:?}"),
        }
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn conflict_in_a_burst_leaves_its_key_unclaimed() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let (ra, rb, rc) = tokio::join!(
            log.append(keyed(
                vec![stream("lead", "a", ExpectedVersion::NoStream, 1)],
                "ka",
                "h"
            )),
            log.append(keyed(
                vec![
                    stream("lead", "b", ExpectedVersion::NoStream, 1),
                    stream("account", "b", ExpectedVersion::Exact(7), 1),
                ],
                "kb",
                "h"
            )),
            log.append(keyed(
                vec![stream("lead", "c", ExpectedVersion::NoStream, 1)],
                "kc",
                "h"
            )),
        );
        let (a, c) = (committed(ra.unwrap()), committed(rc.unwrap()));
        assert_eq!((a.last_position, c.last_position), (1, 2));
        let err = rb.unwrap_err();
        assert!(
            matches!(
                &err,
                LogError::Conflict {
                    expected: 7,
                    actual: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            writing_transactions(&url).await,
            1,
            "the burst was one group"
        );
        assert!(log.idempotency_record(T, "kb").await.unwrap().is_none());
        assert!(log.idempotency_record(T, "ka").await.unwrap().is_some());
        // The refused batch wrote nothing, not even its first (valid) stream.
        assert_eq!(log.stream_version(T, "lead", "b").await.unwrap(), 0);
        assert_eq!(log.stream_version(T, "account", "b").await.unwrap(), 0);
        assert_eq!(log.head_position().await.unwrap(), 2);
        // Retry with the right version and the same key commits.
        let retry = committed(
            log.append(keyed(
                vec![
                    stream("lead", "b", ExpectedVersion::NoStream, 1),
                    stream("account", "b", ExpectedVersion::Exact(0), 1),
                ],
                "kb",
                "h",
            ))
            .await
            .unwrap(),
        );
        assert_eq!((retry.first_position, retry.last_position), (3, 4));
        let rec = log.idempotency_record(T, "kb").await.unwrap().unwrap();
        assert_eq!(
            (rec.stream_id.as_str(), rec.version, rec.position),
            ("b", 1, 3)
        );
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn refused_first_holder_of_a_key_hands_it_to_the_next_in_the_burst() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let (r1, r2, r3) = tokio::join!(
            log.append(keyed(
                vec![stream("lead", "x", ExpectedVersion::Exact(3), 1)],
                "k",
                "first"
            )),
            log.append(keyed(
                vec![stream("lead", "x", ExpectedVersion::NoStream, 2)],
                "k",
                "second"
            )),
            log.append(keyed(
                vec![stream("lead", "x", ExpectedVersion::NoStream, 1)],
                "k",
                "third"
            )),
        );
        assert!(matches!(r1, Err(LogError::Conflict { .. })), "{r1:?}");
        let c = committed(r2.unwrap());
        let rec = log.idempotency_record(T, "k").await.unwrap().unwrap();
        assert_eq!(rec.request_hash, "second");
        assert_eq!((rec.version, rec.position), (2, c.last_position));
        assert_eq!(duplicate(r3.unwrap()), rec);
        assert_eq!(log.head_position().await.unwrap(), 2);
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_retry_sharing_a_group_with_a_write_keeps_the_committed_record_of_its_key() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let first = committed(
            log.append(keyed(
                vec![stream("lead", "r", ExpectedVersion::NoStream, 1)],
                "retried",
                "h",
            ))
            .await
            .unwrap(),
        );
        // One burst: a retry under the committed key (its claim is not this
        // group's) and a new keyed append that is written.
        let (retry, other) = tokio::join!(
            log.append(keyed(
                vec![stream("lead", "r", ExpectedVersion::Exact(1), 1)],
                "retried",
                "h"
            )),
            log.append(keyed(
                vec![stream("lead", "s", ExpectedVersion::NoStream, 1)],
                "fresh",
                "h"
            )),
        );
        committed(other.unwrap());
        let stored = log.idempotency_record(T, "retried").await.unwrap();
        let stored = stored.expect("the committed record of the retried key is kept");
        assert_eq!((stored.version, stored.position), (1, first.last_position));
        assert_eq!(duplicate(retry.unwrap()), stored);
        // A third try still finds it.
        let third = log
            .append(keyed(
                vec![stream("lead", "r", ExpectedVersion::Exact(1), 1)],
                "retried",
                "h",
            ))
            .await
            .unwrap();
        assert_eq!(duplicate(third), stored);
        assert_eq!(log.stream_version(T, "lead", "r").await.unwrap(), 1);
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_bad_append_does_not_fail_the_rest_of_its_burst() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let first = ev("Happened", json!({}));
        let taken_id = first.event_id;
        log.append(batch(vec![StreamAppend {
            stream_type: "lead".into(),
            stream_id: "seed".into(),
            expected_version: ExpectedVersion::NoStream,
            events: vec![first],
        }]))
        .await
        .unwrap();
        let mut bad = stream("lead", "bad", ExpectedVersion::NoStream, 2);
        bad.events[1].event_id = taken_id;
        let (g1, b, g2, g3) = tokio::join!(
            log.append(keyed(
                vec![stream("lead", "g1", ExpectedVersion::NoStream, 1)],
                "g1",
                "h"
            )),
            log.append(keyed(vec![bad], "bad", "h")),
            log.append(batch(vec![stream(
                "lead",
                "g2",
                ExpectedVersion::NoStream,
                1
            )])),
            log.append(batch(vec![stream(
                "lead",
                "seed",
                ExpectedVersion::Exact(0),
                1
            )])),
        );
        committed(g1.unwrap());
        committed(g2.unwrap());
        assert!(matches!(g3, Err(LogError::Conflict { .. })), "{g3:?}");
        let err = b.unwrap_err();
        match &err {
            LogError::Database(sqlx::Error::Database(db)) => assert!(db.is_unique_violation()),
            other => panic!("expected a unique violation, got {other:?}"),
        }
        assert!(!err.is_unavailable());
        assert_eq!(log.stream_version(T, "lead", "bad").await.unwrap(), 0);
        assert!(log.idempotency_record(T, "bad").await.unwrap().is_none());
        assert!(log.idempotency_record(T, "g1").await.unwrap().is_some());
        let all = log.read_all(0, 10).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn multi_stream_appends_sharing_streams_in_one_burst() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let outcomes = join_all((0..20).map(|i| {
            log.append(batch(vec![
                stream("lead", &format!("l{i}"), ExpectedVersion::NoStream, 1),
                stream("account", "shared", ExpectedVersion::Any, 2),
                // The same stream twice in one batch: bumped in batch order.
                stream("lead", &format!("l{i}"), ExpectedVersion::Exact(1), 1),
            ]))
        }))
        .await;
        let mut shared_versions = Vec::new();
        for (i, o) in outcomes.into_iter().enumerate() {
            let c = committed(o.unwrap());
            assert_eq!(c.last_position - c.first_position + 1, 4);
            assert_eq!(c.first_position, 1 + 4 * i as i64);
            assert_eq!(
                (c.streams[0].first_version, c.streams[0].last_version),
                (1, 1)
            );
            assert_eq!(
                (c.streams[2].first_version, c.streams[2].last_version),
                (2, 2)
            );
            shared_versions.push((c.streams[1].first_version, c.streams[1].last_version));
        }
        let expected: Vec<_> = (0..20).map(|i| (2 * i + 1, 2 * i + 2)).collect();
        assert_eq!(shared_versions, expected);
        assert_eq!(
            log.stream_version(T, "account", "shared").await.unwrap(),
            40
        );
        let shared = log
            .read_stream(T, "account", "shared", 0, 100)
            .await
            .unwrap();
        assert_eq!(
            shared.iter().map(|e| e.version).collect::<Vec<_>>(),
            (1..=40).collect::<Vec<i64>>()
        );
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn an_append_whose_caller_went_away_still_commits() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let mut rx = log.subscribe();
        // Poll once (enqueues the append), then drop the future.
        let gone = log
            .append(batch(vec![stream(
                "lead",
                "gone",
                ExpectedVersion::NoStream,
                1,
            )]))
            .now_or_never();
        assert!(
            gone.is_none(),
            "the append cannot finish without the writer"
        );
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|h| *h >= 1))
            .await
            .expect("the abandoned append committed")
            .unwrap();
        assert_eq!(log.stream_version(T, "lead", "gone").await.unwrap(), 1);
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn close_answers_queued_appends() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    log.append(batch(vec![stream(
                        "lead",
                        &format!("q{i}"),
                        ExpectedVersion::NoStream,
                        1,
                    )]))
                    .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        log.close().await;
        for t in tasks {
            match t.await.unwrap() {
                Ok(o) => {
                    committed(o);
                }
                Err(LogError::Closed) => {}
                Err(e) => panic!("queued append: {e}"),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_keys_and_streams_without_deadlock() {
    with_pg(|url| async move {
        let a = EventLog::connect(&url).await.unwrap();
        let b = EventLog::connect(&url).await.unwrap();
        // The same idempotency key from both instances: one writes, the other answers with
        // the stored record (its group saw the key taken by the other transaction).
        for round in 0..20 {
            let key = format!("k{round}");
            let mk = |id: &str| keyed(vec![stream("lead", id, ExpectedVersion::Any, 1)], &key, "h");
            let (ra, rb) = tokio::join!(a.append(mk("from-a")), b.append(mk("from-b")));
            let outcomes = [ra.unwrap(), rb.unwrap()];
            let written: Vec<_> = outcomes
                .iter()
                .filter_map(|o| match o {
                    AppendOutcome::Committed(c) => Some(c),
                    AppendOutcome::Duplicate(_) => None,
                })
                .collect();
            assert_eq!(written.len(), 1, "round {round}: {outcomes:?}");
            let stored = a.idempotency_record(T, &key).await.unwrap().unwrap();
            assert_eq!(stored.position, written[0].last_position);
            for o in &outcomes {
                if let AppendOutcome::Duplicate(d) = o {
                    assert_eq!(d, &stored);
                }
            }
        }
        // Multi-stream batches over the same streams, listed in opposite orders, from both
        // instances at once: sorted locking means no deadlock, and versions stay contiguous.
        let names = ["s1", "s2", "s3", "s4"];
        let mut tasks = Vec::new();
        for (w, log) in [a.clone(), b.clone(), a.clone(), b.clone()]
            .into_iter()
            .enumerate()
        {
            tasks.push(tokio::spawn(async move {
                for i in 0..40 {
                    let mut streams: Vec<_> = names
                        .iter()
                        .map(|id| stream("account", id, ExpectedVersion::Any, 1))
                        .collect();
                    if (w + i) % 2 == 1 {
                        streams.reverse();
                    }
                    committed(log.append(batch(streams)).await.unwrap());
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("no deadlock")
                .unwrap();
        }
        for id in names {
            let evs = a.read_stream(T, "account", id, 0, 1000).await.unwrap();
            assert_eq!(
                evs.iter().map(|e| e.version).collect::<Vec<_>>(),
                (1..=160).collect::<Vec<i64>>()
            );
        }
        let head = a.head_position().await.unwrap();
        let all = a.read_all(0, 10_000).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.position).collect::<Vec<_>>(),
            (1..=head).collect::<Vec<i64>>()
        );
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test]
async fn writer_replaces_a_connection_the_server_dropped() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        committed(
            log.append(batch(vec![stream(
                "lead",
                "x",
                ExpectedVersion::NoStream,
                1,
            )]))
            .await
            .unwrap(),
        );
        // Kill every session of the database (the writer keeps its connection between
        // groups that follow each other closely), then append at once.
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(killed >= 1);
        admin.close().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = committed(
            log.append(batch(vec![stream(
                "lead",
                "x",
                ExpectedVersion::Exact(1),
                1,
            )]))
            .await
            .expect("a dropped kept connection is replaced before anything is sent"),
        );
        assert_eq!(c.last_position, 2);
        log.close().await;
    })
    .await;
}
