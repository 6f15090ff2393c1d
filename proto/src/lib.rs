//! Protobuf and gRPC types of the CRM: the bus envelope, the command API
//! (`CommandService`) and the main queries (`QueryService`), generated at build
//! time from `proto/`, with servers and clients (`command_service_client`,
//! `query_service_client`). The read-model messages (`PipelineBoard`,
//! `CustomerSummary`, `TimelinePage`, `AuditPage` and their parts) also
//! deserialize from their HTTP route's JSON document.

/// Version 1 of the CRM protocol.
pub mod v1 {
    tonic::include_proto!("crm.v1");
}

/// Any JSON value as its JSON text (`null` for null): how free-form values
/// (event details, a changed field's old and new value) travel in `*_json`
/// string fields.
pub fn json_text<'de, D>(deserializer: D) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = <serde_json::Value as serde::Deserialize>::deserialize(deserializer)?;
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::EventEnvelope;

    #[test]
    fn the_envelope_round_trips_through_its_wire_form() {
        let envelope = EventEnvelope {
            global_position: 42,
            event_id: "0190a0a0-0000-7000-8000-000000000000".into(),
            stream_type: "opportunity".into(),
            version: 3,
            payload_json: r#"{"type":"OpportunityWon"}"#.into(),
            ..Default::default()
        };
        let decoded = EventEnvelope::decode(envelope.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, envelope);
    }

    #[test]
    fn read_models_decode_from_their_json_documents() {
        use super::v1::{AuditPage, Money, PipelineBoard};
        let board: PipelineBoard = serde_json::from_str(
            r#"{"pipeline":"default","owner":null,"count":1,"unknown":true,
                "stages":[{"stage":"proposal","probability":50,"count":1,
                  "total":[{"amount":"10.00","currency":"USD"}],"weighted":[]}],
                "total":[{"amount":"10.00","currency":"USD"}],"weighted":[]}"#,
        )
        .unwrap();
        assert_eq!(board.owner, None);
        assert_eq!(board.stages[0].probability, 50);
        assert_eq!(
            board.total,
            [Money {
                amount: "10.00".into(),
                currency: "USD".into()
            }]
        );
        let page: AuditPage = serde_json::from_str(
            r#"{"items":[{"position":3,"event_id":"e","recorded_at":"t","roles":["admin"],
                "stream_type":"account","stream_id":"a","version":2,"event_type":"AccountUpdated",
                "changes":[{"field":"name","old":"Acme","new":{"x":[1]}},{"field":"owner","old":null,"new":"bob"}]}],
                "next_cursor":null}"#,
        )
        .unwrap();
        let changes = &page.items[0].changes;
        assert_eq!(changes[0].old_json, r#""Acme""#);
        assert_eq!(changes[0].new_json, r#"{"x":[1]}"#);
        assert_eq!(changes[1].old_json, "null");
        assert_eq!(page.items[0].occurred_at, None);
        assert_eq!(page.next_cursor, None);
    }
}
