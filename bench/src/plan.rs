//! The stream-length comparison's plan, shared by our HTTP run and the
//! cqrs-es baseline so both drive the same opportunity commands on streams
//! of the same length.

use chrono::{DateTime, Utc};
use crm_domain::opportunity::OpportunityCommand;
use crm_domain::values::Money;
use serde_json::{json, Value};

/// Each client owns `streams_per_client()` opportunities, each grown to
/// `stream_len` events before the clock starts; then every client sends
/// `commands_per_client` updates, `per_stream()` to each of its streams in
/// turn, so a measured command always meets a stream of `stream_len` to
/// `stream_len + per_stream()` events.
#[derive(Debug, Clone, Copy)]
pub struct StreamPlan {
    pub stream_len: usize,
    pub clients: usize,
    pub commands_per_client: usize,
}

impl StreamPlan {
    /// Commands sent to one stream while it is measured (a fifth of its
    /// length, at least 10): the stream stays within 20 % of its nominal
    /// length without seeding a stream per command.
    pub fn per_stream(&self) -> usize {
        (self.stream_len / 5)
            .max(10)
            .min(self.commands_per_client.max(1))
    }

    pub fn streams_per_client(&self) -> usize {
        self.commands_per_client.div_ceil(self.per_stream()).max(1)
    }
}

/// The `n`-th update of the plan: the amount alternates so every command
/// changes the opportunity and produces exactly one event.
pub fn update_amount(n: usize) -> &'static str {
    if n.is_multiple_of(2) {
        "125000.00"
    } else {
        "130000.00"
    }
}

/// The same update as a domain command (for the cqrs-es baseline).
pub fn update_command(n: usize, now: DateTime<Utc>) -> OpportunityCommand {
    OpportunityCommand::UpdateOpportunity {
        name: None,
        amount: Some(Money::parse(&format!("{} USD", update_amount(n))).expect("a valid amount")),
        expected_close: None,
        owner: None,
        occurred_at: now,
    }
}

/// The same update as the body of `PATCH /v1/opportunities/{id}`.
pub fn update_body(n: usize) -> Value {
    json!({"amount": {"amount": update_amount(n), "currency": "USD"}})
}
