//! Error types of the domain: field-level validation errors and the
//! `DomainError` every aggregate returns.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One invalid field of a request body. `field` is the JSON path of the
/// field in the request (`email`, `amount.currency`,
/// `opportunity.amount.amount`); `""` means the body as a whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// All field errors found while validating one request (never just the
/// first one).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// A set holding exactly one error.
    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![FieldError::new(field, message)])
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// The field paths that failed, in order.
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.field.as_str()).collect()
    }

    /// Whether `field` has at least one error.
    pub fn has(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field == field)
    }

    /// Append all errors of `other`.
    pub fn extend(&mut self, other: ValidationErrors) {
        self.0.extend(other.0);
    }

    /// Record the error of `result` (if any) under `field`; returns the value
    /// or `T::default()` so validation can continue and collect more errors.
    pub fn check<T: Default>(&mut self, field: &str, result: Result<T, String>) -> T {
        match result {
            Ok(v) => v,
            Err(message) => {
                self.add(field, message);
                T::default()
            }
        }
    }

    /// Like [`check`](Self::check) but returns `None` on error (for values
    /// without a sensible default).
    pub fn check_opt<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.add(field, message);
                None
            }
        }
    }

    /// `Ok(value)` when no error was recorded, else `Err(self)`.
    pub fn into_result<T>(self, value: T) -> Result<T, Self> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            if e.field.is_empty() {
                f.write_str(&e.message)?;
            } else {
                write!(f, "{}: {}", e.field, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// The error of every aggregate command.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum DomainError {
    /// The command carried invalid fields.
    #[error("validation failed: {0}")]
    Validation(ValidationErrors),
    /// A command other than creation on an aggregate that was never created.
    #[error("not found")]
    NotFound,
    /// A creation command on an aggregate that already exists.
    #[error("already exists")]
    AlreadyExists,
    /// The command is not allowed in the aggregate's current state.
    #[error("{0}")]
    IllegalTransition(String),
}

impl DomainError {
    /// A validation error on a single field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(ValidationErrors::single(field, message))
    }

    pub fn illegal(message: impl Into<String>) -> Self {
        Self::IllegalTransition(message.into())
    }
}

impl From<ValidationErrors> for DomainError {
    fn from(e: ValidationErrors) -> Self {
        Self::Validation(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_and_displays_errors() {
        let mut e = ValidationErrors::new();
        assert!(e.is_empty());
        e.add("email", "is invalid");
        e.add("amount.currency", "unknown currency");
        assert_eq!(e.fields(), vec!["email", "amount.currency"]);
        assert_eq!(
            e.to_string(),
            "email: is invalid; amount.currency: unknown currency"
        );
        assert!(e.clone().into_result(1).is_err());
        assert_eq!(ValidationErrors::new().into_result(1), Ok(1));
        let d: DomainError = e.into();
        assert!(d.to_string().starts_with("validation failed: email"));
    }

    #[test]
    fn check_records_errors_and_continues() {
        let mut e = ValidationErrors::new();
        let a: String = e.check("a", Err("bad".into()));
        let b: u32 = e.check("b", Ok(3));
        let c: Option<u8> = e.check_opt("c", Err("worse".into()));
        assert_eq!((a.as_str(), b, c), ("", 3, None));
        assert_eq!(e.fields(), vec!["a", "c"]);
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!([{"field":"a","message":"bad"},{"field":"c","message":"worse"}])
        );
    }
}
