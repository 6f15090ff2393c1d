//! Time travel over real sockets on SQLite and PostgreSQL: the state between two
//! events, by version, across rebuild pages, and every error answer.

mod common;

use chrono::{DateTime, SecondsFormat, Utc};
use common::{append, tick, Db, Deal, Server};
use crm_domain::opportunity::Opportunity;
use crm_query_service::LiveSettings;
use reqwest::StatusCode;
use serde_json::Value;

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn state(server: &Server, path: &str, query: &[(&str, &str)]) -> (StatusCode, Value) {
    let response = server.get(path).query(query).send().await.expect("send");
    let status = response.status();
    let body = response.json::<Value>().await.expect("json body");
    (status, body)
}

async fn problem(server: &Server, request: reqwest::RequestBuilder, expected: StatusCode) -> Value {
    let _ = server;
    let response = request.send().await.expect("send");
    assert_eq!(response.status(), expected);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem body");
    assert_eq!(body["status"], expected.as_u16());
    body
}

fn fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["field"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn between_two_events(db: Db) {
    let log = db.open().await;
    let server = Server::start(log.clone(), LiveSettings::default()).await;
    let mut deal = Deal::new();
    let id = deal.stream_id();

    let opened = deal.open("12500.00 USD");
    let t1 = append(&log, "opportunity", &id, &opened).await.recorded_at;
    let after_open = deal.state.clone();
    tick().await;
    let advanced = deal.advance("qualification", 60);
    let t2 = append(&log, "opportunity", &id, &advanced)
        .await
        .recorded_at;
    let after_advance = deal.state.clone();
    tick().await;
    let proposed = deal.advance("proposal", 120);
    let t3 = append(&log, "opportunity", &id, &proposed)
        .await
        .recorded_at;
    assert!(
        t1 < t2 && t2 < t3,
        "recorded_at must increase: {t1} {t2} {t3}"
    );

    let path = format!("/v1/streams/opportunity/{id}/state");

    // Exactly at the first event.
    let (status, body) = state(&server, &path, &[("at", &rfc3339(t1))]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(body["state"], serde_json::to_value(&after_open).unwrap());
    assert_eq!(body["state"]["stage"], "prospecting");

    // Between the second and the third event, written with a +07:00 offset.
    let middle = t2 + (t3 - t2) / 2;
    let middle_text = middle
        .with_timezone(&chrono::FixedOffset::east_opt(7 * 3600).unwrap())
        .to_rfc3339_opts(SecondsFormat::Micros, false);
    let (status, body) = state(&server, &path, &[("at", &middle_text)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stream_type"], "opportunity");
    assert_eq!(body["id"], id);
    assert_eq!(body["version"], 2);
    assert_eq!(body["state"]["stage"], "qualification");
    assert_eq!(body["state"], serde_json::to_value(&after_advance).unwrap());
    let recorded_at: DateTime<Utc> = body["recorded_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(recorded_at, t2);
    let as_of: DateTime<Utc> = body["as_of"]["at"].as_str().unwrap().parse().unwrap();
    let sent: DateTime<Utc> = middle_text.parse().unwrap();
    assert_eq!(as_of, sent);
    assert!(t2 < sent && sent < t3);

    // After the last event: the current state.
    let later = rfc3339(Utc::now() + chrono::Duration::hours(1));
    let (status, body) = state(&server, &path, &[("at", &later)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], 3);
    assert_eq!(body["state"], serde_json::to_value(&deal.state).unwrap());

    // By version.
    let (status, body) = state(&server, &path, &[("version", "2")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    assert_eq!(body["as_of"], serde_json::json!({"version": 2}));
    assert_eq!(body["state"], serde_json::to_value(&after_advance).unwrap());
    let recorded_at: DateTime<Utc> = body["recorded_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(recorded_at, t2);
    let (status, body) = state(&server, &path, &[("version", "3")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"]["stage"], "proposal");

    // Before the first event: 404 naming when it began.
    let before = rfc3339(t1 - chrono::Duration::milliseconds(1));
    let body = problem(
        &server,
        server.get(&path).query(&[("at", before.as_str())]),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("did not exist yet"),
        "{body}"
    );

    // Beyond the current version: 404 naming the current version.
    let body = problem(
        &server,
        server.get(&path).query(&[("version", "4")]),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("current version is 3"),
        "{body}"
    );

    // Unknown stream, malformed id, unknown stream type.
    let unknown = format!("/v1/streams/opportunity/{}/state", uuid::Uuid::now_v7());
    problem(
        &server,
        server.get(&unknown).query(&[("version", "1")]),
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        &server,
        server.get(&unknown).query(&[("at", later.as_str())]),
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        &server,
        server
            .get("/v1/streams/opportunity/not-a-uuid/state")
            .query(&[("version", "1")]),
        StatusCode::NOT_FOUND,
    )
    .await;
    let widget = format!("/v1/streams/widget/{id}/state");
    problem(
        &server,
        server.get(&widget).query(&[("version", "1")]),
        StatusCode::NOT_FOUND,
    )
    .await;
    // The same stream id under another type is another stream.
    let as_lead = format!("/v1/streams/lead/{id}/state");
    problem(
        &server,
        server.get(&as_lead).query(&[("version", "1")]),
        StatusCode::NOT_FOUND,
    )
    .await;

    // Both, neither, invalid values: 422 naming the field.
    let body = problem(
        &server,
        server
            .get(&path)
            .query(&[("at", later.as_str()), ("version", "1")]),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), vec!["at", "version"]);
    let body = problem(&server, server.get(&path), StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&body), vec!["at"]);
    for bad in ["0", "-1", "two", "1.5", "99999999999999999999"] {
        let body = problem(
            &server,
            server.get(&path).query(&[("version", bad)]),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(fields(&body), vec!["version"], "version={bad}");
    }
    for bad in ["yesterday", "2026-11-20", "2026-13-01T00:00:00Z"] {
        let body = problem(
            &server,
            server.get(&path).query(&[("at", bad)]),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(fields(&body), vec!["at"], "at={bad}");
    }
    let body = problem(
        &server,
        server
            .get(&path)
            .query(&[("version", "1"), ("colour", "red")]),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(fields(&body), vec!["query"]);

    // min_position: reached answers; unreachable answers 503 (bounded wait).
    let (status, _) = state(&server, &path, &[("version", "1"), ("min_position", "3")]).await;
    assert_eq!(status, StatusCode::OK);

    // Authentication.
    problem(
        &server,
        server.get_anonymous(&path).query(&[("version", "1")]),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    problem(
        &server,
        server
            .get_anonymous(&path)
            .query(&[("version", "1")])
            .bearer_auth("not-a-token"),
        StatusCode::UNAUTHORIZED,
    )
    .await;

    drop(server);
    log.close().await;
    db.finish().await;
}

async fn min_position_times_out(db: Db) {
    let log = db.open().await;
    let live = LiveSettings {
        min_position_timeout: std::time::Duration::from_millis(300),
        ..LiveSettings::default()
    };
    let server = Server::start(log.clone(), live).await;
    let mut deal = Deal::new();
    let id = deal.stream_id();
    append(&log, "opportunity", &id, &deal.open("10.00 EUR")).await;
    let path = format!("/v1/streams/opportunity/{id}/state");
    let body = problem(
        &server,
        server
            .get(&path)
            .query(&[("version", "1"), ("min_position", "50")]),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("position 1"),
        "{body}"
    );
    drop(server);
    log.close().await;
    db.finish().await;
}

/// A stream longer than one rebuild page (500 events).
async fn across_pages(db: Db) {
    let log = db.open().await;
    let server = Server::start(log.clone(), LiveSettings::default()).await;
    let mut deal = Deal::new();
    let id = deal.stream_id();
    let mut first = deal.open("1.00 USD");
    for n in 2..=521 {
        first.extend(deal.reprice(&format!("{n}.00 USD"), n));
    }
    let t_a = append(&log, "opportunity", &id, &first).await.recorded_at;
    let mut at_521 = Opportunity::default();
    for event in &first {
        cqrs_es::Aggregate::apply(&mut at_521, event.clone());
    }
    tick().await;
    let mut second = Vec::new();
    for n in 522..=620 {
        second.extend(deal.reprice(&format!("{n}.00 USD"), n));
    }
    let t_b = append(&log, "opportunity", &id, &second).await.recorded_at;
    assert_eq!(second.len(), 99);

    let path = format!("/v1/streams/opportunity/{id}/state");
    let middle = rfc3339(t_a + (t_b - t_a) / 2);
    let (status, body) = state(&server, &path, &[("at", &middle)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 521);
    assert_eq!(body["state"], serde_json::to_value(&at_521).unwrap());
    assert_eq!(body["state"]["amount"]["amount"], "521.00");

    let (status, body) = state(&server, &path, &[("version", "600")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 600);
    assert_eq!(body["state"]["amount"]["amount"], "600.00");

    let (status, body) = state(&server, &path, &[("version", "620")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], serde_json::to_value(&deal.state).unwrap());

    let body = problem(
        &server,
        server.get(&path).query(&[("version", "621")]),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("current version is 620"),
        "{body}"
    );

    drop(server);
    log.close().await;
    db.finish().await;
}

#[tokio::test]
async fn sqlite_time_travel_between_two_events() {
    between_two_events(Db::sqlite().await).await;
}

#[tokio::test]
async fn postgres_time_travel_between_two_events() {
    if let Some(db) = Db::postgres().await {
        between_two_events(db).await;
    }
}

#[tokio::test]
async fn sqlite_min_position_times_out_with_503() {
    min_position_times_out(Db::sqlite().await).await;
}

#[tokio::test]
async fn postgres_min_position_times_out_with_503() {
    if let Some(db) = Db::postgres().await {
        min_position_times_out(db).await;
    }
}

#[tokio::test]
async fn sqlite_time_travel_across_rebuild_pages() {
    across_pages(Db::sqlite().await).await;
}

#[tokio::test]
async fn postgres_time_travel_across_rebuild_pages() {
    if let Some(db) = Db::postgres().await {
        across_pages(db).await;
    }
}
