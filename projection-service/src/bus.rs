//! The JetStream side of a projection worker: one durable pull consumer per
//! work unit (explicit acks), read as batches of decoded events. The bus is a
//! fast path only: the worker checks every batch against its checkpoint and
//! reads the log for whatever the bus did not bring.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::Message;
use crm_eventlog::relay::{decode_envelope, ensure_stream, RelaySettings};
use crm_eventlog::RecordedEvent;
use futures::{FutureExt, StreamExt};

/// Where the events travel.
#[derive(Debug, Clone)]
pub struct BusSettings {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// The JetStream stream the relay fills (default `CRM_EVENTS`).
    pub stream: String,
    /// The relay's subject prefix (default `crm`).
    pub subject_prefix: String,
    /// Durable consumer names are `<consumer_prefix>-<unit>`.
    pub consumer_prefix: String,
}

#[derive(Debug, thiserror::Error)]
#[error("JetStream: {0}")]
pub struct BusError(String);

fn bus_error(what: &str, error: impl std::fmt::Display) -> BusError {
    BusError(format!("{what}: {error}"))
}

/// Connects to NATS (bounded; the client then reconnects by itself).
pub async fn connect(settings: &BusSettings) -> Result<async_nats::Client, BusError> {
    async_nats::ConnectOptions::new()
        .name("crm-projections")
        .connection_timeout(Duration::from_secs(5))
        .connect(settings.nats_url.as_str())
        .await
        .map_err(|error| bus_error(&format!("connecting to {}", settings.nats_url), error))
}

/// A message from the bus and the event it carries (None: undecodable, so
/// the log will supply that position).
pub struct Delivered {
    pub event: Option<RecordedEvent>,
    message: Message,
}

impl Delivered {
    /// Acknowledges the message (after the batch committed or was found
    /// already folded). A lost ack only means a redelivery, which the
    /// checkpoint filters out.
    pub async fn ack(&self) {
        if let Err(error) = self.message.ack().await {
            tracing::debug!(%error, "JetStream ack failed; the message will be redelivered");
        }
    }
}

/// The durable consumer of one work unit, with its message stream open.
pub struct UnitConsumer {
    messages: pull::Stream,
}

impl UnitConsumer {
    /// Opens (creating if missing) the durable consumer `<prefix>-<unit>` on
    /// every subject of the stream. A new consumer starts at new messages:
    /// the worker's checkpoint, not the consumer, says where it stands.
    pub async fn open(
        client: &async_nats::Client,
        settings: &BusSettings,
        unit: &str,
        batch: usize,
    ) -> Result<Self, BusError> {
        let js = async_nats::jetstream::new(client.clone());
        let relay = RelaySettings {
            nats_url: settings.nats_url.clone(),
            stream: settings.stream.clone(),
            subject_prefix: settings.subject_prefix.clone(),
            ..RelaySettings::default()
        };
        ensure_stream(&js, &relay)
            .await
            .map_err(|error| bus_error("ensuring the stream", error))?;
        let stream = js
            .get_stream(&settings.stream)
            .await
            .map_err(|error| bus_error(&format!("stream {}", settings.stream), error))?;
        let name = format!("{}-{unit}", settings.consumer_prefix);
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("crm projection unit {unit}")),
                    filter_subject: format!("{}.>", settings.subject_prefix),
                    deliver_policy: DeliverPolicy::New,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| bus_error(&format!("consumer {name}"), error))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch.max(1))
            // Short pull requests: a killed worker's outstanding requests
            // would otherwise swallow messages until they expire.
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|error| bus_error(&format!("pulling from {name}"), error))?;
        Ok(Self { messages })
    }

    /// Waits up to `wait` for a first message, then takes whatever else is
    /// already buffered, up to `max` messages. An error means the consumer
    /// should be reopened (NATS down, consumer deleted, heartbeats missed).
    pub async fn next_batch(
        &mut self,
        wait: Duration,
        max: usize,
    ) -> Result<Vec<Delivered>, BusError> {
        let mut batch = Vec::new();
        let first = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(batch),
            Ok(None) => return Err(BusError("the message stream ended".into())),
            Ok(Some(message)) => message,
        };
        batch.push(delivered(first)?);
        while batch.len() < max {
            match self.messages.next().now_or_never() {
                Some(Some(message)) => batch.push(delivered(message)?),
                Some(None) => return Err(BusError("the message stream ended".into())),
                None => break,
            }
        }
        Ok(batch)
    }
}

fn delivered(message: Result<Message, pull::MessagesError>) -> Result<Delivered, BusError> {
    let message = message.map_err(|error| bus_error("receiving", error))?;
    let event = match decode_envelope(&message.payload) {
        Ok(event) => Some(event),
        Err(error) => {
            tracing::warn!(subject = %message.subject, %error, "undecodable bus message; the log will supply it");
            None
        }
    };
    Ok(Delivered { event, message })
}
