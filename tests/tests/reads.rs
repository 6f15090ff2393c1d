//! The read side through `crm serve`: read-your-writes with `min_position`,
//! read models after a scripted scenario, time travel, and which role may
//! read which route.

use crm_tests::{Backend, Reply, Server};
use serde_json::{json, Value};

async fn created(server: &Server, path: &str, body: Value) -> Reply {
    let reply = server.post(path, &body).await;
    assert!(
        reply.status == 201 || reply.status == 200,
        "{path}: {reply:?}"
    );
    reply
}

fn position(reply: &Reply) -> i64 {
    reply.body["position"].as_i64().expect("position")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_their_writes_on_sqlite() {
    reads_see_their_writes_and_the_scenario_adds_up(Server::start(Backend::Sqlite).await.unwrap())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_their_writes_on_postgres() {
    let Some(server) = Server::start(Backend::Postgres).await else {
        return;
    };
    reads_see_their_writes_and_the_scenario_adds_up(server).await;
}

async fn reads_see_their_writes_and_the_scenario_adds_up(server: Server) {
    let account = created(
        &server,
        "/v1/accounts",
        json!({"name": "Acme Corp", "owner": "alice"}),
    )
    .await
    .id();
    let contact = created(
        &server,
        "/v1/contacts",
        json!({"account_id": account, "name": "Jane Doe", "email": "jane@acme.example"}),
    )
    .await
    .id();
    let open = |name: &str, amount: &str, currency: &str, stage: &str| {
        json!({"account_id": account, "name": name, "amount": {"amount": amount, "currency": currency},
               "expected_close": "2027-03-31", "owner": "alice", "stage": stage})
    };
    let big = created(
        &server,
        "/v1/opportunities",
        open("Big", "1000.00", "USD", "proposal"),
    )
    .await
    .id();
    let _small = created(
        &server,
        "/v1/opportunities",
        open("Small", "200.00", "USD", "prospecting"),
    )
    .await
    .id();
    let euro = created(
        &server,
        "/v1/opportunities",
        open("Euro", "500.00", "EUR", "proposal"),
    )
    .await
    .id();
    let lost = created(
        &server,
        "/v1/opportunities",
        open("Lost", "300.00", "USD", "qualification"),
    )
    .await
    .id();
    created(
        &server,
        &format!("/v1/opportunities/{lost}/lose"),
        json!({"reason": "price"}),
    )
    .await;
    let call = created(&server, &format!("/v1/contacts/{contact}/activities"),
        json!({"kind": "call", "subject": "Pricing", "occurred_at": "2026-11-20T09:30:00Z", "opportunity_id": big})).await;
    let case = created(&server, "/v1/cases", json!({"account_id": account, "contact_id": contact, "subject": "Login loop", "priority": "urgent"})).await.id();
    let moved = created(
        &server,
        &format!("/v1/opportunities/{euro}/advance"),
        json!({"stage": "negotiation"}),
    )
    .await;
    let head = position(&moved);

    // Read your writes: each read waits for its projection to reach the position.
    let record = server
        .get(&format!("/v1/opportunities/{euro}?min_position={head}"))
        .await;
    assert_eq!(record.status, 200, "{record:?}");
    assert_eq!(record.body["stage"], "negotiation", "{}", record.body);

    let board = server
        .get(&format!("/v1/pipeline?min_position={head}"))
        .await;
    assert_eq!(board.status, 200, "{board:?}");
    let stage = |name: &str| {
        board.body["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(stage("proposal")["count"], 1);
    assert_eq!(stage("negotiation")["count"], 1);
    assert_eq!(stage("prospecting")["count"], 1);
    assert_eq!(
        stage("qualification")["count"],
        0,
        "the lost deal left the board"
    );
    let board_text = board.body.to_string();
    assert!(
        board_text.contains("EUR") && board_text.contains("USD"),
        "currencies are kept apart: {board_text}"
    );

    let summary = server
        .get(&format!("/v1/customers/{account}?min_position={head}"))
        .await;
    assert_eq!(summary.status, 200, "{summary:?}");
    assert_eq!(
        summary.body["open_opportunities"]["count"], 3,
        "{}",
        summary.body
    );
    assert_eq!(summary.body["open_cases"], 1, "{}", summary.body);
    assert_eq!(
        summary.body["last_contact"]["kind"], "call",
        "{}",
        summary.body
    );

    let timeline = server
        .get(&format!(
            "/v1/contacts/{contact}/history?min_position={head}"
        ))
        .await;
    assert_eq!(timeline.status, 200, "{timeline:?}");
    assert!(timeline.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["position"] == position(&call)));

    let sla = server
        .get(&format!("/v1/service-levels?min_position={head}"))
        .await;
    assert_eq!(sla.status, 200, "{sla:?}");
    assert!(
        sla.body["cases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == case.as_str()),
        "{}",
        sla.body
    );

    let audit = server
        .get(&format!("/v1/audit?stream_id={lost}&min_position={head}"))
        .await;
    assert_eq!(audit.status, 200, "{audit:?}");
    let entries = audit.body["items"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "opened and lost");
    assert!(
        entries[1]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["field"] == "status" && c["new"] == "lost"),
        "{}",
        entries[1]
    );
    assert_eq!(entries[1]["actor"], "test-admin");

    let export = server
        .http
        .get(server.url(&format!(
            "/v1/audit/export?format=jsonl&min_position={head}"
        )))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    assert_eq!(
        export.text().await.unwrap().lines().count() as i64,
        head,
        "one exported line per event"
    );

    // A position the log has not reached: 503 naming where the model stands, never stale data.
    let ahead = server
        .get(&format!("/v1/pipeline?min_position={}", head + 1000))
        .await;
    ahead.problem(503);
    assert!(
        ahead.body["detail"]
            .as_str()
            .unwrap()
            .contains(&head.to_string()),
        "{}",
        ahead.body
    );

    let projections = server.get("/v1/projections").await;
    let statuses = projections.body["projections"].as_array().unwrap();
    assert_eq!(statuses.len(), 5, "{}", projections.body);
    assert!(
        statuses
            .iter()
            .all(|p| p["head"] == head && p["error"].is_null()),
        "{}",
        projections.body
    );
    // Positions are published to /metrics once a second.
    let wanted = format!("crm_projection_position{{projection=\"audit\"}} {head}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let metrics = server.get("/metrics").await;
        assert_eq!(metrics.status, 200);
        let text = metrics.body.as_str().unwrap();
        if text.contains(&wanted) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_and_the_feed_through_crm_serve() {
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let account = created(&server, "/v1/accounts", json!({"name": "Acme Corp"}))
        .await
        .id();
    let id = created(&server, "/v1/opportunities", json!({"account_id": account, "name": "Deal", "amount": {"amount": "10.00", "currency": "USD"}, "expected_close": "2027-01-31"})).await.id();
    created(
        &server,
        &format!("/v1/opportunities/{id}/advance"),
        json!({"stage": "qualification"}),
    )
    .await;
    let events = server.events("opportunity", &id).await;
    let between = events[1]["recorded_at"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    created(
        &server,
        &format!("/v1/opportunities/{id}/advance"),
        json!({"stage": "proposal"}),
    )
    .await;
    let at = server
        .get(&format!(
            "/v1/streams/opportunity/{id}/state?at={}",
            between.replace('+', "%2B")
        ))
        .await;
    assert_eq!(at.status, 200, "{at:?}");
    assert_eq!(at.body["version"], 2);
    assert_eq!(at.body["state"]["stage"], "qualification", "{}", at.body);
    let head = server.head().await;
    let history = server
        .get(&format!(
            "/v1/streams/opportunity/{id}/events?min_position={head}"
        ))
        .await;
    assert_eq!(
        history.status, 200,
        "raw history takes min_position too: {history:?}"
    );
    let fields = server
        .get(&format!(
            "/v1/streams/opportunity/{id}/events?min_position=-1"
        ))
        .await
        .problem(422);
    assert_eq!(fields, vec!["min_position"]);
    let unknown = uuid::Uuid::now_v7();
    server
        .get(&format!(
            "/v1/customers/{unknown}/history?min_position={head}"
        ))
        .await
        .problem(404);
    server
        .get(&format!(
            "/v1/contacts/{unknown}/history?min_position={head}"
        ))
        .await
        .problem(404);
    server.get("/v1/accounts/%FF").await.problem(400);
    server.get("/v1/streams/%FF/x/events").await.problem(400);
    let beyond = server.get("/v1/events?after=1000000").await;
    assert_eq!(
        beyond.body["head"], head,
        "the feed reports the real head: {}",
        beyond.body
    );
    let feed = server.get("/v1/events?after=0&limit=10").await;
    assert_eq!(feed.status, 200);
    let kinds: Vec<&str> = feed.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "crm.account.AccountRegistered",
            "crm.opportunity.OpportunityOpened",
            "crm.opportunity.OpportunityStageAdvanced",
            "crm.opportunity.OpportunityStageAdvanced"
        ]
    );
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reads_only_what_it_may() {
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let account = created(&server, "/v1/accounts", json!({"name": "Acme Corp"}))
        .await
        .id();
    let contact = created(
        &server,
        "/v1/contacts",
        json!({"account_id": account, "name": "Jane"}),
    )
    .await
    .id();
    let opportunity = created(
        &server,
        "/v1/opportunities",
        json!({"account_id": account, "name": "Deal",
        "amount": {"amount": "1.00", "currency": "USD"}, "expected_close": "2027-01-31"}),
    )
    .await
    .id();
    let case = created(
        &server,
        "/v1/cases",
        json!({"account_id": account, "subject": "Help"}),
    )
    .await
    .id();
    let lead = created(
        &server,
        "/v1/leads",
        json!({"name": "Lee", "email": "lee@x.example"}),
    )
    .await
    .id();
    let head = server.head().await;
    let mut routes = vec![
        ("pipeline", format!("/v1/pipeline?min_position={head}")),
        ("pipeline", "/v1/pipeline/forecast".to_string()),
        ("pipeline", "/v1/pipeline/analytics".to_string()),
        (
            "customers",
            format!("/v1/customers/{account}?min_position={head}"),
        ),
        ("customers", format!("/v1/customers/{account}/history")),
        ("customers", format!("/v1/contacts/{contact}/history")),
        ("service_levels", "/v1/service-levels".to_string()),
        ("service_levels", "/v1/service-levels/stats".to_string()),
        ("audit", "/v1/audit".to_string()),
        ("audit", "/v1/audit/export?format=csv".to_string()),
        ("log", format!("/v1/streams/account/{account}/events")),
        (
            "log",
            format!("/v1/streams/account/{account}/state?version=1"),
        ),
        ("log", "/v1/events".to_string()),
        ("log", "/v1/events/live".to_string()),
        ("projections", "/v1/projections".to_string()),
        ("projections", "/metrics".to_string()),
    ];
    for (collection, id) in [
        ("leads", &lead),
        ("accounts", &account),
        ("contacts", &contact),
        ("opportunities", &opportunity),
        ("cases", &case),
    ] {
        routes.push(("records", format!("/v1/{collection}")));
        routes.push((
            "records",
            format!("/v1/{collection}/{id}?min_position={head}"),
        ));
    }
    let allowed = |role: &str, area: &str| match role {
        "admin" | "auditor" => true,
        "viewer" => !matches!(area, "audit" | "log"),
        "sales" => matches!(area, "pipeline" | "records" | "customers" | "projections"),
        "support" => matches!(
            area,
            "records" | "customers" | "service_levels" | "projections"
        ),
        _ => false,
    };
    // The live feed never ends by itself: judge it by its status line alone.
    let status_of = |path: String, token: String| {
        let request = server.http.get(server.url(&path)).bearer_auth(token);
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    for role in ["admin", "sales", "support", "viewer", "auditor"] {
        let token = server.token(&format!("{role}-user"), role).await.unwrap();
        for (area, path) in &routes {
            let expected = if allowed(role, area) { 200 } else { 403 };
            if path.ends_with("/live") {
                assert_eq!(
                    status_of(path.clone(), token.clone()).await,
                    expected,
                    "{role} reads {path}"
                );
                continue;
            }
            let reply = server
                .request(reqwest::Method::GET, path, &token, |r| r)
                .await;
            if expected == 200 {
                assert_eq!(reply.status, 200, "{role} reads {path}: {reply:?}");
            } else {
                reply.problem(403);
            }
        }
    }
    for (_, path) in &routes {
        let anonymous = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path} needs a token");
    }
    server.finish().await;
}

/// The board is computed once per state of the pipeline read model and
/// shared by the requests that find it there: each write must still show at
/// once to a reader that asks for its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_follows_every_write_although_it_is_shared() {
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let account = created(&server, "/v1/accounts", json!({"name": "Initech"}))
        .await
        .id();
    let mut last = 0;
    let mut deals = Vec::new();
    for n in 1..=3 {
        let reply = created(
            &server,
            "/v1/opportunities",
            json!({"account_id": account, "name": format!("Deal {n}"),
                   "amount": {"amount": "100.00", "currency": "USD"},
                   "expected_close": "2027-03-31", "owner": "alice"}),
        )
        .await;
        deals.push(reply.id());
        last = position(&reply);
        for _ in 0..2 {
            // The second read is served from what the first computed.
            let board = server
                .get(&format!("/v1/pipeline?min_position={last}"))
                .await;
            assert_eq!(board.status, 200, "{board:?}");
            assert_eq!(board.body["count"], n, "{:?}", board.body);
        }
    }
    let advanced = created(
        &server,
        &format!("/v1/opportunities/{}/advance", deals[0]),
        json!({"stage": "proposal"}),
    )
    .await;
    assert!(position(&advanced) > last);
    let board = server
        .get(&format!(
            "/v1/pipeline?min_position={}",
            position(&advanced)
        ))
        .await;
    let stages = board.body["stages"].as_array().expect("stages");
    let count = |stage: &str| {
        stages
            .iter()
            .find(|s| s["stage"] == stage)
            .map(|s| s["count"].clone())
    };
    assert_eq!(count("prospecting"), Some(json!(2)), "{:?}", board.body);
    assert_eq!(count("proposal"), Some(json!(1)), "{:?}", board.body);
    let mine = server.get("/v1/pipeline?owner=bob").await;
    assert_eq!(
        mine.body["count"], 0,
        "owner is part of the key: {:?}",
        mine.body
    );
    server.finish().await;
}

/// Timeline pages are shared like the board: each new activity shows at once
/// to a reader asking for its position, on a page read twice in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_follows_every_write_although_it_is_shared() {
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let account = created(&server, "/v1/accounts", json!({"name": "Hooli"}))
        .await
        .id();
    let contact = created(
        &server,
        "/v1/contacts",
        json!({"account_id": account, "name": "Gavin", "email": "gavin@hooli.example"}),
    )
    .await
    .id();
    let mut previous: Option<usize> = None;
    for n in 1..=3 {
        let logged = created(
            &server,
            &format!("/v1/contacts/{contact}/activities"),
            json!({"kind": "call", "subject": format!("call {n}")}),
        )
        .await;
        let path = format!(
            "/v1/contacts/{contact}/history?min_position={}",
            position(&logged)
        );
        let first = server.get(&path).await;
        let second = server.get(&path).await;
        assert_eq!(first.status, 200, "{first:?}");
        assert_eq!(
            first.body, second.body,
            "the same state reads the same page"
        );
        let items = first.body["items"].as_array().expect("items").len();
        if let Some(previous) = previous {
            assert_eq!(items, previous + 1, "call {n} shows: {:?}", first.body);
        }
        previous = Some(items);
    }
    server.finish().await;
}
