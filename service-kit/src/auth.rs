//! Bearer tokens: issuing and verifying HS256 tokens signed with the
//! configured secret, roles, and which role may send which command.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::problem::Problem;

/// The secret must be long enough that guessing it is hopeless.
pub const MIN_SECRET_BYTES: usize = 32;

/// What a role may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Leads, accounts, contacts and opportunities.
    Sales,
    /// Cases, and activities with contacts.
    Support,
    /// Business reads only (analysts, managers): no audit trail, no raw log.
    Viewer,
    /// Every read, including the audit trail and the raw log; no commands.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Sales,
        Role::Support,
        Role::Viewer,
        Role::Auditor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Sales => "sales",
            Role::Support => "support",
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
        }
    }

    /// Whether this role may send commands to streams of `stream_type`.
    pub fn may_command(self, stream_type: &str, command: &str) -> bool {
        match self {
            Role::Admin => true,
            Role::Sales => matches!(stream_type, "lead" | "account" | "contact" | "opportunity"),
            Role::Support => {
                stream_type == "case"
                    || (stream_type == "contact"
                        && matches!(command, "log_activity" | "complete_task"))
            }
            Role::Viewer | Role::Auditor => false,
        }
    }
}

/// What a read route shows, for the read policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadArea {
    /// Board, forecast and analytics.
    Pipeline,
    /// Record views of leads, accounts, contacts, opportunities, cases.
    Records,
    /// 360 summaries and timelines.
    Customers,
    /// Case due times and breaches.
    ServiceLevels,
    /// The audit trail: who changed what.
    Audit,
    /// The raw log: stream histories, time travel, the global and live feeds
    /// (as revealing as the audit trail: actors and every field).
    Log,
    /// Projection positions and failures.
    Projections,
}

impl Role {
    /// Auditors and admins see everything; the others see the read models of
    /// their work, never the audit trail or the raw log (which reveals as much).
    pub fn may_read(self, area: ReadArea) -> bool {
        match self {
            Role::Admin | Role::Auditor => true,
            Role::Viewer => !matches!(area, ReadArea::Audit | ReadArea::Log),
            Role::Sales => matches!(
                area,
                ReadArea::Pipeline
                    | ReadArea::Records
                    | ReadArea::Customers
                    | ReadArea::Projections
            ),
            Role::Support => matches!(
                area,
                ReadArea::Records
                    | ReadArea::Customers
                    | ReadArea::ServiceLevels
                    | ReadArea::Projections
            ),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == value)
            .ok_or_else(|| {
                format!("unknown role `{value}`; expected one of admin, sales, support, viewer, auditor")
            })
    }
}

/// Claims carried by a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The actor: who sends the commands.
    pub sub: String,
    pub roles: Vec<Role>,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub iat: i64,
    pub exp: i64,
}

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

/// The tenant of a single-organisation installation.
pub const DEFAULT_TENANT: &str = "default";

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub roles: Vec<Role>,
    pub tenant: String,
}

impl Actor {
    pub fn may_command(&self, stream_type: &str, command: &str) -> bool {
        self.roles
            .iter()
            .any(|role| role.may_command(stream_type, command))
    }

    pub fn require_command(&self, stream_type: &str, command: &str) -> Result<(), Problem> {
        if self.may_command(stream_type, command) {
            Ok(())
        } else {
            let roles: Vec<&str> = self.roles.iter().map(|role| role.as_str()).collect();
            Err(Problem::forbidden(format!(
                "roles [{}] may not send `{command}` to {stream_type} streams",
                roles.join(", ")
            )))
        }
    }
}

impl Actor {
    pub fn require_read(&self, area: ReadArea) -> Result<(), Problem> {
        if self.roles.iter().any(|role| role.may_read(area)) {
            Ok(())
        } else {
            let roles: Vec<&str> = self.roles.iter().map(|role| role.as_str()).collect();
            Err(Problem::forbidden(format!(
                "roles [{}] may not read {area:?}",
                roles.join(", ")
            )))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token secret must be at least {MIN_SECRET_BYTES} bytes")]
    WeakSecret,
    #[error("actor name must be 1..=200 characters")]
    BadActor,
    #[error("a token needs at least one role")]
    NoRole,
    #[error("could not sign the token: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
}

/// Signs and verifies tokens with one shared secret.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tokens(..)")
    }
}

