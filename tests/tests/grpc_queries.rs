//! The typed gRPC queries end to end, with the generated client: `crm serve
//! --grpc-addr` (commands and queries over one process), and `crm
//! query-service` with `CRM_GRPC_ADDR` in the distributed mode. Answers are
//! checked field by field and against the HTTP route's JSON; auth, roles and
//! validation map onto gRPC codes with the problem document as details.

use std::time::Duration;

use crm_eventlog::testing::PgTestDb;
use crm_proto::v1::command_service_client::CommandServiceClient;
use crm_proto::v1::query_service_client::QueryServiceClient;
use crm_proto::v1::{
    AuditRequest, CommandRequest, CustomerRequest, Money, PipelineBoardRequest, StreamRequest,
    TimelineRequest,
};
use crm_tests::{crm_binary, Backend, Server, Service};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata value"),
    );
    request
}

fn command(stream_type: &str, stream_id: &str, name: &str, body: Value) -> CommandRequest {
    CommandRequest {
        stream_type: stream_type.into(),
        stream_id: stream_id.into(),
        command: name.into(),
        body_json: body.to_string(),
        idempotency_key: String::new(),
        expected_version: None,
    }
}

fn usd(amount: &str) -> Money {
    Money {
        amount: amount.into(),
        currency: "USD".into(),
    }
}

