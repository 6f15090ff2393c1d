//! The projection runner end to end, against the real `crm` binary: a
//! SIGKILL in the middle of a batch neither skips nor repeats an event, and
//! `crm rebuild` (run while `crm serve` is serving) produces exactly the
//! rows the live projections hold, then the live runner follows the new
//! generation.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use crm_tests::{Backend, Server};
use futures::future::join_all;
use serde_json::{json, Value};

/// Every projection `crm serve` runs.
const PROJECTIONS: [&str; 5] = ["pipeline", "service_levels", "records", "history", "audit"];

/// Small batches folded slowly: a kill lands inside a batch transaction.
const SLOW_FOLDING: [(&str, &str); 2] = [
    ("CRM_PROJECTION_BATCH", "50"),
    ("CRM_PROJECTION_PAUSE_MS", "5"),
];

/// How long any single wait in these tests may take before it is a failure.
const WAIT: Duration = Duration::from_secs(90);

fn ok(reply: crm_tests::Reply, what: &str) -> crm_tests::Reply {
    assert!(
        reply.status == 200 || reply.status == 201,
        "{what}: {reply:?}"
    );
    reply
}

/// `/v1/projections` by name; asserts each projection appears exactly once.
async fn projections_by_name(server: &Server) -> BTreeMap<String, Value> {
    let mut by_name = BTreeMap::new();
    for status in server.projections().await {
        let name = status["name"].as_str().expect("name").to_string();
        assert!(
            by_name.insert(name.clone(), status.clone()).is_none(),
            "two live generations of {name}: {status}"
        );
    }
    let names: BTreeSet<&str> = by_name.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        PROJECTIONS.into_iter().collect::<BTreeSet<_>>(),
        "{by_name:?}"
    );
    by_name
}

fn int(value: &Value, field: &str) -> i64 {
    value[field]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer {field} in {value}"))
}

// ------------------------------------------------------------ kill -9 mid-batch

/// What one round of writes created.
#[derive(Debug, Default, Clone)]
struct Created {
    accounts: Vec<String>,
    contacts: Vec<String>,
    opportunities: Vec<String>,
}

impl Created {
    fn extend(&mut self, other: Created) {
        self.accounts.extend(other.accounts);
        self.contacts.extend(other.contacts);
        self.opportunities.extend(other.opportunities);
    }
}

/// Stages every opportunity of the kill test is moved through after `prospecting`.
const ADVANCES: [&str; 3] = ["qualification", "proposal", "negotiation"];
/// Events per customer: account, two contacts, opportunity, three advances.
const EVENTS_PER_CUSTOMER: usize = 7;

/// One customer: an account, two contacts and an opportunity moved to negotiation.
async fn write_customer(server: &Server, n: usize) -> Created {
    let account = ok(
        server
            .post(
                "/v1/accounts",
                &json!({"name": format!("Customer {n}"), "kind": "customer", "owner": "alice"}),
            )
            .await,
        "create account",
    )
    .id();
    let mut contacts = Vec::new();
    for c in 0..2 {
        contacts.push(
            ok(
                server
                    .post(
                        "/v1/contacts",
                        &json!({"account_id": account, "name": format!("Person {n}-{c}"),
                                "email": format!("p{n}.{c}@customer.example")}),
                    )
                    .await,
                "create contact",
            )
            .id(),
        );
    }
    let opportunity = ok(
        server
            .post(
                "/v1/opportunities",
                &json!({"account_id": account, "name": format!("Deal {n}"),
                        "amount": {"amount": "1000.00", "currency": "USD"},
                        "expected_close": "2027-06-30", "owner": "alice", "stage": "prospecting"}),
            )
            .await,
        "create opportunity",
    )
    .id();
    for stage in ADVANCES {
        ok(
            server
                .post(
                    &format!("/v1/opportunities/{opportunity}/advance"),
                    &json!({"stage": stage}),
                )
                .await,
            "advance",
        );
    }
    Created {
        accounts: vec![account],
        contacts,
        opportunities: vec![opportunity],
    }
}

