use super::*;
use crate::aggregate::{execute, replay};
use crate::test_support::{at, t0, uuid};
use cqrs_es::test::TestFramework;
use cqrs_es::{Aggregate, DomainEvent};
use proptest::prelude::*;
use serde_json::json;

fn money(a: &str, c: &str) -> Money {
    MoneyInput {
        amount: a.into(),
        currency: c.into(),
    }
    .validate("m", &mut ValidationErrors::new())
    .unwrap()
}

fn open_input() -> OpenOpportunityInput {
    serde_json::from_value(json!({
        "account_id": uuid(7),
        "name": "Acme renewal",
        "amount": {"amount": "12500.00", "currency": "USD"},
        "expected_close": "2026-12-31",
        "owner": "alice",
        "stage": "prospecting"
    }))
    .unwrap()
}

fn open_cmd() -> OpportunityCommand {
    open_input()
        .into_command(OpportunityId::new(uuid(1)), t0())
        .unwrap()
}

fn opened() -> Opportunity {
    let mut o = Opportunity::default();
    execute(&mut o, open_cmd()).unwrap();
    o
}

fn advance(stage: &str) -> OpportunityCommand {
    OpportunityCommand::AdvanceStage {
        stage: stage.into(),
        reason: None,
        occurred_at: at(1),
    }
}

fn win() -> OpportunityCommand {
    OpportunityCommand::WinOpportunity {
        close_value: money("12000.00", "USD"),
        occurred_at: at(2),
    }
}

fn lose() -> OpportunityCommand {
    OpportunityCommand::LoseOpportunity {
        reason: "price".into(),
        competitor: Some("Globex".into()),
        occurred_at: at(2),
    }
}

fn reopen(stage: Option<&str>) -> OpportunityCommand {
    OpportunityCommand::ReopenOpportunity {
        reason: None,
        stage: stage.map(Into::into),
        occurred_at: at(3),
    }
}

fn illegal(r: Result<Vec<OpportunityEvent>, DomainError>) -> String {
    match r {
        Err(DomainError::IllegalTransition(m)) => m,
        other => panic!("expected IllegalTransition, got {other:?}"),
    }
}

fn invalid_fields(r: Result<Vec<OpportunityEvent>, DomainError>) -> Vec<String> {
    match r {
        Err(DomainError::Validation(e)) => e.0.into_iter().map(|e| e.field).collect(),
        other => panic!("expected Validation, got {other:?}"),
    }
}

#[test]
fn open_records_all_fields_and_probability() {
    let o = opened();
    assert!(o.exists());
    assert_eq!(o.stage, "prospecting");
    assert_eq!(o.probability, 10);
    assert_eq!(o.owner, "alice");
    assert_eq!(o.pipeline, "default");
    assert_eq!(o.amount, Some(money("12500.00", "USD")));
    assert_eq!(o.account_id, Some(AccountId::new(uuid(7))));
    assert_eq!(o.opened_at, Some(t0()));
}

#[test]
fn open_defaults_pipeline_stage_and_owner() {
    let mut input = open_input();
    input.stage = None;
    input.owner = None;
    let cmd = input
        .into_command(OpportunityId::new(uuid(1)), t0())
        .unwrap();
    let OpportunityCommand::OpenOpportunity {
        stage,
        owner,
        pipeline,
        ..
    } = cmd
    else {
        panic!()
    };
    assert_eq!(
        (stage.as_str(), owner.as_str(), pipeline.as_str()),
        ("prospecting", "unassigned", "default")
    );
}

#[test]
fn open_input_collects_every_field_error() {
    let input: OpenOpportunityInput = serde_json::from_value(json!({
        "account_id": uuid(7),
        "name": "  ",
        "amount": {"amount": "12.345678", "currency": "usd"},
        "expected_close": "2026-13-01",
        "pipeline": "enterprise",
        "occurred_at": "2030-01-01T00:00:00Z"
    }))
    .unwrap();
    let errs = input
        .into_command(OpportunityId::new(uuid(1)), t0())
        .unwrap_err();
    assert_eq!(
        errs.fields(),
        vec![
            "name",
            "amount.amount",
            "amount.currency",
            "expected_close",
            "pipeline",
            "occurred_at"
        ]
    );

    let mut bad_stage = open_input();
    bad_stage.stage = Some("closed_won".into());
    let errs = bad_stage
        .into_command(OpportunityId::new(uuid(1)), t0())
        .unwrap_err();
    assert_eq!(errs.fields(), vec!["stage"]);
    assert!(errs.0[0].message.contains("prospecting"));
}

