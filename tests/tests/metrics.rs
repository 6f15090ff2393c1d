//! `/metrics` through `crm serve`: commands counted once per request by
//! stream type, command and outcome; command, append and HTTP latency as
//! Prometheus histograms whose counts match the requests sent; route labels
//! are templates, never raw paths.

use std::collections::BTreeMap;
use std::time::Duration;

use crm_tests::{Backend, Reply, Server};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_commands_and_time_appends_on_sqlite() {
    scenario(Server::start(Backend::Sqlite).await.unwrap(), "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_commands_and_time_appends_on_postgres() {
    let Some(server) = Server::start(Backend::Postgres).await else {
        return;
    };
    scenario(server, "postgres").await;
}

/// One sample line: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (label values here never hold `"`, `,` or `}`).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("label=value");
                    (key.to_string(), value.trim_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap_or_else(|_| panic!("value of {line}")),
            }
        })
        .collect()
}

struct Metrics {
    text: String,
    samples: Vec<Sample>,
}

impl Metrics {
    async fn read(server: &Server) -> Metrics {
        let reply = server.get("/metrics").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let text = reply.body.as_str().expect("text").to_string();
        let samples = parse(&text);
        Metrics { text, samples }
    }

    /// The value of the series with exactly these labels; 0 when absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|sample| sample.name == name && sample.labels == wanted)
            .map(|sample| sample.value)
            .unwrap_or(0.0)
    }

    /// Every series of `name` whose labels include these.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|sample| {
                sample.name == name
                    && labels.iter().all(|(key, value)| {
                        sample.labels.get(*key).map(String::as_str) == Some(value)
                    })
            })
            .collect()
    }

    /// Asserts `name` is a Prometheus histogram (not a summary) whose series
    /// with exactly `labels` counted `count` observations, with buckets from
    /// 0.5 ms to +Inf, cumulative, the last equal to the count.
    fn assert_histogram(&self, name: &str, labels: &[(&str, &str)], count: f64) {
        assert!(
            self.text.contains(&format!("# TYPE {name} histogram")),
            "{name} is not a histogram:\n{}",
            self.text
        );
        assert_eq!(
            self.value(&format!("{name}_count"), labels),
            count,
            "{name}_count{labels:?}:\n{}",
            self.text
        );
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&format!("{name}_bucket"), labels)
            .into_iter()
            .filter(|sample| sample.labels.len() == labels.len() + 1)
            .map(|sample| {
                let le = &sample.labels["le"];
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le")
                };
                (bound, sample.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let bounds: Vec<f64> = buckets.iter().map(|bucket| bucket.0).collect();
        assert_eq!(
            bounds.first(),
            Some(&0.0005),
            "{name}{labels:?}: {bounds:?}"
        );
        assert!(bounds.contains(&10.0), "{name}{labels:?}: {bounds:?}");
        assert_eq!(bounds.last(), Some(&f64::INFINITY), "{name}{labels:?}");
        assert!(
            buckets.windows(2).all(|pair| pair[0].1 <= pair[1].1),
            "{name}{labels:?} buckets are cumulative: {buckets:?}"
        );
        assert_eq!(buckets.last().map(|bucket| bucket.1), Some(count));
        assert!(self.value(&format!("{name}_sum"), labels) > 0.0 || count == 0.0);
    }
}

async fn post_with(server: &Server, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    server
        .request(
            reqwest::Method::POST,
            path,
            &server.admin_token,
            move |mut request| {
                for (key, value) in headers {
                    request = request.header(key, value);
                }
                request.json(body)
            },
        )
        .await
}

/// Expected `crm_commands_total` per outcome of one command (others: 0).
type Outcomes = &'static [(&'static str, f64)];

