//! The gRPC front (`crm.v1.CommandService`, `crm.v1.QueryService`): a thin
//! translation onto the HTTP routes, so validation, auth, idempotency and
//! error shapes have one source of truth.
//!
//! Each call becomes the equivalent HTTP request and is answered by the axum
//! [`Router`] in-process (`tower::ServiceExt::oneshot`, no socket):
//!
//! - `CommandRequest{stream_type, command, stream_id}` picks the route (see
//!   [`command_route`] and [`COMMANDS`]): creation commands are
//!   `POST /v1/<collection>` (a non-empty `stream_id` becomes the body's `id`),
//!   `update` is `PATCH /v1/<collection>/{id}`, contact `log_activity` is
//!   `POST /v1/contacts/{id}/activities`, `complete_task` is
//!   `POST /v1/contacts/{id}/tasks/complete`, every other command is
//!   `POST /v1/<collection>/{id}/<command>`;
//! - metadata `authorization` (and `x-request-id`, `x-correlation-id`,
//!   `x-client`, `user-agent`) become the same headers; `idempotency_key` ->
//!   `Idempotency-Key`; `expected_version` N -> `If-Match: "N"`; `body_json`
//!   -> the body, `Content-Type: application/json`;
//! - the typed queries are `GET`s of the read routes, each request field
//!   becoming the query parameter of the same name (percent-encoded; unset
//!   optional fields are left out): `GetPipelineBoard` -> `/v1/pipeline`,
//!   `GetCustomer` -> `/v1/customers/{account_id}`, `GetCustomerTimeline` ->
//!   `/v1/customers/{account_id}/history` (or `/v1/contacts/{contact_id}/history`),
//!   `ListAudit` -> `/v1/audit`; `GetRecord` and `GetStreamEvents` likewise;
//! - a 2xx answer becomes the reply: `CommandReply` from the JSON body, the
//!   read models (`PipelineBoard`, `CustomerSummary`, `TimelinePage`,
//!   `AuditPage`) decoded from the route's JSON document (same field names),
//!   `GetRecord`/`GetStreamEvents` the JSON document verbatim in
//!   `JsonReply.json`; an idempotent replay carries the
//!   `idempotent-replayed: true` metadata;
//! - any other answer becomes a [`Status`] with the code of [`code_for_status`],
//!   the problem's `detail` as message and the whole problem+json document
//!   (RFC 9457: `type`, `title`, `status`, `detail`, `errors[{field,message}]`)
//!   as the status details bytes.
//!
//! [`serve`] runs both services on a listener, [`serve_queries`] the query
//! service alone; [`command_service`] and [`query_service`] give the services
//! to mount elsewhere.

use std::future::Future;

