//! The contact aggregate: a person (optionally linked to an account) and
//! the activities (calls, emails, meetings, notes, tasks) logged with them.
//! State stays bounded: only open task ids and a window of recent activity
//! ids are kept, the full history lives in the event log.

use crate::aggregate::{impl_aggregate, require_exists, require_new, CrmAggregate};
use crate::changes::{ChangeSet, FieldChange};
use crate::error::{DomainError, ValidationErrors};
use crate::ids::{AccountId, ActivityId, CaseId, ContactId, OpportunityId};
use crate::values::{
    optional, optional_text, required_text, ActivityKind, ContactChannel, Email, Phone, BODY_MAX,
    NAME_MAX, REASON_MAX, SUBJECT_MAX,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, VecDeque};
use uuid::Uuid;

/// How many recent activity ids are remembered for duplicate detection.
pub const RECENT_ACTIVITY_WINDOW: usize = 256;
/// Max open tasks per contact.
pub const MAX_OPEN_TASKS: usize = 500;
/// Max duration of one activity (one week).
pub const MAX_DURATION_MINUTES: u32 = 7 * 24 * 60;

/// Current state of a contact.
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    pub id: Option<ContactId>,
    pub account_id: Option<AccountId>,
    pub name: String,
    pub email: Option<Email>,
    pub phone: Option<Phone>,
    pub title: Option<String>,
    pub preferred_channel: Option<ContactChannel>,
    pub created_at: Option<DateTime<Utc>>,
    /// Task activities not completed yet (bounded by [`MAX_OPEN_TASKS`]).
    pub open_tasks: BTreeSet<ActivityId>,
    /// The last [`RECENT_ACTIVITY_WINDOW`] activity ids (duplicate detection).
    pub recent_activities: VecDeque<ActivityId>,
    pub activity_count: u64,
    pub last_activity_at: Option<DateTime<Utc>>,
}

/// Validated contact commands.
#[derive(Clone, Debug, PartialEq)]
pub enum ContactCommand {
    CreateContact {
        id: ContactId,
        account_id: Option<AccountId>,
        name: String,
        email: Option<Email>,
        phone: Option<Phone>,
        title: Option<String>,
        preferred_channel: Option<ContactChannel>,
        occurred_at: DateTime<Utc>,
    },
    /// Only given fields change; nothing changed -> no event.
    UpdateContact {
        account_id: Option<AccountId>,
        name: Option<String>,
        email: Option<Email>,
        phone: Option<Phone>,
        title: Option<String>,
        preferred_channel: Option<ContactChannel>,
        occurred_at: DateTime<Utc>,
    },
    LogActivity {
        activity_id: ActivityId,
        kind: ActivityKind,
        subject: String,
        body: Option<String>,
        occurred_at: DateTime<Utc>,
        duration_minutes: Option<u32>,
        outcome: Option<String>,
        opportunity_id: Option<OpportunityId>,
        case_id: Option<CaseId>,
    },
    CompleteTask {
        activity_id: ActivityId,
        outcome: Option<String>,
        occurred_at: DateTime<Utc>,
    },
}

/// Contact events (`{"type":"ActivityLogged", ...}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type")]
pub enum ContactEvent {
    ContactCreated {
        contact_id: ContactId,
        account_id: Option<AccountId>,
        name: String,
        email: Option<Email>,
        phone: Option<Phone>,
        title: Option<String>,
        preferred_channel: Option<ContactChannel>,
        occurred_at: DateTime<Utc>,
    },
    ContactUpdated {
        changes: Vec<FieldChange>,
        occurred_at: DateTime<Utc>,
    },
    ActivityLogged {
        activity_id: ActivityId,
        /// The contact's account at the time (for timelines).
        account_id: Option<AccountId>,
        kind: ActivityKind,
        subject: String,
        body: Option<String>,
        occurred_at: DateTime<Utc>,
        duration_minutes: Option<u32>,
        outcome: Option<String>,
        opportunity_id: Option<OpportunityId>,
        case_id: Option<CaseId>,
    },
    TaskCompleted {
        activity_id: ActivityId,
        outcome: Option<String>,
        occurred_at: DateTime<Utc>,
    },
}

impl_aggregate!(Contact, ContactCommand, ContactEvent, "contact", {
    ContactCreated,
    ContactUpdated,
    ActivityLogged,
    TaskCompleted,
});

