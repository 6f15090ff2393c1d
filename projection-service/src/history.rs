//! Customer history: a timeline entry for every interaction and change that
//! concerns an account or a contact (activities, tasks, detail changes,
//! opportunity moves, cases and their comments, lead conversions), and the
//! 360 summary of an account. Small lookup tables (accounts, contacts,
//! opportunities, cases, activities, leads) attach each event to its
//! account/contact and feed the summary.

use std::collections::BTreeMap;

use crm_domain::account::AccountEvent;
use crm_domain::case::CaseEvent;
use crm_domain::contact::ContactEvent;
use crm_domain::lead::LeadEvent;
use crm_domain::opportunity::OpportunityEvent;
use crm_domain::values::ActivityKind;
use crm_domain::FieldChange;
use crm_eventlog::RecordedEvent;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use crate::lookups::{self, Cell, Kind, Lookups, ReadRows, Table, Wanted};
use crate::projection::{
    apply_as_batch, decode, BatchError, Carried, Placeholders, Projection, ProjectionError, Tables,
    Tx,
};
use crate::readdb::{timestamp, ReadDb};
use crate::records::paging::{
    decode_cursor, encode_cursor, json_text, json_text_ref, page_limit, Binds,
};
pub use crate::records::paging::{Page, QueryError};
use crate::rows::{json_into, write_all, Field, RowSet};

/// Name of the projection (and prefix of its tables).
pub const NAME: &str = "history";
const CURSOR_TAG: &str = "h1";
/// Timeline entry kinds.
pub const KINDS: [&str; 6] = [
    "activity",
    "opportunity",
    "case",
    "lead",
    "account",
    "contact",
];
/// Activity kinds that count as contact with the customer (for "last contact").
pub const CONTACT_ACTIVITY_KINDS: [&str; 3] = ["call", "email", "meeting"];

/// The customer-history projection.
#[derive(Debug, Default, Clone, Copy)]
pub struct HistoryProjection;

/// One timeline entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimelineEntry {
    pub position: i64,
    pub occurred_at: String,
    /// activity | opportunity | case | lead | account | contact
    pub kind: String,
    pub event_type: String,
    pub stream_type: String,
    pub stream_id: String,
    pub account_id: Option<String>,
    pub contact_id: Option<String>,
    pub summary: String,
    pub actor: Option<String>,
    /// The event's payload (without `type`), plus names looked up for it.
    pub details: Value,
}

/// `GET /v1/customers/{account_id}/history` (or a contact's timeline).
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TimelineQuery {
    /// Exactly one of `account_id` / `contact_id` (set from the route).
    pub account_id: Option<String>,
    pub contact_id: Option<String>,
    /// One kind or a comma-separated list (activity, opportunity, case, lead, account, contact).
    pub kind: Option<String>,
    pub cursor: Option<String>,
    /// Default 50, at most 500.
    pub limit: Option<i64>,
}

/// Money per currency, formatted as in every other view.
pub use crate::money::MoneyView as MoneyTotal;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContactRef {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenOpportunities {
    pub count: i64,
    /// Sum of open amounts per currency (sorted by currency).
    pub amount: Vec<MoneyTotal>,
}

/// The latest call, email or meeting with the account's contacts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastContact {
    pub activity_id: String,
    pub at: String,
    /// call | email | meeting
    pub kind: String,
    pub subject: String,
    /// Who logged it.
    pub by: Option<String>,
    pub contact_id: String,
    pub contact_name: Option<String>,
}

/// The open task with the earliest date.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NextTask {
    pub activity_id: String,
    pub due_at: String,
    pub subject: String,
    pub contact_id: String,
    pub contact_name: Option<String>,
    /// Who logged it.
    pub by: Option<String>,
}

/// `GET /v1/customers/{account_id}`: the 360 view of an account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CustomerSummary {
    pub account_id: String,
    pub name: String,
    pub kind: String,
    pub owner: Option<String>,
    pub industry: Option<String>,
    pub archived: bool,
    /// Contacts currently linked to the account, by name.
    pub contacts: Vec<ContactRef>,
    pub open_opportunities: OpenOpportunities,
    pub won_count: i64,
    /// Close value of won opportunities to date, per currency.
    pub won_value: Vec<MoneyTotal>,
    /// Open or assigned cases.
    pub open_cases: i64,
    pub last_contact: Option<LastContact>,
    pub next_task: Option<NextTask>,
}

// ------------------------------------------------------------------ queries

const ENTRY_COLUMNS: &str = "position, occurred_at, kind, event_type, stream_type, stream_id, account_id, contact_id, summary, actor, details";

fn entry_from_row(row: &AnyRow) -> Result<TimelineEntry, QueryError> {
    let details: String = row.try_get("details")?;
    Ok(TimelineEntry {
        position: row.try_get("position")?,
        occurred_at: row.try_get("occurred_at")?,
        kind: row.try_get("kind")?,
        event_type: row.try_get("event_type")?,
        stream_type: row.try_get("stream_type")?,
        stream_id: row.try_get("stream_id")?,
        account_id: row.try_get("account_id")?,
        contact_id: row.try_get("contact_id")?,
        summary: row.try_get("summary")?,
        actor: row.try_get("actor")?,
        details: serde_json::from_str(&details).unwrap_or(Value::Null),
    })
}

