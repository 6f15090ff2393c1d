//! The account aggregate: a customer organisation with its details, owner
//! and archived flag.

use crate::aggregate::{impl_aggregate, require_exists, require_new, CrmAggregate};
use crate::changes::{ChangeSet, FieldChange};
use crate::error::{DomainError, ValidationErrors};
use crate::ids::AccountId;
use crate::values::{
    optional_text, required_text, AccountKind, Address, AddressInput, Segment, NAME_MAX, REASON_MAX,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Largest accepted employee count.
pub const MAX_EMPLOYEES: u32 = 10_000_000;

/// Current state of an account.
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub id: Option<AccountId>,
    pub name: String,
    pub kind: AccountKind,
    pub industry: Option<String>,
    pub segment: Option<Segment>,
    pub employees: Option<u32>,
    pub address: Option<Address>,
    pub website: Option<String>,
    pub owner: Option<String>,
    pub archived: bool,
    pub registered_at: Option<DateTime<Utc>>,
}

/// Validated account commands.
#[derive(Clone, Debug, PartialEq)]
pub enum AccountCommand {
    RegisterAccount {
        id: AccountId,
        name: String,
        kind: AccountKind,
        industry: Option<String>,
        segment: Option<Segment>,
        employees: Option<u32>,
        address: Option<Address>,
        website: Option<String>,
        owner: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    /// A PATCH: only given fields change. Produces, in order and atomically:
    /// `AccountRestored` (archived: false on an archived account),
    /// `AccountDetailsUpdated` (changed details), `AccountOwnerAssigned`
    /// (changed owner), `AccountArchived` (archived: true on an active
    /// account). `archived` equal to the current state is a no-op. Changing
    /// details or owner of an archived account without restoring it in the
    /// same patch is an `IllegalTransition`.
    UpdateAccount {
        name: Option<String>,
        kind: Option<AccountKind>,
        industry: Option<String>,
        segment: Option<Segment>,
        employees: Option<u32>,
        address: Option<Address>,
        website: Option<String>,
        owner: Option<String>,
        archived: Option<bool>,
        occurred_at: DateTime<Utc>,
    },
    AssignAccountOwner {
        owner: String,
        occurred_at: DateTime<Utc>,
    },
    ArchiveAccount {
        reason: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    RestoreAccount {
        occurred_at: DateTime<Utc>,
    },
}

/// Account events (`{"type":"AccountRegistered", ...}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type")]
// Events are short-lived payloads; boxing the address would only complicate the API.
#[allow(clippy::large_enum_variant)]
pub enum AccountEvent {
    AccountRegistered {
        account_id: AccountId,
        name: String,
        kind: AccountKind,
        industry: Option<String>,
        segment: Option<Segment>,
        employees: Option<u32>,
        address: Option<Address>,
        website: Option<String>,
        owner: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    AccountDetailsUpdated {
        changes: Vec<FieldChange>,
        occurred_at: DateTime<Utc>,
    },
    AccountOwnerAssigned {
        from: Option<String>,
        to: String,
        occurred_at: DateTime<Utc>,
    },
    AccountArchived {
        reason: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    AccountRestored {
        occurred_at: DateTime<Utc>,
    },
}

impl_aggregate!(Account, AccountCommand, AccountEvent, "account", {
    AccountRegistered,
    AccountDetailsUpdated,
    AccountOwnerAssigned,
    AccountArchived,
    AccountRestored,
});

const ARCHIVED: &str = "account is archived; restore it first";

impl Account {
    fn apply_event(&mut self, event: AccountEvent) {
        use AccountEvent::*;
        match event {
            AccountRegistered {
                account_id,
                name,
                kind,
                industry,
                segment,
                employees,
                address,
                website,
                owner,
                occurred_at,
            } => {
                *self = Account {
                    id: Some(account_id),
                    name,
                    kind,
                    industry,
                    segment,
                    employees,
                    address,
                    website,
                    owner,
                    archived: false,
                    registered_at: Some(occurred_at),
                };
            }
            AccountDetailsUpdated { changes, .. } => {
                for c in changes {
                    match c.field.as_str() {
                        "name" => self.name = c.new_as().unwrap_or_default(),
                        "kind" => self.kind = c.new_as().unwrap_or_default(),
                        "industry" => self.industry = c.new_as(),
                        "segment" => self.segment = c.new_as(),
                        "employees" => self.employees = c.new_as(),
                        "address" => self.address = c.new_as(),
                        "website" => self.website = c.new_as(),
                        _ => {}
                    }
                }
            }
            AccountOwnerAssigned { to, .. } => self.owner = Some(to),
            AccountArchived { .. } => self.archived = true,
            AccountRestored { .. } => self.archived = false,
        }
    }
}

impl CrmAggregate for Account {
    fn exists(&self) -> bool {
        self.id.is_some()
    }

    fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, DomainError> {
        use AccountCommand::*;
        if !matches!(command, RegisterAccount { .. }) {
            require_exists(self.exists())?;
        }
        match command {
            RegisterAccount {
                id,
                name,
                kind,
                industry,
                segment,
                employees,
                address,
                website,
                owner,
                occurred_at,
            } => {
                require_new(self.exists())?;
                Ok(vec![AccountEvent::AccountRegistered {
                    account_id: id,
                    name,
                    kind,
                    industry,
                    segment,
                    employees,
                    address,
                    website,
                    owner,
                    occurred_at,
                }])
            }
            UpdateAccount {
                name,
                kind,
                industry,
                segment,
                employees,
                address,
                website,
                owner,
                archived,
                occurred_at,
            } => {
                let mut events = Vec::new();
                let mut is_archived = self.archived;
                if archived == Some(false) && is_archived {
                    events.push(AccountEvent::AccountRestored { occurred_at });
                    is_archived = false;
                }
                let mut c = ChangeSet::new();
                c.track("name", &self.name, name.as_ref());
                c.track("kind", &self.kind, kind.as_ref());
                c.track("industry", &self.industry, industry.map(Some).as_ref());
                c.track("segment", &self.segment, segment.map(Some).as_ref());
                c.track("employees", &self.employees, employees.map(Some).as_ref());
                c.track("address", &self.address, address.map(Some).as_ref());
                c.track("website", &self.website, website.map(Some).as_ref());
                if !c.is_empty() {
                    if is_archived {
                        return Err(DomainError::illegal(ARCHIVED));
                    }
                    events.push(AccountEvent::AccountDetailsUpdated {
                        changes: c.into_vec(),
                        occurred_at,
                    });
                }
                if let Some(to) = owner.filter(|o| Some(o) != self.owner.as_ref()) {
                    if is_archived {
                        return Err(DomainError::illegal(ARCHIVED));
                    }
                    events.push(AccountEvent::AccountOwnerAssigned {
                        from: self.owner.clone(),
                        to,
                        occurred_at,
                    });
                }
                if archived == Some(true) && !is_archived {
                    events.push(AccountEvent::AccountArchived {
                        reason: None,
                        occurred_at,
                    });
                }
                Ok(events)
            }
            AssignAccountOwner { owner, occurred_at } => {
                if self.archived {
                    return Err(DomainError::illegal(ARCHIVED));
                }
                if self.owner.as_ref() == Some(&owner) {
                    return Ok(vec![]);
                }
                Ok(vec![AccountEvent::AccountOwnerAssigned {
                    from: self.owner.clone(),
                    to: owner,
                    occurred_at,
                }])
            }
            ArchiveAccount {
                reason,
                occurred_at,
            } => {
                if self.archived {
                    return Err(DomainError::illegal("account is already archived"));
                }
                Ok(vec![AccountEvent::AccountArchived {
                    reason,
                    occurred_at,
                }])
            }
            RestoreAccount { occurred_at } => {
                if !self.archived {
                    return Err(DomainError::illegal("account is not archived"));
                }
                Ok(vec![AccountEvent::AccountRestored { occurred_at }])
            }
        }
    }
}

// ------------------------------------------------------------------ inputs

fn check_employees(n: u32) -> Result<u32, String> {
    if n > MAX_EMPLOYEES {
        Err(format!("must be at most {MAX_EMPLOYEES}"))
    } else {
        Ok(n)
    }
}

/// `POST /v1/accounts`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterAccountInput {
    pub id: Option<Uuid>,
    pub name: String,
    /// customer | prospect | partner | distributor (default customer).
    pub kind: Option<String>,
    pub industry: Option<String>,
    /// b2b | b2c.
    pub segment: Option<String>,
    pub employees: Option<u32>,
    pub address: Option<AddressInput>,
    pub website: Option<String>,
    pub owner: Option<String>,
}

impl RegisterAccountInput {
    pub fn into_command(
        self,
        id: AccountId,
        now: DateTime<Utc>,
    ) -> Result<AccountCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let name = errs.check("name", required_text(&self.name, NAME_MAX));
        let kind = errs.check("kind", AccountKind::parse_or_default(self.kind.as_deref()));
        let industry = errs.check(
            "industry",
            optional_text(self.industry.as_deref(), NAME_MAX),
        );
        let segment = errs.check(
            "segment",
            crate::values::optional(self.segment.as_deref(), Segment::parse),
        );
        let employees = self
            .employees
            .and_then(|n| errs.check_opt("employees", check_employees(n)));
        let address = self
            .address
            .as_ref()
            .map(|a| a.validate("address", &mut errs))
            .filter(|a| !a.is_empty());
        let website = errs.check("website", optional_text(self.website.as_deref(), NAME_MAX));
        let owner = errs.check("owner", optional_text(self.owner.as_deref(), NAME_MAX));
        errs.into_result(AccountCommand::RegisterAccount {
            id,
            name,
            kind,
            industry,
            segment,
            employees,
            address,
            website,
            owner,
            occurred_at: now,
        })
    }
}

/// `PATCH /v1/accounts/{id}`: any subset of the fields (at least one).
/// `archived: true|false` archives/restores in the same command.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateAccountInput {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub industry: Option<String>,
    pub segment: Option<String>,
    pub employees: Option<u32>,
    pub address: Option<AddressInput>,
    pub website: Option<String>,
    pub owner: Option<String>,
    pub archived: Option<bool>,
}

impl UpdateAccountInput {
    /// Returns ONE `AccountCommand::UpdateAccount` (not a Vec): its events
    /// (restore / details / owner / archive) are decided and appended
    /// atomically. An empty body is a field error on `""`.
    pub fn into_command(self, now: DateTime<Utc>) -> Result<AccountCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        if self.name.is_none()
            && self.kind.is_none()
            && self.industry.is_none()
            && self.segment.is_none()
            && self.employees.is_none()
            && self.address.is_none()
            && self.website.is_none()
            && self.owner.is_none()
            && self.archived.is_none()
        {
            errs.add("", "at least one field is required");
        }
        let name = self
            .name
            .as_deref()
            .and_then(|v| errs.check_opt("name", required_text(v, NAME_MAX)));
        let kind = self
            .kind
            .as_deref()
            .and_then(|v| errs.check_opt("kind", AccountKind::parse(v)));
        let industry = self
            .industry
            .as_deref()
            .and_then(|v| errs.check_opt("industry", required_text(v, NAME_MAX)));
        let segment = self
            .segment
            .as_deref()
            .and_then(|v| errs.check_opt("segment", Segment::parse(v)));
        let employees = self
            .employees
            .and_then(|n| errs.check_opt("employees", check_employees(n)));
        let address = self
            .address
            .as_ref()
            .map(|a| a.validate("address", &mut errs));
        let website = self
            .website
            .as_deref()
            .and_then(|v| errs.check_opt("website", required_text(v, NAME_MAX)));
        let owner = self
            .owner
            .as_deref()
            .and_then(|v| errs.check_opt("owner", required_text(v, NAME_MAX)));
        errs.into_result(AccountCommand::UpdateAccount {
            name,
            kind,
            industry,
            segment,
            employees,
            address,
            website,
            owner,
            archived: self.archived,
            occurred_at: now,
        })
    }
}

/// Body of an explicit archive (optional reason).
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArchiveAccountInput {
    pub reason: Option<String>,
}

impl ArchiveAccountInput {
    pub fn into_command(self, now: DateTime<Utc>) -> Result<AccountCommand, ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let reason = errs.check("reason", optional_text(self.reason.as_deref(), REASON_MAX));
        errs.into_result(AccountCommand::ArchiveAccount {
            reason,
            occurred_at: now,
        })
    }
}

#[cfg(test)]
mod tests;
