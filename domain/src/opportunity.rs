//! The opportunity aggregate: a deal on an account moving through a sales
//! pipeline (open stages, then won or lost, possibly reopened).

use crate::aggregate::{impl_aggregate, require_exists, require_new, CrmAggregate};
use crate::changes::{ChangeSet, FieldChange};
use crate::error::{DomainError, ValidationErrors};
use crate::ids::{AccountId, OpportunityId};
use crate::pipeline::{self, PipelineDefinition, CLOSED_LOST, CLOSED_WON, DEFAULT_PIPELINE};
use crate::values::{
    occurred_at, optional_text, parse_date, required_text, Money, MoneyInput, NAME_MAX, REASON_MAX,
};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Owner recorded when none is given.
pub const UNASSIGNED_OWNER: &str = "unassigned";

/// Lifecycle status of an opportunity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OpportunityStatus {
    #[default]
    Open,
    Won,
    Lost,
}

impl OpportunityStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Won => "won",
            Self::Lost => "lost",
        }
    }
}

/// Current state of an opportunity (bounded: no history lists).
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Opportunity {
    pub id: Option<OpportunityId>,
    pub account_id: Option<AccountId>,
    pub name: String,
    pub amount: Option<Money>,
    pub expected_close: Option<NaiveDate>,
    pub owner: String,
    pub pipeline: String,
    pub stage: String,
    pub probability: u8,
    pub status: OpportunityStatus,
    pub close_value: Option<Money>,
    /// The open stage the opportunity was in when it was won or lost.
    pub stage_before_close: Option<String>,
    pub lost_reason: Option<String>,
    pub competitor: Option<String>,
    pub opened_at: Option<DateTime<Utc>>,
    pub stage_entered_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
}

