use super::*;
use crate::aggregate::{execute, replay};
use crate::changes::to_json;
use crate::test_support::{at, t0, uuid};
use cqrs_es::{Aggregate, DomainEvent};
use proptest::prelude::*;
use serde_json::{json, Value};

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

#[test]
fn archived_account_rejects_detail_and_owner_changes_in_any_form() {
    let mut a = registered();
    execute(
        &mut a,
        AccountCommand::ArchiveAccount {
            reason: None,
            occurred_at: at(1),
        },
    )
    .unwrap();
    for body in [
        json!({"industry": "retail"}),
        json!({"owner": "bob"}),
        json!({"employees": 5, "archived": true}),
        json!({"owner": "bob", "archived": true}),
    ] {
        assert!(is_illegal(a.decide(patch(body.clone()))), "{body}");
    }
    // re-assigning the current owner is still a change attempt on an
    // archived account
    assert!(is_illegal(a.decide(AccountCommand::AssignAccountOwner {
        owner: "alice".into(),
        occurred_at: at(2)
    })));
    // unchanged values are no-ops, not errors
    assert_eq!(
        a.decide(patch(json!({"name": "Acme Corp", "owner": "alice"}))),
        Ok(vec![])
    );
}

// ------------------------------------------------------------- properties

const DETAIL_FIELDS: [&str; 7] = [
    "name",
    "kind",
    "industry",
    "segment",
    "employees",
    "address",
    "website",
];

/// JSON value of a detail field of the state, as carried by `changes`.
fn detail_json(a: &Account, field: &str) -> Value {
    match field {
        "name" => to_json(&a.name),
        "kind" => to_json(&a.kind),
        "industry" => to_json(&a.industry),
        "segment" => to_json(&a.segment),
        "employees" => to_json(&a.employees),
        "address" => to_json(&a.address),
        "website" => to_json(&a.website),
        other => panic!("unknown detail field {other}"),
    }
}

fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![Just("Acme"), Just("Globex"), Just("Initech")].prop_map(String::from)
}

fn arb_kind() -> impl Strategy<Value = AccountKind> {
    prop_oneof![
        Just(AccountKind::Customer),
        Just(AccountKind::Prospect),
        Just(AccountKind::Partner),
        Just(AccountKind::Distributor),
    ]
}

fn arb_segment() -> impl Strategy<Value = Segment> {
    prop_oneof![Just(Segment::B2b), Just(Segment::B2c)]
}

fn arb_text(values: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(values).prop_map(String::from)
}

fn arb_address() -> impl Strategy<Value = Address> {
    prop_oneof![
        Just(Address {
            city: Some("Hanoi".into()),
            country: Some("VN".into()),
            ..Default::default()
        }),
        Just(Address {
            line1: Some("1 Main St".into()),
            city: Some("Springfield".into()),
            ..Default::default()
        }),
    ]
}

fn arb_employees() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(10), Just(MAX_EMPLOYEES)]
}

fn arb_owner() -> impl Strategy<Value = String> {
    arb_text(&["alice", "bob"])
}

fn arb_command() -> impl Strategy<Value = AccountCommand> {
    use proptest::option::of;
    let t = (0i64..10_000).prop_map(at);
    prop_oneof![
        1 => (
            arb_name(),
            arb_kind(),
            of(arb_text(&["technology", "retail"])),
            of(arb_segment()),
            of(arb_employees()),
            of(arb_address()),
            of(arb_text(&["acme.example", "globex.example"])),
            of(arb_owner()),
            t.clone(),
        )
            .prop_map(
                |(name, kind, industry, segment, employees, address, website, owner, occurred_at)| {
                    AccountCommand::RegisterAccount {
                        id: AccountId::new(uuid(1)),
                        name,
                        kind,
                        industry,
                        segment,
                        employees,
                        address,
                        website,
                        owner,
                        occurred_at,
                    }
                }
            ),
        6 => (
            (
                of(arb_name()),
                of(arb_kind()),
                of(arb_text(&["technology", "retail"])),
                of(arb_segment()),
                of(arb_employees()),
            ),
            (
                of(arb_address()),
                of(arb_text(&["acme.example", "globex.example"])),
                of(arb_owner()),
                of(any::<bool>()),
                t.clone(),
            ),
        )
            .prop_map(
                |(
                    (name, kind, industry, segment, employees),
                    (address, website, owner, archived, occurred_at),
                )| AccountCommand::UpdateAccount {
                    name,
                    kind,
                    industry,
                    segment,
                    employees,
                    address,
                    website,
                    owner,
                    archived,
                    occurred_at,
                }
            ),
        2 => (arb_owner(), t.clone())
            .prop_map(|(owner, occurred_at)| AccountCommand::AssignAccountOwner { owner, occurred_at }),
        2 => (proptest::option::of(Just("merged".to_string())), t.clone())
            .prop_map(|(reason, occurred_at)| AccountCommand::ArchiveAccount { reason, occurred_at }),
        2 => t.prop_map(|occurred_at| AccountCommand::RestoreAccount { occurred_at }),
    ]
}