impl Contact {
    fn apply_event(&mut self, event: ContactEvent) {
        use ContactEvent::*;
        match event {
            ContactCreated {
                contact_id,
                account_id,
                name,
                email,
                phone,
                title,
                preferred_channel,
                occurred_at,
            } => {
                *self = Contact {
                    id: Some(contact_id),
                    account_id,
                    name,
                    email,
                    phone,
                    title,
                    preferred_channel,
                    created_at: Some(occurred_at),
                    ..Default::default()
                };
            }
            ContactUpdated { changes, .. } => {
                for c in changes {
                    match c.field.as_str() {
                        "account_id" => self.account_id = c.new_as(),
                        "name" => self.name = c.new_as().unwrap_or_default(),
                        "email" => self.email = c.new_as(),
                        "phone" => self.phone = c.new_as(),
                        "title" => self.title = c.new_as(),
                        "preferred_channel" => self.preferred_channel = c.new_as(),
                        _ => {}
                    }
                }
            }
            ActivityLogged {
                activity_id,
                kind,
                occurred_at,
                ..
            } => {
                if kind == ActivityKind::Task {
                    self.open_tasks.insert(activity_id);
                }
                self.recent_activities.push_back(activity_id);
                while self.recent_activities.len() > RECENT_ACTIVITY_WINDOW {
                    self.recent_activities.pop_front();
                }
                self.activity_count += 1;
                if self.last_activity_at.is_none_or(|t| occurred_at > t) {
                    self.last_activity_at = Some(occurred_at);
                }
            }
            TaskCompleted { activity_id, .. } => {
                self.open_tasks.remove(&activity_id);
            }
        }
    }

    fn knows_activity(&self, id: &ActivityId) -> bool {
        self.open_tasks.contains(id) || self.recent_activities.contains(id)
    }
}

impl CrmAggregate for Contact {
    fn exists(&self) -> bool {
        self.id.is_some()
    }

    fn decide(&self, command: ContactCommand) -> Result<Vec<ContactEvent>, DomainError> {
        use ContactCommand::*;
        if !matches!(command, CreateContact { .. }) {
            require_exists(self.exists())?;
        }
        match command {
            CreateContact {
                id,
                account_id,
                name,
                email,
                phone,
                title,
                preferred_channel,
                occurred_at,
            } => {
                require_new(self.exists())?;
                Ok(vec![ContactEvent::ContactCreated {
                    contact_id: id,
                    account_id,
                    name,
                    email,
                    phone,
                    title,
                    preferred_channel,
                    occurred_at,
                }])
            }
            UpdateContact {
                account_id,
                name,
                email,
                phone,
                title,
                preferred_channel,
                occurred_at,
            } => {
                let mut c = ChangeSet::new();
                c.track(
                    "account_id",
                    &self.account_id,
                    account_id.map(Some).as_ref(),
                );
                c.track("name", &self.name, name.as_ref());
                c.track("email", &self.email, email.map(Some).as_ref());
                c.track("phone", &self.phone, phone.map(Some).as_ref());
                c.track("title", &self.title, title.map(Some).as_ref());
                c.track(
                    "preferred_channel",
                    &self.preferred_channel,
                    preferred_channel.map(Some).as_ref(),
                );
                if c.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![ContactEvent::ContactUpdated {
                    changes: c.into_vec(),
                    occurred_at,
                }])
            }
            LogActivity {
                activity_id,
                kind,
                subject,
                body,
                occurred_at,
                duration_minutes,
                outcome,
                opportunity_id,
                case_id,
            } => {
                if self.knows_activity(&activity_id) {
                    return Err(DomainError::illegal(format!(
                        "activity {activity_id} is already logged"
                    )));
                }
                if kind == ActivityKind::Task && self.open_tasks.len() >= MAX_OPEN_TASKS {
                    return Err(DomainError::illegal(format!(
                        "contact has {MAX_OPEN_TASKS} open tasks; complete some first"
                    )));
                }
                Ok(vec![ContactEvent::ActivityLogged {
                    activity_id,
                    account_id: self.account_id,
                    kind,
                    subject,
                    body,
                    occurred_at,
                    duration_minutes,
                    outcome,
                    opportunity_id,
                    case_id,
                }])
            }
            CompleteTask {
                activity_id,
                outcome,
                occurred_at,
            } => {
                if self.open_tasks.contains(&activity_id) {
                    Ok(vec![ContactEvent::TaskCompleted {
                        activity_id,
                        outcome,
                        occurred_at,
                    }])
                } else if self.recent_activities.contains(&activity_id) {
                    Err(DomainError::illegal(format!(
                        "activity {activity_id} is not an open task"
                    )))
                } else {
                    Err(DomainError::field(
                        "activity_id",
                        format!("unknown activity {activity_id}"),
                    ))
                }
            }
        }
    }
}

// ------------------------------------------------------------------ inputs

/// `POST /v1/contacts`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateContactInput {
    pub id: Option<Uuid>,
    pub account_id: Option<Uuid>,
    pub name: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub title: Option<String>,
    /// email | phone | sms | chat | in_person.
    pub preferred_channel: Option<String>,
}

