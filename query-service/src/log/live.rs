//! The live feed: the global feed as Server-Sent Events, resumable.
//!
//! Each SSE event carries `id: <global position>`, `event: crm.<stream_type>.<EventType>`
//! and `data: <CloudEvent JSON>` (one line). The stream starts after the
//! position in the `Last-Event-ID` header (what `EventSource` sends when it
//! reconnects), else after `?after=P`, else after the current head (only new
//! events). Because the cursor is the global position and the log is gap-free,
//! a client that reconnects with the last id it saw neither misses nor repeats
//! an event.
//!
//! The stream reads the log in bounded pages ([`LiveSettings::page_size`]); when
//! caught up it waits for the log's head watch, re-reading at least every
//! [`LiveSettings::poll_interval`] (commits by other processes may not move the
//! watch). A keep-alive comment is sent every [`LiveSettings::keep_alive`].

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use crm_eventlog::{EventLog, LogError, RecordedEvent};
use crm_service_kit::auth::Actor;
use crm_service_kit::problem::Problem;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::IntoParams;

use crate::access::{require_read, Readable};
use crate::cloudevent::{cloud_event, event_type};
use crate::params::{query, Fields};
use crate::state::{LiveSettings, QueryState};

use super::visible_to;

/// Header a reconnecting `EventSource` sends with the last id it received.
pub const LAST_EVENT_ID: &str = "last-event-id";

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LiveQuery {
    /// Start after this global position (default: the current head, i.e. only
    /// new events). `Last-Event-ID` wins when both are sent.
    pub after: Option<String>,
}

/// Live feed of the caller's tenant as Server-Sent Events: `id` = global
/// position, `event` = CloudEvent type, `data` = CloudEvent JSON. Resume with
/// `Last-Event-ID: <last id>` (or `?after=<last id>`).
#[utoipa::path(get, path = "/v1/events/live", tag = "events", params(LiveQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "resume after this position")),
    responses(
        (status = 200, content_type = "text/event-stream", description = "the event stream"),
        (status = 400, body = Problem, description = "`Last-Event-ID` is not a position"),
        (status = 401, body = Problem),
        (status = 422, body = Problem, description = "`after` invalid")))]
pub async fn live(
    State(app): State<QueryState>,
    actor: Actor,
    headers: HeaderMap,
    params: Result<Query<LiveQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let params = query(params)?;
    let mut fields = Fields::new();
    let after = fields.integer("after", params.after.as_deref(), 0, i64::MAX);
    fields.finish()?;
    let last_event_id = last_event_id(&headers)?;
    require_read(&actor, Readable::GlobalFeed)?;

    // Subscribe before the first read: a commit after this point wakes the stream.
    let head = app.log.subscribe();
    let cursor = match last_event_id.or(after) {
        Some(position) => position,
        None => app
            .log
            .head_position()
            .await
            .map_err(|error| Problem::from_log(&error))?,
    };
    let feed = LiveFeed {
        log: app.log.clone(),
        tenant: actor.tenant.clone(),
        cursor,
        buffer: VecDeque::new(),
        head,
        shutdown: app.live.shutdown.clone(),
        settings: app.live.clone(),
    };
    let keep_alive = KeepAlive::new()
        .interval(app.live.keep_alive)
        .text("keep-alive");
    let mut response = Sse::new(feed.into_stream())
        .keep_alive(keep_alive)
        .into_response();
    // Ask reverse proxies (nginx) not to buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The `Last-Event-ID` header as a position; an empty header counts as absent.
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
    let Some(value) = headers.get(LAST_EVENT_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| Problem::bad_request("Last-Event-ID", "must be a global position"))?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<i64>() {
        Ok(position) if position >= 0 => Ok(Some(position)),
        _ => Err(Problem::bad_request(
            "Last-Event-ID",
            format!("must be a global position (an integer >= 0), got `{text}`"),
        )),
    }
}

/// A live stream's cursor and what it has read but not yet sent.
struct LiveFeed {
    log: EventLog,
    tenant: String,
    /// Highest position read from the log (sent, buffered, or another tenant's).
    cursor: i64,
    buffer: VecDeque<RecordedEvent>,
    head: watch::Receiver<i64>,
    shutdown: Option<watch::Receiver<bool>>,
    settings: LiveSettings,
}

impl LiveFeed {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures::stream::unfold(self, |mut feed| async move {
            let event = feed.next().await?;
            Some((Ok(sse_event(&event)), feed))
        })
    }

    /// The next event of the tenant; `None` when the log closes or on shutdown.
    async fn next(&mut self) -> Option<RecordedEvent> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Some(event);
            }
            if self.shutting_down() {
                return None;
            }
            let page_size = self.settings.page_size.max(1);
            match self.log.read_all(self.cursor, page_size).await {
                Ok(events) => {
                    let full = events.len() as i64 >= page_size;
                    if let Some(last) = events.last() {
                        self.cursor = last.position;
                    }
                    let tenant = &self.tenant;
                    self.buffer
                        .extend(events.into_iter().filter(|event| visible_to(event, tenant)));
                    if full || !self.buffer.is_empty() {
                        continue;
                    }
                }
                Err(LogError::Closed) => return None,
                Err(error) => {
                    tracing::warn!(%error, cursor = self.cursor, "live feed: reading the log failed; retrying");
                }
            }
            if !self.wait().await {
                return None;
            }
        }
    }

    /// Waits for a commit, the polling interval, or shutdown (then `false`).
    async fn wait(&mut self) -> bool {
        let poll = self.settings.poll_interval;
        let head = &mut self.head;
        let shutdown = &mut self.shutdown;
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    // The log's watch is gone: keep polling.
                    tokio::time::sleep(poll).await;
                }
                true
            }
            () = tokio::time::sleep(poll) => true,
            () = shutdown_requested(shutdown) => false,
        }
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.as_ref().is_some_and(|rx| *rx.borrow())
    }
}

/// Resolves once shutdown is requested; never without a shutdown signal.
async fn shutdown_requested(shutdown: &mut Option<watch::Receiver<bool>>) {
    match shutdown {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                // The sender is gone without asking to stop: never resolve.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// One SSE event: `id` = position, `event` = CloudEvent type, `data` = CloudEvent JSON.
fn sse_event(event: &RecordedEvent) -> Event {
    // `event:` must not hold line breaks (axum panics on them); log data is not
    // trusted that far.
    let name: String = event_type(event)
        .chars()
        .map(|c| if matches!(c, '\n' | '\r') { '_' } else { c })
        .collect();
    Event::default()
        .id(event.position.to_string())
        .event(name)
        .data(cloud_event(event).to_string())
}