async fn scenario(server: Server, backend: &str) {
    // accepted x2 (one with a client-chosen id), then the same create again: replayed.
    let account_id = uuid::Uuid::now_v7().to_string();
    let account_body = json!({"id": account_id, "name": "Acme Corp", "kind": "customer"});
    assert_eq!(server.post("/v1/accounts", &account_body).await.status, 201);
    let repeated = server.post("/v1/accounts", &account_body).await;
    assert_eq!(repeated.status, 200, "{repeated:?}");
    assert_eq!(repeated.header("idempotent-replayed"), Some("true"));
    let other = server
        .post("/v1/accounts", &json!({"name": "Beta Ltd"}))
        .await;
    assert_eq!(other.status, 201, "{other:?}");
    // invalid x2: a field failing validation (422), a body that is not JSON (400).
    server
        .post("/v1/accounts", &json!({"name": "", "kind": "emperor"}))
        .await
        .problem(422);
    server
        .request(
            reqwest::Method::POST,
            "/v1/accounts",
            &server.admin_token,
            |request| {
                request
                    .header("content-type", "application/json")
                    .body("{\"name\":")
            },
        )
        .await
        .problem(400);
    // denied x2: no valid token (401), a role without commands (403).
    server
        .request(reqwest::Method::POST, "/v1/accounts", "nope", |request| {
            request.json(&json!({"name": "Gamma"}))
        })
        .await
        .problem(401);
    let viewer = server.token("vera", "viewer").await.unwrap();
    server
        .request(reqwest::Method::POST, "/v1/accounts", &viewer, |request| {
            request.json(&json!({"name": "Gamma"}))
        })
        .await
        .problem(403);

    // opportunity.open: accepted, and rejected (the account does not exist).
    let open = |account: &str| {
        json!({"account_id": account, "name": "Renewal",
               "amount": {"amount": "1000.00", "currency": "USD"},
               "expected_close": "2027-03-31", "owner": "alice"})
    };
    let opportunity = server.post("/v1/opportunities", &open(&account_id)).await;
    assert_eq!(opportunity.status, 201, "{opportunity:?}");
    let opportunity = opportunity.id();
    let missing = uuid::Uuid::now_v7().to_string();
    let fields = server
        .post("/v1/opportunities", &open(&missing))
        .await
        .problem(422);
    assert_eq!(fields, ["account_id"]);

    // opportunity.advance: accepted with If-Match, conflict on the stale
    // If-Match, rejected on an unknown record, invalid on a non-UUID id.
    let advance = format!("/v1/opportunities/{opportunity}/advance");
    let moved = post_with(
        &server,
        &advance,
        &[("if-match", "\"1\"")],
        &json!({"stage": "qualification"}),
    )
    .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    post_with(
        &server,
        &advance,
        &[("if-match", "\"1\"")],
        &json!({"stage": "proposal"}),
    )
    .await
    .problem(412);
    server
        .post(
            &format!("/v1/opportunities/{missing}/advance"),
            &json!({"stage": "proposal"}),
        )
        .await
        .problem(404);
    server
        .post(
            "/v1/opportunities/not-a-uuid/advance",
            &json!({"stage": "proposal"}),
        )
        .await
        .problem(404);
    // opportunity.reopen of an open opportunity: an illegal transition.
    server
        .post(
            &format!("/v1/opportunities/{opportunity}/reopen"),
            &json!({}),
        )
        .await
        .problem(409);
    // opportunity.win: accepted, then the retry with the same key is replayed.
    let win = json!({"close_value": {"amount": "900.00", "currency": "USD"}});
    let path = format!("/v1/opportunities/{opportunity}/win");
    let won = post_with(&server, &path, &[("idempotency-key", "win-1")], &win).await;
    assert_eq!(won.status, 200, "{won:?}");
    let retry = post_with(&server, &path, &[("idempotency-key", "win-1")], &win).await;
    assert_eq!(retry.status, 200, "{retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, won.body);
    let position = won.body["position"].as_i64().expect("position");

    // Reads: the pipeline board twice, the customer's 360 once, an unknown route.
    for _ in 0..2 {
        let board = server
            .get_at("/v1/pipeline", position, Duration::from_secs(30))
            .await;
        assert_eq!(board.status, 200, "{board:?}");
    }
    let customer = server
        .get_at(
            &format!("/v1/customers/{account_id}"),
            position,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(customer.status, 200, "{customer:?}");
    assert_eq!(server.get("/v1/no-such-route").await.status, 404);

    let metrics = Metrics::read(&server).await;
    let expected: &[(&str, &str, Outcomes)] = &[
        (
            "account",
            "register",
            &[
                ("accepted", 2.0),
                ("replayed", 1.0),
                ("invalid", 2.0),
                ("denied", 2.0),
            ],
        ),
        (
            "opportunity",
            "open",
            &[("accepted", 1.0), ("rejected", 1.0)],
        ),
        (
            "opportunity",
            "advance",
            &[
                ("accepted", 1.0),
                ("conflict", 1.0),
                ("rejected", 1.0),
                ("invalid", 1.0),
            ],
        ),
        ("opportunity", "reopen", &[("rejected", 1.0)]),
        (
            "opportunity",
            "win",
            &[("accepted", 1.0), ("replayed", 1.0)],
        ),
    ];
    let mut total = 0.0;
    for (stream_type, command, outcomes) in expected {
        for outcome in [
            "accepted",
            "replayed",
            "rejected",
            "conflict",
            "invalid",
            "denied",
            "unavailable",
            "error",
        ] {
            let want = outcomes
                .iter()
                .find(|(name, _)| *name == outcome)
                .map(|(_, count)| *count)
                .unwrap_or(0.0);
            let labels = [
                ("stream_type", *stream_type),
                ("command", *command),
                ("outcome", outcome),
            ];
            assert_eq!(
                metrics.value("crm_commands_total", &labels),
                want,
                "crm_commands_total{labels:?}:\n{}",
                metrics.text
            );
        }
        let requests: f64 = outcomes.iter().map(|(_, count)| count).sum();
        total += requests;
        metrics.assert_histogram(
            "crm_command_duration_seconds",
            &[("stream_type", stream_type), ("command", command)],
            requests,
        );
    }
    let counted: f64 = metrics
        .matching("crm_commands_total", &[])
        .iter()
        .map(|sample| sample.value)
        .sum();
    assert_eq!(counted, total, "no other command was counted");

    // One append per accepted command (replays and refusals append nothing).
    metrics.assert_histogram("crm_append_duration_seconds", &[("backend", backend)], 5.0);

    let http = "crm_http_request_duration_seconds";
    metrics.assert_histogram(
        http,
        &[
            ("method", "GET"),
            ("route", "/v1/pipeline"),
            ("status", "200"),
        ],
        2.0,
    );
    metrics.assert_histogram(
        http,
        &[
            ("method", "GET"),
            ("route", "/v1/customers/{account_id}"),
            ("status", "200"),
        ],
        1.0,
    );
    metrics.assert_histogram(
        http,
        &[
            ("method", "POST"),
            ("route", "/v1/opportunities/{id}/advance"),
            ("status", "412"),
        ],
        1.0,
    );
    metrics.assert_histogram(
        http,
        &[
            ("method", "POST"),
            ("route", "/v1/accounts"),
            ("status", "201"),
        ],
        2.0,
    );
    metrics.assert_histogram(
        http,
        &[("method", "GET"), ("route", "unmatched"), ("status", "404")],
        1.0,
    );
    // Route labels are templates: no id, and no raw path, ever becomes a label.
    for id in [&account_id, &opportunity, &missing] {
        assert!(
            !metrics.text.contains(id.as_str()),
            "{id} in:\n{}",
            metrics.text
        );
    }
    assert!(!metrics.text.contains("not-a-uuid"), "{}", metrics.text);
    assert!(!metrics.text.contains("no-such-route"), "{}", metrics.text);
    server.finish().await;
}
