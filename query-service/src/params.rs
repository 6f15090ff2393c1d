//! Query-string parsing for the log-backed routes: problems that name the
//! offending field, and the bounded `min_position` wait.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use crm_domain::error::FieldError;
use crm_eventlog::{EventLog, LogError};
use crm_service_kit::problem::Problem;
use serde::de::DeserializeOwned;

/// The query string, or a 400 naming `query` (unknown or repeated parameter).
pub fn query<T: DeserializeOwned>(query: Result<Query<T>, QueryRejection>) -> Result<T, Problem> {
    query
        .map(|Query(value)| value)
        .map_err(|rejection| Problem::bad_request("query", rejection.body_text()))
}

/// Collects field errors of one request, then answers them all at once (422).
#[derive(Debug, Default)]
pub struct Fields {
    errors: Vec<FieldError>,
}

impl Fields {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// An integer in `min..=max`, or `None` when absent (the error is recorded).
    pub fn integer(&mut self, field: &str, raw: Option<&str>, min: i64, max: i64) -> Option<i64> {
        let raw = raw?;
        match raw.trim().parse::<i64>() {
            Ok(value) if (min..=max).contains(&value) => Some(value),
            Ok(_) if max == i64::MAX => {
                self.add(field, format!("must be an integer >= {min}"));
                None
            }
            _ if max == i64::MAX => {
                self.add(field, format!("must be an integer >= {min}, got `{raw}`"));
                None
            }
            Ok(_) => {
                self.add(field, format!("must be an integer in {min}..={max}"));
                None
            }
            Err(_) => {
                self.add(
                    field,
                    format!("must be an integer in {min}..={max}, got `{raw}`"),
                );
                None
            }
        }
    }

    /// `Ok(())` when no error was recorded, else a 422 problem listing them.
    pub fn finish(self) -> Result<(), Problem> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Problem::validation(self.errors))
        }
    }
}

/// Waits until the log's head has reached `min_position` (read your writes),
/// at most `timeout`; then 503 naming the current position.
pub async fn wait_for_position(
    log: &EventLog,
    min_position: i64,
    timeout: Duration,
) -> Result<(), Problem> {
    match log.wait_for_position(min_position, timeout).await {
        Ok(()) => Ok(()),
        Err(LogError::NotYet { head, wanted }) => Err(Problem::unavailable(format!(
            "the event log is at position {head}, below min_position {wanted}; retry later"
        ))),
        Err(error) => Err(Problem::from_log(&error)),
    }
}
