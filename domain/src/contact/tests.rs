use super::*;
use crate::aggregate::{execute, replay};
use crate::changes::to_json;
use crate::test_support::{at, t0, uuid};
use cqrs_es::{Aggregate, DomainEvent};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

fn created_cmd() -> ContactCommand {
    let input: CreateContactInput = serde_json::from_value(json!({
        "account_id": uuid(5), "name": "Jane Doe", "email": "jane@acme.example",
        "phone": "+84 28 3822 1234"
    }))
    .unwrap();
    input.into_command(ContactId::new(uuid(1)), t0()).unwrap()
}

fn created() -> Contact {
    let mut c = Contact::default();
    execute(&mut c, created_cmd()).unwrap();
    c
}

fn log(id: u128, kind: &str) -> ContactCommand {
    let input: LogActivityInput = serde_json::from_value(json!({
        "kind": kind, "subject": "Intro call", "occurred_at": "2026-11-20T09:30:00Z",
        "duration_minutes": 20, "outcome": "interested", "opportunity_id": uuid(8)
    }))
    .unwrap();
    input.into_command(ActivityId::new(uuid(id)), t0()).unwrap()
}

fn complete(id: u128) -> ContactCommand {
    CompleteTaskInput {
        activity_id: uuid(id),
        outcome: Some("done".into()),
    }
    .into_command(at(9))
    .unwrap()
}

fn is_illegal<T: std::fmt::Debug>(r: Result<T, DomainError>) -> bool {
    matches!(r, Err(DomainError::IllegalTransition(_)))
}

#[test]
fn create_and_existence_rules() {
    let c = created();
    assert_eq!(c.name, "Jane Doe");
    assert_eq!(c.account_id, Some(AccountId::new(uuid(5))));
    let again: CreateContactInput = serde_json::from_value(json!({"name": "J"})).unwrap();
    let cmd = again.into_command(ContactId::new(uuid(1)), t0()).unwrap();
    assert_eq!(c.decide(cmd), Err(DomainError::AlreadyExists));
    assert_eq!(
        Contact::default().decide(log(1, "call")),
        Err(DomainError::NotFound)
    );
}

#[test]
fn create_validation_collects_all_errors() {
    let input: CreateContactInput = serde_json::from_value(json!({
        "name": "", "email": "jane@", "phone": "abc", "preferred_channel": "fax"
    }))
    .unwrap();
    let errs = input
        .into_command(ContactId::new(uuid(1)), t0())
        .unwrap_err();
    assert_eq!(
        errs.fields(),
        vec!["name", "email", "phone", "preferred_channel"]
    );
}

#[test]
fn update_records_old_and_new() {
    let mut c = created();
    let input: UpdateContactInput = serde_json::from_value(
        json!({"title": "CTO", "email": "jane@ACME.example", "name": "Jane Doe"}),
    )
    .unwrap();
    let e = execute(&mut c, input.into_command(at(1)).unwrap()).unwrap();
    assert_eq!(e[0].event_type(), "ContactUpdated");
    let v = serde_json::to_value(&e[0]).unwrap();
    assert_eq!(v["type"], "ContactUpdated");
    assert_eq!(
        v["changes"],
        json!([{"field": "title", "old": null, "new": "CTO"}])
    );
    assert_eq!(c.title.as_deref(), Some("CTO"));
    let input: UpdateContactInput =
        serde_json::from_value(json!({"email": "j@new.example", "account_id": uuid(6)})).unwrap();
    execute(&mut c, input.into_command(at(2)).unwrap()).unwrap();
    assert_eq!(c.email.as_ref().map(Email::as_str), Some("j@new.example"));
    assert_eq!(c.account_id, Some(AccountId::new(uuid(6))));
    let same: UpdateContactInput = serde_json::from_value(json!({"title": "CTO"})).unwrap();
    assert_eq!(c.decide(same.into_command(at(3)).unwrap()), Ok(vec![]));
    assert_eq!(
        UpdateContactInput::default()
            .into_command(t0())
            .unwrap_err()
            .fields(),
        vec![""]
    );
    let bad: UpdateContactInput =
        serde_json::from_value(json!({"email": "x", "phone": "1"})).unwrap();
    assert_eq!(
        bad.into_command(t0()).unwrap_err().fields(),
        vec!["email", "phone"]
    );
}

