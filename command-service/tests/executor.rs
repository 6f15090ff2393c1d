//! The executor over a real log: command cost does not grow with stream
//! length (cache + snapshots), replicas with stale caches stay correct, and
//! a retry under an idempotency key appends nothing.

use std::time::Duration;

use chrono::Utc;
use crm_command_service::auth::{Actor, Role, DEFAULT_TENANT};
use crm_command_service::executor::{
    CommandContext, CommandError, Executor, IfMatch, Mode, Outcome,
};
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
    create(executor, &context(), id).await.unwrap();
    id
}

async fn create(
    executor: &Executor,
    ctx: &CommandContext,
    id: Uuid,
) -> Result<Outcome, CommandError> {
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
        .execute::<Opportunity>(ctx, id, command, Mode::Create)
        .await
}

async fn advance(executor: &Executor, id: Uuid, step: usize) -> i64 {
    advance_with(executor, &context(), id, step)
        .await
        .unwrap()
        .version
}

async fn advance_with(
    executor: &Executor,
    ctx: &CommandContext,
    id: Uuid,
    step: usize,
) -> Result<Outcome, CommandError> {
    let stages = ["qualification", "proposal", "negotiation", "prospecting"];
    let input = AdvanceOpportunityInput {
        stage: stages[step % stages.len()].into(),
        reason: Some(format!("step {step}")),
        occurred_at: None,
    };
    let command = input.into_command(Utc::now()).unwrap();
    executor
        .execute::<Opportunity>(ctx, id, command, Mode::Update)
        .await
}

async fn versions(log: &EventLog, id: Uuid) -> Vec<i64> {
    log.read_stream(DEFAULT_TENANT, "opportunity", &id.to_string(), 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|event| event.version)
        .collect()
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
    assert_eq!(versions(&log, id).await, vec![1, 2, 3, 4, 5]);

    // A decides on its cache without reading the log; a precondition its
    // stale copy fails is judged again on the log's state before answering.
    assert_eq!(advance(&replica_b, id, 4).await, 6);
    let if_match_6 = CommandContext {
        if_match: Some(IfMatch::Version(6)),
        ..context()
    };
    let outcome = advance_with(&replica_a, &if_match_6, id, 5)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "If-Match 6 holds on the log although A's cache says 5: {:?}",
                error.problem
            )
        });
    assert_eq!(outcome.version, 7);
    assert_eq!(versions(&log, id).await, vec![1, 2, 3, 4, 5, 6, 7]);
}

async fn a_create_of_an_existing_record_is_judged_on_the_log(log: EventLog) {
    let replica_a = Executor::new(log.clone());
    let replica_b = Executor::new(log.clone());
    let id = Uuid::now_v7();
    let body = CommandContext {
        body_hash: "the deal's body".into(),
        ..context()
    };
    let first = create(&replica_a, &body, id).await.unwrap();
    assert_eq!((first.status.as_u16(), first.version), (201, 1));
    // B has never seen the stream: it tries the create as a new stream, the
    // append conflicts, and the log's state answers.
    let again = create(&replica_b, &body, id).await.unwrap();
    assert_eq!(
        (again.status.as_u16(), again.version, again.replayed),
        (200, 1, true),
        "the same create again is answered with the first"
    );
    let other = CommandContext {
        body_hash: "another body".into(),
        ..context()
    };
    let refused = create(&Executor::new(log.clone()), &other, id)
        .await
        .expect_err("a different create of an existing id is refused");
    assert_eq!(refused.problem.status(), 409);
    assert_eq!(versions(&log, id).await, vec![1]);
}

async fn a_retry_is_answered_as_the_first_time(log: EventLog) {
    let replica_a = Executor::new(log.clone());
    let replica_b = Executor::new(log.clone());
    let id = open(&replica_a).await;
    let keyed = CommandContext {
        idempotency_key: Some("advance-once".into()),
        request_hash: "advance to proposal".into(),
        ..context()
    };
    let first = advance_with(&replica_a, &keyed, id, 1).await.unwrap();
    assert_eq!((first.version, first.replayed), (2, false));
    // Already at that stage: the retry decides nothing to append (or is
    // refused), and the key's record answers.
    let retry = advance_with(&replica_a, &keyed, id, 1).await.unwrap();
    assert_eq!((retry.version, retry.replayed), (2, true));
    assert_eq!(advance(&replica_b, id, 2).await, 3);

    // On the stream as it is now, the same command would append again; on
    // either replica (warm or stale) the retry appends nothing and answers
    // what the first time did.
    for replica in [&replica_a, &replica_b, &replica_a] {
        let retry = advance_with(replica, &keyed, id, 1).await.unwrap();
        assert_eq!(
            (retry.version, retry.position, retry.replayed),
            (2, first.position, true)
        );
    }
    assert_eq!(versions(&log, id).await, vec![1, 2, 3]);

    // The same key on a different request is refused, and writes nothing.
    let reused = CommandContext {
        request_hash: "advance to negotiation".into(),
        ..keyed.clone()
    };
    let refused = advance_with(&replica_a, &reused, id, 2)
        .await
        .expect_err("a reused key is refused");
    assert_eq!(refused.problem.status(), 422);
    assert_eq!(versions(&log, id).await, vec![1, 2, 3]);
}

#[tokio::test]
async fn replicas_stay_correct_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    replicas_with_stale_caches_stay_correct(log.clone()).await;
    a_retry_is_answered_as_the_first_time(log.clone()).await;
    a_create_of_an_existing_record_is_judged_on_the_log(log).await;
}

#[tokio::test]
async fn replicas_stay_correct_on_postgres() {
    let Some(db) = PgTestDb::create().await else {
        return;
    };
    let log = EventLog::connect(&db.url).await.unwrap();
    replicas_with_stale_caches_stay_correct(log.clone()).await;
    a_retry_is_answered_as_the_first_time(log.clone()).await;
    a_create_of_an_existing_record_is_judged_on_the_log(log.clone()).await;
    log.close().await;
    db.drop_db().await;
}

/// A reference to a stream this process has written is known to exist
/// without reading the log; any other is read, and a missing one is missing.
#[tokio::test]
async fn references_to_streams_in_the_cache_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    let writer = Executor::new(log.clone());
    let id = open(&writer).await.to_string();
    for _ in 0..3 {
        assert!(writer
            .stream_exists(DEFAULT_TENANT, "opportunity", &id)
            .await
            .unwrap());
    }
    assert_eq!(writer.existence_reads(), 0, "held in the cache");
    // Another tenant's stream of that id is another stream.
    assert!(!writer
        .stream_exists("other", "opportunity", &id)
        .await
        .unwrap());
    assert!(!writer
        .stream_exists(DEFAULT_TENANT, "opportunity", &Uuid::now_v7().to_string())
        .await
        .unwrap());
    assert!(!writer
        .stream_exists(DEFAULT_TENANT, "account", &id)
        .await
        .unwrap());
    assert_eq!(writer.existence_reads(), 3);

    let other_process = Executor::new(log.clone());
    assert!(other_process
        .stream_exists(DEFAULT_TENANT, "opportunity", &id)
        .await
        .unwrap());
    assert_eq!(other_process.existence_reads(), 1, "read from the log");
}
