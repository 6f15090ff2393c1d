//! The gRPC front end to end: a real App over an SQLite log, projections
//! running into an SQLite read database, `crm_command_service::grpc::serve` on
//! a real socket, and the generated clients of `crm-proto`.

use std::sync::Arc;
use std::time::Duration;

use crm_command_service::grpc::{self, COMMANDS};
use crm_command_service::{App, Executor, Role, Tokens};
use crm_eventlog::EventLog;
use crm_projection_service::runner::{Runner, RunnerSettings};
use crm_projection_service::{all_projections, ReadDb};
use crm_proto::v1::command_service_client::CommandServiceClient;
use crm_proto::v1::query_service_client::QueryServiceClient;
use crm_proto::v1::{CommandReply, CommandRequest, GetRecordRequest, StreamRequest};
use crm_query_service::{LiveSettings, QueryState};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use uuid::Uuid;

struct Harness {
    commands: CommandServiceClient<Channel>,
    queries: QueryServiceClient<Channel>,
    tokens: Arc<Tokens>,
    admin: String,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_sqlite(&dir.path().join("events.db"))
        .await
        .unwrap();
    let read = ReadDb::open_sqlite(&dir.path().join("read.db"))
        .await
        .unwrap();
    let tokens = Arc::new(Tokens::new(&[7u8; 32]).unwrap());
    let app = App {
        executor: Arc::new(Executor::new(log.clone())),
        tokens: tokens.clone(),
    };
    let runner = Runner::new(
        log.clone(),
        read.clone(),
        all_projections(),
        RunnerSettings {
            poll_interval: Duration::from_millis(50),
            ..Default::default()
        },
    );
    runner.install().await.unwrap();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(runner.run(stopping.clone()));
    let live = LiveSettings {
        min_position_timeout: Duration::from_millis(300),
        ..LiveSettings::default()
    };
    let queries = QueryState::new(log.clone(), tokens.clone())
        .with_read_models(read)
        .with_live(live);
    // As `crm serve` mounts them: commands and queries in one router.
    let routes = crm_service_kit::http::stack(
        crm_command_service::routes(app).merge(crm_query_service::routes(queries)),
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut stopping_server = stopping;
    let server = tokio::spawn(grpc::serve(listener, routes.clone(), routes, async move {
        let _ = stopping_server.wait_for(|stop| *stop).await;
    }));
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let admin = tokens
        .issue("alice", &[Role::Admin], chrono::Duration::hours(1))
        .unwrap();
    Harness {
        commands: CommandServiceClient::new(channel.clone()),
        queries: QueryServiceClient::new(channel),
        tokens,
        admin,
        stop,
        server,
        _dir: dir,
    }
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
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

/// The problem+json document carried in the status details.
fn problem(status: &Status) -> Value {
    serde_json::from_slice(status.details())
        .unwrap_or_else(|error| panic!("details of {status:?} are not a problem document: {error}"))
}

fn fields(status: &Status) -> Vec<String> {
    problem(status)["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|error| error["field"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

impl Harness {
    async fn execute(&mut self, request: CommandRequest) -> Result<CommandReply, Status> {
        let token = self.admin.clone();
        self.commands
            .execute(authed(request, &token))
            .await
            .map(|reply| reply.into_inner())
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.server.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn commands_and_queries_over_grpc_share_the_http_rules() {
    let mut h = start().await;

    // Register an account (the server picks the id).
    let account = h
        .execute(command("account", "", "register", json!({"name": "Acme"})))
        .await
        .unwrap();
    let account_id = Uuid::parse_str(&account.id).expect("a UUID id");
    assert_eq!(account.version, 1);
    assert!(account.position > 0);

    // Open an opportunity on it, with a client-chosen id as stream_id.
    let opportunity_id = Uuid::now_v7().to_string();
    let opened = h
        .execute(command(
            "opportunity",
            &opportunity_id,
            "open",
            json!({
                "account_id": account_id,
                "name": "Big deal",
                "amount": {"amount": "1000.00", "currency": "USD"},
                "expected_close": "2027-01-31"
            }),
        ))
        .await
        .unwrap();
    assert_eq!(opened.id, opportunity_id);
    assert_eq!(opened.version, 1);

    // Advance with expected_version and an idempotency key.
    let advance = CommandRequest {
        expected_version: Some(1),
        idempotency_key: "advance-1".into(),
        ..command(
            "opportunity",
            &opportunity_id,
            "advance",
            json!({"stage": "qualification"}),
        )
    };
    let advanced = h.execute(advance.clone()).await.unwrap();
    assert_eq!(advanced.version, 2);
    assert!(advanced.position > opened.position);

    // The same call again is a replay: same reply, flagged, nothing appended.
    let token = h.admin.clone();
    let replay = h
        .commands
        .execute(authed(advance.clone(), &token))
        .await
        .unwrap();
    assert_eq!(
        replay
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    assert_eq!(replay.into_inner(), advanced);

    // A stale expected_version: FAILED_PRECONDITION with the 412 problem.
    let stale = h
        .execute(CommandRequest {
            expected_version: Some(1),
            ..command(
                "opportunity",
                &opportunity_id,
                "advance",
                json!({"stage": "proposal"}),
            )
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert_eq!(problem(&stale)["status"], 412);
    assert_eq!(stale.message(), problem(&stale)["detail"].as_str().unwrap());

    // Validation: INVALID_ARGUMENT whose details name the field.
    let wrong_type = h
        .execute(command("account", "", "register", json!({"name": 42})))
        .await
        .unwrap_err();
    assert_eq!(wrong_type.code(), Code::InvalidArgument, "{wrong_type:?}");
    assert_eq!(problem(&wrong_type)["status"], 422);
    assert_eq!(fields(&wrong_type), ["name"]);
    let bad_stage = h
        .execute(command(
            "opportunity",
            &opportunity_id,
            "advance",
            json!({"stage": "nowhere"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_stage.code(), Code::InvalidArgument, "{bad_stage:?}");
    assert_eq!(fields(&bad_stage), ["stage"]);
    let not_json = h
        .execute(CommandRequest {
            body_json: "{\"name\":".into(),
            ..command("account", "", "register", json!({}))
        })
        .await
        .unwrap_err();
    assert_eq!(not_json.code(), Code::InvalidArgument);
    assert_eq!(problem(&not_json)["status"], 400);
    let bad_key = h
        .execute(CommandRequest {
            idempotency_key: "has space".into(),
            ..command("account", "", "register", json!({"name": "Acme"}))
        })
        .await
        .unwrap_err();
    assert_eq!(bad_key.code(), Code::InvalidArgument);
    assert_eq!(fields(&bad_key), ["Idempotency-Key"]);

    // A body id that contradicts stream_id.
    let contradicting = h
        .execute(command(
            "account",
            &Uuid::now_v7().to_string(),
            "register",
            json!({"id": Uuid::now_v7(), "name": "Acme"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(contradicting.code(), Code::InvalidArgument);
    assert_eq!(fields(&contradicting), ["stream_id"]);

    // Unknown command, unknown stream type, missing stream id: named fields.
    let unknown = h
        .execute(command(
            "opportunity",
            &opportunity_id,
            "explode",
            json!({}),
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(fields(&unknown), ["command"]);
    let unknown_type = h
        .execute(command("pet", "", "adopt", json!({})))
        .await
        .unwrap_err();
    assert_eq!(fields(&unknown_type), ["stream_type"]);
    let no_id = h
        .execute(command("opportunity", "", "win", json!({})))
        .await
        .unwrap_err();
    assert_eq!(fields(&no_id), ["stream_id"]);

    // Not found; a conflicting re-create (409) is ABORTED.
    let missing = h
        .execute(command(
            "opportunity",
            &Uuid::now_v7().to_string(),
            "advance",
            json!({"stage": "proposal"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let not_a_uuid = h
        .execute(command("case", "nope", "close", json!({})))
        .await
        .unwrap_err();
    assert_eq!(not_a_uuid.code(), Code::NotFound, "{not_a_uuid:?}");
    let conflict = h
        .execute(command(
            "account",
            &account.id,
            "register",
            json!({"name": "Another name"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::Aborted, "{conflict:?}");
    assert_eq!(problem(&conflict)["status"], 409);

    // Auth: no token, a bad token, a role that may not send commands.
    let register = command("account", "", "register", json!({"name": "Acme"}));
    let anonymous = h
        .commands
        .execute(Request::new(register.clone()))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert_eq!(problem(&anonymous)["status"], 401);
    let forged = h
        .commands
        .execute(authed(register.clone(), "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated);
    let viewer = h
        .tokens
        .issue("victor", &[Role::Viewer], chrono::Duration::hours(1))
        .unwrap();
    let denied = h
        .commands
        .execute(authed(register.clone(), &viewer))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(problem(&denied)["status"], 403);

    // Raw history from the log.
    let token = h.admin.clone();
    let history = h
        .queries
        .get_stream_events(authed(
            StreamRequest {
                stream_type: "opportunity".into(),
                stream_id: opportunity_id.clone(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let history: Value = serde_json::from_str(&history.json).unwrap();
    assert_eq!(history["version"], 2);
    let versions: Vec<i64> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2]);
    let page = h
        .queries
        .get_stream_events(authed(
            StreamRequest {
                stream_type: "opportunity".into(),
                stream_id: opportunity_id.clone(),
                after_version: 0,
                limit: 1,
                min_position: Some(advanced.position),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let page: Value = serde_json::from_str(&page.json).unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_after_version"], 1);
    let bad_limit = h
        .queries
        .get_stream_events(authed(
            StreamRequest {
                stream_type: "opportunity".into(),
                stream_id: opportunity_id.clone(),
                limit: 5000,
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_limit.code(), Code::InvalidArgument);
    assert_eq!(fields(&bad_limit), ["limit"]);
    // Viewers do not read the raw log.
    let log_denied = h
        .queries
        .get_stream_events(authed(
            StreamRequest {
                stream_type: "opportunity".into(),
                stream_id: opportunity_id.clone(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(log_denied.code(), Code::PermissionDenied);

    // A record from the read models, reading our own write.
    let record = h
        .queries
        .get_record(authed(
            GetRecordRequest {
                collection: "opportunities".into(),
                id: opportunity_id.clone(),
                min_position: Some(advanced.position),
            },
            &viewer,
        ))
        .await
        .unwrap()
        .into_inner();
    let record: Value = serde_json::from_str(&record.json).unwrap();
    assert_eq!(record["id"], json!(opportunity_id));
    assert_eq!(record["stage"], "qualification");
    assert_eq!(record["version"], 2);
    let by_stream_type = h
        .queries
        .get_record(authed(
            GetRecordRequest {
                collection: "account".into(),
                id: account.id.clone(),
                min_position: Some(advanced.position),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let by_stream_type: Value = serde_json::from_str(&by_stream_type.json).unwrap();
    assert_eq!(by_stream_type["name"], "Acme");
    let no_record = h
        .queries
        .get_record(authed(
            GetRecordRequest {
                collection: "cases".into(),
                id: Uuid::now_v7().to_string(),
                min_position: None,
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(no_record.code(), Code::NotFound);
    let bad_collection = h
        .queries
        .get_record(authed(
            GetRecordRequest {
                collection: "pipeline".into(),
                id: "x".into(),
                min_position: None,
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_collection.code(), Code::InvalidArgument);
    assert_eq!(fields(&bad_collection), ["collection"]);
    // A position the log has not reached: UNAVAILABLE after the bounded wait.
    let future = h
        .queries
        .get_record(authed(
            GetRecordRequest {
                collection: "opportunities".into(),
                id: opportunity_id.clone(),
                min_position: Some(advanced.position + 1_000_000),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(future.code(), Code::Unavailable, "{future:?}");
    let unauthenticated = h
        .queries
        .get_record(Request::new(GetRecordRequest {
            collection: "opportunities".into(),
            id: opportunity_id.clone(),
            min_position: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    h.stop().await;
}

/// Every command of the table reaches its HTTP handler: never "no such route"
/// or "method not allowed", whatever the handler then says about the body.
#[tokio::test]
async fn every_command_of_the_table_has_a_route() {
    let mut h = start().await;
    for (stream_type, commands) in COMMANDS {
        for name in commands {
            let id = Uuid::now_v7().to_string();
            let status = h
                .execute(command(stream_type, &id, name, json!({})))
                .await
                .expect_err("an empty body on a fresh id fails somehow");
            let problem = problem(&status);
            assert_ne!(
                problem["detail"], "no such route",
                "{stream_type}.{name}: {status:?}"
            );
            assert_ne!(
                status.code(),
                Code::Unimplemented,
                "{stream_type}.{name}: {status:?}"
            );
            assert!(
                matches!(status.code(), Code::InvalidArgument | Code::NotFound),
                "{stream_type}.{name}: {status:?}"
            );
        }
    }
    h.stop().await;
}