#[test]
fn log_activity_carries_links_and_account() {
    let mut c = created();
    let e = execute(&mut c, log(1, "call")).unwrap();
    let v = serde_json::to_value(&e[0]).unwrap();
    assert_eq!(v["type"], "ActivityLogged");
    assert_eq!(v["kind"], "call");
    assert_eq!(v["occurred_at"], "2026-11-20T09:30:00Z");
    assert_eq!(v["duration_minutes"], 20);
    assert_eq!(v["account_id"], json!(uuid(5)));
    assert_eq!(v["opportunity_id"], json!(uuid(8)));
    assert_eq!(c.activity_count, 1);
    assert!(c.open_tasks.is_empty());
    assert!(
        is_illegal(c.decide(log(1, "note"))),
        "duplicate activity id"
    );
    let bad: LogActivityInput = serde_json::from_value(json!({
        "kind": "lunch", "subject": "", "duration_minutes": 100_000
    }))
    .unwrap();
    assert_eq!(
        bad.into_command(ActivityId::new(uuid(2)), t0())
            .unwrap_err()
            .fields(),
        vec!["kind", "subject", "duration_minutes"]
    );
}

#[test]
fn complete_task_rules() {
    let mut c = created();
    execute(&mut c, log(1, "task")).unwrap();
    execute(&mut c, log(2, "call")).unwrap();
    assert!(c.open_tasks.contains(&ActivityId::new(uuid(1))));
    assert!(is_illegal(c.decide(complete(2))), "a call is not a task");
    assert!(matches!(
        c.decide(complete(3)),
        Err(DomainError::Validation(e)) if e.fields() == vec!["activity_id"]
    ));
    let e = execute(&mut c, complete(1)).unwrap();
    assert_eq!(
        e,
        vec![ContactEvent::TaskCompleted {
            activity_id: ActivityId::new(uuid(1)),
            outcome: Some("done".into()),
            occurred_at: at(9)
        }]
    );
    assert!(c.open_tasks.is_empty());
    assert!(is_illegal(c.decide(complete(1))), "already completed");
    assert!(is_illegal(c.decide(log(1, "task"))), "id reuse");
}

#[test]
fn state_stays_bounded() {
    let mut c = created();
    for i in 0..(RECENT_ACTIVITY_WINDOW as u128 + 50) {
        execute(&mut c, log(1000 + i, "note")).unwrap();
    }
    assert_eq!(c.recent_activities.len(), RECENT_ACTIVITY_WINDOW);
    assert_eq!(c.activity_count, RECENT_ACTIVITY_WINDOW as u64 + 50);
}

fn log_at(id: u128, kind: ActivityKind, minutes: i64) -> ContactCommand {
    ContactCommand::LogActivity {
        activity_id: ActivityId::new(uuid(id)),
        kind,
        subject: "s".into(),
        body: None,
        occurred_at: at(minutes),
        duration_minutes: None,
        outcome: None,
        opportunity_id: None,
        case_id: None,
    }
}

#[test]
fn open_task_bound_is_enforced() {
    let mut c = created();
    for i in 0..MAX_OPEN_TASKS as u128 {
        execute(&mut c, log_at(10_000 + i, ActivityKind::Task, 0)).unwrap();
    }
    assert_eq!(c.open_tasks.len(), MAX_OPEN_TASKS);
    let full = c.decide(log_at(1, ActivityKind::Task, 1));
    assert!(is_illegal(full.clone()), "{full:?}");
    // other kinds are still fine, and completing one task frees a slot
    execute(&mut c, log_at(2, ActivityKind::Note, 1)).unwrap();
    // the oldest task fell out of the recent window but is still completable
    assert!(!c.recent_activities.contains(&ActivityId::new(uuid(10_000))));
    execute(&mut c, complete(10_000)).unwrap();
    assert!(!c.open_tasks.contains(&ActivityId::new(uuid(10_000))));
    execute(&mut c, log_at(1, ActivityKind::Task, 2)).unwrap();
    assert_eq!(c.open_tasks.len(), MAX_OPEN_TASKS);
    // a completed task outside the recent window is unknown
    assert!(matches!(
        c.decide(complete(10_000)),
        Err(DomainError::Validation(e)) if e.fields() == vec!["activity_id"]
    ));
}

// ------------------------------------------------------------- properties

const CONTACT_FIELDS: [&str; 6] = [
    "account_id",
    "name",
    "email",
    "phone",
    "title",
    "preferred_channel",
];

fn field_json(c: &Contact, field: &str) -> Value {
    match field {
        "account_id" => to_json(&c.account_id),
        "name" => to_json(&c.name),
        "email" => to_json(&c.email),
        "phone" => to_json(&c.phone),
        "title" => to_json(&c.title),
        "preferred_channel" => to_json(&c.preferred_channel),
        other => panic!("unknown contact field {other}"),
    }
}

