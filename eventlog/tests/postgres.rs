//! The shared suite on PostgreSQL (one fresh database per test), plus PostgreSQL-only checks:
//! gap-free global reads under concurrent writers, immutability trigger, cross-process notify.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{batch, committed, stream, T};
use crm_eventlog::testing::PgTestDb;
use crm_eventlog::*;

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

macro_rules! pg_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                with_pg(|url| async move {
                    let log = EventLog::connect(&url).await.expect("connect postgres log");
                    assert_eq!(log.backend(), Backend::Postgres);
                    common::$case(&log).await;
                    log.close().await;
                })
                .await;
            }
        )*
    };
}

for_each_case!(pg_cases);

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn global_reads_are_gap_free_under_concurrent_writers() {
    with_pg(|url| async move {
        let log = EventLog::connect(&url).await.unwrap();
        // Widen the window between "positions assigned" and "commit visible".
        log.set_pre_commit_delay(Duration::from_micros(300));
        const WRITERS: usize = 8;
        const BATCHES: usize = 200;
        let started = Instant::now();
        let done = Arc::new(AtomicBool::new(false));

        let reader = {
            let log = log.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut last = 0i64;
                let mut seen = HashSet::new();
                let mut reads = 0u64;
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let page = log.read_all(last, 50).await.unwrap();
                    reads += 1;
                    for e in &page {
                        assert_eq!(
                            e.position,
                            last + 1,
                            "gap: reader at {last} saw {} (an earlier event was skipped)",
                            e.position
                        );
                        assert!(seen.insert(e.event_id), "event seen twice");
                        last = e.position;
                    }
                    if page.is_empty() {
                        if finished {
                            return (seen.len(), last, reads);
                        }
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
            })
        };

        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let log = log.clone();
            writers.push(tokio::spawn(async move {
                let mut written = 0usize;
                for b in 0..BATCHES {
                    let n = 1 + (w + b) % 3;
                    let streams = if b % 5 == 0 {
                        // Multi-stream batch.
                        vec![
                            stream("lead", &format!("w{w}-b{b}"), ExpectedVersion::NoStream, 1),
                            stream("account", &format!("w{w}"), ExpectedVersion::Any, n),
                        ]
                    } else {
                        vec![stream("account", &format!("w{w}"), ExpectedVersion::Any, n)]
                    };
                    let total: usize = streams.iter().map(|s| s.events.len()).sum();
                    committed(log.append(batch(streams)).await.unwrap());
                    written += total;
                    if b % 7 == 0 {
                        tokio::time::sleep(Duration::from_micros((w as u64 * 37 + b as u64) % 500))
                            .await;
                    }
                }
                written
            }));
        }
        let mut total = 0;
        for w in writers {
            total += w.await.unwrap();
        }
        done.store(true, Ordering::Release);
        let (seen, last, reads) = reader.await.unwrap();
        assert_eq!(seen, total, "reader must see every event exactly once");
        assert_eq!(last, log.head_position().await.unwrap());
        assert_eq!(last as usize, total);
        assert!(
            reads > 10,
            "reader should have polled concurrently ({reads} reads)"
        );
        assert!(started.elapsed() < Duration::from_secs(60));
        log.close().await;
    })
    .await;
}

#[tokio::test]
async fn events_are_immutable_on_postgres() {
    with_pg(|url| async move {
        use sqlx::Connection;
        let log = EventLog::connect(&url).await.unwrap();
        log.append(batch(vec![stream(
            "lead",
            "imm",
            ExpectedVersion::NoStream,
            2,
        )]))
        .await
        .unwrap();
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        for sql in [
            "UPDATE events SET event_type = 'Tampered'",
            "DELETE FROM events",
            "TRUNCATE events",
        ] {
            let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
            assert!(err.to_string().contains("immutable"), "{sql}: {err}");
        }
        conn.close().await.unwrap();
        let evs = log.read_all(0, 10).await.unwrap();
        assert_eq!(evs.len(), 2);
        assert!(evs.iter().all(|e| e.event_type == "Happened"));
        log.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribe_sees_commits_from_other_processes() {
    with_pg(|url| async move {
        let a = EventLog::connect(&url).await.unwrap();
        let b = EventLog::connect(&url).await.unwrap();
        let mut rx = b.subscribe();
        rx.borrow_and_update();
        // Give b's listener a moment to LISTEN.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = committed(
            a.append(batch(vec![stream("lead", "x", ExpectedVersion::Any, 3)]))
                .await
                .unwrap(),
        );
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|h| *h >= c.last_position),
        )
        .await
        .expect("NOTIFY moved the other instance's head")
        .unwrap();
        // And a fresh instance starts at the current head.
        let c2 = EventLog::connect(&url).await.unwrap();
        assert_eq!(*c2.subscribe().borrow(), c.last_position);
        assert_eq!(b.read_stream(T, "lead", "x", 0, 10).await.unwrap().len(), 3);
        for l in [a, b, c2] {
            l.close().await;
        }
    })
    .await;
}

#[tokio::test]
async fn migrations_are_idempotent_across_connects() {
    with_pg(|url| async move {
        let a = EventLog::connect(&url).await.unwrap();
        a.append(batch(vec![stream(
            "lead",
            "m",
            ExpectedVersion::NoStream,
            1,
        )]))
        .await
        .unwrap();
        a.close().await;
        let b = EventLog::connect(&url).await.unwrap();
        assert_eq!(b.head_position().await.unwrap(), 1);
        b.close().await;
    })
    .await;
}
