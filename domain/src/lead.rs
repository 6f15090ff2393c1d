//! The lead aggregate (new -> qualified -> converted, or disqualified) and
//! the pure planner that turns a lead conversion into account, contact and
//! opportunity commands.

use crate::account::AccountCommand;
use crate::aggregate::{impl_aggregate, require_exists, require_new, CrmAggregate};
use crate::contact::ContactCommand;
use crate::error::{DomainError, ValidationErrors};
use crate::ids::{AccountId, ContactId, LeadId, OpportunityId};
use crate::opportunity::{validate_pipeline_stage, OpportunityCommand, UNASSIGNED_OWNER};
use crate::values::{
    optional, optional_text, parse_date, required_text, AccountKind, ContactChannel, Email,
    LeadSource, MoneyInput, Phone, NAME_MAX, REASON_MAX,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Lifecycle status of a lead.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LeadStatus {
    #[default]
    New,
    Qualified,
    Disqualified,
    Converted,
}

impl LeadStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Qualified => "qualified",
            Self::Disqualified => "disqualified",
            Self::Converted => "converted",
        }
    }

    /// Converted and disqualified leads accept no further command.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Disqualified | Self::Converted)
    }
}

/// What a converted lead became.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvertedTo {
    pub account_id: AccountId,
    pub contact_id: ContactId,
    pub opportunity_id: Option<OpportunityId>,
}

/// Current state of a lead.
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lead {
    pub id: Option<LeadId>,
    pub status: LeadStatus,
    pub name: String,
    pub company: Option<String>,
    pub email: Option<Email>,
    pub phone: Option<Phone>,
    pub source: LeadSource,
    pub captured_at: Option<DateTime<Utc>>,
    pub qualified_at: Option<DateTime<Utc>>,
    pub disqualified_reason: Option<String>,
    pub converted_to: Option<ConvertedTo>,
    pub closed_at: Option<DateTime<Utc>>,
}

/// Validated lead commands.
#[derive(Clone, Debug, PartialEq)]
pub enum LeadCommand {
    CaptureLead {
        id: LeadId,
        name: String,
        company: Option<String>,
        email: Option<Email>,
        phone: Option<Phone>,
        source: LeadSource,
        occurred_at: DateTime<Utc>,
    },
    QualifyLead {
        occurred_at: DateTime<Utc>,
    },
    DisqualifyLead {
        reason: String,
        occurred_at: DateTime<Utc>,
    },
    /// Records what the lead became; build it with [`plan_conversion`].
    ConvertLead {
        account_id: AccountId,
        /// The account was created by this conversion (not an existing one).
        account_created: bool,
        contact_id: ContactId,
        opportunity_id: Option<OpportunityId>,
        occurred_at: DateTime<Utc>,
    },
}

/// Lead events (`{"type":"LeadCaptured", ...}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type")]
pub enum LeadEvent {
    LeadCaptured {
        lead_id: LeadId,
        name: String,
        company: Option<String>,
        email: Option<Email>,
        phone: Option<Phone>,
        source: LeadSource,
        occurred_at: DateTime<Utc>,
    },
    LeadQualified {
        from: LeadStatus,
        occurred_at: DateTime<Utc>,
    },
    LeadDisqualified {
        from: LeadStatus,
        reason: String,
        occurred_at: DateTime<Utc>,
    },
    LeadConverted {
        from: LeadStatus,
        account_id: AccountId,
        account_created: bool,
        contact_id: ContactId,
        opportunity_id: Option<OpportunityId>,
        occurred_at: DateTime<Utc>,
    },
}

impl_aggregate!(Lead, LeadCommand, LeadEvent, "lead", {
    LeadCaptured,
    LeadQualified,
    LeadDisqualified,
    LeadConverted,
});

impl Lead {
    fn apply_event(&mut self, event: LeadEvent) {
        use LeadEvent::*;
        match event {
            LeadCaptured {
                lead_id,
                name,
                company,
                email,
                phone,
                source,
                occurred_at,
            } => {
                *self = Lead {
                    id: Some(lead_id),
                    status: LeadStatus::New,
                    name,
                    company,
                    email,
                    phone,
                    source,
                    captured_at: Some(occurred_at),
                    ..Default::default()
                };
            }
            LeadQualified { occurred_at, .. } => {
                self.status = LeadStatus::Qualified;
                self.qualified_at = Some(occurred_at);
            }
            LeadDisqualified {
                reason,
                occurred_at,
                ..
            } => {
                self.status = LeadStatus::Disqualified;
                self.disqualified_reason = Some(reason);
                self.closed_at = Some(occurred_at);
            }
            LeadConverted {
                account_id,
                contact_id,
                opportunity_id,
                occurred_at,
                ..
            } => {
                self.status = LeadStatus::Converted;
                self.converted_to = Some(ConvertedTo {
                    account_id,
                    contact_id,
                    opportunity_id,
                });
                self.closed_at = Some(occurred_at);
            }
        }
    }

