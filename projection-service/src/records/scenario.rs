//! Test support for the audit, history and records tests: a scripted CRM
//! scenario (domain commands -> events with explicit positions, versions
//! and times) and a way to run one test body on SQLite and PostgreSQL.
//!
//! The script (position: actor, event, minute after t0 it was recorded):
//! ```text
//!  1 alice AccountRegistered A1 "Acme Corp" (customer, owner alice)        m0
//!  2 alice AccountRegistered A2 "Globex" (prospect, owner bob)             m1
//!  3 alice ContactCreated C1 "Jane Doe" on A1                              m2
//!  4 bob   ContactCreated C2 "John Smith" on A1                            m3
//!  5 bob   ContactCreated C3 "Gina Grey" on A2                             m4
//!  6 alice OpportunityOpened O1 A1 "Acme renewal" 12500.00 USD prospecting m5
//!  7 alice StageAdvanced O1 prospecting -> qualification                   m6
//!  8 bob   OpportunityUpdated O1 amount 12500.00 -> 15000.00 USD, owner alice -> bob  m7
//!  9 alice OpportunityOpened O2 A1 "Acme expansion" 3000.00 EUR            m8
//! 10 alice OpportunityOpened O3 A2 "Globex deal" 5000.00 USD               m9
//! 11 bob   OpportunityWon O3 4800.00 USD                                   m10
//! 12 alice ActivityLogged C1 call "Intro call" (occurred m11, 20 min)      m11
//! 13 alice ActivityLogged C1 task T1 "Send proposal" (occurred m1440)      m12
//! 14 bob   ActivityLogged C2 task T2 "Follow up" (occurred m2880)          m13
//! 15 bob   ActivityLogged C2 meeting "Demo" (occurred m30)                 m14
//! 16 carol CaseOpened K1 A1/C1 "Cannot log in" high                        m15
//! 17 carol CaseAssigned K1 -> dave                                         m16
//! 18 dave  CaseCommented K1 (public)                                       m17
//! 19 dave  CaseResolved K1                                                 m18
//! 20 alice AccountDetailsUpdated A1 industry null -> technology            m19
//! 21 alice TaskCompleted C1 T1                                             m20
//! 22 carol CaseOpened K2 A2/C3 "Billing question"                          m21
//! 23 alice LeadCaptured L1 "Tran Van B" (Beta Ltd)                         m22
//! 24 alice AccountRegistered A3 "Beta Ltd" (lead conversion)               m23
//! 25 alice ContactCreated C4 "Tran Van B" on A3                            m23
//! 26 alice LeadConverted L1 -> A3/C4                                       m23
//! 27 alice OpportunityOpened O4 A1 "Acme pilot" 2000.00 USD                m24
//! 28 alice OpportunityWon O4 1999.50 USD                                   m25
//! 29 carol CaseOpened K3 A1/C2 "Feature request"                           m26
//! 30 alice ActivityLogged C1 task T3 "Quarterly review" (occurred m4320)   m27
//! ```

use std::collections::HashMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use crm_domain::account::{Account, AccountCommand};
use crm_domain::aggregate::{execute, CrmAggregate};
use crm_domain::case::{Case, CaseCommand};
use crm_domain::contact::{Contact, ContactCommand};
use crm_domain::lead::{plan_conversion, ConversionIds, ConvertLeadInput, Lead, LeadCommand};
use crm_domain::opportunity::{Opportunity, OpportunityCommand};
use crm_domain::values::{AccountKind, ActivityKind, CaseChannel, CasePriority, LeadSource};
use crm_domain::{AccountId, ActivityId, CaseId, ContactId, Email, LeadId, Money, OpportunityId};
use crm_eventlog::RecordedEvent;
use serde::Serialize;

use crate::fold::{create_tables, fold_batch, testkit::recorded};
use crate::projection::{Projection, Tables};
use crate::readdb::{timestamp, ReadDb};

/// Runs an async test body `fn(ReadDb) -> impl Future` on SQLite and on PostgreSQL.
macro_rules! on_both_backends {
    ($sqlite:ident, $postgres:ident, $body:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = tempfile::tempdir().unwrap();
            let db = $crate::readdb::ReadDb::open_sqlite(&dir.path().join("read.db"))
                .await
                .unwrap();
            $body(db.clone()).await;
            db.pool.close().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(pg) = crm_eventlog::testing::PgTestDb::create().await else {
                return;
            };
            let db = $crate::readdb::ReadDb::connect(&pg.url).await.unwrap();
            $body(db.clone()).await;
            db.pool.close().await;
            pg.drop_db().await;
        }
    };
}
pub(crate) use on_both_backends;

