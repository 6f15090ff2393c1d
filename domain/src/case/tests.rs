use super::*;
use crate::aggregate::{execute, replay};
use crate::test_support::{at, t0, uuid};
use cqrs_es::{Aggregate, DomainEvent};
use proptest::prelude::*;
use serde_json::json;

fn open_cmd(priority: &str) -> CaseCommand {
    let input: OpenCaseInput = serde_json::from_value(json!({
        "account_id": uuid(5), "contact_id": uuid(6), "subject": "Cannot log in",
        "description": "SSO loop", "priority": priority, "channel": "email"
    }))
    .unwrap();
    input.into_command(CaseId::new(uuid(1)), t0()).unwrap()
}

fn opened() -> Case {
    let mut c = Case::default();
    execute(&mut c, open_cmd("high")).unwrap();
    c
}

fn assign(who: &str) -> CaseCommand {
    CaseCommand::AssignCase {
        assignee: who.into(),
        occurred_at: at(1),
    }
}
fn comment(public: bool) -> CaseCommand {
    CaseCommand::CommentCase {
        body: "Looking into it".into(),
        public,
        author: None,
        occurred_at: at(2),
    }
}
fn escalate() -> CaseCommand {
    CaseCommand::EscalateCase {
        reason: "VIP".into(),
        occurred_at: at(3),
    }
}
fn resolve() -> CaseCommand {
    CaseCommand::ResolveCase {
        resolution: "Reset SSO session".into(),
        occurred_at: at(4),
    }
}
fn close() -> CaseCommand {
    CaseCommand::CloseCase { occurred_at: at(5) }
}
fn reopen() -> CaseCommand {
    CaseCommand::ReopenCase {
        reason: Some("again".into()),
        occurred_at: at(6),
    }
}

fn is_illegal<T: std::fmt::Debug>(r: Result<T, DomainError>) -> bool {
    matches!(r, Err(DomainError::IllegalTransition(_)))
}

#[test]
fn open_derives_sla_deadlines_from_priority() {
    for (p, respond, resolve) in [
        ("urgent", 1, 4),
        ("high", 4, 24),
        ("normal", 8, 72),
        ("low", 24, 168),
    ] {
        let events = Case::default().decide(open_cmd(p)).unwrap();
        let CaseEvent::CaseOpened {
            opened_at,
            first_response_due,
            resolution_due,
            ..
        } = &events[0]
        else {
            panic!()
        };
        assert_eq!(*opened_at, t0());
        assert_eq!(*first_response_due, t0() + Duration::hours(respond));
        assert_eq!(*resolution_due, t0() + Duration::hours(resolve));
    }
    let c = opened();
    assert_eq!(c.status, CaseStatus::Open);
    assert_eq!(c.priority, CasePriority::High);
    assert_eq!(c.first_response_due, Some(t0() + Duration::hours(4)));
}

#[test]
fn open_input_defaults_and_validation() {
    let input: OpenCaseInput =
        serde_json::from_value(json!({"contact_id": uuid(6), "subject": "Help"})).unwrap();
    let CaseCommand::OpenCase {
        priority, channel, ..
    } = input.into_command(CaseId::new(uuid(1)), t0()).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (priority, channel),
        (CasePriority::Normal, CaseChannel::Email)
    );

    let bad: OpenCaseInput = serde_json::from_value(json!({
        "subject": "", "priority": "asap", "channel": "pigeon", "description": "x".repeat(10_001)
    }))
    .unwrap();
    let errs = bad.into_command(CaseId::new(uuid(1)), t0()).unwrap_err();
    assert_eq!(
        errs.fields(),
        vec![
            "account_id",
            "subject",
            "description",
            "priority",
            "channel"
        ]
    );
    assert!(errs.0[3].message.contains("low, normal, high, urgent"));
}

#[test]
fn existence_rules() {
    let c = opened();
    assert_eq!(c.decide(open_cmd("low")), Err(DomainError::AlreadyExists));
    for cmd in [
        assign("bob"),
        comment(true),
        escalate(),
        resolve(),
        close(),
        reopen(),
    ] {
        assert_eq!(Case::default().decide(cmd), Err(DomainError::NotFound));
    }
}

