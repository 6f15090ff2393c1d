//! Loaded aggregates kept between commands, so a command costs the same on a
//! stream of ten events as on a stream of ten thousand.

use std::sync::Arc;

use cqrs_es::Aggregate;
use crm_domain::account::Account;
use crm_domain::aggregate::CrmAggregate;
use crm_domain::case::Case;
use crm_domain::contact::Contact;
use crm_domain::lead::Lead;
use crm_domain::opportunity::Opportunity;
use moka::sync::Cache;
use serde::{Deserialize, Serialize};

/// An aggregate as of `version`, whose last event sits at `last_position`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Loaded<A> {
    pub state: A,
    pub version: i64,
    pub last_position: i64,
}

impl<A: Default> Loaded<A> {
    /// A stream with no events yet.
    pub fn new_stream() -> Self {
        Self {
            state: A::default(),
            version: 0,
            last_position: 0,
        }
    }
}

type AggregateCache<A> = Cache<String, Arc<Loaded<A>>>;

/// One bounded cache per aggregate type, keyed by tenant and stream id.
pub struct Caches {
    leads: AggregateCache<Lead>,
    accounts: AggregateCache<Account>,
    contacts: AggregateCache<Contact>,
    opportunities: AggregateCache<Opportunity>,
    cases: AggregateCache<Case>,
}

impl Caches {
    pub fn new(per_type: u64) -> Self {
        Self {
            leads: Cache::new(per_type),
            accounts: Cache::new(per_type),
            contacts: Cache::new(per_type),
            opportunities: Cache::new(per_type),
            cases: Cache::new(per_type),
        }
    }
}

/// Aggregates kept per type by default. A cached aggregate costs roughly a
/// kilobyte (state, key and the cache's own bookkeeping, by estimate; a
/// contact with many open tasks more), so the five caches stay near 10 MB;
/// a million-event load fills them whatever their size, and at 10,000 per
/// type they would hold some 50 MB. A miss costs a snapshot read plus the
/// events after it, not the whole stream.
pub const CACHED_PER_TYPE: u64 = 2_000;

impl Default for Caches {
    fn default() -> Self {
        Self::new(CACHED_PER_TYPE)
    }
}

impl Caches {
    /// Whether the cache of `stream_type` holds the stream of `key` with
    /// events (false for a type it does not cache).
    pub fn holds_written(&self, stream_type: &str, key: &str) -> bool {
        fn written<A: Send + Sync + 'static>(cache: &AggregateCache<A>, key: &str) -> bool {
            cache.get(key).is_some_and(|loaded| loaded.version > 0)
        }
        match stream_type {
            Lead::TYPE => written(&self.leads, key),
            Account::TYPE => written(&self.accounts, key),
            Contact::TYPE => written(&self.contacts, key),
            Opportunity::TYPE => written(&self.opportunities, key),
            Case::TYPE => written(&self.cases, key),
            _ => false,
        }
    }
}

pub fn cache_key(tenant: &str, stream_id: &str) -> String {
    format!("{tenant}/{stream_id}")
}

/// An aggregate the command service can load, cache and append to.
pub trait Stream: CrmAggregate + Clone + Send + Sync + 'static {
    fn cache(caches: &Caches) -> &AggregateCache<Self>;
}

macro_rules! stream {
    ($aggregate:ty, $field:ident) => {
        impl Stream for $aggregate {
            fn cache(caches: &Caches) -> &AggregateCache<Self> {
                &caches.$field
            }
        }
    };
}

stream!(Lead, leads);
stream!(Account, accounts);
stream!(Contact, contacts);
stream!(Opportunity, opportunities);
stream!(Case, cases);