fn given(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// The timeline of one account or contact, newest first (occurred_at, then
/// position, descending), optionally only some kinds.
pub async fn timeline(
    db: &ReadDb,
    tables: &Tables,
    query: &TimelineQuery,
) -> Result<Page<TimelineEntry>, QueryError> {
    let limit = page_limit(query.limit)?;
    let mut b = Binds::default();
    let subject = match (given(&query.account_id), given(&query.contact_id)) {
        (Some(account), None) => format!("account_id = {}", b.text(account)),
        (None, Some(contact)) => format!("contact_id = {}", b.text(contact)),
        _ => {
            return Err(QueryError::invalid(
                "account_id",
                "exactly one of account_id and contact_id is required",
            ))
        }
    };
    let mut sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM {} WHERE {subject}",
        tables.t("entries")
    );
    if let Some(kinds) = given(&query.kind) {
        let mut placeholders = Vec::new();
        for kind in kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            if !KINDS.contains(&kind) {
                return Err(QueryError::invalid(
                    "kind",
                    format!("unknown kind '{kind}'; allowed: {}", KINDS.join(", ")),
                ));
            }
            placeholders.push(b.text(kind));
        }
        if !placeholders.is_empty() {
            sql.push_str(&format!(" AND kind IN ({})", placeholders.join(", ")));
        }
    }
    if let Some(cursor) = given(&query.cursor) {
        let key = decode_cursor(CURSOR_TAG, &cursor)?;
        let bad = || QueryError::invalid("cursor", "is not a cursor of this list");
        let (at, position) = key.rsplit_once('|').ok_or_else(bad)?;
        let position: i64 = position.parse().map_err(|_| bad())?;
        sql.push_str(&format!(
            " AND (occurred_at < {} OR (occurred_at = {} AND position < {}))",
            b.text(at),
            b.text(at),
            b.int(position)
        ));
    }
    sql.push_str(&format!(
        " ORDER BY occurred_at DESC, position DESC LIMIT {}",
        b.int(limit + 1)
    ));
    let rows = b.apply(&sql).fetch_all(&db.pool).await?;
    let mut items = rows
        .iter()
        .map(entry_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items
            .last()
            .map(|e| encode_cursor(CURSOR_TAG, &format!("{}|{}", e.occurred_at, e.position)))
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

fn add_money(
    totals: &mut BTreeMap<String, Decimal>,
    amount: Option<String>,
    currency: Option<String>,
) {
    if let (Some(amount), Some(currency)) = (amount, currency) {
        if let Ok(amount) = amount.parse::<Decimal>() {
            *totals.entry(currency).or_default() += amount;
        }
    }
}

fn money_totals(totals: BTreeMap<String, Decimal>) -> Vec<MoneyTotal> {
    crate::money::Totals::from(totals).views()
}

/// The 360 summary of an account; `None` when the account was never registered.
pub async fn summary(
    db: &ReadDb,
    tables: &Tables,
    account_id: &str,
) -> Result<Option<CustomerSummary>, QueryError> {
    let account_id = account_id.trim().to_string();
    let Some(account) = sqlx::query(&format!(
        "SELECT name, kind, owner, industry, archived FROM {} WHERE account_id = $1",
        tables.t("accounts")
    ))
    .bind(account_id.clone())
    .fetch_optional(&db.pool)
    .await?
    else {
        return Ok(None);
    };

    let contacts = sqlx::query(&format!(
        "SELECT contact_id, name, email FROM {} WHERE account_id = $1 ORDER BY name, contact_id",
        tables.t("contacts")
    ))
    .bind(account_id.clone())
    .fetch_all(&db.pool)
    .await?
    .iter()
    .map(|row| {
        Ok(ContactRef {
            id: row.try_get("contact_id")?,
            name: row.try_get("name")?,
            email: row.try_get("email")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;

    let mut open_count = 0;
    let mut won_count = 0;
    let mut open_amount = BTreeMap::new();
    let mut won_value = BTreeMap::new();
    for row in sqlx::query(&format!(
        "SELECT status, amount, currency, close_amount, close_currency FROM {} WHERE account_id = $1",
        tables.t("opportunities")
    ))
    .bind(account_id.clone())
    .fetch_all(&db.pool)
    .await?
    {
        let status: String = row.try_get("status")?;
        match status.as_str() {
            "open" => {
                open_count += 1;
                add_money(&mut open_amount, row.try_get("amount")?, row.try_get("currency")?);
            }
            "won" => {
                won_count += 1;
                add_money(
                    &mut won_value,
                    row.try_get("close_amount")?,
                    row.try_get("close_currency")?,
                );
            }
            _ => {}
        }
    }

    let open_cases: i64 = sqlx::query(&format!(
        "SELECT COUNT(*) AS n FROM {} WHERE account_id = $1 AND status IN ('open', 'assigned')",
        tables.t("cases")
    ))
    .bind(account_id.clone())
    .fetch_one(&db.pool)
    .await?
    .try_get("n")?;

    let activities = tables.t("activities");
    let contacts_table = tables.t("contacts");
    let kinds = CONTACT_ACTIVITY_KINDS
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let last_contact = sqlx::query(&format!(
        "SELECT a.activity_id, a.occurred_at, a.kind, a.subject, a.actor, a.contact_id, c.name AS contact_name
         FROM {activities} a LEFT JOIN {contacts_table} c ON c.contact_id = a.contact_id
         WHERE a.account_id = $1 AND a.kind IN ({kinds})
         ORDER BY a.occurred_at DESC, a.position DESC LIMIT 1"
    ))
    .bind(account_id.clone())
    .fetch_optional(&db.pool)
    .await?
    .map(|row| {
        Ok::<_, sqlx::Error>(LastContact {
            activity_id: row.try_get("activity_id")?,
            at: row.try_get("occurred_at")?,
            kind: row.try_get("kind")?,
            subject: row.try_get("subject")?,
            by: row.try_get("actor")?,
            contact_id: row.try_get("contact_id")?,
            contact_name: row.try_get("contact_name")?,
        })
    })
    .transpose()?;

    let next_task = sqlx::query(&format!(
        "SELECT a.activity_id, a.occurred_at, a.subject, a.actor, a.contact_id, c.name AS contact_name
         FROM {activities} a LEFT JOIN {contacts_table} c ON c.contact_id = a.contact_id
         WHERE a.account_id = $1 AND a.task_status = 'open'
         ORDER BY a.occurred_at ASC, a.position ASC LIMIT 1"
    ))
    .bind(account_id.clone())
    .fetch_optional(&db.pool)
    .await?
    .map(|row| {
        Ok::<_, sqlx::Error>(NextTask {
            activity_id: row.try_get("activity_id")?,
            due_at: row.try_get("occurred_at")?,
            subject: row.try_get("subject")?,
            by: row.try_get("actor")?,
            contact_id: row.try_get("contact_id")?,
            contact_name: row.try_get("contact_name")?,
        })
    })
    .transpose()?;

    Ok(Some(CustomerSummary {
        account_id,
        name: account.try_get("name")?,
        kind: account.try_get("kind")?,
        owner: account.try_get("owner")?,
        industry: account.try_get("industry")?,
        archived: account.try_get::<i64, _>("archived")? != 0,
        contacts,
        open_opportunities: OpenOpportunities {
            count: open_count,
            amount: money_totals(open_amount),
        },
        won_count,
        won_value: money_totals(won_value),
        open_cases,
        last_contact,
        next_task,
    }))
}

// ---------------------------------------------------------------- the fold

#[async_trait::async_trait]
impl Projection for HistoryProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> i64 {
        1
    }

    fn schema(&self, tables: &Tables) -> Vec<String> {
        let entries = tables.t("entries");
        let activities = tables.t("activities");
        let ix = |name: &str, on: String| {
            format!("CREATE INDEX IF NOT EXISTS {} ON {on}", tables.t(name))
        };
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {entries} (
                    position BIGINT PRIMARY KEY,
                    occurred_at TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    event_type TEXT NOT NULL,
                    stream_type TEXT NOT NULL,
                    stream_id TEXT NOT NULL,
                    account_id TEXT,
                    contact_id TEXT,
                    summary TEXT NOT NULL,
                    actor TEXT,
                    details TEXT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    account_id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    owner TEXT,
                    industry TEXT,
                    archived BIGINT NOT NULL)",
                tables.t("accounts")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    contact_id TEXT PRIMARY KEY,
                    account_id TEXT,
                    name TEXT NOT NULL,
                    email TEXT)",
                tables.t("contacts")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    opportunity_id TEXT PRIMARY KEY,
                    account_id TEXT NOT NULL,
                    name TEXT NOT NULL,
                    status TEXT NOT NULL,
                    amount TEXT,
                    currency TEXT,
                    close_amount TEXT,
                    close_currency TEXT)",
                tables.t("opportunities")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    case_id TEXT PRIMARY KEY,
                    account_id TEXT,
                    contact_id TEXT,
                    subject TEXT NOT NULL,
                    status TEXT NOT NULL)",
                tables.t("cases")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {activities} (
                    activity_id TEXT PRIMARY KEY,
                    contact_id TEXT NOT NULL,
                    account_id TEXT,
                    kind TEXT NOT NULL,
                    subject TEXT NOT NULL,
                    occurred_at TEXT NOT NULL,
                    actor TEXT,
                    task_status TEXT,
                    position BIGINT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    lead_id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    company TEXT)",
                tables.t("leads")
            ),
            ix(
                "entries_account_ix",
                format!("{entries} (account_id, occurred_at, position)"),
            ),
            ix(
                "entries_contact_ix",
                format!("{entries} (contact_id, occurred_at, position)"),
            ),
            ix(
                "activities_account_ix",
                format!("{activities} (account_id, occurred_at, position)"),
            ),
            ix(
                "contacts_account_ix",
                format!("{} (account_id)", tables.t("contacts")),
            ),
            ix(
                "opportunities_account_ix",
                format!("{} (account_id)", tables.t("opportunities")),
            ),
            ix(
                "cases_account_ix",
                format!("{} (account_id)", tables.t("cases")),
            ),
        ]
    }

    fn table_names(&self) -> Vec<&'static str> {
        vec![
            "entries",
            "accounts",
            "contacts",
            "opportunities",
            "cases",
            "activities",
            "leads",
        ]
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        apply_as_batch(self, tx, tables, event).await
    }

    /// Lookup rows are held in memory for the batch (read ahead, a few
    /// statements per table) and written back at its end; timeline entries,
    /// which folding never reads back, are written at the end too, all in
    /// multi-row statements.
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        let mut lookups = Lookups::new(tables, Placeholders::of(tx));
        read_ahead(tx, &mut lookups, events).await?;
        let entries = fold_entries(tx, &mut lookups, tables, events).await?;
        let mut rows = lookups.changed_rows();
        rows.push(entries);
        write_all(tx, &rows).await.map_err(BatchError::whole_batch)
    }

    fn rebuilds_to_rows(&self) -> bool {
        true
    }

    fn rebuild_reads(&self, events: &[RecordedEvent]) -> Wanted {
        lookup_keys(events)
    }

    /// As [`apply_batch`](Self::apply_batch), the lookup rows carried from
    /// batch to batch ([`Lookups::next_batch`]) and the rest read ahead by
    /// the rebuild's writer ([`Self::rebuild_reads`]).
    async fn rebuild_rows(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[RecordedEvent],
        read: Vec<ReadRows>,
        carried: &mut Carried,
    ) -> Result<Vec<RowSet>, BatchError> {
        let lookups = carried
            .get_or_insert_with(|| {
                Box::new(Lookups::new(tables, Placeholders::of_connection(conn)))
            })
            .downcast_mut::<Lookups>()
            .ok_or_else(|| {
                BatchError::whole_batch(ProjectionError::Invalid(
                    "history carried something other than its lookups".into(),
                ))
            })?;
        lookups.next_batch();
        lookups.hold(read);
        let entries = fold_entries(conn, lookups, tables, events).await?;
        let mut rows = lookups.changed_rows();
        rows.push(entries);
        Ok(rows)
    }
}