#[test]
fn assign_records_from_and_to() {
    let mut c = opened();
    let e = execute(&mut c, assign("bob")).unwrap();
    assert_eq!(
        e,
        vec![CaseEvent::CaseAssigned {
            from: None,
            to: "bob".into(),
            occurred_at: at(1)
        }]
    );
    assert_eq!(c.status, CaseStatus::Assigned);
    let e = execute(&mut c, assign("carol")).unwrap();
    assert!(
        matches!(&e[0], CaseEvent::CaseAssigned { from: Some(f), to, .. } if f == "bob" && to == "carol")
    );
    assert_eq!(c.decide(assign("carol")), Ok(vec![]));
    execute(&mut c, resolve()).unwrap();
    assert!(is_illegal(c.decide(assign("dave"))));
}

#[test]
fn first_public_comment_records_first_response() {
    let mut c = opened();
    let e = execute(&mut c, comment(false)).unwrap();
    assert!(matches!(
        e[0],
        CaseEvent::CaseCommented {
            first_response: false,
            ..
        }
    ));
    assert_eq!(c.first_response_at, None);
    let e = execute(&mut c, comment(true)).unwrap();
    assert!(matches!(
        e[0],
        CaseEvent::CaseCommented {
            first_response: true,
            ..
        }
    ));
    assert_eq!(c.first_response_at, Some(at(2)));
    let e = execute(&mut c, comment(true)).unwrap();
    assert!(matches!(
        e[0],
        CaseEvent::CaseCommented {
            first_response: false,
            ..
        }
    ));
    assert_eq!(c.comment_count, 3);
    let input: CommentCaseInput = serde_json::from_value(json!({"body": "hi"})).unwrap();
    assert!(matches!(
        input.into_command(t0()).unwrap(),
        CaseCommand::CommentCase { public: false, .. }
    ));
}

#[test]
fn escalation_raises_level() {
    let mut c = opened();
    execute(&mut c, escalate()).unwrap();
    let e = execute(&mut c, escalate()).unwrap();
    assert_eq!(
        e,
        vec![CaseEvent::CaseEscalated {
            reason: "VIP".into(),
            from_level: 1,
            level: 2,
            occurred_at: at(3)
        }]
    );
    assert!(c.escalated);
    assert_eq!(c.escalation_level, 2);
    execute(&mut c, resolve()).unwrap();
    assert!(is_illegal(c.decide(escalate())));
}

#[test]
fn resolve_close_reopen_lifecycle() {
    let mut c = opened();
    assert!(is_illegal(c.decide(close())));
    assert!(is_illegal(c.decide(reopen())));
    execute(&mut c, assign("bob")).unwrap();
    execute(&mut c, resolve()).unwrap();
    assert_eq!(c.status, CaseStatus::Resolved);
    assert_eq!(c.resolution.as_deref(), Some("Reset SSO session"));
    assert!(is_illegal(c.decide(resolve())));
    // comments still allowed while resolved
    assert!(c.decide(comment(true)).is_ok());
    // reopen from resolved goes back to assigned (has an assignee)
    let mut r = c.clone();
    execute(&mut r, reopen()).unwrap();
    assert_eq!(r.status, CaseStatus::Assigned);
    assert_eq!(r.resolution, None);

    execute(&mut c, close()).unwrap();
    assert_eq!(c.status, CaseStatus::Closed);
    assert!(is_illegal(c.decide(close())));
    assert!(is_illegal(c.decide(comment(false))));
    assert!(is_illegal(c.decide(resolve())));
    let e = execute(&mut c, reopen()).unwrap();
    assert_eq!(
        e,
        vec![CaseEvent::CaseReopened {
            from: CaseStatus::Closed,
            to: CaseStatus::Assigned,
            reason: Some("again".into()),
            occurred_at: at(6)
        }]
    );
    assert_eq!(c.reopen_count, 1);
    assert_eq!(c.closed_at, None);
}

#[test]
fn inputs_validate_required_text() {
    let a: AssignCaseInput = serde_json::from_value(json!({"assignee": " "})).unwrap();
    assert_eq!(a.into_command(t0()).unwrap_err().fields(), vec!["assignee"]);
    let e: EscalateCaseInput = serde_json::from_value(json!({"reason": ""})).unwrap();
    assert_eq!(e.into_command(t0()).unwrap_err().fields(), vec!["reason"]);
    let r: ResolveCaseInput = serde_json::from_value(json!({"resolution": ""})).unwrap();
    assert_eq!(
        r.into_command(t0()).unwrap_err().fields(),
        vec!["resolution"]
    );
    let c: CloseCaseInput = serde_json::from_value(json!({})).unwrap();
    assert_eq!(
        c.into_command(at(1)).unwrap(),
        CaseCommand::CloseCase { occurred_at: at(1) }
    );
    assert!(serde_json::from_value::<CloseCaseInput>(json!({"x": 1})).is_err());
    let ro: ReopenCaseInput = serde_json::from_value(json!({})).unwrap();
    assert!(ro.into_command(t0()).is_ok());
}

