-- crm-eventlog schema (PostgreSQL). Owned by the crm-eventlog crate.
-- Gap safety: positions are handed out from the one-row log_head table under a row lock
-- held until commit, so positions become visible in commit order.

CREATE TABLE IF NOT EXISTS events (
    global_position BIGINT      PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    tenant_id       TEXT        NOT NULL,
    stream_type     TEXT        NOT NULL,
    stream_id       TEXT        NOT NULL,
    version         BIGINT      NOT NULL CHECK (version >= 1),
    event_type      TEXT        NOT NULL,
    schema_version  INTEGER     NOT NULL,
    payload         JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL,
    prev_hash       BYTEA,
    hash            BYTEA,
    CONSTRAINT events_stream_version UNIQUE (tenant_id, stream_type, stream_id, version)
);

CREATE INDEX IF NOT EXISTS events_type_position ON events (tenant_id, stream_type, global_position);

CREATE OR REPLACE FUNCTION crm_eventlog_events_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable: % rejected', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

DROP TRIGGER IF EXISTS events_immutable ON events;
CREATE TRIGGER events_immutable BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION crm_eventlog_events_immutable();

DROP TRIGGER IF EXISTS events_no_truncate ON events;
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION crm_eventlog_events_immutable();

CREATE TABLE IF NOT EXISTS log_head (
    id       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    position BIGINT  NOT NULL
);
INSERT INTO log_head (id, position) VALUES (TRUE, 0) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS streams (
    tenant_id   TEXT   NOT NULL,
    stream_type TEXT   NOT NULL,
    stream_id   TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, stream_type, stream_id)
);

CREATE TABLE IF NOT EXISTS idempotency_records (
    tenant_id    TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    request_hash TEXT        NOT NULL,
    status       INTEGER     NOT NULL,
    stream_type  TEXT        NOT NULL,
    stream_id    TEXT        NOT NULL,
    version      BIGINT      NOT NULL,
    position     BIGINT      NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

CREATE TABLE IF NOT EXISTS snapshots (
    tenant_id   TEXT        NOT NULL,
    stream_type TEXT        NOT NULL,
    stream_id   TEXT        NOT NULL,
    version     BIGINT      NOT NULL,
    state       JSONB       NOT NULL,
    snapshot_no BIGINT      NOT NULL DEFAULT 1,
    updated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, stream_type, stream_id)
);
