//! Lead routes: capture, qualify, disqualify, and convert (which creates the
//! account, contact and optional opportunity in the same transaction).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use crm_domain::account::Account;
use crm_domain::aggregate::CrmAggregate;
use crm_domain::contact::Contact;
use crm_domain::error::DomainError;
use crm_domain::ids::{AccountId, ContactId, LeadId, OpportunityId};
use crm_domain::lead::{
    plan_conversion, CaptureLeadInput, ConversionIds, ConvertLeadInput, DisqualifyLeadInput, Lead,
    QualifyLeadInput,
};
use crm_domain::opportunity::Opportunity;
use uuid::Uuid;

use super::{require_existing, run, update_route, PathId, Route};
use crate::app::{App, CommandResponse};
use crate::auth::Actor;
use crate::body::JsonBody;
use crate::executor::{
    check_if_match, domain_problem, new_events, Appended, CommandError, Mode, Outcome, Staged,
};
use crate::problem::Problem;

/// Capture a lead.
#[utoipa::path(post, path = "/v1/leads", tag = "leads", request_body = CaptureLeadInput,
    responses((status = 201, body = CommandResponse), (status = 422, body = Problem), (status = 409, body = Problem)))]
pub async fn capture(
    State(app): State<App>,
    actor: Actor,
    headers: HeaderMap,
    body: JsonBody<CaptureLeadInput>,
) -> Result<Outcome, CommandError> {
    let id = body.value.id.unwrap_or_else(Uuid::now_v7);
    let route = Route {
        stream_type: "lead",
        command: "capture",
        mode: Mode::Create,
        path: "POST /v1/leads",
    };
    run::<Lead>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(LeadId::new(id), now)
    })
    .await
}

update_route!(
    /// Qualify a new lead.
    qualify: post "/v1/leads/{id}/qualify", "leads", Lead, QualifyLeadInput, "lead", "qualify");
update_route!(
    /// Disqualify a lead, with the reason.
    disqualify: post "/v1/leads/{id}/disqualify", "leads", Lead, DisqualifyLeadInput, "lead", "disqualify");

/// Convert a lead into an account (or attach to `account_id`), a contact and,
/// optionally, an opportunity: every stream is written in one transaction.
#[utoipa::path(post, path = "/v1/leads/{id}/convert", tag = "leads", request_body = ConvertLeadInput,
    responses((status = 200, body = CommandResponse), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn convert(
    State(app): State<App>,
    actor: Actor,
    PathId(id): PathId,
    headers: HeaderMap,
    body: JsonBody<ConvertLeadInput>,
) -> Result<Outcome, CommandError> {
    let ctx = app.context(
        &actor,
        "lead",
        "convert",
        "POST /v1/leads/{id}/convert",
        &headers,
        &body.body_hash,
    )?;
    for (stream_type, command) in [
        ("account", "register"),
        ("contact", "create"),
        ("opportunity", "open"),
    ] {
        actor.require_command(stream_type, command)?;
    }
    if let Some(outcome) = app.executor.replay(&ctx).await? {
        return Ok(outcome);
    }
    require_existing(
        &app,
        &actor,
        &[("account_id", "account", body.value.account_id)],
    )
    .await?;
    let executor = &app.executor;
    let stream_id = id.to_string();
    for _attempt in 0..8 {
        let lead = executor.load::<Lead>(&actor.tenant, &stream_id).await?;
        if !lead.state.exists() {
            return Err(CommandError::rejected(Problem::not_found(format!(
                "no lead with id {id}"
            ))));
        }
        check_if_match(&ctx, lead.version)?;
        let ids = ConversionIds {
            account_id: AccountId::new(body.value.account_id.unwrap_or_else(Uuid::now_v7)),
            contact_id: ContactId::new(Uuid::now_v7()),
            opportunity_id: OpportunityId::new(Uuid::now_v7()),
        };
        let plan =
            plan_conversion(&lead.state, body.value.clone(), ids, ctx.now).map_err(|error| {
                match error {
                    // The body's own fields: bad input, not a refusal.
                    DomainError::Validation(errors) => Problem::validation(errors.0).into(),
                    refusal => domain_problem(refusal),
                }
            })?;
        let mut staged = vec![Staged {
            stream_type: "lead",
            stream_id: stream_id.clone(),
            expected_version: lead.version,
            events: new_events(&ctx, &lead.state.decide(plan.lead).map_err(domain_problem)?)?,
        }];
        if let Some((account_id, command)) = plan.account {
            let events = Account::default().decide(command).map_err(domain_problem)?;
            staged.push(created(
                "account",
                account_id.to_string(),
                new_events(&ctx, &events)?,
            ));
        }
        let (contact_id, command) = plan.contact;
        let events = Contact::default().decide(command).map_err(domain_problem)?;
        staged.push(created(
            "contact",
            contact_id.to_string(),
            new_events(&ctx, &events)?,
        ));
        if let Some((opportunity_id, command)) = plan.opportunity {
            let events = Opportunity::default()
                .decide(command)
                .map_err(domain_problem)?;
            staged.push(created(
                "opportunity",
                opportunity_id.to_string(),
                new_events(&ctx, &events)?,
            ));
        }
        match executor.append(&ctx, staged, StatusCode::OK).await? {
            Appended::Committed(outcome) | Appended::Replayed(outcome) => return Ok(outcome),
            Appended::Conflict if ctx.expected_version().is_some() => {
                return Err(Problem::precondition_failed("the lead changed meanwhile").into())
            }
            Appended::Conflict => continue,
        }
    }
    Err(Problem::conflict("the lead is being changed by many writers at once; retry").into())
}

fn created(
    stream_type: &'static str,
    stream_id: String,
    events: Vec<crm_eventlog::NewEvent>,
) -> Staged {
    Staged {
        stream_type,
        stream_id,
        expected_version: 0,
        events,
    }
}
