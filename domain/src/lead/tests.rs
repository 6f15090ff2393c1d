use super::*;
use crate::aggregate::execute;
use crate::test_support::{at, t0, uuid};
use cqrs_es::DomainEvent;
use proptest::prelude::*;
use serde_json::json;

fn capture_input() -> CaptureLeadInput {
    serde_json::from_value(json!({
        "name": "Tran Van B", "company": "Beta Ltd", "email": "b@beta.example",
        "phone": "+84 90 000 0000", "source": "web_form"
    }))
    .unwrap()
}

fn captured() -> Lead {
    let mut l = Lead::default();
    execute(
        &mut l,
        capture_input()
            .into_command(LeadId::new(uuid(1)), t0())
            .unwrap(),
    )
    .unwrap();
    l
}

fn qualify() -> LeadCommand {
    LeadCommand::QualifyLead { occurred_at: at(1) }
}
fn disqualify() -> LeadCommand {
    LeadCommand::DisqualifyLead {
        reason: "no budget".into(),
        occurred_at: at(2),
    }
}
fn ids() -> ConversionIds {
    ConversionIds {
        account_id: AccountId::new(uuid(10)),
        contact_id: ContactId::new(uuid(11)),
        opportunity_id: OpportunityId::new(uuid(12)),
    }
}
fn convert_cmd() -> LeadCommand {
    plan_conversion(&captured(), ConvertLeadInput::default(), ids(), at(3))
        .unwrap()
        .lead
}

fn is_illegal<T: std::fmt::Debug>(r: Result<T, DomainError>) -> bool {
    matches!(r, Err(DomainError::IllegalTransition(_)))
}

#[test]
fn capture_records_all_fields() {
    let l = captured();
    assert_eq!(l.status, LeadStatus::New);
    assert_eq!(l.name, "Tran Van B");
    assert_eq!(l.company.as_deref(), Some("Beta Ltd"));
    assert_eq!(l.email.as_ref().map(Email::as_str), Some("b@beta.example"));
    assert_eq!(l.source, LeadSource::WebForm);
    let e = Lead::default()
        .decide(
            capture_input()
                .into_command(LeadId::new(uuid(1)), t0())
                .unwrap(),
        )
        .unwrap();
    assert_eq!(e[0].event_type(), "LeadCaptured");
    let v = serde_json::to_value(&e[0]).unwrap();
    assert_eq!(v["type"], "LeadCaptured");
    assert_eq!(v["source"], "web_form");
    assert_eq!(v["phone"], "+84 90 000 0000");
}

#[test]
fn capture_validation_collects_all_errors() {
    let input: CaptureLeadInput = serde_json::from_value(json!({
        "name": "", "email": "not-an-email", "phone": "12", "source": "tv"
    }))
    .unwrap();
    let errs = input.into_command(LeadId::new(uuid(1)), t0()).unwrap_err();
    assert_eq!(errs.fields(), vec!["name", "email", "phone", "source"]);
    assert!(errs.0[3].message.contains("web_form"));

    let none: CaptureLeadInput = serde_json::from_value(json!({"name": "A"})).unwrap();
    let errs = none.into_command(LeadId::new(uuid(1)), t0()).unwrap_err();
    assert_eq!(errs.fields(), vec!["email"]);
    assert!(errs.0[0].message.contains("email or phone"));

    let phone_only: CaptureLeadInput =
        serde_json::from_value(json!({"name": "A", "phone": "0901234567"})).unwrap();
    let cmd = phone_only.into_command(LeadId::new(uuid(1)), t0()).unwrap();
    assert!(matches!(
        cmd,
        LeadCommand::CaptureLead {
            source: LeadSource::Other,
            ..
        }
    ));
}

