//! The Maven Analytics CRM sample (../shared/datasets/maven-crm) loaded
//! through the public HTTP API of a real `crm serve`, and the pipeline
//! analytics checked against figures this test computes on its own from the
//! CSV rows (plain Rust, integer cents, no call into the service's code).
//!
//! What is loaded: all 85 accounts, and every closed deal (Won/Lost) of the
//! sales agents of one regional office ("East", 1,858 deals) to keep the test
//! short. Open deals (Prospecting/Engaging) are skipped: they carry no close
//! and so no analytics figure; their count is reported. The dataset has final
//! stages only, so each deal is replayed as open (prospecting, engage date
//! 09:00 UTC) -> advance to qualification (the dataset's "Engaging", same
//! instant) -> win with its close value or lose with reason "lost" (close date
//! 17:00 UTC). A deal's cycle is therefore `close - engage` days + 8 hours.
//!
//! Dirty data is repaired and reported, never dropped: product "GTXPro" is
//! "GTX Pro", sector "technolgy" is "technology", country "Philipines" is
//! "Philippines". A Won deal with close value 0 would be loaded as a win worth
//! 0.00 USD (counted in `won_count`, adding nothing to `won_value`); the
//! dataset has none, which the test asserts and reports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crm_tests::{Backend, Reply, Server};
use futures::StreamExt;
use serde_json::{json, Value};

/// The regional office whose agents' closed deals are loaded.
const OFFICE: &str = "East";
/// Commands in flight at once (each deal's commands stay in order).
const CONCURRENCY: usize = 16;

// ------------------------------------------------------------------ CSV

fn dataset_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/datasets/maven-crm"
    ))
}

/// Rows of a CSV file as maps from column name to value, after checking the
/// header. The dataset has no quoting: a quote, a wrong field count or an
/// unexpected header fails the test instead of being misread.
fn read_csv(name: &str, header: &[&str]) -> Vec<HashMap<String, String>> {
    let path = dataset_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    let mut lines = text.lines().map(|line| line.trim_end_matches('\r'));
    let found: Vec<&str> = lines.next().expect("a header line").split(',').collect();
    assert_eq!(found, header, "{name}: unexpected columns");
    lines
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(index, line)| {
            assert!(
                !line.contains('"'),
                "{name} line {}: quoted fields are not expected",
                index + 2
            );
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(
                fields.len(),
                header.len(),
                "{name} line {}: {line}",
                index + 2
            );
            header
                .iter()
                .zip(fields)
                .map(|(column, value)| (column.to_string(), value.trim().to_string()))
                .collect()
        })
        .collect()
}

// ------------------------------------------------------- dates and money

/// Days since 1970-01-01 of a `YYYY-MM-DD` date (proleptic Gregorian).
fn day_number(date: &str) -> i64 {
    let parts: Vec<i64> = date
        .split('-')
        .map(|part| part.parse().unwrap_or_else(|_| panic!("bad date {date:?}")))
        .collect();
    let [year, month, day] = parts[..] else {
        panic!("bad date {date:?}")
    };
    assert!(
        (1..=12).contains(&month) && (1..=31).contains(&day),
        "bad date {date:?}"
    );
    // Howard Hinnant's days_from_civil.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A decimal string in ten-thousandths (the domain's money scale), exactly.
fn ten_thousandths(amount: &str) -> i128 {
    let (negative, digits) = match amount.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, amount),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    assert!(
        !whole.is_empty()
            && fraction.len() <= 4
            && whole
                .chars()
                .chain(fraction.chars())
                .all(|c| c.is_ascii_digit()),
        "not a decimal amount: {amount:?}"
    );
    let fraction = format!("{fraction:0<4}");
    let value = whole.parse::<i128>().unwrap() * 10_000 + fraction.parse::<i128>().unwrap();
    if negative {
        -value
    } else {
        value
    }
}

