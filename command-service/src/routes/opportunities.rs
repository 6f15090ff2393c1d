//! Opportunity routes: open on an account, move through the pipeline, edit,
//! win, lose, reopen.

use axum::extract::State;
use axum::http::HeaderMap;
use crm_domain::ids::OpportunityId;
use crm_domain::opportunity::{
    AdvanceOpportunityInput, LoseOpportunityInput, OpenOpportunityInput, Opportunity,
    ReopenOpportunityInput, UpdateOpportunityInput, WinOpportunityInput,
};
use uuid::Uuid;

use super::{require_existing, run, update_route, Route};
use crate::app::{App, CommandResponse};
use crate::auth::Actor;
use crate::body::JsonBody;
use crate::executor::{CommandError, Mode, Outcome};
use crate::problem::Problem;

/// Open an opportunity on an account.
#[utoipa::path(post, path = "/v1/opportunities", tag = "opportunities", request_body = OpenOpportunityInput,
    responses((status = 201, body = CommandResponse), (status = 422, body = Problem), (status = 409, body = Problem)))]
pub async fn open(
    State(app): State<App>,
    actor: Actor,
    headers: HeaderMap,
    body: JsonBody<OpenOpportunityInput>,
) -> Result<Outcome, CommandError> {
    require_existing(
        &app,
        &actor,
        &[("account_id", "account", Some(body.value.account_id))],
    )
    .await?;
    let id = body.value.id.unwrap_or_else(Uuid::now_v7);
    let route = Route {
        stream_type: "opportunity",
        command: "open",
        mode: Mode::Create,
        path: "POST /v1/opportunities",
    };
    run::<Opportunity>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(OpportunityId::new(id), now)
    })
    .await
}

update_route!(
    /// Move an open opportunity to another open stage of its pipeline.
    advance: post "/v1/opportunities/{id}/advance", "opportunities", Opportunity, AdvanceOpportunityInput, "opportunity", "advance");
update_route!(
    /// Edit amount, expected close date, owner or name; any subset.
    update: patch "/v1/opportunities/{id}", "opportunities", Opportunity, UpdateOpportunityInput, "opportunity", "update");
update_route!(
    /// Close as won, with the close value.
    win: post "/v1/opportunities/{id}/win", "opportunities", Opportunity, WinOpportunityInput, "opportunity", "win");
update_route!(
    /// Close as lost, with the reason and optional competitor.
    lose: post "/v1/opportunities/{id}/lose", "opportunities", Opportunity, LoseOpportunityInput, "opportunity", "lose");
update_route!(
    /// Reopen a won or lost opportunity.
    reopen: post "/v1/opportunities/{id}/reopen", "opportunities", Opportunity, ReopenOpportunityInput, "opportunity", "reopen");
