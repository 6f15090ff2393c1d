//! Time travel: an aggregate rebuilt from the log as it stood at an instant or
//! at a version.
//!
//! `at` is compared with each event's `recorded_at` (the server's clock when the
//! event was committed), never with the payload's `occurred_at` (business time,
//! which a client may backdate, e.g. during an import). The answer is the
//! longest prefix of the stream, in version order, whose events were all
//! recorded at or before `at`: the stream is read in pages and reading stops at
//! the first event recorded after `at`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use crm_domain::opportunity::Opportunity;
use crm_domain::{account::Account, case::Case, contact::Contact, lead::Lead};
use crm_eventlog::{EventLog, RecordedEvent};
use crm_service_kit::auth::Actor;
use crm_service_kit::problem::Problem;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::access::{require_read, Readable};
use crate::params::{query, wait_for_position, Fields};
use crate::state::QueryState;

use super::STREAM_TYPES;

/// Events read from the log per page while rebuilding.
const REBUILD_PAGE: i64 = 500;

/// Exactly one of `at` and `version`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    /// RFC 3339 instant (e.g. `2026-11-20T09:30:00Z`), compared with `recorded_at`.
    pub at: Option<String>,
    /// Stream version, 1 or more.
    pub version: Option<String>,
    /// Wait (bounded) until the log has reached this global position.
    pub min_position: Option<String>,
}

/// What the state was taken as of: `{"at": "<RFC 3339>"}` or `{"version": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AsOf {
    At(DateTime<Utc>),
    Version(i64),
}

impl AsOf {
    fn admits(&self, event: &RecordedEvent) -> bool {
        match *self {
            AsOf::At(at) => event.recorded_at <= at,
            AsOf::Version(version) => event.version <= version,
        }
    }
}

/// An aggregate's state as of an instant or a version.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamState {
    pub stream_type: String,
    pub id: String,
    /// Version of the last event applied.
    pub version: i64,
    /// Global position of the last event applied.
    pub position: i64,
    pub as_of: AsOf,
    /// When the last event applied was recorded (server time).
    pub recorded_at: DateTime<Utc>,
    /// The aggregate as the domain model serialises it.
    #[schema(value_type = Object)]
    pub state: Value,
}

/// Rebuilds an aggregate from the log as it stood at `at` (compared with each
/// event's server-side `recorded_at`, not the payload's business `occurred_at`)
/// or at `version`. Pass exactly one of them.
#[utoipa::path(get, path = "/v1/streams/{stream_type}/{id}/state", tag = "streams",
    params(
        ("stream_type" = String, Path, description = "lead, account, contact, opportunity or case"),
        ("id" = String, Path, description = "stream id (UUID)"),
        StateQuery),
    responses(
        (status = 200, body = StreamState),
        (status = 401, body = Problem),
        (status = 404, body = Problem, description = "unknown stream type or stream, no event at or before `at`, or `version` beyond the current one"),
        (status = 422, body = Problem, description = "neither or both of `at` and `version`, or an invalid value"),
        (status = 503, body = Problem, description = "`min_position` not reached in time")))]
pub async fn state(
    State(app): State<QueryState>,
    actor: Actor,
    Path((stream_type, raw_id)): Path<(String, String)>,
    params: Result<Query<StateQuery>, QueryRejection>,
) -> Result<Json<StreamState>, Problem> {
    let params = query(params)?;
    let mut fields = Fields::new();
    let as_of = match (params.at.as_deref(), params.version.as_deref()) {
        (Some(_), Some(_)) => {
            fields.add("at", "pass either `at` or `version`, not both");
            fields.add("version", "pass either `at` or `version`, not both");
            None
        }
        (None, None) => {
            fields.add(
                "at",
                "pass `at` (RFC 3339 instant) or `version` (stream version)",
            );
            None
        }
        (Some(at), None) => match parse_instant(at) {
            Some(at) => Some(AsOf::At(at)),
            None => {
                fields.add(
                    "at",
                    format!("must be an RFC 3339 instant such as 2026-11-20T09:30:00Z, got `{at}`"),
                );
                None
            }
        },
        (None, Some(version)) => fields
            .integer("version", Some(version), 1, i64::MAX)
            .map(AsOf::Version),
    };
    let min_position = fields.integer("min_position", params.min_position.as_deref(), 0, i64::MAX);
    fields.finish()?;
    let Some(as_of) = as_of else {
        return Err(Problem::internal(&"time travel parameters vanished"));
    };

    if !STREAM_TYPES.contains(&stream_type.as_str()) {
        return Err(Problem::not_found(format!(
            "unknown stream type `{stream_type}`; expected one of {}",
            STREAM_TYPES.join(", ")
        )));
    }
    require_read(&actor, Readable::Stream(&stream_type))?;
    let Ok(id) = raw_id.parse::<uuid::Uuid>() else {
        return Err(Problem::not_found(format!(
            "no {stream_type} has id `{raw_id}`: ids are UUIDs"
        )));
    };
    let id = id.to_string();
    if let Some(min_position) = min_position {
        wait_for_position(&app.log, min_position, app.live.min_position_timeout).await?;
    }

    let stream = StreamRef {
        log: &app.log,
        tenant: &actor.tenant,
        stream_type: &stream_type,
        id: &id,
    };
    let rebuilt = match stream_type.as_str() {
        "lead" => stream.rebuild::<Lead>(as_of).await?,
        "account" => stream.rebuild::<Account>(as_of).await?,
        "contact" => stream.rebuild::<Contact>(as_of).await?,
        "opportunity" => stream.rebuild::<Opportunity>(as_of).await?,
        "case" => stream.rebuild::<Case>(as_of).await?,
        other => {
            return Err(Problem::not_found(format!("unknown stream type `{other}`")));
        }
    };
    Ok(Json(StreamState {
        stream_type,
        id,
        version: rebuilt.version,
        position: rebuilt.position,
        as_of,
        recorded_at: rebuilt.recorded_at,
        state: rebuilt.state,
    }))
}

