//! Routes served straight from the event log (no read model involved):
//! - [`time_travel`]: an aggregate's state as of an instant or a version;
//! - [`feed`]: the global feed, paged by position, as CloudEvents;
//! - [`live`]: the same feed live, as Server-Sent Events.

pub mod feed;
pub mod live;
pub mod time_travel;

use crm_eventlog::RecordedEvent;

/// Stream types of the log.
pub const STREAM_TYPES: [&str; 5] = ["lead", "account", "contact", "opportunity", "case"];

/// Largest page a client may ask the global feed for.
pub const MAX_FEED_PAGE: i64 = 1000;

/// Default page of the global feed.
pub const DEFAULT_FEED_PAGE: i64 = 100;

/// Whether a reader of `tenant` may see `event` (feeds never cross tenants).
pub(crate) fn visible_to(event: &RecordedEvent, tenant: &str) -> bool {
    event.tenant_id == tenant
}