#[test]
fn case_event_json_shape() {
    let e = Case::default()
        .decide(open_cmd("urgent"))
        .unwrap()
        .remove(0);
    assert_eq!(e.event_type(), "CaseOpened");
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["type"], "CaseOpened");
    assert_eq!(v["priority"], "urgent");
    assert_eq!(v["first_response_due"], "2026-11-20T10:00:00Z");
    assert_eq!(v["resolution_due"], "2026-11-20T13:00:00Z");
    assert_eq!(serde_json::from_value::<CaseEvent>(v).unwrap(), e);
    assert_eq!(Case::TYPE, "case");
}

#[test]
fn handle_via_cqrs_test_framework() {
    let given = Case::default().decide(open_cmd("normal")).unwrap();
    cqrs_es::test::TestFramework::<Case>::with(())
        .given(given)
        .when(close())
        .then_expect_error_message("only a resolved case can be closed; this case is open");
}

fn arb_command() -> impl Strategy<Value = CaseCommand> {
    let t = (0i64..10_000).prop_map(at);
    prop_oneof![
        (prop_oneof![Just("low"), Just("urgent")], any::<bool>()).prop_map(|(p, with_account)| {
            let mut c = open_cmd(p);
            if let CaseCommand::OpenCase {
                account_id,
                contact_id,
                ..
            } = &mut c
            {
                if !with_account {
                    *account_id = None;
                    *contact_id = None;
                }
            }
            c
        }),
        (prop_oneof![Just("bob"), Just("carol")], t.clone()).prop_map(|(a, occurred_at)| {
            CaseCommand::AssignCase {
                assignee: a.into(),
                occurred_at,
            }
        }),
        (any::<bool>(), t.clone()).prop_map(|(public, occurred_at)| CaseCommand::CommentCase {
            body: "b".into(),
            public,
            author: None,
            occurred_at
        }),
        t.clone().prop_map(|occurred_at| CaseCommand::EscalateCase {
            reason: "r".into(),
            occurred_at
        }),
        t.clone().prop_map(|occurred_at| CaseCommand::ResolveCase {
            resolution: "r".into(),
            occurred_at
        }),
        t.clone()
            .prop_map(|occurred_at| CaseCommand::CloseCase { occurred_at }),
        t.prop_map(|occurred_at| CaseCommand::ReopenCase {
            reason: None,
            occurred_at
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn case_invariants_hold_for_any_command_sequence(
        cmds in proptest::collection::vec(arb_command(), 1..40)
    ) {
        let mut state = Case::default();
        let mut log: Vec<CaseEvent> = Vec::new();
        let mut accepted_events = 0;
        for cmd in cmds {
            let before = state.clone();
            match state.decide(cmd.clone()) {
                Ok(events) => {
                    accepted_events += events.len();
                    for e in &events {
                        if let CaseEvent::CaseClosed { .. } = e {
                            // closed only right after resolved
                            prop_assert_eq!(state.status, CaseStatus::Resolved);
                        }
                        state.apply(e.clone());
                    }
                    log.extend(events);
                }
                Err(_) => prop_assert_eq!(&state, &before),
            }
            if state.exists() {
                prop_assert!(state.account_id.is_some() || state.contact_id.is_some());
                prop_assert_eq!(state.escalated, state.escalation_level > 0);
                prop_assert_eq!(state.resolution.is_some(), matches!(state.status, CaseStatus::Resolved | CaseStatus::Closed));
                prop_assert_eq!(state.closed_at.is_some(), state.status == CaseStatus::Closed);
                if state.status == CaseStatus::Assigned { prop_assert!(state.assignee.is_some()); }
                let firsts = log.iter().filter(|e| matches!(e, CaseEvent::CaseCommented { first_response: true, .. })).count();
                prop_assert!(firsts <= 1);
                prop_assert_eq!(firsts == 1, state.first_response_at.is_some());
                prop_assert!(state.first_response_due <= state.resolution_due);
            } else {
                prop_assert_eq!(&state, &Case::default());
            }
        }
        prop_assert_eq!(log.len(), accepted_events);
        prop_assert_eq!(replay::<Case>(log), state);
    }
}