use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, IF_MATCH, USER_AGENT};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::Router;
use bytes::Bytes;
use crm_domain::error::FieldError;
use crm_proto::v1::command_service_server::{CommandService, CommandServiceServer};
use crm_proto::v1::query_service_server::{QueryService, QueryServiceServer};
use crm_proto::v1::{
    AuditPage, AuditRequest, CommandReply, CommandRequest, CustomerRequest, CustomerSummary,
    GetRecordRequest, JsonReply, PipelineBoard, PipelineBoardRequest, StreamRequest, TimelinePage,
    TimelineRequest,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tonic::{Code, Request, Response, Status};
use tower::ServiceExt;

use crate::app::collection;
use crate::problem::Problem;

/// Every command of the gRPC API, by stream type (the same as the HTTP routes).
pub const COMMANDS: [(&str, &[&str]); 5] = [
    ("lead", &["capture", "qualify", "disqualify", "convert"]),
    ("account", &["register", "update"]),
    (
        "contact",
        &["create", "update", "log_activity", "complete_task"],
    ),
    (
        "opportunity",
        &["open", "update", "advance", "win", "lose", "reopen"],
    ),
    (
        "case",
        &[
            "open", "assign", "comment", "escalate", "resolve", "close", "reopen",
        ],
    ),
];

/// Request metadata passed on as HTTP headers (everything else is dropped).
const FORWARDED_METADATA: [HeaderName; 5] = [
    AUTHORIZATION,
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-correlation-id"),
    HeaderName::from_static("x-client"),
    USER_AGENT,
];

/// Largest HTTP answer turned into a reply (a page of 1000 events fits).
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// The gRPC code of an HTTP status (the documented mapping).
pub fn code_for_status(status: StatusCode) -> Code {
    match status.as_u16() {
        200..=299 => Code::Ok,
        400 | 415 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        405 | 501 => Code::Unimplemented,
        // Illegal transition, duplicate create with other content, or too much
        // write contention: told apart by the details' `type`/`detail`.
        409 => Code::Aborted,
        // A stale `expected_version` (If-Match).
        412 => Code::FailedPrecondition,
        413 | 429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        500..=599 => Code::Internal,
        _ => Code::Unknown,
    }
}

/// A problem as a gRPC status: message = `detail`, details = the problem+json bytes.
pub fn problem_status(problem: &Problem) -> Status {
    let details = serde_json::to_vec(problem).unwrap_or_default();
    Status::with_details(
        code_for_status(problem.status()),
        problem.detail.clone(),
        Bytes::from(details),
    )
}

/// The status of a non-2xx HTTP answer; a body that is not a problem document
/// (a router without the shared HTTP stack) is wrapped into one.
fn answer_status(status: StatusCode, body: &Bytes) -> Status {
    let reason = status.canonical_reason().unwrap_or("Error");
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(problem)) => {
            let message = ["detail", "title"]
                .iter()
                .find_map(|key| problem.get(*key).and_then(Value::as_str))
                .unwrap_or(reason)
                .to_string();
            Status::with_details(code_for_status(status), message, body.clone())
        }
        _ => {
            let text = String::from_utf8_lossy(body).trim().to_string();
            let detail = if text.is_empty() {
                reason.to_string()
            } else {
                text
            };
            problem_status(&Problem::new(status, "http-error", reason, detail))
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> Status {
    problem_status(&Problem::validation(vec![FieldError {
        field: field.to_string(),
        message: message.into(),
    }]))
}

/// How a command reaches its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `POST /v1/<collection>`.
    Create,
    /// `PATCH /v1/<collection>/{id}`.
    Patch,
    /// `POST /v1/<collection>/{id}/<suffix>`.
    Post(&'static str),
}

fn shape(stream_type: &str, command: &'static str) -> Shape {
    match (stream_type, command) {
        ("lead", "capture")
        | ("account", "register")
        | ("contact", "create")
        | ("opportunity", "open")
        | ("case", "open") => Shape::Create,
        (_, "update") => Shape::Patch,
        ("contact", "log_activity") => Shape::Post("activities"),
        ("contact", "complete_task") => Shape::Post("tasks/complete"),
        (_, other) => Shape::Post(other),
    }
}

/// The HTTP method and path of a command, plus whether it creates its stream;
/// an unknown stream type or command is INVALID_ARGUMENT naming the field.
pub fn command_route(
    stream_type: &str,
    command: &str,
    stream_id: &str,
) -> Result<(Method, String, bool), Status> {
    let Some((stream_type, commands)) = COMMANDS.iter().find(|(name, _)| *name == stream_type)
    else {
        let known: Vec<&str> = COMMANDS.iter().map(|(name, _)| *name).collect();
        return Err(invalid(
            "stream_type",
            format!(
                "unknown stream type `{stream_type}`; expected one of {}",
                known.join(", ")
            ),
        ));
    };
    let Some(command) = commands.iter().find(|name| **name == command) else {
        return Err(invalid(
            "command",
            format!(
                "unknown command `{command}` for {stream_type} streams; expected one of {}",
                commands.join(", ")
            ),
        ));
    };
    let base = format!("/v1/{}", collection(stream_type));
    let shape = shape(stream_type, command);
    if shape == Shape::Create {
        return Ok((Method::POST, base, true));
    }
    if stream_id.is_empty() {
        return Err(invalid(
            "stream_id",
            format!("`{command}` needs the id of an existing {stream_type}"),
        ));
    }
    let id = encode_segment(stream_id);
    Ok(match shape {
        Shape::Patch => (Method::PATCH, format!("{base}/{id}"), false),
        Shape::Post(suffix) => (Method::POST, format!("{base}/{id}/{suffix}"), false),
        Shape::Create => unreachable!("handled above"),
    })
}

/// Percent-encodes one path segment (everything but unreserved characters),
/// so an id can never reach another route.
fn encode_segment(raw: &str) -> String {
    let mut encoded = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A creation command's body with `stream_id` as its `id`. A body that is not
/// a JSON object is passed on untouched: the HTTP route reports it.
fn body_with_id(body_json: &str, stream_id: &str) -> Result<String, Status> {
    if stream_id.is_empty() {
        return Ok(body_json.to_string());
    }
    let text = if body_json.trim().is_empty() {
        "{}"
    } else {
        body_json
    };
    let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(text) else {
        return Ok(body_json.to_string());
    };
    match body.get("id") {
        None | Some(Value::Null) => {
            body.insert("id".into(), Value::String(stream_id.to_string()));
            Ok(Value::Object(body).to_string())
        }
        Some(Value::String(id)) if id.eq_ignore_ascii_case(stream_id) => Ok(body_json.to_string()),
        Some(_) => Err(invalid(
            "stream_id",
            "differs from the `id` of body_json; send one or make them equal",
        )),
    }
}

/// The headers every translated request carries, from the call's metadata.
fn forwarded_headers<T>(request: &Request<T>) -> HeaderMap {
    let metadata = request.metadata().clone().into_headers();
    let mut headers = HeaderMap::new();
    for name in FORWARDED_METADATA {
        if let Some(value) = metadata.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    headers
}

/// Sends one request through the router; 2xx gives the headers and body, the
/// rest a status.
async fn call(
    router: &Router,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Option<String>,
) -> Result<(HeaderMap, Bytes), Status> {
    let mut request = axum::http::Request::builder().method(method).uri(path);
    if let Some(target) = request.headers_mut() {
        target.extend(headers);
        if body.is_some() {
            target.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    let request = request
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .map_err(|error| invalid("stream_id", format!("does not fit in a path: {error}")))?;
    let response = match router.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_REPLY_BYTES)
        .await
        .map_err(|error| problem_status(&Problem::internal(&error)))?;
    if parts.status.is_success() {
        Ok((parts.headers, bytes))
    } else {
        Err(answer_status(parts.status, &bytes))
    }
}

/// `CommandService` over the command routes.
#[derive(Clone)]
pub struct GrpcCommands {
    router: Router,
}

/// The command service answering through `router` (the command routes, e.g.
/// [`crate::router`] or [`crate::routes`] merged into a bigger router).
pub fn command_service(router: Router) -> CommandServiceServer<GrpcCommands> {
    CommandServiceServer::new(GrpcCommands { router })
}

#[derive(Deserialize)]
struct CommandAnswer {
    id: String,
    version: i64,
    position: i64,
}

#[tonic::async_trait]
impl CommandService for GrpcCommands {
    async fn execute(
        &self,
        request: Request<CommandRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let mut headers = forwarded_headers(&request);
        let command = request.into_inner();
        let (method, path, creates) =
            command_route(&command.stream_type, &command.command, &command.stream_id)?;
        let body = if creates {
            body_with_id(&command.body_json, &command.stream_id)?
        } else {
            command.body_json
        };
        if !command.idempotency_key.is_empty() {
            let value = HeaderValue::from_str(&command.idempotency_key).map_err(|_| {
                invalid(
                    "idempotency_key",
                    "must be 1..=255 visible ASCII characters",
                )
            })?;
            headers.insert("idempotency-key", value);
        }
        if let Some(version) = command.expected_version {
            let value = HeaderValue::from_str(&format!("\"{version}\""))
                .map_err(|_| invalid("expected_version", "not a version"))?;
            headers.insert(IF_MATCH, value);
        }
        let (answer_headers, bytes) =
            call(&self.router, method, &path, headers, Some(body)).await?;
        let answer: CommandAnswer = serde_json::from_slice(&bytes).map_err(|error| {
            problem_status(&Problem::internal(&format!(
                "command answer is not a CommandResponse: {error}"
            )))
        })?;
        let mut response = Response::new(CommandReply {
            id: answer.id,
            version: answer.version,
            position: answer.position,
        });
        if answer_headers
            .get("idempotent-replayed")
            .is_some_and(|value| value.as_bytes() == b"true")
        {
            response.metadata_mut().insert(
                "idempotent-replayed",
                tonic::metadata::MetadataValue::from_static("true"),
            );
        }
        Ok(response)
    }
}

/// `QueryService` over the query routes.
#[derive(Clone)]
pub struct GrpcQueries {
    router: Router,
}

/// The query service answering through `router`, which must serve the read
/// routes (`crm_query_service::routes`) and `GET /v1/streams/{type}/{id}/events`
/// (the log: [`crate::history_routes`]), e.g. the command routes merged with
/// the query service's routes.
pub fn query_service(router: Router) -> QueryServiceServer<GrpcQueries> {
    QueryServiceServer::new(GrpcQueries { router })
}

/// The collection of a `GetRecordRequest` (plural, or the stream type).
fn record_collection(name: &str) -> Result<&'static str, Status> {
    COMMANDS
        .iter()
        .map(|(stream_type, _)| collection(stream_type))
        .find(|plural| *plural == name)
        .or_else(|| {
            COMMANDS
                .iter()
                .find(|(stream_type, _)| *stream_type == name)
                .map(|(stream_type, _)| collection(stream_type))
        })
        .ok_or_else(|| {
            invalid(
                "collection",
                format!(
                    "unknown collection `{name}`; expected one of leads, accounts, contacts, opportunities, cases"
                ),
            )
        })
}

/// `path?key=value&...` for the parameters that are set, values percent-encoded.
fn with_query(mut path: String, params: &[(&str, Option<String>)]) -> String {
    let pairs: Vec<String> = params
        .iter()
        .filter_map(|(key, value)| {
            value
                .as_ref()
                .map(|value| format!("{key}={}", encode_segment(value)))
        })
        .collect();
    if !pairs.is_empty() {
        path.push('?');
        path.push_str(&pairs.join("&"));
    }
    path
}

/// GETs `path` and decodes the JSON answer into the typed reply.
async fn typed_reply<T: DeserializeOwned>(
    router: &Router,
    path: &str,
    headers: HeaderMap,
) -> Result<Response<T>, Status> {
    let (_, bytes) = call(router, Method::GET, path, headers, None).await?;
    serde_json::from_slice(&bytes)
        .map(Response::new)
        .map_err(|error| {
            problem_status(&Problem::internal(&format!(
                "the answer of GET {} does not decode into its gRPC message: {error}",
                path.split('?').next().unwrap_or(path)
            )))
        })
}

fn json_reply(bytes: Bytes) -> Result<Response<JsonReply>, Status> {
    let json = String::from_utf8(bytes.to_vec())
        .map_err(|error| problem_status(&Problem::internal(&error)))?;
    Ok(Response::new(JsonReply { json }))
}

#[tonic::async_trait]
impl QueryService for GrpcQueries {
    async fn get_record(
        &self,
        request: Request<GetRecordRequest>,
    ) -> Result<Response<JsonReply>, Status> {
        let headers = forwarded_headers(&request);
        let query = request.into_inner();
        let collection = record_collection(&query.collection)?;
        if query.id.is_empty() {
            return Err(invalid("id", "required"));
        }
        let mut path = format!("/v1/{collection}/{}", encode_segment(&query.id));
        if let Some(position) = query.min_position {
            path.push_str(&format!("?min_position={position}"));
        }
        let (_, bytes) = call(&self.router, Method::GET, &path, headers, None).await?;
        json_reply(bytes)
    }

    async fn get_stream_events(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<JsonReply>, Status> {
        let headers = forwarded_headers(&request);
        let query = request.into_inner();
        if query.stream_type.is_empty() {
            return Err(invalid("stream_type", "required"));
        }
        if query.stream_id.is_empty() {
            return Err(invalid("stream_id", "required"));
        }
        let mut params = Vec::new();
        if query.after_version != 0 {
            params.push(format!("after_version={}", query.after_version));
        }
        if query.limit != 0 {
            params.push(format!("limit={}", query.limit));
        }
        if let Some(position) = query.min_position {
            params.push(format!("min_position={position}"));
        }
        let mut path = format!(
            "/v1/streams/{}/{}/events",
            encode_segment(&query.stream_type),
            encode_segment(&query.stream_id)
        );
        if !params.is_empty() {
            path.push('?');
            path.push_str(&params.join("&"));
        }
        let (_, bytes) = call(&self.router, Method::GET, &path, headers, None).await?;
        json_reply(bytes)
    }

    async fn get_pipeline_board(
        &self,
        request: Request<PipelineBoardRequest>,
    ) -> Result<Response<PipelineBoard>, Status> {
        let headers = forwarded_headers(&request);
        let query = request.into_inner();
        let path = with_query(
            "/v1/pipeline".to_string(),
            &[
                ("owner", query.owner),
                ("pipeline", query.pipeline),
                ("min_position", query.min_position.map(|p| p.to_string())),
            ],
        );
        typed_reply(&self.router, &path, headers).await
    }

    async fn get_customer(
        &self,
        request: Request<CustomerRequest>,
    ) -> Result<Response<CustomerSummary>, Status> {
        let headers = forwarded_headers(&request);
        let query = request.into_inner();
        if query.account_id.is_empty() {
            return Err(invalid("account_id", "required"));
        }
        let path = with_query(
            format!("/v1/customers/{}", encode_segment(&query.account_id)),
            &[("min_position", query.min_position.map(|p| p.to_string()))],
        );
        typed_reply(&self.router, &path, headers).await
    }

    async fn get_customer_timeline(
        &self,
        request: Request<TimelineRequest>,
    ) -> Result<Response<TimelinePage>, Status> {
        let headers = forwarded_headers(&request);
        let query = request.into_inner();
        let base = match (query.account_id.is_empty(), query.contact_id.is_empty()) {
            (false, true) => format!(
                "/v1/customers/{}/history",
                encode_segment(&query.account_id)
            ),
            (true, false) => format!("/v1/contacts/{}/history", encode_segment(&query.contact_id)),
            (true, true) => {
                return Err(invalid(
                    "account_id",
                    "required: the account_id (or the contact_id) whose timeline to read",
                ))
            }
            (false, false) => {
                return Err(invalid(
                    "contact_id",
                    "send the account_id or the contact_id, not both",
                ))
            }
        };
        let path = with_query(
            base,
            &[
                ("kind", query.kind),
                ("cursor", query.cursor),
                ("limit", query.limit.map(|n| n.to_string())),
                ("min_position", query.min_position.map(|p| p.to_string())),
            ],
        );
        typed_reply(&self.router, &path, headers).await
    }

    async fn list_audit(
        &self,
        request: Request<AuditRequest>,
    ) -> Result<Response<AuditPage>, Status> {
        let headers = forwarded_headers(&request);
        let query = request.into_inner();
        let path = with_query(
            "/v1/audit".to_string(),
            &[
                ("stream_type", query.stream_type),
                ("stream_id", query.stream_id),
                ("actor", query.actor),
                ("from", query.from),
                ("to", query.to),
                ("field", query.field),
                ("event_type", query.event_type),
                ("cursor", query.cursor),
                ("limit", query.limit.map(|n| n.to_string())),
                ("min_position", query.min_position.map(|p| p.to_string())),
            ],
        );
        typed_reply(&self.router, &path, headers).await
    }
}

/// Serves the query service alone on `listener` (a process with the read
/// models but not the command API) until `shutdown` completes.
pub async fn serve_queries(
    listener: tokio::net::TcpListener,
    queries: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(query_service(queries))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Serves both gRPC services on `listener` until `shutdown` completes
/// (in-flight calls are finished first).
pub async fn serve(
    listener: tokio::net::TcpListener,
    commands: Router,
    queries: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(command_service(commands))
        .add_service(query_service(queries))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_map_to_their_http_routes() {
        let id = "0190a0a0-0000-7000-8000-000000000000";
        let cases = [
            (
                "opportunity",
                "advance",
                "POST",
                "/v1/opportunities/{id}/advance",
            ),
            ("account", "update", "PATCH", "/v1/accounts/{id}"),
            ("lead", "capture", "POST", "/v1/leads"),
            ("account", "register", "POST", "/v1/accounts"),
            ("contact", "create", "POST", "/v1/contacts"),
            ("opportunity", "open", "POST", "/v1/opportunities"),
            ("case", "open", "POST", "/v1/cases"),
            (
                "contact",
                "log_activity",
                "POST",
                "/v1/contacts/{id}/activities",
            ),
            (
                "contact",
                "complete_task",
                "POST",
                "/v1/contacts/{id}/tasks/complete",
            ),
            ("case", "resolve", "POST", "/v1/cases/{id}/resolve"),
            ("lead", "convert", "POST", "/v1/leads/{id}/convert"),
        ];
        for (stream_type, command, method, path) in cases {
            let (got_method, got_path, _) = command_route(stream_type, command, id).unwrap();
            assert_eq!(got_method.as_str(), method, "{stream_type}.{command}");
            assert_eq!(
                got_path,
                path.replace("{id}", id),
                "{stream_type}.{command}"
            );
        }
    }

    #[test]
    fn unknown_commands_and_missing_ids_name_the_field() {
        let field = |status: Status| {
            let problem: Value = serde_json::from_slice(status.details()).unwrap();
            assert_eq!(status.code(), Code::InvalidArgument);
            problem["errors"][0]["field"].as_str().unwrap().to_string()
        };
        assert_eq!(
            field(command_route("lead", "explode", "x").unwrap_err()),
            "command"
        );
        assert_eq!(
            field(command_route("pet", "feed", "x").unwrap_err()),
            "stream_type"
        );
        assert_eq!(
            field(command_route("case", "close", "").unwrap_err()),
            "stream_id"
        );
    }

    #[test]
    fn ids_cannot_escape_their_path_segment() {
        let (_, path, _) = command_route("case", "close", "../../leads?x=1#y").unwrap();
        assert_eq!(path, "/v1/cases/%2E%2E%2F%2E%2E%2Fleads%3Fx%3D1%23y/close");
    }

    #[test]
    fn a_creation_stream_id_becomes_the_body_id() {
        let body = body_with_id(r#"{"name":"Acme"}"#, "abc").unwrap();
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["id"], "abc");
        assert_eq!(body_with_id("", "abc").unwrap(), r#"{"id":"abc"}"#);
        assert_eq!(body_with_id("not json", "abc").unwrap(), "not json");
        assert_eq!(
            body_with_id(r#"{"id":"other"}"#, "abc").unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn query_parameters_are_encoded_and_unset_ones_left_out() {
        let path = with_query(
            "/v1/audit".to_string(),
            &[
                ("from", Some("2026-01-01T00:00:00+07:00".to_string())),
                ("actor", None),
                ("field", Some("a&b=c".to_string())),
            ],
        );
        assert_eq!(
            path,
            "/v1/audit?from=2026-01-01T00%3A00%3A00%2B07%3A00&field=a%26b%3Dc"
        );
        assert_eq!(
            with_query("/v1/pipeline".into(), &[("owner", None)]),
            "/v1/pipeline"
        );
    }

    #[test]
    fn plain_error_bodies_become_problems() {
        let status = answer_status(StatusCode::NOT_FOUND, &Bytes::new());
        assert_eq!(status.code(), Code::NotFound);
        let problem: Value = serde_json::from_slice(status.details()).unwrap();
        assert_eq!(problem["status"], 404);
        assert_eq!(status.message(), "Not Found");
    }
}