/// Whole dollars of a CSV price or close value, as cents.
fn csv_cents(value: &str) -> i64 {
    let units = ten_thousandths(value);
    assert_eq!(units % 100, 0, "sub-cent amount {value:?}");
    i64::try_from(units / 100).unwrap()
}

// --------------------------------------------------------------- dataset

struct Account {
    name: String,
    sector: String,
    employees: u32,
    country: String,
}

/// One closed deal as loaded.
struct Deal {
    id: String,
    agent: String,
    account: String,
    won: bool,
    engage_date: String,
    close_date: String,
    /// The product's list price (`products.csv`), the opportunity amount.
    price: String,
    /// Dollars as in the CSV (won deals only).
    close_value: String,
    close_cents: i64,
}

impl Deal {
    /// Open at engage date 09:00 UTC, closed at close date 17:00 UTC.
    fn cycle_days(&self) -> f64 {
        (day_number(&self.close_date) - day_number(&self.engage_date)) as f64 + 8.0 / 24.0
    }

    fn closed_in(&self, from: &str, to: &str) -> bool {
        from <= self.close_date.as_str() && self.close_date.as_str() <= to
    }
}

struct Dataset {
    accounts: Vec<Account>,
    deals: Vec<Deal>,
    agents: BTreeSet<String>,
}

fn load_dataset() -> Dataset {
    let mut repairs: BTreeMap<String, usize> = BTreeMap::new();
    let mut repair = |what: String| *repairs.entry(what).or_default() += 1;

    let accounts: Vec<Account> = read_csv(
        "accounts.csv",
        &[
            "account",
            "sector",
            "year_established",
            "revenue",
            "employees",
            "office_location",
            "subsidiary_of",
        ],
    )
    .into_iter()
    .map(|row| {
        let mut sector = row["sector"].clone();
        if sector == "technolgy" {
            repair("account sector \"technolgy\" -> \"technology\"".into());
            sector = "technology".into();
        }
        let mut country = row["office_location"].clone();
        if country == "Philipines" {
            repair("account country \"Philipines\" -> \"Philippines\"".into());
            country = "Philippines".into();
        }
        Account {
            employees: row["employees"].parse().unwrap_or_else(|_| {
                panic!("employees of {}: {:?}", row["account"], row["employees"])
            }),
            name: row["account"].clone(),
            sector,
            country,
        }
    })
    .collect();
    assert_eq!(accounts.len(), 85, "accounts.csv rows");

    let prices: HashMap<String, String> =
        read_csv("products.csv", &["product", "series", "sales_price"])
            .into_iter()
            .map(|row| (row["product"].clone(), row["sales_price"].clone()))
            .collect();
    assert_eq!(prices.len(), 7, "products.csv rows");

    let agents: BTreeSet<String> = read_csv(
        "sales_teams.csv",
        &["sales_agent", "manager", "regional_office"],
    )
    .into_iter()
    .filter(|row| row["regional_office"] == OFFICE)
    .map(|row| row["sales_agent"].clone())
    .collect();
    assert!(!agents.is_empty(), "no agents in office {OFFICE}");

    let known_accounts: BTreeSet<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    let pipeline = read_csv(
        "sales_pipeline.csv",
        &[
            "opportunity_id",
            "sales_agent",
            "product",
            "account",
            "deal_stage",
            "engage_date",
            "close_date",
            "close_value",
        ],
    );
    assert_eq!(pipeline.len(), 8_800, "sales_pipeline.csv rows");
    let mut deals = Vec::new();
    let mut skipped_open = 0;
    let mut won_at_zero = 0;
    for row in pipeline
        .iter()
        .filter(|row| agents.contains(&row["sales_agent"]))
    {
        let won = match row["deal_stage"].as_str() {
            "Won" => true,
            "Lost" => false,
            "Prospecting" | "Engaging" => {
                skipped_open += 1;
                continue;
            }
            other => panic!("{}: unknown deal_stage {other:?}", row["opportunity_id"]),
        };
        let id = &row["opportunity_id"];
        let mut product = row["product"].as_str();
        if product == "GTXPro" {
            repair("deal product \"GTXPro\" -> \"GTX Pro\"".into());
            product = "GTX Pro";
        }
        let price = prices
            .get(product)
            .unwrap_or_else(|| panic!("{id}: unknown product {product:?}"))
            .clone();
        assert!(
            known_accounts.contains(row["account"].as_str()),
            "{id}: closed deal with unknown account {:?}",
            row["account"]
        );
        for column in ["engage_date", "close_date"] {
            assert!(
                !row[column].is_empty(),
                "{id}: closed deal without {column}"
            );
        }
        assert!(
            row["engage_date"] <= row["close_date"],
            "{id}: closed before it was engaged"
        );
        let close_cents = if won {
            csv_cents(&row["close_value"])
        } else {
            0
        };
        if won && close_cents == 0 {
            won_at_zero += 1;
        }
        deals.push(Deal {
            id: id.clone(),
            agent: row["sales_agent"].clone(),
            account: row["account"].clone(),
            won,
            engage_date: row["engage_date"].clone(),
            close_date: row["close_date"].clone(),
            price,
            close_value: row["close_value"].clone(),
            close_cents,
        });
    }
    eprintln!(
        "maven-crm: {} accounts; office {OFFICE}: {} agents, {} closed deals loaded ({} won, {} lost), \
         {skipped_open} open deals skipped, {won_at_zero} won deals with close value 0",
        accounts.len(),
        agents.len(),
        deals.len(),
        deals.iter().filter(|d| d.won).count(),
        deals.iter().filter(|d| !d.won).count(),
    );
    for (what, rows) in &repairs {
        eprintln!("maven-crm repair: {what} on {rows} rows");
    }
    assert_eq!(won_at_zero, 0, "the dataset has no won deal worth 0");
    let distinct: BTreeSet<&str> = deals.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(distinct.len(), deals.len(), "opportunity ids are unique");
    Dataset {
        accounts,
        deals,
        agents,
    }
}

