use super::*;
use crate::aggregate::execute;
use crate::test_support::{at, t0, uuid};
use cqrs_es::DomainEvent;
use serde_json::json;

fn created() -> Contact {
    let input: CreateContactInput = serde_json::from_value(json!({
        "account_id": uuid(5), "name": "Jane Doe", "email": "jane@acme.example",
        "phone": "+84 28 3822 1234"
    }))
    .unwrap();
    let mut c = Contact::default();
    execute(
        &mut c,
        input.into_command(ContactId::new(uuid(1)), t0()).unwrap(),
    )
    .unwrap();
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
