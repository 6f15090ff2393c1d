//! The HTTP stack every CRM service answers through: problem+json for unknown
//! routes and methods, request tracing, and panics turned into a 500 problem
//! instead of a dropped connection.

use axum::http::StatusCode;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::problem::Problem;

/// Wraps fully-stated routes (possibly merged from several services).
pub fn stack(routes: Router) -> Router {
    routes
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
}