#[test]
fn input_rejects_unknown_fields_and_float_amounts() {
    assert!(serde_json::from_value::<AdvanceOpportunityInput>(
        json!({"stage": "proposal", "bogus": 1})
    )
    .is_err());
    assert!(serde_json::from_value::<WinOpportunityInput>(
        json!({"close_value": {"amount": 1.5, "currency": "USD"}})
    )
    .is_err());
}

#[test]
fn open_twice_is_already_exists_and_others_need_existence() {
    let o = opened();
    assert_eq!(o.decide(open_cmd()), Err(DomainError::AlreadyExists));
    let fresh = Opportunity::default();
    for cmd in [advance("proposal"), win(), lose(), reopen(None)] {
        assert_eq!(fresh.decide(cmd), Err(DomainError::NotFound));
    }
}

#[test]
fn open_command_with_unknown_pipeline_or_closed_stage_is_rejected() {
    let mut cmd = open_cmd();
    if let OpportunityCommand::OpenOpportunity { pipeline, .. } = &mut cmd {
        *pipeline = "nope".into();
    }
    assert_eq!(
        invalid_fields(Opportunity::default().decide(cmd)),
        vec!["pipeline"]
    );
    let mut cmd = open_cmd();
    if let OpportunityCommand::OpenOpportunity { stage, .. } = &mut cmd {
        *stage = "closed_lost".into();
    }
    assert_eq!(
        invalid_fields(Opportunity::default().decide(cmd)),
        vec!["stage"]
    );
}

#[test]
fn advance_moves_stage_with_from_to_and_probability() {
    let mut o = opened();
    let events = execute(&mut o, advance("proposal")).unwrap();
    assert_eq!(
        events,
        vec![OpportunityEvent::OpportunityStageAdvanced {
            from: "prospecting".into(),
            to: "proposal".into(),
            probability: 50,
            reason: None,
            occurred_at: at(1),
        }]
    );
    assert_eq!((o.stage.as_str(), o.probability), ("proposal", 50));
    // moving backwards is allowed too
    execute(&mut o, advance("qualification")).unwrap();
    assert_eq!(o.probability, 25);
}

#[test]
fn advance_rejections() {
    let o = opened();
    assert!(illegal(o.decide(advance("prospecting"))).contains("already in stage"));
    assert_eq!(invalid_fields(o.decide(advance("nope"))), vec!["stage"]);
    assert_eq!(
        invalid_fields(o.decide(advance("closed_won"))),
        vec!["stage"]
    );
    let mut won = opened();
    execute(&mut won, win()).unwrap();
    assert_eq!(
        illegal(won.decide(advance("proposal"))),
        "opportunity is closed (won); reopen it first"
    );
    let mut lost = opened();
    execute(&mut lost, lose()).unwrap();
    assert_eq!(
        illegal(lost.decide(advance("proposal"))),
        "opportunity is closed (lost); reopen it first"
    );
}

#[test]
fn update_records_old_and_new_values_of_changed_fields_only() {
    let mut o = opened();
    let input: UpdateOpportunityInput = serde_json::from_value(json!({
        "amount": {"amount": "15000.00", "currency": "USD"},
        "expected_close": "2027-02-28",
        "owner": "alice",
        "name": "Acme renewal"
    }))
    .unwrap();
    let events = execute(&mut o, input.into_command(at(5)).unwrap()).unwrap();
    let [OpportunityEvent::OpportunityUpdated {
        changes,
        occurred_at,
    }] = events.as_slice()
    else {
        panic!("{events:?}")
    };
    assert_eq!(*occurred_at, at(5));
    assert_eq!(
        serde_json::to_value(changes).unwrap(),
        json!([
            {"field": "amount",
             "old": {"amount": "12500.00", "currency": "USD"},
             "new": {"amount": "15000.00", "currency": "USD"}},
            {"field": "expected_close", "old": "2026-12-31", "new": "2027-02-28"}
        ])
    );
    assert_eq!(o.amount, Some(money("15000.00", "USD")));
    assert_eq!(o.expected_close, NaiveDate::from_ymd_opt(2027, 2, 28));
    // same values again: no event
    let again: UpdateOpportunityInput = serde_json::from_value(json!({"owner": "alice"})).unwrap();
    assert_eq!(o.decide(again.into_command(at(6)).unwrap()), Ok(vec![]));
    // changing the owner
    let bob: UpdateOpportunityInput = serde_json::from_value(json!({"owner": "bob"})).unwrap();
    execute(&mut o, bob.into_command(at(7)).unwrap()).unwrap();
    assert_eq!(o.owner, "bob");
}

