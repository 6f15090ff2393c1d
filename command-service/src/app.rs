//! The command service's shared state and the per-request command context
//! read from headers.

use std::sync::Arc;

use axum::extract::FromRef;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{Actor, Tokens};
use crate::executor::{CommandContext, Executor, IfMatch, Outcome};
use crate::metrics::Verdict;
use crate::problem::Problem;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct App {
    pub executor: Arc<Executor>,
    pub tokens: Arc<Tokens>,
}

impl FromRef<App> for Arc<Tokens> {
    fn from_ref(app: &App) -> Self {
        app.tokens.clone()
    }
}

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

impl App {
    pub fn new(executor: Executor, tokens: Tokens) -> Self {
        Self {
            executor: Arc::new(executor),
            tokens: Arc::new(tokens),
        }
    }

    /// Builds the command context from the request's headers.
    pub fn context(
        &self,
        actor: &Actor,
        stream_type: &str,
        command: &str,
        route: &str,
        headers: &HeaderMap,
        body_hash: &str,
    ) -> Result<CommandContext, Problem> {
        actor.require_command(stream_type, command)?;
        let idempotency_key = header_text(headers, "idempotency-key")?
            .map(|key| {
                let valid = !key.is_empty()
                    && key.len() <= MAX_IDEMPOTENCY_KEY
                    && key.bytes().all(|byte| byte.is_ascii_graphic());
                if valid {
                    Ok(key)
                } else {
                    Err(Problem::bad_request(
                        "Idempotency-Key",
                        format!("must be 1..={MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
                    ))
                }
            })
            .transpose()?;
        let if_match = header_text(headers, "if-match")?
            .map(|value| parse_if_match(&value))
            .transpose()?;
        // The actor is part of the fingerprint: one caller's key never replays another's outcome.
        let request_hash = hex::encode(Sha256::digest(
            format!("{}\n{}\n{route}\n{body_hash}", actor.tenant, actor.name).as_bytes(),
        ));
        Ok(CommandContext {
            actor: actor.clone(),
            command: format!("{stream_type}.{command}"),
            command_id: Uuid::now_v7(),
            now: chrono::Utc::now(),
            idempotency_key,
            if_match,
            request_id: header_text(headers, "x-request-id")?,
            correlation_id: header_text(headers, "x-correlation-id")?,
            client: header_text(headers, "x-client")?.or(header_text(headers, "user-agent")?),
            body_hash: body_hash.to_string(),
            request_hash,
        })
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, Problem> {
    headers
        .get(name)
        .map(|value| {
            value
                .to_str()
                .map(|text| text.trim().chars().take(500).collect())
                .map_err(|_| Problem::bad_request(name, "header value is not visible ASCII"))
        })
        .transpose()
}

/// `If-Match: "3"` (also `3` and `W/"3"`) -> version 3; `If-Match: *` -> the
/// record exists (RFC 9110 13.1.1).
pub fn parse_if_match(value: &str) -> Result<IfMatch, Problem> {
    let value = value.trim();
    if value == "*" {
        return Ok(IfMatch::Exists);
    }
    let trimmed = value.trim_start_matches("W/").trim_matches('"');
    trimmed
        .parse::<i64>()
        .ok()
        .filter(|version| *version >= 0)
        .map(IfMatch::Version)
        .ok_or_else(|| {
            Problem::bad_request(
                "If-Match",
                "must be the record's version as an ETag, e.g. \"3\", or *",
            )
        })
}

/// Body of every successful command.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandResponse {
    /// The aggregate's id.
    pub id: String,
    /// The aggregate's version after the command.
    pub version: i64,
    /// Global log position of the command's last event: pass it as `min_position` to read your write.
    pub position: i64,
}

/// Path segment of each stream type's collection.
pub fn collection(stream_type: &str) -> &'static str {
    match stream_type {
        "lead" => "leads",
        "account" => "accounts",
        "contact" => "contacts",
        "opportunity" => "opportunities",
        _ => "cases",
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let location = format!("/v1/{}/{}", collection(&self.stream_type), self.id);
        let etag = format!("\"{}\"", self.version);
        let body = CommandResponse {
            id: self.id,
            version: self.version,
            position: self.position,
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, value);
        }
        if self.status == StatusCode::CREATED {
            if let Ok(value) = HeaderValue::from_str(&location) {
                headers.insert(header::LOCATION, value);
            }
        }
        if self.replayed {
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response.extensions_mut().insert(if self.replayed {
            Verdict::Replayed
        } else {
            Verdict::Accepted
        });
        response
    }
}
