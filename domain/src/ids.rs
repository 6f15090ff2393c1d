//! Typed identifiers of aggregates and activities (newtypes over UUID).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        #[serde(transparent)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        pub struct $name(Uuid);

        impl $name {
            pub const fn new(id: Uuid) -> Self {
                Self(id)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

id_type!(
    /// Identifies a lead stream.
    LeadId
);
id_type!(
    /// Identifies an account stream.
    AccountId
);
id_type!(
    /// Identifies a contact stream.
    ContactId
);
id_type!(
    /// Identifies an opportunity stream.
    OpportunityId
);
id_type!(
    /// Identifies a case stream.
    CaseId
);
id_type!(
    /// Identifies an activity logged on a contact (not a stream of its own).
    ActivityId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_plain_uuid_strings() {
        let u = Uuid::from_u128(0x1234);
        let id = OpportunityId::new(u);
        assert_eq!(id.as_uuid(), u);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{u}\""));
        let back: OpportunityId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert_eq!(id.to_string().parse::<OpportunityId>().unwrap(), id);
        assert!("nope".parse::<LeadId>().is_err());
    }
}