#[test]
fn update_input_requires_a_field_and_validates_each() {
    let errs = UpdateOpportunityInput::default()
        .into_command(t0())
        .unwrap_err();
    assert_eq!(errs.fields(), vec![""]);
    let input: UpdateOpportunityInput = serde_json::from_value(json!({
        "name": "", "amount": {"amount": "x", "currency": "EUR"}, "expected_close": "soon", "owner": " "
    }))
    .unwrap();
    assert_eq!(
        input.into_command(t0()).unwrap_err().fields(),
        vec!["name", "amount.amount", "expected_close", "owner"]
    );
}

#[test]
fn update_on_closed_is_illegal() {
    let mut o = opened();
    execute(&mut o, lose()).unwrap();
    let cmd = OpportunityCommand::UpdateOpportunity {
        name: Some("x".into()),
        amount: None,
        expected_close: None,
        owner: None,
        occurred_at: at(9),
    };
    assert!(illegal(o.decide(cmd)).contains("closed (lost)"));
}

#[test]
fn win_requires_close_value_and_sets_closed_won() {
    let errs = WinOpportunityInput::default()
        .into_command(t0())
        .unwrap_err();
    assert_eq!(errs.fields(), vec!["close_value"]);
    let bad: WinOpportunityInput =
        serde_json::from_value(json!({"close_value": {"amount": "-5", "currency": "XXY"}}))
            .unwrap();
    assert_eq!(
        bad.into_command(t0()).unwrap_err().fields(),
        vec!["close_value.amount", "close_value.currency"]
    );
    let mut o = opened();
    execute(&mut o, advance("negotiation")).unwrap();
    let events = execute(&mut o, win()).unwrap();
    assert_eq!(
        events,
        vec![OpportunityEvent::OpportunityWon {
            from: "negotiation".into(),
            to: "closed_won".into(),
            probability: 100,
            close_value: money("12000.00", "USD"),
            occurred_at: at(2),
        }]
    );
    assert_eq!(o.status, OpportunityStatus::Won);
    assert_eq!((o.stage.as_str(), o.probability), ("closed_won", 100));
    assert_eq!(o.close_value, Some(money("12000.00", "USD")));
    assert_eq!(o.stage_before_close.as_deref(), Some("negotiation"));
    assert!(illegal(o.decide(win())).contains("closed (won)"));
    assert!(illegal(o.decide(lose())).contains("closed (won)"));
}

#[test]
fn lose_requires_reason_and_sets_closed_lost() {
    let input: LoseOpportunityInput =
        serde_json::from_value(json!({"reason": " ", "competitor": "x".repeat(201)})).unwrap();
    assert_eq!(
        input.into_command(t0()).unwrap_err().fields(),
        vec!["reason", "competitor"]
    );
    let o = opened();
    let blank = OpportunityCommand::LoseOpportunity {
        reason: "".into(),
        competitor: None,
        occurred_at: at(1),
    };
    assert_eq!(invalid_fields(o.decide(blank)), vec!["reason"]);
    let mut o = opened();
    execute(&mut o, lose()).unwrap();
    assert_eq!(o.status, OpportunityStatus::Lost);
    assert_eq!((o.stage.as_str(), o.probability), ("closed_lost", 0));
    assert_eq!(o.lost_reason.as_deref(), Some("price"));
    assert_eq!(o.competitor.as_deref(), Some("Globex"));
}

