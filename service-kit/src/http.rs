//! The HTTP stack every CRM service answers through: problem+json for unknown
//! routes and methods, request tracing, request latency metrics, and panics
//! turned into a 500 problem instead of a dropped connection.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};

use crate::problem::{Problem, PROBLEM_JSON};

/// Error answers produced outside our handlers (axum's own extractor
/// rejections, e.g. a path segment that is not UTF-8) become problem+json too.
async fn problem_for_plain_errors(response: Response) -> Response {
    let status = response.status();
    let is_error = status.is_client_error() || status.is_server_error();
    let is_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes() == PROBLEM_JSON.as_bytes());
    if !is_error || is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .unwrap_or_default();
    let detail = String::from_utf8_lossy(&text).trim().to_string();
    let title = status.canonical_reason().unwrap_or("Error");
    let detail = if detail.is_empty() {
        title.to_string()
    } else {
        detail
    };
    let problem = Problem::new(status, "http-error", title, detail).into_response();
    let (problem_parts, problem_body) = problem.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    if let Some(content_type) = problem_parts.headers.get(CONTENT_TYPE) {
        parts.headers.insert(CONTENT_TYPE, content_type.clone());
    }
    Response::from_parts(parts, problem_body)
}

/// Histogram of HTTP request latency in seconds, by `method`, `route` (the
/// route template, e.g. `/v1/customers/{id}`; `unmatched` when no route
/// matched) and `status`.
pub const HTTP_REQUEST_SECONDS: &str = "crm_http_request_duration_seconds";

/// `route` label of requests no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Times a request until its response head is ready (a streamed body, e.g.
/// the live feed, is not waited for). The route is the matched template,
/// never the raw path, so ids never become label values.
async fn record_latency(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
    let response = next.run(request).await;
    metrics::histogram!(
        HTTP_REQUEST_SECONDS,
        "method" => method,
        "route" => route,
        "status" => response.status().as_str().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Wraps fully-stated routes (possibly merged from several services).
pub fn stack(routes: Router) -> Router {
    routes
        .layer(axum::middleware::map_response(problem_for_plain_errors))
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not accept that method",
            )
        })
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_panic| {
            axum::response::IntoResponse::into_response(Problem::internal(&"handler panicked"))
        }))
        // Outermost, so a panic is timed as the 500 it became; still applied
        // per route (and to the fallbacks) after routing, so the matched
        // path is known.
        .layer(axum::middleware::from_fn(record_latency))
}
