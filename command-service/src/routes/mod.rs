//! HTTP routes of the command API (DESIGN.md, "HTTP API contract"), one
//! module per aggregate, plus raw stream history and health.

pub mod accounts;
pub mod cases;
pub mod contacts;
pub mod health;
pub mod leads;
pub mod opportunities;
pub mod streams;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use crm_domain::error::{FieldError, ValidationErrors};
use uuid::Uuid;

use crate::app::App;
use crate::auth::Actor;
use crate::cache::Stream;
use crate::executor::{CommandError, Mode, Outcome};
use crate::problem::Problem;

/// The `{id}` of a route; a value that is not a UUID names no record, hence 404.
pub struct PathId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| Problem::not_found("no such record"))?;
        Uuid::parse_str(&raw)
            .map(PathId)
            .map_err(|_| Problem::not_found(format!("no record has id `{raw}`: ids are UUIDs")))
    }
}

/// Which command a route sends.
pub struct Route {
    pub stream_type: &'static str,
    pub command: &'static str,
    pub path: &'static str,
    pub mode: Mode,
}

/// Authorises, builds the context and runs commands on one aggregate.
pub async fn run<A: Stream>(
    app: &App,
    actor: &Actor,
    headers: &HeaderMap,
    route: Route,
    stream_id: Uuid,
    body_hash: &str,
    build: impl Fn(DateTime<Utc>) -> Result<A::Command, ValidationErrors>,
) -> Result<Outcome, CommandError>
where
    A::Command: Clone,
{
    let ctx = app.context(
        actor,
        route.stream_type,
        route.command,
        route.path,
        headers,
        body_hash,
    )?;
    // The body is validated before anything else (a bad body is a 422 even
    // for a key already used), and built again at the stream's turn.
    build(ctx.now).map_err(|errors| Problem::validation(errors.0))?;
    app.executor
        .execute_built::<A>(&ctx, stream_id, build, route.mode)
        .await
}

/// Refuses a body that points at a record which does not exist (a business
/// refusal: the same body is fine once the record is there).
pub async fn require_existing(
    app: &App,
    actor: &Actor,
    references: &[(&str, &str, Option<Uuid>)],
) -> Result<(), CommandError> {
    let mut missing = Vec::new();
    for (field, stream_type, id) in references {
        let Some(id) = id else { continue };
        let exists = app
            .executor
            .stream_exists(&actor.tenant, stream_type, &id.to_string())
            .await
            .map_err(|error| Problem::from_log(&error))?;
        if !exists {
            missing.push(FieldError {
                field: field.to_string(),
                message: format!("no {stream_type} with id {id}"),
            });
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CommandError::rejected(Problem::validation(missing)))
    }
}

/// A route that sends one command to an existing aggregate, with the body
/// decoded into `$input` and converted by its `into_command(now)`.
macro_rules! update_route {
    ($(#[$doc:meta])* $name:ident: $method:ident $path:literal, $tag:literal, $aggregate:ty, $input:ty, $stream:literal, $command:literal) => {
        $(#[$doc])*
        #[utoipa::path($method, path = $path, tag = $tag, request_body = $input,
            responses(
                (status = 200, body = crate::app::CommandResponse),
                (status = 404, body = crate::problem::Problem),
                (status = 409, body = crate::problem::Problem),
                (status = 412, body = crate::problem::Problem),
                (status = 422, body = crate::problem::Problem)))]
        pub async fn $name(
            axum::extract::State(app): axum::extract::State<crate::app::App>,
            actor: crate::auth::Actor,
            crate::routes::PathId(id): crate::routes::PathId,
            headers: axum::http::HeaderMap,
            body: crate::body::JsonBody<$input>,
        ) -> Result<crate::executor::Outcome, crate::executor::CommandError> {
            let route = crate::routes::Route {
                stream_type: $stream,
                command: $command,
                path: concat!(stringify!($method), " ", $path),
                mode: crate::executor::Mode::Update,
            };
            crate::routes::run::<$aggregate>(
                &app, &actor, &headers, route, id, &body.body_hash,
                |now| body.value.clone().into_command(now),
            )
            .await
        }
    };
}
pub(crate) use update_route;