/// RFC 3339, tolerating a `+` offset that a client forgot to percent-encode
/// (the query string decodes it to a space).
fn parse_instant(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .or_else(|| {
            let (head, offset) = raw.rsplit_once(' ')?;
            DateTime::parse_from_rfc3339(&format!("{head}+{offset}")).ok()
        })
        .map(|at| at.with_timezone(&Utc))
}

/// The stream being rebuilt.
struct StreamRef<'a> {
    log: &'a EventLog,
    tenant: &'a str,
    stream_type: &'a str,
    id: &'a str,
}

/// The last event applied and the state after it.
struct Rebuilt {
    version: i64,
    position: i64,
    recorded_at: DateTime<Utc>,
    state: Value,
}

impl StreamRef<'_> {
    async fn rebuild<A: Aggregate>(&self, as_of: AsOf) -> Result<Rebuilt, Problem> {
        let mut aggregate = A::default();
        let mut last: Option<(i64, i64, DateTime<Utc>)> = None;
        let mut first_recorded: Option<DateTime<Utc>> = None;
        let mut after_version = 0;
        'pages: loop {
            let limit = match as_of {
                AsOf::Version(target) => (target - after_version).clamp(1, REBUILD_PAGE),
                AsOf::At(_) => REBUILD_PAGE,
            };
            let events = self
                .log
                .read_stream(self.tenant, self.stream_type, self.id, after_version, limit)
                .await
                .map_err(|error| Problem::from_log(&error))?;
            let page_len = events.len() as i64;
            for recorded in events {
                first_recorded.get_or_insert(recorded.recorded_at);
                if !as_of.admits(&recorded) {
                    break 'pages;
                }
                let (version, position, recorded_at) =
                    (recorded.version, recorded.position, recorded.recorded_at);
                let event: A::Event =
                    serde_json::from_value(recorded.payload).map_err(|error| {
                        Problem::internal(&format!(
                            "event {version} of {} {} does not decode: {error}",
                            self.stream_type, self.id
                        ))
                    })?;
                aggregate.apply(event);
                last = Some((version, position, recorded_at));
                after_version = version;
                if matches!(as_of, AsOf::Version(target) if version >= target) {
                    break 'pages;
                }
            }
            if page_len < limit {
                break;
            }
        }
        let unknown = || {
            Problem::not_found(format!(
                "no {} with id {} has been recorded",
                self.stream_type, self.id
            ))
        };
        let Some((version, position, recorded_at)) = last else {
            return Err(match (as_of, first_recorded) {
                (AsOf::At(at), Some(first)) => Problem::not_found(format!(
                    "{} {} did not exist yet at {}: its first event was recorded at {}",
                    self.stream_type,
                    self.id,
                    at.to_rfc3339(),
                    first.to_rfc3339()
                )),
                _ => unknown(),
            });
        };
        if let AsOf::Version(target) = as_of {
            if version < target {
                return Err(Problem::not_found(format!(
                    "{} {} has no version {target}: its current version is {version}",
                    self.stream_type, self.id
                )));
            }
        }
        let state = serde_json::to_value(&aggregate).map_err(|error| Problem::internal(&error))?;
        Ok(Rebuilt {
            version,
            position,
            recorded_at,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instants_with_and_without_a_decoded_plus() {
        let expected = "2026-11-20T08:30:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(parse_instant("2026-11-20T08:30:00Z"), Some(expected));
        assert_eq!(parse_instant("2026-11-20T09:30:00+01:00"), Some(expected));
        assert_eq!(parse_instant("2026-11-20T09:30:00 01:00"), Some(expected));
        assert_eq!(parse_instant("2026-11-20"), None);
        assert_eq!(parse_instant("yesterday"), None);
    }
}