    /// `Ok` when a command other than capture may run on this lead.
    fn require_active(&self) -> Result<(), DomainError> {
        require_exists(self.exists())?;
        if self.status.is_final() {
            return Err(DomainError::illegal(format!(
                "lead is {}; no further changes are allowed",
                self.status.as_str()
            )));
        }
        Ok(())
    }
}

impl CrmAggregate for Lead {
    fn exists(&self) -> bool {
        self.id.is_some()
    }

    fn decide(&self, command: LeadCommand) -> Result<Vec<LeadEvent>, DomainError> {
        use LeadCommand::*;
        match command {
            CaptureLead {
                id,
                name,
                company,
                email,
                phone,
                source,
                occurred_at,
            } => {
                require_new(self.exists())?;
                if email.is_none() && phone.is_none() {
                    return Err(DomainError::field("email", "email or phone is required"));
                }
                Ok(vec![LeadEvent::LeadCaptured {
                    lead_id: id,
                    name,
                    company,
                    email,
                    phone,
                    source,
                    occurred_at,
                }])
            }
            QualifyLead { occurred_at } => {
                self.require_active()?;
                if self.status != LeadStatus::New {
                    return Err(DomainError::illegal(format!(
                        "only a new lead can be qualified; this lead is {}",
                        self.status.as_str()
                    )));
                }
                Ok(vec![LeadEvent::LeadQualified {
                    from: self.status,
                    occurred_at,
                }])
            }
            DisqualifyLead {
                reason,
                occurred_at,
            } => {
                self.require_active()?;
                let reason = required_text(&reason, REASON_MAX)
                    .map_err(|m| DomainError::field("reason", m))?;
                Ok(vec![LeadEvent::LeadDisqualified {
                    from: self.status,
                    reason,
                    occurred_at,
                }])
            }
            ConvertLead {
                account_id,
                account_created,
                contact_id,
                opportunity_id,
                occurred_at,
            } => {
                self.require_active()?;
                Ok(vec![LeadEvent::LeadConverted {
                    from: self.status,
                    account_id,
                    account_created,
                    contact_id,
                    opportunity_id,
                    occurred_at,
                }])
            }
        }
    }
}

// ------------------------------------------------------------------ inputs

/// `POST /v1/leads`. Requires a name and at least one of email / phone.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CaptureLeadInput {
    pub id: Option<Uuid>,
    pub name: String,
    pub company: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    /// web_form | email | phone | social | referral | event | newsletter |
    /// import | other (default other).
    pub source: Option<String>,
}

impl CaptureLeadInput {
    pub fn into_command(
        self,
        id: LeadId,
        now: DateTime<Utc>,
    ) -> Result<LeadCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let name = errs.check("name", required_text(&self.name, NAME_MAX));
        let company = errs.check("company", optional_text(self.company.as_deref(), NAME_MAX));
        let email = errs.check("email", optional(self.email.as_deref(), Email::parse));
        let phone = errs.check("phone", optional(self.phone.as_deref(), Phone::parse));
        let blank = |v: &Option<String>| v.as_deref().is_none_or(|s| s.trim().is_empty());
        if blank(&self.email) && blank(&self.phone) {
            errs.add("email", "email or phone is required");
        }
        let source = errs.check(
            "source",
            LeadSource::parse_or_default(self.source.as_deref()),
        );
        errs.into_result(LeadCommand::CaptureLead {
            id,
            name,
            company,
            email,
            phone,
            source,
            occurred_at: now,
        })
    }
}

/// `POST /v1/leads/{id}/qualify` with `{}`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QualifyLeadInput {}

impl QualifyLeadInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<LeadCommand, ValidationErrors> {
        Ok(LeadCommand::QualifyLead { occurred_at: now })
    }
}

/// `POST /v1/leads/{id}/disqualify`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DisqualifyLeadInput {
    pub reason: String,
}

impl DisqualifyLeadInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<LeadCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let reason = errs.check("reason", required_text(&self.reason, REASON_MAX));
        errs.into_result(LeadCommand::DisqualifyLead {
            reason,
            occurred_at: now,
        })
    }
}

