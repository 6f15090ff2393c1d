//! Pipeline read model against hand-computed figures of a scripted scenario,
//! on SQLite and PostgreSQL.
//!
//! Scenario (day n = 2026-01-01 09:00 UTC + n days; default pipeline:
//! prospecting 10, qualification 25, proposal 50, negotiation 75):
//! - A alice 10000 USD: prospecting d0, qualification d10, proposal d20, won 12000.00 USD d30
//! - B alice 5000 EUR: prospecting d0, qualification d5, won 5000.50 EUR d40
//! - C bob 8000 USD: qualification d10, negotiation d20, won 7000.00 USD d60
//! - D bob 3000 USD: prospecting d0, lost d20
//! - E alice 2000 USD: prospecting d0, qualification d10, proposal d25, lost d45
//! - F alice 9999 USD: prospecting d100, won 9999.00 USD d200 (after the Q1 range)
//! - G alice 1000 USD exp 2026-06-30: prospecting d70, proposal d80 (open)
//! - H bob 2000 EUR exp 2026-06-15: negotiation d70 (open)
//! - I bob 4000.50 USD exp 2026-05-15: prospecting d70; d75 updated to 3000.00 USD,
//!   2026-07-31, owner alice (open)
//! - J carol 500 USD exp 2026-05-31: prospecting d0, lost d15, reopened d50 (open, prospecting)

use std::future::Future;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use crm_domain::aggregate::execute;
use crm_domain::opportunity::{Opportunity, OpportunityCommand};
use crm_domain::{AccountId, Money, OpportunityId};
use crm_eventlog::testing::PgTestDb;
use crm_eventlog::RecordedEvent;
use crm_projection_service::fold::{create_tables, fold_batch, testkit::recorded};
use crm_projection_service::pipeline::{
    analytics, board, forecast, stage_history, AnalyticsError, AnalyticsQuery, BoardQuery,
    ForecastQuery, PipelineProjection,
};
use crm_projection_service::{ReadDb, Tables};
use serde_json::{json, Value};
use uuid::Uuid;

fn day(n: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap() + Duration::days(n)
}

