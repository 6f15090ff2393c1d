//! The support case aggregate: open -> (assigned) -> resolved -> closed,
//! with escalation, comments, SLA deadlines and reopening.

use crate::aggregate::{impl_aggregate, require_exists, require_new, CrmAggregate};
use crate::error::{DomainError, ValidationErrors};
use crate::ids::{AccountId, CaseId, ContactId};
use crate::values::{
    optional_text, required_text, CaseChannel, CasePriority, BODY_MAX, NAME_MAX, REASON_MAX,
    SUBJECT_MAX,
};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Lifecycle status of a case (escalation is a separate flag/level).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CaseStatus {
    #[default]
    Open,
    Assigned,
    Resolved,
    Closed,
}

impl CaseStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Assigned => "assigned",
            Self::Resolved => "resolved",
            Self::Closed => "closed",
        }
    }

    /// Open or assigned: work is still to be done.
    pub fn is_active(&self) -> bool {
        matches!(self, Self::Open | Self::Assigned)
    }
}

/// SLA targets of a priority: (first response, resolution).
pub fn sla_targets(priority: CasePriority) -> (Duration, Duration) {
    match priority {
        CasePriority::Urgent => (Duration::hours(1), Duration::hours(4)),
        CasePriority::High => (Duration::hours(4), Duration::hours(24)),
        CasePriority::Normal => (Duration::hours(8), Duration::hours(72)),
        CasePriority::Low => (Duration::hours(24), Duration::hours(168)),
    }
}

/// Current state of a case (bounded: counts, not comment lists).
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub id: Option<CaseId>,
    pub account_id: Option<AccountId>,
    pub contact_id: Option<ContactId>,
    pub subject: String,
    pub description: Option<String>,
    pub priority: CasePriority,
    pub channel: CaseChannel,
    pub status: CaseStatus,
    pub assignee: Option<String>,
    pub escalated: bool,
    pub escalation_level: u32,
    pub opened_at: Option<DateTime<Utc>>,
    pub first_response_due: Option<DateTime<Utc>>,
    pub resolution_due: Option<DateTime<Utc>>,
    pub first_response_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub comment_count: u64,
    pub reopen_count: u32,
}

/// Validated case commands.
#[derive(Clone, Debug, PartialEq)]
pub enum CaseCommand {
    OpenCase {
        id: CaseId,
        account_id: Option<AccountId>,
        contact_id: Option<ContactId>,
        subject: String,
        description: Option<String>,
        priority: CasePriority,
        channel: CaseChannel,
        occurred_at: DateTime<Utc>,
    },
    /// Assigning to the current assignee is a no-op (no event).
    AssignCase {
        assignee: String,
        occurred_at: DateTime<Utc>,
    },
    CommentCase {
        body: String,
        public: bool,
        author: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    EscalateCase {
        reason: String,
        occurred_at: DateTime<Utc>,
    },
    ResolveCase {
        resolution: String,
        occurred_at: DateTime<Utc>,
    },
    CloseCase {
        occurred_at: DateTime<Utc>,
    },
    ReopenCase {
        reason: Option<String>,
        occurred_at: DateTime<Utc>,
    },
}

/// Case events (`{"type":"CaseOpened", ...}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type")]
pub enum CaseEvent {
    CaseOpened {
        case_id: CaseId,
        account_id: Option<AccountId>,
        contact_id: Option<ContactId>,
        subject: String,
        description: Option<String>,
        priority: CasePriority,
        channel: CaseChannel,
        opened_at: DateTime<Utc>,
        first_response_due: DateTime<Utc>,
        resolution_due: DateTime<Utc>,
    },
    CaseAssigned {
        from: Option<String>,
        to: String,
        occurred_at: DateTime<Utc>,
    },
    CaseCommented {
        body: String,
        public: bool,
        author: Option<String>,
        /// This is the first public comment: the first response to the customer.
        first_response: bool,
        occurred_at: DateTime<Utc>,
    },
    CaseEscalated {
        reason: String,
        from_level: u32,
        level: u32,
        occurred_at: DateTime<Utc>,
    },
    CaseResolved {
        from: CaseStatus,
        resolution: String,
        occurred_at: DateTime<Utc>,
    },
    CaseClosed {
        occurred_at: DateTime<Utc>,
    },
    CaseReopened {
        from: CaseStatus,
        to: CaseStatus,
        reason: Option<String>,
        occurred_at: DateTime<Utc>,
    },
}

impl_aggregate!(Case, CaseCommand, CaseEvent, "case", {
    CaseOpened,
    CaseAssigned,
    CaseCommented,
    CaseEscalated,
    CaseResolved,
    CaseClosed,
    CaseReopened,
});

impl Case {
    fn illegal(&self, action: &str) -> DomainError {
        DomainError::illegal(format!(
            "cannot {action} a case that is {}",
            self.status.as_str()
        ))
    }

