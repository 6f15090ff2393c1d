//! Raw history of one stream, as the log holds it: what an auditor reads.

use axum::extract::{Path, Query, State};
use axum::Json;
use crm_eventlog::{LogError, RecordedEvent};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::auth::{Actor, ReadArea};
use crate::problem::Problem;

/// Stream types of the log.
pub const STREAM_TYPES: [&str; 5] = ["lead", "account", "contact", "opportunity", "case"];
const MAX_PAGE: i64 = 1000;
/// Longest wait for `min_position`, as on the query routes.
const MIN_POSITION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn invalid(field: &str, message: &str) -> Problem {
    Problem::validation(vec![crm_domain::error::FieldError {
        field: field.to_string(),
        message: message.to_string(),
    }])
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Only events after this version (default 0: from the start).
    pub after_version: Option<i64>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<i64>,
    /// Wait (up to 5 s) until the log has reached this position (read your writes across replicas).
    pub min_position: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    pub stream_type: String,
    pub stream_id: String,
    /// The stream's current version.
    pub version: i64,
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<RecordedEvent>,
    /// Pass as `after_version` for the next page; absent on the last page.
    pub next_after_version: Option<i64>,
}

/// Events of one stream in version order, with payload and metadata.
#[utoipa::path(get, path = "/v1/streams/{stream_type}/{id}/events", tag = "streams", params(HistoryQuery),
    responses((status = 200, body = History), (status = 404, body = Problem)))]
pub async fn events(
    State(app): State<App>,
    actor: Actor,
    Path((stream_type, stream_id)): Path<(String, String)>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<History>, Problem> {
    actor.require_read(ReadArea::Log)?;
    let Query(query) =
        query.map_err(|rejection| Problem::bad_request("query", rejection.body_text()))?;
    if !STREAM_TYPES.contains(&stream_type.as_str()) {
        return Err(Problem::not_found(format!(
            "unknown stream type `{stream_type}`; expected one of {}",
            STREAM_TYPES.join(", ")
        )));
    }
    let after_version = query.after_version.unwrap_or(0);
    if after_version < 0 {
        return Err(invalid("after_version", "must be >= 0"));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(invalid("limit", &format!("must be 1..={MAX_PAGE}")));
    }
    let log = app.executor.log();
    if let Some(position) = query.min_position {
        if position < 0 {
            return Err(invalid(
                "min_position",
                "must be a log position (integer >= 0)",
            ));
        }
        match log.wait_for_position(position, MIN_POSITION_WAIT).await {
            Ok(()) => {}
            Err(LogError::NotYet { head, wanted }) => {
                return Err(Problem::unavailable(format!(
                    "the event log is at position {head}, below min_position {wanted}; retry later"
                )))
            }
            Err(error) => return Err(Problem::from_log(&error)),
        }
    }
    let version = log
        .stream_version(&actor.tenant, &stream_type, &stream_id)
        .await
        .map_err(|error| Problem::from_log(&error))?;
    if version == 0 {
        return Err(Problem::not_found(format!(
            "no {stream_type} with id {stream_id}"
        )));
    }
    let events = log
        .read_stream(
            &actor.tenant,
            &stream_type,
            &stream_id,
            after_version,
            limit,
        )
        .await
        .map_err(|error| Problem::from_log(&error))?;
    let next_after_version = events
        .last()
        .map(|event| event.version)
        .filter(|last| *last < version);
    Ok(Json(History {
        stream_type,
        stream_id,
        version,
        events,
        next_after_version,
    }))
}