/// 2026-11-20T09:00:00Z.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 20, 9, 0, 0).unwrap()
}

/// `t0` + `minutes`.
pub fn at(minutes: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(minutes)
}

/// `at(minutes)` as the read models store times.
pub fn ts(minutes: i64) -> String {
    timestamp(&at(minutes))
}

pub fn uuid(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(n)
}

pub const A1: u128 = 0xA1;
pub const A2: u128 = 0xA2;
pub const A3: u128 = 0xA3;
pub const C1: u128 = 0xC1;
pub const C2: u128 = 0xC2;
pub const C3: u128 = 0xC3;
pub const C4: u128 = 0xC4;
pub const O1: u128 = 0x01;
pub const O2: u128 = 0x02;
pub const O3: u128 = 0x03;
pub const O4: u128 = 0x04;
pub const K1: u128 = 0x0E1;
pub const K2: u128 = 0x0E2;
pub const K3: u128 = 0x0E3;
pub const L1: u128 = 0x0F1;
pub const T1: u128 = 0x7A51;
pub const T2: u128 = 0x7A52;
pub const T3: u128 = 0x7A53;
pub const CALL: u128 = 0xCA11;
pub const DEMO: u128 = 0xDE30;

/// The id text of a scenario id.
pub fn id(n: u128) -> String {
    uuid(n).to_string()
}

/// Builds recorded events: positions from 1, versions per stream.
#[derive(Default)]
pub struct Script {
    pub events: Vec<RecordedEvent>,
    versions: HashMap<String, i64>,
}

impl Script {
    /// Runs `command` on `aggregate` and records its events at minute `minute`.
    pub fn run<A>(
        &mut self,
        aggregate: &mut A,
        stream_type: &str,
        stream: u128,
        command: A::Command,
        actor: &str,
        minute: i64,
    ) where
        A: CrmAggregate,
        A::Event: Serialize,
    {
        let events = execute(aggregate, command).expect("scripted command is valid");
        assert!(!events.is_empty(), "scripted command produced no event");
        for event in events {
            self.record(stream_type, stream, &event, actor, minute);
        }
    }

    /// Records one event.
    pub fn record<E: Serialize + cqrs_es::DomainEvent>(
        &mut self,
        stream_type: &str,
        stream: u128,
        event: &E,
        actor: &str,
        minute: i64,
    ) {
        let version = self.versions.entry(id(stream)).or_insert(0);
        *version += 1;
        let position = self.events.len() as i64 + 1;
        self.events.push(recorded(
            stream_type,
            &id(stream),
            *version,
            position,
            event,
            actor,
            at(minute),
        ));
    }
}

fn money(text: &str) -> Money {
    Money::parse(text).unwrap()
}

pub(crate) fn register(
    id_: u128,
    name: &str,
    kind: AccountKind,
    owner: &str,
    minute: i64,
) -> AccountCommand {
    AccountCommand::RegisterAccount {
        id: AccountId::new(uuid(id_)),
        name: name.into(),
        kind,
        industry: None,
        segment: None,
        employees: None,
        address: None,
        website: None,
        owner: Some(owner.into()),
        occurred_at: at(minute),
    }
}

pub(crate) fn create_contact(
    id_: u128,
    account: u128,
    name: &str,
    email: &str,
    minute: i64,
) -> ContactCommand {
    ContactCommand::CreateContact {
        id: ContactId::new(uuid(id_)),
        account_id: Some(AccountId::new(uuid(account))),
        name: name.into(),
        email: Some(Email::parse(email).unwrap()),
        phone: None,
        title: None,
        preferred_channel: None,
        occurred_at: at(minute),
    }
}

pub(crate) fn open_opportunity(
    id_: u128,
    account: u128,
    name: &str,
    amount: &str,
    minute: i64,
) -> OpportunityCommand {
    OpportunityCommand::OpenOpportunity {
        id: OpportunityId::new(uuid(id_)),
        account_id: AccountId::new(uuid(account)),
        name: name.into(),
        amount: money(amount),
        expected_close: chrono::NaiveDate::from_ymd_opt(2026, 12, 31).unwrap(),
        owner: "alice".into(),
        pipeline: "default".into(),
        stage: "prospecting".into(),
        occurred_at: at(minute),
    }
}

