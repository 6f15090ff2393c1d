//! Support case routes: open, assign, comment, escalate, resolve, close, reopen.

use axum::extract::State;
use axum::http::HeaderMap;
use crm_domain::case::{
    AssignCaseInput, Case, CloseCaseInput, CommentCaseInput, EscalateCaseInput, OpenCaseInput,
    ReopenCaseInput, ResolveCaseInput,
};
use crm_domain::ids::CaseId;
use uuid::Uuid;

use super::{require_existing, run, update_route, Route};
use crate::app::{App, CommandResponse};
use crate::auth::Actor;
use crate::body::JsonBody;
use crate::executor::{CommandError, Mode, Outcome};
use crate::problem::Problem;

/// Open a support case for an account and/or contact.
#[utoipa::path(post, path = "/v1/cases", tag = "cases", request_body = OpenCaseInput,
    responses((status = 201, body = CommandResponse), (status = 422, body = Problem), (status = 409, body = Problem)))]
pub async fn open(
    State(app): State<App>,
    actor: Actor,
    headers: HeaderMap,
    body: JsonBody<OpenCaseInput>,
) -> Result<Outcome, CommandError> {
    require_existing(
        &app,
        &actor,
        &[
            ("account_id", "account", body.value.account_id),
            ("contact_id", "contact", body.value.contact_id),
        ],
    )
    .await?;
    let id = body.value.id.unwrap_or_else(Uuid::now_v7);
    let route = Route {
        stream_type: "case",
        command: "open",
        mode: Mode::Create,
        path: "POST /v1/cases",
    };
    run::<Case>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(CaseId::new(id), now)
    })
    .await
}

update_route!(
    /// Assign the case to an agent.
    assign: post "/v1/cases/{id}/assign", "cases", Case, AssignCaseInput, "case", "assign");
update_route!(
    /// Add an internal or public comment; the first public one is the first response.
    comment: post "/v1/cases/{id}/comment", "cases", Case, CommentCaseInput, "case", "comment");
update_route!(
    /// Escalate, with the reason.
    escalate: post "/v1/cases/{id}/escalate", "cases", Case, EscalateCaseInput, "case", "escalate");
update_route!(
    /// Resolve, with the resolution.
    resolve: post "/v1/cases/{id}/resolve", "cases", Case, ResolveCaseInput, "case", "resolve");
update_route!(
    /// Close a resolved case.
    close: post "/v1/cases/{id}/close", "cases", Case, CloseCaseInput, "case", "close");
update_route!(
    /// Reopen a resolved or closed case.
    reopen: post "/v1/cases/{id}/reopen", "cases", Case, ReopenCaseInput, "case", "reopen");
