//! The contract every CRM aggregate fulfils on top of `cqrs_es::Aggregate`:
//! pure decisions (`decide`) separated from state changes (`apply`).

use crate::error::DomainError;

/// A CRM aggregate. `decide` holds all business rules and never mutates;
/// `cqrs_es::Aggregate::handle` only calls `decide` and writes the events.
pub trait CrmAggregate:
    cqrs_es::Aggregate<Error = DomainError, Services = ()> + Clone + std::fmt::Debug
{
    /// The events `command` produces against the current state (possibly
    /// none for a no-op update), or why it is rejected.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// Whether the aggregate has been created.
    fn exists(&self) -> bool;
}

/// Decides `command` and applies the resulting events to `aggregate`;
/// returns the events. On error the aggregate is untouched.
pub fn execute<A: CrmAggregate>(
    aggregate: &mut A,
    command: A::Command,
) -> Result<Vec<A::Event>, DomainError> {
    let events = aggregate.decide(command)?;
    for e in &events {
        aggregate.apply(e.clone());
    }
    Ok(events)
}

/// Folds `events` into a fresh aggregate (replay).
pub fn replay<A: CrmAggregate>(events: impl IntoIterator<Item = A::Event>) -> A {
    let mut a = A::default();
    for e in events {
        a.apply(e);
    }
    a
}

/// Implements `cqrs_es::DomainEvent` (type = variant name, version "1") and
/// `cqrs_es::Aggregate` (handle = decide + write) for an aggregate.
macro_rules! impl_aggregate {
    ($agg:ty, $cmd:ty, $event:ident, $type:literal, { $($variant:ident),+ $(,)? }) => {
        impl cqrs_es::DomainEvent for $event {
            fn event_type(&self) -> String {
                match self {
                    $($event::$variant { .. } => stringify!($variant).to_string(),)+
                }
            }

            fn event_version(&self) -> String {
                "1".to_string()
            }
        }

        impl $event {
            /// All event type names of this aggregate.
            pub const EVENT_TYPES: &'static [&'static str] = &[$(stringify!($variant)),+];
        }

        impl cqrs_es::Aggregate for $agg {
            const TYPE: &'static str = $type;
            type Command = $cmd;
            type Event = $event;
            type Error = $crate::error::DomainError;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _service: &Self::Services,
                sink: &cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                let events = $crate::aggregate::CrmAggregate::decide(self, command)?;
                for event in events {
                    sink.write(event, self).await;
                }
                Ok(())
            }

            fn apply(&mut self, event: Self::Event) {
                self.apply_event(event);
            }
        }
    };
}
pub(crate) use impl_aggregate;

/// `Err(NotFound)` unless the aggregate exists.
pub(crate) fn require_exists(exists: bool) -> Result<(), DomainError> {
    if exists {
        Ok(())
    } else {
        Err(DomainError::NotFound)
    }
}

/// `Err(AlreadyExists)` if the aggregate exists.
pub(crate) fn require_new(exists: bool) -> Result<(), DomainError> {
    if exists {
        Err(DomainError::AlreadyExists)
    } else {
        Ok(())
    }
}
