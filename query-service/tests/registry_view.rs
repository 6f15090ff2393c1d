//! The registry view of read-model routes: requests without `min_position`
//! may share a slightly old view of which generation serves at which
//! checkpoint; a request with `min_position` beyond it, or any request after
//! `/v1/projections` reported newer positions, reads the registry again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{append, Deal};
use crm_eventlog::EventLog;
use crm_projection_service::runner::{Runner, RunnerSettings};
use crm_projection_service::{all_projections, registry, ReadDb};
use crm_query_service::auth::{Role, Tokens};
use crm_query_service::QueryState;
use serde_json::Value;

async fn wait_for_pipeline(db: &ReadDb, position: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let active = registry::active(db, "pipeline").await.unwrap();
        if active.is_some_and(|generation| generation.checkpoint >= position) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipeline never reached {position}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_position_and_the_projections_report_see_past_the_registry_view() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    let db = ReadDb::open_sqlite(&dir.path().join("read.db"))
        .await
        .unwrap();
    let runner = Runner::new(
        log.clone(),
        db.clone(),
        all_projections(),
        RunnerSettings::default(),
    );
    runner.install().await.unwrap();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let folding = tokio::spawn(runner.run(stopping));

    let tokens = Arc::new(Tokens::new(&[9u8; 32]).unwrap());
    let token = tokens
        .issue("ann", &[Role::Admin], chrono::Duration::hours(1))
        .unwrap();
    // An hour-long view: every fresh read below is one the rules force.
    let state = QueryState::new(log.clone(), tokens)
        .with_read_models(db.clone())
        .with_registry_ttl(Duration::from_secs(3600));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(async move {
        axum::serve(listener, crm_query_service::routes(state))
            .await
            .unwrap();
    });
    let http = reqwest::Client::new();
    let count = |path: &str| {
        let request = http.get(format!("{base}{path}")).bearer_auth(&token);
        async move {
            let reply = request.send().await.unwrap();
            assert_eq!(reply.status(), 200);
            let body: Value = reply.json().await.unwrap();
            body["count"]
                .as_i64()
                .unwrap_or_else(|| panic!("no count in {body}"))
        }
    };

    assert_eq!(count("/v1/pipeline").await, 0);
    let mut deal = Deal::new();
    let first = append(
        &log,
        "opportunity",
        &deal.stream_id(),
        &deal.open("100.00 USD"),
    )
    .await;
    let first = first.last_position;
    wait_for_pipeline(&db, first).await;
    assert_eq!(
        count("/v1/pipeline").await,
        0,
        "the view is still the one read before"
    );
    assert_eq!(
        count(&format!("/v1/pipeline?min_position={first}")).await,
        1
    );

    let mut other = Deal::new();
    let second = append(
        &log,
        "opportunity",
        &other.stream_id(),
        &other.open("5.00 USD"),
    )
    .await;
    wait_for_pipeline(&db, second.last_position).await;
    assert_eq!(
        count("/v1/pipeline").await,
        1,
        "the view was refreshed at {first}"
    );
    let report = http
        .get(format!("{base}/v1/projections"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), 200);
    assert_eq!(count("/v1/pipeline").await, 2, "read after the report");

    stop.send(true).unwrap();
    folding.await.unwrap();
    serving.abort();
}