fn date(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

fn money(s: &str) -> Money {
    Money::parse(s).unwrap()
}

fn oid(n: u128) -> OpportunityId {
    OpportunityId::new(Uuid::from_u128(n))
}

fn open(
    n: u128,
    owner: &str,
    amount: &str,
    expected: &str,
    stage: &str,
    d: i64,
) -> OpportunityCommand {
    OpportunityCommand::OpenOpportunity {
        id: oid(n),
        account_id: AccountId::new(Uuid::from_u128(1000)),
        name: format!("deal {n}"),
        amount: money(amount),
        expected_close: date(expected),
        owner: owner.into(),
        pipeline: "default".into(),
        stage: stage.into(),
        occurred_at: day(d),
    }
}

fn advance(stage: &str, d: i64) -> OpportunityCommand {
    OpportunityCommand::AdvanceStage {
        stage: stage.into(),
        reason: None,
        occurred_at: day(d),
    }
}

fn win(value: &str, d: i64) -> OpportunityCommand {
    OpportunityCommand::WinOpportunity {
        close_value: money(value),
        occurred_at: day(d),
    }
}

fn lose(d: i64) -> OpportunityCommand {
    OpportunityCommand::LoseOpportunity {
        reason: "price".into(),
        competitor: None,
        occurred_at: day(d),
    }
}

/// Runs commands against fresh aggregates and records the events in order.
#[derive(Default)]
struct Script {
    events: Vec<RecordedEvent>,
}

impl Script {
    fn opportunity(&mut self, n: u128, commands: Vec<OpportunityCommand>) {
        let mut opp = Opportunity::default();
        let mut version = 0;
        for command in commands {
            for event in execute(&mut opp, command).expect("command accepted") {
                version += 1;
                let position = self.events.len() as i64 + 1;
                self.events.push(recorded(
                    "opportunity",
                    &oid(n).to_string(),
                    version,
                    position,
                    &event,
                    "alice",
                    day(0) + Duration::seconds(position),
                ));
            }
        }
    }
}

fn scenario() -> Vec<RecordedEvent> {
    let mut s = Script::default();
    s.opportunity(
        1,
        vec![
            open(1, "alice", "10000.00 USD", "2026-02-15", "prospecting", 0),
            advance("qualification", 10),
            advance("proposal", 20),
            win("12000.00 USD", 30),
        ],
    );
    s.opportunity(
        2,
        vec![
            open(2, "alice", "5000.00 EUR", "2026-02-15", "prospecting", 0),
            advance("qualification", 5),
            win("5000.50 EUR", 40),
        ],
    );
    s.opportunity(
        3,
        vec![
            open(3, "bob", "8000.00 USD", "2026-03-01", "qualification", 10),
            advance("negotiation", 20),
            win("7000.00 USD", 60),
        ],
    );
    s.opportunity(
        4,
        vec![
            open(4, "bob", "3000.00 USD", "2026-02-01", "prospecting", 0),
            lose(20),
        ],
    );
    s.opportunity(
        5,
        vec![
            open(5, "alice", "2000.00 USD", "2026-02-01", "prospecting", 0),
            advance("qualification", 10),
            advance("proposal", 25),
            lose(45),
        ],
    );
    s.opportunity(
        6,
        vec![
            open(6, "alice", "9999.00 USD", "2026-07-01", "prospecting", 100),
            win("9999.00 USD", 200),
        ],
    );
    s.opportunity(
        7,
        vec![
            open(7, "alice", "1000.00 USD", "2026-06-30", "prospecting", 70),
            advance("proposal", 80),
        ],
    );
    s.opportunity(
        8,
        vec![open(
            8,
            "bob",
            "2000.00 EUR",
            "2026-06-15",
            "negotiation",
            70,
        )],
    );
    s.opportunity(
        9,
        vec![
            open(9, "bob", "4000.50 USD", "2026-05-15", "prospecting", 70),
            OpportunityCommand::UpdateOpportunity {
                name: None,
                amount: Some(money("3000.00 USD")),
                expected_close: Some(date("2026-07-31")),
                owner: Some("alice".into()),
                occurred_at: day(75),
            },
        ],
    );
    s.opportunity(
        10,
        vec![
            open(10, "carol", "500.00 USD", "2026-05-31", "prospecting", 0),
            lose(15),
            OpportunityCommand::ReopenOpportunity {
                reason: None,
                stage: None,
                occurred_at: day(50),
            },
        ],
    );
    s.events
}

/// Runs `body` on a fresh SQLite file and on a fresh PostgreSQL database.
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
    let tables = Tables::new("pipeline", generation);
    create_tables(db, &PipelineProjection, &tables)
        .await
        .unwrap();
    for batch in batches {
        fold_batch(db, &PipelineProjection, &tables, batch, None)
            .await
            .unwrap();
    }
    tables
}

fn money_json(items: &[(&str, &str)]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|(amount, currency)| json!({"amount": amount, "currency": currency}))
            .collect(),
    )
}

fn approx(actual: &Value, expected: f64) {
    let a = actual
        .as_f64()
        .unwrap_or_else(|| panic!("{actual} is not a number"));
    assert!((a - expected).abs() < 1e-9, "{a} != {expected}");
}

fn q1() -> AnalyticsQuery {
    AnalyticsQuery {
        from: Some(date("2026-01-01")),
        to: Some(date("2026-03-31")),
        ..Default::default()
    }
}

async fn analytics_json(db: &ReadDb, tables: &Tables, query: &AnalyticsQuery) -> Value {
    serde_json::to_value(analytics(db, tables, query).await.unwrap()).unwrap()
}

