//! Shared by the end-to-end tests: a real event log (SQLite temp file or a
//! throwaway PostgreSQL database), the log routes served on a real socket, and
//! appends of real domain events.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, TimeZone, Utc};
use cqrs_es::DomainEvent;
use crm_domain::aggregate::execute;
use crm_domain::opportunity::{Opportunity, OpportunityCommand, OpportunityEvent};
use crm_domain::{AccountId, Money, OpportunityId};
use crm_eventlog::testing::{sqlite_temp, PgTestDb};
use crm_eventlog::{
    AppendBatch, AppendOutcome, Committed, EventLog, ExpectedVersion, NewEvent, StreamAppend,
};
use crm_query_service::auth::{Role, Tokens};
use crm_query_service::{log_routes, LiveSettings, QueryState};
use serde_json::{json, Value};
use uuid::Uuid;

/// Where a test's log lives; keep it alive for the test, then [`Db::finish`].
pub enum Db {
    Sqlite(tempfile::TempDir, String),
    Postgres(PgTestDb),
}

impl Db {
    pub async fn sqlite() -> Db {
        let (dir, url) = sqlite_temp();
        Db::Sqlite(dir, url)
    }

    /// `None` only outside CI when PostgreSQL is unreachable.
    pub async fn postgres() -> Option<Db> {
        PgTestDb::create().await.map(Db::Postgres)
    }

    pub fn url(&self) -> &str {
        match self {
            Db::Sqlite(_, url) => url,
            Db::Postgres(db) => &db.url,
        }
    }

    pub async fn open(&self) -> EventLog {
        EventLog::connect(self.url()).await.expect("open event log")
    }

    pub async fn finish(self) {
        if let Db::Postgres(db) = self {
            db.drop_db().await;
        }
    }
}

/// The log routes served on 127.0.0.1 with a viewer token.
pub struct Server {
    pub base: String,
    pub token: String,
    pub tokens: Arc<Tokens>,
    pub client: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(log: EventLog, live: LiveSettings) -> Server {
        let tokens = Arc::new(Tokens::new(&[7u8; 32]).expect("tokens"));
        let token = tokens
            .issue("alice", &[Role::Auditor], chrono::Duration::hours(1))
            .expect("issue token");
        let state = QueryState::new(log, tokens.clone()).with_live(live);
        let app = log_routes().with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Server {
            base: format!("http://{addr}"),
            token,
            tokens,
            client: reqwest::Client::new(),
            task,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(20))
    }

    pub fn get_anonymous(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(20))
    }
}

/// Metadata like the command service writes.
pub fn metadata(actor: &str, correlation: &str) -> Value {
    json!({
        "actor": actor,
        "roles": ["sales"],
        "command": "opportunity.test",
        "command_id": Uuid::now_v7(),
        "causation_id": format!("cause-{correlation}"),
        "correlation_id": correlation,
    })
}

/// Appends `events` to one stream in one batch; returns what was committed.
pub async fn append<E: DomainEvent>(
    log: &EventLog,
    stream_type: &str,
    stream_id: &str,
    events: &[E],
) -> Committed {
    let correlation = Uuid::now_v7().to_string();
    let batch = AppendBatch {
        tenant_id: "default".to_string(),
        streams: vec![StreamAppend {
            stream_type: stream_type.to_string(),
            stream_id: stream_id.to_string(),
            expected_version: ExpectedVersion::Any,
            events: events
                .iter()
                .map(|event| NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: event.event_type(),
                    schema_version: 1,
                    payload: serde_json::to_value(event).expect("payload"),
                    metadata: metadata("alice", &correlation),
                })
                .collect(),
        }],
        idempotency: None,
    };
    match log.append(batch).await.expect("append") {
        AppendOutcome::Committed(committed) => committed,
        AppendOutcome::Duplicate(record) => panic!("unexpected duplicate {record:?}"),
    }
}

/// An opportunity under test: its id and the state the domain computed.
pub struct Deal {
    pub id: OpportunityId,
    pub state: Opportunity,
}

pub fn at(minutes: i64) -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 20, 9, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
}

impl Deal {
    pub fn new() -> Deal {
        Deal {
            id: OpportunityId::new(Uuid::now_v7()),
            state: Opportunity::default(),
        }
    }

    pub fn stream_id(&self) -> String {
        self.id.to_string()
    }

    /// Decides `command` with the domain, applies it locally, returns the events.
    pub fn run(&mut self, command: OpportunityCommand) -> Vec<OpportunityEvent> {
        execute(&mut self.state, command).expect("command accepted")
    }

    pub fn open(&mut self, amount: &str) -> Vec<OpportunityEvent> {
        let id = self.id;
        self.run(OpportunityCommand::OpenOpportunity {
            id,
            account_id: AccountId::new(Uuid::now_v7()),
            name: "Acme renewal".to_string(),
            amount: Money::parse(amount).expect("money"),
            expected_close: NaiveDate::from_ymd_opt(2026, 12, 31).expect("date"),
            owner: "alice".to_string(),
            pipeline: "default".to_string(),
            stage: "prospecting".to_string(),
            occurred_at: at(0),
        })
    }

    pub fn advance(&mut self, stage: &str, minutes: i64) -> Vec<OpportunityEvent> {
        self.run(OpportunityCommand::AdvanceStage {
            stage: stage.to_string(),
            reason: None,
            occurred_at: at(minutes),
        })
    }

    pub fn reprice(&mut self, amount: &str, minutes: i64) -> Vec<OpportunityEvent> {
        self.run(OpportunityCommand::UpdateOpportunity {
            name: None,
            amount: Some(Money::parse(amount).expect("money")),
            expected_close: None,
            owner: None,
            occurred_at: at(minutes),
        })
    }
}

/// Sleeps long enough that the next append gets a later `recorded_at`.
pub async fn tick() {
    tokio::time::sleep(Duration::from_millis(15)).await;
}