impl CreateContactInput {
    pub fn into_command(
        self,
        id: ContactId,
        now: DateTime<Utc>,
    ) -> Result<ContactCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let name = errs.check("name", required_text(&self.name, NAME_MAX));
        let email = errs.check("email", optional(self.email.as_deref(), Email::parse));
        let phone = errs.check("phone", optional(self.phone.as_deref(), Phone::parse));
        let title = errs.check("title", optional_text(self.title.as_deref(), NAME_MAX));
        let preferred_channel = errs.check(
            "preferred_channel",
            optional(self.preferred_channel.as_deref(), ContactChannel::parse),
        );
        errs.into_result(ContactCommand::CreateContact {
            id,
            account_id: self.account_id.map(AccountId::new),
            name,
            email,
            phone,
            title,
            preferred_channel,
            occurred_at: now,
        })
    }
}

/// `PATCH /v1/contacts/{id}`: any subset of the fields (at least one).
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateContactInput {
    pub account_id: Option<Uuid>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub title: Option<String>,
    pub preferred_channel: Option<String>,
}

impl UpdateContactInput {
    /// An empty body is a field error on `""`.
    pub fn into_command(self, now: DateTime<Utc>) -> Result<ContactCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        if self.account_id.is_none()
            && self.name.is_none()
            && self.email.is_none()
            && self.phone.is_none()
            && self.title.is_none()
            && self.preferred_channel.is_none()
        {
            errs.add("", "at least one field is required");
        }
        let name = self
            .name
            .as_deref()
            .and_then(|v| errs.check_opt("name", required_text(v, NAME_MAX)));
        let email = self
            .email
            .as_deref()
            .and_then(|v| errs.check_opt("email", Email::parse(v)));
        let phone = self
            .phone
            .as_deref()
            .and_then(|v| errs.check_opt("phone", Phone::parse(v)));
        let title = self
            .title
            .as_deref()
            .and_then(|v| errs.check_opt("title", required_text(v, NAME_MAX)));
        let preferred_channel = self
            .preferred_channel
            .as_deref()
            .and_then(|v| errs.check_opt("preferred_channel", ContactChannel::parse(v)));
        errs.into_result(ContactCommand::UpdateContact {
            account_id: self.account_id.map(AccountId::new),
            name,
            email,
            phone,
            title,
            preferred_channel,
            occurred_at: now,
        })
    }
}

/// `POST /v1/contacts/{id}/activities`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogActivityInput {
    /// Activity id (the server makes one when absent).
    pub id: Option<Uuid>,
    /// call | email | meeting | note | task.
    pub kind: String,
    pub subject: String,
    pub body: Option<String>,
    /// Defaults to now. May lie in the future (e.g. a scheduled task).
    pub occurred_at: Option<DateTime<Utc>>,
    pub duration_minutes: Option<u32>,
    pub outcome: Option<String>,
    pub opportunity_id: Option<Uuid>,
    pub case_id: Option<Uuid>,
}

impl LogActivityInput {
    pub fn into_command(
        self,
        activity_id: ActivityId,
        now: DateTime<Utc>,
    ) -> Result<ContactCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let kind = errs.check("kind", ActivityKind::parse(&self.kind));
        let subject = errs.check("subject", required_text(&self.subject, SUBJECT_MAX));
        let body = errs.check("body", optional_text(self.body.as_deref(), BODY_MAX));
        let duration_minutes = self.duration_minutes.and_then(|d| {
            errs.check_opt(
                "duration_minutes",
                if d > MAX_DURATION_MINUTES {
                    Err(format!("must be at most {MAX_DURATION_MINUTES}"))
                } else {
                    Ok(d)
                },
            )
        });
        let outcome = errs.check(
            "outcome",
            optional_text(self.outcome.as_deref(), REASON_MAX),
        );
        errs.into_result(ContactCommand::LogActivity {
            activity_id,
            kind,
            subject,
            body,
            occurred_at: self.occurred_at.unwrap_or(now),
            duration_minutes,
            outcome,
            opportunity_id: self.opportunity_id.map(OpportunityId::new),
            case_id: self.case_id.map(CaseId::new),
        })
    }
}

/// Completes an open task activity of a contact.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompleteTaskInput {
    pub activity_id: Uuid,
    pub outcome: Option<String>,
}

impl CompleteTaskInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<ContactCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let outcome = errs.check(
            "outcome",
            optional_text(self.outcome.as_deref(), REASON_MAX),
        );
        errs.into_result(ContactCommand::CompleteTask {
            activity_id: ActivityId::new(self.activity_id),
            outcome,
            occurred_at: now,
        })
    }
}

#[cfg(test)]
mod tests;
