//! The live SSE feed over real sockets on SQLite and PostgreSQL: resuming with
//! `Last-Event-ID` after a disconnect neither skips nor repeats an event.

mod common;

use std::pin::Pin;
use std::time::Duration;

use bytes_stream::SseReader;
use common::{append, Db, Deal, Server};
use crm_query_service::LiveSettings;
use reqwest::StatusCode;
use serde_json::Value;

/// A minimal SSE parser over reqwest's byte stream.
mod bytes_stream {
    use super::*;
    use futures::{Stream, StreamExt};

    type Bytes = Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

    #[derive(Debug, Clone, PartialEq)]
    pub enum Frame {
        Event {
            id: Option<String>,
            event: Option<String>,
            data: String,
        },
        Comment(String),
    }

    pub struct SseReader {
        bytes: Bytes,
        buffer: String,
    }

    impl SseReader {
        pub fn new(response: reqwest::Response) -> Self {
            Self {
                bytes: Box::pin(
                    response
                        .bytes_stream()
                        .map(|chunk| chunk.map(|b| b.to_vec())),
                ),
                buffer: String::new(),
            }
        }

        /// The next frame, `None` when the server ends the stream; panics after 10 s.
        pub async fn next_frame(&mut self) -> Option<Frame> {
            tokio::time::timeout(Duration::from_secs(10), self.read_frame())
                .await
                .expect("no SSE frame within 10 s")
        }

        /// The next event frame, skipping comments.
        pub async fn next_event(&mut self) -> (String, String, Value) {
            loop {
                match self.next_frame().await.expect("stream ended") {
                    Frame::Event { id, event, data } => {
                        let data: Value = serde_json::from_str(&data).expect("data is JSON");
                        return (id.expect("id"), event.expect("event"), data);
                    }
                    Frame::Comment(_) => continue,
                }
            }
        }