// --------------------------------------------------------------- loading

fn command_position(what: &str, reply: &Reply, status: u16) -> i64 {
    assert_eq!(reply.status, status, "{what}: {reply:?}");
    reply.body["position"]
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: no position in {reply:?}"))
}

/// Opens, advances and closes one deal, in order; the last command's position.
async fn load_deal(server: &Server, deal: &Deal, account_id: &str) -> i64 {
    let usd = |amount: &str| json!({"amount": amount, "currency": "USD"});
    let engaged_at = format!("{}T09:00:00Z", deal.engage_date);
    let closed_at = format!("{}T17:00:00Z", deal.close_date);
    let opened = server
        .post(
            "/v1/opportunities",
            &json!({
                "account_id": account_id,
                "name": deal.id,
                "amount": usd(&deal.price),
                "expected_close": deal.close_date,
                "owner": deal.agent,
                "stage": "prospecting",
                "occurred_at": engaged_at,
            }),
        )
        .await;
    command_position(&format!("{} open", deal.id), &opened, 201);
    let id = opened.id();
    let advanced = server
        .post(
            &format!("/v1/opportunities/{id}/advance"),
            &json!({"stage": "qualification", "reason": "engaging", "occurred_at": engaged_at}),
        )
        .await;
    command_position(&format!("{} advance", deal.id), &advanced, 200);
    let closed = if deal.won {
        server
            .post(
                &format!("/v1/opportunities/{id}/win"),
                &json!({"close_value": usd(&deal.close_value), "occurred_at": closed_at}),
            )
            .await
    } else {
        server
            .post(
                &format!("/v1/opportunities/{id}/lose"),
                &json!({"reason": "lost", "occurred_at": closed_at}),
            )
            .await
    };
    command_position(&format!("{} close", deal.id), &closed, 200)
}