    fn apply_event(&mut self, event: CaseEvent) {
        use CaseEvent::*;
        match event {
            CaseOpened {
                case_id,
                account_id,
                contact_id,
                subject,
                description,
                priority,
                channel,
                opened_at,
                first_response_due,
                resolution_due,
            } => {
                *self = Case {
                    id: Some(case_id),
                    account_id,
                    contact_id,
                    subject,
                    description,
                    priority,
                    channel,
                    status: CaseStatus::Open,
                    opened_at: Some(opened_at),
                    first_response_due: Some(first_response_due),
                    resolution_due: Some(resolution_due),
                    ..Default::default()
                };
            }
            CaseAssigned { to, .. } => {
                self.assignee = Some(to);
                if self.status == CaseStatus::Open {
                    self.status = CaseStatus::Assigned;
                }
            }
            CaseCommented {
                first_response,
                occurred_at,
                ..
            } => {
                self.comment_count += 1;
                if first_response && self.first_response_at.is_none() {
                    self.first_response_at = Some(occurred_at);
                }
            }
            CaseEscalated { level, .. } => {
                self.escalated = true;
                self.escalation_level = level;
            }
            CaseResolved {
                resolution,
                occurred_at,
                ..
            } => {
                self.status = CaseStatus::Resolved;
                self.resolution = Some(resolution);
                self.resolved_at = Some(occurred_at);
            }
            CaseClosed { occurred_at } => {
                self.status = CaseStatus::Closed;
                self.closed_at = Some(occurred_at);
            }
            CaseReopened { to, .. } => {
                self.status = to;
                self.resolution = None;
                self.resolved_at = None;
                self.closed_at = None;
                self.reopen_count += 1;
            }
        }
    }
}

impl CrmAggregate for Case {
    fn exists(&self) -> bool {
        self.id.is_some()
    }

    fn decide(&self, command: CaseCommand) -> Result<Vec<CaseEvent>, DomainError> {
        use CaseCommand::*;
        if !matches!(command, OpenCase { .. }) {
            require_exists(self.exists())?;
        }
        match command {
            OpenCase {
                id,
                account_id,
                contact_id,
                subject,
                description,
                priority,
                channel,
                occurred_at,
            } => {
                require_new(self.exists())?;
                if account_id.is_none() && contact_id.is_none() {
                    return Err(DomainError::field(
                        "account_id",
                        "account_id or contact_id is required",
                    ));
                }
                let (respond, resolve) = sla_targets(priority);
                Ok(vec![CaseEvent::CaseOpened {
                    case_id: id,
                    account_id,
                    contact_id,
                    subject,
                    description,
                    priority,
                    channel,
                    opened_at: occurred_at,
                    first_response_due: occurred_at + respond,
                    resolution_due: occurred_at + resolve,
                }])
            }
            AssignCase {
                assignee,
                occurred_at,
            } => {
                if !self.status.is_active() {
                    return Err(self.illegal("assign"));
                }
                if self.assignee.as_deref() == Some(assignee.as_str()) {
                    return Ok(vec![]);
                }
                Ok(vec![CaseEvent::CaseAssigned {
                    from: self.assignee.clone(),
                    to: assignee,
                    occurred_at,
                }])
            }
            CommentCase {
                body,
                public,
                author,
                occurred_at,
            } => {
                if self.status == CaseStatus::Closed {
                    return Err(DomainError::illegal(
                        "cannot comment on a closed case; reopen it first",
                    ));
                }
                Ok(vec![CaseEvent::CaseCommented {
                    body,
                    public,
                    author,
                    first_response: public && self.first_response_at.is_none(),
                    occurred_at,
                }])
            }
            EscalateCase {
                reason,
                occurred_at,
            } => {
                if !self.status.is_active() {
                    return Err(self.illegal("escalate"));
                }
                Ok(vec![CaseEvent::CaseEscalated {
                    reason,
                    from_level: self.escalation_level,
                    level: self.escalation_level.saturating_add(1),
                    occurred_at,
                }])
            }
            ResolveCase {
                resolution,
                occurred_at,
            } => {
                if !self.status.is_active() {
                    return Err(self.illegal("resolve"));
                }
                Ok(vec![CaseEvent::CaseResolved {
                    from: self.status,
                    resolution,
                    occurred_at,
                }])
            }
            CloseCase { occurred_at } => {
                if self.status != CaseStatus::Resolved {
                    return Err(DomainError::illegal(format!(
                        "only a resolved case can be closed; this case is {}",
                        self.status.as_str()
                    )));
                }
                Ok(vec![CaseEvent::CaseClosed { occurred_at }])
            }
            ReopenCase {
                reason,
                occurred_at,
            } => {
                if self.status.is_active() {
                    return Err(self.illegal("reopen"));
                }
                let to = if self.assignee.is_some() {
                    CaseStatus::Assigned
                } else {
                    CaseStatus::Open
                };
                Ok(vec![CaseEvent::CaseReopened {
                    from: self.status,
                    to,
                    reason,
                    occurred_at,
                }])
            }
        }
    }
}

// ------------------------------------------------------------------ inputs

/// `POST /v1/cases`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OpenCaseInput {
    pub id: Option<Uuid>,
    pub account_id: Option<Uuid>,
    pub contact_id: Option<Uuid>,
    pub subject: String,
    pub description: Option<String>,
    /// low | normal | high | urgent (default normal).
    pub priority: Option<String>,
    /// email | phone | web | chat | social | in_person (default email).
    pub channel: Option<String>,
}

