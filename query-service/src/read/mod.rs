//! Routes served from the read models: pipeline, service levels, record
//! views, customer 360 and timelines, the audit trail, projection status.
//! Every route takes `min_position=P` (read your writes: wait, bounded, for
//! the projection to reach P, else 503 with its position).

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use crm_domain::error::FieldError;
use crm_projection_service::records::{QueryError, RecordKind};
use crm_projection_service::registry::Generation;
use crm_projection_service::status::{self, WaitError};
use crm_projection_service::{audit, history, pipeline, records, service_levels, ReadDb};
use crm_service_kit::auth::{Actor, ReadArea};
use crm_service_kit::problem::Problem;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::state::{Board, JsonBody, QueryState, TimelinePage};
use crate::views::ReadAt;

/// The read-model routes, without state applied.
pub fn read_model_routes() -> Router<QueryState> {
    let mut router = Router::new()
        .route("/v1/pipeline", get(board))
        .route("/v1/pipeline/forecast", get(forecast))
        .route("/v1/pipeline/analytics", get(analytics))
        .route("/v1/service-levels", get(open_cases))
        .route("/v1/service-levels/stats", get(sla_stats))
        .route("/v1/customers/{account_id}", get(customer))
        .route("/v1/customers/{account_id}/history", get(customer_history))
        .route("/v1/contacts/{contact_id}/history", get(contact_history))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/export", get(audit_export))
        .merge(projection_status_routes());
    for kind in [
        RecordKind::Lead,
        RecordKind::Account,
        RecordKind::Contact,
        RecordKind::Opportunity,
        RecordKind::Case,
    ] {
        let collection = format!("/v1/{}", kind.collection());
        router = router
            .route(
                &collection,
                get(move |state, actor, query| record_list(state, actor, query, kind)),
            )
            .route(
                &format!("{collection}/{{id}}"),
                get(move |state, actor, id, query| record_get(state, actor, id, query, kind)),
            );
    }
    router
}

/// `GET /v1/projections` alone (the projection service serves it too).
pub fn projection_status_routes() -> Router<QueryState> {
    Router::new().route("/v1/projections", get(projections))
}

/// Query-string parameters plus the `min_position` every read route accepts.
fn parse<T: DeserializeOwned>(raw: Option<String>) -> Result<(T, Option<i64>), Problem> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|error| {
            Problem::bad_request("query", format!("malformed query string: {error}"))
        })?;
    let mut min_position = None;
    let mut rest = Vec::new();
    for (key, value) in pairs {
        if key == "min_position" {
            let position = value
                .parse::<i64>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| {
                    Problem::validation(vec![field(
                        "min_position",
                        "must be a log position (integer >= 0)",
                    )])
                })?;
            min_position = Some(position);
        } else {
            rest.push((key, value));
        }
    }
    let encoded = serde_urlencoded::to_string(&rest).map_err(|error| Problem::internal(&error))?;
    let parsed = serde_urlencoded::from_str(&encoded)
        .map_err(|error| Problem::validation(vec![field("query", &error.to_string())]))?;
    Ok((parsed, min_position))
}

fn field(name: &str, message: &str) -> FieldError {
    FieldError {
        field: name.to_string(),
        message: message.to_string(),
    }
}

fn read_db(state: &QueryState) -> Result<&ReadDb, Problem> {
    state
        .read
        .as_ref()
        .ok_or_else(|| Problem::unavailable("this process serves no read models"))
}

/// The serving generation of `projection`, once it has reached `min_position`.
async fn serving(
    state: &QueryState,
    projection: &str,
    min_position: Option<i64>,
) -> Result<Generation, Problem> {
    // Concurrent requests finding the view expired share one registry read.
    let viewed = state
        .registry
        .try_get_with(projection.to_string(), async {
            status::serving_at(read_db(state)?, projection, None, Duration::ZERO)
                .await
                .map_err(wait_problem)
        })
        .await
        .map_err(|problem| Problem::clone(&problem))?;
    if viewed.checkpoint >= min_position.unwrap_or(0) {
        return Ok(viewed);
    }
    let timeout = state
        .live
        .min_position_timeout
        .max(Duration::from_millis(1));
    let generation = status::serving_at(read_db(state)?, projection, min_position, timeout)
        .await
        .map_err(wait_problem)?;
    state
        .registry
        .insert(projection.to_string(), generation.clone())
        .await;
    Ok(generation)
}

fn wait_problem(error: WaitError) -> Problem {
    match error {
        WaitError::TimedOut { name, position, wanted } => Problem::unavailable(format!(
            "the {name} read model is at position {position}, not yet at min_position {wanted}; retry shortly"
        )),
        WaitError::Missing(name) => Problem::unavailable(format!("the {name} read model is not installed yet")),
        WaitError::Database(error) => Problem::from_database(&error),
    }
}