pub(crate) fn log_activity(
    activity: u128,
    kind: ActivityKind,
    subject: &str,
    occurred: i64,
) -> ContactCommand {
    ContactCommand::LogActivity {
        activity_id: ActivityId::new(uuid(activity)),
        kind,
        subject: subject.into(),
        body: None,
        occurred_at: at(occurred),
        duration_minutes: (kind == ActivityKind::Call).then_some(20),
        outcome: (kind == ActivityKind::Call).then(|| "interested".to_string()),
        opportunity_id: None,
        case_id: None,
    }
}

fn open_case(
    id_: u128,
    account: u128,
    contact: u128,
    subject: &str,
    priority: CasePriority,
    minute: i64,
) -> CaseCommand {
    CaseCommand::OpenCase {
        id: CaseId::new(uuid(id_)),
        account_id: Some(AccountId::new(uuid(account))),
        contact_id: Some(ContactId::new(uuid(contact))),
        subject: subject.into(),
        description: None,
        priority,
        channel: CaseChannel::Email,
        occurred_at: at(minute),
    }
}

/// The scripted scenario of the module docs (30 events).
pub fn scenario() -> Vec<RecordedEvent> {
    let mut s = Script::default();
    let (mut a1, mut a2) = (Account::default(), Account::default());
    let (mut c1, mut c2, mut c3) = (Contact::default(), Contact::default(), Contact::default());
    let (mut o1, mut o2, mut o3, mut o4) = (
        Opportunity::default(),
        Opportunity::default(),
        Opportunity::default(),
        Opportunity::default(),
    );
    let (mut k1, mut k2, mut k3) = (Case::default(), Case::default(), Case::default());
    let mut l1 = Lead::default();

    s.run(
        &mut a1,
        "account",
        A1,
        register(A1, "Acme Corp", AccountKind::Customer, "alice", 0),
        "alice",
        0,
    );
    s.run(
        &mut a2,
        "account",
        A2,
        register(A2, "Globex", AccountKind::Prospect, "bob", 1),
        "alice",
        1,
    );
    s.run(
        &mut c1,
        "contact",
        C1,
        create_contact(C1, A1, "Jane Doe", "jane@acme.example", 2),
        "alice",
        2,
    );
    s.run(
        &mut c2,
        "contact",
        C2,
        create_contact(C2, A1, "John Smith", "john@acme.example", 3),
        "bob",
        3,
    );
    s.run(
        &mut c3,
        "contact",
        C3,
        create_contact(C3, A2, "Gina Grey", "gina@globex.example", 4),
        "bob",
        4,
    );
    s.run(
        &mut o1,
        "opportunity",
        O1,
        open_opportunity(O1, A1, "Acme renewal", "12500.00 USD", 5),
        "alice",
        5,
    );
    s.run(
        &mut o1,
        "opportunity",
        O1,
        OpportunityCommand::AdvanceStage {
            stage: "qualification".into(),
            reason: Some("budget confirmed".into()),
            occurred_at: at(6),
        },
        "alice",
        6,
    );
    s.run(
        &mut o1,
        "opportunity",
        O1,
        OpportunityCommand::UpdateOpportunity {
            name: None,
            amount: Some(money("15000.00 USD")),
            expected_close: None,
            owner: Some("bob".into()),
            occurred_at: at(7),
        },
        "bob",
        7,
    );
    s.run(
        &mut o2,
        "opportunity",
        O2,
        open_opportunity(O2, A1, "Acme expansion", "3000.00 EUR", 8),
        "alice",
        8,
    );
    s.run(
        &mut o3,
        "opportunity",
        O3,
        open_opportunity(O3, A2, "Globex deal", "5000.00 USD", 9),
        "alice",
        9,
    );
    s.run(
        &mut o3,
        "opportunity",
        O3,
        OpportunityCommand::WinOpportunity {
            close_value: money("4800.00 USD"),
            occurred_at: at(10),
        },
        "bob",
        10,
    );
    s.run(
        &mut c1,
        "contact",
        C1,
        log_activity(CALL, ActivityKind::Call, "Intro call", 11),
        "alice",
        11,
    );
    s.run(
        &mut c1,
        "contact",
        C1,
        log_activity(T1, ActivityKind::Task, "Send proposal", 1440),
        "alice",
        12,
    );
    s.run(
        &mut c2,
        "contact",
        C2,
        log_activity(T2, ActivityKind::Task, "Follow up", 2880),
        "bob",
        13,
    );
    s.run(
        &mut c2,
        "contact",
        C2,
        log_activity(DEMO, ActivityKind::Meeting, "Demo", 30),
        "bob",
        14,
    );
    s.run(
        &mut k1,
        "case",
        K1,
        open_case(K1, A1, C1, "Cannot log in", CasePriority::High, 15),
        "carol",
        15,
    );
    s.run(
        &mut k1,
        "case",
        K1,
        CaseCommand::AssignCase {
            assignee: "dave".into(),
            occurred_at: at(16),
        },
        "carol",
        16,
    );
    s.run(
        &mut k1,
        "case",
        K1,
        CaseCommand::CommentCase {
            body: "Looking into it".into(),
            public: true,
            author: Some("dave".into()),
            occurred_at: at(17),
        },
        "dave",
        17,
    );
    s.run(
        &mut k1,
        "case",
        K1,
        CaseCommand::ResolveCase {
            resolution: "Reset SSO session".into(),
            occurred_at: at(18),
        },
        "dave",
        18,
    );
    s.run(
        &mut a1,
        "account",
        A1,
        AccountCommand::UpdateAccount {
            name: None,
            kind: None,
            industry: Some("technology".into()),
            segment: None,
            employees: None,
            address: None,
            website: None,
            owner: None,
            archived: None,
            occurred_at: at(19),
        },
        "alice",
        19,
    );
    s.run(
        &mut c1,
        "contact",
        C1,
        ContactCommand::CompleteTask {
            activity_id: ActivityId::new(uuid(T1)),
            outcome: Some("sent".into()),
            occurred_at: at(20),
        },
        "alice",
        20,
    );
    s.run(
        &mut k2,
        "case",
        K2,
        open_case(K2, A2, C3, "Billing question", CasePriority::Normal, 21),
        "carol",
        21,
    );
    s.run(
        &mut l1,
        "lead",
        L1,
        LeadCommand::CaptureLead {
            id: LeadId::new(uuid(L1)),
            name: "Tran Van B".into(),
            company: Some("Beta Ltd".into()),
            email: Some(Email::parse("b@beta.example").unwrap()),
            phone: None,
            source: LeadSource::WebForm,
            occurred_at: at(22),
        },
        "alice",
        22,
    );
    let ids = ConversionIds {
        account_id: AccountId::new(uuid(A3)),
        contact_id: ContactId::new(uuid(C4)),
        opportunity_id: OpportunityId::new(uuid(0xDEAD)),
    };
    let conversion = plan_conversion(&l1, ConvertLeadInput::default(), ids, at(23)).unwrap();
    let (_, account_command) = conversion.account.expect("creates an account");
    s.run(
        &mut Account::default(),
        "account",
        A3,
        account_command,
        "alice",
        23,
    );
    s.run(
        &mut Contact::default(),
        "contact",
        C4,
        conversion.contact.1,
        "alice",
        23,
    );
    s.run(&mut l1, "lead", L1, conversion.lead, "alice", 23);
    s.run(
        &mut o4,
        "opportunity",
        O4,
        open_opportunity(O4, A1, "Acme pilot", "2000.00 USD", 24),
        "alice",
        24,
    );
    s.run(
        &mut o4,
        "opportunity",
        O4,
        OpportunityCommand::WinOpportunity {
            close_value: money("1999.50 USD"),
            occurred_at: at(25),
        },
        "alice",
        25,
    );
    s.run(
        &mut k3,
        "case",
        K3,
        open_case(K3, A1, C2, "Feature request", CasePriority::Normal, 26),
        "carol",
        26,
    );
    s.run(
        &mut c1,
        "contact",
        C1,
        log_activity(T3, ActivityKind::Task, "Quarterly review", 4320),
        "alice",
        27,
    );
    assert_eq!(s.events.len(), 30);
    s.events
}

/// Creates `projection`'s tables (generation 1) and folds `events` in batches of 7.
pub async fn fold_all(
    db: &ReadDb,
    projection: &dyn Projection,
    events: &[RecordedEvent],
) -> Tables {
    let tables = Tables::new(projection.name(), 1);
    create_tables(db, projection, &tables).await.unwrap();
    for batch in events.chunks(7) {
        fold_batch(db, projection, &tables, batch, None)
            .await
            .unwrap_or_else(|f| panic!("fold failed: {:?}", f.error));
    }
    tables
}
