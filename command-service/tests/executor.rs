//! The executor over a real log: command cost does not grow with stream
//! length (cache + snapshots), and replicas with stale caches stay correct.

use std::time::Duration;

use chrono::Utc;
use crm_command_service::auth::{Actor, Role, DEFAULT_TENANT};
use crm_command_service::executor::{CommandContext, Executor, Mode};
use crm_domain::ids::OpportunityId;
use crm_domain::opportunity::{AdvanceOpportunityInput, OpenOpportunityInput, Opportunity};
use crm_domain::values::MoneyInput;
use crm_eventlog::testing::PgTestDb;
use crm_eventlog::EventLog;
use uuid::Uuid;

fn context() -> CommandContext {
    CommandContext {
        actor: Actor {
            name: "tester".into(),
            roles: vec![Role::Admin],
            tenant: DEFAULT_TENANT.into(),
        },
        command: "opportunity.test".into(),
        command_id: Uuid::now_v7(),
        now: Utc::now(),
        idempotency_key: None,
        if_match: None,
        request_id: None,
        correlation_id: None,
        client: None,
        body_hash: Uuid::now_v7().to_string(),
        request_hash: String::new(),
    }
}

async fn open(executor: &Executor) -> Uuid {
    let id = Uuid::now_v7();
    let input = OpenOpportunityInput {
        id: None,
        account_id: Uuid::now_v7(),
        name: "Big deal".into(),
        amount: MoneyInput {
            amount: "100.00".into(),
            currency: "USD".into(),
        },
        expected_close: "2027-01-31".into(),
        owner: Some("alice".into()),
        pipeline: None,
        stage: None,
        occurred_at: None,
    };
    let command = input
        .into_command(OpportunityId::new(id), Utc::now())
        .unwrap();
    executor
        .execute::<Opportunity>(&context(), id, command, Mode::Create)
        .await
        .unwrap();
    id
}

async fn advance(executor: &Executor, id: Uuid, step: usize) -> i64 {
    let stages = ["qualification", "proposal", "negotiation", "prospecting"];
    let input = AdvanceOpportunityInput {
        stage: stages[step % stages.len()].into(),
        reason: Some(format!("step {step}")),
        occurred_at: None,
    };
    let command = input.into_command(Utc::now()).unwrap();
    executor
        .execute::<Opportunity>(&context(), id, command, Mode::Update)
        .await
        .unwrap()
        .version
}

#[tokio::test]
async fn command_cost_does_not_grow_with_stream_length() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    let warm = Executor::new(log.clone());
    let id = open(&warm).await;
    for step in 0..249 {
        advance(&warm, id, step).await;
    }
    assert_eq!(
        warm.events_loaded(),
        0,
        "a warm cache reads no history, only what is new"
    );

    // A cold process starts from the newest snapshot (taken every 100 events).
    let snapshot = async {
        loop {
            match log
                .load_snapshot(DEFAULT_TENANT, "opportunity", &id.to_string())
                .await
                .unwrap()
            {
                Some(snapshot) if snapshot.version >= 200 => break,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), snapshot)
        .await
        .expect("snapshot at version 200");
    let cold = Executor::new(log.clone());
    assert_eq!(advance(&cold, id, 249).await, 251);
    assert!(
        cold.events_loaded() <= 100,
        "cold load replayed {} events of 250",
        cold.events_loaded()
    );
    let loaded = cold
        .load::<Opportunity>(DEFAULT_TENANT, &id.to_string())
        .await
        .unwrap();
    assert_eq!(loaded.version, 251);
}

async fn replicas_with_stale_caches_stay_correct(log: EventLog) {
    let replica_a = Executor::new(log.clone());
    let replica_b = Executor::new(log.clone());
    let id = open(&replica_a).await;
    assert_eq!(advance(&replica_a, id, 0).await, 2);
    // B moves the stream on; A's cached copy is now behind.
    assert_eq!(advance(&replica_b, id, 1).await, 3);
    assert_eq!(advance(&replica_b, id, 2).await, 4);
    assert_eq!(
        advance(&replica_a, id, 3).await,
        5,
        "A catches up from the log before deciding"
    );
    let events = log
        .read_stream(DEFAULT_TENANT, "opportunity", &id.to_string(), 0, 100)
        .await
        .unwrap();
    let versions: Vec<i64> = events.iter().map(|event| event.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn replicas_stay_correct_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    replicas_with_stale_caches_stay_correct(log).await;
}

#[tokio::test]
async fn replicas_stay_correct_on_postgres() {
    let Some(db) = PgTestDb::create().await else {
        return;
    };
    let log = EventLog::connect(&db.url).await.unwrap();
    replicas_with_stale_caches_stay_correct(log.clone()).await;
    log.close().await;
    db.drop_db().await;
}