impl Tokens {
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::WeakSecret);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    pub fn issue(
        &self,
        actor: &str,
        roles: &[Role],
        valid_for: chrono::Duration,
    ) -> Result<String, TokenError> {
        let actor = actor.trim();
        if actor.is_empty() || actor.chars().count() > 200 {
            return Err(TokenError::BadActor);
        }
        if roles.is_empty() {
            return Err(TokenError::NoRole);
        }
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: actor.to_string(),
            roles: roles.to_vec(),
            tenant: default_tenant(),
            iat: now,
            exp: now + valid_for.num_seconds(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    pub fn verify(&self, token: &str) -> Result<Actor, Problem> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|error| Problem::unauthorized(format!("invalid bearer token: {error}")))?;
        let claims = data.claims;
        if claims.roles.is_empty() {
            return Err(Problem::unauthorized("the token carries no role"));
        }
        Ok(Actor {
            name: claims.sub,
            roles: claims.roles,
            tenant: claims.tenant,
        })
    }
}

impl<S> FromRequestParts<S> for Actor
where
    S: Send + Sync,
    Arc<Tokens>: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let tokens = Arc::<Tokens>::from_ref(state);
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            Problem::unauthorized(
                "send `Authorization: Bearer <token>`; `crm token issue` prints one",
            )
        })?;
        let value = header
            .to_str()
            .map_err(|_| Problem::unauthorized("the Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| Problem::unauthorized("the Authorization scheme must be Bearer"))?;
        tokens.verify(token.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(&[7u8; 32]).unwrap()
    }

    #[test]
    fn issued_tokens_verify_with_actor_and_roles() {
        let token = tokens()
            .issue("alice", &[Role::Sales], chrono::Duration::hours(1))
            .unwrap();
        let actor = tokens().verify(&token).unwrap();
        assert_eq!(actor.name, "alice");
        assert_eq!(actor.roles, vec![Role::Sales]);
        assert_eq!(actor.tenant, DEFAULT_TENANT);
    }

    #[test]
    fn a_token_signed_with_another_secret_is_rejected() {
        let other = Tokens::new(&[8u8; 32]).unwrap();
        let token = other
            .issue("mallory", &[Role::Admin], chrono::Duration::hours(1))
            .unwrap();
        assert_eq!(tokens().verify(&token).unwrap_err().status, 401);
    }

    #[test]
    fn expired_tokens_are_rejected() {
        let token = tokens()
            .issue("bob", &[Role::Admin], chrono::Duration::hours(-2))
            .unwrap();
        assert_eq!(tokens().verify(&token).unwrap_err().status, 401);
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(Tokens::new(b"short"), Err(TokenError::WeakSecret)));
    }

    #[test]
    fn only_auditors_and_admins_read_the_audit_trail_and_the_log() {
        for area in [ReadArea::Audit, ReadArea::Log] {
            assert!(Role::Admin.may_read(area) && Role::Auditor.may_read(area));
            assert!(!Role::Viewer.may_read(area));
            assert!(!Role::Sales.may_read(area) && !Role::Support.may_read(area));
        }
        assert!(
            Role::Sales.may_read(ReadArea::Pipeline) && !Role::Support.may_read(ReadArea::Pipeline)
        );
        assert!(
            Role::Support.may_read(ReadArea::ServiceLevels)
                && !Role::Sales.may_read(ReadArea::ServiceLevels)
        );
    }

    #[test]
    fn roles_gate_commands_by_stream_type() {
        assert!(Role::Sales.may_command("opportunity", "advance"));
        assert!(!Role::Sales.may_command("case", "open"));
        assert!(Role::Support.may_command("case", "resolve"));
        assert!(Role::Support.may_command("contact", "log_activity"));
        assert!(!Role::Support.may_command("contact", "create"));
        assert!(!Role::Viewer.may_command("lead", "capture"));
        assert!(!Role::Auditor.may_command("lead", "capture"));
        assert!(Role::Admin.may_command("account", "archive"));
    }
}
