//! The realistic CRM command mix: each load client owns its contacts, deals
//! and cases and moves them through their life cycles (captures, activity
//! logging, stage advances, case traffic), drawing accounts, agents and
//! prices from the Maven sample.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

use crate::dataset::Dataset;
use crate::server::Target;

const OPEN_STAGES: [&str; 4] = ["prospecting", "qualification", "proposal", "negotiation"];

/// One HTTP command: method, path and JSON body.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub body: Value,
    /// What the client learns when it is acknowledged.
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    NewContact,
    NewDeal,
    NewCase,
    DealMoved(usize),
    CaseMoved(usize),
    Other,
}

/// An acknowledged command: what it cost and where it landed in the log.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub latency: Duration,
    pub position: i64,
    pub acked_at: Instant,
}

/// The accounts registered for the run (shared by all clients) and the data.
pub struct World {
    pub data: Dataset,
    pub account_ids: Vec<String>,
}

impl World {
    /// Registers every sample account through the API.
    pub async fn register(server: &Target, data: Dataset) -> anyhow::Result<Arc<World>> {
        let mut account_ids = Vec::with_capacity(data.accounts.len());
        for account in &data.accounts {
            let body = json!({
                "name": account.name,
                "kind": "customer",
                "industry": account.sector,
                "segment": "b2b",
                "employees": account.employees,
                "address": {"country": account.office_location},
            });
            let reply = send(server, &Method::POST, "/v1/accounts", &body).await?;
            account_ids.push(id_of(&reply)?);
        }
        Ok(Arc::new(World { data, account_ids }))
    }
}

/// A load client's own records and random source.
pub struct Client {
    world: Arc<World>,
    rng: SmallRng,
    contacts: Vec<String>,
    /// Open deals and the index of their stage in [`OPEN_STAGES`].
    deals: Vec<(String, usize)>,
    /// Open cases and how far they went (0 open, 1 assigned, 2 commented).
    cases: Vec<(String, usize)>,
    sent: u64,
}

impl Client {
    pub fn new(world: Arc<World>, seed: u64) -> Self {
        Self {
            world,
            rng: SmallRng::seed_from_u64(seed),
            contacts: Vec::new(),
            deals: Vec::new(),
            cases: Vec::new(),
            sent: 0,
        }
    }

    /// Sends the next command of the mix; the acknowledgement, or why it failed.
    pub async fn step(&mut self, server: &Target) -> anyhow::Result<Ack> {
        let request = self.next_request();
        let started = Instant::now();
        let reply = send(server, &request.method, &request.path, &request.body).await;
        let acked_at = Instant::now();
        let reply = reply?;
        self.learn(request.kind, &reply)?;
        self.sent += 1;
        Ok(Ack {
            latency: acked_at - started,
            position: reply["position"]
                .as_i64()
                .context("no position in the reply")?,
            acked_at,
        })
    }