/// Checks one event against the states right before and after applying it.
fn check_event(before: &Account, e: &AccountEvent, after: &Account) {
    match e {
        AccountEvent::AccountRegistered { .. } => {
            assert!(!before.exists() && after.exists() && !after.archived);
        }
        AccountEvent::AccountDetailsUpdated { changes, .. } => {
            assert!(!before.archived, "details changed while archived");
            assert!(!changes.is_empty(), "empty change set");
            for f in DETAIL_FIELDS {
                let hits: Vec<_> = changes.iter().filter(|c| c.field == f).collect();
                match hits.as_slice() {
                    // untouched fields keep their value
                    [] => assert_eq!(detail_json(before, f), detail_json(after, f), "{f}"),
                    // old = value before, new = value after, and they differ
                    [c] => {
                        assert_eq!(c.old, detail_json(before, f), "old of {f}");
                        assert_eq!(c.new, detail_json(after, f), "new of {f}");
                        assert_ne!(c.old, c.new, "no-op change of {f}");
                    }
                    _ => panic!("{f} changed twice in {changes:?}"),
                }
            }
            assert!(changes
                .iter()
                .all(|c| DETAIL_FIELDS.contains(&c.field.as_str())));
            assert_eq!(
                (&before.owner, before.archived),
                (&after.owner, after.archived)
            );
        }
        AccountEvent::AccountOwnerAssigned { from, to, .. } => {
            assert!(!before.archived, "owner changed while archived");
            assert_eq!(from, &before.owner);
            assert_eq!(after.owner.as_ref(), Some(to));
            assert_ne!(from.as_ref(), Some(to), "no-op owner change");
        }
        AccountEvent::AccountArchived { .. } => assert!(!before.archived && after.archived),
        AccountEvent::AccountRestored { .. } => assert!(before.archived && !after.archived),
    }
    if !matches!(
        e,
        AccountEvent::AccountRegistered { .. } | AccountEvent::AccountDetailsUpdated { .. }
    ) {
        for f in DETAIL_FIELDS {
            assert_eq!(
                detail_json(before, f),
                detail_json(after, f),
                "{f} in {e:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn account_invariants_hold_for_any_command_sequence(
        cmds in proptest::collection::vec(arb_command(), 1..40)
    ) {
        let mut state = Account::default();
        let mut log: Vec<AccountEvent> = Vec::new();
        let mut accepted_events = 0usize;
        for cmd in cmds {
            let before = state.clone();
            match state.decide(cmd.clone()) {
                Ok(events) => {
                    accepted_events += events.len();
                    // a patch emits restore first and archive last
                    if let Some(i) = events.iter().position(|e| matches!(e, AccountEvent::AccountRestored { .. })) {
                        prop_assert_eq!(i, 0);
                    }
                    if let Some(i) = events.iter().position(|e| matches!(e, AccountEvent::AccountArchived { .. })) {
                        prop_assert_eq!(i, events.len() - 1);
                    }
                    for e in &events {
                        let json = serde_json::to_string(e).unwrap();
                        prop_assert_eq!(&serde_json::from_str::<AccountEvent>(&json).unwrap(), e);
                        let prev = state.clone();
                        state.apply(e.clone());
                        check_event(&prev, e, &state);
                    }
                    log.extend(events);
                }
                Err(_) => prop_assert_eq!(&state, &before),
            }
            if !state.exists() {
                prop_assert_eq!(&state, &Account::default());
                continue;
            }
            prop_assert!(!state.name.is_empty());
            prop_assert!(state.registered_at.is_some());
            prop_assert!(state.employees.is_none_or(|n| n <= MAX_EMPLOYEES));
            if state.archived {
                // an archived account rejects detail and owner updates
                let rename = AccountCommand::UpdateAccount {
                    name: Some(format!("{} 2", state.name)),
                    kind: None, industry: None, segment: None, employees: None,
                    address: None, website: None, owner: None, archived: None,
                    occurred_at: at(0),
                };
                prop_assert!(is_illegal(state.decide(rename)));
                let reassign = AccountCommand::UpdateAccount {
                    name: None, kind: None, industry: None, segment: None, employees: None,
                    address: None, website: None, owner: Some("zed".into()), archived: Some(true),
                    occurred_at: at(0),
                };
                prop_assert!(is_illegal(state.decide(reassign)));
                let assign = AccountCommand::AssignAccountOwner { owner: "zed".into(), occurred_at: at(0) };
                prop_assert!(is_illegal(state.decide(assign)));
            }
        }
        prop_assert_eq!(log.len(), accepted_events);
        prop_assert_eq!(replay::<Account>(log), state);
    }
}