#[test]
fn lifecycle_rules() {
    assert_eq!(
        Lead::default().decide(qualify()),
        Err(DomainError::NotFound)
    );
    assert_eq!(
        Lead::default().decide(convert_cmd()),
        Err(DomainError::NotFound)
    );
    let cap = capture_input()
        .into_command(LeadId::new(uuid(1)), t0())
        .unwrap();
    assert_eq!(captured().decide(cap), Err(DomainError::AlreadyExists));

    let mut l = captured();
    execute(&mut l, qualify()).unwrap();
    assert_eq!(l.status, LeadStatus::Qualified);
    assert!(is_illegal(l.decide(qualify())), "qualify only from new");
    execute(&mut l, convert_cmd()).unwrap();
    assert_eq!(l.status, LeadStatus::Converted);
    assert_eq!(
        l.converted_to,
        Some(ConvertedTo {
            account_id: ids().account_id,
            contact_id: ids().contact_id,
            opportunity_id: None
        })
    );
    for cmd in [qualify(), disqualify(), convert_cmd()] {
        assert!(is_illegal(l.decide(cmd)));
    }

    let mut d = captured();
    let e = execute(&mut d, disqualify()).unwrap();
    assert!(
        matches!(&e[0], LeadEvent::LeadDisqualified { from: LeadStatus::New, reason, .. } if reason == "no budget")
    );
    for cmd in [qualify(), disqualify(), convert_cmd()] {
        assert!(is_illegal(d.decide(cmd)));
    }

    // convert straight from new; disqualify from qualified
    let mut n = captured();
    assert!(execute(&mut n, convert_cmd()).is_ok());
    let mut q = captured();
    execute(&mut q, qualify()).unwrap();
    assert!(execute(&mut q, disqualify()).is_ok());

    let blank = LeadCommand::DisqualifyLead {
        reason: " ".into(),
        occurred_at: at(1),
    };
    assert!(matches!(
        captured().decide(blank),
        Err(DomainError::Validation(_))
    ));
    let input: DisqualifyLeadInput = serde_json::from_value(json!({"reason": ""})).unwrap();
    assert_eq!(
        input.into_command(t0()).unwrap_err().fields(),
        vec!["reason"]
    );
    let q: QualifyLeadInput = serde_json::from_value(json!({})).unwrap();
    assert_eq!(q.into_command(at(1)).unwrap(), qualify());
}

#[test]
fn plan_conversion_builds_account_contact_and_opportunity() {
    let input: ConvertLeadInput = serde_json::from_value(json!({
        "owner": "alice",
        "opportunity": {"name": "Beta rollout", "amount": {"amount": "12000.00", "currency": "USD"},
                        "expected_close": "2027-01-31"}
    }))
    .unwrap();
    let plan = plan_conversion(&captured(), input, ids(), at(3)).unwrap();
    let (
        aid,
        AccountCommand::RegisterAccount {
            name, kind, owner, ..
        },
    ) = plan.account.clone().unwrap()
    else {
        panic!()
    };
    assert_eq!(aid, ids().account_id);
    assert_eq!(name, "Beta Ltd");
    assert_eq!(kind, AccountKind::Prospect);
    assert_eq!(owner.as_deref(), Some("alice"));
    let (
        cid,
        ContactCommand::CreateContact {
            account_id,
            name,
            email,
            phone,
            ..
        },
    ) = plan.contact.clone()
    else {
        panic!()
    };
    assert_eq!(cid, ids().contact_id);
    assert_eq!(account_id, Some(ids().account_id));
    assert_eq!(name, "Tran Van B");
    assert!(email.is_some() && phone.is_some());
    let (
        oid,
        OpportunityCommand::OpenOpportunity {
            account_id,
            stage,
            owner,
            amount,
            ..
        },
    ) = plan.opportunity.clone().unwrap()
    else {
        panic!()
    };
    assert_eq!(oid, ids().opportunity_id);
    assert_eq!(account_id, ids().account_id);
    assert_eq!(stage, "prospecting");
    assert_eq!(owner, "alice");
    assert_eq!(amount.to_string(), "12000.00 USD");
    assert_eq!(
        plan.lead,
        LeadCommand::ConvertLead {
            account_id: ids().account_id,
            account_created: true,
            contact_id: ids().contact_id,
            opportunity_id: Some(ids().opportunity_id),
            occurred_at: at(3),
        }
    );
    // every planned command is accepted by a fresh aggregate
    assert!(crate::account::Account::default()
        .decide(plan.account.unwrap().1)
        .is_ok());
    assert!(crate::contact::Contact::default()
        .decide(plan.contact.1)
        .is_ok());
    assert!(crate::opportunity::Opportunity::default()
        .decide(plan.opportunity.unwrap().1)
        .is_ok());
}

