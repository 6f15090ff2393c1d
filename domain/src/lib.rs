//! `crm-domain`: the pure domain model of the CRM (no IO, no clock, no SQL,
//! no async runtime). Time comes in through command arguments.
//!
//! Map of the crate:
//! - [`error`]: `FieldError`, `ValidationErrors`, `DomainError`.
//! - [`ids`]: typed UUID identifiers (`LeadId`, `AccountId`, ...).
//! - [`values`]: validated values (`Money`, `Currency`, `Email`, `Phone`,
//!   bounded text, dates, `Address`) and the CRM enums.
//! - [`changes`]: `FieldChange` (old -> new) carried by update events.
//! - [`pipeline`]: pipeline and stage definitions with probabilities.
//! - [`aggregate`]: the `CrmAggregate` trait (`decide` / `exists`).
//! - [`lead`], [`account`], [`contact`], [`opportunity`], [`case`]: per
//!   aggregate its state, commands, events and request ("input") types whose
//!   `into_command` validates a request body and collects every field error.

pub mod account;
pub mod aggregate;
pub mod case;
pub mod changes;
pub mod contact;
pub mod error;
pub mod ids;
pub mod lead;
pub mod opportunity;
pub mod pipeline;
pub mod values;

pub use aggregate::CrmAggregate;
pub use changes::FieldChange;
pub use error::{DomainError, FieldError, ValidationErrors};
pub use ids::{AccountId, ActivityId, CaseId, ContactId, LeadId, OpportunityId};
pub use values::{Currency, Email, Money, Phone};

#[cfg(test)]
pub(crate) mod test_support {
    use chrono::{DateTime, Duration, TimeZone, Utc};

    /// A fixed instant: 2026-11-20T09:00:00Z.
    pub fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 20, 9, 0, 0).unwrap()
    }

    /// `t0` plus `minutes`.
    pub fn at(minutes: i64) -> DateTime<Utc> {
        t0() + Duration::minutes(minutes)
    }

    pub fn uuid(n: u128) -> uuid::Uuid {
        uuid::Uuid::from_u128(n)
    }
}