#[test]
fn reopen_returns_to_stage_before_close_or_given_stage() {
    let o = opened();
    assert!(illegal(o.decide(reopen(None))).contains("is open"));

    let mut o = opened();
    execute(&mut o, advance("proposal")).unwrap();
    execute(&mut o, win()).unwrap();
    let events = execute(&mut o, reopen(None)).unwrap();
    assert_eq!(
        events,
        vec![OpportunityEvent::OpportunityReopened {
            previous_status: OpportunityStatus::Won,
            from: "closed_won".into(),
            to: "proposal".into(),
            probability: 50,
            reason: None,
            occurred_at: at(3),
        }]
    );
    assert_eq!(o.status, OpportunityStatus::Open);
    assert_eq!(o.close_value, None);
    assert_eq!(o.probability, 50);

    let mut o = opened();
    execute(&mut o, lose()).unwrap();
    assert_eq!(
        invalid_fields(o.decide(reopen(Some("closed_won")))),
        vec!["stage"]
    );
    execute(&mut o, reopen(Some("negotiation"))).unwrap();
    assert_eq!((o.stage.as_str(), o.probability), ("negotiation", 75));
    assert_eq!(o.lost_reason, None);
}

#[test]
fn event_json_shape_is_internally_tagged() {
    let e = OpportunityEvent::OpportunityStageAdvanced {
        from: "prospecting".into(),
        to: "qualification".into(),
        probability: 25,
        reason: Some("budget confirmed".into()),
        occurred_at: t0(),
    };
    assert_eq!(e.event_type(), "OpportunityStageAdvanced");
    assert_eq!(e.event_version(), "1");
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(
        v,
        json!({"type": "OpportunityStageAdvanced", "from": "prospecting", "to": "qualification",
               "probability": 25, "reason": "budget confirmed", "occurred_at": "2026-11-20T09:00:00Z"})
    );
    assert_eq!(serde_json::from_value::<OpportunityEvent>(v).unwrap(), e);
    let opened = opened().decide(reopen(None));
    assert!(opened.is_err());
    let o = Opportunity::default().decide(open_cmd()).unwrap();
    let v = serde_json::to_value(&o[0]).unwrap();
    assert_eq!(v["type"], "OpportunityOpened");
    assert_eq!(
        v["amount"],
        json!({"amount": "12500.00", "currency": "USD"})
    );
    assert_eq!(v["expected_close"], "2026-12-31");
    for t in OpportunityEvent::EVENT_TYPES {
        assert!(t.starts_with("Opportunity"));
    }
    assert_eq!(Opportunity::TYPE, "opportunity");
}

#[test]
fn state_round_trips_through_json_and_replay() {
    let mut o = opened();
    let mut log = Opportunity::default().decide(open_cmd()).unwrap();
    log.extend(execute(&mut o, advance("proposal")).unwrap());
    log.extend(execute(&mut o, win()).unwrap());
    let replayed: Opportunity = replay(log);
    assert_eq!(replayed, o);
    let json = serde_json::to_string(&o).unwrap();
    assert_eq!(serde_json::from_str::<Opportunity>(&json).unwrap(), o);
}

#[test]
fn cqrs_test_framework_drives_the_aggregate() {
    let opened_events = Opportunity::default().decide(open_cmd()).unwrap();
    TestFramework::<Opportunity>::with(())
        .given(opened_events.clone())
        .when(advance("qualification"))
        .then_expect_events(vec![OpportunityEvent::OpportunityStageAdvanced {
            from: "prospecting".into(),
            to: "qualification".into(),
            probability: 25,
            reason: None,
            occurred_at: at(1),
        }]);
    TestFramework::<Opportunity>::with(())
        .given(opened_events.clone())
        .when(open_cmd())
        .then_expect_error(DomainError::AlreadyExists);
    TestFramework::<Opportunity>::with(())
        .given_no_previous_events()
        .when(win())
        .then_expect_error(DomainError::NotFound);
    TestFramework::<Opportunity>::with(())
        .given(opened_events)
        .and(vec![OpportunityEvent::OpportunityWon {
            from: "prospecting".into(),
            to: "closed_won".into(),
            probability: 100,
            close_value: money("1.00", "EUR"),
            occurred_at: at(1),
        }])
        .when(advance("proposal"))
        .then_expect_error_message("opportunity is closed (won); reopen it first");
}

// ------------------------------------------------------ backdated commands

fn with_time(mut cmd: OpportunityCommand, t: DateTime<Utc>) -> OpportunityCommand {
    *occurred_at_mut(&mut cmd) = t;
    cmd
}

