//! The global feed: every event of the caller's tenant in log order, paged by
//! global position, each as a CloudEvent (see [`crate::cloudevent`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use crm_service_kit::auth::Actor;
use crm_service_kit::problem::Problem;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::access::{require_read, Readable};
use crate::cloudevent::cloud_event;
use crate::params::{query, wait_for_position, Fields};
use crate::state::QueryState;

use super::{visible_to, DEFAULT_FEED_PAGE, MAX_FEED_PAGE};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    /// Only events with a global position above this (default 0: from the start).
    pub after: Option<String>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<String>,
    /// Wait (bounded) until the log has reached this global position.
    pub min_position: Option<String>,
}

/// One page of the global feed.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedPage {
    /// CloudEvents 1.0 JSON objects, ascending by position.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Value>,
    /// Pass as `after` for the next page: the last position read (`after` when
    /// nothing was read). Can move past `events` when other tenants' events were
    /// skipped.
    pub next_after: i64,
    /// The log's head position when the page was read; `next_after < head`
    /// means more pages are waiting.
    pub head: i64,
}

/// Events of the caller's tenant with a global position above `after`, ascending,
/// at most `limit`, as CloudEvents 1.0 JSON. The feed is gap-free: an event never
/// appears at a position below one already handed out.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(FeedQuery),
    responses(
        (status = 200, body = FeedPage),
        (status = 401, body = Problem),
        (status = 422, body = Problem, description = "`after`, `limit` or `min_position` invalid"),
        (status = 503, body = Problem, description = "`min_position` not reached in time")))]
pub async fn events(
    State(app): State<QueryState>,
    actor: Actor,
    params: Result<Query<FeedQuery>, QueryRejection>,
) -> Result<Json<FeedPage>, Problem> {
    let params = query(params)?;
    let mut fields = Fields::new();
    let after = fields
        .integer("after", params.after.as_deref(), 0, i64::MAX)
        .unwrap_or(0);
    let limit = fields
        .integer("limit", params.limit.as_deref(), 1, MAX_FEED_PAGE)
        .unwrap_or(DEFAULT_FEED_PAGE);
    let min_position = fields.integer("min_position", params.min_position.as_deref(), 0, i64::MAX);
    fields.finish()?;
    require_read(&actor, Readable::GlobalFeed)?;
    if let Some(min_position) = min_position {
        wait_for_position(&app.log, min_position, app.live.min_position_timeout).await?;
    }

    let read = app
        .log
        .read_all(after, limit)
        .await
        .map_err(|error| Problem::from_log(&error))?;
    let next_after = read.last().map_or(after, |event| event.position);
    let events = read
        .iter()
        .filter(|event| visible_to(event, &actor.tenant))
        .map(cloud_event)
        .collect();
    // Read after the page, so `head` covers everything on it; an `after`
    // beyond the head is answered with the real head, never echoed back.
    let head = app
        .log
        .head_position()
        .await
        .map_err(|error| Problem::from_log(&error))?;
    Ok(Json(FeedPage {
        events,
        next_after,
        head,
    }))
}
