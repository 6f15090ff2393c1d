-- Durable checkpoints of the relays that copy the log to a message bus (crm_eventlog::relay).
-- One row per relay (name, e.g. "nats:CRM_EVENTS"): the global position of the last event the
-- bus acknowledged. Only ever moves forward (the relay writes GREATEST(old, new)).

CREATE TABLE IF NOT EXISTS relay_checkpoints (
    name       TEXT        PRIMARY KEY,
    position   BIGINT      NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