/// Registers the accounts and loads the deals; the highest log position seen.
async fn load(server: &Server, data: &Dataset) -> i64 {
    let registered: Vec<(String, String, i64)> = futures::stream::iter(&data.accounts)
        .map(|account| async move {
            let reply = server
                .post(
                    "/v1/accounts",
                    &json!({
                        "name": account.name,
                        "kind": "customer",
                        "industry": account.sector,
                        "segment": "b2b",
                        "employees": account.employees,
                        "address": {"country": account.country},
                    }),
                )
                .await;
            let position = command_position(&account.name, &reply, 201);
            (account.name.clone(), reply.id(), position)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut last = registered.iter().map(|(_, _, p)| *p).max().unwrap_or(0);
    let account_ids: HashMap<String, String> = registered
        .into_iter()
        .map(|(name, id, _)| (name, id))
        .collect();
    assert_eq!(
        account_ids.len(),
        data.accounts.len(),
        "account names are unique"
    );

    let positions: Vec<i64> = futures::stream::iter(&data.deals)
        .map(|deal| load_deal(server, deal, &account_ids[&deal.account]))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert_eq!(positions.len(), data.deals.len());
    last = last.max(positions.into_iter().max().unwrap_or(0));
    last
}

// ------------------------------------------------------------- expecting

/// Figures computed here from the CSV rows.
struct Expected {
    won: i64,
    lost: i64,
    won_cents: i64,
    cycles: Vec<f64>,
}

fn expected<'a>(deals: impl Iterator<Item = &'a Deal>) -> Expected {
    let mut figures = Expected {
        won: 0,
        lost: 0,
        won_cents: 0,
        cycles: Vec::new(),
    };
    for deal in deals {
        if deal.won {
            figures.won += 1;
            figures.won_cents += deal.close_cents;
        } else {
            figures.lost += 1;
        }
        figures.cycles.push(deal.cycle_days());
    }
    figures.cycles.sort_by(f64::total_cmp);
    figures
}

fn assert_close(label: &str, what: &str, got: &Value, want: Option<f64>) {
    match want {
        None => assert!(got.is_null(), "{label}: {what} = {got}, expected null"),
        Some(want) => {
            let got = got
                .as_f64()
                .unwrap_or_else(|| panic!("{label}: {what} = {got}, expected {want}"));
            assert!(
                (got - want).abs() < 1e-6,
                "{label}: {what} = {got}, expected {want}"
            );
        }
    }
}

/// The USD entry of a per-currency money list, in ten-thousandths (0 if absent).
fn usd_units(label: &str, list: &Value) -> i128 {
    let list = list
        .as_array()
        .unwrap_or_else(|| panic!("{label}: not a money list: {list}"));
    assert!(
        list.iter().all(|m| m["currency"] == "USD"),
        "{label}: only USD was loaded: {list:?}"
    );
    list.iter()
        .map(|m| ten_thousandths(m["amount"].as_str().expect("amount is a decimal string")))
        .sum()
}

fn stage_entry<'a>(label: &str, list: &'a Value, stage: &str) -> &'a Value {
    list.as_array()
        .and_then(|list| list.iter().find(|entry| entry["stage"] == stage))
        .unwrap_or_else(|| panic!("{label}: no {stage} entry in {list}"))
}

