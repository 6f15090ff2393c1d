//! Compiles the .proto files with protox (pure Rust: no system `protoc`).
//!
//! The read-model messages of `queries.proto` also derive `serde::Deserialize`
//! from the JSON document of their HTTP route (same field names), so the gRPC
//! front converts an answer with one `serde_json::from_slice`; free-form JSON
//! values land as JSON text in their `*_json` fields (see `crate::json_text`).

/// Messages decoded from a read route's JSON answer.
const FROM_JSON: [&str; 13] = [
    "Money",
    "PipelineStage",
    "PipelineBoard",
    "ContactRef",
    "OpenOpportunities",
    "LastContact",
    "NextTask",
    "CustomerSummary",
    "TimelineEntry",
    "TimelinePage",
    "FieldChange",
    "AuditEntry",
    "AuditPage",
];

/// `*_json` fields: (field path, the JSON document's key).
const JSON_TEXT: [(&str, &str); 3] = [
    ("TimelineEntry.details_json", "details"),
    ("FieldChange.old_json", "old"),
    ("FieldChange.new_json", "new"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/crm/v1/events.proto",
        "proto/crm/v1/commands.proto",
        "proto/crm/v1/queries.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let mut config = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true);
    for message in FROM_JSON {
        config = config.type_attribute(
            format!(".crm.v1.{message}"),
            "#[derive(serde::Deserialize)] #[serde(default)]",
        );
    }
    for (field, key) in JSON_TEXT {
        config = config.field_attribute(
            format!(".crm.v1.{field}"),
            format!("#[serde(rename = \"{key}\", deserialize_with = \"crate::json_text\")]"),
        );
    }
    config.compile_fds(descriptors)?;
    Ok(())
}