/// `POST /v1/leads/{id}/convert`; see [`plan_conversion`].
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConvertLeadInput {
    /// Attach the contact to this existing account instead of creating one.
    pub account_id: Option<Uuid>,
    /// Owner of the new account and opportunity (opportunity default "unassigned").
    pub owner: Option<String>,
    pub opportunity: Option<ConvertOpportunityInput>,
}

/// The optional opportunity created by a lead conversion.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConvertOpportunityInput {
    pub name: String,
    pub amount: MoneyInput,
    /// `YYYY-MM-DD`.
    pub expected_close: String,
    /// Open stage of the default pipeline (default: first stage).
    pub stage: Option<String>,
}

/// Fresh ids the caller allocates for a conversion (unused ones are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConversionIds {
    pub account_id: AccountId,
    pub contact_id: ContactId,
    pub opportunity_id: OpportunityId,
}

/// The commands a conversion runs: the lead's own `ConvertLead`, and the
/// commands creating the account (unless an existing one was given), the
/// contact and the optional opportunity.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    pub lead: LeadCommand,
    pub account: Option<(AccountId, AccountCommand)>,
    pub contact: (ContactId, ContactCommand),
    pub opportunity: Option<(OpportunityId, OpportunityCommand)>,
}

/// Plans a lead conversion from the lead's data (pure). The account is
/// named after the company (or the lead's name) and registered as a
/// `prospect`; the contact takes the lead's name, email and phone; the
/// opportunity (if requested) opens on that account in the default pipeline
/// with owner = `input.owner` or "unassigned". Errors: `NotFound` for a
/// lead never captured, `IllegalTransition` for a converted/disqualified
/// lead, `Validation` (all fields, e.g. `opportunity.amount.amount`).
pub fn plan_conversion(
    lead: &Lead,
    input: ConvertLeadInput,
    ids: ConversionIds,
    now: DateTime<Utc>,
) -> Result<Conversion, DomainError> {
    lead.require_active()?;
    let mut errs = ValidationErrors::new();
    let owner = errs.check("owner", optional_text(input.owner.as_deref(), NAME_MAX));
    let opportunity = input.opportunity.as_ref().map(|o| {
        let name = errs.check("opportunity.name", required_text(&o.name, NAME_MAX));
        let amount = o.amount.validate("opportunity.amount", &mut errs);
        let expected_close =
            errs.check_opt("opportunity.expected_close", parse_date(&o.expected_close));
        let (pipeline, stage) =
            validate_pipeline_stage(None, o.stage.as_deref(), "opportunity.", &mut errs);
        (name, amount, expected_close, pipeline, stage)
    });
    if !errs.is_empty() {
        return Err(errs.into());
    }

    let account_id = input
        .account_id
        .map(AccountId::new)
        .unwrap_or(ids.account_id);
    let account = input.account_id.is_none().then(|| {
        (
            account_id,
            AccountCommand::RegisterAccount {
                id: account_id,
                name: lead.company.clone().unwrap_or_else(|| lead.name.clone()),
                kind: AccountKind::Prospect,
                industry: None,
                segment: None,
                employees: None,
                address: None,
                website: None,
                owner: owner.clone(),
                occurred_at: now,
            },
        )
    });
    let contact = (
        ids.contact_id,
        ContactCommand::CreateContact {
            id: ids.contact_id,
            account_id: Some(account_id),
            name: lead.name.clone(),
            email: lead.email.clone(),
            phone: lead.phone.clone(),
            title: None,
            preferred_channel: Some(if lead.email.is_some() {
                ContactChannel::Email
            } else {
                ContactChannel::Phone
            }),
            occurred_at: now,
        },
    );
    let opportunity = match opportunity {
        Some((name, Some(amount), Some(expected_close), pipeline, stage)) => Some((
            ids.opportunity_id,
            OpportunityCommand::OpenOpportunity {
                id: ids.opportunity_id,
                account_id,
                name,
                amount,
                expected_close,
                owner: owner.unwrap_or_else(|| UNASSIGNED_OWNER.to_string()),
                pipeline,
                stage,
                occurred_at: now,
            },
        )),
        _ => None,
    };
    let lead_cmd = LeadCommand::ConvertLead {
        account_id,
        account_created: account.is_some(),
        contact_id: ids.contact_id,
        opportunity_id: opportunity.as_ref().map(|(id, _)| *id),
        occurred_at: now,
    };
    Ok(Conversion {
        lead: lead_cmd,
        account,
        contact,
        opportunity,
    })
}

#[cfg(test)]
mod tests;