    /// Picks by weight (per 100 commands): activity 30, deal moves 20,
    /// captures 10, new deals 10, case traffic 12, new cases 8, new contacts
    /// 5, deal updates 5. A pick whose record does not exist yet creates one.
    fn next_request(&mut self) -> Request {
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=29 if !self.contacts.is_empty() => self.log_activity(),
            30..=49 if !self.deals.is_empty() => self.move_deal(),
            50..=59 => self.capture_lead(),
            60..=69 => self.open_deal(),
            70..=81 if !self.cases.is_empty() => self.move_case(),
            82..=89 if !self.contacts.is_empty() => self.open_case(),
            90..=94 if !self.deals.is_empty() => self.update_deal(),
            _ if self.contacts.len() < 3 || roll >= 95 => self.new_contact(),
            _ => self.open_deal(),
        }
    }

    fn account(&mut self) -> String {
        let index = self.rng.gen_range(0..self.world.account_ids.len());
        self.world.account_ids[index].clone()
    }

    fn agent(&mut self) -> String {
        let index = self.rng.gen_range(0..self.world.data.agents.len());
        self.world.data.agents[index].name.clone()
    }

    fn price(&mut self) -> Value {
        let index = self.rng.gen_range(0..self.world.data.products.len());
        let price = self.world.data.products[index].sales_price;
        json!({"amount": format!("{price}.00"), "currency": "USD"})
    }

    fn pick<T: Clone>(rng: &mut SmallRng, items: &[T]) -> (usize, T) {
        let index = rng.gen_range(0..items.len());
        (index, items[index].clone())
    }

    fn new_contact(&mut self) -> Request {
        let n = self.sent;
        let account = self.account();
        post(
            "/v1/contacts",
            json!({"account_id": account, "name": format!("Contact {n}"), "email": format!("contact{n}@example.com")}),
            Kind::NewContact,
        )
    }

    fn log_activity(&mut self) -> Request {
        let (_, contact) = Self::pick(&mut self.rng, &self.contacts);
        let kind = ["call", "email", "meeting", "note"][self.rng.gen_range(0..4)];
        post(
            &format!("/v1/contacts/{contact}/activities"),
            json!({"kind": kind, "subject": format!("{kind} about the renewal"), "duration_minutes": 15}),
            Kind::Other,
        )
    }

    fn capture_lead(&mut self) -> Request {
        let n = self.sent;
        let (_, account) = Self::pick(&mut self.rng, &self.world.data.accounts);
        post(
            "/v1/leads",
            json!({"name": format!("Lead {n}"), "company": account.name, "email": format!("lead{n}@example.com"), "source": "web_form"}),
            Kind::Other,
        )
    }

    fn open_deal(&mut self) -> Request {
        let account = self.account();
        let owner = self.agent();
        let amount = self.price();
        post(
            "/v1/opportunities",
            json!({"account_id": account, "name": format!("Deal {}", self.sent), "amount": amount,
                   "expected_close": "2027-06-30", "owner": owner, "stage": OPEN_STAGES[0]}),
            Kind::NewDeal,
        )
    }

    fn move_deal(&mut self) -> Request {
        let (index, (deal, stage)) = Self::pick(&mut self.rng, &self.deals);
        if stage + 1 < OPEN_STAGES.len() {
            return post(
                &format!("/v1/opportunities/{deal}/advance"),
                json!({"stage": OPEN_STAGES[stage + 1]}),
                Kind::DealMoved(index),
            );
        }
        if self.rng.gen_bool(0.5) {
            let value = self.price();
            post(
                &format!("/v1/opportunities/{deal}/win"),
                json!({"close_value": value}),
                Kind::DealMoved(index),
            )
        } else {
            post(
                &format!("/v1/opportunities/{deal}/lose"),
                json!({"reason": "price", "competitor": "Globex"}),
                Kind::DealMoved(index),
            )
        }
    }

    fn update_deal(&mut self) -> Request {
        let (_, (deal, _)) = Self::pick(&mut self.rng, &self.deals);
        let amount = self.price();
        Request {
            method: Method::PATCH,
            path: format!("/v1/opportunities/{deal}"),
            body: json!({"amount": amount}),
            kind: Kind::Other,
        }
    }

    fn open_case(&mut self) -> Request {
        let (_, contact) = Self::pick(&mut self.rng, &self.contacts);
        post(
            "/v1/cases",
            json!({"contact_id": contact, "subject": "Export fails", "priority": "normal", "channel": "email"}),
            Kind::NewCase,
        )
    }

    fn move_case(&mut self) -> Request {
        let (index, (case, step)) = Self::pick(&mut self.rng, &self.cases);
        let agent = self.agent();
        let (path, body) = match step {
            0 => (
                format!("/v1/cases/{case}/assign"),
                json!({"assignee": agent}),
            ),
            1 => (
                format!("/v1/cases/{case}/comment"),
                json!({"body": "Looking into it", "public": true}),
            ),
            _ => (
                format!("/v1/cases/{case}/resolve"),
                json!({"resolution": "Fixed in 4.2"}),
            ),
        };
        post(&path, body, Kind::CaseMoved(index))
    }

    fn learn(&mut self, kind: Kind, reply: &Value) -> anyhow::Result<()> {
        match kind {
            Kind::NewContact => self.contacts.push(id_of(reply)?),
            Kind::NewDeal => self.deals.push((id_of(reply)?, 0)),
            Kind::NewCase => self.cases.push((id_of(reply)?, 0)),
            Kind::DealMoved(index) => {
                let stage = &mut self.deals[index].1;
                *stage += 1;
                if *stage >= OPEN_STAGES.len() {
                    self.deals.swap_remove(index);
                }
            }
            Kind::CaseMoved(index) => {
                let step = &mut self.cases[index].1;
                *step += 1;
                if *step > 2 {
                    self.cases.swap_remove(index);
                }
            }
            Kind::Other => {}
        }
        Ok(())
    }
}

fn post(path: &str, body: Value, kind: Kind) -> Request {
    Request {
        method: Method::POST,
        path: path.to_string(),
        body,
        kind,
    }
}

fn id_of(reply: &Value) -> anyhow::Result<String> {
    reply["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no id in {reply}"))
}

/// Sends one command with a fresh idempotency key, as a real client does; a
/// non-2xx answer is an error carrying the problem document.
pub async fn send(
    server: &Target,
    method: &Method,
    path: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let response = server
        .http
        .request(method.clone(), server.url(path))
        .bearer_auth(&server.token)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(body)
        .send()
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = response.status();
    let reply: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{method} {path}: {status} {reply}");
    }
    Ok(reply)
}
