//! Case service levels read model against hand-computed figures, on SQLite
//! and PostgreSQL.
//!
//! Scenario (t0 = 2026-03-02 08:00 UTC; targets: urgent 1h/4h, high 4h/24h,
//! normal 8h/72h, low 24h/168h):
//! - 1 urgent alice: public reply t0+30m, resolved t0+3h, closed t0+5h (all met)
//! - 2 urgent bob: public reply t0+2h (late), resolved t0+6h (late)
//! - 3 high alice: internal note t0+1h, public reply t0+5h (late), open
//! - 4 normal, unassigned, no reply (overdue from t0+8h), open
//! - 5 low bob, opened t0+1h, escalated, reply t0+2h, open
//! - 6 high alice: reply t0+1h, resolved t0+2h, reopened t0+3h (open again)
//! - 7 normal alice, opened 2026-04-10 (outside March): reply +2h, resolved +24h

use std::future::Future;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use crm_domain::aggregate::execute;
use crm_domain::case::{Case, CaseCommand};
use crm_domain::values::{CaseChannel, CasePriority};
use crm_domain::{AccountId, CaseId};
use crm_eventlog::testing::PgTestDb;
use crm_eventlog::RecordedEvent;
use crm_projection_service::fold::{create_tables, fold_batch, testkit::recorded};
use crm_projection_service::service_levels::{
    open_cases, stats, OpenCasesQuery, ServiceLevelsProjection, SlaError, SlaFigures, SlaStatsQuery,
};
use crm_projection_service::{ReadDb, Tables};
use uuid::Uuid;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).unwrap()
}

fn mins(m: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(m)
}

fn hours(h: i64) -> DateTime<Utc> {
    t0() + Duration::hours(h)
}

fn cid(n: u128) -> CaseId {
    CaseId::new(Uuid::from_u128(n))
}

fn open(n: u128, priority: CasePriority, at: DateTime<Utc>) -> CaseCommand {
    CaseCommand::OpenCase {
        id: cid(n),
        account_id: Some(AccountId::new(Uuid::from_u128(1000))),
        contact_id: None,
        subject: format!("case {n}"),
        description: None,
        priority,
        channel: CaseChannel::Email,
        occurred_at: at,
    }
}

fn assign(who: &str, at: DateTime<Utc>) -> CaseCommand {
    CaseCommand::AssignCase {
        assignee: who.into(),
        occurred_at: at,
    }
}

fn comment(public: bool, at: DateTime<Utc>) -> CaseCommand {
    CaseCommand::CommentCase {
        body: "looking".into(),
        public,
        author: None,
        occurred_at: at,
    }
}

fn resolve(at: DateTime<Utc>) -> CaseCommand {
    CaseCommand::ResolveCase {
        resolution: "fixed".into(),
        occurred_at: at,
    }
}

#[derive(Default)]
struct Script {
    events: Vec<RecordedEvent>,
}

impl Script {
    fn case(&mut self, n: u128, commands: Vec<CaseCommand>) {
        let mut case = Case::default();
        let mut version = 0;
        for command in commands {
            for event in execute(&mut case, command).expect("command accepted") {
                version += 1;
                let position = self.events.len() as i64 + 1;
                self.events.push(recorded(
                    "case",
                    &cid(n).to_string(),
                    version,
                    position,
                    &event,
                    "agent",
                    t0() + Duration::seconds(position),
                ));
            }
        }
    }
}