/// Compares one figures object of the API with the figures expected.
fn check_figures(label: &str, got: &Value, want: &Expected) {
    let closed = want.won + want.lost;
    assert_eq!(got["won_count"], want.won, "{label}: won_count in {got}");
    assert_eq!(got["lost_count"], want.lost, "{label}: lost_count in {got}");
    let rate = (closed > 0).then(|| want.won as f64 / closed as f64);
    assert_close(label, "win_rate", &got["win_rate"], rate);
    assert_eq!(
        usd_units(&format!("{label}: won_value"), &got["won_value"]),
        i128::from(want.won_cents) * 100,
        "{label}: won_value {}",
        got["won_value"]
    );
    if want.won > 0 {
        let average = usd_units(&format!("{label}: avg_won_deal"), &got["avg_won_deal"]) as f64;
        let exact = want.won_cents as f64 * 100.0 / want.won as f64;
        assert!(
            (average - exact).abs() <= 0.5,
            "{label}: avg_won_deal {} vs {} cents",
            got["avg_won_deal"],
            exact / 100.0
        );
    }
    let n = want.cycles.len();
    let mean = (n > 0).then(|| want.cycles.iter().sum::<f64>() / n as f64);
    assert_close(label, "avg_cycle_days", &got["avg_cycle_days"], mean);
    let median = match n {
        0 => None,
        n if n % 2 == 1 => Some(want.cycles[n / 2]),
        n => Some((want.cycles[n / 2 - 1] + want.cycles[n / 2]) / 2.0),
    };
    assert_close(
        label,
        "median_cycle_days",
        &got["median_cycle_days"],
        median,
    );
    if closed == 0 {
        return;
    }
    // Every deal entered prospecting and moved on at once to qualification,
    // where it stayed until the close.
    let conversion = &got["stage_conversion"];
    let prospecting = stage_entry(label, conversion, "prospecting");
    assert_eq!(prospecting["entered"], closed, "{label}: {prospecting}");
    assert_eq!(prospecting["advanced"], closed, "{label}: {prospecting}");
    let qualification = stage_entry(label, conversion, "qualification");
    assert_eq!(qualification["entered"], closed, "{label}: {qualification}");
    assert_eq!(
        qualification["advanced"], want.won,
        "{label}: {qualification}"
    );
    let durations = &got["avg_days_in_stage"];
    let prospecting = stage_entry(label, durations, "prospecting");
    assert_eq!(prospecting["visits"], closed, "{label}: {prospecting}");
    assert_close(
        label,
        "prospecting avg_days",
        &prospecting["avg_days"],
        Some(0.0),
    );
    let qualification = stage_entry(label, durations, "qualification");
    assert_eq!(qualification["visits"], closed, "{label}: {qualification}");
    assert_close(
        label,
        "qualification avg_days",
        &qualification["avg_days"],
        mean,
    );
}

// ---------------------------------------------------------------- reading

/// GET that waits out 503s (read model not yet at `min_position`), bounded.
async fn read(server: &Server, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = server.get(path).await;
        if reply.status == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
        return reply.body;
    }
}

async fn analytics(server: &Server, query: &str, position: i64) -> Value {
    read(
        server,
        &format!("/v1/pipeline/analytics?{query}&min_position={position}"),
    )
    .await
}

/// Every opportunity in the records read model, page by page.
async fn all_opportunities(server: &Server, position: i64) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/opportunities?limit=500&min_position={position}");
        if let Some(cursor) = &cursor {
            // Cursors are URL-safe base64.
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = read(server, &path).await;
        items.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return items,
        }
    }
}

