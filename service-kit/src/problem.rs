//! RFC 9457 problem details: the one error shape every HTTP route answers with.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use crm_domain::error::FieldError;
use serde::Serialize;
use utoipa::ToSchema;

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An `application/problem+json` body; `errors` lists the fields at fault.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<ProblemField>)]
    pub errors: Vec<FieldError>,
}

/// Schema of one entry of `Problem::errors`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemField {
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://crm.example/problems/{slug}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn bad_request(field: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let mut problem = Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
            detail.clone(),
        );
        problem.errors.push(FieldError {
            field: field.to_string(),
            message: detail,
        });
        problem
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", display_field(&one.field), one.message),
            many => format!("{} fields are invalid", many.len()),
        };
        let mut problem = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
            "Validation failed",
            detail,
        );
        problem.errors = errors;
        problem
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "illegal-transition",
            "Conflict",
            detail,
        )
    }

    pub fn precondition_failed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition-failed",
            "Precondition failed",
            detail,
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            format!("request bodies are limited to {limit} bytes"),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as application/json",
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
    }

    /// A failure of ours, not the client's: logged in full, answered without
    /// internals. A database that is down or unreachable is not a bug but an
    /// outage: such errors (see [`is_unavailable_error`]) answer 503, so
    /// clients and load balancers retry instead of giving up.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        let text = error.to_string();
        if is_unavailable_error(&text) {
            tracing::warn!(error = %text, "a backing store is unavailable");
            return Self::unavailable(
                "a backing store is unavailable; retry later (commands: with the same Idempotency-Key)",
            );
        }
        tracing::error!(error = %text, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the request could not be completed; it was not applied",
        )
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// How the errors that mean "the database is unreachable" read: the prefix
/// `crm_eventlog::LogError` gives them, the `sqlx::Error` messages of pool
/// timeouts, closed pools and I/O failures, and PostgreSQL's messages while it
/// shuts down or starts. (This crate depends on neither; the handlers pass
/// errors as `Display`, so their text is what is there to classify.)
const UNAVAILABLE_SIGNS: &[&str] = &[
    "database unavailable: ",
    "pool timed out while waiting for an open connection",
    "attempted to acquire a connection on a closed pool",
    "error communicating with database",
    "error occurred while attempting to establish a TLS connection",
    "terminating connection due to administrator command",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
];

/// Whether an error's text says a backing store is unreachable (answered
/// with 503 by [`Problem::internal`]).
pub fn is_unavailable_error(text: &str) -> bool {
    UNAVAILABLE_SIGNS.iter().any(|sign| text.contains(sign))
}

fn display_field(field: &str) -> &str {
    if field.is_empty() {
        "body"
    } else {
        field
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::Problem;

    #[test]
    fn an_unreachable_database_is_503_other_failures_500() {
        let down = Problem::internal(
            &"database unavailable: pool timed out while waiting for an open connection",
        );
        assert_eq!(down.status, 503);
        assert_eq!(down.kind, "https://crm.example/problems/unavailable");
        let refused = Problem::internal(
            &"error communicating with database: Connection refused (os error 111)",
        );
        assert_eq!(refused.status, 503);
        let bug = Problem::internal(
            &"database error: no rows returned by a query that expected to return at least one row",
        );
        assert_eq!(bug.status, 500);
        assert_eq!(Problem::internal(&"handler panicked").status, 500);
    }
}
