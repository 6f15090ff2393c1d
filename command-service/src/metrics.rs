//! Command metrics, recorded once per command request (HTTP, and gRPC which
//! goes through the same routes) by [`metered`] around each command route:
//!
//! - `crm_commands_total{stream_type, command, outcome}`: a counter, `outcome`
//!   one of [`Verdict::ALL`];
//! - `crm_command_duration_seconds{stream_type, command}`: a histogram of the
//!   whole command (extractors, load, decide, append).
//!
//! The outcome comes from the [`Verdict`] a command answer carries as a
//! response extension (set by [`crate::executor::Outcome`] and
//! [`crate::executor::CommandError`]), or, for answers made before the
//! handler ran (extractor rejections), from the HTTP status alone.

use std::time::Instant;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::MethodRouter;

/// Counter of command requests by stream type, command and outcome.
pub const COMMANDS_TOTAL: &str = "crm_commands_total";
/// Histogram of whole-command latency in seconds.
pub const COMMAND_SECONDS: &str = "crm_command_duration_seconds";

/// How a command request ended, as counted by `crm_commands_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: appended (or a no-op the aggregate accepted).
    Accepted,
    /// 2xx answered from the log without appending: an idempotent retry or a
    /// repeated create with the same body.
    Replayed,
    /// Refused by a business rule on the current state: illegal transition,
    /// a create on an existing id with other content, an update of a record
    /// that does not exist, a reference to a missing record, a field the
    /// aggregate's state rejects (409, 404, 422).
    Rejected,
    /// A stale `If-Match` (412) or a version conflict given up after retries (409).
    Conflict,
    /// Bad input: malformed JSON, bad headers, wrong media type, oversized
    /// body, fields failing validation, an id that is not a UUID (400, 404,
    /// 413, 415, 422).
    Invalid,
    /// No or bad token (401), or a role that may not send the command (403).
    Denied,
    /// A dependency is unavailable (503).
    Unavailable,
    /// Any other failure of ours (5xx).
    Error,
}

impl Verdict {
    pub const ALL: [Verdict; 8] = [
        Verdict::Accepted,
        Verdict::Replayed,
        Verdict::Rejected,
        Verdict::Conflict,
        Verdict::Invalid,
        Verdict::Denied,
        Verdict::Unavailable,
        Verdict::Error,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Replayed => "replayed",
            Verdict::Rejected => "rejected",
            Verdict::Conflict => "conflict",
            Verdict::Invalid => "invalid",
            Verdict::Denied => "denied",
            Verdict::Unavailable => "unavailable",
            Verdict::Error => "error",
        }
    }

    /// The verdict of an answer that carries none: business refusals are
    /// always marked, so an unmarked 4xx is the client's input (or auth), and
    /// an unmarked 409 is write contention.
    pub fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            100..=399 => Verdict::Accepted,
            401 | 403 => Verdict::Denied,
            409 | 412 => Verdict::Conflict,
            400..=499 => Verdict::Invalid,
            503 => Verdict::Unavailable,
            _ => Verdict::Error,
        }
    }
}

/// Wraps a command route's handler: counts its outcome and times it.
/// Applied as a route layer, so 405s of the path are not counted as commands.
pub fn metered<S>(
    stream_type: &'static str,
    command: &'static str,
    route: MethodRouter<S>,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route.route_layer(axum::middleware::from_fn(
        move |request: Request, next: Next| record(stream_type, command, request, next),
    ))
}

async fn record(
    stream_type: &'static str,
    command: &'static str,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let verdict = response
        .extensions()
        .get::<Verdict>()
        .copied()
        .unwrap_or_else(|| Verdict::from_status(response.status()));
    metrics::histogram!(COMMAND_SECONDS, "stream_type" => stream_type, "command" => command)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        COMMANDS_TOTAL,
        "stream_type" => stream_type,
        "command" => command,
        "outcome" => verdict.as_str()
    )
    .increment(1);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmarked_statuses_map_to_the_documented_outcomes() {
        let cases = [
            (200, "accepted"),
            (201, "accepted"),
            (400, "invalid"),
            (401, "denied"),
            (403, "denied"),
            (404, "invalid"),
            (409, "conflict"),
            (412, "conflict"),
            (413, "invalid"),
            (415, "invalid"),
            (422, "invalid"),
            (500, "error"),
            (503, "unavailable"),
        ];
        for (status, outcome) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(Verdict::from_status(status).as_str(), outcome, "{status}");
        }
    }
}