async fn board_and_forecast(db: ReadDb) {
    let events = scenario();
    let tables = folded(&db, 1, &[&events]).await;

    let all =
        serde_json::to_value(board(&db, &tables, &BoardQuery::default()).await.unwrap()).unwrap();
    assert_eq!(all["pipeline"], "default");
    assert_eq!(all["count"], 4);
    assert_eq!(
        all["total"],
        money_json(&[("2000.00", "EUR"), ("4500.00", "USD")])
    );
    assert_eq!(
        all["weighted"],
        money_json(&[("1500.00", "EUR"), ("850.00", "USD")])
    );
    let stages = all["stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["prospecting", "qualification", "proposal", "negotiation"]
    );
    assert_eq!(stages[0]["probability"], 10);
    assert_eq!(stages[0]["count"], 2);
    assert_eq!(stages[0]["total"], money_json(&[("3500.00", "USD")]));
    assert_eq!(stages[0]["weighted"], money_json(&[("350.00", "USD")]));
    assert_eq!(stages[1]["count"], 0);
    assert_eq!(stages[1]["total"], json!([]));
    assert_eq!(stages[2]["count"], 1);
    assert_eq!(stages[2]["total"], money_json(&[("1000.00", "USD")]));
    assert_eq!(stages[2]["weighted"], money_json(&[("500.00", "USD")]));
    assert_eq!(stages[3]["probability"], 75);
    assert_eq!(stages[3]["total"], money_json(&[("2000.00", "EUR")]));
    assert_eq!(stages[3]["weighted"], money_json(&[("1500.00", "EUR")]));

    // I was reassigned to alice with a new amount.
    let alice = board(
        &db,
        &tables,
        &BoardQuery {
            owner: Some("alice".into()),
            pipeline: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(alice.count, 2);
    assert_eq!(alice.stages[0].count, 1);
    assert_eq!(
        serde_json::to_value(&alice.stages[0].total).unwrap(),
        money_json(&[("3000.00", "USD")])
    );
    assert_eq!(
        serde_json::to_value(&alice.stages[0].weighted).unwrap(),
        money_json(&[("300.00", "USD")])
    );
    assert_eq!(alice.stages[3].count, 0);

    let f = serde_json::to_value(
        forecast(&db, &tables, &ForecastQuery::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let months = f["by_month"].as_array().unwrap();
    let keys: Vec<&str> = months.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["2026-05", "2026-06", "2026-07"]);
    assert_eq!(months[0]["count"], 1);
    assert_eq!(months[0]["commit"], json!([]));
    assert_eq!(months[0]["pipeline"], money_json(&[("500.00", "USD")]));
    assert_eq!(months[0]["weighted"], money_json(&[("50.00", "USD")]));
    assert_eq!(months[1]["count"], 2);
    assert_eq!(months[1]["commit"], money_json(&[("2000.00", "EUR")]));
    assert_eq!(
        months[1]["best_case"],
        money_json(&[("2000.00", "EUR"), ("1000.00", "USD")])
    );
    assert_eq!(
        months[1]["pipeline"],
        money_json(&[("2000.00", "EUR"), ("1000.00", "USD")])
    );
    assert_eq!(
        months[1]["weighted"],
        money_json(&[("1500.00", "EUR"), ("500.00", "USD")])
    );
    assert_eq!(months[2]["pipeline"], money_json(&[("3000.00", "USD")]));
    assert_eq!(months[2]["best_case"], json!([]));
    let owners = f["by_owner"].as_array().unwrap();
    let keys: Vec<&str> = owners.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["alice", "bob", "carol"]);
    assert_eq!(owners[0]["count"], 2);
    assert_eq!(owners[0]["commit"], json!([]));
    assert_eq!(owners[0]["best_case"], money_json(&[("1000.00", "USD")]));
    assert_eq!(owners[0]["pipeline"], money_json(&[("4000.00", "USD")]));
    assert_eq!(owners[0]["weighted"], money_json(&[("800.00", "USD")]));
    assert_eq!(owners[1]["commit"], money_json(&[("2000.00", "EUR")]));
    assert_eq!(f["total"]["count"], 4);

    let june = forecast(
        &db,
        &tables,
        &ForecastQuery {
            owner: None,
            from: Some(date("2026-06-01")),
            to: Some(date("2026-06-30")),
        },
    )
    .await
    .unwrap();
    assert_eq!(june.total.count, 2);
    assert_eq!(june.by_month.len(), 1);
    let bob = forecast(
        &db,
        &tables,
        &ForecastQuery {
            owner: Some("bob".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(bob.total.count, 1);

    // Stage history of J: lost, then reopened into its stage before close.
    let j = stage_history(&db, &tables, &oid(10).to_string())
        .await
        .unwrap();
    let stages: Vec<(&str, Option<f64>)> = j.iter().map(|v| (v.stage.as_str(), v.days)).collect();
    assert_eq!(
        stages,
        [
            ("prospecting", Some(15.0)),
            ("closed_lost", Some(35.0)),
            ("prospecting", None)
        ]
    );
    assert_eq!(j[0].entered_at, "2026-01-01T09:00:00.000000Z");
}

async fn analytics_figures(db: ReadDb) {
    let events = scenario();
    let tables = folded(&db, 1, &[&events]).await;

    // Q1 2026: A, B, C won; D, E lost; F (won in July) and J (reopened in Feb) excluded.
    let a = analytics_json(&db, &tables, &q1()).await;
    assert_eq!(a["won_count"], 3);
    assert_eq!(a["lost_count"], 2);
    approx(&a["win_rate"], 0.6);
    assert_eq!(
        a["won_value"],
        money_json(&[("5000.50", "EUR"), ("19000.00", "USD")])
    );
    assert_eq!(
        a["avg_won_deal"],
        money_json(&[("5000.50", "EUR"), ("9500.00", "USD")])
    );
    approx(&a["avg_cycle_days"], 37.0);
    approx(&a["median_cycle_days"], 40.0);
    assert!(a.get("groups").is_none());
    let conv = a["stage_conversion"].as_array().unwrap();
    let conv: Vec<(&str, i64, i64)> = conv
        .iter()
        .map(|c| {
            (
                c["stage"].as_str().unwrap(),
                c["entered"].as_i64().unwrap(),
                c["advanced"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        conv,
        [
            ("prospecting", 4, 3),
            ("qualification", 4, 4),
            ("proposal", 2, 1),
            ("negotiation", 1, 1)
        ]
    );
    approx(&a["stage_conversion"][0]["rate"], 0.75);
    approx(&a["stage_conversion"][2]["rate"], 0.5);
    let days = a["avg_days_in_stage"].as_array().unwrap();
    let expected = [
        ("prospecting", 4, 11.25),
        ("qualification", 4, 17.5),
        ("proposal", 2, 15.0),
        ("negotiation", 1, 40.0),
    ];
    for (d, (stage, visits, avg)) in days.iter().zip(expected) {
        assert_eq!(d["stage"], stage);
        assert_eq!(d["visits"], visits);
        approx(&d["avg_days"], avg);
    }

    // January only: J was lost on Jan 16 and reopened after January, so it counts.
    let jan = analytics(
        &db,
        &tables,
        &AnalyticsQuery {
            from: Some(date("2026-01-01")),
            to: Some(date("2026-01-31")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((jan.figures.won_count, jan.figures.lost_count), (1, 2));
    assert!((jan.figures.win_rate.unwrap() - 1.0 / 3.0).abs() < 1e-9);
    assert!((jan.figures.avg_cycle_days.unwrap() - 65.0 / 3.0).abs() < 1e-9);
    assert_eq!(jan.figures.median_cycle_days, Some(20.0));

    // Open-ended: F counts, J (currently reopened) does not.
    let all = analytics(&db, &tables, &AnalyticsQuery::default())
        .await
        .unwrap();
    assert_eq!((all.figures.won_count, all.figures.lost_count), (4, 2));
    assert_eq!(
        serde_json::to_value(&all.figures.avg_won_deal).unwrap(),
        money_json(&[("5000.50", "EUR"), ("9666.3333", "USD")])
    );

    // A range before anything closed.
    let empty = analytics_json(
        &db,
        &tables,
        &AnalyticsQuery {
            to: Some(date("2025-12-31")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(empty["won_count"], 0);
    assert_eq!(empty["win_rate"], Value::Null);
    assert_eq!(empty["median_cycle_days"], Value::Null);

    // Owner filter.
    let alice = analytics_json(
        &db,
        &tables,
        &AnalyticsQuery {
            owner: Some("alice".into()),
            ..q1()
        },
    )
    .await;
    assert_eq!(
        (alice["won_count"].as_i64(), alice["lost_count"].as_i64()),
        (Some(2), Some(1))
    );
    approx(&alice["win_rate"], 2.0 / 3.0);
    assert_eq!(
        alice["won_value"],
        money_json(&[("5000.50", "EUR"), ("12000.00", "USD")])
    );
    approx(&alice["median_cycle_days"], 40.0);

    // group_by owner.
    let by_owner = analytics_json(
        &db,
        &tables,
        &AnalyticsQuery {
            group_by: Some("owner".into()),
            ..q1()
        },
    )
    .await;
    assert_eq!(by_owner["won_count"], 3);
    let groups = by_owner["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0]["key"], "alice");
    assert_eq!(groups[0]["won_count"], 2);
    assert_eq!(groups[1]["key"], "bob");
    assert_eq!(
        (
            groups[1]["won_count"].as_i64(),
            groups[1]["lost_count"].as_i64()
        ),
        (Some(1), Some(1))
    );
    approx(&groups[1]["win_rate"], 0.5);
    assert_eq!(groups[1]["won_value"], money_json(&[("7000.00", "USD")]));
    approx(&groups[1]["avg_cycle_days"], 35.0);
    approx(&groups[1]["median_cycle_days"], 35.0);

    // group_by stage (stage before close), in pipeline order.
    let by_stage = analytics_json(
        &db,
        &tables,
        &AnalyticsQuery {
            group_by: Some("stage".into()),
            ..q1()
        },
    )
    .await;
    let g: Vec<(&str, i64, i64)> = by_stage["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap(),
                g["won_count"].as_i64().unwrap(),
                g["lost_count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        g,
        [
            ("prospecting", 0, 1),
            ("qualification", 1, 0),
            ("proposal", 1, 1),
            ("negotiation", 1, 0)
        ]
    );

    // group_by month (of the close).
    let by_month = analytics_json(
        &db,
        &tables,
        &AnalyticsQuery {
            group_by: Some("month".into()),
            ..q1()
        },
    )
    .await;
    let g: Vec<(&str, i64, i64)> = by_month["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap(),
                g["won_count"].as_i64().unwrap(),
                g["lost_count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(g, [("2026-01", 1, 1), ("2026-02", 1, 1), ("2026-03", 1, 0)]);

    // Rejected queries.
    let bad = analytics(
        &db,
        &tables,
        &AnalyticsQuery {
            group_by: Some("color".into()),
            ..q1()
        },
    )
    .await;
    assert!(matches!(bad, Err(AnalyticsError::InvalidGroupBy(g)) if g == "color"));
    let bad = analytics(
        &db,
        &tables,
        &AnalyticsQuery {
            from: Some(date("2026-02-01")),
            to: Some(date("2026-01-01")),
            ..Default::default()
        },
    )
    .await;
    assert!(matches!(bad, Err(AnalyticsError::InvalidRange { .. })));
}

async fn batches_match_single_batch(db: ReadDb) {
    let events = scenario();
    let one = folded(&db, 1, &[&events]).await;
    let (first, second) = events.split_at(events.len() / 2);
    let two = folded(&db, 2, &[first, second]).await;
    for tables in [&one, &two] {
        assert_eq!(
            analytics(&db, tables, &q1())
                .await
                .unwrap()
                .figures
                .won_count,
            3
        );
    }
    let snapshot = |t: Tables| {
        let db = db.clone();
        async move {
            json!({
                "board": serde_json::to_value(board(&db, &t, &BoardQuery::default()).await.unwrap()).unwrap(),
                "forecast": serde_json::to_value(forecast(&db, &t, &ForecastQuery::default()).await.unwrap()).unwrap(),
                "owner": analytics_json(&db, &t, &AnalyticsQuery { group_by: Some("owner".into()), ..q1() }).await,
                "stage": analytics_json(&db, &t, &AnalyticsQuery { group_by: Some("stage".into()), ..Default::default() }).await,
                "history": serde_json::to_value(stage_history(&db, &t, &oid(10).to_string()).await.unwrap()).unwrap(),
            })
        }
    };
    assert_eq!(snapshot(one).await, snapshot(two).await);
}

async fn other_streams_are_ignored(db: ReadDb) {
    let tables = folded(&db, 1, &[]).await;
    let mut stray = scenario().remove(0);
    stray.stream_type = "account".into();
    stray.payload = json!({"type": "AccountOpened", "whatever": 1});
    fold_batch(&db, &PipelineProjection, &tables, &[stray], None)
        .await
        .unwrap();
    assert_eq!(
        board(&db, &tables, &BoardQuery::default())
            .await
            .unwrap()
            .count,
        0
    );
}

#[tokio::test]
async fn board_forecast_and_history() {
    on_both_backends(board_and_forecast).await;
}

#[tokio::test]
async fn analytics_from_history() {
    on_both_backends(analytics_figures).await;
}

#[tokio::test]
async fn two_batches_equal_one() {
    on_both_backends(batches_match_single_batch).await;
}

#[tokio::test]
async fn ignores_other_stream_types() {
    on_both_backends(other_streams_are_ignored).await;
}

/// What a rebuild relies on to read the log stream by stream.
#[tokio::test]
async fn folded_stream_by_stream_the_rows_are_the_same() {
    // The scenario as a log would hold it: the opportunities' events
    // interleaved by when they happened, not one opportunity after another.
    let mut events = scenario();
    events.sort_by_key(|event| event.payload["occurred_at"].as_str().map(str::to_string));
    for (position, event) in (1..).zip(&mut events) {
        event.position = position;
    }
    on_both_backends(|db| {
        let events = events.clone();
        async move {
            crm_projection_service::fold::testkit::assert_stream_order_folds_the_same(
                &db,
                &PipelineProjection,
                &events,
            )
            .await;
        }
    })
    .await;
}
