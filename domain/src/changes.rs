//! Field-level change records carried by update events (old -> new), and
//! the builder that computes them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One field an update changed, with its JSON value before and after.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FieldChange {
    pub field: String,
    pub old: Value,
    pub new: Value,
}

impl FieldChange {
    /// The new value decoded as `T` (used when applying update events).
    pub fn new_as<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_value(self.new.clone()).ok()
    }
}

/// Collects the changes of an update; unchanged fields are omitted.
#[derive(Default, Debug)]
pub struct ChangeSet(Vec<FieldChange>);

impl ChangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `field` when `new` is given and differs from `old`.
    pub fn track<T: Serialize + PartialEq>(&mut self, field: &str, old: &T, new: Option<&T>) {
        if let Some(new) = new {
            if new != old {
                self.0.push(FieldChange {
                    field: field.to_string(),
                    old: to_json(old),
                    new: to_json(new),
                });
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<FieldChange> {
        self.0
    }
}

/// JSON value of a serializable domain value (domain values always serialize).
pub fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tracks_only_real_changes() {
        let mut c = ChangeSet::new();
        c.track("name", &"a".to_string(), Some(&"b".to_string()));
        c.track(
            "title",
            &Some("x".to_string()),
            Some(&Some("x".to_string())),
        );
        c.track("phone", &None::<String>, None);
        let v = c.into_vec();
        assert_eq!(
            v,
            vec![FieldChange {
                field: "name".into(),
                old: json!("a"),
                new: json!("b")
            }]
        );
        assert_eq!(v[0].new_as::<String>().as_deref(), Some("b"));
    }
}