fn scenario() -> Vec<RecordedEvent> {
    use CasePriority::*;
    let mut s = Script::default();
    s.case(
        1,
        vec![
            open(1, Urgent, t0()),
            assign("alice", mins(10)),
            comment(true, mins(30)),
            resolve(hours(3)),
            CaseCommand::CloseCase {
                occurred_at: hours(5),
            },
        ],
    );
    s.case(
        2,
        vec![
            open(2, Urgent, t0()),
            assign("bob", mins(5)),
            comment(true, hours(2)),
            resolve(hours(6)),
        ],
    );
    s.case(
        3,
        vec![
            open(3, High, t0()),
            assign("alice", mins(1)),
            comment(false, hours(1)),
            comment(true, hours(5)),
        ],
    );
    s.case(4, vec![open(4, Normal, t0())]);
    s.case(
        5,
        vec![
            open(5, Low, hours(1)),
            assign("bob", hours(1)),
            CaseCommand::EscalateCase {
                reason: "VIP".into(),
                occurred_at: mins(70),
            },
            comment(true, hours(2)),
        ],
    );
    s.case(
        6,
        vec![
            open(6, High, t0()),
            assign("alice", mins(1)),
            comment(true, hours(1)),
            resolve(hours(2)),
            CaseCommand::ReopenCase {
                reason: None,
                occurred_at: hours(3),
            },
        ],
    );
    let april = Utc.with_ymd_and_hms(2026, 4, 10, 8, 0, 0).unwrap();
    s.case(
        7,
        vec![
            open(7, Normal, april),
            assign("alice", april),
            comment(true, april + Duration::hours(2)),
            resolve(april + Duration::hours(24)),
        ],
    );
    s.events
}

async fn on_both_backends<F, Fut>(body: F)
where
    F: Fn(ReadDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let sqlite = ReadDb::open_sqlite(&dir.path().join("read.db"))
        .await
        .unwrap();
    body(sqlite.clone()).await;
    sqlite.pool.close().await;
    if let Some(pg) = PgTestDb::create().await {
        let db = ReadDb::connect(&pg.url).await.unwrap();
        body(db.clone()).await;
        db.pool.close().await;
        pg.drop_db().await;
    }
}

async fn folded(db: &ReadDb, generation: i64, batches: &[&[RecordedEvent]]) -> Tables {
    let tables = Tables::new("service_levels", generation);
    create_tables(db, &ServiceLevelsProjection, &tables)
        .await
        .unwrap();
    for batch in batches {
        fold_batch(db, &ServiceLevelsProjection, &tables, batch, None)
            .await
            .unwrap();
    }
    tables
}

fn march() -> SlaStatsQuery {
    SlaStatsQuery {
        from: Some("2026-03-01".parse::<NaiveDate>().unwrap()),
        to: Some("2026-03-31".parse::<NaiveDate>().unwrap()),
        now: Some(hours(10)),
    }
}

#[allow(clippy::too_many_arguments)]
fn figures(
    cases: i64,
    responded: i64,
    avg_response: Option<f64>,
    response_breaches: i64,
    resolved: i64,
    avg_resolution: Option<f64>,
    resolution_breaches: i64,
) -> SlaFigures {
    SlaFigures {
        cases,
        responded,
        avg_first_response_minutes: avg_response,
        first_response_breaches: response_breaches,
        resolved,
        avg_resolution_minutes: avg_resolution,
        resolution_breaches,
    }
}

async fn open_cases_with_breaches(db: ReadDb) {
    let events = scenario();
    let tables = folded(&db, 1, &[&events]).await;

    let at = |now| OpenCasesQuery {
        assignee: None,
        priority: None,
        now,
    };
    let view = open_cases(&db, &tables, &at(hours(10))).await.unwrap();
    // Ordered by resolution due: 3 and 6 (t0+24h, by id), 4 (t0+72h), 5 (t0+169h).
    let rows: Vec<(String, bool, bool)> = view
        .cases
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                c.first_response_breached,
                c.resolution_breached,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (cid(3).to_string(), true, false),
            (cid(6).to_string(), false, false),
            (cid(4).to_string(), true, false),
            (cid(5).to_string(), false, false),
        ]
    );
    let c5 = &view.cases[3];
    assert_eq!(c5.priority, "low");
    assert_eq!(c5.assignee.as_deref(), Some("bob"));
    assert_eq!(c5.escalation_level, 1);
    assert_eq!(c5.first_response_due, hours(25));
    assert_eq!(c5.first_responded_at, Some(hours(2)));
    assert_eq!(c5.resolution_due, hours(169));
    let c6 = &view.cases[1];
    assert_eq!(c6.status, "assigned");
    assert!(view.cases[2].assignee.is_none());
    assert_eq!(view.cases[2].status, "open");

    // A day later the reopened case 6 and case 3 are past their resolution due time.
    let later = open_cases(&db, &tables, &at(hours(30))).await.unwrap();
    let breached: Vec<&str> = later
        .cases
        .iter()
        .filter(|c| c.resolution_breached)
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(breached, [cid(3).to_string(), cid(6).to_string()]);

    // Not yet due at all just after opening.
    let early = open_cases(&db, &tables, &at(mins(1))).await.unwrap();
    assert!(early
        .cases
        .iter()
        .all(|c| !c.first_response_breached || c.id == cid(3).to_string()));

    let alice = open_cases(
        &db,
        &tables,
        &OpenCasesQuery {
            assignee: Some("alice".into()),
            priority: None,
            now: hours(10),
        },
    )
    .await
    .unwrap();
    let ids: Vec<&str> = alice.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [cid(3).to_string(), cid(6).to_string()]);
    let urgent = open_cases(
        &db,
        &tables,
        &OpenCasesQuery {
            assignee: None,
            priority: Some("urgent".into()),
            now: hours(10),
        },
    )
    .await
    .unwrap();
    assert!(urgent.cases.is_empty());
}

