-- crm-eventlog schema (SQLite). Owned by the crm-eventlog crate.
-- Events are append-only: triggers reject UPDATE and DELETE.

CREATE TABLE IF NOT EXISTS events (
    global_position INTEGER PRIMARY KEY,             -- assigned by the single writer, contiguous
    event_id        TEXT    NOT NULL UNIQUE,         -- UUID v7, hyphenated text
    tenant_id       TEXT    NOT NULL,
    stream_type     TEXT    NOT NULL,
    stream_id       TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    metadata        TEXT    NOT NULL CHECK (json_valid(metadata)),
    recorded_at     TEXT    NOT NULL,                -- RFC 3339 UTC, microseconds, e.g. 2026-01-02T03:04:05.123456Z
    prev_hash       BLOB,
    hash            BLOB,
    UNIQUE (tenant_id, stream_type, stream_id, version)
);

CREATE INDEX IF NOT EXISTS events_type_position ON events (tenant_id, stream_type, global_position);

CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are immutable: UPDATE rejected');
END;

CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are immutable: DELETE rejected');
END;

CREATE TABLE IF NOT EXISTS streams (
    tenant_id   TEXT    NOT NULL,
    stream_type TEXT    NOT NULL,
    stream_id   TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, stream_type, stream_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS idempotency_records (
    tenant_id    TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    request_hash TEXT    NOT NULL,
    status       INTEGER NOT NULL,
    stream_type  TEXT    NOT NULL,
    stream_id    TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    position     INTEGER NOT NULL,
    created_at   TEXT    NOT NULL,
    PRIMARY KEY (tenant_id, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS snapshots (
    tenant_id   TEXT    NOT NULL,
    stream_type TEXT    NOT NULL,
    stream_id   TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    state       TEXT    NOT NULL CHECK (json_valid(state)),
    snapshot_no INTEGER NOT NULL DEFAULT 1,
    updated_at  TEXT    NOT NULL,
    PRIMARY KEY (tenant_id, stream_type, stream_id)
) WITHOUT ROWID;
