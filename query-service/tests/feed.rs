//! The global feed over real sockets on SQLite and PostgreSQL: pages cover every
//! event once, in order, as CloudEvents 1.0; parameter errors name the field.

mod common;

use std::collections::HashSet;

use common::{append, tick, Db, Deal, Server};
use crm_query_service::LiveSettings;
use reqwest::StatusCode;
use serde_json::Value;

async fn page(server: &Server, query: &[(&str, &str)]) -> Value {
    let response = server
        .get("/v1/events")
        .query(query)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("json")
}

async fn problem_fields(
    server: &Server,
    request: reqwest::RequestBuilder,
    status: StatusCode,
) -> Vec<String> {
    let _ = server;
    let response = request.send().await.expect("send");
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("json");
    body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["field"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn pages_cover_everything_once(db: Db) {
    let log = db.open().await;
    let server = Server::start(log.clone(), LiveSettings::default()).await;

    // Empty log.
    let empty = page(&server, &[]).await;
    assert_eq!(empty["events"], serde_json::json!([]));
    assert_eq!(empty["next_after"], 0);
    assert_eq!(empty["head"], 0);

    // Three interleaved deals; 23 events in 17 batches.
    let mut deals = [Deal::new(), Deal::new(), Deal::new()];
    for deal in deals.iter_mut() {
        let events = deal.open("100.00 USD");
        append(&log, "opportunity", &deal.stream_id(), &events).await;
    }
    for (round, stage) in ["qualification", "proposal", "negotiation"]
        .iter()
        .enumerate()
    {
        for deal in deals.iter_mut() {
            let events = deal.advance(stage, round as i64 * 10);
            append(&log, "opportunity", &deal.stream_id(), &events).await;
        }
        tick().await;
    }
    let mut many = Vec::new();
    for n in 0..11 {
        many.extend(deals[0].reprice(&format!("{}.00 USD", 200 + n), 100 + n));
    }
    append(&log, "opportunity", &deals[0].stream_id(), &many[..6]).await;
    append(&log, "opportunity", &deals[0].stream_id(), &many[6..]).await;
    let head = log.head_position().await.unwrap();
    assert_eq!(head, 23);
    let expected = log.read_all(0, 1000).await.unwrap();

    // Page through with limit 7.
    let mut seen = Vec::new();
    let mut after = 0i64;
    let mut pages = 0;
    loop {
        let body = page(&server, &[("after", &after.to_string()), ("limit", "7")]).await;
        pages += 1;
        assert_eq!(body["head"], head);
        let events = body["events"].as_array().unwrap();
        assert!(events.len() <= 7);
        seen.extend(events.iter().cloned());
        let next = body["next_after"].as_i64().unwrap();
        if events.is_empty() {
            assert_eq!(next, after);
            break;
        }
        assert_eq!(next, events.last().unwrap()["position"].as_i64().unwrap());
        after = next;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 5); // 7 + 7 + 7 + 2, then an empty page
    assert_eq!(seen.len(), expected.len());
    let ids: HashSet<&str> = seen.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), seen.len(), "an event was repeated");
    for (cloud, recorded) in seen.iter().zip(&expected) {
        assert_eq!(cloud["specversion"], "1.0");
        assert_eq!(cloud["id"], recorded.event_id.to_string());
        assert_eq!(
            cloud["source"],
            format!("/crm/default/opportunity/{}", recorded.stream_id)
        );
        assert_eq!(
            cloud["type"],
            format!("crm.opportunity.{}", recorded.event_type)
        );
        assert_eq!(cloud["subject"], recorded.stream_id);
        let time: chrono::DateTime<chrono::Utc> = cloud["time"].as_str().unwrap().parse().unwrap();
        assert_eq!(time, recorded.recorded_at);
        assert_eq!(cloud["datacontenttype"], "application/json");
        assert_eq!(cloud["data"], recorded.payload);
        assert_eq!(cloud["position"], recorded.position);
        assert_eq!(cloud["sequence"], format!("{:020}", recorded.position));
        assert_eq!(cloud["streamversion"], recorded.version);
        assert_eq!(cloud["actor"], "alice");
        assert_eq!(cloud["correlationid"], recorded.metadata["correlation_id"]);
        assert_eq!(cloud["causationid"], recorded.metadata["causation_id"]);
        assert!(cloud.get("correlationid").is_some());
    }
    let positions: Vec<i64> = seen
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, (1..=23).collect::<Vec<_>>());

    // Defaults: after 0, limit 100.
    let body = page(&server, &[]).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 23);
    assert_eq!(body["next_after"], 23);
    // After the head: empty, cursor unchanged.
    let body = page(&server, &[("after", "23")]).await;
    assert_eq!(body["events"], serde_json::json!([]));
    assert_eq!(body["next_after"], 23);
    let body = page(&server, &[("after", "1000")]).await;
    assert_eq!(body["next_after"], 1000);
    // Read your writes.
    let body = page(&server, &[("min_position", "23"), ("limit", "1")]).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 1);

    // Invalid parameters name the field.
    for (name, value) in [
        ("limit", "0"),
        ("limit", "1001"),
        ("limit", "-5"),
        ("limit", "ten"),
        ("after", "-1"),
        ("after", "1e3"),
        ("min_position", "-1"),
    ] {
        let fields = problem_fields(
            &server,
            server.get("/v1/events").query(&[(name, value)]),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(fields, vec![name.to_string()], "{name}={value}");
    }
    let fields = problem_fields(
        &server,
        server
            .get("/v1/events")
            .query(&[("after", "-1"), ("limit", "0")]),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields, vec!["after", "limit"]);
    let fields = problem_fields(
        &server,
        server.get("/v1/events").query(&[("offset", "3")]),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(fields, vec!["query"]);
    problem_fields(
        &server,
        server.get_anonymous("/v1/events"),
        StatusCode::UNAUTHORIZED,
    )
    .await;

    drop(server);
    log.close().await;
    db.finish().await;
}

#[tokio::test]
async fn sqlite_feed_pages_cover_every_event_once_in_order() {
    pages_cover_everything_once(Db::sqlite().await).await;
}

#[tokio::test]
async fn postgres_feed_pages_cover_every_event_once_in_order() {
    if let Some(db) = Db::postgres().await {
        pages_cover_everything_once(db).await;
    }
}