/// Customers `from..to`, eight at a time.
async fn write_customers(server: &Server, from: usize, to: usize) -> Created {
    let mut created = Created::default();
    let numbers: Vec<usize> = (from..to).collect();
    for chunk in numbers.chunks(8) {
        for one in join_all(chunk.iter().map(|n| write_customer(server, *n))).await {
            created.extend(one);
        }
    }
    created
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_neither_skips_nor_repeats_an_event_on_sqlite() {
    let server = Server::start_with_env(Backend::Sqlite, &SLOW_FOLDING)
        .await
        .expect("sqlite always starts");
    kill_9_mid_batch_neither_skips_nor_repeats_an_event(server, Folds::InTurn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_neither_skips_nor_repeats_an_event_on_postgres() {
    let Some(server) = Server::start_with_env(Backend::Postgres, &SLOW_FOLDING).await else {
        return;
    };
    kill_9_mid_batch_neither_skips_nor_repeats_an_event(server, Folds::Concurrently).await;
}

/// How the runner folds one round's batches on the backend under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Folds {
    /// SQLite: one projection after another, audit last.
    InTurn,
    /// PostgreSQL: every projection's batch at once.
    Concurrently,
}

async fn kill_9_mid_batch_neither_skips_nor_repeats_an_event(mut server: Server, folds: Folds) {
    // ~300 events: 43 customers of 7 events.
    let mut customers = 43;
    let mut created = write_customers(&server, 0, customers).await;
    let mut head = server.head().await;
    assert_eq!(head as usize, customers * EVENTS_PER_CUSTOMER);

    // Kill while the audit projection is part-way (some batches committed,
    // not all) and folding its next batch (its transaction lasts ~50 x 5 ms).
    // On SQLite the runner folds one batch per projection in turn, audit
    // last, so history being ahead of audit means audit's batch is open. On
    // PostgreSQL the batches of a round fold at once, so any audit short of
    // the head is folding (history ahead of it is a window of a few
    // milliseconds between two commits of the same round, which polling
    // missed under load until audit caught up). If audit caught up before we
    // looked (slow writes), append more and look again, a bounded number of
    // times.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut top_ups = 0;
    let seen_before_kill = loop {
        let statuses = projections_by_name(&server).await;
        let audit = int(&statuses["audit"], "position");
        let history = int(&statuses["history"], "position");
        let audit_folding = match folds {
            Folds::InTurn => history > audit,
            Folds::Concurrently => true,
        };
        if audit > 0 && audit < head && audit_folding {
            break statuses;
        }
        if audit >= head {
            top_ups += 1;
            assert!(
                top_ups <= 5,
                "the audit projection kept catching up with the writes (head {head}); \
                 cannot kill it mid-way"
            );
            created.extend(write_customers(&server, customers, customers + 10).await);
            customers += 10;
            head = server.head().await;
            continue;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the audit projection folded nothing within {WAIT:?}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let positions: BTreeMap<&str, i64> = seen_before_kill
        .iter()
        .map(|(name, status)| (name.as_str(), int(status, "position")))
        .collect();
    eprintln!("killing at head {head} ({top_ups} top-ups); positions seen: {positions:?}");
    let status = server.kill9().await;
    assert_eq!(
        status.signal(),
        Some(9),
        "crm serve died of SIGKILL: {status}"
    );

    // Restart without the slow-down; the log is unchanged by the kill.
    let server = server.respawn(&[]).await;
    assert_eq!(
        server.head().await,
        head,
        "the kill lost no acknowledged event"
    );
    for (name, status) in projections_by_name(&server).await {
        assert!(
            int(&status, "position") >= int(&seen_before_kill[&name], "position"),
            "{name}'s committed checkpoint went backwards over the kill: \
             before {} after {status}",
            seen_before_kill[&name]
        );
        assert_eq!(
            status["generation"], seen_before_kill[&name]["generation"],
            "{name} kept its generation"
        );
    }

    // Audit: one entry per event, positions exactly 1..=head.
    let entries = server.get_all_pages("/v1/audit?limit=500", head).await;
    let positions: Vec<i64> = entries.iter().map(|e| int(e, "position")).collect();
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        positions.len(),
        "an event was folded into the audit trail twice"
    );
    assert_eq!(
        sorted,
        (1..=head).collect::<Vec<_>>(),
        "audit positions are exactly 1..={head} (no gap)"
    );

    // Records: one per created record, each with every one of its events.
    for (collection, ids) in [
        ("accounts", &created.accounts),
        ("contacts", &created.contacts),
        ("opportunities", &created.opportunities),
        ("leads", &Vec::new()),
        ("cases", &Vec::new()),
    ] {
        let items = server
            .get_all_pages(&format!("/v1/{collection}?limit=500"), head)
            .await;
        let listed: BTreeSet<&str> = items
            .iter()
            .map(|item| item["id"].as_str().expect("id"))
            .collect();
        assert_eq!(
            listed.len(),
            items.len(),
            "{collection}: an id listed twice"
        );
        let expected: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(
            listed, expected,
            "{collection}: exactly the created records"
        );
        if collection == "opportunities" {
            for item in &items {
                assert_eq!(item["stage"], "negotiation", "{item}");
                assert_eq!(item["version"], 1 + ADVANCES.len(), "{item}");
            }
        }
    }

    // Pipeline: every opportunity counted once, in negotiation.
    let board = server.get_at("/v1/pipeline", head, WAIT).await;
    assert_eq!(board.status, 200, "{board:?}");
    assert_eq!(int(&board.body, "count"), customers as i64, "{board:?}");
    let negotiation = board.body["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|stage| stage["stage"] == "negotiation")
        .expect("a negotiation stage");
    assert_eq!(int(negotiation, "count"), customers as i64, "{negotiation}");
    assert_eq!(
        negotiation["total"],
        json!([{"amount": format!("{}.00", customers * 1000), "currency": "USD"}]),
        "{negotiation}"
    );

    // History: every account's 360 shows its two contacts and one open deal.
    for account in &created.accounts {
        let summary = server
            .get_at(&format!("/v1/customers/{account}"), head, WAIT)
            .await;
        assert_eq!(summary.status, 200, "{summary:?}");
        assert_eq!(
            summary.body["contacts"].as_array().map(Vec::len),
            Some(2),
            "{summary:?}"
        );
        assert_eq!(
            summary.body["open_opportunities"]["count"], 1,
            "{summary:?}"
        );
    }

    // Service levels too has folded everything (there are no cases).
    let open_cases = server.get_at("/v1/service-levels", head, WAIT).await;
    assert_eq!(open_cases.status, 200, "{open_cases:?}");
    assert_eq!(open_cases.body["cases"], json!([]), "{open_cases:?}");

    for (name, status) in projections_by_name(&server).await {
        assert_eq!(int(&status, "position"), head, "{name}: {status}");
        assert_eq!(int(&status, "head"), head, "{name}: {status}");
        assert_eq!(int(&status, "lag"), 0, "{name}: {status}");
        assert_eq!(status["state"], "active", "{name}: {status}");
        assert!(status["error"].is_null(), "{name}: {status}");
    }
    server.finish().await;
}

// ------------------------------------------------------- rebuild equals live

/// A small history touching every read model: deals won, lost, reopened and
/// open in two currencies, a converted lead, activities, a case worked to
/// resolution. Returns the main account's id and the ids of all accounts
/// created directly.
async fn scripted_scenario(server: &Server) -> (String, Vec<String>) {
    let post =
        |path: String, body: Value| async move { ok(server.post(&path, &body).await, &path) };
    let mut accounts = Vec::new();
    for (name, owner) in [("Acme", "alice"), ("Globex", "bob"), ("Initech", "alice")] {
        accounts.push(
            post(
                "/v1/accounts".into(),
                json!({"name": name, "kind": "customer", "industry": "technology", "owner": owner}),
            )
            .await
            .id(),
        );
    }
    let acme = accounts[0].clone();
    let jane = post(
        "/v1/contacts".into(),
        json!({"account_id": acme, "name": "Jane Doe", "email": "jane@acme.example"}),
    )
    .await
    .id();
    let _john = post(
        "/v1/contacts".into(),
        json!({"account_id": accounts[1], "name": "John Roe", "email": "john@globex.example"}),
    )
    .await
    .id();
    post(
        format!("/v1/contacts/{jane}/activities"),
        json!({"kind": "call", "subject": "Intro", "occurred_at": "2026-03-02T10:00:00Z", "duration_minutes": 15}),
    )
    .await;
    post(
        format!("/v1/contacts/{jane}/activities"),
        json!({"kind": "task", "subject": "Send proposal"}),
    )
    .await;

    let deal = |account: &str, name: &str, amount: &str, currency: &str, owner: &str| {
        json!({"account_id": account, "name": name, "amount": {"amount": amount, "currency": currency},
               "expected_close": "2026-12-31", "owner": owner, "stage": "prospecting"})
    };
    let mut opportunities = Vec::new();
    for body in [
        deal(&acme, "Acme rollout", "12000.00", "USD", "alice"),
        deal(&acme, "Acme support", "3000.00", "USD", "alice"),
        deal(&accounts[1], "Globex pilot", "8000.00", "EUR", "bob"),
        deal(&accounts[1], "Globex expansion", "20000.00", "EUR", "bob"),
        deal(&accounts[2], "Initech seats", "5000.00", "USD", "alice"),
    ] {
        opportunities.push(post("/v1/opportunities".into(), body).await.id());
    }
    let advance = |id: String, stage: &'static str| {
        post(
            format!("/v1/opportunities/{id}/advance"),
            json!({"stage": stage, "reason": "next step"}),
        )
    };
    // Won after three stages.
    for stage in ["qualification", "proposal", "negotiation"] {
        advance(opportunities[0].clone(), stage).await;
    }
    post(
        format!("/v1/opportunities/{}/win", opportunities[0]),
        json!({"close_value": {"amount": "11500.00", "currency": "USD"}}),
    )
    .await;
    // Lost from proposal.
    advance(opportunities[1].clone(), "proposal").await;
    post(
        format!("/v1/opportunities/{}/lose", opportunities[1]),
        json!({"reason": "price", "competitor": "Globex"}),
    )
    .await;
    // Open, mid-pipeline, in EUR.
    advance(opportunities[2].clone(), "qualification").await;
    // Lost, then reopened and moved on.
    post(
        format!("/v1/opportunities/{}/lose", opportunities[3]),
        json!({"reason": "timing"}),
    )
    .await;
    post(
        format!("/v1/opportunities/{}/reopen", opportunities[3]),
        json!({"reason": "budget back"}),
    )
    .await;
    advance(opportunities[3].clone(), "proposal").await;
    // Changed details, then won.
    ok(
        server
            .send(
                reqwest::Method::PATCH,
                &format!("/v1/opportunities/{}", opportunities[4]),
                &json!({"amount": {"amount": "6000.00", "currency": "USD"}, "owner": "bob"}),
            )
            .await,
        "update opportunity",
    );
    post(
        format!("/v1/opportunities/{}/win", opportunities[4]),
        json!({"close_value": {"amount": "6000.00", "currency": "USD"}}),
    )
    .await;

    // A lead converted into a customer.
    let lead = post(
        "/v1/leads".into(),
        json!({"name": "Tran Van B", "company": "Beta Ltd", "email": "b@beta.example", "source": "web_form"}),
    )
    .await
    .id();
    post(format!("/v1/leads/{lead}/qualify"), json!({})).await;
    post(
        format!("/v1/leads/{lead}/convert"),
        json!({"opportunity": {"name": "Beta rollout", "amount": {"amount": "9000.00", "currency": "USD"}, "expected_close": "2027-01-31"}}),
    )
    .await;

    // A case worked to resolution, and one left open.
    let case = post(
        "/v1/cases".into(),
        json!({"account_id": acme, "contact_id": jane, "subject": "Cannot log in", "priority": "high", "channel": "email"}),
    )
    .await
    .id();
    post(
        format!("/v1/cases/{case}/assign"),
        json!({"assignee": "bob"}),
    )
    .await;
    post(
        format!("/v1/cases/{case}/comment"),
        json!({"body": "Looking into it", "public": true}),
    )
    .await;
    post(
        format!("/v1/cases/{case}/resolve"),
        json!({"resolution": "Reset SSO session"}),
    )
    .await;
    post(
        "/v1/cases".into(),
        json!({"account_id": accounts[1], "subject": "Invoice wrong", "priority": "normal"}),
    )
    .await;
    (acme, accounts)
}

/// Every read that must be the same before and after a rebuild, at `head`.
async fn snapshot(server: &Server, accounts: &[String], head: i64) -> BTreeMap<String, Value> {
    let mut paths: Vec<String> = [
        "/v1/pipeline",
        "/v1/pipeline/forecast",
        "/v1/pipeline/analytics?from=2000-01-01&to=2100-01-01",
        "/v1/pipeline/analytics?from=2000-01-01&to=2100-01-01&group_by=owner",
        "/v1/pipeline/analytics?from=2000-01-01&to=2100-01-01&group_by=stage",
        "/v1/opportunities?limit=500",
        "/v1/accounts?limit=500",
        "/v1/contacts?limit=500",
        "/v1/leads?limit=500",
        "/v1/cases?limit=500",
        "/v1/audit?limit=500",
        // Service levels judge due times at `now`: pin it.
        "/v1/service-levels?now=2030-01-01T00:00:00Z",
        "/v1/service-levels/stats?from=2000-01-01&to=2100-01-01&now=2030-01-01T00:00:00Z",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for account in accounts {
        paths.push(format!("/v1/customers/{account}"));
        paths.push(format!("/v1/customers/{account}/history?limit=500"));
    }
    let mut snapshot = BTreeMap::new();
    for path in paths {
        let reply = server.get_at(&path, head, WAIT).await;
        assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
        assert!(
            reply.body.get("next_cursor").is_none_or(Value::is_null),
            "GET {path}: the scenario fits in one page"
        );
        snapshot.insert(path, reply.body);
    }
    snapshot
}

async fn rebuild_produces_the_rows_of_the_live_projections(server: Server) {
    let (acme, accounts) = scripted_scenario(&server).await;
    let head = server.head().await;
    let before = snapshot(&server, &accounts, head).await;
    assert_eq!(
        before["/v1/audit?limit=500"]["items"]
            .as_array()
            .map(Vec::len),
        Some(head as usize),
        "one audit entry per event"
    );
    let pipeline = &before["/v1/pipeline"];
    assert!(int(pipeline, "count") >= 3, "{pipeline}");
    let old = projections_by_name(&server).await;
    for (name, status) in &old {
        assert_eq!(int(status, "position"), head, "{name} caught up: {status}");
    }

    // Rebuild every projection while `crm serve` keeps serving.
    let output = server.crm(&["rebuild", "all"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "crm rebuild all failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let mut printed = BTreeMap::new();
    for line in stdout.lines() {
        if let Some((name, rest)) = line.split_once(": generation ") {
            let generation = rest
                .strip_suffix(" is serving")
                .and_then(|n| n.trim().parse::<i64>().ok())
                .unwrap_or_else(|| panic!("unexpected line from crm rebuild: {line}"));
            printed.insert(name.trim().to_string(), generation);
        }
    }
    assert_eq!(
        printed.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        PROJECTIONS.into_iter().collect::<BTreeSet<_>>(),
        "crm rebuild all names each projection's new generation:\n{stdout}"
    );

    let new = projections_by_name(&server).await;
    for (name, status) in &new {
        let generation = int(status, "generation");
        assert_eq!(
            generation, printed[name],
            "{name}: the generation crm rebuild printed is the serving one: {status}"
        );
        assert!(
            generation > int(&old[name], "generation"),
            "{name}: a new generation serves: before {} after {status}",
            old[name]
        );
        assert_eq!(status["state"], "active", "{name}: {status}");
        assert_eq!(int(status, "position"), head, "{name}: {status}");
        assert!(status["error"].is_null(), "{name}: {status}");
    }

    let after = snapshot(&server, &accounts, head).await;
    for (path, body) in &before {
        assert_eq!(
            &after[path], body,
            "GET {path}: the rebuilt generation answers exactly like the live one"
        );
    }

    // The live runner follows the new generation.
    let late = ok(
        server
            .post(
                "/v1/accounts",
                &json!({"name": "Late Ltd", "kind": "prospect", "owner": "carol"}),
            )
            .await,
        "create account after the rebuild",
    )
    .id();
    ok(
        server
            .post(
                &format!("/v1/opportunities/{}/advance", {
                    let opportunities = &before["/v1/opportunities?limit=500"]["items"];
                    opportunities
                        .as_array()
                        .and_then(|items| {
                            items
                                .iter()
                                .find(|o| o["name"] == "Globex pilot")
                                .and_then(|o| o["id"].as_str())
                        })
                        .expect("the Globex pilot")
                        .to_string()
                }),
                &json!({"stage": "proposal"}),
            )
            .await,
        "advance after the rebuild",
    );
    let latest = server.head().await;
    assert_eq!(latest, head + 2);
    let listed = server.get_all_pages("/v1/accounts?limit=500", latest).await;
    assert!(
        listed.iter().any(|account| account["id"] == late.as_str()),
        "the account created after the rebuild is listed: {listed:?}"
    );
    let summary = server
        .get_at(&format!("/v1/customers/{late}"), latest, WAIT)
        .await;
    assert_eq!(summary.status, 200, "{summary:?}");
    let audit = server.get_all_pages("/v1/audit?limit=500", latest).await;
    let positions: Vec<i64> = audit.iter().map(|e| int(e, "position")).collect();
    assert_eq!(positions, (1..=latest).collect::<Vec<_>>());
    let board = server.get_at("/v1/pipeline", latest, WAIT).await;
    assert_eq!(board.status, 200, "{board:?}");
    let stage_count = |board: &Value, stage: &str| {
        board["stages"]
            .as_array()
            .and_then(|stages| stages.iter().find(|s| s["stage"] == stage))
            .map(|s| int(s, "count"))
            .unwrap_or_else(|| panic!("no {stage} stage in {board}"))
    };
    assert_eq!(
        stage_count(&board.body, "proposal"),
        stage_count(pipeline, "proposal") + 1,
        "the move after the rebuild reached the pipeline: {}",
        board.body
    );
    let customer = server
        .get_at(&format!("/v1/customers/{acme}"), latest, WAIT)
        .await;
    assert_eq!(customer.status, 200, "{customer:?}");
    for (name, status) in projections_by_name(&server).await {
        assert_eq!(
            status["generation"], new[&name]["generation"],
            "{name}: {status}"
        );
        assert_eq!(int(&status, "position"), latest, "{name}: {status}");
        assert_eq!(int(&status, "lag"), 0, "{name}: {status}");
    }
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rebuild_produces_the_rows_of_the_live_projections() {
    let server = Server::start(Backend::Sqlite)
        .await
        .expect("sqlite always starts");
    rebuild_produces_the_rows_of_the_live_projections(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rebuild_produces_the_rows_of_the_live_projections() {
    let Some(server) = Server::start(Backend::Postgres).await else {
        return;
    };
    rebuild_produces_the_rows_of_the_live_projections(server).await;
}

/// `crm rebuild` while commands keep arriving: it waits its turn for the write
/// lock instead of failing, and the switch loses nothing written meanwhile.
async fn rebuild_under_concurrent_writes(server: Server) {
    let server = std::sync::Arc::new(server);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writer = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut written = 0;
            while !*stopped.borrow() {
                let reply = server
                    .post(
                        "/v1/accounts",
                        &serde_json::json!({"name": format!("Busy {written}")}),
                    )
                    .await;
                assert_eq!(reply.status, 201, "{reply:?}");
                written += 1;
            }
            written
        })
    };
    for round in 0..3 {
        let output = server.crm(&["rebuild", "all"]).await;
        assert!(
            output.status.success(),
            "rebuild {round} under load failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stop.send(true).unwrap();
    let written = writer.await.unwrap();
    assert!(written > 0, "the writer ran during the rebuilds");
    let head = server.head().await;
    let audit = server.get_all_pages("/v1/audit?limit=500", head).await;
    let positions: Vec<i64> = audit.iter().map(|entry| int(entry, "position")).collect();
    assert_eq!(
        positions,
        (1..=head).collect::<Vec<_>>(),
        "every event exactly once after three switches"
    );
    let accounts = server.get_all_pages("/v1/accounts?limit=500", head).await;
    assert_eq!(accounts.len() as i64, written);
    let server = std::sync::Arc::try_unwrap(server)
        .ok()
        .expect("writer finished");
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rebuild_under_concurrent_writes() {
    rebuild_under_concurrent_writes(Server::start(Backend::Sqlite).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rebuild_under_concurrent_writes() {
    let Some(server) = Server::start(Backend::Postgres).await else {
        return;
    };
    rebuild_under_concurrent_writes(server).await;
}
