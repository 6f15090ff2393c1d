use super::*;
use crate::aggregate::execute;
use crate::test_support::{at, t0, uuid};
use cqrs_es::DomainEvent;
use serde_json::json;

fn register_input() -> RegisterAccountInput {
    serde_json::from_value(json!({
        "name": "Acme Corp", "kind": "customer", "industry": "technology",
        "segment": "b2b", "owner": "alice",
        "address": {"city": "Ho Chi Minh City", "country": "VN"}
    }))
    .unwrap()
}

fn registered() -> Account {
    let mut a = Account::default();
    execute(
        &mut a,
        register_input()
            .into_command(AccountId::new(uuid(1)), t0())
            .unwrap(),
    )
    .unwrap();
    a
}

fn patch(v: serde_json::Value) -> AccountCommand {
    serde_json::from_value::<UpdateAccountInput>(v)
        .unwrap()
        .into_command(at(1))
        .unwrap()
}

fn is_illegal<T: std::fmt::Debug>(r: Result<T, DomainError>) -> bool {
    matches!(r, Err(DomainError::IllegalTransition(_)))
}

#[test]
fn register_records_all_fields() {
    let a = registered();
    assert_eq!(a.name, "Acme Corp");
    assert_eq!(a.kind, AccountKind::Customer);
    assert_eq!(a.segment, Some(Segment::B2b));
    assert_eq!(a.owner.as_deref(), Some("alice"));
    assert_eq!(
        a.address.as_ref().and_then(|x| x.city.as_deref()),
        Some("Ho Chi Minh City")
    );
    assert!(!a.archived);
    let e = Account::default()
        .decide(
            register_input()
                .into_command(AccountId::new(uuid(1)), t0())
                .unwrap(),
        )
        .unwrap();
    let v = serde_json::to_value(&e[0]).unwrap();
    assert_eq!(v["type"], "AccountRegistered");
    assert_eq!(
        v["address"],
        json!({"city": "Ho Chi Minh City", "country": "VN"})
    );
    assert_eq!(e[0].event_type(), "AccountRegistered");
    // kind defaults to customer
    let minimal: RegisterAccountInput = serde_json::from_value(json!({"name": "X"})).unwrap();
    assert!(matches!(
        minimal.into_command(AccountId::new(uuid(2)), t0()).unwrap(),
        AccountCommand::RegisterAccount {
            kind: AccountKind::Customer,
            address: None,
            ..
        }
    ));
}

#[test]
fn register_validation_collects_all_errors() {
    let input: RegisterAccountInput = serde_json::from_value(json!({
        "name": " ", "kind": "vendor", "segment": "b2g", "employees": 20_000_000,
        "address": {"postal_code": "9".repeat(300)}, "owner": "o".repeat(201)
    }))
    .unwrap();
    assert_eq!(
        input
            .into_command(AccountId::new(uuid(1)), t0())
            .unwrap_err()
            .fields(),
        vec![
            "name",
            "kind",
            "segment",
            "employees",
            "address.postal_code",
            "owner"
        ]
    );
    assert!(
        serde_json::from_value::<RegisterAccountInput>(json!({"name": "x", "colour": "red"}))
            .is_err()
    );
}

#[test]
fn existence_rules() {
    let cmd = register_input()
        .into_command(AccountId::new(uuid(1)), t0())
        .unwrap();
    assert_eq!(registered().decide(cmd), Err(DomainError::AlreadyExists));
    assert_eq!(
        Account::default().decide(patch(json!({"name": "y"}))),
        Err(DomainError::NotFound)
    );
    assert_eq!(
        Account::default().decide(AccountCommand::RestoreAccount { occurred_at: t0() }),
        Err(DomainError::NotFound)
    );
}

#[test]
fn patch_records_changes_and_owner_move() {
    let mut a = registered();
    let events = execute(
        &mut a,
        patch(json!({"name": "Acme Corporation", "industry": "technology", "employees": 250, "owner": "bob"})),
    )
    .unwrap();
    assert_eq!(events.len(), 2);
    let AccountEvent::AccountDetailsUpdated { changes, .. } = &events[0] else {
        panic!()
    };
    assert_eq!(
        serde_json::to_value(changes).unwrap(),
        json!([
            {"field": "name", "old": "Acme Corp", "new": "Acme Corporation"},
            {"field": "employees", "old": null, "new": 250}
        ])
    );
    assert_eq!(
        events[1],
        AccountEvent::AccountOwnerAssigned {
            from: Some("alice".into()),
            to: "bob".into(),
            occurred_at: at(1)
        }
    );
    assert_eq!(a.name, "Acme Corporation");
    assert_eq!(a.employees, Some(250));
    assert_eq!(a.owner.as_deref(), Some("bob"));
    // nothing changed -> no events
    assert_eq!(
        a.decide(patch(json!({"name": "Acme Corporation", "owner": "bob"}))),
        Ok(vec![])
    );
    assert_eq!(
        UpdateAccountInput::default()
            .into_command(t0())
            .unwrap_err()
            .fields(),
        vec![""]
    );
}

#[test]
fn archived_accounts_reject_changes_until_restored() {
    let mut a = registered();
    let e = execute(&mut a, patch(json!({"archived": true}))).unwrap();
    assert!(matches!(
        e.as_slice(),
        [AccountEvent::AccountArchived { .. }]
    ));
    assert!(a.archived);
    assert!(is_illegal(a.decide(patch(json!({"name": "New"})))));
    assert!(is_illegal(a.decide(AccountCommand::AssignAccountOwner {
        owner: "carol".into(),
        occurred_at: at(2)
    })));
    assert!(is_illegal(a.decide(AccountCommand::ArchiveAccount {
        reason: None,
        occurred_at: at(2)
    })));
    // PATCH archived:true on an archived account is a no-op
    assert_eq!(a.decide(patch(json!({"archived": true}))), Ok(vec![]));
    // restore + change in one patch
    let e = execute(&mut a, patch(json!({"archived": false, "name": "Acme 2"}))).unwrap();
    assert!(matches!(
        e.as_slice(),
        [
            AccountEvent::AccountRestored { .. },
            AccountEvent::AccountDetailsUpdated { .. }
        ]
    ));
    assert!(!a.archived);
    assert_eq!(a.name, "Acme 2");
    assert!(is_illegal(
        a.decide(AccountCommand::RestoreAccount { occurred_at: at(3) })
    ));
    let e = execute(
        &mut a,
        ArchiveAccountInput {
            reason: Some("merged".into()),
        }
        .into_command(at(4))
        .unwrap(),
    )
    .unwrap();
    assert!(
        matches!(&e[0], AccountEvent::AccountArchived { reason: Some(r), .. } if r == "merged")
    );
    assert!(execute(
        &mut a,
        AccountCommand::RestoreAccount { occurred_at: at(5) }
    )
    .is_ok());
    let e = execute(
        &mut a,
        AccountCommand::AssignAccountOwner {
            owner: "dave".into(),
            occurred_at: at(6),
        },
    )
    .unwrap();
    assert!(
        matches!(&e[0], AccountEvent::AccountOwnerAssigned { from: Some(f), to, .. } if f == "alice" && to == "dave")
    );
}
