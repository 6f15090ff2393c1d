//! Shared by the CRM's HTTP services (commands and queries):
//! - [`auth`]: bearer tokens, actors and roles
//! - [`problem`]: RFC 9457 problem+json errors

pub mod auth;
pub mod problem;