/// The problem document of a failed call, and the fields it names.
fn problem(status: &Status) -> (Value, Vec<String>) {
    let problem: Value = serde_json::from_slice(status.details())
        .unwrap_or_else(|error| panic!("details of {status:?} are not a problem: {error}"));
    let fields = problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|error| error["field"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    (problem, fields)
}

async fn connect(address: &str) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{address}")).expect("endpoint");
    for _ in 0..100 {
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no gRPC server at {address}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_queries_over_crm_serve_grpc() {
    let server = Server::start_with_env(Backend::Sqlite, &[("CRM_GRPC_ADDR", "127.0.0.1:0")])
        .await
        .unwrap();
    let address = server
        .stdout_lines
        .iter()
        .find_map(|line| line.strip_prefix("crm gRPC listening on http://"))
        .unwrap_or_else(|| panic!("no gRPC address in {:?}", server.stdout_lines))
        .trim()
        .to_string();
    let channel = connect(&address).await;
    let commands = CommandServiceClient::new(channel.clone());
    let mut queries = QueryServiceClient::new(channel);
    let admin = server.admin_token.clone();

    // Commands over gRPC: an account, a contact, two opportunities, a call,
    // and an owner change (an audit entry with a field change).
    let execute = |request: CommandRequest| {
        let request = authed(request, &admin);
        let mut commands = commands.clone();
        async move {
            commands
                .execute(request)
                .await
                .unwrap_or_else(|status| panic!("command failed: {status:?}"))
                .into_inner()
        }
    };
    let account = execute(command(
        "account",
        "",
        "register",
        json!({"name": "Acme Corp", "kind": "customer", "industry": "technology", "owner": "alice"}),
    ))
    .await;
    let contact = execute(command(
        "contact",
        "",
        "create",
        json!({"account_id": account.id, "name": "Jane Doe", "email": "jane@acme.example"}),
    ))
    .await;
    let open = |name: &str, amount: &str, stage: &str| {
        command(
            "opportunity",
            "",
            "open",
            json!({"account_id": account.id, "name": name, "amount": {"amount": amount, "currency": "USD"},
                   "expected_close": "2027-03-31", "owner": "alice", "stage": stage}),
        )
    };
    execute(open("Renewal", "1000.00", "proposal")).await;
    execute(open("Upsell", "500.00", "prospecting")).await;
    execute(command(
        "contact",
        &contact.id,
        "log_activity",
        json!({"kind": "call", "subject": "Intro call", "occurred_at": "2026-11-20T09:30:00Z",
               "duration_minutes": 20, "outcome": "interested"}),
    ))
    .await;
    let updated = execute(command(
        "account",
        &account.id,
        "update",
        json!({"owner": "bob"}),
    ))
    .await;
    let position = updated.position;

    // The pipeline board.
    let board = queries
        .get_pipeline_board(authed(
            PipelineBoardRequest {
                min_position: Some(position),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(board.pipeline, "default");
    assert_eq!(board.owner, None);
    assert_eq!(board.count, 2);
    assert_eq!(board.total, [usd("1500.00")]);
    assert_eq!(board.weighted, [usd("550.00")]);
    let stages: Vec<(&str, i64, i64)> = board
        .stages
        .iter()
        .map(|stage| (stage.stage.as_str(), stage.probability, stage.count))
        .collect();
    assert_eq!(
        stages,
        [
            ("prospecting", 10, 1),
            ("qualification", 25, 0),
            ("proposal", 50, 1),
            ("negotiation", 75, 0)
        ]
    );
    assert_eq!(board.stages[2].total, [usd("1000.00")]);
    assert_eq!(board.stages[2].weighted, [usd("500.00")]);
    let filtered = queries
        .get_pipeline_board(authed(
            PipelineBoardRequest {
                owner: Some("nobody".into()),
                min_position: Some(position),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (filtered.count, filtered.owner.as_deref()),
        (0, Some("nobody"))
    );

    // The customer's 360 summary.
    let customer = queries
        .get_customer(authed(
            CustomerRequest {
                account_id: account.id.clone(),
                min_position: Some(position),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(customer.account_id, account.id);
    assert_eq!(customer.name, "Acme Corp");
    assert_eq!(customer.kind, "customer");
    assert_eq!(customer.owner.as_deref(), Some("bob"));
    assert_eq!(customer.industry.as_deref(), Some("technology"));
    assert!(!customer.archived);
    assert_eq!(customer.contacts.len(), 1);
    assert_eq!(customer.contacts[0].id, contact.id);
    assert_eq!(customer.contacts[0].name, "Jane Doe");
    assert_eq!(
        customer.contacts[0].email.as_deref(),
        Some("jane@acme.example")
    );
    let open_opportunities = customer.open_opportunities.expect("open_opportunities");
    assert_eq!(open_opportunities.count, 2);
    assert_eq!(open_opportunities.amount, [usd("1500.00")]);
    assert_eq!((customer.won_count, customer.open_cases), (0, 0));
    let last = customer.last_contact.expect("last_contact");
    assert_eq!(
        (
            last.kind.as_str(),
            last.subject.as_str(),
            last.contact_id.as_str()
        ),
        ("call", "Intro call", contact.id.as_str())
    );
    assert_eq!(last.contact_name.as_deref(), Some("Jane Doe"));
    assert!(last.at.starts_with("2026-11-20T09:30:00"), "{}", last.at);
    assert_eq!(customer.next_task, None);

    // The timeline, page by page, equals the HTTP route's.
    let http = server
        .get_at(
            &format!("/v1/customers/{}/history?limit=500", account.id),
            position,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(http.status, 200, "{http:?}");
    let http_items = http.body["items"].as_array().cloned().unwrap_or_default();
    assert!(http_items.len() >= 4, "{http_items:?}");
    let mut items = Vec::new();
    let mut cursor = None;
    for _ in 0..100 {
        let page = queries
            .get_customer_timeline(authed(
                TimelineRequest {
                    account_id: account.id.clone(),
                    cursor: cursor.clone(),
                    limit: Some(2),
                    min_position: Some(position),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.items.len() <= 2);
        items.extend(page.items);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(items.len(), http_items.len());
    for (typed, json) in items.iter().zip(&http_items) {
        assert_eq!(json["position"], typed.position);
        assert_eq!(json["kind"], typed.kind.as_str());
        assert_eq!(json["event_type"], typed.event_type.as_str());
        assert_eq!(json["summary"], typed.summary.as_str());
        assert_eq!(json["stream_id"], typed.stream_id.as_str());
        let details: Value = serde_json::from_str(&typed.details_json).unwrap();
        assert_eq!(json["details"], details);
    }
    let call = items
        .iter()
        .find(|entry| entry.kind == "activity")
        .expect("the call is on the timeline");
    assert_eq!(call.contact_id.as_deref(), Some(contact.id.as_str()));
    assert_eq!(call.actor.as_deref(), Some("test-admin"));
    let calls = queries
        .get_customer_timeline(authed(
            TimelineRequest {
                contact_id: contact.id.clone(),
                kind: Some("activity".into()),
                min_position: Some(position),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(calls.items.len(), 1);
    assert_eq!(calls.next_cursor, None);

    // The audit trail: the owner change, old -> new.
    let audit = queries
        .list_audit(authed(
            AuditRequest {
                stream_id: Some(account.id.clone()),
                field: Some("owner".into()),
                min_position: Some(position),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.items.len(), 2, "{audit:?}");
    let change = &audit.items[1];
    assert_eq!(change.position, updated.position);
    assert_eq!(change.stream_type, "account");
    assert_eq!(change.stream_id, account.id);
    assert_eq!(change.version, 2);
    assert_eq!(change.actor.as_deref(), Some("test-admin"));
    assert_eq!(change.roles, ["admin"]);
    assert_eq!(change.command.as_deref(), Some("account.update"));
    let owner = change
        .changes
        .iter()
        .find(|change| change.field == "owner")
        .expect("owner change");
    assert_eq!(
        (owner.old_json.as_str(), owner.new_json.as_str()),
        ("\"alice\"", "\"bob\"")
    );
    let paged = queries
        .list_audit(authed(
            AuditRequest {
                stream_id: Some(account.id.clone()),
                limit: Some(1),
                min_position: Some(position),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paged.items.len(), 1);
    assert_eq!(paged.items[0].version, 1);
    let next = queries
        .list_audit(authed(
            AuditRequest {
                stream_id: Some(account.id.clone()),
                cursor: paged.next_cursor.clone(),
                min_position: Some(position),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.items.len(), 1);
    assert_eq!(next.items[0].version, 2);
    assert_eq!(next.next_cursor, None);

    // No token: UNAUTHENTICATED.
    let status = queries
        .get_pipeline_board(Request::new(PipelineBoardRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(problem(&status).0["status"], 401);

    // A viewer reads the board, but not the audit trail: PERMISSION_DENIED.
    let viewer = server.token("vera", "viewer").await.unwrap();
    let board = queries
        .get_pipeline_board(authed(PipelineBoardRequest::default(), &viewer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(board.count, 2);
    let status = queries
        .list_audit(authed(AuditRequest::default(), &viewer))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(problem(&status).0["status"], 403);

    // Bad filters: INVALID_ARGUMENT, the details naming the field.
    let status = queries
        .list_audit(authed(
            AuditRequest {
                from: Some("yesterday".into()),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let (document, fields) = problem(&status);
    assert_eq!(fields, ["from"], "{document}");
    assert_eq!(document["status"], 422);
    let status = queries
        .get_customer_timeline(authed(
            TimelineRequest {
                account_id: account.id.clone(),
                limit: Some(0),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(problem(&status).1, ["limit"]);
    let status = queries
        .get_customer_timeline(authed(TimelineRequest::default(), &admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(problem(&status).1, ["account_id"]);
    // An unknown customer: NOT_FOUND.
    let status = queries
        .get_customer(authed(
            CustomerRequest {
                account_id: uuid::Uuid::now_v7().to_string(),
                min_position: None,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.finish().await;
}

const SECRET: &str = "grpc-queries-test-secret-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_query_service_serves_the_typed_queries_over_grpc() {
    let Some(db) = PgTestDb::create().await else {
        return;
    };
    let env = [
        ("CRM_DATABASE_URL", db.url.as_str()),
        ("CRM_TOKEN_SECRET", SECRET),
    ];
    let migrate = tokio::process::Command::new(crm_binary())
        .arg("migrate")
        .env("CRM_DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(
        migrate.status.success(),
        "crm migrate: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let grpc_addr = format!("127.0.0.1:{grpc_port}");
    let mut query_env = env.to_vec();
    query_env.push(("CRM_GRPC_ADDR", grpc_addr.as_str()));
    let commands = Service::spawn("command-service", &env).await.unwrap();
    let projections = Service::spawn("projection-service", &env).await.unwrap();
    let queries_process = Service::spawn("query-service", &query_env).await.unwrap();
    let token = tokio::process::Command::new(crm_binary())
        .args(["token", "issue", "--actor", "dana", "--role", "admin"])
        .env("CRM_TOKEN_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

    let http = reqwest::Client::new();
    let account: Value = http
        .post(commands.url("/v1/accounts"))
        .bearer_auth(&token)
        .json(&json!({"name": "Acme Corp"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let opened: Value = http
        .post(commands.url("/v1/opportunities"))
        .bearer_auth(&token)
        .json(&json!({"account_id": account["id"], "name": "Deal",
                      "amount": {"amount": "100.00", "currency": "USD"},
                      "expected_close": "2027-01-31", "stage": "proposal"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let position = opened["position"].as_i64().expect("position");
    let opportunity = opened["id"].as_str().expect("id").to_string();

    let mut queries = QueryServiceClient::new(connect(&grpc_addr).await);
    let board = queries
        .get_pipeline_board(authed(
            PipelineBoardRequest {
                min_position: Some(position),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(board.count, 1);
    assert_eq!(board.total, [usd("100.00")]);
    // Raw history reads the log: served by the query service too.
    let history = queries
        .get_stream_events(authed(
            StreamRequest {
                stream_type: "opportunity".into(),
                stream_id: opportunity.clone(),
                min_position: Some(position),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let history: Value = serde_json::from_str(&history.json).unwrap();
    assert_eq!(history["version"], 1);
    assert_eq!(history["events"][0]["event_type"], "OpportunityOpened");
    let status = queries
        .list_audit(authed(
            AuditRequest {
                to: Some("not a time".into()),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(problem(&status).1, ["to"]);

    for service in [queries_process, projections, commands] {
        assert!(service.stop().await.success());
    }
    db.drop_db().await;
}