fn update_owner(owner: &str, t: DateTime<Utc>) -> OpportunityCommand {
    OpportunityCommand::UpdateOpportunity {
        name: None,
        amount: None,
        expected_close: None,
        owner: Some(owner.into()),
        occurred_at: t,
    }
}

/// The single `occurred_at` error message of a rejected command.
fn backdated_message(r: Result<Vec<OpportunityEvent>, DomainError>) -> String {
    match r {
        Err(DomainError::Validation(e)) => {
            assert_eq!(e.fields(), vec!["occurred_at"]);
            e.0[0].message.clone()
        }
        other => panic!("expected an occurred_at validation error, got {other:?}"),
    }
}

#[test]
fn commands_before_the_opening_are_rejected() {
    let o = opened(); // opened (and entered prospecting) at t0
    assert_eq!(o.earliest_occurred_at(), Some(t0()));
    for cmd in [
        advance("proposal"),
        win(),
        lose(),
        update_owner("bob", t0()),
    ] {
        let msg = backdated_message(o.decide(with_time(cmd, at(-1))));
        assert_eq!(
            msg,
            "must not be before 2026-11-20T09:00:00Z, when the opportunity entered its \
             current stage (prospecting)"
        );
    }
}

#[test]
fn commands_before_entering_the_current_stage_are_rejected() {
    let mut o = opened();
    execute(&mut o, with_time(advance("proposal"), at(10))).unwrap();
    assert_eq!(o.stage_entered_at, Some(at(10)));
    for cmd in [
        advance("negotiation"),
        advance("prospecting"),
        win(),
        lose(),
        update_owner("bob", at(0)),
    ] {
        let msg = backdated_message(o.decide(with_time(cmd, at(9))));
        assert!(msg.contains("2026-11-20T09:10:00Z"), "{msg}");
        assert!(msg.contains("(proposal)"), "{msg}");
    }
    // the instant itself is allowed, and so is anything later
    execute(&mut o, update_owner("bob", at(10))).unwrap();
    execute(&mut o, with_time(advance("negotiation"), at(10))).unwrap();
    assert_eq!(o.stage_entered_at, Some(at(10)));
    execute(&mut o, with_time(win(), at(11))).unwrap();
    assert_eq!(o.closed_at, Some(at(11)));
}

#[test]
fn updates_after_stage_entry_may_arrive_out_of_order() {
    // only the stage entry bounds occurred_at, not earlier updates
    let mut o = opened();
    execute(&mut o, update_owner("bob", at(30))).unwrap();
    execute(&mut o, update_owner("carol", at(20))).unwrap();
    assert_eq!(o.owner, "carol");
    assert_eq!(o.earliest_occurred_at(), Some(t0()));
}

#[test]
fn reopen_before_the_close_is_rejected() {
    for close in [win(), lose()] {
        let mut o = opened();
        execute(&mut o, with_time(advance("proposal"), at(5))).unwrap();
        execute(&mut o, with_time(close, at(20))).unwrap();
        assert_eq!(o.earliest_occurred_at(), Some(at(20)));
        // even a time inside the stage the opportunity was closed from
        let msg = backdated_message(o.decide(with_time(reopen(None), at(19))));
        assert_eq!(
            msg,
            format!(
                "must not be before 2026-11-20T09:20:00Z, when the opportunity was closed ({})",
                o.status.as_str()
            )
        );
        execute(&mut o, with_time(reopen(None), at(20))).unwrap();
        assert_eq!(o.stage_entered_at, Some(at(20)));
        assert!(o.is_open());
        // after reopening, the reopen instant bounds the next command
        backdated_message(o.decide(with_time(win(), at(19))));
    }
}

#[test]
fn state_rules_win_over_the_backdating_rule() {
    let mut o = opened();
    execute(&mut o, with_time(win(), at(20))).unwrap();
    // a closed opportunity is closed, whatever the time
    assert!(illegal(o.decide(with_time(advance("proposal"), at(1)))).contains("closed (won)"));
    assert!(illegal(o.decide(update_owner("bob", at(1)))).contains("closed (won)"));
    let open = opened();
    assert!(illegal(open.decide(with_time(reopen(None), at(-5)))).contains("is open"));
    assert!(illegal(open.decide(with_time(advance("prospecting"), at(-5)))).contains("already"));
}

