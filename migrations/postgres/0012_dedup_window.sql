-- The dedup window and retention (issue 16).
--
-- `event_identities`: the latest event of each CloudEvents identity `(namespace, source,
-- id)`. Within its namespace's `dedupWindow` of `received_at` a repeat of the identity is a
-- duplicate of `event_id`; after it, the repeat is a new event and takes the row over. The
-- events table keeps every event ever accepted under an identity, so its unique index
-- goes: one identity may now name several events, one per window. An identity is
-- forgotten with the event it names (retention.events is never shorter than the
-- window), so it needs no age index.
CREATE TABLE event_identities (
    namespace   TEXT NOT NULL,
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (namespace, source, external_id)
);
INSERT INTO event_identities (namespace, source, external_id, event_id, received_at)
    SELECT namespace, source, external_id, id, received_at FROM events;
DROP INDEX events_by_external_id;

-- Retention finds the expired rows. BRIN: rows arrive in about the order of these times,
-- so a summary per block range finds the old ones, and ingest and every attempt keep
-- it at a fraction of a B-tree's cost.
CREATE INDEX events_by_age ON events USING brin (received_at);
CREATE INDEX delivery_attempts_by_age ON delivery_attempts USING brin (started_at);
