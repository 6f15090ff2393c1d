//! Contact routes: create, update, log an activity, complete a task.

use axum::extract::State;
use axum::http::HeaderMap;
use crm_domain::contact::{
    CompleteTaskInput, Contact, CreateContactInput, LogActivityInput, UpdateContactInput,
};
use crm_domain::ids::{ActivityId, ContactId};
use uuid::Uuid;

use super::{require_existing, run, update_route, PathId, Route};
use crate::app::{App, CommandResponse};
use crate::auth::Actor;
use crate::body::JsonBody;
use crate::executor::{CommandError, Mode, Outcome};
use crate::problem::Problem;

/// Create a contact, optionally linked to an account.
#[utoipa::path(post, path = "/v1/contacts", tag = "contacts", request_body = CreateContactInput,
    responses((status = 201, body = CommandResponse), (status = 422, body = Problem), (status = 409, body = Problem)))]
pub async fn create(
    State(app): State<App>,
    actor: Actor,
    headers: HeaderMap,
    body: JsonBody<CreateContactInput>,
) -> Result<Outcome, CommandError> {
    require_existing(
        &app,
        &actor,
        &[("account_id", "account", body.value.account_id)],
    )
    .await?;
    let id = body.value.id.unwrap_or_else(Uuid::now_v7);
    let route = Route {
        stream_type: "contact",
        command: "create",
        mode: Mode::Create,
        path: "POST /v1/contacts",
    };
    run::<Contact>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(ContactId::new(id), now)
    })
    .await
}

/// Update a contact; any subset of fields.
#[utoipa::path(patch, path = "/v1/contacts/{id}", tag = "contacts", request_body = UpdateContactInput,
    responses((status = 200, body = CommandResponse), (status = 404, body = Problem), (status = 412, body = Problem), (status = 422, body = Problem)))]
pub async fn update(
    State(app): State<App>,
    actor: Actor,
    PathId(id): PathId,
    headers: HeaderMap,
    body: JsonBody<UpdateContactInput>,
) -> Result<Outcome, CommandError> {
    require_existing(
        &app,
        &actor,
        &[("account_id", "account", body.value.account_id)],
    )
    .await?;
    let route = Route {
        stream_type: "contact",
        command: "update",
        mode: Mode::Update,
        path: "PATCH /v1/contacts/{id}",
    };
    run::<Contact>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(now)
    })
    .await
}

/// Log a call, email, meeting, note or task with a contact.
#[utoipa::path(post, path = "/v1/contacts/{id}/activities", tag = "contacts", request_body = LogActivityInput,
    responses((status = 200, body = CommandResponse), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn log_activity(
    State(app): State<App>,
    actor: Actor,
    PathId(id): PathId,
    headers: HeaderMap,
    body: JsonBody<LogActivityInput>,
) -> Result<Outcome, CommandError> {
    require_existing(
        &app,
        &actor,
        &[
            ("opportunity_id", "opportunity", body.value.opportunity_id),
            ("case_id", "case", body.value.case_id),
        ],
    )
    .await?;
    let activity_id = ActivityId::new(body.value.id.unwrap_or_else(Uuid::now_v7));
    let route = Route {
        stream_type: "contact",
        command: "log_activity",
        mode: Mode::Update,
        path: "POST /v1/contacts/{id}/activities",
    };
    run::<Contact>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(activity_id, now)
    })
    .await
}

update_route!(
    /// Mark a task activity as done.
    complete_task: post "/v1/contacts/{id}/tasks/complete", "contacts", Contact, CompleteTaskInput, "contact", "complete_task");
