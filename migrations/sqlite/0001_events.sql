-- Accepted events, stored verbatim, and the idempotency keys of ingest requests.
CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    namespace    TEXT NOT NULL,
    source       TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    type         TEXT NOT NULL,
    subject      TEXT,
    time         TEXT,
    data         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    ingested_by  TEXT NOT NULL,
    trace_id     TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    status       TEXT NOT NULL
);

-- CloudEvents identity: one event per (source, id) within a namespace.
CREATE UNIQUE INDEX events_by_external_id ON events (namespace, source, external_id);
-- Listing newest first by source or type; ids are ULIDs, so id order is arrival order.
CREATE INDEX events_by_source ON events (namespace, source, id);
CREATE INDEX events_by_type ON events (namespace, type, id);
CREATE INDEX events_by_namespace ON events (namespace, id);

CREATE TABLE idempotency_keys (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    event_ids   TEXT,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