#[test]
fn backdated_input_passes_input_validation_but_not_decide() {
    // the input layer only knows "now"; the aggregate knows the stage entry
    let mut o = opened();
    execute(&mut o, with_time(advance("qualification"), at(60))).unwrap();
    let input: WinOpportunityInput = serde_json::from_value(json!({
        "close_value": {"amount": "10.00", "currency": "USD"},
        "occurred_at": "2026-11-20T09:30:00Z"
    }))
    .unwrap();
    let cmd = input.into_command(at(90)).unwrap();
    let msg = backdated_message(o.decide(cmd));
    assert!(msg.contains("2026-11-20T10:00:00Z"), "{msg}");
}

// ------------------------------------------------------------- properties

fn arb_stage() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("prospecting"),
        Just("qualification"),
        Just("proposal"),
        Just("negotiation"),
        Just("closed_won"),
        Just("closed_lost"),
        Just("bogus"),
    ]
    .prop_map(String::from)
}

fn arb_money() -> impl Strategy<Value = Money> {
    (
        0u64..10_000_000,
        prop_oneof![Just("USD"), Just("EUR"), Just("VND")],
    )
        .prop_map(|(cents, c)| money(&format!("{}.{:02}", cents / 100, cents % 100), c))
}

/// A command plus the offset (minutes) of its `occurred_at` from the
/// earliest instant the state accepts (`earliest_occurred_at`, or `t0` for
/// a fresh opportunity): negative offsets are backdated commands.
fn arb_step() -> impl Strategy<Value = (OpportunityCommand, i64)> {
    let t = at(0); // placeholder, replaced from the offset in the test
    let offset = prop_oneof![
        3 => 1i64..240,
        1 => Just(0i64),
        2 => -240i64..0,
    ];
    let cmd = prop_oneof![
        1 => (arb_stage(), arb_money()).prop_map(move |(stage, amount)| OpportunityCommand::OpenOpportunity {
            id: OpportunityId::new(uuid(1)),
            account_id: AccountId::new(uuid(2)),
            name: "deal".into(),
            amount,
            expected_close: NaiveDate::from_ymd_opt(2027, 1, 1).unwrap(),
            owner: "alice".into(),
            pipeline: "default".into(),
            stage,
            occurred_at: t,
        }),
        4 => arb_stage().prop_map(move |stage| {
            OpportunityCommand::AdvanceStage { stage, reason: None, occurred_at: t }
        }),
        2 => (proptest::option::of(arb_money()), proptest::option::of(prop_oneof![Just("alice"), Just("bob")]))
            .prop_map(move |(amount, owner)| OpportunityCommand::UpdateOpportunity {
                name: None, amount, expected_close: None, owner: owner.map(String::from), occurred_at: t,
            }),
        2 => arb_money().prop_map(move |close_value| {
            OpportunityCommand::WinOpportunity { close_value, occurred_at: t }
        }),
        2 => prop_oneof![Just(""), Just("price")].prop_map(move |reason| {
            OpportunityCommand::LoseOpportunity { reason: reason.into(), competitor: None, occurred_at: t }
        }),
        2 => proptest::option::of(arb_stage()).prop_map(move |stage| {
            OpportunityCommand::ReopenOpportunity { reason: None, stage, occurred_at: t }
        }),
    ];
    (cmd, offset)
}

fn occurred_at_mut(cmd: &mut OpportunityCommand) -> &mut DateTime<Utc> {
    use OpportunityCommand::*;
    match cmd {
        OpenOpportunity { occurred_at, .. }
        | AdvanceStage { occurred_at, .. }
        | UpdateOpportunity { occurred_at, .. }
        | WinOpportunity { occurred_at, .. }
        | LoseOpportunity { occurred_at, .. }
        | ReopenOpportunity { occurred_at, .. } => occurred_at,
    }
}

fn event_time(e: &OpportunityEvent) -> DateTime<Utc> {
    use OpportunityEvent::*;
    match e {
        OpportunityOpened { occurred_at, .. }
        | OpportunityStageAdvanced { occurred_at, .. }
        | OpportunityUpdated { occurred_at, .. }
        | OpportunityWon { occurred_at, .. }
        | OpportunityLost { occurred_at, .. }
        | OpportunityReopened { occurred_at, .. } => *occurred_at,
    }
}

