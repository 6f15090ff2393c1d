//! Account routes: register a customer organisation and edit it (details,
//! owner, archive/restore) with PATCH.

use axum::extract::State;
use axum::http::HeaderMap;
use crm_domain::account::{Account, RegisterAccountInput, UpdateAccountInput};
use crm_domain::ids::AccountId;
use uuid::Uuid;

use super::{run, PathId, Route};
use crate::app::{App, CommandResponse};
use crate::auth::Actor;
use crate::body::JsonBody;
use crate::executor::{CommandError, Mode, Outcome};
use crate::problem::Problem;

/// Register an account.
#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = RegisterAccountInput,
    responses((status = 201, body = CommandResponse), (status = 422, body = Problem), (status = 409, body = Problem)))]
pub async fn register(
    State(app): State<App>,
    actor: Actor,
    headers: HeaderMap,
    body: JsonBody<RegisterAccountInput>,
) -> Result<Outcome, CommandError> {
    let id = body.value.id.unwrap_or_else(Uuid::now_v7);
    let route = Route {
        stream_type: "account",
        command: "register",
        mode: Mode::Create,
        path: "POST /v1/accounts",
    };
    run::<Account>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(AccountId::new(id), now)
    })
    .await
}

/// Update details, assign the owner, archive (`"archived": true`) or restore; any subset.
#[utoipa::path(patch, path = "/v1/accounts/{id}", tag = "accounts", request_body = UpdateAccountInput,
    responses((status = 200, body = CommandResponse), (status = 404, body = Problem), (status = 409, body = Problem), (status = 412, body = Problem), (status = 422, body = Problem)))]
pub async fn update(
    State(app): State<App>,
    actor: Actor,
    PathId(id): PathId,
    headers: HeaderMap,
    body: JsonBody<UpdateAccountInput>,
) -> Result<Outcome, CommandError> {
    let route = Route {
        stream_type: "account",
        command: "update",
        mode: Mode::Update,
        path: "PATCH /v1/accounts/{id}",
    };
    run::<Account>(&app, &actor, &headers, route, id, &body.body_hash, |now| {
        body.value.clone().into_command(now)
    })
    .await
}
