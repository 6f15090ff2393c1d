//! Shared by the CRM's HTTP services (commands and queries):
//! - [`auth`]: bearer tokens, actors and roles
//! - [`problem`]: RFC 9457 problem+json errors
//! - [`http`]: the shared HTTP stack (fallbacks, tracing, panic safety)

pub mod auth;
pub mod http;
pub mod problem;
