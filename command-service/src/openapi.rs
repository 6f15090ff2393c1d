//! The OpenAPI document of the command API, served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{accounts, cases, contacts, health, leads, opportunities, streams};

#[derive(OpenApi)]
#[openapi(
    info(title = "CRM event store: command API", description = "Commands append immutable events; see DESIGN.md."),
    paths(
        leads::capture, leads::qualify, leads::disqualify, leads::convert,
        accounts::register, accounts::update,
        contacts::create, contacts::update, contacts::log_activity, contacts::complete_task,
        opportunities::open, opportunities::advance, opportunities::update, opportunities::win,
        opportunities::lose, opportunities::reopen,
        cases::open, cases::assign, cases::comment, cases::escalate, cases::resolve, cases::close,
        cases::reopen,
        streams::events,
        health::healthz, health::readyz,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}