/// Ids of tasks logged before the generated commands run (see `prefill`).
const PREFILL_BASE: u128 = 10_000;
/// Ids the generated commands log and complete.
const POOL: std::ops::Range<u128> = 100..116;
/// An id that is never logged.
const NEVER_LOGGED: u128 = 999;

fn arb_kind() -> impl Strategy<Value = ActivityKind> {
    prop_oneof![
        3 => Just(ActivityKind::Task),
        1 => Just(ActivityKind::Call),
        1 => Just(ActivityKind::Email),
        1 => Just(ActivityKind::Meeting),
        1 => Just(ActivityKind::Note),
    ]
}

fn arb_complete_id() -> impl Strategy<Value = u128> {
    prop_oneof![
        6 => POOL,
        1 => PREFILL_BASE..PREFILL_BASE + 3,
        1 => Just(NEVER_LOGGED),
    ]
}

fn arb_command() -> impl Strategy<Value = ContactCommand> {
    use proptest::option::of;
    use proptest::sample::select;
    let t = (0i64..10_000).prop_map(at);
    let email = select(&["a@x.example", "b@y.example"][..]).prop_map(|e| Email::parse(e).unwrap());
    let phone =
        select(&["+1 555 0100", "028 3822 1234"][..]).prop_map(|p| Phone::parse(p).unwrap());
    let channel = prop_oneof![Just(ContactChannel::Email), Just(ContactChannel::Phone)];
    let account = (5u128..7).prop_map(|n| AccountId::new(uuid(n)));
    let name = select(&["Jane", "John"][..]).prop_map(String::from);
    let title = select(&["CTO", "CEO"][..]).prop_map(String::from);
    prop_oneof![
        1 => (of(account.clone()), name.clone(), of(email.clone()), of(phone.clone()), t.clone())
            .prop_map(|(account_id, name, email, phone, occurred_at)| ContactCommand::CreateContact {
                id: ContactId::new(uuid(1)),
                account_id,
                name,
                email,
                phone,
                title: None,
                preferred_channel: None,
                occurred_at,
            }),
        3 => (of(account), of(name), of(email), of(phone), of(title), of(channel), t.clone())
            .prop_map(|(account_id, name, email, phone, title, preferred_channel, occurred_at)| {
                ContactCommand::UpdateContact { account_id, name, email, phone, title, preferred_channel, occurred_at }
            }),
        6 => (POOL, arb_kind(), t.clone()).prop_map(|(id, kind, occurred_at)| ContactCommand::LogActivity {
            activity_id: ActivityId::new(uuid(id)),
            kind,
            subject: "s".into(),
            body: None,
            occurred_at,
            duration_minutes: None,
            outcome: None,
            opportunity_id: None,
            case_id: None,
        }),
        5 => (arb_complete_id(), t).prop_map(|(id, occurred_at)| ContactCommand::CompleteTask {
            activity_id: ActivityId::new(uuid(id)),
            outcome: None,
            occurred_at,
        }),
    ]
}

/// What the test knows about logged activities, independent of the state.
#[derive(Default)]
struct Model {
    kinds: BTreeMap<ActivityId, ActivityKind>,
    completed: BTreeSet<ActivityId>,
    last_at: Option<DateTime<Utc>>,
}

impl Model {
    fn open_tasks(&self) -> BTreeSet<ActivityId> {
        self.kinds
            .iter()
            .filter(|(id, k)| **k == ActivityKind::Task && !self.completed.contains(id))
            .map(|(id, _)| *id)
            .collect()
    }

    fn observe(&mut self, e: &ContactEvent) {
        match e {
            ContactEvent::ActivityLogged {
                activity_id,
                kind,
                occurred_at,
                ..
            } => {
                self.kinds.insert(*activity_id, *kind);
                self.last_at = self.last_at.max(Some(*occurred_at));
            }
            ContactEvent::TaskCompleted { activity_id, .. } => {
                assert!(self.completed.insert(*activity_id), "completed twice");
            }
            _ => {}
        }
    }
}