        async fn read_frame(&mut self) -> Option<Frame> {
            loop {
                let normalized = self.buffer.replace("\r\n", "\n");
                if let Some(end) = normalized.find("\n\n") {
                    let block = normalized[..end].to_string();
                    self.buffer = normalized[end + 2..].to_string();
                    if let Some(frame) = parse(&block) {
                        return Some(frame);
                    }
                    continue;
                }
                match self.bytes.next().await {
                    Some(Ok(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                    Some(Err(error)) => panic!("SSE stream failed: {error}"),
                    None => return None,
                }
            }
        }
    }

    fn parse(block: &str) -> Option<Frame> {
        let (mut id, mut event, mut data, mut comment) = (None, None, Vec::new(), None);
        for line in block.lines() {
            if let Some(text) = line.strip_prefix(':') {
                comment = Some(text.trim().to_string());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "id" => id = Some(value),
                "event" => event = Some(value),
                "data" => data.push(value),
                _ => {}
            }
        }
        if id.is_none() && event.is_none() && data.is_empty() {
            return comment.map(Frame::Comment);
        }
        Some(Frame::Event {
            id,
            event,
            data: data.join("\n"),
        })
    }
}

use bytes_stream::Frame;

fn fast() -> LiveSettings {
    LiveSettings {
        poll_interval: Duration::from_millis(200),
        ..LiveSettings::default()
    }
}

async fn connect(request: reqwest::RequestBuilder) -> SseReader {
    let response = request.send().await.expect("connect");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    SseReader::new(response)
}

/// Appends `n` events to a fresh deal (an open, then reprices).
async fn append_deal(log: &crm_eventlog::EventLog, n: usize) {
    let mut deal = Deal::new();
    let id = deal.stream_id();
    append(log, "opportunity", &id, &deal.open("1.00 USD")).await;
    for k in 1..n {
        let events = deal.reprice(&format!("{}.00 USD", k + 1), k as i64);
        append(log, "opportunity", &id, &events).await;
    }
}

async fn resumes_without_gap_or_repeat(db: Db) {
    let log = db.open().await;
    let server = Server::start(log.clone(), fast()).await;
    append_deal(&log, 5).await;

    // First connection: take 3 of the 5, then hang up.
    let mut received = Vec::new();
    let mut reader = connect(server.get("/v1/events/live?after=0")).await;
    for _ in 0..3 {
        received.push(reader.next_event().await);
    }
    drop(reader);
    let last_id = received.last().unwrap().0.clone();
    assert_eq!(last_id, "3");

    // While disconnected, 4 more events.
    append_deal(&log, 4).await;

    // Reconnect as EventSource does: same URL plus Last-Event-ID (which wins).
    let mut reader = connect(
        server
            .get("/v1/events/live?after=0")
            .header("Last-Event-ID", &last_id),
    )
    .await;
    for _ in 0..6 {
        received.push(reader.next_event().await);
    }
    // Live: appended while connected.
    append_deal(&log, 3).await;
    for _ in 0..3 {
        received.push(reader.next_event().await);
    }

    let expected = log.read_all(0, 1000).await.unwrap();
    assert_eq!(expected.len(), 12);
    assert_eq!(received.len(), expected.len());
    for ((id, event, data), recorded) in received.iter().zip(&expected) {
        assert_eq!(id, &recorded.position.to_string(), "gap or repeat");
        assert_eq!(event, &format!("crm.opportunity.{}", recorded.event_type));
        assert_eq!(data["id"], recorded.event_id.to_string());
        assert_eq!(data["position"], recorded.position);
        assert_eq!(data["type"], event.as_str());
        assert_eq!(data["specversion"], "1.0");
        assert_eq!(data["data"], recorded.payload);
    }

    // Nothing more is pending: the next frame is not an event (keep-alive aside).
    let quiet = tokio::time::timeout(Duration::from_millis(700), reader.next_event()).await;
    assert!(quiet.is_err(), "unexpected extra event {quiet:?}");

    drop(server);
    log.close().await;
    db.finish().await;
}

async fn starts_at_head_and_sees_other_writers(db: Db) {
    let log = db.open().await;
    let server = Server::start(log.clone(), fast()).await;
    append_deal(&log, 2).await;

    // Default cursor: the head at connect time; only new events follow.
    let mut reader = connect(server.get("/v1/events/live")).await;
    append_deal(&log, 1).await;
    let (id, _, _) = reader.next_event().await;
    assert_eq!(id, "3");

    // A writer on another handle does not move this process's head watch: the
    // polling fallback still delivers its events.
    let other = db.open().await;
    append_deal(&other, 2).await;
    let (id, _, _) = reader.next_event().await;
    assert_eq!(id, "4");
    let (id, _, _) = reader.next_event().await;
    assert_eq!(id, "5");
    other.close().await;

    drop(reader);
    drop(server);
    log.close().await;
    db.finish().await;
}

#[tokio::test]
async fn sqlite_live_feed_resumes_without_gap_or_repeat() {
    resumes_without_gap_or_repeat(Db::sqlite().await).await;
}

#[tokio::test]
async fn postgres_live_feed_resumes_without_gap_or_repeat() {
    if let Some(db) = Db::postgres().await {
        resumes_without_gap_or_repeat(db).await;
    }
}

#[tokio::test]
async fn sqlite_live_feed_starts_at_head_and_polls_for_other_writers() {
    starts_at_head_and_sees_other_writers(Db::sqlite().await).await;
}

#[tokio::test]
async fn postgres_live_feed_starts_at_head_and_polls_for_other_writers() {
    if let Some(db) = Db::postgres().await {
        starts_at_head_and_sees_other_writers(db).await;
    }
}

#[tokio::test]
async fn live_feed_sends_keep_alive_comments_and_ends_on_shutdown() {
    let db = Db::sqlite().await;
    let log = db.open().await;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let live = LiveSettings {
        keep_alive: Duration::from_millis(100),
        shutdown: Some(shutdown),
        ..fast()
    };
    let server = Server::start(log.clone(), live).await;
    let mut reader = connect(server.get("/v1/events/live")).await;
    match reader.next_frame().await {
        Some(Frame::Comment(text)) => assert_eq!(text, "keep-alive"),
        other => panic!("expected a keep-alive comment, got {other:?}"),
    }
    stop.send(true).unwrap();
    loop {
        match reader.next_frame().await {
            None => break,
            Some(Frame::Comment(_)) => continue,
            Some(frame) => panic!("unexpected frame {frame:?}"),
        }
    }
    drop(server);
    log.close().await;
    db.finish().await;
}

#[tokio::test]
async fn live_feed_rejects_bad_cursors_and_missing_tokens() {
    let db = Db::sqlite().await;
    let log = db.open().await;
    let server = Server::start(log.clone(), fast()).await;
    for (request, status, field) in [
        (
            server.get("/v1/events/live").header("Last-Event-ID", "abc"),
            StatusCode::BAD_REQUEST,
            "Last-Event-ID",
        ),
        (
            server.get("/v1/events/live").header("Last-Event-ID", "-3"),
            StatusCode::BAD_REQUEST,
            "Last-Event-ID",
        ),
        (
            server.get("/v1/events/live?after=-1"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "after",
        ),
        (
            server.get("/v1/events/live?after=soon"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "after",
        ),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["field"], field);
    }
    let response = server
        .get_anonymous("/v1/events/live")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    drop(server);
    log.close().await;
    db.finish().await;
}
