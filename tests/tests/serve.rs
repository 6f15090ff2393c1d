//! `crm serve` as a user meets it: first start, the README tour, a lead's
//! whole life, the OpenAPI document, and shutdown without losing a write.

use crm_tests::{Backend, Server};
use futures::future::join_all;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_explains_how_to_get_a_token() {
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let printed = server.stdout_lines.join("\n");
    assert!(
        printed.contains("crm token issue"),
        "first start prints how to get a token: {printed}"
    );
    assert!(server.data_dir.path().join("token-secret").exists());
    assert!(server.data_dir.path().join("crm.db").exists());
    let health = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "health needs no token");
    let openapi = server.get("/openapi.json").await;
    assert_eq!(openapi.status, 200);
    for path in [
        "/v1/leads/{id}/convert",
        "/v1/opportunities/{id}/advance",
        "/v1/cases/{id}/resolve",
        "/v1/streams/{stream_type}/{id}/events",
        "/v1/streams/{stream_type}/{id}/state",
        "/v1/events/live",
    ] {
        assert!(
            openapi.body["paths"][path].is_object(),
            "{path} is documented"
        );
    }
    server.finish().await;
}

/// axum copies the router's handlers for every accepted connection, so
/// whatever a handler owns is paid per open connection: the OpenAPI document
/// once was (about a megabyte each, hundreds of MB under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_costs_kilobytes_not_a_copy_of_the_api() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CONNECTIONS: u64 = 200;
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let address = server.base_url.trim_start_matches("http://").to_string();
    let open = |count: u64| {
        let address = address.clone();
        async move {
            let mut connections = Vec::new();
            for _ in 0..count {
                let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: crm\r\n\r\n")
                    .await
                    .unwrap();
                let mut answer = [0u8; 12];
                stream.read_exact(&mut answer).await.unwrap();
                assert_eq!(&answer, b"HTTP/1.1 200", "each connection is served");
                connections.push(stream);
            }
            connections
        }
    };
    // Warm the allocator and the runtime's pools first.
    drop(open(20).await);
    let before = server.rss_kib();
    let connections = open(CONNECTIONS).await;
    let grown = server.rss_kib().saturating_sub(before);
    eprintln!("{CONNECTIONS} open connections: +{grown} KiB");
    assert!(
        grown < CONNECTIONS * 128,
        "{CONNECTIONS} open connections grew crm serve by {grown} KiB"
    );
    drop(connections);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_becomes_a_customer_with_a_won_deal_and_a_resolved_case() {
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let lead = server
        .post("/v1/leads", &json!({"name": "Tran Van B", "company": "Beta Ltd", "email": "b@beta.example", "phone": "+84 90 000 0000", "source": "web_form"}))
        .await;
    assert_eq!(lead.status, 201, "{lead:?}");
    let lead_id = lead.id();
    assert_eq!(
        server
            .post(&format!("/v1/leads/{lead_id}/qualify"), &json!({}))
            .await
            .status,
        200
    );
    let head_before = server.head().await;
    let converted = server
        .post(
            &format!("/v1/leads/{lead_id}/convert"),
            &json!({"opportunity": {"name": "Beta rollout", "amount": {"amount": "12000.00", "currency": "USD"}, "expected_close": "2027-01-31"}}),
        )
        .await;
    assert_eq!(converted.status, 200, "{converted:?}");
    let lead_events = server.events("lead", &lead_id).await;
    let became = &lead_events.last().unwrap()["payload"];
    assert_eq!(became["type"], "LeadConverted");
    let account_id = became["account_id"].as_str().unwrap().to_string();
    let contact_id = became["contact_id"].as_str().unwrap().to_string();
    let opportunity_id = became["opportunity_id"].as_str().unwrap().to_string();
    assert_eq!(server.events("account", &account_id).await.len(), 1);
    assert_eq!(
        server.events("contact", &contact_id).await[0]["payload"]["email"],
        "b@beta.example"
    );
    assert_eq!(server.events("opportunity", &opportunity_id).await.len(), 1);
    assert_eq!(
        server.head().await,
        head_before + 4,
        "lead, account, contact and opportunity in one append"
    );
    let conversion_positions: Vec<i64> = [
        server.events("account", &account_id).await,
        server.events("contact", &contact_id).await,
        server.events("opportunity", &opportunity_id).await,
    ]
    .iter()
    .map(|events| events[0]["position"].as_i64().unwrap())
    .collect();
    assert!(conversion_positions
        .iter()
        .all(|position| *position > head_before && *position <= head_before + 4));

    let call = server
        .post(
            &format!("/v1/contacts/{contact_id}/activities"),
            &json!({"kind": "call", "subject": "Intro call", "occurred_at": "2026-11-20T09:30:00Z", "duration_minutes": 20, "outcome": "interested", "opportunity_id": opportunity_id}),
        )
        .await;
    assert_eq!(call.status, 200, "{call:?}");
    for stage in ["qualification", "proposal", "negotiation"] {
        let moved = server
            .post(
                &format!("/v1/opportunities/{opportunity_id}/advance"),
                &json!({"stage": stage, "reason": "next step"}),
            )
            .await;
        assert_eq!(moved.status, 200, "{moved:?}");
    }
    let patched = server
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/opportunities/{opportunity_id}"),
            &json!({"amount": {"amount": "15000.00", "currency": "USD"}, "owner": "bob"}),
        )
        .await;
    assert_eq!(patched.status, 200, "{patched:?}");
    let won = server
        .post(
            &format!("/v1/opportunities/{opportunity_id}/win"),
            &json!({"close_value": {"amount": "14500.00", "currency": "USD"}}),
        )
        .await;
    assert_eq!(won.status, 200, "{won:?}");
    assert_eq!(won.body["version"], 6);

    let history = server.events("opportunity", &opportunity_id).await;
    let update = history
        .iter()
        .find(|event| event["event_type"] == "OpportunityUpdated")
        .expect("update event");
    let changes = update["payload"]["changes"].as_array().unwrap();
    let amount = changes
        .iter()
        .find(|change| change["field"] == "amount")
        .expect("amount change");
    assert_eq!(
        amount["old"],
        json!({"amount": "12000.00", "currency": "USD"})
    );
    assert_eq!(
        amount["new"],
        json!({"amount": "15000.00", "currency": "USD"})
    );
    assert_eq!(update["metadata"]["actor"], "test-admin");
    assert_eq!(update["metadata"]["command"], "opportunity.update");

    let case = server
        .post("/v1/cases", &json!({"account_id": account_id, "contact_id": contact_id, "subject": "Cannot log in", "description": "SSO loop", "priority": "high", "channel": "email"}))
        .await;
    assert_eq!(case.status, 201, "{case:?}");
    let case_id = case.id();
    for (command, body) in [
        ("assign", json!({"assignee": "bob"})),
        (
            "comment",
            json!({"body": "Looking into it", "public": true}),
        ),
        ("escalate", json!({"reason": "VIP customer"})),
        ("resolve", json!({"resolution": "Reset SSO session"})),
        ("close", json!({})),
    ] {
        let reply = server
            .post(&format!("/v1/cases/{case_id}/{command}"), &body)
            .await;
        assert_eq!(reply.status, 200, "{command}: {reply:?}");
    }
    let opened = &server.events("case", &case_id).await[0]["payload"];
    assert!(
        opened["first_response_due"].is_string() && opened["resolution_due"].is_string(),
        "{opened}"
    );
    server
        .post(
            &format!("/v1/cases/{case_id}/comment"),
            &json!({"body": "late"}),
        )
        .await
        .problem(409);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_no_acknowledged_command() {
    let server = Server::start(Backend::Sqlite).await.unwrap();
    let account = server
        .post("/v1/accounts", &json!({"name": "Durable Inc"}))
        .await
        .id();
    let server = std::sync::Arc::new(tokio::sync::Mutex::new(server));
    let (base_url, token, http) = {
        let guard = server.lock().await;
        (
            guard.base_url.clone(),
            guard.admin_token.clone(),
            guard.http.clone(),
        )
    };
    let senders = (0..200).map(|i| {
        let (base_url, token, http, account) = (base_url.clone(), token.clone(), http.clone(), account.clone());
        async move {
            let body = json!({"account_id": account, "name": format!("Person {i}"), "email": format!("p{i}@durable.example")});
            let reply = http.post(format!("{base_url}/v1/contacts")).bearer_auth(token).json(&body).send().await;
            match reply {
                Ok(response) if response.status() == 201 => response.json::<Value>().await.ok().map(|body| body["id"].as_str().unwrap().to_string()),
                _ => None,
            }
        }
    });
    let stopper = {
        let server = server.clone();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            let status = server.lock().await.stop().await;
            assert!(status.success(), "clean exit on SIGTERM: {status}");
        }
    };
    let (acknowledged, ()) = tokio::join!(join_all(senders), stopper);
    let acknowledged: Vec<String> = acknowledged.into_iter().flatten().collect();
    assert!(
        !acknowledged.is_empty(),
        "some contacts were acknowledged before the stop"
    );
    let server = std::sync::Arc::try_unwrap(server)
        .ok()
        .unwrap()
        .into_inner();
    let server = server.restart().await;
    for id in &acknowledged {
        assert_eq!(
            server.events("contact", id).await.len(),
            1,
            "acknowledged contact {id} survived the restart"
        );
    }
    server.finish().await;
}
