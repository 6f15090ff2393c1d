//! Protobuf and gRPC types of the CRM: the bus envelope, the command API
//! (`CommandService`) and the main queries (`QueryService`), generated at build
//! time from `proto/`, with servers and clients (`command_service_client`,
//! `query_service_client`).

/// Version 1 of the CRM protocol.
pub mod v1 {
    tonic::include_proto!("crm.v1");
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
}