impl OpenCaseInput {
    pub fn into_command(
        self,
        id: CaseId,
        now: DateTime<Utc>,
    ) -> Result<CaseCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        if self.account_id.is_none() && self.contact_id.is_none() {
            errs.add("account_id", "account_id or contact_id is required");
        }
        let subject = errs.check("subject", required_text(&self.subject, SUBJECT_MAX));
        let description = errs.check(
            "description",
            optional_text(self.description.as_deref(), BODY_MAX),
        );
        let priority = errs.check(
            "priority",
            CasePriority::parse_or_default(self.priority.as_deref()),
        );
        let channel = errs.check(
            "channel",
            CaseChannel::parse_or_default(self.channel.as_deref()),
        );
        errs.into_result(CaseCommand::OpenCase {
            id,
            account_id: self.account_id.map(AccountId::new),
            contact_id: self.contact_id.map(ContactId::new),
            subject,
            description,
            priority,
            channel,
            occurred_at: now,
        })
    }
}

/// `POST /v1/cases/{id}/assign`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssignCaseInput {
    pub assignee: String,
}

impl AssignCaseInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<CaseCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let assignee = errs.check("assignee", required_text(&self.assignee, NAME_MAX));
        errs.into_result(CaseCommand::AssignCase {
            assignee,
            occurred_at: now,
        })
    }
}

/// `POST /v1/cases/{id}/comment`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommentCaseInput {
    pub body: String,
    /// Visible to the customer (default false = internal note).
    pub public: Option<bool>,
    pub author: Option<String>,
}

impl CommentCaseInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<CaseCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let body = errs.check("body", required_text(&self.body, BODY_MAX));
        let author = errs.check("author", optional_text(self.author.as_deref(), NAME_MAX));
        errs.into_result(CaseCommand::CommentCase {
            body,
            public: self.public.unwrap_or(false),
            author,
            occurred_at: now,
        })
    }
}

/// `POST /v1/cases/{id}/escalate`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EscalateCaseInput {
    pub reason: String,
}

impl EscalateCaseInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<CaseCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let reason = errs.check("reason", required_text(&self.reason, REASON_MAX));
        errs.into_result(CaseCommand::EscalateCase {
            reason,
            occurred_at: now,
        })
    }
}

/// `POST /v1/cases/{id}/resolve`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResolveCaseInput {
    pub resolution: String,
}

impl ResolveCaseInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<CaseCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let resolution = errs.check("resolution", required_text(&self.resolution, REASON_MAX));
        errs.into_result(CaseCommand::ResolveCase {
            resolution,
            occurred_at: now,
        })
    }
}

/// `POST /v1/cases/{id}/close` with `{}`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CloseCaseInput {}

impl CloseCaseInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<CaseCommand, ValidationErrors> {
        Ok(CaseCommand::CloseCase { occurred_at: now })
    }
}

/// `POST /v1/cases/{id}/reopen`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReopenCaseInput {
    pub reason: Option<String>,
}

impl ReopenCaseInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<CaseCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let reason = errs.check("reason", optional_text(self.reason.as_deref(), REASON_MAX));
        errs.into_result(CaseCommand::ReopenCase {
            reason,
            occurred_at: now,
        })
    }
}

#[cfg(test)]
mod tests;
