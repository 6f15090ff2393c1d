//! RFC 9457 problem details: the one error shape every HTTP route answers with.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use crm_domain::error::FieldError;
use crm_eventlog::LogError;
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

    /// A failure of ours, not the client's: logged in full, answered without internals.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the request could not be completed; it was not applied",
        )
    }

    /// A failure of the event log: a database that is down or unreachable is
    /// an outage, not a bug, and answers 503 so clients and load balancers
    /// retry (commands with the same Idempotency-Key); anything else is internal.
    pub fn from_log(error: &LogError) -> Self {
        Self::from_store(error, error.is_unavailable())
    }

    /// [`Problem::from_log`] for an error of a read-model database.
    pub fn from_database(error: &sqlx::Error) -> Self {
        Self::from_store(error, LogError::sqlx_is_unavailable(error))
    }

    fn from_store(error: &dyn std::fmt::Display, unreachable: bool) -> Self {
        if !unreachable {
            return Self::internal(error);
        }
        tracing::warn!(%error, "a backing store is unavailable");
        Self::unavailable(
            "a backing store is unavailable; retry later (commands: with the same Idempotency-Key)",
        )
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
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
    use super::{LogError, Problem};

    #[test]
    fn an_unreachable_database_is_503_other_failures_500() {
        let down = Problem::from_log(&LogError::Database(sqlx::Error::PoolTimedOut));
        assert_eq!(down.status, 503);
        assert_eq!(down.kind, "https://crm.example/problems/unavailable");
        let refused = Problem::from_database(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(refused.status, 503);
        let bug = Problem::from_log(&LogError::Database(sqlx::Error::RowNotFound));
        assert_eq!(bug.status, 500);
        assert_eq!(
            Problem::from_database(&sqlx::Error::RowNotFound).status,
            500
        );
        assert_eq!(Problem::internal(&"handler panicked").status, 500);
    }
}
