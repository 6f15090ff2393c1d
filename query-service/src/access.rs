//! Who may read the log on the query side. Every log-backed route calls
//! [`require_read`] once, after authentication; the policy itself is
//! `Role::may_read` in service-kit, shared with the command service.

use crm_service_kit::auth::{Actor, ReadArea};
use crm_service_kit::problem::Problem;

/// What a route reads, for the access policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readable<'a> {
    /// The history / state of one stream (`lead`, `account`, ...).
    Stream(&'a str),
    /// The global feed of every event (`/v1/events`, `/v1/events/live`).
    GlobalFeed,
}

/// Whether `actor` may read `what`: the raw log is as revealing as the audit
/// trail, so the policy of [`ReadArea::Log`] applies.
pub fn require_read(actor: &Actor, _what: Readable<'_>) -> Result<(), Problem> {
    actor.require_read(ReadArea::Log)
}