async fn averages_by_priority_and_assignee(db: ReadDb) {
    let events = scenario();
    let tables = folded(&db, 1, &[&events]).await;

    let s = stats(&db, &tables, &march()).await.unwrap();
    assert_eq!(s.total, figures(6, 5, Some(114.0), 3, 2, Some(270.0), 1));
    let by_priority: Vec<(&str, &SlaFigures)> = s
        .by_priority
        .iter()
        .map(|p| (p.priority.as_str(), &p.figures))
        .collect();
    assert_eq!(
        by_priority,
        [
            ("urgent", &figures(2, 2, Some(75.0), 1, 2, Some(270.0), 1)),
            ("high", &figures(2, 2, Some(180.0), 1, 0, None, 0)),
            ("normal", &figures(1, 0, None, 1, 0, None, 0)),
            ("low", &figures(1, 1, Some(60.0), 0, 0, None, 0)),
        ]
    );
    let by_assignee: Vec<(Option<&str>, &SlaFigures)> = s
        .by_assignee
        .iter()
        .map(|a| (a.assignee.as_deref(), &a.figures))
        .collect();
    assert_eq!(
        by_assignee,
        [
            (
                Some("alice"),
                &figures(3, 3, Some(130.0), 1, 1, Some(180.0), 0)
            ),
            (
                Some("bob"),
                &figures(2, 2, Some(90.0), 1, 1, Some(360.0), 1)
            ),
            (None, &figures(1, 0, None, 1, 0, None, 0)),
        ]
    );
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["by_priority"][0]["avg_first_response_minutes"], 75.0);

    // Without a range case 7 (April, normal) counts too.
    let all = stats(
        &db,
        &tables,
        &SlaStatsQuery {
            now: Some(hours(10)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(all.total.cases, 7);
    assert_eq!(
        all.by_priority[2].figures,
        figures(2, 1, Some(120.0), 1, 1, Some(1440.0), 0)
    );

    let bad = stats(
        &db,
        &tables,
        &SlaStatsQuery {
            from: Some("2026-04-01".parse().unwrap()),
            to: Some("2026-03-01".parse().unwrap()),
            now: None,
        },
    )
    .await;
    assert!(matches!(bad, Err(SlaError::InvalidRange { .. })));
}

async fn batches_match_single_batch(db: ReadDb) {
    let events = scenario();
    let one = folded(&db, 1, &[&events]).await;
    let (first, second) = events.split_at(events.len() / 2 + 1);
    let two = folded(&db, 2, &[first, second]).await;
    let snapshot = |t: Tables| {
        let db = db.clone();
        async move {
            let q = OpenCasesQuery {
                assignee: None,
                priority: None,
                now: hours(30),
            };
            (
                serde_json::to_value(open_cases(&db, &t, &q).await.unwrap()).unwrap(),
                serde_json::to_value(stats(&db, &t, &march()).await.unwrap()).unwrap(),
            )
        }
    };
    let a = snapshot(one).await;
    assert_eq!(a.0["cases"].as_array().unwrap().len(), 4);
    assert_eq!(a, snapshot(two).await);
}

#[tokio::test]
async fn open_cases_report_breaches() {
    on_both_backends(open_cases_with_breaches).await;
}

#[tokio::test]
async fn stats_by_priority_and_assignee() {
    on_both_backends(averages_by_priority_and_assignee).await;
}

#[tokio::test]
async fn two_batches_equal_one() {
    on_both_backends(batches_match_single_batch).await;
}

/// Every column of every case, in id order.
async fn case_rows(db: &ReadDb, tables: &Tables) -> Vec<Vec<Option<String>>> {
    use sqlx::Row;
    let columns = "id, account_id, contact_id, priority, status, assignee, opened_at, \
                   first_response_due, resolution_due, first_responded_at, resolved_at, closed_at, \
                   CAST(escalation_level AS TEXT), CAST(reopen_count AS TEXT), \
                   CAST(version AS TEXT), CAST(position AS TEXT), updated_at";
    sqlx::query(&format!(
        "SELECT {columns} FROM {} ORDER BY id",
        tables.t("cases")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .iter()
    .map(|row| (0..17).map(|i| row.get::<Option<String>, _>(i)).collect())
    .collect()
}

async fn every_column_as_the_events_set_it(db: ReadDb) {
    let mut script = Script { events: scenario() };
    // Two public replies: the first one counts.
    script.case(
        8,
        vec![
            open(8, CasePriority::Low, t0()),
            comment(true, hours(1)),
            comment(true, hours(2)),
        ],
    );
    let events = script.events;
    let whole = folded(&db, 1, &[&events]).await;
    let singles: Vec<&[RecordedEvent]> = events.chunks(1).collect();
    let one_by_one = folded(&db, 2, &singles).await;
    let rows = case_rows(&db, &whole).await;
    assert_eq!(rows, case_rows(&db, &one_by_one).await);
    let case = |n: u128| {
        rows.iter()
            .find(|row| row[0].as_deref() == Some(&cid(n).to_string()))
            .unwrap_or_else(|| panic!("case {n}"))
            .clone()
    };
    let last_position = |n: u128| {
        events
            .iter()
            .filter(|event| event.stream_id == cid(n).to_string())
            .map(|event| event.position)
            .max()
            .unwrap()
            .to_string()
    };
    let at = |t: DateTime<Utc>| Some(crm_projection_service::readdb::timestamp(&t));
    // Closed after its resolution: every column set on the way is kept.
    let one = case(1);
    assert_eq!(one[4].as_deref(), Some("closed"));
    assert_eq!(one[5].as_deref(), Some("alice"));
    assert_eq!(one[9], at(mins(30)));
    assert_eq!(one[10], at(hours(3)));
    assert_eq!(one[11], at(hours(5)));
    assert_eq!(
        (one[14].as_deref(), one[15].clone()),
        (Some("5"), Some(last_position(1)))
    );
    // Escalated once.
    assert_eq!(case(5)[12].as_deref(), Some("1"));
    // Reopened: resolution cleared, counted once, open again.
    let six = case(6);
    assert_eq!(six[10], None);
    assert_eq!(six[13].as_deref(), Some("1"));
    assert_ne!(six[4].as_deref(), Some("resolved"));
    assert_eq!(six[14].as_deref(), Some("5"));
    // Not yet assigned, nor escalated, nor reopened.
    let four = case(4);
    assert_eq!((four[4].as_deref(), four[5].clone()), (Some("open"), None));
    assert_eq!(
        (four[12].as_deref(), four[13].as_deref()),
        (Some("0"), Some("0"))
    );
    let eight = case(8);
    assert_eq!(eight[9], at(hours(1)));
    assert_eq!(eight[14].as_deref(), Some("3"));
}

#[tokio::test]
async fn rows_hold_every_column_the_events_set_in_any_batching() {
    on_both_backends(every_column_as_the_events_set_it).await;
}
