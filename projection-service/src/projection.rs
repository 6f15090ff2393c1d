//! What a projection is: a name, a schema version, DDL for its tables and a
//! fold of one event into rows, always inside the batch's transaction.

use crm_eventlog::RecordedEvent;
use sqlx::{Any, Transaction};

/// The transaction a batch is folded in (rows + checkpoint commit together).
pub type Tx = Transaction<'static, Any>;

/// Table names of one generation of one projection: rebuilds fill a new
/// generation while the previous one keeps serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    prefix: String,
}

impl Tables {
    pub fn new(projection: &str, generation: i64) -> Self {
        Self {
            prefix: format!("rm_{projection}_g{generation}_"),
        }
    }

    /// The full name of table `base` in this generation.
    pub fn t(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("event {event_id} ({event_type}) does not decode: {message}")]
    Decode {
        event_id: String,
        event_type: String,
        message: String,
    },
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
    /// The checkpoint was no longer where this batch started: another worker
    /// folded the range meanwhile, so this batch was rolled back whole.
    #[error("checkpoint of {name} moved away from {expected}: another worker folded this range")]
    CheckpointMoved { name: String, expected: i64 },
}

/// A read model fed by the log.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name, e.g. `pipeline`; also the prefix of its tables.
    fn name(&self) -> &'static str;

    /// Version of the table layout and fold; bumping it means "rebuild me".
    fn version(&self) -> i64;

    /// Statements creating this generation's tables and indexes.
    fn schema(&self, tables: &Tables) -> Vec<String>;

    /// Base names of the tables `schema` creates (dropped with their generation).
    fn table_names(&self) -> Vec<&'static str>;

    /// True when every row this projection writes for an event depends only on
    /// that event's own stream (no lookups of rows other streams wrote): its
    /// work may then be split by stream partition and folded out of global
    /// order across streams (per-stream order still holds).
    fn stream_local(&self) -> bool {
        false
    }

    /// Folds one event into the rows. Events of every stream type arrive, in
    /// log order; ignore the ones this read model does not use.
    async fn apply(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError>;
}

/// Decodes an event's payload into a domain event type.
pub fn decode<E: serde::de::DeserializeOwned>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    serde_json::from_value(event.payload.clone()).map_err(|error| ProjectionError::Decode {
        event_id: event.event_id.to_string(),
        event_type: event.event_type.clone(),
        message: error.to_string(),
    })
}