fn query_problem(error: QueryError) -> Problem {
    match error {
        QueryError::Invalid {
            field: name,
            message,
        } => Problem::validation(vec![field(&name, &message)]),
        QueryError::Database(error) => Problem::from_database(&error),
    }
}

async fn board(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<JsonBody, Problem> {
    actor.require_read(ReadArea::Pipeline)?;
    let (query, min) = parse::<pipeline::BoardQuery>(raw)?;
    let generation = serving(&state, "pipeline", min).await?;
    let board = Board {
        pipeline: query.pipeline.clone(),
        owner: query.owner.clone(),
    };
    let db = read_db(&state)?.clone();
    let tables = generation.tables();
    state
        .boards
        .get(
            board,
            [read_at(&generation)],
            min.unwrap_or(0),
            async move {
                let board = pipeline::board(&db, &tables, &query)
                    .await
                    .map_err(|e| Problem::from_database(&e))?;
                JsonBody::of(&board).map_err(|error| Problem::internal(&error))
            },
        )
        .await
}

fn read_at(generation: &Generation) -> ReadAt {
    ReadAt {
        generation: generation.generation,
        checkpoint: generation.checkpoint,
    }
}

async fn forecast(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<Json<pipeline::ForecastView>, Problem> {
    actor.require_read(ReadArea::Pipeline)?;
    let (query, min) = parse::<pipeline::ForecastQuery>(raw)?;
    let generation = serving(&state, "pipeline", min).await?;
    pipeline::forecast(read_db(&state)?, &generation.tables(), &query)
        .await
        .map(Json)
        .map_err(|e| Problem::from_database(&e))
}

async fn analytics(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<Json<pipeline::AnalyticsView>, Problem> {
    actor.require_read(ReadArea::Pipeline)?;
    let (query, min) = parse::<pipeline::AnalyticsQuery>(raw)?;
    let generation = serving(&state, "pipeline", min).await?;
    pipeline::analytics(read_db(&state)?, &generation.tables(), &query)
        .await
        .map(Json)
        .map_err(|error| match error {
            pipeline::AnalyticsError::InvalidGroupBy(_) => {
                Problem::validation(vec![field("group_by", &error.to_string())])
            }
            pipeline::AnalyticsError::InvalidRange { .. } => {
                Problem::validation(vec![field("from", &error.to_string())])
            }
            pipeline::AnalyticsError::Database(error) => Problem::from_database(&error),
        })
}

async fn open_cases(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<Json<service_levels::OpenCasesView>, Problem> {
    actor.require_read(ReadArea::ServiceLevels)?;
    let (query, min) = parse::<service_levels::OpenCasesQuery>(raw)?;
    let generation = serving(&state, "service_levels", min).await?;
    service_levels::open_cases(read_db(&state)?, &generation.tables(), &query)
        .await
        .map(Json)
        .map_err(|e| Problem::from_database(&e))
}

async fn sla_stats(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<Json<service_levels::SlaStatsView>, Problem> {
    actor.require_read(ReadArea::ServiceLevels)?;
    let (query, min) = parse::<service_levels::SlaStatsQuery>(raw)?;
    let generation = serving(&state, "service_levels", min).await?;
    service_levels::stats(read_db(&state)?, &generation.tables(), &query)
        .await
        .map(Json)
        .map_err(|error| match error {
            service_levels::SlaError::InvalidRange { .. } => {
                Problem::validation(vec![field("from", &error.to_string())])
            }
            service_levels::SlaError::Database(error) => Problem::from_database(&error),
        })
}

async fn record_list(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
    kind: RecordKind,
) -> Result<Json<records::Page<Value>>, Problem> {
    actor.require_read(ReadArea::Records)?;
    let (query, min) = parse::<records::RecordQuery>(raw)?;
    let generation = serving(&state, "records", min).await?;
    records::list(read_db(&state)?, &generation.tables(), kind, &query)
        .await
        .map(Json)
        .map_err(query_problem)
}

async fn record_get(
    State(state): State<QueryState>,
    actor: Actor,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    kind: RecordKind,
) -> Result<Json<Value>, Problem> {
    actor.require_read(ReadArea::Records)?;
    let (_, min) = parse::<NoParams>(raw)?;
    let generation = serving(&state, "records", min).await?;
    let id = id.to_ascii_lowercase();
    records::get(read_db(&state)?, &generation.tables(), kind, &id)
        .await
        .map_err(query_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no {} with id {id}", kind.as_str())))
}

/// Routes that take no parameters but `min_position`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoParams {}

async fn customer(
    State(state): State<QueryState>,
    actor: Actor,
    Path(account_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<history::CustomerSummary>, Problem> {
    actor.require_read(ReadArea::Customers)?;
    let (_, min) = parse::<NoParams>(raw)?;
    let generation = serving(&state, "history", min).await?;
    let account_id = account_id.to_ascii_lowercase();
    history::summary(read_db(&state)?, &generation.tables(), &account_id)
        .await
        .map_err(query_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no account with id {account_id}")))
}

/// Timeline filters a client may send (the account or contact comes from the path).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TimelineParams {
    kind: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

async fn timeline(
    state: &QueryState,
    raw: Option<String>,
    account_id: Option<String>,
    contact_id: Option<String>,
) -> Result<JsonBody, Problem> {
    let (params, min) = parse::<TimelineParams>(raw)?;
    let generation = serving(state, "history", min).await?;
    // An unknown account or contact is a 404, not an empty timeline.
    let (kind, id) = match (&account_id, &contact_id) {
        (Some(id), _) => (RecordKind::Account, id.to_ascii_lowercase()),
        (None, Some(id)) => (RecordKind::Contact, id.to_ascii_lowercase()),
        (None, None) => return Err(Problem::not_found("no such timeline")),
    };
    let records = serving(state, "records", min).await?;
    let query = history::TimelineQuery {
        account_id: account_id.map(|id| id.to_ascii_lowercase()),
        contact_id: contact_id.map(|id| id.to_ascii_lowercase()),
        kind: params.kind,
        cursor: params.cursor,
        limit: params.limit,
    };
    let page = TimelinePage {
        account_id: query.account_id.clone(),
        contact_id: query.contact_id.clone(),
        kind: query.kind.clone(),
        cursor: query.cursor.clone(),
        limit: query.limit,
    };
    let at = [read_at(&generation), read_at(&records)];
    let db = read_db(state)?.clone();
    let (history_tables, records_tables) = (generation.tables(), records.tables());
    state
        .timelines
        .get(page, at, min.unwrap_or(0), async move {
            let page = history::timeline(&db, &history_tables, &query)
                .await
                .map_err(query_problem)?;
            // Entries name their account or contact, so only an empty page
            // needs the record's own row to tell "none yet" from "no such".
            if page.items.is_empty()
                && records::get(&db, &records_tables, kind, &id)
                    .await
                    .map_err(query_problem)?
                    .is_none()
            {
                return Err(Problem::not_found(format!(
                    "no {} with id {id}",
                    kind.as_str()
                )));
            }
            JsonBody::of(&page).map_err(|error| Problem::internal(&error))
        })
        .await
}

async fn customer_history(
    State(state): State<QueryState>,
    actor: Actor,
    Path(account_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<JsonBody, Problem> {
    actor.require_read(ReadArea::Customers)?;
    timeline(&state, raw, Some(account_id), None).await
}

async fn contact_history(
    State(state): State<QueryState>,
    actor: Actor,
    Path(contact_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<JsonBody, Problem> {
    actor.require_read(ReadArea::Customers)?;
    timeline(&state, raw, None, Some(contact_id)).await
}

async fn audit_list(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<Json<records::Page<audit::AuditEntry>>, Problem> {
    actor.require_read(ReadArea::Audit)?;
    let (query, min) = parse::<audit::AuditQuery>(raw)?;
    let generation = serving(&state, "audit", min).await?;
    audit::list(
        read_db(&state)?,
        &audit::AuditTables::of(&generation),
        &query,
    )
    .await
    .map(Json)
    .map_err(query_problem)
}

/// Streams every matching entry as CSV or JSON lines, page by page: memory
/// stays flat however many rows match.
async fn audit_export(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    actor.require_read(ReadArea::Audit)?;
    let (query, min) = parse::<audit::AuditQuery>(raw)?;
    let format = audit::ExportFormat::parse(query.format.as_deref()).map_err(query_problem)?;
    let generation = serving(&state, "audit", min).await?;
    let entries = audit::export(
        read_db(&state)?,
        &audit::AuditTables::of(&generation),
        &query,
    )
    .map_err(query_problem)?;
    let preamble =
        futures::stream::once(
            async move { Ok::<_, std::io::Error>(format.preamble().to_string()) },
        );
    let lines = entries.map(move |entry| match entry {
        Ok(entry) => Ok(format.line(&entry)),
        Err(error) => {
            tracing::error!(%error, "audit export aborted");
            Err(std::io::Error::other(error.to_string()))
        }
    });
    let body = Body::from_stream(preamble.chain(lines));
    Ok(([(CONTENT_TYPE, format.content_type())], body).into_response())
}

async fn projections(
    State(state): State<QueryState>,
    actor: Actor,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, Problem> {
    actor.require_read(ReadArea::Projections)?;
    let _ = parse::<NoParams>(raw)?;
    let statuses = status::status(read_db(&state)?, &state.log)
        .await
        .map_err(|error| Problem::internal(&error))?;
    // A client that saw these positions here must not read older ones next.
    state.registry.invalidate_all();
    state.boards.forget_stand_ins();
    state.timelines.forget_stand_ins();
    Ok(Json(serde_json::json!({ "projections": statuses })))
}