fn check_invariants(o: &Opportunity) {
    if !o.exists() {
        assert_eq!(*o, Opportunity::default());
        return;
    }
    let def = pipeline::find(&o.pipeline).unwrap();
    assert_eq!(def.probability(&o.stage), Some(o.probability), "{o:?}");
    // durations are never negative
    let opened_at = o.opened_at.expect("opened_at");
    let entered = o.stage_entered_at.expect("stage_entered_at");
    assert!(entered >= opened_at, "time in stage before open: {o:?}");
    match o.status {
        OpportunityStatus::Open => {
            assert!(def.is_open_stage(&o.stage));
            assert!(o.close_value.is_none() && o.closed_at.is_none());
        }
        OpportunityStatus::Won => {
            assert_eq!(o.stage, CLOSED_WON);
            assert_eq!(o.probability, 100);
            assert!(o.close_value.is_some());
            assert!(def.is_open_stage(o.stage_before_close.as_deref().unwrap()));
        }
        OpportunityStatus::Lost => {
            assert_eq!(o.stage, CLOSED_LOST);
            assert_eq!(o.probability, 0);
            assert!(o.lost_reason.as_deref().is_some_and(|r| !r.is_empty()));
            assert!(def.is_open_stage(o.stage_before_close.as_deref().unwrap()));
        }
    }
    if !o.is_open() {
        let closed_at = o.closed_at.expect("closed_at");
        assert_eq!(closed_at, entered, "a close enters the closed stage");
        assert!(closed_at >= opened_at, "negative sales cycle: {o:?}");
    }
    assert_eq!(o.earliest_occurred_at(), Some(entered));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn opportunity_invariants_hold_for_any_command_sequence(
        steps in proptest::collection::vec(arb_step(), 1..40)
    ) {
        let mut state = Opportunity::default();
        let mut log = Vec::new();
        let mut accepted_events = 0usize;
        for (mut cmd, offset) in steps {
            let before = state.clone();
            let earliest = state.earliest_occurred_at();
            let occurred_at = earliest.unwrap_or_else(t0) + chrono::Duration::minutes(offset);
            *occurred_at_mut(&mut cmd) = occurred_at;
            let backdated = before.exists()
                && !matches!(cmd, OpportunityCommand::OpenOpportunity { .. })
                && offset < 0;
            match state.decide(cmd.clone()) {
                Ok(events) => {
                    prop_assert!(!backdated, "backdated command accepted: {:?} on {:?}", cmd, before);
                    if let Some(earliest) = earliest {
                        prop_assert!(events.iter().all(|e| event_time(e) >= earliest));
                    }
                    accepted_events += events.len();
                    for e in &events {
                        // every event survives a JSON round trip
                        let json = serde_json::to_string(e).unwrap();
                        prop_assert_eq!(&serde_json::from_str::<OpportunityEvent>(&json).unwrap(), e);
                        if matches!(e, OpportunityEvent::OpportunityWon { .. } | OpportunityEvent::OpportunityLost { .. }) {
                            // closed no earlier than the closed-from stage was entered
                            prop_assert!(Some(event_time(e)) >= state.stage_entered_at);
                        }
                        state.apply(e.clone());
                    }
                    log.extend(events);
                }
                Err(err) => {
                    prop_assert_eq!(&state, &before);
                    if let DomainError::Validation(v) = &err {
                        if v.has("occurred_at") {
                            prop_assert!(backdated, "{:?} for {:?}", err, cmd);
                            let earliest = earliest.unwrap().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                            prop_assert!(v.0[0].message.contains(&earliest), "{:?}", v);
                        }
                    }
                }
            }
            // a closed opportunity rejects moves
            if state.exists() && !state.is_open() {
                prop_assert!(state.decide(advance("proposal")).is_err());
            }
            check_invariants(&state);
        }
        // stage transitions never go back in time, and nothing is recorded
        // before the transition preceding it
        let mut last_transition: Option<DateTime<Utc>> = None;
        for e in &log {
            let t = event_time(e);
            prop_assert!(last_transition.is_none_or(|l| t >= l), "{:?} before {:?}", e, last_transition);
            if !matches!(e, OpportunityEvent::OpportunityUpdated { .. }) {
                last_transition = Some(t);
            }
        }
        prop_assert_eq!(log.len(), accepted_events);
        let replayed: Opportunity = replay(log);
        prop_assert_eq!(replayed, state);
    }
}