// ------------------------------------------------------------------ test

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maven_crm_sample_loads_through_the_api_and_analytics_match_the_csv() {
    let started = Instant::now();
    let data = load_dataset();
    let server = Server::start(Backend::Sqlite).await.unwrap();

    let loading = Instant::now();
    let position = load(&server, &data).await;
    eprintln!(
        "maven-crm: {} commands in {:.1} s, last position {position}",
        data.accounts.len() + 3 * data.deals.len(),
        loading.elapsed().as_secs_f64()
    );

    // No silent drop: every selected row is an opportunity, closed as in the CSV.
    let opportunities = all_opportunities(&server, position).await;
    assert_eq!(
        opportunities.len(),
        data.deals.len(),
        "opportunities listed"
    );
    let listed: BTreeMap<&str, &Value> = opportunities
        .iter()
        .map(|o| (o["name"].as_str().expect("name"), o))
        .collect();
    for deal in &data.deals {
        let record = listed
            .get(deal.id.as_str())
            .unwrap_or_else(|| panic!("{} is missing from /v1/opportunities", deal.id));
        let status = if deal.won { "won" } else { "lost" };
        assert_eq!(record["status"], status, "{}: {record}", deal.id);
        assert_eq!(
            record["owner"],
            deal.agent.as_str(),
            "{}: {record}",
            deal.id
        );
    }

    // Whole range first: it also waits for the pipeline projection.
    let everything = analytics(&server, "group_by=month", position).await;
    check_figures("all closes", &everything, &expected(data.deals.iter()));
    let projections = read(&server, "/v1/projections").await;
    let pipeline = projections["projections"]
        .as_array()
        .and_then(|list| list.iter().find(|p| p["name"] == "pipeline"))
        .unwrap_or_else(|| panic!("no pipeline projection in {projections}"));
    assert_eq!(pipeline["lag"], 0, "{pipeline}");
    assert!(
        pipeline["position"].as_i64() >= Some(position),
        "{pipeline}"
    );

    let months: BTreeSet<&str> = data.deals.iter().map(|d| &d.close_date[..7]).collect();
    let groups = everything["groups"].as_array().expect("groups by month");
    let keys: Vec<&str> = groups.iter().map(|g| g["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        months.iter().copied().collect::<Vec<_>>(),
        "month keys"
    );
    for group in groups {
        let month = group["key"].as_str().unwrap();
        let want = expected(
            data.deals
                .iter()
                .filter(|d| d.close_date.starts_with(month)),
        );
        check_figures(&format!("month {month}"), group, &want);
    }

    // Date ranges (inclusive on both ends), one not on month boundaries.
    for (from, to) in [
        ("2017-01-01", "2017-06-30"),
        ("2017-01-01", "2017-12-31"),
        ("2017-03-15", "2017-04-20"),
        ("2016-01-01", "2016-12-31"),
    ] {
        let got = analytics(&server, &format!("from={from}&to={to}"), position).await;
        let want = expected(data.deals.iter().filter(|d| d.closed_in(from, to)));
        check_figures(&format!("{from}..{to}"), &got, &want);
    }

    // Per owner over 2017.
    let (from, to) = ("2017-01-01", "2017-12-31");
    let got = analytics(
        &server,
        &format!("from={from}&to={to}&group_by=owner"),
        position,
    )
    .await;
    let in_2017: Vec<&Deal> = data
        .deals
        .iter()
        .filter(|d| d.closed_in(from, to))
        .collect();
    let owners: BTreeSet<&str> = in_2017.iter().map(|d| d.agent.as_str()).collect();
    assert!(owners.iter().all(|o| data.agents.contains(*o)));
    let groups = got["groups"].as_array().expect("groups by owner");
    let keys: BTreeSet<&str> = groups.iter().map(|g| g["key"].as_str().unwrap()).collect();
    assert_eq!(keys, owners, "owner keys");
    for group in groups {
        let owner = group["key"].as_str().unwrap();
        let want = expected(in_2017.iter().copied().filter(|d| d.agent == owner));
        check_figures(&format!("2017 owner {owner}"), group, &want);
    }

    // One owner (the busiest of the office), on half a year and on 2017.
    let mut per_agent: BTreeMap<&str, usize> = BTreeMap::new();
    for deal in &data.deals {
        *per_agent.entry(deal.agent.as_str()).or_default() += 1;
    }
    let (owner, _) = per_agent
        .iter()
        .max_by_key(|(agent, count)| (**count, std::cmp::Reverse(**agent)))
        .expect("an agent");
    for (from, to) in [("2017-01-01", "2017-06-30"), ("2017-01-01", "2017-12-31")] {
        let encoded = owner.replace(' ', "%20");
        let got = analytics(
            &server,
            &format!("from={from}&to={to}&owner={encoded}"),
            position,
        )
        .await;
        assert_eq!(got["owner"], *owner, "{got}");
        let want = expected(
            data.deals
                .iter()
                .filter(|d| d.agent == *owner && d.closed_in(from, to)),
        );
        assert!(
            want.won + want.lost > 0,
            "{owner} closed deals in {from}..{to}"
        );
        check_figures(&format!("{owner} {from}..{to}"), &got, &want);
    }

    server.finish().await;
    eprintln!(
        "maven-crm: test done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
