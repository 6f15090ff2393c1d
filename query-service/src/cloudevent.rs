//! A recorded event in CloudEvents 1.0 JSON form (the global and live feeds,
//! and anything else that publishes log events).
//!
//! Attributes: `specversion` "1.0"; `id` the event id (UUID v7);
//! `source` `/crm/<tenant>/<stream_type>/<stream_id>`; `type`
//! `crm.<stream_type>.<EventType>`; `subject` the stream id; `time` the
//! server's `recorded_at` (RFC 3339, UTC, microseconds); `datacontenttype`
//! `application/json`; `data` the payload as stored.
//!
//! Extension attributes (lowercase alphanumeric names, per the spec):
//! - `sequence`: the global position as a zero-padded 20-digit **string**, so it
//!   orders lexicographically as the CloudEvents `sequence` extension requires;
//! - `position`: the same global position as a JSON **number** (what
//!   `after` / `Last-Event-ID` take);
//! - `streamversion`: the event's version within its stream (number);
//! - `schemaversion`: the payload's schema version (number);
//! - `actor`, `correlationid`, `causationid`: from the event's metadata, as
//!   strings, present only when the metadata carries them.

use chrono::SecondsFormat;
use crm_eventlog::RecordedEvent;
use serde_json::{json, Map, Value};

/// CloudEvents spec version emitted.
pub const SPEC_VERSION: &str = "1.0";

/// `crm.<stream_type>.<EventType>`: the CloudEvent `type` (and SSE event name).
pub fn event_type(event: &RecordedEvent) -> String {
    format!("crm.{}.{}", event.stream_type, event.event_type)
}

/// The `sequence` extension value of a position: 20 zero-padded digits.
pub fn sequence(position: i64) -> String {
    format!("{position:020}")
}

/// `event` as a CloudEvents 1.0 JSON object (see the module docs for the attributes).
pub fn cloud_event(event: &RecordedEvent) -> Value {
    let mut object = Map::new();
    object.insert("specversion".into(), json!(SPEC_VERSION));
    object.insert("id".into(), json!(event.event_id.to_string()));
    object.insert(
        "source".into(),
        json!(format!(
            "/crm/{}/{}/{}",
            event.tenant_id, event.stream_type, event.stream_id
        )),
    );
    object.insert("type".into(), json!(event_type(event)));
    object.insert("subject".into(), json!(event.stream_id));
    object.insert(
        "time".into(),
        json!(event
            .recorded_at
            .to_rfc3339_opts(SecondsFormat::Micros, true)),
    );
    object.insert("datacontenttype".into(), json!("application/json"));
    object.insert("sequence".into(), json!(sequence(event.position)));
    object.insert("position".into(), json!(event.position));
    object.insert("streamversion".into(), json!(event.version));
    object.insert("schemaversion".into(), json!(event.schema_version));
    for (attribute, key) in [
        ("actor", "actor"),
        ("correlationid", "correlation_id"),
        ("causationid", "causation_id"),
    ] {
        if let Some(value) = metadata_text(&event.metadata, key) {
            object.insert(attribute.into(), json!(value));
        }
    }
    object.insert("data".into(), event.payload.clone());
    Value::Object(object)
}

/// A metadata entry as CloudEvents attribute text (strings and numbers only).
fn metadata_text(metadata: &Value, key: &str) -> Option<String> {
    match metadata.get(key)? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn recorded(metadata: Value) -> RecordedEvent {
        RecordedEvent {
            position: 42,
            event_id: uuid::Uuid::from_u128(7),
            tenant_id: "default".into(),
            stream_type: "opportunity".into(),
            stream_id: "0190e0b0-0000-7000-8000-000000000001".into(),
            version: 3,
            event_type: "OpportunityWon".into(),
            schema_version: 1,
            payload: json!({"type": "OpportunityWon"}),
            metadata,
            recorded_at: Utc.with_ymd_and_hms(2026, 11, 20, 9, 30, 0).unwrap(),
            prev_hash: None,
            hash: None,
        }
    }

    #[test]
    fn maps_every_attribute() {
        let event = recorded(json!({
            "actor": "alice", "correlation_id": "corr-1", "causation_id": "cause-1", "roles": ["sales"]
        }));
        let ce = cloud_event(&event);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "00000000-0000-0000-0000-000000000007");
        assert_eq!(
            ce["source"],
            "/crm/default/opportunity/0190e0b0-0000-7000-8000-000000000001"
        );
        assert_eq!(ce["type"], "crm.opportunity.OpportunityWon");
        assert_eq!(ce["subject"], "0190e0b0-0000-7000-8000-000000000001");
        assert_eq!(ce["time"], "2026-11-20T09:30:00.000000Z");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["sequence"], "00000000000000000042");
        assert_eq!(ce["position"], 42);
        assert_eq!(ce["streamversion"], 3);
        assert_eq!(ce["actor"], "alice");
        assert_eq!(ce["correlationid"], "corr-1");
        assert_eq!(ce["causationid"], "cause-1");
        assert_eq!(ce["data"], json!({"type": "OpportunityWon"}));
    }

    #[test]
    fn extension_names_are_lowercase_alphanumeric_and_absent_metadata_is_omitted() {
        let ce = cloud_event(&recorded(json!({"actor": null})));
        let object = ce.as_object().unwrap();
        assert!(!object.contains_key("actor"));
        assert!(!object.contains_key("correlationid"));
        for name in object.keys() {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "{name}"
            );
        }
    }

    #[test]
    fn sequences_order_lexicographically() {
        assert!(sequence(9) < sequence(10));
        assert!(sequence(99_999) < sequence(100_000));
    }
}