/// Reads ahead, through `conn`, the rows of [`lookup_keys`] that `lookups`
/// does not hold.
async fn read_ahead(
    conn: &mut AnyConnection,
    lookups: &mut Lookups,
    events: &[RecordedEvent],
) -> Result<(), BatchError> {
    lookups
        .read_ahead_all(conn, lookup_keys(events))
        .await
        .map_err(BatchError::whole_batch)
}

/// Folds `events` through `lookups` (reading through `conn`, at first use,
/// what they do not hold); the timeline entries they add.
async fn fold_entries(
    conn: &mut AnyConnection,
    lookups: &mut Lookups,
    tables: &Tables,
    events: &[RecordedEvent],
) -> Result<RowSet, BatchError> {
    let mut entries = RowSet::new(
        tables.t("entries"),
        &ENTRY_ROW,
        "ON CONFLICT (position) DO NOTHING".into(),
        ENTRIES_PER_INSERT,
    );
    entries.reserve(events.len(), ENTRY_TEXT);
    let mut details = String::new();
    for (index, event) in events.iter().enumerate() {
        let entry = entry_for(conn, lookups, event)
            .await
            .map_err(BatchError::at(index))?;
        let Some(entry) = entry else {
            continue;
        };
        json_into(&mut details, &entry.details);
        let actor = json_text_ref(event.metadata.get("actor"));
        entries.push([
            Field::Int(event.position),
            Field::Text(&entry.occurred_at),
            Field::Text(entry.kind),
            Field::Text(&event.event_type),
            Field::Text(&event.stream_type),
            Field::Text(&event.stream_id),
            entry.account_id.as_deref().into(),
            entry.contact_id.as_deref().into(),
            Field::Text(&entry.summary),
            actor.as_deref().into(),
            Field::Text(&details),
        ]);
    }
    Ok(entries)
}

static ENTRY_ROW: [(&str, Kind); 11] = [
    ("position", Kind::Int),
    ("occurred_at", Kind::Text),
    ("kind", Kind::Text),
    ("event_type", Kind::Text),
    ("stream_type", Kind::Text),
    ("stream_id", Kind::Text),
    ("account_id", Kind::Text),
    ("contact_id", Kind::Text),
    ("summary", Kind::Text),
    ("actor", Kind::Text),
    ("details", Kind::Text),
];

/// Bytes of text per timeline entry reserved up front.
const ENTRY_TEXT: usize = 400;

/// Timeline entries per multi-row insert (11 parameters each).
const ENTRIES_PER_INSERT: usize = 50;