#[test]
fn plan_conversion_onto_existing_account_without_company() {
    let mut l = Lead::default();
    let input: CaptureLeadInput =
        serde_json::from_value(json!({"name": "Solo", "phone": "0901234567"})).unwrap();
    execute(
        &mut l,
        input.into_command(LeadId::new(uuid(1)), t0()).unwrap(),
    )
    .unwrap();
    let existing = uuid(99);
    let input: ConvertLeadInput = serde_json::from_value(json!({"account_id": existing})).unwrap();
    let plan = plan_conversion(&l, input, ids(), at(1)).unwrap();
    assert!(plan.account.is_none());
    assert!(plan.opportunity.is_none());
    assert!(matches!(
        plan.contact.1,
        ContactCommand::CreateContact { account_id: Some(a), preferred_channel: Some(ContactChannel::Phone), .. }
            if a == AccountId::new(existing)
    ));
    assert!(matches!(
        plan.lead,
        LeadCommand::ConvertLead {
            account_created: false,
            opportunity_id: None,
            ..
        }
    ));
    // without a company the account is named after the lead
    let plan = plan_conversion(&l, ConvertLeadInput::default(), ids(), at(1)).unwrap();
    assert!(
        matches!(plan.account, Some((_, AccountCommand::RegisterAccount { ref name, .. })) if name == "Solo")
    );
}

#[test]
fn plan_conversion_rejections() {
    assert_eq!(
        plan_conversion(&Lead::default(), ConvertLeadInput::default(), ids(), t0()),
        Err(DomainError::NotFound)
    );
    let mut d = captured();
    execute(&mut d, disqualify()).unwrap();
    assert!(is_illegal(plan_conversion(
        &d,
        ConvertLeadInput::default(),
        ids(),
        t0()
    )));
    let input: ConvertLeadInput = serde_json::from_value(json!({
        "owner": "",
        "opportunity": {"name": "", "amount": {"amount": "1.2.3", "currency": "ZZZ"},
                        "expected_close": "tomorrow", "stage": "closed_won"}
    }))
    .unwrap();
    let Err(DomainError::Validation(errs)) = plan_conversion(&captured(), input, ids(), t0())
    else {
        panic!()
    };
    assert_eq!(
        errs.fields(),
        vec![
            "opportunity.name",
            "opportunity.amount.amount",
            "opportunity.amount.currency",
            "opportunity.expected_close",
            "opportunity.stage"
        ]
    );
}

fn arb_command() -> impl Strategy<Value = LeadCommand> {
    prop_oneof![
        Just(
            capture_input()
                .into_command(LeadId::new(uuid(1)), t0())
                .unwrap()
        ),
        Just(qualify()),
        Just(disqualify()),
        Just(convert_cmd()),
    ]
}

proptest! {
    #[test]
    fn lead_status_only_moves_forward(cmds in proptest::collection::vec(arb_command(), 1..20)) {
        let rank = |s: LeadStatus| match s {
            LeadStatus::New => 0,
            LeadStatus::Qualified => 1,
            LeadStatus::Disqualified | LeadStatus::Converted => 2,
        };
        let mut state = Lead::default();
        for cmd in cmds {
            let before = state.clone();
            match execute(&mut state, cmd) {
                Ok(events) => {
                    prop_assert_eq!(events.len(), 1);
                    prop_assert!(!before.status.is_final());
                    prop_assert!(!before.exists() || rank(state.status) > rank(before.status)
                        || state.status == LeadStatus::Disqualified || state.status == LeadStatus::Converted);
                }
                Err(_) => prop_assert_eq!(&state, &before),
            }
            prop_assert_eq!(state.converted_to.is_some(), state.status == LeadStatus::Converted);
            prop_assert_eq!(state.disqualified_reason.is_some(), state.status == LeadStatus::Disqualified);
        }
    }
}