/// Validated opportunity commands. Every command on an existing
/// opportunity is rejected (validation error on `occurred_at`) when its
/// `occurred_at` lies before the instant the opportunity entered its current
/// stage (for a closed one: before it was closed); see
/// [`Opportunity::earliest_occurred_at`].
#[derive(Clone, Debug, PartialEq)]
pub enum OpportunityCommand {
    OpenOpportunity {
        id: OpportunityId,
        account_id: AccountId,
        name: String,
        amount: Money,
        expected_close: NaiveDate,
        owner: String,
        pipeline: String,
        stage: String,
        occurred_at: DateTime<Utc>,
    },
    AdvanceStage {
        stage: String,
        reason: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    /// Only the given fields are changed.
    UpdateOpportunity {
        name: Option<String>,
        amount: Option<Money>,
        expected_close: Option<NaiveDate>,
        owner: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    WinOpportunity {
        close_value: Money,
        occurred_at: DateTime<Utc>,
    },
    LoseOpportunity {
        reason: String,
        competitor: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    /// Back to `stage` or, when `None`, to the stage before close.
    ReopenOpportunity {
        reason: Option<String>,
        stage: Option<String>,
        occurred_at: DateTime<Utc>,
    },
}

/// Opportunity events (`{"type":"OpportunityStageAdvanced", ...}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type")]
pub enum OpportunityEvent {
    OpportunityOpened {
        opportunity_id: OpportunityId,
        account_id: AccountId,
        name: String,
        amount: Money,
        expected_close: NaiveDate,
        owner: String,
        pipeline: String,
        stage: String,
        probability: u8,
        occurred_at: DateTime<Utc>,
    },
    OpportunityStageAdvanced {
        from: String,
        to: String,
        probability: u8,
        reason: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    OpportunityUpdated {
        changes: Vec<FieldChange>,
        occurred_at: DateTime<Utc>,
    },
    OpportunityWon {
        from: String,
        to: String,
        probability: u8,
        close_value: Money,
        occurred_at: DateTime<Utc>,
    },
    OpportunityLost {
        from: String,
        to: String,
        probability: u8,
        reason: String,
        competitor: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    OpportunityReopened {
        previous_status: OpportunityStatus,
        from: String,
        to: String,
        probability: u8,
        reason: Option<String>,
        occurred_at: DateTime<Utc>,
    },
}

impl_aggregate!(Opportunity, OpportunityCommand, OpportunityEvent, "opportunity", {
    OpportunityOpened,
    OpportunityStageAdvanced,
    OpportunityUpdated,
    OpportunityWon,
    OpportunityLost,
    OpportunityReopened,
});

fn find_pipeline(name: &str) -> Result<&'static PipelineDefinition, DomainError> {
    pipeline::find(name)
        .ok_or_else(|| DomainError::field("pipeline", format!("unknown pipeline '{name}'")))
}

impl Opportunity {
    pub fn is_open(&self) -> bool {
        self.status == OpportunityStatus::Open
    }

    fn pipeline_def(&self) -> Result<&'static PipelineDefinition, DomainError> {
        find_pipeline(&self.pipeline)
    }

    fn require_open(&self) -> Result<(), DomainError> {
        if self.is_open() {
            Ok(())
        } else {
            Err(DomainError::illegal(format!(
                "opportunity is closed ({}); reopen it first",
                self.status.as_str()
            )))
        }
    }

    /// The earliest instant a command on this (existing) opportunity may
    /// carry: when it entered its current stage (for a closed opportunity,
    /// when it was closed). Earlier `occurred_at` values would make
    /// time-in-stage and sales-cycle durations negative.
    pub fn earliest_occurred_at(&self) -> Option<DateTime<Utc>> {
        let entered = if self.is_open() {
            self.stage_entered_at
        } else {
            self.closed_at.or(self.stage_entered_at)
        };
        entered.or(self.opened_at)
    }

    /// `Err(Validation)` on `occurred_at` when it lies before
    /// [`earliest_occurred_at`](Self::earliest_occurred_at); equal is fine.
    fn require_not_backdated(&self, occurred_at: DateTime<Utc>) -> Result<(), DomainError> {
        match self.earliest_occurred_at() {
            Some(earliest) if occurred_at < earliest => {
                let what = if self.is_open() {
                    format!("entered its current stage ({})", self.stage)
                } else {
                    format!("was closed ({})", self.status.as_str())
                };
                Err(DomainError::field(
                    "occurred_at",
                    format!(
                        "must not be before {}, when the opportunity {what}",
                        earliest.to_rfc3339_opts(SecondsFormat::AutoSi, true)
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    fn apply_event(&mut self, event: OpportunityEvent) {
        use OpportunityEvent::*;
        match event {
            OpportunityOpened {
                opportunity_id,
                account_id,
                name,
                amount,
                expected_close,
                owner,
                pipeline,
                stage,
                probability,
                occurred_at,
            } => {
                *self = Opportunity {
                    id: Some(opportunity_id),
                    account_id: Some(account_id),
                    name,
                    amount: Some(amount),
                    expected_close: Some(expected_close),
                    owner,
                    pipeline,
                    stage,
                    probability,
                    status: OpportunityStatus::Open,
                    opened_at: Some(occurred_at),
                    stage_entered_at: Some(occurred_at),
                    ..Default::default()
                };
            }
            OpportunityStageAdvanced {
                to,
                probability,
                occurred_at,
                ..
            } => {
                self.stage = to;
                self.probability = probability;
                self.stage_entered_at = Some(occurred_at);
            }
            OpportunityUpdated { changes, .. } => {
                for c in changes {
                    match c.field.as_str() {
                        "name" => self.name = c.new_as().unwrap_or_default(),
                        "amount" => self.amount = c.new_as(),
                        "expected_close" => self.expected_close = c.new_as(),
                        "owner" => self.owner = c.new_as().unwrap_or_default(),
                        _ => {}
                    }
                }
            }
            OpportunityWon {
                from,
                to,
                probability,
                close_value,
                occurred_at,
            } => {
                self.status = OpportunityStatus::Won;
                self.stage_before_close = Some(from);
                self.stage = to;
                self.probability = probability;
                self.close_value = Some(close_value);
                self.closed_at = Some(occurred_at);
                self.stage_entered_at = Some(occurred_at);
            }
            OpportunityLost {
                from,
                to,
                probability,
                reason,
                competitor,
                occurred_at,
            } => {
                self.status = OpportunityStatus::Lost;
                self.stage_before_close = Some(from);
                self.stage = to;
                self.probability = probability;
                self.lost_reason = Some(reason);
                self.competitor = competitor;
                self.closed_at = Some(occurred_at);
                self.stage_entered_at = Some(occurred_at);
            }
            OpportunityReopened {
                to,
                probability,
                occurred_at,
                ..
            } => {
                self.status = OpportunityStatus::Open;
                self.stage = to;
                self.probability = probability;
                self.close_value = None;
                self.stage_before_close = None;
                self.lost_reason = None;
                self.competitor = None;
                self.closed_at = None;
                self.stage_entered_at = Some(occurred_at);
            }
        }
    }
}

impl CrmAggregate for Opportunity {
    fn exists(&self) -> bool {
        self.id.is_some()
    }

    fn decide(&self, command: OpportunityCommand) -> Result<Vec<OpportunityEvent>, DomainError> {
        use OpportunityCommand::*;
        if !matches!(command, OpenOpportunity { .. }) {
            require_exists(self.exists())?;
        }
        match command {
            OpenOpportunity {
                id,
                account_id,
                name,
                amount,
                expected_close,
                owner,
                pipeline,
                stage,
                occurred_at,
            } => {
                require_new(self.exists())?;
                let def = find_pipeline(&pipeline)?;
                if !def.is_open_stage(&stage) {
                    return Err(DomainError::field("stage", def.open_stage_message()));
                }
                let probability = def.probability(&stage).unwrap_or(0);
                Ok(vec![OpportunityEvent::OpportunityOpened {
                    opportunity_id: id,
                    account_id,
                    name,
                    amount,
                    expected_close,
                    owner,
                    pipeline,
                    stage,
                    probability,
                    occurred_at,
                }])
            }
            AdvanceStage {
                stage,
                reason,
                occurred_at,
            } => {
                self.require_open()?;
                let def = self.pipeline_def()?;
                if !def.is_open_stage(&stage) {
                    return Err(DomainError::field("stage", def.open_stage_message()));
                }
                if stage == self.stage {
                    return Err(DomainError::illegal(format!(
                        "opportunity is already in stage {stage}"
                    )));
                }
                self.require_not_backdated(occurred_at)?;
                Ok(vec![OpportunityEvent::OpportunityStageAdvanced {
                    from: self.stage.clone(),
                    probability: def.probability(&stage).unwrap_or(0),
                    to: stage,
                    reason,
                    occurred_at,
                }])
            }
            UpdateOpportunity {
                name,
                amount,
                expected_close,
                owner,
                occurred_at,
            } => {
                self.require_open()?;
                self.require_not_backdated(occurred_at)?;
                let mut c = ChangeSet::new();
                c.track("name", &self.name, name.as_ref());
                c.track("amount", &self.amount, amount.map(Some).as_ref());
                c.track(
                    "expected_close",
                    &self.expected_close,
                    expected_close.map(Some).as_ref(),
                );
                c.track("owner", &self.owner, owner.as_ref());
                if c.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![OpportunityEvent::OpportunityUpdated {
                    changes: c.into_vec(),
                    occurred_at,
                }])
            }
            WinOpportunity {
                close_value,
                occurred_at,
            } => {
                self.require_open()?;
                self.require_not_backdated(occurred_at)?;
                Ok(vec![OpportunityEvent::OpportunityWon {
                    from: self.stage.clone(),
                    to: CLOSED_WON.to_string(),
                    probability: self.pipeline_def()?.probability(CLOSED_WON).unwrap_or(100),
                    close_value,
                    occurred_at,
                }])
            }
            LoseOpportunity {
                reason,
                competitor,
                occurred_at,
            } => {
                self.require_open()?;
                let reason = required_text(&reason, REASON_MAX)
                    .map_err(|m| DomainError::field("reason", m))?;
                self.require_not_backdated(occurred_at)?;
                Ok(vec![OpportunityEvent::OpportunityLost {
                    from: self.stage.clone(),
                    to: CLOSED_LOST.to_string(),
                    probability: self.pipeline_def()?.probability(CLOSED_LOST).unwrap_or(0),
                    reason,
                    competitor,
                    occurred_at,
                }])
            }
            ReopenOpportunity {
                reason,
                stage,
                occurred_at,
            } => {
                if self.is_open() {
                    return Err(DomainError::illegal(
                        "opportunity is open; only won or lost opportunities can be reopened",
                    ));
                }
                let def = self.pipeline_def()?;
                let to = match stage {
                    Some(s) if def.is_open_stage(&s) => s,
                    Some(_) => return Err(DomainError::field("stage", def.open_stage_message())),
                    None => self
                        .stage_before_close
                        .clone()
                        .filter(|s| def.is_open_stage(s))
                        .unwrap_or_else(|| def.first_stage().to_string()),
                };
                self.require_not_backdated(occurred_at)?;
                Ok(vec![OpportunityEvent::OpportunityReopened {
                    previous_status: self.status,
                    from: self.stage.clone(),
                    probability: def.probability(&to).unwrap_or(0),
                    to,
                    reason,
                    occurred_at,
                }])
            }
        }
    }
}

// ------------------------------------------------------------------ inputs

/// `POST /v1/opportunities`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OpenOpportunityInput {
    pub id: Option<Uuid>,
    pub account_id: Uuid,
    pub name: String,
    pub amount: MoneyInput,
    /// `YYYY-MM-DD`.
    pub expected_close: String,
    /// Defaults to "unassigned".
    pub owner: Option<String>,
    /// Defaults to "default".
    pub pipeline: Option<String>,
    /// Defaults to the pipeline's first stage; must be an open stage.
    pub stage: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

/// Validates pipeline + stage names; errors under `<prefix>pipeline` / `<prefix>stage`.
pub(crate) fn validate_pipeline_stage(
    pipeline: Option<&str>,
    stage: Option<&str>,
    prefix: &str,
    errs: &mut ValidationErrors,
) -> (String, String) {
    let name = pipeline
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_PIPELINE);
    let Some(def) = pipeline::find(name) else {
        errs.add(
            format!("{prefix}pipeline"),
            format!("unknown pipeline '{name}'; allowed: {DEFAULT_PIPELINE}"),
        );
        return (name.to_string(), String::new());
    };
    let stage = match stage.map(str::trim).filter(|s| !s.is_empty()) {
        None => def.first_stage().to_string(),
        Some(s) if def.is_open_stage(s) => s.to_string(),
        Some(_) => {
            errs.add(format!("{prefix}stage"), def.open_stage_message());
            String::new()
        }
    };
    (def.name.clone(), stage)
}

impl OpenOpportunityInput {
    pub fn into_command(
        self,
        id: OpportunityId,
        now: DateTime<Utc>,
    ) -> Result<OpportunityCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let name = errs.check("name", required_text(&self.name, NAME_MAX));
        let amount = self.amount.validate("amount", &mut errs);
        let expected_close = errs.check_opt("expected_close", parse_date(&self.expected_close));
        let owner = errs.check("owner", optional_text(self.owner.as_deref(), NAME_MAX));
        let (pipeline, stage) = validate_pipeline_stage(
            self.pipeline.as_deref(),
            self.stage.as_deref(),
            "",
            &mut errs,
        );
        let occurred_at = errs.check("occurred_at", occurred_at(self.occurred_at, now));
        let (true, Some(amount), Some(expected_close)) = (errs.is_empty(), amount, expected_close)
        else {
            return Err(errs);
        };
        Ok(OpportunityCommand::OpenOpportunity {
            id,
            account_id: AccountId::new(self.account_id),
            name,
            amount,
            expected_close,
            owner: owner.unwrap_or_else(|| UNASSIGNED_OWNER.to_string()),
            pipeline,
            stage,
            occurred_at,
        })
    }
}

/// `POST /v1/opportunities/{id}/advance`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdvanceOpportunityInput {
    pub stage: String,
    pub reason: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl AdvanceOpportunityInput {
    /// The stage is checked against the opportunity's pipeline in `decide`.
    pub fn into_command(self, now: DateTime<Utc>) -> Result<OpportunityCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let stage = errs.check("stage", required_text(&self.stage, NAME_MAX));
        let reason = errs.check("reason", optional_text(self.reason.as_deref(), REASON_MAX));
        let occurred_at = errs.check("occurred_at", occurred_at(self.occurred_at, now));
        errs.into_result(OpportunityCommand::AdvanceStage {
            stage,
            reason,
            occurred_at,
        })
    }
}

/// `PATCH /v1/opportunities/{id}`: any subset of the fields (at least one).
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateOpportunityInput {
    pub name: Option<String>,
    pub amount: Option<MoneyInput>,
    pub expected_close: Option<String>,
    pub owner: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl UpdateOpportunityInput {
    /// An empty body is a field error on `""` (the body).
    pub fn into_command(self, now: DateTime<Utc>) -> Result<OpportunityCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        if self.name.is_none()
            && self.amount.is_none()
            && self.expected_close.is_none()
            && self.owner.is_none()
        {
            errs.add(
                "",
                "at least one of name, amount, expected_close, owner is required",
            );
        }
        let name = self
            .name
            .as_deref()
            .and_then(|n| errs.check_opt("name", required_text(n, NAME_MAX)));
        let amount = self
            .amount
            .as_ref()
            .and_then(|a| a.validate("amount", &mut errs));
        let expected_close = self
            .expected_close
            .as_deref()
            .and_then(|d| errs.check_opt("expected_close", parse_date(d)));
        let owner = self
            .owner
            .as_deref()
            .and_then(|o| errs.check_opt("owner", required_text(o, NAME_MAX)));
        let occurred_at = errs.check("occurred_at", occurred_at(self.occurred_at, now));
        errs.into_result(OpportunityCommand::UpdateOpportunity {
            name,
            amount,
            expected_close,
            owner,
            occurred_at,
        })
    }
}

/// `POST /v1/opportunities/{id}/win`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WinOpportunityInput {
    /// Required.
    pub close_value: Option<MoneyInput>,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl WinOpportunityInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<OpportunityCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let close_value = match &self.close_value {
            None => {
                errs.add("close_value", "is required");
                None
            }
            Some(m) => m.validate("close_value", &mut errs),
        };
        let occurred_at = errs.check("occurred_at", occurred_at(self.occurred_at, now));
        let (true, Some(close_value)) = (errs.is_empty(), close_value) else {
            return Err(errs);
        };
        Ok(OpportunityCommand::WinOpportunity {
            close_value,
            occurred_at,
        })
    }
}

/// `POST /v1/opportunities/{id}/lose`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoseOpportunityInput {
    pub reason: String,
    pub competitor: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl LoseOpportunityInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<OpportunityCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let reason = errs.check("reason", required_text(&self.reason, REASON_MAX));
        let competitor = errs.check(
            "competitor",
            optional_text(self.competitor.as_deref(), NAME_MAX),
        );
        let occurred_at = errs.check("occurred_at", occurred_at(self.occurred_at, now));
        errs.into_result(OpportunityCommand::LoseOpportunity {
            reason,
            competitor,
            occurred_at,
        })
    }
}

/// `POST /v1/opportunities/{id}/reopen`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReopenOpportunityInput {
    pub reason: Option<String>,
    pub stage: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl ReopenOpportunityInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<OpportunityCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let reason = errs.check("reason", optional_text(self.reason.as_deref(), REASON_MAX));
        let stage = errs.check("stage", optional_text(self.stage.as_deref(), NAME_MAX));
        let occurred_at = errs.check("occurred_at", occurred_at(self.occurred_at, now));
        errs.into_result(OpportunityCommand::ReopenOpportunity {
            reason,
            stage,
            occurred_at,
        })
    }
}

#[cfg(test)]
mod tests;