static LEADS: Table = Table {
    base: "leads",
    columns: &[
        ("lead_id", Kind::Text),
        ("name", Kind::Text),
        ("company", Kind::Text),
    ],
};
static ACCOUNTS: Table = Table {
    base: "accounts",
    columns: &[
        ("account_id", Kind::Text),
        ("name", Kind::Text),
        ("kind", Kind::Text),
        ("owner", Kind::Text),
        ("industry", Kind::Text),
        ("archived", Kind::Int),
    ],
};
static CONTACTS: Table = Table {
    base: "contacts",
    columns: &[
        ("contact_id", Kind::Text),
        ("account_id", Kind::Text),
        ("name", Kind::Text),
        ("email", Kind::Text),
    ],
};
static OPPORTUNITIES: Table = Table {
    base: "opportunities",
    columns: &[
        ("opportunity_id", Kind::Text),
        ("account_id", Kind::Text),
        ("name", Kind::Text),
        ("status", Kind::Text),
        ("amount", Kind::Text),
        ("currency", Kind::Text),
        ("close_amount", Kind::Text),
        ("close_currency", Kind::Text),
    ],
};
static CASES: Table = Table {
    base: "cases",
    columns: &[
        ("case_id", Kind::Text),
        ("account_id", Kind::Text),
        ("contact_id", Kind::Text),
        ("subject", Kind::Text),
        ("status", Kind::Text),
    ],
};
static ACTIVITIES: Table = Table {
    base: "activities",
    columns: &[
        ("activity_id", Kind::Text),
        ("contact_id", Kind::Text),
        ("account_id", Kind::Text),
        ("kind", Kind::Text),
        ("subject", Kind::Text),
        ("occurred_at", Kind::Text),
        ("actor", Kind::Text),
        ("task_status", Kind::Text),
        ("position", Kind::Int),
    ],
};

/// The lookup rows a batch will ask for, by table: each event's own stream's
/// row, the activity a contact event names and the contact a case names.
/// Only a saving: a row not named here is read when first asked for.
fn lookup_keys(events: &[RecordedEvent]) -> Wanted {
    let mut keys: Vec<(&'static Table, Vec<String>)> = [
        &LEADS,
        &ACCOUNTS,
        &CONTACTS,
        &OPPORTUNITIES,
        &CASES,
        &ACTIVITIES,
    ]
    .into_iter()
    .map(|table| (table, Vec::new()))
    .collect();
    let mut add = |table: &'static Table, key: Option<String>| {
        if let (Some(key), Some((_, list))) =
            (key, keys.iter_mut().find(|(t, _)| std::ptr::eq(*t, table)))
        {
            list.push(key);
        }
    };
    for event in events {
        let own = Some(event.stream_id.clone());
        let named = |field: &str| json_text(event.payload.get(field));
        match event.stream_type.as_str() {
            "lead" => add(&LEADS, own),
            "account" => add(&ACCOUNTS, own),
            "contact" => {
                add(&CONTACTS, own);
                add(&ACTIVITIES, named("activity_id"));
            }
            "opportunity" => add(&OPPORTUNITIES, own),
            "case" => {
                add(&CASES, own);
                add(&CONTACTS, named("contact_id"));
            }
            _ => {}
        }
    }
    keys
}

/// Updates the lookup rows for `event`; the timeline entry it adds, if any.
async fn entry_for(
    conn: &mut AnyConnection,
    lookups: &mut Lookups,
    event: &RecordedEvent,
) -> Result<Option<NewEntry>, ProjectionError> {
    let mut fold = Fold {
        conn,
        lookups,
        event,
    };
    match event.stream_type.as_str() {
        "lead" => fold.lead().await,
        "account" => fold.account().await,
        "contact" => fold.contact().await,
        "opportunity" => fold.opportunity().await,
        "case" => fold.case().await,
        _ => Ok(None),
    }
}

/// What an event adds to the timeline.
struct NewEntry {
    kind: &'static str,
    account_id: Option<String>,
    contact_id: Option<String>,
    occurred_at: String,
    summary: String,
    details: Value,
}

/// One event being folded.
struct Fold<'a> {
    conn: &'a mut AnyConnection,
    lookups: &'a mut Lookups,
    event: &'a RecordedEvent,
}

fn occurred(at: &chrono::DateTime<chrono::Utc>) -> String {
    timestamp(at)
}

