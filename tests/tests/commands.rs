//! The command API's guarantees, checked over HTTP against a real `crm serve`
//! on each event log backend: idempotency, If-Match, concurrency, hostile input.

use crm_tests::{Backend, Server};
use futures::future::join_all;
use serde_json::{json, Value};

fn account_body() -> Value {
    json!({"name": "Acme Corp", "kind": "customer", "industry": "technology", "segment": "b2b", "owner": "alice"})
}

async fn new_account(server: &Server) -> String {
    let reply = server.post("/v1/accounts", &account_body()).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.id()
}

async fn new_opportunity(server: &Server) -> String {
    let account = new_account(server).await;
    let reply = server
        .post(
            "/v1/opportunities",
            &json!({"account_id": account, "name": "Acme renewal", "amount": {"amount": "12500.00", "currency": "USD"},
                    "expected_close": "2026-12-31", "owner": "alice", "stage": "prospecting"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.id()
}

async fn idempotent_retry_appends_once(server: &Server) {
    let before = server.head().await;
    let send = || {
        server.request(
            reqwest::Method::POST,
            "/v1/accounts",
            &server.admin_token,
            |request| {
                request
                    .header("Idempotency-Key", "retry-42")
                    .json(&account_body())
            },
        )
    };
    let first = send().await;
    assert_eq!(first.status, 201, "{first:?}");
    let retries = join_all((0..8).map(|_| send())).await;
    for retry in &retries {
        assert_eq!(retry.status, 201, "{retry:?}");
        assert_eq!(retry.body, first.body, "a retry answers the first outcome");
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(
        server.head().await,
        before + 1,
        "the retries appended nothing"
    );
    assert_eq!(server.events("account", &first.id()).await.len(), 1);

    let other_actor = server.token("mallory", "admin").await.unwrap();
    let foreign = server
        .request(
            reqwest::Method::POST,
            "/v1/accounts",
            &other_actor,
            |request| {
                request
                    .header("Idempotency-Key", "retry-42")
                    .json(&account_body())
            },
        )
        .await;
    assert_eq!(
        foreign.problem(422),
        vec!["Idempotency-Key"],
        "another actor's key never replays its outcome"
    );
    let reused = server
        .request(
            reqwest::Method::POST,
            "/v1/accounts",
            &server.admin_token,
            |request| {
                request
                    .header("Idempotency-Key", "retry-42")
                    .json(&json!({"name": "Other Corp"}))
            },
        )
        .await;
    assert_eq!(reused.problem(422), vec!["Idempotency-Key"]);
    assert_eq!(server.head().await, before + 1);
}

async fn stale_if_match_gets_412_and_appends_nothing(server: &Server) {
    let id = new_opportunity(server).await;
    let advance = |version: &'static str, stage: &'static str| {
        let path = format!("/v1/opportunities/{id}/advance");
        async move {
            server
                .request(
                    reqwest::Method::POST,
                    &path,
                    &server.admin_token,
                    |request| {
                        request
                            .header("If-Match", version)
                            .json(&json!({"stage": stage, "reason": "test"}))
                    },
                )
                .await
        }
    };
    let fresh = advance("\"1\"", "qualification").await;
    assert_eq!(fresh.status, 200, "{fresh:?}");
    assert_eq!(fresh.header("etag"), Some("\"2\""));
    let head = server.head().await;
    let stale = advance("\"1\"", "proposal").await;
    stale.problem(412);
    assert_eq!(server.head().await, head, "a stale command appends nothing");
    assert_eq!(server.events("opportunity", &id).await.len(), 2);
    advance("garbage", "proposal").await.problem(400);
    // `*` asks only that the record exists (RFC 9110): any version passes.
    let any = advance("*", "proposal").await;
    assert_eq!(any.status, 200, "{any:?}");
    assert_eq!(any.header("etag"), Some("\"3\""));
    // ... and a create, whose record cannot exist yet, fails it, appending nothing.
    let head = server.head().await;
    let created = server
        .request(
            reqwest::Method::POST,
            "/v1/accounts",
            &server.admin_token,
            |request| request.header("If-Match", "*").json(&account_body()),
        )
        .await;
    created.problem(412);
    assert_eq!(
        server.head().await,
        head,
        "a failed precondition appends nothing"
    );
}

async fn fifty_concurrent_advances_lose_nothing(server: &Server) {
    let id = new_opportunity(server).await;
    let stages = ["qualification", "proposal", "negotiation", "prospecting"];
    let path = format!("/v1/opportunities/{id}/advance");
    let replies = join_all((0..50).map(|i| {
        let body = json!({"stage": stages[i % stages.len()], "reason": format!("move {i}")});
        let path = path.clone();
        async move { server.post(&path, &body).await }
    }))
    .await;
    let mut acknowledged: Vec<i64> = Vec::new();
    for reply in &replies {
        match reply.status {
            200 => acknowledged.push(reply.body["version"].as_i64().unwrap()),
            // Advancing to the stage it is already in is an illegal move, not a lost write.
            409 => assert!(
                reply.body["detail"].as_str().unwrap().contains("stage"),
                "{reply:?}"
            ),
            other => panic!("unexpected status {other}: {reply:?}"),
        }
    }
    assert!(
        acknowledged.len() >= 25,
        "most advances succeed: {}",
        acknowledged.len()
    );
    let events = server.events("opportunity", &id).await;
    let versions: Vec<i64> = events
        .iter()
        .map(|event| event["version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=events.len() as i64).collect::<Vec<_>>(),
        "versions are contiguous"
    );
    assert_eq!(
        events.len(),
        acknowledged.len() + 1,
        "every acknowledged advance is in the log, and nothing else"
    );
    acknowledged.sort();
    assert_eq!(
        acknowledged,
        (2..=events.len() as i64).collect::<Vec<_>>(),
        "each acknowledgement names its own version"
    );
}

async fn hostile_bodies_get_4xx_and_append_nothing(server: &Server) {
    let account = new_account(server).await;
    let before = server.head().await;
    let deep = format!("{{\"name\":{}1{}}}", "[".repeat(5000), "]".repeat(5000));
    let huge = format!("{{\"name\":\"{}\"}}", "x".repeat(200_000));
    let long_name = json!({"name": "y".repeat(5000), "kind": "customer"}).to_string();
    let cases: Vec<(&str, String, String, u16)> = vec![
        ("/v1/accounts", r#"{"name": 5}"#.into(), "application/json".into(), 422),
        ("/v1/accounts", r#"{"name": "A", "colour": "red"}"#.into(), "application/json".into(), 422),
        ("/v1/accounts", r#"{"name": "A", "kind": "emperor"}"#.into(), "application/json".into(), 422),
        ("/v1/accounts", deep, "application/json".into(), 400),
        ("/v1/accounts", huge, "application/json".into(), 413),
        ("/v1/accounts", long_name, "application/json".into(), 422),
        ("/v1/accounts", "{\"name\": ".into(), "application/json".into(), 400),
        ("/v1/accounts", "[1,2,3]".into(), "application/json".into(), 422),
        ("/v1/accounts", "name=Acme".into(), "application/x-www-form-urlencoded".into(), 415),
        ("/v1/contacts", r#"{"name": "Jane", "email": "not-an-email"}"#.into(), "application/json".into(), 422),
        (
            "/v1/opportunities",
            json!({"account_id": account, "name": "X", "amount": {"amount": 12.5, "currency": "USD"}, "expected_close": "2026-12-31", "owner": "a"}).to_string(),
            "application/json".into(),
            422,
        ),
        (
            "/v1/opportunities",
            json!({"account_id": account, "name": "X", "amount": {"amount": "-1", "currency": "XYZ"}, "expected_close": "2026-13-45", "owner": "a"}).to_string(),
            "application/json".into(),
            422,
        ),
        (
            "/v1/contacts",
            json!({"name": "Jane", "account_id": uuid::Uuid::now_v7()}).to_string(),
            "application/json".into(),
            422,
        ),
        ("/v1/leads", "\u{0}\u{1}".into(), "application/json".into(), 400),
    ];
    for (path, body, content_type, status) in cases {
        let reply = server
            .request(
                reqwest::Method::POST,
                path,
                &server.admin_token,
                |request| {
                    request
                        .header("content-type", content_type.clone())
                        .body(body.clone())
                },
            )
            .await;
        assert_eq!(
            reply.status,
            status,
            "{path} {}: {reply:?}",
            body.chars().take(80).collect::<String>()
        );
        reply.problem(status);
    }
    let invalid_utf8 = server
        .request(
            reqwest::Method::POST,
            "/v1/accounts",
            &server.admin_token,
            |request| {
                request
                    .header("content-type", "application/json")
                    .body(vec![b'{', b'"', 0xff, 0xfe, b'"', b'}'])
            },
        )
        .await;
    invalid_utf8.problem(400);
    assert_eq!(
        server.head().await,
        before,
        "no bad request appended anything"
    );
}

async fn validation_names_every_field_at_fault(server: &Server) {
    let reply = server
        .post(
            "/v1/opportunities",
            &json!({"account_id": new_account(server).await, "name": "", "amount": {"amount": "abc", "currency": "usd!"}, "expected_close": "someday", "owner": "a"}),
        )
        .await;
    let fields = reply.problem(422);
    for field in ["name", "amount.amount", "amount.currency", "expected_close"] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} missing from {fields:?}"
        );
    }
}

async fn repeated_create_with_the_same_id(server: &Server) {
    let id = uuid::Uuid::now_v7().to_string();
    let mut body = account_body();
    body["id"] = json!(id);
    let first = server.post("/v1/accounts", &body).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(
        first.header("location"),
        Some(format!("/v1/accounts/{id}").as_str())
    );
    let head = server.head().await;
    let again = server.post("/v1/accounts", &body).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        (again.id(), &again.body["version"]),
        (id.clone(), &json!(1))
    );
    body["name"] = json!("Someone Else");
    server.post("/v1/accounts", &body).await.problem(409);
    assert_eq!(server.head().await, head, "neither repeat appended");
}

async fn auth_and_roles_are_enforced(server: &Server) {
    let before = server.head().await;
    let anonymous = server
        .http
        .post(server.url("/v1/accounts"))
        .json(&account_body())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    server
        .request(reqwest::Method::POST, "/v1/accounts", "not-a-token", |r| {
            r.json(&account_body())
        })
        .await
        .problem(401);
    let auditor = server.token("audrey", "auditor").await.unwrap();
    server
        .request(reqwest::Method::POST, "/v1/accounts", &auditor, |r| {
            r.json(&account_body())
        })
        .await
        .problem(403);
    let viewer = server.token("vera", "viewer").await.unwrap();
    server
        .request(reqwest::Method::POST, "/v1/accounts", &viewer, |r| {
            r.json(&account_body())
        })
        .await
        .problem(403);
    let support = server.token("sam", "support").await.unwrap();
    server
        .request(reqwest::Method::POST, "/v1/accounts", &support, |r| {
            r.json(&account_body())
        })
        .await
        .problem(403);
    assert_eq!(server.head().await, before);
    let sales = server.token("alice", "sales").await.unwrap();
    let created = server
        .request(reqwest::Method::POST, "/v1/accounts", &sales, |r| {
            r.json(&account_body())
        })
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let events = server.events("account", &created.id()).await;
    assert_eq!(events[0]["metadata"]["actor"], "alice");
    assert_eq!(events[0]["metadata"]["roles"], json!(["sales"]));
}

async fn unknown_records_and_illegal_moves(server: &Server) {
    let missing = uuid::Uuid::now_v7();
    server
        .post(
            &format!("/v1/opportunities/{missing}/advance"),
            &json!({"stage": "proposal"}),
        )
        .await
        .problem(404);
    server
        .post(
            "/v1/opportunities/not-a-uuid/advance",
            &json!({"stage": "proposal"}),
        )
        .await
        .problem(404);
    server
        .get(&format!("/v1/streams/opportunity/{missing}/events"))
        .await
        .problem(404);
    let id = new_opportunity(server).await;
    server
        .post(
            &format!("/v1/opportunities/{id}/advance"),
            &json!({"stage": "warp"}),
        )
        .await
        .problem(422);
    let won = server
        .post(
            &format!("/v1/opportunities/{id}/win"),
            &json!({"close_value": {"amount": "12000.00", "currency": "USD"}}),
        )
        .await;
    assert_eq!(won.status, 200, "{won:?}");
    server
        .post(
            &format!("/v1/opportunities/{id}/advance"),
            &json!({"stage": "proposal"}),
        )
        .await
        .problem(409);
    let no_value = new_opportunity(server).await;
    let fields = server
        .post(&format!("/v1/opportunities/{no_value}/win"), &json!({}))
        .await
        .problem(422);
    assert_eq!(fields, vec!["close_value"]);
}

async fn every_other_command_route_works(server: &Server) {
    let ok = |reply: crm_tests::Reply| {
        assert!(reply.status == 200 || reply.status == 201, "{reply:?}");
        reply
    };
    let lead = ok(server
        .post(
            "/v1/leads",
            &json!({"name": "Nobody", "email": "n@x.example", "source": "event"}),
        )
        .await)
    .id();
    ok(server
        .post(
            &format!("/v1/leads/{lead}/disqualify"),
            &json!({"reason": "no budget"}),
        )
        .await);
    server
        .post(&format!("/v1/leads/{lead}/qualify"), &json!({}))
        .await
        .problem(409);

    let account = new_account(server).await;
    let account_path = format!("/v1/accounts/{account}");
    let patch = |body: Value| {
        let path = account_path.clone();
        async move { server.send(reqwest::Method::PATCH, &path, &body).await }
    };
    ok(
        patch(json!({"industry": "retail", "employees": 120, "website": "https://acme.example"}))
            .await,
    );
    ok(patch(json!({"owner": "bob"})).await);
    ok(patch(json!({"archived": true})).await);
    patch(json!({"industry": "finance"})).await.problem(409);
    ok(patch(json!({"archived": false})).await);
    let types: Vec<String> = server
        .events("account", &account)
        .await
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types,
        [
            "AccountRegistered",
            "AccountDetailsUpdated",
            "AccountOwnerAssigned",
            "AccountArchived",
            "AccountRestored"
        ]
    );

    let contact = ok(server
        .post(
            "/v1/contacts",
            &json!({"account_id": account, "name": "Jane Doe", "email": "jane@acme.example"}),
        )
        .await)
    .id();
    ok(server
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/contacts/{contact}"),
            &json!({"title": "CTO", "preferred_channel": "phone"}),
        )
        .await);
    let task_id = uuid::Uuid::now_v7();
    ok(server
        .post(
            &format!("/v1/contacts/{contact}/activities"),
            &json!({"id": task_id, "kind": "task", "subject": "Send proposal"}),
        )
        .await);
    ok(server
        .post(
            &format!("/v1/contacts/{contact}/tasks/complete"),
            &json!({"activity_id": task_id}),
        )
        .await);
    server
        .post(
            &format!("/v1/contacts/{contact}/tasks/complete"),
            &json!({"activity_id": task_id}),
        )
        .await
        .problem(409);

    let opportunity = new_opportunity(server).await;
    ok(server
        .post(
            &format!("/v1/opportunities/{opportunity}/advance"),
            &json!({"stage": "proposal"}),
        )
        .await);
    ok(server
        .post(
            &format!("/v1/opportunities/{opportunity}/lose"),
            &json!({"reason": "price", "competitor": "Globex"}),
        )
        .await);
    let reopened = ok(server
        .post(
            &format!("/v1/opportunities/{opportunity}/reopen"),
            &json!({"reason": "budget back"}),
        )
        .await);
    assert_eq!(reopened.body["version"], 4);
    let last = server
        .events("opportunity", &opportunity)
        .await
        .pop()
        .unwrap();
    assert_eq!(
        last["payload"]["to"], "proposal",
        "reopens into the stage it was lost from: {last}"
    );

    let case = ok(server
        .post(
            "/v1/cases",
            &json!({"contact_id": contact, "subject": "Broken export", "priority": "urgent"}),
        )
        .await)
    .id();
    ok(server
        .post(
            &format!("/v1/cases/{case}/resolve"),
            &json!({"resolution": "patched"}),
        )
        .await);
    ok(server
        .post(
            &format!("/v1/cases/{case}/reopen"),
            &json!({"reason": "still broken"}),
        )
        .await);
    server
        .post(&format!("/v1/cases/{case}/close"), &json!({}))
        .await
        .problem(409);
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = Server::start(Backend::Sqlite).await.expect("sqlite always starts");
                    super::$name(&server).await;
                    server.finish().await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(server) = Server::start(Backend::Postgres).await else { return };
                    super::$name(&server).await;
                    server.finish().await;
                }
            )*
        }
    };
}

on_both_backends!(
    idempotent_retry_appends_once,
    stale_if_match_gets_412_and_appends_nothing,
    fifty_concurrent_advances_lose_nothing,
    hostile_bodies_get_4xx_and_append_nothing,
    validation_names_every_field_at_fault,
    repeated_create_with_the_same_id,
    auth_and_roles_are_enforced,
    unknown_records_and_illegal_moves,
    every_other_command_route_works,
);