fn check_step(
    before: &Contact,
    model_before: &Model,
    cmd: &ContactCommand,
    result: &Result<Vec<ContactEvent>, DomainError>,
) {
    match (cmd, result) {
        (ContactCommand::CompleteTask { activity_id, .. }, _) if before.exists() => {
            let open = model_before.open_tasks().contains(activity_id);
            match result {
                Ok(events) => {
                    assert!(open, "completed a non-open activity {activity_id}");
                    assert_eq!(events.len(), 1);
                }
                Err(err) => {
                    assert!(!open, "open task {activity_id} not completable: {err:?}");
                    let known = model_before.kinds.contains_key(activity_id)
                        && before.recent_activities.contains(activity_id);
                    if known {
                        // a non-task or an already completed task
                        assert!(is_illegal(Err::<(), _>(err.clone())), "{err:?}");
                    } else {
                        assert!(
                            matches!(err, DomainError::Validation(v) if v.fields() == vec!["activity_id"]),
                            "{err:?}"
                        );
                    }
                }
            }
        }
        (
            ContactCommand::LogActivity {
                activity_id, kind, ..
            },
            _,
        ) if before.exists() => {
            let duplicate = model_before.kinds.contains_key(activity_id);
            let full = *kind == ActivityKind::Task && before.open_tasks.len() >= MAX_OPEN_TASKS;
            assert_eq!(result.is_ok(), !duplicate && !full, "{cmd:?} -> {result:?}");
        }
        (ContactCommand::UpdateContact { .. }, Ok(events)) => assert!(events.len() <= 1),
        _ => {}
    }
}

fn check_event(before: &Contact, e: &ContactEvent, after: &Contact) {
    if let ContactEvent::ContactUpdated { changes, .. } = e {
        assert!(!changes.is_empty());
        for f in CONTACT_FIELDS {
            let hits: Vec<_> = changes.iter().filter(|c| c.field == f).collect();
            match hits.as_slice() {
                [] => assert_eq!(field_json(before, f), field_json(after, f), "{f}"),
                [c] => {
                    assert_eq!(c.old, field_json(before, f), "old of {f}");
                    assert_eq!(c.new, field_json(after, f), "new of {f}");
                    assert_ne!(c.old, c.new, "no-op change of {f}");
                }
                _ => panic!("{f} changed twice in {changes:?}"),
            }
        }
    }
    if let ContactEvent::TaskCompleted { activity_id, .. } = e {
        assert!(before.open_tasks.contains(activity_id));
        // a completed task is no longer open
        assert!(!after.open_tasks.contains(activity_id));
        assert_eq!(after.open_tasks.len() + 1, before.open_tasks.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn contact_invariants_hold_for_any_command_sequence(
        // start empty, or created with the open-task bound almost reached
        prefill in prop_oneof![Just(None), Just(Some(MAX_OPEN_TASKS - 3))],
        cmds in proptest::collection::vec(arb_command(), 1..40)
    ) {
        let mut state = Contact::default();
        let mut log: Vec<ContactEvent> = Vec::new();
        let mut model = Model::default();
        if let Some(n) = prefill {
            let setup = std::iter::once(created_cmd())
                .chain((0..n as u128).map(|i| log_at(PREFILL_BASE + i, ActivityKind::Task, 0)));
            for cmd in setup {
                let events = execute(&mut state, cmd).unwrap();
                events.iter().for_each(|e| model.observe(e));
                log.extend(events);
            }
        }
        let mut accepted_events = log.len();
        for cmd in cmds {
            let before = state.clone();
            let result = state.decide(cmd.clone());
            check_step(&before, &model, &cmd, &result);
            match result {
                Ok(events) => {
                    accepted_events += events.len();
                    for e in &events {
                        let json = serde_json::to_string(e).unwrap();
                        prop_assert_eq!(&serde_json::from_str::<ContactEvent>(&json).unwrap(), e);
                        let prev = state.clone();
                        state.apply(e.clone());
                        model.observe(e);
                        check_event(&prev, e, &state);
                    }
                    log.extend(events);
                }
                Err(_) => prop_assert_eq!(&state, &before),
            }
            if !state.exists() {
                prop_assert_eq!(&state, &Contact::default());
                continue;
            }
            prop_assert!(state.open_tasks.len() <= MAX_OPEN_TASKS);
            prop_assert_eq!(&state.open_tasks, &model.open_tasks());
            prop_assert!(state.recent_activities.len() <= RECENT_ACTIVITY_WINDOW);
            prop_assert_eq!(state.activity_count, model.kinds.len() as u64);
            prop_assert_eq!(state.last_activity_at, model.last_at);
            // completed or non-task activities cannot be completed (again)
            for (id, kind) in &model.kinds {
                if *kind != ActivityKind::Task || model.completed.contains(id) {
                    let again = ContactCommand::CompleteTask { activity_id: *id, outcome: None, occurred_at: at(0) };
                    prop_assert!(state.decide(again).is_err());
                }
            }
        }
        prop_assert_eq!(log.len(), accepted_events);
        prop_assert_eq!(replay::<Contact>(log), state);
    }
}