fn fields(changes: &[FieldChange]) -> String {
    changes
        .iter()
        .map(|c| c.field.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn new_text(changes: &[FieldChange], field: &str) -> Option<Option<String>> {
    changes
        .iter()
        .find(|c| c.field == field)
        .map(|c| json_text(Some(&c.new)))
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl Fold<'_> {
    fn details(&self) -> Value {
        let mut details = self.event.payload.clone();
        if let Some(object) = details.as_object_mut() {
            object.remove("type");
        }
        details
    }

    fn entry(
        &self,
        kind: &'static str,
        account_id: Option<String>,
        contact_id: Option<String>,
        at: &chrono::DateTime<chrono::Utc>,
        summary: String,
    ) -> Option<NewEntry> {
        Some(NewEntry {
            kind,
            account_id,
            contact_id,
            occurred_at: occurred(at),
            summary,
            details: self.details(),
        })
    }

    /// One lookup row by key.
    async fn row(
        &mut self,
        table: &'static Table,
        id: &str,
    ) -> Result<Option<lookups::Row>, sqlx::Error> {
        Ok(self.lookups.get(self.conn, table, id).await?.cloned())
    }

    /// A text column of a lookup row (None if the row or value is missing).
    async fn column(
        &mut self,
        table: &'static Table,
        id: &str,
        column: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        Ok(self
            .lookups
            .get(self.conn, table, id)
            .await?
            .and_then(|row| row.text(column)))
    }

    /// Creates the row or sets these columns of it.
    async fn upsert(
        &mut self,
        table: &'static Table,
        id: &str,
        cells: &[(&str, Cell)],
    ) -> Result<(), sqlx::Error> {
        self.lookups.upsert(self.conn, table, id, cells).await
    }

    /// Sets these columns of the row, if there is one.
    async fn update(
        &mut self,
        table: &'static Table,
        id: &str,
        cells: &[(&str, Cell)],
    ) -> Result<(), sqlx::Error> {
        self.lookups.update(self.conn, table, id, cells).await
    }

    async fn lead(&mut self) -> Result<Option<NewEntry>, ProjectionError> {
        let id = self.event.stream_id.clone();
        match decode::<LeadEvent>(self.event)? {
            LeadEvent::LeadCaptured { name, company, .. } => {
                self.upsert(
                    &LEADS,
                    &id,
                    &[("name", name.into()), ("company", company.into())],
                )
                .await?;
                Ok(None)
            }
            LeadEvent::LeadQualified { .. } | LeadEvent::LeadDisqualified { .. } => Ok(None),
            LeadEvent::LeadConverted {
                account_id,
                account_created,
                contact_id,
                opportunity_id,
                occurred_at,
                ..
            } => {
                let lead = self.row(&LEADS, &id).await?;
                let name = lead.as_ref().and_then(|r| r.text("name"));
                let company = lead.as_ref().and_then(|r| r.text("company"));
                let who = match (&name, &company) {
                    (Some(n), Some(c)) => format!("{n} ({c})"),
                    (Some(n), None) => n.clone(),
                    _ => id.clone(),
                };
                let mut summary = format!("Lead {who} converted");
                if opportunity_id.is_some() {
                    summary.push_str(" with an opportunity");
                }
                let mut entry = self.entry(
                    "lead",
                    Some(account_id.to_string()),
                    Some(contact_id.to_string()),
                    &occurred_at,
                    summary,
                );
                if let Some(e) = entry.as_mut() {
                    e.details["lead_id"] = json!(id);
                    e.details["lead_name"] = json!(name);
                    e.details["lead_company"] = json!(company);
                    e.details["account_created"] = json!(account_created);
                }
                Ok(entry)
            }
        }
    }

    async fn account(&mut self) -> Result<Option<NewEntry>, ProjectionError> {
        let id = self.event.stream_id.clone();
        let some_id = Some(id.clone());
        Ok(match decode::<AccountEvent>(self.event)? {
            AccountEvent::AccountRegistered {
                name,
                kind,
                industry,
                owner,
                occurred_at,
                ..
            } => {
                self.upsert(
                    &ACCOUNTS,
                    &id,
                    &[
                        ("name", name.clone().into()),
                        ("kind", kind.as_str().into()),
                        ("owner", owner.into()),
                        ("industry", industry.into()),
                        ("archived", 0.into()),
                    ],
                )
                .await?;
                self.entry(
                    "account",
                    some_id,
                    None,
                    &occurred_at,
                    format!("Account {name} registered"),
                )
            }
            AccountEvent::AccountDetailsUpdated {
                changes,
                occurred_at,
            } => {
                for column in ["name", "kind", "industry"] {
                    if let Some(value) = new_text(&changes, column) {
                        let value = match column {
                            "industry" => value,
                            _ => Some(value.unwrap_or_default()),
                        };
                        self.update(&ACCOUNTS, &id, &[(column, value.into())])
                            .await?;
                    }
                }
                self.entry(
                    "account",
                    some_id,
                    None,
                    &occurred_at,
                    format!("Account details updated ({})", fields(&changes)),
                )
            }
            AccountEvent::AccountOwnerAssigned {
                from,
                to,
                occurred_at,
            } => {
                self.update(&ACCOUNTS, &id, &[("owner", to.clone().into())])
                    .await?;
                let summary = match from {
                    Some(from) => format!("Account owner changed from {from} to {to}"),
                    None => format!("Account owner set to {to}"),
                };
                self.entry("account", some_id, None, &occurred_at, summary)
            }
            AccountEvent::AccountArchived {
                reason,
                occurred_at,
            } => {
                self.update(&ACCOUNTS, &id, &[("archived", 1.into())])
                    .await?;
                let summary = match reason {
                    Some(reason) => format!("Account archived: {reason}"),
                    None => "Account archived".to_string(),
                };
                self.entry("account", some_id, None, &occurred_at, summary)
            }
            AccountEvent::AccountRestored { occurred_at } => {
                self.update(&ACCOUNTS, &id, &[("archived", 0.into())])
                    .await?;
                self.entry(
                    "account",
                    some_id,
                    None,
                    &occurred_at,
                    "Account restored".to_string(),
                )
            }
        })
    }

    async fn contact(&mut self) -> Result<Option<NewEntry>, ProjectionError> {
        let id = self.event.stream_id.clone();
        let actor = json_text(self.event.metadata.get("actor"));
        Ok(match decode::<ContactEvent>(self.event)? {
            ContactEvent::ContactCreated {
                account_id,
                name,
                email,
                occurred_at,
                ..
            } => {
                let account_id = account_id.map(|a| a.to_string());
                self.upsert(
                    &CONTACTS,
                    &id,
                    &[
                        ("account_id", account_id.clone().into()),
                        ("name", name.clone().into()),
                        ("email", email.map(|e| e.as_str().to_string()).into()),
                    ],
                )
                .await?;
                self.entry(
                    "contact",
                    account_id,
                    Some(id),
                    &occurred_at,
                    format!("Contact {name} created"),
                )
            }
            ContactEvent::ContactUpdated {
                changes,
                occurred_at,
            } => {
                for column in ["account_id", "name", "email"] {
                    if let Some(value) = new_text(&changes, column) {
                        let value = match column {
                            "name" => Some(value.unwrap_or_default()),
                            _ => value,
                        };
                        self.update(&CONTACTS, &id, &[(column, value.into())])
                            .await?;
                    }
                }
                let contact = self.row(&CONTACTS, &id).await?;
                let account_id = contact.as_ref().and_then(|c| c.text("account_id"));
                let name = contact
                    .as_ref()
                    .and_then(|c| c.text("name"))
                    .unwrap_or_default();
                self.entry(
                    "contact",
                    account_id,
                    Some(id),
                    &occurred_at,
                    format!("Contact {name} updated ({})", fields(&changes)),
                )
            }
            ContactEvent::ActivityLogged {
                activity_id,
                account_id,
                kind,
                subject,
                occurred_at,
                duration_minutes,
                outcome,
                ..
            } => {
                let account_id = match account_id {
                    Some(a) => Some(a.to_string()),
                    None => self.column(&CONTACTS, &id, "account_id").await?,
                };
                let contact_name = self.column(&CONTACTS, &id, "name").await?;
                let task_status = (kind == ActivityKind::Task).then(|| "open".to_string());
                self.lookups
                    .insert_if_absent(
                        self.conn,
                        &ACTIVITIES,
                        &activity_id.to_string(),
                        &[
                            ("contact_id", id.clone().into()),
                            ("account_id", account_id.clone().into()),
                            ("kind", kind.as_str().into()),
                            ("subject", subject.clone().into()),
                            ("occurred_at", occurred(&occurred_at).into()),
                            ("actor", actor.into()),
                            ("task_status", task_status.into()),
                            ("position", self.event.position.into()),
                        ],
                    )
                    .await?;
                let mut summary = capitalised(kind.as_str());
                if let Some(name) = &contact_name {
                    summary.push_str(&format!(" with {name}"));
                }
                summary.push_str(&format!(": {subject}"));
                let extra: Vec<String> = duration_minutes
                    .map(|d| format!("{d} min"))
                    .into_iter()
                    .chain(outcome)
                    .collect();
                if !extra.is_empty() {
                    summary.push_str(&format!(" ({})", extra.join(", ")));
                }
                let mut entry = self.entry("activity", account_id, Some(id), &occurred_at, summary);
                if let Some(e) = entry.as_mut() {
                    e.details["contact_name"] = json!(contact_name);
                }
                entry
            }
            ContactEvent::TaskCompleted {
                activity_id,
                outcome,
                occurred_at,
            } => {
                let activity_id = activity_id.to_string();
                self.update(
                    &ACTIVITIES,
                    &activity_id,
                    &[("task_status", "completed".into())],
                )
                .await?;
                let (subject, account_id) = match self.row(&ACTIVITIES, &activity_id).await? {
                    Some(row) => (
                        row.text("subject").unwrap_or_default(),
                        row.text("account_id"),
                    ),
                    None => (
                        activity_id.clone(),
                        self.column(&CONTACTS, &id, "account_id").await?,
                    ),
                };
                let mut summary = format!("Task completed: {subject}");
                if let Some(outcome) = outcome {
                    summary.push_str(&format!(" ({outcome})"));
                }
                let mut entry = self.entry("activity", account_id, Some(id), &occurred_at, summary);
                if let Some(e) = entry.as_mut() {
                    e.details["subject"] = json!(subject);
                }
                entry
            }
        })
    }

    async fn opportunity(&mut self) -> Result<Option<NewEntry>, ProjectionError> {
        let id = self.event.stream_id.clone();
        let event = decode::<OpportunityEvent>(self.event)?;
        if let OpportunityEvent::OpportunityOpened {
            account_id,
            name,
            amount,
            ..
        } = &event
        {
            self.upsert(
                &OPPORTUNITIES,
                &id,
                &[
                    ("account_id", account_id.to_string().into()),
                    ("name", name.clone().into()),
                    ("status", "open".into()),
                    ("amount", amount.amount().to_string().into()),
                    ("currency", amount.currency().as_str().into()),
                ],
            )
            .await?;
        }
        let Some(row) = self.row(&OPPORTUNITIES, &id).await? else {
            return Ok(None); // an opportunity never opened: nothing to attach to
        };
        let account_id = row.text("account_id").unwrap_or_default();
        let mut name = row.text("name").unwrap_or_default();
        let (at, summary) = match event {
            OpportunityEvent::OpportunityOpened {
                amount,
                stage,
                occurred_at,
                ..
            } => (
                occurred_at,
                format!("Opportunity {name} opened: {amount} in {stage}"),
            ),
            OpportunityEvent::OpportunityStageAdvanced {
                from,
                to,
                occurred_at,
                ..
            } => (
                occurred_at,
                format!("Opportunity {name} moved from {from} to {to}"),
            ),
            OpportunityEvent::OpportunityUpdated {
                changes,
                occurred_at,
            } => {
                if let Some(Some(new_name)) = new_text(&changes, "name") {
                    self.update(&OPPORTUNITIES, &id, &[("name", new_name.clone().into())])
                        .await?;
                    name = new_name;
                }
                if let Some(change) = changes.iter().find(|c| c.field == "amount") {
                    let amount = json_text(change.new.get("amount"));
                    let currency = json_text(change.new.get("currency"));
                    self.update(
                        &OPPORTUNITIES,
                        &id,
                        &[("amount", amount.into()), ("currency", currency.into())],
                    )
                    .await?;
                }
                (
                    occurred_at,
                    format!("Opportunity {name} updated ({})", fields(&changes)),
                )
            }
            OpportunityEvent::OpportunityWon {
                close_value,
                occurred_at,
                ..
            } => {
                self.update(
                    &OPPORTUNITIES,
                    &id,
                    &[
                        ("status", "won".into()),
                        ("close_amount", close_value.amount().to_string().into()),
                        ("close_currency", close_value.currency().as_str().into()),
                    ],
                )
                .await?;
                (
                    occurred_at,
                    format!("Opportunity {name} won: {close_value}"),
                )
            }
            OpportunityEvent::OpportunityLost {
                reason,
                competitor,
                occurred_at,
                ..
            } => {
                self.update(&OPPORTUNITIES, &id, &[("status", "lost".into())])
                    .await?;
                let summary = match competitor {
                    Some(c) => format!("Opportunity {name} lost to {c}: {reason}"),
                    None => format!("Opportunity {name} lost: {reason}"),
                };
                (occurred_at, summary)
            }
            OpportunityEvent::OpportunityReopened {
                to, occurred_at, ..
            } => {
                self.update(
                    &OPPORTUNITIES,
                    &id,
                    &[
                        ("status", "open".into()),
                        ("close_amount", Cell::Null),
                        ("close_currency", Cell::Null),
                    ],
                )
                .await?;
                (occurred_at, format!("Opportunity {name} reopened in {to}"))
            }
        };
        let mut entry = self.entry("opportunity", Some(account_id), None, &at, summary);
        if let Some(e) = entry.as_mut() {
            e.details["opportunity_name"] = json!(name);
        }
        Ok(entry)
    }

    async fn case(&mut self) -> Result<Option<NewEntry>, ProjectionError> {
        let id = self.event.stream_id.clone();
        let event = decode::<CaseEvent>(self.event)?;
        if let CaseEvent::CaseOpened {
            account_id,
            contact_id,
            subject,
            ..
        } = &event
        {
            let contact_id = contact_id.map(|c| c.to_string());
            let account_id = match (account_id, &contact_id) {
                (Some(a), _) => Some(a.to_string()),
                (None, Some(c)) => self.column(&CONTACTS, c, "account_id").await?,
                (None, None) => None,
            };
            self.upsert(
                &CASES,
                &id,
                &[
                    ("account_id", account_id.into()),
                    ("contact_id", contact_id.into()),
                    ("subject", subject.clone().into()),
                    ("status", "open".into()),
                ],
            )
            .await?;
        }
        let Some(row) = self.row(&CASES, &id).await? else {
            return Ok(None);
        };
        let account_id = row.text("account_id");
        let contact_id = row.text("contact_id");
        let subject = row.text("subject").unwrap_or_default();
        let status = |s: &str| Some(s.to_string());
        let (at, new_status, summary) = match event {
            CaseEvent::CaseOpened {
                priority,
                opened_at,
                ..
            } => (
                opened_at,
                None,
                format!("Case opened: {subject} ({priority})"),
            ),
            CaseEvent::CaseAssigned {
                to, occurred_at, ..
            } => {
                let s = match row.text("status").as_deref() {
                    Some("open") => status("assigned"),
                    _ => None,
                };
                (occurred_at, s, format!("Case {subject} assigned to {to}"))
            }
            CaseEvent::CaseCommented {
                public,
                author,
                occurred_at,
                ..
            } => {
                let visibility = if public { "Public" } else { "Internal" };
                let by = author.map(|a| format!(" by {a}")).unwrap_or_default();
                (
                    occurred_at,
                    None,
                    format!("{visibility} comment{by} on case {subject}"),
                )
            }
            CaseEvent::CaseEscalated {
                reason,
                level,
                occurred_at,
                ..
            } => (
                occurred_at,
                None,
                format!("Case {subject} escalated to level {level}: {reason}"),
            ),
            CaseEvent::CaseResolved {
                resolution,
                occurred_at,
                ..
            } => (
                occurred_at,
                status("resolved"),
                format!("Case {subject} resolved: {resolution}"),
            ),
            CaseEvent::CaseClosed { occurred_at } => (
                occurred_at,
                status("closed"),
                format!("Case {subject} closed"),
            ),
            CaseEvent::CaseReopened {
                to, occurred_at, ..
            } => (
                occurred_at,
                status(to.as_str()),
                format!("Case {subject} reopened"),
            ),
        };
        if let Some(new_status) = new_status {
            self.update(&CASES, &id, &[("status", new_status.into())])
                .await?;
        }
        let mut entry = self.entry("case", account_id, contact_id, &at, summary);
        if let Some(e) = entry.as_mut() {
            e.details["case_subject"] = json!(subject);
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::scenario::{
        self, fold_all, id, on_both_backends, ts, A1, A2, A3, C1, C2, C3, C4, DEMO, T2,
    };

    fn for_account(account: u128) -> TimelineQuery {
        TimelineQuery {
            account_id: Some(id(account)),
            limit: Some(500),
            ..Default::default()
        }
    }

    fn for_contact(contact: u128) -> TimelineQuery {
        TimelineQuery {
            contact_id: Some(id(contact)),
            limit: Some(500),
            ..Default::default()
        }
    }

    async fn positions(db: &ReadDb, tables: &Tables, query: TimelineQuery) -> Vec<i64> {
        let page = timeline(db, tables, &query).await.unwrap();
        assert!(page.next_cursor.is_none());
        page.items.iter().map(|e| e.position).collect()
    }

    fn usd(amount: &str) -> MoneyTotal {
        MoneyTotal {
            amount: amount.into(),
            currency: "USD".into(),
        }
    }

    async fn scenario_body(db: ReadDb) {
        let events = scenario::scenario();
        let tables = fold_all(&db, &HistoryProjection, &events).await;

        // Account timeline, newest first by occurred_at (tasks carry their due time).
        let acme = vec![
            30, 14, 13, 15, 29, 28, 27, 21, 20, 19, 18, 17, 16, 12, 9, 8, 7, 6, 4, 3, 1,
        ];
        assert_eq!(positions(&db, &tables, for_account(A1)).await, acme);
        assert_eq!(
            positions(&db, &tables, for_account(A2)).await,
            vec![22, 11, 10, 5, 2]
        );
        assert_eq!(
            positions(&db, &tables, for_account(A3)).await,
            vec![26, 25, 24],
            "lead conversion attaches to the new account"
        );
        // Contact timelines.
        assert_eq!(
            positions(&db, &tables, for_contact(C1)).await,
            vec![30, 13, 21, 19, 18, 17, 16, 12, 3]
        );
        assert_eq!(
            positions(&db, &tables, for_contact(C2)).await,
            vec![14, 15, 29, 4]
        );
        assert_eq!(positions(&db, &tables, for_contact(C3)).await, vec![22, 5]);
        assert_eq!(positions(&db, &tables, for_contact(C4)).await, vec![26, 25]);

        // Kind filters (one or several).
        let kind = |k: &str| TimelineQuery {
            kind: Some(k.into()),
            ..for_account(A1)
        };
        assert_eq!(
            positions(&db, &tables, kind("activity")).await,
            vec![30, 14, 13, 15, 21, 12]
        );
        assert_eq!(
            positions(&db, &tables, kind("opportunity")).await,
            vec![28, 27, 9, 8, 7, 6]
        );
        assert_eq!(
            positions(&db, &tables, kind("case")).await,
            vec![29, 19, 18, 17, 16]
        );
        assert_eq!(
            positions(&db, &tables, kind("account,contact")).await,
            vec![20, 4, 3, 1]
        );
        let lead = TimelineQuery {
            kind: Some("lead".into()),
            ..for_contact(C4)
        };
        assert_eq!(positions(&db, &tables, lead).await, vec![26]);

        // Entry contents.
        let page = timeline(&db, &tables, &for_account(A1)).await.unwrap();
        let by_position = |p: i64| page.items.iter().find(|e| e.position == p).unwrap().clone();
        let call = by_position(12);
        assert_eq!(call.kind, "activity");
        assert_eq!(call.event_type, "ActivityLogged");
        assert_eq!(
            call.summary,
            "Call with Jane Doe: Intro call (20 min, interested)"
        );
        assert_eq!(call.actor.as_deref(), Some("alice"));
        assert_eq!(call.occurred_at, ts(11));
        assert_eq!(call.contact_id, Some(id(C1)));
        assert_eq!(call.account_id, Some(id(A1)));
        assert_eq!(call.details["subject"], json!("Intro call"));
        assert_eq!(
            by_position(7).summary,
            "Opportunity Acme renewal moved from prospecting to qualification"
        );
        assert_eq!(
            by_position(8).summary,
            "Opportunity Acme renewal updated (amount, owner)"
        );
        assert_eq!(
            by_position(28).summary,
            "Opportunity Acme pilot won: 1999.50 USD"
        );
        assert_eq!(
            by_position(17).summary,
            "Case Cannot log in assigned to dave"
        );
        assert_eq!(
            by_position(18).summary,
            "Public comment by dave on case Cannot log in"
        );
        assert_eq!(
            by_position(21).summary,
            "Task completed: Send proposal (sent)"
        );
        assert_eq!(
            by_position(20).summary,
            "Account details updated (industry)"
        );
        let converted = timeline(&db, &tables, &for_account(A3))
            .await
            .unwrap()
            .items[0]
            .clone();
        assert_eq!(converted.kind, "lead");
        assert_eq!(converted.summary, "Lead Tran Van B (Beta Ltd) converted");
        assert_eq!(converted.contact_id, Some(id(C4)));

        // Pages of 5 cover the timeline exactly once, in the same order.
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = timeline(
                &db,
                &tables,
                &TimelineQuery {
                    limit: Some(5),
                    cursor: cursor.clone(),
                    ..for_account(A1)
                },
            )
            .await
            .unwrap();
            assert!(page.items.len() <= 5);
            seen.extend(page.items.iter().map(|e| e.position));
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, acme);

        // Bad input.
        for bad in [
            TimelineQuery::default(),
            TimelineQuery {
                contact_id: Some(id(C1)),
                ..for_account(A1)
            },
            TimelineQuery {
                kind: Some("email".into()),
                ..for_account(A1)
            },
            TimelineQuery {
                cursor: Some("nope".into()),
                ..for_account(A1)
            },
            TimelineQuery {
                limit: Some(0),
                ..for_account(A1)
            },
        ] {
            assert!(
                matches!(
                    timeline(&db, &tables, &bad).await,
                    Err(QueryError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }

        // The 360 summary.
        let acme = summary(&db, &tables, &id(A1)).await.unwrap().unwrap();
        assert_eq!(
            acme,
            CustomerSummary {
                account_id: id(A1),
                name: "Acme Corp".into(),
                kind: "customer".into(),
                owner: Some("alice".into()),
                industry: Some("technology".into()),
                archived: false,
                contacts: vec![
                    ContactRef {
                        id: id(C1),
                        name: "Jane Doe".into(),
                        email: Some("jane@acme.example".into())
                    },
                    ContactRef {
                        id: id(C2),
                        name: "John Smith".into(),
                        email: Some("john@acme.example".into())
                    },
                ],
                open_opportunities: OpenOpportunities {
                    count: 2,
                    amount: vec![
                        MoneyTotal {
                            amount: "3000.00".into(),
                            currency: "EUR".into()
                        },
                        usd("15000.00"),
                    ],
                },
                won_count: 1,
                won_value: vec![usd("1999.50")],
                open_cases: 1,
                last_contact: Some(LastContact {
                    activity_id: id(DEMO),
                    at: ts(30),
                    kind: "meeting".into(),
                    subject: "Demo".into(),
                    by: Some("bob".into()),
                    contact_id: id(C2),
                    contact_name: Some("John Smith".into()),
                }),
                next_task: Some(NextTask {
                    activity_id: id(T2),
                    due_at: ts(2880),
                    subject: "Follow up".into(),
                    contact_id: id(C2),
                    contact_name: Some("John Smith".into()),
                    by: Some("bob".into()),
                }),
            }
        );
        let globex = summary(&db, &tables, &id(A2)).await.unwrap().unwrap();
        assert_eq!(globex.owner.as_deref(), Some("bob"));
        assert_eq!(globex.kind, "prospect");
        assert_eq!(globex.contacts.len(), 1);
        assert_eq!(globex.open_opportunities.count, 0);
        assert!(globex.open_opportunities.amount.is_empty());
        assert_eq!(globex.won_value, vec![usd("4800.00")]);
        assert_eq!(globex.open_cases, 1);
        assert_eq!(globex.last_contact, None);
        assert_eq!(globex.next_task, None);
        let beta = summary(&db, &tables, &id(A3)).await.unwrap().unwrap();
        assert_eq!(beta.name, "Beta Ltd");
        assert_eq!(beta.contacts[0].id, id(C4));
        assert!(summary(&db, &tables, &id(0xBAD)).await.unwrap().is_none());
    }

    on_both_backends!(
        history_scenario_on_sqlite,
        history_scenario_on_postgres,
        scenario_body
    );

    /// Lookup rows written by an earlier batch and changed in this one: a
    /// later event of the batch sees the change (a rename shows in the
    /// entries after it).
    async fn renames_in_a_batch_body(db: ReadDb) {
        use crm_domain::account::Account;
        use crm_domain::contact::{Contact, ContactCommand};
        use crm_domain::opportunity::{Opportunity, OpportunityCommand};
        use crm_domain::values::{AccountKind, ActivityKind};

        let mut s = scenario::Script::default();
        let (mut account, mut contact, mut deal) = (
            Account::default(),
            Contact::default(),
            Opportunity::default(),
        );
        let register = scenario::register(A1, "Acme Corp", AccountKind::Customer, "alice", 0);
        s.run(&mut account, "account", A1, register, "alice", 0);
        let create = scenario::create_contact(C1, A1, "Old Name", "jane@acme.example", 1);
        s.run(&mut contact, "contact", C1, create, "alice", 1);
        let open = scenario::open_opportunity(scenario::O1, A1, "Old deal", "100.00 USD", 2);
        s.run(&mut deal, "opportunity", scenario::O1, open, "alice", 2);
        let first_batch = s.events.len();
        let rename = ContactCommand::UpdateContact {
            account_id: None,
            name: Some("New Name".into()),
            email: None,
            phone: None,
            title: None,
            preferred_channel: None,
            occurred_at: scenario::at(3),
        };
        s.run(&mut contact, "contact", C1, rename, "alice", 3);
        let call = scenario::log_activity(0xCA11, ActivityKind::Call, "Intro", 4);
        s.run(&mut contact, "contact", C1, call, "alice", 4);
        let rename_deal = OpportunityCommand::UpdateOpportunity {
            name: Some("New deal".into()),
            amount: None,
            expected_close: None,
            owner: None,
            occurred_at: scenario::at(5),
        };
        s.run(
            &mut deal,
            "opportunity",
            scenario::O1,
            rename_deal,
            "alice",
            5,
        );
        let advance = OpportunityCommand::AdvanceStage {
            stage: "qualification".into(),
            reason: None,
            occurred_at: scenario::at(6),
        };
        s.run(&mut deal, "opportunity", scenario::O1, advance, "alice", 6);

        let tables = Tables::new("history", 1);
        crate::fold::create_tables(&db, &HistoryProjection, &tables)
            .await
            .unwrap();
        for batch in [&s.events[..first_batch], &s.events[first_batch..]] {
            crate::fold::fold_batch(&db, &HistoryProjection, &tables, batch, None)
                .await
                .unwrap_or_else(|f| panic!("fold failed: {:?}", f.error));
        }
        let page = timeline(&db, &tables, &for_account(A1)).await.unwrap();
        let summaries: Vec<&str> = page.items.iter().map(|e| e.summary.as_str()).collect();
        assert_eq!(
            summaries,
            vec![
                "Opportunity New deal moved from prospecting to qualification",
                "Opportunity New deal updated (name)",
                "Call with New Name: Intro (20 min, interested)",
                "Contact New Name updated (name)",
                "Opportunity Old deal opened: 100.00 USD in prospecting",
                "Contact Old Name created",
                "Account Acme Corp registered",
            ]
        );
    }

    on_both_backends!(
        a_rename_shows_in_the_entries_after_it_on_sqlite,
        a_rename_shows_in_the_entries_after_it_on_postgres,
        renames_in_a_batch_body
    );
}
