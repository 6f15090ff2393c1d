//! The state the log-backed routes share: the event log, the token verifier and
//! the tuning of the live feed and of `min_position` waits.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::FromRef;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use crm_eventlog::EventLog;
use crm_projection_service::registry::Generation;
use crm_projection_service::ReadDb;
use crm_service_kit::auth::Tokens;
use serde::Serialize;
use tokio::sync::watch;

use crate::views::{ViewCache, ViewSettings};

/// Tuning of `GET /v1/events/live` (and of `min_position` waits).
#[derive(Clone, Debug)]
pub struct LiveSettings {
    /// Interval of SSE keep-alive comments (default 15 s).
    pub keep_alive: Duration,
    /// How long a caught-up stream waits for the head watch before reading the
    /// log anyway (polling fallback; default 1 s).
    pub poll_interval: Duration,
    /// Events read from the log per page (default 500).
    pub page_size: i64,
    /// Longest wait for `min_position` before answering 503 (default 5 s).
    pub min_position_timeout: Duration,
    /// When this flips to `true`, open live streams end (graceful shutdown:
    /// `axum::serve(..).with_graceful_shutdown` waits for open responses).
    pub shutdown: Option<watch::Receiver<bool>>,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            page_size: 500,
            min_position_timeout: Duration::from_secs(5),
            shutdown: None,
        }
    }
}

/// Everything the log-backed routes need; cheap to clone.
#[derive(Clone, Debug)]
pub struct QueryState {
    pub log: EventLog,
    pub tokens: Arc<Tokens>,
    pub live: LiveSettings,
    /// The read models; without them only the log-backed routes can answer.
    pub read: Option<ReadDb>,
    /// Pipeline boards by the generation and checkpoint they were read at,
    /// and the newest of each.
    pub boards: BoardCache,
    /// Timeline pages by the history and records checkpoints they were read
    /// at, and the newest of each.
    pub timelines: TimelineCache,
    /// Which generation serves each projection, as read from the registry at
    /// most [`REGISTRY_VIEW_TTL`] ago.
    pub registry: RegistryView,
}

/// How old a request without `min_position` may find the registry: every
/// request reading it (twice for a timeline page) queued behind the
/// projections' writes at a few thousand requests per second, while a read
/// model lags its log by more than this anyway. A request with
/// `min_position` beyond the cached checkpoint reads the registry itself.
pub const REGISTRY_VIEW_TTL: Duration = Duration::from_millis(5);

/// The serving generation of each projection, by name.
pub type RegistryView = moka::future::Cache<String, Generation>;

/// Which timeline page (it is read from the history and records read models
/// and depends on nothing else).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TimelinePage {
    pub account_id: Option<String>,
    pub contact_id: Option<String>,
    pub kind: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

/// Timeline pages shared, like boards, by the requests that find the history
/// and records read models (in that order) at the same checkpoints.
pub type TimelineCache = ViewCache<TimelinePage, 2>;

/// Which board (it is read from the pipeline read model and depends on
/// nothing else).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Board {
    pub pipeline: Option<String>,
    pub owner: Option<String>,
}

/// A board sums every open opportunity (its cost grows with the pipeline),
/// while it changes only when the pipeline read model folds events: requests
/// between two folds share one computation (concurrent misses wait for the
/// one in flight instead of repeating it), and while it folds, the newest
/// board answers during the computation of the next (see [`ViewCache`]).
pub type BoardCache = ViewCache<Board, 1>;

/// A computed view as the JSON body every request for it is answered with:
/// serialized once, and each answer shares the bytes instead of copying and
/// serializing the view again.
#[derive(Clone, Debug)]
pub struct JsonBody(pub Bytes);

impl JsonBody {
    pub fn of<T: Serialize>(view: &T) -> Result<Self, serde_json::Error> {
        serde_json::to_vec(view).map(|body| Self(Bytes::from(body)))
    }
}

impl IntoResponse for JsonBody {
    fn into_response(self) -> Response {
        ([(CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

/// Bytes of JSON each view cache may hold (the timeline cache and the board
/// cache each, in each of their two maps; a body in both is stored once).
/// Bounded by size, not count: a page's size varies with its entries'
/// payloads (a 50-entry timeline page of the benchmark's data is about 32 KB,
/// so this holds some 250 pages). Only views of the newest checkpoints serve,
/// so a large or long-lived cache would only hold dead pages.
pub const VIEW_CACHE_BYTES: u64 = 8 * 1024 * 1024;

fn registry_view(ttl: Duration) -> RegistryView {
    moka::future::Cache::builder()
        .max_capacity(64)
        .time_to_live(ttl)
        .build()
}

impl QueryState {
    /// State with default [`LiveSettings`].
    pub fn new(log: EventLog, tokens: Arc<Tokens>) -> Self {
        Self {
            log,
            tokens,
            live: LiveSettings::default(),
            read: None,
            boards: ViewCache::new(VIEW_CACHE_BYTES, ViewSettings::default()),
            timelines: ViewCache::new(VIEW_CACHE_BYTES, ViewSettings::default()),
            registry: registry_view(REGISTRY_VIEW_TTL),
        }
    }

    /// Adds the read-model database (for the read-model routes).
    pub fn with_read_models(mut self, read: ReadDb) -> Self {
        self.read = Some(read);
        self
    }

    /// Replaces how old the registry view may be (tests pin it long to see
    /// both ways a request leaves it).
    pub fn with_registry_ttl(mut self, ttl: Duration) -> Self {
        self.registry = registry_view(ttl);
        self
    }

    /// Replaces how stale a board or timeline page may be (tests pin views
    /// fresh, or stale for long, to see each way a request is answered).
    pub fn with_views(mut self, settings: ViewSettings) -> Self {
        self.boards = ViewCache::new(VIEW_CACHE_BYTES, settings);
        self.timelines = ViewCache::new(VIEW_CACHE_BYTES, settings);
        self
    }

    /// Replaces the live-feed settings.
    pub fn with_live(mut self, live: LiveSettings) -> Self {
        self.live = live;
        self
    }
}

impl FromRef<QueryState> for Arc<Tokens> {
    fn from_ref(state: &QueryState) -> Self {
        state.tokens.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::JsonBody;
    use axum::body::to_bytes;
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;

    #[tokio::test]
    async fn a_cached_view_answers_as_json_with_the_bytes_it_was_serialized_to() {
        let view =
            serde_json::json!({"items": [{"position": 7, "summary": "call"}], "next_cursor": null});
        let response = JsonBody::of(&view).unwrap().into_response();
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let decoded: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(decoded, view);
    }
}
