-- Durable checkpoints of the relays that copy the log to a message bus (crm_eventlog::relay).
-- One row per relay (name, e.g. "nats:CRM_EVENTS"): the global position of the last event the
-- bus acknowledged. Only ever moves forward (the relay writes MAX(old, new)).

CREATE TABLE IF NOT EXISTS relay_checkpoints (
    name       TEXT    PRIMARY KEY NOT NULL,
    position   INTEGER NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at TEXT    NOT NULL               -- RFC 3339 UTC of the last save
);
